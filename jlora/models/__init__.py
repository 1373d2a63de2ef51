"""jlora's model families and the one table per family that maps their parameters to Hugging Face names.

A :class:`Family` bundles what the rest of jlora needs to know about an architecture: how to read and write
its HF ``config.json``, how to build the Flax module, and its :class:`ParamSpec` list. That list is the single
source of truth for weight loading (:func:`params_from_hf`), merged export (:func:`params_to_hf`) and PEFT key
names (:func:`hf_module_name`).

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


@dataclasses.dataclass(frozen=True)
class Family:
    """An architecture family: config conversion both ways, the Flax module, the parameter table, the cache.

    Attributes:
        name: "llama" or "gpt2".
        model_types: the HF ``model_type`` values this family serves.
        config_from_hf: ``(config.json dict, **overrides) -> config``; raises ValueError naming any attribute
            jlora does not implement (overrides set config fields such as ``dtype`` or ``scan_layers``).
        config_to_hf: ``config -> config.json dict`` that transformers' ``from_pretrained`` loads.
        make_model: ``config -> flax.linen.Module``.
        param_specs: ``config -> list[ParamSpec]``.
        layer_prefix: module name of the layer stack: ``{prefix}_{i}`` unrolled, ``{prefix}`` scanned.
        init_cache: ``(config, batch_size, max_len, dtype=None) -> KVCache``.
    """

    name: str
    model_types: tuple[str, ...]
    config_from_hf: Callable[..., Any]
    config_to_hf: Callable[[Any], dict]
    make_model: Callable[[Any], Any]
    param_specs: Callable[[Any], list[ParamSpec]]
    layer_prefix: str
    init_cache: Callable[..., Any]


def _families() -> tuple[Family, ...]:
    from jlora.models import gpt2, llama

    return (
        Family("llama", llama.MODEL_TYPES, llama.config_from_hf, llama.config_to_hf, llama.make_model,
               llama.param_specs, "layers", llama.init_cache),
        Family("gpt2", gpt2.MODEL_TYPES, gpt2.config_from_hf, gpt2.config_to_hf, gpt2.make_model,
               gpt2.param_specs, "h", gpt2.init_cache),
    )


def supported_model_types() -> tuple[str, ...]:
    """Every HF ``model_type`` jlora implements."""
    return tuple(t for f in _families() for t in f.model_types)


def family_for(model_type: str) -> Family:
    """The family serving HF ``model_type``; ValueError listing the supported ones otherwise."""
    for fam in _families():
        if model_type in fam.model_types:
            return fam
    raise ValueError(f"model_type {model_type!r} is not supported by jlora; supported model types: "
                     f"{supported_model_types()}")


def family_of(config: Any) -> Family:
    """The family of a parsed config (by its ``model_type``)."""
    return family_for(config.model_type)


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


__all__ = ["ParamSpec", "Family", "family_for", "family_of", "supported_model_types", "init_cache",
           "params_from_hf", "params_to_hf", "hf_module_name"]
