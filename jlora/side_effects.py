"""Side effects of a fine-tune: what the adapters changed, on the task and on text that is not the task.

:func:`evaluate` runs the base model and the adapted model (the same params, with and without the adapters) side
by side and returns a JSON-able report:

* **task** (the validation data): next-token loss on the completion tokens, base and adapted; with a scorer,
  the score of greedy completions of the task prompts, base and adapted.
* **general** (held-out text that is not the task, e.g. ``examples/data/general.jsonl``): per token, the KL
  divergence ``KL(base || adapted)`` of the next-token distributions (nats), the share of positions where both
  models rank the same token first (top-1 agreement), the base model's own loss on the text and the adapted
  model's (their difference is how much of the base's language modelling was lost or gained); and the share of
  general prompts whose greedy continuation is token for token the same.
* **intruders** (optional, ``intruders=True``): per adapted kernel, how many of the adapted weight's top singular
  vectors are far from every singular vector of the base weight (the "intruder dimensions" of Shuttleworth et
  al., 2024): :func:`intruder_dimensions`.

Every figure is computed in fp32 from both models' logits on the same tokens; a zero adapter (a fresh one has
B = 0) gives exactly 0 KL, 100% agreement, 0 loss change and 100% identical continuations. :func:`summary`
renders the report in two lines, :func:`plot` draws it (when matplotlib is installed), :func:`save` writes both.

The pieces are separate functions for callers that have some figures already: :func:`token_stats` (KL, top-1,
losses over batches), :func:`continuations` (greedy decoding, base and adapted), :func:`task_score`.

Cost: two forward passes per text, and two greedy decodings per prompt (``max_new_tokens`` steps each, batched,
one compilation per model); :func:`load_general` takes ``limit`` to keep it to a few hundred texts.

Examples:
    >>> report = {"task": {"loss_base": 2.0, "loss_adapted": 0.5, "metric": "exact JSON", "score_base_pct": 0.0,
    ...                    "score_adapted_pct": 84.0},
    ...           "general": {"kl": 0.0213, "top1_agreement_pct": 96.41, "loss_base": 3.0, "loss_adapted": 3.05,
    ...                       "loss_change": 0.05, "identical_continuations_pct": 62.5, "prompts": 40}}
    >>> print(summary(report))
    task: exact JSON 0.0% -> 84.0%, loss 2.000 -> 0.500 nats/token
    general prompts: KL 0.0213 nats/token, top-1 agreement 96.4%, loss +0.050 nats/token, 62.5% of 40 continuations unchanged
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import adapter as adapter_lib
from jlora import data as data_lib
from jlora import lora as lora_lib
from jlora import transform
from jlora import tree as tree_lib
from jlora.config import LoraConfig
from jlora.loss import shifted_targets

REPORT_FILE = "side_effects.json"
PLOT_FILE = "side_effects.png"
_MODEL_INPUTS = ("attention_mask", "positions", "segment_ids")


# ------------------------------------------------------------------------------------------------ general set

@dataclasses.dataclass(frozen=True)
class GeneralSet:
    """Held-out general text, tokenized: ``texts`` for the token-level figures, ``prompts`` for continuations.

    Attributes:
        texts: one :class:`jlora.data.Example` per record, every token after the first a target (the whole text,
            prompt and completion, is scored).
        prompts: each record's prompt ids, to continue greedily.
        sources: ``file:line`` of each record.
    """

    texts: tuple[data_lib.Example, ...]
    prompts: tuple[tuple[int, ...], ...]
    sources: tuple[str, ...]


def load_general(path: str | pathlib.Path, tokenizer, *, chat: bool = False, max_length: int = 256,
                 limit: int | None = None) -> GeneralSet:
    """Reads a general set (JSONL ``{"prompt", "completion"}`` pairs or chats) and tokenizes it.

    Args:
        path: the JSONL file, e.g. :data:`jlora.resources.GENERAL`, jlora's own general set (shipped in the
            package; the repository's ``examples/data/general.jsonl`` is the same file).
        tokenizer: the model's tokenizer (:attr:`jlora.hf.Loaded.tokenizer`).
        chat: wrap each pair as a user turn and an assistant turn, so the tokenizer's chat template formats it
            (measure a chat model as it is used); False scores the raw text.
        max_length: longer texts are truncated to this many tokens.
        limit: use the first ``limit`` records only.

    Returns:
        A :class:`GeneralSet`.
    """
    records = data_lib.read_jsonl(path)[:limit]
    if chat:
        records = [r if "messages" in r else {"messages": [{"role": "user", "content": r["prompt"].strip()},
                                                           {"role": "assistant", "content": r["completion"].strip()}]}
                   for r in records]
    sources = [f"{path}:{i + 1}" for i in range(len(records))]
    examples = data_lib.tokenize_all(records, tokenizer, max_length=max_length, overflow="truncate",
                                     sources=sources, check_boundaries=False)
    texts = tuple(data_lib.Example((), ex.input_ids, ex.source) for ex in examples)
    return GeneralSet(texts, tuple(ex.prompt_ids for ex in examples), tuple(ex.source for ex in examples))


# ------------------------------------------------------------------------------------------------ token figures

@functools.partial(jax.jit, static_argnames=("model", "lora_cfg"))
def _batch_stats(base_params, params, adapters, batch, *, model, lora_cfg):
    """Per row: sums over the target positions of KL(base||adapted), top-1 agreement, both NLLs; and the count."""
    ids = batch["input_ids"]
    kwargs = {k: batch[k] for k in _MODEL_INPUTS if k in batch}
    # the base also runs through the transform (with no adapters), so quantized kernels work
    base = transform.apply(model, base_params, {}, lora_cfg, ids, **kwargs).astype(jnp.float32)
    adapted = transform.apply(model, params, adapters, lora_cfg, ids, **kwargs).astype(jnp.float32)
    targets, weights = shifted_targets(ids, batch.get("loss_mask", batch.get("attention_mask")))
    lp, lq = jax.nn.log_softmax(base, axis=-1), jax.nn.log_softmax(adapted, axis=-1)
    kl = jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)
    agree = (jnp.argmax(base, axis=-1) == jnp.argmax(adapted, axis=-1)).astype(jnp.float32)
    nll_base = -jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
    nll_adapted = -jnp.take_along_axis(lq, targets[..., None], axis=-1)[..., 0]
    return {k: jnp.sum(v * weights, axis=1) for k, v in
            (("kl", kl), ("agree", agree), ("nll_base", nll_base), ("nll_adapted", nll_adapted),
             ("tokens", jnp.ones_like(kl)))}


def batches(examples: Sequence[data_lib.Example], *, batch_size: int = 8, pad_id: int = 0):
    """Batches of ``examples`` in order for :func:`token_stats`, all of one shape (one compilation): rows padded
    to the longest example rounded up to 16 tokens, the last batch filled with empty rows."""
    width = max(16, -(-max(len(ex) for ex in examples) // 16) * 16)   # all empty: token_stats says so
    return data_lib.Loader(examples, batch_size=batch_size, max_length=width, pad_id=pad_id, shuffle=False,
                           drop_last=False, epochs=1, bucket=None)


def token_stats(model, params, adapters, lora_cfg: LoraConfig, examples: Sequence[data_lib.Example], *,
                base_params=None, batch_size: int = 8, pad_id: int = 0) -> dict[str, Any]:
    """Next-token figures of the base and the adapted model on ``examples`` (their ``loss_mask`` targets).

    Args:
        model: a jlora model (or any Linen LM taking ``input_ids`` and ``attention_mask``).
        params: the params the adapters run on.
        adapters, lora_cfg: the adapters and their config.
        examples: tokenized examples; a position counts where the next token is a target of its loss mask.
        base_params: the base model's params when they differ from ``params`` (PiSSA/OLoRA train on a residual
            base: pass the original weights here).
        batch_size: rows per forward pass.
        pad_id: the id written on padding (masked out).

    Returns:
        ``{"texts", "tokens", "kl", "top1_agreement_pct", "loss_base", "loss_adapted", "loss_change",
        "per_text_kl"}``: means per target token (KL and losses in nats), and the mean KL of each text that has a
        target token (a text of one token has none, and is left out there).
    """
    if not examples:
        raise ValueError("no examples to evaluate")
    base_params = params if base_params is None else base_params
    sums = {k: 0.0 for k in ("kl", "agree", "nll_base", "nll_adapted", "tokens")}
    per_text = []
    for batch in batches(examples, batch_size=batch_size, pad_id=pad_id):
        real = batch["attention_mask"].sum(axis=1) > 0
        out = jax.device_get(_batch_stats(base_params, params, adapters, {k: jnp.asarray(v) for k, v in
                                                                          batch.items()},
                                          model=model, lora_cfg=lora_cfg))
        for k in sums:
            sums[k] += float(np.sum(np.asarray(out[k], np.float64)))
        per_text += [float(k / n) for k, n, r in zip(out["kl"], out["tokens"], real) if r and n > 0]
    if not sums["tokens"]:   # every figure would be 0/0
        raise ValueError(f"none of the {len(examples)} examples has a target token (a position whose next token "
                         f"its loss mask keeps), so there is nothing to compare: give texts of two tokens or more")
    n = sums["tokens"]
    loss_base, loss_adapted = sums["nll_base"] / n, sums["nll_adapted"] / n
    return {"texts": len(examples), "tokens": int(sums["tokens"]), "kl": sums["kl"] / n,
            "top1_agreement_pct": 100.0 * sums["agree"] / n, "loss_base": loss_base, "loss_adapted": loss_adapted,
            "loss_change": loss_adapted - loss_base, "per_text_kl": per_text}


# ------------------------------------------------------------------------------------------------ generation

def _greedy(model, variables, prompts, *, apply_fn, max_new_tokens, eos_token_id, pad_token_id, batch_size):
    """Greedy continuations (token lists up to and including an end token), one compilation for all batches."""
    from jlora.models import generate as gen

    width = -(-max(len(p) for p in prompts) // 16) * 16
    rows = min(batch_size, len(prompts))
    pad = 0 if pad_token_id is None else int(pad_token_id)
    out = []
    for i in range(0, len(prompts), rows):
        chunk = [list(p) for p in prompts[i:i + rows]]
        ids = np.full((rows, width), pad, np.int32)
        mask = np.zeros((rows, width), np.int32)
        for r, p in enumerate(chunk):
            ids[r, width - len(p):], mask[r, width - len(p):] = p, 1
        mask[len(chunk):, -1] = 1   # filler rows: one token, discarded
        res = gen.generate(model, variables, ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                           eos_token_id=eos_token_id, pad_token_id=pad_token_id, apply_fn=apply_fn)
        out += res.to_lists()[:len(chunk)]
    return out


def continuations(model, params, adapters, lora_cfg: LoraConfig, prompts: Sequence[Sequence[int]], *,
                  base_params=None, max_new_tokens: int = 32, eos_token_id=None, pad_token_id=None,
                  batch_size: int = 16) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy continuations of ``prompts`` by the base model and by the adapted model (token lists).

    ``eos_token_id``/``pad_token_id`` default to the model config's (see :func:`jlora.models.generate.generate`).
    """
    from jlora.models import generate as gen

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("`prompts` must be a non-empty list of non-empty token lists")
    base_params = params if base_params is None else base_params
    opts = dict(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                batch_size=batch_size)
    apply_fn = gen.lora_apply_fn(model, lora_cfg)   # the base runs with no adapters (quantized kernels work)
    base = _greedy(model, (base_params, {}), prompts, apply_fn=apply_fn, **opts)
    adapted = _greedy(model, (params, adapters), prompts, apply_fn=apply_fn, **opts)
    return base, adapted


def _same_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def continuation_stats(base: Sequence[Sequence[int]], adapted: Sequence[Sequence[int]], *,
                       decode: Callable[[Sequence[int]], str] | None = None,
                       prompts: Sequence[Sequence[int]] | None = None, examples: int = 3) -> dict[str, Any]:
    """How many continuations stayed the same, and how long they agree.

    Returns:
        ``{"prompts", "identical_continuations_pct", "mean_common_prefix"}`` (tokens both continuations share
        from the start, on average) and, with ``decode``, ``"examples"``: the first ``examples`` prompts whose
        continuations differ, decoded.

    Examples:
        >>> continuation_stats([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 6]])
        {'prompts': 2, 'identical_continuations_pct': 50.0, 'mean_common_prefix': 2.0}
    """
    same = [list(a) == list(b) for a, b in zip(base, adapted, strict=True)]
    if not same:
        raise ValueError("no continuations to compare: give at least one prompt")
    out: dict[str, Any] = {"prompts": len(same), "identical_continuations_pct": 100.0 * sum(same) / len(same),
                           "mean_common_prefix": float(np.mean([_same_prefix(a, b) for a, b in zip(base, adapted)]))}
    if decode is not None:
        differ = [i for i, s in enumerate(same) if not s][:examples]
        out["examples"] = [{"prompt": decode(prompts[i]) if prompts is not None else None,
                            "base": decode(base[i]), "adapted": decode(adapted[i])} for i in differ]
    return out


def task_score(base: Sequence[Sequence[int]], adapted: Sequence[Sequence[int]], targets: Sequence[str],
               scorer: Callable[[str, str], bool | float], decode: Callable[[Sequence[int]], str]) -> dict[str, Any]:
    """The mean score (%) of the base and the adapted completions against the references.

    ``scorer(output, target)`` returns True/False or a number in [0, 1] (:mod:`jlora.cli.scoring`'s convention);
    its ``label`` attribute, if any, names the metric.

    Examples:
        >>> exact = lambda out, target: out.strip() == target
        >>> task_score([[1], [2]], [[3], [2]], ["3", "2"], exact, decode=lambda ids: str(ids[0]))
        {'metric': '<lambda>', 'prompts': 2, 'score_base_pct': 50.0, 'score_adapted_pct': 100.0}
    """
    def mean(outputs):
        scores = [float(scorer(decode(o), t)) for o, t in zip(outputs, targets, strict=True)]
        bad = [s for s in scores if not 0.0 <= s <= 1.0]
        if bad:
            raise ValueError(f"the scorer returned {bad[0]!r}; a scorer returns True/False or a number in [0, 1]")
        return 100.0 * sum(scores) / len(scores)

    if not targets:
        raise ValueError("no task prompts to score: give at least one prompt and its reference")
    label = getattr(scorer, "label", None) or getattr(scorer, "__name__", "score")
    return {"metric": label, "prompts": len(targets), "score_base_pct": mean(base), "score_adapted_pct": mean(adapted)}


# ------------------------------------------------------------------------------------------------ intruders

def _as_matrices(w: jax.Array, lay) -> jax.Array:
    """A kernel as ``(layers, in, out)`` matrices, following its layout."""
    per_layer = w.shape[lay.lead:]
    w = jnp.transpose(w, (*range(lay.lead), *(lay.lead + i for i in lay.in_axes),
                          *(lay.lead + i for i in lay.out_axes)))
    fan_in = math.prod(per_layer[i] for i in lay.in_axes)
    return w.reshape(-1, fan_in, math.prod(per_layer[i] for i in lay.out_axes))


def intruder_dimensions(params, adapters, lora_cfg: LoraConfig, *, top_k: int = 10, threshold: float = 0.5,
                        base_params=None) -> dict[str, Any]:
    """Counts the adapted weights' "intruder dimensions": top singular vectors unlike any of the base weight's.

    For every adapted kernel (each layer of a stack alone), the output-space singular vectors of the base
    weight ``W`` and of the merged weight ``W'`` are computed (the thin SVD: ``min(in, out)`` of them, so that a
    wide matrix's null space, whose basis is arbitrary, plays no part); each of the ``top_k`` leading singular
    vectors of ``W'`` whose largest absolute cosine similarity with all singular vectors of ``W`` is below
    ``threshold`` is an intruder (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
    2024, report them in LoRA fine-tunes, more at low rank, and rarely after full fine-tuning). A zero adapter has
    none.

    Args:
        params, adapters, lora_cfg: the fine-tune (``W'`` is ``params`` with the adapters merged).
        top_k: how many of ``W'``'s leading singular vectors to test (>= 1).
        threshold: the cosine similarity in (0, 1] below which one is an intruder.
        base_params: the weights ``W`` to compare with, if not ``params`` (PiSSA/OLoRA: the original weights,
            since their adapters run on a residual base).

    Returns:
        ``{"top_k", "threshold", "matrices", "total", "per_path": {path: count summed over layers}}``.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1 (the leading singular vectors tested), got {top_k!r}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be a cosine similarity in (0, 1], got {threshold!r}")
    lora_lib.check_fits(params, adapters, lora_cfg)
    flat = tree_lib.flatten(params)
    flat_base = flat if base_params is None else tree_lib.flatten(base_params)
    per_path, matrices = {}, 0
    for path, node in adapter_lib.adapter_items(adapters):
        shape = tuple(flat[path].shape)
        lay = node.layout.fitted(shape) if node.layout is not None else lora_lib.default_layout(path, shape)
        dense, scale = lora_lib.dense_value(flat[path]), lora_cfg.scale(path)
        hook = adapter_lib.variant(node.variant).merged   # DoRA's merge; a quantized kernel is not re-encoded
        merged = (hook(dense, node, scale) if hook is not None
                  else dense + lora_lib.delta(node, scale, shape, lay, dtype=jnp.float32))
        base = dense if base_params is None else lora_lib.dense_value(flat_base[path])
        if base.shape != dense.shape:
            raise ValueError(f"base_params at {path!r} has shape {tuple(base.shape)}, the params "
                             f"{tuple(dense.shape)}: pass the base the adapters were made from")
        w0, w1 = _as_matrices(base, lay), _as_matrices(merged, lay)
        # output-space singular vectors: the rows of Vh of the (in, out) matrix
        v0 = jnp.linalg.svd(w0, full_matrices=False)[2]
        v1 = jnp.linalg.svd(w1, full_matrices=False)[2][:, :top_k]
        best = jnp.max(jnp.abs(jnp.einsum("lko,ljo->lkj", v1, v0)), axis=-1)
        per_path[path] = int(jnp.sum(best < threshold))
        matrices += w0.shape[0]
    return {"top_k": top_k, "threshold": threshold, "matrices": matrices, "total": sum(per_path.values()),
            "per_path": per_path}


# ------------------------------------------------------------------------------------------------ the report

def evaluate(model, params, adapters, lora_cfg: LoraConfig, *, general: Sequence[data_lib.Example] | GeneralSet,
             general_prompts: Sequence[Sequence[int]] | None = None, task: Sequence[data_lib.Example] = (),
             task_prompts: Sequence[Any] = (), scorer: Callable[[str, str], bool | float] | None = None,
             decode: Callable[[Sequence[int]], str] | None = None, base_params=None, batch_size: int = 8,
             max_new_tokens: int = 32, eos_token_id=None, pad_token_id=None, intruders: bool = False,
             intruder_top_k: int = 10, intruder_threshold: float = 0.5) -> dict[str, Any]:
    """The side-effect report: base vs adapted model on the task and on general text (see the module docstring).

    Args:
        model: a jlora model (:attr:`jlora.hf.Loaded.model`).
        params: the params the adapters run on.
        adapters, lora_cfg: the fine-tune.
        general: general text, a :class:`GeneralSet` (:func:`load_general`) or tokenized examples (their loss
            masks say which tokens count).
        general_prompts: prompts to continue greedily (default: ``general.prompts`` of a :class:`GeneralSet`;
            none: no continuation figure).
        task: the task's tokenized validation examples (completion tokens are the targets); empty: no task loss.
        task_prompts: the task's eval prompts (:class:`jlora.data.EvalPrompt`: ``prompt_ids`` and ``target``),
            scored with ``scorer`` when one is given.
        scorer: ``scorer(output, target) -> bool | float in [0, 1]`` (e.g. :func:`jlora.cli.scoring.load`'s).
        decode: token ids -> text (``tokenizer.decode`` skipping special tokens); needed with ``scorer``, and
            adds decoded examples of changed continuations to the report.
        base_params: the base model's params if not ``params`` (PiSSA/OLoRA: the original weights).
        batch_size: rows per forward pass and per decoding batch.
        max_new_tokens: length of the greedy continuations and task completions.
        eos_token_id, pad_token_id: for decoding; default the model config's.
        intruders: also count intruder dimensions (an SVD of every adapted kernel, base and merged).
        intruder_top_k, intruder_threshold: see :func:`intruder_dimensions`.

    Returns:
        A JSON-able dict with ``"general"``, and ``"task"`` / ``"intruders"`` when asked for: see
        :func:`token_stats`, :func:`continuation_stats`, :func:`task_score`, :func:`intruder_dimensions`.
    """
    texts = general.texts if isinstance(general, GeneralSet) else general
    if general_prompts is None and isinstance(general, GeneralSet):
        general_prompts = general.prompts
    pad = 0 if pad_token_id is None else int(pad_token_id)
    opts = dict(base_params=base_params)
    gen_opts = dict(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                    batch_size=batch_size, **opts)
    report: dict[str, Any] = {}
    report["general"] = token_stats(model, params, adapters, lora_cfg, texts, batch_size=batch_size, pad_id=pad,
                                    **opts)
    if general_prompts:
        base, adapted = continuations(model, params, adapters, lora_cfg, general_prompts, **gen_opts)
        report["general"].update(continuation_stats(base, adapted, decode=decode, prompts=general_prompts))
        report["general"]["max_new_tokens"] = max_new_tokens
    if task or (task_prompts and scorer is not None):
        report["task"] = {}
    if task:
        stats = token_stats(model, params, adapters, lora_cfg, task, batch_size=batch_size, pad_id=pad, **opts)
        stats.pop("per_text_kl")
        report["task"].update({"examples": stats.pop("texts"), **stats})
    if task_prompts and scorer is not None:
        if decode is None:
            raise ValueError("scoring task completions needs `decode` (e.g. lambda ids: "
                             "tokenizer.decode(ids, skip_special_tokens=True))")
        base, adapted = continuations(model, params, adapters, lora_cfg, [p.prompt_ids for p in task_prompts],
                                      **gen_opts)
        report["task"].update(task_score(base, adapted, [p.target for p in task_prompts], scorer, decode))
    if intruders:
        report["intruders"] = intruder_dimensions(params, adapters, lora_cfg, top_k=intruder_top_k,
                                                  threshold=intruder_threshold, base_params=base_params)
    return report


def summary(report: Mapping[str, Any]) -> str:
    """Two lines: the task (score and loss, base -> adapted) and the general prompts (KL, top-1 agreement, the
    change in loss on general text, the share of greedy continuations that stayed the same)."""
    task, general = report.get("task") or {}, report.get("general") or {}
    parts = []
    if "score_base_pct" in task:
        parts.append(f"{task['metric']} {task['score_base_pct']:.1f}% -> {task['score_adapted_pct']:.1f}%")
    if "loss_base" in task:
        parts.append(f"loss {task['loss_base']:.3f} -> {task['loss_adapted']:.3f} nats/token")
    lines = ["task: " + (", ".join(parts) if parts else "not measured")]
    parts = [f"KL {general['kl']:.4f} nats/token", f"top-1 agreement {general['top1_agreement_pct']:.1f}%",
             f"loss {general['loss_change']:+.3f} nats/token"]
    if "identical_continuations_pct" in general:
        parts.append(f"{general['identical_continuations_pct']:.1f}% of {general['prompts']} continuations "
                     f"unchanged")
    lines.append("general prompts: " + ", ".join(parts))
    return "\n".join(lines)


def plot(report: Mapping[str, Any], path: str | pathlib.Path) -> pathlib.Path | None:
    """Draws the report (per-text KL on general text; base vs adapted loss and score) to ``path``.

    Returns the path, or None when matplotlib is not installed. The figure is drawn on its own
    ``matplotlib.figure.Figure``, without pyplot: matplotlib's global state (the backend a notebook or an application
    chose, pyplot's current figures) is left as it was.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    task, general = report.get("task") or {}, report["general"]
    fig = Figure(figsize=(10, 3.8))
    left, right = fig.subplots(1, 2)
    kl = np.asarray(general.get("per_text_kl") or [general["kl"]], np.float64)
    left.hist(kl, bins=min(30, max(5, len(kl) // 5)), color="tab:blue")
    left.axvline(general["kl"], color="k", linestyle="--", label=f"mean per token {general['kl']:.4f}")
    left.set_xlabel("KL(base || adapted), nats/token, per general text")
    left.set_ylabel("texts")
    left.legend()
    groups = [("general text\nloss", general["loss_base"], general["loss_adapted"])]
    if "loss_base" in task:
        groups.insert(0, ("task\nloss", task["loss_base"], task["loss_adapted"]))
    x = np.arange(len(groups))
    right.bar(x - 0.2, [g[1] for g in groups], 0.4, label="base")
    right.bar(x + 0.2, [g[2] for g in groups], 0.4, label="adapted")
    right.set_xticks(x, [g[0] for g in groups])
    right.set_ylabel("nats/token")
    title = f"general text: top-1 agreement {general['top1_agreement_pct']:.1f}%"
    if "score_base_pct" in task:
        title = f"{task['metric']}: {task['score_base_pct']:.0f}% -> {task['score_adapted_pct']:.0f}%; " + title
    right.set_title(title, fontsize=9)
    right.legend()
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=100)      # PNG through matplotlib's Agg canvas, whatever the session's backend
    return path


def save(report: Mapping[str, Any], folder: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """Writes ``side_effects.json`` (and ``side_effects.png`` when matplotlib is installed) into ``folder``."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {"report": folder / REPORT_FILE}
    out["report"].write_text(json.dumps(report, indent=2) + "\n")
    picture = plot(report, folder / PLOT_FILE)
    if picture is not None:
        out["plot"] = picture
    return out


__all__ = ["GeneralSet", "load_general", "evaluate", "token_stats", "batches", "continuations",
           "continuation_stats", "task_score", "intruder_dimensions", "summary", "plot", "save", "REPORT_FILE",
           "PLOT_FILE"]
