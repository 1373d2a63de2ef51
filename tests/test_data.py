"""jlora.data: formatting and loss masks checked by decoding the masked tokens and comparing text (with a tiny
BPE trained here and with SmolLM2's real tokenizer), batching/packing invariants, seeded order, exact resume,
error messages, eval prompts, and the demo data set's token lengths (and its answers, under the demo's scorer)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jlora import data
from jlora.cli import scoring
from jlora.hf.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DATA = os.path.join(ROOT, "examples", "data")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PLAIN = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}assistant: {% endif %}")
CHAT = {"messages": [{"role": "system", "content": "Reply in JSON."},
                     {"role": "user", "content": "Pay Ana 12 euros in Oslo."},
                     {"role": "assistant", "content": '{"name":"Ana","amount":12}'}]}
PAIR = {"prompt": "Question: what is 2+2?\nAnswer:", "completion": " 4, of course."}


def _backend():
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [json.dumps(CHAT), json.dumps(PAIR), "Reply in JSON with name, amount and city.", "assistant user system"]
    backend.train_from_iterator(texts * 5, trainer)
    return backend


@pytest.fixture(scope="module")
def tiny():
    """A byte-level BPE trained here; BOS added on encode; ChatML turns end with <|im_end|> (an extra EOS id)."""
    backend = _backend()
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", pad_token="</s>", add_bos_token=True,
                     chat_template=CHATML, extra_eos_token_ids=[backend.token_to_id("<|im_end|>")])


def _masked_text(tok, ex_or_batch_row, mask, skip=False):
    ids = [t for t, m in zip(ex_or_batch_row, mask) if m]
    return tok.decode(ids, skip_special_tokens=skip)


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


# ------------------------------------------------------------------------------------------- formatting & masks


@pytest.mark.parametrize("which", ["tiny", "smol"])
def test_chat_loss_mask_is_exactly_the_assistant_turn(which, request):
    tok = request.getfixturevalue(which)
    ex = data.tokenize(CHAT, tok)
    end = "<|im_end|>"
    assert _masked_text(tok, ex.input_ids, ex.loss_mask) == CHAT["messages"][-1]["content"] + end
    # The prompt is what generation sees: the template without the last turn, plus the generation prompt.
    prompt = tok.apply_chat_template(CHAT["messages"][:-1], add_generation_prompt=True)
    assert tok.decode(ex.prompt_ids, skip_special_tokens=False) == prompt
    assert list(ex.prompt_ids) == tok.encode(prompt, add_special_tokens=False)
    # Prompt + completion is a prefix of the whole rendered chat, tokenized as one text (no boundary merge).
    whole = tok.encode(tok.apply_chat_template(CHAT["messages"], add_generation_prompt=False), add_special_tokens=False)
    assert whole[:len(ex)] == list(ex.input_ids)
    assert ex.completion_ids[-1] == tok.token_to_id(end) and ex.completion_ids[-1] in tok.eos_token_ids


def test_pair_format_adds_bos_and_eos(tiny):
    ex = data.tokenize(PAIR, tiny)
    assert ex.prompt_ids[0] == tiny.bos_token_id
    assert tiny.decode(ex.prompt_ids, skip_special_tokens=False) == "<s>" + PAIR["prompt"]
    assert _masked_text(tiny, ex.input_ids, ex.loss_mask, skip=False) == PAIR["completion"] + "</s>"
    assert ex.completion_ids[-1] == tiny.eos_token_id


def test_template_without_end_of_turn_gets_eos_appended():
    tok = Tokenizer(_backend(), bos_token="<s>", eos_token="</s>", chat_template=PLAIN)
    ex = data.tokenize(CHAT, tok)
    assert _masked_text(tok, ex.input_ids, ex.loss_mask) == CHAT["messages"][-1]["content"] + "\n</s>"


MULTI = [{"role": "system", "content": "Reply in JSON."}, {"role": "user", "content": "Pay Ana"},
         {"role": "assistant", "content": '{"name":"Ana"}'}, {"role": "user", "content": "12 euros"},
         {"role": "assistant", "content": '{"amount":12}'}, {"role": "user", "content": "in Oslo"},
         {"role": "assistant", "content": '{"city":"Oslo"}'}]
# ChatML with transformers' assistant-mask markers: transformers' `return_assistant_tokens_mask` is the oracle.
CHATML_MARKED = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
                 "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}"
                 "<|im_end|>{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


INDENTED = [{"role": "user", "content": "code"}, {"role": "assistant", "content": "    return 1  # indented"},
            {"role": "user", "content": "more"}, {"role": "assistant", "content": "\n\n  x = 2"},
            {"role": "user", "content": "end"}, {"role": "assistant", "content": "done"}]


def _checked_against_assistant_mask(folder, template, messages):
    """A tokenizer with ``template`` and the example of ``messages`` (chat_turns='all'), whose ids and loss mask are
    asserted equal to transformers' ``return_assistant_tokens_mask`` on the same folder (the oracle)."""
    from transformers import AutoTokenizer

    backend = _backend()
    tok = Tokenizer(backend, bos_token="<s>", eos_token="</s>", pad_token="</s>", chat_template=template,
                    extra_eos_token_ids=[backend.token_to_id("<|im_end|>")])
    tok.save(folder)
    oracle = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ex = data.tokenize({"messages": messages}, tok)
    assert list(ex.input_ids) == oracle["input_ids"][:len(ex)]
    assert list(ex.loss_mask) == oracle["assistant_masks"][:len(ex)]
    return tok, ex


@pytest.mark.parametrize("messages", [MULTI, INDENTED], ids=["json", "leading-whitespace"])
def test_multi_turn_trains_every_assistant_turn_as_transformers_assistant_mask(tmp_path, messages):
    """chat_turns='all' (the default) masks exactly what transformers' assistant-token mask marks: each assistant
    turn's text and its <|im_end|> (the last turn's trailing newline is left out, as before), and the prompt's ids,
    earlier turns included, are those of the prompt encoded whole, as generation sees it, even where a token spans
    a turn's start ('\n   ')."""
    tok, ex = _checked_against_assistant_mask(tmp_path, CHATML_MARKED, messages)
    assert sum(ex.prompt_mask) > 0
    prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True)
    assert list(ex.prompt_ids) == tok.encode(prompt, add_special_tokens=False)
    last = data.tokenize({"messages": messages}, tok, chat_turns="last")   # only the last turn, as jlora did before
    assert last.input_ids == ex.input_ids and last.prompt_mask == ()
    assert _masked_text(tok, last.input_ids, last.loss_mask) == messages[-1]["content"] + "<|im_end|>"
    if messages is MULTI:
        targets = _masked_text(tok, ex.input_ids, ex.loss_mask)
        assert targets == '{"name":"Ana"}<|im_end|>{"amount":12}<|im_end|>{"city":"Oslo"}<|im_end|>'


def test_a_template_with_generation_marks_gives_every_assistant_turn(tmp_path):
    """A template whose rendering of a turn depends on its place (here, as Qwen3's, an empty think block on the last
    turn only) leaves earlier turns as context when it has no marks; with `{% generation %}` marks (as TRL's
    training templates add them) every assistant turn is a target, exactly as transformers' assistant mask says."""
    think = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
             "{% if loop.last %}<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
             "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok, ex = _checked_against_assistant_mask(tmp_path, think, MULTI)
    assert _masked_text(tok, ex.input_ids, ex.loss_mask).count("<|im_end|>") == 3
    unmarked = Tokenizer(_backend(), eos_token="</s>", pad_token="</s>", extra_eos_token_ids=tok.eos_token_ids[1:],
                         chat_template=think.replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    with pytest.warns(UserWarning, match="renders earlier assistant turns differently"):
        (alone,) = data.tokenize_all([{"messages": MULTI}], unmarked, max_length=256)
    assert alone.input_ids == ex.input_ids and alone.prompt_mask == ()


def test_a_mark_that_stops_before_the_end_token_still_trains_it():
    """A `{% generation %}` mark that closes before whitespace and the end-of-turn token: every turn still learns to
    stop, as without marks (the end token after whitespace is part of the target), and marks in a chat's own text
    make the template's marks unreadable, so the renderings decide."""
    spaced = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
              "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %} <|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    backend = _backend()
    kw = dict(eos_token="</s>", pad_token="</s>", extra_eos_token_ids=[backend.token_to_id("<|im_end|>")])
    marked = Tokenizer(backend, chat_template=spaced, **kw)
    plain = Tokenizer(backend, chat_template=spaced.replace("{% generation %}", "").replace("{% endgeneration %}", ""),
                      **kw)
    ex = data.tokenize({"messages": MULTI}, marked)
    assert ex == data.tokenize({"messages": MULTI}, plain)
    assert _masked_text(marked, ex.input_ids, ex.loss_mask).count("<|im_end|>") == 3
    odd = [dict(m, content=m["content"] + "\ue001") if m["role"] == "user" else m for m in MULTI]
    assert marked.generation_spans(odd) is None
    assert data.tokenize({"messages": odd}, marked) == data.tokenize({"messages": odd}, plain)


def test_multi_turn_with_smollm2s_template(smol):
    ex = data.tokenize({"messages": MULTI}, smol)
    whole = smol.encode(smol.apply_chat_template(MULTI, add_generation_prompt=False), add_special_tokens=False)
    assert list(ex.input_ids) == whole[:len(ex)]
    assert _masked_text(smol, ex.input_ids, ex.loss_mask) == (
        '{"name":"Ana"}<|im_end|>{"amount":12}<|im_end|>{"city":"Oslo"}<|im_end|>')
    # SmolLM2's vocabulary merges "\n" with the spaces that start an indented turn: the history keeps generation's ids.
    ex = data.tokenize({"messages": INDENTED}, smol)
    assert list(ex.prompt_ids) == smol.encode(smol.apply_chat_template(INDENTED[:-1], add_generation_prompt=True),
                                             add_special_tokens=False)
    assert "return 1  # indented<|im_end|>" in _masked_text(smol, ex.input_ids, ex.loss_mask)


def test_a_turn_closed_only_before_the_next_still_learns_to_stop(tiny):
    """A template that writes a turn's end-of-turn token only when another turn follows: the earlier turn's target
    runs through that token."""
    closing = ("{% for m in messages %}{% if not loop.first %}<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
               "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|im_end|>\n<|im_start|>assistant\n"
               "{% else %}<|im_end|>{% endif %}")
    backend = _backend()
    tok = Tokenizer(backend, eos_token="</s>", chat_template=closing,
                    extra_eos_token_ids=[backend.token_to_id("<|im_end|>")])
    msgs = MULTI[1:5]
    ex = data.tokenize({"messages": msgs}, tok)
    assert _masked_text(tok, ex.input_ids, ex.loss_mask) == '{"name":"Ana"}<|im_end|>{"amount":12}<|im_end|>'


def test_earlier_turns_a_template_renders_differently_stay_context(tiny, tmp_path):
    """A template that puts the system prompt into the last user turn (as Mistral's did) renders the chat up to an
    earlier turn differently: that turn stays context, with a warning naming the record; 'last' does not warn."""
    late_system = ("{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}"
                   "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}{% for m in messages %}"
                   "{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n{% if loop.index0 == ns.last %}"
                   "{{ messages[0]['content'] }} {% endif %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    backend = _backend()
    tok = Tokenizer(backend, eos_token="</s>", pad_token="</s>", chat_template=late_system,
                    extra_eos_token_ids=[backend.token_to_id("<|im_end|>")])
    with pytest.warns(UserWarning, match=r"1 of 2 chats, first record 1: the chat template renders earlier "
                                         r"assistant turns differently .*chat_turns='last'"):
        examples = data.tokenize_all([PAIR, {"messages": MULTI}], tok, max_length=256)
    assert _masked_text(tok, examples[1].input_ids, examples[1].loss_mask) == '{"city":"Oslo"}<|im_end|>'
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        last = data.tokenize_all([PAIR, {"messages": MULTI}], tok, max_length=256, chat_turns="last")
    assert last == examples
    # The streaming Loader counts them (and warns once).
    path = _write(tmp_path / "d.jsonl", [{"messages": MULTI}, PAIR])
    loader = data.Loader(path, tokenizer=tok, batch_size=2, max_length=256, pad_id=0, shuffle=False, epochs=1)
    with pytest.warns(UserWarning, match=r"d\.jsonl:1: the chat template renders earlier assistant turns"):
        list(loader)
    assert loader.counts["context_turns"] == 1 and "1 chats with earlier assistant turns left as" in loader.summary()
    # A truncated chat with context turns counts as both.
    long_chat = data.tokenize({"messages": MULTI}, tok)
    loader = data.Loader(path, tokenizer=tok, batch_size=2, max_length=len(long_chat) - 1, pad_id=0, shuffle=False,
                         epochs=1, overflow="truncate")
    with pytest.warns(UserWarning):
        list(loader)
    assert loader.counts["truncated"] == 1 and loader.counts["context_turns"] == 1
    with pytest.raises(ValueError, match=r"`chat_turns` must be one of \('all', 'last'\); got 'every'"):
        data.Loader(path, tokenizer=tok, batch_size=2, max_length=256, pad_id=0, chat_turns="every")


def test_loader_batches_train_every_assistant_turn(tiny, tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"messages": MULTI}, CHAT])
    kw = dict(tokenizer=tiny, batch_size=2, max_length=256, pad_id=0, shuffle=False, epochs=1)
    for turns in ("all", "last"):
        batch = next(iter(data.Loader(path, chat_turns=turns, **kw)))
        row = batch["input_ids"][0][batch["attention_mask"][0] == 1]
        expected = data.tokenize({"messages": MULTI}, tiny, chat_turns=turns)
        assert row.tolist() == list(expected.input_ids)
        assert batch["loss_mask"][0][:len(row)].tolist() == list(expected.loss_mask)
    assert _masked_text(tiny, row, batch["loss_mask"][0][:len(row)]) == '{"city":"Oslo"}<|im_end|>'


def test_truncation_keeps_an_earlier_turns_targets(tiny):
    ex = data.tokenize({"messages": MULTI}, tiny)
    first_end = ex.prompt_mask.index(1) + ex.prompt_mask[ex.prompt_mask.index(1):].index(0)   # after turn 1
    cut = data.fit(ex, first_end + 2, "truncate")
    assert cut.input_ids == ex.input_ids[:first_end + 2] and cut.loss_mask == ex.loss_mask[:first_end + 2]
    assert data.fit(ex, ex.prompt_mask.index(1), "truncate") is None      # no target left in the kept tokens
    assert data.fit(data.tokenize({"messages": MULTI}, tiny, chat_turns="last"), first_end + 2, "truncate") is None


TOOLS = [{"type": "function", "function": {"name": "pay", "description": "Pay someone.",
                                           "parameters": {"type": "object", "properties": {"to": {"type": "string"}}}}}]
CHATML_TOOLS = ("{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
                "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
                "<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}{% else %}{{ m['content'] }}{% endif %}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("as_text", [False, True])
def test_a_chats_tools_and_tool_calls_reach_the_template_as_transformers_passes_them(tmp_path, as_text):
    """A record's ``tools`` and ``tool_calls`` (lists, or their JSON text as Hub data sets store them) reach the
    template, and an assistant turn made only of ``tool_calls`` (content null or "") is a valid target: the
    rendered text equals transformers' apply_chat_template(messages, tools=...) on the same folder."""
    from transformers import AutoTokenizer

    backend = _backend()
    tok = Tokenizer(backend, eos_token="</s>", pad_token="</s>", chat_template=CHATML_TOOLS,
                    extra_eos_token_ids=[backend.token_to_id("<|im_end|>")])
    tok.save(tmp_path)
    call = {"type": "function", "function": {"name": "pay", "arguments": {"to": "Ana"}}}
    msgs = [{"role": "user", "content": "Pay Ana"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "done"}, {"role": "assistant", "content": "Paid."}]
    stored = [{**m, "tool_calls": json.dumps(m["tool_calls"]), "content": ""} if "tool_calls" in m else m
              for m in msgs] if as_text else msgs
    record = {"messages": stored, "tools": json.dumps(TOOLS) if as_text else TOOLS}
    ex = data.tokenize(record, tok)
    oracle = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(msgs, tools=TOOLS, tokenize=False)
    assert tok.decode(ex.input_ids, skip_special_tokens=False) == oracle.removesuffix("\n")
    assert "Tools: [" in oracle and _masked_text(tok, ex.input_ids, ex.loss_mask) == (
        '<tool_call>{"name": "pay", "arguments": {"to": "Ana"}}</tool_call><|im_end|>Paid.<|im_end|>')
    # The tool call as the last turn: a reference for generation-based eval is its rendering.
    prompt = data.eval_prompts([{"messages": stored[:2], "tools": record["tools"]}], tok)[0]
    assert prompt.target == '<tool_call>{"name": "pay", "arguments": {"to": "Ana"}}</tool_call>'
    assert prompt.prompt_text.startswith("<|im_start|>system\nTools: [")


@pytest.mark.parametrize("record, match", [
    ({"messages": MULTI, "tools": "pay"}, r"'tools' must be a list of tool objects \(JSON schemas\) or its JSON"),
    ({"messages": MULTI, "tools": [1]}, r"'tools' must be a list of tool objects"),
    ({"messages": [{"role": "assistant", "content": None}]}, r"messages\[0\] must be an object with string 'role' "
                                                               r"and 'content' \(a turn with 'tool_calls' may have"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": "pay(Ana)"}]},
     r"messages\[0\]: 'tool_calls' must be a list of tool call objects or its JSON text; got 'pay\(Ana\)'"),
])
def test_bad_tools_and_tool_calls_are_bad_records(record, match):
    with pytest.raises(ValueError, match=match):
        data.validate_record(record, "f.jsonl:3")


def test_chat_turns_is_checked_for_every_record(tiny):
    with pytest.raises(ValueError, match=r"`chat_turns` must be one of \('all', 'last'\); got 'every'"):
        data.tokenize(PAIR, tiny, chat_turns="every")


def test_loss_mask_counts_in_causal_lm_loss(tiny):
    """The batch's loss_mask selects exactly the completion tokens as targets of jlora's loss."""
    import jax.numpy as jnp

    import jlora

    examples = [data.tokenize(CHAT, tiny), data.tokenize(PAIR, tiny)]
    batch = next(data.Loader(examples, batch_size=2, max_length=64, pad_id=tiny.pad_token_id, shuffle=False))
    logits = jnp.zeros((*batch["input_ids"].shape, tiny.vocab_size))
    _, n = jlora.causal_lm_loss(logits, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["loss_mask"]))
    assert int(n) == sum(len(e.completion_ids) for e in examples)


def test_boundary_merge_warns(tiny):
    # The trained BPE merges "JSON" into fewer tokens than "JS" + "ON" apart; the check must notice.
    rec = {"prompt": "Reply in JS", "completion": "ON with name"}
    with pytest.warns(UserWarning, match="tokenize differently when prompt and completion"):
        data.tokenize_all([rec], tiny, max_length=64)


# ------------------------------------------------------------------------------------------- batching


def _examples(lengths, prompt_len=2):
    """Synthetic examples whose ids encode (example index, position) so batches can be traced back."""
    out = []
    for i, n in enumerate(lengths):
        p = min(prompt_len, n - 1)
        ids = tuple(1000 * (i + 1) + j for j in range(n))
        out.append(data.Example(ids[:p], ids[p:], f"ex{i}"))
    return out


def _rows_to_examples(batch):
    """Recover (input_ids, loss_mask) per example from a padded or packed batch."""
    found = []
    for r in range(batch["input_ids"].shape[0]):
        seg = batch.get("segment_ids", batch["attention_mask"])[r]
        for s in sorted(set(seg.tolist()) - {0}):
            sel = seg == s
            found.append((tuple(batch["input_ids"][r][sel].tolist()), tuple(batch["loss_mask"][r][sel].tolist())))
    return found


def test_load_names_or_skips_a_chat_the_template_refuses(smol, tmp_path):
    """data.load (validation data, the held-out split) treats a record the chat template cannot render or split as
    the streaming Loader does: named by file and line, or skipped and counted with on_bad_record='skip'."""
    alone = {"messages": [{"role": "assistant", "content": "hello"}]}     # SmolLM2's template adds a system turn
    path = _write(tmp_path / "v.jsonl", [PAIR, alone, PAIR])
    with pytest.raises(ValueError, match=r"(?s)v\.jsonl:2: .*on_bad_record='skip'"):
        data.load(path, smol, max_length=64)
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 records the tokenizer refuses .*first: .*v\.jsonl:2"):
        assert len(data.load(path, smol, max_length=64, on_bad_record="skip")) == 2


def test_padding_buckets_shapes_and_masks():
    examples = _examples([5, 9, 33, 12, 7, 40])
    loader = data.Loader(examples, batch_size=2, max_length=48, pad_id=-1, bucket=16, shuffle=False, epochs=1)
    batches = list(loader)
    assert [b["input_ids"].shape for b in batches] == [(2, 16), (2, 48), (2, 48)]  # 9->16, 33->48, 40->48 (cap)
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask", "loss_mask"}
        assert all(v.dtype == np.int32 for v in b.values())
        assert (b["input_ids"][b["attention_mask"] == 0] == -1).all()          # right padding with pad_id
        assert (b["loss_mask"] <= b["attention_mask"]).all()
        for row in b["attention_mask"]:                                          # real tokens first
            assert (np.diff(row) <= 0).all()
    assert _rows_to_examples(batches[0]) == [(e.input_ids, e.loss_mask) for e in examples[:2]]
    fixed = next(data.Loader(examples, batch_size=2, max_length=48, pad_id=0, bucket=None, shuffle=False))
    assert fixed["input_ids"].shape == (2, 48)


def test_last_partial_batch_is_dropped_or_padded():
    examples = _examples([4] * 5)
    assert len(list(data.Loader(examples, batch_size=2, max_length=8, pad_id=0, epochs=1))) == 2
    last = list(data.Loader(examples, batch_size=2, max_length=8, pad_id=0, epochs=1, drop_last=False))[-1]
    assert last["input_ids"].shape == (2, 8) and last["attention_mask"][1].sum() == 0  # an empty row


def test_packing_rows_segments_positions():
    examples = _examples([5, 9, 7, 3, 12, 6, 8, 4, 10, 2], prompt_len=3)
    loader = data.Loader(examples, batch_size=2, max_length=16, pad_id=0, shuffle=False, packing=True,
                         drop_last=False, epochs=1)
    batches = list(loader)
    seen = []
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask", "loss_mask", "positions", "segment_ids"}
        assert b["input_ids"].shape == (2, 16)
        assert ((b["segment_ids"] > 0) == (b["attention_mask"] > 0)).all()
        for r in range(2):
            for s in set(b["segment_ids"][r].tolist()) - {0}:
                pos = b["positions"][r][b["segment_ids"][r] == s]
                assert pos.tolist() == list(range(len(pos)))                      # positions restart per example
        seen += _rows_to_examples(b)
    assert seen == [(e.input_ids, e.loss_mask) for e in examples]                  # each exactly once, in order
    # Greedy: row 0 takes 5+9 (=14), 7 does not fit.
    assert batches[0]["segment_ids"][0].tolist() == [1] * 5 + [2] * 9 + [0] * 2


def test_packed_example_is_not_a_target_of_the_one_before():
    """An example's first token is never a target: in a packed row it follows the previous example's last token,
    which must not learn to predict it (an empty prompt makes that first token a completion token)."""
    examples = [data.Example((1, 2), (3, 4)), data.Example((), (5, 6, 7))]
    for packing in (False, True):
        batch = next(data.Loader(examples, batch_size=2 - packing, max_length=8, pad_id=0, shuffle=False,
                                 packing=packing, bucket=None))
        targets = [t for row, mask in zip(batch["input_ids"], batch["loss_mask"]) for t, m in zip(row, mask) if m]
        assert targets == [3, 4, 6, 7], packing


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(2, 20), min_size=1, max_size=25), batch_size=st.integers(1, 4),
       packing=st.booleans(), seed=st.integers(0, 3))
def test_every_epoch_covers_every_example_once(lengths, batch_size, packing, seed):
    examples = _examples(lengths)
    loader = data.Loader(examples, batch_size=batch_size, max_length=24, pad_id=0, seed=seed, packing=packing,
                         drop_last=False, epochs=2)
    seen = [x for b in loader for x in _rows_to_examples(b)]
    want = sorted((e.input_ids, e.loss_mask) for e in examples)
    assert sorted(seen[:len(examples)]) == want and sorted(seen[len(examples):]) == want


# ------------------------------------------------------------------------------------------- order & resume


def test_seeded_shuffle_is_deterministic_and_varies_by_epoch_and_seed():
    examples = _examples([3] * 50)
    a = data.Loader(examples, batch_size=5, max_length=4, pad_id=0, seed=7)
    b = data.Loader(examples, batch_size=5, max_length=4, pad_id=0, seed=7)
    c = data.Loader(examples, batch_size=5, max_length=4, pad_id=0, seed=8)
    assert np.array_equal(a.order(0), b.order(0)) and np.array_equal(a.order(3), b.order(3))
    assert not np.array_equal(a.order(0), a.order(1)) and not np.array_equal(a.order(0), c.order(0))
    assert sorted(a.order(2).tolist()) == list(range(50))
    for _ in range(12):   # across the epoch boundary (10 batches per epoch)
        assert all(np.array_equal(x, y) for x, y in zip(next(a).values(), next(b).values()))


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_from_any_position_equals_uninterrupted_run(packing, drop_last):
    examples = _examples([3, 8, 5, 11, 2, 9, 6, 4, 7, 10, 3, 5, 12])
    kwargs = dict(batch_size=3, max_length=16, pad_id=0, seed=3, packing=packing, bucket=8, drop_last=drop_last)
    run = data.Loader(examples, **kwargs)
    batches, positions = [], []
    for _ in range(15):                      # several epochs
        positions.append(run.position)
        batches.append(next(run))
    assert len({p["epoch"] for p in positions}) >= 3
    for k in range(len(batches)):
        saved = json.loads(json.dumps(positions[k]))          # positions survive a JSON round trip
        resumed = data.Loader(examples, **kwargs, position=saved)
        for want in batches[k:]:
            got = next(resumed)
            assert got.keys() == want.keys() and all(np.array_equal(got[key], want[key]) for key in want)


def test_split_is_seeded_and_disjoint():
    items = list(range(100))
    train, valid = data.split(items, valid_fraction=0.1, seed=4)
    assert len(valid) == 10 and sorted(train + valid) == items and not set(train) & set(valid)
    assert data.split(items, valid_fraction=0.1, seed=4) == (train, valid)
    assert data.split(items, valid_fraction=0.1, seed=5)[1] != valid
    assert len(data.split(items, valid_count=7)[1]) == 7
    assert data.split(items) == (items, [])
    with pytest.raises(ValueError, match="leave at least one for training"):
        data.split([1, 2], valid_count=2)


def test_load_splits_by_fraction(tiny, tmp_path):
    path = _write(tmp_path / "d.jsonl", [CHAT, PAIR] * 10)
    train, valid = data.load_splits(path, tiny, valid_fraction=0.25, max_length=64, seed=1)
    assert len(train) == 15 and len(valid) == 5
    assert not {e.source for e in train} & {e.source for e in valid}
    assert all(e.source.startswith(path + ":") for e in train + valid)


# ------------------------------------------------------------------------------------------- errors


def test_missing_file_is_named(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.load(tmp_path / "nope.jsonl", tiny, max_length=64)


def test_malformed_line_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [PAIR, "", '{"prompt": "x", "completion": '])
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
        data.read_jsonl(path)
    # skipped, they are counted (as the streaming Loader and a run's check count them)
    with pytest.warns(UserWarning, match=r"skipped 1 of 2 malformed records \(on_bad_record='skip'\); first: "
                                         r".*bad\.jsonl:3: malformed JSON"):
        assert len(data.records.read(path, on_bad_record="skip")) == 1


@pytest.mark.parametrize("record, match", [
    ({"prompt": "x"}, r"missing key\(s\) \['completion'\]; expected .*'messages'.*'prompt'"),
    ({"text": "x"}, r"missing key\(s\) \['prompt', 'completion'\]"),
    ({"messages": [{"role": "user", "content": "x"}]}, "the last message .* must have role 'assistant'"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] must be an object with string 'role' and 'content'"),
    ({"messages": [{"role": "usr", "content": "x"}, {"role": "assistant", "content": "y"}]},
     r"messages\[0\]: role 'usr' is not a chat role; did you mean 'user'\?"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "Assistant", "content": "y"}]},
     r"messages\[1\]: role 'Assistant' is not a chat role; did you mean 'assistant'\?"),
    ({"prompt": 1, "completion": "x"}, "'prompt' must be a string"),
    ({"prompt": "x", "completion": ""}, "'completion' is empty, so there is nothing to train on"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
     "the last message, the training target, is empty"),
    ([1, 2], r"expected a JSON object, .*; got list \(a JSON Lines file, .jsonl or .json, holds one such object per "
             r"line, not a JSON array\)"),
])
def test_bad_records_name_the_expected_keys(tmp_path, record, match):
    path = _write(tmp_path / "d.jsonl", [PAIR, record])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: " + match):
        data.read_jsonl(path)


@pytest.mark.parametrize("columns, record, match", [
    ({"messages": "conversation"}, CHAT, r"maps 'messages' to the column 'conversation', which the record lacks; its "
                                         r"keys are \['messages'\] \(a field the mapping renames is not read under its "
                                         r"own name: drop 'messages' from the mapping, or fix the column's name\)$"),
    ({"prompt": "question", "completion": "answer"}, {"question": "q", "reply": "a"},
     r"maps 'completion' to the column 'answer', which the record lacks; its keys are \['question', 'reply'\]$"),
])
def test_a_mapping_to_a_column_the_data_lacks_names_the_mapping_and_the_keys(columns, record, match, tmp_path):
    """It said "missing key(s) ['prompt', 'completion'] ... got keys []" of a file of chats under `messages`."""
    from jlora.cli import run

    path = _write(tmp_path / "d.jsonl", [record])
    source = data.records.open_records(path, columns)
    with pytest.raises(data.DataError, match=r"d\.jsonl:1: `columns` \(data\.columns in a run config\) " + match) as e:
        data.records.check(source, columns)       # as a run checks its data before training
    assert str(run._in_config_terms(e.value)).startswith(f"{path}:1: `data.columns` maps ")
    with pytest.raises(data.DataError, match=match):
        data.read(path, columns=columns)
    # a record of the other format, which needs no mapped column, is read as it is
    other = PAIR if "messages" in columns else CHAT
    assert data.read(_write(tmp_path / "mixed.jsonl", [other]), columns=columns)[0][1] == other


def test_empty_dataset_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="holds no records"):
        data.read_jsonl(_write(tmp_path / "e.jsonl", ["", "  "]))
    with pytest.raises(ValueError, match="dataset is empty"):
        data.Loader([], batch_size=2, max_length=8, pad_id=0)
    with pytest.raises(ValueError, match="fewer than batch_size=4"):
        data.Loader(_examples([3, 3]), batch_size=4, max_length=8, pad_id=0)
    # Packing runs on across epochs: two examples fill a batch of 4 rows of 8 from two epochs' worth.
    batch = next(data.Loader(_examples([3, 3]), batch_size=4, max_length=8, pad_id=0, packing=True))
    assert batch["segment_ids"].max(axis=1).tolist() == [2, 2, 2, 2]


def test_overflow_policies(tiny, tmp_path):
    n = len(data.tokenize(PAIR, tiny))
    p = len(data.tokenize(PAIR, tiny).prompt_ids)
    path = _write(tmp_path / "d.jsonl", [PAIR])
    with pytest.raises(ValueError, match=rf"d\.jsonl:1: example has {n} tokens .* max_length is {n - 1}; raise"):
        data.load(path, tiny, max_length=n - 1)
    with pytest.warns(UserWarning, match="1 of 1 examples exceed max_length"):
        (ex,) = data.load(path, tiny, max_length=n - 1, overflow="truncate")
    assert len(ex) == n - 1 and ex.prompt_ids == data.tokenize(PAIR, tiny).prompt_ids
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="all 1 examples were dropped"):
        data.load(path, tiny, max_length=n - 1, overflow="drop")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="all 1 examples were dropped"):
        data.load(path, tiny, max_length=p, overflow="truncate")      # nothing left to train on
    with pytest.raises(ValueError, match="`overflow` must be one of"):
        data.load(path, tiny, max_length=64, overflow="cut")
    with pytest.raises(ValueError, match="more than max_length=4"):
        data.Loader(_examples([5]), batch_size=1, max_length=4, pad_id=0)


def test_bad_position(tiny):
    with pytest.raises(ValueError, match="keys 'epoch' and 'index'"):
        data.Loader(_examples([3]), batch_size=1, max_length=4, pad_id=0, position={"step": 3})
    with pytest.raises(ValueError, match="outside this dataset of 1 examples"):
        data.Loader(_examples([3]), batch_size=1, max_length=4, pad_id=0, position={"epoch": 0, "index": 5})


# ------------------------------------------------------------------------------------------- eval helpers


def test_eval_prompts(tiny, tmp_path):
    path = _write(tmp_path / "v.jsonl", [CHAT, PAIR, CHAT])
    items = data.eval_prompts(path, tiny, limit=2)
    assert len(items) == 2
    chat, pair = items
    assert chat.prompt_text == tiny.apply_chat_template(CHAT["messages"][:-1], add_generation_prompt=True)
    assert chat.prompt_ids == list(data.tokenize(CHAT, tiny).prompt_ids)
    assert chat.target == CHAT["messages"][-1]["content"] and chat.source == path + ":1"
    assert pair.prompt_ids == list(data.tokenize(PAIR, tiny).prompt_ids) and pair.target == PAIR["completion"]


def test_a_record_the_chat_template_refuses_is_a_bad_record(tmp_path):
    """A template's raise_exception (here: no system turns, as Gemma's) is a malformed record: named by file and
    line, or skipped and counted, in training data and in eval prompts."""
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
              "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    backend = _backend()
    tok = Tokenizer(backend, eos_token="</s>", pad_token="</s>", chat_template=strict,
                    extra_eos_token_ids=[backend.token_to_id("<|im_end|>")])
    user_only = {"messages": CHAT["messages"][1:]}
    path = _write(tmp_path / "d.jsonl", [user_only, PAIR, CHAT, user_only])
    kw = dict(tokenizer=tok, batch_size=4, max_length=64, pad_id=0, shuffle=False, drop_last=False, epochs=1)
    with pytest.raises(data.DataError, match=r"d\.jsonl:3: the chat template cannot render this conversation "
                                             r"\(TemplateError: System role not supported\)"):
        list(data.Loader(path, **kw))
    loader = data.Loader(path, on_bad_record="skip", **kw)
    with pytest.warns(UserWarning, match="skipped a malformed record"):
        (batch,) = list(loader)
    assert loader.counts["skipped"] == 1 and batch["attention_mask"].any(1).tolist() == [True, True, False, True]
    assert [p.source for p in data.eval_prompts(path, tok, on_bad_record="skip")] == [path + ":1", path + ":2",
                                                                                     path + ":4"]
    with pytest.raises(data.DataError, match=r"d\.jsonl:3: the chat template cannot render"):
        data.eval_prompts(path, tok)


# ------------------------------------------------------------------------------------------- the demo data


def test_demo_data_is_regenerated_byte_identical(tmp_path):
    subprocess.run([sys.executable, os.path.join(DEMO_DATA, "make_data.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("train.jsonl", "valid.jsonl"):
        with open(os.path.join(DEMO_DATA, name), "rb") as f, open(tmp_path / name, "rb") as g:
            assert f.read() == g.read(), f"examples/data/{name} is stale; rerun examples/data/make_data.py"


def test_demo_data_with_smollm2_tokenizer(smol, recwarn):
    train, valid = data.load_splits(os.path.join(DEMO_DATA, "train.jsonl"), smol,
                                    valid=os.path.join(DEMO_DATA, "valid.jsonl"), max_length=160)
    assert not [w for w in recwarn if "tokenize differently" in str(w.message)]   # no boundary merges
    assert (len(train), len(valid)) == (400, 50)
    stats = data.length_stats(train + valid)
    print("\nSmolLM2 token lengths of the demo data:", stats)
    assert stats["max"] <= 128 and stats["mean"] <= 110 and stats["completion_mean"] <= 40
    requests = [json.loads(line)["messages"][1]["content"]
                for name in ("train.jsonl", "valid.jsonl") for line in open(os.path.join(DEMO_DATA, name))]
    assert len(set(requests)) == len(requests)                                   # no request in both splits
    for ex in valid[:10]:
        assert smol.decode(ex.completion_ids, skip_special_tokens=False).endswith("}<|im_end|>")
    items = data.eval_prompts(os.path.join(DEMO_DATA, "valid.jsonl"), smol)
    assert all(list(json.loads(it.target)) == ["name", "date", "amount", "city"] for it in items)
    score = scoring.load(os.path.join(ROOT, "examples", "json_task.py") + ":score")   # the demo's scorer
    assert all(score(it.target, it.target) == 1.0 for it in items)
    batch = next(data.Loader(train, batch_size=8, max_length=160, pad_id=smol.pad_token_id, seed=0))
    assert batch["input_ids"].shape == (8, 112)      # the default bucket (16) gives one shape for this data
