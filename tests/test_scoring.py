"""Generation-eval scorers: ``eval.scorer`` specs load from a file or a module, every mistake in one is a config error
naming it (also as the `jlora` command's one-line exit-2 error, before any model loads), scores are checked, and the
demo's strict-JSON scorer (examples/json_task.py) accepts exactly the right objects."""

import pathlib
import re
import subprocess
import sys

import pytest

from jlora.cli import scoring
from jlora.cli.config import ConfigError
from jlora.cli.run import score_texts
from jlora.data import EvalPrompt

ROOT = pathlib.Path(__file__).resolve().parents[1]
JSON_TASK = str(ROOT / "examples" / "json_task.py")


def _write(tmp_path, text, name="task.py"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_file_and_module_specs(tmp_path):
    path = _write(tmp_path, "def half(output, target):\n    return 0.5\nhalf.label = 'half credit'\n")
    scorer = scoring.load(f"{path}:half")
    assert scorer.label == "half credit" and scorer("x", "y") == 0.5
    default = scoring.load("jlora.cli.scoring:exact_match")
    assert default.fn is scoring.exact_match and default(" a b\n", "a b") == 1.0 and default("a", "b") == 0.0
    assert scoring.load("os.path:join").label == "join"          # no label: the function's name


@pytest.mark.parametrize("spec, message", [
    ("", "must be 'path/to/file.py:function' or 'package.module:function'"),
    ("examples/json_task.py", "must be 'path/to/file.py:function'"),
    ("examples/json_task.py:", "must be 'path/to/file.py:function'"),
    ("no/such/task.py:score", r"file 'no/such/task.py' does not exist \(relative paths start in the working "),
    ("jlora.no_such_module:score", "no module named 'jlora.no_such_module'"),
    (f"{JSON_TASK}:scroe", r"has no function 'scroe'; it has: \['score'\]"),
])
def test_bad_specs_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message) as e:
        scoring.load(spec)
    assert f"`eval.scorer` {spec!r}" in str(e.value)


def test_bad_scorer_files_are_config_errors(tmp_path):
    broken = _write(tmp_path, "import no_such_package\n", "broken.py")
    with pytest.raises(ConfigError, match="running .*broken.py failed: ModuleNotFoundError: No module named "
                                          "'no_such_package'"):
        scoring.load(f"{broken}:score")
    odd = _write(tmp_path, "score = 3\ndef one(output):\n    return True\n", "odd.py")
    with pytest.raises(ConfigError, match="score is a int, not a function"):
        scoring.load(f"{odd}:score")
    with pytest.raises(ConfigError, match=r"one\(output\) cannot be called as one\(output, target\)"):
        scoring.load(f"{odd}:one")


def test_scores_must_be_true_false_or_in_0_1(tmp_path):
    path = _write(tmp_path, "def score(output, target):\n    return len(output)\n")
    scorer = scoring.load(f"{path}:score")
    assert scorer("a", "") == 1.0
    with pytest.raises(ValueError, match=r"returned 2 for output 'ab'; a scorer returns True/False or a number in "
                                         r"\[0, 1\]"):
        scorer("ab", "")


def test_a_scorer_that_raises_is_named_with_the_output(tmp_path):
    path = _write(tmp_path, "import json\ndef score(output, target):\n    return json.loads(output) == target\n")
    scorer = scoring.load(f"{path}:score")
    with pytest.raises(ValueError, match=rf"scorer {re.escape(str(path))}:score raised JSONDecodeError: Expecting "
                                         rf"value: .* on output 'not json' \(target '1'\); fix the scorer"):
        scorer("not json", "1")


def test_numpy_and_jax_scalars_are_scores(tmp_path):
    """np.isclose(...) and (a == b).all() return NumPy bools; they score as True/False do. Arrays and numbers
    outside [0, 1] are still refused."""
    path = _write(tmp_path, "import numpy as np, jax.numpy as jnp\n"
                            "def close(output, target):\n    return np.isclose(float(output), float(target))\n"
                            "def half(output, target):\n    return np.float32(0.5)\n"
                            "def jax_bool(output, target):\n    return jnp.asarray(output == target)\n"
                            "def many(output, target):\n    return np.array([True])\n"
                            "def big(output, target):\n    return np.float64(1.5)\n")
    assert [scoring.load(f"{path}:{name}")("1.0", "1") for name in ("close", "half", "jax_bool")] == [1.0, 0.5, 0.0]
    for name, shown in (("many", r"array\(\[ True\]\)"), ("big", "1.5")):
        with pytest.raises(ValueError, match=rf"returned {shown} for output '1.0'; a scorer returns True/False"):
            scoring.load(f"{path}:{name}")("1.0", "1")


def test_score_texts_is_the_mean_of_the_scores():
    prompts = [EvalPrompt("p", [1], target, f"v:{i}") for i, target in enumerate(['{"a": 1}', '{"a": 2}', "x"])]
    accuracy, records = score_texts(prompts, ['{"a": 1.0}', '{"a": 1}', "x"], scoring.load(f"{JSON_TASK}:score"))
    assert accuracy == pytest.approx(100 / 3)
    assert [r["score"] for r in records] == [1.0, 0.0, 0.0] and records[2]["target"] == "x"
    with pytest.raises(ValueError):   # one completion per prompt
        score_texts(prompts, ["x"], scoring.load("jlora.cli.scoring:exact_match"))


def test_bad_scorer_is_a_one_line_exit_2_before_the_model_loads(tmp_path):
    result = subprocess.run([sys.executable, "-m", "jlora.cli", "train", "--config", "configs/default.yaml",
                             "--set", "eval.scorer=examples/json_tsak.py:score", "--set", f"run.dir={tmp_path / 'r'}"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "jlora train: error: `eval.scorer` 'examples/json_tsak.py:score': file 'examples/json_tsak.py' does not "
        f"exist (relative paths start in the working directory {str(ROOT)!r}); fix the path in the config or with "
        "--set eval.scorer=..."]
    assert not (tmp_path / "r").exists()     # nothing was started


# ------------------------------------------------------------------------------------------- the demo's task
@pytest.fixture(scope="module")
def score_json():
    return scoring.load(f"{JSON_TASK}:score")


@pytest.mark.parametrize("output, target, ok", [
    ('{"name":"Ana","amount":12.5}', '{"name": "Ana", "amount": 12.5}', True),
    ('  {"amount": 12.50, "name": "Ana"}\n', '{"name": "Ana", "amount": 12.5}', True),     # order, spaces, 12.50
    ('{"name":"Ana","amount":12}', '{"name": "Ana", "amount": 12.0}', True),               # int vs float value
    ('{"name":"Ana","amount":"12"}', '{"name": "Ana", "amount": 12}', False),             # string is not a number
    ('{"name":"ana","amount":12}', '{"name": "Ana", "amount": 12}', False),               # case matters
    ('{"name":"Ana"}', '{"name": "Ana", "amount": 12}', False),                            # missing field
    ('{"name":"Ana","amount":12,"city":"Oslo"}', '{"name": "Ana", "amount": 12}', False),  # extra field
    ('Here you go: {"name":"Ana","amount":12}', '{"name": "Ana", "amount": 12}', False),  # prose
    ('```json\n{"name":"Ana","amount":12}\n```', '{"name": "Ana", "amount": 12}', False),  # code fence
    ('{"name":"Ana","amount":12}{"x":1}', '{"name": "Ana", "amount": 12}', False),        # two objects
    ('{"name":"Ana","amount":12', '{"name": "Ana", "amount": 12}', False),                 # truncated
    ('["Ana", 12]', '{"name": "Ana", "amount": 12}', False),
    ('{"ok":true}', '{"ok": 1}', False),                                                    # bool is not 1
    ('{"name":"Bo","name":"Ana","amount":12}', '{"name": "Ana", "amount": 12}', False),   # repeated key
    ("", '{"a": 1}', False),
    ('"4"', "4", False),                                   # a reference that is not a JSON object matches nothing
    ("4", "not json", False),
])
def test_demo_json_scorer(score_json, output, target, ok):
    assert score_json(output, target) == float(ok)
    assert score_json.label == "exact JSON"
