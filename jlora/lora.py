"""Adapters as a separate pytree: init, merge, unmerge, delta, count and summary.

An adapter tree mirrors the parameter tree but holds only what trains. At the path of every targeted kernel or
embedding leaf it holds ``{"a": (..., in, r), "b": (..., r, out)}``; leading axes (a scanned layer stack) stay
leading, and a kernel with several input or output axes (``nn.DenseGeneral``, ``nn.Einsum``) is flattened so
that ``in`` and ``out`` are the products of its input and output dims. The layer's update is
``scale * A @ B`` with ``scale`` from :meth:`jlora.LoraConfig.scale`.

The frozen params are never copied or modified here: :func:`merge` returns a new tree.

Variants add to the same tree: DoRA a magnitude ``m`` beside ``a`` and ``b`` (:mod:`jlora.variants.dora`); ``bias`` and
``modules_to_save`` whole tensors at their own parameter paths (a leaf outside any ``{"a", "b"}`` pair), which
:func:`overlay` puts in place of the frozen ones. Inits that change the base (PiSSA, OLoRA) live in
:mod:`jlora.variants.inits` and return the new base explicitly; quantized (:mod:`jlora.variants.quant`) kernels are dequantized to
compute and re-quantized when merged.

Which kernel dims are inputs cannot be read off a >2-D array (is the leading axis a layer stack? which dims of
an Einsum kernel are contracted?), so such kernels need a :class:`KernelLayout`, derived once by tracing the
model with :func:`jlora.layout`. Plain 2-D kernels need none.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.variants import dora as dora_lib
from jlora.variants import quant as quant_lib
from jlora import tree as tree_lib
from jlora.config import LoraConfig

_NO_MATCH = (
    "targets={targets} (exclude={exclude}) matched no kernel or embedding parameter. Targets are regexes "
    "searched in '/'-joined paths; the parameter paths look like: {examples}"
)
_NEEDS_LAYOUT = (
    "parameter {path!r} has shape {shape}: with more than 2 dims jlora cannot tell which axes are inputs, "
    "outputs or a scanned layer axis. Pass `layout=jlora.layout(model, *example_args)` (derived once by "
    "tracing the model), or exclude this path from the targets."
)


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """How a kernel's axes map onto an adapter's ``(in, r)`` and ``(r, out)`` factors.

    Attributes:
        kind: the layer class that uses the kernel (``"Dense"``, ``"DenseGeneral"``, ``"Embed"``, ``"Einsum"``).
        in_axes: axes of the per-layer kernel contracted with the layer's input (for an embedding table: the
            vocabulary axis).
        out_axes: the remaining axes, which index the layer's output features.
        lead: number of leading stacked axes (e.g. 1 for a layer stack under ``nn.scan``).
    """

    kind: str
    in_axes: tuple[int, ...] = (0,)
    out_axes: tuple[int, ...] = (1,)
    lead: int = 0

    def split(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
        """Returns ``(lead_shape, fan_in, fan_out)`` for a kernel of ``shape``."""
        per_layer = shape[self.lead:]
        if len(per_layer) != len(self.in_axes) + len(self.out_axes):
            raise ValueError(f"layout {self} does not fit a kernel of shape {shape}")
        fan_in = math.prod(per_layer[i] for i in self.in_axes)
        fan_out = math.prod(per_layer[i] for i in self.out_axes)
        return tuple(shape[:self.lead]), fan_in, fan_out


class Layout(dict):
    """``{param path: KernelLayout}`` for every kernel a supported layer uses, from :func:`jlora.layout`.

    ``unsupported`` maps the paths of kernels used by other layer kinds (``nn.Conv``, ...) to their class names,
    so that targeting one gives an error naming the kind.
    """

    def __init__(self, entries=(), unsupported=None):
        super().__init__(entries)
        self.unsupported = dict(unsupported or {})


def _default_layout(path: str, shape: tuple[int, ...], adapter: Mapping | None = None) -> KernelLayout:
    """The layout of a kernel that needs none: 2-D per layer, with the lead count read off an adapter."""
    kind = "Embed" if path.endswith("/embedding") or path == "embedding" else "Dense"
    lead = 0 if adapter is None else np.ndim(adapter["a"]) - 2
    if len(shape) - lead != 2:
        raise ValueError(_NEEDS_LAYOUT.format(path=path, shape=tuple(shape)))
    return KernelLayout(kind, (0,), (1,), lead)


def _layout_for(path: str, shape, layout: Mapping[str, KernelLayout] | None, adapter=None) -> KernelLayout:
    if layout is not None and path in layout:
        return layout[path]
    return _default_layout(path, tuple(shape), adapter)


def _path_key(key: jax.Array, path: str) -> jax.Array:
    """A per-path key that does not depend on which other paths are targeted."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def target_paths(params: Mapping, cfg: LoraConfig) -> list[str]:
    """The paths of ``params`` that ``cfg`` targets; raises if there are none."""
    flat = tree_lib.flatten(params)
    found = [p for p in flat if cfg.matches(p)]
    if not found:
        examples = [p for p in flat if p.rsplit("/", 1)[-1] in ("kernel", "embedding")] or list(flat)
        raise ValueError(_NO_MATCH.format(targets=list(cfg.targets), exclude=list(cfg.exclude),
                                          examples=examples[:10]))
    return found


def init(params: Mapping, cfg: LoraConfig, *, key: jax.Array,
         layout: Mapping[str, KernelLayout] | None = None) -> dict:
    """Creates fresh adapters for every parameter that ``cfg`` targets (and ``bias``/``modules_to_save`` selects).

    With ``init="default"`` (as PEFT does), dense A is kaiming-uniform (bound ``1/sqrt(in)``) and B = 0;
    an embedding's A = 0 and B is standard normal. Either way the product is zero, so fresh adapters leave the
    model's output unchanged. Each path draws from ``fold_in(key, crc32(path))``, so adding a target does not
    change the others.

    Args:
        params: the frozen parameter tree (arrays or ``jax.ShapeDtypeStruct``s).
        cfg: the LoRA config.
        key: a PRNG key.
        layout: kernel layouts from :func:`jlora.layout`; required for kernels of more than 2 dims.

    Returns:
        The adapter tree: at each targeted path ``{"a": (..., in, r), "b": (..., r, out)}`` (plus ``"m"``, the
        column norms of the kernel, with ``use_dora``); at each path that ``cfg.saves`` a copy of the parameter.

    Raises:
        ValueError: for ``init="pissa"``/``"olora"``, which change the base: use :func:`jlora.init_with_base`.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> params = {"q_proj": {"kernel": jnp.ones((4096, 4096)), "bias": jnp.zeros(4096)}}
        >>> adapters = init(params, LoraConfig(rank=16, targets="q_proj"), key=jax.random.key(0))
        >>> jax.tree.map(jnp.shape, adapters)
        {'q_proj': {'kernel': {'a': (4096, 16), 'b': (16, 4096)}}}
        >>> count(adapters)
        131072
    """
    if cfg.init in ("pissa", "olora"):
        raise ValueError(f"init={cfg.init!r} changes the base weights as well as creating adapters; use "
                         f"`adapters, params = jlora.init_with_base(params, cfg, key=key)` and train on the "
                         f"returned params")
    return _init(params, cfg, key=key, layout=layout)


def _init(params: Mapping, cfg: LoraConfig, *, key: jax.Array, layout=None, factors=None) -> dict:
    """:func:`init`; ``factors(w, r, scale) -> (a, b)`` computes A and B from the kernel (PiSSA, OLoRA)."""
    flat = tree_lib.flatten(params)
    dtype = jnp.dtype(cfg.dtype)
    out = {}
    for path in target_paths(params, cfg):
        shape = tuple(flat[path].shape)
        if layout is not None and path not in layout:
            raise ValueError(f"parameter {path!r} is targeted but the traced layout has no entry for it: no layer "
                             f"jlora handles (Dense, DenseGeneral, Embed, Einsum) uses it. Exclude it from the "
                             f"targets.{_kind_hint(layout, path)}")
        lay = _layout_for(path, shape, layout)
        lead, fan_in, fan_out = lay.split(shape)
        r = cfg.rank_for(path)
        if r > min(fan_in, fan_out):
            raise ValueError(f"rank {r} at {path!r} exceeds the kernel's smaller side: shape {shape} is "
                             f"{fan_in} in x {fan_out} out; use a rank <= {min(fan_in, fan_out)} (rank_pattern "
                             f"can set it per path)")
        ka, kb = jax.random.split(_path_key(key, path))
        a_shape, b_shape = (*lead, fan_in, r), (*lead, r, fan_out)
        if factors is not None:
            if lay.kind != "Dense" or len(shape) != lay.lead + 2:
                raise ValueError(f"init={cfg.init!r} supports nn.Dense kernels only (as PEFT: Linear layers); "
                                 f"{path!r} is used by a {lay.kind} layer. Exclude it from the targets.")
            a, b = factors(dense_value(flat[path]), r, cfg.scale(path))
            a, b = a.astype(dtype), b.astype(dtype)
        elif lay.kind == "Embed":
            a = jnp.zeros(a_shape, dtype)
            b = jax.random.normal(kb, b_shape, dtype)
        elif cfg.init == "gaussian":
            a = jax.random.normal(ka, a_shape, dtype) / r
            b = jnp.zeros(b_shape, dtype)
        else:
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(ka, a_shape, dtype, -bound, bound)
            b = jnp.zeros(b_shape, dtype)
        out[path] = {"a": a, "b": b}
        if cfg.use_dora:
            if lay.kind != "Dense" or len(shape) != lay.lead + 2:
                raise ValueError(f"use_dora supports nn.Dense kernels only (PEFT's Linear); {path!r} is used by a "
                                 f"{lay.kind} layer. Exclude it from the targets or train it without DoRA.")
            norm = dora_lib.column_norm(dense_value(flat[path]), a, b, cfg.scale(path))
            out[path][dora_lib.MAGNITUDE] = norm.astype(dtype)
    for path, leaf in flat.items():
        if not cfg.saves(path):
            continue
        if path in out or cfg.matches(path):
            raise ValueError(f"{path!r} is both a LoRA target and selected by bias={cfg.bias!r}/modules_to_save="
                             f"{list(cfg.modules_to_save)}; a parameter either gets an adapter or trains in full. "
                             f"Exclude it from one of them.")
        if quant_lib.is_quantized(leaf):
            raise ValueError(f"{path!r} is quantized and cannot train in full (modules_to_save); quantize with "
                             f"`exclude` covering it")
        out[path] = jnp.array(leaf, dtype=dtype if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf.dtype)
    return tree_lib.unflatten(out)


def dense_value(w) -> jax.Array:
    """A parameter leaf as an fp32 array (dequantizing a quantized kernel)."""
    return quant_lib.dequantize(w, jnp.float32) if quant_lib.is_quantized(w) else jnp.asarray(w, jnp.float32)


def _kind_hint(layout, path) -> str:
    kinds = getattr(layout, "unsupported", {})
    if path in kinds:
        return f" ({path!r} belongs to a {kinds[path]} layer, which the LoRA transform does not handle.)"
    return ""


def check_fits(params: Mapping, adapters: Mapping, layout: Mapping[str, KernelLayout] | None = None) -> None:
    """Raises if ``adapters`` do not fit ``params``, naming the first mismatching path and both shapes."""
    flat_params = tree_lib.flatten(params)
    for path, leaf in full_items(adapters):
        shape = tuple(np.shape(flat_params[path])) if path in flat_params else None
        if shape != tuple(np.shape(leaf)):
            raise ValueError(f"the fully trained tensor at {path!r} has shape {tuple(np.shape(leaf))} but the "
                             f"parameter there {'does not exist' if shape is None else f'has shape {shape}'}; "
                             f"the adapters were made for a different model")
    for path, pair in _adapter_items(adapters):
        if path not in flat_params:
            near = [p for p in flat_params if p.rsplit("/", 1)[-1] in ("kernel", "embedding")][:10]
            raise ValueError(f"adapter at {path!r} has no parameter at that path; the adapters were made for a "
                             f"different model. Kernel paths here look like: {near}")
        shape = tuple(flat_params[path].shape)
        lay = _layout_for(path, shape, layout, pair)
        lead, fan_in, fan_out = lay.split(shape)
        a, b = np.shape(pair["a"]), np.shape(pair["b"])
        r = a[-1]
        if a != (*lead, fan_in, r) or b != (*lead, r, fan_out):
            raise ValueError(f"adapter at {path!r} does not fit the parameter: kernel {shape} needs a "
                             f"{(*lead, fan_in, 'r')} and b {(*lead, 'r', fan_out)}; got a {a} and b {b}")
        m = pair.get(dora_lib.MAGNITUDE)
        if m is not None and np.shape(m) != (*lead, fan_out):
            raise ValueError(f"DoRA magnitude at {path!r} has shape {np.shape(m)}; the kernel {shape} needs "
                             f"{(*lead, fan_out)}")


def full_items(adapters: Mapping):
    """Yields ``(param_path, array)`` for every whole tensor in the tree (``bias``/``modules_to_save`` leaves)."""
    def visit(node, prefix):
        if isinstance(node, Mapping) and "a" in node and "b" in node and not isinstance(node["a"], Mapping):
            return
        if isinstance(node, Mapping):
            for k, v in node.items():
                yield from visit(v, f"{prefix}/{k}" if prefix else str(k))
        elif node is not None:
            yield prefix, node
    yield from visit(adapters, "")


def overlay(params: Mapping, adapters: Mapping) -> Mapping:
    """``params`` with the whole tensors of ``adapters`` in place of the frozen ones (a new tree, no copies)."""
    full = dict(full_items(adapters))
    if not full:
        return params
    flat = tree_lib.flatten(params)
    missing = sorted(set(full) - set(flat))
    if missing:
        raise ValueError(f"the adapter tree holds whole tensors at {missing[:5]} but the params have no such "
                         f"paths; the adapters were made for a different model")
    flat.update(full)
    return tree_lib.unflatten(flat)


def _adapter_items(adapters: Mapping):
    """Yields ``(param_path, {"a", "b", ...})`` for every adapter in the tree."""
    def visit(node, prefix):
        if isinstance(node, Mapping) and "a" in node and "b" in node and not isinstance(node["a"], Mapping):
            yield prefix, node
        elif isinstance(node, Mapping):
            for k, v in node.items():
                yield from visit(v, f"{prefix}/{k}" if prefix else str(k))
    yield from visit(adapters, "")


def delta(pair: Mapping, scale: float, shape: tuple[int, ...], lay: KernelLayout, dtype=None) -> jax.Array:
    """The full-size update ``scale * A @ B`` reshaped to a kernel of ``shape`` (used only for merging)."""
    a, b = pair["a"], pair["b"]
    dtype = dtype or jnp.result_type(a)
    full = scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))  # (*lead, in, out)
    per_layer = shape[lay.lead:]
    in_dims = [per_layer[i] for i in lay.in_axes]
    out_dims = [per_layer[i] for i in lay.out_axes]
    full = full.reshape(*shape[:lay.lead], *in_dims, *out_dims)
    order = list(lay.in_axes) + list(lay.out_axes)          # kernel axis held at each position of `full`
    perm = [lay.lead + order.index(k) for k in range(len(per_layer))]
    return jnp.transpose(full, (*range(lay.lead), *perm)).astype(dtype)


def _merge(params, adapters, cfg, layout, sign):
    check_fits(params, adapters, layout)
    if sign < 0 and (next(full_items(adapters), None) is not None or any(
            dora_lib.MAGNITUDE in pair for _, pair in _adapter_items(adapters))):
        raise ValueError("unmerge cannot invert a merge of DoRA magnitudes or of whole trained tensors (bias, "
                         "modules_to_save): the original values are not in the adapters. Keep the original params.")
    flat = tree_lib.flatten(overlay(params, adapters) if sign > 0 else params)
    for path, pair in _adapter_items(adapters):
        w = flat[path]
        lay = _layout_for(path, tuple(w.shape), layout, pair)
        if dora_lib.MAGNITUDE in pair:
            new = dora_lib.merged_kernel(dense_value(w), pair, cfg.scale(path))
        else:
            update = delta(pair, cfg.scale(path), tuple(w.shape), lay, dtype=jnp.float32)
            new = dense_value(w) + sign * update
        flat[path] = quant_lib.requantize_like(w, new) if quant_lib.is_quantized(w) else new.astype(w.dtype)
    return tree_lib.unflatten(flat)


def merge(params: Mapping, adapters: Mapping, cfg: LoraConfig,
          layout: Mapping[str, KernelLayout] | None = None) -> dict:
    """Returns params with every adapter folded in: ``W + scale * A @ B`` (computed in fp32, cast back).

    DoRA adapters give ``m * (W + s A B) / ||W + s A B||``; whole trained tensors replace their parameters; a
    quantized kernel is dequantized, merged and re-quantized (see :func:`jlora.variants.quant.error` for the error).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> params = {"dense": {"kernel": jnp.zeros((2, 3))}}
        >>> adapters = {"dense": {"kernel": {"a": jnp.ones((2, 1)), "b": jnp.ones((1, 3))}}}
        >>> merge(params, adapters, LoraConfig(rank=1, alpha=2.0, targets="dense"))["dense"]["kernel"]
        Array([[2., 2., 2.],
               [2., 2., 2.]], dtype=float32)
    """
    return _merge(params, adapters, cfg, layout, 1.0)


def unmerge(merged: Mapping, adapters: Mapping, cfg: LoraConfig,
            layout: Mapping[str, KernelLayout] | None = None) -> dict:
    """Inverts :func:`merge` (up to rounding): ``W - scale * A @ B``."""
    return _merge(merged, adapters, cfg, layout, -1.0)


def count(adapters: Any) -> int:
    """The number of trainable values in ``adapters`` (or any pytree)."""
    return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(adapters)))


def summary(params: Mapping, adapters: Mapping, *, ranks: tuple[int, ...] | None = None) -> str:
    """A table of adapters per target and totals; with ``ranks``, a rank ladder of trainable values per rank.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> params = {"q_proj": {"kernel": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)}}
        >>> adapters = init(params, LoraConfig(rank=16, targets="q_proj"), key=jax.random.key(0))
        >>> print(summary(params, adapters))  # doctest: +NORMALIZE_WHITESPACE
        path            kernel shape   rank   trainable   % of update
        q_proj/kernel   (4096, 4096)   16     131,072     0.78%
        total: 131,072 trainable values = 0.78% of 16,777,216 parameters (1 adapted kernels)
    """
    flat = tree_lib.flatten(params)
    rows = [("path", "kernel shape", "rank", "trainable", "% of update")]
    entries = []
    for path, pair in _adapter_items(adapters):
        shape = tuple(flat[path].shape)
        a, b = np.shape(pair["a"]), np.shape(pair["b"])
        layers, fan_in, fan_out = math.prod(a[:-2]), a[-2], b[-1]
        n = count(pair)
        entries.append((layers, fan_in, fan_out))
        rows.append((path, str(shape), str(a[-1]), f"{n:,}", f"{100 * n / math.prod(shape):.2f}%"))
    for path, leaf in full_items(adapters):
        rows.append((path, str(tuple(np.shape(leaf))), "full", f"{count(leaf):,}", "100.00%"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    total, n_params = count(adapters), sum(math.prod(getattr(x, "shape", np.shape(x))) for x in flat.values())
    lines.append(f"total: {total:,} trainable values = {100 * total / n_params:.2f}% of {n_params:,} parameters "
                 f"({len(entries)} adapted kernels)")
    if ranks:
        lines.append("")
        lines.append("rank ladder (same targets)")
        lines.append("rank   trainable        % of parameters")
        for r in ranks:
            n = sum(layers * r * (fi + fo) for layers, fi, fo in entries)
            lines.append(f"{r:<6} {n:<16,} {100 * n / n_params:.3f}%")
    return "\n".join(lines)
