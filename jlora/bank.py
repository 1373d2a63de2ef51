"""Many adapters on one base: a fixed-shape bank of adapter slots, routed per batch row, swapped without recompiling.

A :class:`Bank` holds, at every path it covers, a :class:`Slots` node: ``a`` ``(*lead, N, in, R)`` and ``b``
``(*lead, N, R, out)`` for N slots padded to the bank's rank R, plus each slot's ``scale`` and ``rank`` as arrays
``(*lead, N)``. Adapters of any rank <= R, any alpha, rsLoRA, rank/alpha patterns and target sets (a subset of the
bank's paths) share these shapes: a slot is zero where its adapter has no factor, and zero-padding A's columns and
B's rows changes nothing, in the forward pass and in training (their gradients are exactly zero). Putting an
adapter into a slot is therefore a data update: a jitted forward, generate or train step that takes the bank as an
argument never recompiles (``put``/``clear`` are pure functions returning a new bank; names map to slots outside of
jit, in the caller's own dict).

Routing: :func:`apply` takes ``ids`` (batch,), the slot each row uses; :data:`BASE` (-1) means the base model
alone. Each adapted layer gathers its rows' factors and runs one batched matmul:
``y[i] += scale[ids[i]] * (x[i] @ A[ids[i]]) @ B[ids[i]]``. Chosen by measurement against the alternatives (see
``bench/README.md``, "Many adapters"): the gather adds no FLOPs over a single adapter (``2 * T * R * (in + out)``
per layer), where a one-hot einsum over slots costs ``N`` times that, and grouping rows with
``jax.lax.ragged_dot`` needs sorted rows and lowers to a padded dense matmul on GPU. Its cost is the gathered
factors, ``B * R * (in + out)`` values per layer: small next to the activations.

Training: :func:`make_train_step` trains every slot at once on a batch whose rows carry ``adapter_ids``; each slot's
loss is the token-weighted mean over its own rows and the step minimizes their sum, so each slot's gradient is that
of training it alone on its rows (the loss mask is :func:`jlora.lm_loss`'s, packed rows included). A slot with no
rows in a batch does not move. :func:`optimizer` is AdamW with a learning rate and a step count per slot, and leaves
an absent slot's moments and count as they were, so training N adapters together equals N separate trainings on the
same rows, whichever slots each batch holds; :func:`per_slot` does the same for any optax optimizer, norms
included. One passed as it is sees all slots as one tree: its state is shared (an absent slot keeps its factors
while its moments decay and the common step count advances), and whatever it computes over the whole tree or a
whole factor couples the slots: ``optax.clip_by_global_norm`` clips by the norm of every slot's gradient together,
so one slot's rows change another slot's update (and the step's ``grad_norm`` metric is that norm). Wrap such an
optimizer in :func:`per_slot`.

Ids outside the bank follow one rule everywhere (the forward pass, the loss weights, which slots are present): known
outside a trace they are refused; traced, one above the last slot is the last slot and one below :data:`BASE` is the
base model, so a bad id trains or changes no slot but the one it is read as.

Not held by a bank: DoRA magnitudes and whole trained tensors (bias, modules_to_save); they are refused by name.
Under :mod:`jlora.parallel`'s sharded step the bank is replicated on every device (it is small: see
:func:`nbytes`).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora import adapter as adapter_lib
from jlora import compose
from jlora import files
from jlora import lora as lora_lib
from jlora import loss as loss_lib
from jlora import train as train_lib
from jlora import transform
from jlora import tree as tree_lib
from jlora.adapter import Adapter, LayerCall, Variant
from jlora.config import CHANGES_BASE, LoraConfig
from jlora.variants import inits

BASE = -1          # the adapter id of a row that uses the base model alone
VARIANT = "bank"


@jax.tree_util.register_pytree_with_keys_class
class Slots(Adapter):
    """N adapter slots for one kernel: ``a`` (*lead, N, in, R), ``b`` (*lead, N, R, out), extras ``scale`` and
    ``rank`` (*lead, N)."""

    __slots__ = ()
    slot_dims = 1

    @property
    def slots(self) -> int:
        return int(np.shape(self.a)[-3])


def _slot_output(c: LayerCall) -> jax.Array:
    """The adapted output of one layer call with per-row slots (the ``bank`` variant's layer hook)."""
    if c.ids is None:
        raise ValueError(f"the adapter at {c.path!r} is a bank of slots: pass the slot of each batch row, "
                         f"jlora.bank.apply(..., ids) (or adapter_ids= to jlora.apply)")
    node, x, y = c.adapter, c.x, c.y
    ids = jnp.asarray(c.ids, jnp.int32)
    if ids.ndim != 1 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"adapter ids have shape {ids.shape}; the layer at {c.path!r} sees a batch of "
                         f"{x.shape[0]} rows: pass one id per row")
    use = ids >= 0
    safe = jnp.where(use, ids, 0)
    gain = jnp.where(use, jnp.take(node.extras["scale"], safe, mode="clip"), 0.0).astype(c.dtype)      # (B,)
    a = jnp.take(node.a, safe, axis=0, mode="clip").astype(c.dtype)      # ids are made safe: no fill masking
    b = jnp.take(node.b, safe, axis=0, mode="clip").astype(c.dtype)
    lift = (slice(None),) + (None,) * (y.ndim - 1)
    if c.kind == "Embed":
        if c.method == "attend":       # x @ E^T + s (x @ B^T) @ A^T, per row
            h = jnp.einsum("b...d,brd->b...r", x.astype(c.dtype), b)
            return y + (gain[lift] * jnp.einsum("b...r,bvr->b...v", h, a)).astype(y.dtype)
        # gather the rows' tokens from their slots' A directly, never a (B, vocab, R) copy of the tables
        h = jax.vmap(lambda t, s: jnp.take(node.a[s], t, axis=0, mode="clip"))(x, safe).astype(c.dtype)
        return y + (gain[lift] * jnp.einsum("b...r,bro->b...o", h, b)).astype(y.dtype)
    xd = (c.dropout(x) if c.dropout is not None else x).astype(c.dtype)
    spec = c.spec
    if c.kind == "Einsum":                # the transform's einsum with the row letter added to A and B
        lhs, rhs, out = spec.einsum
        row = lhs[0]
        if row == "." or row not in out or row in rhs:
            raise ValueError(f"nn.Einsum at {c.path!r} ({lhs},{rhs}->{out}): a bank routes the input's first axis "
                             f"as batch rows, so it must be a named axis kept in the output; exclude this layer")
        kernel_shape, in_axes, out_axes = spec.kernel_shape, spec.in_axes, spec.out_axes
        in_letters, out_letters = "".join(rhs[i] for i in in_axes), "".join(rhs[i] for i in out_axes)
        z = next(ch for ch in "zyxwvutsrqponmlkjihgfedcba" if ch not in lhs + rhs + out)
        mid = "".join(ch for ch in lhs if ch in out)
        h = jnp.einsum(f"{lhs},{row}{in_letters}{z}->{mid}{z}", xd,
                       a.reshape(a.shape[0], *[kernel_shape[i] for i in in_axes], a.shape[-1]))
        d = jnp.einsum(f"{mid}{z},{row}{z}{out_letters}->{out}", h,
                       b.reshape(b.shape[0], b.shape[1], *[kernel_shape[i] for i in out_axes]))
        shape = [1] * d.ndim
        shape[out.index(row)] = -1
        return y + (d * gain.reshape(shape)).astype(y.dtype)
    if c.kind == "Dense":
        xm = xd
    else:                                 # DenseGeneral: its contracted axes flattened last
        contract = list(transform._normalize_axes(spec.axis, xd.ndim))
        if 0 in contract:
            raise ValueError(f"the layer at {c.path!r} contracts its input's first axis, which a bank routes as "
                             f"batch rows; keep it out of the bank's targets")
        keep = [i for i in range(xd.ndim) if i not in contract]
        xm = jnp.transpose(xd, (*keep, *contract)).reshape(*[xd.shape[i] for i in keep], a.shape[-2])
    h = jnp.einsum("b...i,bir->b...r", xm, a) * gain[(slice(None),) + (None,) * (xm.ndim - 1)]  # scale at rank r
    d = jnp.einsum("b...r,bro->b...o", h, b)
    return y + d.reshape(y.shape).astype(y.dtype)


def _no_merge(w, node, scale):
    raise ValueError("a bank of slots cannot be merged as one adapter: take one slot out with "
                     "jlora.bank.get(bank, slot) and merge that")


adapter_lib.register_variant(Variant(VARIANT, merged=_no_merge, layer_call=_slot_output, invertible=False,
                                     layers=tuple(k for k in adapter_lib.LAYER_KINDS if k != "Conv")))


@dataclasses.dataclass(frozen=True)
class Bank:
    """A fixed-capacity set of adapter slots for one base model (a pytree: ``slots`` are its arrays).

    Attributes:
        slots: the nested tree of :class:`Slots` nodes, one per covered kernel path.
        capacity: N, the number of slots.
        rank: R, the largest rank a slot holds.
        fingerprint: the base model's fingerprint (:func:`jlora.checkpoint.fingerprint`), or None.
    """

    slots: dict
    capacity: int
    rank: int
    fingerprint: str | None = None

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in adapter_lib.adapter_items(self.slots)]

    @property
    def config(self) -> LoraConfig:
        """A config selecting exactly the bank's paths at rank R (its scales are unused: each slot has its own)."""
        return LoraConfig(rank=self.rank, alpha=float(self.rank), targets=tuple(f"^{p}$" for p in self.paths))


jax.tree_util.register_dataclass(Bank, data_fields=["slots"], meta_fields=["capacity", "rank", "fingerprint"])


def create(params: Mapping, *, capacity: int, rank: int, targets: str | Sequence[str], exclude=(),
           layout: Mapping | None = None, dtype: str = "float32", fingerprint: str | None = None) -> Bank:
    """An empty bank of ``capacity`` slots of rank ``rank`` at every kernel ``targets`` selects.

    Args:
        params: the base model's frozen params (or an NNX model).
        capacity: the number of slots N.
        rank: the largest rank R a slot can hold; it may exceed a kernel's sides (a PiSSA adapter's plain form).
        targets, exclude: regexes as in :class:`jlora.LoraConfig`: the kernels the bank covers (the union of
            the target sets of the adapters it will hold, e.g. every linear layer).
        layout: kernel layouts from :func:`jlora.layout` (needed for kernels of more than 2 dims).
        dtype: the dtype of the factors.
        fingerprint: the base's :func:`jlora.checkpoint.fingerprint`; adapters from a run made on another base
            are then refused (:func:`load`).

    Examples:
        >>> import jax.numpy as jnp
        >>> params = {"q_proj": {"kernel": jnp.zeros((64, 64))}, "v_proj": {"kernel": jnp.zeros((64, 32))}}
        >>> bank = create(params, capacity=4, rank=8, targets=("q_proj", "v_proj"))
        >>> bank.slots["v_proj"]["kernel"]
        Slots(a=float32[4, 64, 8], b=float32[4, 8, 32], rank=int32[4], scale=float32[4], variant='bank')
        >>> nbytes(bank)
        28736
    """
    if capacity < 1 or rank < 1:
        raise ValueError(f"a bank needs capacity >= 1 and rank >= 1; got capacity={capacity}, rank={rank}")
    params, layout = lora_lib.resolve(params, layout)    # an NNX model gives its params and layouts
    cfg = LoraConfig(rank=1, targets=targets, exclude=exclude)
    proto = lora_lib.init(params, cfg, key=jax.random.key(0), layout=layout)
    full = [p for p, _ in adapter_lib.full_items(proto)]
    if full:
        raise ValueError(f"a bank holds low-rank adapters only; {full[:3]} would train in full")
    flat = tree_lib.flatten(params)
    nodes = {}
    for path, node in adapter_lib.adapter_items(proto):
        lay = node.layout
        if lay.kind == "Conv":
            raise ValueError(f"a bank does not hold adapters of convolutions: {path!r} is an nn.Conv kernel; "
                             f"exclude it from the bank's targets (jlora.apply runs a conv adapter on its own)")
        lead, fan_in, fan_out = lay.split(tuple(flat[path].shape))   # rank may exceed them: slots are zero-padded
        nodes[path] = Slots(jnp.zeros((*lead, capacity, fan_in, rank), dtype),
                            jnp.zeros((*lead, capacity, rank, fan_out), dtype),
                            {"scale": jnp.zeros((*lead, capacity), jnp.float32),
                             "rank": jnp.zeros((*lead, capacity), jnp.int32)},
                            layout=lay, variant=VARIANT)
    return Bank(tree_lib.unflatten(nodes), capacity, rank, fingerprint)


def nbytes(bank: Bank) -> int:
    """Bytes the bank's arrays take."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(bank)))


def _check_slot(bank: Bank, slot: int) -> None:
    if not 0 <= int(slot) < bank.capacity:
        raise ValueError(f"slot {slot} is out of range: the bank has slots 0..{bank.capacity - 1} "
                         f"({BASE} routes a row to the base model)")


def put(bank: Bank, slot: int, adapters: Mapping, cfg: LoraConfig, *, fingerprint: str | None = None) -> Bank:
    """A new bank with ``adapters`` (made with ``cfg``) in ``slot``; paths they do not cover are zero there.

    Args:
        bank: the bank.
        slot: 0 <= slot < capacity.
        adapters: an adapter tree for the bank's base: plain LoRA adapters at a subset of the bank's paths.
        cfg: their config (gives each path's rank and scale).
        fingerprint: the fingerprint of the base the adapters were trained on, if known (a run folder's);
            refused when it differs from the bank's.

    Raises:
        ValueError: naming the problem: a slot out of range, a path the bank does not cover, a rank above the
            bank's, a DoRA adapter or whole trained tensors, or adapters made for another base.
    """
    _check_slot(bank, slot)
    if fingerprint is not None and bank.fingerprint is not None and fingerprint != bank.fingerprint:
        raise ValueError(f"these adapters were trained on another base model (fingerprint {fingerprint}) than the "
                         f"bank's ({bank.fingerprint}); load them into a bank made for that base")
    full = [p for p, _ in adapter_lib.full_items(adapters)]
    if full:
        raise ValueError(f"a bank holds low-rank adapters only; these adapters also train whole tensors {full[:3]} "
                         f"(bias / modules_to_save): merge those into the base instead")
    if cfg.init in CHANGES_BASE:
        raise ValueError(f"these are {cfg.init} adapters, relative to a residual base rather than the model's "
                         f"weights the bank adds its slots to; convert them to plain LoRA first "
                         f"(jlora.variants.inits.to_original_base; jlora.bank.put_folder does this itself)")
    slots = dict(adapter_lib.adapter_items(bank.slots))
    given = dict(adapter_lib.adapter_items(adapters))
    for path, node in given.items():
        if node.variant != "lora":
            raise ValueError(f"the adapter at {path!r} is a {node.variant!r} adapter (e.g. DoRA's magnitudes), "
                             f"which a bank cannot hold; use plain LoRA adapters")
        if path not in slots:
            covers = f"{sorted(slots)[:6]}{' ...' if len(slots) > 6 else ''}"
            if form := _other_stack_form(path, node, slots):
                raise ValueError(f"the adapter at {path!r} is {form} (the bank covers {covers}): adapters and bank "
                                 f"need one layer-stack form; read the adapters for a model loaded as the bank's "
                                 f"(the same scan_layers), or go through a PEFT folder, which fits either")
            raise ValueError(f"the adapter at {path!r} is outside the bank, which covers {covers}; create the bank "
                             f"with targets covering it")
        lora_lib.check_targeted(path, cfg)
        if slots[path].layout is not None:
            transform.check_layout(node, slots[path].layout, path, "the bank reads that kernel as")
        r = node.rank
        if r > bank.rank:
            raise ValueError(f"the adapter at {path!r} has rank {r}, above the bank's rank {bank.rank}")
        if r != cfg.rank_for(path):
            raise ValueError(f"the adapter at {path!r} has rank {r} but its config gives {cfg.rank_for(path)}")
    values = {}                            # what the slot holds at every path, zero-padded to the bank's rank
    for path, s in slots.items():
        node = given.get(path)
        lead = np.ndim(s.a) - 3
        a = np.zeros(np.shape(s.a)[:lead] + np.shape(s.a)[-2:], s.a.dtype)
        b = np.zeros(np.shape(s.b)[:lead] + np.shape(s.b)[-2:], s.b.dtype)
        scale, rank = np.zeros(np.shape(s.a)[:lead], np.float32), np.zeros(np.shape(s.a)[:lead], np.int32)
        if node is not None:
            r = node.rank
            if np.shape(node.a)[:-2] != np.shape(s.a)[:lead] or np.shape(node.a)[-2] != np.shape(s.a)[-2] \
                    or np.shape(node.b)[-1] != np.shape(s.b)[-1]:
                raise ValueError(f"the adapter at {path!r} (a {np.shape(node.a)}, b {np.shape(node.b)}) does not "
                                 f"fit the bank's kernel (a {np.shape(s.a)[:lead] + np.shape(s.a)[-2:-1]}+(r,)); "
                                 f"it was made for another model")
            a[..., :r] = np.asarray(node.a, s.a.dtype)
            b[..., :r, :] = np.asarray(node.b, s.b.dtype)
            scale[...], rank[...] = cfg.scale(path), r
        values[path] = (a, b, scale, rank)
    written = _write_slot(tree_lib.unflatten(slots), jnp.asarray(int(slot), jnp.int32), tree_lib.unflatten(values))
    return dataclasses.replace(bank, slots=written)


@jax.jit
def _write_slot(slots: dict, slot: jax.Array, values: dict) -> dict:
    """Every path's slot ``slot`` set to ``values`` in one compiled call (the slot is data: one compile per bank
    shape, not per slot)."""
    def write(s, v):
        lead = np.ndim(s.a) - 3
        a, b, scale, rank = v
        put_in = lambda x, y: jax.lax.dynamic_update_index_in_dim(x, y.astype(x.dtype), slot, lead)  # noqa: E731
        return s.replace(a=put_in(s.a, a), b=put_in(s.b, b),
                         extras={"scale": put_in(s.extras["scale"], scale), "rank": put_in(s.extras["rank"], rank)})

    return jax.tree.map(write, slots, values, is_leaf=lambda x: isinstance(x, Slots))


def clear(bank: Bank, slot: int) -> Bank:
    """A new bank with ``slot`` empty (zero): rows routed to it get the base model's output."""
    return put(bank, slot, {}, LoraConfig(rank=1, targets="^$"))


def get(bank: Bank, slot: int) -> tuple[dict, LoraConfig]:
    """The adapters in ``slot`` (cut to their ranks) and a config with their ranks and scales.

    The config's alphas are chosen so that its scales equal the slot's (``alpha = scale * r``, plain LoRA).
    """
    _check_slot(bank, slot)
    out, ranks, alphas = {}, {}, {}
    for path, s in adapter_lib.adapter_items(bank.slots):
        lead = np.ndim(s.a) - 3
        at = (slice(None),) * lead + (int(slot),)
        r_all = np.asarray(s.extras["rank"][at]).reshape(-1)
        r = int(r_all.max()) if r_all.size else 0
        if r == 0:
            continue
        scale = float(np.asarray(s.extras["scale"][at]).reshape(-1)[0])
        out[path] = Adapter(s.a[at][..., :r], s.b[at][..., :r, :], layout=s.layout)
        ranks[path], alphas[path] = r, scale * r
    if not out:
        raise ValueError(f"slot {slot} is empty")
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    a0 = max(set(alphas.values()), key=list(alphas.values()).count)
    cfg = LoraConfig(rank=r0, alpha=a0, targets=tuple(f"^{p}$" for p in out),
                     rank_pattern={f"^{p}$": r for p, r in ranks.items() if r != r0},
                     alpha_pattern={f"^{p}$": a for p, a in alphas.items() if a != a0})
    return tree_lib.unflatten(out), cfg


def apply(model, params: Mapping, bank: Bank, ids: jax.Array, *args, **kwargs) -> Any:
    """Runs ``model`` with row ``i`` of the batch using slot ``ids[i]`` (:data:`BASE`: the base model alone).

    Equal, row by row, to :func:`jlora.apply` with that row's adapter (and to the merged model). Takes the same
    keyword arguments as :func:`jlora.apply` (``rngs``, ``variables``, ``mutable``, ``method``, ...).

    Raises:
        ValueError: ``ids`` known outside a trace (not under ``jit``) hold a value other than :data:`BASE` or a
            slot. Traced ids cannot be checked: one above the last slot uses the last, one below ``BASE`` the base.
    """
    ids = _route(ids, bank.capacity)
    return transform.apply(model, params, bank.slots, bank.config, *args, adapter_ids=ids, **kwargs)


def _other_stack_form(path: str, node: Adapter, slots: Mapping[str, Adapter]) -> str | None:
    """Why the adapter ``node`` at ``path``, outside the bank's ``slots``, is there in the other layer-stack form
    (:func:`jlora.compose.stack_twin`); None if it is not."""
    twin = compose.stack_twin(path, node, slots)
    if twin is None:
        return None
    if twin[1] == "stacked":
        return "stacked over the layers of a scanned model (scan_layers), while the bank's model has them unrolled"
    return "one layer's of an unrolled model, while the bank's model stacks its layers (scan_layers)"


def _route(ids: jax.Array, capacity: int) -> jax.Array:
    """``ids`` as every bank function reads them (the forward pass, the loss weights, the slots present): int32,
    :data:`BASE` for any id below 0, the last slot for any id above it.

    Raises:
        ValueError: ``ids`` are not integers, or, known outside a trace, hold a value other than :data:`BASE` or a
            slot (traced ids cannot be checked, and are read as above).

    Examples:
        >>> jax.jit(_route, static_argnums=1)(jnp.array([0, 2, 7, -1, -5]), 3).tolist()
        [0, 2, 2, -1, -1]
    """
    values = None if isinstance(ids, jax.core.Tracer) else np.asarray(ids)   # (copied to the host once)
    dtype = ids.dtype if values is None else values.dtype
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"adapter ids must be integers (a slot, or {BASE} for the base model); got dtype {dtype}, "
                         f"which would be truncated to a slot (-0.5 to slot 0, say)")
    if values is not None:
        bad = values[(values < BASE) | (values >= capacity)]
        if bad.size:
            raise ValueError(f"adapter ids {sorted(set(bad.tolist()))[:5]} are out of range: the bank has slots "
                             f"0..{capacity - 1}, and {BASE} routes a row to the base model")
    ids = jnp.asarray(ids, jnp.int32)
    return jnp.where(ids < 0, BASE, jnp.minimum(ids, capacity - 1))


@dataclasses.dataclass(frozen=True)
class _BankApply:
    """``apply_fn`` for :func:`jlora.models.generate.generate`: pass ``(params, bank, ids)`` as its params."""

    model: Any

    def __call__(self, params_bank_ids, *args, **kwargs):
        params, bank, ids = params_bank_ids
        return apply(self.model, params, bank, ids, *args, **kwargs)


def apply_fn(model) -> Callable:
    """An ``apply_fn`` for :func:`jlora.models.generate.generate` with ``params=(params, bank, ids)``: each row
    decodes with its own slot; the compiled function serves any bank contents and any mix of ids."""
    return _BankApply(model)


# --- folders ----------------------------------------------------------------------------------------------------

BANK_FILE, BANK_META = "bank.safetensors", "bank.json"


def read_folder(folder, loaded) -> tuple[dict, LoraConfig, str | None]:
    """``(adapters, config, base fingerprint or None)`` from a PEFT adapter folder or a jlora run folder (its
    latest checkpoint). A run folder records the fingerprint of the base it trained on; a PEFT folder does not
    (its tensors are checked against the base's shapes instead)."""
    from jlora import checkpoint, peft

    folder = pathlib.Path(folder)
    if (folder / peft.CONFIG_FILE).is_file():
        adapters, cfg = peft.load(folder, loaded)
        return adapters, cfg, None
    check_run_form(folder, loaded)
    ckpt = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
    with checkpoint.CheckpointManager(ckpt) as manager:
        if manager.latest_step() is None:
            raise FileNotFoundError(f"{folder} is neither a PEFT adapter folder ({peft.CONFIG_FILE}) nor a jlora "
                                    f"run folder with a checkpoint")
        meta = manager.metadata()
        cfg = LoraConfig.from_dict(meta["lora_config"])
        layout = transform.layout(loaded.model, jnp.zeros((1, 2), jnp.int32))
        base = run_base(meta, loaded.params, cfg, layout)
        seen, here = meta["base_model"]["fingerprint"], checkpoint.fingerprint(loaded.params)
        if base is loaded.params and seen != here and not checkpoint.is_base(meta["base_model"], loaded.params):
            raise ValueError(f"{folder} was trained on {checkpoint.base_model(meta['base_model'].get('name'))} "
                             f"(fingerprint {seen}), not on this one (fingerprint {here}); use it with the base it was "
                             f"trained on (the `jlora` commands: --model PATH)")
        adapters = manager.restore_adapters(params=base, lora_config=cfg, name=meta["base_model"]["name"],
                                            layout=layout)
    adapters, cfg = inits.to_original_base(adapters, loaded.params, cfg)   # PiSSA/OLoRA: as a plain LoRA
    return adapters, cfg, here


def run_base(meta: Mapping, params: Mapping, cfg: LoraConfig, layout=None, *, residual: Mapping | None = None
             ) -> Mapping:
    """The base a run's checkpoint (its metadata ``meta``) was saved against, given the loaded base ``params``:
    ``params`` itself, or, for a PiSSA/OLoRA checkpoint written before checkpoints named the original base, the
    residual base it named instead (``residual`` when the caller has it, else recomputed: the initial factors are
    an SVD or QR of ``params``). A checkpoint of neither kind gets ``params``, which its restore then refuses by
    fingerprint."""
    from jlora import checkpoint

    if cfg.init not in inits.CHANGES_BASE or checkpoint.is_base(meta["base_model"], params):
        return params
    if residual is None:
        _, residual = inits.init_with_base(params, cfg, key=jax.random.key(0), layout=layout)   # no random draws
    return residual if checkpoint.is_base(meta["base_model"], residual) else params


def check_run_form(folder, loaded) -> None:
    """Refuses a run folder whose layer stack differs from ``loaded``'s: a run saved with ``model.scan_layers``
    holds one stacked adapter per kernel, an unrolled one an adapter per layer, and the base's fingerprint differs
    with it. A PEFT folder (or a folder without a ``config.yaml``) fits either."""
    import yaml

    path = pathlib.Path(folder) / "config.yaml"
    if not path.is_file():
        return
    saved = bool(((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("scan_layers", False))
    here = bool(getattr(loaded.config, "scan_layers", False))
    if saved != here:
        raise ValueError(f"run folder {folder} was trained with model.scan_layers: {str(saved).lower()}, but the "
                         f"model is loaded here with scan_layers: {str(here).lower()} (for another run, or by the "
                         f"config); runs of both forms cannot share one model: export this one to PEFT (`jlora "
                         f"export-peft --run {folder} --out DIR`), which fits either, and pass that folder")


def put_folder(bank: Bank, slot: int, folder, loaded) -> Bank:
    """:func:`put` the adapters of a PEFT or run folder (for ``loaded``'s base) into ``slot``."""
    adapters, cfg, seen = read_folder(folder, loaded)
    return put(bank, slot, adapters, cfg, fingerprint=seen)


def save(directory, bank: Bank) -> None:
    """Writes the bank (every slot's factors, scales and ranks) to ``directory``; :func:`load` reads it back."""
    import json

    from jlora.hf import write_safetensors

    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    layouts = {p: dataclasses.asdict(s.layout) for p, s in adapter_lib.adapter_items(bank.slots)}
    # each file beside its name, renamed into place once both are whole (jlora.files): a failed save leaves the
    # old bank, and a reader's map of the old file is never truncated under it
    with files.replacing(out / BANK_FILE) as arrays:
        write_safetensors(arrays, {p: np.asarray(x) for p, x in tree_lib.leaves_by_path(bank.slots).items()})
        with files.replacing(out / BANK_META) as meta:
            pathlib.Path(meta).write_text(json.dumps({"capacity": bank.capacity, "rank": bank.rank,
                                                      "fingerprint": bank.fingerprint, "layouts": layouts}, indent=1))


def load(directory) -> Bank:
    """Reads a bank written by :func:`save`."""
    import json

    from jlora.hf import SafetensorsFile

    folder = pathlib.Path(directory)
    meta = json.loads((folder / BANK_META).read_text())
    arrays = SafetensorsFile(folder / BANK_FILE)
    nodes = {}
    for path, lay in meta["layouts"].items():
        layout = adapter_lib.KernelLayout(lay["kind"], tuple(lay["in_axes"]), tuple(lay["out_axes"]), lay["lead"],
                                          lay["traced"])
        nodes[path] = Slots(jnp.asarray(arrays[f"{path}/a"]), jnp.asarray(arrays[f"{path}/b"]),
                            {"rank": jnp.asarray(arrays[f"{path}/rank"]),
                             "scale": jnp.asarray(arrays[f"{path}/scale"])},
                            layout=layout, variant=VARIANT)
    return Bank(tree_lib.unflatten(nodes), meta["capacity"], meta["rank"], meta["fingerprint"])


def export_peft(bank: Bank, slot: int, out_dir, loaded):
    """Writes ``slot`` as a PEFT adapter folder for ``loaded``'s base (see :func:`jlora.peft.save`)."""
    from jlora import peft

    adapters, cfg = get(bank, slot)
    return peft.save(out_dir, adapters, cfg, loaded)


# --- training ---------------------------------------------------------------------------------------------------

def factors(bank: Bank) -> dict:
    """The trainable part of a bank: ``{path: (a, b)}`` (scales and ranks stay fixed)."""
    return tree_lib.unflatten({p: (s.a, s.b) for p, s in adapter_lib.adapter_items(bank.slots)})


def with_factors(bank: Bank, trained: Mapping) -> Bank:
    """``bank`` with trained factors (from :func:`factors`' structure) in place."""
    flat = dict(_pairs(trained))
    new = {p: s.replace(a=flat[p][0], b=flat[p][1]) for p, s in adapter_lib.adapter_items(bank.slots)}
    return dataclasses.replace(bank, slots=tree_lib.unflatten(new))


def _pairs(tree, prefix=""):
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, tuple):
            yield path, v
        else:
            yield from _pairs(v, path)


def _on_slot_axis(v: jax.Array, x: jax.Array) -> jax.Array:
    """A per-slot vector ``v`` (N,) shaped to broadcast against a factor ``x`` (*lead, N, in, r) or (*lead, N, r,
    out): the slot axis is third from the end."""
    shape = [1] * x.ndim
    shape[x.ndim - 3] = -1
    return v.reshape(shape)


def slots_present(batch: Mapping, capacity: int) -> jax.Array:
    """(capacity,) bool: which slots have a row with at least one target token in ``batch`` (ids out of range are
    read as :func:`apply` reads them).

    Examples:
        >>> batch = {"input_ids": jnp.ones((3, 4), jnp.int32), "adapter_ids": jnp.array([2, BASE, 0])}
        >>> slots_present(batch, 4).tolist()
        [True, False, True, False]
    """
    ids = _route(batch["adapter_ids"], capacity)
    hit = jnp.where(slot_weights(batch, capacity) > 0, 1.0, 0.0)
    return jax.ops.segment_sum(hit, jnp.maximum(ids, 0), capacity) > 0


def slot_weights(batch: Mapping, capacity: int) -> jax.Array:
    """Per-row loss weights: ``1 / (target tokens of the row's slot)``, 0 for base rows, so the token-weighted
    loss of the batch is the sum over slots of each slot's mean, times the number of slots present. Target tokens
    are counted as :func:`jlora.lm_loss` counts them; ids out of range are read as :func:`apply` reads them.

    Examples:
        >>> batch = {"input_ids": jnp.ones((3, 4), jnp.int32), "adapter_ids": jnp.array([1, BASE, 1])}
        >>> [round(float(w), 4) for w in slot_weights(batch, 2)]    # slot 1: 2 rows of 3 targets each
        [0.1667, 0.0, 0.1667]
    """
    ids = _route(batch["adapter_ids"], capacity)
    _, targets = loss_lib.shifted_targets(batch["input_ids"], train_lib.loss_mask(batch))
    per_row = jnp.sum(targets, axis=1)                    # each row's target tokens, counted as lm_loss counts them
    use = ids >= 0
    slot = jnp.maximum(ids, 0)
    per_slot = jax.ops.segment_sum(jnp.where(use, per_row, 0.0), slot, capacity)
    return jnp.where(use, 1.0 / jnp.maximum(jnp.take(per_slot, slot, mode="clip"), 1.0), 0.0)


def bank_lm_loss(apply_fn, batch) -> tuple[jax.Array, dict]:
    """:func:`jlora.lm_loss` for a batch routed over slots: the sum over slots of each slot's mean token loss."""
    capacity = apply_fn.capacity
    w = slot_weights(batch, capacity)
    mask = train_lib.loss_mask(batch)
    mask = jnp.ones(batch["input_ids"].shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    present = jnp.sum(slots_present(batch, capacity))
    weighted = {**batch, "loss_mask": mask * w[:, None]}
    mean_of_means, _ = train_lib.lm_loss(apply_fn, weighted)
    loss = mean_of_means * present
    return loss, {"loss": loss / jnp.maximum(present, 1), "tokens": jnp.ones((), jnp.float32),
                  "slots": present.astype(jnp.float32)}


def make_train_step(model, bank: Bank, optimizer: optax.GradientTransformation, *,
                    loss_fn: Callable = bank_lm_loss, model_rngs: Sequence[str] = ("dropout",)):
    """``step(state, params, bank, batch) -> (state, metrics)`` training every slot on its own rows.

    ``state.adapters`` holds :func:`factors` of the bank (``jlora.TrainState.create(factors(bank), optimizer,
    rng=...)``); ``batch["adapter_ids"]`` (B,) routes the rows. The bank argument gives the scales, ranks and
    shapes; its factors are replaced by the state's, so after training ``with_factors(bank, state.adapters)`` is
    the trained bank. Jit it once: putting other adapters into the bank never recompiles.

    No LoRA dropout is applied, whatever the ``dropout`` of the configs the slots' adapters came with (the bank
    runs one config for all slots, :attr:`Bank.config`, without dropout); train one adapter with
    :func:`jlora.make_train_step` for that. The model's own rng streams ``model_rngs`` (its ``nn.Dropout``) get a
    fresh key every step, derived from ``state.rng`` as in :func:`jlora.make_train_step`.

    A slot with no target tokens in ``batch`` keeps its factors (its update is zero). An optimizer that takes
    extra arguments (``optax.GradientTransformationExtraArgs``, as :func:`optimizer` and ``optax.chain`` are) gets
    ``slots_present``, the (N,) bool of :func:`slots_present`. Ids outside the bank are read as :func:`apply`
    reads them (traced: above the last slot is the last, below :data:`BASE` the base), in the loss weights and in
    ``slots_present`` too, so a bad id trains no slot but the one it is read as.

    Each slot's gradient is that of its own loss, but the optimizer sees all slots as one tree. :func:`optimizer`
    and :func:`per_slot` run it on each slot alone. An optimizer passed as it is shares its state (see the module
    docstring), and everything it computes over the whole tree or a whole factor spans all slots:
    ``optax.clip_by_global_norm`` (e.g. in ``optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr))``)
    scales every slot's gradient by one factor, computed from the norm of all slots' gradients together, and a trust
    ratio (LARS, LAMB) takes each factor's norm over all its slots, so one slot's rows change another slot's update.
    Wrap such an optimizer in :func:`per_slot` to clip each slot by its own norm. ``metrics["grad_norm"]`` is
    likewise the norm of all slots' gradients together.

    Raises:
        ValueError: (when traced, before any compute) the bank has another capacity than the one the step was built
            for; the state's adapters are not :func:`factors` of this bank (e.g. the bank itself); the batch has no
            ``input_ids`` or ``adapter_ids``, or not one id per row; the optimizer state holds ``optax.MultiSteps``:
            it accumulates gradients over calls, but each call masks the slots by its own rows, so a slot absent
            from the last micro-batch would lose its accumulated update (``per_slot(optax.MultiSteps(...))``
            accumulates each slot over the calls that have its rows; or pass the whole batch to one call).
            Not under ``jit``, also ids out of range.
    """
    capacity = bank.capacity

    def step(state, params, bank, batch):
        _check_step_args(capacity, state, bank, batch, per_slot=getattr(optimizer.update, "per_slot", False))
        batch = {**batch, "adapter_ids": _route(batch["adapter_ids"], capacity)}   # the rule of apply's ids

        def f(fac):
            routed = with_factors(bank, fac)

            def apply_fn(*args, rngs=None, **kwargs):
                own = {**train_lib.stream_keys(state.rng, model_rngs), transform.DROPOUT_RNG: state.rng}
                return apply(model, params, routed, batch["adapter_ids"], *args, rngs={**own, **dict(rngs or {})},
                             **kwargs)

            apply_fn.hidden_output = bool(getattr(model, "HIDDEN_OUTPUT", False))
            apply_fn.capacity = capacity
            return loss_fn(apply_fn, batch)

        (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(state.adapters)
        present = slots_present(batch, capacity)
        extra = {"slots_present": present} if isinstance(optimizer, optax.GradientTransformationExtraArgs) else {}
        seen = train_lib.opt_view(state.adapters)   # float16 factors: the optimizer works in float32
        grads = jax.tree.map(lambda g, a: g.astype(a.dtype), grads, seen)
        updates, opt_state = optimizer.update(grads, state.opt_state, seen, **extra)
        updates = jax.tree.map(lambda u: jnp.where(_on_slot_axis(present, u), u, 0), updates)
        adapters = optax.apply_updates(state.adapters, updates)
        rng = jax.random.split(state.rng)[0]
        metrics = {**metrics, "grad_norm": optax.global_norm(grads)}
        return train_lib.TrainState(state.step + 1, adapters, opt_state, rng), metrics

    return step


def _check_step_args(capacity: int, state, bank, batch, *, per_slot: bool = False) -> None:
    """Refuses, by name, the arguments a bank train step cannot use (see :func:`make_train_step`)."""
    if not isinstance(bank, Bank):
        raise TypeError(f"the bank train step takes step(state, params, bank, batch); its third argument is a "
                        f"{type(bank).__name__}, not a jlora.bank.Bank")
    if bank.capacity != capacity:
        raise ValueError(f"this step was built for a bank of {capacity} slots but is called with a bank of "
                         f"{bank.capacity}: the slot count is fixed when the step is built (its loss weights and "
                         f"optimizer state have one entry per slot); build a step for this bank, "
                         f"jlora.bank.make_train_step(model, bank, optimizer)")
    fix = "jlora.TrainState.create(jlora.bank.factors(bank), optimizer, rng=...)"
    if isinstance(state.adapters, Bank):
        raise ValueError(f"state.adapters is the whole Bank; a bank trains its factors only: create the state with "
                         f"{fix}")
    want = {jax.tree_util.keystr(k): np.shape(x) for k, x in jax.tree_util.tree_leaves_with_path(factors(bank))}
    got = {jax.tree_util.keystr(k): np.shape(x) for k, x in jax.tree_util.tree_leaves_with_path(state.adapters)}
    if got != want:
        diff = [f"{k}: state {got.get(k, 'missing')}, bank {want.get(k, 'missing')}"
                for k in [*want, *(k for k in got if k not in want)] if got.get(k) != want.get(k)]
        raise ValueError(f"state.adapters are not the factors of this bank ({len(diff)} of {len(want)} leaves "
                         f"differ; {'; '.join(diff[:3])}{' ...' if len(diff) > 3 else ''}): create the state "
                         f"from the bank the step trains, {fix}")
    multi = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.MultiStepsState))
             if isinstance(s, optax.MultiStepsState)]
    if multi and not per_slot:   # inside per_slot, an absent slot keeps its accumulator as it is
        raise ValueError("the bank's optimizer is wrapped in optax.MultiSteps, which accumulates gradients over "
                         "calls; a bank step masks each slot by the rows of its own call, so a slot absent "
                         "from the last micro-batch would lose its accumulated update. Wrap it per slot instead, "
                         "jlora.bank.per_slot(optax.MultiSteps(...)) (each slot accumulates over the calls that "
                         "have its rows), or pass the whole batch to one step call")
    if not isinstance(batch, Mapping) or "adapter_ids" not in batch or "input_ids" not in batch:
        found = (f"holds keys {sorted(map(str, batch))}" if isinstance(batch, Mapping)
                 else f"is a {type(batch).__name__}")
        raise ValueError(f"a bank train step needs a dict batch with 'input_ids' (B, T) and 'adapter_ids' (B,), "
                         f"the slot of each row ({BASE}: the base model); the batch {found}. Add the missing key, "
                         f"e.g. adapter_ids=jnp.full((B,), slot) for a batch of one slot")
    rows, ids = np.shape(batch["input_ids"])[:1], np.shape(batch["adapter_ids"])
    if ids != rows:
        raise ValueError(f"batch['adapter_ids'] has shape {ids}, but batch['input_ids'] has shape "
                         f"{np.shape(batch['input_ids'])}: pass one slot id per row, shape {rows}")


def scale_by_slot(learning_rates: Sequence[float] | jax.Array) -> optax.GradientTransformation:
    """Multiplies each slot's updates by ``-learning_rates[slot]`` (the last step of a per-slot optimizer)."""
    lrs = jnp.asarray(learning_rates, jnp.float32)

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: u * _on_slot_axis(-lrs, u).astype(u.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def per_slot(optimizer: optax.GradientTransformation | Callable[[jax.Array], optax.GradientTransformation],
             learning_rates: Sequence[float] | None = None) -> optax.GradientTransformationExtraArgs:
    """Any optax optimizer run separately for each slot of :func:`factors`: each slot keeps its own state (moments,
    step count, schedule position) and its own norms (``optax.clip_by_global_norm`` clips each slot's gradient
    alone), as if it were trained by itself.

    ``optimizer`` is one ``GradientTransformation`` for every slot, or with ``learning_rates`` a function of the
    learning rate, called with each slot's (``lambda lr: optax.adamw(lr)``). ``update(grads, state, params,
    slots_present=...)``: a slot that is not present (:func:`slots_present`; all are when it is not given) gets a
    zero update and keeps its state, as if that step had not happened for it.

    ``optax.MultiSteps`` works too, per slot: a slot accumulates its gradients over the calls that have its rows
    and applies them every k of those, as when it trains alone on its own micro-batches.

    Slot ``s`` equals the optimizer training that adapter alone when it acts on each value by itself or through
    norms over the whole tree (SGD, Adam/AdamW, Lion, clipping): a bank pads every slot to one rank and target set
    with zeros, which those leave at zero. Optimizers that use a parameter's shape (Adafactor's factored moments,
    Shampoo) see the padded shapes instead.

    Examples:
        >>> grads = {"a": jnp.ones((2, 3, 1))}                     # 2 slots
        >>> opt = per_slot(lambda lr: optax.adam(lr), [0.1, 0.2])
        >>> u, state = opt.update(grads, opt.init(grads), grads, slots_present=jnp.array([True, False]))
        >>> [round(float(x), 4) for x in u["a"][:, 0, 0]], state[0].count.tolist()   # Adam's first step: -lr
        ([-0.1, 0.0], [1, 0])
    """
    if learning_rates is None:
        if not _is_transformation(optimizer):
            raise TypeError(f"per_slot takes an optax GradientTransformation (or optax.MultiSteps), or a function of "
                            f"the learning rate together with `learning_rates` (one per slot); got "
                            f"{type(optimizer).__name__}")
        built = _transformation(optimizer)
        lrs, make = None, (lambda lr: built)
    else:
        if _is_transformation(optimizer):
            raise TypeError("with `learning_rates`, pass a function of the learning rate (e.g. "
                            "`lambda lr: optax.adamw(lr)`), not a built optimizer")
        lrs, make = jnp.asarray(learning_rates, jnp.float32), (lambda lr: _transformation(optimizer(lr)))
        if lrs.ndim != 1:
            raise ValueError(f"`learning_rates` must be one number per slot; got shape {lrs.shape}")

    def axes(tree):        # each factor's slot axis (third from the end), for vmap
        _check_factors(tree)
        return jax.tree.map(lambda x: x.ndim - 3, tree)

    def rates(tree):
        _check_factors(tree)
        if lrs is None:
            return None
        n = {x.shape[x.ndim - 3] for x in jax.tree.leaves(tree)}
        if n != {lrs.shape[0]}:
            raise ValueError(f"{lrs.shape[0]} learning rates for a bank of {sorted(n)} slots: give one per slot")
        return lrs

    def init(params):
        return jax.vmap(lambda lr, p: make(lr).init(p), in_axes=(None if lrs is None else 0, axes(params)))(
            rates(params), params)

    def update(grads, state, params=None, *, slots_present=None, **extra_args):
        del extra_args
        step = lambda lr, g, s, p: make(lr).update(g, s, p)   # noqa: E731
        updates, new = jax.vmap(step, in_axes=(None if lrs is None else 0, axes(grads), 0,
                                               None if params is None else axes(params)),
                                out_axes=(axes(grads), 0))(rates(grads), grads, state, params)
        if slots_present is not None:
            present = jnp.asarray(slots_present, bool)
            new = jax.tree.map(lambda n, o: jnp.where(present.reshape((-1,) + (1,) * (jnp.ndim(n) - 1)), n, o),
                               new, state)
            updates = jax.tree.map(lambda u: jnp.where(_on_slot_axis(present, u), u, 0), updates)
        return updates, new

    update.per_slot = True   # make_train_step: this state's MultiSteps, if any, is one per slot
    return optax.GradientTransformationExtraArgs(init, update)


def _is_transformation(opt) -> bool:
    return isinstance(opt, (optax.GradientTransformation, optax.MultiSteps))


def _transformation(opt) -> optax.GradientTransformation:
    """``opt`` as a GradientTransformation: ``optax.MultiSteps`` is a wrapper that builds one."""
    if isinstance(opt, optax.MultiSteps):
        return opt.gradient_transformation()
    if not isinstance(opt, optax.GradientTransformation):
        raise TypeError(f"per_slot's function of the learning rate must return an optax GradientTransformation; "
                        f"got {type(opt).__name__}")
    return opt


def _check_factors(tree) -> None:
    """Refuses a tree that is not a bank's :func:`factors` (each leaf with its slot axis third from the end)."""
    fix = "pass jlora.bank.factors(bank): jlora.TrainState.create(jlora.bank.factors(bank), optimizer, rng=...)"
    if isinstance(tree, Bank):
        raise ValueError(f"a per-slot optimizer was given the whole Bank; it trains the bank's factors only: {fix}")
    flat = [(jax.tree_util.keystr(k), np.shape(x)) for k, x in jax.tree_util.tree_leaves_with_path(tree)
            if np.ndim(x) < 3]
    if flat:
        raise ValueError(f"a per-slot optimizer runs on a bank's factors, (*lead, N, in, r) and (*lead, N, r, out), "
                         f"with the slot axis third from the end; the leaf at {flat[0][0]} has shape {flat[0][1]}: "
                         f"{fix}")


def optimizer(learning_rates: Sequence[float], *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
              weight_decay: float = 0.0) -> optax.GradientTransformationExtraArgs:
    """AdamW with one learning rate and one step count per slot: slot s follows ``optax.adamw(learning_rates[s],
    b1, b2, eps, weight_decay=weight_decay)`` over the steps in which it had rows (:func:`per_slot`).

    Examples:
        >>> grads = {"a": jnp.ones((2, 3, 1))}                     # 2 slots
        >>> opt = optimizer([0.1, 0.2])
        >>> u, state = opt.update(grads, opt.init(grads), grads, slots_present=jnp.array([True, False]))
        >>> [round(float(x), 4) for x in u["a"][:, 0, 0]]          # Adam's first step: -lr; slot 1 had no rows
        [-0.1, 0.0]
    """
    return per_slot(lambda lr: optax.adamw(lr, b1, b2, eps, weight_decay=weight_decay), learning_rates)


__all__ = ["BASE", "Bank", "Slots", "create", "put", "clear", "get", "apply", "apply_fn", "nbytes", "factors",
           "read_folder", "put_folder", "save", "load", "export_peft",
           "with_factors", "make_train_step", "optimizer", "per_slot", "scale_by_slot", "slots_present",
           "slot_weights", "bank_lm_loss"]
