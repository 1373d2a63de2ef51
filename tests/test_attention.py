"""jlora.models.attention: the blocked kernel against the whole-matrix reference, and that reference against
attention written out in jnp (values and gradients, every mask kind, GQA ratios, lengths that are not whole
tiles), the kernel picker, and the argument mapping of the
accelerator kernels (run through XLA or Pallas' interpreter on CPU)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.models import attention as A
from jlora.models import llama as llama_lib

B, T, D = 2, 13, 8     # 13 tokens: not a multiple of the test tiles


def _inputs(heads, kv_heads, t=T, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, t, heads, D))
    k = jax.random.normal(ks[1], (B, t, kv_heads, D))
    v = jax.random.normal(ks[2], (B, t, kv_heads, D))
    return q, k, v, jax.random.normal(ks[3], (B, t, heads, D))


def _masks(kind, t=T):
    valid = segments = None
    if "pad" in kind:       # left padding in row 0, right padding in row 1
        valid = np.ones((B, t), np.int32)
        valid[0, :3] = 0
        valid[1, -4:] = 0
    if "seg" in kind:       # two packed examples per row, then padding id 0 in row 1
        segments = np.ones((B, t), np.int32)
        segments[:, t // 2:] = 2
        segments[1, -2:] = 0
    return valid, segments


def _plain(q, k, v, *, causal, window, valid, segment_ids):
    """Attention written out in jnp, independent of jlora's kernels: repeated KV heads, a numpy mask, softmax; a
    query with nothing to attend gets zeros (torch's SDPA with a boolean mask does the same)."""
    t, g = q.shape[1], q.shape[2] // k.shape[2]
    rel = np.arange(t)[:, None] - np.arange(t)[None, :]
    ok = np.ones((B, t, t), bool) & ((rel >= 0) if causal else True) & ((rel < window) if window else True)
    if valid is not None:
        ok = ok & (np.asarray(valid)[:, None, :] != 0)
    if segment_ids is not None:
        ok = ok & (np.asarray(segment_ids)[:, :, None] == np.asarray(segment_ids)[:, None, :])
    s = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, g, axis=2)) * D ** -0.5
    probs = jax.nn.softmax(jnp.where(jnp.asarray(ok)[:, None], s, -1e30), axis=-1) * ok.any(-1)[:, None, :, None]
    return jnp.einsum("bhqk,bkhd->bqhd", probs, jnp.repeat(v, g, axis=2))


def _value_and_grads(impl, q, k, v, cot, **kw):
    def loss(q, k, v):
        out = (_plain(q, k, v, **kw) if impl == "plain" else
               A.attention(q, k, v, scale=D ** -0.5, implementation=impl, **kw))
        return jnp.sum(out * cot), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _rows(t, causal, window, valid, segments):
    """(B, T, 1, 1): the real queries that have something to attend (others' outputs are meaningless)."""
    ok = np.broadcast_to(np.asarray(A.allowed_mask(t, causal, window, valid, segments)).any(-1), (B, t))
    if valid is not None:
        ok = ok & (valid != 0)
    return jnp.asarray(ok[:, :, None, None])


@pytest.mark.parametrize("kind,window,causal,heads,kv_heads,tile", [
    ("causal", None, True, 4, 2, 4),          # GQA; 4 tiles of 4, the last one padded
    ("causal", None, True, 2, 1, 5),          # MQA; 3 tiles of 5: an odd tile, its diagonal in one part
    ("window", 3, True, 4, 1, 4),             # MQA
    ("window", 6, True, 2, 2, 5),             # MHA; 3 tiles of 5
    ("window", 12, True, 4, 2, 4),            # a window longer than 2 tiles
    ("pad+seg", 5, True, 6, 2, 4),            # 3 query heads per KV head; left and right padding, packed rows
    ("pad+seg", None, True, 6, 2, 4),         # the same, causal without a window: diagonal tiles in halves
    ("full+pad+seg", None, False, 2, 1, 4),   # not causal
])
def test_blocked_equals_whole_matrix_attention(kind, window, causal, heads, kv_heads, tile):
    """Every query row, padding included: rows with nothing to attend (left padding, a padding segment) give
    zeros and no gradient in both kernels, so a loss that reads them differentiates what the forward computed."""
    q, k, v, cot = _inputs(heads, kv_heads)
    valid, segments = _masks(kind)
    kw = dict(causal=causal, window=window, valid=valid, segment_ids=segments)
    ref, ref_grads = _value_and_grads("xla", q, k, v, cot, **kw)
    out, grads = _value_and_grads("blocked", q, k, v, cot, tile=tile, **kw)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-5)
    plain, plain_grads = _value_and_grads("plain", q, k, v, cot, **kw)   # the reference itself, against jnp
    np.testing.assert_allclose(ref, plain, atol=1e-5)
    for r, g in zip(ref_grads, plain_grads):
        np.testing.assert_allclose(r, g, atol=1e-5)


def test_blocked_memory_is_linear_in_length():
    """Compiled scratch of a blocked forward + backward grows linearly in T: 4x the tokens, <= 4.5x the temp
    (the whole-matrix reference: ~16x)."""
    def temp(impl, t):
        q = jnp.zeros((1, t, 4, 16))
        k = jnp.zeros((1, t, 2, 16))
        f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(A.attention(q, k, v, scale=0.25, implementation=impl,
                                                                 tile=32)), argnums=(0, 1, 2)))
        return f.lower(q, k, k).compile().memory_analysis().temp_size_in_bytes

    assert temp("blocked", 1024) / temp("blocked", 256) <= 4.5
    assert temp("xla", 1024) / temp("xla", 256) > 10


def test_tiling_and_plan():
    assert A.tiling(13, 4) == (4, 4)        # 13 tokens in tiles of at most 4: 4 tiles, the last one padded
    assert A.tiling(300, 128) == (3, 104)   # 3 tiles of 100 tokens, rounded up to a multiple of 8
    assert A.tiling(4096, 128) == (32, 128)
    p = A.plan(4096, 128, 3, True, 300)
    assert (p.dmin, p.dmax) == (0, 3)       # distances up to 299 reach 3 tiles back
    assert A.plan(512, 128, 1, True, None).dmax == 3


CASE = A.Case("cpu", jnp.float32, 64, 2048)
GPU = A.Case("gpu", jnp.bfloat16, 64, 2048)
TPU = A.Case("tpu", jnp.float32, 64, 2048)


@pytest.mark.parametrize("case,auto", [
    (CASE, "blocked"), (CASE._replace(dtype=jnp.bfloat16), "blocked"), (CASE._replace(length=128), "xla"),
    (CASE._replace(length=129), "blocked"),
    (GPU, "cudnn"), (GPU._replace(window=256, padding=True), "cudnn"), (GPU._replace(platform="cuda"), "cudnn"),
    (GPU._replace(dtype=jnp.float32), "blocked"), (GPU._replace(head_dim=160), "blocked"),
    (GPU._replace(segments=True), "blocked"), (GPU._replace(padding=True, length=2047), "blocked"),
    (GPU._replace(window=8, causal=False), "blocked"),
    (TPU, "splash"), (TPU._replace(segments=True, padding=True, window=64), "splash"),
])
def test_choose_auto_picks_the_fastest_supported_kernel(case, auto):
    assert A.choose("auto", case) == auto
    assert A.choose("blocked", case) == "blocked" and A.choose("xla", case) == "xla"


@pytest.mark.parametrize("forced,case,why", [
    ("cudnn", CASE, "runs on an NVIDIA GPU"), ("cudnn", GPU._replace(dtype=jnp.float32), "bfloat16 or float16"),
    ("cudnn", GPU._replace(segments=True), "segment_ids"), ("cudnn", GPU._replace(head_dim=20), "multiple of 8"),
    ("splash", GPU, "runs on a TPU"),
])
def test_a_forced_kernel_that_cannot_run_the_case_is_an_error(forced, case, why):
    with pytest.raises(ValueError, match=f"attention='{forced}' cannot run this call: .*{why}.*to 'auto', which picks"):
        A.choose(forced, case)


def test_unknown_implementation_is_an_error():
    with pytest.raises(ValueError, match="'flash' is not one of"):
        A.choose("flash", CASE)
    with pytest.raises(ValueError, match="attention='flash' is not one of"):
        llama_lib.LlamaConfig(attention="flash")
    q, k, v, _ = _inputs(4, 2)
    with pytest.raises(ValueError, match="cannot run this call: cuDNN runs on an NVIDIA GPU"):
        A.attention(q, k, v, scale=1.0, implementation="cudnn")
    # a window of no tokens would give all-zero outputs and no gradient, silently
    for window in (0, -3):
        with pytest.raises(ValueError, match=rf"`window`={window} must be >= 1"):
            A.attention(q, k, v, scale=1.0, window=window)
        with pytest.raises(ValueError, match=rf"sliding_window={window} must be >= 1"):
            llama_lib.LlamaConfig(model_type="mistral", sliding_window=window)


@pytest.mark.parametrize("window,kind", [(None, "causal"), (4, "causal"), (None, "pad"), (4, "pad")])
def test_cudnn_call_maps_masks_like_the_reference(window, kind):
    """The cuDNN path's call of jax.nn.dot_product_attention (padding as a key mask, the window as cuDNN's left
    window), run with XLA's implementation of the same call."""
    q, k, v, _ = _inputs(4, 2, t=12)
    valid, _ = _masks(kind, t=12)
    ok = _rows(12, True, window, valid, None)
    ref = jax.jit(lambda q, k, v: A.attention(q, k, v, scale=D ** -0.5, window=window, valid=valid,
                                              implementation="xla"))(q, k, v)
    got = jax.jit(lambda q, k, v: A._cudnn(q, k, v, D ** -0.5, True, window, valid, implementation="xla"))(q, k, v)
    np.testing.assert_allclose(got * ok, ref * ok, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_cudnn_takes_right_padding_as_key_counts_and_hands_other_padding_to_the_blocked_kernel(side, monkeypatch):
    """cuDNN has no (B, 1, 1, T) key mask (JAX turns a mask into a (T, T) bias): right-padded rows go to it as
    key counts, any other padding to the blocked kernel, chosen at run time. A blocked kernel that returns NaN
    shows which branch ran."""
    q, k, v, cot = _inputs(4, 2, t=12)
    valid = np.ones((B, 12), np.int32)
    if side == "right":
        valid[0, 9:] = 0
        valid[1, 5:] = 0
    else:
        valid[0, :3] = 0
    cot = cot * _rows(12, True, 4, valid, None)

    def run(fn):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cot), argnums=(0, 1, 2)))(q, k, v)

    ref = run(lambda q, k, v: _plain(q, k, v, causal=True, window=4, valid=valid, segment_ids=None))
    got = run(lambda q, k, v: A._cudnn(q, k, v, D ** -0.5, True, 4, valid, implementation="xla", tile=4))
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(A, "blocked", lambda q, *a, **kw: jnp.full(q.shape, jnp.nan, q.dtype))
    out = A._cudnn(q, k, v, D ** -0.5, True, 4, valid, implementation="xla")
    assert bool(jnp.isnan(out).any()) == (side == "left")


def test_cudnn_arguments_pass_jax_s_checks_for_every_mask_kind(monkeypatch):
    """The cuDNN call traced as on a GPU (only JAX's cuDNN version probe is stubbed): JAX checks the arguments'
    shapes while tracing, which the XLA stand-in above does not."""
    fa = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    if not hasattr(fa, "check_cudnn_version"):
        pytest.skip("this jax has no cuDNN version probe to stub")
    monkeypatch.setattr(fa, "check_cudnn_version", lambda *a: 90800)
    q = jnp.zeros((2, 16, 4, 64), jnp.bfloat16)
    k = v = jnp.zeros((2, 16, 2, 64), jnp.bfloat16)
    valid = np.ones((2, 16), np.int32)
    valid[0, 12:] = 0
    for window in (None, 4):
        for mask in (None, valid):
            out = jax.eval_shape(lambda q, k, v: A._cudnn(q, k, v, 0.125, True, window, mask), q, k, v)
            assert out.shape == q.shape and out.dtype == q.dtype


def test_an_amd_gpu_is_not_taken_for_cudnn(monkeypatch):
    class Client:
        platform_version = "rocm 6.2.4"

    class Device:
        client = Client()

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [Device()])
    assert A._platform() == "rocm"
    assert A.choose("auto", A.Case(A._platform(), jnp.bfloat16, 64, 2048)) == "blocked"
    Client.platform_version = "PJRT C API\ncuda 12080"
    assert A._platform() == "gpu"


@pytest.mark.slow
def test_splash_call_maps_masks_like_the_reference():
    """The TPU path (Pallas splash kernel, one MQA kernel per KV head) in Pallas' interpreter on CPU: causal window,
    padding and packed rows, values and gradients."""
    q, k, v, cot = _inputs(4, 2)
    valid, segments = _masks("pad+seg")
    ok = _rows(T, True, 3, valid, segments)
    cot = cot * ok

    def run(fn):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cot), argnums=(0, 1, 2))(q, k, v)

    ref = run(lambda q, k, v: A.attention(q, k, v, scale=D ** -0.5, window=3, valid=valid, segment_ids=segments,
                                          implementation="xla"))
    got = run(lambda q, k, v: A._splash(q, k, v, D ** -0.5, True, 3, valid, segments, interpret=True))
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(g, r, atol=1e-5)


@pytest.mark.slow
def test_model_with_blocked_attention_equals_whole_matrix_attention(monkeypatch):
    """A Mistral-style model (GQA, sliding window) on packed rows with left and right padding: logits and
    parameter gradients of the blocked kernel (tiles of 8 tokens: several tiles, the last one padded) equal the
    reference kernel's, at every position (a loss reading padding positions, as a left-padded LM loss does)."""
    monkeypatch.setitem(A.TILE, "cpu", 8)
    cfg = llama_lib.LlamaConfig(model_type="mistral", num_key_value_heads=2, sliding_window=11, vocab_size=64,
                                hidden_size=32, intermediate_size=64, head_dim=8, num_hidden_layers=1)
    t = 21
    ids = jax.random.randint(jax.random.key(1), (B, t), 0, 64)
    mask = np.ones((B, t), np.int32)
    mask[0, :4] = 0         # left padding: queries with nothing to attend, which the loss below reads too
    mask[1, -5:] = 0
    seg = np.where(np.arange(t) < 9, 1, 2)[None].repeat(B, 0) * mask
    pos = np.where(np.arange(t) < 9, np.arange(t), np.arange(t) - 9)[None].repeat(B, 0)
    params = llama_lib.LlamaForCausalLM(cfg).init(jax.random.key(0), ids)["params"]
    keep = jnp.ones((B, t, 1), jnp.float32)

    def run(impl):
        model = llama_lib.LlamaForCausalLM(dataclasses.replace(cfg, attention=impl))

        def loss(p):
            logits = model.apply({"params": p}, ids, attention_mask=mask, positions=pos, segment_ids=seg)
            return jnp.sum(jax.nn.log_softmax(logits) * keep * 0.01), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, ref), ref_g = run("xla")
    (_, got), got_g = run("blocked")
    np.testing.assert_allclose(got * keep, ref * keep, atol=1e-5)
    for g, r in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(g, r, atol=1e-5)


def test_whole_matrix_kernel_checks_for_empty_rows_only_with_padding():
    """Without padding every query attends itself, so the ``"xla"`` kernel leaves out its any-key-allowed
    reduction, which XLA constant-folded over the constant (T, T) mask at compile time (36 s at T = 4096)."""
    q, k, v, _ = _inputs(4, 2)

    def lowered(valid, segments=None):
        f = lambda q, k, v: A.attention(q, k, v, scale=D ** -0.5, implementation="xla", valid=valid,  # noqa: E731
                                        segment_ids=segments)
        return jax.jit(f).lower(q, k, v).as_text()

    valid, segments = _masks("pad+seg")
    assert "stablehlo.or" not in lowered(None) and "stablehlo.or" not in lowered(None, segments)
    assert "stablehlo.or" in lowered(valid, segments)
