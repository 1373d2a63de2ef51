"""Read a GGUF file (llama.cpp's format) as a Hugging Face checkpoint: config dict, tensors, tokenizer.

`read(path)` returns a `GGUFModel` whose parts look like what a Hugging Face folder provides, so
`jlora.hf.load` treats both the same way:

* `hf_config`: a `config.json`-style dict (`model_type`, `hidden_size`, ...) built from the file's
  `{arch}.*` metadata.
* `tensors`: a lazy read-only mapping from HF state-dict names (`model.layers.0.self_attn.q_proj.weight`)
  to float32 numpy arrays in HF layout (nn.Linear weights are (out, in)). Each access dequantizes one
  tensor from the memory-mapped file, so loading never holds two full copies of the model.
* `tokenizer`: a `jlora.hf.tokenizer.Tokenizer` rebuilt from the `tokenizer.*` metadata (None when the file
  has none).

Three details of the format matter:

1. Names. One explicit table per architecture maps GGUF tensor names (`blk.3.attn_q.weight`) to HF
   names; a tensor the table does not know is an error rather than silently dropped.
2. Layout. GGUF lists dimensions fastest-first (`ne`), the reverse of numpy's shape: a (out, in) HF
   weight is stored with `ne = [in, out]`. Quantized types pack blocks along `ne[0]`; `gguf.quants`
   dequantizes them and we reshape to the reversed `ne`.
3. Rotary permutation. llama.cpp's `convert_hf_to_gguf.py` permutes the rows of Llama's q_proj and k_proj
   (from HF's rotate-half order to interleaved pairs, per head). `_unpermute` inverts that, with
   `n_head` for q and `n_head_kv` for k. Qwen2/Qwen3 files are not permuted.

Examples:
    >>> import numpy as np
    >>> w = np.arange(8 * 3).reshape(8, 3)                      # 2 heads of dim 4
    >>> p = _permute(w, 2)                                     # what convert_hf_to_gguf.py writes
    >>> bool((_unpermute(p, 2) == w).all())
    True
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from jlora.hf.tokenizer import Tokenizer

# Tensor types we dequantize; each is checked against transformers' own dequantizer in tests/test_gguf.py.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


@dataclasses.dataclass(frozen=True)
class _Arch:
    """How one GGUF `general.architecture` maps to a Hugging Face model."""

    model_type: str
    architectures: tuple[str, ...]
    permute_qk: bool      # llama.cpp permuted q/k rows on conversion (LlamaModel.permute)
    layer_table: dict[str, str]  # GGUF per-block suffix -> HF per-layer suffix


_LLAMA_LAYER = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_BIASES = {
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}
_QK_NORM = {
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
ARCHS = {
    "llama": _Arch("llama", ("LlamaForCausalLM",), True, {**_LLAMA_LAYER, **_BIASES,
                                                          "attn_output.bias": "self_attn.o_proj.bias"}),
    "qwen2": _Arch("qwen2", ("Qwen2ForCausalLM",), False, {**_LLAMA_LAYER, **_BIASES}),
    "qwen3": _Arch("qwen3", ("Qwen3ForCausalLM",), False, {**_LLAMA_LAYER, **_QK_NORM}),
}
GLOBAL_TABLE = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")

# what to do about a damaged GGUF file (it has no config.json to replace)
_REDO = "download the file again, or convert the model to GGUF again"

# GGUF tensors jlora knows and does not read, and what they are
_UNREAD_TENSORS = {"rope_freqs.weight": "it holds the per-frequency factors of Llama 3.1+ rope scaling (rope_scaling "
                                        "type llama3), which jlora reads from a Hugging Face folder's config.json "
                                        "only: load the model's safetensors folder instead"}


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The HF state-dict name of a GGUF tensor, or None when the table has no entry.

    Examples:
        >>> hf_name("blk.3.attn_q.weight")
        'model.layers.3.self_attn.q_proj.weight'
        >>> hf_name("token_embd.weight")
        'model.embed_tokens.weight'
    """
    if gguf_name in GLOBAL_TABLE:
        return GLOBAL_TABLE[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in ARCHS[arch].layer_table:
        return f"model.layers.{m.group(1)}.{ARCHS[arch].layer_table[m.group(2)]}"
    return None


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py `LlamaModel.permute`), for tests and docs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `_permute`: interleaved rotary pairs back to HF's rotate-half row order, per head."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFTensors(Mapping):
    """Read-only mapping HF name -> float32 array, dequantized from the memory-mapped file on each access."""

    def __init__(self, path: str, entries: dict[str, Any], permute_heads: dict[str, int]):
        self._path = path
        self._entries = entries            # hf name -> gguf ReaderTensor
        self._permute_heads = permute_heads  # hf name -> n_head to unpermute with

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            tensor = self._entries[name]
        except KeyError:
            raise KeyError(f"{self._path} has no tensor {name!r} (GGUF names are mapped to HF names; "
                           f"first names here: {list(self._entries)[:5]})") from None
        out = dequantize(tensor)
        if name in self._permute_heads:
            out = _unpermute(out, self._permute_heads[name])
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def gguf_type(self, name: str) -> str:
        """The stored tensor type of `name` (e.g. "Q4_1")."""
        return self._entries[name].tensor_type.name

    def __repr__(self) -> str:
        return f"GGUFTensors({self._path!r}, {len(self)} tensors)"


def dequantize(tensor) -> np.ndarray:
    """A `gguf.ReaderTensor` as a float32 array of numpy shape reversed(`ne`).

    Raises:
        ValueError: the tensor's type is not in `SUPPORTED_TYPES`.
    """
    import gguf.quants

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise ValueError(f"GGUF tensor {tensor.name!r} has type {kind}, which jlora cannot dequantize; "
                         f"supported types: {list(SUPPORTED_TYPES)}. Re-quantize the model with one of them.")
    shape = tuple(int(n) for n in reversed(tensor.shape))
    out = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.array(out, dtype=np.float32).reshape(shape)  # a copy: the memmap stays untouched


@dataclasses.dataclass(frozen=True)
class GGUFModel:
    """A GGUF file read as a Hugging Face checkpoint (see the module docstring)."""

    hf_config: dict
    tensors: GGUFTensors
    tokenizer: Tokenizer | None   # None when the file has no tokenizer.ggml.model
    name: str
    metadata: Mapping[str, Any] = dataclasses.field(repr=False, default_factory=dict)


def read_metadata(reader) -> dict[str, Any]:
    """All key/value metadata of a `gguf.GGUFReader` as plain Python values."""
    return {key: field.contents() for key, field in reader.fields.items()}


class _Truncated(ValueError):
    """A tensor's data reaches past the end of the file."""


def _past_end(reader, start_offs, fields) -> list[tuple[int, int, str]]:
    """(start, end, name) of each tensor whose data reaches past the end of ``reader``'s file, from the tensor
    infos ``GGUFReader._build_tensors`` receives; [] when they are not laid out as this gguf version's are."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    size, cut = len(reader.data), []
    try:
        for field in fields:
            _, name, _, dims, kind, offset = field.parts
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(kind[0]))]
            except (ValueError, KeyError):   # an unknown type: the reader's own error names it
                continue
            start = int(start_offs + offset[0])
            end = start + int(np.prod(dims)) * type_size // block
            if end > size:
                cut.append((start, end, bytes(name).decode("utf-8", "replace")))
    except Exception:  # noqa: BLE001  (another gguf version's internals: leave the check to the reader)
        return []
    return cut


def _open_reader(path: str):
    """A ``gguf.GGUFReader`` of ``path`` that checks, before it maps each tensor's data, that the data lies inside
    the file: a file cut short (an interrupted download or copy) is named as such, with the first tensor it cuts
    into (:class:`_Truncated`), rather than failing in numpy ("cannot reshape array of size ..."). The check hooks
    the reader's private ``_build_tensors``; with a gguf version whose hook differs, it does nothing."""
    from gguf import GGUFReader

    class Reader(GGUFReader):
        def _build_tensors(self, *args, **kwargs):
            cut = _past_end(self, *args, **kwargs) if len(args) == 2 and not kwargs else []
            if cut:
                start, end, name = min(cut)
                raise _Truncated(f"the file is truncated: tensor {name!r} needs bytes {start:,} to {end:,}, but the "
                                 f"file has {len(self.data):,} bytes ({len(cut)} of its {len(args[1])} tensors reach "
                                 f"past its end); download or copy the file again")
            return super()._build_tensors(*args, **kwargs)

    return Reader(path)


def read(path: str | os.PathLike) -> GGUFModel:
    """Open a GGUF file: config, lazy tensors and tokenizer.

    Raises:
        ValueError: the file cannot be parsed, its architecture is not one of `ARCHS`, a tensor has an
            unsupported type or a name the table does not know, or it uses rope scaling other than linear.
        FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        reader = _open_reader(path)
    except _Truncated as e:
        raise ValueError(f"cannot read GGUF file {path}: {e}") from None
    except Exception as e:  # the reader raises ValueError/KeyError/IndexError on bad bytes or unknown enums
        raise ValueError(f"cannot read GGUF file {path}: it is not a GGUF file or its header is damaged (the gguf "
                         f"reader failed with {type(e).__name__}: {e}); {_REDO}") from e
    meta = read_metadata(reader)
    arch_name = meta.get("general.architecture")
    if arch_name not in ARCHS:
        raise ValueError(f"{path}: general.architecture={arch_name!r} is not supported; "
                         f"supported: {sorted(ARCHS)}")
    arch = ARCHS[arch_name]

    bad = [f"{t.name} ({t.tensor_type.name})" for t in reader.tensors if t.tensor_type.name not in SUPPORTED_TYPES]
    if bad:
        raise ValueError(f"{path}: GGUF tensor types jlora cannot dequantize: {bad[:5]}"
                         f"{' ...' if len(bad) > 5 else ''}; supported types: {list(SUPPORTED_TYPES)}")
    entries = {}
    for t in reader.tensors:
        name = hf_name(t.name, arch_name)
        if name is None:
            why = _UNREAD_TENSORS.get(t.name, "the model uses a feature jlora does not load")
            raise ValueError(f"{path}: GGUF tensor {t.name!r} has no Hugging Face name in jlora's "
                             f"{arch_name} table (jlora.hf.gguf.ARCHS); {why}")
        entries[name] = t

    config = hf_config(meta, tied="lm_head.weight" not in entries, path=path)
    if arch_name == "llama" and any(n.endswith("self_attn.q_proj.bias") for n in entries):
        config["attention_bias"] = True  # Llama's q/k/v/o biases (Qwen2's are implied by its model_type)
    permute = {}
    if arch.permute_qk:
        for name in entries:
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                permute[name] = config["num_attention_heads"]
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                permute[name] = config["num_key_value_heads"]
    try:
        tokenizer = Tokenizer.from_gguf_metadata(meta) if "tokenizer.ggml.model" in meta else None
    except (KeyError, IndexError, TypeError) as e:   # a key missing, a token id past the token list, a wrong type
        raise ValueError(f"{path}: the GGUF tokenizer metadata is damaged ({type(e).__name__}: {e}); "
                         f"{_REDO}") from None
    name = meta.get("general.name") or os.path.splitext(os.path.basename(path))[0]
    return GGUFModel(hf_config=config, tensors=GGUFTensors(path, entries, permute), tokenizer=tokenizer,
                     name=name, metadata=meta)


def _shortest(x: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.99999974e-06),
    which is how the source config.json wrote it."""
    return float(str(np.float32(x)))


def hf_config(meta: Mapping[str, Any], *, tied: bool, path: str = "<gguf>") -> dict:
    """A Hugging Face `config.json` dict from GGUF metadata (architecture keys `{arch}.*`)."""
    arch_name = meta["general.architecture"]
    arch = ARCHS[arch_name]

    def get(key: str, default: Any = None, *, required: bool = False) -> Any:
        value = meta.get(f"{arch_name}.{key}", default)
        if required and value is None:
            raise ValueError(f"{path}: GGUF metadata lacks {arch_name}.{key}")
        if isinstance(value, (list, tuple, np.ndarray)):   # llama.cpp allows per-layer values (head counts)
            values = {v.item() if isinstance(v, np.generic) else v for v in np.asarray(value).reshape(-1).tolist()}
            if len(values) != 1:
                raise ValueError(f"{path}: {arch_name}.{key} differs between layers ({sorted(values)[:8]}); jlora's "
                                 f"models use one value for every layer")
            value = values.pop()
        return value

    # llama.cpp's reading: a scaling factor (or 2023 converters' rope.scale_linear) without a type is linear
    scaling, factor = get("rope.scaling.type"), get("rope.scaling.factor", get("rope.scale_linear"))
    if scaling not in (None, "none", "linear"):
        raise ValueError(f"{path}: {arch_name}.rope.scaling.type={scaling!r}; jlora loads GGUF files with linear "
                         "rope scaling or none. Load the Hugging Face folder of this model instead.")
    linear = scaling != "none" and factor not in (None, 0, 1)
    n_head = get("attention.head_count", required=True)
    tokens = meta.get("tokenizer.ggml.tokens")
    config = {
        "model_type": arch.model_type,
        "architectures": list(arch.architectures),
        "vocab_size": get("vocab_size", len(tokens) if tokens is not None else None, required=True),
        "hidden_size": get("embedding_length", required=True),
        "intermediate_size": get("feed_forward_length", required=True),
        "num_hidden_layers": get("block_count", required=True),
        "num_attention_heads": n_head,
        "num_key_value_heads": get("attention.head_count_kv", n_head),
        "rms_norm_eps": _shortest(get("attention.layer_norm_rms_epsilon", required=True)),
        "rope_theta": _shortest(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": get("context_length", required=True),
        "tie_word_embeddings": tied,
    }
    counts = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings")
    bad = {k: config[k] for k in counts
           if not isinstance(config[k], (int, np.integer)) or isinstance(config[k], bool) or config[k] <= 0}
    if bad:
        raise ValueError(f"{path}: GGUF metadata gives {bad}, not positive integers; the file's header is damaged: "
                         f"{_REDO}")
    if linear:
        config["rope_scaling"] = {"rope_type": "linear", "factor": _shortest(factor)}
    # llama.cpp's head size: attention.key_length when given, else hidden / heads
    config["head_dim"] = get("attention.key_length") or config["hidden_size"] // n_head
    rotated = get("rope.dimension_count", config["head_dim"])
    if rotated != config["head_dim"]:
        raise ValueError(f"{path}: {arch_name}.rope.dimension_count={rotated} rotates part of each "
                         f"{config['head_dim']}-dim head (partial RoPE); jlora's models rotate the whole head, so "
                         "this model would load wrong. It is not supported.")
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):
        if meta.get(f"tokenizer.ggml.{key}") is not None:
            config[hf_key] = int(meta[f"tokenizer.ggml.{key}"])
    return config
