"""Parameter paths, flattening, and partition/combine of pytrees.

Every parameter has a path string: its dict keys joined by "/", e.g. ``layers_0/self_attn/q_proj/kernel``.
Targets, rank patterns, checkpoints and PEFT key names are all written in terms of these strings, so there is
exactly one way to spell a path (:func:`path_str`).

:func:`partition` and :func:`combine` follow equinox's semantics: ``partition`` splits a tree into two trees of
the same structure with ``None`` holes, ``combine`` fills the holes of the first tree from the others. Use them
to train a few full tensors beside the adapters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import traverse_util

PyTree = Any


def path_str(keypath: tuple) -> str:
    """Turns a JAX key path into a "/"-joined string.

    Examples:
        >>> import jax
        >>> path_str((jax.tree_util.DictKey("a"), jax.tree_util.DictKey("b")))
        'a/b'
    """
    return jax.tree_util.keystr(tuple(keypath), simple=True, separator="/")


def flatten(tree: Mapping) -> dict[str, Any]:
    """Flattens a nested dict into ``{path: leaf}`` (any non-dict value, an :class:`jlora.Adapter` too, is a leaf).

    Examples:
        >>> flatten({"dense": {"kernel": 1, "bias": 2}})
        {'dense/kernel': 1, 'dense/bias': 2}
    """
    return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict:
    """Inverts :func:`flatten`.

    Examples:
        >>> unflatten({"dense/kernel": 1, "dense/bias": 2})
        {'dense': {'kernel': 1, 'bias': 2}}
    """
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def leaves_by_path(tree: PyTree) -> dict[str, Any]:
    """``{path: leaf}`` for every pytree leaf, paths through any registered node (an adapter's ``.../a``).

    Examples:
        >>> import jax.numpy as jnp
        >>> from jlora.adapter import Adapter
        >>> list(leaves_by_path({"q": {"kernel": Adapter(jnp.zeros((4, 2)), jnp.zeros((2, 3)))}}))
        ['q/kernel/a', 'q/kernel/b']
    """
    return {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def paths(tree: PyTree) -> list[str]:
    """The path strings of every leaf of ``tree``, in flattening order."""
    return [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _is_none(x) -> bool:
    return x is None


def partition(tree: PyTree, spec: Callable[[Any], bool] | str | PyTree) -> tuple[PyTree, PyTree]:
    """Splits ``tree`` into ``(selected, rest)``, two trees of the same structure with ``None`` holes.

    Args:
        tree: any pytree.
        spec: which leaves go to ``selected``: a callable ``leaf -> bool``; a regex string searched in each
            leaf's path; or a pytree of bools (or callables) that is a prefix of ``tree``.

    Examples:
        >>> params = {"dense": {"bias": 2.0, "kernel": 1.0}}
        >>> bias, rest = partition(params, r"/bias$")
        >>> bias, rest
        ({'dense': {'bias': 2.0, 'kernel': None}}, {'dense': {'bias': None, 'kernel': 1.0}})
        >>> combine(bias, rest) == params
        True
    """
    if isinstance(spec, str):
        pattern = re.compile(spec)
        mask = jax.tree_util.tree_map_with_path(lambda kp, _: bool(pattern.search(path_str(kp))), tree)
    elif callable(spec):
        mask = jax.tree.map(spec, tree)
    else:
        mask = jax.tree.map(
            lambda s, sub: jax.tree.map(s if callable(s) else (lambda _: bool(s)), sub),
            spec, tree, is_leaf=lambda x: isinstance(x, bool) or callable(x))
    selected = jax.tree.map(lambda m, x: x if m else None, mask, tree)
    rest = jax.tree.map(lambda m, x: None if m else x, mask, tree)
    return selected, rest


def combine(*trees: PyTree) -> PyTree:
    """Merges trees with ``None`` holes: each leaf is the first non-``None`` one among ``trees``.

    Examples:
        >>> combine({"a": None, "b": 2}, {"a": 1, "b": None})
        {'a': 1, 'b': 2}
    """
    if not trees:
        raise ValueError("`combine` needs at least one tree")

    def first(*xs):
        return next((x for x in xs if x is not None), None)

    return jax.tree.map(first, *trees, is_leaf=_is_none)
