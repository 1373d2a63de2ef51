"""LoRA variants against PEFT itself: DoRA, PiSSA/OLoRA (with PEFT's rank-2r conversion), bias modes and
modules_to_save; plus jnp references for the DoRA math."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft
import torch
import transformers

import jlora  # noqa: E402
from helpers import max_diff, randomize, train_peft  # noqa: E402
from jlora.variants import dora  # noqa: E402

IDS = np.array([[1, 5, 9, 20, 3, 7, 11, 2], [4, 4, 8, 15, 16, 23, 42, 0]])


def _hf_model(kind, tmp_path, **extra):
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
                  num_key_value_heads=2, **extra)
    cfg = transformers.LlamaConfig(**common) if kind == "llama" else transformers.Qwen2Config(**common)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    folder = tmp_path / kind
    model.save_pretrained(folder)
    return model, folder


def _torch_logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def _apply(loaded, params, adapters, cfg):
    return np.asarray(jlora.apply(loaded.model, params, adapters, cfg, jnp.asarray(IDS)))


def _train(loaded, params, adapters, cfg, steps=3, lr=1e-2):
    opt = optax.adam(lr)
    state = jlora.TrainState.create(adapters, opt, rng=jax.random.key(0))
    step = jax.jit(jlora.make_train_step(loaded.model, cfg, opt))
    for _ in range(steps):
        state, _ = step(state, params, {"input_ids": jnp.asarray(IDS)})
    return state.adapters


# ---------------------------------------------------------------- DoRA
def test_dora_dense_matches_jnp_reference_and_merge():
    x = jax.random.normal(jax.random.key(0), (2, 3, 12))
    model = nn.Dense(7)
    params = model.init(jax.random.key(1), x)["params"]
    cfg = jlora.LoraConfig(rank=3, alpha=6.0, targets="kernel", use_dora=True)
    fresh = jlora.init(params, cfg, key=jax.random.key(2))
    w = params["kernel"]
    np.testing.assert_allclose(fresh["kernel"].extras["m"], np.linalg.norm(np.asarray(w), axis=0), rtol=1e-6)
    assert jnp.array_equal(jlora.apply(model, params, fresh, cfg, x), model.apply({"params": params}, x))
    ad = randomize(fresh, jax.random.key(3), 0.5)
    a, b, m = ad["kernel"].a, ad["kernel"].b, ad["kernel"].extras["m"]
    v = w + 2.0 * a @ b
    expected = x @ (m[None] * v / jnp.linalg.norm(v, axis=0)[None]) + params["bias"][None, None]
    with jax.numpy_dtype_promotion("strict"):
        got = jax.jit(lambda p, a: jlora.apply(model, p, a, cfg, x))(params, ad)
    assert max_diff(got, expected) <= 1e-5
    assert max_diff(model.apply({"params": jlora.merge(params, ad, cfg)}, x), expected) <= 1e-5
    with pytest.raises(ValueError, match="unmerge cannot invert"):
        jlora.unmerge(params, ad, cfg)


def test_a_fresh_dora_adapter_in_bf16_changes_nothing():
    """A bf16 magnitude is the column norm rounded to bf16: compared with the norm at that precision, g = m / ||W||
    is exactly 1 for a fresh adapter (it was off 1 by up to 0.33%, so the fresh adapter changed the model), and
    apply and merge agree on a trained one."""
    x = jax.random.normal(jax.random.key(0), (4, 64))
    model = nn.Dense(32)
    params = model.init(jax.random.key(1), x)["params"]
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets="kernel", use_dora=True, dtype="bfloat16")
    fresh = jlora.init(params, cfg, key=jax.random.key(2))
    assert fresh["kernel"].extras["m"].dtype == jnp.bfloat16
    assert jnp.array_equal(jlora.apply(model, params, fresh, cfg, x), model.apply({"params": params}, x))
    assert jnp.array_equal(jlora.merge(params, fresh, cfg)["kernel"], params["kernel"])
    ad = randomize(fresh, jax.random.key(3), 0.3)
    merged = model.apply({"params": jlora.merge(params, ad, cfg)}, x)
    assert max_diff(jlora.apply(model, params, ad, cfg, x), merged) <= 1e-5


def test_dora_norm_is_constant_in_backward():
    """PEFT (and the DoRA paper, 4.3) detach ||W + sAB||: the gradient equals the one with the norm frozen."""
    x = jax.random.normal(jax.random.key(0), (5, 8))
    w = jax.random.normal(jax.random.key(1), (8, 6))
    pair = randomize(jlora.Adapter(jnp.zeros((8, 2)), jnp.zeros((2, 6)), {"m": jnp.zeros(6)}, variant="dora"),
                     jax.random.key(2), 0.5)
    norm = dora.column_norm(w, pair.a, pair.b, 1.5)

    def ours(p):
        return jnp.sum(dora.dense_output(x, x @ w, w, None, p, 1.5, jnp.float32) ** 2)

    def frozen(p):
        return jnp.sum((x @ (w + 1.5 * p.a @ p.b) * (p.extras["m"] / norm)[None]) ** 2)

    jax.tree.map(lambda g, h: np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5),
                 jax.grad(ours)(pair), jax.grad(frozen)(pair))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dora_export_equals_peft_logits(dtype, tmp_path):
    """The export computes the function trained: with bf16 adapters too, whose gain takes the norm at bf16 precision
    (test_a_fresh_dora_adapter_in_bf16_changes_nothing), which the exported fp32 magnitude makes up for."""
    hf_model, folder = _hf_model("llama", tmp_path)
    loaded = jlora.hf.load(folder)
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"), use_dora=True,
                           rank_pattern={"layers_1/self_attn/v_proj": 2}, dtype=dtype)
    adapters = randomize(jlora.init(loaded.params, cfg, key=jax.random.key(0)), jax.random.key(1), 0.2)
    adapters = jax.tree.map(lambda x: x, adapters)
    for path, pair in jlora.adapter.adapter_items(adapters):   # magnitudes near the column norms, as in training
        pair.extras["m"] = (jlora.variants.dora.column_norm(jlora.tree.flatten(loaded.params)[path], pair.a, pair.b,
                                                            cfg.scale(path)) * (1 + pair.extras["m"])).astype(dtype)
    ours = _apply(loaded, loaded.params, adapters, cfg)
    assert max_diff(ours, _torch_logits(hf_model)) > 1e-3
    out = jlora.peft.save(tmp_path / "dora", adapters, cfg, loaded)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    pm = peft.PeftModel.from_pretrained(hf_model, str(out)).eval()
    theirs = _torch_logits(pm)
    assert max_diff(ours, theirs) <= 1e-4
    back, cfg2 = jlora.peft.load(out, loaded)
    assert cfg2.use_dora
    assert max_diff(_apply(loaded, loaded.params, back, cfg2), theirs) <= 1e-4


def test_dora_import_of_peft_trained_adapter(tmp_path):
    hf_model, folder = _hf_model("qwen2", tmp_path)
    loaded = jlora.hf.load(folder)
    pm = peft.get_peft_model(hf_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                                       use_dora=True, task_type="CAUSAL_LM"))
    train_peft(pm, IDS, lr=2e-2)
    pm.save_pretrained(tmp_path / "peft_dora")
    adapters, cfg = jlora.peft.load(tmp_path / "peft_dora", loaded)
    assert cfg.use_dora and "m" in adapters["layers_0"]["self_attn"]["q_proj"]["kernel"].extras
    assert max_diff(_apply(loaded, loaded.params, adapters, cfg), _torch_logits(pm)) <= 1e-4


@pytest.mark.slow
def test_dora_train_step_and_scan():
    from tiny import TinyLM

    ids = jnp.arange(16).reshape(2, 8) % 64
    unrolled, scanned = TinyLM(multi_axis=False), TinyLM(multi_axis=False, scan=True)
    params = unrolled.init(jax.random.key(0), ids)["params"]
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "up_proj"), use_dora=True)
    ad = randomize(jlora.init(params, cfg, key=jax.random.key(1)), jax.random.key(2), 0.3)

    def stack(tree):
        tree = dict(tree)
        tree["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[tree.pop(f"layers_{i}") for i in range(2)])
        return tree

    assert max_diff(jlora.apply(unrolled, params, ad, cfg, ids),
                    jlora.apply(scanned, stack(params), stack(ad), cfg, ids)) <= 1e-5
    opt = optax.adam(1e-2)
    state = jlora.TrainState.create(ad, opt, rng=jax.random.key(3))
    step = jax.jit(jlora.make_train_step(unrolled, cfg, opt))
    new, metrics = step(state, params, {"input_ids": ids})
    assert float(metrics["grad_norm"]) > 0
    assert not jnp.array_equal(new.adapters["layers_0"]["q_proj"]["kernel"].extras["m"], ad["layers_0"]["q_proj"]["kernel"].extras["m"])


def test_dora_rejects_other_layers():
    x = jnp.ones((1, 6, 6, 3))
    conv = nn.Conv(4, (3, 3))
    params = conv.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match=r"the dora variant supports Dense/Embed layers; 'kernel' is used by a Conv"):
        jlora.init(params, jlora.LoraConfig(rank=2, targets="kernel", use_dora=True), key=jax.random.key(0),
                   layout=jlora.layout(conv, x))
    shapes = {"q": {"kernel": jax.ShapeDtypeStruct((8, 8), jnp.float32)}}    # DoRA's m needs the values
    with pytest.raises(ValueError, match=r"starts from the values of the kernel at 'q/kernel'.*jax.eval_shape"):
        jlora.init(shapes, jlora.LoraConfig(rank=2, targets="q", use_dora=True), key=jax.random.key(0))


def test_peft_dora_on_embeddings_applies_as_peft_runs_it(tmp_path):
    """A PEFT DoRA adapter on embed_tokens (and q/v_proj): apply gives PEFT's logits (``g * (E[ids] + s A[ids] B)``,
    g per feature: the norm is over the vocabulary), as merge does; exported back, PEFT runs it the same."""
    hf_model, folder = _hf_model("llama", tmp_path)
    loaded = jlora.hf.load(folder)
    pm = peft.get_peft_model(hf_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj",
                                                                                           "v_proj"],
                                                       use_dora=True, task_type="CAUSAL_LM"))
    train_peft(pm, IDS, lr=2e-2)
    with torch.no_grad():   # magnitudes off the column norms, as after longer training: g is far from 1
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=torch.Generator().manual_seed(0)))
    pm.save_pretrained(tmp_path / "peft_dora")
    theirs = _torch_logits(pm)
    adapters, cfg = jlora.peft.load(tmp_path / "peft_dora", loaded)
    node = adapters["embed_tokens"]["embedding"]
    assert cfg.use_dora and node.variant == "dora" and node.extras["m"].shape == (32,)
    ours = _apply(loaded, loaded.params, adapters, cfg)
    assert max_diff(ours, theirs) <= 1e-4
    assert max_diff(loaded.model.apply({"params": jlora.merge(loaded.params, adapters, cfg)}, jnp.asarray(IDS)),
                    theirs) <= 1e-4
    out = jlora.peft.save(tmp_path / "back", adapters, cfg, loaded)
    original = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert max_diff(_torch_logits(peft.PeftModel.from_pretrained(original, str(out)).eval()), theirs) <= 1e-4


class _TiedLM(nn.Module):
    """An embedding that is also the output head (``Embed.attend``), around one Dense layer."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(24, 8, name="embed")
        return embed.attend(jnp.tanh(nn.Dense(8, name="mix")(embed(ids))))


@pytest.mark.slow   # ~12 s; test_peft_dora_on_embeddings_applies_as_peft_runs_it checks apply and merge against PEFT
def test_dora_embedding_init_apply_merge_and_train():
    """jlora's own DoRA embeddings (as PEFT initializes them: A zero, m the feature columns' norms): a fresh adapter
    changes nothing, a trained one equals the merged model in the lookup and in a tied head (attend), under jit and
    strict dtype promotion, and its magnitudes train."""
    ids = jnp.array([[1, 5, 23, 0], [7, 7, 2, 11]])
    model = _TiedLM()
    params = model.init(jax.random.key(0), ids)["params"]
    cfg = jlora.LoraConfig(rank=3, alpha=6.0, targets=("embed", "mix"), use_dora=True)
    fresh = jlora.init(params, cfg, key=jax.random.key(1))
    node = fresh["embed"]["embedding"]
    np.testing.assert_allclose(node.extras["m"], np.linalg.norm(np.asarray(params["embed"]["embedding"]), axis=0),
                               rtol=1e-6)
    assert jnp.array_equal(jlora.apply(model, params, fresh, cfg, ids), model.apply({"params": params}, ids))
    ad = randomize(fresh, jax.random.key(2), 0.5)
    expected = model.apply({"params": jlora.merge(params, ad, cfg)}, ids)
    assert max_diff(expected, model.apply({"params": params}, ids)) > 1e-2
    with jax.numpy_dtype_promotion("strict"):
        got = jax.jit(lambda p, a: jlora.apply(model, p, a, cfg, ids))(params, ad)
    assert max_diff(got, expected) <= 1e-5
    e, a, b, m = params["embed"]["embedding"], ad["embed"]["embedding"].a, ad["embed"]["embedding"].b, \
        ad["embed"]["embedding"].extras["m"]
    v = e + 2.0 * a @ b
    np.testing.assert_allclose(jlora.merge(params, ad, cfg)["embed"]["embedding"],
                               m[None] * v / jnp.linalg.norm(v, axis=0)[None], rtol=1e-5, atol=1e-6)
    opt = optax.adam(1e-2)

    def loss(adapters):
        return jnp.mean(jlora.apply(model, params, adapters, cfg, ids) ** 2)

    grads = jax.grad(loss)(ad)
    assert float(jnp.abs(grads["embed"]["embedding"].extras["m"]).max()) > 0
    updates, _ = opt.update(grads, opt.init(ad))
    assert max_diff(optax.apply_updates(ad, updates)["embed"]["embedding"].extras["m"], m) > 1e-4


def test_dora_on_a_tied_embedding_is_not_exported_to_peft(tmp_path):
    """PEFT's tied head would be a DoRA Linear with magnitudes of its own (one per token), so no folder reproduces
    jlora's tied DoRA embedding: export refuses it instead of writing an adapter PEFT runs differently."""
    _, folder = _hf_model("llama", tmp_path, tie_word_embeddings=True)
    loaded = jlora.hf.load(folder)
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=("embed_tokens", "q_proj"), use_dora=True)
    adapters = jlora.init(loaded.params, cfg, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"DoRA adapter at 'embed_tokens/embedding' .*ties its output head.*"
                                         r"use_dora=False"):
        jlora.peft.save(tmp_path / "out", adapters, cfg, loaded)
    assert not (tmp_path / "out").exists()

# ---------------------------------------------------------------- PiSSA / OLoRA
@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_pissa_olora_keep_output_and_match_peft(method, tmp_path):
    hf_model, folder = _hf_model("llama", tmp_path)
    loaded = jlora.hf.load(folder)
    targets = ("q_proj", "v_proj", "gate_proj")
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=targets, init=method)
    with pytest.raises(ValueError, match="init_with_base"):
        jlora.init(loaded.params, cfg, key=jax.random.key(0))
    adapters, base = jlora.init_with_base(loaded.params, cfg, key=jax.random.key(0))
    assert max_diff(_apply(loaded, base, adapters, cfg), _torch_logits(hf_model)) <= 1e-5
    # the residual base equals PEFT's own PiSSA/OLoRA-modified weights
    pm = peft.get_peft_model(hf_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                                       init_lora_weights=method, task_type="CAUSAL_LM"))
    theirs = dict(pm.named_parameters())
    w_res = theirs["base_model.model.model.layers.1.self_attn.q_proj.base_layer.weight"].detach().numpy()
    assert max_diff(base["layers_1"]["self_attn"]["q_proj"]["kernel"], w_res.T) <= 1e-5
    # train, export as PEFT converts it (rank 2r against the original base), load in PEFT on the unmodified model
    trained = _train(loaded, base, adapters, cfg)
    ours = _apply(loaded, base, trained, cfg)
    out = jlora.peft.save(tmp_path / "conv", trained, cfg, loaded)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16.0 and config["init_lora_weights"] is True
    original = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert max_diff(ours, _torch_logits(original)) > 1e-3
    peft_logits = _torch_logits(peft.PeftModel.from_pretrained(original, str(out)).eval())
    assert max_diff(ours, peft_logits) <= 1e-4


def test_pissa_on_an_nnx_model_gives_a_residual_model():
    """init_with_base takes an NNX model, as jlora.init does, and gives back a new model holding the residual base
    (as jlora.merge gives a model); at step 0 it runs as the original, which is untouched."""
    from flax import nnx

    model = nnx.Sequential(nnx.Linear(6, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 4, rngs=nnx.Rngs(1)))
    before = jax.tree.map(np.asarray, jlora.nnx.params(model))
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets="layers/0", init="pissa")
    adapters, base = jlora.init_with_base(model, cfg, key=jax.random.key(2))
    x = jax.random.normal(jax.random.key(3), (3, 6))
    assert isinstance(base, nnx.Sequential)
    assert max_diff(jlora.apply(base, jlora.nnx.params(base), adapters, cfg, x), model(x)) <= 1e-5
    assert max_diff(jlora.nnx.params(base)["layers"]["0"]["kernel"], before["layers"]["0"]["kernel"]) > 1e-3
    jax.tree.map(np.testing.assert_array_equal, jlora.nnx.params(model), before)


def test_pissa_is_reproducible_and_scanned():
    params = {"layers": {"q_proj": {"kernel": jax.random.normal(jax.random.key(0), (3, 16, 8))}}}
    lay = {"layers/q_proj/kernel": jlora.KernelLayout("Dense", (0,), (1,), lead=1)}
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets="q_proj", init="pissa", use_rslora=True)
    ad, base = jlora.init_with_base(params, cfg, key=jax.random.key(1), layout=lay)
    ad2, _ = jlora.init_with_base(params, cfg, key=jax.random.key(2), layout=lay)
    assert ad["layers"]["q_proj"]["kernel"].a.shape == (3, 16, 2)
    jax.tree.map(np.testing.assert_array_equal, ad, ad2)
    merged = jlora.merge(base, ad, cfg, layout=lay)
    assert max_diff(merged["layers"]["q_proj"]["kernel"], params["layers"]["q_proj"]["kernel"]) <= 1e-5
    w = np.asarray(params["layers"]["q_proj"]["kernel"][1], np.float64)
    u, s, vt = np.linalg.svd(w)   # the adapter holds the rank-2 truncated SVD of each layer
    top = cfg.scale("layers/q_proj/kernel") * ad["layers"]["q_proj"]["kernel"].a[1] @ ad["layers"]["q_proj"][
        "kernel"].b[1]
    np.testing.assert_allclose(top, (u[:, :2] * s[:2]) @ vt[:2], atol=1e-5)


# ---------------------------------------------------------------- bias and modules_to_save
@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_and_modules_to_save_export_to_peft(bias, tmp_path):
    hf_model, folder = _hf_model("qwen2", tmp_path, tie_word_embeddings=False)
    loaded = jlora.hf.load(folder)
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "o_proj"), bias=bias, modules_to_save="lm_head")
    adapters = jlora.init(loaded.params, cfg, key=jax.random.key(0))
    saved = sorted(p for p in jlora.tree.leaves_by_path(adapters) if not p.endswith(("/a", "/b")))
    biases = [f"layers_{i}/self_attn/{m}/bias" for i in range(2) for m in
              (("q_proj", "k_proj", "v_proj") if bias == "all" else ("q_proj",))]
    assert saved == sorted(["lm_head/kernel", *biases])
    assert jnp.array_equal(_apply(loaded, loaded.params, adapters, cfg), _apply(loaded, loaded.params, {}, cfg))
    trained = _train(loaded, loaded.params, adapters, cfg, steps=4)
    for path in saved:   # the whole tensors trained; the frozen params did not change
        assert max_diff(jlora.tree.flatten(trained)[path], jlora.tree.flatten(loaded.params)[path]) > 1e-4
    ours = _apply(loaded, loaded.params, trained, cfg)
    merged = jlora.merge(loaded.params, trained, cfg)
    assert max_diff(ours, np.asarray(loaded.model.apply({"params": merged}, jnp.asarray(IDS)))) <= 1e-5
    out = jlora.peft.save(tmp_path / "ad", trained, cfg, loaded)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["bias"] == bias and config["modules_to_save"] == ["lm_head"]
    assert "ensure_weight_tying" not in config   # an untied head: nothing to tie (PEFT warns about the flag)
    theirs = _torch_logits(peft.PeftModel.from_pretrained(hf_model, str(out)).eval())
    assert max_diff(ours, theirs) <= 1e-4
    back, cfg2 = jlora.peft.load(out, loaded)
    assert cfg2.bias == bias and sorted(p for p in jlora.tree.leaves_by_path(back) if not p.endswith(("/a", "/b"))) == saved
    assert max_diff(_apply(loaded, loaded.params, back, cfg2), theirs) <= 1e-4


def test_lora_only_bias_trains_the_biases_of_adapted_layers_only():
    """With a broad target pattern, a layer without a kernel (a LayerNorm) gets no adapter, so its bias is not
    "lora_only" (PEFT trains the biases of LoRA layers only)."""
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.LayerNorm(name="norm")(nn.Dense(4, name="proj")(x))

    params = Net().init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    cfg = jlora.LoraConfig(rank=2, targets=".*", bias="lora_only")
    adapters = jlora.init(params, cfg, key=jax.random.key(1))
    assert sorted(jlora.tree.leaves_by_path(adapters)) == ["proj/bias", "proj/kernel/a", "proj/kernel/b"]
    # merging puts a whole trained tensor back in the base's dtype, as it does an adapted kernel
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    merged = jlora.merge(half, jlora.init(half, cfg, key=jax.random.key(1)), cfg)
    assert {x.dtype for x in jax.tree.leaves(merged)} == {jnp.dtype(jnp.bfloat16)}


def test_import_peft_trained_bias_and_modules_to_save(tmp_path):
    hf_model, folder = _hf_model("qwen2", tmp_path, tie_word_embeddings=False)
    loaded = jlora.hf.load(folder)
    pm = peft.get_peft_model(hf_model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"], bias="all",
                                                       modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    train_peft(pm, IDS, lr=2e-2)
    pm.save_pretrained(tmp_path / "peft_ad")
    adapters, cfg = jlora.peft.load(tmp_path / "peft_ad", loaded)
    assert cfg.bias == "all" and cfg.saves("lm_head/kernel") and not cfg.saves("layers_0/mlp/up_proj/kernel")
    assert max_diff(_apply(loaded, loaded.params, adapters, cfg), _torch_logits(pm)) <= 1e-4


def test_saved_module_cannot_also_be_a_target():
    params = {"lm_head": {"kernel": jnp.ones((4, 4))}}
    with pytest.raises(ValueError, match="both a LoRA target and selected by"):
        jlora.init(params, jlora.LoraConfig(rank=1, targets="lm_head", modules_to_save="lm_head"),
                   key=jax.random.key(0))


def test_pissa_folder_without_conversion_is_refused(tmp_path):
    hf_model, folder = _hf_model("llama", tmp_path)
    pm = peft.get_peft_model(hf_model, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa",
                                                       task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path / "raw")
    with pytest.raises(ValueError, match="path_initial_model_for_weight_conversion"):
        jlora.peft.load(tmp_path / "raw", jlora.hf.load(folder))


def test_config_round_trip_with_variants():
    cfg = jlora.LoraConfig(rank=4, targets="q", use_dora=True, bias="lora_only", modules_to_save=("lm_head",))
    assert jlora.LoraConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="`bias` must be one of"):
        jlora.LoraConfig(bias="some")
    with pytest.raises(ValueError, match="use_dora=True` with init='pissa'"):
        jlora.LoraConfig(use_dora=True, init="pissa")

