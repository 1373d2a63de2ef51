"""PEFT adapter folders: export jlora adapters for PyTorch users, and import theirs.

A PEFT LoRA adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<HF module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r) — for embeddings
``lora_embedding_A`` (r, vocab) and ``lora_embedding_B`` (dim, r). jlora's factors are the same matrices
transposed (Flax kernels are (in, out)): ``lora_A = a.T``, ``lora_B = b.T``. HF module names come from the
model family's parameter table (:mod:`jlora.models`), the single source of names for loading, export and PEFT.

Export writes ``target_modules`` and pattern keys as full module names, so PEFT's matching (a key matches a
module name ``m`` when ``re.match(rf"(.*\\.)?({key})$", m)``) selects exactly what jlora trained. Import
applies those same semantics to ``r``/``lora_alpha``/``rank_pattern``/``alpha_pattern``, checks every tensor
against the base model, and refuses PEFT features jlora does not implement rather than ignoring them.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from jlora import lora as lora_lib
from jlora import tree as tree_lib
from jlora.config import LoraConfig

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# adapter_config.json keys jlora reads, and keys it may ignore when they hold these neutral values.
_HANDLED = {"peft_type", "task_type", "r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora",
            "rank_pattern", "alpha_pattern", "fan_in_fan_out", "base_model_name_or_path", "bias"}
_IGNORED = {"auto_mapping", "peft_version", "revision", "inference_mode", "init_lora_weights", "exclude_modules",
            "megatron_core", "runtime_config", "qalora_group_size", "ensure_weight_tying", "loftq_config"}


def _neutral(value: Any) -> bool:
    return value is None or value is False or value in ("", "none") or value == {} or value == []


def _module_table(loaded) -> dict[str, tuple[str, int | None]]:
    """HF module name -> (jlora param path, layer index in a scanned stack or None), for kernels/embeddings."""
    table = {}
    flat = tree_lib.flatten(loaded.params)
    scanned = getattr(loaded.config, "scan_layers", False)
    for spec in loaded.family.param_specs(loaded.config):
        leaf = spec.path.rsplit("/", 1)[-1]
        if leaf not in ("kernel", "embedding"):
            continue
        module = spec.hf_name[: -len(".weight")] if spec.hf_name.endswith(".weight") else spec.hf_name
        path, layer = spec.path, None
        m = re.match(r"^([A-Za-z]+)_(\d+)/(.*)$", spec.path)
        if scanned and m and f"{m.group(1)}/{m.group(3)}" in flat:
            path, layer = f"{m.group(1)}/{m.group(3)}", int(m.group(2))
        table[module] = (path, layer)
    return table


def _kind(path: str) -> str:
    return "embedding" if path.endswith("/embedding") else "linear"


def save(out_dir: str | pathlib.Path, adapters: Mapping, cfg: LoraConfig, loaded) -> pathlib.Path:
    """Writes ``adapters`` as a PEFT LoRA adapter folder for ``loaded``'s Hugging Face model.

    Args:
        out_dir: the folder to write (created if needed).
        adapters: jlora adapters for ``loaded.params``.
        cfg: their LoraConfig.
        loaded: the :class:`jlora.hf.Loaded` base model (gives module names and the base model's name).

    Returns:
        The folder path.
    """
    from safetensors.numpy import save_file

    lora_lib.check_fits(loaded.params, adapters)
    by_path: dict[tuple[str, int | None], str] = {v: k for k, v in _module_table(loaded).items()}
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for path, pair in lora_lib._adapter_items(adapters):
        a, b = np.asarray(pair["a"], np.float32), np.asarray(pair["b"], np.float32)
        layers = [None] if a.ndim == 2 else list(range(a.shape[0]))
        for layer in layers:
            module = by_path.get((path, layer))
            if module is None:
                raise ValueError(f"adapter at {path!r} has no Hugging Face module name in the "
                                 f"{loaded.family.name} table; PEFT export supports the model's kernels and "
                                 f"embeddings only")
            la, lb = (a, b) if layer is None else (a[layer], b[layer])
            if _kind(path) == "embedding":
                tensors[f"{PREFIX}{module}.lora_embedding_A"] = np.ascontiguousarray(la.T)
                tensors[f"{PREFIX}{module}.lora_embedding_B"] = np.ascontiguousarray(lb.T)
            else:
                tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(la.T)
                tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(lb.T)
            ranks[module], alphas[module] = la.shape[-1], cfg.alpha_for(path)
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": loaded.name or "unknown",
        "r": int(r),
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "rank_pattern": {m: int(v) for m, v in sorted(ranks.items()) if v != r},
        "alpha_pattern": {m: v for m, v in sorted(alphas.items()) if v != alpha},
        "bias": "none",
        "fan_in_fan_out": loaded.family.name == "gpt2",
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
        "inference_mode": True,
    }
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's pattern semantics: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)`` wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(folder: pathlib.Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a PEFT adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}; jlora reads LoRA adapters only")
    unsupported = sorted(k for k, v in config.items() if k not in _HANDLED | _IGNORED and not _neutral(v))
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        detail = ", ".join(f"{k}={config[k]!r}" for k in unsupported)
        raise ValueError(f"{path} uses PEFT features jlora does not support: {detail}. Re-train or convert the "
                         f"adapter without them.")
    return config


def _read_tensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise ValueError(f"{folder} holds a pickle adapter_model.bin, which jlora does not read (pickles can "
                             f"run code). Convert it in PyTorch: `PeftModel.from_pretrained(model, folder)"
                             f".save_pretrained(new_folder, safe_serialization=True)`, or "
                             f"`safetensors.torch.save_file(torch.load(bin), 'adapter_model.safetensors')`.")
        raise FileNotFoundError(f"{path} not found: a PEFT adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{path} cannot be read as safetensors ({e}); the file is corrupt or truncated") from None


_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


def load(folder: str | pathlib.Path, loaded) -> tuple[dict, LoraConfig]:
    """Reads a PEFT LoRA adapter folder into jlora adapters for ``loaded`` and a matching LoraConfig.

    Keys may carry the ``base_model.model.`` prefix or not. Ranks and scales follow PEFT's semantics for
    ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern`` and ``alpha_pattern``.

    Raises:
        ValueError: keys that do not fit the base model (listing missing and unexpected keys), tensors of the
            wrong shape, unsupported PEFT features, a pickle ``adapter_model.bin``, or a corrupt file.
    """
    folder = pathlib.Path(folder)
    config = _read_config(folder)
    tensors = _read_tensors(folder)
    table = _module_table(loaded)
    flat_params = tree_lib.flatten(loaded.params)
    found: dict[str, dict[str, np.ndarray]] = {}
    unexpected = []
    for key, value in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _KEY.match(name)
        if not m or m.group("module") not in table:
            unexpected.append(key)
            continue
        part = "a" if m.group("part").startswith(("lora_A", "lora_embedding_A")) else "b"
        found.setdefault(m.group("module"), {})[part] = value
    missing = [f"{PREFIX}{mod}.{'lora_A' if p == 'a' else 'lora_B'}" for mod, pair in found.items()
               for p in "ab" if p not in pair]
    if unexpected or missing or not found:
        raise ValueError(f"adapter {folder} does not fit the base model {loaded.name!r}: unexpected keys "
                         f"{sorted(unexpected)[:10]}{' ...' if len(unexpected) > 10 else ''}; missing keys "
                         f"{missing[:10]}. Module names here look like {sorted(table)[:5]}; the adapter is for "
                         f"another model or its module names are misspelled.")
    r0, alpha0 = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    per_path: dict[str, dict[int | None, dict[str, np.ndarray]]] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for module, pair in found.items():
        path, layer = table[module]
        r = int(_pattern_value(rank_pattern, module, r0))
        alpha = float(_pattern_value(alpha_pattern, module, alpha0))
        a, b = pair["a"].T.astype(np.float32), pair["b"].T.astype(np.float32)
        shape = flat_params[path].shape[(0 if layer is None else 1):]
        if a.shape != (shape[0], r) or b.shape != (r, shape[1]):
            raise ValueError(f"{module}: PEFT tensors have shapes A {pair['a'].shape} and B {pair['b'].shape}; "
                             f"the base kernel {module} is {shape[0]} in x {shape[1]} out at r={r}, so they "
                             f"should be A {(r, shape[0])} and B {(shape[1], r)}")
        if ranks.setdefault(path, r) != r or alphas.setdefault(path, alpha) != alpha:
            raise ValueError(f"{module}: a scanned layer stack needs one rank and alpha for all its layers; "
                             f"{path} has r {ranks[path]} vs {r}, alpha {alphas[path]} vs {alpha}")
        per_path.setdefault(path, {})[layer] = {"a": a, "b": b}
    out = {}
    for path, layers in per_path.items():
        if None in layers:
            out[path] = layers[None]
        else:
            n = flat_params[path].shape[0]
            absent = [i for i in range(n) if i not in layers]
            if absent:
                raise ValueError(f"{path}: the adapter covers layers {sorted(layers)} of a scanned stack of {n}; "
                                 f"load the model with scan_layers=False to use adapters on some layers only")
            out[path] = {k: np.stack([layers[i][k] for i in range(n)]) for k in ("a", "b")}
    cfg = _config_for(set(out), ranks, alphas, config, flat_params)
    return tree_lib.unflatten(out), cfg


def _config_for(paths: set[str], ranks, alphas, config, flat_params) -> LoraConfig:
    """A LoraConfig whose targets select exactly ``paths`` and whose patterns give the loaded ranks/alphas."""
    names = sorted({p.rsplit("/", 2)[-2] for p in paths})
    targets = tuple(rf"(^|/){re.escape(n)}/(kernel|embedding)$" for n in names)
    probe = LoraConfig(rank=1, targets=targets)
    if {p for p in flat_params if probe.matches(p)} != paths:
        targets = tuple(rf"^{re.escape(p)}$" for p in sorted(paths))
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return LoraConfig(
        rank=r, alpha=alpha, targets=targets, dropout=float(config.get("lora_dropout") or 0.0),
        use_rslora=bool(config.get("use_rslora", False)),
        rank_pattern={rf"^{re.escape(p)}$": v for p, v in sorted(ranks.items()) if v != r},
        alpha_pattern={rf"^{re.escape(p)}$": v for p, v in sorted(alphas.items()) if v != alpha})
