"""Reading Hugging Face ``config.json`` dicts: the pieces every family's ``config_from_hf`` shares.

Each family knows every attribute it reads (``HANDLED``), deliberately ignores (its own set plus
:data:`IGNORED`, the bookkeeping and generation defaults every ``PretrainedConfig`` may carry) or accepts only at
one value (``MUST_BE_DEFAULT``), and :func:`check_attrs` raises on anything else set to a non-default value,
naming it, so that loading never silently computes something other than transformers does.

Examples:
    >>> eos_ids([2, 7]), eos_ids(5), eos_ids(None)
    ((2, 7), (5,), ())
    >>> hf_dtype({"torch_dtype": "torch.bfloat16"})
    'bfloat16'
    >>> check_attrs({"model_type": "x", "use_cache": True}, {"model_type"}, IGNORED, {}, "x")
    >>> check_attrs({"model_type": "x", "rope_gamma": 2}, {"model_type"}, IGNORED, {}, "x")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: x config.json sets attributes jlora does not implement: rope_gamma=2 (unknown to jlora). ...
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

# Attributes with no effect on any family's forward pass: PretrainedConfig bookkeeping and generation defaults.
IGNORED = frozenset({
    "architectures", "transformers_version", "_name_or_path", "use_cache", "auto_map",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "finetuning_task", "id2label", "label2id", "num_labels",
    "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params", "problem_type",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "output_router_logits",
    "attn_implementation", "_attn_implementation_autoset", "use_return_dict", "quantization_config_ignored",
    "_attn_implementation", "_num_labels", "gradient_checkpointing", "output_past", "xla_device",
})


def check_attrs(d: Mapping[str, Any], handled: Collection[str], ignored: Collection[str],
                must_be_default: Mapping[str, Any], model_type: str) -> None:
    """Raises a ValueError naming every attribute of ``d`` that jlora would not honor.

    Args:
        d: the parsed config.json.
        handled: attributes the family's ``config_from_hf`` reads.
        ignored: attributes with no effect on the forward pass.
        must_be_default: attributes of features jlora does not implement, with the one value it accepts
            (None is accepted too).
        model_type: named in the error.
    """
    bad = []
    for key, value in d.items():
        if key in must_be_default:
            if value is not None and value != must_be_default[key]:
                bad.append(f"{key}={value!r} (only {must_be_default[key]!r} is implemented)")
        elif key not in handled and key not in ignored and value is not None:
            bad.append(f"{key}={value!r} (unknown to jlora)")
    if bad:
        raise ValueError(f"{model_type} config.json sets attributes jlora does not implement: {'; '.join(bad)}. "
                         f"Loading would silently compute something else than transformers; remove the attribute "
                         f"if it has no effect on the model, or use a supported model.")


def hf_dtype(d: Mapping[str, Any]) -> str | None:
    """The checkpoint dtype config.json names (``dtype`` in transformers 5, ``torch_dtype`` in 4.x), or None."""
    value = d.get("dtype", d.get("torch_dtype"))
    return None if value is None else str(value).removeprefix("torch.")


def eos_ids(value: Any) -> tuple[int, ...]:
    """``eos_token_id`` (HF allows None, an int or a list) as a tuple of ints."""
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


__all__ = ["IGNORED", "check_attrs", "hf_dtype", "eos_ids"]
