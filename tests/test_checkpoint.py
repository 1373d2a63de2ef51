"""Tests for jlora.checkpoint: size on disk, exact resume in a new process, crash safety under SIGKILL, validation
errors that leave saved files untouched, retention (max_to_keep, keep-best), async saving and sharded restore.

Oracles: byte counts of the arrays themselves; an uninterrupted 20-step run (bitwise); file hashes before/after.
"""

import dataclasses
import gc
import hashlib
import json
import pathlib
import re
import shutil
import subprocess
import sys
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _ckpt_helper import CFG, NAME, batch_at, random_state, setup, train

import jlora
from jlora import checkpoint
from jlora.checkpoint import CheckpointError, CheckpointManager

HELPER = str(pathlib.Path(__file__).with_name("_ckpt_helper.py"))


def listing(directory) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``directory``."""
    root = pathlib.Path(directory)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def disk_bytes(directory) -> int:
    return sum(p.stat().st_size for p in pathlib.Path(directory).rglob("*") if p.is_file())


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _unkey(tree):
    return jax.tree.map(lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                        else x, tree)


def assert_trees_equal(a, b):
    """Same structure, dtypes and bits (PRNG keys compared by their key data)."""
    a, b = _unkey(a), _unkey(b)
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def run(*args, timeout=120):
    return subprocess.run([sys.executable, HELPER, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny():
    return setup()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny):
    """A straight 20-step run of the tiny LM with steps 10 and 20 saved on the way: (dir, state10, state20, losses)."""
    model, params, optimizer, state0 = tiny
    directory = tmp_path_factory.mktemp("saved") / "ckpt"
    s10, losses10 = train(model, params, optimizer, jax.tree.map(jnp.copy, state0), 0, 10)
    s10_copy = jax.tree.map(jnp.copy, s10)
    with CheckpointManager(directory) as manager:
        manager.save(10, s10, params=params, lora_config=CFG, name=NAME, data_position={"index": 10},
                     metrics={"loss": 1.5})
        s20, losses20 = train(model, params, optimizer, s10, 10, 10)
        manager.save(20, s20, params=params, lora_config=CFG, name=NAME, data_position={"index": 20})
    return directory, s10_copy, s20, np.concatenate([losses10, losses20])


# ------------------------------------------------------------------------------------------------ size
def test_adapter_only_checkpoint_is_small(tmp_path):
    """Random adapters (not zeros: orbax compresses) of 24k values; base params of 25x more are never written."""
    rng = np.random.default_rng(0)
    params = {"layer": {"kernel": rng.standard_normal((600, 500), np.float32), "bias": np.ones(500, np.float32)},
              "head": {"kernel": rng.standard_normal((500, 600), np.float32)}}
    cfg = jlora.LoraConfig(rank=11, alpha=22, targets=("layer", "head"))
    state = random_state(params, cfg, optax.adamw(1e-3))
    assert jlora.count(state.adapters) >= 10_000
    with CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(1, state, params=params, lora_config=cfg, name="sized")
    payload = tree_bytes(state.adapters) + tree_bytes(state.opt_state)
    on_disk = disk_bytes(tmp_path / "ckpt")
    print(f"adapters+opt_state {payload} B, checkpoint on disk {on_disk} B ({on_disk / payload:.3f}x), "
          f"base params {tree_bytes(params)} B")
    assert on_disk <= 1.2 * payload
    assert on_disk < tree_bytes(params) / 5


# ------------------------------------------------------------------------------------------------ exact resume
def test_exact_resume_in_a_new_process(tmp_path, tiny, saved):
    """20 steps straight vs 10 steps, save, a new python process restores step 10 and trains 10 more."""
    model, params, optimizer, _ = tiny
    directory, s10, straight, straight_losses = saved
    proc = run("resume", str(directory), "10", str(tmp_path / "out.npz"), "10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")

    assert int(out["restored_step"]) == 10 and int(out["step"]) == 20
    np.testing.assert_array_equal(out["losses"], straight_losses[10:])  # every loss after the resume, bitwise
    for path, x in jlora.tree.leaves_by_path(straight.adapters).items():
        np.testing.assert_array_equal(out[f"adapters/{path}"], np.asarray(x), err_msg=path)

    # The RNG round-trip matters: the same resume with another dropout key gives another loss.
    other = jax.tree.map(jnp.copy, s10)._replace(rng=jax.random.key(99))
    _, other_losses = train(model, params, optimizer, other, 10, 1)
    assert other_losses[0] != straight_losses[10]


# ------------------------------------------------------------------------------------------------ crash safety
def _kill_when_tmp_appears(directory: pathlib.Path, rank: int) -> bool:
    """Starts a saver; SIGKILLs it as soon as step 2's tmp folder exists. True if the kill hit the save."""
    proc = subprocess.Popen([sys.executable, HELPER, "crash", str(directory), "external", str(rank)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "SAVING", proc.stderr.read()[-3000:]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if list(directory.glob("2.orbax-checkpoint-tmp*")):
                proc.kill()
                break
        proc.wait(timeout=60)
        return proc.returncode == -9 and not (directory / "2").exists()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("mode", ["external", "commit"])
def test_sigkill_mid_save_leaves_previous_checkpoint(tmp_path, tiny, mode):
    _, params, _, state0 = tiny
    directory = tmp_path / "ckpt"
    if mode == "commit":  # killed after all files are written, right before the atomic rename
        proc = run("crash", str(directory), "commit", "0")
        assert proc.returncode == -9, proc.stderr[-3000:]
    else:  # killed by the parent while step 2's arrays are being written; a bigger tree if the save was too quick
        assert any(_kill_when_tmp_appears(directory, rank) or _reset(directory) for rank in (512, 2048, 4096))
    partial = list(directory.glob("2.orbax-checkpoint-tmp*"))
    assert partial and not (directory / "2").exists()

    manager = CheckpointManager(directory)
    assert manager.all_steps() == [1] and manager.latest_step() == 1
    restored = manager.restore(state0, params=params, lora_config=CFG, name=NAME)
    assert restored.step == 1 and restored.data_position == {"index": 1}
    assert_trees_equal(restored.state, state0)
    with pytest.raises(FileNotFoundError, match="step 2"):
        manager.restore(state0, step=2, params=params, lora_config=CFG)
    # A new save of the same step still works; the partial folder is ignored throughout.
    manager.save(2, state0, params=params, lora_config=CFG, name=NAME)
    manager.close()
    assert CheckpointManager(directory).all_steps() == [1, 2]


@pytest.mark.parametrize("async_save", [False, True])
def test_a_failed_save_leaves_no_tmp_folder_and_the_step_saves_again(tmp_path, tiny, monkeypatch, async_save):
    """A save that fails with an error (the commit's rename, here) left orbax's ``2.orbax-checkpoint-tmp`` folder
    behind for good; the manager removes it, keeps step 1 byte for byte, and step 2 saves again afterwards."""
    from orbax.checkpoint._src.path import async_path

    _, params, _, state0 = tiny
    directory = tmp_path / "ckpt"
    manager = CheckpointManager(directory, async_save=async_save)
    manager.save(1, state0, params=params, lora_config=CFG, name=NAME, data_position={"index": 1})
    manager.wait()
    before = listing(directory / "1")

    async def fail(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(async_path, "rename", fail)
    with pytest.raises(OSError, match="disk gone") as raised:
        manager.save(2, state0, params=params, lora_config=CFG, name=NAME)
        manager.save(3, state0, params=params, lora_config=CFG, name=NAME)   # async: step 2's error is raised here
    monkeypatch.undo()
    assert sorted(p.name for p in directory.iterdir()) == ["1"]
    assert listing(directory / "1") == before and manager.all_steps() == [1]
    assert "saving checkpoint step 2" in "".join(getattr(raised.value, "__notes__", []))

    manager.save(2, state0, params=params, lora_config=CFG, name=NAME, data_position={"index": 2})
    manager.close()
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]
    with CheckpointManager(directory) as reader:
        for step in (1, 2):
            restored = reader.restore(state0, step, params=params, lora_config=CFG, name=NAME)
            assert restored.data_position == {"index": step}
            assert_trees_equal(restored.state, state0)

def test_two_programs_saving_into_one_folder_are_told(tmp_path, tiny):
    """Another program's manager saving into the same folder at the same time passed the same checks, and one of
    two saves of a step was lost with both reporting success: a save now holds the folder's lock until it is
    committed (an async one until it is waited for), and a save that finds it held says so, writing nothing."""
    import fcntl
    import os

    _, params, _, state0 = tiny
    directory = tmp_path / "ckpt"
    first = CheckpointManager(directory, async_save=True)
    first.save(1, state0, params=params, lora_config=CFG, name=NAME)   # in flight until waited for
    with pytest.raises(RuntimeError, match=f"another process is saving a checkpoint into {directory} right now"):
        CheckpointManager(directory).save(2, state0, params=params, lora_config=CFG, name=NAME)
    first.close()
    other = open(tmp_path / ".ckpt.lock", "a")   # another program's save under way: its lock file, flocked
    fcntl.flock(other, fcntl.LOCK_EX)
    with pytest.raises(RuntimeError, match="two programs saving into one folder would lose each other's steps"):
        first.save(2, state0, params=params, lora_config=CFG, name=NAME)
    other.close()
    with CheckpointManager(directory) as manager:
        manager.save(2, state0, params=params, lora_config=CFG, name=NAME)
        manager.save(3, state0, params=params, lora_config=CFG, name=NAME)   # the lock was released after step 2
        assert manager.all_steps() == [1, 2, 3]
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2", "3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]   # the lock file goes with the save
    with pytest.raises(NotADirectoryError, match="is a file, not a checkpoint folder"):
        CheckpointManager(directory / "1" / "_CHECKPOINT_METADATA").all_steps()


def test_a_file_system_without_folder_locks_still_saves(tmp_path, tiny, monkeypatch):
    """Lustre without -o flock has no flock (ENOSYS), some NFS mounts no lock manager (ENOLCK): the save goes on
    unlocked. (The lock is a file opened for writing: NFSv4 refused an exclusive flock on the folder itself.)"""
    import errno
    import fcntl
    import os

    _, params, _, state0 = tiny
    for code in (errno.ENOLCK, errno.ENOSYS):
        def no_flock(fd, op, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(fcntl, "flock", no_flock)
        with CheckpointManager(tmp_path / str(code)) as manager:
            manager.save(1, state0, params=params, lora_config=CFG, name=NAME)
            assert manager.all_steps() == [1] and manager._lock is None


def _reset(directory: pathlib.Path) -> bool:
    shutil.rmtree(directory, ignore_errors=True)
    return False


# ------------------------------------------------------------------------------------------------ validation
def _copy(saved, tmp_path) -> pathlib.Path:
    directory = tmp_path / "ckpt"
    shutil.copytree(saved[0], directory)
    return directory


def test_restore_round_trip_and_metadata(saved, tiny):
    directory, s10, s20, _ = saved
    _, params, _, state0 = tiny
    before = listing(directory)
    with CheckpointManager(directory) as manager:
        assert manager.all_steps() == [10, 20] and manager.latest_step() == 20
        latest = manager.restore(state0, params=params, lora_config=CFG, name=NAME)
        at10 = manager.restore(state0, 10, params=params, lora_config=CFG)
        meta = manager.metadata(10)
        adapters = manager.restore_adapters(10, params=params, lora_config=CFG)
    assert latest.step == 20 and latest.data_position == {"index": 20}
    assert_trees_equal(latest.state, s20)
    assert_trees_equal(at10.state, s10)
    assert_trees_equal(adapters, s10.adapters)
    assert jax.dtypes.issubdtype(at10.state.rng.dtype, jax.dtypes.prng_key)
    assert meta["lora_config"] == CFG.to_dict() and meta["jlora_version"] == jlora.__version__
    assert meta["base_model"]["name"] == NAME
    assert meta["base_model"]["fingerprint"] == checkpoint.fingerprint(params)
    assert meta["metrics"] == {"loss": 1.5} and meta["data_position"] == {"index": 10}
    assert "data_positions" not in meta     # one process: the format of every jlora checkpoint before
    json.dumps(meta)
    assert listing(directory) == before


def test_relative_directory_saves_and_restores(tmp_path, tiny, monkeypatch):
    # orbax refuses relative paths; the manager resolves them itself (runs pass run.dir as written in YAML)
    _, params, _, state0 = tiny
    monkeypatch.chdir(tmp_path)
    with CheckpointManager("runs/ckpt") as manager:
        manager.save(1, state0, params=params, lora_config=CFG)
    with CheckpointManager("runs/ckpt") as manager:
        assert manager.latest_step() == 1
        assert_trees_equal(manager.restore(state0, params=params, lora_config=CFG).state, state0)
    assert (tmp_path / "runs" / "ckpt" / "1").is_dir()


def test_fingerprint_tells_variants_apart(tiny):
    _, params, _, _ = tiny
    fp = checkpoint.fingerprint(params)
    assert fp == checkpoint.fingerprint(jax.tree.map(np.asarray, params))  # numpy or jax, same identity
    tuned = jax.tree.map(lambda x: x + 1e-3 * jax.random.normal(jax.random.key(0), x.shape, x.dtype), params)
    assert checkpoint.fingerprint(tuned) != fp
    one = jax.tree_util.tree_map_with_path(  # a single changed value far from the start of a big leaf
        lambda kp, x: x.at[-1, -1].add(1.0) if jlora.tree.path_str(kp) == "head/kernel" else x, params)
    assert checkpoint.fingerprint(one) != fp  # 512 values, stride 2: this one is sampled
    assert checkpoint.fingerprint(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)) != fp


def test_restore_onto_other_base_model_is_an_error(saved, tiny, tmp_path):
    directory = _copy(saved, tmp_path)
    _, params, _, state0 = tiny
    before = listing(directory)
    instruct = jax.tree.map(lambda x: x * 1.01, params)
    manager = CheckpointManager(directory)
    with pytest.raises(CheckpointError) as e:
        manager.restore(state0, params=instruct, lora_config=CFG, name="tiny-instruct")
    msg = str(e.value)
    for part in (NAME, "tiny-instruct", checkpoint.fingerprint(params), checkpoint.fingerprint(instruct),
                 "different weights", str(directory)):
        assert part in msg
    with pytest.raises(CheckpointError, match=rf"trained on base model '{NAME}' .*, but the given params are unnamed "
                                              r"\(fingerprint"):
        manager.restore(state0, params=instruct, lora_config=CFG)
    with pytest.raises(CheckpointError, match="dtypes"):
        manager.restore_adapters(params=jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), lora_config=CFG)
    wider = {**params, "extra": {"kernel": jnp.ones((2, 2))}}
    with pytest.raises(CheckpointError, match="different architecture"):
        manager.restore(state0, params=wider, lora_config=CFG, name="wider")
    manager.close()
    assert listing(directory) == before


def test_restore_with_other_lora_config_is_an_error(saved, tiny, tmp_path):
    directory = _copy(saved, tmp_path)
    _, params, optimizer, state0 = tiny
    before = listing(directory)
    manager = CheckpointManager(directory)
    rank8 = dataclasses.replace(CFG, rank=8, alpha=16)  # same scale, other shapes
    with pytest.raises(CheckpointError, match=r"rank: saved 4, given 8") as e:
        manager.restore_adapters(params=params, lora_config=rank8)
    assert "alpha: saved 8" in str(e.value) and "up/kernel" in str(e.value)
    alpha = dataclasses.replace(CFG, alpha=4)  # same shapes, other scale
    with pytest.raises(CheckpointError, match=r"alpha: saved 8, given 4"):
        manager.restore(state0, params=params, lora_config=alpha)
    with pytest.raises(CheckpointError, match="use_rslora"):
        manager.restore(state0, params=None, lora_config=dataclasses.replace(CFG, use_rslora=True))
    fewer = dataclasses.replace(CFG, targets=("up", "down"))
    with pytest.raises(CheckpointError, match="targets"):
        manager.restore(state0, params=params, lora_config=fewer)
    # What changes neither shapes nor scales restores: dropout, init, the same targets spelled otherwise.
    same = dataclasses.replace(CFG, targets=("head", "down", "^up"), dropout=0.0, init="gaussian")
    manager.restore(state0, params=params, lora_config=same)
    # A target tree of another optimizer is refused before orbax reads anything.
    sgd = jlora.TrainState.create(state0.adapters, optax.sgd(0.1, momentum=0.9), rng=jax.random.key(0))
    with pytest.raises(CheckpointError, match="train_state tree does not match"):
        manager.restore(sgd, params=params, lora_config=CFG)
    manager.close()
    assert listing(directory) == before


@pytest.fixture(scope="module")
def mid_sized(tmp_path_factory):
    """Steps 1 and 2 of random 16k-value adapters (big enough that orbax keeps them in separate data files)."""
    params = {"w": {"kernel": np.ones((512, 512), np.float32)}}
    cfg = jlora.LoraConfig(rank=16, alpha=16, targets="w")
    optimizer = optax.adam(1e-3)
    states = {step: random_state(params, cfg, optimizer, seed=step) for step in (1, 2)}
    directory = tmp_path_factory.mktemp("mid") / "ckpt"
    with CheckpointManager(directory) as manager:
        for step, state in states.items():
            manager.save(step, state, params=params, lora_config=cfg, name="mid")
    return directory, params, cfg, states


@pytest.mark.parametrize("damage, why", [
    ("garble", "checksum mismatch in adapters"),
    ("truncate", r"[A-Z_]+: Error reading \"w\.kernel\.[ab]/"),   # tensorstore's own words, not orbax's wrapper
    ("metadata", "metadata: JSONDecodeError"),
    ("missing item", "Item \"train_state\" was not found"),
    ("tree metadata", r"\(adapters/_METADATA missing\)"),   # orbax alone: a pytree mismatch naming no file
    ("metadata fields", r"metadata's base_model is not a dict with \['name', 'fingerprint'"),
    ("metadata config", r"metadata's lora_config: `rank` must be an integer >= 1; got 'x'"),
])
def test_corrupt_checkpoint_is_a_clear_error(mid_sized, tmp_path, damage, why):
    source, params, cfg, states = mid_sized
    directory = tmp_path / "ckpt"
    shutil.copytree(source, directory)
    if damage == "metadata":
        target = directory / "2" / "jlora" / "metadata"
        target.write_text(target.read_text()[:40])
    elif damage.startswith("metadata "):   # valid JSON, damaged fields
        target = directory / "2" / "jlora" / "metadata"
        meta = json.loads(target.read_text())
        if damage == "metadata fields":
            del meta["base_model"]["fingerprint"]
        else:
            meta["lora_config"]["rank"] = "x"
        target.write_text(json.dumps(meta))
    elif damage == "missing item":
        shutil.rmtree(directory / "2" / "train_state")
    elif damage == "tree metadata":
        (directory / "2" / "adapters" / "_METADATA").unlink()
    else:
        target = max((p for p in (directory / "2" / "adapters").rglob("*") if p.is_file()),
                     key=lambda p: p.stat().st_size)
        data = bytearray(target.read_bytes())
        assert len(data) > 16_000  # the adapters' data file
        if damage == "garble":  # flip bytes in the middle: orbax reads such a file without complaint
            middle = len(data) // 2
            data[middle:middle + 16] = bytes(b ^ 0x5A for b in data[middle:middle + 16])
        else:
            data = data[: len(data) // 2]
        target.write_bytes(bytes(data))
    before = listing(directory)
    with CheckpointManager(directory) as manager:
        with pytest.raises(CheckpointError) as e:
            manager.restore(states[2], params=params, lora_config=cfg)
        assert f"{directory}/2 is unreadable or corrupt" in str(e.value) and "delete this one" in str(e.value)
        assert re.search(why, str(e.value)), str(e.value)
        if damage != "missing item":   # restore_adapters does not read the train state
            with pytest.raises(CheckpointError, match="unreadable or corrupt"):
                manager.restore_adapters(2, params=params, lora_config=cfg)
        restored = manager.restore(states[1], 1, params=params, lora_config=cfg)  # other steps still load
    assert_trees_equal(restored.state, states[1])
    assert listing(directory) == before


def test_other_restore_failures_are_not_called_corruption(mid_sized, monkeypatch):
    """Only a failure to read the stored files means "corrupt, delete it"; a target the checkpoint cannot be placed
    on, or a bug, keeps its own type and message (the checkpoint itself is fine)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    directory, params, cfg, states = mid_sized
    mesh = Mesh(np.array(jax.devices()[:3]), ("x",))   # 3 does not divide the adapters' 16 or 512
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P("x"))),
                          states[2].adapters)
    with CheckpointManager(directory) as manager:
        with pytest.raises(ValueError, match="evenly divide") as e:
            manager.restore_adapters(2, params=params, lora_config=cfg, target=target)
        assert not isinstance(e.value, CheckpointError) and "corrupt" not in str(e.value)

        def broken(*args, **kwargs):
            raise RuntimeError("a bug inside the restore")

        monkeypatch.setattr(manager._orbax(create=False), "restore", broken)
        with pytest.raises(RuntimeError, match="^a bug inside the restore$"):
            manager.restore(states[2], params=params, lora_config=cfg)
        with pytest.raises(RuntimeError, match="^a bug inside the restore$"):
            manager.metadata(2)
        monkeypatch.undo()
        assert_trees_equal(manager.restore(states[2], params=params, lora_config=cfg).state, states[2])


@pytest.mark.slow   # a subprocess (~7 s); the clean error itself is checked in-process above
def test_corrupt_restore_prints_only_the_clean_error(tmp_path):
    """A truncated data file fails orbax's read with other reads in flight; the asyncio leftovers ("Exception
    ignored in: <coroutine ...>", "Event loop is closed", "... exception was never retrieved") stay off stderr."""
    proc = run("corrupt", str(tmp_path / "ckpt"), "6", timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 6, proc.stderr[-3000:]
    assert all(line.startswith("error: checkpoint ") for line in lines), proc.stderr[-3000:]


def test_manager_does_not_keep_the_base_alive(tmp_path, tiny, monkeypatch):
    """The base identity is cached per params tree (one fingerprint for many saves), by weak reference: a base
    the caller replaced (an 8B model, say) is freed, and a new tree is fingerprinted afresh."""
    _, params, _, state0 = tiny
    calls = []
    identity = checkpoint._identity
    monkeypatch.setattr(checkpoint, "_identity", lambda p, name: calls.append(name) or identity(p, name))
    base = jax.tree.map(jnp.copy, params)
    refs = [weakref.ref(x) for x in jax.tree.leaves(base)]
    manager = CheckpointManager(tmp_path / "ckpt")
    manager.save(1, state0, params=base, lora_config=CFG, name="first")
    manager.save(2, state0, params=base, lora_config=CFG, name="first")
    manager.restore(state0, params=base, lora_config=CFG)
    assert calls == ["first"]
    del base
    gc.collect()
    assert [r() for r in refs if r() is not None] == []
    other = jax.tree.map(lambda x: x + 1, params)      # may reuse the freed leaves' ids
    with pytest.raises(CheckpointError, match="different weights"):
        manager.restore(state0, params=other, lora_config=CFG, name="other")
    assert calls == ["first", "other"]
    manager.close()


def test_missing_directory_or_step(tmp_path, saved, tiny):
    _, params, _, state0 = tiny
    missing = tmp_path / "nope"
    manager = CheckpointManager(missing)
    assert manager.all_steps() == [] and manager.latest_step() is None
    with pytest.raises(FileNotFoundError, match=str(missing)):
        manager.restore(state0, params=params, lora_config=CFG)
    assert not missing.exists()  # reading never creates the folder
    with CheckpointManager(saved[0]) as manager:
        with pytest.raises(FileNotFoundError, match=r"step 15 .*\[10, 20\]"):
            manager.restore(state0, 15, params=params, lora_config=CFG)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        CheckpointManager(empty).restore(state0, params=params, lora_config=CFG)


def test_save_refuses_bad_input(tmp_path, tiny):
    _, params, _, state0 = tiny
    manager = CheckpointManager(tmp_path / "ckpt", best_metric="eval_loss")
    with pytest.raises(ValueError, match="JSON"):
        manager.save(1, state0, params=params, lora_config=CFG, data_position=object())
    with pytest.raises(ValueError, match="eval_loss"):
        manager.save(1, state0, params=params, lora_config=CFG, metrics={"loss": 1.0})
    manager.save(1, state0, params=params, lora_config=CFG, metrics={"eval_loss": 1.0})
    with pytest.raises(ValueError, match="already saved"):
        manager.save(1, state0, params=params, lora_config=CFG, metrics={"eval_loss": 1.0})
    manager.close()
    with pytest.raises(ValueError, match="max_to_keep"):
        CheckpointManager(tmp_path, max_to_keep=0)


def test_save_refuses_adapters_that_do_not_fit_its_params_or_config_and_writes_nothing(tmp_path, tiny):
    _, params, _, state0 = tiny
    directory = tmp_path / "ckpt"
    manager = CheckpointManager(directory)
    wider = {**params, "up": {**params["up"], "kernel": jnp.zeros((16, 48))}}    # another model's up: (16, 48)
    with pytest.raises(ValueError, match=r"cannot save step 1: the adapters in `state` do not fit the `params` "
                                         r"\(base 'other'\).*'up/kernel'.*kernel \(16, 48\).*b \(4, 32\)"):
        manager.save(1, state0, params=wider, lora_config=CFG, name="other")
    with pytest.raises(ValueError, match=r"cannot save step 1.*'down/kernel' has rank 4 but the config gives rank 2"):
        manager.save(1, state0, params=params, lora_config=dataclasses.replace(CFG, rank=2))
    with pytest.raises(ValueError, match=r"cannot save step 1.*'down/kernel' is not one that its config targets"):
        manager.save(1, state0, params=params, lora_config=dataclasses.replace(CFG, targets=("up", "head")))
    assert not directory.exists() or listing(directory) == {}
    assert manager.all_steps() == []
    manager.save(1, state0, params=params, lora_config=CFG)
    assert manager.all_steps() == [1]
    manager.close()


def test_save_refuses_a_step_before_the_latest(tmp_path, tiny):
    """orbax skips such a step (its save returns False): that must be an error, not a silent no-op."""
    _, params, _, state0 = tiny
    with CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(5, state0, params=params, lora_config=CFG)
        with pytest.raises(ValueError, match=r"step 3 is before the latest saved step 5.*save a step after 5"):
            manager.save(3, state0, params=params, lora_config=CFG)
        manager.save(6, state0, params=params, lora_config=CFG)
        assert manager.all_steps() == [5, 6]


def test_a_second_writer_cannot_overwrite_a_step(tmp_path, tiny):
    """Two managers on one directory (two runs into one folder): each save reads the steps on disk, so the second
    writer's step 2 is refused instead of replacing the first's."""
    _, params, _, state0 = tiny
    a, b = CheckpointManager(tmp_path / "ckpt"), CheckpointManager(tmp_path / "ckpt")
    a.save(1, state0, params=params, lora_config=CFG)
    b.all_steps()          # b has listed the steps (orbax caches that list)
    a.save(2, state0, params=params, lora_config=CFG)
    with pytest.raises(ValueError, match=r"step 2 is already saved .* saved steps: \[1, 2\]"):
        b.save(2, state0, params=params, lora_config=CFG)
    a.close(), b.close()


def test_a_reader_sees_the_steps_another_writer_saved_and_deleted(tmp_path, tiny):
    """An eval process's manager lists (and restores) what is on disk now, not the steps orbax listed when it first
    looked: the writer, keeping one step, deleted step 1 after the reader had seen it."""
    _, params, _, state0 = tiny
    writer, reader = CheckpointManager(tmp_path / "ckpt", max_to_keep=1), CheckpointManager(tmp_path / "ckpt")
    writer.save(1, state0, params=params, lora_config=CFG)
    assert reader.all_steps() == [1]
    writer.save(2, state0, params=params, lora_config=CFG)
    writer.wait()
    assert reader.all_steps() == [2] and reader.latest_step() == 2 and reader.best_step() == 2
    assert reader.restore(state0, params=params, lora_config=CFG).step == 2
    writer.close(), reader.close()


def test_a_url_directory_stays_a_url_and_a_new_best_metric_ranks_older_steps_last(tmp_path, tiny):
    """gs://... is epath's to open (it was made a local path under the working directory); a run that tracks
    another metric than the steps already saved (saved while "eval_loss" was tracked) ranks those steps last
    instead of failing with a KeyError on every save."""
    assert str(CheckpointManager("gs://bucket/run/checkpoints").directory) == "gs://bucket/run/checkpoints"
    _, params, _, state0 = tiny
    with CheckpointManager(tmp_path / "ckpt", best_metric="eval_loss") as manager:
        manager.save(1, state0, params=params, lora_config=CFG, metrics={"eval_loss": 1.0})
    with CheckpointManager(tmp_path / "ckpt", best_metric="eval_acc", mode="max", max_to_keep=1) as manager:
        manager.save(2, state0, params=params, lora_config=CFG, metrics={"eval_acc": 0.5})
        manager.wait()
        assert manager.best_step() == 2 and manager.all_steps() == [2]


def test_patterns_in_another_order_or_a_base_changing_init_are_another_config(tmp_path, tiny):
    """A pattern's first match wins, so reordered patterns are another config (here: another scale for 'up'); and
    PiSSA/OLoRA adapters belong to their residual base, so init is free only between inits that leave it alone."""
    _, params, _, state0 = tiny
    ordered = dataclasses.replace(CFG, alpha_pattern={"up": 4, "u": 32})
    with CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(1, state0, params=params, lora_config=ordered)
        with pytest.raises(CheckpointError, match=r"alpha_pattern: saved \{'up': 4, 'u': 32\}, given "
                                                  r"\{'u': 32, 'up': 4\}.*up/kernel"):
            manager.restore_adapters(params=params, lora_config=dataclasses.replace(ordered,
                                                                                    alpha_pattern={"u": 32, "up": 4}))
        with pytest.raises(CheckpointError, match=r"init: saved 'default', given 'pissa'"):
            manager.restore_adapters(params=params, lora_config=dataclasses.replace(ordered, init="pissa"))
        manager.restore_adapters(params=params, lora_config=dataclasses.replace(ordered, init="gaussian"))


def test_a_checkpoint_of_a_bf16_base_restores_on_the_same_weights_in_fp32(tmp_path, tiny):
    """A run that trained on the bf16 cast of fp32 weights: the fp32 weights are its base (cast back, they give
    the saved fingerprint); other weights, or bf16 saved and fp32 given the other way round, are not."""
    _, params, _, state0 = tiny
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    with CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(1, state0, params=half, lora_config=CFG, name=NAME)
        meta = manager.metadata()["base_model"]
        assert checkpoint.is_base(meta, half) and checkpoint.is_base(meta, params)
        manager.restore_adapters(params=params, lora_config=CFG)
        other = jax.tree.map(lambda x: x * 1.01, params)
        assert not checkpoint.is_base(meta, other)
        with pytest.raises(CheckpointError, match="other dtypes|different weights"):
            manager.restore_adapters(params=other, lora_config=CFG)


# ------------------------------------------------------------------------------------------------ retention
def test_max_to_keep_and_keep_best(tmp_path, tiny):
    _, params, _, state0 = tiny
    losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 6.0, 6: 7.0}
    with CheckpointManager(tmp_path / "latest", max_to_keep=2) as manager:
        for step in losses:
            manager.save(step, state0, params=params, lora_config=CFG)
        assert manager.all_steps() == [5, 6]

    best = tmp_path / "best"
    with CheckpointManager(best, max_to_keep=2, best_metric="eval_loss", mode="min") as manager:
        for step, loss in list(losses.items())[:4]:
            manager.save(step, state0, params=params, lora_config=CFG, metrics={"eval_loss": loss})
    # A new manager (a resumed run) reads the metrics back from disk and keeps ranking by them.
    with CheckpointManager(best, max_to_keep=2, best_metric="eval_loss", mode="min") as manager:
        for step, loss in list(losses.items())[4:]:
            manager.save(step, state0, params=params, lora_config=CFG, metrics={"eval_loss": loss})
        assert manager.all_steps() == [2, 5, 6]  # the best (2) and the latest two, although 6 is the worst
        assert manager.best_step() == 2 and manager.latest_step() == 6

    accuracy = {1: 9.0, 2: 1.0, 3: 8.0, 4: 3.0, 5: 2.0, 6: 0.0}
    with CheckpointManager(tmp_path / "max", max_to_keep=1, best_metric="acc", mode="max", keep_best=2) as m:
        for step, acc in accuracy.items():
            m.save(step, state0, params=params, lora_config=CFG, metrics={"acc": acc})
        assert m.all_steps() == [1, 3, 6] and m.best_step() == 1

    for mode, values in (("min", [1.0, float("nan"), 3.0, 4.0]), ("max", [9.0, float("nan"), 3.0, 4.0])):
        with CheckpointManager(tmp_path / f"nan-{mode}", max_to_keep=1, best_metric="m", mode=mode) as m:
            for step, value in enumerate(values, 1):     # a diverged eval (NaN) ranks last, whatever the mode
                m.save(step, state0, params=params, lora_config=CFG, metrics={"m": value})
                assert m.best_step() == 1 and 1 in m.all_steps()
            assert m.all_steps() == [1, 4]


# ------------------------------------------------------------------------------------------------ async, sharding
def test_async_save_restores_the_same(tmp_path, tiny, saved):
    model, params, optimizer, state0 = tiny
    _, s10, _, _ = saved
    state = jax.tree.map(jnp.copy, s10)
    with CheckpointManager(tmp_path / "async", async_save=True) as manager:
        manager.save(10, state, params=params, lora_config=CFG, name=NAME, data_position={"index": 10})
        train(model, params, optimizer, state, 10, 1)  # donates (deletes) the saved arrays while writing
        manager.wait()
        assert manager.all_steps() == [10]
        restored = manager.restore(state0, params=params, lora_config=CFG)
    assert_trees_equal(restored.state, s10)
    with CheckpointManager(saved[0]) as manager:
        assert_trees_equal(restored.state, manager.restore(state0, 10, params=params, lora_config=CFG).state)


def test_restore_onto_shardings(saved, tiny):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    directory, s10, _, _ = saved
    _, params, _, state0 = tiny
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))

    def spec(x):
        if x.ndim == 2 and x.shape[-1] % 2 == 0:
            return NamedSharding(mesh, P(None, "model"))
        return NamedSharding(mesh, P())

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=spec(x)),
                            jax.eval_shape(lambda: state0))
    with CheckpointManager(directory) as manager:
        restored = manager.restore(abstract, 10, params=params, lora_config=CFG)
    for got, want in zip(jax.tree.leaves(restored.state), jax.tree.leaves(abstract)):
        assert got.sharding == want.sharding
    assert_trees_equal(restored.state, s10)
    loss = jax.jit(jlora.make_eval_step(tiny[0], CFG))(params, restored.state.adapters, batch_at(0))["loss"]
    assert np.isfinite(float(loss))


# ------------------------------------------------------------------------------------------------ several processes
def test_per_process_data_positions_restore_only_on_as_many_processes(tmp_path, tiny, monkeypatch):
    """Positions that differ between processes are all kept (the two-process save and resume, each process getting
    its own back: tests/test_parallel.py); here, one process stands in for a 2-process job's save: positions that
    are the same are stored once, in the one-process format, and restore anywhere; different ones do not restore
    on another number of processes unless the position is left out."""
    _, params, _, state0 = tiny
    gathered = {}
    monkeypatch.setattr(checkpoint, "_gather_positions", lambda p: gathered["texts"])
    with CheckpointManager(tmp_path / "ckpt") as manager:
        gathered["texts"] = [json.dumps({"index": 8})] * 2
        manager.save(1, state0, params=params, lora_config=CFG, data_position={"index": 8})
        gathered["texts"] = [json.dumps({"index": 8, "counts": 5}), json.dumps({"index": 8, "counts": 3})]
        manager.save(2, state0, params=params, lora_config=CFG, data_position={"index": 8, "counts": 5})
        same = manager.restore(state0, 1, params=params, lora_config=CFG)
        assert same.data_position == {"index": 8} and "data_positions" not in same.metadata
        with pytest.raises(CheckpointError, match=r"ckpt/2 was saved by 2 processes, each with its own data position"
                                                  r".*this job has 1 process.*restore it with 2 processes"):
            manager.restore(state0, params=params, lora_config=CFG)
        left_out = manager.restore(state0, params=params, lora_config=CFG, with_data_position=False)
    assert left_out.step == 2 and left_out.data_position is None
    assert left_out.metadata["data_positions"] == [{"index": 8, "counts": 5}, {"index": 8, "counts": 3}]
    assert_trees_equal(left_out.state, state0)


def test_a_save_that_other_processes_left_says_so_not_orbaxs_barrier_name(tmp_path, tiny, monkeypatch):
    """Process 0's view of a 2-process save that failed in process 1: orbax's barrier reports a "name mismatch"."""
    _, params, _, state0 = tiny
    with CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(1, state0, params=params, lora_config=CFG)
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        with pytest.raises(RuntimeError, match=r"saving checkpoint step 2 .* failed in process 0: the processes went "
                                               r"out of step: another process's save of this step failed") as raised:
            with manager._cleanup_on_failure(2):
                raise AssertionError("sync_global_devices name mismatch ('Checkpointer:save'). Expected: [1 2]")
        monkeypatch.undo()
    assert isinstance(raised.value.__cause__, AssertionError)
