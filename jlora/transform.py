"""The LoRA transform: run a Flax Linen model with unmerged low-rank adapters.

:func:`apply` runs ``model.apply`` with the adapters in a separate variable collection, ``"lora"``, that
mirrors the params, and intercepts the calls of the layers it knows (``nn.Dense``, ``nn.DenseGeneral``,
``nn.Embed`` incl. ``Embed.attend``, ``nn.Einsum``, ``nn.Conv``) with Flax's ``nn.intercept_methods``. A layer
whose scope holds an :class:`jlora.Adapter` computes its usual output plus the low-rank path
``scale * (dropout(x) @ A) @ B`` (for a convolution, as PEFT: A a convolution of the layer's geometry into r
channels, B a 1x1 convolution), so the full-size update ``A @ B`` is never formed and the backward pass never
builds a full-size weight gradient. On CPU a plain ``nn.Dense`` computes both terms as one matmul
(:func:`lora_dense`). The interceptor is a closure over one call's state (config, what ran, what
was used); nothing is kept between calls.

Because adapters are a collection, ``nn.scan`` slices them per layer like the params, provided the scan lists
``"lora"`` in ``variable_axes`` (jlora's own models do). After the call, every adapter must be accounted for:
one whose layer ran without seeing it (an ``nn.scan``/``nn.vmap`` that lacks ``"lora"``) or whose layer is of
a kind the transform does not handle is an error; one whose layer simply did not run (``method=`` that runs part
of a model) is not. Adapters for paths the params do not have are an error before the call.

Variants hook in through :mod:`jlora.adapter`'s tables: a kernel of a registered type (e.g. quantized) computes
its layer with the type's ``layer_call``; an adapter whose variant has a ``layer_call`` (e.g. DoRA) computes the
layer's output itself.

:func:`layout` traces a model once (``jax.eval_shape``, no compute) to learn which kernel axes are inputs and
outputs, for kernels of more than 2 dims.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora import adapter as adapter_lib
from jlora import fusion
from jlora import lora as lora_lib
from jlora import tree as tree_lib
from jlora.adapter import Adapter, ConvSpec, KernelLayout, LayerCall, Layout
from jlora.config import LoraConfig

COLLECTION = "lora"
DROPOUT_RNG = "lora_dropout"
_KINDS = ((nn.Dense, "Dense"), (nn.DenseGeneral, "DenseGeneral"), (nn.Embed, "Embed"), (nn.Einsum, "Einsum"),
          (nn.Conv, "Conv"))
_METHODS = ("__call__", "attend")


def _kind(module: nn.Module) -> str | None:
    return next((name for cls, name in _KINDS if isinstance(module, cls)), None)


def leaf_name(kind: str) -> str:
    """The parameter a layer kind's adapter sits on: ``embedding`` for embeddings, else ``kernel``."""
    return "embedding" if kind == "Embed" else "kernel"


def _normalize_axes(axes, ndim: int) -> tuple[int, ...]:
    """A DenseGeneral's contracted input axes, non-negative and sorted: Flax pairs them with the kernel's leading
    axes in ascending order, whatever order ``axis`` lists them in."""
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(sorted(a % ndim for a in axes))


def split_einsum(spec: str) -> tuple[str, str, str]:
    """``"ab,bc->ac"`` -> ``("ab", "bc", "ac")`` (spaces dropped): an Einsum layer's input, kernel and output axes.

    Examples:
        >>> split_einsum("btd, dhk -> bthk")
        ('btd', 'dhk', 'bthk')
    """
    spec = spec.replace(" ", "")
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    return lhs, rhs, out


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """How one call of an adapted layer reads its kernel: what the low-rank path needs, free of any module system.

    Linen layers (here) and NNX layers (:mod:`jlora.nnx`) both describe themselves this way, so one function,
    :func:`low_rank`, computes the path for both.

    Attributes:
        kind: the layer kind (one of :data:`jlora.adapter.LAYER_KINDS`).
        kernel_shape: the per-layer kernel's shape.
        in_axes: kernel axes contracted with the input.
        out_axes: kernel axes that index the output features.
        dtype: the layer's compute dtype, or None for the output's.
        axis: ``DenseGeneral``: the input axes it contracts.
        einsum: ``Einsum``: ``(lhs, rhs, out)`` of its einsum string.
        conv: ``Conv``: its geometry (:meth:`jlora.ConvSpec.of` reads it off a Linen or NNX layer); the kernel is
            ``(*kernel_size, in / groups, out)``, ``in_axes`` all but the last.
    """

    kind: str
    kernel_shape: tuple[int, ...]
    in_axes: tuple[int, ...] = (0,)
    out_axes: tuple[int, ...] = (1,)
    dtype: Any = None
    axis: tuple[int, ...] = ()
    einsum: tuple[str, str, str] | None = None
    conv: ConvSpec | None = None

    @property
    def layout(self) -> KernelLayout:
        return KernelLayout(self.kind, self.in_axes, self.out_axes, conv=self.conv)


def einsum_axes(lhs: str, rhs: str, out: str, where: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (in_axes, out_axes) of an einsum kernel ``rhs`` in ``lhs,rhs->out``; raises for shared batch axes."""
    shared = [c for c in rhs if c in lhs and c in out]
    if shared or "." in rhs:
        raise ValueError(f"the Einsum layer at {where!r} with einsum_str {lhs},{rhs}->{out}: kernel axes "
                         f"{shared or '...'} are batch axes shared by input and output, which LoRA does not "
                         f"support; exclude this layer from the targets")
    return tuple(i for i, c in enumerate(rhs) if c in lhs), tuple(i for i, c in enumerate(rhs) if c not in lhs)


def _spec(module: nn.Module, kind: str, args, kwargs, kernel_shape: tuple[int, ...] = ()) -> LayerSpec:
    """The :class:`LayerSpec` of a call ``module(*args, **kwargs)`` of a Linen layer (kernel shape without stack
    axes)."""
    where = "/".join(module.path)
    dtype = getattr(module, "dtype", None)
    if kind == "DenseGeneral":
        if module.batch_dims:
            raise ValueError(f"nn.DenseGeneral at {where!r} has batch_dims={module.batch_dims}; LoRA supports "
                             f"DenseGeneral without batch_dims only")
        axis = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
        n_out = 1 if isinstance(module.features, int) else len(module.features)
        return LayerSpec(kind, kernel_shape, tuple(range(len(axis))),
                         tuple(range(len(axis), len(axis) + n_out)), dtype, axis=axis)
    if kind == "Einsum":
        given = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None)   # nn.Einsum(...)(x, "ab,bc->ac")
        parts = split_einsum(given or module.einsum_str)
        return LayerSpec(kind, kernel_shape, *einsum_axes(*parts, where), dtype, einsum=parts)
    if kind == "Conv":
        return conv_layer_spec(module, where, kernel_shape, dtype)
    return LayerSpec(kind, kernel_shape, dtype=dtype)


def conv_layer_spec(layer: Any, where: str = "", kernel_shape: tuple[int, ...] = (), dtype=None) -> LayerSpec:
    """The :class:`LayerSpec` of a ``flax.linen.Conv`` or ``flax.nnx.Conv`` (kernel ``(*k, in / groups, out)``)."""
    conv = ConvSpec.of(layer, where)
    n = len(conv.kernel_size)
    return LayerSpec("Conv", kernel_shape, tuple(range(n + 1)), (n + 1,), dtype, conv=conv)


def conv_low_rank(conv: ConvSpec, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """``x`` ``(*batch, *spatial, in)`` through A, a convolution of geometry ``conv`` into r channels (``a``
    ``(prod(kernel_size) * in / groups, r)``), then B, a grouped 1x1 convolution (``b`` ``(r / groups, out)``).

    Padding, strides, dilations and groups are the layer's, as in ``flax.linen.Conv``, so the result is the layer's
    own convolution with the kernel ``A @ B`` (block-diagonal for groups > 1), which is what :func:`jlora.merge`
    adds; the full-size kernel is never formed.
    """
    n, g = len(conv.kernel_size), conv.feature_group_count
    batch = x.shape[:x.ndim - n - 1]
    x = x.reshape(-1, *x.shape[x.ndim - n - 1:])
    pad = conv.padding
    if pad in ("CIRCULAR", "REFLECT"):
        spans = [(k - 1) * d + 1 for k, d in zip(conv.kernel_size, conv.kernel_dilation)]
        pads = [(0, 0), *[((s - 1) // 2, s // 2) for s in spans], (0, 0)]
        x, pad = jnp.pad(x, pads, mode="wrap" if pad == "CIRCULAR" else "reflect"), "VALID"
    elif pad == "CAUSAL":
        x = jnp.pad(x, [(0, 0), ((conv.kernel_size[0] - 1) * conv.kernel_dilation[0], 0), (0, 0)])
        pad = "VALID"
    spec = (0, n + 1, *range(1, n + 1))            # channels last, as Flax: N...C inputs, ...IO kernels
    numbers = jax.lax.ConvDimensionNumbers(spec, (n + 1, n, *range(n)), spec)
    h = jax.lax.conv_general_dilated(x, a.reshape(*conv.kernel_size, -1, a.shape[-1]), conv.strides, pad,
                                     conv.input_dilation, conv.kernel_dilation, numbers, feature_group_count=g)
    y = lora_lib.grouped_matmul(h.reshape(-1, h.shape[-1]), b, g)
    return y.reshape(*batch, *h.shape[1:-1], b.shape[-1])


@jax.custom_jvp
def _low_rank_matmul(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """``(x @ a) @ b``, differentiable in forward and reverse mode, with a fast reverse pass.

    The JVP below is the product rule, but written so that its transpose (the reverse pass JAX derives from it)
    contracts the token axis with the large operands ``x`` and ``dy`` on the right-hand side, and only the small
    ``(tokens, r)`` factors transposed: JAX's own rule would compute the factor gradients as ``x^T @ g`` and
    ``g^T @ h``, which XLA:CPU lays out by materializing ``x^T`` or ``g^T``. Being a JVP of plain ops, it also
    serves ``jax.jvp``, ``jacfwd``, ``linearize`` and ``hessian``.
    """
    return jnp.matmul(jnp.matmul(x, a), b)


def _tangent_matmul(x: jax.Array, d: jax.Array, *, factor_a: bool = False) -> jax.Array:
    """``x @ d`` for a weight tangent ``d``, written ``(d^T x^T)^T``: its transpose, the weight gradient
    ``x^T @ g``, then keeps the large ``x`` and ``g`` on the right-hand side, which XLA:CPU lays out without
    materializing ``x^T`` or ``g^T``.

    ``factor_a`` (the down-projection factor A, (in, r), in :func:`lora_dense` on CPU): A's gradient ``x^T g``
    (in, r) runs about 3x faster on XLA:CPU as ``g^T x`` (r, in) and a transpose of the small result, but XLA folds
    such a transpose back into the product. So ``d^T`` is taken as its own buffer (:func:`jlora.fusion.as_buffer`)."""
    flat = x.reshape(-1, x.shape[-1])
    if factor_a:
        t = jax.lax.dot_general(fusion.as_buffer(jnp.transpose, d, like=flat), flat, (((1,), (1,)), ((), ())))
    else:
        t = jax.lax.dot_general(d, flat, (((0,), (1,)), ((), ())))                       # (n, tokens)
    return t.T.reshape(*x.shape[:-1], t.shape[0])


@_low_rank_matmul.defjvp
def _low_rank_jvp(primals, tangents):
    x, a, b = primals
    dx, da, db = tangents
    h = jnp.matmul(x, a)
    return jnp.matmul(h, b), jnp.matmul(jnp.matmul(dx, a) + _tangent_matmul(x, da), b) + _tangent_matmul(h, db)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def lora_dense(x: jax.Array, xd: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array,
               precision=None) -> jax.Array:
    """``x @ w + (xd @ a) @ b``, an ``nn.Dense`` kernel plus its low-rank path, as one matmul ``[x, xd a] [w; b]``.

    ``xd`` is the input of the low-rank path (``x`` itself, or ``x`` after LoRA dropout) and ``b`` carries the
    scale. Adding the two products as separate arrays lets XLA:CPU fuse the add into every consumer of the sum
    (a gated MLP's activation, forward and backward), which then keeps both (tokens, out) addends alive until
    the backward pass instead of one sum; one matmul yields the sum directly. The copy of ``w`` into ``[w; b]``
    is the price (about 0.5% of a CPU train step, see bench/README.md), so the transform takes this path on CPU
    only. Being a JVP of plain ops (tangents of frozen inputs are symbolic zeros and cost nothing), it serves
    both differentiation modes.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> kx, kw, ka, kb = jax.random.split(jax.random.key(0), 4)
        >>> x, w = jax.random.normal(kx, (2, 3, 8)), jax.random.normal(kw, (8, 5))
        >>> a, b = jax.random.normal(ka, (8, 2)), jax.random.normal(kb, (2, 5))
        >>> bool(jnp.allclose(lora_dense(x, x, w, a, b), x @ w + (x @ a) @ b, atol=1e-5))
        True
    """
    return _lora_dense_value(x, xd, w, a, b, precision)[1]


def _lora_dense_value(x, xd, w, a, b, precision):
    h = jnp.matmul(xd, a, precision=precision)
    return h, jnp.matmul(jnp.concatenate([x, h], -1), jnp.concatenate([w, b], 0), precision=precision)


def _lora_dense_jvp(precision, primals, tangents):
    x, xd, w, a, b = primals
    dx, dxd, dw, da, db = (None if isinstance(t, jax.custom_derivatives.SymbolicZero) else t for t in tangents)
    mm = functools.partial(jnp.matmul, precision=precision)
    h, y = _lora_dense_value(x, xd, w, a, b, precision)
    dh = [mm(dxd, a)] if dxd is not None else []
    dh += [_tangent_matmul(xd, da, factor_a=True)] if da is not None else []
    dy = [mm(dx, w)] if dx is not None else []
    dy += [mm(sum(dh[1:], dh[0]), b)] if dh else []
    dy += [_tangent_matmul(h, db)] if db is not None else []
    dy += [_tangent_matmul(x, dw)] if dw is not None else []
    return y, sum(dy[1:], dy[0]) if dy else jnp.zeros_like(y)


lora_dense.defjvp(_lora_dense_jvp, symbolic_zeros=True)


_SEPARATE = contextvars.ContextVar("jlora_separate_low_rank", default=False)


@contextlib.contextmanager
def separate_low_rank():
    """Within this context (while a step is traced), adapted ``nn.Dense`` layers compute ``x W`` and the
    low-rank term as two matmuls on every backend, instead of :func:`lora_dense`'s one on CPU.

    For frozen params sharded over a device mesh: concatenating a sharded kernel with ``s B`` makes XLA
    re-shard it (a 2-layer SmolLM2-shape step on a tensor=2, fsdp=4 CPU mesh compiled to 79 all-gathers instead
    of 12). :func:`jlora.parallel.make_sharded_train_step` enters it when any frozen param is sharded.
    """
    token = _SEPARATE.set(True)
    try:
        yield
    finally:
        _SEPARATE.reset(token)


def _fused_dense(module: nn.Module, kernel, method: str, node: Adapter) -> bool:
    """Whether an adapted layer's output goes through :func:`lora_dense`: a plain ``nn.Dense`` call on CPU
    with a plain kernel and a plain (ungrouped, unstacked) LoRA adapter, outside :func:`separate_low_rank`."""
    return (jax.default_backend() == "cpu" and not _SEPARATE.get() and method == "__call__"
            and type(module).__call__ is nn.Dense.__call__
            and module.dot_general is None and module.dot_general_cls is None
            and module.promote_dtype is nn.dtypes.promote_dtype and isinstance(kernel, jax.Array)
            and adapter_lib.variant(node.variant).layer_call is None and jnp.ndim(node.a) == 2
            and jnp.ndim(node.b) == 2 and jnp.shape(node.a)[1] == jnp.shape(node.b)[0])


def _dropout(module: nn.Module, x: jax.Array, rate: float) -> jax.Array:
    keep = jax.random.bernoulli(module.make_rng(DROPOUT_RNG), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def low_rank(spec: LayerSpec, method: str, x, node: Adapter, scale: float, y, dropout=None) -> jax.Array:
    """``scale * (dropout(x) @ A) @ B`` for a layer described by ``spec``, laid out like its output ``y``.

    The full-size update ``A @ B`` is never formed: the input is contracted with ``A`` first.
    """
    kind = spec.kind
    dtype = spec.dtype or y.dtype
    a, b = node.a.astype(dtype), node.b.astype(dtype)
    if kind == "Embed":
        if method == "attend":        # x @ E^T + s (x @ B^T) @ A^T
            return (scale * jnp.matmul(jnp.matmul(x.astype(dtype), b.T), a.T)).astype(y.dtype)
        return (scale * jnp.matmul(jnp.take(a, x, axis=0), b)).astype(y.dtype)
    x = (dropout(x) if dropout is not None else x).astype(dtype)
    if kind == "Dense":
        return _low_rank_matmul(x, a, (b * scale).astype(dtype)).astype(y.dtype)
    if kind == "Conv":
        return conv_low_rank(spec.conv, x, a, (b * scale).astype(dtype)).astype(y.dtype)
    in_dims = [spec.kernel_shape[i] for i in spec.in_axes]
    out_dims = [spec.kernel_shape[i] for i in spec.out_axes]
    if kind == "DenseGeneral":
        contract = _normalize_axes(spec.axis, x.ndim)
        keep = [i for i in range(x.ndim) if i not in contract]
        xm = jnp.transpose(x, (*keep, *contract)).reshape(*[x.shape[i] for i in keep], math.prod(in_dims))
        return (scale * jnp.matmul(jnp.matmul(xm, a), b)).reshape(y.shape).astype(y.dtype)
    # Einsum: contract the input with A (in dims, r), then expand with B (r, out dims) into the output spec.
    lhs, rhs, out = spec.einsum
    z = next(c for c in "zyxwvutsrqponmlkjihgfedcbaZYXWVUTSRQPONMLKJIHGFEDCBA" if c not in lhs + rhs + out)
    in_letters = "".join(rhs[i] for i in spec.in_axes)
    out_letters = "".join(rhs[i] for i in spec.out_axes)
    mid = ("..." if "..." in lhs else "") + "".join(c for c in lhs.replace("...", "") if c in out)
    h = jnp.einsum(f"{lhs},{in_letters}{z}->{mid}{z}", x, a.reshape(*in_dims, a.shape[-1]))
    d = jnp.einsum(f"{mid}{z},{z}{out_letters}->{out}", h, b.reshape(b.shape[0], *out_dims))
    return (scale * d).astype(y.dtype)


class _Trace:
    """What one :func:`apply` call saw: the adapters it used, the layers that ran, those that ran blind."""

    def __init__(self, cfg: LoraConfig, adapter_paths: set[str], ids=None):
        self.cfg = cfg
        self.ids = ids
        self.adapter_paths = adapter_paths
        self.used: set[str] = set()
        self.called: dict[str, str] = {}   # module path -> layer class name
        self.blind: set[str] = set()       # adapter paths whose layer ran without the "lora" collection in scope
        # (module path, method) of a subclass's override in progress -> whether it reached the Flax layer's own
        # method (through super()), which then adds the update once, inside whatever the override does around it
        self.overrides: dict[tuple[str, str], bool] = {}


def check_layout(node: Adapter, actual: adapter_lib.KernelLayout, path: str, reader: str) -> None:
    """Raises unless ``node`` was made for a kernel read as ``actual`` (``reader``, e.g. "the bank reads that
    kernel as", says who reads it so); an adapter without a recorded layout fits any."""
    if node.layout is not None and not node.layout.same_axes(actual):
        made = ("without a layout, so its 2-D kernel was taken as (in, out), nn.Dense's layout"
                if not node.layout.traced else f"for a kernel laid out {node.layout.describe()}")
        raise ValueError(f"the adapter at {path!r} was made {made}, but {reader} {actual.describe()}; create the "
                         f"adapters with `layout=jlora.layout(model, *example_args)` so that apply and merge agree")


def check_node(spec: LayerSpec, node: Adapter, path: str, layer: str, *, stacked_hint: str | None = None) -> None:
    """Raises unless ``node`` fits the layer (named ``layer``, e.g. ``"nn.Dense"``) that is about to use it;
    ``stacked_hint``: the fix for an adapter with more leading axes than the kernel (default: one at a time)."""
    var = adapter_lib.variant(node.variant)
    if spec.kind not in var.layers:
        raise ValueError(f"the {var.name} adapter at {path!r} is on a {layer} layer; the {var.name} variant "
                         f"supports {'/'.join(var.layers)} layers only")
    actual, shape = spec.layout, tuple(spec.kernel_shape)
    check_layout(node, actual, path, f"the {layer} layer using it reads its kernel {shape} as")
    fan_in = math.prod(shape[i] for i in spec.in_axes)
    fan_out = math.prod(shape[i] for i in spec.out_axes)
    a, b = jnp.shape(node.a), jnp.shape(node.b)
    a, b = a[node.slot_dims:], b[node.slot_dims:]          # a bank's slot axis leads inside the layer
    if len(a) > 2 and a[-2:] == (fan_in, a[-1]):
        raise ValueError(f"the adapter at {path!r} carries extra leading axes {a[:-2]} (a {a}, b {b}) for a "
                         f"layer whose kernel is {shape}: "
                         + (stacked_hint or "stacked adapters must be applied one at a time (index them, or "
                                            "jax.vmap over jlora.apply)"))
    g = actual.groups
    if len(a) != 2 or len(b) != 2 or a[0] != fan_in or b[1] != fan_out or a[1] != b[0] * g:
        raise ValueError(f"adapter at {path!r} does not fit its layer: the {layer} kernel {shape} needs a "
                         f"({fan_in}, r) and b ({'r' if g == 1 else f'r/{g}'}, {fan_out}) per layer; got a {a} and "
                         f"b {b}")


def _runs_flax_method(module: nn.Module, method: str, orig_method) -> bool:
    """Whether an intercepted call runs the Flax layer's own ``method`` (``nn.Dense.__call__``, ``Embed.attend``),
    not a user subclass's override of it."""
    fn = getattr(orig_method, "func", orig_method)
    for cls in type(module).__mro__:
        own = cls.__dict__.get(method)
        if own is not None and cls.__module__.startswith("flax."):
            return fn is own or fn is getattr(own, "__wrapped__", None)
    return True


def _interceptor(trace: _Trace):
    """The ``nn.intercept_methods`` function of one :func:`apply` call, bound to its trace."""
    rate = trace.cfg.dropout

    def intercept(next_fun, args, kwargs, context):
        module, method = context.module, context.method_name
        if method not in _METHODS:
            return next_fun(*args, **kwargs)
        mpath = "/".join(module.path)
        kind = _kind(module)
        trace.called.setdefault(mpath, kind or type(module).__name__)
        if kind is None:
            return next_fun(*args, **kwargs)
        override = not _runs_flax_method(module, method, context.orig_method)
        if override:                      # a user subclass's method: adapt inside it if it reaches Flax's own
            key = (mpath, method)
            if key in trace.overrides:    # an override called by an override: the outermost one decides
                return next_fun(*args, **kwargs)
            trace.overrides[key] = False
            y = next_fun(*args, **kwargs)
            if trace.overrides.pop(key):
                return y
        elif (mpath, method) in trace.overrides:
            trace.overrides[(mpath, method)] = True
        leaf = leaf_name(kind)
        path = f"{mpath}/{leaf}" if mpath else leaf
        kernel = module.get_variable("params", leaf) if module.has_variable("params", leaf) else None
        ktype = adapter_lib.kernel_type(kernel)
        call = next_fun if ktype is None else (lambda *a, **kw: ktype.layer_call(module, path, a, kw))
        if override:                      # it never did: adapt its output, as for the layer it stands for
            call = lambda *a, **kw: y     # noqa: E731
        node = module.get_variable(COLLECTION, leaf) if module.has_variable(COLLECTION, leaf) else None
        if node is None and path in trace.adapter_paths:
            trace.blind.add(path)
        if not isinstance(node, Adapter):     # no adapter here, or a whole trained tensor (see lora.overlay)
            return call(*args, **kwargs)
        spec = _spec(module, kind, args, kwargs, tuple(jnp.shape(kernel)))
        check_node(spec, node, path, f"nn.{kind}")
        x = adapter_lib.layer_input(args, kwargs)
        trace.used.add(path)
        scale = trace.cfg.scale(path)
        dropout = ((lambda v: _dropout(module, v, rate))
                   if rate > 0 and kind != "Embed" and module.has_rng(DROPOUT_RNG) else None)
        if ktype is None and not override and _fused_dense(module, kernel, method, node):
            bias = module.get_variable("params", "bias") if module.use_bias else None
            x, w, bias = module.promote_dtype(x, kernel, bias, dtype=module.dtype)
            a, b = node.a.astype(w.dtype), (node.b * scale).astype(w.dtype)
            y = lora_dense(x, x if dropout is None else dropout(x), w, a, b, module.precision)
            return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        y = call(*args, **kwargs)
        var = adapter_lib.variant(node.variant)
        if var.layer_call is not None:
            bias = module.get_variable("params", "bias") if getattr(module, "use_bias", False) else None
            return var.layer_call(LayerCall(
                module=module, method=method, x=x, y=y, kernel=lora_lib.dense_value(kernel), bias=bias,
                adapter=node, scale=scale, dtype=spec.dtype or y.dtype, dropout=dropout,
                path=path, ids=trace.ids, kind=kind, kwargs=kwargs, spec=spec))
        return y + low_rank(spec, method, x, node, scale, y, dropout)

    return intercept


def apply(model: nn.Module, params: Mapping, adapters: Mapping, cfg: LoraConfig, *args,
          variables: Mapping[str, Any] | None = None, rngs: Mapping[str, jax.Array] | None = None, method=None,
          mutable=False, adapter_ids: jax.Array | None = None, **kwargs) -> Any:
    """Runs ``model`` with unmerged adapters: equal to ``model.apply({"params": merge(...)}, ...)`` where the model
    uses each adapted kernel through its layer's call.

    An adapter acts where its layer is called (``__call__``, and ``Embed.attend``); code that reads the kernel
    directly sees the frozen value, not the merged one: a head tied as ``h @ self.wte.embedding.T`` gets no update
    from an adapter on ``wte/embedding`` here, but does from :func:`jlora.merge`. Call the layer there
    (``self.wte.attend(h)``), or merge the adapters. Like ``model.apply``, this is a pure function (the same
    arguments give the same output); with ``mutable`` it returns the updated collections, for the caller to pass
    back as ``variables``.

    Args:
        model: a Flax Linen module (or an NNX model or graphdef: see :mod:`jlora.nnx`).
        params: its frozen params (the ``"params"`` collection, not wrapped in ``{"params": ...}``).
        adapters: the adapter tree from :func:`jlora.init`.
        cfg: the LoRA config the adapters were made with (it gives the scale per path).
        *args: positional arguments of the model call.
        variables: the model's other variable collections (``{"batch_stats": ...}``, ``{"cache": ...}``).
        rngs: the model's rngs, as for ``model.apply`` (``{"dropout": key}``; for an NNX model they reseed its
            streams, see :func:`jlora.nnx.apply`); LoRA dropout is active only when ``cfg.dropout > 0`` and
            ``"lora_dropout"`` is given.
        method: optional method of ``model`` to call instead of ``__call__``.
        mutable: as in ``flax.linen.Module.apply`` (e.g. ``["batch_stats"]``).
        adapter_ids: for a bank of adapters (:mod:`jlora.bank`), the slot each batch row uses, shape (batch,).
        **kwargs: keyword arguments of the model call.

    Returns:
        What ``model.apply`` returns: the output, or ``(output, mutated collections)`` when ``mutable`` is set
        (the adapters' own collection is not among them).

    Examples:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
        >>> model = nn.Dense(8)
        >>> x = jnp.ones((2, 16))
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> cfg = jlora.LoraConfig(rank=4, alpha=8, targets="kernel")
        >>> adapters = jlora.init(params, cfg, key=jax.random.key(1))
        >>> y = jlora.apply(model, params, adapters, cfg, x)
        >>> bool(jnp.array_equal(y, model.apply({"params": params}, x)))
        True
    """
    system = adapter_lib.model_system(model)
    if system is not None:          # an NNX model or graphdef (jlora.nnx)
        return system.apply(model, params, adapters, cfg, *args, variables=variables, rngs=rngs, method=method,
                            mutable=mutable, adapter_ids=adapter_ids, **kwargs)
    lora_lib.check_fits(params, adapters, cfg)
    others = dict(variables or {})
    clash = sorted({"params", COLLECTION} & set(others))
    if clash:
        raise ValueError(f"`variables` holds the collections {clash}; pass the params as `params` and the "
                         f"adapters as `adapters`, and only the model's other collections in `variables`")
    trace = _Trace(cfg, {p for p, _ in adapter_lib.adapter_items(adapters)}, adapter_ids)
    all_vars = {**others, "params": lora_lib.overlay(params, adapters), COLLECTION: adapters}
    with nn.intercept_methods(_interceptor(trace)):
        out = model.apply(all_vars, *args, rngs=rngs, method=method, mutable=mutable, **kwargs)
    _check_accounted(trace)
    if mutable is not False:
        out, mutated = out
        return out, {k: v for k, v in mutated.items() if k != COLLECTION}
    return out


def _check_accounted(trace: _Trace) -> None:
    """Raises for an adapter whose layer ran without it; adapters of layers that did not run are fine."""
    for path in sorted(trace.adapter_paths - trace.used):
        mpath = path.rsplit("/", 1)[0] if "/" in path else ""
        if path in trace.blind:
            raise ValueError(f"the layer {mpath!r} ran without seeing its adapter at {path!r}: the {COLLECTION!r} "
                             f"collection is not visible there, as happens inside an nn.scan or nn.vmap whose "
                             f"variable_axes lack {COLLECTION!r}. Add {COLLECTION!r} to its variable_axes (with the "
                             f"same axis as 'params'), or merge the adapters with jlora.merge.")
        kind = trace.called.get(mpath)
        if kind is not None and kind not in adapter_lib.LAYER_KINDS:
            raise ValueError(f"the adapter at {path!r} targets a parameter of a {kind} layer, which the LoRA "
                             f"transform does not handle (it handles {', '.join(adapter_lib.LAYER_KINDS)}). "
                             f"Exclude it from the targets, or use jlora.merge to fold it into the params.")


def layout(model: nn.Module, *args, method=None, **kwargs) -> Layout:
    """Traces ``model`` once (shapes only) and returns the :class:`jlora.KernelLayout` of each kernel.

    Needed by :func:`jlora.init` for kernels of more than 2 dims (multi-axis ``DenseGeneral``/``Einsum``
    kernels, or any kernel stacked by ``nn.scan``) and for ``nn.Einsum`` kernels stored ``(out, in)``.

    Examples:
        >>> import jax.numpy as jnp, flax.linen as nn
        >>> model = nn.DenseGeneral(features=(4, 8), axis=-1)
        >>> layout(model, jnp.ones((2, 16)))["kernel"]
        KernelLayout(kind='DenseGeneral', in_axes=(0,), out_axes=(1, 2), lead=0, traced=True)
    """
    system = adapter_lib.model_system(model)
    if system is not None:          # an NNX model reads its layouts off its layers, no trace needed
        return system.layout(model, *args, method=method, **kwargs)
    records: dict[str, tuple[KernelLayout, int]] = {}
    unsupported: dict[str, str] = {}
    refused: dict[str, str] = {}

    def record(next_fun, a, kw, context):
        out = next_fun(*a, **kw)
        module = context.module
        if context.method_name not in _METHODS:
            return out
        mpath = "/".join(module.path)
        prefix = f"{mpath}/" if mpath else ""
        kind = _kind(module)
        if kind is not None:
            leaf = leaf_name(kind)
            kernel = module.get_variable("params", leaf)
            if kernel is not None:
                try:
                    records[prefix + leaf] = (_spec(module, kind, a, kw).layout, len(kernel.shape))
                except ValueError as e:   # set up in a way LoRA cannot follow: an error only if targeted
                    refused[prefix + leaf] = str(e)
        else:
            for leaf in ("kernel", "embedding"):
                if module.has_variable("params", leaf):
                    unsupported[prefix + leaf] = type(module).__name__
        return out

    with nn.intercept_methods(record):
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, method=method, **kwargs))
    flat = tree_lib.flatten(shapes.get("params", {}))
    result = Layout(unsupported=unsupported, refused=refused)
    for path, (lay, ndim) in records.items():
        if path in flat:
            result[path] = dataclasses.replace(lay, lead=len(flat[path].shape) - ndim)
    return result


__all__ = ["apply", "layout", "COLLECTION", "DROPOUT_RNG"]
