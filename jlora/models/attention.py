"""Attention over a whole sequence (training, scoring, prefill without a cache), and the choice of kernel.

Every implementation computes the same function of ``q (B, T, H, D)``, ``k, v (B, T, KV, D)``: softmax attention
where query ``i`` may attend key ``j`` when ``j <= i`` (causal), ``i - j < window`` (sliding window), key ``j`` is a
real token (``valid``) and both are in the same example of a packed row (``segment_ids``). Query head ``h`` uses
KV head ``h // (H // KV)`` (MHA, GQA and MQA alike). A query with nothing to attend (a left-padding token) gets
zeros and passes no gradient back, as with torch's SDPA and a boolean mask, in the ``"blocked"`` and ``"xla"``
kernels; the accelerator kernels give such a row some finite output of their own.

Implementations (a model's ``attention`` option; ``"auto"`` asks :func:`choose`; a KV cache, in decoding and in
the prefill before it, keeps the whole-matrix path of :func:`jlora.models.layers.attend`):

- ``"blocked"``: queries and keys in tiles of ``t`` tokens with an online softmax (FlashAttention-2's loops in
  plain JAX: ``lax.scan`` over query tiles, a ``fori_loop`` over the key tiles each one needs); a ``custom_vjp``
  saves only ``q, k, v``, the output and one log-sum-exp per query, and recomputes the tiles in the backward pass
  (a loop over key tiles, then their query tiles). Neither pass holds more than one tile pair's (G*t, t) scores
  per KV head, so memory is linear in T; causal attention skips the tiles above the diagonal (and, with an even
  tile, the quarter of each diagonal tile where every pair is masked) and a sliding window the ones below its
  band. The loops also fix the order: unrolled tile pairs let XLA:CPU's scheduler compute many of them at once,
  whose scratch grows with T^2 again. Its backward pass runs loops with traced bounds, so it is differentiable
  forward (``jax.jvp`` of a gradient: Hessian-vector products) but not in reverse again (a gradient of a gradient);
  force ``"xla"`` for that.
- ``"xla"``: the (B, KV, G*T, T) scores in one piece (the reference; memory quadratic in T).
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused flash attention on an
  NVIDIA GPU (bf16/fp16; causal, sliding window and padding, as per-row key counts: a batch with a left-padded
  row runs the blocked kernel; no packed rows).
- ``"splash"``: the Pallas splash-attention kernel of ``jax.experimental.pallas.ops.tpu`` on a TPU (causal,
  sliding window, padding and packed rows, via its segment ids).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora import fusion

IMPLEMENTATIONS = ("auto", "blocked", "xla", "cudnn", "splash")
# Tile sizes of the blocked kernel per platform: on CPU 128 was the fastest of 64..512 for a SmolLM2 layer's
# forward and backward at T = 512..4096 (bench/README.md, "Long context").
TILE = {"cpu": 128, "gpu": 512, "tpu": 512}
_NEG = float(jnp.finfo(jnp.float32).min)


class Case(NamedTuple):
    """What decides which kernels can run an attention call (all static, known when tracing).

    Attributes:
        platform: ``jax.default_backend()``: "cpu", "gpu" (or "cuda"/"rocm"), "tpu".
        dtype: the dtype of q, k, v.
        head_dim: D.
        length: T, the number of queries (= keys).
        causal: whether query i attends only keys j <= i.
        window: the sliding window, or None.
        padding: whether a ``valid`` (padding) mask is given.
        segments: whether ``segment_ids`` (packed rows) are given.
    """

    platform: str
    dtype: object
    head_dim: int
    length: int
    causal: bool = True
    window: int | None = None
    padding: bool = False
    segments: bool = False


def unsupported(implementation: str, case: Case) -> str | None:
    """Why ``implementation`` cannot run ``case``, or None when it can.

    Examples:
        >>> gpu = Case("gpu", jnp.bfloat16, 64, 2048)
        >>> unsupported("cudnn", gpu) is None
        True
        >>> unsupported("cudnn", gpu._replace(dtype=jnp.float32))
        'cuDNN flash attention needs bfloat16 or float16 inputs, got float32'
        >>> unsupported("splash", gpu)
        "the Pallas splash kernel runs on a TPU, this is platform 'gpu'"
    """
    dtype = np.dtype(case.dtype)
    if implementation in ("blocked", "xla"):
        return None
    if implementation == "cudnn":
        if case.platform not in ("gpu", "cuda"):
            return f"cuDNN runs on an NVIDIA GPU, this is platform {case.platform!r}"
        if dtype not in (np.dtype(jnp.bfloat16), np.dtype(jnp.float16)):
            return f"cuDNN flash attention needs bfloat16 or float16 inputs, got {dtype}"
        if case.head_dim % 8 or case.head_dim > 128:
            return f"cuDNN flash attention needs head_dim <= 128 and a multiple of 8, got {case.head_dim}"
        if case.segments:
            return "cuDNN through jax.nn.dot_product_attention has no segment_ids (packed rows)"
        if case.window is not None and not case.causal:
            return "cuDNN supports a sliding window only with causal attention"
        if case.padding and case.length % 2:
            return f"cuDNN with a padding mask needs an even length, got {case.length}"
        return None
    if implementation == "splash":
        if case.platform != "tpu":
            return f"the Pallas splash kernel runs on a TPU, this is platform {case.platform!r}"
        return None
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")


def choose(implementation: str, case: Case) -> str:
    """The kernel that runs ``case``: the forced ``implementation``, or for ``"auto"`` the fastest exact one of the
    platform that supports the case (cuDNN on GPU, splash on TPU), else the blocked kernel; on CPU, a sequence of
    one tile or less gets the whole-matrix kernel (its scores are as small as a tile's, and it was faster).

    Raises:
        ValueError: a forced implementation does not support ``case``; the message says why and what to set.

    Examples:
        >>> choose("auto", Case("cpu", jnp.float32, 64, 4096)), choose("auto", Case("cpu", jnp.float32, 64, 128))
        ('blocked', 'xla')
        >>> choose("auto", Case("gpu", jnp.bfloat16, 64, 2048))
        'cudnn'
        >>> choose("auto", Case("gpu", jnp.bfloat16, 64, 2048, segments=True))   # packed rows: not in cuDNN
        'blocked'
        >>> choose("cudnn", Case("cpu", jnp.float32, 64, 128))
        Traceback (most recent call last):
        ...
        ValueError: attention='cudnn' cannot run this call: cuDNN runs on an NVIDIA GPU, this is platform 'cpu'; set attention (the model config's option; model.attention in a jlora run config) to 'auto', which picks per call what the platform runs, or 'blocked', which runs every case
    """
    if implementation == "auto":
        preferred = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(case.platform)
        if preferred and unsupported(preferred, case) is None:
            return preferred
        if case.platform == "cpu" and case.length <= TILE["cpu"]:
            return "xla"     # one tile: nothing to skip, and the whole matrix was 4-5% faster (bench/README.md)
        return "blocked"
    reason = unsupported(implementation, case)
    if reason is not None:
        raise ValueError(f"attention={implementation!r} cannot run this call: {reason}; set attention (the model "
                         f"config's option; model.attention in a jlora run config) to 'auto', which picks per call "
                         f"what the platform runs, or 'blocked', which runs every case")
    return implementation


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, causal: bool = True,
              window: int | None = None, valid: jax.Array | None = None, segment_ids: jax.Array | None = None,
              implementation: str = "auto", tile: int | None = None) -> jax.Array:
    """Masked softmax attention over one sequence of new tokens (no KV cache).

    Args:
        q: (B, T, H, D) queries. k, v: (B, T, KV, D) keys and values, H a multiple of KV.
        scale: multiplies the scores (``1/sqrt(D)`` for these models).
        causal: query i attends keys j <= i only.
        window: with ``causal``, query i attends keys with ``i - j < window`` only (transformers' sliding window).
        valid: (B, T), nonzero where the key is a real token (not padding); None: all are.
        segment_ids: (B, T) ints; a query attends only keys with its own segment id (packed rows).
        implementation: one of :data:`IMPLEMENTATIONS` (see :func:`choose`).
        tile: the blocked kernel's tile size; None: :data:`TILE` of the platform.

    Returns:
        (B, T, H, D) in ``q``'s dtype; scores and softmax statistics in float32.

    Examples:
        >>> q = jax.random.normal(jax.random.key(0), (1, 5, 4, 8))
        >>> k, v = q[:, :, :2], q[:, :, 2:]                                 # GQA: 4 query heads, 2 KV heads
        >>> a = attention(q, k, v, scale=8 ** -0.5, implementation="blocked", tile=2)
        >>> b = attention(q, k, v, scale=8 ** -0.5, implementation="xla")
        >>> bool(jnp.allclose(a, b, atol=1e-6))
        True
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    if h % kv:
        raise ValueError(f"{h} query heads are not a multiple of {kv} key/value heads")
    if k.shape[:2] != (b, t) or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"`q` {q.shape}, `k` {k.shape} and `v` {v.shape} must share batch and length (B, T), "
                         f"and `k`, `v` their heads")
    if window is not None and not causal:
        raise ValueError("a sliding `window` needs `causal=True` (transformers' sliding window is causal)")
    if window is not None and window < 1:
        raise ValueError(f"`window`={window} must be >= 1 (the tokens each query sees, itself included) or None")
    platform = _platform()
    case = Case(platform, q.dtype, d, t, causal, window, valid is not None, segment_ids is not None)
    impl = choose(implementation, case)
    if impl == "cudnn":
        return _cudnn(q, k, v, scale, causal, window, valid, tile=tile)
    if impl == "splash":
        return _splash(q, k, v, scale, causal, window, valid, segment_ids)
    if impl == "xla":
        allowed = allowed_mask(t, causal, window, valid, segment_ids)   # only padding can leave a row empty
        return dense(q, k, v, allowed, scale, empty_rows=valid is not None)
    return blocked(q, k, v, scale=scale, causal=causal, window=window, valid=valid, segment_ids=segment_ids,
                   tile=tile or TILE.get(platform, 512))


def _platform() -> str:
    """``jax.default_backend()``, with an AMD GPU told apart as ``"rocm"``: JAX names CUDA and ROCm GPUs both
    ``"gpu"``, and cuDNN runs on NVIDIA's only."""
    platform = jax.default_backend()
    if platform == "gpu":
        version = str(getattr(getattr(jax.devices()[0], "client", None), "platform_version", "")).lower()
        if "rocm" in version or "hip" in version:
            return "rocm"
    return platform


# --- the masks ------------------------------------------------------------------------------------------------

def allowed_mask(t: int, causal: bool, window: int | None, valid, segment_ids) -> jax.Array:
    """The dense (B or 1, T, T) bool mask of :func:`attention`'s rule (for the ``"xla"`` reference)."""
    rel = np.arange(t)[:, None] - np.arange(t)[None, :]
    ok = jnp.asarray(_rel_ok(rel, causal, window))[None]
    if valid is not None:
        ok = ok & (jnp.asarray(valid)[:, None, :] != 0)
    if segment_ids is not None:
        seg = jnp.asarray(segment_ids)
        ok = ok & (seg[:, :, None] == seg[:, None, :])
    return ok


def band(rel, causal: bool, window: int | None):
    """Which query-minus-key slot offsets ``rel`` (a NumPy or JAX array) may attend: ``rel >= 0`` when causal,
    ``rel < window`` with a sliding window; None when every offset may (neither).

    Examples:
        >>> band(np.arange(-1, 4), True, 3).tolist()
        [False, True, True, True, False]
    """
    ok = rel >= 0 if causal else None
    if window is not None:
        ok = rel < window if ok is None else ok & (rel < window)
    return ok


def _rel_ok(rel: np.ndarray, causal: bool, window: int | None) -> np.ndarray:
    ok = band(rel, causal, window)
    return np.ones(rel.shape, bool) if ok is None else ok


# --- the dense reference ----------------------------------------------------------------------------------------

def dense(q, k, v, allowed, scale, *, empty_rows: bool = True):
    """Attention with the whole (B, KV, G*T, S) score matrix, laid out head-major: each KV head's G query heads
    stacked along the query axis, against (B, KV, S, D) keys, so that XLA:CPU needs one plain transpose per
    operand instead of strided copies around every batched matmul. ``allowed`` is (B or 1, T, S) bool;
    ``empty_rows=False`` promises that every query has a key allowed (see :func:`masked_softmax`)."""
    b, t, h, d = q.shape
    kv, s, dv = k.shape[2], k.shape[1], v.shape[-1]
    g = h // kv
    qh = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
    kh = k.astype(q.dtype).transpose(0, 2, 1, 3)
    vh = v.astype(q.dtype).transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkmd,bksd->bkms", qh, kh, preferred_element_type=jnp.float32) * scale
    mask = jnp.broadcast_to(allowed[:, None, None, :, :], (allowed.shape[0], 1, g, t, s)).reshape(-1, 1, g * t, s)
    probs = masked_softmax(scores, mask, empty_rows).astype(q.dtype)
    out = jnp.einsum("bkms,bksd->bkmd", probs, vh)
    return out.reshape(b, kv, g, t, dv).transpose(0, 3, 1, 2, 4).reshape(b, t, h, dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def masked_softmax(scores: jax.Array, allowed: jax.Array, empty_rows: bool = True) -> jax.Array:
    """Softmax over the last axis of ``scores`` where ``allowed`` (broadcastable bool), 0 elsewhere.

    A row with nothing allowed gets zeros (no gradient). ``empty_rows=False`` promises there is none (a causal
    mask without padding) and skips that check, which XLA would otherwise constant-fold over the constant mask at
    compile time (growing with T^2: 10 s at T = 2048, 36 s at T = 4096 on the CPU). The custom VJP saves only the
    probabilities and computes ``p * (g - sum(g * p))`` from them; differentiating the formula (or JAX's default
    ``jax.nn.softmax``) also keeps the masked scores, the exponentials and the mask alive per layer, three more
    (B, heads, T, S) buffers.

    Examples:
        >>> s, ok = jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[True, True, False]])
        >>> [round(float(p), 4) for p in masked_softmax(s, ok)[0]]
        [0.2689, 0.7311, 0.0]
        >>> masked_softmax(s, ok & False).tolist()                 # nothing allowed
        [[0.0, 0.0, 0.0]]
        >>> ref = lambda z: jax.nn.softmax(jnp.where(ok, z, -1e30))
        >>> g = lambda f: jax.grad(lambda z: jnp.sum(f(z) * jnp.array([[1.0, -2.0, 5.0]])))(s)
        >>> bool(jnp.allclose(g(lambda z: masked_softmax(z, ok)), g(ref)))
        True
    """
    return _masked_softmax_fwd(scores, allowed, empty_rows)[0]


def _masked_softmax_fwd(scores, allowed, empty_rows=True):
    masked = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(fusion.squeeze_leading(masked), axis=-1).reshape(masked.shape)   # fast at batch 1
    if empty_rows:
        probs = jnp.where(jnp.any(allowed, axis=-1, keepdims=True), probs, 0.0)
    return probs, probs


def _masked_softmax_bwd(empty_rows, probs, g):
    p, g = fusion.squeeze_leading(probs), fusion.squeeze_leading(g.astype(probs.dtype))
    return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True))).reshape(probs.shape), None


masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd)


# --- the blocked kernel -----------------------------------------------------------------------------------------

class _Plan(NamedTuple):
    """The static part of a blocked call: ``n`` tiles of ``t`` tokens, ``g`` query heads per KV head, and the tile
    diagonals ``d = i - j`` (query tile ``i``, key tile ``j``) in ``[dmin, dmax]`` that hold an allowed pair."""

    n: int
    t: int
    g: int
    causal: bool
    window: int | None
    dmin: int
    dmax: int


def tiling(length: int, tile: int) -> tuple[int, int]:
    """``(n, t)``: ``n`` tiles of ``t <= tile`` tokens covering ``length`` with the least padding (``t`` a multiple
    of 8 when there is more than one tile and ``tile`` allows it).

    Examples:
        >>> tiling(100, 256), tiling(4096, 256), tiling(1000, 256), tiling(7, 4)
        ((1, 100), (16, 256), (4, 256), (2, 4))
    """
    if length <= tile:
        return 1, length
    n = -(-length // tile)
    t = -(-length // n)
    aligned = -(-t // 8) * 8
    return n, aligned if aligned <= tile else t


def plan(length: int, tile: int, g: int, causal: bool, window: int | None) -> _Plan:
    """The :class:`_Plan` of a call: tiles, and which tile diagonals hold an allowed pair (causal: none above the
    diagonal; a window: none below its band).

    Examples:
        >>> p = plan(32, 8, 1, True, 9)
        >>> p.n, p.t, p.dmin, p.dmax          # a 9-token window reaches one tile back
        (4, 8, 0, 1)
        >>> plan(24, 8, 1, False, None)[-2:]
        (-2, 2)
    """
    n, t = tiling(length, tile)
    dmin = 0 if causal else -(n - 1)
    dmax = n - 1
    if window is not None:    # diagonal d holds slot distances d*t - (t-1) ... d*t + (t-1)
        dmax = min(dmax, (window - 1 + t - 1) // t)
    return _Plan(n, t, g, causal, window, dmin, dmax)


def blocked(q, k, v, *, scale: float, causal: bool = True, window: int | None = None, valid=None,
            segment_ids=None, tile: int = 256) -> jax.Array:
    """:func:`attention` by the blocked kernel (see the module docstring); any T (padded to whole tiles)."""
    b, t_len, h, d = q.shape
    kv = k.shape[2]
    p = plan(t_len, tile, h // kv, causal, window)
    n, t = p.n, p.t
    pad = n * t - t_len
    if pad and valid is None:
        valid = jnp.ones((b, t_len), jnp.int32)

    def padded(x):
        return x if not pad else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))

    kvalid = None if valid is None else padded(jnp.asarray(valid) != 0).reshape(b, n, t)
    seg = None if segment_ids is None else padded(jnp.asarray(segment_ids)).reshape(b, n, t)
    q = q * jnp.asarray(scale, q.dtype)   # once here, not per tile pair: a pass over each score tile fewer
    qt = padded(q).reshape(b, n, t, kv, p.g, d).transpose(0, 3, 1, 4, 2, 5).reshape(b, kv, n, p.g * t, d)
    kt = padded(k.astype(q.dtype)).reshape(b, n, t, kv, d).transpose(0, 3, 1, 2, 4)
    vt = padded(v.astype(q.dtype)).reshape(b, n, t, kv, -1).transpose(0, 3, 1, 2, 4)
    out = _blocked(p, qt, kt, vt, kvalid, seg)
    dv = v.shape[-1]
    out = out.reshape(b, kv, n, p.g, t, dv).transpose(0, 2, 4, 1, 3, 5).reshape(b, n * t, h, dv)
    return out[:, :t_len]


def _query_rows(p: _Plan, x, lo: int, hi: int):
    """Query slots ``[lo, hi)`` of each of a tile's G heads: (B, KV, G*t, ...) -> (B, KV, G*(hi-lo), ...)."""
    b, kvh = x.shape[:2]
    return x.reshape(b, kvh, p.g, p.t, -1)[:, :, :, lo:hi].reshape(b, kvh, p.g * (hi - lo), -1)


def _tile(x, i):
    """Tile ``i`` (an int or a traced index) of a tiled array (axis 2)."""
    return lax.dynamic_index_in_dim(x, i, axis=2, keepdims=False)


def _scores(p: _Plan, qi, kj, i, j, kvalid, seg, *, interior: bool = False, transposed: bool = False,
            qr: tuple[int, int] | None = None, kr: tuple[int, int] | None = None):
    """The masked scores, float32, of query tile ``i`` (``qi``) against key tile ``j``: (B, KV, G, t, t), queries
    before keys, or with ``transposed`` (B, KV, t, G, t), keys first. ``interior``: the caller knows the tile
    lies wholly inside the causal/window band (no slot mask needed). ``qr``, ``kr``: the slots ``(start, stop)``
    of the tiles that ``qi`` (each query head's rows) and ``kj`` hold, when they hold part of one."""
    b, kvh = qi.shape[:2]
    qa, qb = qr or (0, p.t)
    ka, kb = kr or (0, p.t)
    if transposed:
        s = jnp.einsum("bksd,bkmd->bksm", kj, qi, preferred_element_type=jnp.float32)
        s = s.reshape(b, kvh, kb - ka, p.g, qb - qa)
    else:
        s = jnp.einsum("bkmd,bksd->bkms", qi, kj, preferred_element_type=jnp.float32)
        s = s.reshape(b, kvh, p.g, qb - qa, kb - ka)
    # a (queries, keys) array -> broadcastable against s
    place = (lambda a: a.T[..., :, None, :]) if transposed else (lambda a: a[..., None, :, :])
    mask = None
    if (p.causal or p.window is not None) and not interior:
        rel = (i - j) * p.t + jnp.asarray(np.arange(qa, qb)[:, None] - np.arange(ka, kb)[None, :])
        mask = place(band(rel, p.causal, p.window))[None, None]
    if kvalid is not None:
        key_ok = lax.dynamic_index_in_dim(kvalid, j, axis=1, keepdims=False)[:, ka:kb]
        key_ok = key_ok[:, None, :, None, None] if transposed else key_ok[:, None, None, None, :]
        mask = key_ok if mask is None else mask & key_ok
    if seg is not None:
        qs = lax.dynamic_index_in_dim(seg, i, axis=1, keepdims=False)[:, qa:qb]
        ks = lax.dynamic_index_in_dim(seg, j, axis=1, keepdims=False)[:, ka:kb]
        same = ((ks[:, :, None] == qs[:, None, :])[:, None, :, None, :] if transposed
                else (qs[:, :, None] == ks[:, None, :])[:, None, None])
        mask = same if mask is None else mask & same
    return s if mask is None else jnp.where(mask, s, _NEG)


def _loop(lo, hi, body, init):
    """``fori_loop(lo, hi, body, init)``, run inline when there is one step (one tile: no loop at all)."""
    if isinstance(lo, int) and isinstance(hi, int) and hi - lo == 1:
        return body(lo, init)
    return lax.fori_loop(lo, hi, body, init)


def _over_tiles(n: int, fn, init):
    """``lax.scan`` of ``fn(carry, i)`` over tiles ``0..n-1``; with one tile, one inline call."""
    if n == 1:
        carry, y = fn(init, 0)
        return carry, jax.tree.map(lambda a: a[None], y)
    return lax.scan(fn, init, jnp.arange(n))


def _split_diagonal(p: _Plan) -> bool:
    """Causal attention without a window over several tiles: every tile pair but the diagonal one lies wholly
    below the diagonal, so the loops run those without the causal mask and the diagonal tile apart."""
    return p.causal and p.window is None and p.n > 1


def _diagonal_parts(p: _Plan) -> tuple[tuple[int, int], ...]:
    """The slot ranges a causal diagonal tile is computed in: halves when ``t`` is even (skipping the quarter where
    every pair is masked), else the whole tile. Finer parts did not pay on CPU: parts of 32 slots at t = 128 and
    parts of 64 at t = 256 ran 1.006x and 1.001x (bench/README.md).

    Examples:
        >>> _diagonal_parts(plan(256, 128, 1, True, None)), _diagonal_parts(plan(15, 5, 1, True, None))
        (((0, 64), (64, 128)), ((0, 5),))
    """
    h = p.t // 2
    return ((0, h), (h, p.t)) if p.t % 2 == 0 else ((0, p.t),)


def _forward(p: _Plan, q, k, v, kvalid, seg):
    """Online softmax: for each query tile, its key tiles one at a time. Returns the tiled output and the
    log-sum-exp per query (B, KV, n, G, t)."""
    b, kvh, n, _, _ = q.shape
    dv = v.shape[-1]

    def online(carry, s, vj):
        """The running max, sum and output of some query rows, (B, KV, G, tq), updated with their masked scores
        ``s`` (B, KV, G, tq, tk) against keys whose values are ``vj``."""
        m, l, acc = carry
        tq, tk = s.shape[-2:]
        m_new = jnp.maximum(m, jnp.max(fusion.squeeze_leading(s), axis=-1).reshape(m.shape))   # jlora.fusion
        e = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum("bkms,bksd->bkmd", e.reshape(b, kvh, p.g * tq, tk).astype(v.dtype), vj,
                        preferred_element_type=jnp.float32).reshape(b, kvh, p.g, tq, dv)
        l_new = l * corr + jnp.sum(fusion.squeeze_leading(e), axis=-1).reshape(l.shape)
        return m_new, l_new, acc * corr[..., None] + pv

    def query_tile(_, i):
        qi = _tile(q, i)

        def key_tile(j, carry, interior=False):
            return online(carry, _scores(p, qi, _tile(k, j), i, j, kvalid, seg, interior=interior), _tile(v, j))

        def diagonal(carry):
            """Key tile i, causal, by query part (:func:`_diagonal_parts`): query slots [lo, hi) against keys
            [0, hi); the pairs above a part's own keys, all masked, are skipped."""
            kj, vj = _tile(k, i), _tile(v, i)
            parts = [online(jax.tree.map(lambda a: a[:, :, :, lo:hi], carry),
                            _scores(p, _query_rows(p, qi, lo, hi), kj[:, :, :hi], i, i, kvalid, seg, qr=(lo, hi),
                                    kr=(0, hi)), vj[:, :, :hi])
                     for lo, hi in _diagonal_parts(p)]
            return jax.tree.map(lambda *x: jnp.concatenate(x, axis=3), *parts)

        rows = (b, kvh, p.g, p.t)
        init = (jnp.full(rows, _NEG, jnp.float32), jnp.zeros(rows, jnp.float32), jnp.zeros((*rows, dv), jnp.float32))
        if _split_diagonal(p):   # key tiles 0..i-1 lie below the diagonal: no slot mask; then tile i
            carry = lax.fori_loop(0, i, functools.partial(key_tile, interior=True), init)
            m, l, acc = diagonal(carry)
        else:
            lo = jnp.maximum(i - p.dmax, 0) if n > 1 else 0
            hi = jnp.minimum(i - p.dmin, n - 1) + 1 if n > 1 else 1
            m, l, acc = _loop(lo, hi, key_tile, init)
        # A row with no allowed key kept m = _NEG: zeros out, and an infinite log-sum-exp, so that the backward
        # pass recomputes its probabilities as 0 (m + log(l) rounds to _NEG there, which would make them 1).
        empty = m == _NEG
        out = jnp.where(empty[..., None], 0.0, acc / l[..., None]).astype(q.dtype).reshape(b, kvh, p.g * p.t, dv)
        return None, (out, jnp.where(empty, jnp.inf, m + jnp.log(l)))

    _, (out, lse) = _over_tiles(n, query_tile, None)
    return jnp.moveaxis(out, 0, 2), jnp.moveaxis(lse, 0, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked(p: _Plan, q, k, v, kvalid, seg):
    """The blocked kernel on tiled, head-major operands: q (B, KV, n, G*t, D), k/v (B, KV, n, t, D)."""
    return _forward(p, q, k, v, kvalid, seg)[0]


def _blocked_fwd(p, q, k, v, kvalid, seg):
    out, lse = _forward(p, q, k, v, kvalid, seg)
    return out, (q, k, v, kvalid, seg, out, lse)


def _blocked_bwd(p, res, g):
    """FlashAttention-2's backward pass: for each key tile, its query tiles one at a time, recomputing the
    probabilities from the saved log-sum-exp; dk, dv of the key tile accumulate in the loop, dq in place.

    Laid out keys first: the scores as (keys, queries) and dq transposed, (D, queries) per tile. Then all five
    products per tile pair contract an operand's last axis or the other's first, the forms XLA:CPU's fast dots
    take (dq's takes the key tile transposed, once per key tile); queries first, dk and dv contracted both
    operands' first axes, which XLA:CPU ran about 1.5x slower: the whole pass, forward included, went from 232
    to 207 ms for one SmolLM2 layer at T = 2048 (1 core)."""
    q, k, v, kvalid, seg, out, lse = res
    b, kvh, n, m, d = q.shape
    g = g.astype(q.dtype)
    gf, of = fusion.squeeze_leading(g.astype(jnp.float32)), fusion.squeeze_leading(out.astype(jnp.float32))
    delta = jnp.sum(gf * of, axis=-1).reshape(lse.shape)   # batch 1: the fast reductions (jlora.fusion)

    def products(st, lse_i, delta_i, qi, gi, vj, kjt):
        """dk, dv (B, KV, tk, D) of some key rows and dq transposed (B, KV, D, G*tq) of some query rows, from
        their masked scores ``st`` (B, KV, tk, G, tq)."""
        e = jnp.exp(st - lse_i[:, :, None])
        flat = (b, kvh, st.shape[2], p.g * st.shape[4])
        dv = jnp.einsum("bksm,bkmd->bksd", e.reshape(flat).astype(q.dtype), gi, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bksd,bkmd->bksm", vj, gi, preferred_element_type=jnp.float32).reshape(st.shape)
        ds = (e * (dp - delta_i[:, :, None])).reshape(flat).astype(q.dtype)
        dk = jnp.einsum("bksm,bkmd->bksd", ds, qi, preferred_element_type=jnp.float32)
        return dk, dv, jnp.einsum("bkds,bksm->bkdm", kjt, ds, preferred_element_type=jnp.float32)

    def key_tile(dqt, j):
        kj, vj = _tile(k, j), _tile(v, j)
        kjt = jnp.swapaxes(kj, -1, -2)                                                   # (B, KV, D, t)

        def query_tile(i, carry, interior=False):
            dk, dv, dqt = carry
            qi, gi = _tile(q, i), _tile(g, i)
            st = _scores(p, qi, kj, i, j, kvalid, seg, interior=interior, transposed=True)
            dki, dvi, dqi = products(st, _tile(lse, i), _tile(delta, i), qi, gi, vj, kjt)
            return dk + dki, dv + dvi, lax.dynamic_update_index_in_dim(dqt, _tile(dqt, i) + dqi, i, axis=2)

        def diagonal(carry):
            """Query tile j against key tile j, causal, by key part (:func:`_diagonal_parts`): key slots [lo, hi)
            against queries [lo, t); the pairs before a part's own queries, all masked, are skipped."""
            dk, dv, dqt = carry
            qj, gj, lse_j, delta_j = _tile(q, j), _tile(g, j), _tile(lse, j), _tile(delta, j)
            dks, dvs, dq = [], [], None
            for lo, hi in _diagonal_parts(p):
                qx, gx = _query_rows(p, qj, lo, p.t), _query_rows(p, gj, lo, p.t)
                st = _scores(p, qx, kj[:, :, lo:hi], j, j, kvalid, seg, transposed=True, qr=(lo, p.t), kr=(lo, hi))
                dka, dva, dqa = products(st, lse_j[..., lo:], delta_j[..., lo:], qx, gx, vj[:, :, lo:hi],
                                         kjt[..., lo:hi])
                dks.append(dka)
                dvs.append(dva)
                dqa = dqa.reshape(b, kvh, d, p.g, p.t - lo)
                dq = dqa if dq is None else dq.at[..., lo:].add(dqa)   # the first part (lo = 0) covers all queries
            dqtj = _tile(dqt, j) + dq.reshape(b, kvh, d, m)
            return (dk + jnp.concatenate(dks, axis=2), dv + jnp.concatenate(dvs, axis=2),
                    lax.dynamic_update_index_in_dim(dqt, dqtj, j, axis=2))

        init = (jnp.zeros(kj.shape, jnp.float32), jnp.zeros(vj.shape, jnp.float32), dqt)
        if _split_diagonal(p):   # query tile j (the diagonal), then tiles j+1..n-1 with no slot mask
            dk, dv, dqt = lax.fori_loop(j + 1, n, functools.partial(query_tile, interior=True), diagonal(init))
        else:
            lo = jnp.maximum(j + p.dmin, 0) if n > 1 else 0
            hi = jnp.minimum(j + p.dmax, n - 1) + 1 if n > 1 else 1
            dk, dv, dqt = _loop(lo, hi, query_tile, init)
        return dqt, (dk.astype(k.dtype), dv.astype(v.dtype))

    dqt, (dk, dv) = _over_tiles(n, key_tile, jnp.zeros((b, kvh, n, d, m), jnp.float32))
    # dq back to (queries, D). XLA:CPU gives the transpose a strided layout that its consumer (the rope backward)
    # reads; forcing it into a buffer of its own (jlora.fusion.as_buffer) ran 0.997-1.007x (bench/README.md).
    return jnp.swapaxes(dqt, -1, -2).astype(q.dtype), jnp.moveaxis(dk, 0, 2), jnp.moveaxis(dv, 0, 2), None, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


# --- accelerator kernels ------------------------------------------------------------------------------------------

def _cudnn(q, k, v, scale, causal, window, valid, implementation="cudnn", tile=None):
    """cuDNN's fused attention through ``jax.nn.dot_product_attention``, the sliding window as cuDNN's left window.

    cuDNN takes padding as per-row key counts (``key_value_seq_lengths``: real tokens first, padding after), not
    as a mask: JAX's cuDNN path turns a mask into a (T, T) bias, which a (B, 1, 1, T) key mask does not fit. So a
    batch whose every row is right-padded (as training batches are) runs on cuDNN, and any other (left padding,
    holes) runs the blocked kernel instead, chosen at run time by ``lax.cond``: exact either way.
    ``implementation="xla"`` runs the same call through XLA (how the argument mapping is tested without a GPU)."""
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    left = None if window is None else (window - 1, 0)

    def fused(lengths=None):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, local_window_size=left,
                                            key_value_seq_lengths=lengths, implementation=implementation)

    if valid is None:
        return fused()
    valid = jnp.asarray(valid) != 0
    lengths = valid.sum(-1).astype(jnp.int32)
    right_padded = jnp.all(valid == (jnp.arange(valid.shape[-1])[None, :] < lengths[:, None]))
    return lax.cond(right_padded, lambda: fused(lengths),
                    lambda: blocked(q, k, v, scale=scale, causal=causal, window=window, valid=valid,
                                    tile=tile or TILE["gpu"]).astype(q.dtype))


def _splash(q, k, v, scale, causal, window, valid, segment_ids, *, interpret: bool = False, block: int = 128):
    """The Pallas splash kernel (TPU): one MQA kernel per KV head with its G query heads, vmapped over batch and KV
    heads; padding and packed rows become splash's segment ids (padding tokens, and the padding up to whole
    blocks, get an id of their own that no real token has). ``interpret=True`` runs it in Pallas' interpreter (how
    it is tested without a TPU)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    tp = -(-t // block) * block
    shape = (tp, tp)
    if window is not None:
        one = sm.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    elif causal:
        one = sm.CausalMask(shape)
    else:
        one = sm.FullMask(shape)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([one] * g), block_sizes=sizes, interpret=interpret)
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids).astype(jnp.int32)
    lone = jnp.iinfo(jnp.int32).min     # padding (and the padded tail) attends only padding: no empty row
    if valid is not None:
        seg = jnp.where(jnp.asarray(valid) != 0, seg, lone)
    pad = tp - t
    seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=lone)
    qh = jnp.pad(q * jnp.asarray(scale, q.dtype), ((0, 0), (0, pad), (0, 0), (0, 0)))
    qh = qh.reshape(b, tp, kvh, g, d).transpose(0, 2, 3, 1, 4)                       # (B, KV, G, T, D)
    kh = jnp.pad(k.astype(q.dtype), ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)   # (B, KV, T, D)
    vh = jnp.pad(v.astype(q.dtype), ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    def row(qb, kb, vb, qs, ks):
        ids = sk.SegmentIds(q=qs, kv=ks)
        return jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=ids))(qb, kb, vb)

    out = jax.vmap(row)(qh, kh, vh, seg, seg)                                   # (B, KV, G, T, D)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tp, h, -1)[:, :t]
