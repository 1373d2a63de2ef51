"""A small tokenizer: a `tokenizers.Tokenizer` plus the few facts a chat model needs.

jlora never imports transformers or torch to tokenize. A `Tokenizer` holds a backend
`tokenizers.Tokenizer` (the Rust BPE/WordPiece/Unigram machine that `tokenizer.json` describes) and the
pieces that transformers keeps beside it in `tokenizer_config.json`: the named special tokens, whether
encoding adds BOS/EOS, and the Jinja chat template.

It comes from one of two places:

* `Tokenizer.from_folder(path)`: a Hugging Face folder (`tokenizer.json`, `tokenizer_config.json`, and
  `chat_template.jinja` as transformers 5 writes it; `generation_config.json` adds end-of-turn ids).
* `Tokenizer.from_gguf_metadata(fields)`: a GGUF file's `tokenizer.*` metadata. A GGUF carries no
  `tokenizer.json`; it stores llama.cpp's description (tokens, merges, token types, special ids and the
  name of the pre-tokenizer split regex). We rebuild the byte-level BPE that description names, as llama.cpp
  runs it, or its sentencepiece BPE (Llama 2, Mistral v0.x: pieces, scores and byte tokens). transformers' GGUF
  loader (our test oracle; its path imports torch) does the same, except for the digit-splitting types
  (`smollm`, `starcoder`, `refact`): it leaves out their digit split, which llama.cpp and those models' own
  tokenizer.json apply, so text with a space or line break before a digit differs there.

Chat templates render in a sandboxed Jinja environment set up like transformers'
(`trim_blocks`, `lstrip_blocks`, `loopcontrols`, a `tojson` that does not escape HTML, `raise_exception`,
`strftime_now`), with `bos_token`, `eos_token`, `unk_token` and `pad_token` visible to the template.

`save(folder)` writes `tokenizer.json` + `tokenizer_config.json` that transformers' `AutoTokenizer` loads.

Examples:
    >>> from tokenizers import Tokenizer as Backend, models, pre_tokenizers, decoders
    >>> vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4}
    >>> backend = Backend(models.BPE(vocab, [("a", "b")]))
    >>> backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    >>> backend.decoder = decoders.ByteLevel()
    >>> tok = Tokenizer(backend, bos_token="<s>", eos_token="</s>", add_bos_token=True,
    ...                 chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    >>> tok.encode("abab")
    [0, 4, 4]
    >>> tok.decode([0, 4, 4])
    'abab'
    >>> tok.apply_chat_template([{"role": "user", "content": "ab"}], tokenize=True)
    [4]
"""

from __future__ import annotations

import contextvars
import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"

# llama.cpp token types (`tokenizer.ggml.token_type`).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Split regexes of llama.cpp pre-tokenizer types (`tokenizer.ggml.pre`), as transformers' GGUF loader and
# the models' own tokenizer.json files spell them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_PRE = {
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# GPT-2's regex (ByteLevel's built-in one). "default" (and a file without the key) gets it too, as in
# transformers' loader.
_GPT2_PRE = ("gpt-2", "gpt2", "default")
# GPT-2's regex after isolating every digit: llama.cpp's `\p{N}` then the GPT-2 regex; SmolLM2's and
# StarCoder's own tokenizer.json spell it Digits(individual_digits=True) + ByteLevel.
_DIGITS_PRE = ("smollm", "starcoder", "refact")
SUPPORTED_GGUF_PRE = tuple(sorted((*_SPLIT_PRE, *_GPT2_PRE, *_DIGITS_PRE)))


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level BPE vocabularies are spelled in)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _token_text(token: Any) -> str | None:
    """A special token as tokenizer_config.json may write it: a string or an AddedToken dict."""
    if token is None or isinstance(token, str):
        return token
    if isinstance(token, Mapping) and "content" in token:
        return token["content"]
    raise ValueError(f"cannot read special token {token!r}; expected a string or a dict with 'content'")


SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")
_OTHER_NAMES = ("sep_token", "cls_token", "mask_token")   # chat templates see them too
_END_OF_TEXT = "<|endoftext|>"
# The special tokens a tokenizer class names when its config does not (their __init__ defaults in transformers 5).
_CLASS_DEFAULTS = {
    "GPT2Tokenizer": dict(bos_token=_END_OF_TEXT, eos_token=_END_OF_TEXT, unk_token=_END_OF_TEXT),
    "CodeGenTokenizer": dict(bos_token=_END_OF_TEXT, eos_token=_END_OF_TEXT, unk_token=_END_OF_TEXT),
    "GPTNeoXTokenizer": dict(bos_token=_END_OF_TEXT, eos_token=_END_OF_TEXT, unk_token=_END_OF_TEXT,
                             pad_token="<|padding|>"),
    "Qwen2Tokenizer": dict(eos_token=_END_OF_TEXT, unk_token=_END_OF_TEXT, pad_token=_END_OF_TEXT),
    "LlamaTokenizer": dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
}


def _named_tokens(path: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The bos/eos/pad/unk tokens of a folder, as transformers 5 resolves them: tokenizer_config.json's; over
    them, in a folder saved by older transformers (a config without `added_tokens_decoder`),
    special_tokens_map.json's; and for a name neither file has, the default of the config's `tokenizer_class`
    (GPT-2's folders name no token and mean `<|endoftext|>`). A name set to null stays None.

    Examples:
        >>> _named_tokens("/nonexistent", {"tokenizer_class": "GPT2TokenizerFast", "pad_token": None})["eos_token"]
        '<|endoftext|>'
    """
    config = dict(config)
    if "added_tokens_decoder" not in config:
        legacy = _read_json(os.path.join(path, SPECIAL_TOKENS_MAP_FILE)) or {}
        config.update({name: legacy[name] for name in _NAMES if name in legacy})
    defaults = _CLASS_DEFAULTS.get(str(config.get("tokenizer_class", "")).removesuffix("Fast"), {})
    return {name: config[name] if name in config else defaults.get(name) for name in _NAMES}


class Tokenizer:
    """A `tokenizers.Tokenizer` with special tokens, BOS/EOS flags and a chat template.

    Args:
        backend: the `tokenizers.Tokenizer` doing the work; the Tokenizer keeps a copy. The copy's
            post-processor is replaced by one adding BOS/EOS per `add_bos_token`/`add_eos_token` unless
            `keep_post_processor` is true.
        bos_token, eos_token, pad_token, unk_token: token strings (None when the model has none).
        add_bos_token, add_eos_token: whether `encode(..., add_special_tokens=True)` adds them (ignored
            with `keep_post_processor`).
        chat_template: Jinja source, or None.
        extra_eos_token_ids: ids that also end a generation (end-of-turn tokens), besides `eos_token`.
        keep_post_processor: keep the backend's own post-processor (tokenizer.json says what it adds).
        other_tokens: more named special tokens (`sep_token`, `cls_token`, `mask_token`), which chat templates
            see as variables, as in transformers.
        additional_special_tokens: more special tokens (matched whole, skipped on decode); any the backend lacks
            get new ids, as in transformers.
        split_special_tokens: encode special tokens written in a text as plain text (transformers'
            `split_special_tokens`), those a chat template writes too when its text is encoded (as in
            transformers); their ids decode as before.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        extra_eos_token_ids: Sequence[int] = (),
        keep_post_processor: bool = False,
        other_tokens: Mapping[str, str] | None = None,
        additional_special_tokens: Sequence[str] = (),
        split_special_tokens: bool = False,
    ):
        # A private copy: the post-processor and special tokens set below must not leak into the caller's object.
        backend = tokenizers.Tokenizer.from_str(backend.to_str())
        self._backend = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        # The named special tokens match whole and are skipped on decode, as in transformers, even when
        # the backend lists them as plain vocabulary (or not at all: then, as in transformers, they get new ids).
        self._other_tokens = {k: v for k, v in (other_tokens or {}).items() if v is not None}
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        named = (bos_token, eos_token, pad_token, unk_token, *self._other_tokens.values(), *additional_special_tokens)
        missing = [t for t in dict.fromkeys(named) if t and t not in added]
        if missing:
            backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in missing])
        self._chat_template = chat_template
        self._template_names: list[str] = []   # from_folder: named templates, none of them 'default'
        self._extra_eos = tuple(int(i) for i in extra_eos_token_ids)
        self._split_special = bool(split_special_tokens)
        backend.encode_special_tokens = self._split_special   # (a runtime flag: neither saved nor pickled)
        if not keep_post_processor:
            backend.post_processor = _template_processing(
                backend, bos_token if add_bos_token else None, eos_token if add_eos_token else None)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> Tokenizer | None:
        """The tokenizer of a Hugging Face folder, or None when it has no `tokenizer.json`.

        Reads `tokenizer.json`, `tokenizer_config.json` (special tokens, `chat_template`; see
        `_named_tokens` for `special_tokens_map.json` and the tokenizer class's own defaults),
        `chat_template.jinja` (preferred over the config's template, as in transformers 5) and the
        `eos_token_id` list of `generation_config.json` (end-of-turn ids). Whether encoding adds BOS/EOS is
        what tokenizer.json's post-processor does: like transformers 5, the config's `add_bos_token` and
        `add_eos_token` are ignored when tokenizer.json is present. A `LlamaTokenizer` folder (Llama 2, Mistral
        v0.x) splits text as transformers 5 does, not as its tokenizer.json's normalizer says (see
        `_as_transformers_llama`; `CodeLlamaTokenizer` likewise), and a folder of a byte-level class (GPT-2, CodeGen,
        GPT-NeoX, Qwen2, Cohere) takes whether a text gets a leading space from the config's `add_prefix_space`, as
        transformers 5 does (see `_set_add_prefix_space`). As in transformers 5, the config's
        `additional_special_tokens`/`extra_special_tokens` that tokenizer.json lacks get new ids,
        `split_special_tokens` is followed, and `added_tokens_decoder`'s lstrip/rstrip/single_word/normalized/special
        flags win over tokenizer.json's for tokens both name. Two rare cases differ from transformers: a token only
        the config's `added_tokens_decoder` names is not added, and one it makes non-special is kept on decode,
        where transformers still skips it.
        """
        path = os.fspath(path)
        tokenizer_file = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(tokenizer_file):
            return None
        try:
            backend = tokenizers.Tokenizer.from_file(tokenizer_file)
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a bad file
            raise ValueError(f"{tokenizer_file} cannot be read as a tokenizer ({e}); it is damaged or not a "
                             f"Hugging Face tokenizer.json: download or save the tokenizer again") from None
        config = _read_json(os.path.join(path, CONFIG_FILE)) or {}
        _config_flags(backend, config.get("added_tokens_decoder"))
        kind = str(config.get("tokenizer_class")).removesuffix("Fast")
        if kind in _REBUILT_OTHERWISE:
            raise ValueError(f"{os.path.join(path, CONFIG_FILE)}: tokenizer_class {config['tokenizer_class']!r} is "
                             f"one that transformers 5 rebuilds with its own normalizer and pre-tokenizer, which "
                             f"jlora does not reproduce, so its token ids would differ from transformers'; jlora "
                             f"reads the tokenizers of the Llama, Mistral, Qwen and GPT-2 families")
        if kind in _SENTENCEPIECE_LLAMA and not _byte_level(tokenizer_file):
            _as_transformers_llama(backend, config, code=kind == "CodeLlamaTokenizer")
        elif kind in _BYTE_LEVEL_CLASSES:
            _set_add_prefix_space(backend, bool(config.get("add_prefix_space")))
        template, named = config.get("chat_template"), {}
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default")
        jinja_file = os.path.join(path, CHAT_TEMPLATE_FILE)
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        tokens = {name: _token_text(token) for name, token in _named_tokens(path, config).items()}
        generation = _read_json(os.path.join(path, GENERATION_CONFIG_FILE)) or {}
        eos_ids = generation.get("eos_token_id")
        eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
        # transformers 5: a list of extra_special_tokens replaces additional_special_tokens; a dict's tokens join them
        extra = config.get("extra_special_tokens") or []
        more = [*extra.values(), *(config.get("additional_special_tokens") or [])] if isinstance(extra, Mapping) \
            else list(extra) or list(config.get("additional_special_tokens") or [])
        tok = cls(
            backend,
            **tokens,
            chat_template=template,
            extra_eos_token_ids=eos_ids,
            keep_post_processor=True,
            other_tokens={name: _token_text(config.get(name)) for name in _OTHER_NAMES},
            additional_special_tokens=[_token_text(t) for t in more if _token_text(t)],
            split_special_tokens=bool(config.get("split_special_tokens")),
        )
        if template is None and named:   # for the error that rendering then raises
            tok._template_names = sorted(named)
        return tok

    @classmethod
    def from_gguf_metadata(cls, fields: Mapping[str, Any]) -> Tokenizer:
        """Rebuild the tokenizer a GGUF file's metadata describes.

        Args:
            fields: GGUF metadata as plain Python values, keyed by GGUF name (`"tokenizer.ggml.tokens"`
                -> list of str, `"tokenizer.ggml.bos_token_id"` -> int, ...), as `jlora.hf.gguf` reads them.

        Raises:
            ValueError: the file's tokenizer is neither byte-level BPE (`tokenizer.ggml.model` "gpt2") nor
                sentencepiece BPE ("llama"), or its pre-tokenizer (`tokenizer.ggml.pre`) is one we do not know.
        """
        kind = fields.get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise ValueError(
                f"GGUF tokenizer.ggml.model={kind!r} is not supported; jlora rebuilds byte-level BPE "
                "('gpt2': Llama 3, Qwen, SmolLM) and sentencepiece BPE ('llama': Llama 2, Mistral v0.x, TinyLlama) "
                "tokenizers. Convert the model to a Hugging Face folder with tokenizer.json instead."
            )
        tokens = list(fields["tokenizer.ggml.tokens"])
        types = list(fields.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
        if len(types) != len(tokens):
            raise ValueError(f"GGUF has {len(tokens)} tokenizer.ggml.tokens but {len(types)} token types")
        if kind == "gpt2":
            backend, vocab = _byte_level_from_gguf(fields, tokens)
        else:
            backend, vocab = _sentencepiece_from_gguf(fields, tokens)

        def name_of(key: str) -> str | None:
            i = fields.get(f"tokenizer.ggml.{key}")
            return None if i is None else tokens[int(i)]

        named = {"bos_token": name_of("bos_token_id"), "eos_token": name_of("eos_token_id"),
                 "unk_token": name_of("unknown_token_id"), "pad_token": name_of("padding_token_id")}
        # Control tokens become special tokens (matched whole, dropped by skip_special_tokens), user-defined
        # ones plain added tokens. A "control" token that is not in the vocabulary as spelled (one outside a
        # byte-level vocabulary's alphabet) is a llama.cpp mislabel that transformers skips too.
        special = [t for t, k in zip(tokens, types) if k == TOKEN_CONTROL and t in vocab]
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
        user = [t for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED and t in vocab]
        if user:
            backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
        end_of_turn = [int(fields[f"tokenizer.ggml.{k}_token_id"]) for k in ("eot", "eom")
                       if fields.get(f"tokenizer.ggml.{k}_token_id") is not None]
        return cls(
            backend,
            **named,   # llama.cpp (and transformers) add BOS for a sentencepiece vocabulary without the flag
            add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token", kind == "llama")),
            add_eos_token=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=fields.get("tokenizer.chat_template"),
            extra_eos_token_ids=end_of_turn,
        )

    # ------------------------------------------------------------------ properties

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def base_vocab_size(self) -> int:
        """Number of ids of the backend model's own vocabulary (its largest id + 1), added tokens not counted: the
        ids every text may encode to (an added token may be an unused spare)."""
        return max(self._backend.get_vocab(with_added_tokens=False).values(), default=-1) + 1

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self.token_to_id(self.unk_token)

    @property
    def add_bos_token(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` starts with BOS (read off the backend's post-processor)."""
        added, plain = self._probe()
        return self.bos_token_id is not None and len(added) > len(plain) and added[0] == self.bos_token_id

    @property
    def add_eos_token(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` ends with EOS."""
        added, plain = self._probe()
        return self.eos_token_id is not None and len(added) > len(plain) and added[-1] == self.eos_token_id

    def _probe(self) -> tuple[list[int], list[int]]:
        return (self._backend.encode("a", add_special_tokens=True).ids,
                self._backend.encode("a", add_special_tokens=False).ids)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: `eos_token_id` first, then end-of-turn ids the source names
        (GGUF `tokenizer.ggml.eot_token_id`/`eom_token_id`, `generation_config.json`'s `eos_token_id`)."""
        ids = [] if self.eos_token_id is None else [self.eos_token_id]
        return tuple(dict.fromkeys(ids + list(self._extra_eos)))

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pad={self.pad_token!r}, chat_template={'yes' if self._chat_template else 'no'})")

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS/EOS per the tokenizer's flags.

        Special tokens written in the text (e.g. `<|im_start|>`) always encode as their single ids.
        """
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode` without special tokens added, and each id's (start, end) character span in `text`.

        Examples:
            >>> from tokenizers import Tokenizer as Backend, models, pre_tokenizers
            >>> backend = Backend(models.WordLevel({"a": 0, "bc": 1}, unk_token="a"))
            >>> backend.pre_tokenizer = pre_tokenizers.Whitespace()
            >>> Tokenizer(backend).encode_offsets("a bc")
            ([0, 1], [(0, 1), (2, 4)])
        """
        encoding = self._backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True, after: Sequence[int] = ()) -> str:
        """Text of `ids`; special tokens are dropped when `skip_special_tokens`.

        `after`: the tokens that come before `ids` (a prompt, of which the last few are read). The text is then
        what `ids` add to theirs, so that prompt text + completion text = the text of both: a sentencepiece
        decoder strips the space that starts a text, and a completion "▁Paris" after "The capital is" is
        " Paris", not "Paris".
        """
        ids, after = [int(i) for i in ids], [int(i) for i in after]
        n = min(len(after), _CONTEXT_TOKENS)
        while True:
            context = after[len(after) - n:]
            head = self._backend.decode(context, skip_special_tokens=skip_special_tokens) if context else ""
            # back further while the cut splits a character spelled as byte tokens (a byte-fallback decoder turns
            # the whole run into U+FFFD, the completion's bytes too), or the context is all skipped tokens (the
            # decoder would strip the completion's leading space as the text's)
            if head and not head.startswith("\ufffd") or n >= min(len(after), _CONTEXT_TOKENS * 8):
                break
            n += 1
        text = self._backend.decode(context + ids, skip_special_tokens=skip_special_tokens)
        if text.startswith(head):
            return text[len(head):]
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)   # bytes joined across the seam

    # ------------------------------------------------------------------ chat

    def __getstate__(self):
        """Picklable (for data-loading worker processes): the compiled chat template is rebuilt on first use."""
        state = dict(self.__dict__)
        state.pop("_compiled_template", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._backend.encode_special_tokens = self.__dict__.get("_split_special", False)

    @functools.cached_property
    def _compiled_template(self):
        if self._chat_template is None:
            names = self._template_names
            if names:
                raise ValueError(f"this tokenizer has named chat templates {names} but none named 'default', so it "
                                 f"has no one chat template; write the one to use into the folder's "
                                 f"{CHAT_TEMPLATE_FILE} (transformers reads that file first, too)")
            raise ValueError("this tokenizer has no chat_template; pass a model with one, or format prompts yourself")
        return _jinja_env().from_string(self._chat_template)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` (dicts with "role" and "content") with the chat template.

        Args:
            messages: the conversation.
            add_generation_prompt: end with the assistant turn's opening, ready for generation (off by default,
                as in transformers: a prompt to generate from needs it on).
            tokenize: return token ids (encoded without adding BOS/EOS, as transformers does) instead of text.
            **template_kwargs: extra variables for the template (e.g. `tools`).
        """
        for m in messages:
            if not isinstance(m, Mapping):
                raise ValueError(f"chat messages must be dicts with 'role' and 'content'; got {m!r}")
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                     "pad_token": self.pad_token, **self._other_tokens}
        variables = {k: v for k, v in variables.items() if v is not None}
        text = self._compiled_template.render(   # tools and documents: None unless given, as transformers passes
            messages=[_template_message(m) for m in messages], add_generation_prompt=add_generation_prompt,
            **{"tools": None, "documents": None, **variables, **template_kwargs})
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def generation_spans(self, messages: Sequence[Mapping[str, Any]], **template_kwargs: Any
                         ) -> tuple[str, list[tuple[int, int]]] | None:
        """The whole conversation's text (no generation prompt) and the character spans that its chat template
        marks with `{% generation %}` (the assistant turns, as transformers' `return_assistant_tokens_mask` reads
        them); None for a template without such marks, or a conversation holding the marks' private-use
        characters (U+E000, U+E001).

        Examples:
            >>> from tokenizers import Tokenizer as Backend, models
            >>> marked = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' %}{% generation %}"
            ...           "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}; {% endfor %}")
            >>> tok = Tokenizer(Backend(models.BPE()), chat_template=marked)
            >>> text, spans = tok.generation_spans([{"role": "user", "content": "hi"},
            ...                                     {"role": "assistant", "content": "hello"}])
            >>> text, [text[i:j] for i, j in spans]
            ('user: hi; assistant: hello; ', ['hello'])
        """
        if self._chat_template is None or not _GENERATION_TAG.search(self._chat_template):
            return None
        if any(c in json.dumps([messages, template_kwargs], ensure_ascii=False, default=str) for c in _MARKS):
            return None
        token = _MARKING.set(True)
        try:
            marked = self.apply_chat_template(messages, add_generation_prompt=False, **template_kwargs)
        finally:
            _MARKING.reset(token)
        pieces = re.split(f"([{_MARKS}])", marked)
        if pieces[1::2] != list(_MARKS) * (len(pieces) // 4):    # marks that do not alternate: they were in the text
            return None
        text, spans = "", []
        for i, piece in enumerate(pieces[::2]):
            if i % 2:
                spans.append((len(text), len(text) + len(piece)))
            text += piece
        return text, spans

    # ------------------------------------------------------------------ save

    def save(self, folder: str | os.PathLike) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` (with the chat template) into `folder`,
        a pair transformers' `AutoTokenizer.from_pretrained(folder)` loads."""
        from jlora import files

        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        # each file written beside its name and renamed into place (`jlora.hf.save` may write into the folder the
        # model came from): a full disk leaves the old file whole, and the error names the file
        with files.replacing(os.path.join(folder, TOKENIZER_FILE)) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(self._backend.to_str(pretty=True))   # what the backend's save(path) writes, through Python I/O
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False,
        }
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if getattr(self, name) is not None:
                config[name] = getattr(self, name)
        config.update(self._other_tokens)
        if self._split_special:
            config["split_special_tokens"] = True
        if self._chat_template is not None:
            config["chat_template"] = self._chat_template
        files.replace_json(os.path.join(folder, CONFIG_FILE), config, ensure_ascii=False)


_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _template_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message as transformers' apply_chat_template hands it to the template: keys whose value is None left out
    (a Parquet struct gives every row every key; templates test ``'tool_calls' in message``), and a reasoning
    trace under any of its names also set as ``reasoning_content`` and ``thinking``, the names templates read."""
    out = {k: v for k, v in message.items() if v is not None}
    reasoning = next((out[k] for k in _REASONING_KEYS if k in out), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


def _template_processing(backend: tokenizers.Tokenizer, bos: str | None, eos: str | None):
    """A post-processor putting `bos`/`eos` (when not None) around each sequence, as transformers'
    `update_post_processor` builds it."""
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    special = [(t, backend.token_to_id(t)) for t in (bos, eos) if t]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _gguf_merges(fields: Mapping[str, Any]) -> list[tuple[str, str]]:
    merges = []
    for m in fields.get("tokenizer.ggml.merges") or ():
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"GGUF merge {m!r} is not two space-separated tokens")
        merges.append(tuple(parts))
    return merges


def _byte_level_from_gguf(fields: Mapping[str, Any], tokens: list[str]):
    """``(backend, vocab)`` of a byte-level BPE GGUF tokenizer (``tokenizer.ggml.model`` "gpt2"), with the split
    regex its ``tokenizer.ggml.pre`` names; the vocabulary spells every token in GPT-2's byte alphabet."""
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in SUPPORTED_GGUF_PRE:
        raise ValueError(
            f"GGUF tokenizer.ggml.pre={pre!r} (pre-tokenizer split regex) is not supported; "
            f"supported: {list(SUPPORTED_GGUF_PRE)}"
        )
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # A byte-level vocabulary is spelled in GPT-2's byte alphabet; respell any token that is not
    # (llama.cpp stores some added tokens as raw text).
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    backend = tokenizers.Tokenizer(models.BPE(vocab, _gguf_merges(fields), fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _SPLIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre in _DIGITS_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    return backend, vocab


def _sentencepiece_from_gguf(fields: Mapping[str, Any], tokens: list[str]):
    """``(backend, vocab)`` of a sentencepiece BPE GGUF tokenizer (``tokenizer.ggml.model`` "llama": Llama
    2, Mistral v0.x, TinyLlama) as transformers' GGUF loader builds it: the pieces as the file spells them ("▁" for
    a space, ``<0x0A>`` byte tokens for byte fallback), the file's merges or, as llama.cpp's converters write
    none, merges ranked by the merged piece's score (:func:`_merges_from_scores`), and transformers'
    ``LlamaTokenizer`` set-up, with llama.cpp's ``tokenizer.ggml.add_space_prefix`` (transformers ignores the
    flag; it is true in the files llama.cpp's converters write for these models)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _gguf_merges(fields)
    if not merges:
        scores = fields.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise ValueError(f"GGUF sentencepiece tokenizer has no tokenizer.ggml.merges and "
                             f"{'no' if scores is None else len(scores)} tokenizer.ggml.scores for {len(tokens)} "
                             f"tokens; one of them is needed to rebuild its merges")
        merges = _merges_from_scores(tokens, scores)
    backend = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True))
    _as_transformers_llama(backend, {"add_prefix_space": fields.get("tokenizer.ggml.add_space_prefix")})
    return backend, vocab


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """The BPE merges a sentencepiece vocabulary implies: every split of a piece into two pieces of the
    vocabulary, best-scored merged piece first (then longer left, then longer right part; ties in vocabulary
    order), the rank transformers' ``generate_merges`` gives.

    Examples:
        >>> _merges_from_scores(["a", "b", "c", "ab", "abc", "bc"], [0, 0, 0, -1, -3, -2])
        [('a', 'b'), ('b', 'c'), ('ab', 'c'), ('a', 'bc')]
    """
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece, score in dict(zip(tokens, scores)).items():   # a repeated piece: its first place, its last score
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids]
        splits.sort(key=lambda p: (ids[p[0]], ids[p[1]]))
        ranked += [(float(score), len(a), len(b), a, b) for a, b in splits]
    ranked.sort(key=lambda m: m[:3], reverse=True)   # stable: equal keys keep their order
    return [(a, b) for *_, a, b in ranked]


# Prompt tokens that Tokenizer.decode(after=...) reads: enough for a UTF-8 character spelled as byte tokens
_CONTEXT_TOKENS = 8


# tokenizer_config.json classes whose tokenizer.json transformers 5 does not run as written: it keeps the vocabulary,
# merges, added tokens and post-processor, and rebuilds the rest (transformers' LlamaTokenizer: Llama 2, Mistral v0.x
# and other sentencepiece-BPE folders).
_SENTENCEPIECE_LLAMA = ("LlamaTokenizer", "CodeLlamaTokenizer")   # (the "...Fast" names are the same classes)
# ... and classes it rebuilds in ways jlora does not follow (other normalizers and pre-tokenizers): refused by name
_REBUILT_OTHERWISE = ("GemmaTokenizer", "T5Tokenizer", "XLMRobertaTokenizer")


# tokenizer_config.json classes that transformers 5 rebuilds with a ByteLevel pre-tokenizer whose `add_prefix_space` is
# the config's (false when absent), whatever tokenizer.json says; the "...Fast" names are the same classes.
_BYTE_LEVEL_CLASSES = ("GPT2Tokenizer", "CodeGenTokenizer", "GPTNeoXTokenizer", "Qwen2Tokenizer", "Qwen3_5Tokenizer",
                       "CohereTokenizer")


def _set_add_prefix_space(backend: tokenizers.Tokenizer, add_prefix_space: bool) -> None:
    """Sets ``add_prefix_space`` on ``backend``'s ByteLevel pre-tokenizer (alone or a step of a Sequence), as the
    classes of ``_BYTE_LEVEL_CLASSES`` take it from tokenizer_config.json: with it, a text and each piece after a
    special token start with a space ("Hello" encodes as " Hello"). Only the flag is followed, not the rest of
    those classes' rebuild: GPT-2's, CodeGen's and GPT-NeoX's also drop a Split or Digits step that tokenizer.json
    puts before the ByteLevel (OLMo 2, SmolLM2, StarCoder 2 folders), Qwen2's put their own split regex in place of
    the file's, GPT-NeoX's drop the file's post-processor, and a ``config.json`` of some model types (olmo2,
    granite, gpt_bigcode) makes transformers run the file as written. jlora keeps the file's steps: the models
    were trained with them, and transformers 4 ran them.

    Examples:
        >>> backend = tokenizers.Tokenizer(models.BPE())
        >>> backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(), pre_tokenizers.ByteLevel()])
        >>> _set_add_prefix_space(backend, False)
        >>> backend.pre_tokenizer[1].add_prefix_space
        False
    """
    pre = backend.pre_tokenizer
    if pre is None:
        return
    state = json.loads(pre.__getstate__())
    if state["type"] == "ByteLevel":
        pre.add_prefix_space = add_prefix_space
    elif state["type"] == "Sequence":
        for i, step in enumerate(state["pretokenizers"]):
            if step["type"] == "ByteLevel":
                pre[i].add_prefix_space = add_prefix_space


def _byte_level(tokenizer_file: str) -> bool:
    """Whether a tokenizer.json uses byte-level BPE (Llama 3 style; DeepSeek's distilled and coder models declare
    ``LlamaTokenizerFast`` for one). transformers 5 then runs the file as written, not as its ``LlamaTokenizer``
    (whose sentencepiece set-up would drop the spaces), and so does jlora: the same test, "ByteLevel" in the file."""
    with open(tokenizer_file, encoding="utf-8") as f:
        return '"ByteLevel"' in f.read()


def _as_transformers_llama(backend: tokenizers.Tokenizer, config: Mapping[str, Any], *, code: bool = False) -> None:
    """Sets ``backend`` up as transformers 5's ``LlamaTokenizer`` does: no normalizer (tokenizer.json's
    ``Prepend("▁")`` + ``Replace(" ", "▁")``), a ``Metaspace`` pre-tokenizer that prepends "▁" to the first piece
    only (every piece with ``legacy: true``; none with ``add_prefix_space: false``), and its decoder. Text after a
    special token, as chat templates make, then gets no extra "▁", and a leading space is not doubled. ``code``:
    as its ``CodeLlamaTokenizer`` does, which reads no ``legacy`` and always strips the decoded text's first space.
    (Its byte fallback stays as tokenizer.json has it: without one, a character outside the vocabulary is
    ``<unk>``, where transformers turns byte fallback on and, with no byte tokens, drops the character.)"""
    prefix = config.get("add_prefix_space")
    prefix = True if prefix is None else bool(prefix)
    scheme = ("always" if config.get("legacy", False) and not code else "first") if prefix else "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix or code else []))


def _config_flags(backend: tokenizers.Tokenizer, decoder: Any) -> None:
    """Gives ``backend``'s added tokens the flags (lstrip, rstrip, single_word, normalized, special) that
    tokenizer_config.json's ``added_tokens_decoder`` sets for them, where they differ from tokenizer.json's: as
    transformers 5 reads a folder, the config's win."""
    current = backend.get_added_tokens_decoder()
    flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
    for key, spec in (decoder or {}).items() if isinstance(decoder, Mapping) else ():
        token = current.get(int(key)) if str(key).isdigit() else None
        if token is None or not isinstance(spec, Mapping) or spec.get("content") != token.content:
            continue
        want = {f: bool(spec.get(f, getattr(token, f))) for f in flags}
        if any(want[f] != getattr(token, f) for f in flags):   # re-adding a token keeps its id, takes the flags
            (backend.add_special_tokens if want["special"] else backend.add_tokens)([AddedToken(token.content, **want)])


def _read_json(path: str) -> dict | None:
    """The JSON object in ``path`` (a folder's tokenizer_config.json, generation_config.json, ...), None when there is
    no such file; a ValueError naming the file when it is damaged."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            value = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); the file is damaged: download or save the model "
                             f"again") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object; the file is damaged: download "
                         f"or save the model again")
    return value


# `{% generation %}` blocks: rendered between these private-use characters while `generation_spans` renders.
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
_MARKS = "\ue000\ue001"
_MARKING = contextvars.ContextVar("jlora_mark_generation", default=False)


@functools.cache
def _jinja_env():
    """A sandboxed Jinja environment configured like transformers' chat template renderer."""
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers): render the body as is, or between
        `_MARKS` while `Tokenizer.generation_spans` renders."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return f"{_MARKS[0]}{caller()}{_MARKS[1]}" if _MARKING.get() else caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env
