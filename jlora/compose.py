"""Adapter composition: PEFT's weighted merges of several adapters into one, and stacking adapters at inference.

:func:`combine` builds one adapter from several, each with a weight, by every combination type of PEFT's
``LoraModel.add_weighted_adapter``, computed as PEFT computes it (the tests compare each type with PEFT's own
result on the same adapters). Inputs are ``(adapters, LoraConfig)`` pairs, as :func:`jlora.init`,
:func:`jlora.peft.load` or a checkpoint give them; the output is such a pair, plain LoRA with scale 1 (alpha equal to
the rank at every path), so it trains, merges, applies and exports like any other adapter.

Write ``s_i`` for adapter i's scale at a path (:meth:`jlora.LoraConfig.scale`), ``w_i`` for its weight and
``D_i = s_i * A_i @ B_i`` for its update there. The types differ in what they combine:

==========================  ==============================================================================
type                        the combined update at a path
==========================  ==============================================================================
``cat``                     exactly ``sum_i w_i D_i``: the factors concatenated along the rank
                            (``A = [w_1 s_1 A_1 | w_2 s_2 A_2 | ...]``, ``B = [B_1; B_2; ...]``); rank
                            ``sum_i r_i``
``svd``                     ``sum_i w_i D_i``, exact before truncation, then its best rank-``svd_rank``
                            approximation (truncated SVD); exact whenever ``svd_rank`` reaches the sum's rank
``ties_svd``,               the full updates ``D_i`` combined by TIES / DARE / magnitude pruning (below), then a
``dare_linear_svd``,        truncated SVD; the combination itself is no longer the weighted sum
``dare_ties_svd``,
``magnitude_prune_svd``
``linear``                  A's and B's combined **separately**: ``A = sum_i c_i A_i``, ``B = sum_i |c_i| B_i``
                            with ``c_i = sign(w_i s_i) sqrt(|w_i s_i|)``, so the update ``A @ B`` holds the cross
                            terms ``c_i |c_j| A_i B_j``: equal to the weighted sum only for one adapter. Needs
                            equal ranks (per path).
``ties``, ``dare_linear``,  the same split of the weight over A and B, each factor combined separately by TIES /
``dare_ties``,              DARE / magnitude pruning; equal ranks needed
``magnitude_prune``
==========================  ==============================================================================

How a list of tensors ``X_i`` (factors, or full updates for the ``*_svd`` types) is combined with weights ``v_i``
(:func:`combine_tensors`), as PEFT's ``merge_utils`` does:

* task arithmetic (``linear``, ``svd``): ``sum_i v_i X_i``.
* magnitude pruning (``magnitude_prune*``): keep the ``int(density * size)`` largest-magnitude entries of each
  ``X_i`` (per layer), zero the rest, then ``sum_i v_i X_i``.
* DARE (``dare_linear*``): keep each entry with probability ``density`` and divide by ``density``, then the
  weighted sum. The masks are drawn from ``key``: path ``p``, input ``i`` (its index in ``items``) and factor ``f``
  (0 for A or a full update, 1 for B) use ``jax.random.bernoulli(k, density, X_i.shape)`` with ``k =
  fold_in(fold_in(key, zlib.crc32(p.encode()) & 0x7FFFFFFF), 2 * i + f)`` (the path's CRC-32 with its top bit
  cleared), so the result is a pure function of the key.
* TIES (``ties*``; ``dare_ties*`` prunes by DARE instead): magnitude pruning, then a sign elected per entry from the
  pruned, unweighted tensors (``"total"``: the sign of their sum; ``"frequency"``: the more frequent sign; ties go
  to +), then the mean of the weighted entries that agree with it (entries pruned to zero never agree).

As in PEFT: a single input is always combined linearly (its weight simply scales it); an input without an adapter at
some path does not take part there; the ``*_svd`` types use one rank everywhere, ``svd_rank`` or the largest rank
any input config names (``max(rank, *rank_pattern.values())``), capped per path at the kernel's smaller side.

Differences from PEFT, all deliberate: the result never uses rsLoRA (PEFT copies ``use_rslora`` from the first input
and so scales its merged adapter by ``sqrt(rank)`` when that input used rsLoRA); ``cat`` concatenates only the
inputs present at a path (PEFT pads with zero rows to one rank); ``density`` must lie in ``(0, 1]``.

:func:`stack` is "stacking at inference": several adapters applied at once, unmerged, each with its weight. It
returns one adapter tree (the ``cat`` construction) for :func:`jlora.apply`: the layer computes
``sum_i w_i s_i (x @ A_i) @ B_i`` without ever forming a full-size matrix, which equals running the model on
:func:`merge_weighted`'s weights.

Examples:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"dense": {"kernel": jnp.zeros((6, 4))}}
    >>> cfg = jlora.LoraConfig(rank=2, alpha=4, targets="dense")
    >>> a1, a2 = (jax.tree.map(lambda x: x + 0.1, jlora.init(params, cfg, key=jax.random.key(k))) for k in (1, 2))
    >>> both, both_cfg = combine([(a1, cfg), (a2, cfg)], [1.0, 0.5], "cat")
    >>> both["dense"]["kernel"], both_cfg.scale("dense/kernel")
    (Adapter(a=float32[6, 4], b=float32[4, 4]), 1.0)
    >>> merged = jlora.merge(params, both, both_cfg)["dense"]["kernel"]
    >>> reference = merge_weighted(params, [(a1, cfg), (a2, cfg)], [1.0, 0.5])["dense"]["kernel"]
    >>> bool(jnp.allclose(merged, reference, atol=1e-6))
    True
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora import adapter as adapter_lib
from jlora import lora as lora_lib
from jlora import tree as tree_lib
from jlora.adapter import Adapter, adapter_items, full_items
from jlora.config import CHANGES_BASE, LoraConfig

# combination type -> (how each input's factors or updates are combined, whether the result is re-factored by SVD)
_TYPES = {
    "linear": ("linear", False), "ties": ("ties", False), "dare_linear": ("dare_linear", False),
    "dare_ties": ("dare_ties", False), "magnitude_prune": ("magnitude_prune", False),
    "svd": ("linear", True), "ties_svd": ("ties", True), "dare_linear_svd": ("dare_linear", True),
    "dare_ties_svd": ("dare_ties", True), "magnitude_prune_svd": ("magnitude_prune", True),
    "cat": (None, False),
}
METHODS = tuple(_TYPES)
"""Every combination type, as PEFT's ``add_weighted_adapter`` names them."""
EXACT_METHODS = ("cat",)
"""Types whose result is exactly the weighted sum of the updates (the ``*_svd`` types are, before truncation)."""
FACTORWISE_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
"""Types that combine the A's and the B's separately (an approximation of the weighted sum)."""
SVD_METHODS = tuple(m for m, (_, svd) in _TYPES.items() if svd)
"""Types that combine full updates and re-factor the result by a truncated SVD."""
RULES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
"""How :func:`combine_tensors` combines a list of tensors."""
SIGN_METHODS = ("total", "frequency")


def options_used(method: str) -> set[str]:
    """Which of ``density`` and ``svd_rank`` a combination type reads.

    Examples:
        >>> sorted(options_used("ties_svd")), sorted(options_used("cat"))
        (['density', 'svd_rank'], [])
    """
    rule, svd = _TYPES[method]
    return ({"density"} if rule not in (None, "linear") else set()) | ({"svd_rank"} if svd else set())


Item = tuple[Mapping, LoraConfig]


# ----------------------------------------------------------------------------------------------- tensor rules

def _blocks(x: jax.Array, lead: int) -> jax.Array:
    """``x`` as ``(layers, entries)``: one row per matrix after the ``lead`` stacked axes."""
    return x.reshape(math.prod(x.shape[:lead]), -1)


def _magnitude_prune(x: jax.Array, density: float, lead: int) -> jax.Array:
    """Keeps the ``int(density * n)`` largest-magnitude entries of each of ``x``'s matrices (n entries each)."""
    if density >= 1:
        return x
    rows = _blocks(x, lead)
    k = int(density * rows.shape[1])
    if k == 0:
        return jnp.zeros_like(x)
    idx = jax.lax.top_k(jnp.abs(rows), k)[1]
    keep = jnp.zeros(rows.shape, x.dtype).at[jnp.arange(rows.shape[0])[:, None], idx].set(1)
    return x * keep.reshape(x.shape)


def _keep_mask(key: jax.Array, density: float, x: jax.Array) -> jax.Array:
    """DARE's random mask for ``x``: each entry kept (1) with probability ``density``."""
    return jax.random.bernoulli(key, density, x.shape).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("rule", "density", "sign_method", "lead"))
def _combine(xs, weights, masks, *, rule, density, sign_method, lead):
    """:func:`combine_tensors` after the random masks are drawn: one compilation per rule and shapes."""
    xs = [x.astype(jnp.float32) for x in xs]
    if rule in ("ties", "magnitude_prune"):
        xs = [_magnitude_prune(x, density, lead) for x in xs]
    elif masks is not None:
        xs = [(x * m) / density for x, m in zip(xs, masks)]
    stacked = jnp.stack(xs)
    weighted = stacked * weights.reshape((-1,) + (1,) * (stacked.ndim - 1))
    if rule not in ("ties", "dare_ties"):
        return weighted.sum(axis=0)
    sign = jnp.sign(stacked)
    votes = stacked.sum(axis=0) if sign_method == "total" else sign.sum(axis=0)
    agree = (sign == jnp.where(votes >= 0, 1.0, -1.0)[None]).astype(jnp.float32)
    return (weighted * agree).sum(axis=0) / jnp.maximum(agree.sum(axis=0), 1.0)


def combine_tensors(tensors: Sequence[jax.Array], weights: Sequence[float], rule: str, *,
                    density: float | None = None, majority_sign_method: str = "total",
                    keys: Sequence[jax.Array] | None = None, lead: int = 0) -> jax.Array:
    """Combines same-shaped tensors by one of PEFT's rules (``peft.utils.merge_utils``), in fp32.

    Args:
        tensors: the tensors, all of one shape; with ``lead`` stacked axes, each trailing matrix is pruned alone
            (as PEFT prunes each layer's tensor).
        weights: one per tensor.
        rule: ``"linear"`` (task arithmetic), ``"ties"``, ``"dare_linear"``, ``"dare_ties"`` or
            ``"magnitude_prune"`` (see the module docstring).
        density: the share of entries kept by pruning, in ``(0, 1]`` (every rule but ``"linear"``).
        majority_sign_method: ``"total"`` or ``"frequency"`` (TIES rules).
        keys: one PRNG key per tensor for DARE's random masks.
        lead: the number of leading stacked axes.

    Returns:
        The combined fp32 tensor.

    Examples:
        >>> import jax.numpy as jnp
        >>> x, y, z = jnp.array([4., -1, 2, .5]), jnp.array([3., 2, -5, 1]), jnp.array([1., -3, 1, 4])
        >>> combine_tensors([x, y, z], [1.0, 1.0, 1.0], "linear")
        Array([ 8. , -2. , -2. ,  5.5], dtype=float32)
        >>> # TIES keeps the 2 largest entries of each; the elected signs are (+, -, -, +), so x's 2 at index 2 is
        >>> # dropped and index 0 averages x's 4 and y's 3
        >>> combine_tensors([x, y, z], [1.0, 1.0, 1.0], "ties", density=0.5)
        Array([ 3.5, -3. , -5. ,  4. ], dtype=float32)
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}; got {rule!r}")
    if rule != "linear":
        _check_density(density, rule)
    if rule in ("ties", "dare_ties") and majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}; got {majority_sign_method!r}")
    xs = tuple(jnp.asarray(t) for t in tensors)
    masks = None
    if rule in ("dare_linear", "dare_ties") and density < 1:
        if keys is None or len(keys) != len(xs):
            raise ValueError(f"rule {rule!r} draws random masks: pass one PRNG key per tensor as `keys`")
        masks = tuple(_keep_mask(k, density, x) for x, k in zip(xs, keys))
    w = jnp.asarray(np.asarray(weights, np.float32))
    return _combine(xs, w, masks, rule=rule, density=None if density is None else float(density),
                    sign_method=majority_sign_method, lead=lead)


def _check_density(density, what: str) -> None:
    if density is None:
        raise ValueError(f"{what!r} prunes the adapters: pass `density` (`--density` of jlora compose), the share "
                         f"of entries kept, in (0, 1]")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"`density` must be a number in (0, 1] (the share of entries kept); got {density!r}")


# ------------------------------------------------------------------------------------ two forms of one model

def stack_form(path: str) -> str:
    """``path`` with its numbered module names unnumbered: where a model whose layers are a scanned stack holds the
    kernel that ``path`` names in one layer of the unrolled model (jlora's models with ``scan_layers``). Two paths
    of one set of adapters, one of which is the other's ``stack_form``, come from two forms of one model.

    Examples:
        >>> stack_form("layers_3/self_attn/q_proj/kernel"), stack_form("lm_head/kernel")
        ('layers/self_attn/q_proj/kernel', 'lm_head/kernel')
    """
    return re.sub(r"_\d+(?=/|$)", "", path)


def stack_twin(path: str, node: Adapter, others: Mapping[str, Adapter]) -> tuple[str, str] | None:
    """``(other path, "stacked" or "unrolled")`` when ``others`` holds the adapter of the kernel ``path`` names in
    the other layer-stack form of one model: ``path`` is the scanned stack (``layers/...``, one more leading axis)
    of an unrolled layer's ``layers_0/...`` there, or the reverse (:func:`stack_form`); None otherwise.
    The axes tell a stack from a model's own ``proj`` beside ``proj_1``.

    Examples:
        >>> import jax.numpy as jnp
        >>> one = Adapter(jnp.zeros((4, 2)), jnp.zeros((2, 3)))
        >>> stacked = Adapter(jnp.zeros((5, 4, 2)), jnp.zeros((5, 2, 3)))   # 5 layers
        >>> stack_twin("layers/q/kernel", stacked, {"layers_0/q/kernel": one})
        ('layers_0/q/kernel', 'stacked')
        >>> stack_twin("proj/kernel", one, {"proj_1/kernel": one}) is None   # two layers of one model
        True
    """
    def lead(n: Adapter) -> int:
        return np.ndim(n.a) - 2 - n.slot_dims

    for other, o in others.items():
        if stack_form(other) == path and lead(node) == lead(o) + 1:
            return other, "stacked"
        if stack_form(path) == other and lead(o) == lead(node) + 1:
            return other, "unrolled"
    return None


# ----------------------------------------------------------------------------------------------- checks

def _labels(items, names: Sequence[str] | None) -> list[str]:
    """How messages name each input: its name, else ``items[i]``."""
    if names is None:
        return [f"items[{i}]" for i in range(len(items))]
    if isinstance(names, str) or len(names) != len(items) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"give one name (a string) per adapter: {len(items)} adapters but names={names!r}")
    return [repr(n) for n in names]


def _check_items(items: Sequence[Item], weights: Sequence[float],
                 names: Sequence[str] | None) -> tuple[list[tuple[Mapping, LoraConfig]], list[str]]:
    """The inputs, checked, and how messages name them."""
    if isinstance(items, Mapping) or not isinstance(items, Sequence) or not items:
        raise ValueError("`items` must be a non-empty list of (adapters, LoraConfig) pairs")
    if isinstance(weights, (int, float)) or len(weights) != len(items):
        raise ValueError(f"give one weight per adapter: {len(items)} adapters but weights={weights!r}")
    labels = _labels(items, names)
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float, np.floating, np.integer)) or not math.isfinite(w):
            raise ValueError(f"weights[{i}] must be a finite number; got {w!r}")
    out = []
    for i, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], LoraConfig)):
            raise ValueError(f"{labels[i]} must be an (adapters, LoraConfig) pair; got {type(item).__name__}")
        adapters, cfg = item
        full = [p for p, _ in full_items(adapters)]
        if full:
            raise ValueError(f"{labels[i]} holds whole trained tensors at {full[:5]} (bias / modules_to_save); they "
                             f"replace a parameter rather than add a low-rank update, so they cannot be weighted "
                             f"and combined. Drop them from the adapter tree first (PEFT refuses them too).")
        if cfg.init in CHANGES_BASE:
            raise ValueError(f"{labels[i]} is a {cfg.init} adapter, relative to a residual base rather than the "
                             f"model's weights; convert it to plain LoRA first "
                             f"(jlora.variants.inits.to_original_base, as the jlora commands do)")
        nodes = list(adapter_items(adapters))
        if not nodes:
            raise ValueError(f"{labels[i]} holds no adapters")
        for path, node in nodes:
            if node.variant != "lora" or node.extras:
                raise ValueError(f"{labels[i]} has a {node.variant!r} adapter at {path!r}; composition combines "
                                 f"plain LoRA updates only (a DoRA update is not a low-rank sum)")
            if node.slot_dims:
                raise ValueError(f"{labels[i]} at {path!r} is a bank of slots ({type(node).__name__}); take one "
                                 f"slot out first (jlora.bank.get)")
            if node.rank != cfg.rank_for(path):
                raise ValueError(f"{labels[i]}: the adapter at {path!r} has rank {node.rank} but its config gives "
                                 f"rank {cfg.rank_for(path)} there; pair each adapter tree with its own config")
        out.append((adapters, cfg))
    return out, labels


def _by_path(items, labels: Sequence[str]) -> dict[str, list[tuple[int, Adapter, float]]]:
    """path -> [(input index, adapter, scale)] for the inputs that have an adapter there, in path order."""
    found: dict[str, list[tuple[int, Adapter, float]]] = {}
    for i, (adapters, cfg) in enumerate(items):
        for path, node in adapter_items(adapters):
            found.setdefault(path, []).append((i, node, cfg.scale(path)))
    forms: dict[str, list[tuple[int, str, Adapter]]] = {}   # the paths that may name one kernel in two forms
    for path, group in found.items():
        forms.setdefault(stack_form(path), []).extend((i, path, node) for i, node, _ in group)
    for same in forms.values():
        for i, path, node in same:
            twin = stack_twin(path, node, {p: n for j, p, n in same if j != i})
            if twin is not None and twin[1] == "stacked":   # a scanned stack here, one of its layers unrolled there
                one = twin[0]
                who = " and ".join(labels[j] for j, p, _ in same if p == one)
                raise ValueError(f"{labels[i]} adapts {path!r}, a scanned stack of layers, and {who} {one!r}, one of "
                                 f"those layers unrolled: the inputs were read for two forms of one model. Read them "
                                 f"all for one form (the same scan_layers), or through PEFT folders, which fit either")
    for path, group in found.items():
        _, first, _ = group[0]
        if first.layout is not None and first.layout.groups > 1:
            raise ValueError(f"the adapters at {path!r} are on a grouped convolution (groups="
                             f"{first.layout.groups}), whose B is block-diagonal; jlora.compose does not combine "
                             f"them. Exclude that layer, or merge each adapter with jlora.merge in turn.")
        for i, node, _ in group[1:]:
            if (np.shape(node.a)[:-1], np.shape(node.b)[:-2] + np.shape(node.b)[-1:]) != \
                    (np.shape(first.a)[:-1], np.shape(first.b)[:-2] + np.shape(first.b)[-1:]):
                raise ValueError(f"the adapters at {path!r} do not fit one kernel: {labels[group[0][0]]} has a "
                                 f"{np.shape(first.a)}, b {np.shape(first.b)} and {labels[i]} a {np.shape(node.a)}, "
                                 f"b {np.shape(node.b)}; they were made for different models")
            if first.layout is not None and node.layout is not None and not first.layout.same_axes(node.layout):
                raise ValueError(f"the adapters at {path!r} read the kernel differently: {labels[group[0][0]]} "
                                 f"{first.layout.describe()}, {labels[i]} {node.layout.describe()}")
    return dict(sorted(found.items()))


def _path_key(key: jax.Array, path: str) -> jax.Array:
    """The key of the DARE masks at ``path``: ``fold_in(key, crc32(path) & 0x7FFFFFFF)`` (module docstring)."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _output_config(cfgs: Sequence[LoraConfig], ranks: Mapping[str, int]) -> LoraConfig:
    """Plain LoRA with scale 1 at every path (alpha = rank), targeting the combined paths."""
    first = cfgs[0]
    common = Counter(ranks.values()).most_common(1)[0][0]
    if all((c.targets, c.exclude) == (first.targets, first.exclude) for c in cfgs):
        targets, exclude = first.targets, first.exclude
    else:
        targets, exclude = tuple(rf"^{re.escape(p)}$" for p in ranks), ()
    pattern = {rf"^{re.escape(p)}$": r for p, r in ranks.items() if r != common}
    return LoraConfig(rank=common, alpha=float(common), targets=targets, exclude=exclude, dropout=first.dropout,
                      use_rslora=False, rank_pattern=pattern,
                      alpha_pattern={k: float(v) for k, v in pattern.items()}, dtype=first.dtype)


# ----------------------------------------------------------------------------------------------- combining

@jax.jit
def _cat_factors(a_s, b_s, coefs):
    a = jnp.concatenate([a.astype(jnp.float32) * c for a, c in zip(a_s, coefs)], axis=-1)
    return a.astype(a_s[0].dtype), jnp.concatenate([b.astype(jnp.float32) for b in b_s], axis=-2).astype(b_s[0].dtype)


def _cat(group, weights) -> tuple[jax.Array, jax.Array]:
    coefs = tuple(jnp.float32(weights[i] * s) for i, _, s in group)
    return _cat_factors(tuple(jnp.asarray(n.a) for _, n, _ in group), tuple(jnp.asarray(n.b) for _, n, _ in group),
                        coefs)


def _factorwise(rule, group, weights, path, key, opts, labels) -> tuple[jax.Array, jax.Array]:
    first = group[0][1]
    lead = np.ndim(first.a) - 2
    ranks = {i: n.rank for i, n, _ in group}
    if len(set(ranks.values())) > 1:
        raise ValueError(f"this combination type adds the A's and the B's separately, so the adapters must have "
                         f"one rank at each path; at {path!r} the ranks are "
                         f"{', '.join(f'{labels[i]}: {r}' for i, r in ranks.items())}. Use 'cat' or an '*_svd' "
                         f"type for adapters of different ranks.")
    ws = [weights[i] * s for i, _, s in group]
    w_a = [math.sqrt(abs(w)) * (1.0 if w >= 0 else -1.0) for w in ws]   # the sign goes on A only
    w_b = [math.sqrt(abs(w)) for w in ws]
    out = []
    for factor, w in ((0, w_a), (1, w_b)):
        tensors = [n.a if factor == 0 else n.b for _, n, _ in group]
        keys = None if key is None else [jax.random.fold_in(key, 2 * i + factor) for i, _, _ in group]
        out.append(combine_tensors(tensors, w, rule, keys=keys, lead=lead, **opts))
    dtype = jnp.result_type(first.a)
    return out[0].astype(dtype), out[1].astype(dtype)


@jax.jit
def _update(a, b, scale):
    return scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("rank", "clamp", "full_matrices", "lead"))
def _refactor(d, *, rank, clamp, full_matrices, lead):
    """``(A, B)`` of rank ``rank`` from the update ``d`` ``(..., in, out)`` by a truncated SVD (PEFT's recipe)."""
    m = jnp.swapaxes(d, -1, -2)                          # (out, in), the matrix PEFT decomposes
    u, s, vh = jnp.linalg.svd(m, full_matrices=full_matrices)
    k = min(rank, *m.shape[-2:])
    u, vh = canonical_signs(u[..., :, :k] * s[..., None, :k], vh[..., :k, :])
    if clamp is not None:
        rows = lambda x: x.reshape(*x.shape[:lead], -1)  # noqa: E731  (one distribution per layer)
        hi = jnp.quantile(jnp.concatenate([rows(u), rows(vh)], axis=-1), clamp, axis=-1)[..., None, None]
        u, vh = jnp.clip(u, -hi, hi), jnp.clip(vh, -hi, hi)
    return jnp.swapaxes(vh, -1, -2), jnp.swapaxes(u, -1, -2)


def _svd(rule, group, weights, key, opts, rank, clamp, full_matrices) -> tuple[jax.Array, jax.Array]:
    first = group[0][1]
    lead = np.ndim(first.a) - 2
    deltas = [_update(jnp.asarray(n.a), jnp.asarray(n.b), jnp.float32(s)) for _, n, s in group]
    keys = None if key is None else [jax.random.fold_in(key, 2 * i) for i, _, _ in group]
    d = combine_tensors(deltas, [weights[i] for i, _, _ in group], rule, keys=keys, lead=lead, **opts)
    a, b = _refactor(d, rank=rank, clamp=None if clamp is None else float(clamp), full_matrices=full_matrices,
                     lead=lead)
    dtype = jnp.result_type(first.a)
    return a.astype(dtype), b.astype(dtype)


def canonical_signs(u: jax.Array, vh: jax.Array) -> tuple[jax.Array, jax.Array]:
    """SVD factors with each singular pair's sign fixed: the largest-magnitude entry of each row of ``vh`` > 0.

    A singular pair ``(u_k, v_k)`` is defined up to a joint sign flip, which LAPACK routines choose differently;
    ``u @ vh`` does not depend on it, but ``svd_clamp``'s quantile does. Fixing it makes the clamped result a
    function of the update alone (the same on every backend). ``u`` is ``(..., m, k)``, ``vh`` ``(..., k, n)``.
    """
    idx = jnp.argmax(jnp.abs(vh), axis=-1)[..., None]
    sign = jnp.sign(jnp.take_along_axis(vh, idx, axis=-1))
    sign = jnp.where(sign == 0, 1.0, sign).astype(vh.dtype)               # (..., k, 1)
    return u * jnp.swapaxes(sign, -1, -2), vh * sign


def combine(items: Sequence[Item], weights: Sequence[float], method: str, *, density: float | None = None,
            majority_sign_method: str = "total", svd_rank: int | None = None, svd_clamp: float | None = None,
            svd_full_matrices: bool = True, key: jax.Array | None = None,
            names: Sequence[str] | None = None) -> tuple[dict, LoraConfig]:
    """One adapter from several weighted ones, by one of PEFT's ``add_weighted_adapter`` combination types.

    Args:
        items: ``(adapters, LoraConfig)`` pairs for one base model (plain LoRA; no whole trained tensors).
        weights: one number per item; negative weights subtract.
        method: one of :data:`METHODS` (see the module docstring for what each computes).
        density: the share of entries kept, in ``(0, 1]``, for the pruning types (``ties*``, ``dare_*``,
            ``magnitude_prune*``).
        majority_sign_method: ``"total"`` or ``"frequency"``, for ``ties*`` and ``dare_ties*``.
        svd_rank: the rank of the ``*_svd`` result (default: the largest rank any input config names).
        svd_clamp: a quantile in ``[0, 1]``: the SVD factors (``U S`` and ``V``) are clipped to ``[-q, q]`` where
            ``q`` is that quantile of their entries (per layer); None does not clip. The quantile depends on the
            signs of the singular vectors, which jlora fixes (:func:`canonical_signs`) where PEFT keeps LAPACK's;
            with ``svd_rank`` above the rank of the combined update, the surplus singular vectors span its null
            space arbitrarily and still enter the quantile (in PEFT as here), so keep the rank within it.
        svd_full_matrices: whether the SVD computes full U and V (the truncated result is the same; PEFT's
            ``svd_full_matrices``). PEFT's ``svd_driver`` picks a cuSOLVER routine and has no JAX counterpart.
        key: a PRNG key, required by the DARE types (their random masks are a pure function of it).
        names: one name per item, for messages (default: ``items[i]``), e.g. the names a command line gave them.

    Returns:
        ``(adapters, cfg)``: the combined adapter at every path any input adapts, and its config: plain LoRA,
        alpha equal to the rank at every path (scale 1), the first input's dropout and dtype, the inputs' targets
        when they all share them, else the exact paths.

    Raises:
        ValueError: for an unknown type, a missing ``density`` or ``key``, weights that do not match the items,
            adapters of different ranks at a path for a factor-wise type, adapters made for different kernels (or
            for a scanned and an unrolled form of one model), DoRA adapters, banks, or whole trained tensors.
    """
    if method not in _TYPES:
        raise ValueError(f"unknown combination type {method!r}; choose one of {METHODS}")
    items, labels = _check_items(items, weights, names)
    weights = [float(w) for w in weights]
    if len(items) == 1:
        method = "linear"          # as PEFT: one adapter is always combined linearly
    rule, svd = _TYPES[method]
    opts = {}
    if rule not in (None, "linear"):
        _check_density(density, method)
        opts["density"] = float(density)
    if rule in ("ties", "dare_ties"):
        if majority_sign_method not in SIGN_METHODS:
            raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}; got {majority_sign_method!r}")
        opts["majority_sign_method"] = majority_sign_method
    random = rule in ("dare_linear", "dare_ties") and opts["density"] < 1
    if random and key is None:
        raise ValueError(f"{method!r} prunes at random: pass an explicit PRNG key, e.g. key=jax.random.key(0)")
    if svd:
        if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
            raise ValueError(f"`svd_rank` must be an integer >= 1 or None; got {svd_rank!r}")
        if svd_clamp is not None and not (isinstance(svd_clamp, (int, float)) and 0 <= svd_clamp <= 1):
            raise ValueError(f"`svd_clamp` is a quantile and must lie in [0, 1] (or be None); got {svd_clamp!r}")
        rank = svd_rank or max(max([cfg.rank, *cfg.rank_pattern.values()]) for _, cfg in items)
    out, ranks = {}, {}
    for path, group in _by_path(items, labels).items():
        path_key = _path_key(key, path) if random else None
        if rule is None:
            a, b = _cat(group, weights)
        elif svd:
            a, b = _svd(rule, group, weights, path_key, opts, rank, svd_clamp, svd_full_matrices)
        else:
            a, b = _factorwise(rule, group, weights, path, path_key, opts, labels)
        first = group[0][1]
        out[path] = Adapter(a, b, layout=first.layout)
        ranks[path] = int(np.shape(a)[-1])
    return tree_lib.unflatten(out), _output_config([cfg for _, cfg in items], ranks)


def stack(items: Sequence[Item], weights: Sequence[float], *,
          names: Sequence[str] | None = None) -> tuple[dict, LoraConfig]:
    """Several adapters applied at once, unmerged, each with its weight: one adapter tree for :func:`jlora.apply`.

    At every path the factors are concatenated along the rank with ``w_i * s_i`` folded into each ``A_i`` (the
    ``cat`` construction), so the layer adds ``sum_i w_i s_i (x @ A_i) @ B_i``: exactly the model whose weights are
    :func:`merge_weighted`'s, with no full-size matrix formed. The rank at a path is the sum of the inputs' ranks
    there; the config has scale 1 everywhere. ``names`` name the inputs in messages, as in :func:`combine`.

    Examples:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
        >>> model = nn.Dense(3)
        >>> x = jnp.ones((2, 5))
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> cfg1 = jlora.LoraConfig(rank=1, alpha=2, targets="kernel")
        >>> cfg2 = jlora.LoraConfig(rank=2, alpha=2, targets="kernel")
        >>> style = jax.tree.map(lambda t: t + 0.3, jlora.init(params, cfg1, key=jax.random.key(1)))
        >>> task = jax.tree.map(lambda t: t - 0.2, jlora.init(params, cfg2, key=jax.random.key(2)))
        >>> items, weights = [(task, cfg2), (style, cfg1)], [1.0, 0.4]
        >>> adapters, cfg = stack(items, weights)
        >>> adapters["kernel"].rank
        3
        >>> y = jlora.apply(model, params, adapters, cfg, x)
        >>> merged = merge_weighted(params, items, weights)
        >>> bool(jnp.allclose(y, model.apply({"params": merged}, x), atol=1e-5))
        True
    """
    items, labels = _check_items(items, weights, names)
    weights = [float(w) for w in weights]
    out, ranks = {}, {}
    for path, group in _by_path(items, labels).items():
        a, b = _cat(group, weights)
        out[path] = Adapter(a, b, layout=group[0][1].layout)
        ranks[path] = int(np.shape(a)[-1])
    return tree_lib.unflatten(out), _output_config([cfg for _, cfg in items], ranks)


def merge_weighted(params: Mapping, items: Sequence[Item], weights: Sequence[float], *,
                   names: Sequence[str] | None = None) -> dict:
    """``params`` with the weighted sum of the adapters' updates added: ``W + sum_i w_i s_i A_i @ B_i``.

    The reference for :func:`stack` and for the exact combination types; computed in fp32 and cast back to each
    parameter's dtype (a quantized kernel is decoded, updated and re-encoded, as :func:`jlora.merge` does).
    ``names`` name the inputs in messages, as in :func:`combine`.
    """
    items, _ = _check_items(items, weights, names)
    lora_lib.check_params(params)
    flat = tree_lib.flatten(params)
    sums: dict[str, jax.Array] = {}
    for (adapters, cfg), w in zip(items, weights):
        lora_lib.check_fits(params, adapters, cfg)
        for path, node in adapter_items(adapters):
            shape = tuple(flat[path].shape)
            lay = node.layout.fitted(shape) if node.layout is not None else lora_lib.default_layout(path, shape)
            d = float(w) * lora_lib.delta(node, cfg.scale(path), shape, lay, dtype=jnp.float32)
            sums[path] = d if path not in sums else sums[path] + d
    for path, d in sums.items():
        w = flat[path]
        new = lora_lib.dense_value(w) + d
        kind = adapter_lib.kernel_type(w)
        flat[path] = kind.rebuild(w, new) if kind is not None else new.astype(w.dtype)
    return tree_lib.unflatten(flat)


__all__ = ["combine", "options_used", "stack", "merge_weighted", "combine_tensors", "canonical_signs", "METHODS",
           "EXACT_METHODS", "FACTORWISE_METHODS", "SVD_METHODS", "RULES", "SIGN_METHODS"]
