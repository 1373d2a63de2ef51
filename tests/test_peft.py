"""PEFT interop, verified by PEFT itself: jlora -> PEFT folder -> PeftModel logits, and PEFT-trained -> jlora."""

import dataclasses
import json
import os
import re
import time
from copy import deepcopy

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import jlora
from helpers import max_diff, randomize, train_peft

IDS = np.array([[1, 5, 9, 20, 3, 7, 11, 2], [4, 4, 8, 15, 16, 23, 42, 0]])


def _hf_model(kind, tmp_path):
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_hidden_layers=2)
    if kind in ("llama", "llama_tied"):
        cfg = transformers.LlamaConfig(intermediate_size=64, num_key_value_heads=2,
                                       tie_word_embeddings=kind == "llama_tied", **common)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(intermediate_size=64, num_key_value_heads=2, **common)
    else:
        cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_head=4, n_layer=2, n_positions=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    folder = tmp_path / kind
    model.save_pretrained(folder)
    return model, jlora.hf.load(folder)


def _torch_logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


TARGETS = {"llama": ("q_proj", "v_proj", "down_proj"), "qwen2": ("q_proj", "k_proj", "o_proj", "up_proj"),
           "gpt2": ("c_attn", "c_proj", "c_fc")}
PATTERN = {"llama": "layers_1/self_attn/v_proj", "qwen2": "layers_0/mlp", "gpt2": "h_1/mlp/c_fc"}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_export_loads_in_peft_with_equal_logits(kind, use_rslora, tmp_path):
    hf_model, loaded = _hf_model(kind, tmp_path)
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=TARGETS[kind], use_rslora=use_rslora,
                           rank_pattern={PATTERN[kind]: 2}, alpha_pattern={PATTERN[kind]: 3.0})
    adapters = randomize(jlora.init(loaded.params, cfg, key=jax.random.key(0)), jax.random.key(1), 0.2)
    ours = np.asarray(jlora.apply(loaded.model, loaded.params, adapters, cfg, jnp.asarray(IDS)))
    base = _torch_logits(hf_model)
    out = jlora.peft.save(tmp_path / "adapter", adapters, cfg, loaded)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"]
    assert config["fan_in_fan_out"] == (kind == "gpt2")
    peft_model = peft.PeftModel.from_pretrained(hf_model, str(out)).eval()
    theirs = _torch_logits(peft_model)
    assert max_diff(ours, base) > 1e-3, "adapters must change the logits"
    assert max_diff(ours, theirs) <= 1e-4
    # PEFT selected exactly the modules jlora trained
    lora_modules = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert len(lora_modules) == len(config["target_modules"])


def test_export_keys_golden(tmp_path):
    _, loaded = _hf_model("llama", tmp_path)
    cfg = jlora.LoraConfig(rank=2, targets=("q_proj", "embed_tokens"))
    adapters = jlora.init(loaded.params, cfg, key=jax.random.key(0))
    out = jlora.peft.save(tmp_path / "a", adapters, cfg, loaded)
    from safetensors.numpy import load_file

    shapes = {k: v.shape for k, v in load_file(out / "adapter_model.safetensors").items()}
    assert shapes == {
        "base_model.model.model.embed_tokens.lora_embedding_A": (2, 96),
        "base_model.model.model.embed_tokens.lora_embedding_B": (32, 2),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (2, 32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (32, 2),
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": (2, 32),
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": (32, 2),
    }


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_import_peft_trained_adapter(kind, tmp_path):
    hf_model, loaded = _hf_model(kind, tmp_path)
    targets = ["q_proj", "v_proj", "gate_proj"] if kind == "llama" else ["c_attn", "c_fc"]
    pattern_key = "model.layers.1.self_attn.v_proj" if kind == "llama" else "transformer.h.0.mlp.c_fc"
    lcfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_rslora=True,
                           rank_pattern={pattern_key: 2}, alpha_pattern={pattern_key: 5},
                           fan_in_fan_out=kind == "gpt2", task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf_model, lcfg)
    train_peft(pm, IDS)
    pm.save_pretrained(tmp_path / "peft_adapter")
    theirs = _torch_logits(pm)
    adapters, cfg = jlora.peft.load(tmp_path / "peft_adapter", loaded)
    assert cfg.use_rslora
    ours = np.asarray(jlora.apply(loaded.model, loaded.params, adapters, cfg, jnp.asarray(IDS)))
    with pm.disable_adapter():
        assert max_diff(theirs, _torch_logits(pm)) > 1e-4, "the PEFT adapter must change the logits"
    assert max_diff(ours, theirs) <= 1e-4
    # and jlora's own export of what it imported round-trips through PEFT again
    again, cfg2 = jlora.peft.load(jlora.peft.save(tmp_path / "again", adapters, cfg, loaded), loaded)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), adapters, again)
    assert [cfg2.scale(p) for p in jlora.tree.leaves_by_path(adapters)] == [cfg.scale(p) for p in
                                                                   jlora.tree.leaves_by_path(adapters)]


@pytest.mark.parametrize("kind, layers, pattern", [("llama", [1], None), ("gpt2", 0, "h"), ("llama", [0, 1], "layers")])
def test_peft_adapter_on_some_layers_loads(kind, layers, pattern, tmp_path):
    """PEFT's layers_to_transform: the folder holds tensors of those layers only, and jlora applies exactly them."""
    hf_model, loaded = _hf_model(kind, tmp_path)
    targets = ["q_proj", "v_proj"] if kind == "llama" else ["c_attn"]
    pm = peft.get_peft_model(hf_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      layers_to_transform=layers, layers_pattern=pattern,
                                                      fan_in_fan_out=kind == "gpt2"))
    train_peft(pm, IDS)
    pm.save_pretrained(tmp_path / "some")
    adapters, cfg = jlora.peft.load(tmp_path / "some", loaded)
    ours = np.asarray(jlora.apply(loaded.model, loaded.params, adapters, cfg, jnp.asarray(IDS)))
    assert max_diff(ours, _torch_logits(pm)) <= 1e-4
    assert len(jlora.tree.leaves_by_path(adapters)) == 2 * len(targets) * (len(layers) if layers != 0 else 1)
    if layers == [1]:   # a scanned stack needs every layer
        with pytest.raises(ValueError, match=r"covers layers \[1\] of a scanned stack of 2; load the model with "
                                              r"scan_layers=False"):
            jlora.peft.load(tmp_path / "some", jlora.hf.load(tmp_path / kind, scan_layers=True))
        # a folder whose tensors PEFT would not load contradicts itself
        config = json.loads((tmp_path / "some" / "adapter_config.json").read_text())
        (tmp_path / "some" / "adapter_config.json").write_text(json.dumps({**config, "layers_to_transform": [0]}))
        with pytest.raises(ValueError, match=r"layers_to_transform=\[0\] \(layers_pattern=None\) leaves out "
                                              r"\['model.layers.1.self_attn.q_proj'.*PEFT would not apply them"):
            jlora.peft.load(tmp_path / "some", loaded)


def test_scanned_model_round_trip(tmp_path):
    hf_model, _ = _hf_model("llama", tmp_path)
    loaded = jlora.hf.load(tmp_path / "llama", scan_layers=True)
    cfg = jlora.LoraConfig(rank=3, alpha=6.0, targets=("q_proj", "o_proj"))
    lay = jlora.layout(loaded.model, jnp.asarray(IDS))
    adapters = randomize(jlora.init(loaded.params, cfg, key=jax.random.key(2), layout=lay), jax.random.key(3))
    out = jlora.peft.save(tmp_path / "scan", adapters, cfg, loaded)
    ours = np.asarray(jlora.apply(loaded.model, loaded.params, adapters, cfg, jnp.asarray(IDS)))
    theirs = _torch_logits(peft.PeftModel.from_pretrained(hf_model, str(out)).eval())
    assert max_diff(ours, theirs) <= 1e-4
    back, _ = jlora.peft.load(out, loaded)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y), adapters, back)
    # ranks that differ between layers fit unscanned layers only (the advice `jlora inspect` acts on)
    pm = peft.get_peft_model(_hf_model("llama", tmp_path / "fresh")[0], peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                      rank_pattern={"layers.1.self_attn.q_proj": 6}))
    pm.save_pretrained(tmp_path / "ranks")
    with pytest.raises(ValueError, match=r"q_proj: a scanned layer stack needs one rank .* r 4 vs 6.*"
                                          r"scan_layers=False"):
        jlora.peft.load(tmp_path / "ranks", loaded)
    assert jlora.peft.load(tmp_path / "ranks", jlora.hf.load(tmp_path / "llama"))[1].rank_pattern


@pytest.mark.parametrize("dtype, rtol, atol", [("bfloat16", 2 ** -8, 0.0), ("float8_e4m3fn", 2 ** -4, 2 ** -10)])
def test_low_precision_adapter_loads_with_its_exact_values(dtype, rtol, atol, tmp_path):
    """Adapters of bf16 models are bf16 files (common on the Hub). They load with the reader model loading uses,
    each value exactly what the file holds (torch's reading of it), the rounding of PEFT's fp32 value. That reader
    also takes fp8, which safetensors.numpy refuses; bf16 it reads only because jax's ml_dtypes registers the type
    with numpy."""
    hf_model, loaded = _hf_model("llama", tmp_path)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                           task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf_model, lcfg)
    fp32 = {n.replace(".default", ""): p.detach().numpy().copy() for n, p in pm.named_parameters() if ".lora_" in n}
    assert len(fp32) == 8 and all(np.abs(v).max() > 0 for v in fp32.values()), "A and B must both be random"
    pm.to(torch.bfloat16).save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file, save_file

    file = tmp_path / "adapter" / "adapter_model.safetensors"
    if dtype != "bfloat16":
        save_file({k: v.to(getattr(torch, dtype)) for k, v in load_file(file).items()}, file)
    stored = load_file(file)
    assert {v.dtype for v in stored.values()} == {getattr(torch, dtype)} and set(stored) == set(fp32)
    adapters, cfg = jlora.peft.load(tmp_path / "adapter", loaded)
    flat = jlora.tree.leaves_by_path(adapters)
    assert len(flat) == len(fp32) and cfg.scale("layers_0/self_attn/q_proj/kernel") == 2.0
    for name, value in fp32.items():
        layer, proj, part = re.fullmatch(r"base_model\.model\.model\.layers\.(\d)\.self_attn\.(\w)_proj\.lora_(A|B)"
                                         r"\.weight", name).groups()
        ours = flat[f"layers_{layer}/self_attn/{proj}_proj/kernel/{part.lower()}"]
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, stored[name].float().numpy().T)
        np.testing.assert_allclose(ours, value.T, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- tied embeddings, embedding copies
EMBED = {"llama_tied": "model.embed_tokens", "gpt2": "transformer.wte"}


@pytest.mark.parametrize("kind", ["llama_tied", "gpt2"])
@pytest.mark.parametrize("how", ["lora", "modules_to_save"])
def test_tied_embedding_adapter_matches_peft_both_ways(kind, how, tmp_path):
    """jlora's tied head uses the adapted embedding. Export writes ensure_weight_tying and the head's tied copies,
    so PEFT computes the same; PEFT's ensure_weight_tying=True folders load; its default (untied) ones are refused."""
    hf_model, loaded = _hf_model(kind, tmp_path)
    emb = EMBED[kind]
    short = emb.rsplit(".", 1)[-1]
    attn = "c_attn" if kind == "gpt2" else "q_proj"    # every target pattern must match (a typo is an error)
    cfg = (jlora.LoraConfig(rank=4, alpha=8.0, targets=(short, attn)) if how == "lora" else
           jlora.LoraConfig(rank=2, targets=(attn,), modules_to_save=(short,)))
    adapters = randomize(jlora.init(loaded.params, cfg, key=jax.random.key(0)), jax.random.key(1), 0.3)
    ours = np.asarray(jlora.apply(loaded.model, loaded.params, adapters, cfg, jnp.asarray(IDS)))
    out = jlora.peft.save(tmp_path / "ours", adapters, cfg, loaded)
    assert json.loads((out / "adapter_config.json").read_text())["ensure_weight_tying"] is True
    theirs = _torch_logits(peft.PeftModel.from_pretrained(hf_model, str(out)).eval())
    assert max_diff(ours, theirs) <= 1e-4
    back, _ = jlora.peft.load(out, loaded)
    flat, flat_back = jlora.tree.leaves_by_path(adapters), jlora.tree.leaves_by_path(back)
    assert set(flat) == set(flat_back) and all(np.array_equal(flat[p], flat_back[p]) for p in flat)
    # PEFT -> jlora: a folder PEFT saved with ensure_weight_tying=True (lm_head.* tensors: the tied copies)
    targets = ["q_proj"] if kind != "gpt2" else ["c_attn"]
    for tie in (True, False):
        kw = (dict(target_modules=[short, "lm_head", *targets]) if how == "lora" else   # (PEFT edits the lists)
              dict(target_modules=list(targets), modules_to_save=[short, "lm_head"]))
        pm = peft.get_peft_model(_hf_model(kind, tmp_path / str(tie))[0], peft.LoraConfig(
            r=4, lora_alpha=8, init_lora_weights=False, ensure_weight_tying=tie, **kw))
        train_peft(pm, IDS)
        pm.save_pretrained(tmp_path / f"peft_{tie}")
        if not tie:   # its head has an adapter (weight) of its own
            with pytest.raises(ValueError, match=rf"lm_head\..*not the tied copy of {emb}.*untied copy"):
                jlora.peft.load(tmp_path / f"peft_{tie}", loaded)
            continue
        theirs = _torch_logits(pm)
        ad, cf = jlora.peft.load(tmp_path / f"peft_{tie}", loaded)
        assert max_diff(np.asarray(jlora.apply(loaded.model, loaded.params, ad, cf, jnp.asarray(IDS))), theirs) <= 1e-4
    # PEFT's default: only the embedding named, so only the input lookup adapted. GPT-2's wte is not a name PEFT
    # ties for, so ensure_weight_tying=True leaves it untied too, and the advice is to untie the base
    kw = dict(target_modules=[short]) if how == "lora" else dict(target_modules=targets, modules_to_save=[short])
    ensure = kind == "gpt2"
    pm = peft.get_peft_model(_hf_model(kind, tmp_path / "d")[0], peft.LoraConfig(
        r=4, init_lora_weights=False, ensure_weight_tying=ensure, **kw))
    pm.save_pretrained(tmp_path / "peft_default")
    why = (r"ensure_weight_tying=True \(which PEFT ignores for this module name\).*no PEFT setting ties .*untied copy"
           if ensure else r"ensure_weight_tying=False.*Retrain it in PEFT")
    with pytest.raises(ValueError, match=rf"trains {emb}, to which .* ties lm_head, with {why}"):
        jlora.peft.load(tmp_path / "peft_default", loaded)


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_peft_base_layer_copies_of_embeddings_load(target, tmp_path):
    """PEFT (save_embedding_layers="auto") stores ``<module>.base_layer.weight`` for an adapted embedding or
    lm_head: a copy of the base, checked against it and skipped."""
    hf_model, loaded = _hf_model("llama", tmp_path)
    pm = peft.get_peft_model(hf_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=[target, "q_proj"],
                                                       init_lora_weights=False))
    pm.save_pretrained(tmp_path / "a")
    from safetensors.numpy import load_file, save_file

    file = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(file)
    copy = f"base_model.model.{'model.' * (target == 'embed_tokens')}{target}.base_layer.weight"
    assert copy in tensors
    adapters, cfg = jlora.peft.load(tmp_path / "a", loaded)
    ours = np.asarray(jlora.apply(loaded.model, loaded.params, adapters, cfg, jnp.asarray(IDS)))
    assert max_diff(ours, _torch_logits(pm)) <= 1e-4
    tensors[copy] = tensors[copy] + 1.0
    save_file(tensors, file)
    with pytest.raises(ValueError, match=rf"{re.escape(copy)}, PEFT's copy of the base weight.*max \|diff\| 1"):
        jlora.peft.load(tmp_path / "a", loaded)


@pytest.mark.parametrize("entry, whole", [("norm", lambda p: p.endswith("scale")),   # a suffix of several names
                                          ("mlp", lambda p: "/mlp/" in p)])          # a module holding others
def test_modules_to_save_matches_by_plain_suffix_as_peft(entry, whole, tmp_path):
    """PEFT wraps every module whose name ends with an entry ("norm" selects input_layernorm, norm, ...), and
    saves all the tensors such a module holds ("mlp": its gate, up and down projections)."""
    hf_model, loaded = _hf_model("llama", tmp_path)
    pm = peft.get_peft_model(hf_model, peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=[entry]))
    train_peft(pm, IDS)
    pm.save_pretrained(tmp_path / "a")
    adapters, cfg = jlora.peft.load(tmp_path / "a", loaded)
    assert {p for p in jlora.tree.leaves_by_path(adapters) if "lora" not in p and not p.endswith(("/a", "/b"))} \
        == {p for p in jlora.tree.leaves_by_path(loaded.params) if whole(p)}
    ours = np.asarray(jlora.apply(loaded.model, loaded.params, adapters, cfg, jnp.asarray(IDS)))
    assert max_diff(ours, _torch_logits(pm)) <= 1e-4


@pytest.mark.parametrize("init", ["orthogonal", "eva"])
def test_inits_that_keep_the_base_load(init, tmp_path):
    loaded, out = _exported(tmp_path)
    config = json.loads((out / "adapter_config.json").read_text())
    extra = {"eva_config": dataclasses.asdict(peft.EvaConfig())} if init == "eva" else {}   # as PEFT writes it
    (out / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": init, **extra}))
    jlora.peft.load(out, loaded)
    (out / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa"}))
    with pytest.raises(ValueError, match="init_lora_weights='pissa' means A and B are relative to a modified"):
        jlora.peft.load(out, loaded)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("edit, message", [
    ({"use_rslora": "false"}, 'use_rslora is "false"; it must be true or false'),
    ({"lora_alpha": None}, "lora_alpha is null; it must be a number"),
    ({"rank_pattern": ["v_proj"]}, r'rank_pattern is \["v_proj"\]; it must be an object'),
    ({"r": "abc"}, 'r is "abc"; it must be a positive integer'),
    ({"layers_to_transform": ["1"]}, r'layers_to_transform is \["1"\]; it must be a layer index or a list'),
    ({"alpha_pattern": {"q_proj": "8"}}, "alpha_pattern is .*; it must be an object mapping module patterns to num"),
    ([1, 2], r"holds \[1, 2\], not a JSON object"),
])
def test_config_values_of_the_wrong_type_are_refused(edit, message, tmp_path):
    loaded, out = _exported(tmp_path)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, **edit} if isinstance(edit, dict) else edit))
    with pytest.raises(ValueError, match=rf"{re.escape(str(out / 'adapter_config.json'))}:? .*{message}"):
        jlora.peft.load(out, loaded)


def test_non_finite_adapter_weights_are_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    loaded, out = _exported(tmp_path)
    tensors = load_file(out / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    tensors[key][0, 1] = np.nan
    tensors[key.replace("lora_A", "lora_B")][1, 0] = np.inf
    save_file(tensors, out / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"NaN or infinite values: \['.*layers.1.self_attn.q_proj.lora_A.weight', "
                                         r"'.*q_proj.lora_B.weight'\]"):
        jlora.peft.load(out, loaded)


# ---------------------------------------------------------------- bad input
def _exported(tmp_path):
    _, loaded = _hf_model("llama", tmp_path)
    cfg = jlora.LoraConfig(rank=2, targets="q_proj")
    out = jlora.peft.save(tmp_path / "ad", jlora.init(loaded.params, cfg, key=jax.random.key(0)), cfg, loaded)
    return loaded, out


def test_misspelled_or_foreign_keys_list_missing_and_unexpected(tmp_path):
    from safetensors.numpy import load_file, save_file

    loaded, out = _exported(tmp_path)
    tensors = load_file(out / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors[key.replace("q_proj", "q_prj")] = tensors.pop(key)
    save_file(tensors, out / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys \[.*q_prj.*missing keys \[.*layers.0.self_attn.q_proj"):
        jlora.peft.load(out, loaded)
    # keys without the base_model.model. prefix are accepted
    loaded2, out2 = _exported(tmp_path / "x")
    t2 = {k.removeprefix("base_model.model."): v for k, v in load_file(out2 / "adapter_model.safetensors").items()}
    save_file(t2, out2 / "adapter_model.safetensors")
    adapters, _ = jlora.peft.load(out2, loaded2)
    assert "q_proj" in adapters["layers_0"]["self_attn"]


def test_adapter_for_another_base_is_refused(tmp_path):
    loaded, out = _exported(tmp_path)
    torch.manual_seed(0)
    bigger = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    bigger.save_pretrained(tmp_path / "bigger")
    with pytest.raises(ValueError, match=r"q_proj: PEFT tensors have shapes"):
        jlora.peft.load(out, jlora.hf.load(tmp_path / "bigger"))


def test_unsupported_peft_features_and_pickles_are_refused(tmp_path):
    loaded, out = _exported(tmp_path)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "target_parameters": ["x"]}))
    with pytest.raises(ValueError, match=r"features jlora does not support: target_parameters=\['x'\]"):
        jlora.peft.load(out, loaded)
    (out / "adapter_config.json").write_text(json.dumps(config))
    (out / "adapter_model.safetensors").rename(out / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle adapter_model.bin.*safe_serialization"):
        jlora.peft.load(out, loaded)
    (out / "adapter_model.bin").write_bytes(b"garbage")
    (out / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a valid safetensors file.*truncated or "
                                         "corrupt"):
        jlora.peft.load(out, loaded)
    loaded, out = _exported(tmp_path / "trailing")
    with open(out / "adapter_model.safetensors", "ab") as f:
        f.write(b"\0" * 100)
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a valid safetensors file.*100 bytes follow"):
        jlora.peft.load(out, loaded)


def test_an_adapter_for_another_base_model_warns_naming_both(tmp_path):
    """Same shapes load silently, so an adapter trained on SmolLM2-135M-Instruct loaded onto SmolLM2-135M gave no
    hint. The folder's base_model_name_or_path is compared with the loaded model's name by final name (paths differ
    between machines): a different model warns, naming both; a hub id, another machine's path, a Hugging Face cache
    folder or a GGUF file of the same model, and an unknown side on either end, say nothing."""
    import warnings

    hf_model, _ = _hf_model("llama", tmp_path)
    hf_model.save_pretrained(tmp_path / "SmolLM2-135M")
    loaded = jlora.hf.load(tmp_path / "SmolLM2-135M")
    assert loaded.name == "SmolLM2-135M"
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=("q_proj",))
    out = jlora.peft.save(tmp_path / "adapter", jlora.init(loaded.params, cfg, key=jax.random.key(0)), cfg, loaded)
    config = json.loads((out / "adapter_config.json").read_text())

    def load_with(recorded, onto=loaded):
        (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": recorded}))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            adapters, _ = jlora.peft.load(out, onto)
        assert jlora.count(adapters) > 0
        return [w for w in caught if issubclass(w.category, jlora.peft.BaseModelWarning)]

    for other in ("HuggingFaceTB/SmolLM2-135M-Instruct", "/home/me/models/Qwen2.5-0.5B/"):
        (warning,) = load_with(other)
        message = str(warning.message)
        assert f"adapter {out} was trained on base model {other!r}" in message
        assert f"loaded onto {str(tmp_path / 'SmolLM2-135M')!r}" in message
        assert warning.filename == __file__        # it points at the caller's load
    same = ["HuggingFaceTB/SmolLM2-135M", "/other/machine/smollm2-135m/", str(tmp_path / "SmolLM2-135M"),
            "C:\\models\\SmolLM2-135M", "/pkgs/SmolLM2-135M.Q4_1.gguf",
            "/root/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/" + "0123abcd" * 5]
    for recorded in [*same, None, "", "unknown"]:
        assert load_with(recorded) == [], recorded
    # the model's side unknown: a GGUF's free-form label, a cache snapshot folder's hash, a port without a name
    for name in ("Smollm2 135M 8k Lc100K Mix1 Ep2", "0123abcd" * 5, None):
        unknown = dataclasses.replace(loaded, name=name, source="")
        assert load_with("HuggingFaceTB/SmolLM2-135M-Instruct", unknown) == []
    # a config's _name_or_path (as older transformers wrote it) also names the model
    onto = dataclasses.replace(loaded, name="snapshot", hf_config={**loaded.hf_config, "_name_or_path": "org/tiny"})
    assert load_with("tiny", onto) == [] and len(load_with("org/other", onto)) == 1
    # ... and so does the folder or file it was read from: a fine-tune whose config names its parent, loaded from
    # the folder the CLI's export recorded, and GGUF files whose label or stem differ from the file's model name
    parent = {**loaded.hf_config, "_name_or_path": "acme/Parent-Base"}
    assert load_with(str(tmp_path / "SmolLM2-135M"), dataclasses.replace(loaded, name="acme/Parent-Base",
                                                                          hf_config=parent)) == []
    for label, file in (("tinyllama_tinyllama-1.1b-chat-v1.0", "/m/tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf"),
                        ("mymodel-q8_0", "/m/mymodel-q8_0.gguf")):
        assert load_with(file, dataclasses.replace(loaded, name=label, source=file)) == [], file


# ---------------------------------------------------------------- target_modules, exclude_modules
def _peft_adapted(hf_model, folder):
    """The modules PEFT itself adapts when it loads ``folder`` onto ``hf_model`` (the oracle)."""
    pm = peft.PeftModel.from_pretrained(hf_model, str(folder)).eval()
    return pm, {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and m.lora_A
                or isinstance(getattr(m, "lora_embedding_A", None), torch.nn.ParameterDict) and m.lora_embedding_A}


@pytest.mark.parametrize("targets, edits", [
    (["q_proj", "v_proj"], [{"target_modules": ["q_proj"]}, {"target_modules": ".*q_proj"},
                            {"exclude_modules": ["v_proj"]}, {"exclude_modules": r"model\.layers\.1\..*"},
                            {"target_modules": ["layers.0.self_attn.q_proj", "v_proj"]},
                            {"target_modules": ["self_attn.q_proj", "v_proj"]}, {"target_modules": r".*\.(q|v)_proj"},
                            {"exclude_modules": ["k_proj", "layers.0.self_attn"]}, {"target_modules": "all-linear"},
                            {"target_modules": None}]),
    (["embed_tokens", "lm_head", "q_proj"], [{"target_modules": "all-linear"}, {"target_modules": "ALL-LINEAR"}]),
])
def test_tensors_of_modules_peft_would_not_adapt_are_refused(targets, edits, tmp_path):
    """PEFT adapts only the modules its target_modules select (a list entry: the name or a dotted suffix; a string:
    re.fullmatch; "all-linear": Linear layers but the output head) that exclude_modules (a list: name or dotted
    suffix; a string: re.fullmatch) and modules_to_save leave in, and drops other tensors of the file: a folder
    whose config contradicts its tensors is refused naming the modules PEFT would leave out; one PEFT applies whole
    loads with PEFT's logits."""
    hf_model, loaded = _hf_model("llama", tmp_path)
    pm = peft.get_peft_model(deepcopy(hf_model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                 init_lora_weights=False))
    pm.save_pretrained(tmp_path / "good")
    # (saved with random B; read with PEFT's default init, so that modules PEFT adapts beyond the file start at zero)
    config = {**json.loads((tmp_path / "good" / "adapter_config.json").read_text()), "init_lora_weights": True}
    tensors = jlora.hf.SafetensorsFile(tmp_path / "good" / "adapter_model.safetensors")
    held = {re.sub(r"\.(lora_\w+)(\.weight)?$", "", k.removeprefix("base_model.model.")) for k in tensors
            if ".lora_" in k}
    refused = 0
    for edit in edits:
        (tmp_path / "good" / "adapter_config.json").write_text(json.dumps({**config, **edit}))
        theirs, adapted = _peft_adapted(deepcopy(hf_model), tmp_path / "good")
        dropped = sorted(held - adapted)
        if not dropped:
            adapters, cfg = jlora.peft.load(tmp_path / "good", loaded)
            ours = np.asarray(jlora.apply(loaded.model, loaded.params, adapters, cfg, jnp.asarray(IDS)))
            assert max_diff(ours, _torch_logits(theirs)) <= 1e-4, edit
            continue
        refused += 1
        field = next(iter(edit))
        with pytest.raises(ValueError, match=rf"{field}={re.escape(repr(edit[field]))} .*{re.escape(str(dropped[:3]))}"
                                             rf".*Correct {field} in adapter_config.json") as e:
            jlora.peft.load(tmp_path / "good", loaded)
        assert str(tmp_path / "good") in str(e.value), edit
        assert not [m for m in held - set(dropped) if m in str(e.value)], (edit, "only the dropped modules are named")
    assert refused == (5 if targets[0] == "q_proj" else 2)
    if targets[0] == "q_proj":   # a module to save gets no LoRA: PEFT fails on such a folder (a KeyError)
        (tmp_path / "good" / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["v_proj"]}))
        with pytest.raises(KeyError):
            _peft_adapted(deepcopy(hf_model), tmp_path / "good")
        with pytest.raises(ValueError, match=r"modules_to_save=\['v_proj'\] saves whole \(PEFT puts no LoRA on a "
                                             r"module to save\) \['model.layers.0.self_attn.v_proj', 'model.layers.1"):
            jlora.peft.load(tmp_path / "good", loaded)


@pytest.mark.parametrize("key, value, error", [
    ("rank_pattern", {"q_proj[": 2}, "unterminated character set"),
    ("alpha_pattern", {"v_proj": 2, "(q_proj": 3}, "missing \\), unterminated subpattern"),
    ("target_modules", "*q_proj", "nothing to repeat"),
    ("exclude_modules", "q_proj)", "unbalanced parenthesis"),
])
def test_invalid_regular_expressions_are_refused_naming_the_key(key, value, error, tmp_path):
    loaded, out = _exported(tmp_path)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, key: value}))
    pattern = value if isinstance(value, str) else list(value)[-1]
    with pytest.raises(ValueError, match=rf"{re.escape(str(out / 'adapter_config.json'))}: {key} holds "
                                         rf"{re.escape(repr(pattern))}.*not a valid regular expression.*{error}"):
        jlora.peft.load(out, loaded)


def test_a_file_without_lora_tensors_says_so(tmp_path):
    from safetensors.numpy import save_file

    loaded, out = _exported(tmp_path)
    file = out / "adapter_model.safetensors"
    save_file({}, file)
    with pytest.raises(ValueError, match=rf"{re.escape(str(file))} holds no LoRA tensors .*it holds no tensors"):
        jlora.peft.load(out, loaded)
    save_file({"base_model.model.model.norm.weight": np.ones(32, np.float32), "foo": np.ones(2, np.float32)}, file)
    with pytest.raises(ValueError, match=r"holds no LoRA tensors .*it holds 2 tensors: \['base_model.model.model.norm."
                                         r"weight', 'foo'\]"):
        jlora.peft.load(out, loaded)


def test_export_names_the_base_by_the_path_it_was_loaded_from(tmp_path):
    """As PEFT writes it (and as the CLI does): AutoPeftModelForCausalLM finds the base, and jlora's own import of
    the folder says nothing about another base model."""
    import warnings

    hf_model, loaded = _hf_model("llama", tmp_path)
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=("q_proj",))
    adapters = randomize(jlora.init(loaded.params, cfg, key=jax.random.key(0)), jax.random.key(1), 0.3)
    out = jlora.peft.save(tmp_path / "adapter", adapters, cfg, jlora.hf.load(str(tmp_path / "llama" / "config.json")))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "llama").absolute())
    theirs = _torch_logits(peft.AutoPeftModelForCausalLM.from_pretrained(str(out)).eval())
    ours = np.asarray(jlora.apply(loaded.model, loaded.params, adapters, cfg, jnp.asarray(IDS)))
    assert max_diff(ours, theirs) <= 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error", jlora.peft.BaseModelWarning)
        jlora.peft.load(out, loaded)
    # a GGUF file is named itself; a model read from nowhere (built in memory) by its name
    for source, name, written in (("/m/tiny.Q4_1.gguf", "Tiny Run 3", "/m/tiny.Q4_1.gguf"), ("", "tiny", "tiny")):
        out = jlora.peft.save(tmp_path / "a2", adapters, cfg, dataclasses.replace(loaded, source=source, name=name))
        assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == written


# ---------------------------------------------------------------- folders written whole, read whole
def test_a_failed_save_leaves_the_old_adapter_whole(tmp_path, monkeypatch):
    """A save that fails midway (a full disk) leaves the folder's old adapter loadable and unchanged, no partial file
    beside it, and names the file it was writing."""
    _, loaded = _hf_model("llama", tmp_path)
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    old = randomize(jlora.init(loaded.params, cfg, key=jax.random.key(0)), jax.random.key(1), 0.2)
    out = jlora.peft.save(tmp_path / "adapter", old, cfg, loaded)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    new = randomize(old, jax.random.key(2), 0.2)

    def disk_full(self, text, *args, **kwargs):   # the config, written after the weights: half of it, then ENOSPC
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(out), "write_text", disk_full)
    with pytest.raises(OSError, match=r"cannot write .*adapter_config.json: No space left on device; the file there "
                                      r"before, if any, is unchanged. Free disk space"):
        jlora.peft.save(out, new, cfg, loaded)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a save is reproducible byte for byte (safetensors' own writer ordered the metadata at random)
    twice = jlora.peft.save(tmp_path / "twice", old, cfg, loaded)
    assert {p.name: p.read_bytes() for p in twice.iterdir()} == before
    again, _ = jlora.peft.load(out, loaded)
    for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(old), strict=True):
        np.testing.assert_array_equal(x, y)


def test_load_reads_again_when_a_save_lands_between_its_reads(tmp_path, monkeypatch):
    """A save that replaces the folder's files while load reads them (between its two reads: one save's config with
    another's weights) makes load read the folder again; files that never stop changing are an error."""
    _, loaded = _hf_model("llama", tmp_path)
    cfg, cfg2 = (jlora.LoraConfig(rank=4, alpha=alpha, targets=("q_proj", "v_proj")) for alpha in (8.0, 2.0))
    first = randomize(jlora.init(loaded.params, cfg, key=jax.random.key(0)), jax.random.key(1), 0.2)
    second = randomize(first, jax.random.key(2), 0.2)
    out = jlora.peft.save(tmp_path / "adapter", first, cfg, loaded)
    read_tensors, saves = jlora.peft._read_tensors, []

    def racing(folder):   # another process's save lands after load read the config (once)
        if not saves:
            saves.append(jlora.peft.save(folder, second, cfg2, loaded))
        return read_tensors(folder)

    monkeypatch.setattr(jlora.peft, "_read_tensors", racing)
    got, got_cfg = jlora.peft.load(out, loaded)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(second), strict=True):
        np.testing.assert_array_equal(x, y)
    assert got_cfg.alpha == 2.0

    def always(folder):
        jlora.peft.save(folder, first, cfg, loaded)
        return read_tensors(folder)

    monkeypatch.setattr(jlora.peft, "_read_tensors", always)
    with pytest.raises(OSError, match="changed while they were read, 5 times: another process is writing"):
        jlora.peft.load(out, loaded)
    monkeypatch.undo()

    # a whole read between a save's two renames: the new config beside the old weights, both stamps steady; the
    # weights' metadata names another config, so load waits for the second rename and reads again
    other = jlora.peft.save(tmp_path / "other", second, cfg2, loaded)
    jlora.peft.save(out, first, cfg, loaded)
    os.replace(other / "adapter_config.json", out / "adapter_config.json")

    def second_rename(seconds):
        os.replace(other / "adapter_model.safetensors", out / "adapter_model.safetensors")

    monkeypatch.setattr(jlora.peft.time, "sleep", second_rename)
    got, got_cfg = jlora.peft.load(out, loaded)
    assert got_cfg.alpha == 2.0 and not (other / "adapter_model.safetensors").exists()
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(second), strict=True):
        np.testing.assert_array_equal(x, y)
    # a config edited by hand after the save (a second ago or more) is read as it is, at once
    config = out / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "lora_alpha": 4.0}))
    os.utime(config, (time.time() - 10, time.time() - 10))
    monkeypatch.setattr(jlora.peft.time, "sleep", lambda s: pytest.fail("waited for an edit by hand"))
    assert jlora.peft.load(out, loaded)[1].alpha == 4.0


def test_a_folder_missing_targeted_modules(tmp_path):
    """A folder whose config targets modules it holds no tensors of: PEFT warns and starts them from their init.
    With init_lora_weights=false that init is random (PEFT computes something jlora cannot): refused; with the
    default, B = 0: loaded with a warning, equal to PEFT's logits."""
    hf_model, loaded = _hf_model("llama", tmp_path)
    pm = peft.get_peft_model(deepcopy(hf_model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                 init_lora_weights=False))
    pm.save_pretrained(tmp_path / "a")
    folder = tmp_path / "a"
    weights = folder / "adapter_model.safetensors"
    from safetensors.numpy import save_file
    kept = {k: v for k, v in jlora.hf.SafetensorsFile(weights).items() if ".layers.1.self_attn.q_proj." not in k}
    save_file({k: np.array(v) for k, v in kept.items()}, str(weights))
    with pytest.raises(ValueError, match=r"targets modules whose LoRA tensors adapter_model.safetensors lacks: "
                                         r"\['model.layers.1.self_attn.q_proj'\] \(1 of 4\).*random ones"):
        jlora.peft.load(folder, loaded)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": True}))
    with pytest.warns(UserWarning, match=r"lacks: \['model.layers.1.self_attn.q_proj'\].*update is zero"):
        adapters, cfg = jlora.peft.load(folder, loaded)
    ours = np.asarray(jlora.apply(loaded.model, loaded.params, adapters, cfg, jnp.asarray(IDS)))
    theirs = _torch_logits(peft.PeftModel.from_pretrained(deepcopy(hf_model), str(folder)).eval())
    assert max_diff(ours, theirs) <= 1e-4
