"""Losses against plain-jnp references: the custom-VJP token NLL, the fused (chunked) output-projection loss, and
the model-level switch to it (jlora's models with ``return_hidden``), including the fall-backs to logits; plus
the custom-VJP attention softmax and gated MLP those models now use, against JAX's own formulas."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from helpers import assert_trees_all_close, randomize
from jlora import loss as loss_lib
from jlora import train
from jlora.models import attention
from jlora.models import layers as L
from jlora.models.gpt2 import GPT2Config, GPT2LMHeadModel
from jlora.models.llama import LlamaConfig, LlamaForCausalLM

KEY = jax.random.key(0)


def _reference_loss(logits, ids, mask=None):
    """Mean next-token cross-entropy written the obvious way: slice, log_softmax, pick."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    keep = jnp.ones_like(nll) if mask is None else mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * keep) / jnp.maximum(jnp.sum(keep), 1.0)


def _data(b=3, t=10, d=16, v=37, seed=0):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(k1, (b, t, d))
    w = 0.5 * jax.random.normal(k2, (v, d))
    ids = jax.random.randint(k3, (b, t), 0, v)
    mask = (jax.random.uniform(k4, (b, t)) > 0.3).astype(jnp.int32)
    return h, w, ids, mask


@pytest.mark.parametrize("masked", [False, True])
def test_causal_lm_loss_and_its_gradient_match_the_reference(masked):
    h, w, ids, mask = _data()
    mask = mask if masked else None
    logits = h @ w.T
    got, g_got = jax.value_and_grad(lambda z: jlora.causal_lm_loss(z, ids, mask)[0])(logits)
    want, g_want = jax.value_and_grad(lambda z: _reference_loss(z, ids, mask))(logits)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(g_got, g_want, atol=1e-7)


@pytest.mark.parametrize("vocab_axis", [0, 1])
@pytest.mark.parametrize("chunk", [None, 1, 3, 4, 10])   # None: one chunk here; 3 and 4 pad T=10
def test_fused_loss_equals_plain_loss_with_gradients_for_hidden_and_weight(vocab_axis, chunk):
    h, w, ids, mask = _data()
    w = w if vocab_axis == 0 else w.T

    def fused(h, w):
        return loss_lib.fused_causal_lm_loss(h, w, ids, mask, vocab_axis=vocab_axis, chunk_tokens=chunk)

    def plain(h, w):
        logits = h @ (w.T if vocab_axis == 0 else w)
        return _reference_loss(logits, ids, mask), jnp.sum(mask[:, 1:])

    (got, n), grads = jax.value_and_grad(fused, argnums=(0, 1), has_aux=True)(h, w)
    (want, n_want), want_grads = jax.value_and_grad(plain, argnums=(0, 1), has_aux=True)(h, w)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert int(n) == int(n_want)
    assert_trees_all_close(grads, want_grads, atol=1e-6)
    # differentiated with respect to the hidden states alone, the weight's gradient is not formed (and the value
    # and hidden gradient do not change)
    g_h = jax.grad(lambda h: fused(h, w)[0])(h)
    np.testing.assert_allclose(g_h, want_grads[0], atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.int16])
def test_narrow_integer_ids_give_the_int32_gradient(dtype):
    """Ids in a dtype that cannot count to the vocabulary size (300 > 255): the one-hot of the gradient is built
    in int32 (an iota in the ids' dtype wrapped and hit a second class), for the plain and the fused loss."""
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 6, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(300, 8)), jnp.float32)
    ids = rng.integers(0, 40, (2, 6))
    for loss in (lambda hh, i: loss_lib.causal_lm_loss(hh @ w.T, i)[0],
                 lambda hh, i: loss_lib.fused_causal_lm_loss(hh, w, i, chunk_tokens=4)[0]):
        want = jax.grad(loss)(h, jnp.asarray(ids, jnp.int32))
        np.testing.assert_allclose(jax.grad(loss)(h, jnp.asarray(ids, dtype)), want, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_tokens must be an int >= 1"):
        loss_lib.fused_causal_lm_loss(h, w, jnp.asarray(ids), chunk_tokens=0)


def test_fused_loss_rejects_a_weight_that_does_not_fit():
    h, w, ids, _ = _data()
    with pytest.raises(ValueError, match=r"\(37, 16\) with vocab_axis=1 does not fit hidden states of width 16"):
        loss_lib.fused_causal_lm_loss(h, w, ids, vocab_axis=1)


def _grad_of_weight_skipped(h, w, ids):
    """FLOPs of d(loss)/d(hidden) through the fused loss: must not include the (V, D) weight gradient."""
    fn = jax.jit(jax.grad(lambda h: loss_lib.fused_causal_lm_loss(h, w, ids)[0]))
    cost = fn.lower(h).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_fused_loss_skips_the_weight_gradient_when_the_weight_is_frozen():
    b, t, d, v = 2, 64, 64, 4096
    h = jax.random.normal(KEY, (b, t, d))
    w = jax.random.normal(KEY, (v, d))
    ids = jax.random.randint(KEY, (b, t), 0, v)
    matmul = 2 * b * t * d * v
    frozen = _grad_of_weight_skipped(h, w, ids)
    both = jax.jit(jax.grad(lambda h, w: loss_lib.fused_causal_lm_loss(h, w, ids)[0], argnums=(0, 1)))
    cost = both.lower(h, w).compile().cost_analysis()
    trained = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    # logits + hidden gradient = 2 matmuls; with the weight's gradient 3 (plus elementwise work in both)
    assert 2 * matmul <= frozen < 2.5 * matmul, frozen / matmul
    assert trained - frozen >= 0.9 * matmul, (trained - frozen) / matmul


def _llama(**kw):
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, **kw)
    model = LlamaForCausalLM(cfg)
    ids = jax.random.randint(jax.random.key(5), (2, 12), 0, 97)
    return model, model.init(KEY, ids)["params"], ids


def _grads(model, params, cfg, adapters, batch, hidden: bool):
    """Loss and adapter gradients through ``jlora.lm_loss``, with the fused path on or off."""
    def f(ad):
        apply_fn = train._bind(model, cfg, params, ad, None)
        apply_fn.hidden_output = hidden
        return train.lm_loss(apply_fn, batch)[0]

    return jax.value_and_grad(f)(adapters)


@pytest.mark.parametrize("tied, targets", [  # tied q,v (~16 s) in make test-all; the untied and tied embed cases here
    pytest.param(True, ("q_proj", "v_proj"), marks=pytest.mark.slow), (False, ("q_proj", "v_proj")),
    (False, ("lm_head",)), (True, ("embed_tokens",))])
def test_model_loss_is_the_same_with_and_without_the_fused_head(tied, targets):
    model, params, ids = _llama(tie_word_embeddings=tied)
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=targets)
    adapters = randomize(jlora.init(params, cfg, key=KEY), jax.random.key(2))
    mask = jnp.ones_like(ids).at[:, :3].set(0)
    batch = {"input_ids": ids, "loss_mask": mask}
    fused = _grads(model, params, cfg, adapters, batch, hidden=True)
    plain = _grads(model, params, cfg, adapters, batch, hidden=False)
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-5)
    assert_trees_all_close(fused[1], plain[1], atol=1e-6)
    out = jlora.apply(model, params, adapters, cfg, ids, return_hidden=True)
    # an adapted output layer cannot be read as a plain weight: the model falls back to logits
    assert isinstance(out, loss_lib.Hidden) == (targets == ("q_proj", "v_proj"))


def test_trained_output_layer_gets_its_gradient_through_the_fused_loss():
    model, params, ids = _llama(tie_word_embeddings=False)
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj",), modules_to_save="lm_head")
    adapters = randomize(jlora.init(params, cfg, key=KEY), jax.random.key(2))
    batch = {"input_ids": ids}
    fused = _grads(model, params, cfg, adapters, batch, hidden=True)
    plain = _grads(model, params, cfg, adapters, batch, hidden=False)
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-5)
    assert_trees_all_close(fused[1], plain[1], atol=1e-6)
    assert float(jnp.max(jnp.abs(fused[1]["lm_head"]["kernel"]))) > 0


def test_hidden_output_matches_logits_for_both_families():
    model, params, ids = _llama(tie_word_embeddings=True)
    out = model.apply({"params": params}, ids, return_hidden=True)
    np.testing.assert_allclose(out.states @ out.weight.T, model.apply({"params": params}, ids), atol=1e-5)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=4, n_positions=32))
    gp = gpt.init(KEY, ids)["params"]
    out = gpt.apply({"params": gp}, ids, return_hidden=True)
    assert out.vocab_axis == 0
    np.testing.assert_allclose(out.states @ out.weight.T, gpt.apply({"params": gp}, ids), atol=1e-5)


def test_train_step_with_the_fused_loss_needs_no_vocab_sized_buffers(monkeypatch):
    # compiled temp memory of one train step: the fused loss keeps one chunk of logits (here 8 positions of 64),
    # the plain one all of them. Deterministic: XLA's memory analysis.
    monkeypatch.setattr(loss_lib, "CHUNK_ELEMENTS", 4 * 8 * 8192)
    model, params, ids = _llama(tie_word_embeddings=True)
    model = LlamaForCausalLM(dataclasses.replace(model.config, vocab_size=8192))
    ids = jax.random.randint(KEY, (4, 64), 0, 8192)
    params = model.init(KEY, ids)["params"]
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
    opt = optax.adamw(1e-3)
    state = jlora.TrainState.create(jlora.init(params, cfg, key=KEY), opt, rng=KEY)

    def plain_loss(apply_fn, batch):
        return jlora.lm_loss(lambda *a, **k: apply_fn(*a, **k), batch)   # no `hidden_output` attribute

    temps = {}
    for name, loss_fn in (("fused", jlora.lm_loss), ("plain", plain_loss)):
        step = jlora.make_train_step(model, cfg, opt, loss_fn=loss_fn)
        compiled = jax.jit(step).lower(state, params, {"input_ids": ids}).compile()
        temps[name] = compiled.memory_analysis().temp_size_in_bytes
    logits_bytes = 4 * 64 * 8192 * 4
    print({k: f"{v / 2**20:.1f} MiB" for k, v in temps.items()}, f"logits {logits_bytes / 2**20:.1f} MiB")
    assert temps["plain"] - temps["fused"] >= 1.5 * logits_bytes, temps


def test_masked_softmax_matches_jax_softmax_and_its_gradient():
    s = jax.random.normal(KEY, (2, 3, 5, 7))
    ok = jax.random.uniform(jax.random.key(1), (2, 1, 5, 7)) > 0.4
    ok = ok.at[..., 0].set(True)     # every row allows something
    cot = jax.random.normal(jax.random.key(2), s.shape)

    def ref(z):
        return jax.nn.softmax(jnp.where(ok, z, -jnp.inf), axis=-1)

    np.testing.assert_allclose(attention.masked_softmax(s, ok), ref(s), atol=1e-6)
    got = jax.grad(lambda z: jnp.sum(attention.masked_softmax(z, ok) * cot))(s)
    want = jax.grad(lambda z: jnp.sum(ref(z) * cot))(s)
    np.testing.assert_allclose(got, want, atol=1e-6)
    # a row with nothing allowed (a padding query) is zeros, not NaN, and passes no gradient back
    none = jnp.zeros_like(ok)
    np.testing.assert_array_equal(attention.masked_softmax(s, none), jnp.zeros(s.shape))
    np.testing.assert_array_equal(jax.grad(lambda z: jnp.sum(attention.masked_softmax(z, none) * cot))(s), 0.0)


def test_silu_gate_matches_jax_and_falls_back_for_other_activations():
    g, u = jax.random.normal(KEY, (2, 3, 8)), jax.random.normal(jax.random.key(1), (2, 3, 8))
    cot = jax.random.normal(jax.random.key(2), g.shape)
    got = jax.grad(lambda a, b: jnp.sum(L.gated("silu", a, b) * cot), argnums=(0, 1))(g, u)
    want = jax.grad(lambda a, b: jnp.sum(jax.nn.silu(a) * b * cot), argnums=(0, 1))(g, u)
    assert_trees_all_close(got, want, atol=1e-6)
    np.testing.assert_allclose(L.gated("gelu", g, u), jax.nn.gelu(g, approximate=False) * u, atol=1e-6)
