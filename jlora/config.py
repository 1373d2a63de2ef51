"""LoRA configuration: one frozen, validated dataclass.

`LoraConfig` says *which* parameters get adapters (``targets``/``exclude`` regexes searched in "/"-joined
parameter paths), *how big* they are (``rank``, ``rank_pattern``) and *how strongly* they act (``alpha``,
``alpha_pattern``, ``use_rslora``). The scale of an adapter is computed in exactly one place,
:meth:`LoraConfig.scale`, so every consumer (the transform, merge, PEFT export) agrees on it.

Targets select *layers*: only ``kernel`` and ``embedding`` leaves can ever match, so a target such as
``"q_proj"`` never picks up ``q_proj/bias`` or a norm's ``scale``. Whole tensors that train beside the adapters
are chosen separately, by ``bias`` and ``modules_to_save``; variants are switched on by ``use_dora`` and
``init`` (see :mod:`jlora.variants.dora`, :mod:`jlora.variants.inits`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

TARGETABLE_LEAVES = ("kernel", "embedding")
INITS = ("default", "gaussian", "pissa", "olora")
CHANGES_BASE = ("pissa", "olora")   # inits that also change the base: jlora.init_with_base
BIAS_MODES = ("none", "all", "lora_only")
DTYPES = ("float32", "bfloat16", "float16")


def _as_tuple(value: str | Sequence[str] | None, field: str) -> tuple[str, ...]:
    if value is None or value == "":        # none (an empty `--set lora.exclude=`, say)
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"`{field}` must be a regex string or a sequence of them; got {value!r}")
    if "" in value:
        raise ValueError(f"`{field}` holds an empty pattern, which matches every parameter; got {list(value)!r}: "
                         f"leave it out")
    return tuple(value)


def _check_regex(pattern: str, field: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"`{field}` holds an invalid regex {pattern!r}: {e}") from None


def _first_match(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    for pattern, value in patterns.items():
        if re.search(pattern, path):
            return value
    return default


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which parameters get low-rank adapters, and their rank and scale.

    Attributes:
        rank: adapter rank r (>= 1).
        alpha: scale numerator; an adapter's update is ``(alpha / r) * A @ B`` (``alpha / sqrt(r)`` with rsLoRA).
        targets: regex or regexes searched (``re.search``) in paths such as ``layers_0/self_attn/q_proj/kernel``.
            Only ``kernel`` and ``embedding`` leaves can match.
        exclude: regexes; a path matching any of them gets no adapter even if a target matches.
        dropout: LoRA dropout on the adapter's input, in [0, 1); active only when an rng is given.
        use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilized LoRA) instead of ``alpha / r``.
        rank_pattern: regex -> rank, the first pattern found in a path wins (so the order matters: configs
            whose patterns differ only in order are not equal).
        alpha_pattern: regex -> alpha, the first pattern found in a path wins.
        init: ``"default"`` (as PEFT: dense A kaiming-uniform, B = 0; embedding A = 0, B normal),
            ``"gaussian"`` (A normal with std 1/r, B = 0), or ``"pissa"`` / ``"olora"`` (A, B from the kernel's
            principal singular vectors / QR factors; these change the base, so use :func:`jlora.init_with_base`).
        dtype: adapter dtype name (``"float32"`` default, also ``"bfloat16"``, ``"float16"``).
        use_dora: DoRA (weight-decomposed LoRA): each adapted Dense kernel or embedding also trains a magnitude
            ``m`` per output feature, ``W' = m * (W + s A B) / ||W + s A B||`` (column norms).
        bias: which biases train as full tensors in the adapter tree: ``"none"``, ``"all"`` (every ``bias``
            leaf) or ``"lora_only"`` (biases of adapted layers), as PEFT's ``bias``.
        modules_to_save: regexes searched in parameter paths; every matching parameter trains as a full tensor
            in the adapter tree (PEFT's ``modules_to_save``, e.g. ``"lm_head"``). They must not also be targets.

    Examples:
        >>> cfg = LoraConfig(rank=8, alpha=16, targets=("q_proj", "v_proj"), rank_pattern={"v_proj": 4})
        >>> cfg.scale("layers_0/self_attn/q_proj/kernel"), cfg.scale("layers_0/self_attn/v_proj/kernel")
        (2.0, 4.0)
        >>> cfg.matches("layers_0/self_attn/q_proj/kernel"), cfg.matches("layers_0/self_attn/q_proj/bias")
        (True, False)
        >>> LoraConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    rank: int = 8
    alpha: float = 16.0
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    exclude: str | tuple[str, ...] = ()
    dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    init: str = "default"
    dtype: str = "float32"
    use_dora: bool = False
    bias: str = "none"
    modules_to_save: str | tuple[str, ...] = ()

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass normalization)
        set_("targets", _as_tuple(self.targets, "targets"))
        set_("exclude", _as_tuple(self.exclude, "exclude"))
        set_("modules_to_save", _as_tuple(self.modules_to_save, "modules_to_save"))
        if not self.targets:
            raise ValueError("`targets` is empty; give at least one regex, e.g. targets=('q_proj', 'v_proj')")
        for field in ("targets", "exclude", "modules_to_save"):
            for pattern in getattr(self, field):
                _check_regex(pattern, field)
        set_("rank", _check_rank(self.rank, "rank"))
        set_("alpha", _check_alpha(self.alpha, "alpha"))
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real)
                or not 0 <= self.dropout < 1):
            raise ValueError(f"`dropout` must be a number in [0, 1); got {self.dropout!r}")
        set_("dropout", float(self.dropout))
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"`use_rslora` must be a bool; got {self.use_rslora!r}")
        for field, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
            patterns = getattr(self, field)
            if not isinstance(patterns, Mapping):
                raise ValueError(f"`{field}` must be a mapping regex -> value; got {patterns!r}")
            values = {}
            for pattern, value in patterns.items():
                if not isinstance(pattern, str):
                    raise ValueError(f"`{field}` keys must be regex strings; got {pattern!r}")
                _check_regex(pattern, field)
                values[pattern] = check(value, f"{field}[{pattern!r}]")
            set_(field, _FrozenDict(values))
        if self.init not in INITS:
            raise ValueError(f"`init` must be one of {INITS}; got {self.init!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {DTYPES}; got {self.dtype!r}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"`use_dora` must be a bool; got {self.use_dora!r}")
        if self.use_dora and self.init in CHANGES_BASE:
            raise ValueError(f"`use_dora=True` with init={self.init!r} is not supported (PEFT cannot share such an "
                             f"adapter either); use init='default' or 'gaussian' with DoRA")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"`bias` must be one of {BIAS_MODES}; got {self.bias!r}")

    def saves(self, path: str, params: Collection[str] | None = None) -> bool:
        """Whether the parameter at ``path`` trains as a full tensor (``bias`` mode or ``modules_to_save``).

        ``bias="lora_only"`` needs to know which layers have adapters: a bias is selected when its layer's kernel
        (or embedding) path is a target, and, given ``params`` (the model's param paths), one of them: a pattern
        such as ``".*"`` must not select the bias of a layer without a kernel (a LayerNorm).

        Examples:
            >>> cfg = LoraConfig(targets="q_proj", bias="lora_only", modules_to_save="lm_head")
            >>> [cfg.saves(p) for p in ("q_proj/bias", "k_proj/bias", "lm_head/kernel", "q_proj/kernel")]
            [True, False, True, False]
            >>> everything = LoraConfig(targets=".*", bias="lora_only")
            >>> [everything.saves(p, ["q/kernel", "q/bias", "norm/bias"]) for p in ("q/bias", "norm/bias")]
            [True, False]
        """
        if any(re.search(p, path) for p in self.modules_to_save):
            return True
        if path.rsplit("/", 1)[-1] != "bias" or self.bias == "none":
            return False
        if self.bias == "all":
            return True
        module = path.rsplit("/", 1)[0]
        return any(self.matches(f"{module}/{leaf}") and (params is None or f"{module}/{leaf}" in params)
                   for leaf in TARGETABLE_LEAVES)

    def matches(self, path: str) -> bool:
        """Whether the parameter at ``path`` gets an adapter."""
        if path.rsplit("/", 1)[-1] not in TARGETABLE_LEAVES:
            return False
        if any(re.search(p, path) for p in self.exclude):
            return False
        return any(re.search(p, path) for p in self.targets)

    def rank_for(self, path: str) -> int:
        """The adapter rank at ``path`` (``rank_pattern``'s first match, else ``rank``)."""
        return int(_first_match(self.rank_pattern, path, self.rank))

    def alpha_for(self, path: str) -> float:
        """The alpha at ``path`` (``alpha_pattern``'s first match, else ``alpha``)."""
        return float(_first_match(self.alpha_pattern, path, self.alpha))

    def scale(self, path: str) -> float:
        """The factor s in ``W + s * A @ B`` at ``path``: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        r = self.rank_for(path)
        return self.alpha_for(path) / (math.sqrt(r) if self.use_rslora else r)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict; :meth:`from_dict` inverts it."""
        d = dataclasses.asdict(self)
        d["targets"], d["exclude"] = list(self.targets), list(self.exclude)
        d["modules_to_save"] = list(self.modules_to_save)
        d["rank_pattern"], d["alpha_pattern"] = dict(self.rank_pattern), dict(self.alpha_pattern)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoraConfig":
        """Builds a config from :meth:`to_dict` output; unknown keys are an error."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown LoraConfig keys {unknown}; valid keys are {names}")
        d = dict(d)
        for k in ("targets", "exclude", "modules_to_save"):
            if isinstance(d.get(k), list):
                d[k] = tuple(d[k])
        return cls(**d)


class _FrozenDict(dict):
    """A dict that is hashable and refuses mutation, so LoraConfig stays immutable and usable as a jit static."""

    def _readonly(self, *a, **k):
        raise TypeError("LoraConfig patterns are immutable; build a new config with dataclasses.replace")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _readonly  # type: ignore

    # Patterns are first-match, so their order is part of their meaning: compare and hash them in order.
    def __eq__(self, other):
        if isinstance(other, Mapping):
            return list(self.items()) == list(other.items())
        return NotImplemented

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self):
        return hash(tuple(self.items()))

    def __reduce__(self):
        return (_FrozenDict, (dict(self),))


def _check_rank(value: Any, field: str) -> int:
    """``value`` as a Python int (NumPy integers too, e.g. from ``np.arange``); an error unless an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{field}` must be an integer >= 1; got {value!r}")
    return int(value)


def _check_alpha(value: Any, field: str) -> float | int:
    """``value`` as a Python number (NumPy scalars too); an error unless finite and > 0."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not (value > 0 and math.isfinite(value))):
        raise ValueError(f"`{field}` must be a finite number > 0; got {value!r}")
    return int(value) if isinstance(value, numbers.Integral) else float(value)
