"""Adapter-only checkpoints on orbax's ``CheckpointManager``, with exact resume and validation before restore.

A checkpoint holds what trains and nothing else: the adapters, the optimizer state, the step, the RNG key and the
data position, plus a metadata JSON that says what the adapters belong to. The frozen base weights are never
written; a base model is identified instead by :func:`fingerprint`, a hash of its parameter paths, shapes, dtypes
and a few hundred strided samples of each leaf's values (so a base model and its instruct variant differ, while the
cost is a few hundred reads per leaf whatever the model's size). A manager computes that identity once per params
tree and keeps only the result, with weak references to tell the tree again: it never holds the base weights.

On disk, one folder per saved step, written by orbax into ``<step>.orbax-checkpoint-tmp`` and renamed to
``<step>`` only when complete (a process killed mid-save leaves a tmp folder that no listing or restore sees; a save
that fails with an exception has its tmp folder removed by the manager, see :meth:`CheckpointManager.save`)::

    <directory>/<step>/adapters/      orbax PyTree (OCDBT/zarr): the adapter tree
    <directory>/<step>/train_state/   orbax PyTree: {"step", "rng" (key data, uint32), "opt_state"}
    <directory>/<step>/jlora/metadata JSON: format, jlora version, LoraConfig, base model name + fingerprint,
                                      RNG impl, data position (or one per process), user metrics, and per-leaf
                                      shape/dtype/checksum
    <directory>/<step>/metrics/       orbax's copy of the metrics (when keep-best is on)

Restore validates before it loads anything: the step exists, the metadata parses, the base model's fingerprint
matches, the LoraConfig gives the same adapter ranks and scales, and the target tree has the saved paths, shapes
and dtypes. After loading, every leaf's checksum (an order-independent uint32 sum computed on device, so it works
on sharded arrays) is compared with the saved one, which catches garbled data files that orbax itself would read
without complaint. Restore only reads: a failed restore leaves every saved file as it was.

Failures: a step whose files cannot be read (a truncated or garbled data file, a missing item or item tree metadata
file, metadata that does not parse) is a :class:`CheckpointError` naming the folder, the read error and the other
saved steps. Any other failure (a target whose shardings cannot hold the arrays, say) is raised as itself: the
checkpoint is fine. When orbax's parallel reads fail, the reads still in flight leave asyncio debris behind
("Exception ignored in: <coroutine ...>", "Event loop is closed", "... exception was never retrieved"); the manager
waits for it and keeps it off stderr, so a failed restore prints nothing but its error.

Several processes (multi-host): every process calls :meth:`~CheckpointManager.save` and
:meth:`~CheckpointManager.restore`. Each process's ``data_position`` is gathered (its JSON, through
``process_allgather``) and written by the primary process: positions that are the same in every process are stored
once as ``data_position`` (the single-process format) and restore on any number of processes; positions that differ
(a packing loader: each process packs its own share) are stored as ``data_positions``, one per process in process
order, and restore only on as many processes as saved them, each process getting its own back: on another number of
processes :meth:`~CheckpointManager.restore` is an error unless told to leave the position out.

Retention uses orbax's preservation policies: the ``max_to_keep`` latest steps, joined (``AnyPreservationPolicy``)
with the ``keep_best`` best by a metric; the latest step is always kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
import traceback
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

from jlora import files
from jlora import tree as tree_lib
from jlora.config import CHANGES_BASE, LoraConfig
from jlora.lora import check_fits, plain_params
from jlora.train import TrainState

FORMAT = "jlora.checkpoint/1"
ITEMS = ("adapters", "train_state", "jlora")
# LoraConfig fields that change neither an adapter's shape nor its scale (a resume may change them).
_FREE_FIELDS = ("dropout", "init")
# Fields that only select paths or set per-path ranks and scales (compared by their effect on the given params).
_SELECTION = ("targets", "exclude", "rank", "alpha", "rank_pattern", "alpha_pattern", "use_rslora", "bias",
              "modules_to_save")
_SAMPLES = 256

_NO_DIR = "checkpoint directory {dir} does not exist; check the path (a run keeps its checkpoints in <run>/checkpoints)"
_NO_STEP = "no checkpoint for step {step} in {dir}; saved steps: {steps}"
_CORRUPT = ("checkpoint {dir}/{step} is unreadable or corrupt ({what}); restore another step (saved: {steps}) "
            "or delete this one")
_NOT_JSON = "`data_position` must be JSON-serializable (a dict of ints, say)"
_OUT_OF_STEP = ("the processes went out of step: another process's save of this step failed (its own error, in that "
                "process's log, says why) or it ran something else meanwhile; every process must call save() for the "
                "same step, and a failed save must stop them all")


class CheckpointError(ValueError):
    """A checkpoint that does not fit what it is restored onto, or cannot be read.

    Attributes:
        damaged: the step folder that cannot be read, when that is the error (else None); ``reason`` says what was
            wrong with it and ``saved`` lists the steps saved then (the damaged one included), so that a caller can
            word its own advice (the command line does: ``--step N``, or delete the folder).
    """

    def __init__(self, message: str, *, damaged: os.PathLike | None = None, reason: str = "",
                 saved: tuple[int, ...] = ()):
        super().__init__(message)
        self.damaged, self.reason, self.saved = damaged, reason, saved


class Restored(NamedTuple):
    """What :meth:`CheckpointManager.restore` returns."""

    state: TrainState
    data_position: Any
    step: int
    metadata: dict


# ------------------------------------------------------------------------------------------------ fingerprints
def _sample(x, k: int) -> np.ndarray:
    """Up to ``k`` values of ``x`` at deterministic strided positions (with a moving offset inside each stride)."""
    shape = tuple(np.shape(x))
    n = math.prod(shape)
    if n <= k:
        return np.asarray(x).reshape(-1)
    i = np.arange(k, dtype=np.int64)
    stride = n // k
    index = np.unravel_index((i * n) // k + (i * 7919) % stride, shape)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # multi-host: gather onto every process
        replicated = jax.sharding.NamedSharding(x.sharding.mesh, jax.sharding.PartitionSpec())
        return np.asarray(jax.jit(lambda v: v[index], out_shardings=replicated)(x).addressable_data(0))
    return np.asarray(x[index])


def _leaves(params) -> list[tuple[str, Any]]:
    params = plain_params(params)        # an NNX model or state: its params, by the paths adapters use
    return sorted(((tree_lib.path_str(kp), x) for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]),
                  key=lambda t: t[0])


def _structure_hash(params) -> str:
    h = hashlib.sha256()
    for path, x in _leaves(params):
        h.update(f"{path}|{tuple(np.shape(x))}\n".encode())
    return h.hexdigest()[:16]


def fingerprint(params, *, samples: int = _SAMPLES, as_dtype=None) -> str:
    """A 16-hex-digit identity of a parameter tree: paths, shapes, dtypes and sampled values.

    Hashes every leaf's path, shape and dtype, and the bytes of ``samples`` values read at strided positions, so
    two checkpoints of one architecture (a base model and its instruct variant) differ while the cost stays a few
    hundred reads per leaf, whatever the model's size. Works on numpy and (sharded) jax arrays. With
    ``as_dtype``, the fingerprint of the params cast to that floating dtype (the floating leaves' samples are cast:
    nothing else is copied).

    Examples:
        >>> import numpy as np
        >>> p = {"dense": {"kernel": np.arange(6.0).reshape(2, 3)}}
        >>> fingerprint(p) == fingerprint({"dense": {"kernel": np.arange(6.0).reshape(2, 3)}})
        True
        >>> fingerprint(p) == fingerprint({"dense": {"kernel": np.arange(6.0).reshape(2, 3) + 1}})
        False
    """
    h = hashlib.sha256()
    for path, x in _leaves(params):
        values, dtype = _sample(x, samples), np.dtype(x.dtype)
        if as_dtype is not None and jnp.issubdtype(dtype, jnp.floating):
            dtype = np.dtype(as_dtype)
            values = np.asarray(jnp.asarray(values).astype(dtype))
        h.update(f"{path}|{tuple(np.shape(x))}|{dtype.name}\n".encode())
        h.update(np.ascontiguousarray(values).tobytes())
    return h.hexdigest()[:16]


def _identity(params, name: str | None) -> dict:
    leaves = _leaves(params)
    return {"name": name, "fingerprint": fingerprint(params), "structure": _structure_hash(params),
            "dtypes": sorted({np.dtype(x.dtype).name for _, x in leaves}),
            "num_params": int(sum(math.prod(np.shape(x)) for _, x in leaves)), "num_leaves": len(leaves)}


# ------------------------------------------------------------------------------------------------ checksums
def _bits(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size >= 4:  # an 8-byte dtype becomes (..., 2) uint32
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
    """sum_i bits[i] * (2 i + 1) mod 2**32: integer, so exact and independent of reduction order and sharding."""
    bits = _bits(x)
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[d]
    return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


@jax.jit
def _checksums(leaves: list) -> list:
    return [_checksum(x) for x in leaves]


def _describe(tree) -> dict[str, dict]:
    """``{path: {"shape", "dtype", "checksum"}}`` for every array leaf."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = jax.device_get(_checksums([x for _, x in flat])) if flat else []
    return {tree_lib.path_str(kp): {"shape": list(x.shape), "dtype": np.dtype(x.dtype).name, "checksum": int(s)}
            for (kp, x), s in zip(flat, sums)}


# ------------------------------------------------------------------------------------------------ data positions
def _gather_positions(position) -> list[str]:
    """Every process's ``data_position`` as JSON text, in process order (a collective: every process calls it).

    Raises:
        ValueError: a position that is not JSON-serializable, in any process (every process raises, naming them).
    """
    try:
        text, error = json.dumps(position), None
    except (TypeError, ValueError) as e:
        text, error = "", e
    if jax.process_count() == 1:
        if error is not None:
            raise ValueError(f"{_NOT_JSON}; got {position!r}: {error}")
        return [text]
    from jlora.parallel import allgather_text

    texts = allgather_text("1" + text if error is None else "0")   # a leading flag: whether the position encoded
    failed = [i for i, t in enumerate(texts) if t[0] != "1"]
    if failed:
        mine = f"; this process's: {position!r}: {error}" if error is not None else ""
        raise ValueError(f"{_NOT_JSON}; it is not in process(es) {failed}{mine}")
    return [t[1:] for t in texts]


def _agreed(check, what: str):
    """``check()``'s result, once every process's own ``check()`` passed: a collective with several processes, so
    that a check failing in one process (another config, a missing file) raises in every process instead of
    leaving the others waiting in orbax's collective restore. The failing process raises its own error; the others
    a :class:`CheckpointError` naming it."""
    if jax.process_count() == 1:
        return check()
    from jlora.parallel import texts_if_different

    try:
        result, error = check(), None
    except Exception as e:  # noqa: BLE001  (re-raised below, after every process has heard of it)
        result, error = None, e
    said = texts_if_different("" if error is None else f"{type(error).__name__}: {error}")
    if error is not None:   # (when every process failed alike, each raises its own)
        raise error
    failed = {i: t for i, t in enumerate(said or []) if t}
    if failed:
        i, message = next(iter(failed.items()))
        raise CheckpointError(f"{what} failed in process(es) {sorted(failed)}, so in this one too; process {i}: "
                              f"{message}")
    return result


def _own_position(meta: dict, where: str, with_data_position: bool) -> Any:
    """This process's data position in a checkpoint's metadata (see the module docstring)."""
    if not with_data_position:
        return None
    positions = meta.get("data_positions")
    if positions is None:              # one position for every process (and every checkpoint of one process)
        return meta.get("data_position")
    count, here = len(positions), jax.process_count()
    if count != here:
        raise CheckpointError(
            f"checkpoint {where} was saved by {count} processes, each with its own data position (a packing loader "
            f"packs each process's share of the data), but this job has {here} process(es), so none of the saved "
            f"positions is this process's: restore it with {count} processes (process i gets back the position "
            f"process i saved), or pass with_data_position=False to restore the state without one and restart the "
            f"data yourself (metadata(step)['data_positions'] lists the saved positions)")
    return positions[jax.process_index()]


# ------------------------------------------------------------------------------------------------ manager
@dataclasses.dataclass
class _Options:
    max_to_keep: int | None
    best_metric: str | None
    mode: str
    keep_best: int
    async_save: bool


class CheckpointManager:
    """Saves and restores adapter-only training checkpoints in ``directory`` (see the module docstring).

    Args:
        directory: the checkpoint folder (local path or any ``epath`` URL). It is created on the first save;
            reading a folder that does not exist raises ``FileNotFoundError``.
        max_to_keep: keep this many most recent steps (``None``: all). The latest step is never deleted.
        best_metric: with it, also keep the ``keep_best`` steps whose ``metrics[best_metric]`` is best.
        mode: ``"min"`` or ``"max"``: which end of ``best_metric`` is best.
        keep_best: how many best steps to keep.
        async_save: write in a background thread; :meth:`save` returns once the arrays are copied to host, so
            the state may be donated right after. Call :meth:`wait` (or :meth:`close`) before reading.

    Examples:
        >>> import tempfile, jax, jax.numpy as jnp, optax, jlora
        >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
        >>> cfg = jlora.LoraConfig(rank=2, alpha=4, targets="dense")
        >>> opt = optax.adam(1e-3)
        >>> state = jlora.TrainState.create(jlora.init(params, cfg, key=jax.random.key(0)), opt,
        ...                                 rng=jax.random.key(1))
        >>> with CheckpointManager(tempfile.mkdtemp(), max_to_keep=2) as manager:
        ...     manager.save(10, state, params=params, lora_config=cfg, name="toy", data_position={"index": 3})
        ...     restored = manager.restore(state, params=params, lora_config=cfg)
        >>> manager.all_steps(), restored.step, restored.data_position
        ([10], 10, {'index': 3})
    """

    def __init__(self, directory, *, max_to_keep: int | None = None, best_metric: str | None = None,
                 mode: str = "min", keep_best: int = 1, async_save: bool = False):
        if max_to_keep is not None and (isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int)
                                        or max_to_keep < 1):
            raise ValueError(f"`max_to_keep` must be None (keep all) or an integer >= 1; got {max_to_keep!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"`mode` must be 'min' or 'max'; got {mode!r}")
        if isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 1:
            raise ValueError(f"`keep_best` must be an integer >= 1; got {keep_best!r}")
        if best_metric is not None and not isinstance(best_metric, str):
            raise ValueError(f"`best_metric` must be a metric name (str) or None; got {best_metric!r}")
        url = "://" in str(directory)   # gs://..., s3://...: epath's; a local path made absolute (orbax needs it)
        self.directory = epath.Path(directory if url else os.path.abspath(directory))
        self._options = _Options(max_to_keep, best_metric, mode, keep_best, bool(async_save))
        self._manager: ocp.CheckpointManager | None = None
        self._saving: int | None = None    # the step of a save that may still be running (async)
        self._lock: contextlib.ExitStack | None = None   # the folder's save lock, held (:meth:`_lock_saves`)
        self._identity_cache: tuple[tuple[weakref.ref, ...], dict] | None = None

    # -------------------------------------------------------------------------------------------- orbax plumbing
    def _orbax(self, *, create: bool) -> ocp.CheckpointManager | None:
        if self._manager is None:
            if self.directory.exists() and not self.directory.is_dir():
                raise NotADirectoryError(f"{self.directory} is a file, not a checkpoint folder; pass the folder of "
                                         f"the checkpoints (a run's checkpoints/), or a new path to save into")
            if not self.directory.exists():
                if not create:
                    return None
                self.directory.mkdir(parents=True, exist_ok=True)
            o = self._options
            policy = ocm.LatestN(o.max_to_keep)
            best_fn = None
            if o.best_metric is not None:
                metric, worst = o.best_metric, math.inf if o.mode == "min" else -math.inf

                def best_fn(m):   # a NaN (a diverged eval) ranks last: it must not push out the real best step;
                    value = float(m.get(metric, math.nan))   # so does a step saved while another metric was tracked
                    return worst if math.isnan(value) else value

                policy = ocm.AnyPreservationPolicy([
                    policy, ocm.BestN(get_metric_fn=best_fn, reverse=o.mode == "min", n=o.keep_best,
                                      keep_checkpoints_without_metrics=False)])
            options = ocp.CheckpointManagerOptions(
                preservation_policy=policy, best_fn=best_fn, best_mode=o.mode,
                enable_async_checkpointing=o.async_save, create=False)
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        return self._manager

    def _current(self) -> ocp.CheckpointManager | None:
        """The orbax manager, its list of steps read from the folder again (orbax caches it: another process's
        saves and deletions, or a failed async save of ours, left it stale) unless a save of ours is in flight."""
        manager = self._orbax(create=False)
        if manager is not None and not manager.is_saving_in_progress():
            manager.reload()
        return manager

    def all_steps(self) -> list[int]:
        """The saved (complete) steps, ascending; a save still in flight or cut off by a crash is not listed."""
        manager = self._current()
        return sorted(manager.all_steps()) if manager is not None else []

    def latest_step(self) -> int | None:
        """The newest complete step, or ``None`` if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The step with the best ``best_metric`` (the latest step when no metric is tracked)."""
        manager = self._current()
        return manager.best_step() if manager is not None else None

    def wait(self) -> None:
        """Blocks until an async save has been written and committed; raises its error if it failed (after
        removing the folder it left, as :meth:`save` does)."""
        if self._manager is None:
            return
        step, self._saving = self._saving, None
        try:
            with self._cleanup_on_failure(step):
                self._manager.wait_until_finished()
        finally:
            self._unlock_saves()

    wait_until_finished = wait

    def close(self) -> None:
        """Waits for pending saves and releases orbax's resources (also when the pending save failed)."""
        if self._manager is not None:
            try:
                self.wait()
            finally:
                self._manager.close()
                self._manager = None

    def _lock_saves(self) -> None:
        """Takes the folder's save lock (:func:`jlora.files.locked`: ``.<folder>.lock`` beside it) for one process
        and a local folder: another program's ``CheckpointManager`` saving into the same folder at the same time
        would pass the same checks, and one of two saves of a step would be lost unseen. The lock goes with the
        process; it is held until the save is committed."""
        if self._lock is not None or jax.process_count() > 1 or "://" in str(self.directory):
            return   # several processes save collectively (process 0 commits); a remote folder has no flock
        held = contextlib.ExitStack()
        held.enter_context(files.locked(self.directory, busy=lambda lock: RuntimeError(
            f"another process is saving a checkpoint into {self.directory} right now (it holds {lock}); two "
            f"programs saving into one folder would lose each other's steps. Give each run a checkpoint folder of "
            f"its own, or wait for the other one to finish")))
        self._lock = held

    def _unlock_saves(self) -> None:
        if self._lock is not None:
            held, self._lock = self._lock, None
            held.close()

    @contextlib.contextmanager
    def _cleanup_on_failure(self, step: int | None):
        """Runs a save (or the wait for one) of ``step``; if it fails, removes the unfinished folder it left and
        re-raises with a note saying which step failed.

        Orbax leaves a failed save's ``<step>.orbax-checkpoint-tmp`` folder behind (its only cleanup,
        ``cleanup_tmp_directories``, removes every unfinished folder when a manager is created, another writer's
        save in flight included). This removes that one step's folder, and only while the step is not listed as
        saved: a committed step is never touched.

        With several processes, orbax's barrier failing with "sync_global_devices name mismatch" means the other
        processes did not reach it: that is raised as a ``RuntimeError`` saying so (:data:`_OUT_OF_STEP`), from
        orbax's error.
        """
        try:
            yield
        except Exception as e:   # not an interrupt: orbax's writes may still run then, and the folder stays
            if step is not None:
                try:
                    removed = self._discard_unfinished(step)
                    done = f"; its unfinished folder {removed.name} was removed" if removed else ""
                except Exception as cleanup:  # noqa: BLE001  (the save's error is the one to raise)
                    done = f"; removing its unfinished folder failed too ({type(cleanup).__name__}: {cleanup})"
                e.add_note(f"jlora: saving checkpoint step {step} in {self.directory} failed{done}")
                if jax.process_count() > 1 and any(isinstance(x, AssertionError) and "sync_global_devices" in str(x)
                                                   for x in _chain(e)):
                    raise RuntimeError(f"saving checkpoint step {step} in {self.directory} failed in process "
                                       f"{jax.process_index()}: {_OUT_OF_STEP}{done}") from e
            raise

    def _discard_unfinished(self, step: int) -> epath.Path | None:
        """Removes the unfinished folder of a failed save of ``step``, if there is one; returns it."""
        manager = self._manager
        if manager is None or jax.process_index() != 0:   # the primary process writes and commits; it cleans up
            return None
        manager.reload()
        if step in manager.all_steps():
            return None
        final = self.directory / str(step)   # orbax's tmp folder for it: <step>.orbax-checkpoint-tmp (gs://: <step>)
        folder = ocp.path.atomicity_defaults.get_default_temporary_path_class(final).from_final(final).get()
        if not folder.exists():
            return None
        folder.rmtree()
        return folder

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self.directory)!r}, steps={self.all_steps()})"

    # -------------------------------------------------------------------------------------------- save
    def _base_identity(self, params, name) -> dict:
        """:func:`_identity`, computed once per params tree (saves and restores reuse it).

        The cache keeps the identity (a few hashes and counts) and weak references to the leaves it was computed
        from: it is valid while those very arrays are the leaves, and never keeps a replaced base alive. (Ids
        alone could not tell a freed tree from a new one that got the same ids.)
        """
        leaves = jax.tree.leaves(params)
        if self._identity_cache is not None:
            refs, identity = self._identity_cache
            if len(refs) == len(leaves) and all(r() is x for r, x in zip(refs, leaves)):
                return {**identity, "name": name}
        identity = _identity(params, name)
        try:
            self._identity_cache = (tuple(weakref.ref(x) for x in leaves), identity)
        except TypeError:  # a leaf without weak references (a Python scalar): no cache for this tree
            self._identity_cache = None
        return {**identity, "name": name}

    def save(self, step: int, state: TrainState, *, params, lora_config: LoraConfig, name: str | None = None,
             data_position: Any = None, metrics: Mapping[str, float] | None = None) -> None:
        """Saves ``state`` (adapters, optimizer state, step, RNG) as checkpoint ``step``.

        Args:
            step: the checkpoint's step number (usually ``int(state.step)``); it must be after every saved step.
            state: the :class:`jlora.TrainState` to save.
            params: the frozen base params the adapters belong to; only their :func:`fingerprint` is written.
            lora_config: the adapters' config. The adapters must fit both (:func:`jlora.lora.check_fits`, shapes
                and paths only), else a ``ValueError`` is raised before anything is written.
            name: a human-readable name of the base model (e.g. ``loaded.name``), shown in errors.
            data_position: anything JSON-serializable that says where the data loader is (e.g. ``loader.position``).
                With several processes, each passes its own: :meth:`restore` gives each process its own back.
            metrics: optional ``{name: number}``, e.g. ``{"eval_loss": 1.23}``; ``best_metric`` ranks by it.

        A save that fails (here, or with ``async_save`` in the background: then its error is raised by the next
        :meth:`save`, :meth:`wait` or :meth:`close`) leaves no trace: the unfinished folder orbax wrote is removed,
        the steps saved before stay as they were, and the same step can be saved again.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"`step` must be an integer >= 0; got {step!r}")
        step = int(step)
        if not isinstance(state, TrainState):
            raise ValueError(f"`state` must be a jlora.TrainState; got {type(state).__name__}")
        if not isinstance(lora_config, LoraConfig):
            raise ValueError(f"`lora_config` must be a jlora.LoraConfig; got {type(lora_config).__name__}")
        try:       # shapes and paths only: the metadata must name the base and config the adapters belong to
            check_fits(params, state.adapters, lora_config)
        except ValueError as e:
            raise ValueError(f"cannot save step {step}: the adapters in `state` do not fit the `params` (base "
                             f"{name or 'unnamed'!r}) and `lora_config` given, so the checkpoint would be labelled "
                             f"with the wrong base or config: {e}") from None
        metrics = _check_metrics(metrics, self._options.best_metric)
        positions = _gather_positions(data_position)   # every process's: a collective, as the save is
        if jax.process_count() > 1:   # orbax's barriers would wait forever for processes saving another step
            from jlora.parallel import texts_if_different

            steps = texts_if_different(str(step))
            if steps is not None:
                raise RuntimeError(f"saving checkpoint step {step} in {self.directory}: the processes save different "
                                   f"steps ({', '.join(f'process {i}: {t}' for i, t in enumerate(steps))}); "
                                   f"{_OUT_OF_STEP}")
        manager = self._orbax(create=True)
        self.wait()            # a failed async save of an earlier step raises here (its folder removed)
        self._lock_saves()     # released when the save is committed (here, or by wait() when async)
        try:
            self._save(manager, step, state, params, lora_config, name, data_position, metrics, positions)
        finally:
            if self._saving is None:
                self._unlock_saves()

    def _save(self, manager, step, state, params, lora_config, name, data_position, metrics, positions) -> None:
        manager.reload()       # the steps on disk now: another writer's too (orbax caches its own list)
        saved = sorted(manager.all_steps())
        if step in saved:
            raise ValueError(f"step {step} is already saved in {self.directory}; saved steps: "
                             f"{saved}. Steps are never overwritten: pick a new step")
        if saved and step < saved[-1]:   # orbax would skip it and return False: nothing saved
            raise ValueError(f"step {step} is before the latest saved step {saved[-1]} in {self.directory} (saved "
                             f"steps: {saved}); checkpoints are saved in increasing step order: save a step after "
                             f"{saved[-1]}, or save to a new directory")
        rng, rng_info = _split_rng(state.rng)
        train_state = {"step": jnp.asarray(state.step), "rng": rng, "opt_state": state.opt_state}
        meta = {
            "format": FORMAT, "jlora_version": _version(), "step": step,
            "lora_config": lora_config.to_dict(), "base_model": self._base_identity(params, name),
            "rng": rng_info, "data_position": data_position, "metrics": metrics,
            "leaves": {"adapters": _describe(state.adapters), "train_state": _describe(train_state)},
        }
        if len(set(positions)) > 1:   # differs between processes: each one's, in process order
            meta.update(data_position=None, data_positions=[json.loads(t) for t in positions])
        args = ocp.args.Composite(adapters=ocp.args.StandardSave(state.adapters),
                                  train_state=ocp.args.StandardSave(train_state),
                                  jlora=ocp.args.JsonSave(meta))
        with self._cleanup_on_failure(step):
            manager.save(step, args=args, metrics=metrics if self._options.best_metric else None)
        self._saving = step if self._options.async_save else None

    # -------------------------------------------------------------------------------------------- restore
    def _resolve(self, step: int | None) -> tuple[ocp.CheckpointManager, int]:
        manager = self._orbax(create=False)
        if manager is None:
            raise FileNotFoundError(_NO_DIR.format(dir=self.directory))
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoint in {self.directory} (it holds no complete step folder)")
            return manager, steps[-1]
        if step not in steps:
            raise FileNotFoundError(_NO_STEP.format(step=step, dir=self.directory, steps=steps))
        return manager, int(step)

    def metadata(self, step: int | None = None) -> dict:
        """The metadata JSON of ``step`` (default: the latest): config, base model identity, version, metrics."""
        manager, step = self._resolve(step)
        return self._read_metadata(manager, step)

    def _read_metadata(self, manager, step: int) -> dict:
        with _orbax_read(self, step, "metadata: "):
            meta = manager.restore(step, args=ocp.args.Composite(jlora=ocp.args.JsonRestore()))["jlora"]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise self._corrupt(step, f"metadata has no format {FORMAT!r}")
        missing = [k for k in ("lora_config", "base_model", "rng", "leaves") if k not in meta]
        if missing:
            raise self._corrupt(step, f"metadata lacks {missing}")
        parts = {"base_model": ("name", "fingerprint", "structure", "dtypes", "num_params", "num_leaves"),
                 "rng": ("typed", "impl"), "leaves": ("adapters", "train_state")}
        for key, fields in parts.items():
            if not isinstance(meta[key], dict) or any(f not in meta[key] for f in fields):
                raise self._corrupt(step, f"metadata's {key} is not a dict with {list(fields)}")
        positions = meta.get("data_positions")
        if positions is not None and (not isinstance(positions, list) or not positions):
            raise self._corrupt(step, "metadata's data_positions is not a list with one position per process")
        try:
            LoraConfig.from_dict(meta["lora_config"])
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise self._corrupt(step, f"metadata's lora_config: {e}") from None
        return meta

    def _corrupt(self, step: int, what: str) -> CheckpointError:
        saved, what = tuple(self.all_steps()), what[:500]
        return CheckpointError(_CORRUPT.format(dir=self.directory, step=step, what=what, steps=list(saved)),
                               damaged=self.directory / str(step), reason=what, saved=saved)

    def _validate(self, meta: dict, step: int, params, lora_config: LoraConfig, name: str | None) -> None:
        where = f"{self.directory}/{step}"
        if params is not None:
            _check_base(meta["base_model"], self._base_identity(params, name), where, params)
        _check_lora(LoraConfig.from_dict(meta["lora_config"]), lora_config, params, where)

    def restore(self, target: TrainState, step: int | None = None, *, params, lora_config: LoraConfig,
                name: str | None = None, with_data_position: bool = True) -> Restored:
        """Restores a full training state; validates everything before loading.

        Args:
            target: a :class:`jlora.TrainState` giving the tree structure, shapes, dtypes and shardings to restore
                onto: real arrays (e.g. a fresh ``TrainState.create(...)``) or ``jax.ShapeDtypeStruct`` leaves with
                ``.sharding`` (e.g. from ``jax.eval_shape``), so a mesh-sharded state restores sharded.
            step: which step (default: the latest).
            params: the base params the adapters will be used with (checked against the saved fingerprint);
                ``None`` skips that check.
            lora_config: the config the adapters will be used with (checked against the saved one).
            name: the base model's name, shown in errors.
            with_data_position: ``False`` restores the state without a data position (``Restored.data_position`` is
                None; ``Restored.metadata`` still holds what was saved): needed to resume on another number of
                processes than saved per-process positions.

        Returns:
            A :class:`Restored`: the state, this process's data position (the one it passed to :meth:`save`), the
            step and the metadata.

        Raises:
            FileNotFoundError: no such directory or step.
            CheckpointError: a different base model or LoraConfig, a target that does not fit, corrupt files, or
                per-process data positions saved by another number of processes.
        """
        def check():
            manager, found = self._resolve(step)
            meta = self._read_metadata(manager, found)
            self._validate(meta, found, params, lora_config, name)
            position = _own_position(meta, f"{self.directory}/{found}", with_data_position)
            rng_target, rng_kind = _rng_target(target.rng, meta["rng"], f"{self.directory}/{found}")
            train_target = {"step": target.step, "rng": rng_target, "opt_state": target.opt_state}
            targets = {"adapters": target.adapters, "train_state": train_target}
            return manager, found, meta, position, rng_kind, targets, self._load_args(found, meta, targets)

        manager, step, meta, position, rng_kind, targets, args = _agreed(check, f"restoring {self.directory}")
        adapters, train_state = self._load(manager, step, meta, targets, args)
        rng = train_state["rng"] if rng_kind is None else jax.random.wrap_key_data(train_state["rng"], impl=rng_kind)
        state = TrainState(train_state["step"], adapters, train_state["opt_state"], rng)
        return Restored(state, position, step, meta)

    def restore_adapters(self, step: int | None = None, *, params, lora_config: LoraConfig,
                         name: str | None = None, layout=None, target=None):
        """Restores only the adapters (no optimizer state), e.g. for inference, merging or PEFT export.

        The target tree is ``jax.eval_shape(jlora.init(params, lora_config, layout=layout))`` unless ``target``
        (an adapter tree of arrays or ``ShapeDtypeStruct`` with shardings) is given. Validation as in
        :meth:`restore`.
        """
        from jlora import lora

        def check():
            manager, found = self._resolve(step)
            meta = self._read_metadata(manager, found)
            self._validate(meta, found, params, lora_config, name)
            tree = target
            if tree is None:   # shapes only: PiSSA/OLoRA's factors have the default init's shapes
                shapes = dataclasses.replace(lora_config, init="default") if lora_config.init in CHANGES_BASE \
                    else lora_config
                tree = jax.eval_shape(lambda: lora.init(params, shapes, key=jax.random.key(0), layout=layout))
            targets = {"adapters": tree}
            return manager, found, meta, targets, self._load_args(found, meta, targets)

        manager, step, meta, targets, args = _agreed(check, f"restoring {self.directory}")
        (adapters,) = self._load(manager, step, meta, targets, args)
        return adapters

    def _load_args(self, step: int, meta: dict, targets: Mapping[str, Any]) -> ocp.args.Composite:
        """orbax's restore arguments for the items ``targets``, once their trees are checked against the saved
        ones (every check that needs no collective)."""
        where = f"{self.directory}/{step}"
        abstract = {k: _abstract(t) for k, t in targets.items()}
        for item, tree in abstract.items():
            _check_tree(meta["leaves"][item], tree, item, where)
        # Without its tree metadata orbax rebuilds an item as nested dicts of whatever arrays it finds, and fails
        # later with a pytree mismatch that names no file; a missing one is a damaged step.
        folder = self.directory / str(step)
        lost = [f"{item}/_METADATA" for item in targets if not (folder / item / "_METADATA").exists()]
        if lost and all((folder / item).exists() for item in targets):
            raise self._corrupt(step, f"{', '.join(lost)} missing")
        return ocp.args.Composite(**{k: ocp.args.StandardRestore(t) for k, t in abstract.items()})

    def _load(self, manager, step: int, meta: dict, targets: Mapping[str, Any], args: ocp.args.Composite) -> list:
        """The items ``targets`` of ``step`` read by orbax (``args``: :meth:`_load_args`), checksums checked."""
        with _orbax_read(self, step):
            restored = manager.restore(step, args=args)
        out = []
        for item in targets:
            tree = restored[item]
            bad = [p for p, d in _describe(tree).items() if d["checksum"] != meta["leaves"][item][p]["checksum"]]
            if bad:
                raise self._corrupt(step, f"checksum mismatch in {item}: {bad[:5]}")
            out.append(tree)
        return out


# ------------------------------------------------------------------------------------------------ read failures
# tensorstore reports a failed read as a ValueError "<STATUS>: Error reading|opening|decoding ..."; these statuses
# mean the stored bytes are missing, cut short or malformed.
_TENSORSTORE_READ = re.compile(r"^(DATA_LOSS|OUT_OF_RANGE|FAILED_PRECONDITION|NOT_FOUND): Error (reading|opening|"
                               r"decoding)")


def _chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and the exceptions it was raised from (``__cause__``, else ``__context__``), outermost first."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _read_error(e: BaseException) -> BaseException | None:
    """The exception in ``e``'s chain that says the checkpoint's files cannot be read, or None if it is none.

    Read errors: an OSError other than a permission error (a missing file), text or JSON that does not decode, an
    item orbax cannot find in the step, and tensorstore's read failures (`_TENSORSTORE_READ`). Anything else (a
    target the arrays cannot be placed on, a bug) is not the checkpoint's fault.
    """
    for x in _chain(e):
        if isinstance(x, (json.JSONDecodeError, UnicodeDecodeError)):
            return x
        if isinstance(x, OSError) and not isinstance(x, PermissionError):
            return x
        if isinstance(x, KeyError) and "was not found in the checkpoint" in str(x):
            return x
        if type(x) is ValueError and _TENSORSTORE_READ.match(str(x)):
            return x
    return None


@contextlib.contextmanager
def _orbax_read(manager: "CheckpointManager", step: int, prefix: str = ""):
    """Runs the orbax read inside the ``with`` block and sorts its failure.

    A read error (:func:`_read_error`) becomes a :class:`CheckpointError` that names the folder and says the step
    is corrupt; any other exception is re-raised unchanged. Either way the debris of orbax's abandoned parallel
    reads is collected first, with :class:`_AsyncDebris` keeping it off stderr.
    """
    with _AsyncDebris() as debris:
        try:
            yield
        except Exception as e:  # noqa: BLE001  (sorted below: only read errors are the checkpoint's fault)
            debris.settle(e)
            cause = _read_error(e)
            if cause is None:
                raise
            message = cause.args[0] if isinstance(cause, KeyError) and cause.args else str(cause)
            raise manager._corrupt(step, f"{prefix}{type(cause).__name__}: {message}") from e


class _AsyncDebris:
    """Keeps what a failed orbax read leaves behind off stderr.

    Orbax reads arrays in parallel on a private event loop, stops at the first failure and closes the loop with
    other reads still in flight. Those finish later on tensorstore's threads, and their leftovers are reported as
    they finish or die: "Event loop is closed" and "Exception ignored in: <coroutine ...>" (through
    ``sys.unraisablehook``), "Task was destroyed but it is pending!" and "... exception was never retrieved" (the
    ``asyncio`` logger), "coroutine ... was never awaited" (a warning). While this context is active such reports
    are dropped (other unraisable exceptions go to the previous hook); :meth:`settle` disposes of the debris so
    that nothing of it is reported later.
    """

    QUIET_SECONDS = 0.25   # settled: no debris for this long
    MAX_SECONDS = 10.0
    _FILES = (f"{os.sep}orbax{os.sep}", f"{os.sep}asyncio{os.sep}", "tensorstore")

    def __enter__(self) -> "_AsyncDebris":
        self.dropped = 0
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)
        self._previous = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        self._logger = logging.getLogger("asyncio")
        self._logger.addFilter(self._drop)
        return self

    def __exit__(self, *exc) -> None:
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self._previous
        self._logger.removeFilter(self._drop)
        self._warnings.__exit__(*exc)

    def _drop(self, record: logging.LogRecord) -> bool:
        self.dropped += 1
        return False

    def _unraisable(self, report) -> None:
        code = getattr(report.object, "cr_code", None)
        files = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(report.exc_traceback)]
        files += [code.co_filename] if code is not None else []
        if any(f in name for name in files for f in self._FILES):
            self.dropped += 1
        else:
            self._previous(report)

    def settle(self, error: BaseException) -> None:
        """Disposes of ``error``'s debris inside this context.

        Frees what the frames of ``error`` hold, waits until no debris has arrived for ``QUIET_SECONDS`` (the
        reads still in flight end quickly once the files fail; each reports "Event loop is closed"), then goes
        through the futures and tasks of the event loops those frames ran: a failed one's exception is marked as
        retrieved, and a task left pending for good has its coroutine closed and its destruction left unlogged.
        Otherwise they would be reported whenever the garbage collector or the interpreter's exit gets to them.
        """
        loops = {id(v): v for x in _chain(error) for frame, _ in traceback.walk_tb(x.__traceback__)
                 for v in frame.f_locals.values() if isinstance(v, asyncio.AbstractEventLoop)}
        for x in _chain(error):
            traceback.clear_frames(x.__traceback__)
        start = last = time.monotonic()
        seen = -1
        while time.monotonic() - last < self.QUIET_SECONDS and time.monotonic() - start < self.MAX_SECONDS:
            gc.collect()
            if self.dropped != seen:
                seen, last = self.dropped, time.monotonic()
            time.sleep(0.01)
        if not loops:
            return
        # type(), not isinstance(): the latter reads __class__, which some lazy objects answer with a warning
        leftovers = [f for f in gc.get_objects() if issubclass(type(f), asyncio.Future) and id(f.get_loop()) in loops]
        for future in leftovers:
            if future.done():
                if not future.cancelled():
                    future.exception()   # marks it as retrieved
            elif isinstance(future, asyncio.Task):
                future._log_destroy_pending = False   # its loop is closed: it can never finish
                try:
                    future.get_coro().close()
                except BaseException:  # noqa: BLE001  (orbax turns the GeneratorExit into its read error)
                    self.dropped += 1
        del leftovers
        gc.collect()


# ------------------------------------------------------------------------------------------------ helpers
def _version() -> str:
    import jlora

    return jlora.__version__


def _check_metrics(metrics, best_metric) -> dict | None:
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping):
        raise ValueError(f"`metrics` must be a mapping name -> number; got {metrics!r}")
    try:
        out = {str(k): float(v) for k, v in metrics.items()}
    except (TypeError, ValueError):
        raise ValueError(f"`metrics` values must be numbers; got {metrics!r}") from None
    if best_metric is not None and best_metric not in out:
        raise ValueError(f"best_metric={best_metric!r} is not in `metrics` {sorted(out)}; pass it to every save "
                         f"that should compete for best, or save without metrics")
    return out


def _split_rng(rng) -> tuple[jax.Array, dict]:
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng), {"typed": True, "impl": str(jax.random.key_impl(rng))}
    return jnp.asarray(rng), {"typed": False, "impl": None}


def _rng_target(rng, saved: dict, where: str):
    """The abstract key data to restore into, and the impl to re-wrap with (None for a raw uint32 key)."""
    typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    if not typed:
        return rng, None
    impls: list[str] = []  # key_impl of a traced key also covers a ShapeDtypeStruct target

    def data_of(key):
        impls.append(str(jax.random.key_impl(key)))
        return jax.random.key_data(key)

    data = jax.eval_shape(data_of, rng)
    impl = impls[0]
    if saved["typed"] and saved["impl"] != impl:
        raise CheckpointError(f"checkpoint {where} holds a {saved['impl']!r} PRNG key but the target's key is "
                              f"{impl!r}; create the target's rng with jax.random.key(seed, impl={saved['impl']!r})")
    sharding = getattr(rng, "sharding", None)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding), impl


def _abstract(tree):
    """Target leaves as ShapeDtypeStructs with a sharding (orbax restores un-sharded structs as numpy)."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(x):
        sharding = getattr(x, "sharding", None) or default
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree.map(leaf, tree)


def _check_tree(saved: dict, target, item: str, where: str) -> None:
    got = {tree_lib.path_str(kp): (list(x.shape), np.dtype(x.dtype).name)
           for kp, x in jax.tree_util.tree_flatten_with_path(target)[0]}
    want = {p: (d["shape"], d["dtype"]) for p, d in saved.items()}
    if got == want:
        return
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    differ = [f"{p}: saved {want[p][1]}{want[p][0]}, target {got[p][1]}{got[p][0]}"
              for p in sorted(set(want) & set(got)) if want[p] != got[p]]
    raise CheckpointError(
        f"checkpoint {where}: the target's {item} tree does not match the saved one; in the checkpoint only: "
        f"{missing[:5]}; in the target only: {unexpected[:5]}; shape/dtype differs: {differ[:5]}. Build the target "
        f"with the same LoraConfig and optimizer as the run that saved it")


def is_base(saved: Mapping, params) -> bool:
    """Whether ``params`` are the base model of a checkpoint whose metadata names ``saved`` (its ``base_model``):
    the same fingerprint, or the same weights at a higher precision (the fp32 checkpoint of a run that trained on
    its bf16 cast: cast back, its fingerprint is the saved one)."""
    if saved["fingerprint"] == fingerprint(params):
        return True
    return _cast_matches(saved, params)


def _cast_matches(saved: Mapping, params) -> bool:
    floats = [d for d in saved.get("dtypes", ()) if jnp.issubdtype(np.dtype(d), jnp.floating)]
    return (len(floats) == 1 and saved.get("structure") == _structure_hash(params)
            and fingerprint(params, as_dtype=floats[0]) == saved["fingerprint"])


def base_model(name: str | None) -> str:
    """How a message names the base model ``name`` a checkpoint records (``None``: saved without one).

    Examples:
        >>> base_model("SmolLM2-135M"), base_model(None)
        ("base model 'SmolLM2-135M'", 'an unnamed base model')
    """
    return f"base model {name!r}" if name else "an unnamed base model"


def _check_base(saved: dict, given: dict, where: str, params=None) -> None:
    if saved["fingerprint"] == given["fingerprint"] or (params is not None and _cast_matches(saved, params)):
        return
    if saved["structure"] != given["structure"]:
        why = (f"a different architecture ({saved['num_leaves']} leaves / {saved['num_params']:,} values saved, "
               f"{given['num_leaves']} / {given['num_params']:,} given)")
    elif saved["dtypes"] != given["dtypes"]:
        why = (f"the same architecture in other dtypes (saved {saved['dtypes']}, given {given['dtypes']}); load the "
               f"base model in the dtype it was trained in")
    else:
        why = "the same architecture with different weights (e.g. a base model and its instruct variant)"
    raise CheckpointError(
        f"checkpoint {where} was trained on {base_model(saved['name'])} (fingerprint {saved['fingerprint']}), but "
        f"the given params are {repr(given['name']) if given['name'] else 'unnamed'} (fingerprint "
        f"{given['fingerprint']}): {why}. "
        f"Load the base model the adapters were trained on")


def _check_lora(saved: LoraConfig, given: LoraConfig, params, where: str) -> None:
    if saved == given:
        return
    a, b = saved.to_dict(), given.to_dict()
    # init is free between inits that leave the base alone; PiSSA/OLoRA adapters belong to their residual base
    free = set(_FREE_FIELDS) - ({"init"} if {saved.init, given.init} & set(CHANGES_BASE) else set())
    # compared as the config's own fields: a pattern's order is part of it (its first match wins)
    differ = [k for k in a if getattr(saved, k, a.get(k)) != getattr(given, k, b.get(k)) and k not in free]
    if not differ:
        return
    fields = "; ".join(f"{k}: saved {a.get(k)!r}, given {b.get(k)!r}" for k in differ)
    examples: list[str] = []
    if params is not None:
        # Fields that only select paths or set ranks/scales: equal if they select the same adapters in `params`.
        paths = [p for p, _ in _leaves(params)]
        ea, eb = _effective(saved, paths), _effective(given, paths)
        if ea == eb and set(differ) <= set(_SELECTION):
            return
        examples = [f"{p}: saved {ea.get(p)}, given {eb.get(p)}"
                    for p in sorted(set(ea) | set(eb)) if ea.get(p) != eb.get(p)][:5]
    raise CheckpointError(
        f"checkpoint {where} was saved with a different LoraConfig; differing fields: {fields}"
        + (f"; e.g. (rank, scale, full tensor) per path: {examples}" if examples else "")
        + ". Restore with the saved config: LoraConfig.from_dict(manager.metadata(step)['lora_config'])")


def _effective(cfg: LoraConfig, paths: list[str]) -> dict[str, tuple]:
    known = set(paths)
    out = {}

    def saves(p):
        return cfg.saves(p, known)

    for p in paths:
        lora = cfg.matches(p)
        if lora or saves(p):
            out[p] = (cfg.rank_for(p) if lora else None, cfg.scale(p) if lora else None, bool(saves(p)))
    return out
