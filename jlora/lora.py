"""Adapters as a separate pytree: init, merge, unmerge, delta, count and summary.

At the path of every targeted kernel or embedding leaf, :func:`init` puts an :class:`jlora.Adapter` holding
``a`` ``(..., in, r)`` and ``b`` ``(..., r, out)``; leading axes (a scanned layer stack) stay leading, and a
kernel with several input or output axes (``nn.DenseGeneral``, ``nn.Einsum``) is flattened so that ``in`` and
``out`` are the products of its input and output dims. The layer's update is ``scale * A @ B`` with ``scale``
from :meth:`jlora.LoraConfig.scale`. Whole tensors that train beside the adapters (``bias``,
``modules_to_save``) sit at their own parameter paths; :func:`overlay` puts them in place of the frozen ones.

Which axes of a kernel are inputs cannot be read off the array (is the leading axis a layer stack? which dims
of an Einsum kernel are contracted?), so :func:`init` takes a layout, derived once by tracing the model with
:func:`jlora.layout`, and records it in each adapter; merging reads it from there. Without a layout, a 2-D
kernel is taken as ``(in, out)``, the layout of ``nn.Dense`` and ``nn.Embed``, and :func:`jlora.apply` checks
that against the layer; a kernel of more dims needs the layout.

The frozen params are never copied or modified here: :func:`merge` returns a new tree. Variants (DoRA's
magnitude, quantized kernels, PiSSA/OLoRA inits) plug in through :mod:`jlora.adapter`'s tables.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import adapter as adapter_lib
from jlora import tree as tree_lib
from jlora.adapter import Adapter, KernelLayout, Layout, adapter_items, full_items
from jlora.config import CHANGES_BASE, TARGETABLE_LEAVES, LoraConfig

_NO_MATCH = (
    "targets={targets} (exclude={exclude}) matched no kernel or embedding parameter. Targets are regexes "
    "searched in '/'-joined paths; the parameter paths look like: {examples}"
)
_NEEDS_LAYOUT = (
    "parameter {path!r} has shape {shape}: with more than 2 dims jlora cannot tell which axes are inputs, "
    "outputs or a scanned layer axis. Pass `layout=jlora.layout(model, *example_args)` (derived once by "
    "tracing the model), or exclude this path from the targets."
)
_NOT_PARAMS = (
    "`params` must be the model's params: a nested dict of arrays (or jax.ShapeDtypeStructs) such as "
    "`model.init(key, x)['params']`, or an NNX model or its param state; got {got}"
)
_NOT_ADAPTERS = (
    "`adapters` must be the pytree jlora.init returns (a nested dict with a jlora.Adapter at each adapted "
    "kernel's path); got {got}"
)
_PLAIN_ADAPTER = (
    "the adapter at {path!r} is a plain dict with keys {keys}, not a jlora.Adapter node (an orbax restore without "
    "a target returns such dicts). Restore with a target (CheckpointManager.restore_adapters does, or pass "
    "`jax.eval_shape(lambda: jlora.init(params, cfg, key=key, layout=layout))` to orbax's StandardRestore), or "
    "rebuild each node: jlora.Adapter(d['a'], d['b'], layout=...)"
)
_NOT_TARGETED = (
    "the adapter at {path!r} is not one that its config targets (targets={targets}, exclude={exclude}): pass the "
    "LoraConfig the adapters were made with (it gives their scales)"
)
_COLLECTIONS = ("params", "batch_stats", "cache", "intermediates", "lora", "constants")
_WHOLE_VARIABLES = (
    "`params` looks like a whole variables dict (top-level keys {keys}); jlora functions take the params "
    "collection itself: pass `variables['params']` (other collections go to jlora.apply's `variables=`)."
)


def plain_params(params: Any) -> Mapping:
    """``params`` as a plain nested dict: a registered model system's model or state (NNX) gives its params."""
    system = adapter_lib.model_system(params)
    return system.params(params) if system is not None else params


def resolve(params: Any, layout: Mapping | None) -> tuple[Mapping, Mapping | None]:
    """``(plain params, layout)``: an NNX model (a registered model system's) gives both, its layout if none given."""
    system = adapter_lib.model_system(params)
    if system is None:
        return params, layout
    return system.params(params), (layout if layout is not None else system.layout(params))


def check_params(params: Mapping) -> None:
    """Raises if ``params`` is not a params tree, or is a whole Flax variables dict (``{"params": ...}``)."""
    if not isinstance(params, Mapping):
        raise TypeError(_NOT_PARAMS.format(got=type(params).__name__))
    keys = list(params)
    if "params" in keys and all(k in _COLLECTIONS for k in keys):
        raise ValueError(_WHOLE_VARIABLES.format(keys=keys))


def default_layout(path: str, shape: tuple[int, ...]) -> KernelLayout:
    """The layout :func:`init` takes for an untraced kernel: ``(in, out)``, which only a 2-D kernel can have."""
    if len(shape) != 2:
        raise ValueError(_NEEDS_LAYOUT.format(path=path, shape=tuple(shape)))
    kind = "Embed" if path.endswith("/embedding") or path == "embedding" else "Dense"
    return KernelLayout(kind, (0,), (1,), 0, traced=False)


def _path_key(key: jax.Array, path: str) -> jax.Array:
    """A per-path key that does not depend on which other paths are targeted."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def target_paths(params: Mapping, cfg: LoraConfig) -> list[str]:
    """The paths of ``params`` that ``cfg`` targets.

    Raises:
        ValueError: a pattern of ``targets``, ``exclude``, ``rank_pattern``, ``alpha_pattern`` or
            ``modules_to_save`` matches no path it could apply to (a typo, or per-layer names on layers
            stacked by a scan), so that it would silently do nothing.

    Examples:
        >>> params = {"q_proj": {"kernel": jnp.ones((8, 8))}, "v_proj": {"kernel": jnp.ones((8, 8))}}
        >>> target_paths(params, LoraConfig(targets=("q_proj", "v_proj"), exclude="v_proj"))
        ['q_proj/kernel']
        >>> target_paths(params, LoraConfig(targets=("q_proj", "v_proj"), rank_pattern={"v_prj": 4}))
        Traceback (most recent call last):
        ...
        ValueError: rank_pattern 'v_prj' matches none of the 2 targeted paths, so it would do nothing; they look like: ['q_proj/kernel', 'v_proj/kernel']
    """
    flat = tree_lib.flatten(params)
    found, weights = [p for p in flat if cfg.matches(p)], [p for p in flat if p.rsplit("/")[-1] in TARGETABLE_LEAVES]
    if not found:
        raise ValueError(_NO_MATCH.format(targets=list(cfg.targets), exclude=list(cfg.exclude),
                                          examples=(weights or list(flat))[:10]))
    unexcluded = []
    if cfg.exclude:
        without = dataclasses.replace(cfg, exclude=())
        unexcluded = [p for p in flat if without.matches(p)]
    for field, patterns, among, what in (
            ("targets", cfg.targets, weights, "kernel and embedding paths"),
            ("exclude", cfg.exclude, unexcluded, "paths the targets select"),
            ("rank_pattern", cfg.rank_pattern, found, "targeted paths"),
            ("alpha_pattern", cfg.alpha_pattern, found, "targeted paths"),
            ("modules_to_save", cfg.modules_to_save, list(flat), "parameter paths")):
        for pattern in patterns:
            if not any(re.search(pattern, p) for p in among):
                raise ValueError(f"{field} {pattern!r} matches none of the {len(among)} {what}, so it would do "
                                 f"nothing; they look like: {among[:4]}")
    return found


def dense_value(w) -> jax.Array:
    """A parameter leaf as an fp32 array (a registered kernel type, e.g. quantized, is decoded)."""
    kind = adapter_lib.kernel_type(w)
    return kind.dense_value(w) if kind is not None else jnp.asarray(w, jnp.float32)


def _no_layout_error(layout, path) -> ValueError:
    """A targeted kernel the traced layout has no entry for: its layer is unsupported, set up in a way LoRA cannot
    follow (and why), or none uses it."""
    if (why := getattr(layout, "refused", {}).get(path)) is not None:   # (the reason may say the fix)
        return ValueError(f"parameter {path!r} is targeted, but {why}"
                          f"{'' if 'from the targets' in why else '. Exclude it from the targets.'}")
    if (kind := getattr(layout, "unsupported", {}).get(path)) is not None:
        return ValueError(f"parameter {path!r} is targeted, but it belongs to a {kind} layer, which the LoRA transform "
                          f"does not handle. Exclude it from the targets.")
    return ValueError(f"parameter {path!r} is targeted but the traced layout has no entry for it: no layer jlora "
                      f"handles ({', '.join(adapter_lib.LAYER_KINDS)}) uses it. Exclude it from the targets.")


def init(params: Mapping, cfg: LoraConfig, *, key: jax.Array, layout: Mapping[str, KernelLayout] | None = None,
         factors: Callable[..., tuple[jax.Array, jax.Array]] | None = None) -> dict:
    """Creates fresh adapters for every parameter that ``cfg`` targets (and ``bias``/``modules_to_save`` selects).

    With ``init="default"`` (as PEFT does), dense A is kaiming-uniform (bound ``1/sqrt(in)``) and B = 0;
    an embedding's A = 0 and B is standard normal. Either way the product is zero, so fresh adapters leave the
    model's output unchanged. Each path draws from ``fold_in(key, crc32(path))``, so adding a target does not
    change the others.

    Args:
        params: the frozen parameter tree (arrays or ``jax.ShapeDtypeStruct``s), not the whole variables dict.
        cfg: the LoRA config.
        key: a PRNG key.
        layout: kernel layouts from :func:`jlora.layout`; required for kernels of more than 2 dims. Without it,
            every targeted 2-D kernel is taken as ``(in, out)`` (``nn.Dense``/``nn.Embed``), which
            :func:`jlora.apply` verifies against the layer.
        factors: ``(kernel fp32, r, scale) -> (A, B)`` computing the factors from the kernel; used by
            :func:`jlora.init_with_base` for PiSSA/OLoRA, which also change the base.

    Returns:
        The adapter tree: an :class:`jlora.Adapter` at each targeted path (with DoRA's magnitude ``m`` as an
        extra when ``use_dora``); a copy of the parameter at each path that ``cfg.saves``.

    Raises:
        ValueError: for ``init="pissa"``/``"olora"`` without ``factors``: use :func:`jlora.init_with_base`.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> params = {"q_proj": {"kernel": jnp.ones((4096, 4096)), "bias": jnp.zeros(4096)}}
        >>> adapters = init(params, LoraConfig(rank=16, targets="q_proj"), key=jax.random.key(0))
        >>> adapters
        {'q_proj': {'kernel': Adapter(a=float32[4096, 16], b=float32[16, 4096])}}
        >>> count(adapters)
        131072
    """
    params, layout = resolve(params, layout)    # an NNX model: its params and its own layouts
    check_params(params)
    if cfg.init in CHANGES_BASE and factors is None:
        raise ValueError(f"init={cfg.init!r} changes the base weights as well as creating adapters; use "
                         f"`adapters, params = jlora.init_with_base(params, cfg, key=key)` and train on the "
                         f"returned params")
    var = adapter_lib.variant("dora" if cfg.use_dora else "lora")
    flat = tree_lib.flatten(params)
    dtype = jnp.dtype(cfg.dtype)
    out = {}
    for path in target_paths(params, cfg):
        shape = tuple(flat[path].shape)
        if layout is not None and path not in layout:
            raise _no_layout_error(layout, path)
        lay = layout[path] if layout is not None else default_layout(path, shape)
        lead, fan_in, fan_out = lay.split(shape)
        r, g = cfg.rank_for(path), lay.groups
        if r % g or r // g > min(fan_in, fan_out // g):
            what = "exceeds the kernel's smaller side" if g == 1 else "does not fit the grouped kernel"
            raise ValueError(f"rank {r} at {path!r} {what}: shape {shape} is {fan_in} in x "
                             f"{fan_out} out{f' in each of {g} groups' if g > 1 else ''}; use a rank <= "
                             f"{g * min(fan_in, fan_out // g)}{' divisible by the groups' if g > 1 else ''} "
                             f"(rank_pattern can set it per path)")
        if lay.kind not in var.layers:
            raise ValueError(f"the {var.name} variant supports {'/'.join(var.layers)} layers; "
                             f"{path!r} is used by a {lay.kind} layer (kernel {shape}). Exclude it from the "
                             f"targets or train it as plain LoRA.")
        ka, kb = jax.random.split(_path_key(key, path))
        a_shape, b_shape = (*lead, fan_in, r), (*lead, r // g, fan_out)   # a grouped conv's B is block-diagonal
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
        extras = {}
        if var.init_extras is not None:
            if isinstance(flat[path], jax.ShapeDtypeStruct):
                raise ValueError(f"the {var.name} variant starts from the values of the kernel at {path!r}, and "
                                 f"params holds only its shape: pass the params themselves (for shapes only, "
                                 f"call jlora.init under jax.eval_shape)")
            extras = {k: v.astype(dtype) for k, v in
                      var.init_extras(dense_value(flat[path]), a, b, cfg.scale(path)).items()}
        out[path] = Adapter(a, b, extras, layout=lay, variant=var.name)
    for path, leaf in flat.items():
        if not cfg.saves(path, flat):
            continue
        if path in out or cfg.matches(path):
            raise ValueError(f"{path!r} is both a LoRA target and selected by bias={cfg.bias!r}/modules_to_save="
                             f"{list(cfg.modules_to_save)}; a parameter either gets an adapter or trains in full. "
                             f"Exclude it from one of them.")
        if adapter_lib.kernel_type(leaf) is not None:
            raise ValueError(f"{path!r} is a {type(leaf).__name__} kernel and cannot train in full "
                             f"(modules_to_save); keep it out of the quantized paths")
        out[path] = jnp.array(leaf, dtype=dtype if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf.dtype)
    return tree_lib.unflatten(out)


def _check_layout_arg(path: str, node: Adapter, layout) -> None:
    given = layout.get(path) if layout is not None else None
    if given is not None and node.layout is not None and not given.same_axes(node.layout):
        raise ValueError(f"layout= gives {path!r} the axes {given.describe()}, but its adapter was made for "
                         f"{node.layout.describe()}; the adapters carry their layout, so drop `layout=`")


def _layout_of(path: str, node: Adapter, layout, shape: tuple[int, ...]) -> KernelLayout | None:
    """How ``node``'s kernel is read: the layout the adapter carries, else ``layout``'s (``jlora.layout``) for
    ``path``, else the 2-D default (None for a kernel of more dims: nothing says how)."""
    lay = node.layout if node.layout is not None else (layout.get(path) if layout is not None else None)
    if lay is not None:
        return lay.fitted(shape)
    return default_layout(path, shape) if len(shape) == 2 else None


def check_targeted(path: str, cfg: LoraConfig) -> None:
    """Raises if ``cfg`` does not target ``path``, where an adapter sits: its scale there would be a guess.

    Examples:
        >>> check_targeted("q_proj/kernel", LoraConfig(targets="q_proj"))
        >>> check_targeted("v_proj/kernel", LoraConfig(targets="q_proj"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: the adapter at 'v_proj/kernel' is not one that its config targets (targets=['q_proj'], ...
    """
    if not cfg.matches(path):
        raise ValueError(_NOT_TARGETED.format(path=path, targets=list(cfg.targets), exclude=list(cfg.exclude)))


def check_fits(params: Mapping, adapters: Mapping, cfg: LoraConfig | None = None,
               layout: Mapping[str, KernelLayout] | None = None) -> None:
    """Raises if ``adapters`` do not fit ``params`` (or ``cfg``'s ranks), naming the first mismatch.

    Checks that ``params`` and ``adapters`` are trees of the kind :func:`init` takes and returns, that every
    adapter's path is a parameter that ``cfg`` targets, that its factors have the shapes its recorded layout (else
    ``layout``'s, else the 2-D default) gives for that kernel (an extra leading axis means stacked adapters), that
    its rank is ``cfg``'s at that path, and that every whole trained tensor has its parameter's shape.
    """
    params = plain_params(params)
    check_params(params)
    if not isinstance(adapters, Mapping):
        raise TypeError(_NOT_ADAPTERS.format(got=type(adapters).__name__))
    flat_params = tree_lib.flatten(params)
    for path, leaf in full_items(adapters):
        shape = tuple(np.shape(flat_params[path])) if path in flat_params else None
        parent, _, name = path.rpartition("/")
        if shape is None and name in ("a", "b") and parent in flat_params:   # a dict where an Adapter belongs
            keys = sorted(p.rpartition("/")[2] for p, _ in full_items(adapters) if p.rpartition("/")[0] == parent)
            raise TypeError(_PLAIN_ADAPTER.format(path=parent, keys=keys))
        if shape != tuple(np.shape(leaf)):
            raise ValueError(f"the fully trained tensor at {path!r} has shape {tuple(np.shape(leaf))} but the "
                             f"parameter there {'does not exist' if shape is None else f'has shape {shape}'}; "
                             f"the adapters were made for a different model")
    for path, node in adapter_items(adapters):
        if path not in flat_params:
            near = [p for p in flat_params if p.rsplit("/", 1)[-1] in ("kernel", "embedding")][:10]
            raise ValueError(f"adapter at {path!r} has no parameter at that path; the adapters were made for a "
                             f"different model. Kernel paths here look like: {near}")
        if cfg is not None:
            check_targeted(path, cfg)
        shape = tuple(flat_params[path].shape)
        lay = _layout_of(path, node, layout, shape)
        if lay is None:
            continue   # a hand-made adapter on a >2-D kernel: the layer that uses it (apply) or merge decides
        lead, fan_in, fan_out = lay.split(shape)
        a, b = tuple(np.shape(node.a)), tuple(np.shape(node.b))
        lead = (*lead, *a[len(lead):len(lead) + node.slot_dims])     # a bank's slot axis follows the stack axes
        extra, rb = len(a) - 2 - len(lead), a[-1] // lay.groups
        if extra > 0 and a[extra:] == (*lead, fan_in, a[-1]) and b[extra:] == (*lead, rb, fan_out):
            raise ValueError(f"the adapter at {path!r} carries {extra} extra leading axis of size {a[:extra]} "
                             f"(a {a}, b {b} for kernel {shape}): these are stacked adapters (e.g. from jax.vmap "
                             f"over jlora.init). Merge or apply them one at a time, e.g. "
                             f"jax.tree.map(lambda x: x[i], adapters).")
        if a != (*lead, fan_in, a[-1]) or b != (*lead, rb, fan_out) or a[-1] % lay.groups:
            if node.layout is not None and not node.layout.lead and lay.lead and len(a) == 2 + node.slot_dims:
                raise ValueError(f"the adapter at {path!r} (a {a}, b {b}) was made for a {node.layout.kind} kernel "
                                 f"of {len(shape) - lay.lead} dims laid out {lay.describe()}, but the parameter there "
                                 f"is {shape}: a kernel of another layer kind (e.g. a convolution's), or a "
                                 f"{shape[:lay.lead]} stack of such kernels. Make the adapters for this model: "
                                 f"jlora.init(params, cfg, key=..., layout=jlora.layout(model, *example_args))")
            rank = "r" if lay.groups == 1 else f"r/{lay.groups}"
            raise ValueError(f"adapter at {path!r} does not fit the parameter: kernel {shape} laid out "
                             f"{lay.describe()} needs a {(*lead, fan_in, 'r')} and b {(*lead, rank, fan_out)}; got a "
                             f"{a} and b {b}")
        if cfg is not None and node.rank != cfg.rank_for(path):
            raise ValueError(f"adapter at {path!r} has rank {node.rank} but the config gives rank "
                             f"{cfg.rank_for(path)} there (rank={cfg.rank}, rank_pattern={dict(cfg.rank_pattern)}); "
                             f"the scale alpha/r would be wrong. Use the config the adapters were made with.")


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


def grouped_matmul(x: jax.Array, b: jax.Array, groups: int = 1) -> jax.Array:
    """``x @ B`` for ``x`` ``(..., m, r)`` and a block-diagonal ``B`` stored as its blocks ``(..., r/groups, out)``.

    Rank channel ``c`` feeds only the outputs of its group ``c // (r/g)``, as a grouped 1x1 convolution does.

    Examples:
        >>> grouped_matmul(jnp.ones((1, 2)), jnp.arange(6.0).reshape(2, 3))   # groups=1: a plain matmul
        Array([[3., 5., 7.]], dtype=float32)
        >>> grouped_matmul(jnp.array([[1.0, 2.0]]), jnp.array([[3.0, 4.0]]), groups=2)
        Array([[3., 8.]], dtype=float32)
    """
    if groups == 1:
        return jnp.matmul(x, b)
    r, out = x.shape[-1], b.shape[-1]
    xg = x.reshape(*x.shape[:-1], groups, r // groups)
    y = jnp.einsum("...mjc,...cjo->...mjo", xg, b.reshape(*b.shape[:-1], groups, out // groups))
    return y.reshape(*x.shape[:-1], out)


def delta(node: Adapter, scale: float, shape: tuple[int, ...], lay: KernelLayout | None = None,
          dtype=None) -> jax.Array:
    """The full-size update ``scale * A @ B`` laid out like a kernel of ``shape`` (used only for merging)."""
    lay = lay or node.layout
    a, b = node.a, node.b
    dtype = dtype or jnp.result_type(a)
    full = scale * grouped_matmul(a.astype(jnp.float32), b.astype(jnp.float32), lay.groups)  # (*lead, in, out)
    per_layer = shape[lay.lead:]
    in_dims = [per_layer[i] for i in lay.in_axes]
    out_dims = [per_layer[i] for i in lay.out_axes]
    full = full.reshape(*shape[:lay.lead], *in_dims, *out_dims)
    order = list(lay.in_axes) + list(lay.out_axes)          # kernel axis held at each position of `full`
    perm = [lay.lead + order.index(k) for k in range(len(per_layer))]
    return jnp.transpose(full, (*range(lay.lead), *perm)).astype(dtype)


def _merge(params, adapters, cfg, layout, sign):
    system = adapter_lib.model_system(params)
    if system is not None:          # an NNX model or state: merge its plain params, give back the same kind
        return system.rebuild(params, _merge(system.params(params), adapters, cfg, layout, sign))
    check_fits(params, adapters, cfg, layout)
    nodes = list(adapter_items(adapters))
    if sign < 0:
        fixed = [n.variant for _, n in nodes if not adapter_lib.variant(n.variant).invertible]
        if next(full_items(adapters), None) is not None or fixed:
            raise ValueError("unmerge cannot invert a merge of whole trained tensors (bias, modules_to_save) or of "
                             f"{sorted(set(fixed)) or 'non-invertible'} adapters: the original values are not in "
                             "the adapters. Keep the original params.")
    flat = tree_lib.flatten(overlay(params, adapters) if sign > 0 else params)
    if sign > 0:                  # whole trained tensors (kept in the adapters' dtype) go back in the base's
        base = tree_lib.flatten(params)
        for path, _ in full_items(adapters):
            flat[path] = jnp.asarray(flat[path]).astype(jnp.result_type(base[path]))
    for path, node in nodes:
        _check_layout_arg(path, node, layout)
        w = flat[path]
        lay = _layout_of(path, node, layout, tuple(w.shape)) or default_layout(path, tuple(w.shape))
        hook = adapter_lib.variant(node.variant).merged
        if hook is not None:
            new = hook(dense_value(w), node, cfg.scale(path))
        else:
            new = dense_value(w) + sign * delta(node, cfg.scale(path), tuple(w.shape), lay, dtype=jnp.float32)
        kind = adapter_lib.kernel_type(w)
        flat[path] = kind.rebuild(w, new) if kind is not None else new.astype(w.dtype)
    return tree_lib.unflatten(flat)


def merge(params: Mapping, adapters: Mapping, cfg: LoraConfig, layout: Mapping[str, KernelLayout] | None = None
          ) -> dict:
    """Returns params with every adapter folded in: ``W + scale * A @ B`` (computed in fp32, cast back).

    ``params`` may also be an NNX model or param state (:mod:`jlora.nnx`); the result is then of the same kind
    (a new model, the given one untouched).

    Each adapter carries the layout of its kernel, so no layout is needed here (``layout``, if given, must agree).
    DoRA adapters give ``m * (W + s A B) / ||W + s A B||``; whole trained tensors replace their parameters; a
    quantized kernel is decoded, merged and re-encoded (see :func:`jlora.variants.quant.error` for the error).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> params = {"dense": {"kernel": jnp.zeros((2, 3))}}
        >>> adapters = {"dense": {"kernel": Adapter(jnp.ones((2, 1)), jnp.ones((1, 3)))}}
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
    flat = tree_lib.flatten(plain_params(params))
    rows = [("path", "kernel shape", "rank", "trainable", "% of update")]
    entries = []
    for path, node in adapter_items(adapters):
        shape = tuple(flat[path].shape)
        a, b = np.shape(node.a), np.shape(node.b)
        layers, fan_in, fan_out = math.prod(a[:-2]), a[-2], b[-1]
        n = count(node)
        entries.append((layers, fan_in, fan_out * b[-2] / a[-1]))     # a grouped conv's B has r/groups rows
        rows.append((path, str(shape), str(a[-1]), f"{n:,}", f"{100 * n / math.prod(shape):.2f}%"))
    for path, leaf in full_items(adapters):
        rows.append((path, str(tuple(np.shape(leaf))), "full", f"{count(leaf):,}", "100.00%"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    total, n_params = count(adapters), sum(math.prod(getattr(x, "shape", np.shape(x))) for x in flat.values())
    lines.append(f"total: {total:,} trainable values = {100 * total / n_params:.2f}% of {n_params:,} parameters "
                 f"({sum(e[0] for e in entries)} adapted kernels)")   # each layer of a stack is one
    if ranks:
        lines.append("")
        lines.append("rank ladder (same targets)")
        lines.append("rank   trainable        % of parameters")
        for r in ranks:
            n = sum(int(layers * r * (fi + fo)) for layers, fi, fo in entries)
            lines.append(f"{r:<6} {n:<16,} {100 * n / n_params:.3f}%")
    return "\n".join(lines)


__all__ = ["Adapter", "KernelLayout", "Layout", "init", "merge", "unmerge", "delta", "grouped_matmul", "count",
           "summary",
           "check_fits", "check_targeted", "overlay", "target_paths", "dense_value", "adapter_items", "full_items"]
