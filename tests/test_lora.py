"""Core LoRA math: init, apply (the transform), merge/unmerge, against a plain jnp reference and merged models."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from helpers import assert_trees_all_close, max_diff, randomize
from tiny import TinyLM

KEY = jax.random.key(0)


@pytest.fixture(autouse=True)
def strict_dtypes():
    with jax.numpy_dtype_promotion("strict"):
        yield


def _setup(model, *args, cfg, layout=True, seed=1):
    params = model.init(KEY, *args)["params"]
    lay = jlora.layout(model, *args) if layout else None
    adapters = jlora.init(params, cfg, key=jax.random.key(seed), layout=lay)
    return params, lay, adapters


# ---------------------------------------------------------------- plain jnp reference
@pytest.mark.parametrize("use_rslora", [False, True])
def test_dense_matches_jnp_reference(use_rslora):
    x = jax.random.normal(jax.random.key(3), (5, 12))
    model = nn.Dense(7)
    cfg = jlora.LoraConfig(rank=4, alpha=6.0, targets="kernel", use_rslora=use_rslora)
    params, _, adapters = _setup(model, x, cfg=cfg, layout=False)
    adapters = randomize(adapters, jax.random.key(4))
    w, bias = params["kernel"], params["bias"]
    a, b = adapters["kernel"].a, adapters["kernel"].b
    scale = 6.0 / (math.sqrt(4) if use_rslora else 4)
    expected = x @ w + bias[None] + scale * (x @ a) @ b
    got = jlora.apply(model, params, adapters, cfg, x)
    assert max_diff(got, expected) <= 1e-5
    # the scale is really applied: a different alpha gives a different output
    other = jlora.apply(model, params, adapters, jlora.LoraConfig(rank=4, alpha=1.0, targets="kernel"), x)
    assert max_diff(other, got) > 1e-3


def test_rank_and_alpha_patterns_match_reference():
    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(6, name="v_proj")(nn.Dense(8, name="q_proj")(x))

    x = jax.random.normal(jax.random.key(5), (3, 10))
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"),
                           rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3.0})
    model = Two()
    params, _, adapters = _setup(model, x, cfg=cfg, layout=False)
    assert adapters["q_proj"]["kernel"].a.shape == (10, 4)
    assert adapters["v_proj"]["kernel"].a.shape == (8, 2)
    adapters = randomize(adapters, jax.random.key(6))
    q, v = params["q_proj"], params["v_proj"]
    qa, qb = adapters["q_proj"]["kernel"].a, adapters["q_proj"]["kernel"].b
    va, vb = adapters["v_proj"]["kernel"].a, adapters["v_proj"]["kernel"].b
    h = x @ q["kernel"] + q["bias"][None] + (3.0 / 4) * (x @ qa) @ qb
    expected = h @ v["kernel"] + v["bias"][None] + (8.0 / 2) * (h @ va) @ vb
    assert max_diff(jlora.apply(model, params, adapters, cfg, x), expected) <= 1e-5


# ---------------------------------------------------------------- fresh adapters, apply == merged
def test_fresh_adapters_change_nothing_exactly():
    ids = jnp.arange(12).reshape(2, 6) % 64
    model = TinyLM()
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=("proj", "embed"))
    params, _, adapters = _setup(model, ids, cfg=cfg)
    base = model.apply({"params": params}, ids)
    assert jnp.array_equal(jlora.apply(model, params, adapters, cfg, ids), base)


class EinsumLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        # kernel axes "hdk": the input axis d sits between two output axes, so the layout matters
        y = nn.Einsum((3, 8, 5), "btd,hdk->bthk", name="mix")(x)
        return nn.Einsum((3, 5, 4), "bthk,hkn->btn", name="down")(y)


class EinsumAtCall(nn.Module):
    """The einsum string given at call time, positionally and by keyword (legal Flax)."""

    @nn.compact
    def __call__(self, x):
        y = nn.Einsum((3, 8, 5), name="mix")(x, "btd,hdk->bthk")
        return nn.Einsum((3, 5, 4), name="down")(einsum_str="bthk,hkn->btn", inputs=y)


CASES = {
    "dense": (nn.Dense(9), lambda: jax.random.normal(jax.random.key(7), (2, 3, 8)), ("kernel",)),
    "densegeneral_multi_out": (nn.DenseGeneral((3, 4), axis=-1), lambda: jax.random.normal(KEY, (2, 5, 8)),
                               ("kernel",)),
    "densegeneral_multi_in": (nn.DenseGeneral(6, axis=(-2, -1)), lambda: jax.random.normal(KEY, (2, 3, 4)),
                              ("kernel",)),
    # axes given out of order (Flax pairs them with the kernel sorted) and of different sizes
    "densegeneral_unsorted_axes": (nn.DenseGeneral(6, axis=(-1, -3)), lambda: jax.random.normal(KEY, (2, 3, 5, 4)),
                                   ("kernel",)),
    "embed": (nn.Embed(20, 6), lambda: jnp.array([[1, 5, 19], [0, 2, 2]]), ("embedding",)),
    "einsum": (EinsumLayer(), lambda: jax.random.normal(KEY, (2, 3, 8)), ("mix", "down")),
    "einsum_at_call": (EinsumAtCall(), lambda: jax.random.normal(KEY, (2, 3, 8)), ("mix", "down")),
    "transformer": (TinyLM(), lambda: jnp.arange(16).reshape(2, 8) % 64, ("proj", "embed")),
    "transformer_untied_dense": (TinyLM(multi_axis=False, tied=False), lambda: jnp.arange(16).reshape(2, 8),
                                 ("proj", "embed", "lm_head")),
    "transformer_scan": (TinyLM(scan=True), lambda: jnp.arange(16).reshape(2, 8) % 64, ("proj", "embed")),
}


@pytest.mark.parametrize("name", [pytest.param(c, marks=pytest.mark.slow) if c == "transformer_scan" else c
                                  for c in CASES])   # scanned: ~7 s; scan == unrolled is in test_models
def test_apply_equals_merged_and_unmerge_inverts(name):
    model, make_x, targets = CASES[name]
    x = make_x()
    cfg = jlora.LoraConfig(rank=2, alpha=3.0, targets=targets)
    params, lay, adapters = _setup(model, x, cfg=cfg)
    adapters = randomize(adapters, jax.random.key(8))
    merged = jlora.merge(params, adapters, cfg, layout=lay)
    want = model.apply({"params": merged}, x)
    got = jax.jit(lambda p, a, x: jlora.apply(model, p, a, cfg, x))(params, adapters, x)
    assert max_diff(got, model.apply({"params": params}, x)) > 1e-4, "adapters must change the output"
    assert max_diff(got, want) <= 1e-5
    assert_trees_all_close(jlora.unmerge(merged, adapters, cfg, layout=lay), params, atol=1e-5)


def test_scan_equals_unrolled_with_adapters():
    ids = jnp.arange(16).reshape(2, 8) % 64
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=("proj",))
    unrolled, scanned = TinyLM(), TinyLM(scan=True)
    params, lay, adapters = _setup(unrolled, ids, cfg=cfg)
    adapters = randomize(adapters, jax.random.key(9))

    def stack(tree):  # layers_0, layers_1 -> layers with a leading axis
        layers = [tree.pop(f"layers_{i}") for i in range(2)]
        tree["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
        return tree

    s_params = stack(dict(params))
    s_adapters = stack(dict(adapters))
    s_lay = jlora.layout(scanned, ids)
    assert s_lay["layers/q_proj/kernel"].lead == 1
    out_u = jlora.apply(unrolled, params, adapters, cfg, ids)
    out_s = jlora.apply(scanned, s_params, s_adapters, cfg, ids)
    assert max_diff(out_u, out_s) <= 1e-5
    # init with the traced layout gives scanned adapters the layer axis leading
    fresh = jlora.init(s_params, cfg, key=KEY, layout=s_lay)
    assert fresh["layers"]["q_proj"]["kernel"].a.shape == (2, 32, 2)
    assert fresh["layers"]["o_proj"]["kernel"].a.shape == (2, 32, 2)  # (heads*head_dim) flattened


class TiedDirect(nn.Module):
    """A tied head that reads the embedding table directly (``h @ wte.embedding.T``), or through ``attend``."""

    attend: bool

    def setup(self):
        self.wte, self.fc = nn.Embed(11, 8), nn.Dense(8)

    def __call__(self, ids):
        h = jnp.tanh(self.fc(self.wte(ids)))
        return self.wte.attend(h) if self.attend else h @ self.wte.embedding.T


def test_adapters_act_where_the_layer_is_called_and_direct_reads_see_the_frozen_kernel():
    """As jlora.apply documents: through ``attend`` a tied head equals the merged model; a direct read of the table
    sees the frozen one (the plain-jnp reference: the merged table for the lookup, the frozen one for the head)."""
    ids = jnp.array([[1, 2, 3, 4]])
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets="wte")

    @functools.partial(jax.jit, static_argnums=0)
    def run(attend):                     # jlora.apply, the merged model, the reference
        model = TiedDirect(attend)
        params = model.init(KEY, ids)["params"]
        ad = randomize(jlora.init(params, cfg, key=KEY), jax.random.key(1), scale=0.5)
        merged = jlora.merge(params, ad, cfg)
        table, fc = merged["wte"]["embedding"], params["fc"]
        with jax.numpy_rank_promotion("allow"):
            h = jnp.tanh(table[ids] @ fc["kernel"] + fc["bias"])
        want = h @ (table if attend else params["wte"]["embedding"]).T
        return jlora.apply(model, params, ad, cfg, ids), model.apply({"params": merged}, ids), want

    for attend in (True, False):
        y, merged_model, want = run(attend)
        np.testing.assert_allclose(y, want, atol=1e-5)
        assert attend == bool(np.allclose(y, merged_model, atol=1e-5))


def test_dropout_only_with_rng():
    x = jax.random.normal(KEY, (4, 16))
    model = nn.Dense(8)
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets="kernel", dropout=0.5)
    params, _, adapters = _setup(model, x, cfg=cfg, layout=False)
    adapters = randomize(adapters, jax.random.key(2))
    merged_out = model.apply({"params": jlora.merge(params, adapters, cfg)}, x)
    assert max_diff(jlora.apply(model, params, adapters, cfg, x), merged_out) <= 1e-5
    dropped = jlora.apply(model, params, adapters, cfg, x, rngs={"lora_dropout": jax.random.key(3)})
    assert max_diff(dropped, merged_out) > 1e-3
    # dropout hits the adapter's input only: the base path is intact
    w = params["kernel"]
    delta = dropped - (x @ w + params["bias"][None])
    rank_ok = np.linalg.matrix_rank(np.asarray(delta, np.float64), tol=1e-4) <= 4
    assert rank_ok


def test_init_follows_peft_defaults():
    params = {"proj": {"kernel": jnp.zeros((100, 50))}, "embed": {"embedding": jnp.zeros((30, 50))}}
    cfg = jlora.LoraConfig(rank=8, alpha=16, targets=("proj", "embed"))
    ad = jlora.init(params, cfg, key=KEY)
    a = np.asarray(ad["proj"]["kernel"].a)
    assert np.abs(a).max() <= 1 / math.sqrt(100) and np.abs(a).max() > 0.8 / math.sqrt(100)
    assert not np.any(np.asarray(ad["proj"]["kernel"].b))
    assert not np.any(np.asarray(ad["embed"]["embedding"].a))
    assert abs(float(jnp.std(ad["embed"]["embedding"].b)) - 1.0) < 0.2
    g = jlora.init(params, jlora.LoraConfig(rank=8, targets="proj", init="gaussian"), key=KEY)
    assert abs(float(jnp.std(g["proj"]["kernel"].a)) - 1 / 8) < 0.02
    # reproducible from the key, and independent of which other paths are targeted
    again = jlora.init(params, jlora.LoraConfig(rank=8, targets="proj"), key=KEY)
    assert jnp.array_equal(again["proj"]["kernel"].a, ad["proj"]["kernel"].a)
    assert jlora.init(params, cfg, key=KEY)["proj"]["kernel"].a.dtype == jnp.float32
    bf = jlora.init(params, jlora.LoraConfig(rank=8, targets="proj", dtype="bfloat16"), key=KEY)
    assert bf["proj"]["kernel"].a.dtype == jnp.bfloat16


def test_targets_select_kernels_not_biases_or_norms():
    ids = jnp.arange(8).reshape(1, 8)
    model = TinyLM(multi_axis=False)
    params = model.init(KEY, ids)["params"]
    ad = jlora.init(params, jlora.LoraConfig(rank=2, targets=(r"q_proj/(kernel|bias)", r"layers_\d/")), key=KEY)
    assert {p.split("/")[-2] for p in jlora.tree.leaves_by_path(ad)} == {"kernel"}
    assert [p for p in jlora.tree.leaves_by_path(ad) if "q_proj" in p] == [
        f"layers_{i}/q_proj/kernel/{x}" for i in range(2) for x in "ab"]
    with pytest.raises(ValueError, match=r"targets 'norm' matches none of the \d+ kernel and embedding paths"):
        jlora.init(params, jlora.LoraConfig(rank=2, targets=(r"q_proj", r"norm")), key=KEY)
    ex = jlora.init(params, jlora.LoraConfig(rank=2, targets="proj", exclude="layers_1"), key=KEY)
    assert "layers_1" not in ex and set(ex["layers_0"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj",
                                                           "down_proj"}


def test_summary_and_count():
    params = {"q_proj": {"kernel": jnp.zeros((4096, 4096))}}
    ad = jlora.init(params, jlora.LoraConfig(rank=16, targets="q_proj"), key=KEY)
    text = jlora.summary(params, ad, ranks=(1, 16, 64))
    assert "131,072" in text and "0.78%" in text
    assert jlora.count(ad) == 16 * (4096 + 4096)
    ladder = text.split("rank ladder")[1]
    assert "8,192" in ladder and "524,288" in ladder   # r=1 and r=64
    stacked = {"layers": {"q_proj": {"kernel": jnp.zeros((3, 64, 64))}}}   # a scanned stack: 3 kernels, one path
    lay = {"layers/q_proj/kernel": jlora.KernelLayout("Dense", (0,), (1,), lead=1)}
    ad = jlora.init(stacked, jlora.LoraConfig(rank=2, targets="q_proj"), key=KEY, layout=lay)
    assert "(3 adapted kernels)" in jlora.summary(stacked, ad)


# ---------------------------------------------------------------- bad input
def test_targets_matching_nothing_names_targets_and_paths():
    params = {"layers_0": {"attn": {"kernel": jnp.zeros((4, 4))}}}
    with pytest.raises(ValueError, match=r"q_proj.*layers_0/attn/kernel"):
        jlora.init(params, jlora.LoraConfig(targets="q_proj"), key=KEY)


@pytest.mark.parametrize("field,value", [
    ("targets", ("v_prj", "q_proj")),     # a typo beside a target that matches
    ("exclude", "layers_1"),              # per-layer names on scanned layers: one stacked "layers" path
    ("rank_pattern", {"v_prj": 4}),
    ("alpha_pattern", {"layers_1": 4.0}),
    ("modules_to_save", "lm_haed"),
])
def test_patterns_matching_nothing_are_errors_not_no_ops(field, value):
    model = TinyLM(vocab=16, dim=8, heads=2, layers=2, scan=True)
    params = model.init(KEY, jnp.zeros((1, 3), jnp.int32))["params"]
    lay = jlora.layout(model, jnp.zeros((1, 3), jnp.int32))
    cfg = jlora.LoraConfig(**{"rank": 2, "targets": ("q_proj", "v_proj"), field: value})
    with pytest.raises(ValueError, match=rf"{field} '{next(iter([value] if isinstance(value, str) else value))}' "
                                         rf"matches none of the .* so it would do nothing; they look like: \['(layers|embed)/"):
        jlora.init(params, cfg, key=KEY, layout=lay)


def test_an_empty_batch_gives_empty_outputs_and_zero_gradients():
    """A batch of no rows (a filter that kept nothing, a dataset's last shard) runs as in plain Flax: on CPU the
    fused dense path's backward and the models' rotary tables once indexed its first element."""
    from jlora.models import llama

    dense = nn.Dense(3)
    cfg = jlora.LoraConfig(rank=2, targets="kernel")
    params, _, adapters = _setup(dense, jnp.ones((1, 5)), cfg=cfg, layout=False)
    grads = jax.grad(lambda a: jnp.sum(jlora.apply(dense, params, a, cfg, jnp.ones((0, 5)))))(adapters)
    assert all(not np.any(g) for g in jax.tree.leaves(grads))
    model = llama.LlamaForCausalLM(llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    params = model.init(KEY, jnp.ones((1, 3), jnp.int32))["params"]
    assert model.apply({"params": params}, jnp.ones((0, 3), jnp.int32)).shape == (0, 3, 32)


def test_adapter_mismatch_names_path_and_shapes():
    x = jnp.ones((2, 8))
    model = nn.Dense(4)
    cfg = jlora.LoraConfig(rank=2, targets="kernel")
    params, _, adapters = _setup(model, x, cfg=cfg, layout=False)
    bad = {"kernel": jlora.Adapter(jnp.zeros((6, 2)), jnp.zeros((2, 4)))}
    with pytest.raises(ValueError, match=r"'kernel'.*\(8, 4\).*\(6, 2\)"):
        jlora.merge(params, bad, cfg)
    with pytest.raises(ValueError, match=r"'kernel'.*\(6, 2\)"):
        jlora.apply(model, params, bad, cfg, x)
    with pytest.raises(ValueError, match="no parameter at that path"):
        jlora.merge(params, {"other": {"kernel": adapters["kernel"]}}, cfg)
    with pytest.raises(ValueError, match="no parameter at that path"):
        jlora.apply(model, params, {**adapters, "other": {"kernel": adapters["kernel"]}}, cfg, x)
    # an adapter made for a Dense kernel on a convolution's: said so, not "needs a (3, 3, 3, 'r')" (invented axes)
    conv = nn.Conv(4, (3, 3))
    conv_params = jax.eval_shape(lambda: conv.init(KEY, jnp.ones((1, 5, 5, 3))))["params"]
    dense_made = {"kernel": jlora.Adapter(jnp.zeros((3, 2)), jnp.zeros((2, 4)), layout=jlora.KernelLayout("Dense"))}
    with pytest.raises(ValueError, match=r"'kernel' \(a \(3, 2\), b \(2, 4\)\) was made for a Dense kernel of 2 dims "
                                         r"laid out \(in, out\), but the parameter there is \(3, 3, 3, 4\): a kernel "
                                         r"of another layer kind .*jlora\.layout"):
        jlora.lora.check_fits(conv_params, dense_made, cfg)


def test_misused_arguments_say_what_they_are_and_what_to_pass():
    x = jnp.ones((2, 8))
    model = nn.Dense(4)
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets="kernel")
    params, _, adapters = _setup(model, x, cfg=cfg, layout=False)
    plain = {"kernel": {"a": adapters["kernel"].a, "b": adapters["kernel"].b}}   # orbax's restore without a target
    with pytest.raises(TypeError, match=r"'kernel' is a plain dict with keys \['a', 'b'\], not a jlora.Adapter"):
        jlora.apply(model, params, plain, cfg, x)
    with pytest.raises(TypeError, match=r"plain dict.*Restore with a target"):
        jlora.merge(params, plain, cfg)
    with pytest.raises(TypeError, match=r"`params` must be the model's params.*got NoneType"):
        jlora.init(None, cfg, key=KEY)
    with pytest.raises(TypeError, match=r"`adapters` must be the pytree jlora.init returns.*got list"):
        jlora.merge(params, [adapters], cfg)
    # a config that does not target an adapter would give it a guessed scale: refused as jlora.bank.put refuses it
    other = jlora.LoraConfig(rank=2, alpha=1, targets="kernel_x")
    for call in (lambda: jlora.merge(params, adapters, other),
                 lambda: jax.jit(lambda p, a: jlora.apply(model, p, a, other, x))(params, adapters)):
        with pytest.raises(ValueError, match=r"adapter at 'kernel' is not one that its config targets \(targets="
                                             r"\['kernel_x'\], exclude=\[\]\): pass the LoraConfig"):
            call()
    with pytest.raises(ValueError, match="not one that its config targets"):
        jlora.apply(model, params, adapters, jlora.LoraConfig(rank=2, targets="kernel", exclude="kernel"), x)


def test_rank_larger_than_kernel_side_is_an_error():
    with pytest.raises(ValueError, match=r"rank 16 .* exceeds .* 8 in x 4 out"):
        jlora.init({"d": {"kernel": jnp.zeros((8, 4))}}, jlora.LoraConfig(rank=16, targets="d"), key=KEY)


def test_multi_axis_kernel_needs_layout():
    params = {"d": {"kernel": jnp.zeros((8, 3, 4))}}
    with pytest.raises(ValueError, match=r"'d/kernel'.*jlora.layout"):
        jlora.init(params, jlora.LoraConfig(rank=2, targets="d"), key=KEY)


def test_unsupported_layer_kind_is_named():
    class WithConv(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="head")(nn.ConvTranspose(4, (3,), name="conv")(x))

    x = jnp.ones((1, 5, 2))
    model = WithConv()
    params = model.init(KEY, x)["params"]
    cfg = jlora.LoraConfig(rank=1, targets=("conv", "head"))
    with pytest.raises(ValueError, match="belongs to a ConvTranspose layer"):
        jlora.init(params, cfg, key=KEY, layout=jlora.layout(model, x))
    adapters = jlora.init(params, jlora.LoraConfig(rank=1, targets="head"), key=KEY)
    conv_ad = jlora.Adapter(jnp.zeros((3 * 2, 1)), jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match="ConvTranspose layer, which the LoRA transform does not handle"):
        jlora.apply(model, params, {**adapters, "conv": {"kernel": conv_ad}}, cfg, x)
