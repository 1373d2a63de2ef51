"""The PyTorch original of a model you ported to Flax (Linen or NNX): its module names and tensor layouts.

jlora's own model families name their tensors through their parameter tables (:mod:`jlora.models`). A model you
ported yourself has no table, so :class:`TorchModel` describes the PyTorch original instead: the PyTorch module
name of each adapted jlora path (a dict or a function), the port's params and, for convolutions and kernels of
more than 2 dims, the traced :func:`jlora.layout`. :mod:`jlora.peft` takes it wherever it takes a loaded family
model, so an adapter trained on the port is saved as a PEFT folder for the original, and loaded back.

Layouts, per PyTorch module type: ``nn.Linear`` weights are ``(out, in)`` (Flax kernels ``(in, out)``; with
``fan_in_fan_out``, transformers' ``Conv1D``, they are ``(in, out)`` too); ``nn.Embedding`` is ``(vocab, dim)`` as in
Flax; ``nn.ConvNd`` weights are ``(out, in / groups, *kernel)`` where Flax has ``(*kernel, in / groups, out)``.
PEFT's conv LoRA (0.21) is ``lora_A``, a convolution ``in -> r`` with the layer's kernel size, stride and padding
but no groups, weight ``(r, in, *kernel)``, and ``lora_B``, a 1x1 convolution ``r -> out`` with the layer's groups,
weight ``(out, r / groups, 1, ...)``. jlora's grouped A sees only its group's inputs (so the update merges into the
grouped kernel exactly); its PEFT ``lora_A`` is that A with zeros outside each group's block, which PEFT computes
identically.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jlora import lora as lora_lib
from jlora import tree as tree_lib
from jlora.adapter import KernelLayout

LAYER = "{layer}"   # in a module name: the index along a stacked (scanned) kernel's leading axis


@dataclasses.dataclass(frozen=True)
class TorchModel:
    """The PyTorch original of a Flax port, for :func:`jlora.peft.save` and :func:`jlora.peft.load`.

    Attributes:
        params: the port's frozen params (the tree the adapters are made for; an NNX model's param state as a
            nested dict).
        names: jlora param path of a kernel or embedding -> PyTorch module name, as a dict or a function that
            returns None for paths without one (``{"features/0/kernel": "features.0"}``). A stacked (scanned)
            kernel's name holds ``{layer}``, the index along its leading axis (``"layers.{layer}.fc1"``). A
            ``bias`` (or other leaf) of a mapped module is that module's ``bias`` (``weight``).
        layout: :func:`jlora.layout` of the port: needed for ``Conv`` kernels and kernels of more than 2 dims.
        name: the base model's name or path, written as PEFT's ``base_model_name_or_path``.
        fan_in_fan_out: the original's linear weights are stored ``(in, out)`` (transformers' ``Conv1D``).

    Examples:
        >>> import jax.numpy as jnp
        >>> tm = TorchModel({"fc": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}, {"fc/kernel": "net.0"})
        >>> tm.module_table(), sorted(tm.param_table())
        ({'net.0': ('fc/kernel', None)}, ['net.0.bias', 'net.0.weight'])
    """

    params: Any
    names: Mapping[str, str] | Callable[[str], str | None]
    layout: Mapping[str, KernelLayout] | None = None
    name: str | None = None
    fan_in_fan_out: bool = False

    def module(self, path: str) -> str | None:
        """The PyTorch module name of the jlora param ``path`` (``{layer}`` still unfilled), or None."""
        return self.names.get(path) if isinstance(self.names, Mapping) else self.names(path)

    def kernel_layout(self, path: str) -> KernelLayout:
        """How the kernel at ``path`` is read: its traced layout, or ``(in, out)`` for a 2-D one."""
        shape = tuple(tree_lib.flatten(self.params)[path].shape)
        module = self.module(path) or ""
        if self.layout is not None and path in self.layout:
            return self.layout[path].fitted(shape)
        lay = lora_lib.default_layout(path, shape[1:] if LAYER in module else shape)
        return dataclasses.replace(lay, lead=1) if LAYER in module else lay

    def _entries(self, leaves: tuple[str, ...]):
        """``(path, module name, leaf, layer)`` for every mapped param whose leaf is in ``leaves``, per layer."""
        flat = tree_lib.flatten(self.params)
        for path, value in flat.items():
            mpath, _, leaf = path.rpartition("/")
            if leaf not in leaves:
                continue
            prefix = f"{mpath}/" if mpath else ""
            module = self.module(path) or self.module(prefix + "kernel") or self.module(prefix + "embedding")
            if module is None:
                continue
            if LAYER not in module:
                yield path, module, leaf, None
            else:
                yield from ((path, module.replace(LAYER, str(i)), leaf, i) for i in range(value.shape[0]))

    def module_table(self) -> dict[str, tuple[str, int | None]]:
        """PyTorch module name -> (jlora kernel path, layer index or None), as :func:`jlora.models.hf_module_table`."""
        table = {}
        for path, module, _, layer in self._entries(("kernel", "embedding")):
            if module in table:
                raise ValueError(f"`names` gives two jlora paths the PyTorch module name {module!r}: "
                                 f"{table[module][0]!r} and {path!r}")
            table[module] = (path, layer)
        return table

    def param_table(self) -> dict[str, tuple[str, int | None, tuple[int, ...] | None]]:
        """PyTorch tensor name -> (jlora path, layer index or None, axis order): the jlora array (one layer of it)
        transposed by that order is the PyTorch tensor (None: the same)."""
        table = {}
        for path, module, leaf, layer in self._entries(("kernel", "embedding", "bias", "scale")):
            perm = None
            if leaf == "kernel":
                lay = self.kernel_layout(path)
                perm = torch_axes(lay, self.fan_in_fan_out)
                if perm is False:
                    continue     # a multi-axis kernel has no single PyTorch tensor layout here
            table[f"{module}.{'bias' if leaf == 'bias' else 'weight'}"] = (path, layer, perm)
        return table


def torch_axes(lay: KernelLayout, fan_in_fan_out: bool = False) -> tuple[int, ...] | None | bool:
    """The axis order that turns one layer of a Flax kernel into the PyTorch weight (None: as is; False: none).

    Examples:
        >>> torch_axes(KernelLayout("Dense")), torch_axes(KernelLayout("Conv", (0, 1, 2), (3,)))
        ((1, 0), (3, 2, 0, 1))
    """
    n = len(lay.in_axes) + len(lay.out_axes)
    if lay.kind == "Conv":
        return (n - 1, n - 2, *range(n - 2))
    if n != 2 or lay.in_axes != (0,):
        return False
    return None if fan_in_fan_out else (1, 0)


def conv_to_peft(a: np.ndarray, b: np.ndarray, lay: KernelLayout) -> tuple[np.ndarray, np.ndarray]:
    """One layer's conv factors ``a`` ``(prod(kernel) * in/g, r)`` and ``b`` ``(r/g, out)`` as PEFT's ``lora_A`` and
    ``lora_B`` weights ``(r, in, *kernel)`` and ``(out, r/g, 1, ...)``; A is zero outside each group's block."""
    k, g, r = lay.conv.kernel_size, lay.groups, a.shape[-1]
    n, per_group = len(k), a.shape[0] // math.prod(k)
    blocks = a.reshape(*k, per_group, r).transpose(n + 1, n, *range(n))       # (r, in/g, *k)
    full = np.zeros((r, per_group * g, *k), a.dtype)
    for j in range(g):
        rows = slice(j * r // g, (j + 1) * r // g)
        full[rows, j * per_group:(j + 1) * per_group] = blocks[rows]
    return full, b.T.reshape(b.shape[1], b.shape[0], *(1,) * n)


def conv_from_peft(big_a: np.ndarray, big_b: np.ndarray, lay: KernelLayout, module: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`conv_to_peft`; raises if ``lora_A`` reaches across groups (it would not merge)."""
    k, g = lay.conv.kernel_size, lay.groups
    n, r = len(k), big_a.shape[0]
    if big_a.ndim != n + 2 or big_b.ndim != n + 2 or big_a.shape[2:] != tuple(k) or big_b.shape[2:] != (1,) * n \
            or big_a.shape[1] % g or r % g or big_b.shape[1] != r // g:
        raise ValueError(f"{module}: PEFT conv tensors A {big_a.shape} and B {big_b.shape} do not fit a conv LoRA "
                         f"of kernel size {k} and groups {g}: they should be A (r, in, {', '.join(map(str, k))}) and "
                         f"B (out, r/{g}, {', '.join('1' * n)})")
    per_group = big_a.shape[1] // g
    blocks = np.stack([big_a[c, (c // (r // g)) * per_group:(c // (r // g) + 1) * per_group] for c in range(r)])
    rest = big_a.copy()
    for j in range(g):
        rest[j * r // g:(j + 1) * r // g, j * per_group:(j + 1) * per_group] = 0
    if np.any(rest):
        raise ValueError(f"{module}: PEFT's lora_A of this grouped convolution (groups={g}) connects rank channels "
                         f"to inputs of other groups (max |value| {np.abs(rest).max():.3g} outside the blocks); "
                         f"such an update is not a grouped kernel, so jlora cannot merge it. jlora reads grouped-conv "
                         f"adapters whose lora_A is block-diagonal (as jlora writes them).")
    a = blocks.transpose(*range(2, n + 2), 1, 0).reshape(-1, r)
    return a, big_b.reshape(big_b.shape[0], -1).T


__all__ = ["TorchModel", "torch_axes", "conv_to_peft", "conv_from_peft"]
