"""LoRA for Flax NNX models, with the same functional contract as for Linen.

An NNX model keeps its params inside Python objects, but jlora's contract does not change: adapters are a
separate pytree whose paths mirror the model's ``nnx.Param`` state (``blocks/lin/kernel``), the frozen params
are an ordinary argument, and gradients and optimizer state exist for the adapters only. ``jlora.init``,
``jlora.apply``, ``jlora.layout``, ``jlora.merge``/``unmerge``, ``jlora.summary`` and ``jlora.make_train_step``
accept an NNX model (or its graphdef and param state) wherever they accept a Linen model and its params:

>>> import jax, jax.numpy as jnp, jlora
>>> from flax import nnx
>>> model = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
>>> cfg = jlora.LoraConfig(rank=4, alpha=8, targets="kernel")
>>> adapters = jlora.init(model, cfg, key=jax.random.key(1))
>>> x = jnp.ones((2, 16))
>>> bool(jnp.array_equal(jlora.apply(model, jlora.nnx.params(model), adapters, cfg, x), model(x)))
True

**How a call is intercepted.** NNX has no method interceptor like Linen's, and its transforms (``nnx.scan``,
``nnx.vmap``, ``nnx.remat``, ``nnx.jit``) split and re-merge the module graph, so neither object identity nor a
global hook survives them. What does survive is the graph itself: :func:`apply` merges a fresh copy of the model
holding the given params, and on each adapted layer sets (a) :class:`AdapterParam` variables holding its
:class:`jlora.Adapter`'s arrays and (b) the layer's class to a subclass (one per layer class, cached) whose ``__call__``
(and ``Embed.attend``) returns the layer's own output plus the low-rank path, computed by the same
:func:`jlora.transform.low_rank` as for Linen, from a :class:`jlora.transform.LayerSpec` read off the layer's
attributes. Because the adapter is a variable of the layer, ``nnx.scan`` over a stack of layers slices it along
with the layer's kernel (a scan whose ``nnx.StateAxes`` name what to slice must name :class:`AdapterState`
beside ``nnx.Param``), and ``nnx.remat``/``nnx.vmap`` carry it like any other state. The user's model is never
modified by :func:`apply`. A user's subclass of a layer that overrides ``__call__`` gets the update where its
override calls the layer's own method (``2 * super().__call__(x)`` doubles it, as merging does, and as Linen's
interceptor does), or, when the override never calls it, added to what the override returns.

The NNX-idiomatic way is built on the same pieces: :func:`attach` does (a) and (b) to the user's model in place,
so ``model(x)`` runs adapted and ``nnx.Optimizer(model, tx, wrt=jlora.nnx.AdapterParam)`` trains the adapters only;
:func:`adapters` reads them back, :func:`detach` removes them. :func:`to_flax_lora` and :func:`from_flax_lora`
move adapters to and from Flax's own ``nnx.LoRALinear``/``nnx.LoRA`` parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jlora import adapter as adapter_lib
from jlora import lora as lora_lib
from jlora import transform
from jlora import tree as tree_lib
from jlora.adapter import Adapter, KernelLayout, LayerCall, Layout
from jlora.config import LoraConfig

# NNX layer classes jlora adapts, in lookup order (a subclass, e.g. nnx.LoRALinear, takes its base's kind), and
# the jlora layer kind each computes as.
_KINDS = ((nnx.Linear, "Dense"), (nnx.LinearGeneral, "DenseGeneral"), (nnx.Einsum, "Einsum"),
          (nnx.Embed, "Embed"), (nnx.Conv, "Conv"))
_SUPPORTED = ", ".join(f"nnx.{cls.__name__}" for cls, _ in _KINDS)


class AdapterState(nnx.Variable):
    """Everything jlora puts on an adapted layer: its :class:`AdapterParam` arrays and its :class:`DropoutKey`.

    The filter for an ``nnx.scan``/``nnx.vmap`` over a stack of adapted layers, beside ``nnx.Param``, so that each
    layer gets its own slice: ``nnx.StateAxes({(nnx.Param, jlora.nnx.AdapterState): 0, ...: None})``.
    """


class AdapterParam(AdapterState):
    """The variables an adapted layer holds its adapter's arrays in (``jlora_a``, ``jlora_b``, and variant extras
    as ``jlora_<name>``); the filter for ``nnx.Optimizer(..., wrt=...)`` and ``nnx.DiffState``.

    It is not an ``nnx.Param``, so ``nnx.state(model, nnx.Param)`` stays the frozen params.
    """


class DropoutKey(AdapterState):
    """The LoRA-dropout key of one adapted layer (one key per stacked layer, so ``nnx.scan`` slices it along with
    the layer's params when its ``StateAxes`` name :class:`AdapterState`)."""


_SLICE_HINT = ("put jlora.nnx.AdapterState beside nnx.Param in the StateAxes of the nnx.scan/nnx.vmap that slices "
               "this layer's params (nnx.StateAxes({(nnx.Param, jlora.nnx.AdapterState): 0, ...: None}))")


@dataclasses.dataclass(eq=False)
class _Trace:
    """What one :func:`apply` (or :func:`attach`) set up: config, per-row adapter ids, and which adapters ran."""

    cfg: LoraConfig
    ids: Any = None
    used: set = dataclasses.field(default_factory=set)


@dataclasses.dataclass(frozen=True, eq=False)
class _Info:
    """Static facts of one adapted layer, stored on it (identity-hashed, as NNX static attributes must hash)."""

    path: str
    kind: str
    scale: float
    trace: _Trace
    extras: tuple[str, ...] = ()
    layout: KernelLayout | None = None
    variant: str = "lora"
    node_type: type = Adapter        # or a subclass (a bank's Slots)

    def adapter(self, layer) -> Adapter:
        """The :class:`jlora.Adapter` held by ``layer``'s variables."""
        extras = {n: getattr(layer, f"jlora_{n}").get_value() for n in self.extras}
        return self.node_type(layer.jlora_a.get_value(), layer.jlora_b.get_value(), extras, layout=self.layout,
                              variant=self.variant)


def _kind(layer: Any) -> str | None:
    return next((kind for cls, kind in _KINDS if isinstance(layer, cls)), None)


def _per_layer_ndim(layer: nnx.Module, kind: str, where: str) -> int:
    if kind == "DenseGeneral":
        return len(layer.in_features) + len(layer.out_features)
    if kind == "Einsum":
        return len(layer.kernel_shape)
    if kind == "Conv":
        return len(transform.ConvSpec.of(layer, where).kernel_size) + 2
    return 2


def layer_spec(layer: nnx.Module, kind: str, kernel_shape: tuple[int, ...], where: str,
               einsum_str: str | None = None) -> transform.LayerSpec:
    """The :class:`jlora.transform.LayerSpec` of an NNX layer whose per-layer kernel has ``kernel_shape``."""
    dtype = getattr(layer, "dtype", None)
    if kind == "Conv":
        return transform.conv_layer_spec(layer, where, kernel_shape, dtype)
    if kind == "DenseGeneral":
        if layer.batch_axis:
            raise ValueError(f"nnx.LinearGeneral at {where!r} has batch_axis={dict(layer.batch_axis)}; LoRA supports "
                             f"LinearGeneral without batch axes only. Exclude it from the targets.")
        n_in, n_out = len(layer.in_features), len(layer.out_features)
        return transform.LayerSpec(kind, kernel_shape, tuple(range(n_in)), tuple(range(n_in, n_in + n_out)), dtype,
                                   axis=tuple(layer.axis))
    if kind == "Einsum":
        spec = einsum_str or layer.einsum_str
        if spec is None:
            raise ValueError(f"nnx.Einsum at {where!r} has no einsum_str attribute (it is given at each call), so "
                             f"jlora cannot tell its kernel's input axes ahead of a call; build it with einsum_str= "
                             f"or exclude it from the targets")
        lhs, rhs, out = transform.split_einsum(spec)
        return transform.LayerSpec(kind, kernel_shape, *transform.einsum_axes(lhs, rhs, out, where), dtype,
                                   einsum=(lhs, rhs, out))
    return transform.LayerSpec(kind, kernel_shape, dtype=dtype)


# --- params -------------------------------------------------------------------------------------------------------

def _str_keys(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def params(model: Any) -> dict:
    """The frozen params of an NNX model (or of its ``nnx.State``) as a plain nested dict with string keys.

    These are the paths adapters use (``blocks/0/lin/kernel``); pass this dict (or the ``nnx.State`` from
    ``nnx.split(model, nnx.Param, ...)``) as ``params`` to :func:`jlora.apply` and the train step.

    Examples:
        >>> from flax import nnx
        >>> jax.tree.map(jnp.shape, params(nnx.Linear(3, 2, rngs=nnx.Rngs(0))))
        {'bias': (2,), 'kernel': (3, 2)}
    """
    if isinstance(model, nnx.GraphDef):
        raise ValueError("a graphdef holds no params: pass the model, or the param state from "
                         "`graphdef, params, rest = nnx.split(model, nnx.Param, ...)`")
    state = nnx.state(model, nnx.Param) if isinstance(model, nnx.Module) else model
    return _str_keys(nnx.to_pure_dict(state))


def _variables(module: nnx.Module) -> dict[str, nnx.Variable]:
    return {"/".join(map(str, p)): v for p, v in nnx.iter_graph(module) if isinstance(v, nnx.Variable)}


def _layers(module: nnx.Module) -> dict[str, Any]:
    return {"/".join(map(str, p)): v for p, v in nnx.iter_graph(module) if isinstance(v, nnx.Module)}


def _set_params(module: nnx.Module, flat: Mapping[str, Any], *, complete: bool) -> None:
    """Sets the ``nnx.Param`` values of ``module`` from ``{path: array}``; with ``complete``, all of them."""
    found = {p: v for p, v in _variables(module).items() if isinstance(v, nnx.Param)}
    unknown = sorted(set(flat) - set(found))
    if unknown:
        raise ValueError(f"the params hold paths {unknown[:5]} that the NNX model has no nnx.Param at; they were "
                         f"taken from a different model. Its param paths look like: {sorted(found)[:8]}")
    missing = sorted(set(found) - set(flat)) if complete else []
    if missing:
        raise ValueError(f"the params lack {missing[:5]} of the NNX model's nnx.Param paths; pass all of them "
                         f"(jlora.nnx.params(model), or the state from nnx.split(model, nnx.Param, ...))")
    for path, value in flat.items():
        found[path].set_value(value)


def _fresh(model: Any, params_in: Any, variables: Any) -> nnx.Module:
    """A new module (the user's untouched) with ``params_in`` as its params and ``variables`` as other state."""
    if isinstance(model, nnx.GraphDef):
        if not isinstance(params_in, nnx.State):
            raise ValueError("with a graphdef, pass the param state itself: `graphdef, params, rest = "
                             "nnx.split(model, nnx.Param, ...)`, then apply(graphdef, params, ..., variables=rest); "
                             "or pass the model instead of its graphdef")
        others = () if variables is None else tuple(variables) if isinstance(variables, (tuple, list)) else (variables,)
        try:
            return nnx.merge(model, params_in, *others, copy=True)
        except ValueError as e:   # nnx's own words count leaves only
            given = "the params and `variables`" if others else "the params alone (no `variables`)"
            raise ValueError(f"the graphdef does not fit {given}: {e}. Pass all the state nnx.split gave with it: "
                             f"`graphdef, params, rest = nnx.split(model, nnx.Param, ...)`, then apply(graphdef, "
                             f"params, ..., variables=rest); or pass the model instead of its graphdef") from e
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    if variables is not None:
        rest = variables
    if isinstance(params_in, nnx.State):
        return nnx.merge(graphdef, params_in, rest, copy=True)
    module = nnx.merge(graphdef, state, rest, copy=True)
    _set_params(module, tree_lib.flatten(params_in), complete=True)
    return module


def _reseed(module: nnx.Module, rngs: Mapping[str, jax.Array] | None) -> None:
    """Reseeds ``module``'s RNG streams (in place) from ``rngs``, as ``nnx.reseed`` does: each name's streams, and
    for the first name the module has no stream of, its ``default`` streams (which ``nnx.Rngs`` hands out in place
    of a stream it lacks: ``nnx.Dropout(rate, rngs=nnx.Rngs(0))`` draws from one). Other names are ignored."""
    keys = {name: key for name, key in (rngs or {}).items() if name != transform.DROPOUT_RNG}
    if not keys:   # the common call (no rngs, or LoRA dropout's only): no walk over the module's graph
        return
    tags = {node.tag for _, node in nnx.iter_graph(module) if isinstance(node, nnx.RngStream)}
    missing = [key for name, key in keys.items() if name not in tags]
    keys = {name: key for name, key in keys.items() if name in tags}
    if missing and "default" in tags and "default" not in keys:
        keys["default"] = missing[0]
    if keys:
        nnx.reseed(module, policy="match_shape", **keys)


# --- adapted layers -----------------------------------------------------------------------------------------------

_ADAPTED: dict[type, type] = {}
_INNER: dict[type, type] = {}


class _Calls(threading.local):
    """Per thread: ``[layer, whether the layer class's own method added the update]`` per overriding call."""

    def __init__(self):
        self.stack: list[list] = []


_CALLS = _Calls()


def _adapted_class(cls: type) -> type:
    """The subclass of the layer class ``cls`` whose calls add the low-rank path (made once per class).

    When ``cls`` overrides the layer's method (a user's subclass of ``nnx.Linear``), the update goes where the
    override calls the layer's own method (``super().__call__``): the adapted class puts a subclass of the jlora
    layer class that adds it between ``cls`` and that class, so ``2 * super().__call__(x)`` doubles the update as
    merging does. An override that never calls it gets the update added to what it returns."""
    if cls in _ADAPTED.values():
        return cls
    if cls not in _ADAPTED:
        base = next(b for b, _ in _KINDS if issubclass(cls, b))
        names = ("__call__", "attend") if issubclass(cls, nnx.Embed) else ("__call__",)
        overridden = {m for m in names if getattr(cls, m) is not getattr(base, m)}
        bases = (cls,)
        if overridden:
            if base not in _INNER:
                _INNER[base] = type(f"{base.__name__}AdaptedInside", (base,), {
                    **{m: _adapted_method(base, m, inner=True) for m in names}, "__module__": __name__})
            bases = (cls, _INNER[base])
        methods = {m: _adapted_method(cls, m, outer=m in overridden) for m in names}
        _ADAPTED[cls] = type(f"{cls.__name__}WithAdapter", bases, {**methods, "__module__": __name__})
    return _ADAPTED[cls]


def _base_class(cls: type) -> type:
    return next((base for base, adapted in _ADAPTED.items() if adapted is cls), cls)


def _dropout(layer, rate: float):
    """The LoRA-dropout of one call of an adapted layer, or None. Each call draws its mask from the layer's key and
    moves the key on (as ``nnx.Rngs`` does for ``nnx.Dropout``), so an attached model gets a fresh mask per call
    under ``nnx.jit``; ``jlora.apply`` starts from the caller's key every time."""
    if rate <= 0 or not hasattr(layer, "jlora_dropout_key"):
        return None
    var = layer.jlora_dropout_key
    keys = var.get_value()
    if jnp.shape(keys) != ():
        raise ValueError(f"the LoRA-dropout key of the layer at {layer.jlora_info.path!r} has shape "
                         f"{jnp.shape(keys)} inside the layer's call (one key per stacked layer, not sliced): "
                         f"{_SLICE_HINT}")
    pairs = jax.vmap(jax.random.split)(keys.reshape(-1)).reshape(*keys.shape, 2)
    var.set_value(pairs[..., 0])
    key = pairs[..., 1]

    def dropout(v):
        keep = jax.random.bernoulli(key, 1.0 - rate, v.shape)
        return jnp.where(keep, v / (1.0 - rate), jnp.zeros_like(v))

    return dropout


def _adapted_method(cls: type, method: str, *, outer: bool = False, inner: bool = False):
    """``cls``'s ``method`` plus the low-rank path. ``outer``: ``cls`` overrides the method, and the path is added
    here only when the override did not call the ``inner`` one (the jlora layer class's own, which adds it)."""
    base = getattr(cls, method)

    @functools.wraps(base)
    def call(self, *args, **kwargs):
        stack = _CALLS.stack
        if outer:
            stack.append([self, False])
            try:
                y = base(self, *args, **kwargs)
            finally:
                added = stack.pop()[1]
            return y if added else _add_update(self, method, y, args, kwargs)
        y = base(self, *args, **kwargs)
        if inner and stack and stack[-1][0] is self:
            stack[-1][1] = True
        return _add_update(self, method, y, args, kwargs)

    return call


def _add_update(layer, method: str, y, args, kwargs):
    """The output ``y`` of an adapted layer's ``method`` plus its low-rank path (or its variant's layer call)."""
    info: _Info = layer.jlora_info
    node = info.adapter(layer)
    kernel = getattr(layer, transform.leaf_name(info.kind)).get_value()
    einsum_str = kwargs.get("einsum_str", args[1] if info.kind == "Einsum" and len(args) > 1 else None)
    where = info.path.rsplit("/", 1)[0] if "/" in info.path else ""
    spec = layer_spec(layer, info.kind, tuple(jnp.shape(kernel)), where, einsum_str)
    transform.check_node(spec, node, info.path, f"nnx.{_base_class(type(layer)).__name__}",
                         stacked_hint=_SLICE_HINT if info.layout is not None and info.layout.lead else None)
    info.trace.used.add(info.path)
    x = adapter_lib.layer_input(args, kwargs)
    dropout = _dropout(layer, info.trace.cfg.dropout) if info.kind != "Embed" else None
    var = adapter_lib.variant(node.variant)
    if var.layer_call is not None:
        bias = getattr(layer, "bias", None)
        return var.layer_call(LayerCall(
            module=layer, method=method, x=x, y=y, kernel=lora_lib.dense_value(kernel),
            bias=None if bias is None else bias.get_value(), adapter=node, scale=info.scale,
            dtype=spec.dtype or y.dtype, dropout=dropout, path=info.path, ids=info.trace.ids, kind=info.kind,
            kwargs=kwargs, spec=spec))
    return y + transform.low_rank(spec, method, x, node, info.scale, y, dropout)


def _attach(module: nnx.Module, adapters: Mapping, cfg: LoraConfig, trace: _Trace, rngs=None) -> None:
    """Puts each adapter on its layer of ``module`` (in place): the variable, the info and the adapted class."""
    layers = _layers(module)
    key = (rngs or {}).get(transform.DROPOUT_RNG) if cfg.dropout > 0 else None
    for path, node in adapter_lib.adapter_items(adapters):
        mpath, leaf = path.rsplit("/", 1) if "/" in path else ("", path)
        layer = layers.get(mpath)
        kind = _kind(layer)
        if kind is None:
            what = "no layer" if layer is None else f"an nnx.{type(layer).__name__} layer"
            raise ValueError(f"the adapter at {path!r} targets a parameter of {what} at {mpath!r}, which jlora does "
                             f"not adapt (it adapts {_SUPPORTED}). Exclude it from the targets, or use jlora.merge "
                             f"to fold it into the params.")
        if leaf != transform.leaf_name(kind):
            raise ValueError(f"the adapter at {path!r} targets {leaf!r} of an nnx.{type(layer).__name__}; its "
                             f"adapted parameter is {transform.leaf_name(kind)!r}. Target "
                             f"{mpath}/{transform.leaf_name(kind)} instead.")
        layer.__class__ = _adapted_class(type(layer))
        layer.jlora_a, layer.jlora_b = AdapterParam(node.a), AdapterParam(node.b)
        for name, value in node.extras.items():
            setattr(layer, f"jlora_{name}", AdapterParam(value))
        layer.jlora_info = _Info(path, kind, cfg.scale(path), trace, tuple(node.extras), node.layout, node.variant,
                                 type(node))
        if key is not None:
            lead = tuple(jnp.shape(getattr(layer, leaf).get_value()))[:node.layout.lead if node.layout else 0]
            keys = jax.random.split(jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF),
                                    math.prod(lead)).reshape(lead)
            layer.jlora_dropout_key = DropoutKey(keys)


def _strip(module: nnx.Module) -> dict:
    """Removes every adapter from ``module`` (in place); returns them as an adapter tree."""
    out = {}
    for _, layer in _layers(module).items():
        if hasattr(layer, "jlora_info"):
            info = layer.jlora_info
            out[info.path] = info.adapter(layer)
            for name in ("a", "b", *info.extras, "info", "dropout_key"):
                if hasattr(layer, f"jlora_{name}"):
                    delattr(layer, f"jlora_{name}")
            layer.__class__ = _base_class(type(layer))
    return tree_lib.unflatten(out)


# --- the functional API (what jlora.apply / init / layout / merge call for NNX) -------------------------------------

def apply(model: Any, params_in: Any, adapters: Mapping, cfg: LoraConfig, *args, variables: Any = None,
          rngs: Mapping[str, jax.Array] | None = None, method=None, mutable: bool = False,
          adapter_ids: jax.Array | None = None, **kwargs) -> Any:
    """Runs an NNX model with unmerged adapters; what :func:`jlora.apply` does for an NNX model or graphdef.

    Unlike a call of the model, this is a pure function: it runs a copy of the model made from the given state
    (``variables``, else the model's own), so the same arguments give the same output and the model's RNG state
    never moves on. The model's own ``nnx.Dropout`` thus draws the same mask on every call; for a new mask, pass a
    new key (``rngs={"dropout": key}``: :func:`jlora.make_train_step` passes one per step), or thread the state
    (``out, state = apply(..., mutable=True)``, then ``apply(..., variables=state)``), which continues as calling
    the model twice would.

    Args:
        model: an ``nnx.Module``, or the graphdef from ``nnx.split``.
        params_in: its frozen params: :func:`params` of the model, or the ``nnx.State`` from
            ``nnx.split(model, nnx.Param, ...)`` (required with a graphdef).
        adapters: the adapter tree from :func:`jlora.init`.
        cfg: the LoRA config the adapters were made with.
        *args: positional arguments of the model call.
        variables: the model's other state (an ``nnx.State``, or a tuple of them), e.g. the ``rest`` of
            ``nnx.split(model, nnx.Param, ...)``; with a model, its own by default.
        rngs: ``{"lora_dropout": key}`` turns on LoRA dropout when ``cfg.dropout > 0``; any other name reseeds
            the model's RNG streams of that name (``{"dropout": key}`` for its ``nnx.Dropout``), as ``nnx.reseed``
            does on a copy. A model without a stream of that name has its ``default`` streams reseeded instead (by
            the first such name), those ``nnx.Rngs`` hands out for a name it lacks (a model built with
            ``nnx.Rngs(0)``); without either, the name is ignored.
        method: name of a method to call instead of ``__call__`` (or a function ``f(model, *args, **kwargs)``).
        mutable: if true, return ``(output, state)`` with the model's non-param state after the call (batch
            statistics, caches, RNG counts): NNX layers update these in place, and the user's model is untouched.
        adapter_ids: for a bank of adapters (:mod:`jlora.bank`), the slot of each batch row.
        **kwargs: keyword arguments of the model call.

    Returns:
        The model's output, or ``(output, state)`` with ``mutable``.

    Examples:
        >>> import jlora
        >>> class Net(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.lin, self.drop = nnx.Linear(8, 8, rngs=rngs), nnx.Dropout(0.5, rngs=rngs)
        ...     def __call__(self, x):
        ...         return self.drop(self.lin(x))
        >>> model, x = Net(nnx.Rngs(0)), jnp.ones((1, 8))
        >>> cfg = jlora.LoraConfig(rank=2, targets="lin")
        >>> p, ad = params(model), jlora.init(model, cfg, key=jax.random.key(1))
        >>> run = lambda **kw: jlora.apply(model, p, ad, cfg, x, **kw)
        >>> bool(jnp.array_equal(run(), run()))                    # pure: the same mask
        True
        >>> k1, k2 = jax.random.key(1), jax.random.key(2)
        >>> bool(jnp.array_equal(run(rngs={"dropout": k1}), run(rngs={"dropout": k1})))
        True
        >>> bool(jnp.array_equal(run(rngs={"dropout": k1}), run(rngs={"dropout": k2})))
        False
    """
    quantized = [tree_lib.path_str(p) for p, leaf in jax.tree_util.tree_flatten_with_path(
        params_in, is_leaf=lambda x: adapter_lib.kernel_type(x) is not None)[0] if adapter_lib.kernel_type(leaf)]
    if quantized:
        raise ValueError(f"the params hold quantized kernels at {quantized[:3]}; quantized kernels (jlora.quantize) "
                         f"work with Flax Linen models only: pass this NNX model's plain params, or use a Linen model")
    module = _fresh(model, params_in, variables)
    lora_lib.check_fits(params(params_in) if isinstance(params_in, nnx.State) else params_in, adapters, cfg)
    full = dict(adapter_lib.full_items(adapters))
    if full:
        _set_params(module, full, complete=False)
    _attach(module, adapters, cfg, _Trace(cfg, adapter_ids), rngs)
    _reseed(module, rngs)
    if method is None:
        out = module(*args, **kwargs)
    elif isinstance(method, str):
        out = getattr(module, method)(*args, **kwargs)
    else:
        out = method(module, *args, **kwargs)
    if mutable:
        _strip(module)
        return out, nnx.state(module, nnx.Not(nnx.Param))
    return out


def layout(model: Any, *args, method=None, **kwargs) -> Layout:
    """The :class:`jlora.KernelLayout` of every kernel an adapted NNX layer uses, read off the layers (no trace).

    ``jlora.layout(model)`` calls this for an NNX model; example arguments are accepted and not needed. Kernels of
    layers jlora does not adapt are listed in ``Layout.unsupported`` with their class, and those of layers set up in
    a way LoRA cannot follow in ``Layout.refused`` with the reason, so targeting one is a clear error.

    Examples:
        >>> from flax import nnx
        >>> layer = nnx.LinearGeneral(16, (4, 8), rngs=nnx.Rngs(0))
        >>> layout(layer)["kernel"]
        KernelLayout(kind='DenseGeneral', in_axes=(0,), out_axes=(1, 2), lead=0, traced=True)
    """
    if isinstance(model, nnx.GraphDef):
        raise ValueError("jlora.layout needs the NNX model, not its graphdef (an abstract one from "
                         "nnx.eval_shape(lambda: Model(...)) will do)")
    result = Layout()
    for mpath, layer in _layers(model).items():
        prefix = f"{mpath}/" if mpath else ""
        kind = _kind(layer)
        if kind is None:
            for leaf in ("kernel", "embedding"):
                if isinstance(vars(layer).get(leaf), nnx.Variable):
                    result.unsupported[prefix + leaf] = f"nnx.{type(layer).__name__}"
            continue
        shape = tuple(getattr(layer, transform.leaf_name(kind)).shape)
        try:
            lead = len(shape) - _per_layer_ndim(layer, kind, mpath)
            spec = layer_spec(layer, kind, shape[lead:], mpath)
        except ValueError as e:      # a layer of a kind jlora adapts, set up in a way it does not: an error if targeted
            result.refused[prefix + transform.leaf_name(kind)] = str(e)
            continue
        result[prefix + transform.leaf_name(kind)] = dataclasses.replace(spec.layout, lead=lead)
    return result


def rebuild(obj: Any, plain: Mapping) -> Any:
    """``obj`` (an NNX model or param state) with the params ``plain``: a new object, ``obj`` untouched. A model
    that carries adapters (:func:`attach`) comes back without them: merging folds adapters into the params, and
    keeping the attached ones would add them a second time."""
    if isinstance(obj, nnx.Module):
        graphdef, state = nnx.split(obj)
        module = nnx.merge(graphdef, state, copy=True)
        _strip(module)
        _set_params(module, tree_lib.flatten(plain), complete=False)
        return module
    if isinstance(obj, nnx.State):
        state = jax.tree.map(lambda v: v, obj)
        nnx.replace_by_pure_dict(state, plain)
        return state
    raise ValueError(f"cannot merge into an {type(obj).__name__}: pass the NNX model or its param state")


def layout_or_none(obj: Any, *args, **kwargs) -> Layout | None:
    """:func:`layout` of an NNX model; None for a param state, which cannot tell (the model system's hook)."""
    return layout(obj, *args, **kwargs) if isinstance(obj, nnx.Module) else None


# --- the NNX-idiomatic way ----------------------------------------------------------------------------------------

def attach(model: nnx.Module, adapters: Mapping, cfg: LoraConfig, *, rngs: Mapping[str, jax.Array] | None = None
           ) -> nnx.Module:
    """Puts ``adapters`` on ``model``'s layers, in place, so that ``model(x)`` runs adapted; returns ``model``.

    Each adapted layer gets :class:`AdapterParam` variables holding its adapter's arrays, so NNX's own tools select
    the adapters with that filter: ``nnx.Optimizer(model, tx, wrt=jlora.nnx.AdapterParam)``,
    ``nnx.grad(loss, argnums=nnx.DiffState(0, jlora.nnx.AdapterParam))``. The output equals
    ``jlora.apply(model, ...)`` with the same adapters. :func:`adapters` reads them back, :func:`detach` removes
    them. LoRA dropout (``cfg.dropout > 0``) needs ``rngs={"lora_dropout": key}``; each call draws a fresh mask
    and moves the adapted layer's key on, as ``nnx.Dropout`` does with ``nnx.Rngs``, so call the model under
    ``nnx.jit`` (not ``jax.jit``) when it trains with dropout.

    Examples:
        >>> import jlora
        >>> from flax import nnx
        >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        >>> cfg = jlora.LoraConfig(rank=2, targets="kernel")
        >>> type(attach(model, jlora.init(model, cfg, key=jax.random.key(0)), cfg)).__name__
        'LinearWithAdapter'
        >>> jax.tree.map(jnp.shape, adapters(model))
        {'kernel': Adapter(a=(4, 2), b=(2, 3))}
    """
    if any(hasattr(layer, "jlora_info") for layer in _layers(model).values()):
        raise ValueError("the model already carries adapters: jlora.nnx.detach(model) first")
    lora_lib.check_fits(params(model), adapters, cfg)
    full = dict(adapter_lib.full_items(adapters))
    if full:
        raise ValueError(f"attach takes LoRA adapters only; whole trained tensors at {sorted(full)[:5]} "
                         f"(bias/modules_to_save) belong in the params: train them with jlora.apply")
    _attach(model, adapters, cfg, _Trace(cfg), rngs)
    return model


def adapters(model: nnx.Module) -> dict:
    """The adapter tree currently attached to ``model`` (its :class:`AdapterParam` values), by param path."""
    return tree_lib.unflatten({layer.jlora_info.path: layer.jlora_info.adapter(layer)
                               for layer in _layers(model).values() if hasattr(layer, "jlora_info")})


def detach(model: nnx.Module) -> dict:
    """Removes the adapters :func:`attach` put on ``model`` (in place); returns them as an adapter tree."""
    return _strip(model)


# --- Flax's own LoRA layers -----------------------------------------------------------------------------------------

def _flax_lora_layers(model: nnx.Module) -> dict[str, Any]:
    """``{adapter path: nnx.LoRA module}`` for every ``nnx.LoRALinear`` and ``nnx.LoRA(base_module=...)``.

    An ``nnx.LoRALinear`` at ``X`` keeps ``nnx.Linear``'s state layout, so its adapter path is ``X/kernel``; an
    ``nnx.LoRA`` wrapper at ``X`` stands where its base layer stands in the plain model, so its path is
    ``X/kernel`` as well.
    """
    out = {}
    for mpath, layer in _layers(model).items():
        prefix = f"{mpath}/" if mpath else ""
        if isinstance(layer, nnx.LoRALinear):
            out[prefix + "kernel"] = layer.lora
        elif isinstance(layer, nnx.LoRA) and layer.base_module is not None and not any(
                isinstance(parent, nnx.LoRALinear) and parent.lora is layer for parent in _layers(model).values()):
            out[prefix + "kernel"] = layer
    return out


def _check_flax_base(path: str, lora: Any) -> None:
    """Raises unless the Flax LoRA layer for ``path`` adapts an ``nnx.Linear``: ``nnx.LoRA`` adds ``x @ lora_a @
    lora_b`` to any base module's output, which is what a jlora adapter adds only for a linear layer."""
    base = getattr(lora, "base_module", None)
    if base is not None and not isinstance(base, nnx.Linear):
        mpath = path.rsplit("/", 1)[0] if "/" in path else ""
        raise ValueError(f"the Flax LoRA layer at {mpath!r} is an nnx.LoRA(base_module=nnx.{type(base).__name__}); "
                         f"jlora converts Flax LoRA layers of nnx.Linear only (nnx.LoRA adds x @ lora_a @ lora_b to "
                         f"the base's output, which no jlora adapter of an nnx.{type(base).__name__} kernel computes). "
                         f"Build that layer as a plain nnx.{type(base).__name__} and make its adapter with jlora.init, "
                         f"or use nnx.LoRALinear / nnx.LoRA(base_module=nnx.Linear(...)) there")


def from_flax_lora(model: nnx.Module, cfg: LoraConfig) -> dict:
    """Adapters from a model built with Flax's ``nnx.LoRALinear``/``nnx.LoRA`` layers.

    Flax's LoRA computes ``x @ lora_a @ lora_b`` (no scale), jlora ``scale * (x @ a) @ b``, so ``a = lora_a`` and
    ``b = lora_b / scale`` with ``scale`` from ``cfg`` at each path; the rank must be ``cfg``'s. An ``nnx.LoRA``
    whose ``base_module`` is not an ``nnx.Linear`` (an ``nnx.Conv``, say) is refused: no jlora adapter computes its
    update.

    Examples:
        >>> import jlora
        >>> from flax import nnx
        >>> layer = nnx.LoRALinear(4, 3, lora_rank=2, rngs=nnx.Rngs(0))
        >>> jax.tree.map(jnp.shape, from_flax_lora(layer, jlora.LoraConfig(rank=2, targets="kernel")))
        {'kernel': Adapter(a=(4, 2), b=(2, 3))}
    """
    out = {}
    for path, lora in _flax_lora_layers(model).items():
        _check_flax_base(path, lora)
        a, b = lora.lora_a.get_value(), lora.lora_b.get_value()
        if a.shape[-1] != cfg.rank_for(path):
            raise ValueError(f"the Flax LoRA layer at {path!r} has rank {a.shape[-1]} but the config gives rank "
                             f"{cfg.rank_for(path)} there; use a config with that rank")
        scale = cfg.scale(path)
        out[path] = Adapter(a, (b / scale).astype(b.dtype), layout=KernelLayout("Dense"))
    if not out:
        raise ValueError("the model has no nnx.LoRALinear or nnx.LoRA(base_module=...) layer to read adapters from")
    return tree_lib.unflatten(out)


def to_flax_lora(model: nnx.Module, adapters_in: Mapping, cfg: LoraConfig) -> nnx.Module:
    """Writes ``adapters_in`` into the ``lora_a``/``lora_b`` params of a model built with Flax's LoRA layers.

    The inverse of :func:`from_flax_lora` (``lora_b = scale * b``), in place; returns ``model``. Every adapter
    needs an ``nnx.LoRALinear`` or ``nnx.LoRA`` layer of the same rank at its path; DoRA adapters and whole
    trained tensors have no Flax counterpart and are refused; every check runs before anything is written, so a
    refused call leaves the model as it was.
    """
    layers = _flax_lora_layers(model)
    for path, node in adapter_lib.adapter_items(adapters_in):
        if path not in layers:
            raise ValueError(f"the adapter at {path!r} has no nnx.LoRALinear/nnx.LoRA layer in the model (Flax LoRA "
                             f"layers are at {sorted(layers)[:8]}); build the model with LoRA layers there")
        _check_flax_base(path, layers[path])
        if node.variant != "lora" or node.extras:
            raise ValueError(f"the adapter at {path!r} is a {node.variant!r} adapter; Flax's LoRA layers hold plain "
                             f"LoRA only")
        lora = layers[path]
        if tuple(lora.lora_a.shape) != tuple(jnp.shape(node.a)) or tuple(lora.lora_b.shape) != tuple(
                jnp.shape(node.b)):
            raise ValueError(f"the adapter at {path!r} (a {tuple(jnp.shape(node.a))}, b {tuple(jnp.shape(node.b))}) "
                             f"does not fit the Flax LoRA layer there (lora_a {tuple(lora.lora_a.shape)}, lora_b "
                             f"{tuple(lora.lora_b.shape)})")
    full = sorted(p for p, _ in adapter_lib.full_items(adapters_in))
    if full:
        raise ValueError(f"whole trained tensors at {full[:5]} have no place in Flax's LoRA layers; merge them into "
                         f"the params instead")
    for path, node in adapter_lib.adapter_items(adapters_in):     # checked all: now write
        lora = layers[path]
        lora.lora_a.set_value(jnp.asarray(node.a, lora.lora_a.dtype))
        lora.lora_b.set_value(jnp.asarray(cfg.scale(path) * node.b, lora.lora_b.dtype))
    return model


__all__ = ["AdapterState", "AdapterParam", "DropoutKey", "apply", "layout", "params", "attach", "adapters", "detach",
           "from_flax_lora", "to_flax_lora", "layer_spec", "layout_or_none", "rebuild"]
