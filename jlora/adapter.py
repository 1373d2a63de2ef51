"""The adapter node, the kernel layouts it records, and the two hook tables through which variants plug in.

An adapter tree mirrors the parameter tree but holds only what trains. At the path of every adapted kernel (or
embedding table) it holds an :class:`Adapter`: the factors ``a`` ``(..., in, r)`` and ``b`` ``(..., r, out)``,
optional extra trained arrays (DoRA's magnitude ``m``), the :class:`KernelLayout` of the kernel it was made for,
and the name of its variant. ``Adapter`` is a registered pytree node, so ``jit``, ``grad``, optax, ``nn.scan`` and
orbax see its arrays as ordinary leaves (key paths ``.../kernel/a``, ``.../kernel/b``), while every jlora
function recognizes an adapter by its type, never by the keys of a dict. Any other leaf of an adapter tree is a
whole trained tensor (``bias``/``modules_to_save``) that replaces the frozen parameter at its path.

Variants hook in through two small tables, so the core never imports them:

- :func:`register_variant` adds a kind of adapter (``Adapter.variant``): how its extras are initialized, how it
  merges into a kernel, and how an adapted layer computes its output. The core registers ``"lora"``;
  ``jlora.variants`` registers ``"dora"``.
- :func:`register_kernel_type` adds a kind of frozen kernel leaf (``jlora.variants.quant`` registers NF4): how to
  read it as a dense array, rebuild it from a merged array, and compute the layer that uses it.

Examples:
    >>> import jax, jax.numpy as jnp
    >>> ad = Adapter(jnp.zeros((8, 2)), jnp.zeros((2, 4)))
    >>> ad.rank, [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(ad)[0]]
    (2, ['.a', '.b'])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

# Layer kinds the transform handles and the layouts it records for them.
LAYER_KINDS = ("Dense", "DenseGeneral", "Embed", "Einsum", "Conv")


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """A convolution's geometry, which a conv adapter's A convolution shares (B is a 1x1 convolution).

    Attributes:
        kernel_size: the spatial kernel size, one entry per spatial dim (1 to 3).
        strides, input_dilation, kernel_dilation: one entry per spatial dim.
        padding: ``"SAME"``, ``"VALID"``, ``"SAME_LOWER"``, ``"CIRCULAR"``, ``"REFLECT"``, ``"CAUSAL"`` (1-D), or
            one ``(low, high)`` pair per spatial dim.
        feature_group_count: the layer's groups: the kernel is ``(*kernel_size, in / groups, out)``.
    """

    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    padding: str | tuple[tuple[int, int], ...]
    input_dilation: tuple[int, ...]
    kernel_dilation: tuple[int, ...]
    feature_group_count: int = 1

    @classmethod
    def of(cls, layer: Any, where: str = "") -> "ConvSpec":
        """Reads the geometry off a ``flax.linen.Conv`` or ``flax.nnx.Conv`` (they share the attribute names).

        Examples:
            >>> import flax.linen as nn
            >>> ConvSpec.of(nn.Conv(8, (3, 3), strides=2, padding=1, feature_group_count=2))
            ... # doctest: +NORMALIZE_WHITESPACE
            ConvSpec(kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), input_dilation=(1, 1),
                     kernel_dilation=(1, 1), feature_group_count=2)
        """
        k = (layer.kernel_size,) if isinstance(layer.kernel_size, int) else tuple(layer.kernel_size)

        def each(v):   # an int (or None: 1) for every spatial dim, or one entry per dim
            return (1 if v is None else v,) * len(k) if v is None or isinstance(v, int) else tuple(v)

        pad = layer.padding
        if not isinstance(pad, str):
            pads = [pad] * len(k) if isinstance(pad, int) else list(pad)
            pad = tuple((p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in pads)
        if getattr(layer, "mask", None) is not None:
            raise ValueError(f"the {type(layer).__name__} layer at {where!r} has a kernel mask, which LoRA does not "
                             f"support (the update would not be masked); exclude it from the targets")
        if pad == "CAUSAL" and len(k) != 1:
            raise ValueError(f"the {type(layer).__name__} layer at {where!r} uses CAUSAL padding with a "
                             f"{len(k)}-D kernel; CAUSAL padding is for 1-D convolutions only")
        return cls(k, each(layer.strides), pad, each(layer.input_dilation), each(layer.kernel_dilation),
                   int(layer.feature_group_count))


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """How a kernel's axes map onto an adapter's ``(in, r)`` and ``(r, out)`` factors.

    Attributes:
        kind: the layer class that uses the kernel (one of :data:`LAYER_KINDS`).
        in_axes: axes of the per-layer kernel contracted with the layer's input (for an embedding table: the
            vocabulary axis).
        out_axes: the remaining axes, which index the layer's output features.
        lead: number of leading stacked axes (e.g. 1 for a layer stack under ``nn.scan``).
        traced: whether the layout was read off the layer by tracing (:func:`jlora.layout`). ``False`` means it is
            the ``(in, out)`` convention of ``nn.Dense``/``nn.Embed`` that :func:`jlora.init` takes for a 2-D
            kernel when given no layout; :func:`jlora.apply` checks it against the layer that uses the kernel.
        conv: a ``Conv`` kernel's :class:`ConvSpec` (its groups shape the adapter: ``b`` is ``(r / groups, out)``).
    """

    kind: str
    in_axes: tuple[int, ...] = (0,)
    out_axes: tuple[int, ...] = (1,)
    lead: int = 0
    traced: bool = True
    conv: ConvSpec | None = None

    def __repr__(self) -> str:    # conv only where there is one
        shown = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                 if f.name != "conv" or self.conv]
        return f"KernelLayout({', '.join(shown)})"

    @property
    def groups(self) -> int:
        """A grouped convolution's groups (1 for every other kernel)."""
        return self.conv.feature_group_count if self.conv is not None else 1

    def split(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
        """Returns ``(lead_shape, fan_in, fan_out)`` for a kernel of ``shape``."""
        per_layer = shape[self.lead:]
        if len(per_layer) != len(self.in_axes) + len(self.out_axes):
            raise ValueError(f"layout {self} does not fit a kernel of shape {tuple(shape)}")
        fan_in = math.prod(per_layer[i] for i in self.in_axes)
        fan_out = math.prod(per_layer[i] for i in self.out_axes)
        return tuple(shape[:self.lead]), fan_in, fan_out

    def fitted(self, shape: tuple[int, ...]) -> "KernelLayout":
        """This layout with ``lead`` set from a kernel's ``shape`` (a stacked or unstacked copy of the kernel)."""
        lead = len(shape) - len(self.in_axes) - len(self.out_axes)
        return self if lead == self.lead or lead < 0 else dataclasses.replace(self, lead=lead)

    def same_axes(self, other: "KernelLayout") -> bool:
        """Whether both layouts read a kernel the same way (kind, traced and lead aside)."""
        return (self.in_axes, self.out_axes, self.groups) == (other.in_axes, other.out_axes, other.groups)

    def describe(self) -> str:
        """``"(in, out)"``-style text of the per-layer axes, for error messages."""
        n = len(self.in_axes) + len(self.out_axes)
        names = ["in" if i in self.in_axes else "out" for i in range(n)]
        return "(" + ", ".join(names) + (f"; groups={self.groups}" if self.groups > 1 else "") + ")"


class Layout(dict):
    """``{param path: KernelLayout}`` for every kernel a supported layer uses, from :func:`jlora.layout`.

    ``unsupported`` maps the paths of kernels used by other layer kinds (``nn.ConvTranspose``, ...) to their class
    names, and ``refused`` those of layers of a kind jlora adapts, set up in a way LoRA cannot follow (a masked
    ``nn.Conv``, ...), to the reason, so that targeting one gives an error naming the kind or the reason.
    """

    def __init__(self, entries=(), unsupported=None, refused=None):
        super().__init__(entries)
        self.unsupported = dict(unsupported or {})
        self.refused = dict(refused or {})


@jax.tree_util.register_pytree_with_keys_class
class Adapter:
    """One adapted kernel's trainable factors: ``a`` ``(..., in, r)``, ``b`` ``(..., r, out)`` and extras.

    Args:
        a: the down-projection factor.
        b: the up-projection factor.
        extras: further trained arrays of the variant, by name (DoRA: ``{"m": (..., out)}``).
        layout: the :class:`KernelLayout` of the kernel it adapts; merging reads it, so a merge needs no layout.
        variant: the registered variant that computes it (``"lora"``, ``"dora"``).
    """

    __slots__ = ("a", "b", "extras", "layout", "variant")
    slot_dims = 0   # axes between the layer-stack axes and (in, r): 1 for a bank of slots (jlora.bank.Slots)

    def __init__(self, a, b, extras: Mapping[str, Any] | None = None, *, layout: KernelLayout | None = None,
                 variant: str = "lora"):
        self.a, self.b = a, b
        self.extras = dict(sorted((extras or {}).items()))
        self.layout = layout
        self.variant = variant

    @property
    def rank(self) -> int:
        return int(np.shape(self.a)[-1])

    def replace(self, **changes) -> "Adapter":
        """A copy with some fields changed (``a=``, ``b=``, ``extras=``, ``layout=``, ``variant=``)."""
        fields = {"a": self.a, "b": self.b, "extras": self.extras, "layout": self.layout, "variant": self.variant}
        fields.update(changes)
        return type(self)(fields.pop("a"), fields.pop("b"), fields.pop("extras"), **fields)

    def tree_flatten_with_keys(self):
        names = tuple(self.extras)
        children = [(jax.tree_util.GetAttrKey("a"), self.a), (jax.tree_util.GetAttrKey("b"), self.b)]
        children += [(jax.tree_util.GetAttrKey(n), self.extras[n]) for n in names]
        return children, (names, self.layout, self.variant)

    @classmethod
    def tree_unflatten(cls, aux, children):
        names, layout, variant = aux
        obj = object.__new__(cls)
        obj.a, obj.b = children[0], children[1]
        obj.extras = dict(zip(names, children[2:]))
        obj.layout, obj.variant = layout, variant
        return obj

    def __eq__(self, other) -> bool:
        """Same variant, layout and leaves (arrays compared by value), as dicts of arrays would be."""
        if not isinstance(other, Adapter):
            return NotImplemented
        (xs, tx), (ys, ty) = jax.tree.flatten(self), jax.tree.flatten(other)
        same = lambda x, y: (np.array_equal(x, y) if hasattr(x, "shape") and hasattr(y, "shape")  # noqa: E731
                             else x == y)
        return tx == ty and all(x is y or bool(same(x, y)) for x, y in zip(xs, ys))

    __hash__ = None   # mutable arrays inside, like a dict

    def __repr__(self) -> str:
        def show(x):
            return f"{getattr(x, 'dtype', type(x).__name__)}{list(np.shape(x))}" if hasattr(x, "shape") else repr(x)
        extras = "".join(f", {k}={show(v)}" for k, v in self.extras.items())
        variant = "" if self.variant == "lora" else f", variant={self.variant!r}"
        return f"{type(self).__name__}(a={show(self.a)}, b={show(self.b)}{extras}{variant})"


def is_adapter(x: Any) -> bool:
    return isinstance(x, Adapter)


def _walk(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _walk(v, f"{prefix}/{k}" if prefix else str(k))
    elif tree is not None:
        yield prefix, tree


def adapter_items(adapters: Any) -> Iterator[tuple[str, Adapter]]:
    """Yields ``(param_path, Adapter)`` for every adapter in the tree."""
    return ((p, x) for p, x in _walk(adapters) if isinstance(x, Adapter))


def full_items(adapters: Any) -> Iterator[tuple[str, Any]]:
    """Yields ``(param_path, array)`` for every whole trained tensor (``bias``/``modules_to_save`` leaves)."""
    return ((p, x) for p, x in _walk(adapters) if not isinstance(x, Adapter))


# --- variants ---------------------------------------------------------------------------------------------------

class LayerCall(dict):
    """What a variant's ``layer_call`` hook receives about one adapted layer call (attribute access).

    Keys: ``module``, ``method``, ``x`` (the input), ``y`` (the layer's plain output), ``kernel`` (its dense
    value), ``bias`` (or None), ``adapter``, ``scale``, ``dtype`` (the compute dtype), ``dropout`` (a function
    applying LoRA dropout, or None), ``path``, ``ids`` (the per-row adapter ids given to :func:`jlora.apply`, or
    None), ``kind`` (the layer kind), ``kwargs`` (the call's keyword arguments), ``spec`` (the
    :class:`jlora.transform.LayerSpec`: kernel shape and axes, so a hook needs no module system's API).
    """

    __getattr__ = dict.__getitem__


@dataclasses.dataclass(frozen=True)
class Variant:
    """A kind of adapter: the three hooks through which it differs from plain LoRA.

    Attributes:
        name: the value of ``Adapter.variant``.
        init_extras: ``(kernel fp32, a, b, scale) -> {name: array}``, its extra trained arrays at init.
        merged: ``(kernel fp32, adapter, scale) -> merged kernel fp32`` with the kernel's ``(*lead, in, out)``
            layout; None means ``W + scale * A @ B`` reshaped to the kernel's layout.
        layer_call: ``(LayerCall) -> output`` of an adapted layer; None means ``y + scale * (x @ A) @ B``.
        layers: the layer kinds it supports (an error names any other).
        invertible: whether :func:`jlora.unmerge` can undo its merge.
    """

    name: str
    init_extras: Callable[..., dict] | None = None
    merged: Callable[..., Any] | None = None
    layer_call: Callable[[LayerCall], Any] | None = None
    layers: tuple[str, ...] = LAYER_KINDS
    invertible: bool = True


_VARIANTS: dict[str, Variant] = {}


def register_variant(variant: Variant) -> Variant:
    """Adds (or replaces) a variant in the table; returns it."""
    _VARIANTS[variant.name] = variant
    return variant


def variant(name: str) -> Variant:
    """The registered variant called ``name``."""
    if name not in _VARIANTS:
        raise ValueError(f"no adapter variant {name!r} is registered (known: {sorted(_VARIANTS)}); "
                         f"`import jlora` registers the built-in ones")
    return _VARIANTS[name]


register_variant(Variant("lora"))


# --- kernel types -----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KernelType:
    """A kind of frozen kernel leaf other than a plain array (e.g. a quantized one).

    Attributes:
        cls: the leaf's class.
        dense_value: ``leaf -> fp32 array`` of the kernel's shape.
        rebuild: ``(leaf, fp32 array) -> leaf`` of the same kind holding the new values (after a merge).
        layer_call: ``(module, path, args, kwargs) -> output``, the layer's plain output computed from the leaf.
    """

    cls: type
    dense_value: Callable[[Any], Any]
    rebuild: Callable[[Any, Any], Any]
    layer_call: Callable[..., Any]


_KERNEL_TYPES: dict[type, KernelType] = {}


def register_kernel_type(kernel_type: KernelType) -> KernelType:
    """Adds (or replaces) a kernel type in the table; returns it."""
    _KERNEL_TYPES[kernel_type.cls] = kernel_type
    return kernel_type


def layer_input(args: tuple, kwargs: Mapping[str, Any]) -> Any:
    """The input ``x`` of a layer call ``layer(*args, **kwargs)``: the first positional argument, else the keyword
    Flax's layers name it (``inputs``; ``query`` for ``Embed.attend``), else the first keyword."""
    if args:
        return args[0]
    return kwargs["inputs"] if "inputs" in kwargs else kwargs.get("query", next(iter(kwargs.values())))


def kernel_type(leaf: Any) -> KernelType | None:
    """The registered :class:`KernelType` of ``leaf``, or None for a plain array."""
    return _KERNEL_TYPES.get(type(leaf))


# --- model systems ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelSystem:
    """A way of writing models other than Flax Linen (``jlora.nnx`` registers Flax NNX).

    :func:`jlora.init`, :func:`jlora.apply`, :func:`jlora.layout`, :func:`jlora.merge` and friends ask
    :func:`model_system` whether a model or parameter container belongs to a registered system and, if so, hand it
    over, so the core never imports one.

    Attributes:
        name: for error messages.
        owns: ``obj -> bool``: whether ``obj`` (a model, or a container of its params) belongs to this system.
        params: ``obj -> dict``: its params as a plain nested dict with string keys (the paths adapters use).
        layout: ``(obj, *args, **kwargs) -> Layout | None``: the kernel layouts, or None if ``obj`` cannot tell.
        apply: the system's :func:`jlora.apply` (same signature).
        rebuild: ``(obj, plain params) -> obj`` of the same kind with those params (after a merge).
    """

    name: str
    owns: Callable[[Any], bool]
    params: Callable[[Any], dict]
    layout: Callable[..., Any]
    apply: Callable[..., Any]
    rebuild: Callable[[Any, Any], Any]


_SYSTEMS: list[ModelSystem] = []


def register_model_system(system: ModelSystem) -> ModelSystem:
    """Adds (or replaces, by name) a model system; returns it."""
    _SYSTEMS[:] = [s for s in _SYSTEMS if s.name != system.name] + [system]
    return system


def model_system(obj: Any) -> ModelSystem | None:
    """The registered :class:`ModelSystem` that owns ``obj``, or None (a Linen model or a plain dict)."""
    return next((s for s in _SYSTEMS if s.owns(obj)), None)


__all__ = ["Adapter", "ConvSpec", "KernelLayout", "Layout", "LayerCall", "Variant", "KernelType", "LAYER_KINDS",
           "adapter_items", "full_items", "is_adapter", "register_variant", "variant", "register_kernel_type",
           "kernel_type", "ModelSystem", "register_model_system", "model_system"]
