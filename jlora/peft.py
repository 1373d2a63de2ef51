"""PEFT adapter folders: export jlora adapters for PyTorch users, and import theirs.

A PEFT LoRA adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<HF module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r) — for embeddings
``lora_embedding_A`` (r, vocab) and ``lora_embedding_B`` (dim, r). jlora's factors are the same matrices
transposed (Flax kernels are (in, out)): ``lora_A = a.T``, ``lora_B = b.T``. HF module names come from the
model family's parameter table (:mod:`jlora.models`), the single source of names for loading, export and PEFT.

Export writes ``target_modules`` and pattern keys as full module names, so PEFT's matching (a key matches a
module name ``m`` when ``re.match(rf"(.*\\.)?({key})$", m)``) selects exactly what jlora trained; a pattern key
whose name is the dotted tail of another adapted module's (``proj`` and ``block.proj``) is written anchored,
``^proj``; ``base_model_name_or_path`` is the absolute path the base was read from (:func:`base_model_reference`),
as PEFT writes it. Import applies those same semantics to ``r``/``lora_alpha``/``rank_pattern``/``alpha_pattern``,
checks every tensor against the base model, refuses a folder that holds LoRA tensors of modules PEFT would not
adapt (its ``target_modules``, ``exclude_modules``, ``modules_to_save`` or ``layers_to_transform`` leave them out,
and PEFT would drop them), and refuses PEFT features jlora does not implement rather than ignoring them.

Import warns (:class:`BaseModelWarning`) when ``base_model_name_or_path`` clearly names another model than the one
loaded (a base and its instruct variant have the same shapes, so nothing else would tell): its final name is
compared, case and punctuation aside, with the loaded model's name, its config's ``_name_or_path`` and the folder or
file it was read from; nothing is said when either side is unknown.

Variants map as PEFT writes them: a DoRA magnitude is ``<module>.lora_magnitude_vector`` (``use_dora``); whole
trained tensors (``bias``, ``modules_to_save``) are HF-layout tensors at ``<module>.bias`` (``.base_layer.bias``
for a layer with an adapter) and ``<module>.weight``; a PiSSA/OLoRA adapter is exported the way PEFT converts it
for sharing (``save_pretrained(path_initial_model_for_weight_conversion=...)``): the rank-2r LoRA
``[A | A0] @ [B ; -B0]`` relative to the *original* base, with alpha scaled to keep the scale, so PEFT users load
it onto the unmodified model. The initial ``A0, B0`` are recomputed from ``loaded.params``, which must therefore
be the original base (as :func:`jlora.hf.load` returns it), not the residual.

A tied model (``tie_word_embeddings``) uses its embedding, adapted, as the output head too. Export says so as PEFT
does, ``ensure_weight_tying: true`` with the head's tied copies (``lm_head.lora_A/B.weight`` or ``lm_head.weight``);
import accepts those copies, and refuses an adapted embedding that PEFT ran untied (its default), which adapts the
input lookup only. A DoRA adapter on a tied embedding is not exported (PEFT's tied head would have magnitudes
of its own). PEFT's copies of base weights (``<module>.base_layer.weight``, written for embeddings and
``lm_head``) are checked against the base and skipped.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from jlora.variants import dora as dora_lib
from jlora.variants import inits as inits_lib
from jlora import files
from jlora import lora as lora_lib
from jlora import models
from jlora import tree as tree_lib
from jlora.adapter import Adapter, KernelLayout, adapter_items, full_items
from jlora.config import LoraConfig
from jlora.torch_names import TorchModel, conv_from_peft, conv_to_peft

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_DIGEST = "jlora_adapter_config_sha256"   # in the weights' metadata: the config saved with them (PEFT ignores it)

# adapter_config.json keys jlora reads, and keys it may ignore when they hold these neutral values.
_HANDLED = {"peft_type", "task_type", "r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora",
            "rank_pattern", "alpha_pattern", "fan_in_fan_out", "base_model_name_or_path", "bias", "use_dora",
            "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern", "exclude_modules"}
_IGNORED = {"auto_mapping", "peft_version", "revision", "inference_mode", "megatron_core", "runtime_config",
            "qalora_group_size", "ensure_weight_tying", "loftq_config",
            "eva_config"}   # EVA's settings shape only the initial factors; its ranks are in rank_pattern
# init_lora_weights values that leave the base unchanged (PiSSA, OLoRA, LoftQ, CorDA... change it)
_PLAIN_INITS = (True, False, None, "gaussian", "orthogonal", "eva")
# PEFT's EMBEDDING_LAYER_NAMES (peft.utils.constants), the same for every architecture: the module names at which
# its ensure_weight_tying applies; the second is the output head HF ties to the input embedding.
PEFT_TIE_NAMES = ("embed_tokens", "lm_head")
HEAD = PEFT_TIE_NAMES[1]
_TIED_DORA = ("the DoRA adapter at {path!r} adapts {module}, to which the base model {name!r} ties its output head; "
              "jlora's tied head uses the same magnitudes (one per feature), but PEFT's tied {head} is a DoRA Linear "
              "with magnitudes of its own (one per token), so no PEFT folder reproduces it. Export a plain LoRA "
              "adapter for the embedding (use_dora=False), or leave the embedding out of the targets")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _rank(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _strings(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# adapter_config.json value checks: key -> (accepts, what it must be)
_TYPES = {
    "r": (_rank, "a positive integer"),
    "lora_alpha": (_number, "a number"),
    "lora_dropout": (lambda v: v is None or _number(v), "a number"),
    "use_rslora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "ensure_weight_tying": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "rank_pattern": (lambda v: v is None or isinstance(v, dict) and all(map(_rank, v.values())),
                     "an object mapping module patterns to positive integers"),
    "alpha_pattern": (lambda v: v is None or isinstance(v, dict) and all(map(_number, v.values())),
                      "an object mapping module patterns to numbers"),
    "target_modules": (lambda v: v is None or isinstance(v, str) or _strings(v), "a string or a list of strings"),
    "exclude_modules": (lambda v: v is None or isinstance(v, str) or _strings(v), "a string or a list of strings"),
    "modules_to_save": (lambda v: v is None or _strings(v), "a list of module names"),
    "bias": (lambda v: isinstance(v, str), "a string"),
    "init_lora_weights": (lambda v: v is None or isinstance(v, (bool, str)), "true, false or a string"),
    "layers_to_transform": (lambda v: v is None or _index(v) or isinstance(v, list) and all(map(_index, v)),
                            "a layer index or a list of them"),
    "layers_pattern": (lambda v: v is None or isinstance(v, str) or _strings(v), "a string or a list of strings"),
}


def _index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _outside_layers(config: Mapping[str, Any], modules) -> list[str]:
    """The ``modules`` whose layer ``layers_to_transform`` leaves out, found as PEFT finds a module's layer index:
    the first number after ``.<name>.`` (``<layers_pattern>.`` when set) in its name. The adapted layers are those
    whose tensors the folder holds; a tensor PEFT would not load makes the folder contradict itself.

    Examples:
        >>> _outside_layers({"layers_to_transform": [1]}, ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"])
        ['model.layers.0.mlp.up_proj']
        >>> _outside_layers({"layers_to_transform": 0, "layers_pattern": "h"}, ["transformer.h.0.attn.c_attn"])
        []
    """
    keep = config.get("layers_to_transform")
    if keep is None or keep == []:
        return []
    keep = {keep} if isinstance(keep, int) else set(keep)
    given = config.get("layers_pattern") or []
    given = [given] if isinstance(given, str) else given
    patterns = [rf"(?:^|.*?\.){p}\." for p in given] or [r".*?\.[^.]*\."]   # a layers_pattern, else any name

    def index(module: str) -> int | None:
        found = (re.match(rf"{p}(\d+)\.", module) for p in patterns)
        return next((int(m.group(1)) for m in found if m), None)

    return sorted(m for m in modules if index(m) not in keep)


def _peft_skips(config: Mapping[str, Any], module: str, *, linear: bool = True) -> str | None:
    """The adapter_config.json key for which PEFT 0.21 puts no LoRA on ``module`` (a module name without the
    ``base_model.model.`` prefix), or None when it adapts it: its ``check_target_module_exists`` without the layer
    indices (:func:`_outside_layers` checks those).

    ``exclude_modules`` (a string: ``re.fullmatch``; a list: the name or a ``.``-suffix) and ``modules_to_save`` (a
    module to save, or a module inside one, gets no LoRA) come first; then ``target_modules``: a list entry matches
    the name or a ``.``-suffix, a string is ``re.fullmatch``ed, and ``"all-linear"`` selects the ``linear`` modules
    (PEFT's Linear and Conv1D layers but the output head). ``null`` stands for PEFT's default for the model type,
    a table jlora does not copy: not checked.

    Examples:
        >>> config = {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["layers.0.q_proj"]}
        >>> [_peft_skips(config, m) for m in ("layers.0.q_proj", "layers.1.q_proj", "layers.1.k_proj")]
        ['exclude_modules', None, 'target_modules']
        >>> _peft_skips({"target_modules": "layers[.]1[.].*"}, "layers.0.q_proj")
        'target_modules'
        >>> _peft_skips({"target_modules": "all-linear"}, "embed", linear=False)
        'target_modules'
        >>> _peft_skips({"target_modules": ["proj"], "modules_to_save": ["block"]}, "block.proj")
        'modules_to_save'
    """
    exclude = config.get("exclude_modules")
    if exclude and (re.fullmatch(exclude, module) if isinstance(exclude, str) else
                    module in exclude or any(module.endswith(f".{e}") for e in exclude)):
        return "exclude_modules"
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in config.get("modules_to_save") or []):
        return "modules_to_save"
    target = config.get("target_modules")
    if target is None:
        return None
    if isinstance(target, str):
        found = linear if target.lower() == "all-linear" else re.fullmatch(target, module)
    else:
        found = module in target or any(module.endswith(f".{t}") for t in target)
    return None if found else "target_modules"


def _regexes(config: Mapping[str, Any]):
    """(key, pattern, the regular expression PEFT builds of it) for every pattern of ``config`` PEFT reads as one."""
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in config.get(key) or {}:
            yield key, pattern, rf"(.*\.)?({pattern})$"
    for key in ("target_modules", "exclude_modules"):
        if isinstance(config.get(key), str):
            yield key, config[key], config[key]
    for pattern in config.get("modules_to_save") or []:
        yield "modules_to_save", pattern, rf"(^|.*\.){pattern}($|\..*)"
    layers = config.get("layers_pattern") or []
    for pattern in [layers] if isinstance(layers, str) else layers:
        yield "layers_pattern", pattern, rf"(?:^|.*?\.){pattern}\."


def _few(keys, n: int = 3) -> str:
    """The first ``n`` of ``keys``, sorted, and how many more: one readable line."""
    keys = sorted(keys)
    return f"{keys[:n]}{f' and {len(keys) - n} more' if len(keys) > n else ''}"


# what each adapter_config.json key does to the modules PEFT leaves without LoRA (:func:`_peft_skips`)
_SKIPPED = {"target_modules": "does not select", "exclude_modules": "excludes",
            "modules_to_save": "saves whole (PEFT puts no LoRA on a module to save)"}


def _linear(module: str, loaded, table, flat_params) -> bool:
    """Whether PEFT's ``"all-linear"`` selects ``module``: Linear/Conv1D layers, not the output head."""
    path = table[module][0]
    head = module == HEAD and not isinstance(loaded, TorchModel)
    return not head and _kind(path, _layout(loaded, path, flat_params)) == "linear"


def _check_targeted(folder: pathlib.Path, config: Mapping[str, Any], found, loaded, table, flat_params) -> None:
    """Raises when PEFT would not adapt some modules whose LoRA tensors the folder holds (it would leave those tensors
    out and apply the rest): the folder contradicts itself, as with :func:`_outside_layers`."""
    all_linear = str(config.get("target_modules")).lower() == "all-linear"
    skipped: dict[str, list[str]] = {}
    for module in found:
        key = _peft_skips(config, module, linear=not all_linear or _linear(module, loaded, table, flat_params))
        if key:
            skipped.setdefault(key, []).append(module)
    if skipped:
        why = "; ".join(f"{key}={config[key]!r} {_SKIPPED[key]} {_few(modules)}" for key, modules in skipped.items())
        raise ValueError(f"adapter {folder} holds LoRA tensors of modules PEFT would not adapt, so PEFT would leave "
                         f"them out and apply only the rest: {why}. Correct {' and '.join(skipped)} in {CONFIG_FILE} "
                         f"to select every module whose tensors are here, or remove those tensors")


def _check_complete(folder: pathlib.Path, config: Mapping[str, Any], found, loaded, table, flat_params) -> None:
    """Raises when the folder's config targets modules whose tensors it lacks (PEFT would start them afresh)."""
    if config.get("target_modules") is None:   # PEFT's default for the model type: not checked (see _peft_skips)
        return
    all_linear = str(config["target_modules"]).lower() == "all-linear"
    tied = HEAD if _tied_embedding(loaded) else None   # a tied head's tensors are not among ``found``
    chosen = [m for m in table if m not in found and m != tied and not _peft_skips(
        config, m, linear=not all_linear or _linear(m, loaded, table, flat_params))]
    absent = sorted(set(chosen) - set(_outside_layers(config, chosen)))
    if not absent:
        return
    what = (f"adapter {folder}: {CONFIG_FILE} targets modules whose LoRA tensors {WEIGHTS_FILE} lacks: "
            f"{_few(absent)} ({len(absent)} of {len(absent) + len(found)}). PEFT warns of missing adapter keys and "
            f"starts those modules from their initial A and B")
    fix = ("the folder may be incomplete (a save cut short, or files of two adapters): save the adapter again, or "
           "narrow target_modules to the modules whose tensors are here")
    if config.get("init_lora_weights", True) is False:
        raise ValueError(f"{what}, random ones with init_lora_weights=false, so it would compute something else than "
                         f"jlora, which cannot know them; {fix}")
    warnings.warn(f"{what}, whose update is zero, as jlora applies it; {fix}", stacklevel=3)


def _neutral(value: Any) -> bool:
    return value is None or value is False or value in ("", "none") or value == {} or value == []


def _param_table(loaded) -> dict[str, tuple[str, int | None, tuple[int, ...] | None]]:
    """HF tensor name -> (jlora param path, layer index in a scanned stack or None, the axis order that makes one
    layer of the jlora array the HF tensor, or None), for every param."""
    if isinstance(loaded, TorchModel):
        return loaded.param_table()
    return {name: (path, layer, (1, 0) if spec.transpose else None)
            for name, (path, layer, spec) in models.hf_param_table(loaded.family, loaded.config).items()}


def _module_table(loaded) -> dict[str, tuple[str, int | None]]:
    """HF module name -> (jlora param path, layer index in a scanned stack or None), for kernels/embeddings."""
    if isinstance(loaded, TorchModel):
        return loaded.module_table()
    return models.hf_module_table(loaded.family, loaded.config)


def _tied_embedding(loaded) -> str | None:
    """The HF module name of the input embedding when ``loaded`` ties the output head (``lm_head``) to it."""
    if isinstance(loaded, TorchModel) or not getattr(loaded.config, "tie_word_embeddings", False):
        return None
    vocab = {f"{m}/embedding" for m, split in loaded.family.tensor_parallel if split == models.VOCAB}
    names = [m for m, (path, layer) in _module_table(loaded).items() if layer is None and path in vocab]
    return names[0] if len(names) == 1 else None


def _kind(path: str, layout: KernelLayout | None = None) -> str:
    """``"embedding"`` (PEFT's ``lora_embedding_A``/``_B``), ``"conv"`` or ``"linear"`` (``lora_A``/``_B.weight``)."""
    return "conv" if layout is not None and layout.kind == "Conv" else models.module_kind(path)


def _table_name(loaded) -> str:
    return "TorchModel names" if isinstance(loaded, TorchModel) else f"{loaded.family.name} table"


def _torch(v: np.ndarray, perm) -> np.ndarray:
    return np.ascontiguousarray(v if perm is None else v.transpose(perm))


def _check_peft_geometry(path: str, lay: KernelLayout, merge_only: bool) -> None:
    """Raises for conv geometry that PEFT 0.21's unmerged conv LoRA does not reproduce."""
    conv = lay.conv
    if any(d != 1 for d in conv.input_dilation):
        raise ValueError(f"the conv adapter at {path!r} is on a layer with input_dilation {conv.input_dilation}, "
                         f"which PyTorch's nn.ConvNd does not have; PEFT export supports ConvNd layers only")
    lost = [f"kernel_dilation {conv.kernel_dilation}"] * any(d != 1 for d in conv.kernel_dilation) + \
        [f"padding {conv.padding!r}"] * (conv.padding in ("CIRCULAR", "REFLECT"))
    if lost and not merge_only:
        raise ValueError(f"the conv adapter at {path!r} is on a layer with {' and '.join(lost)}: PEFT 0.21 builds "
                         f"lora_A without the base layer's dilation and padding_mode (huggingface/peft#3697), so "
                         f"its unmerged forward would differ from jlora's (its merge_and_unload is exact). Pass "
                         f"`merge_only=True` to write the folder for PEFT users who merge it.")


def check_exportable(adapters: Mapping, loaded, *, merge_only: bool = False) -> None:
    """Raises the ValueError :func:`save` would raise for ``adapters`` on ``loaded``, from names and shapes alone
    (nothing converted or written; a run checks its fresh adapters before training): an adapter or trained tensor
    with no module name in the model's table, a conv adapter PEFT runs otherwise (unless ``merge_only``), DoRA on
    a tied embedding (PEFT's tied ``lm_head`` would have magnitudes of its own)."""
    by_path = {v: k for k, v in _module_table(loaded).items()}
    tied = _tied_embedding(loaded)
    for path, node in adapter_items(adapters):
        for layer in [None] if np.ndim(node.a) == 2 else range(np.shape(node.a)[0]):
            module = by_path.get((path, layer))
            if module is None:
                source = "PyTorch" if isinstance(loaded, TorchModel) else "Hugging Face"
                raise ValueError(f"adapter at {path!r} has no {source} "
                                 f"module name{'' if layer is None else f' for layer {layer}'} in the "
                                 f"{_table_name(loaded)}; PEFT export supports the model's kernels and embeddings only")
            if _kind(path, node.layout) == "conv":
                _check_peft_geometry(path, node.layout, merge_only)
            elif module == tied and dora_lib.MAGNITUDE in node.extras:
                raise ValueError(_TIED_DORA.format(path=path, module=module, name=loaded.name, head=HEAD))
    named = {(p, layer) for p, layer, _ in _param_table(loaded).values()}
    for path, leaf in full_items(adapters):
        if not any((path, layer) in named for layer in [None, *range(np.shape(leaf)[0] if np.ndim(leaf) else 0)]):
            raise ValueError(f"the trained tensor at {path!r} has no PyTorch name in the {_table_name(loaded)}, so "
                             f"PEFT export cannot name it")


def save(out_dir: str | pathlib.Path, adapters: Mapping, cfg: LoraConfig, loaded, *,
         merge_only: bool = False) -> pathlib.Path:
    """Writes ``adapters`` as a PEFT LoRA adapter folder for ``loaded``'s Hugging Face or PyTorch model.

    Args:
        out_dir: the folder to write (created if needed).
        adapters: jlora adapters for ``loaded.params``.
        cfg: their LoraConfig.
        loaded: the :class:`jlora.hf.Loaded` base model, or a :class:`jlora.peft.TorchModel` naming the PyTorch
            original of your own port (gives module names and the base model's name).
        merge_only: write conv adapters of dilated or circular/reflect-padded layers, which PEFT 0.21 merges
            exactly but runs unmerged without the dilation or padding mode (huggingface/peft#3697).

    Returns:
        The folder path.
    """
    from jlora.hf import write_safetensors

    lora_lib.check_fits(loaded.params, adapters, cfg)
    check_exportable(adapters, loaded, merge_only=merge_only)
    adapters, cfg = inits_lib.to_original_base(adapters, loaded.params, cfg)   # PiSSA/OLoRA: PEFT's conversion
    by_path: dict[tuple[str, int | None], str] = {v: k for k, v in _module_table(loaded).items()}
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    tied = _tied_embedding(loaded)
    flat_params = tree_lib.flatten(loaded.params)
    for path, node in adapter_items(adapters):
        a, b = np.asarray(node.a, np.float32), np.asarray(node.b, np.float32)
        m = node.extras.get(dora_lib.MAGNITUDE)
        if m is not None and m.dtype != np.float32:   # PEFT's gain from a rounded norm: needs the (decoded) kernel
            m = dora_lib.unrounded_magnitude(lora_lib.dense_value(flat_params[path]), node, cfg.scale(path))
        m = None if m is None else np.asarray(m, np.float32)
        alpha = cfg.alpha_for(path)
        layers = [None] if a.ndim == 2 else list(range(a.shape[0]))
        for layer in layers:
            module = by_path[(path, layer)]        # every adapter has one (check_exportable)
            la, lb = (a, b) if layer is None else (a[layer], b[layer])
            kind = _kind(path, node.layout)
            if kind == "conv":
                big_a, big_b = conv_to_peft(la, lb, node.layout)
                tensors[f"{PREFIX}{module}.lora_A.weight"] = big_a
                tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(big_b)
            elif kind == "embedding":
                tensors[f"{PREFIX}{module}.lora_embedding_A"] = np.ascontiguousarray(la.T)
                tensors[f"{PREFIX}{module}.lora_embedding_B"] = np.ascontiguousarray(lb.T)
                if module == tied:   # the head's tied copy, as PEFT's ensure_weight_tying=True writes it (not DoRA)
                    tensors[f"{PREFIX}{HEAD}.lora_A.weight"] = np.ascontiguousarray(lb)
                    tensors[f"{PREFIX}{HEAD}.lora_B.weight"] = np.ascontiguousarray(la)
                    ranks[HEAD], alphas[HEAD] = la.shape[-1], alpha
            else:
                tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(la.T)
                tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(lb.T)
            if m is not None:
                tensors[f"{PREFIX}{module}.lora_magnitude_vector"] = np.ascontiguousarray(
                    m if layer is None else m[layer])
            ranks[module], alphas[module] = la.shape[-1], alpha
    saved_modules = _save_full(tensors, adapters, cfg, loaded, set(ranks), tied)
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": None if isinstance(loaded, TorchModel) else "CAUSAL_LM",
        "base_model_name_or_path": base_model_reference(loaded),
        "r": int(r),
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "rank_pattern": {_pattern_key(m, ranks): int(v) for m, v in sorted(ranks.items()) if v != r},
        "alpha_pattern": {_pattern_key(m, ranks): v for m, v in sorted(alphas.items()) if v != alpha},
        "bias": cfg.bias,
        "fan_in_fan_out": loaded.fan_in_fan_out if isinstance(loaded, TorchModel) else loaded.family.fan_in_fan_out,
        "modules_to_save": saved_modules or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": cfg.use_dora,
        "inference_mode": True,
    }
    if tied is not None and (HEAD in ranks or HEAD in saved_modules):
        # jlora's tied head uses the adapted embedding; PEFT does so only with this set (its default, false, adapts
        # the input lookup alone). Written only when true: PEFT versions from before the key do not know it.
        config["ensure_weight_tying"] = True
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Both files written alike, with the mode the umask gives (safetensors' save_file makes its file 0600), each
    # beside its name; renamed into place one right after the other once both are whole. A failed save leaves the
    # folder's old adapter as it was; a reader that catches the instant between the two renames reads again: the
    # weights' metadata holds a digest of the config saved with them (:func:`_read_folder`).
    text = json.dumps(config, indent=2) + "\n"
    with files.replacing(out / WEIGHTS_FILE) as weights:
        # jlora's writer: its header keeps the metadata's order (safetensors' own writer orders it at random, so
        # two exports of one adapter differed byte for byte)
        write_safetensors(weights, tensors, metadata={"format": "pt", CONFIG_DIGEST: _digest(text)})
        with files.replacing(out / CONFIG_FILE) as config_file:
            pathlib.Path(config_file).write_text(text)
    return out


def base_model_reference(loaded) -> str:
    """What :func:`save` writes as ``base_model_name_or_path``: the absolute path ``loaded`` was read from
    (``loaded.source``: an HF folder, which PEFT's ``AutoPeftModelForCausalLM`` loads as it is, or a ``.gguf``
    file, which transformers reads from its folder with ``gguf_file=``), as PEFT writes the path it loaded the base
    from; else (a model built in memory, a :class:`TorchModel`) its name, or ``"unknown"``.

    Examples:
        >>> class Read: source, name = "/models/tiny", "org/tiny"
        >>> class Built: source, name = "", "tiny"
        >>> base_model_reference(Read()), base_model_reference(Built())
        ('/models/tiny', 'tiny')
    """
    return getattr(loaded, "source", "") or getattr(loaded, "name", None) or "unknown"


def _save_full(tensors: dict, adapters: Mapping, cfg: LoraConfig, loaded, lora_modules: set[str],
               tied: str | None = None) -> list[str]:
    """Adds the whole trained tensors (bias, modules_to_save) to ``tensors`` as PEFT names them.

    Returns the HF module names of modules_to_save. A module to save is written whole, as PEFT saves it: its
    parameters that did not train are written from the base. A saved ``tied`` embedding is also written as the
    tied head ``lm_head.weight``, as PEFT's ``ensure_weight_tying=True`` writes it.
    """
    full = dict(full_items(adapters))
    if not full:
        return []
    base = tree_lib.flatten(loaded.params)
    table = _param_table(loaded)
    by_path: dict[tuple[str, int | None], tuple[str, Any]] = {(p, layer): (name, perm)
                                                               for name, (p, layer, perm) in table.items()}
    saved_modules: set[str] = set()
    for path, leaf in full.items():
        is_module = any(re.search(r, path) for r in cfg.modules_to_save)
        value = np.asarray(leaf, np.float32)
        layers = [None] if (path, None) in by_path else [i for i in range(value.shape[0]) if (path, i) in by_path]
        for layer in layers:           # at least one (check_exportable)
            name, perm = by_path[(path, layer)]
            v = value if layer is None else value[layer]
            module, leaf_name = name.rsplit(".", 1)
            if is_module:
                saved_modules.add(module)
                if module == tied:
                    saved_modules.add(HEAD)
                    tensors[f"{PREFIX}{HEAD}.weight"] = _torch(v, perm)
            elif module in lora_modules:
                name = f"{module}.base_layer.{leaf_name}"
            tensors[f"{PREFIX}{name}"] = _torch(v, perm)
    for name, (path, layer, perm) in table.items():   # the rest of each module to save
        module = name.rsplit(".", 1)[0]
        if module in saved_modules and f"{PREFIX}{name}" not in tensors:
            v = np.asarray(base[path], np.float32)
            v = v if layer is None else v[layer]
            tensors[f"{PREFIX}{name}"] = _torch(v, perm)
    return sorted(saved_modules)


def _pattern_key(module: str, modules) -> str:
    """The pattern key that selects ``module`` alone among ``modules``: the name itself (what PEFT users write),
    unless, read as PEFT reads a key, it also selects another of them (``proj`` selects ``block.proj``); then the
    anchored, escaped name.

    Examples:
        >>> _pattern_key("model.layers.0.mlp.up_proj", ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"])
        'model.layers.0.mlp.up_proj'
        >>> _pattern_key("proj", ["proj", "block.proj"])
        '^proj'
    """
    if any(other != module and _selects(module, other) for other in modules):
        return "^" + re.escape(module)
    return module


def _selects(key: str, module: str) -> bool:
    """Whether the pattern key ``key`` selects ``module``, as PEFT matches ``rank_pattern``/``alpha_pattern``."""
    return re.match(rf"(.*\.)?({key})$", module) is not None


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's pattern semantics: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)`` wins."""
    for key, value in patterns.items():
        if _selects(key, module):
            return value
    return default


def _read_config(folder: pathlib.Path, text: str) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds {json.dumps(config)[:40]}, not a JSON object of PEFT settings")
    for key, (accepts, expected) in _TYPES.items():
        if key in config and not accepts(config[key]):
            raise ValueError(f"{path}: {key} is {json.dumps(config[key])}; it must be {expected} (JSON)")
    for key, pattern, regex in _regexes(config):
        try:
            re.compile(regex)
        except re.error as e:
            read = "" if regex == pattern else f" (PEFT reads it as {regex!r})"
            raise ValueError(f"{path}: {key} holds {pattern!r}, which is not a valid regular expression{read}: {e}. "
                             f"Correct it in {CONFIG_FILE} (re.escape a literal name); PEFT cannot read it "
                             f"either") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}; jlora reads LoRA adapters only")
    unsupported = sorted(k for k, v in config.items() if k not in _HANDLED | _IGNORED and not _neutral(v))
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise ValueError(f"{path}: init_lora_weights={init!r} means A and B are relative to a modified (residual) "
                         f"base, which this folder does not hold. Convert it in PEFT to a plain LoRA first: "
                         f"`model.save_pretrained(out, path_initial_model_for_weight_conversion=initial_adapter)`")
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        unsupported.append("bias")
    if unsupported:
        detail = ", ".join(f"{k}={config[k]!r}" for k in unsupported)
        raise ValueError(f"{path} uses PEFT features jlora does not support: {detail}. Re-train or convert the "
                         f"adapter without them.")
    return config


def _read_tensors(folder: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise ValueError(f"{folder} holds a pickle adapter_model.bin, which jlora does not read (pickles can "
                             f"run code). Convert it in PyTorch: `PeftModel.from_pretrained(model, folder)"
                             f".save_pretrained(new_folder, safe_serialization=True)`, or "
                             f"`safetensors.torch.save_file(torch.load(bin), 'adapter_model.safetensors')`.")
        raise FileNotFoundError(f"{path} not found: a PEFT adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    from jlora.hf import SafetensorsFile

    # the reader model loading uses, for every dtype it reads (safetensors.numpy refuses fp8, and reads bf16 only
    # because ml_dtypes registers it with numpy); read whole, not mapped (a map of a file another program
    # truncates would kill this process with SIGBUS), then copied to writable arrays
    st = SafetensorsFile(path, in_memory=True)
    return {name: np.array(value) for name, value in st.items()}, st.metadata


def _stamps(folder: pathlib.Path) -> tuple:
    """What changes when either file of the folder is replaced or rewritten (None for a missing file)."""
    def stamp(path: pathlib.Path):
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    return stamp(folder / CONFIG_FILE), stamp(folder / WEIGHTS_FILE)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _read_folder(folder: pathlib.Path, tries: int = 5) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The folder's config and tensors, read again while another process replaces its files: a save that lands
    between the two reads, or whose two renames straddle them, would pair one save's config with another's
    weights. Seen by the files' stamps changing during the reads, or (a jlora save) by the weights' metadata
    naming another config; a config edited by hand after the save is read as it is."""
    path = folder / CONFIG_FILE
    for attempt in range(tries):
        before = _stamps(folder)
        if before[0] is None:
            raise FileNotFoundError(f"{path} not found: a PEFT adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
        text = path.read_text()
        tensors, metadata = _read_tensors(folder)
        if _stamps(folder) != before:
            continue
        saved = metadata.get(CONFIG_DIGEST)
        edited = time.time_ns() - before[0][2] > 1_000_000_000   # written over a second ago: a hand edit
        if saved is None or saved == _digest(text) or edited or attempt == tries - 1:
            return _read_config(folder, text), tensors
        time.sleep(0.05)   # a save's second rename is an instant away
    raise OSError(f"{folder}: {CONFIG_FILE} and {WEIGHTS_FILE} changed while they were read, {tries} times: another "
                  f"process is writing this adapter folder. Load it once that save has finished")


_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|"
                  r"lora_magnitude_vector)$")


def load(folder: str | pathlib.Path, loaded) -> tuple[dict, LoraConfig]:
    """Reads a PEFT LoRA adapter folder into jlora adapters for ``loaded`` and a matching LoraConfig.

    ``loaded`` is a :class:`jlora.hf.Loaded` model of a jlora family, or a :class:`jlora.peft.TorchModel` naming
    the PyTorch original of your own Flax port (for conv adapters it must carry the port's ``layout``).

    Keys may carry the ``base_model.model.`` prefix or not. Ranks and scales follow PEFT's semantics for
    ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern`` and ``alpha_pattern``.

    Raises:
        ValueError: keys that do not fit the base model (listing missing and unexpected keys), a file with no LoRA
            tensors, LoRA tensors of modules the folder's own config leaves out (PEFT would drop them), tensors of
            the wrong shape or not finite, config values of the wrong type or invalid regular expressions,
            unsupported PEFT features, an adapted tied embedding that PEFT ran untied, a pickle
            ``adapter_model.bin``, or a corrupt file.
    """
    folder = pathlib.Path(folder)
    config, tensors = _read_folder(folder)
    bad = sorted(k for k, v in tensors.items() if not np.isfinite(v.astype(np.float32)).all())
    if bad:
        raise ValueError(f"adapter {folder} holds tensors with NaN or infinite values: {_few(bad, 5)}"
                         f"; the adapter is corrupt (or its "
                         f"training diverged)")
    if not any(_KEY.match(k.removeprefix(PREFIX)) for k in tensors):
        held = f"it holds {len(tensors)} tensors: {_few(tensors)}" if tensors else "it holds no tensors"
        raise ValueError(f"{folder / WEIGHTS_FILE} holds no LoRA tensors (names ending in .lora_A.weight, "
                         f".lora_B.weight, .lora_embedding_A/B or .lora_magnitude_vector); {held}. It is not the "
                         f"weights file of a PEFT LoRA adapter: save the adapter again with PEFT's save_pretrained")
    table = _module_table(loaded)
    params_table = _param_table(loaded)
    flat_params = tree_lib.flatten(loaded.params)
    found: dict[str, dict[str, np.ndarray]] = {}
    whole: dict[str, np.ndarray] = {}
    tied, head = _tied_embedding(loaded), {}   # a tied model's lm_head.* tensors, by the rest of their name
    unexpected = []
    for key, value in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if tied and name.startswith(f"{HEAD}."):
            head[name[len(HEAD) + 1:]] = value
            continue
        m = _KEY.match(name)
        if not m or m.group("module") not in table:
            if name.endswith(".base_layer.weight") and name.replace(".base_layer.", ".") in params_table:
                _check_base_copy(folder, key, value, name.replace(".base_layer.", "."), loaded, flat_params)
            elif name.replace(".base_layer.", ".") in params_table:
                whole[name.replace(".base_layer.", ".")] = value
            else:
                unexpected.append(key)
            continue
        part = m.group("part")
        part = "m" if part == "lora_magnitude_vector" else "a" if part.startswith(("lora_A", "lora_embedding_A")) \
            else "b"
        found.setdefault(m.group("module"), {})[part] = value
    missing = [f"{PREFIX}{mod}.{'lora_A' if p == 'a' else 'lora_B'}" for mod, pair in found.items()
               for p in "ab" if p not in pair]
    if unexpected or missing or not found:
        raise ValueError(f"adapter {folder} does not fit the base model {loaded.name!r}: unexpected keys "
                         f"{_few(unexpected)}; missing keys {_few(missing)}. Module names here look like "
                         f"{sorted(table)[:3]}; the adapter is for another model or its module names are misspelled.")
    _check_targeted(folder, config, found, loaded, table, flat_params)
    outside = _outside_layers(config, found)
    if outside:
        raise ValueError(f"adapter {folder}: layers_to_transform={config['layers_to_transform']} (layers_pattern="
                         f"{config.get('layers_pattern')!r}) leaves out {_few(outside)}"
                         f", whose tensors are here; "
                         f"PEFT would not apply them. Correct layers_to_transform in adapter_config.json, or remove "
                         f"those tensors")
    _check_complete(folder, config, found, loaded, table, flat_params)
    r0, alpha0 = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if tied:
        _check_tied(folder, config, tied, head, found, whole, loaded, flat_params)
    per_path: dict[str, dict[int | None, dict[str, np.ndarray]]] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for module, pair in found.items():
        path, layer = table[module]
        r = int(_pattern_value(rank_pattern, module, r0))
        alpha = float(_pattern_value(alpha_pattern, module, alpha0))
        lay = _layout(loaded, path, flat_params)
        _, fan_in, fan_out = lay.split(tuple(flat_params[path].shape))
        if lay.kind == "Conv":
            a, b = (x.astype(np.float32) for x in conv_from_peft(pair["a"], pair["b"], lay, module))
        else:
            a, b = pair["a"].T.astype(np.float32), pair["b"].T.astype(np.float32)
        if a.shape != (fan_in, r) or b.shape != (r // lay.groups, fan_out):
            raise ValueError(f"{module}: PEFT tensors have shapes A {pair['a'].shape} and B {pair['b'].shape}; "
                             f"the base kernel {module} is {fan_in} in x {fan_out} out at r={r}, so they "
                             f"should be A {(r, fan_in)} and B {(fan_out, r)}")
        if ranks.setdefault(path, r) != r or alphas.setdefault(path, alpha) != alpha:
            raise ValueError(f"{module}: a scanned layer stack needs one rank and alpha for all its layers; "
                             f"{path} has r {ranks[path]} vs {r}, alpha {alphas[path]} vs {alpha}: load the model "
                             f"with scan_layers=False (one module per layer)")
        per_path.setdefault(path, {})[layer] = {"a": a, "b": b}
        if "m" in pair:
            if pair["m"].shape != (fan_out,):
                raise ValueError(f"{module}: lora_magnitude_vector has shape {pair['m'].shape}; the kernel has "
                                 f"{fan_out} output features")
            per_path[path][layer]["m"] = pair["m"].astype(np.float32)
    if bool(config.get("use_dora")) != all("m" in pair for pair in found.values()):
        raise ValueError(f"adapter {folder}: use_dora={config.get('use_dora')} but lora_magnitude_vector tensors "
                         f"are present for {sum('m' in p for p in found.values())} of {len(found)} modules")
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
            out[path] = {k: np.stack([layers[i][k] for i in range(n)]) for k in layers[0]}
    full, saved_paths = _load_full(whole, params_table, flat_params, config, folder)
    cfg = _config_for(set(out), ranks, alphas, config, flat_params, saved_paths)
    nodes = {p: _node(parts, _layout(loaded, p, flat_params)) for p, parts in out.items()}
    adapters = tree_lib.unflatten({**nodes, **full})
    unwanted = sorted(p for p in full if not cfg.saves(p, flat_params))
    if unwanted:
        raise ValueError(f"adapter {folder} holds whole tensors {unwanted[:5]} that bias={cfg.bias!r} and "
                         f"modules_to_save={config.get('modules_to_save')} do not select")
    if note := _base_name_note(folder, config.get("base_model_name_or_path"), loaded):
        warnings.warn(note, BaseModelWarning, stacklevel=2)
    return adapters, cfg


class BaseModelWarning(UserWarning):
    """A PEFT adapter folder names another base model than the one it is loaded onto."""


# A Hugging Face cache folder: <cache>/models--<org>--<name>/snapshots/<commit>; its basename is a commit hash.
_HF_SNAPSHOT = re.compile(r"models--[^/]+--(?P<name>[^/]+)/snapshots/[^/]+$")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def _model_key(name: Any) -> str | None:
    """What names one base model across machines, or None when ``name`` does not say.

    The last component of a path or hub id (the model name in a Hugging Face cache path; a GGUF file's name
    without ``.gguf`` and its quantization tag), lowercased, letters and digits only. None for no name,
    ``"unknown"``, a bare commit hash (a cache snapshot folder's own name) or a free-form label with spaces (a
    GGUF's ``general.name``), which cannot be compared.

    Examples:
        >>> _model_key("HuggingFaceTB/SmolLM2-135M") == _model_key("/data/models/smollm2-135m/")
        True
        >>> _model_key("/hf/hub/models--Acme--Tiny-Chat-0.5B/snapshots/" + "a" * 40)
        'tinychat05b'
        >>> _model_key("/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        'smollm2135minstruct'
        >>> _model_key("Smollm2 135M 8k Lc100K Mix1 Ep2"), _model_key(None), _model_key("unknown")
        (None, None, None)
    """
    if not isinstance(name, str):
        return None
    text = name.strip().replace("\\", "/").rstrip("/")
    snapshot = _HF_SNAPSHOT.search(text)
    last = snapshot.group("name") if snapshot else text.rsplit("/", 1)[-1]
    if last.lower().endswith(".gguf"):
        from jlora import hf

        last = hf.gguf_model_name(last)
    if _COMMIT.fullmatch(last) or any(c.isspace() for c in last):
        return None
    key = re.sub(r"[^0-9a-z]", "", last.lower())
    return key if key and key != "unknown" else None


def base_model_note(folder, loaded) -> str | None:
    """What :func:`load` warns (:class:`BaseModelWarning`) of the PEFT folder ``folder`` loaded onto ``loaded``, or
    None: for callers that pass it on, as a server's reply to the client that loaded the adapter."""
    folder = pathlib.Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    return _base_name_note(folder, config.get("base_model_name_or_path") if isinstance(config, dict) else None,
                           loaded)


def _base_name_note(folder: pathlib.Path, recorded: Any, loaded) -> str | None:
    """The warning when the adapter's ``base_model_name_or_path`` and the model it is loaded onto (its name, the
    ``_name_or_path`` in its config, or the folder or file it was read from) clearly name different models
    (:func:`_model_key`): none of the three matches.
    Same-shaped models (a base and its instruct variant) load each other's adapters without an error, but the
    adapter was trained for one of them. Paths differ between machines, so only the final names are compared, and
    nothing is said when either side is unknown."""
    want = _model_key(recorded)
    names = [getattr(loaded, "name", None), (getattr(loaded, "hf_config", None) or {}).get("_name_or_path"),
             getattr(loaded, "source", None)]
    have = {k for k in map(_model_key, names) if k is not None}
    if want is None or not have or want in have:
        return None
    onto = names[2] or names[0]
    return (f"adapter {folder} was trained on base model {recorded!r} (base_model_name_or_path in its "
            f"{CONFIG_FILE}), but it is loaded onto {onto!r}: same-shaped models load each other's adapters, yet it "
            f"works as trained only on its own base. Load {recorded!r}, or ignore this if both name the same weights")


def _check_base_copy(folder, key: str, value: np.ndarray, name: str, loaded, flat_params) -> None:
    """Checks ``value``, PEFT's copy of the base weight ``name`` (``save_embedding_layers``), against the base."""
    path, layer, perm = _param_table(loaded)[name]
    base = _torch(np.asarray(flat_params[path] if layer is None else flat_params[path][layer], np.float32), perm)
    value = value.astype(np.float32)
    if value.shape != base.shape or not np.allclose(value, base, rtol=1e-2, atol=1e-5):
        diff = f"shape {value.shape} vs {base.shape}" if value.shape != base.shape else \
            f"max |diff| {np.abs(value - base).max():.3g}"
        raise ValueError(f"adapter {folder} holds {key}, PEFT's copy of the base weight (save_embedding_layers), "
                         f"and it differs from {name} of the base model {loaded.name!r} ({diff}): the adapter was "
                         f"trained on another base model or with resized embeddings; load it onto that base")


def _check_tied(folder, config, tied: str, head: dict, found: dict, whole: dict, loaded, flat_params) -> None:
    """Checks that an adapter of a tied embedding adapts the tied head as jlora does (one matrix for both).

    ``head`` holds the folder's ``lm_head.*`` tensors, which PEFT's ``ensure_weight_tying=True`` writes as copies of
    the embedding's: they must be those copies. With ``ensure_weight_tying`` false (PEFT's default) PEFT adapts the
    input lookup only, and the head keeps the base weights: jlora's tied model cannot do that, so it raises.
    """
    untie = ("load the adapter onto an untied copy of the base instead (in transformers: `model.lm_head.weight = "
             "torch.nn.Parameter(model.lm_head.weight.clone()); model.config.tie_word_embeddings = False; "
             "model.save_pretrained(folder)`)")
    if "base_layer.weight" in head:
        _check_base_copy(folder, f"{HEAD}.base_layer.weight", head.pop("base_layer.weight"), f"{tied}.weight",
                         loaded, flat_params)
    lora = found.get(tied, {})
    copies = {"lora_A.weight": lora.get("b"), "lora_B.weight": lora.get("a"), "weight": whole.get(f"{tied}.weight")}
    alpha = {m: float(_pattern_value(config.get("alpha_pattern") or {}, m, config.get("lora_alpha", 8)))
             for m in (tied, HEAD)}
    for part, value in sorted(head.items()):
        want = copies.get(part)
        want = want if want is None or part == "weight" else want.T
        if want is None or value.shape != want.shape or not np.array_equal(value, want) or \
                (part != "weight" and alpha[tied] != alpha[HEAD]):
            raise ValueError(f"adapter {folder} holds {HEAD}.{part}, which is not the tied copy of {tied}'s "
                             f"{'whole weight' if part == 'weight' else 'adapter'} (PEFT's ensure_weight_tying): "
                             f"the base model {loaded.name!r} ties {HEAD} to {tied}, one matrix, so jlora cannot "
                             f"give the head a{'n adapter' if part != 'weight' else ' weight'} of its own; {untie}")
    honoured = tied.rsplit(".", 1)[-1] in PEFT_TIE_NAMES   # the names for which PEFT honours ensure_weight_tying
    ensure = config.get("ensure_weight_tying", False)
    if (tied in found or f"{tied}.weight" in whole) and not (head or (ensure is True and honoured)):
        fix = (f"Retrain it in PEFT with `LoraConfig(ensure_weight_tying=True, ...)` and {HEAD!r} beside {tied!r} "
               f"in its target_modules (or modules_to_save), which PEFT then ties; or {untie}" if honoured else
               f"PEFT ties adapters only for modules named {' and '.join(map(repr, PEFT_TIE_NAMES))}, so no PEFT "
               f"setting ties {tied!r}'s adapter to the head: {untie}")
        ignored = " (which PEFT ignores for this module name)" if ensure is True and not honoured else ""
        raise ValueError(f"adapter {folder} trains {tied}, to which the base model {loaded.name!r} ties {HEAD}, "
                         f"with ensure_weight_tying={ensure}{ignored}: PEFT then changes the input lookup only and "
                         f"the output head keeps the base weights, which jlora's tied model (one matrix for both) "
                         f"cannot reproduce. {fix}")


def _layout(loaded, path: str, flat_params) -> KernelLayout:
    """How the kernel at ``path`` is read: (in, out) per layer for jlora's own families (a scanned stack leading)."""
    if isinstance(loaded, TorchModel):
        return loaded.kernel_layout(path)
    kind = "Embed" if path.endswith("embedding") else "Dense"
    return KernelLayout(kind, (0,), (1,), flat_params[path].ndim - 2)


def _node(parts: dict[str, np.ndarray], layout: KernelLayout) -> Adapter:
    """An adapter of the loaded factors (and DoRA magnitude) for a kernel read as ``layout``."""
    extras = {k: v for k, v in parts.items() if k not in ("a", "b")}
    return Adapter(parts["a"], parts["b"], extras, layout=layout, variant="dora" if extras else "lora")


def _load_full(whole: dict[str, np.ndarray], params_table, flat_params, config, folder):
    """Whole tensors (bias, modules_to_save) in jlora layout; and the param paths of the modules to save."""
    per_path: dict[str, dict[int | None, np.ndarray]] = {}
    saved_modules = [str(m) for m in (config.get("modules_to_save") or [])]
    saved_paths = set()
    for name, value in whole.items():
        path, layer, perm = params_table[name]
        want = tuple(flat_params[path].shape)[(0 if layer is None else 1):]
        torch_shape = want if perm is None else tuple(want[i] for i in perm)
        if value.shape != torch_shape:
            raise ValueError(f"{name}: PEFT tensor has shape {value.shape}; the base parameter needs {torch_shape}")
        v = value if perm is None else value.transpose(np.argsort(perm))
        per_path.setdefault(path, {})[layer] = v.astype(np.float32)
        parts = name.split(".")[:-1]                          # the tensor's module and the modules holding it
        holders = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
        if any(h.endswith(m) for h in holders for m in saved_modules):   # PEFT's rule: plain suffix, no dot boundary
            saved_paths.add(path)
    out = {}
    for path, layers in per_path.items():
        if None in layers:
            out[path] = layers[None]
            continue
        n = flat_params[path].shape[0]
        if sorted(layers) != list(range(n)):
            raise ValueError(f"{path}: adapter {folder} trains this tensor in layers {sorted(layers)} of a scanned "
                             f"stack of {n}; load the model with scan_layers=False")
        out[path] = np.stack([layers[i] for i in range(n)])
    return out, saved_paths


def _config_for(paths: set[str], ranks, alphas, config, flat_params, saved_paths=()) -> LoraConfig:
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
        alpha_pattern={rf"^{re.escape(p)}$": v for p, v in sorted(alphas.items()) if v != alpha},
        use_dora=bool(config.get("use_dora", False)), bias=config.get("bias") or "none",
        modules_to_save=tuple(sorted({rf"^{re.escape(p.rsplit('/', 1)[0])}/" for p in saved_paths})))
