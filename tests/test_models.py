"""jlora's Flax models against transformers' PyTorch models (the oracle), built from tiny random configs offline.

Weights are perturbed away from HF's init (norm weights around 1, biases non-zero, larger matrices) so that
every parameter matters and logits are O(1), which makes the 1e-4 comparisons meaningful.
"""

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jlora import models
from jlora import train as train_lib
from jlora.models import gpt2 as gpt2_lib
from jlora.models import llama as llama_lib

TOL = 1e-4
BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

CASES = {
    "llama_mha": (transformers.LlamaConfig, dict(BASE, num_key_value_heads=4)),
    "llama_gqa": (transformers.LlamaConfig, dict(BASE, num_key_value_heads=2)),
    "llama_mqa": (transformers.LlamaConfig, dict(BASE, num_key_value_heads=1)),
    "llama_tied": (transformers.LlamaConfig, dict(BASE, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama3_rope": (transformers.LlamaConfig, dict(BASE, num_key_value_heads=2, max_position_embeddings=512,
                                                   rope_parameters=LLAMA3_ROPE)),
    "llama_linear_rope": (transformers.LlamaConfig, dict(BASE, num_key_value_heads=2, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    "llama_head_dim": (transformers.LlamaConfig, dict(BASE, num_key_value_heads=2, head_dim=32)),
    "llama_biases": (transformers.LlamaConfig, dict(BASE, num_key_value_heads=2, attention_bias=True,
                                                    mlp_bias=True)),
    "mistral_window": (transformers.MistralConfig, dict(BASE, num_key_value_heads=2, sliding_window=4)),
    "mistral": (transformers.MistralConfig, dict(BASE, num_key_value_heads=2, sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, dict(BASE, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(BASE, num_key_value_heads=2, head_dim=32)),
    "gpt2": (transformers.GPT2Config, dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    "gpt2_untied": (transformers.GPT2Config, dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                   tie_word_embeddings=False)),
}


def _perturb(hf_model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and "bias" not in name:      # norm weights
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:                           # biases
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5 * (0.3 if "wpe" in name else 1.0))


@functools.lru_cache(maxsize=None)
def _hf(case):
    cls, kw = CASES[case]
    torch.manual_seed(0)
    hf_cfg = cls(**kw)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    _perturb(hf_model)
    return hf_model, hf_cfg


def build(case, **overrides):
    """(hf_model, hf config.json dict, family, jlora config, jlora params) for a case."""
    hf_model, hf_cfg = _hf(case)
    d = hf_cfg.to_dict()
    fam = models.family_for(d["model_type"])
    cfg = fam.config_from_hf(d, **overrides)
    sd = hf_model.state_dict()
    params = models.params_from_hf(fam, cfg, lambda k: sd[k].numpy())
    return hf_model, d, fam, cfg, params


def _ids(batch=2, t=12, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (batch, t))


def _left_padded_mask(t=12):
    mask = np.ones((3, t), np.int64)
    mask[1, :4] = 0
    mask[2, :t - 2] = 0
    return mask


def _hf_logits(hf_model, ids, mask=None):
    kw = {}
    if mask is not None:
        kw = dict(attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(np.maximum(np.cumsum(mask, axis=1) - 1, 0)))
    with torch.no_grad():
        return hf_model(torch.tensor(ids), **kw).logits.float().numpy()


def _max_diff(a, b, mask=None):
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    if mask is not None:
        diff = diff[np.asarray(mask) > 0]
    return float(diff.max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    hf_model, _, fam, cfg, params = build(case)
    _hf(case)[1].save_pretrained(tmp_path)               # the config.json transformers 5 writes parses the same
    assert fam.config_from_hf(json.loads((tmp_path / "config.json").read_text())) == cfg
    model = fam.make_model(cfg)
    ids = _ids()
    ref = _hf_logits(hf_model, ids)
    assert np.abs(ref).max() > 0.5, "oracle logits too small for a meaningful comparison"
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids))
    assert out.dtype == jnp.float32 and out.shape == (2, 12, 256)
    assert _max_diff(out, ref) <= TOL

    mask = _left_padded_mask()
    ids3 = _ids(3)
    ref = _hf_logits(hf_model, ids3, mask)
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids3), attention_mask=jnp.asarray(mask))
    assert _max_diff(out, ref, mask) <= TOL


@pytest.mark.parametrize("case", ["llama_gqa", "gpt2"])
def test_a_pad_id_outside_the_vocabulary_on_padding_slots_leaves_real_tokens_alone(case):
    """A tokenizer's pad id past the model's table (here 256 = vocab_size, and -1) on masked slots: the real
    tokens' logits are those of the same batch padded with id 0 (jnp.take's NaN row for an out-of-range id would
    reach every query through attention). GPT-2 rows longer than n_positions are refused by name."""
    _, _, fam, cfg, params = build(case)
    model = fam.make_model(cfg)
    ids, mask = _ids(3), _left_padded_mask()
    run = jax.jit(model.apply)
    want = run({"params": params}, jnp.asarray(np.where(mask > 0, ids, 0)), attention_mask=jnp.asarray(mask))
    for pad in (256, -1):
        got = run({"params": params}, jnp.asarray(np.where(mask > 0, ids, pad)), attention_mask=jnp.asarray(mask))
        assert np.isfinite(np.asarray(got)[mask > 0]).all()
        assert _max_diff(got, want, mask) == 0.0
    if case == "gpt2":
        with pytest.raises(ValueError, match=r"65 tokens per row, but this GPT-2 has 64 positions"):
            model.apply({"params": params}, jnp.zeros((1, 65), jnp.int32))


@pytest.mark.parametrize("case", ["llama_gqa", "gpt2"])
def test_left_padding_equals_unpadded_rows(case):
    """A left-padded row gives the logits of the same tokens run alone (positions restart at its first token)."""
    _, _, fam, cfg, params = build(case)
    model = fam.make_model(cfg)
    ids, mask = _ids(3), _left_padded_mask()
    batch = jax.jit(model.apply)({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    alone = jax.jit(model.apply)({"params": params}, jnp.asarray(ids[1:2, 4:]))
    assert _max_diff(batch[1, 4:], alone[0]) <= 1e-5


@pytest.mark.parametrize("case, remat", [("llama_gqa", "none"), ("qwen2", "full"), ("gpt2_untied", "dots")])
def test_scan_layers_equals_unrolled(case, remat):
    _, _, fam, cfg, params = build(case)
    scfg = dataclasses.replace(cfg, scan_layers=True, remat=remat)
    sd = {k: v for k, v in models.params_to_hf(fam, cfg, params).items()}
    sparams = models.params_from_hf(fam, scfg, sd.__getitem__)
    assert fam.layer_prefix in sparams and f"{fam.layer_prefix}_0" not in sparams
    leaf = jax.tree.leaves(sparams[fam.layer_prefix])[0]
    assert leaf.shape[0] == cfg.num_hidden_layers
    ids, mask = jnp.asarray(_ids(3)), jnp.asarray(_left_padded_mask())
    a = jax.jit(fam.make_model(cfg).apply)({"params": params}, ids, attention_mask=mask)
    b = jax.jit(fam.make_model(scfg).apply)({"params": sparams}, ids, attention_mask=mask)
    assert _max_diff(a, b) <= 1e-5
    if remat != "dots":
        return
    # gradients flow through scan + remat (remat="full" is exercised with LoRA in test_lora_targets_select_q_v_kernels)
    loss = lambda p: jnp.mean(fam.make_model(scfg).apply({"params": p}, ids) ** 2)
    grads = jax.jit(jax.grad(loss))(sparams)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("case", ["qwen3", "gpt2"])
def test_bf16_runs_close_to_fp32(case):
    hf_model, _, fam, cfg, params = build(case, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    ids = _ids()
    out = jax.jit(fam.make_model(cfg).apply)({"params": params}, jnp.asarray(ids))
    assert out.dtype == jnp.float32
    ref = _hf_logits(hf_model, ids)
    err = _max_diff(out, ref)
    assert err < 0.05 * np.abs(ref).max(), err
    # bf16 compute with fp32 params also runs
    fcfg = dataclasses.replace(cfg, param_dtype=jnp.float32)
    fparams = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    out2 = jax.jit(fam.make_model(fcfg).apply)({"params": fparams}, jnp.asarray(ids))
    assert _max_diff(out2, ref) < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("case", ["llama_biases", "qwen3", "qwen2", "mistral_window", "llama3_rope", "gpt2",
                                  "gpt2_untied"])
def test_config_and_params_to_hf_load_in_transformers(case, tmp_path):
    """config_to_hf -> config.json -> AutoConfig; params_to_hf -> load_state_dict: transformers gives our logits."""
    hf_model, _, fam, cfg, params = build(case)
    sd = hf_model.state_dict()
    exported = models.params_to_hf(fam, cfg, params)
    for k, v in exported.items():
        np.testing.assert_array_equal(v, sd[k].numpy())
    (tmp_path / "config.json").write_text(json.dumps(fam.config_to_hf(cfg)))
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    assert fam.config_from_hf(hf_cfg.to_dict()) == cfg
    model2 = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    missing, unexpected = model2.load_state_dict({k: torch.tensor(v) for k, v in exported.items()}, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing)   # tied lm_head is the embedding
    ids, mask = _ids(3), _left_padded_mask()
    ref = _hf_logits(model2, ids, mask)
    out = jax.jit(fam.make_model(cfg).apply)({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert _max_diff(out, ref, mask) <= TOL


def test_llama_config_dict_constructor_roundtrip():
    _, _, fam, cfg, _ = build("llama3_rope")
    hf_cfg = transformers.LlamaConfig(**fam.config_to_hf(cfg))
    assert hf_cfg.rope_parameters["rope_type"] == "llama3"
    assert fam.config_from_hf(hf_cfg.to_dict()) == cfg


def test_params_roundtrip_scanned():
    hf_model, _, fam, cfg, _ = build("qwen3", scan_layers=True)
    sd = hf_model.state_dict()
    params = models.params_from_hf(fam, cfg, lambda k: sd[k].numpy())
    back = models.params_to_hf(fam, cfg, params)
    assert set(back) == {s.hf_name for s in fam.param_specs(cfg)}
    for k, v in back.items():
        np.testing.assert_array_equal(v, sd[k].numpy())


def test_transformers_4x_config_form(tmp_path):
    """transformers 4.x wrote rope_theta/rope_scaling/torch_dtype; 5.x writes rope_parameters/dtype."""
    v5 = dict(model_type="llama", **BASE, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE, dtype="bfloat16")
    v4 = dict(model_type="llama", **BASE, num_key_value_heads=2, rope_theta=500000.0, torch_dtype="bfloat16",
              rope_scaling={k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}, pretraining_tp=1,
              architectures=["LlamaForCausalLM"], transformers_version="4.45.0")
    a, b = llama_lib.config_from_hf(v5), llama_lib.config_from_hf(v4)
    assert a == b and a.rope_type == "llama3" and a.hf_dtype == "bfloat16"
    old = dict(v4, rope_scaling={"type": "linear", "factor": 2.0})
    assert llama_lib.config_from_hf(old).rope_type == "linear"
    # both forms at once (a 5.x config edited by 4.x instructions): the same settings load, differing ones are
    # refused; transformers 5 takes rope_scaling with the top-level rope_theta (10000 without one), not
    # rope_parameters' theta, and so must we
    assert llama_lib.config_from_hf(dict(v5, rope_scaling=v4["rope_scaling"], rope_theta=500000.0)) == a
    for top in ({}, {"rope_theta": 30000.0}):
        both = dict(v5, rope_scaling=v4["rope_scaling"], max_position_embeddings=16384, **top)
        (tmp_path / "config.json").write_text(json.dumps(both))
        want = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters["rope_theta"]
        assert llama_lib.config_from_hf(both).rope_theta == want == top.get("rope_theta", 10000.0)
    with pytest.raises(ValueError, match=r"both rope_parameters .* and rope_scaling .* differ"):
        llama_lib.config_from_hf(dict(v5, rope_scaling={"type": "linear", "factor": 2.0}))
    # SmolLM2's real config.json (nanotron's extra keys; transformers.js settings)
    smollm2 = dict(architectures=["LlamaForCausalLM"], attention_bias=False, attention_dropout=0.0, bos_token_id=1,
                   eos_token_id=2, hidden_act="silu", hidden_size=576, initializer_range=0.041666666666666664,
                   intermediate_size=1536, is_llama_config=True, max_position_embeddings=8192, mlp_bias=False,
                   model_type="llama", num_attention_heads=9, num_hidden_layers=30, num_key_value_heads=3,
                   pad_token_id=2, pretraining_tp=1, rms_norm_eps=1e-05, rope_interleaved=False, rope_scaling=None,
                   rope_theta=100000, tie_word_embeddings=True, torch_dtype="bfloat16",
                   **{"transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16", "fp16": "float16"}}},
                   transformers_version="4.42.3", use_cache=True, vocab_size=49152)
    c = llama_lib.config_from_hf(smollm2)
    assert (c.hidden_size, c.num_key_value_heads, c.rope_theta, c.tie_word_embeddings) == (576, 3, 1e5, True)
    with pytest.raises(ValueError, match=r"rope_interleaved=True \(only False is implemented\)"):
        llama_lib.config_from_hf(dict(smollm2, rope_interleaved=True))
    # Qwen2.5's real config.json: sliding window fields present but off
    qwen = dict(model_type="qwen2", **BASE, num_key_value_heads=2, use_sliding_window=False, sliding_window=131072,
                max_window_layers=21, rope_theta=1e6, rope_scaling=None, torch_dtype="bfloat16")
    assert llama_lib.config_from_hf(qwen).sliding_window is None
    # Qwen2-0.5B's and DeepSeek-R1-Distill-Qwen's carry use_mrope=false (Qwen2-VL's positions, off)
    assert llama_lib.config_from_hf(dict(qwen, use_mrope=False)) == llama_lib.config_from_hf(qwen)
    # the original gpt2 config.json
    g = dict(activation_function="gelu_new", architectures=["GPT2LMHeadModel"], attn_pdrop=0.1, bos_token_id=50256,
             embd_pdrop=0.1, eos_token_id=50256, initializer_range=0.02, layer_norm_epsilon=1e-05, model_type="gpt2",
             n_ctx=1024, n_embd=768, n_head=12, n_layer=12, n_positions=1024, resid_pdrop=0.1,
             summary_activation=None, summary_first_dropout=0.1, summary_proj_to_labels=True,
             summary_type="cls_index", summary_use_proj=True, task_specific_params={"text-generation": {}},
             vocab_size=50257)
    assert gpt2_lib.config_from_hf(g).eos_token_id == (50256,)
    # distilgpt2's adds bookkeeping of older transformers
    assert gpt2_lib.config_from_hf(dict(g, _num_labels=1, gradient_checkpointing=False)) == gpt2_lib.config_from_hf(g)


@pytest.mark.parametrize("bad, attr", [
    (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window"),
    (dict(model_type="llama", quantization_config={"bits": 4}), "quantization_config"),
    (dict(model_type="llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "dynamic"),
    (dict(model_type="llama", rope_parameters={"rope_type": "yarn", "factor": 2.0}), "yarn"),
    (dict(model_type="llama", partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(model_type="qwen3", layer_types=["full_attention", "sliding_attention"]), "layer_types"),
    (dict(model_type="llama", hidden_act="tanh_glu"), "tanh_glu"),
    (dict(model_type="qwen2", use_mrope=True), "use_mrope"),
])
def test_unsupported_attributes_raise(bad, attr):
    d = dict(BASE, num_key_value_heads=2, **bad)
    with pytest.raises(ValueError, match=attr):
        llama_lib.config_from_hf(d)


def test_base_model_dropout_is_ignored_as_for_gpt2():
    """Dropout of the base model is off in inference and jlora's base models have none (GPT-2's *_pdrop alike)."""
    d = dict(BASE, num_key_value_heads=2, model_type="llama")
    assert llama_lib.config_from_hf(dict(d, attention_dropout=0.1, mlp_dropout=0.1)) == llama_lib.config_from_hf(d)


def test_gpt2_unsupported_attribute_raises():
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        gpt2_lib.config_from_hf({"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True})


def test_family_errors():
    with pytest.raises(ValueError, match="'bert'.*llama"):
        models.family_for("bert")
    _, _, fam, cfg, params = build("llama_gqa")
    sd = models.params_to_hf(fam, cfg, params)
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        models.params_from_hf(fam, cfg, lambda k: sd[k] if k != "model.layers.1.mlp.up_proj.weight" else {}[k])
    bad = dict(sd, **{"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)})
    with pytest.raises(ValueError, match=r"k_proj.weight.*\(64, 64\).*\(32, 64\)"):
        models.params_from_hf(fam, cfg, bad.__getitem__)


def test_hf_module_names_and_specs():
    _, _, fam, cfg, params = build("qwen2")
    assert models.hf_module_name(fam, cfg, "layers_1/self_attn/v_proj/kernel") == "model.layers.1.self_attn.v_proj"
    assert models.hf_module_name(fam, cfg, "embed_tokens/embedding") == "model.embed_tokens"
    scfg = dataclasses.replace(cfg, scan_layers=True)
    assert models.hf_module_name(fam, scfg, "layers/mlp/down_proj/kernel", layer=0) == "model.layers.0.mlp.down_proj"
    with pytest.raises(ValueError, match="layer="):
        models.hf_module_name(fam, scfg, "layers/mlp/down_proj/kernel")
    specs = fam.param_specs(cfg)
    # every spec is a param and every param a spec; qwen2 has q/k/v biases, no o_proj bias; tied: no lm_head
    from jlora import tree
    flat = tree.flatten(params)
    assert {s.path for s in specs} == set(flat)
    assert {s.path for s in specs if s.path.endswith("bias")} == {
        f"layers_{i}/self_attn/{p}_proj/bias" for i in range(2) for p in "qkv"}
    g = models.family_for("gpt2")
    gcfg = g.config_from_hf({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256})
    assert models.hf_module_name(g, gcfg, "h_1/attn/c_attn/kernel") == "transformer.h.1.attn.c_attn"


def test_lora_targets_select_q_v_kernels():
    """targets=("q_proj", "v_proj") picks exactly 2 x layers kernels (no biases); on the scanned, rematerialized
    model jlora.apply (adapters sliced per layer by nn.scan) equals the merged model, and gradients flow."""
    import jlora

    _, _, fam, cfg, params = build("qwen2", scan_layers=True, remat="full")
    model = fam.make_model(cfg)
    lcfg = jlora.LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj"))
    layout = jlora.layout(model, jnp.ones((1, 4), jnp.int32))
    adapters = jlora.init(params, lcfg, key=jax.random.key(0), layout=layout)
    paths = set(jlora.tree.leaves_by_path(adapters))
    assert paths == {f"layers/self_attn/{p}_proj/kernel/{ab}" for p in "qv" for ab in "ab"}
    adapters = jax.tree.map(lambda x: 0.2 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), adapters)
    ids = jnp.asarray(_ids())
    out = jax.jit(lambda a: jlora.apply(model, params, a, lcfg, ids))(adapters)
    ref = jax.jit(model.apply)({"params": jlora.merge(params, adapters, lcfg, layout=layout)}, ids)
    assert _max_diff(out, ref) <= 1e-4
    grads = jax.jit(jax.grad(lambda a: jnp.mean(jlora.apply(model, params, a, lcfg, ids) ** 2)))(adapters)
    assert all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))
    ucfg = dataclasses.replace(cfg, scan_layers=False)
    up = models.params_from_hf(fam, ucfg, models.params_to_hf(fam, cfg, params).__getitem__)
    uad = jlora.init(up, lcfg, key=jax.random.key(0))
    assert len(jlora.tree.leaves_by_path(uad)) == 2 * 2 * cfg.num_hidden_layers


@pytest.mark.parametrize("case", ["llama_gqa", "gpt2"])
def test_packed_segments_equal_separate_examples(case):
    """A packed row (segment_ids 1, 2 and padding 0, positions restarting per example) gives each example's
    logits as if it ran alone."""
    _, _, fam, cfg, params = build(case)
    apply = jax.jit(fam.make_model(cfg).apply)
    a, b = _ids(1, 7, seed=1)[0], _ids(1, 4, seed=2)[0]
    row = np.concatenate([a, b, [0]])[None]
    seg = np.array([[1] * 7 + [2] * 4 + [0]])
    pos = np.array([list(range(7)) + list(range(4)) + [0]])
    mask = (seg > 0).astype(np.int32)
    packed = apply({"params": params}, jnp.asarray(row), attention_mask=jnp.asarray(mask),
                   positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg))
    assert _max_diff(packed[0, :7], apply({"params": params}, jnp.asarray(a[None]))[0]) <= 1e-5
    assert _max_diff(packed[0, 7:11], apply({"params": params}, jnp.asarray(b[None]))[0]) <= 1e-5
    # the default loss on the packed row without a loss mask: each example's own loss (token-weighted), not also
    # the last token of the first predicting the first of the second
    model = fam.make_model(cfg)

    def forward(ids, return_hidden=False, **kw):
        return model.apply({"params": params}, ids, return_hidden=return_hidden, **kw)

    alone = [train_lib.causal_lm_loss(apply({"params": params}, jnp.asarray(x[None])), jnp.asarray(x[None]))
             for x in (a, b)]
    want = sum(loss * n for loss, n in alone) / sum(n for _, n in alone)
    batch = dict(input_ids=jnp.asarray(row), attention_mask=jnp.asarray(mask), positions=jnp.asarray(pos),
                 segment_ids=jnp.asarray(seg))
    for fused in (False, True):
        forward.hidden_output = fused
        loss, metrics = train_lib.lm_loss(forward, batch)
        assert int(metrics["tokens"]) == 6 + 3 and abs(float(loss) - float(want)) <= 1e-5, fused


# --- the family objects: everything family-specific, declared by the family, checked against transformers --------

FAMILY_CASES = {"llama": ["llama_biases", "llama_gqa", "qwen2", "qwen3", "mistral"], "gpt2": ["gpt2", "gpt2_untied"]}


def test_every_family_declares_rules_and_conventions_that_match_transformers():
    assert {f.name for f in models.families()} == set(FAMILY_CASES), "a new family needs its cases here"
    for fam in models.families():
        splits = {split for _, split in fam.tensor_parallel}
        assert {models.COLUMN, models.ROW, models.VOCAB} <= splits, fam.name
        for case in FAMILY_CASES[fam.name]:
            hf_model, _, fam2, cfg, _ = build(case)
            assert fam2 is fam and models.family_named(fam.name) is fam
            specs = fam.param_specs(cfg)
            # every tensor rule names modules of the table (layer-relative, or outside the layer stack)
            rel = {models.split_layer(fam, s.path)[1].rsplit("/", 1)[0] for s in specs}
            missing = [m for m, _ in fam.tensor_parallel if m not in rel and not (m == "lm_head" and
                                                                                  cfg.tie_word_embeddings)]
            assert not missing, (fam.name, case, missing)
            # HF's own conventions: the base model prefix, Conv1D (in, out) vs nn.Linear (out, in), layer names
            assert fam.hf_prefix == hf_model.base_model_prefix + "."
            hf_modules = dict(hf_model.named_modules())
            for s in specs:
                layer, _ = models.split_layer(fam, s.path)
                assert s.hf_name.startswith(fam.hf_prefix) or s.hf_name.startswith("lm_head."), s.hf_name
                assert not re.search(fam.hf_buffers, s.hf_name), s.hf_name
                assert layer is None or f".{layer}." in s.hf_name, s
                if layer is not None and s.path.endswith("/kernel"):
                    conv1d = isinstance(hf_modules[s.hf_name.removesuffix(".weight")],
                                        transformers.pytorch_utils.Conv1D)
                    assert conv1d == fam.fan_in_fan_out == (not s.transpose), s
            # the tensor split dims: column kernels by output, row kernels by input, embeddings by vocabulary
            for s in specs:
                split = models.tensor_split(fam, s.path)
                if split is not None:
                    assert s.path.rsplit("/", 1)[-1] in ("kernel", "bias", "embedding"), s.path
                    assert split in (-1, -2) and (split == -1 or not s.path.endswith("bias")), s.path


def test_tensor_split_reads_unrolled_scanned_and_layer_relative_paths():
    fam = models.family_named("llama")
    for path in ("layers_3/self_attn/q_proj/kernel", "layers/self_attn/q_proj/kernel", "self_attn/q_proj/kernel"):
        assert models.tensor_split(fam, path) == -1, path
    assert models.tensor_split(fam, "layers/mlp/down_proj/kernel") == -2
    assert models.tensor_split(fam, "layers/mlp/down_proj/bias") is None     # a row-parallel bias stays whole
    assert models.tensor_split(fam, "layers/self_attn/v_proj/bias") == -1
    assert models.tensor_split(fam, "embed_tokens/embedding") == -2
    assert models.tensor_split(fam, "layers/input_layernorm/scale") is None
    with pytest.raises(ValueError, match=r"no model family 'bert'.*\['llama', 'gpt2'\]"):
        models.family_named("bert")
    with pytest.raises(ValueError, match=r"tensor_parallel rules \[\('x', 'diagonal'\)\]"):
        dataclasses.replace(fam, tensor_parallel=(("x", "diagonal"),))


def _code_strings(module) -> list[str]:
    """The string constants in ``module``'s code, leaving out docstrings (whose examples may show paths)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(module))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in docstrings]


def test_parallel_and_peft_ask_the_family_instead_of_spelling_architectures():
    """No family name or model type anywhere in parallel.py and peft.py, and no module name of a family's tables
    in their code: tensor rules, PEFT names and conventions come from the family objects."""
    import inspect

    from jlora import parallel, peft

    names = {n for f in models.families() for n in (f.name, *f.model_types)}
    fams = models.families()
    patterns = {rf"(?<![\w.]){re.escape(w)}(?!\w)" for f in fams for m, _ in f.tensor_parallel for w in m.split("/")}
    stems = {".".join(s.hf_name.split(".")[:2]) for f in fams for s in f.param_specs(build(FAMILY_CASES[f.name][0])[3])}
    patterns |= {rf"(?<![\w.]){re.escape(stem)}(?!\w)" for stem in stems}            # model.layers, transformer.wte
    patterns |= {rf"(?<![\w.]){re.escape(f.layer_prefix)}(_\d|_{{|/)" for f in fams}    # layers_3/, h_{i}, h/...
    found = lambda s: [p for p in patterns if re.search(p, s)]  # noqa: E731
    assert found("model.layers.3.mlp") and found("(^|/)self_attn/(q|k|v)_proj") and found("h_0/attn/c_attn")
    assert not [s for s in ("base_model.model.", "scanned layers", "layers_to_transform", "model.save_pretrained")
                if found(s)]   # PEFT's own prefix and config keys, prose
    for module in (parallel, peft):
        source = inspect.getsource(module).lower()
        assert not [n for n in names if n in source], module.__name__
        peft_own = set(getattr(module, "PEFT_TIE_NAMES", ()))   # PEFT's fixed module names, for every family
        hits = [(found(s), s) for s in _code_strings(module) if found(s) and s not in peft_own]
        assert not hits, (module.__name__, hits)


def test_rope_tables_are_computed_once_per_call_on_cpu():
    """XLA:CPU fuses a plain ``cos`` / ``sin`` into each consumer (every layer's query and key rotations, forward
    and backward) and evaluates it once per head there; ``layers.rope_cos_sin`` makes the tables one buffer per
    call instead. So the compiled gradient's cosine count must not grow with the layer count, and the tables
    still equal the plain formula, under ``vmap`` as well."""
    from jlora.models import layers

    def cosines(num_layers):
        _, d, fam, _, _ = build("llama_gqa")
        model = fam.make_model(fam.config_from_hf(dict(d, num_hidden_layers=num_layers)))
        ids = jnp.zeros((2, 16), jnp.int32)
        shapes = jax.eval_shape(model.init, jax.random.key(0), ids)
        loss = lambda v: jnp.mean(model.apply(v, ids) ** 2)
        return jax.jit(jax.grad(loss)).lower(shapes).compile().as_text().count(" cosine(")

    assert jax.default_backend() == "cpu"
    assert cosines(2) == cosines(4) <= 2
    inv = np.array([1.0, 0.1, 0.01], np.float32)
    pos = jnp.asarray(np.random.RandomState(0).randint(0, 500, (3, 2, 7)))
    freqs = np.asarray(pos, np.float32)[..., None] * inv
    want = np.cos(np.concatenate([freqs, freqs], -1)), np.sin(np.concatenate([freqs, freqs], -1))
    got = jax.jit(jax.vmap(lambda p: layers.rope_cos_sin(p, inv, jnp.float32)))(pos)
    for g, w in zip(got, want):
        assert g.shape == (3, 2, 7, 6) and np.abs(np.asarray(g) - w).max() <= 1e-5


def test_batch_one_train_step_has_no_reduction_with_a_leading_unit_axis():
    """XLA:CPU's fused last-axis reductions run 10x-100x slower when the array's leading axis has size 1 (batch 1:
    an RMSNorm's forward and backward at 1 x 2048 x 576 took 12.6 ms instead of 1.1); the norms, the softmax,
    the blocked kernel and the fused loss drop such axes first (``jlora.fusion.squeeze_leading``)."""
    import optax

    import jlora

    _, d, fam, _, _ = build("llama_gqa")
    for attention in ("xla", "blocked"):
        model = fam.make_model(fam.config_from_hf(d, attention=attention))
        ids = jnp.zeros((1, 40), jnp.int32)
        params = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
        cfg = jlora.LoraConfig(rank=4, targets=("q_proj", "v_proj"))
        opt = optax.adamw(1e-3)
        state = jax.eval_shape(lambda p: jlora.TrainState.create(jlora.init(p, cfg, key=jax.random.key(1)), opt,
                                                                 rng=jax.random.key(2)), params)
        text = jax.jit(jlora.make_train_step(model, cfg, opt)).lower(state, params, {"input_ids": ids}).compile()
        shapes = re.findall(r"= f32\[([\d,]*)\]\S* reduce\(", text.as_text())
        assert shapes and not [s for s in shapes if s.startswith("1,")], (attention, shapes)
