"""The LoRA transform: run a Flax Linen model with unmerged low-rank adapters.

:func:`apply` runs ``model.apply`` with the adapters in a separate variable collection, ``"lora"``, that
mirrors the params, and intercepts the calls of the layers it knows (``nn.Dense``, ``nn.DenseGeneral``,
``nn.Embed`` incl. ``Embed.attend`` and ``nn.Einsum``) with Flax's ``nn.intercept_methods``. A layer whose
scope holds an adapter computes its usual output plus the low-rank path ``scale * (dropout(x) @ A) @ B``, so
the full-size update ``A @ B`` is never formed and the backward pass never builds a full-size weight gradient.

Because adapters are a collection, ``nn.scan`` slices them per layer like the params, provided the scan lists
``"lora"`` in ``variable_axes`` (jlora's own models do). The interceptor records which adapters it used: an
adapter that no intercepted call used (a typo'd tree, or a layer kind the transform does not handle) is an
error rather than a silent no-op.

Variants hook in at two places: whole trained tensors (``bias``, ``modules_to_save``) replace their frozen
params before the call (:func:`jlora.lora.overlay`), and inside the interceptor a Dense layer with a quantized
kernel is computed by :func:`jlora.variants.quant.dense_call` and a DoRA adapter (a pair with ``"m"``) by
:func:`jlora.variants.dora.dense_output`.

:func:`layout` traces a model once (``jax.eval_shape``, no compute) to learn which kernel axes are inputs and
outputs, for kernels of more than 2 dims.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.variants import dora as dora_lib
from jlora import lora as lora_lib
from jlora.variants import quant as quant_lib
from jlora import tree as tree_lib
from jlora.config import LoraConfig

COLLECTION = "lora"
DROPOUT_RNG = "lora_dropout"
_SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Embed, nn.Einsum)
_METHODS = ("__call__", "attend")
_state = threading.local()


def _leaf_name(module: nn.Module) -> str:
    return "embedding" if isinstance(module, nn.Embed) else "kernel"


def _normalize_axes(axes, ndim: int) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(a % ndim for a in axes)


def _einsum_parts(module: nn.Einsum, kwargs: Mapping) -> tuple[str, str, str]:
    spec = kwargs.get("einsum_str") or module.einsum_str
    spec = spec.replace(" ", "")
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    return lhs, rhs, out


def _einsum_axes(module: nn.Einsum, kwargs: Mapping) -> tuple[tuple[int, ...], tuple[int, ...]]:
    lhs, rhs, out = _einsum_parts(module, kwargs)
    shared = [c for c in rhs if c in lhs and c in out]
    if shared or "." in rhs:
        raise ValueError(f"nn.Einsum at {'/'.join(module.path)!r} with einsum_str {lhs},{rhs}->{out}: kernel "
                         f"axes {shared or '...'} are batch axes shared by input and output, which LoRA does "
                         f"not support; exclude this layer from the targets")
    in_axes = tuple(i for i, c in enumerate(rhs) if c in lhs)
    out_axes = tuple(i for i, c in enumerate(rhs) if c not in lhs)
    return in_axes, out_axes


def _axes(module: nn.Module, args, kwargs) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (in_axes, out_axes) of the per-layer kernel for a call of ``module``."""
    if isinstance(module, nn.DenseGeneral):
        if module.batch_dims:
            raise ValueError(f"nn.DenseGeneral at {'/'.join(module.path)!r} has batch_dims={module.batch_dims}; "
                             f"LoRA supports DenseGeneral without batch_dims only")
        n_in = len(_normalize_axes(module.axis, 1 if isinstance(module.axis, int) else len(module.axis)))
        n_out = 1 if isinstance(module.features, int) else len(module.features)
        return tuple(range(n_in)), tuple(range(n_in, n_in + n_out))
    if isinstance(module, nn.Einsum):
        return _einsum_axes(module, kwargs)
    return (0,), (1,)


def _low_rank(module: nn.Module, method: str, args, kwargs, pair, scale: float, y: jax.Array,
              path: str) -> jax.Array:
    """``scale * (dropout(x) @ A) @ B`` laid out like the layer's output ``y``."""
    dtype = getattr(module, "dtype", None) or y.dtype
    a, b = pair["a"].astype(dtype), pair["b"].astype(dtype)
    x = args[0] if args else next(iter(kwargs.values()))
    if isinstance(module, nn.Embed):
        if method == "attend":        # x @ E^T + s (x @ B^T) @ A^T
            h = jnp.matmul(x.astype(dtype), b.T)
            return (scale * jnp.matmul(h, a.T)).astype(y.dtype)
        return (scale * jnp.matmul(jnp.take(a, x, axis=0), b)).astype(y.dtype)
    x = _maybe_dropout(module, x).astype(dtype)
    if isinstance(module, nn.Dense):
        return _low_rank_matmul(x, a, (b * scale).astype(dtype)).astype(y.dtype)
    kernel_shape = module.get_variable("params", "kernel").shape
    in_axes, out_axes = _axes(module, args, kwargs)
    in_dims = [kernel_shape[i] for i in in_axes]
    out_dims = [kernel_shape[i] for i in out_axes]
    if isinstance(module, nn.DenseGeneral):
        contract = _normalize_axes(module.axis, x.ndim)
        keep = [i for i in range(x.ndim) if i not in contract]
        xm = jnp.transpose(x, (*keep, *contract)).reshape(*[x.shape[i] for i in keep], math.prod(in_dims))
        return (scale * jnp.matmul(jnp.matmul(xm, a), b)).reshape(y.shape).astype(y.dtype)
    # nn.Einsum: contract the input with A (in dims, r), then expand with B (r, out dims) into the output spec.
    lhs, rhs, out = _einsum_parts(module, kwargs)
    z = next(c for c in "zyxwvutsrqponmlkjihgfedcbaZYXWVUTSRQPONMLKJIHGFEDCBA" if c not in lhs + rhs + out)
    in_letters = "".join(rhs[i] for i in in_axes)
    out_letters = "".join(rhs[i] for i in out_axes)
    mid = ("..." if "..." in lhs else "") + "".join(c for c in lhs.replace("...", "") if c in out)
    h = jnp.einsum(f"{lhs},{in_letters}{z}->{mid}{z}", x, a.reshape(*in_dims, a.shape[-1]))
    d = jnp.einsum(f"{mid}{z},{z}{out_letters}->{out}", h, b.reshape(b.shape[0], *out_dims))
    return (scale * d).astype(y.dtype)


@jax.custom_vjp
def _low_rank_matmul(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """``(x @ a) @ b`` whose backward pass keeps the large operands in place.

    The default transpose rule computes the factor gradients as ``x^T @ g`` and ``g^T @ h``: contracting the token
    axis of a large operand on the left, which XLA:CPU lays out by materializing ``x^T`` or ``g^T`` (fused into
    whatever produced ``g``, as strided writes). Here the large operand is always the right-hand side, contracted
    over its major (token) axis, and only the small ``(tokens, r)`` factors get transposed; on the SmolLM2 shape
    with all linear layers targeted this removes most of the LoRA path's overhead.
    """
    return jnp.matmul(jnp.matmul(x, a), b)


def _low_rank_fwd(x, a, b):
    h = jnp.matmul(x, a)
    return jnp.matmul(h, b), (x, a, b, h)


def _low_rank_bwd(res, g):
    x, a, b, h = res
    contract_tokens = (((0,), (0,)), ((), ()))
    x2, g2, h2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), h.reshape(-1, h.shape[-1])
    gb = jax.lax.dot_general(h2, g2, contract_tokens)                  # (r, out)
    gh = jnp.matmul(g, b.T)                                            # (..., r)
    ga = jax.lax.dot_general(gh.reshape(-1, gh.shape[-1]), x2, contract_tokens).T   # (r, in) -> (in, r)
    return jnp.matmul(gh, a.T), ga.astype(a.dtype), gb.astype(b.dtype)


_low_rank_matmul.defvjp(_low_rank_fwd, _low_rank_bwd)


def _maybe_dropout(module: nn.Module, x: jax.Array) -> jax.Array:
    rate = _state.ctx.cfg.dropout
    if rate == 0.0 or not module.has_rng(DROPOUT_RNG):
        return x
    keep = jax.random.bernoulli(module.make_rng(DROPOUT_RNG), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class _Context:
    def __init__(self, cfg: LoraConfig):
        self.cfg = cfg
        self.used: set[str] = set()
        self.kinds: dict[str, str] = {}   # module path -> class name, for error messages


def _interceptor(next_fun, args, kwargs, context):
    module, method = context.module, context.method_name
    ctx = _state.ctx
    if method not in _METHODS:
        return next_fun(*args, **kwargs)
    mpath = "/".join(module.path)
    ctx.kinds.setdefault(mpath, type(module).__name__)
    if not isinstance(module, _SUPPORTED):
        return next_fun(*args, **kwargs)
    leaf = _leaf_name(module)
    path = f"{mpath}/{leaf}" if mpath else leaf
    kernel = module.get_variable("params", leaf) if module.has_variable("params", leaf) else None
    if quant_lib.is_quantized(kernel):
        next_fun = lambda *a, **kw: quant_lib.dense_call(module, path, a, kw)  # noqa: E731
    pair = module.get_variable(COLLECTION, leaf) if module.has_variable(COLLECTION, leaf) else None
    if not isinstance(pair, Mapping):         # no adapter here, or a whole trained tensor (see `overlay`)
        return next_fun(*args, **kwargs)
    _check_pair(module, args, kwargs, pair, path)
    y = next_fun(*args, **kwargs)
    ctx.used.add(path)
    if dora_lib.MAGNITUDE in pair:
        return _dora(module, args, kwargs, pair, ctx.cfg.scale(path), y, kernel, path)
    return y + _low_rank(module, method, args, kwargs, pair, ctx.cfg.scale(path), y, path)


def _dora(module, args, kwargs, pair, scale, y, kernel, path):
    if type(module) is not nn.Dense:
        raise ValueError(f"the DoRA adapter at {path!r} is on a {type(module).__name__} layer; DoRA supports "
                         f"nn.Dense layers only")
    x = args[0] if args else next(iter(kwargs.values()))
    rate = _state.ctx.cfg.dropout
    dropout = (lambda v: _maybe_dropout(module, v)) if rate > 0 and module.has_rng(DROPOUT_RNG) else None
    bias = module.get_variable("params", "bias") if module.use_bias else None
    dtype = module.dtype or y.dtype
    return dora_lib.dense_output(x, y, lora_lib.dense_value(kernel), bias, pair, scale, dtype, dropout)


def _check_pair(module, args, kwargs, pair, path):
    kernel = module.get_variable("params", _leaf_name(module))
    if kernel is None:
        return
    in_axes, out_axes = ((0,), (1,)) if isinstance(module, nn.Embed) else _axes(module, args, kwargs)
    fan_in = math.prod(kernel.shape[i] for i in in_axes)
    fan_out = math.prod(kernel.shape[i] for i in out_axes)
    a, b = jnp.shape(pair["a"]), jnp.shape(pair["b"])
    if len(a) != 2 or len(b) != 2 or a[0] != fan_in or b[1] != fan_out or a[1] != b[0]:
        raise ValueError(f"adapter at {path!r} does not fit its layer: the {type(module).__name__} kernel "
                         f"{tuple(kernel.shape)} needs a ({fan_in}, r) and b (r, {fan_out}) per layer; got a {a} "
                         f"and b {b}")


@contextlib.contextmanager
def _intercepting(cfg: LoraConfig):
    prev = getattr(_state, "ctx", None)
    _state.ctx = ctx = _Context(cfg)
    try:
        with nn.intercept_methods(_interceptor):
            yield ctx
    finally:
        _state.ctx = prev


def apply(model: nn.Module, params: Mapping, adapters: Mapping, cfg: LoraConfig, *args,
          rngs: Mapping[str, jax.Array] | None = None, method=None, mutable=False, **kwargs) -> Any:
    """Runs ``model`` with unmerged adapters: equal to ``model.apply({"params": merge(...)}, ...)``.

    Args:
        model: a Flax Linen module.
        params: its frozen params (the ``"params"`` collection, not wrapped in ``{"params": ...}``).
        adapters: the adapter tree from :func:`jlora.init`.
        cfg: the LoRA config the adapters were made with (it gives the scale per path).
        *args: positional arguments of the model call.
        rngs: optional rngs; LoRA dropout is active only when ``cfg.dropout > 0`` and ``"lora_dropout"`` is given.
        method: optional method of ``model`` to call instead of ``__call__``.
        mutable: as in ``flax.linen.Module.apply`` (e.g. ``["cache"]``).
        **kwargs: keyword arguments of the model call.

    Returns:
        What ``model.apply`` returns.

    Examples:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
        >>> model = nn.Dense(8)
        >>> x = jnp.ones((2, 16))
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> cfg = jlora.LoraConfig(rank=4, alpha=8, targets="kernel")
        >>> adapters = jlora.init(params, cfg, key=jax.random.key(1))
        >>> bool(jnp.array_equal(apply(model, params, adapters, cfg, x), model.apply({"params": params}, x)))
        True
    """
    variables = {"params": lora_lib.overlay(params, adapters), COLLECTION: adapters}
    with _intercepting(cfg) as ctx:
        out = model.apply(variables, *args, rngs=rngs, method=method, mutable=mutable, **kwargs)
    _check_all_used(adapters, ctx)
    return out


def _check_all_used(adapters: Mapping, ctx: _Context) -> None:
    for path, _ in lora_lib._adapter_items(adapters):
        if path in ctx.used:
            continue
        mpath = path.rsplit("/", 1)[0] if "/" in path else ""
        kind = ctx.kinds.get(mpath)
        if kind is not None:
            raise ValueError(f"the adapter at {path!r} targets a parameter of a {kind} layer, which the LoRA "
                             f"transform does not handle (it handles Dense, DenseGeneral, Embed, Einsum). Exclude "
                             f"it from the targets, or use jlora.merge to fold it into the params.")
        raise ValueError(f"the adapter at {path!r} was not used by any layer call: no intercepted layer has that "
                         f"path (paths of called layers look like {sorted(ctx.kinds)[:10]}). The adapters may be "
                         f"for another model, or the model runs this layer under an nn.scan whose variable_axes "
                         f"lack {COLLECTION!r}.")


def layout(model: nn.Module, *args, method=None, **kwargs) -> lora_lib.Layout:
    """Traces ``model`` once (shapes only) and returns the :class:`jlora.lora.KernelLayout` of each kernel.

    Needed by :func:`jlora.init` and :func:`jlora.merge` for kernels of more than 2 dims (multi-axis
    ``DenseGeneral``/``Einsum`` kernels, or any kernel stacked by ``nn.scan``).

    Examples:
        >>> import jax.numpy as jnp, flax.linen as nn
        >>> model = nn.DenseGeneral(features=(4, 8), axis=-1)
        >>> layout(model, jnp.ones((2, 16)))["kernel"]
        KernelLayout(kind='DenseGeneral', in_axes=(0,), out_axes=(1, 2), lead=0)
    """
    records: dict[str, tuple[str, tuple, tuple, int]] = {}
    unsupported: dict[str, str] = {}

    def record(next_fun, a, kw, context):
        out = next_fun(*a, **kw)
        module = context.module
        if context.method_name not in _METHODS:
            return out
        mpath = "/".join(module.path)
        prefix = f"{mpath}/" if mpath else ""
        if isinstance(module, _SUPPORTED):
            leaf = _leaf_name(module)
            kernel = module.get_variable("params", leaf)
            if kernel is not None:
                in_axes, out_axes = ((0,), (1,)) if isinstance(module, nn.Embed) else _axes(module, a, kw)
                records[prefix + leaf] = (type(module).__name__, in_axes, out_axes, len(kernel.shape))
        else:
            for leaf in ("kernel", "embedding"):
                if module.has_variable("params", leaf):
                    unsupported[prefix + leaf] = type(module).__name__
        return out

    with nn.intercept_methods(record):
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, method=method, **kwargs))
    flat = tree_lib.flatten(shapes.get("params", {}))
    result = lora_lib.Layout(unsupported=unsupported)
    for path, (kind, in_axes, out_axes, ndim) in records.items():
        if path in flat:
            result[path] = lora_lib.KernelLayout(kind, in_axes, out_axes, len(flat[path].shape) - ndim)
    return result


__all__ = ["apply", "layout", "COLLECTION", "DROPOUT_RNG"]
