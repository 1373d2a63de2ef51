"""The serving engine: one base model, a bank of hot-swappable adapter slots, and a worker thread that decodes
queued requests together (``jlora serve``'s core; no HTTP here, so a library call can do everything it does).

Batching: a request is one or more :class:`Row` (a prompt and its settings). The worker takes every queued row,
up to ``max_batch``, once the oldest has waited ``window_ms`` (or at once when the batch is full or the rows
waited through the previous batch), and decodes them in one call of :func:`jlora.models.generate.generate`
whatever their adapters: row ``i`` uses its adapter's bank slot (:func:`jlora.bank.apply_fn`), a batch of base
rows only runs the plain model. Rows do not join a batch that is already decoding (no step-level continuous
batching); they form the next one.

Compilations are bounded: the batch is padded to one of a few sizes (``batch_sizes``), prompts are left-padded to
a power-of-two width and the token budget rounded up to a power of two (each row still stops at its own
``max_tokens``, end-of-sequence token or cancellation, through generate's ``on_step`` hook, which also streams
each token as it is decoded), and sampling settings are per-row arrays, not compile-time constants (but whether
any sampled row of a batch filters with top-k or top-p picks one of two compiled variants: the first such batch of
a shape compiles once, as a new shape does; :meth:`Engine.warmup` compiles greedy decoding). Adding,
replacing or removing an adapter writes a slot of the bank (a data update), so it never recompiles and never
pauses decoding: a batch keeps the bank it started with, and names resolve to slots when a batch forms.

Examples:
    >>> buckets(100)
    (16, 32, 64, 100)
    >>> bucket(20, buckets(100)), bucket(100, buckets(100))
    (32, 100)
    >>> batch_sizes(8), batch_sizes(6)
    ((1, 2, 4, 8), (1, 2, 4, 6))
"""

from __future__ import annotations

import collections
import dataclasses
import math
import pathlib
import re
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import bank as bank_lib

BASE = bank_lib.BASE
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


# --- errors the HTTP layer maps to status codes ------------------------------------------------------------------

class EngineError(ValueError):
    """A request the engine refuses; ``status`` is the HTTP status it maps to (a ValueError: outside a server,
    e.g. a bad ``--adapter`` name given to ``jlora serve``, it is a user error)."""

    status = 400

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


class QueueFull(EngineError):
    status = 429


class UnknownModel(EngineError):
    status = 404


class Conflict(EngineError):
    status = 409


class Closed(EngineError):
    status = 503


# --- events a row's sink receives (from the worker thread) -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Token:
    """One decoded token of a row."""

    id: int


@dataclasses.dataclass(frozen=True)
class End:
    """The row is finished: ``reason`` is ``"stop"`` (end-of-sequence token), ``"length"`` (``max_tokens``
    reached) or ``"cancelled"``."""

    reason: str


@dataclasses.dataclass(frozen=True)
class Failed:
    """The row failed: ``status`` and ``message`` as the HTTP layer reports them."""

    status: int
    message: str


@dataclasses.dataclass(eq=False)
class Row:
    """One prompt to decode and where its events go.

    ``sink`` is called from the engine's worker thread, once per :class:`Token`, then once with :class:`End` or
    :class:`Failed`; it must be quick and must not block. ``adapter`` is an adapter name or None for the base.
    ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 are off. A sampled row draws from
    ``fold_in(key(seed), index)`` (``jlora generate --seed`` draws prompt ``i`` from ``fold_in(key(seed), i)``), so
    its tokens depend on its seed alone, never on the rows batched with it; no seed: a random key. Call
    :meth:`cancel` to end the row early (a client gone, a stop string seen): it ends after the next decoded token.
    """

    prompt: Sequence[int]
    sink: Callable[[Any], None]
    adapter: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    index: int = 0
    ignore_eos: bool = False
    cancelled: bool = False
    tokens: list = dataclasses.field(default_factory=list)
    finished: bool = False
    queued_at: float = 0.0

    def cancel(self) -> None:
        self.cancelled = True


def seed_key_data(seed: int) -> np.ndarray:
    """Threefry key data for ``seed``: ``jax.random.key(seed)``'s for seeds in [-2**31, 2**32) (JAX keeps the low 32
    bits, and a zero high word), all 64 bits of the others.

    Examples:
        >>> seed_key_data(7).tolist(), seed_key_data(-7).tolist(), seed_key_data(2**40 + 1).tolist()
        ([0, 7], [0, 4294967289], [256, 1])
    """
    seed = int(seed)
    if -2**31 <= seed < 2**32:
        return np.asarray([0, seed % 2**32], np.uint32)
    s = seed % 2**64
    return np.asarray([s >> 32, s & 0xFFFFFFFF], np.uint32)


# --- shapes ------------------------------------------------------------------------------------------------------

def buckets(limit: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from ``smallest`` below ``limit``, then ``limit``: the padded sizes a length rounds up to."""
    out, n = [], smallest
    while n < limit:
        out.append(n)
        n *= 2
    return (*out, limit)


def bucket(n: int, sizes: Sequence[int]) -> int:
    """The smallest of ``sizes`` that holds ``n``."""
    for s in sizes:
        if n <= s:
            return s
    raise ValueError(f"{n} exceeds the largest size {sizes[-1]}")


def batch_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch``, then ``max_batch``: the batch sizes a batch is padded to."""
    return buckets(max_batch, 1)


def linear_targets(params: Mapping) -> tuple[str, ...]:
    """Regexes selecting every kernel inside the layer stack (attention and MLP projections), not the embeddings
    or the output head: the default set of paths a server's bank covers.

    Examples:
        >>> linear_targets({"layers_0": {"self_attn": {"q_proj": {"kernel": 0}}, "mlp": {"up_proj": {"kernel": 0}}},
        ...                 "lm_head": {"kernel": 0}, "embed_tokens": {"embedding": 0}})
        ('(^|/)q_proj/kernel$', '(^|/)up_proj/kernel$')
    """
    from jlora import tree as tree_lib

    names = sorted({p.split("/")[-2] for p in tree_lib.flatten(params)
                    if p.endswith("/kernel") and p.count("/") >= 2})
    return tuple(f"(^|/){re.escape(n)}/kernel$" for n in names)


# --- configuration -----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How an :class:`Engine` batches and what its bank holds.

    Attributes:
        slots: adapter slots in the bank (adapters served at once).
        rank: the bank's rank R (the largest adapter rank it holds); None: 16, or the largest rank of the adapters
            given at start.
        targets: regexes of the kernels the bank covers; None: the paths the adapters given at start use, or
            every kernel in the layer stack when none are given. Each covered kernel costs decoding time for
            every adapted row, used by its adapter or not.
        max_batch: rows decoded together at most.
        batch_sizes: the sizes a batch is padded to (each compiles once); None: powers of two up to max_batch.
        max_queue: rows waiting for a batch at most; more is refused (HTTP 429).
        window_ms: how long the oldest waiting row waits for others before its batch starts.
    """

    slots: int = 8
    rank: int | None = None
    targets: tuple[str, ...] | None = None
    max_batch: int = 8
    batch_sizes: tuple[int, ...] | None = None
    max_queue: int = 64
    window_ms: float = 10.0

    def __post_init__(self):
        if self.slots < 1 or self.max_batch < 1 or self.max_queue < 1:
            raise ValueError(f"slots ({self.slots}), max_batch ({self.max_batch}) and max_queue ({self.max_queue}) "
                             f"must be >= 1")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1; got {self.rank}")
        if self.window_ms < 0:
            raise ValueError(f"window_ms must be >= 0; got {self.window_ms}")
        if self.batch_sizes is not None:
            sizes = tuple(sorted(set(int(s) for s in self.batch_sizes)))
            if not sizes or sizes[0] < 1 or sizes[-1] != self.max_batch:
                raise ValueError(f"batch_sizes {list(self.batch_sizes)} must be >= 1 and end at max_batch "
                                 f"({self.max_batch}), e.g. {list(batch_sizes(self.max_batch))}")
            object.__setattr__(self, "batch_sizes", sizes)

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.batch_sizes or batch_sizes(self.max_batch)


# --- the engine --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class _StepHook:
    """generate's ``on_step``: one object per engine (hashed by identity), so the compilation is reused; it holds
    the engine weakly (jit's cache keeps the hook, and must not keep a closed engine alive)."""

    engine: Any     # weakref.ref to the Engine

    def __call__(self, step, tokens, done):
        engine = self.engine()
        if engine is None:
            return np.ones(np.shape(tokens), bool)
        return engine._on_step(np.asarray(tokens), np.asarray(done))


@dataclasses.dataclass
class _Batch:
    rows: list


class Engine:
    """Serves ``loaded`` (a :func:`jlora.hf.load` result) with a bank of adapter slots; see the module docstring.

    Args:
        loaded: the base model, params and tokenizer.
        config: an :class:`EngineConfig`.
        adapters: ``{name: folder}`` (PEFT or run folders) to load at start.
        name: the base model's name in requests (default ``loaded.name``).
        start: start the worker thread now (else call :meth:`start`).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jlora.hf import Loaded
        >>> from jlora.models.llama import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, vocab_size=64))
        >>> params = model.init(jax.random.key(0), jnp.ones((1, 2), jnp.int32))["params"]
        >>> loaded = Loaded(model, params, model.config, None, "tiny", None, {})
        >>> with Engine(loaded, EngineConfig(slots=2, rank=4, max_batch=2)) as engine:
        ...     out = engine.generate([1, 2, 3], max_tokens=4, ignore_eos=True)
        >>> len(out.tokens), out.finish_reason
        (4, 'length')
    """

    def __init__(self, loaded, config: EngineConfig = EngineConfig(), *, adapters: Mapping[str, Any] | None = None,
                 name: str | None = None, start: bool = True):
        import jlora
        from jlora import checkpoint

        self.loaded, self.config, self.model = loaded, config, loaded.model
        self.name = name or loaded.name
        cfg = loaded.config
        tok = loaded.tokenizer
        eos = tuple(tok.eos_token_ids) if tok is not None else ()
        if not eos:
            e = getattr(cfg, "eos_token_id", None)
            eos = tuple(e) if isinstance(e, (list, tuple)) else (() if e is None else (int(e),))
        self.eos = frozenset(int(e) for e in eos)
        pad = tok.pad_token_id if tok is not None else None
        self.pad = int(pad if pad is not None else (getattr(cfg, "pad_token_id", None) or 0))
        self.learned_positions = getattr(cfg, "n_positions", None)
        self.context = int(self.learned_positions or getattr(cfg, "max_position_embeddings", 0) or 2048)
        self.vocab_size = int(getattr(cfg, "vocab_size", 0) or (tok.vocab_size if tok is not None else 0))
        self.prompt_sizes = buckets(self.context)

        example = jnp.ones((1, 8), jnp.int32)
        self.layout = jlora.layout(self.model, example)
        read = {n: (f, *bank_lib.read_folder(f, loaded)) for n, f in (adapters or {}).items()}
        for n in read:
            self._check_name(n)
        targets = config.targets
        if targets is None:
            used = sorted({p for _, ads, _, _ in read.values() for p, _ in _adapter_items(ads)})
            targets = tuple(f"^{re.escape(p)}$" for p in used) or linear_targets(loaded.params)
        rank = config.rank or max([16] + [node.rank for _, ads, _, _ in read.values()
                                          for _, node in _adapter_items(ads)])
        bank = bank_lib.create(loaded.params, capacity=config.slots, rank=rank, targets=targets, layout=self.layout,
                               fingerprint=checkpoint.fingerprint(loaded.params))
        if len(read) > config.slots:
            raise ValueError(f"{len(read)} adapters given but the bank has {config.slots} slots; raise --slots")
        self._names: dict[str, int] = {}
        self._info: dict[str, dict] = {}
        for slot, (n, (folder, ads, acfg, fp)) in enumerate(read.items()):
            try:
                bank = bank_lib.put(bank, slot, ads, acfg, fingerprint=fp)
            except ValueError as e:
                raise ValueError(f"adapter {n!r} ({folder}): {e}") from e
            self._names[n] = slot
            self._info[n] = _info(folder, _base_note(folder, loaded))
        self._bank = bank
        self._bank_apply = bank_lib.apply_fn(self.model)
        self._hook = _StepHook(weakref.ref(self))
        self._lock = threading.Lock()        # names and bank: read when a batch forms, written by swaps
        self._mutate = threading.Lock()      # one swap at a time
        self._cv = threading.Condition()     # the queue
        self._queue: collections.deque[Row] = collections.deque()
        self._closed = False
        self._current: _Batch | None = None
        self._thread: threading.Thread | None = None
        self.metrics = Metrics()
        self.created = int(time.time())
        if start:
            self.start()

    # -- lifecycle --

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="jlora-serve-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stops the worker after the running batch; rows still queued fail with 503."""
        with self._cv:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        for row in left:
            _send(row, Failed(503, "the server is shutting down"))
        if self._thread is not None:
            self._thread.join()

    def abort(self, message: str = "the server is shutting down", status: int = 503) -> None:
        """Ends every request now: queued and running rows fail with ``status`` (the running batch stops at its next
        token) and no new row is taken; a server's shutdown, so that every client gets an error response."""
        with self._cv:
            self._closed = True
            rows = list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        batch = self._current
        rows += [] if batch is None else [r for r in batch.rows if not r.finished]
        for row in rows:
            row.finished = True
            _send(row, Failed(status, message))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- adapters --

    @property
    def bank(self) -> bank_lib.Bank:
        return self._bank

    def adapters(self) -> dict[str, dict]:
        """``{name: {"slot", "path", "created"}}`` of the loaded adapters, and ``"warning"`` for one whose loading
        warned (a PEFT folder naming another base model)."""
        with self._lock:
            return {n: {"slot": s, **self._info[n]} for n, s in self._names.items()}

    def models(self) -> list[str]:
        """The base's name, then the adapters' names: what a request's ``model`` may be."""
        with self._lock:
            return [self.name, *self._names]

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise EngineError(f"adapter name {name!r} must be 1-64 letters, digits, '.', '_', ':' or '-', starting "
                              f"with a letter or digit", param="name")
        if name == self.name:
            raise Conflict(f"adapter name {name!r} is the base model's name; choose another", param="name")

    def add_adapter(self, name: str, folder, *, replace: bool = False) -> int:
        """Loads a PEFT or run folder into a free slot under ``name`` (``replace``: into ``name``'s own slot).

        Returns the slot. Raises :class:`Conflict` (name taken, no free slot) or ValueError (the folder's
        adapters do not fit the bank or were trained on another base: the fingerprint message).
        """
        self._check_name(name)
        if not replace and name in self._names:
            raise Conflict(f"adapter {name!r} is already loaded (slot {self._names[name]}); DELETE it first or "
                           f"pass \"replace\": true", param="name")
        adapters, cfg, fp = bank_lib.read_folder(folder, self.loaded)
        return self.put_adapter(name, adapters, cfg, fingerprint=fp, replace=replace, source=str(folder),
                                warning=_base_note(folder, self.loaded))

    def put_adapter(self, name: str, adapters, cfg, *, fingerprint: str | None = None, replace: bool = False,
                    source: str | None = None, warning: str | None = None) -> int:
        """:meth:`add_adapter` for adapters in memory (an adapter tree and its :class:`jlora.LoraConfig`);
        ``warning``, what loading them warned, is kept in :meth:`adapters`."""
        self._check_name(name)
        with self._mutate:
            slot = self._names.get(name)
            if slot is not None and not replace:
                raise Conflict(f"adapter {name!r} is already loaded (slot {slot}); DELETE it first or pass "
                               f"\"replace\": true", param="name")
            if slot is None:
                free = sorted(set(range(self._bank.capacity)) - set(self._names.values()))
                if not free:
                    raise Conflict(f"all {self._bank.capacity} slots are in use ({', '.join(self._names)}); DELETE "
                                   f"an adapter first or restart with more --slots", param="name")
                slot = free[0]
            try:
                new = bank_lib.put(self._bank, slot, adapters, cfg, fingerprint=fingerprint)
            except ValueError as e:
                hint = {"outside the bank": "restart the server with --targets covering it",
                        "above the bank's rank": "restart the server with a larger --rank"}
                fix = next((v for k, v in hint.items() if k in str(e)), None)
                raise ValueError(f"{e} ({fix})" if fix else str(e)) from e
            jax.block_until_ready(new)
            with self._lock:
                self._bank = new
                self._names[name] = slot
                self._info[name] = _info(source, warning)
        self.metrics.count("adapter_loads")
        return slot

    def remove_adapter(self, name: str) -> None:
        """Unloads ``name``; its slot is cleared and free. Batches already decoding finish with their bank."""
        with self._mutate:
            with self._lock:
                if name not in self._names:
                    raise UnknownModel(f"no adapter {name!r}; loaded adapters: {sorted(self._names)}", param="name")
                slot = self._names.pop(name)
                self._info.pop(name, None)
            new = bank_lib.clear(self._bank, slot)
            jax.block_until_ready(new)
            with self._lock:
                self._bank = new
        self.metrics.count("adapter_unloads")

    # -- requests --

    def check_model(self, model: str) -> str | None:
        """The adapter a request's ``model`` names (None for the base); :class:`UnknownModel` lists the known."""
        if model == self.name:
            return None
        with self._lock:
            if model in self._names:
                return model
            known = [self.name, *self._names]
        raise UnknownModel(f"model {model!r} does not exist: known models are {known} (the base, then adapters)",
                           param="model")

    def check_row(self, row: Row) -> None:
        """Refuses a row the engine cannot decode (ValueError naming the field)."""
        n = len(row.prompt)
        if n == 0:
            raise EngineError("the prompt is empty: give at least one token", param="prompt")
        if n >= self.context:
            raise EngineError(f"the prompt has {n} tokens; the model's context is {self.context} tokens, leaving no "
                              f"room for a completion: shorten the prompt", param="prompt")
        if row.max_tokens < 1:
            raise EngineError(f"max_tokens={row.max_tokens} must be >= 1", param="max_tokens")
        if n + row.max_tokens > self.context:
            raise EngineError(f"the prompt ({n} tokens) plus max_tokens ({row.max_tokens}) exceeds the model's "
                              f"context of {self.context} tokens: ask for at most {self.context - n}",
                              param="max_tokens")
        if self.vocab_size and any(not 0 <= int(t) < self.vocab_size for t in row.prompt):
            raise EngineError(f"the prompt holds token ids outside the vocabulary [0, {self.vocab_size})",
                              param="prompt")
        if not (math.isfinite(row.temperature) and row.temperature >= 0):
            raise EngineError(f"temperature={row.temperature} must be a finite number >= 0", param="temperature")
        if not 0 <= row.top_k < 2**31:
            raise EngineError(f"top_k={row.top_k} must be in [0, 2**31) (0: off)", param="top_k")
        if not 0 < row.top_p <= 1:
            raise EngineError(f"top_p={row.top_p} must be in (0, 1]", param="top_p")

    def submit(self, rows: Sequence[Row]) -> None:
        """Queues ``rows`` (all or none). Raises :class:`UnknownModel`, :class:`QueueFull`, :class:`Closed` or
        :class:`EngineError` for a bad row."""
        for row in rows:
            if row.adapter is not None:
                row.adapter = self.check_model(row.adapter)   # the base's own name: None
            self.check_row(row)
        if len(rows) > self.config.max_queue:   # never fits, however long the client waits: not a 429
            raise EngineError(f"this request has {len(rows)} prompts; at most {self.config.max_queue} (--max-queue) "
                              f"fit in one request: split it", param="prompt")
        now = time.monotonic()
        with self._cv:
            if self._closed:
                raise Closed("the server is shutting down")
            if len(self._queue) + len(rows) > self.config.max_queue:
                self.metrics.count("rows_refused_queue_full", len(rows))
                raise QueueFull(f"the queue is full ({len(self._queue)} rows waiting, --max-queue "
                                f"{self.config.max_queue}); retry later")
            for row in rows:
                row.queued_at = now
                self._queue.append(row)
            self.metrics.count("rows_submitted", len(rows))
            self._cv.notify_all()

    def queued(self) -> int:
        with self._cv:
            return len(self._queue)

    def generate(self, prompt: Sequence[int], *, adapter: str | None = None, timeout: float | None = None,
                 **settings) -> Completion:
        """Decodes one prompt through the queue (batched with whatever else is waiting) and waits for it.

        ``settings`` are :class:`Row`'s (``max_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``,
        ``ignore_eos``).
        """
        done = threading.Event()
        events: list = []

        def sink(ev):
            events.append(ev)
            if not isinstance(ev, Token):
                done.set()

        row = Row(list(prompt), sink, adapter=adapter, **settings)
        self.submit([row])
        if not done.wait(timeout):
            row.cancel()
            raise TimeoutError(f"no completion within {timeout} s")
        last = events[-1]
        if isinstance(last, Failed):
            raise RuntimeError(f"{last.status}: {last.message}")
        return Completion([e.id for e in events if isinstance(e, Token)], last.reason)

    # -- the worker --

    def _loop(self) -> None:
        window = self.config.window_ms / 1000.0
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                while len(self._queue) < self.config.max_batch and not self._closed:
                    left = self._queue[0].queued_at + window - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                batch = self._take()
            if batch:
                self._run(batch)

    def _take(self) -> list[Row]:
        """Up to max_batch queued rows (called holding the queue's lock); with learned positions (GPT-2), rows whose
        longest prompt plus largest budget would pass the model's positions wait for the next batch."""
        batch, later = [], []
        while self._queue and len(batch) < self.config.max_batch:
            row = self._queue.popleft()
            if row.cancelled:
                _send(row, End("cancelled"))
                self.metrics.count("rows_cancelled")
                continue
            if self.learned_positions and batch:
                longest = max(len(r.prompt) for r in batch + [row])
                budget = max(r.max_tokens for r in batch + [row])
                if longest + budget > self.learned_positions:
                    later.append(row)
                    continue
            batch.append(row)
        self._queue.extendleft(reversed(later))
        return batch

    def _run(self, batch: list[Row]) -> None:
        with self._lock:
            bank, names = self._bank, dict(self._names)
        rows = []
        for row in batch:
            if row.adapter is not None and row.adapter not in names:
                _send(row, Failed(404, f"adapter {row.adapter!r} was unloaded before this request ran; loaded "
                                       f"adapters: {sorted(names)}"))
                self.metrics.count("rows_failed")
                continue
            rows.append(row)
        if not rows:
            return
        slots = [BASE if r.adapter is None else names[r.adapter] for r in rows]
        b = bucket(len(rows), self.config.sizes)
        longest = max(len(r.prompt) for r in rows)
        t = bucket(longest, self.prompt_sizes)
        n = bucket(max(r.max_tokens for r in rows), buckets(self.context))
        if self.learned_positions:
            n = min(n, self.learned_positions - longest)
        ids = np.full((b, t), self.pad, np.int32)
        mask = np.zeros((b, t), np.int32)
        for i, r in enumerate(rows):
            ids[i, t - len(r.prompt):] = np.asarray(r.prompt, np.int32)
            mask[i, t - len(r.prompt):] = 1
        mask[len(rows):, -1] = 1                          # filler rows: one token, ended at the first step
        plain = all(s == BASE for s in slots)
        variables = self.loaded.params if plain else \
            (self.loaded.params, bank, jnp.asarray(slots + [BASE] * (b - len(rows)), jnp.int32))
        settings: dict = {}
        mode = "greedy"
        if any(r.temperature > 0 for r in rows):
            fill = b - len(rows)
            seeds = [seed_key_data(r.seed if r.seed is not None else secrets.randbits(64)) for r in rows]
            keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(np.stack(seeds + [seeds[0]] * fill)),
                                                jnp.asarray([r.index for r in rows] + [0] * fill, jnp.uint32))
            settings = dict(temperature=[float(r.temperature) for r in rows] + [0.0] * fill,
                            top_k=[int(r.top_k) for r in rows] + [0] * fill,
                            top_p=[float(r.top_p) for r in rows] + [1.0] * fill, key=keys)
            mode = "sampled"
        shape = ("base" if plain else "bank", mode, b, t, n)
        from jlora.models import generate as gen

        self._current = _Batch(rows)
        t0 = time.perf_counter()
        error = None
        try:
            gen.generate(self.model, variables, ids, attention_mask=mask, max_new_tokens=n, eos_token_id=(),
                         pad_token_id=self.pad, apply_fn=None if plain else self._bank_apply, on_step=self._hook,
                         **settings)
        except Exception as e:  # noqa: BLE001 - one failing batch must not stop the server
            error = f"decoding failed: {type(e).__name__}: {e}"
        finally:
            self._current = None
        seconds = time.perf_counter() - t0
        if error and len(rows) > 1 and not any(r.tokens or r.finished for r in rows):
            # Nothing was sent yet: run each row alone, so that only a request that fails by itself gets the error.
            self.metrics.count("batches_split")
            for row in rows:
                self._run([row])
            return
        for row in rows:
            if not row.finished:
                row.finished = True
                _send(row, Failed(500, error) if error else End("length"))
        by_model = collections.Counter(self.name if r.adapter is None else r.adapter for r in rows)
        self.metrics.batch(rows=len(rows), models=dict(by_model), shape=shape, seconds=seconds,
                           prompt_tokens=sum(len(r.prompt) for r in rows),
                           tokens={m: sum(len(r.tokens) for r in rows if (r.adapter or self.name) == m)
                                   for m in by_model},
                           failed=len(rows) if error else 0, compiles=_compiles())

    def _on_step(self, tokens: np.ndarray, done: np.ndarray) -> np.ndarray:
        """Called by generate after each step: hands every live row its token; ends rows that are done."""
        stop = np.ones(tokens.shape[0], bool)
        batch = self._current
        if batch is None:
            return stop
        for i, row in enumerate(batch.rows):
            if row.finished:
                continue
            try:
                tok = int(tokens[i])
                row.tokens.append(tok)
                reason = None
                if tok in self.eos and not row.ignore_eos:
                    reason = "stop"
                elif len(row.tokens) >= row.max_tokens:
                    reason = "length"
                elif row.cancelled:
                    reason = "cancelled"
                row.sink(Token(tok))
                if reason is not None:
                    row.finished = True
                    row.sink(End(reason))
            except Exception:  # noqa: BLE001 - a broken sink (a client gone) ends its row only
                row.finished = True
            stop[i] = row.finished
        return stop

    def warmup(self, sizes: Sequence[int] | None = None) -> int:
        """Compiles greedy decoding for each batch size (shortest prompt and token buckets), through the bank and
        the plain model, so the first requests do not wait for it. Returns the compilations made."""
        before = _compiles()
        for b in sizes or self.config.sizes:
            for adapter in ([None, next(iter(self._names))] if self._names else [None]):
                self._run([Row([self.pad], _discard, adapter=adapter, max_tokens=1, ignore_eos=True)
                           for _ in range(b)])
        return _compiles() - before


@dataclasses.dataclass(frozen=True)
class Completion:
    """What :meth:`Engine.generate` returns: the tokens (an end-of-sequence token included) and why it ended."""

    tokens: list
    finish_reason: str


def _discard(event) -> None:
    del event


def _send(row: Row, event) -> None:
    try:
        row.sink(event)
    except Exception:  # noqa: BLE001
        pass


def _base_note(folder, loaded) -> str | None:
    """The :class:`jlora.peft.BaseModelWarning` text for a PEFT folder naming another base model, or None."""
    from jlora import peft

    return peft.base_model_note(folder, loaded) if (pathlib.Path(folder) / peft.CONFIG_FILE).is_file() else None


def _info(path, warning: str | None) -> dict:
    """What :meth:`Engine.adapters` tells of an adapter besides its slot."""
    return {"path": None if path is None else str(path), "created": int(time.time()),
            **({"warning": warning} if warning else {})}


def _adapter_items(adapters):
    from jlora import adapter as adapter_lib

    return adapter_lib.adapter_items(adapters)


def _compiles() -> int:
    """Compiled variants of generate's jitted function in this process (shapes x modes x apply functions)."""
    from jlora.models import generate as gen

    return int(gen._generate._cache_size())


class Metrics:
    """Counters the ``/metrics`` endpoint reports; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()
        self.batch_rows: collections.Counter = collections.Counter()
        self.batch_models: collections.Counter = collections.Counter()
        self.per_model: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.shapes: dict[str, int] = {}
        self.recent: collections.deque = collections.deque(maxlen=64)
        self.decode_seconds = 0.0
        self.compiles = _compiles()
        self.started = time.time()

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def batch(self, *, rows: int, models: dict, shape: tuple, seconds: float, prompt_tokens: int, tokens: dict,
              failed: int, compiles: int) -> None:
        with self._lock:
            self.counts["batches"] += 1
            self.counts["rows_decoded"] += rows
            self.counts["rows_failed"] += failed
            self.counts["prompt_tokens"] += prompt_tokens
            self.counts["generated_tokens"] += sum(tokens.values())
            if len(models) > 1:
                self.counts["shared_batches"] += 1
            self.batch_rows[rows] += 1
            self.batch_models[len(models)] += 1
            for m, k in models.items():
                self.per_model[m]["rows"] += k
                self.per_model[m]["tokens"] += tokens.get(m, 0)
            key = "/".join(map(str, shape))
            self.shapes[key] = self.shapes.get(key, 0) + 1
            self.decode_seconds += seconds
            self.compiles = compiles
            self.recent.append({"rows": rows, "models": models, "shape": key, "seconds": round(seconds, 4),
                                "tokens": sum(tokens.values())})

    def snapshot(self) -> dict:
        with self._lock:
            gen = self.counts["generated_tokens"]
            return {"uptime_s": round(time.time() - self.started, 1), "counts": dict(self.counts),
                    "batches": {"rows_histogram": {str(k): v for k, v in sorted(self.batch_rows.items())},
                                "models_histogram": {str(k): v for k, v in sorted(self.batch_models.items())},
                                "shape_histogram": dict(self.shapes),   # batches per base|bank/mode/rows/width/new
                                "shared": self.counts["shared_batches"], "recent": list(self.recent)},
                    "models": {m: dict(c) for m, c in self.per_model.items()},
                    "tokens": {"prompt": self.counts["prompt_tokens"], "generated": gen,
                               "decode_seconds": round(self.decode_seconds, 3),
                               "per_second": round(gen / self.decode_seconds, 2) if self.decode_seconds else 0.0},
                    "compiles": {"generate": _compiles()}}


__all__ = ["Engine", "EngineConfig", "Row", "Token", "End", "Failed", "Completion", "Metrics", "EngineError",
           "QueueFull", "UnknownModel", "Conflict", "Closed", "buckets", "bucket", "batch_sizes", "linear_targets",
           "seed_key_data"]
