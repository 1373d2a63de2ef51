"""Jitted autoregressive decoding with a KV cache: greedy, temperature, top-k, top-p; batched left-padded prompts.

One compiled function runs the whole generation: a prefill call on the (left-padded) prompts fills the
:class:`~jlora.models.layers.KVCache`, then a ``lax.while_loop`` feeds one token per step until
``max_new_tokens`` or until every row has produced an end-of-sequence id. ``use_cache=False`` is the reference
path: each step recomputes the logits of the whole fixed-size sequence (prompt + room for the new tokens,
future slots masked out); it is token-identical to the cached path and exists to prove it.

The model is called through ``apply_fn(params, input_ids, attention_mask=..., cache=...)``, where ``params`` is
whatever was passed to :func:`generate` (traced, not baked into the compiled code). The default is
``model.apply({"params": params}, ...)``. For unmerged LoRA adapters use :func:`lora_apply_fn`:

    generate(model, (params, adapters), prompts, max_new_tokens=32, apply_fn=lora_apply_fn(model, lora_cfg))

``apply_fn`` is a static argument of the compiled function: pass the same (hashable) object each call to reuse
the compilation; a fresh lambda per call recompiles.

Randomness is explicit: sampling (``temperature > 0``) needs ``key``; step ``i`` uses ``fold_in(key, i)``.

Per-row settings (what a server batching unrelated requests needs): ``temperature``, ``top_k`` and ``top_p`` may
be sequences with one value per row (``0`` = greedy row, ``top_k=0`` and ``top_p=1`` = no filter), and ``key``
may hold one key per row; then row ``r`` draws with ``fold_in(key[r], i)`` alone, so its tokens do not depend on
the other rows of the batch (one key with per-row settings: row ``r``'s key is ``split(key, B)[r]``, so that rows
draw independently, as with scalar settings). These values are traced: any mix of settings shares one compilation.

``on_step(step, tokens, done) -> stop`` (static, like ``apply_fn``) is called on the host after every decoding step
with the step's tokens (B,) and which rows have ended (B,); it returns a (B,) bool array of rows to end now (after
this step's token). It streams tokens while the compiled loop runs and ends rows early (a client gone, a stop
string seen, a per-row token limit reached).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class GenerateOutput(NamedTuple):
    """Generated tokens (prompt excluded).

    Attributes:
        tokens: (B, max_new_tokens) int32; after a row's end-of-sequence token the rest is ``pad_token_id``.
        lengths: (B,) int32, tokens generated per row, the end-of-sequence token included.
    """

    tokens: np.ndarray
    lengths: np.ndarray

    def to_lists(self) -> list[list[int]]:
        """Each row's generated tokens up to and including its end-of-sequence token."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


@dataclasses.dataclass(frozen=True)
class _ModelApply:
    """The default ``apply_fn``: ``model.apply({"params": params}, ...)``; hashable so compilations are reused."""

    model: Any

    def __call__(self, params, *args, **kwargs):
        return self.model.apply({"params": params}, *args, **kwargs)


@dataclasses.dataclass(frozen=True)
class _LoraApply:
    model: Any
    lora_config: Any

    def __call__(self, params_and_adapters, *args, **kwargs):
        from jlora import transform

        params, adapters = params_and_adapters
        return transform.apply(self.model, params, adapters, self.lora_config, *args, **kwargs)


def lora_apply_fn(model, lora_config) -> Callable:
    """An ``apply_fn`` running ``model`` with unmerged adapters; pass ``(params, adapters)`` as ``params``.

    Equal objects for equal ``(model, lora_config)``, so repeated :func:`generate` calls reuse the compilation.
    """
    return _LoraApply(model, lora_config)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_token_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to a (B, T) int32 array and its attention mask (1 for real tokens).

    Examples:
        >>> ids, mask = pad_prompts([[5, 6, 7], [8]], pad_token_id=0)
        >>> ids.tolist(), mask.tolist()
        ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    if not len(prompts) or any(len(p) == 0 for p in prompts):
        raise ValueError("`prompts` must be a non-empty list of non-empty token lists")
    t = max(len(p) for p in prompts)
    ids = np.full((len(prompts), t), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = np.asarray(p, np.int32)
        mask[i, t - len(p):] = 1
    return ids, mask


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: ``temperature == 0`` is greedy (argmax); otherwise logits / temperature,
    then the ``top_k`` largest, then the smallest set with probability >= ``top_p``, then a categorical draw."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise ValueError(f"temperature={self.temperature} must be a finite number >= 0 (0 is greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1 or None")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] or None")

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """Next tokens (B,) int32 from float32 logits (B, V)."""
        if self.temperature < np.finfo(np.float32).tiny:   # 0, or a float32 subnormal, which XLA flushes to 0
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = logits / self.temperature
        neg = jnp.finfo(logits.dtype).min
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = jax.lax.top_k(logits, self.top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, neg, logits)
        if self.top_p is not None and self.top_p < 1.0:
            desc = -jnp.sort(-logits, axis=-1)
            probs = jax.nn.softmax(desc, axis=-1)
            keep = (jnp.cumsum(probs, axis=-1) - probs) < self.top_p       # always keeps the top token
            cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
            logits = jnp.where(logits < cutoff, neg, logits)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class RowSettings(NamedTuple):
    """Per-row sampling settings, (B,) arrays: ``temperature`` (0: greedy), ``top_k`` (0: off), ``top_p`` (1: off),
    ``keys`` (one PRNG key per row)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    keys: jax.Array


@dataclasses.dataclass(frozen=True)
class PerRowSampling:
    """:class:`Sampling` with each row's own settings and key (a :class:`RowSettings`, traced). A row with
    ``temperature == 0`` takes the argmax; the others filter and draw exactly as :class:`Sampling` does with that
    row's values, from ``fold_in(keys[r], step)``. ``filtered=False`` skips the sort (no row uses top-k/top-p).

    Examples:
        >>> logits = jnp.log(jnp.asarray([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
        >>> rows = RowSettings(jnp.asarray([0.0, 1.0]), jnp.asarray([0, 1]), jnp.asarray([1.0, 1.0]),
        ...                    jax.random.split(jax.random.key(0), 2))
        >>> PerRowSampling(filtered=True)(logits, rows, 0).tolist()     # row 0 greedy, row 1 top-1
        [1, 0]
    """

    filtered: bool = True

    def __call__(self, logits: jax.Array, rows: RowSettings, step) -> jax.Array:
        temp = rows.temperature.astype(logits.dtype)
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        x = logits / jnp.where(temp > 0, temp, 1.0)[:, None]
        neg = jnp.finfo(x.dtype).min
        if self.filtered:
            v = x.shape[-1]
            desc = -jnp.sort(-x, axis=-1)
            k = jnp.where((rows.top_k > 0) & (rows.top_k < v), rows.top_k, v).astype(jnp.int32)
            kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
            x = jnp.where(x < kth, neg, x)
            desc = jnp.where(desc < kth, neg, desc)
            top_p = rows.top_p.astype(x.dtype)[:, None]
            probs = jax.nn.softmax(desc, axis=-1)
            keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
            cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
            x = jnp.where((top_p < 1.0) & (x < cutoff), neg, x)
        draw = jax.vmap(lambda key, row: jax.random.categorical(jax.random.fold_in(key, step), row))
        return jnp.where(temp > 0, draw(rows.keys, x).astype(jnp.int32), greedy)


def _row_settings(b: int, temperature, top_k, top_p, key) -> tuple[RowSettings, bool]:
    """Broadcasts per-row (or scalar) settings to (B,) arrays and checks them; also whether any row filters."""
    def per_row(x, name, dtype, off):
        arr = np.broadcast_to(np.asarray(off if x is None else x, dtype), (b,)) if np.ndim(x) == 0 \
            else np.asarray(x, dtype)
        if arr.shape != (b,):
            raise ValueError(f"`{name}` has {arr.shape[0]} values for a batch of {b} rows: pass one per row")
        return arr

    temp = per_row(temperature, "temperature", np.float32, 0.0)
    k = per_row(top_k, "top_k", np.int64, 0)
    p = per_row(top_p, "top_p", np.float32, 1.0)
    if not (np.isfinite(temp) & (temp >= 0)).all() or (k < 0).any() or not ((p > 0) & (p <= 1)).all():
        raise ValueError(f"per-row settings out of range: temperature {temp.tolist()} must be finite and >= 0, top_k "
                         f"{k.tolist()} >= 0 (0: off), top_p {p.tolist()} in (0, 1]")
    if (temp > 0).any() and key is None:
        raise ValueError("sampling with temperature > 0 needs an explicit PRNG `key` (e.g. jax.random.key(0), or "
                         "one key per row)")
    keys = jax.random.split(jax.random.key(0), b) if key is None else key
    if np.ndim(keys) == 0:     # one key: one per row from it (the same key for all would draw every row alike)
        keys = jax.random.split(keys, b)
    if np.shape(keys) != (b,):
        raise ValueError(f"`key` holds {np.shape(keys)} keys for a batch of {b} rows: pass one key or one per row")
    k = np.minimum(k, np.iinfo(np.int32).max).astype(np.int32)      # any k >= the vocabulary keeps every token
    filtered = bool(((k > 0) | (p < 1))[temp > 0].any())
    return RowSettings(jnp.asarray(temp), jnp.asarray(k), jnp.asarray(p), keys), filtered


def generate(model, params, prompts, *, max_new_tokens: int, temperature: float | Sequence[float] = 0.0,
             top_k: int | Sequence[int] | None = None, top_p: float | Sequence[float] | None = None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             key: jax.Array | None = None, attention_mask=None, use_cache: bool = True,
             apply_fn: Callable | None = None, cache_dtype=None, stream: Callable[[np.ndarray], None] | None = None,
             on_step: Callable | None = None) -> GenerateOutput:
    """Generates up to ``max_new_tokens`` tokens after each prompt.

    Args:
        model: a jlora model (``LlamaForCausalLM``/``GPT2LMHeadModel``; its ``config`` sizes the cache).
        params: passed as the first argument of ``apply_fn`` (default: the model's param tree).
        prompts: a list of token-id lists (left-padded here), or a (B, T) array, left-padded, with
            ``attention_mask`` (default all ones).
        max_new_tokens: number of decoding steps at most.
        temperature, top_k, top_p: see :class:`Sampling`; ``temperature=0`` (default) is greedy. Each may be a
            sequence of per-row values (see :class:`PerRowSampling`).
        eos_token_id: an id or ids that end a row; default the model config's ``eos_token_id``; ``()`` never stops.
        pad_token_id: fills prompt padding and the output after a row ends; default the config's, else 0.
        key: PRNG key, required when sampling; or (B,) keys, one per row (per-row sampling).
        attention_mask: (B, T) mask of an array ``prompts``.
        use_cache: False recomputes the whole sequence at every step (the slow reference path).
        stream: called on the host with each step's (B,) tokens as they are chosen, from inside the compiled loop
            (``jax.debug.callback``, in order; rows that have ended get ``pad_token_id``); a static argument like
            ``apply_fn``. Call ``jax.effects_barrier()`` after :func:`generate` to be sure every call has run.
        apply_fn: ``apply_fn(params, input_ids, attention_mask=..., cache=...)`` with the signature of
            ``model.apply`` minus the variables wrapping: returns logits, or ``(logits, cache)`` when given
            ``cache``. See :func:`lora_apply_fn`.
        cache_dtype: dtype of cached keys/values; default the model's compute dtype.
        on_step: ``on_step(step, tokens, done) -> stop``, called on the host after each step (see the module
            docstring); pass the same (hashable) object each call to reuse the compilation.

    Returns:
        :class:`GenerateOutput` of numpy arrays.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jlora.models.llama import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1))
        >>> params = model.init(jax.random.key(0), jnp.ones((1, 2), jnp.int32))["params"]
        >>> out = generate(model, params, [[1, 2, 3], [4]], max_new_tokens=5)
        >>> out.tokens.shape, out.lengths.tolist()
        ((2, 5), [5, 5])
    """
    cfg = model.config
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if key is not None and not jax.dtypes.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
        if jnp.result_type(key) != jnp.uint32 or np.shape(key)[-1:] != (2,):
            raise ValueError(f"`key` must be a PRNG key (jax.random.key(0)), or one per row; got an array of "
                             f"{jnp.result_type(key)} {np.shape(key)}")
        key = jax.random.wrap_key_data(key)          # a legacy jax.random.PRNGKey(0): uint32[2] per key
    per_row = any(np.ndim(x) > 0 for x in (temperature, top_k, top_p)) or (key is not None and np.ndim(key) > 0)
    if not per_row:
        sampling = Sampling(float(temperature), top_k, top_p)
        if sampling.temperature > 0 and key is None:
            raise ValueError("sampling with temperature > 0 needs an explicit PRNG `key` (e.g. jax.random.key(0))")
    if pad_token_id is None:
        pad_token_id = getattr(cfg, "pad_token_id", None) or 0
    if eos_token_id is None:
        eos_token_id = tuple(getattr(cfg, "eos_token_id", ()) or ())
    eos = (int(eos_token_id),) if isinstance(eos_token_id, (int, np.integer)) else tuple(int(e) for e in eos_token_id)
    if isinstance(prompts, (list, tuple)) and (not prompts or not hasattr(prompts[0], "shape")
                                               or np.ndim(prompts[0]) == 1):
        if attention_mask is not None:
            raise ValueError("`attention_mask` is for array prompts; token lists are padded here")
        ids, mask = pad_prompts(prompts, pad_token_id)
    else:
        ids = np.asarray(prompts, np.int32)
        if ids.ndim != 2:
            raise ValueError(f"`prompts` array must be (batch, length); got shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
        if mask.shape != ids.shape:
            raise ValueError(f"`attention_mask` shape {mask.shape} differs from `prompts` shape {ids.shape}")
    if not mask[:, -1].all():
        raise ValueError("prompts must be left-padded: every row's last token must be real (attention_mask 1)")
    limit = getattr(cfg, "n_positions", None)
    if limit is not None and int(mask.sum(1).max()) + max_new_tokens > limit:
        raise ValueError(f"prompt + max_new_tokens = {int(mask.sum(1).max()) + max_new_tokens} exceeds the "
                         f"model's {limit} learned positions (n_positions)")
    apply_fn = _ModelApply(model) if apply_fn is None else apply_fn
    if per_row:
        key, filtered = _row_settings(ids.shape[0], temperature, top_k, top_p, key)
        sampling = PerRowSampling(filtered)
    key = jax.random.key(0) if key is None else key
    eos_ids = jnp.asarray(eos if eos else (-1,), jnp.int32)
    # The empty cache is made outside the jit and passed in: built inside, its zeros are constants and XLA spends
    # seconds per layer constant-folding the prefill's attention over them.
    from jlora import models

    cache = models.init_cache(cfg, ids.shape[0], ids.shape[1] + max_new_tokens, cache_dtype) if use_cache else None
    tokens, lengths = _generate(params, jnp.asarray(ids), jnp.asarray(mask), key, eos_ids, cache, model=model,
                                apply_fn=apply_fn, max_new_tokens=max_new_tokens, sampling=sampling,
                                pad=int(pad_token_id), use_cache=use_cache, cache_dtype=cache_dtype, stream=stream,
                                on_step=on_step)
    return GenerateOutput(np.asarray(tokens), np.asarray(lengths))


@functools.partial(jax.jit, static_argnames=("model", "apply_fn", "max_new_tokens", "sampling", "pad", "use_cache",
                                             "cache_dtype", "stream", "on_step"))
def _generate(params, ids, mask, key, eos_arr, cache, *, model, apply_fn, max_new_tokens, sampling, pad, use_cache,
              cache_dtype, stream=None, on_step=None):
    b, t = ids.shape
    n = max_new_tokens

    if use_cache:
        logits, cache = apply_fn(params, ids, attention_mask=mask, cache=cache)
        state = cache

        def step(tok, live, state):
            logits, cache = apply_fn(params, tok[:, None], attention_mask=live[:, None].astype(jnp.int32),
                                     cache=state)
            return logits[:, -1], cache
    else:
        seq = jnp.concatenate([ids, jnp.full((b, n), pad, jnp.int32)], axis=1)
        seq_mask = jnp.concatenate([mask, jnp.zeros((b, n), jnp.int32)], axis=1)
        logits = apply_fn(params, seq, attention_mask=seq_mask)[:, :t]
        state = (seq, seq_mask, jnp.asarray(t, jnp.int32))

        def step(tok, live, state):
            seq, seq_mask, cur = state
            zero = jnp.zeros((), jnp.int32)
            seq = jax.lax.dynamic_update_slice(seq, tok[:, None], (zero, cur))
            seq_mask = jax.lax.dynamic_update_slice(seq_mask, live[:, None].astype(jnp.int32), (zero, cur))
            logits = apply_fn(params, seq, attention_mask=seq_mask)
            return jax.lax.dynamic_index_in_dim(logits, cur, axis=1, keepdims=False), (seq, seq_mask, cur + 1)

    def pick(last, i, done):
        if isinstance(sampling, PerRowSampling):
            tok = sampling(last, key, i)            # `key` holds the RowSettings
        else:
            tok = sampling(last, jax.random.fold_in(key, i))
        tok = jnp.where(done, pad, tok)
        if stream is not None:
            jax.debug.callback(stream, tok, ordered=True)
        done = done | jnp.any(tok[:, None] == eos_arr[None, :], axis=1)
        if on_step is not None:
            from jax.experimental import io_callback

            stop = io_callback(on_step, jax.ShapeDtypeStruct((b,), jnp.bool_), i, tok, done)
            done = done | stop
        return tok, done

    out = jnp.full((b, n), pad, jnp.int32)
    done = jnp.zeros((b,), bool)
    tok, done_next = pick(logits[:, -1], 0, done)
    out = out.at[:, 0].set(tok)
    lengths = jnp.ones((b,), jnp.int32)

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, tok, state, done, out, lengths = carry
        last, state = step(tok, ~done, state)
        tok, new_done = pick(last, i, done)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (jnp.zeros((), jnp.int32), i))
        lengths = lengths + (~done).astype(jnp.int32)
        return i + 1, tok, state, new_done, out, lengths

    carry = (jnp.asarray(1, jnp.int32), tok, state, done_next, out, lengths)
    _, _, _, _, out, lengths = jax.lax.while_loop(cond, body, carry)
    return out, lengths


__all__ = ["generate", "GenerateOutput", "Sampling", "PerRowSampling", "RowSettings", "lora_apply_fn", "pad_prompts"]
