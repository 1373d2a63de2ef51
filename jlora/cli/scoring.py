"""Generation-eval scorers: ``eval.scorer`` in a run config names the function that scores each completion.

A scorer is a function ``score(output: str, target: str) -> bool | float``: ``output`` is a greedy completion of a
validation prompt (special tokens removed), ``target`` the reference text (the last assistant turn of a chat
record, or a pair's ``completion``). It returns True/False or a score in [0, 1]; a run reports the mean as a
percentage. An optional ``label`` attribute names the metric in reports (default: the function's name).

``eval.scorer`` spells it one of two ways:

* ``"path/to/file.py:function"``: a Python file, relative to the working directory like the data paths (the
  demo's is ``examples/json_task.py:score``);
* ``"package.module:function"``: an importable module (the default, ``jlora.cli.scoring:exact_match``).

:func:`load` checks all of it (the spelling, the file or module, the function and that it takes two arguments)
and raises a :class:`~jlora.cli.config.ConfigError` naming what is wrong, before any model is loaded.

Examples:
    >>> scorer = load("jlora.cli.scoring:exact_match")
    >>> scorer.label, scorer(" 42\\n", "42"), scorer("41", "42")
    ('exact match', 1.0, 0.0)
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import pathlib
import sys
from collections.abc import Callable
from typing import NamedTuple

from jlora.cli.config import ConfigError


def exact_match(output: str, target: str) -> bool:
    """Whether the completion equals the reference, ignoring surrounding whitespace."""
    return output.strip() == target.strip()


exact_match.label = "exact match"


class Scorer(NamedTuple):
    """A loaded scorer: ``scorer(output, target)`` returns a float in [0, 1]."""

    spec: str
    fn: Callable[[str, str], bool | float]
    label: str

    def __call__(self, output: str, target: str) -> float:
        try:
            value = self.fn(output, target)
        except Exception as e:   # the user's code: say whose, and on what
            raise ValueError(f"scorer {self.spec} raised {type(e).__name__}: {e} on output {output[:60]!r} (target "
                             f"{target[:60]!r}); fix the scorer: it gets any text the model writes") from e
        if hasattr(value, "item") and getattr(value, "shape", None) == ():   # a NumPy/JAX scalar: np.isclose(...)
            value = value.item()
        if isinstance(value, bool):
            return float(value)
        if isinstance(value, (int, float)) and 0.0 <= value <= 1.0:
            return float(value)
        raise ValueError(f"scorer {self.spec} returned {value!r} for output {output[:60]!r}; a scorer returns "
                         f"True/False or a number in [0, 1]")


def _module(source: str, spec: str):
    """The module a scorer spec names: a ``.py`` file (loaded under a private name) or an importable module."""
    where = f"`eval.scorer` {spec!r}"
    if source.endswith(".py"):
        path = pathlib.Path(source)
        if not path.is_file():
            raise ConfigError(f"{where}: file {source!r} does not exist (relative paths start in the working "
                              f"directory {os.getcwd()!r}); fix the path in the config or with --set eval.scorer=...")
        name = f"_jlora_scorer_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module   # dataclasses and pickling look their module up here
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise ConfigError(f"{where}: running {source} failed: {type(e).__name__}: {e}") from e
        return module
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as e:
        raise ConfigError(f"{where}: no module named {e.name!r}; name a .py file (path/to/file.py:function) or an "
                          f"importable module (package.module:function)") from e
    except Exception as e:
        raise ConfigError(f"{where}: importing {source} failed: {type(e).__name__}: {e}") from e


def load(spec: str) -> Scorer:
    """The scorer ``spec`` names (see the module docstring); a :class:`ConfigError` says what is wrong with it.

    Examples:
        >>> load("jlora.cli.scoring")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        jlora.cli.config.ConfigError: `eval.scorer` 'jlora.cli.scoring' must be 'path/to/file.py:function' or ...
        >>> load("jlora.cli.scoring:exact_mtach")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        jlora.cli.config.ConfigError: ... has no function 'exact_mtach'; it has: ['exact_match', 'load']
    """
    source, _, name = (spec or "").rpartition(":")
    if not source or not name.isidentifier():
        raise ConfigError(f"`eval.scorer` {spec!r} must be 'path/to/file.py:function' or 'package.module:function'")
    module = _module(source, spec)
    fn = getattr(module, name, None)
    if fn is None:
        functions = sorted(k for k, v in vars(module).items() if inspect.isfunction(v) and not k.startswith("_")
                           and v.__module__ == module.__name__)
        raise ConfigError(f"`eval.scorer` {spec!r}: {source} has no function {name!r}; it has: {functions}")
    if not callable(fn):
        raise ConfigError(f"`eval.scorer` {spec!r}: {name} is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind("output", "target")
    except TypeError:
        raise ConfigError(f"`eval.scorer` {spec!r}: {name}{inspect.signature(fn)} cannot be called as "
                          f"{name}(output, target)") from None
    except ValueError:   # no signature to inspect (a builtin): trust it
        pass
    return Scorer(spec, fn, str(getattr(fn, "label", name)))
