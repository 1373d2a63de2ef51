"""A training run: run folder, loop, evaluation, logging, checkpoints, resume and Ctrl-C.

``train(cfg)`` runs these phases, each a function below, top to bottom:

1. :func:`_open_run`: check the config's paths and the scorer, prepare ``run.dir`` (refusing to overwrite an
   existing run unless ``overwrite`` or ``resume``) and write the resolved ``config.yaml``;
2. :func:`_load_model` (:func:`jlora.hf.load`) and :func:`_load_data` (:mod:`jlora.data`: train and validation
   examples, the generation-eval prompts);
3. :func:`_build`: adapters, an AdamW optimizer with warmup + cosine decay, the compiled train and eval steps
   (sharded over ``mesh`` when it has more than one device);
4. :func:`_resume`: with ``resume``, the latest checkpoint's state and data position;
5. :func:`_score_base_model`: greedy decoding of validation prompts by the base model, each completion scored by
   ``eval.scorer`` (:mod:`jlora.cli.scoring`);
6. :func:`_train_loop`: one compiled step (or ``train.steps_per_call`` steps) per call, a progress bar with loss,
   tokens/s and ETA, ``metrics.jsonl``, periodic validation loss and checkpoints (adapters, optimizer state,
   step, RNG and the data position, so a resumed run sees exactly the batches it would have seen). SIGINT saves
   a checkpoint and stops cleanly;
7. :func:`_finish`: the last checkpoint, validation loss, the generation eval of the trained adapters, a PEFT
   export;
8. :func:`_wrap_up`: ``loss.png``, ``summary.json`` and the report.

The other commands (``eval``, ``generate``, ``merge``, ``export-peft``, ``inspect``) are small functions at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

import jlora
from jlora import data as data_lib
from jlora.cli import config as runconfig
from jlora.cli import scoring
from jlora.cli.config import ConfigError, RunConfig

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CKPT_DIR = "checkpoints"
PEFT_DIR = "peft"


def load_config(path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Reads and validates a run config (see :mod:`jlora.cli.config`)."""
    return runconfig.load(path, overrides)


# ------------------------------------------------------------------------------------------------ set-up
def _check_inputs(cfg: RunConfig) -> None:
    """Fails fast, before any work, on paths that do not exist."""
    if not cfg.model.path:
        raise ConfigError("`model.path` is empty; set it to an HF folder, a .gguf file or pkg://package/file")
    from jlora import hf

    try:
        hf.resolve(cfg.model.path)
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise ConfigError(f"`model.path` {cfg.model.path!r}: {e}") from None
    for key in ("train", "valid"):
        value = getattr(cfg.data, key)
        if key == "train" and not value:
            raise ConfigError("`data.train` is empty; set it to a JSONL file of prompt/completion pairs or chats")
        if value and not pathlib.Path(value).is_file():
            raise ConfigError(f"`data.{key}` file {value!r} does not exist; fix the path in the config or with "
                              f"--set data.{key}=PATH")


def _prepare_dir(cfg: RunConfig, *, resume: bool, overwrite: bool) -> pathlib.Path:
    run_dir = pathlib.Path(cfg.run.dir).absolute()
    exists = run_dir.exists() and any(run_dir.iterdir())
    if resume:
        if not (run_dir / CONFIG_FILE).is_file():
            raise ConfigError(f"--resume: {run_dir} holds no run ({CONFIG_FILE} missing); start it without --resume")
    elif exists:
        if not overwrite:
            raise ConfigError(f"run folder {run_dir} already exists; pass --resume to continue it, --overwrite to "
                              f"replace it, or --set run.dir=OTHER")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run_dir


def make_optimizer(cfg: RunConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay, after global-norm clipping."""
    t = cfg.train
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, t.learning_rate, max(t.warmup_steps, 1), max(t.steps, t.warmup_steps + 1), t.learning_rate * 0.1)
    return optax.chain(optax.clip_by_global_norm(t.max_grad_norm),
                       optax.adamw(schedule, weight_decay=t.weight_decay))


def _mesh(cfg: RunConfig):
    """The configured device mesh, or None for a single device (mesh 1 x 1 x 1)."""
    sizes = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    if math.prod(sizes) == 1:
        return None
    from jlora import parallel

    try:
        return parallel.make_mesh(*sizes)
    except ValueError as e:
        raise ConfigError(f"`mesh` section: {e}") from None


def _load_model(cfg: RunConfig):
    from jlora import hf

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(cfg.model.dtype)
    if dtype is None:
        raise ConfigError(f"`model.dtype` must be float32 or bfloat16; got {cfg.model.dtype!r}")
    return hf.load(cfg.model.path, dtype=dtype, scan_layers=cfg.model.scan_layers, remat=cfg.model.remat)


def _layout(loaded):
    if getattr(loaded.config, "scan_layers", False):
        return jlora.layout(loaded.model, jnp.ones((1, 8), jnp.int32))
    return None


def _loader(cfg: RunConfig, examples, tokenizer, *, train: bool, position=None) -> data_lib.Loader:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return data_lib.Loader(examples, batch_size=cfg.data.batch_size, max_length=cfg.data.max_length,
                           pad_id=pad or 0, seed=cfg.data.seed, shuffle=train, packing=cfg.data.packing and train,
                           drop_last=train, epochs=None if train else 1, position=position)


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
class _Log:
    """metrics.jsonl plus console output (a tqdm bar when ``progress``)."""

    def __init__(self, run_dir: pathlib.Path, total: int, start: int, progress: bool):
        self.file = open(run_dir / METRICS_FILE, "a")
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def step(self, postfix: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()


def plot_losses(run_dir: pathlib.Path) -> pathlib.Path | None:
    """Writes ``loss.png`` from ``metrics.jsonl`` (train and validation loss per step)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    valid = [(r["step"], r["valid_loss"]) for r in rows if "valid_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
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
    plt.close(fig)
    return path


class _Interrupt:
    """Turns the first SIGINT into a flag the loop checks after each step (a second one raises as usual)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ------------------------------------------------------------------------------------------------ train
def train(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Runs a fine-tune as configured; returns a summary dict (also written to ``summary.json``).

    Each call below is one phase of the run, in order (see the module docstring).
    """
    from jlora import checkpoint

    run_dir, scorer = _open_run(cfg, resume=resume, overwrite=overwrite)
    loaded = _load_model(cfg)
    data = _load_data(cfg, loaded)
    run, state = _build(cfg, run_dir, loaded, data, scorer)
    with checkpoint.CheckpointManager(run_dir / CKPT_DIR, max_to_keep=cfg.train.max_to_keep) as manager:
        state, position, summary = _resume(run, manager, state) if resume else (state, None, {})
        if data.prompts and cfg.eval.before and "accuracy_before" not in summary:
            summary["accuracy_before"] = _score_base_model(run)
        loader = _loader(cfg, data.train, loaded.tokenizer, train=True, position=position)
        t_start = time.perf_counter()
        state, interrupted = _train_loop(run, manager, loader, state, progress=progress, on_step=on_step)
        if not interrupted:
            summary.update(_finish(run, manager, loader, state))
    return _wrap_up(run, summary, step=int(state.step), interrupted=interrupted,
                    seconds=time.perf_counter() - t_start)


@dataclasses.dataclass(frozen=True)
class _Data:
    """What a run trains and evaluates on."""

    train: list[data_lib.Example]
    valid: list[data_lib.Example]        # validation loss (empty: none)
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


def _open_run(cfg: RunConfig, *, resume: bool, overwrite: bool) -> tuple[pathlib.Path, scoring.Scorer]:
    """Checks everything that can be checked before loading anything (paths, the scorer, the mesh against
    ``steps_per_call``, and for ``resume`` that the model and lora sections are the saved run's), then prepares the
    run folder. Returns the folder and the scorer."""
    _check_inputs(cfg)
    scorer = scoring.load(cfg.eval.scorer)
    per_call = cfg.train.steps_per_call
    if math.prod((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)) > 1 and per_call > 1:
        raise ConfigError(f"train.steps_per_call={per_call} works on a single device only; with a `mesh` section "
                          f"set train.steps_per_call: 1")
    if resume:
        saved = runconfig.load(pathlib.Path(cfg.run.dir) / CONFIG_FILE)
        if saved.lora != cfg.lora or saved.model != cfg.model:
            raise ConfigError(f"--resume: the config's model/lora sections differ from the run's saved "
                              f"{pathlib.Path(cfg.run.dir) / CONFIG_FILE}; resume with the same settings")
    return _prepare_dir(cfg, resume=resume, overwrite=overwrite), scorer


def _load_data(cfg: RunConfig, loaded) -> _Data:
    """Train and validation examples (:func:`jlora.data.load_splits`) and the generation eval's prompts (the first
    ``eval.num_examples`` of ``data.valid``, when a generation eval is on)."""
    if loaded.tokenizer is None:
        raise ConfigError(f"model {cfg.model.path!r} has no tokenizer; jlora's runs need one (tokenizer.json)")
    train_examples, valid_examples = data_lib.load_splits(
        cfg.data.train, loaded.tokenizer, valid=cfg.data.valid or None, valid_fraction=cfg.data.valid_fraction,
        max_length=cfg.data.max_length, seed=cfg.data.seed)
    print(f"model {loaded.name}: {sum(x.size for x in jax.tree.leaves(loaded.params)):,} parameters; "
          f"data: {len(train_examples)} train / {len(valid_examples)} validation examples")
    prompts = []
    if valid_examples and cfg.data.valid and (cfg.eval.before or cfg.eval.after):
        prompts = data_lib.eval_prompts(cfg.data.valid, loaded.tokenizer, limit=cfg.eval.num_examples)
    return _Data(train_examples, valid_examples, prompts)


def _build(cfg: RunConfig, run_dir: pathlib.Path, loaded, data: _Data,
           scorer: scoring.Scorer) -> tuple[_Run, jlora.TrainState]:
    """Adapters on the loaded base, the optimizer and the initial train state, and the compiled steps: jitted for
    one device, or sharded over the configured mesh (frozen params, adapters and optimizer state placed on it)."""
    init_key, rng = jax.random.split(jax.random.key(cfg.train.seed))
    layout = _layout(loaded)
    adapters, params = jlora.init_with_base(loaded.params, cfg.lora, key=init_key, layout=layout)
    print(jlora.summary(params, adapters))
    optimizer = make_optimizer(cfg)
    state = jlora.TrainState.create(adapters, optimizer, rng=rng)
    mesh = _mesh(cfg)
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
    restored = manager.restore(state, params=run.params, lora_config=run.cfg.lora, name=run.loaded.name)
    summary_file = run.dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    print(f"resumed from step {int(restored.state.step)}")
    return restored.state, restored.data_position, summary


def _generation_eval(run: _Run, params, file: str) -> float:
    """Scores greedy completions by the model with ``params`` (:func:`score_generation`); writes the records to
    ``file`` in the run folder and returns the mean score (%)."""
    acc, records = score_generation(run.loaded, params, run.data.prompts, run.scorer,
                                    batch_size=run.cfg.eval.batch_size, max_new_tokens=run.cfg.eval.max_new_tokens)
    _write_json(run.dir / file, records)
    return acc


def _score_base_model(run: _Run) -> float:
    t0 = time.perf_counter()
    acc = _generation_eval(run, run.loaded.params, "eval_before.json")
    print(f"base model: {acc:.1f}% {run.scorer.label} on {len(run.data.prompts)} validation prompts "
          f"({time.perf_counter() - t0:.0f}s)")
    return acc


def _validation_loss(run: _Run, state: jlora.TrainState) -> float:
    return validation_loss(run.eval_step, run.params, state.adapters,
                           _loader(run.cfg, run.data.valid, run.loaded.tokenizer, train=False))


def _save(run: _Run, manager, step: int, state: jlora.TrainState, loader: data_lib.Loader) -> None:
    manager.save(step, state, params=run.params, lora_config=run.cfg.lora, name=run.loaded.name,
                 data_position=loader.position)


def _train_loop(run: _Run, manager, loader: data_lib.Loader, state: jlora.TrainState, *, progress: bool,
                on_step: Callable[[int, dict], None] | None) -> tuple[jlora.TrainState, bool]:
    """Steps from ``state.step`` to ``train.steps``: a ``metrics.jsonl`` record per step, validation and checkpoints
    on schedule; a SIGINT stops it after the call in flight, with a checkpoint. Returns the state and whether a
    SIGINT stopped it."""
    t = run.cfg.train
    start = int(state.step)
    log = _Log(run.dir, t.steps, start, progress)
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
                if t.eval_every and (step + 1) % t.eval_every == 0 and run.data.valid:
                    record["valid_loss"] = _validation_loss(run, state)
                log.write(record)
                log.step({"loss": f"{loss:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"})
                if not progress and ((step + 1) % t.log_every == 0 or step == start):
                    log.say(f"step {step + 1}/{t.steps}  loss {loss:.4f}  {record['tokens_per_s']:.0f} tok/s")
                if on_step is not None:
                    on_step(step + 1, record)
                if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0:
                    _save(run, manager, step + 1, state, loader)
                if last and interrupt.requested:
                    _save(run, manager, step + 1, state, loader)
                    manager.wait()
                    log.say(f"interrupted: saved a checkpoint at step {step + 1}; continue with --resume")
                    return state, True
    finally:
        log.close()
    return state, False


def _finish(run: _Run, manager, loader: data_lib.Loader, state: jlora.TrainState) -> dict[str, float]:
    """After the last step: its checkpoint, the final validation loss (also in ``metrics.jsonl``), the generation
    eval of the trained adapters and the PEFT export. Returns the summary's entries."""
    cfg, out = run.cfg, {}
    final_step = int(state.step)
    if manager.latest_step() != final_step:
        _save(run, manager, final_step, state, loader)
    manager.wait()
    if run.data.valid:
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


def _wrap_up(run: _Run, summary: dict[str, Any], *, step: int, interrupted: bool, seconds: float) -> dict[str, Any]:
    """Writes ``loss.png`` and ``summary.json``, prints the report (unless interrupted); returns the summary."""
    plot_losses(run.dir)
    summary.update({"step": step, "interrupted": interrupted, "run_dir": str(run.dir), "train_seconds": seconds})
    _write_json(run.dir / "summary.json", summary)
    if not interrupted:
        print(_report(summary, run.scorer.label))
    return summary


def _report(summary: dict[str, Any], label: str) -> str:
    """The before/after table: the generation eval's mean score (named by ``label``) and the validation loss.

    Examples:
        >>> print(_report({"accuracy_before": 12.5, "accuracy_after": 93.75, "valid_loss": 0.1234,
        ...                "run_dir": "runs/x"}, "exact JSON"))
        <BLANKLINE>
                                exact JSON   validation loss
          base model                 12.5%
          with LoRA adapters         93.8%   0.1234
          run folder: runs/x (config.yaml, metrics.jsonl, loss.png, checkpoints/, peft/)
    """
    width = max(len(label), 7)
    lines = ["", f"{'':24}{label:>{width}}   validation loss"]
    before, after = summary.get("accuracy_before"), summary.get("accuracy_after")
    if before is not None:
        lines.append(f"  {'base model':22}{before:{width - 1}.1f}%")
    if after is not None:
        lines.append(f"  {'with LoRA adapters':22}{after:{width - 1}.1f}%   {summary.get('valid_loss', math.nan):.4f}")
    lines.append(f"  run folder: {summary['run_dir']} (config.yaml, metrics.jsonl, loss.png, checkpoints/, peft/)")
    return "\n".join(lines)


def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ other commands
def load_adapters(source: str, loaded) -> tuple[dict, jlora.LoraConfig]:
    """Adapters and their config from a PEFT folder or a run folder (its latest checkpoint)."""
    from jlora import checkpoint

    folder = pathlib.Path(source)
    if (folder / "adapter_config.json").is_file():
        return jlora.peft.load(folder, loaded)
    if (folder / CONFIG_FILE).is_file():
        cfg = runconfig.load(folder / CONFIG_FILE)
        with checkpoint.CheckpointManager(folder / CKPT_DIR) as manager:
            if manager.latest_step() is None:
                raise FileNotFoundError(f"run folder {folder} has no checkpoint yet")
            adapters = manager.restore_adapters(params=loaded.params, lora_config=cfg.lora, name=loaded.name,
                                                layout=_layout(loaded))
        return adapters, cfg.lora
    raise FileNotFoundError(f"{folder} is neither a PEFT adapter folder (adapter_config.json) nor a jlora run "
                            f"folder ({CONFIG_FILE}); pass one of those as --adapter")


def _load_with_adapter(model: str, adapter: str | None):
    """Loads ``model`` the way ``adapter`` needs it: a run folder's adapters follow its model settings
    (e.g. a scanned layer stack); a PEFT folder works with either form."""
    from jlora import hf

    run_config = pathlib.Path(adapter or "") / CONFIG_FILE
    if adapter and run_config.is_file():
        saved = runconfig.load(run_config)
        return _load_model(dataclasses.replace(saved, model=dataclasses.replace(saved.model, path=model)))
    return hf.load(model)


def evaluate_command(cfg: RunConfig, *, adapter: str | None = None, base: bool = False) -> dict[str, float]:
    """Validation loss and the generation eval's score (``eval.scorer``) of the base model or an adapter."""
    _check_inputs(cfg)
    scorer = scoring.load(cfg.eval.scorer)
    if not cfg.data.valid:
        raise ConfigError("`data.valid` is empty; eval needs a validation JSONL file")
    loaded = _load_model(cfg)
    adapters, lora_cfg = (None, cfg.lora) if base else load_adapters(adapter or cfg.run.dir, loaded)
    if adapters is None:
        adapters = jlora.init(loaded.params, dataclasses.replace(lora_cfg, init="default"), key=jax.random.key(0),
                              layout=_layout(loaded))
    valid = data_lib.load(cfg.data.valid, loaded.tokenizer, max_length=cfg.data.max_length)
    loss = validation_loss(jax.jit(jlora.make_eval_step(loaded.model, lora_cfg)), loaded.params, adapters,
                           _loader(cfg, valid, loaded.tokenizer, train=False))
    prompts = data_lib.eval_prompts(cfg.data.valid, loaded.tokenizer, limit=cfg.eval.num_examples)
    acc, _ = score_generation(loaded, loaded.params, prompts, scorer, adapters=None if base else adapters,
                              lora_cfg=lora_cfg, batch_size=cfg.eval.batch_size,
                              max_new_tokens=cfg.eval.max_new_tokens)
    print(f"validation loss {loss:.4f}; {scorer.label} {acc:.1f}% on {len(prompts)} prompts")
    return {"valid_loss": loss, "accuracy": acc}


def generate_command(model: str, prompts: Sequence[str], *, adapter: str | None = None, chat: bool = False,
                     max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                     seed: int = 0) -> list[str]:
    loaded = _load_with_adapter(model, adapter)
    if loaded.tokenizer is None:
        raise FileNotFoundError(f"model {model!r} has no tokenizer")
    adapters, lora_cfg = load_adapters(adapter, loaded) if adapter else (None, None)
    ids = [loaded.tokenizer.encode(loaded.tokenizer.apply_chat_template([{"role": "user", "content": p}]),
                                   add_special_tokens=False) if chat else loaded.tokenizer.encode(p)
           for p in prompts]
    sampling = {} if temperature == 0 else {"temperature": temperature, "top_k": top_k, "top_p": top_p,
                                            "key": jax.random.key(seed)}
    texts = generate_texts(loaded, loaded.params, ids, adapters=adapters, lora_cfg=lora_cfg,
                           max_new_tokens=max_new_tokens, **sampling)
    for text in texts:
        print(text)
    return texts


def merge_command(model: str, adapter: str, out: str) -> pathlib.Path:
    from jlora import hf

    loaded = _load_with_adapter(model, adapter)
    adapters, lora_cfg = load_adapters(adapter, loaded)
    merged = jlora.merge(loaded.params, adapters, lora_cfg, layout=_layout(loaded))
    hf.save(out, loaded, merged)
    print(f"merged model written to {out}")
    return pathlib.Path(out)


def export_peft_command(run_dir: str, out: str, *, step: int | None = None) -> pathlib.Path:
    cfg = runconfig.load(pathlib.Path(run_dir) / CONFIG_FILE)
    loaded = _load_model(cfg)
    adapters, lora_cfg = load_adapters(run_dir, loaded) if step is None else _adapters_at(run_dir, cfg, loaded,
                                                                                            step)
    path = jlora.peft.save(out, adapters, lora_cfg, loaded)
    print(f"PEFT adapter written to {path}")
    return path


def _adapters_at(run_dir: str, cfg: RunConfig, loaded, step: int):
    from jlora import checkpoint

    with checkpoint.CheckpointManager(pathlib.Path(run_dir) / CKPT_DIR) as manager:
        return manager.restore_adapters(step, params=loaded.params, lora_config=cfg.lora, name=loaded.name,
                                        layout=_layout(loaded)), cfg.lora


def inspect_command(model: str, *, adapter: str | None = None, targets: Sequence[str] = ("q_proj", "v_proj"),
                    rank: int = 16) -> str:
    loaded = _load_with_adapter(model, adapter)
    if adapter:
        adapters, _ = load_adapters(adapter, loaded)
    else:
        cfg = jlora.LoraConfig(rank=rank, alpha=2 * rank, targets=tuple(targets))
        adapters = jlora.init(loaded.params, cfg, key=jax.random.key(0), layout=_layout(loaded))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(loaded.params))
    text = (f"model {loaded.name} ({loaded.family.name}): {n:,} parameters, "
            f"{loaded.config.num_hidden_layers} layers\n"
            + jlora.summary(loaded.params, adapters, ranks=(1, 2, 4, 8, 16, 32, 64)))
    print(text)
    return text
