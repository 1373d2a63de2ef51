"""A tiny Flax LM, its deterministic training run, and subprocess entry points for tests/test_checkpoint.py.

Run as a script it is the "new process" of the checkpoint tests:
    python tests/_ckpt_helper.py resume <ckpt_dir> <step> <out.npz> <steps>  restore a step, train on, save results
    python tests/_ckpt_helper.py crash <ckpt_dir> <mode> <rank>        save step 1, then die by SIGKILL saving step 2
    python tests/_ckpt_helper.py corrupt <ckpt_dir> <tries>            save, truncate the adapters' data, restore
                                                                       <tries> times as `jlora` would (one error line
                                                                       per try on stderr, exit 2)
"""

import os
import signal
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jlora  # noqa: E402
from jlora import checkpoint  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

VOCAB, DIM, SEQ, BATCH = 32, 16, 12, 4
CFG = jlora.LoraConfig(rank=4, alpha=8, targets=("up", "down", "head"), dropout=0.25)
NAME = "tiny-ckpt-lm"


class TinyLM(nn.Module):
    """Embedding, a residual MLP block and an output head: three Dense layers to target."""

    @nn.compact
    def __call__(self, ids, attention_mask=None):
        x = nn.Embed(VOCAB, DIM, name="embed")(ids)
        h = nn.Dense(2 * DIM, name="up")(nn.LayerNorm(name="norm")(x))
        x = x + nn.Dense(DIM, name="down")(nn.gelu(h))
        return nn.Dense(VOCAB, name="head")(x)


def setup(seed: int = 0):
    """Model, base params, optimizer and a step-0 state (random non-zero B so every adapter trains from step 1)."""
    model = TinyLM()
    optimizer = optax.adamw(1e-2, weight_decay=0.01)

    @jax.jit  # one compilation instead of many small eager ones
    def build():
        params = model.init(jax.random.key(seed), jnp.zeros((1, SEQ), jnp.int32))["params"]
        adapters = jlora.init(params, CFG, key=jax.random.key(seed + 1))
        adapters = jax.tree_util.tree_map_with_path(
            lambda kp, x: x if jlora.tree.path_str(kp).endswith("a")
            else 0.01 * jax.random.normal(jax.random.key(7), x.shape, x.dtype), adapters)
        return params, adapters, optimizer.init(adapters)

    params, adapters, opt_state = build()
    state = jlora.TrainState(jnp.zeros((), jnp.int32), adapters, opt_state, jax.random.key(seed + 2))
    return model, params, optimizer, state


def batch_at(index: int) -> dict:
    """The batch at data position ``index``: a pure function of it, so the position alone resumes the data."""
    ids = np.random.default_rng(1000 + index).integers(0, VOCAB, (BATCH, SEQ), dtype=np.int32)
    return {"input_ids": jnp.asarray(ids)}


_STEPS: dict = {}


def train(model, params, optimizer, state, start: int, steps: int):
    """``steps`` train steps from data position ``start``; returns the state and the losses (float32 numpy)."""
    key = (id(model), id(optimizer))
    if key not in _STEPS:
        _STEPS[key] = (model, optimizer, jax.jit(jlora.make_train_step(model, CFG, optimizer), donate_argnums=0))
    step = _STEPS[key][2]
    losses = []
    for i in range(start, start + steps):
        state, metrics = step(state, params, batch_at(i))
        losses.append(np.asarray(metrics["loss"]))
    return state, np.array(losses, np.float32)


def random_state(params, cfg, optimizer, seed: int = 0):
    """A TrainState whose adapters and optimizer moments are random normal values (orbax compresses zeros)."""
    rng = np.random.default_rng(seed)

    def fill(x):
        if x.dtype == jnp.float32:
            return jnp.asarray(rng.standard_normal(x.shape, np.float32))
        return jnp.zeros(x.shape, x.dtype)

    adapters = jax.tree.map(fill, jax.eval_shape(lambda: jlora.init(params, cfg, key=jax.random.key(0))))
    opt_state = jax.tree.map(fill, jax.eval_shape(optimizer.init, adapters))
    return jlora.TrainState(jnp.zeros((), jnp.int32), adapters, opt_state, jax.random.key(seed))


def big_setup(rank: int):
    """A state whose adapters are big (2 * 2048 * rank values, plus Adam's two moments), so a save takes a while."""
    params = {"big": {"kernel": np.zeros((2048, 2048), np.float32)}}
    cfg = jlora.LoraConfig(rank=rank, alpha=rank, targets="big")
    return params, cfg, random_state(params, cfg, optax.adam(1e-3))


def _resume(directory: str, at: int, out: str, steps: int) -> None:
    model, params, optimizer, fresh = setup()
    with checkpoint.CheckpointManager(directory) as manager:
        restored = manager.restore(fresh, at, params=params, lora_config=CFG, name=NAME)
    state, losses = train(model, params, optimizer, restored.state, restored.data_position["index"], steps)
    flat = {f"adapters/{k}": np.asarray(v) for k, v in jlora.tree.leaves_by_path(state.adapters).items()}
    np.savez(out, losses=losses, step=np.asarray(state.step), restored_step=restored.step, **flat)


def _crash(directory: str, mode: str, rank: int) -> None:
    _, params, _, small = setup()
    manager = checkpoint.CheckpointManager(directory)
    manager.save(1, small, params=params, lora_config=CFG, name=NAME, data_position={"index": 1})
    big_params, big_cfg, big = big_setup(rank) if rank else (params, CFG, small)
    if mode == "commit":  # die after every file is written, just before orbax's atomic rename commits the step
        from orbax.checkpoint._src.path import async_path

        async def die(src, dst):
            os.kill(os.getpid(), signal.SIGKILL)

        async_path.rename = die
    print("SAVING", flush=True)
    manager.save(2, big, params=big_params, lora_config=big_cfg, name="big", data_position={"index": 2})
    manager.close()
    print("SAVED", flush=True)


def _corrupt(directory: str, tries: int) -> None:
    """Restores a truncated checkpoint ``tries`` times, printing each clean error the way the CLI does. Orbax fails
    such a read with many array reads still in flight; whatever they leave behind must not reach stderr."""
    import pathlib

    params = {f"w{i}": {"kernel": np.ones((256, 256), np.float32)} for i in range(6)}
    cfg = jlora.LoraConfig(rank=16, alpha=16, targets=tuple(params))
    state = random_state(params, cfg, optax.adam(1e-3))
    with checkpoint.CheckpointManager(directory) as manager:
        manager.save(1, state, params=params, lora_config=cfg)
    data = max((p for p in (pathlib.Path(directory) / "1" / "adapters").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:data.stat().st_size // 20])
    for i in range(tries):
        try:
            with checkpoint.CheckpointManager(directory) as manager:
                if i % 2:
                    manager.restore_adapters(params=params, lora_config=cfg)
                else:
                    manager.restore(state, params=params, lora_config=cfg)
        except checkpoint.CheckpointError as e:
            print(f"error: {' '.join(str(e).split())[:120]}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "resume":
        _resume(args[0], int(args[1]), args[2], int(args[3]))
    elif command == "crash":
        _crash(args[0], args[1], int(args[2]))
    elif command == "corrupt":
        _corrupt(args[0], int(args[1]))
    else:
        raise SystemExit(f"unknown command {command!r}")
