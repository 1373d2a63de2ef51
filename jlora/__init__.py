"""jlora: LoRA fine-tuning for JAX/Flax.

Adapters are a separate pytree holding everything that trains; a Flax transform runs a model with them
unmerged; an optax step trains them alone. README.md shows how to use it; docs/architecture.md shows how it is
built (data flow, where each concern lives, the adapter node and the variant hooks).

Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
    >>> model = nn.Dense(4)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
    >>> cfg = jlora.LoraConfig(rank=2, alpha=4, targets="kernel")
    >>> adapters = jlora.init(params, cfg, key=jax.random.key(1))
    >>> jlora.count(adapters)
    24
"""

import importlib as _importlib
import sys as _sys
from importlib import metadata as _metadata

from jlora import adapter as _adapter
from jlora import compose, tree
from jlora.adapter import Adapter, ConvSpec, KernelLayout
from jlora.config import LoraConfig
from jlora.lora import count, init, merge, summary, unmerge
from jlora.variants import init_with_base, quantize  # importing the variants registers their hooks
from jlora.train import TrainState, causal_lm_loss, lm_loss, make_eval_step, make_train_step, scan_steps
from jlora.transform import apply, layout
from jlora.tree import combine, partition

try:
    __version__ = _metadata.version("jlora")
except _metadata.PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+local"

# Submodules with heavier imports load on first use: `jlora.hf`, `jlora.peft`, `jlora.checkpoint`, ...
_LAZY = ("hf", "peft", "checkpoint", "parallel", "data", "models", "variants", "cli", "side_effects", "nnx")
# Functions of those submodules, also loaded on first use.
_LAZY_FUNCTIONS = {"evaluate": "side_effects"}


def _owns_nnx(obj) -> bool:
    """Whether ``obj`` is a Flax NNX model, graphdef or state; an NNX user has imported flax.nnx already."""
    nnx = _sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(obj, (nnx.Module, nnx.GraphDef, nnx.State))


def _from_nnx(name: str):
    return lambda *args, **kwargs: getattr(_importlib.import_module("jlora.nnx"), name)(*args, **kwargs)


# Flax NNX models go to jlora.nnx, imported on first use (flax.nnx costs a Linen user ~0.4 s at import).
_adapter.register_model_system(_adapter.ModelSystem(
    "flax.nnx", owns=_owns_nnx, params=_from_nnx("params"), layout=_from_nnx("layout_or_none"),
    apply=_from_nnx("apply"), rebuild=_from_nnx("rebuild")))


def __getattr__(name):
    if name in _LAZY:
        return _importlib.import_module(f"jlora.{name}")
    if name in _LAZY_FUNCTIONS:
        return getattr(_importlib.import_module(f"jlora.{_LAZY_FUNCTIONS[name]}"), name)
    raise AttributeError(f"module 'jlora' has no attribute {name!r}")


__all__ = [
    "LoraConfig", "Adapter", "KernelLayout", "ConvSpec", "TrainState",
    "init", "apply", "merge", "unmerge", "count", "summary", "layout", "init_with_base", "quantize",
    "partition", "combine", "tree", "compose", "evaluate",
    "make_train_step", "make_eval_step", "scan_steps", "causal_lm_loss", "lm_loss",
    "__version__",
]
