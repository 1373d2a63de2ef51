"""QLoRA's 4-bit NormalFloat (NF4) frozen kernels, with optional double quantization.

:func:`quantize` replaces frozen ``nn.Dense`` kernels with :class:`NF4` values: the kernel is split into blocks of
64 consecutive values (row-major per layer, zero-padded at the end), each block is divided by its absolute
maximum (kept in fp32), and every value is rounded to the nearest of the 16 NF4 code values of the QLoRA paper
(Dettmers et al. 2023, bitsandbytes' ``NF4`` table); two 4-bit codes are packed per byte, the first in the high
nibble (as bitsandbytes). That is 4.5 bits per value.

Double quantization (``double_quant=True``) also quantizes the fp32 block maxima as bitsandbytes'
``compress_statistics`` does: subtract their mean, then quantize them to 8 bits with bitsandbytes' signed
dynamic map (:func:`dynamic_map`) in blocks of 256, each with an fp32 absmax. That is about 4.13 bits per value.

:class:`NF4` is a pytree (its arrays are leaves, the per-layer shape and dtype are static), so it travels through
``jit``, ``nn.scan`` (a scanned stack keeps its layer axis leading on every array) and checkpoints like any
param. A plain ``nn.Dense`` would reject its shapes, so the LoRA transform (:func:`jlora.apply`) computes every
Dense layer whose kernel is quantized itself, with :func:`dense_call`: the kernel is dequantized inside the layer,
so no full-precision copy of it lives beyond that layer's call. :func:`jlora.merge` into a quantized base
re-quantizes the merged kernel; :func:`error` reports the error that quantizing (or re-quantizing) introduced.

Rounding is to the nearest code with ties to the lower one (midpoint thresholds, as bitsandbytes' NF4 decision
tree), and a block of zeros has absmax 0 and codes for 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import tree as tree_lib
from jlora.adapter import KernelType, layer_input, register_kernel_type

BLOCK = 64
DQ_BLOCK = 256

#: The 16 NF4 code values (QLoRA paper, appendix E; bitsandbytes ``functional.py``).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' dynamic 8-bit quantization map (``create_dynamic_map``), sorted ascending, fp32.

    The values follow bitsandbytes' formula evaluated in float64 and rounded once to fp32, so they do not depend
    on the machine (bitsandbytes evaluates ``torch.linspace`` in fp32, whose last bit depends on the CPU's vector
    width; 22 of its 256 values differ from these by one fp32 ulp).

    Examples:
        >>> m = dynamic_map()
        >>> m.shape, round(float(m[0]), 6), float(m[-1]), int((m == 0).sum())
        ((256,), -0.992969, 1.0, 1)
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1)) + 1
        bounds = np.linspace(0.1, 1, items, dtype=np.float64)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10.0 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10.0 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        bounds = np.linspace(0.1, 1, additional_items + 1, dtype=np.float64)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10.0 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10.0 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return np.sort(np.array(data, np.float64)).astype(np.float32)


DYNAMIC_MAP = dynamic_map()
_NF4_MID = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)
_DYN_MID = ((DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:]) / np.float32(2)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class NF4:
    """A kernel quantized to NF4. Leading (layer-stack) axes lead every array; the per-layer shape is static.

    Attributes:
        codes: uint8 ``(*lead, nblocks * 32)``: two 4-bit NF4 indices per byte, first value in the high nibble.
        absmax: the absmax of each 64-value block: fp32 ``(*lead, nblocks)``, or with double quantization uint8
            indices into :data:`DYNAMIC_MAP`.
        absmax_scale: with double quantization, fp32 ``(*lead, ceil(nblocks / 256))``; else None.
        absmax_offset: with double quantization, fp32 ``(*lead,)``, the mean subtracted from the absmax; else None.
        layer_shape: the shape of one layer's kernel.
        dtype: the dtype name of the original kernel (what :func:`dequantize` returns by default).
    """

    codes: jax.Array
    absmax: jax.Array
    absmax_scale: jax.Array | None
    absmax_offset: jax.Array | None
    layer_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.codes.shape[:-1], *self.layer_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def nbytes(self) -> int:
        return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))


jax.tree_util.register_dataclass(NF4, data_fields=["codes", "absmax", "absmax_scale", "absmax_offset"],
                                 meta_fields=["layer_shape", "dtype"])


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a quantized kernel."""
    return isinstance(x, NF4)


def _nearest(values: jax.Array, mid: np.ndarray) -> jax.Array:
    """Index of the nearest code, given the midpoints between sorted codes (ties go to the lower code)."""
    return jnp.searchsorted(jnp.asarray(mid), values, side="left").astype(jnp.uint8)


def _blockwise(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Pads the last axis to a multiple of ``block``; returns ``(blocks (..., n, block), absmax (..., n))``."""
    pad = -x.shape[-1] % block
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    return blocks, jnp.max(jnp.abs(blocks), axis=-1)


def _normalize(blocks: jax.Array, absmax: jax.Array) -> jax.Array:
    safe = jnp.where(absmax > 0, absmax, jnp.ones_like(absmax))[..., None]
    return jnp.where(absmax[..., None] > 0, blocks / safe, jnp.zeros_like(blocks))


def quantize_array(w: jax.Array, *, lead: int | None = None, double_quant: bool = False) -> NF4:
    """Quantizes one kernel to :class:`NF4`; ``lead`` leading axes (default ``ndim - 2``) are a layer stack.

    Examples:
        >>> import jax.numpy as jnp
        >>> q = quantize_array(jnp.linspace(-1.0, 1.0, 128).reshape(2, 64))
        >>> q.shape, q.codes.shape, q.codes.dtype, q.absmax.shape
        ((2, 64), (64,), dtype('uint8'), (2,))
        >>> float(jnp.max(jnp.abs(dequantize(q) - jnp.linspace(-1.0, 1.0, 128).reshape(2, 64)))) < 0.16
        True
    """
    lead = max(w.ndim - 2, 0) if lead is None else lead
    lead_shape, layer_shape = tuple(w.shape[:lead]), tuple(w.shape[lead:])
    x = jnp.asarray(w).astype(jnp.float32).reshape(*lead_shape, math.prod(layer_shape))
    blocks, absmax = _blockwise(x, BLOCK)
    idx = _nearest(_normalize(blocks, absmax), _NF4_MID)
    idx = idx.reshape(*lead_shape, -1)
    codes = (idx[..., 0::2] << 4) | idx[..., 1::2]
    scale = offset = None
    if double_quant:
        offset = jnp.mean(absmax, axis=-1)
        centered = absmax - offset[..., None]
        blocks2, scale = _blockwise(centered, DQ_BLOCK)
        qa = _nearest(_normalize(blocks2, scale), _DYN_MID).reshape(*lead_shape, -1)
        absmax = qa[..., :absmax.shape[-1]]
    return NF4(codes, absmax, scale, offset, layer_shape, jnp.dtype(w.dtype).name)


def block_absmax(q: NF4, one: jax.Array | None = None) -> jax.Array:
    """The fp32 absmax of every 64-value block (decoding the double quantization if present)."""
    if not q.double_quant:
        return q.absmax
    nb = q.absmax.shape[-1]
    pad = -nb % DQ_BLOCK
    qa = jnp.pad(q.absmax, [(0, 0)] * (q.absmax.ndim - 1) + [(0, pad)])
    table = jnp.asarray(DYNAMIC_MAP) if one is None else jnp.asarray(DYNAMIC_MAP) * one
    vals = jnp.take(table, qa.astype(jnp.int32), axis=0)
    vals = vals.reshape(*qa.shape[:-1], -1, DQ_BLOCK) * q.absmax_scale[..., None]
    return vals.reshape(*qa.shape[:-1], -1)[..., :nb] + q.absmax_offset[..., None]


def dequantize(q: NF4, dtype=None, *, after: jax.Array | None = None) -> jax.Array:
    """The kernel that ``q`` stands for, in ``dtype`` (default: the original kernel's dtype).

    With ``after``, every step of the decoding depends on that array (through an exact 0 and 1 computed from
    one of its values, read as 0 when not finite, so that one bad input row cannot spoil the kernel). Inside a layer, pass the layer's input: otherwise each layer's decoding depends on
    params only, and XLA may hoist all of them to the start of the program and hold every full-precision
    kernel at once (XLA's CPU backend strips ``lax.optimization_barrier`` before scheduling, so a data
    dependency is the portable way to order it).
    """
    lead = q.codes.shape[:-1]
    codes, table, one = q.codes, jnp.asarray(NF4_CODE), None
    if after is not None:
        first = jnp.ravel(after)[:1].astype(jnp.float32)      # empty for an empty batch: the sum is 0
        zero = jnp.sum(jnp.where(jnp.isfinite(first), first, 0.0)) * 0.0   # exact 0 even if the value is inf/NaN
        one = zero + 1.0
        codes, table = codes + zero.astype(jnp.uint8), table * one
    hi, lo = codes >> 4, codes & 15
    idx = jnp.stack([hi, lo], axis=-1).reshape(*lead, -1, BLOCK).astype(jnp.int32)
    vals = jnp.take(table, idx, axis=0) * block_absmax(q, one)[..., None]
    n = math.prod(q.layer_shape)
    return vals.reshape(*lead, -1)[..., :n].reshape(q.shape).astype(dtype or q.dtype)


def quantize(params: Mapping, *, targets: str | Sequence[str] = ("kernel$",),
             exclude: str | Sequence[str] = ("lm_head",), double_quant: bool = False,
             layout: Mapping | None = None) -> dict:
    """Returns ``params`` with the frozen ``nn.Dense`` kernels that ``targets`` select stored as :class:`NF4`.

    Args:
        params: the parameter tree (not modified).
        targets: regexes searched in "/"-joined paths; only ``kernel`` leaves are quantized.
        exclude: regexes of paths to keep in full precision (default: the output head, as bitsandbytes does).
        double_quant: also quantize the block maxima (QLoRA's double quantization).
        layout: optional :func:`jlora.layout`; with it only kernels of ``nn.Dense`` layers are quantized and
            their layer-stack axes are known (without it, a kernel of ndim > 2 is taken as a stack of 2-D ones).

    Returns:
        A new parameter tree; use it with :func:`jlora.apply` (plain ``model.apply`` cannot run NF4 kernels).

    Examples:
        >>> import jax.numpy as jnp
        >>> params = {"q_proj": {"kernel": jnp.ones((64, 64)), "bias": jnp.zeros(64)}}
        >>> q = quantize(params)
        >>> type(q["q_proj"]["kernel"]).__name__, q["q_proj"]["kernel"].nbytes
        ('NF4', 2304)
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    flat = tree_lib.flatten(params)
    out, chosen = dict(flat), []
    for path, w in flat.items():
        if not path.endswith("kernel") or is_quantized(w) or not any(re.search(t, path) for t in targets):
            continue
        if any(re.search(e, path) for e in exclude):
            continue
        lead = None
        if layout is not None:
            lay = layout.get(path)
            if lay is None or lay.kind != "Dense":
                continue
            lead = lay.lead
        out[path] = _quantize_jit(w, lead, double_quant)
        chosen.append(path)
    if not chosen:
        kernels = [p for p in flat if p.endswith("kernel")][:10]
        raise ValueError(f"quantize: targets={list(targets)} (exclude={list(exclude)}) selected no kernel; kernel "
                         f"paths look like {kernels}")
    return tree_lib.unflatten(out)


_quantize_jit = jax.jit(lambda w, lead, dq: quantize_array(w, lead=lead, double_quant=dq), static_argnums=(1, 2))


def dequantize_params(params: Mapping, dtype=None) -> dict:
    """``params`` with every :class:`NF4` kernel dequantized (e.g. before :func:`jlora.hf.save`)."""
    return tree_lib.unflatten({p: dequantize(v, dtype) if is_quantized(v) else v
                               for p, v in tree_lib.flatten(params).items()})


def requantize_like(q: NF4, w: jax.Array) -> NF4:
    """Quantizes ``w`` with the same settings (stack axes, double quantization, dtype) as ``q``."""
    out = quantize_array(w.astype(q.dtype), lead=len(q.codes.shape[:-1]), double_quant=q.double_quant)
    return out


def error(reference: Mapping, quantized: Mapping) -> dict[str, dict[str, float]]:
    """The error of every quantized kernel of ``quantized`` against the same path in ``reference``.

    Use it for the quantization itself (``error(params, quantize(params))``) and for a merge into a quantized
    base (``error(merge(dequantize_params(q), adapters, cfg), merge(q, adapters, cfg))``: the error that
    re-quantizing the merged kernel introduced).

    Returns:
        ``{path: {"max_abs": ..., "rms": ..., "rel_fro": ...}}`` (``rel_fro`` = ||W - Q|| / ||W||), plus
        ``"total"`` with the worst ``max_abs`` and the overall ``rel_fro``.
    """
    ref, quant = tree_lib.flatten(reference), tree_lib.flatten(quantized)
    out: dict[str, dict[str, float]] = {}
    num = den = 0.0
    worst = 0.0
    for path, q in quant.items():
        if not is_quantized(q):
            continue
        if path not in ref:
            raise ValueError(f"error: {path!r} is quantized but `reference` has no parameter there")
        w = jnp.asarray(ref[path]).astype(jnp.float32) if not is_quantized(ref[path]) else dequantize(
            ref[path], jnp.float32)
        d = dequantize(q, jnp.float32) - w
        sq, wsq = float(jnp.sum(d * d)), float(jnp.sum(w * w))
        out[path] = {"max_abs": float(jnp.max(jnp.abs(d))), "rms": math.sqrt(sq / max(d.size, 1)),
                     "rel_fro": math.sqrt(sq / wsq) if wsq else 0.0}
        num, den, worst = num + sq, den + wsq, max(worst, out[path]["max_abs"])
    out["total"] = {"max_abs": worst, "rel_fro": math.sqrt(num / den) if den else 0.0}
    return out


_DENSE_ONLY = ("the kernel at {path!r} is quantized (NF4) but belongs to a {kind} layer; jlora computes quantized "
               "kernels in nn.Dense layers only. Quantize with `layout=jlora.layout(model, *example_args)` (which "
               "skips other layers) or exclude this path.")


def dense_call(module, path: str, args, kwargs) -> jax.Array:
    """``nn.Dense.__call__`` for a module whose kernel is :class:`NF4`: dequantizes inside the layer."""
    import flax.linen as nn

    if type(module) is not nn.Dense:
        raise ValueError(_DENSE_ONLY.format(path=path, kind=type(module).__name__))
    if module.dot_general is not None or module.dot_general_cls is not None:
        raise ValueError(f"nn.Dense at {path!r} has a custom dot_general; quantized kernels support the default")
    x = layer_input(args, kwargs)
    q = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    dtype = module.dtype or jnp.result_type(x.dtype, jnp.dtype(q.dtype), *([] if bias is None else [bias.dtype]))
    y = _qmatmul(x.astype(dtype), q, module.precision)
    if bias is not None:
        y = y + jnp.reshape(bias.astype(dtype), (1,) * (y.ndim - 1) + (-1,))
    return y


def _matmul(x, kernel, precision):
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _qmatmul(x: jax.Array, q: NF4, precision) -> jax.Array:
    """``x @ dequantize(q)``; the backward pass decodes the kernel again instead of saving it."""
    return _matmul(x, dequantize(q, x.dtype, after=x), precision)


def _qmatmul_fwd(x, q, precision):
    return _qmatmul(x, q, precision), q


def _qmatmul_bwd(precision, q, g):
    kernel = dequantize(q, g.dtype, after=g)
    dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())), precision=precision)
    zeros = jax.tree.map(lambda v: np.zeros(v.shape, jax.dtypes.float0) if not jnp.issubdtype(v.dtype, jnp.floating)
                         else jnp.zeros_like(v), q)
    return dx, zeros


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)

register_kernel_type(KernelType(NF4, dense_value=lambda q: dequantize(q, jnp.float32), rebuild=requantize_like,
                                layer_call=dense_call))


__all__ = ["NF4", "NF4_CODE", "DYNAMIC_MAP", "quantize", "quantize_array", "dequantize", "dequantize_params",
           "requantize_like", "error", "is_quantized", "dynamic_map"]
