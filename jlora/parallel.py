"""Scaling out on JAX's own runtime: a device mesh, sharding rules, sharded/pmap train steps, multi-host helpers.

One mesh with three named axes covers the usual layouts:

- ``data``: plain data parallelism. Frozen params and adapters are replicated; the batch is split.
- ``fsdp``: the batch is split as for ``data``, and every frozen kernel (embeddings too) is sharded along its
  largest dimension divisible by the axis size, so each device holds ``1/fsdp`` of the frozen weights.
- ``tensor``: Megatron tensor parallelism by the model family's rules (:func:`jlora.models.tensor_split`): the
  kernels that open an attention or MLP block are split by output columns, the ones that close it by input rows
  (so each block needs one reduction), embeddings by vocabulary. The batch is replicated over it.

The axes are ``AxisType.Auto``: shardings are placed on the arguments and XLA's partitioner (GSPMD/Shardy) fills
in the collectives, so the same unmodified train step (:func:`jlora.make_train_step`) runs on any mesh and
computes the same numbers as on one device. Inside the sharded step the models' activations stay split by rows
over ``data`` x ``fsdp`` (:data:`ACTIVATION_RULES`), so FSDP moves weights, not activations. Adapters follow their
base kernel (A like the kernel's input dim, B like its output dim, the rank dim replicated) and optimizer state
follows the adapters, so the LoRA update needs no extra communication. A scanned layer stack's leading layer axis
is never sharded, where the rule knows the stack: a family's ``layer_prefix``, or with the generic rule the
``stacked=`` module paths the caller names (from the params alone, a ``(16, 8, 8)`` stack of 16 Dense kernels
looks like one DenseGeneral kernel).

Multi-host is ``jax.distributed``: call :func:`initialize` in every process, build the same mesh over all global
devices, feed each process its own rows with :func:`shard_local_batch`, and guard logging with
:func:`is_main_process`. Checkpoints are written by every process through orbax (:mod:`jlora.checkpoint`).

Examples:
    >>> import jax, jax.numpy as jnp
    >>> mesh = make_mesh(data=2, fsdp=4)          # 8 devices (tests run on 8 virtual CPU devices)
    >>> params = {"block": {"up": {"kernel": jnp.zeros((16, 64))}, "norm": {"scale": jnp.zeros((16,))}}}
    >>> param_specs(params, mesh)     # family=None: the generic rule for any Flax model, FSDP only
    {'block': {'norm': {'scale': P(None,)}, 'up': {'kernel': P(None, 'fsdp')}}}
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlora import models
from jlora import transform
from jlora import tree as tree_lib
from jlora.config import LoraConfig
from jlora.models import layers as model_layers
from jlora.train import LossFn, TrainState, lm_loss, make_train_step

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Flax logical axis rules of the activations the models constrain (jlora.models.layers.constrain): rows over the
# batch axes, tokens whole; hidden states whole over the tensor axis (as Megatron's blocks take and give them), the
# features inside attention and MLP blocks left to XLA (split over the tensor axis after column-parallel kernels)
ACTIVATION_RULES = ((model_layers.BATCH, BATCH_AXES), (model_layers.LENGTH, None), (model_layers.EMBED, None),
                    (model_layers.HEADS, P.UNCONSTRAINED), (model_layers.MLP, P.UNCONSTRAINED))

_BAD_TENSOR_DIM = (
    "tensor parallelism splits dim {dim} of {path!r} (shape {shape}) over the mesh's tensor axis of size {n}, but "
    "{size} is not divisible by {n}; use a tensor size that divides {size} (e.g. {hint}), or shard with fsdp instead")
_BAD_BATCH = (
    "batch leaf {name!r} has {rows} rows, which do not divide into {n} equal batch shards (rows are split over "
    "the mesh's data x fsdp axes; mesh {mesh}); use a batch size that is a multiple of {n}")


# --- the mesh --------------------------------------------------------------------------------------------------

def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh with Auto axis types over all (global) devices.

    One size may be ``-1``: it takes whatever the others leave of the device count.

    Raises:
        ValueError: the sizes are not positive, or their product differs from the number of devices
            (both are shown).

    Examples:
        >>> dict(make_mesh(fsdp=4, tensor=2).shape)
        {'data': 1, 'fsdp': 4, 'tensor': 2}
        >>> make_mesh(data=-1).shape["data"]
        8
    """
    devices = list(jax.devices() if devices is None else devices)
    repeated = sorted({str(d) for d in devices if devices.count(d) > 1})
    if repeated:
        raise ValueError(f"`devices` lists {', '.join(repeated)} more than once; a mesh holds each device once")
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    bad = {k: v for k, v in sizes.items()
           if isinstance(v, bool) or not isinstance(v, numbers.Integral) or (v < 1 and v != -1)}
    if bad or list(sizes.values()).count(-1) > 1:
        raise ValueError(f"mesh sizes must be integers >= 1 (at most one may be -1, inferred); got {sizes}")
    sizes = {k: int(v) for k, v in sizes.items()}
    known = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        if len(devices) % known:
            raise ValueError(f"cannot infer the -1 mesh axis: {len(devices)} devices are not a multiple of the "
                             f"other axes' product {known} (sizes {sizes})")
        sizes = {k: (len(devices) // known if v == -1 else v) for k, v in sizes.items()}
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ValueError(
            f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} = {total} devices, but "
            f"there are {len(devices)} devices ({devices[0].platform if devices else 'none'}); choose sizes whose "
            f"product is {len(devices)}, or pass `devices=` (on CPU, XLA_FLAGS="
            f"--xla_force_host_platform_device_count=N sets the device count)")
    return jax.make_mesh(tuple(sizes.values()), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def _size(mesh: Mesh, axis: str) -> int:
    return int(mesh.shape.get(axis, 1))


# --- sharding rules --------------------------------------------------------------------------------------------

def _family(family: Any) -> models.Family | None:
    """The :class:`jlora.models.Family` that ``family`` (a Family, a family name or model type, or a model
    config) names; None for the generic rule (``None`` or ``"generic"``)."""
    if family is None or family == "generic" or isinstance(family, models.Family):
        return family
    name = family if isinstance(family, str) else getattr(family, "model_type", None)
    try:
        return models.family_named(name)
    except ValueError as e:
        raise ValueError(f"no sharding rules for family {family!r}: {e} (or family=None for the generic FSDP-only "
                         f"rule)") from None


def _divisor_hint(size: int, n: int) -> int:
    """The largest tensor size that divides both ``size`` and ``n`` (so the rest of ``n`` can move to fsdp)."""
    return max(d for d in range(1, n + 1) if size % d == 0 and n % d == 0)


def _stacked(stacked: str | Sequence[str]) -> tuple[str, ...]:
    return tuple(p.rstrip("/") for p in ((stacked,) if isinstance(stacked, str) else stacked))


def _stack_depth(path: str, stacked: Sequence[str]) -> int:
    """How many of the ``stacked`` module paths ``path`` lies under: its leading layer axes (nested scans add)."""
    return sum(path == p or path.startswith(p + "/") for p in stacked)


def leaf_spec(path: str, shape: tuple[int, ...], mesh: Mesh, family: Any = None, *,
              stacked: str | Sequence[str] = ()) -> P:
    """The :class:`PartitionSpec` of one frozen parameter (see :func:`param_specs` for the rules; each family's
    module in :mod:`jlora.models` shows its tensor rules in action).

    Examples:
        >>> mesh = make_mesh(fsdp=4, tensor=2)
        >>> leaf_spec("block/proj/kernel", (64, 32), mesh)
        P('fsdp', None)
        >>> leaf_spec("norm/scale", (32,), mesh)
        P(None,)
        >>> leaf_spec("layers/proj/kernel", (16, 8, 8), mesh), leaf_spec("layers/proj/kernel", (16, 8, 8), mesh,
        ...                                                               stacked="layers")
        (P('fsdp', None, None), P(None, 'fsdp', None))
    """
    fam = _family(family)
    spec: list[Any] = [None] * len(shape)
    lead = max(1 if fam is not None and path.startswith(fam.layer_prefix + "/") else 0,
               _stack_depth(path, _stacked(stacked)))
    n_tp, n_fsdp = _size(mesh, "tensor"), _size(mesh, "fsdp")
    split = models.tensor_split(fam, path) if fam is not None and n_tp > 1 else None
    if split is not None and len(shape) - lead >= (1 if path.endswith("bias") else 2):
        d = len(shape) + split
        if shape[d] % n_tp:
            raise ValueError(_BAD_TENSOR_DIM.format(dim=d, path=path, shape=tuple(shape), n=n_tp,
                                                    size=shape[d], hint=_divisor_hint(shape[d], n_tp)))
        spec[d] = "tensor"
    if n_fsdp > 1 and len(shape) - lead >= 2:
        free = [d for d in range(lead, len(shape)) if spec[d] is None and shape[d] % n_fsdp == 0]
        if free:
            spec[max(free, key=lambda d: (shape[d], -d))] = "fsdp"
    return P(*spec)


def param_specs(params: Any, mesh: Mesh, family: Any = None, *, stacked: str | Sequence[str] = ()) -> Any:
    """:class:`PartitionSpec` of every frozen parameter, in the tree structure of ``params``.

    Rules: with ``tensor > 1``, the family's Megatron rules (:func:`jlora.models.tensor_split`: column-parallel
    kernels and their biases by output columns, row-parallel kernels by input rows, embeddings by vocabulary);
    a dim it splits must divide (else a ValueError naming the parameter). Then with ``fsdp > 1``, each kernel or
    embedding (>= 2 dims besides a scanned layer axis) is sharded along its largest remaining dim divisible by
    the fsdp size (left replicated if none divides). Vectors (norm scales, biases) stay replicated.
    ``family=None`` is the generic rule for any model: FSDP only.

    A scanned layer axis is known from the family's ``layer_prefix``, or from ``stacked``: the generic rule cannot
    tell it from the shapes, so without ``stacked`` it may shard the leading axis of an ``nn.scan`` stack (and
    each step then gathers whole stacks). Name the stacks' module paths there.

    Args:
        params: the frozen parameter tree (arrays or anything with ``.shape``, e.g. ``jax.eval_shape`` output).
        mesh: from :func:`make_mesh`.
        family: a :class:`jlora.models.Family` (``loaded.family``), a family's name or one of its HF model
            types, or None.
        stacked: module paths of layer stacks made by ``nn.scan`` (e.g. ``"layers"``, the scanned module's
            name): every parameter under one keeps its leading layer axis unsharded, and its vectors (biases,
            norm scales) stay replicated. A parameter under nested stacks has one layer axis per path.

    Raises:
        ValueError: ``family`` names no family jlora implements, a path of ``stacked`` holds no parameter, or a
            dim the tensor axis splits does not divide by its size.

    Examples:
        >>> mesh = make_mesh(fsdp=8)
        >>> params = {"layers": {"up": {"kernel": jnp.zeros((16, 8, 32)), "bias": jnp.zeros((16, 32))}}}
        >>> param_specs(params, mesh, stacked="layers")["layers"]["up"]
        {'bias': P(None, None), 'kernel': P(None, None, 'fsdp')}
    """
    stacked = _stacked(stacked)
    paths = [tree_lib.path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    empty = [p for p in stacked if not any(_stack_depth(q, (p,)) for q in paths)]
    if empty:
        raise ValueError(f"`stacked` names {empty}, which hold no parameter; name the module paths of scanned layer "
                         f"stacks. The parameter paths look like: {paths[:10]}")
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: leaf_spec(tree_lib.path_str(kp), tuple(x.shape), mesh, family, stacked=stacked), params)


def param_shardings(params: Any, mesh: Mesh, family: Any = None, *, stacked: str | Sequence[str] = ()) -> Any:
    """:func:`param_specs` as :class:`NamedSharding` objects on ``mesh`` (for ``jax.device_put`` / ``jax.jit``)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, family, stacked=stacked),
                        is_leaf=lambda x: isinstance(x, P))


def _spec_of(sharding: Any, ndim: int) -> list[Any]:
    spec = list(getattr(sharding, "spec", ()))
    return spec + [None] * (ndim - len(spec))


def _group_spec(specs: Sequence[Any]) -> Any:
    """The sharding of dims flattened into one (row-major): the major dim's, if the others are unsharded."""
    return specs[0] if specs and all(s is None for s in specs[1:]) else None


def _mesh_of(shardings: Any) -> Mesh:
    for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)):
        if isinstance(s, NamedSharding):
            return s.mesh
    raise ValueError("no NamedSharding found in the given shardings; build them with `param_shardings`")


def adapter_shardings(adapters: Mapping, param_shardings: Any, params: Any = None) -> Any:
    """Shardings for an adapter tree that follow its base kernels.

    ``a`` (``(..., in, r)``) is sharded like the kernel's input dim, ``b`` (``(..., r, out)``) like its output
    dim; the rank dim and a scanned layer axis stay as the kernel's leading dims are (replicated by our rules).
    Kernels with several input or output dims (``DenseGeneral``, ``Einsum``) are read with the layout each
    adapter carries (for hand-made adapters without one, ``params`` tells where the input dims end); a flattened
    dim takes the major dim's sharding when the rest are unsharded. Any other adapter
    leaf takes its parameter's sharding when it sits at a parameter path with the same rank, else is replicated.

    Examples:
        >>> import jax.numpy as jnp
        >>> mesh = make_mesh(fsdp=4, tensor=2)
        >>> from jlora import Adapter
        >>> params = {"proj": {"kernel": jnp.zeros((64, 32))}}          # generic rule: kernel P('fsdp', None)
        >>> ad = {"proj": {"kernel": Adapter(jnp.zeros((64, 4)), jnp.zeros((4, 32)))}}
        >>> sh = adapter_shardings(ad, param_shardings(params, mesh))["proj"]["kernel"]
        >>> sh.a.spec, sh.b.spec
        (P('fsdp', None), P(None, None))
    """
    mesh = _mesh_of(param_shardings)
    flat_sh = tree_lib.flatten(param_shardings)
    flat_p = tree_lib.flatten(params) if params is not None else {}
    flat_ad = tree_lib.flatten(adapters)

    def rule(path: str, leaf) -> NamedSharding:
        parent, name = path.rsplit("/", 1) if "/" in path else ("", path)
        ndim = len(leaf.shape)
        if parent in flat_sh and name in ("a", "b") and ndim >= 2:
            lead, node = ndim - 2, flat_ad[parent]
            if node.layout is not None:    # the adapter knows which kernel axes are inputs
                in_axes, out_axes = node.layout.in_axes, node.layout.out_axes
                spec = _spec_of(flat_sh[parent], lead + len(in_axes) + len(out_axes))
            else:                          # the input dims are the leading ones whose product is fan_in
                if parent in flat_p:
                    kshape = tuple(flat_p[parent].shape)
                else:
                    kshape = tuple(leaf.shape[:lead]) + (-1, -1)
                    if len(_spec_of(flat_sh[parent], 0)) > len(kshape):  # a >2-D kernel without params: replicate
                        return NamedSharding(mesh, P())
                spec = _spec_of(flat_sh[parent], len(kshape))
                per, fan_in = kshape[lead:], np.shape(node.a)[-2]
                k = next((k for k in range(1, len(per)) if math.prod(per[:k]) == fan_in), 1) if -1 not in per else 1
                in_axes, out_axes = tuple(range(k)), tuple(range(k, len(per)))
            s_in = _group_spec([spec[lead + i] for i in in_axes])
            s_out = _group_spec([spec[lead + i] for i in out_axes])
            tail = [s_in, None] if name == "a" else [None, s_out]
            return NamedSharding(mesh, P(*spec[:lead], *tail))
        if path in flat_sh and len(_spec_of(flat_sh[path], 0)) <= ndim:
            return NamedSharding(mesh, P(*_spec_of(flat_sh[path], ndim)))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(lambda kp, x: rule(tree_lib.path_str(kp), x), adapters)


def like_adapters(tree: Any, adapters: Mapping, adapter_shardings: Any) -> Any:
    """Shardings for a tree whose leaves mirror the adapters (optimizer state: adam's ``mu``/``nu`` ...).

    A leaf whose path ends with an adapter leaf's path and has its shape takes that leaf's sharding (the longest
    such path wins); everything else (step counts, scalars) is replicated.
    """
    mesh = _mesh_of(adapter_shardings)
    shapes = {p: tuple(np.shape(x)) for p, x in tree_lib.leaves_by_path(adapters).items()}
    flat_sh = tree_lib.leaves_by_path(adapter_shardings)

    def rule(kp, x):
        parts = tree_lib.path_str(kp).split("/")
        for i in range(len(parts)):
            cand = "/".join(parts[i:])
            if cand in shapes and shapes[cand] == tuple(getattr(x, "shape", ())):
                return flat_sh[cand]
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(rule, tree)


def state_shardings(state: TrainState, adapter_shardings: Any,
                    optimizer: optax.GradientTransformation | None = None) -> TrainState:
    """Shardings of a :class:`jlora.TrainState`: adapters and optimizer state follow the adapter shardings; the
    step and rng are replicated.

    With ``optimizer``, the optimizer state's parameter-shaped parts are found by ``optax.tree_map_params``;
    without it, by matching paths and shapes (:func:`like_adapters`).
    """
    rep = NamedSharding(_mesh_of(adapter_shardings), P())
    if optimizer is not None:
        opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, state.opt_state, adapter_shardings,
                                       transform_non_params=lambda _: rep)
    else:
        opt_sh = like_adapters(state.opt_state, state.adapters, adapter_shardings)
    return TrainState(rep, adapter_shardings, opt_sh, rep)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of every batch leaf split over ``("data", "fsdp")``; replicated over ``tensor``."""
    return NamedSharding(mesh, P(BATCH_AXES))


def _check_batch(batch: Mapping, mesh: Mesh, n: int | None = None, what: str = "") -> None:
    n = _size(mesh, "data") * _size(mesh, "fsdp") if n is None else n
    for name, x in tree_lib.flatten(batch).items():
        rows = x.shape[0] if getattr(x, "shape", ()) else 0
        if not rows or rows % n:
            raise ValueError(_BAD_BATCH.format(name=name, rows=rows, n=n, mesh=dict(mesh.shape)) + what)


# --- placement -------------------------------------------------------------------------------------------------

def _place_leaf(x, sharding):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_place_leaf(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    host = np.asarray(x)   # multi-host: every process holds the same full value; each places its own shards
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def place(tree: Any, shardings: Any) -> Any:
    """Puts every leaf of ``tree`` on its sharding (``shardings`` is a matching tree or a prefix of it).

    Works multi-host too: a host value (the same in every process) is cut into this process's shards.
    """
    is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
    return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: _place_leaf(x, s), sub), shardings, tree,
                        is_leaf=is_sharding)


def shard_batch(batch: Mapping, mesh: Mesh) -> dict:
    """Places a global batch (the same in every process) with rows over ``("data", "fsdp")``.

    Raises:
        ValueError: a leaf's row count does not divide by ``data * fsdp``.
    """
    _check_batch(batch, mesh)
    return place(dict(batch), batch_sharding(mesh))


def _local_shards(mesh: Mesh) -> list[int]:
    """Batch-shard indices (0 .. data*fsdp-1) held by this process's devices, sorted."""
    ids = np.vectorize(lambda d: d.process_index == jax.process_index())(mesh.devices)
    d_idx, f_idx, _ = np.nonzero(ids)
    return sorted(set((d_idx * _size(mesh, "fsdp") + f_idx).tolist()))


def local_batch_rows(mesh: Mesh, global_batch_size: int) -> slice:
    """The rows of a global batch that this process feeds to :func:`shard_local_batch`.

    Examples:
        >>> local_batch_rows(make_mesh(data=8), 16)     # a single process feeds everything
        slice(0, 16, None)
    """
    n = _size(mesh, "data") * _size(mesh, "fsdp")
    if global_batch_size % n:
        raise ValueError(_BAD_BATCH.format(name="<global batch>", rows=global_batch_size, n=n,
                                           mesh=dict(mesh.shape)))
    shards, per = _local_shards(mesh), global_batch_size // n
    if shards != list(range(shards[0], shards[-1] + 1)):
        raise ValueError(f"this process's devices hold non-contiguous batch shards {shards} of mesh "
                         f"{dict(mesh.shape)}; build the mesh with make_mesh() so each process's devices are "
                         f"adjacent on the batch axes")
    return slice(shards[0] * per, (shards[-1] + 1) * per)


def allgather_text(text: str) -> list[str]:
    """Every process's ``text``, in process order: a collective (every process calls it; one process: ``[text]``).

    Examples:
        >>> allgather_text("step 3")
        ['step 3']
    """
    if jax.process_count() == 1:
        return [text]
    from jax.experimental import multihost_utils

    data = np.frombuffer(text.encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size)))
    padded = np.zeros(max(1, int(sizes.max())), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [bytes(row[:n]).decode() for row, n in zip(rows, sizes)]


def texts_if_different(text: str) -> list[str] | None:
    """None when every process passes the same ``text``, else every process's (:func:`allgather_text`): a
    collective of one fixed-size digest when they agree (the common case, cheap enough for every step), the texts
    themselves only when they do not. Every process gets the same answer.

    Examples:
        >>> texts_if_different("int32[8, 16]") is None    # one process agrees with itself
        True
    """
    if jax.process_count() == 1:
        return None
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest))
    return None if (digests == digests[0]).all() else allgather_text(text)


def shard_local_batch(local_batch: Mapping, mesh: Mesh) -> dict:
    """Per-process data feeding: each process passes only its rows (:func:`local_batch_rows`) and gets back the
    global batch as arrays sharded over ``("data", "fsdp")``, via ``jax.make_array_from_process_local_data``.
    With one process this equals :func:`shard_batch`. With several, the processes' batches are compared first (a
    collective of a digest on every call, :func:`texts_if_different`): each would otherwise build the global batch
    from its own shapes, and processes that differ in rows or row length would run different programs, with no
    error and wrong numbers.

    Raises:
        ValueError: in every process, when their batches differ in keys, shapes or dtypes.
    """
    _check_batch(local_batch, mesh, len(_local_shards(mesh)),
                 " (per process: this process's devices hold that many of the batch shards)")
    if jax.process_count() > 1:
        every = texts_if_different(", ".join(f"{k}: {np.dtype(np.asarray(v).dtype).name}{list(np.shape(v))}"
                                             for k, v in sorted(local_batch.items())))
        if every is not None:
            each = "; ".join(f"process {i}: {d}" for i, d in enumerate(every))
            raise ValueError(f"the processes' local batches differ ({each}); every process must feed the same keys, "
                             f"rows and row length (a data.Loader with rows= needs width= too, or each pads to its "
                             f"own longest row)")
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


# --- train steps -----------------------------------------------------------------------------------------------

def make_sharded_train_step(model, cfg: LoraConfig, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                            param_shardings: Any, state_shardings: TrainState, loss_fn: LossFn = lm_loss,
                            grad_accum_steps: int = 1, donate: bool = True) -> Callable:
    """:func:`jlora.make_train_step` under ``jax.jit`` with explicit in/out shardings on ``mesh``.

    Returns ``step(state, params, batch) -> (state, metrics)``: the state is donated (its buffers are reused for
    the new state), params and batch are expected on ``param_shardings`` and :func:`batch_sharding` (use
    :func:`place`, :func:`shard_batch`, :func:`shard_local_batch`), metrics come back replicated. With
    ``grad_accum_steps > 1`` micro-batch i takes rows i, i+k, ... of the batch (as :func:`jlora.make_train_step`
    splits it), so that every device works on every micro-batch.

    Activations stay split by rows over ``("data", "fsdp")`` inside the step: the step binds
    :data:`ACTIVATION_RULES` for the logical axes that jlora's models constrain their activations to
    (:func:`jlora.models.layers.constrain`; a model of your own can call it too), so that FSDP gathers each frozen
    kernel rather than the whole batch's activations (which XLA's partitioner would otherwise do where it follows a
    kernel's sharding into them). Where a (micro-)batch's rows do not divide over those axes, nothing is bound.

    The state passed in is deleted by the call (and so are arrays that :func:`place` put on their sharding
    without a copy, such as the adapters given to ``TrainState.create``): keep the state it returns. Passing a
    deleted state again is a ``ValueError`` (XLA's own check can crash a multi-device CPU process).
    """
    plain = make_train_step(model, cfg, optimizer, loss_fn=loss_fn, grad_accum_steps=grad_accum_steps)
    sharded_params = not all(s.is_fully_replicated for s in jax.tree.leaves(param_shardings))
    shards = _size(mesh, "data") * _size(mesh, "fsdp")

    def step(state, params, batch):
        with contextlib.ExitStack() as stack:
            if sharded_params:   # lora_dense's [W; s B] would make XLA re-shard a sharded W
                stack.enter_context(transform.separate_low_rank())
            if all(x.shape[0] // grad_accum_steps % shards == 0 for x in jax.tree.leaves(batch) if x.ndim):
                stack.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
                stack.enter_context(nn.logical_axis_rules(ACTIVATION_RULES))
            return plain(state, params, batch)

    rep = NamedSharding(mesh, P())
    jitted = jax.jit(step, in_shardings=(state_shardings, param_shardings, batch_sharding(mesh)),
                     out_shardings=(state_shardings, rep), donate_argnums=(0,) if donate else ())
    return _refusing_donated(jitted) if donate else jitted


def _refusing_donated(jitted: Callable) -> Callable:
    """``jitted(state, ...)``, refusing a state whose buffers an earlier call consumed (donated)."""
    @functools.wraps(jitted)
    def run(state, *args):
        gone = [x for x in jax.tree.leaves(state)
                if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.is_deleted()]
        if gone:
            raise ValueError(f"the train state passed to the step was donated to an earlier call ({len(gone)} of "
                             f"its arrays are deleted): pass the state that call returned")
        return jitted(state, *args)

    run.lower = jitted.lower
    return run


def make_pmap_train_step(model, cfg: LoraConfig, optimizer: optax.GradientTransformation, *,
                         axis_name: str = "batch", loss_fn: LossFn = lm_loss, grad_accum_steps: int = 1,
                         devices: Sequence[Any] | None = None, donate: bool = True) -> Callable:
    """The train step under ``jax.pmap``: replicated state and frozen params, one batch slice per device.

    Token-weighted gradient sums, metric sums and token counts are summed over replicas with ``lax.psum`` (the
    ``reduce_grads`` hook of :func:`jlora.make_train_step`) before the update, so every replica applies the same
    token-weighted mean gradient, and ``metrics["tokens"]`` counts the whole batch's. Call as
    ``step(replicate(state), replicate(params), split_for_pmap(batch, n))``; metrics come back with a leading
    device axis (identical rows). Dropout masks are the same on every replica (one rng). The state passed in is
    deleted by the call (donated; passing it again is a ``ValueError``).
    """
    step = make_train_step(model, cfg, optimizer, loss_fn=loss_fn, grad_accum_steps=grad_accum_steps,
                           reduce_grads=lambda t: jax.lax.psum(t, axis_name))
    pmapped = jax.pmap(step, axis_name=axis_name, devices=devices, donate_argnums=(0,) if donate else ())
    return _refusing_donated(pmapped) if donate else pmapped


def replicate(tree: Any, devices: Sequence[Any] | None = None) -> Any:
    """Stacks a copy of ``tree`` on each local device (a leading device axis), for :func:`make_pmap_train_step`."""
    devices = list(jax.local_devices() if devices is None else devices)
    sharding = NamedSharding(Mesh(np.array(devices), ("replica",)), P("replica"))

    def rep(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(rep(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        one = jnp.asarray(x)[None]
        return jax.make_array_from_single_device_arrays((len(devices), *one.shape[1:]), sharding,
                                                        [jax.device_put(one, d) for d in devices])
    return jax.tree.map(rep, tree)


def unreplicate(tree: Any) -> Any:
    """The first replica of a pmapped tree."""
    return jax.tree.map(lambda x: x[0], tree)


def split_for_pmap(batch: Mapping, n: int | None = None) -> dict:
    """Reshapes each ``(B, ...)`` leaf to ``(n, B // n, ...)``; ``n`` defaults to the local device count."""
    n = jax.local_device_count() if n is None else n
    out = {}
    for name, x in batch.items():
        if x.shape[0] % n:
            raise ValueError(f"batch leaf {name!r} has {x.shape[0]} rows, which do not split over {n} pmap "
                             f"devices; use a batch size that is a multiple of {n}")
        out[name] = jnp.reshape(x, (n, x.shape[0] // n, *x.shape[1:]))
    return out


# --- multi-host ------------------------------------------------------------------------------------------------

def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None) -> None:
    """Joins this process to a multi-process JAX job (``jax.distributed.initialize``); call it first thing,
    before any other JAX call, in every process.

    Arguments not given are read from ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0),
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` and ``JAX_LOCAL_DEVICE_IDS``; whatever is still unset is left to
    JAX's cluster auto-detection (TPU pods, SLURM, Open MPI, Kubernetes). CPU collectives use gloo, so the same
    code runs multi-process on plain CPUs. Calling it again once initialized does nothing.
    """
    if jax.distributed.is_initialized():
        return
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids)
    except ValueError as e:
        raise ValueError(
            f"{e} jlora.parallel.initialize needs coordinator_address (host:port of process 0), num_processes "
            f"and process_id, as arguments or as JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; "
            f"on TPU pods and SLURM/MPI clusters JAX detects them by itself. Got coordinator_address="
            f"{coordinator_address!r}, num_processes={num_processes!r}, process_id={process_id!r}") from None


def max_over_processes(value: int) -> int:
    """The largest of every process's ``value`` (a collective: every process calls it); ``value`` itself with one
    process. :class:`jlora.data.Loader` takes it as ``width``, so all processes pad their rows to one length.

    Examples:
        >>> max_over_processes(96)
        96
    """
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def is_main_process() -> bool:
    """True in process 0: log, print progress and write run files there only."""
    return jax.process_index() == 0


def to_host(tree: Any) -> Any:
    """Host copies of (possibly multi-host sharded) arrays, identical in every process: numpy arrays, and PRNG
    key arrays (a :class:`jlora.TrainState`'s ``rng``) as key arrays.

    Numpy cannot hold JAX's key dtypes, so a key comes back as a key array of the same implementation rebuilt
    from its key data on the host (uncommitted, like a fresh ``jax.random.key``): the result feeds straight back
    into :func:`place` or a train step, and ``jax.random.key_data`` gives its numpy data for saving. Fully
    replicated arrays (metrics) are read locally; other arrays that span processes are gathered with
    ``process_allgather``, a collective: in a multi-process job every process must call it.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> host = to_host({"step": jnp.int32(3), "rng": jax.random.key(7)})
        >>> type(host["step"]).__name__, jax.random.key_data(host["rng"]).tolist()
        ('ndarray', [0, 7])
    """
    def get(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(get(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        if isinstance(x, jax.Array) and not x.is_fully_addressable and x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(get, tree)


__all__ = ["AXES", "BATCH_AXES", "ACTIVATION_RULES", "make_mesh", "leaf_spec", "param_specs", "param_shardings",
           "adapter_shardings", "like_adapters", "state_shardings", "batch_sharding", "place", "shard_batch",
           "local_batch_rows", "shard_local_batch", "make_sharded_train_step", "make_pmap_train_step", "replicate",
           "unreplicate", "split_for_pmap", "initialize", "max_over_processes", "allgather_text",
           "texts_if_different", "is_main_process", "to_host"]
