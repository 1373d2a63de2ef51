"""A training run: run folder, loop, evaluation, logging, checkpoints, resume and Ctrl-C.

``train(cfg)`` reads top to bottom like a short script:

1. prepare ``run.dir`` (refusing to overwrite an existing run unless ``overwrite`` or ``resume``) and write the
   resolved ``config.yaml``;
2. load the model (:func:`jlora.hf.load`) and the data (:mod:`jlora.data`), create adapters and an AdamW
   optimizer with warmup + cosine decay;
3. optionally score the base model: greedy decoding of validation prompts, exact-JSON accuracy;
4. the loop: one jitted step per batch, a progress bar with loss, tokens/s and ETA, ``metrics.jsonl``, periodic
   validation loss and checkpoints (adapters, optimizer state, step, RNG and the data position, so a resumed run
   sees exactly the batches it would have seen). SIGINT saves a checkpoint and stops cleanly;
5. score again, write ``loss.png`` and a PEFT export.

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


def score_generation(loaded, params, prompts: Sequence[data_lib.EvalPrompt], *, adapters=None, lora_cfg=None,
                     batch_size: int = 16, max_new_tokens: int = 64) -> tuple[float, list[dict]]:
    """Exact-JSON accuracy (%) of greedy completions of ``prompts``, and the per-example records."""
    texts = generate_texts(loaded, params, [p.prompt_ids for p in prompts], adapters=adapters,
                           lora_cfg=lora_cfg, batch_size=batch_size, max_new_tokens=max_new_tokens)
    records = [{"source": p.source, "output": t, "target": p.target,
                "correct": bool(p.expected is not None and data_lib.score_json(t, p.expected))}
               for p, t in zip(prompts, texts)]
    return 100.0 * sum(r["correct"] for r in records) / max(len(records), 1), records


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
    """Runs a fine-tune as configured; returns a summary dict (also written to ``summary.json``)."""
    from jlora import checkpoint

    _check_inputs(cfg)
    if resume:
        saved = runconfig.load(pathlib.Path(cfg.run.dir) / CONFIG_FILE)
        if saved.lora != cfg.lora or saved.model != cfg.model:
            raise ConfigError(f"--resume: the config's model/lora sections differ from the run's saved "
                              f"{pathlib.Path(cfg.run.dir) / CONFIG_FILE}; resume with the same settings")
    run_dir = _prepare_dir(cfg, resume=resume, overwrite=overwrite)
    say = print
    loaded = _load_model(cfg)
    if loaded.tokenizer is None:
        raise ConfigError(f"model {cfg.model.path!r} has no tokenizer; jlora's runs need one (tokenizer.json)")
    train_examples, valid_examples = data_lib.load_splits(
        cfg.data.train, loaded.tokenizer, valid=cfg.data.valid or None, valid_fraction=cfg.data.valid_fraction,
        max_length=cfg.data.max_length, seed=cfg.data.seed)
    say(f"model {loaded.name}: {sum(x.size for x in jax.tree.leaves(loaded.params)):,} parameters; "
        f"data: {len(train_examples)} train / {len(valid_examples)} validation examples")

    lora_cfg = cfg.lora
    key = jax.random.key(cfg.train.seed)
    init_key, rng = jax.random.split(key)
    # `params` is the base the adapters train on: the loaded weights, or PiSSA/OLoRA's residual of them.
    layout = _layout(loaded)
    adapters, params = jlora.init_with_base(loaded.params, lora_cfg, key=init_key, layout=layout)
    say(jlora.summary(params, adapters))
    optimizer = make_optimizer(cfg)
    state = jlora.TrainState.create(adapters, optimizer, rng=rng)
    mesh = _mesh(cfg)
    per_call = cfg.train.steps_per_call
    if mesh is not None and per_call > 1:
        raise ConfigError(f"train.steps_per_call={per_call} works on a single device only; with a `mesh` section "
                          f"set train.steps_per_call: 1")
    if mesh is not None:   # shard frozen params, adapters and optimizer state over the configured mesh
        from jlora import parallel

        param_sh = parallel.param_shardings(params, mesh, family=loaded.family.name)
        params = parallel.place(params, param_sh)
        state_sh = parallel.state_shardings(state, parallel.adapter_shardings(state.adapters, param_sh, params))
        state = parallel.place(state, state_sh)
        step_fn = parallel.make_sharded_train_step(loaded.model, lora_cfg, optimizer, mesh,
                                                   param_shardings=param_sh, state_shardings=state_sh,
                                                   grad_accum_steps=cfg.train.grad_accum_steps)
        put_batch = lambda b: parallel.shard_batch(b, mesh)  # noqa: E731
        multi_fn = None
    else:
        one_step = jlora.make_train_step(loaded.model, lora_cfg, optimizer, grad_accum_steps=cfg.train.grad_accum_steps)
        step_fn = jax.jit(one_step, donate_argnums=0)
        multi_fn = jax.jit(jlora.scan_steps(one_step), donate_argnums=0)   # for train.steps_per_call > 1
        put_batch = lambda b: {k: jnp.asarray(v) for k, v in b.items()}  # noqa: E731
    manager = checkpoint.CheckpointManager(run_dir / CKPT_DIR, max_to_keep=cfg.train.max_to_keep)
    position = None
    summary: dict[str, Any] = {}
    if resume and manager.latest_step() is not None:
        restored = manager.restore(state, params=params, lora_config=lora_cfg, name=loaded.name)
        state, position = restored.state, restored.data_position
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
        say(f"resumed from step {int(state.step)}")
    loader = _loader(cfg, train_examples, loaded.tokenizer, train=True, position=position)

    prompts = []
    if valid_examples and (cfg.eval.before or cfg.eval.after):
        prompts = data_lib.eval_prompts(cfg.data.valid, loaded.tokenizer, limit=cfg.eval.num_examples) \
            if cfg.data.valid else []
    if prompts and cfg.eval.before and "accuracy_before" not in summary:
        t0 = time.perf_counter()
        acc, records = score_generation(loaded, loaded.params, prompts, batch_size=cfg.eval.batch_size,
                                        max_new_tokens=cfg.eval.max_new_tokens)
        summary["accuracy_before"] = acc
        _write_json(run_dir / "eval_before.json", records)
        say(f"base model: {acc:.1f}% exact JSON on {len(prompts)} validation prompts "
            f"({time.perf_counter() - t0:.0f}s)")

    eval_step = jax.jit(jlora.make_eval_step(loaded.model, lora_cfg))
    start = int(state.step)
    log = _Log(run_dir, cfg.train.steps, start, progress)
    interrupted = False
    tokens_seen, t_start = 0.0, time.perf_counter()

    def save(step):
        manager.save(step, state, params=params, lora_config=lora_cfg, name=loaded.name,
                     data_position=loader.position)

    try:
        with _Interrupt() as interrupt:
            for step, batch, metrics, state, last in _calls(step_fn, multi_fn, put_batch,
                                                            loader, state, params, start, cfg.train.steps,
                                                            per_call):
                loss = float(metrics["loss"])
                tokens_seen += float(jnp.sum(batch["attention_mask"]))  # tokens processed (loss: completions)
                elapsed = time.perf_counter() - t_start
                record = {"step": step + 1, "loss": loss, "loss_tokens": float(metrics["tokens"]),
                          "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": tokens_seen / elapsed}
                if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and valid_examples:
                    record["valid_loss"] = validation_loss(eval_step, params, state.adapters,
                                                           _loader(cfg, valid_examples, loaded.tokenizer,
                                                                   train=False))
                log.write(record)
                log.step({"loss": f"{loss:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"})
                if not progress and ((step + 1) % cfg.train.log_every == 0 or step == start):
                    log.say(f"step {step + 1}/{cfg.train.steps}  loss {loss:.4f}  "
                            f"{record['tokens_per_s']:.0f} tok/s")
                if on_step is not None:
                    on_step(step + 1, record)
                if cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0:
                    save(step + 1)
                if last and interrupt.requested:
                    save(step + 1)
                    manager.wait()
                    interrupted = True
                    log.say(f"interrupted: saved a checkpoint at step {step + 1}; continue with --resume")
                    break
    finally:
        log.close()
    final_step = int(state.step)
    if not interrupted:
        if manager.latest_step() != final_step:
            save(final_step)
        manager.wait()
        if valid_examples:
            summary["valid_loss"] = validation_loss(eval_step, params, state.adapters,
                                                    _loader(cfg, valid_examples, loaded.tokenizer, train=False))
            with open(run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps({"step": final_step, "valid_loss": summary["valid_loss"]}) + "\n")
        if prompts and cfg.eval.after:
            # Merged params decode exactly like unmerged adapters and reuse the base model's compiled decoder.
            merged = jlora.merge(params, state.adapters, lora_cfg, layout=layout)
            acc, records = score_generation(loaded, merged, prompts, batch_size=cfg.eval.batch_size,
                                            max_new_tokens=cfg.eval.max_new_tokens)
            del merged
            summary["accuracy_after"] = acc
            _write_json(run_dir / "eval_after.json", records)
        if cfg.run.export_peft:
            jlora.peft.save(run_dir / PEFT_DIR, state.adapters, lora_cfg, loaded)
    manager.close()
    plot_losses(run_dir)
    summary.update({"step": final_step, "interrupted": interrupted, "run_dir": str(run_dir),
                    "train_seconds": time.perf_counter() - t_start})
    _write_json(run_dir / "summary.json", summary)
    if not interrupted:
        say(_report(summary))
    return summary


def _report(summary: dict[str, Any]) -> str:
    lines = ["", "                        exact JSON   validation loss"]
    before, after = summary.get("accuracy_before"), summary.get("accuracy_after")
    if before is not None:
        lines.append(f"  base model            {before:6.1f}%")
    if after is not None:
        lines.append(f"  with LoRA adapters    {after:6.1f}%      {summary.get('valid_loss', math.nan):.4f}")
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
    """Validation loss and exact-JSON accuracy of the base model or an adapter."""
    _check_inputs(cfg)
    loaded = _load_model(cfg)
    adapters, lora_cfg = (None, cfg.lora) if base else load_adapters(adapter or cfg.run.dir, loaded)
    if adapters is None:
        adapters = jlora.init(loaded.params, dataclasses.replace(lora_cfg, init="default"), key=jax.random.key(0),
                              layout=_layout(loaded))
    if not cfg.data.valid:
        raise ConfigError("`data.valid` is empty; eval needs a validation JSONL file")
    valid = data_lib.load(cfg.data.valid, loaded.tokenizer, max_length=cfg.data.max_length)
    loss = validation_loss(jax.jit(jlora.make_eval_step(loaded.model, lora_cfg)), loaded.params, adapters,
                           _loader(cfg, valid, loaded.tokenizer, train=False))
    prompts = data_lib.eval_prompts(cfg.data.valid, loaded.tokenizer, limit=cfg.eval.num_examples)
    acc, _ = score_generation(loaded, loaded.params, prompts, adapters=None if base else adapters,
                              lora_cfg=lora_cfg, batch_size=cfg.eval.batch_size,
                              max_new_tokens=cfg.eval.max_new_tokens)
    print(f"validation loss {loss:.4f}; exact JSON {acc:.1f}% on {len(prompts)} prompts")
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
