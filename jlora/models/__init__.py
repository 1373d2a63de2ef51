"""jlora's model families: one :class:`Family` object per architecture owns everything family-specific.

A family file (:mod:`jlora.models.llama`, :mod:`jlora.models.gpt2`) declares its ``FAMILY``: how to read and write
the HF ``config.json``, how to build the Flax module and its KV cache, the :class:`ParamSpec` table (jlora path,
HF tensor name, shape, transpose) of every parameter, the layer stack's module name, its Megatron
tensor-parallel rules, and its HF layout conventions (the base model's name prefix, the non-parameter buffers old
checkpoints hold, whether HF stores linear weights (in, out)). The rest of jlora asks the family instead of
spelling architectures:

- the parameter table is the single source of HF names: weight loading (:func:`params_from_hf`), merged export
  (:func:`params_to_hf`), and PEFT adapter names (:mod:`jlora.peft` reads :func:`hf_param_table` and
  :func:`hf_module_table`: a PEFT key is ``base_model.model.<HF module>.lora_A.weight``, the HF module being a
  parameter's HF name without ``.weight``);
- :mod:`jlora.parallel` shards by :func:`tensor_split` (the family's ``tensor_parallel`` rules) and
  ``layer_prefix``; :mod:`jlora.peft` writes ``fan_in_fan_out``; :mod:`jlora.hf` strips ``hf_prefix`` and skips
  ``hf_buffers``.

Paths are ``"/"``-joined paths in the *unrolled* parameter tree (``layers_3/self_attn/q_proj/kernel``). When
``config.scan_layers`` is set, the layer modules are one ``nn.scan`` module (``layers`` / ``h``) whose params
carry a leading layer axis; the functions here stack and unstack that axis.

Examples:
    >>> fam = family_for("qwen2")
    >>> cfg = fam.config_from_hf({"model_type": "qwen2", "vocab_size": 32, "hidden_size": 16,
    ...     "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1})
    >>> [s.path for s in fam.param_specs(cfg)][:3]
    ['embed_tokens/embedding', 'layers_0/self_attn/q_proj/kernel', 'layers_0/self_attn/q_proj/bias']
    >>> hf_module_name(fam, cfg, "layers/self_attn/q_proj/kernel", layer=1)
    'model.layers.1.self_attn.q_proj'
    >>> tensor_split(fam, "layers_1/self_attn/o_proj/kernel"), tensor_split(fam, "norm/scale")
    (-2, None)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: its jlora path (unrolled tree), HF state-dict key, jlora shape, and whether HF stores the
    transpose (``nn.Linear`` weights are (out, in), Flax kernels (in, out))."""

    path: str
    hf_name: str
    shape: tuple[int, ...]
    transpose: bool


# Megatron tensor parallelism of a module, by the dim of each of its leaves that the mesh's tensor axis splits
# (counted from the end, so a scanned stack's leading layer axis does not shift it):
COLUMN = "column"   # output columns: kernel (in, out) by out, and the bias with it; the input stays whole
ROW = "row"         # input rows: kernel by in (one reduction after it); the bias is added after it, whole
VOCAB = "vocab"     # an embedding table (vocab, dim) by vocabulary rows
_SPLIT_DIMS = {COLUMN: {"kernel": -1, "bias": -1}, ROW: {"kernel": -2}, VOCAB: {"embedding": -2}}


@dataclasses.dataclass(frozen=True)
class Family:
    """An architecture family: everything about it the rest of jlora needs, declared by its own module.

    Attributes:
        name: the family's name (its module in :mod:`jlora.models`).
        model_types: the HF ``model_type`` values this family serves.
        config_from_hf: ``(config.json dict, **overrides) -> config``; raises ValueError naming any attribute
            jlora does not implement (overrides set config fields such as ``dtype`` or ``scan_layers``).
        config_to_hf: ``config -> config.json dict`` that transformers' ``from_pretrained`` loads.
        make_model: ``config -> flax.linen.Module``.
        param_specs: ``config -> list[ParamSpec]``, the one table of jlora paths and HF names.
        layer_prefix: module name of the layer stack: ``{prefix}_{i}`` unrolled, ``{prefix}`` scanned.
        init_cache: ``(config, batch_size, max_len, dtype=None) -> KVCache``.
        tensor_parallel: ``(module, COLUMN | ROW | VOCAB)`` pairs, the Megatron rules (see :func:`tensor_split`);
            ``module`` is a module path inside a layer (``self_attn/q_proj``) or outside the stack (``lm_head``).
        fan_in_fan_out: HF stores the layers' linear weights (in, out) (transformers' ``Conv1D``) rather than
            ``nn.Linear``'s (out, in); PEFT's ``fan_in_fan_out`` flag.
        hf_prefix: the base model's prefix in HF tensor names (``"model."``), absent from checkpoints saved
            from the base model rather than the ``*ForCausalLM`` model.
        hf_buffers: regex of the non-parameter tensors (buffers) older transformers versions saved; loading
            skips them.
    """

    name: str
    model_types: tuple[str, ...]
    config_from_hf: Callable[..., Any]
    config_to_hf: Callable[[Any], dict]
    make_model: Callable[[Any], Any]
    param_specs: Callable[[Any], list[ParamSpec]]
    layer_prefix: str
    init_cache: Callable[..., Any]
    tensor_parallel: tuple[tuple[str, str], ...]
    fan_in_fan_out: bool
    hf_prefix: str
    hf_buffers: str

    def __post_init__(self):
        bad = [(m, s) for m, s in self.tensor_parallel if s not in _SPLIT_DIMS]
        if bad:
            raise ValueError(f"family {self.name!r}: tensor_parallel rules {bad} name no split; use one of "
                             f"{sorted(_SPLIT_DIMS)}")


def families() -> tuple[Family, ...]:
    """Every family jlora implements."""
    from jlora.models import gpt2, llama

    return llama.FAMILY, gpt2.FAMILY


def supported_model_types() -> tuple[str, ...]:
    """Every HF ``model_type`` jlora implements."""
    return tuple(t for f in families() for t in f.model_types)


def family_for(model_type: str) -> Family:
    """The family serving HF ``model_type``; ValueError listing the supported ones otherwise."""
    for fam in families():
        if model_type in fam.model_types:
            return fam
    raise ValueError(f"model_type {model_type!r} is not supported by jlora; supported model types: "
                     f"{supported_model_types()}")


def family_of(config: Any) -> Family:
    """The family of a parsed config (by its ``model_type``)."""
    return family_for(config.model_type)


def family_named(name: str) -> Family:
    """The family called ``name`` (or serving HF model_type ``name``); ValueError listing the names otherwise.

    Examples:
        >>> family_named("qwen3") is family_named("llama")
        True
    """
    for fam in families():
        if name == fam.name or name in fam.model_types:
            return fam
    raise ValueError(f"no model family {name!r}; jlora's families are {[f.name for f in families()]} (model types "
                     f"{supported_model_types()})")


def init_cache(config: Any, batch_size: int, max_len: int, dtype=None):
    """An empty KV cache for a model of ``config`` (see :class:`jlora.models.layers.KVCache`)."""
    return family_of(config).init_cache(config, batch_size, max_len, dtype)


def split_layer(family: Family, path: str) -> tuple[int | None, str]:
    """``"layers_3/mlp/..."`` -> ``(3, "mlp/...")``; a non-layer path -> ``(None, path)``."""
    m = re.fullmatch(rf"{family.layer_prefix}_(\d+)/(.*)", path)
    return (int(m.group(1)), m.group(2)) if m else (None, path)


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _get(tree: Mapping, path: str):
    node = tree
    for p in path.split("/"):
        if not isinstance(node, Mapping) or p not in node:
            raise KeyError(f"parameter {path!r} is missing from the params (no {p!r} under it)")
        node = node[p]
    return node


def _convert(spec: ParamSpec, tensor, dtype) -> np.ndarray:
    arr = np.asarray(tensor)
    hf_shape = tuple(reversed(spec.shape)) if spec.transpose else spec.shape
    if tuple(arr.shape) != hf_shape:
        raise ValueError(f"tensor {spec.hf_name!r} has shape {tuple(arr.shape)}, but the config needs {hf_shape} "
                         f"(jlora parameter {spec.path!r} of shape {spec.shape}); the weights do not match "
                         f"config.json")
    if spec.transpose:
        arr = arr.T
    return np.asarray(arr, dtype=dtype)


def params_from_hf(family: Family, config: Any, get_tensor: Callable[[str], np.ndarray], *,
                   dtype=None) -> dict:
    """Builds the nested param dict from HF-named tensors, one tensor at a time.

    Args:
        family: the model's :class:`Family`.
        config: its parsed config (``config.scan_layers`` decides whether layers are stacked).
        get_tensor: ``hf_name -> array`` (numpy, or anything ``np.asarray`` takes); it may raise KeyError for a
            missing tensor.
        dtype: parameter dtype; default ``config.param_dtype``.

    Returns:
        ``{"embed_tokens": {"embedding": ...}, "layers_0": {...}, ...}`` of jax arrays (layers stacked under
        ``layers`` when scanned).

    Raises:
        KeyError: a tensor is missing (named). ValueError: a tensor has the wrong shape (named, both shapes).
    """
    dtype = jnp.dtype(config.param_dtype if dtype is None else dtype)
    n = config.num_hidden_layers
    params: dict = {}
    stacked: dict[str, np.ndarray] = {}
    for spec in family.param_specs(config):
        try:
            tensor = get_tensor(spec.hf_name)
        except KeyError as e:
            raise KeyError(f"tensor {spec.hf_name!r} (for jlora parameter {spec.path!r}) is missing from the "
                           f"checkpoint") from e
        arr = _convert(spec, tensor, dtype)
        del tensor
        layer, rest = split_layer(family, spec.path)
        if config.scan_layers and layer is not None:
            buf = stacked.get(rest)
            if buf is None:
                buf = stacked[rest] = np.empty((n, *arr.shape), dtype)
            buf[layer] = arr
            if layer == n - 1:
                _set(params, f"{family.layer_prefix}/{rest}", jnp.asarray(stacked.pop(rest)))
        else:
            _set(params, spec.path, jnp.asarray(arr))
    return params


def params_to_hf(family: Family, config: Any, params: Mapping) -> dict[str, np.ndarray]:
    """HF-named numpy arrays (HF layouts, scanned layers unstacked) for ``params``; the inverse of
    :func:`params_from_hf`. Arrays keep their dtype (bfloat16 stays ``ml_dtypes.bfloat16``)."""
    out = {}
    for spec in family.param_specs(config):
        layer, rest = split_layer(family, spec.path)
        if config.scan_layers and layer is not None:
            arr = np.asarray(jax.device_get(_get(params, f"{family.layer_prefix}/{rest}")[layer]))
        else:
            arr = np.asarray(jax.device_get(_get(params, spec.path)))
        if arr.shape != spec.shape:
            raise ValueError(f"parameter {spec.path!r} has shape {arr.shape}, but the config needs {spec.shape}")
        out[spec.hf_name] = np.ascontiguousarray(arr.T) if spec.transpose else arr
    return out


_LEAVES = ("kernel", "embedding", "bias", "scale")


def _layer_relative(family: Family, path: str) -> str:
    """``path`` without its layer stack prefix (``layers_3/`` unrolled, ``layers/`` scanned)."""
    m = re.match(rf"{re.escape(family.layer_prefix)}(_\d+)?/", path)
    return path[m.end():] if m else path


def tensor_split(family: Family, path: str) -> int | None:
    """The dim of parameter ``path`` that Megatron tensor parallelism splits, by the family's ``tensor_parallel``
    rules: counted from the end (-1: output columns or a column-parallel bias; -2: input rows or vocabulary
    rows), so it holds for an unrolled, scanned or layer-relative path alike. None: the parameter is replicated
    over the tensor axis.

    A rule's module matches the path's module (the path without its leaf name and layer prefix) or a suffix of
    it after a ``/``.

    Examples:
        >>> fam = family_named("gpt2")
        >>> [tensor_split(fam, p) for p in ("h_0/attn/c_attn/kernel", "h/attn/c_attn/bias", "h/mlp/c_proj/bias",
        ...                                 "wte/embedding", "ln_f/scale")]
        [-1, -1, None, -2, None]
    """
    rel = _layer_relative(family, path)
    if "/" not in rel:
        return None
    module, leaf = rel.rsplit("/", 1)
    for rule_module, split in family.tensor_parallel:
        if module == rule_module or module.endswith("/" + rule_module):
            return _SPLIT_DIMS[split].get(leaf)
    return None


def hf_param_table(family: Family, config: Any) -> dict[str, tuple[str, int | None, ParamSpec]]:
    """HF tensor name -> (jlora param path, layer index in a scanned stack or None, its :class:`ParamSpec`), for
    every parameter; paths are in ``config``'s layout (``layers/...`` with a layer index when scanned)."""
    table = {}
    scanned = getattr(config, "scan_layers", False)
    for spec in family.param_specs(config):
        layer, rest = split_layer(family, spec.path)
        if scanned and layer is not None:
            table[spec.hf_name] = (f"{family.layer_prefix}/{rest}", layer, spec)
        else:
            table[spec.hf_name] = (spec.path, None, spec)
    return table


def module_kind(path: str) -> str:
    """``"embedding"`` for an embedding table's path, ``"linear"`` for a kernel's (how PEFT names their LoRA
    tensors: ``lora_embedding_A`` or ``lora_A.weight``)."""
    return "embedding" if path.endswith("/embedding") else "linear"


def hf_module_table(family: Family, config: Any) -> dict[str, tuple[str, int | None]]:
    """HF module name -> (jlora param path, layer index in a scanned stack or None), for every module with a
    kernel or an embedding table: the modules a LoRA adapter can sit on, by the names PEFT gives them.

    Examples:
        >>> fam = family_named("gpt2")
        >>> cfg = fam.config_from_hf({"model_type": "gpt2", "n_embd": 8, "n_layer": 2, "n_head": 2, "vocab_size": 16,
        ...                           "n_positions": 8}, scan_layers=True)
        >>> hf_module_table(fam, cfg)["transformer.h.1.mlp.c_fc"]
        ('h/mlp/c_fc/kernel', 1)
    """
    table = {}
    for name, (path, layer, _) in hf_param_table(family, config).items():
        if path.rsplit("/", 1)[-1] in ("kernel", "embedding"):
            table[name.removesuffix(".weight")] = (path, layer)
    return table


def hf_module_name(family: Family, config: Any, path: str, layer: int | None = None) -> str:
    """The HF module name (no ``.weight``) of the layer holding jlora parameter ``path``.

    For a scanned path (``layers/self_attn/q_proj/kernel``) pass the ``layer`` index. A path ending in a module
    name instead of a leaf is accepted too.
    """
    prefix = family.layer_prefix
    if path == prefix or path.startswith(prefix + "/"):
        if layer is None:
            raise ValueError(f"path {path!r} is in the scanned layer stack: pass `layer=` (0..."
                             f"{config.num_hidden_layers - 1}) to name one layer's module")
        path = f"{prefix}_{layer}" + path[len(prefix):]
    module = path.rsplit("/", 1)[0] if path.rsplit("/", 1)[-1] in _LEAVES else path
    unrolled = dataclasses.replace(config, scan_layers=False) if getattr(config, "scan_layers", False) else config
    for spec in family.param_specs(unrolled):
        if spec.path.rsplit("/", 1)[0] == module:
            return spec.hf_name.rsplit(".", 1)[0]
    raise ValueError(f"path {path!r} names no parameter of this {family.name} model; module paths look like "
                     f"{[s.path for s in family.param_specs(unrolled)][:6]}")


__all__ = ["ParamSpec", "Family", "COLUMN", "ROW", "VOCAB", "families", "family_for", "family_of", "family_named",
           "supported_model_types", "init_cache", "split_layer", "params_from_hf", "params_to_hf", "hf_module_name",
           "tensor_split", "hf_param_table", "hf_module_table", "module_kind"]
