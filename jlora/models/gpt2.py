"""GPT-2 in Flax Linen, numerically matching transformers' ``GPT2LMHeadModel``.

Learned position embeddings (``wpe``), pre-LayerNorm blocks, ``gelu_new`` MLP, a fused ``c_attn`` projection
for q, k and v. transformers stores GPT-2's projections as ``Conv1D`` weights of shape (in, out), which is
already Flax's kernel layout: no transpose on load or save. Module names mirror HF's without the leading
``transformer.`` (``h_3/attn/c_attn``); the output projection is tied to ``wte`` unless
``tie_word_embeddings`` is false (then ``lm_head``).

Same call convention, KV cache, ``scan_layers`` and ``remat`` as :mod:`jlora.models.llama`. Without ``positions``,
a left-padded row's first real token is at position 0 (:func:`jlora.models.layers.masking`), as transformers'
``generate`` places it; transformers' plain forward without ``position_ids`` counts from the row's first slot
instead, so compare the two on left-padded rows with ``position_ids`` given to transformers (rotary models, whose
attention sees only relative positions, agree either way). :data:`FAMILY`
declares the family for :mod:`jlora.models`; its Megatron rules (:data:`TENSOR_PARALLEL`) split ``c_attn`` and
``c_fc`` by output columns, both ``c_proj`` by input rows, and ``wte`` by vocabulary:

Examples:
    >>> from jlora import parallel
    >>> mesh = parallel.make_mesh(fsdp=4, tensor=2)
    >>> parallel.leaf_spec("h_0/attn/c_attn/kernel", (64, 192), mesh, FAMILY)
    P('fsdp', 'tensor')
    >>> parallel.leaf_spec("h/mlp/c_proj/kernel", (2, 256, 64), mesh, FAMILY)   # scanned: layer axis kept
    P(None, 'tensor', 'fsdp')
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from jlora.models import COLUMN, ROW, VOCAB, Family, ParamSpec
from jlora.models import hf_config
from jlora.models import layers as L
from jlora.models.attention import IMPLEMENTATIONS

MODEL_TYPES = ("gpt2",)
LAYER_PREFIX = "h"             # the layer stack: h_{i} unrolled, h scanned (HF: transformer.h.{i})
HF_PREFIX = "transformer."     # the base model in HF names (GPT2LMHeadModel.transformer)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture of a GPT-2 model plus jlora's compute settings (see :class:`jlora.models.llama.LlamaConfig`
    for ``dtype``, ``param_dtype``, ``scan_layers``, ``remat``, ``attention``). HF's ``n_*`` names are kept."""

    vocab_size: int = 256
    n_positions: int = 128
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    hf_dtype: str | None = None
    model_type: str = "gpt2"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: str = "none"
    attention: str = "auto"

    def __post_init__(self):
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r} is not one of {IMPLEMENTATIONS}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        if self.remat not in L.REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not one of {L.REMAT_POLICIES}")
        L.activation(self.activation_function)

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def inner(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _dense(c: GPT2Config, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=c.dtype, param_dtype=c.param_dtype,
                    kernel_init=nn.initializers.normal(c.initializer_range), name=name)


class Attention(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x, m: L.Masking, kv):
        c = self.config
        b, t, _ = x.shape
        qkv = L.constrain(_dense(c, 3 * c.n_embd, "c_attn")(x), L.HEADS)
        q, k, v = (a.reshape(b, t, c.n_head, c.head_dim) for a in jnp.split(qkv, 3, axis=-1))
        out = L.attend(q, k, v, m, c.head_dim ** -0.5, kv, implementation=c.attention)
        out = L.constrain(out.reshape(b, t, c.n_embd), L.HEADS)
        return _dense(c, c.n_embd, "c_proj")(out), None if kv is None else (k, v)


class MLP(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = L.constrain(L.activation(c.activation_function)(_dense(c, c.inner, "c_fc")(x)), L.MLP)
        return _dense(c, c.n_embd, "c_proj")(h)


class Block(nn.Module):
    """``(x, kv, shared=(masking,)) -> (x, new_kv)``, the same scan-friendly signature as the Llama layer."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x, kv, shared):
        c = self.config
        (m,) = shared
        x = L.constrain(x)
        h, new_kv = Attention(c, name="attn")(L.LayerNorm(c.layer_norm_epsilon, c.dtype, c.param_dtype,
                                                          name="ln_1")(x), m, kv)
        x = L.constrain(x + h)
        h = MLP(c, name="mlp")(L.LayerNorm(c.layer_norm_epsilon, c.dtype, c.param_dtype, name="ln_2")(x))
        return L.constrain(x + h), new_kv


class GPT2LMHeadModel(nn.Module):
    """``model.apply({"params": p}, input_ids, attention_mask=None, positions=None, cache=None, segment_ids=None)``
    -> float32 logits, or ``(logits, new_cache)`` with a cache (``segment_ids``, ``return_hidden``: see the Llama
    model).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> model = GPT2LMHeadModel(GPT2Config())
        >>> ids = jnp.array([[1, 2, 3]])
        >>> params = model.init(jax.random.key(0), ids)["params"]
        >>> sorted(params)[:3], model.apply({"params": params}, ids).shape
        (['h_0', 'h_1', 'ln_f'], (1, 3, 256))
    """

    config: GPT2Config
    HIDDEN_OUTPUT: ClassVar[bool] = True   # takes return_hidden=True (see jlora.train.lm_loss)

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, cache: L.KVCache | None = None,
                 segment_ids=None, return_hidden: bool = False):
        c = self.config
        init = nn.initializers.normal(c.initializer_range)
        wte = nn.Embed(c.vocab_size, c.n_embd, dtype=c.dtype, param_dtype=c.param_dtype, embedding_init=init,
                       name="wte")
        wpe = nn.Embed(c.n_positions, c.n_embd, dtype=c.dtype, param_dtype=c.param_dtype, embedding_init=init,
                       name="wpe")
        if cache is None and positions is None and input_ids.shape[-1] > c.n_positions:
            raise ValueError(f"{input_ids.shape[-1]} tokens per row, but this GPT-2 has {c.n_positions} positions "
                             f"(n_positions); use rows of at most {c.n_positions} tokens")
        m = L.masking(input_ids, attention_mask, positions, cache, segment_ids=segment_ids)
        x = wte(L.lookup_ids(input_ids, attention_mask, c.vocab_size)) + wpe(m.positions)
        kv = None if cache is None else (cache.k, cache.v)
        x, new_kv = L.run_layers(Block, c, LAYER_PREFIX, x, kv, (m,))
        x = L.LayerNorm(c.layer_norm_epsilon, c.dtype, c.param_dtype, name="ln_f")(x)
        head = wte if c.tie_word_embeddings else nn.Dense(c.vocab_size, use_bias=False, dtype=c.dtype,
                                                          param_dtype=c.param_dtype, kernel_init=init,
                                                          name="lm_head")
        logits = L.output(x, head, return_hidden and cache is None)
        if cache is None:
            return logits
        return logits, L.append(cache, new_kv[0], new_kv[1], attention_mask)


def make_model(config: GPT2Config) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(config)


def init_cache(config: GPT2Config, batch_size: int, max_len: int, dtype=None) -> L.KVCache:
    """An empty KV cache for ``batch_size`` rows of up to ``max_len`` tokens (prompt + generated)."""
    return L.make_cache(config.n_layer, batch_size, max_len, config.n_head, config.head_dim,
                        config.dtype if dtype is None else dtype)


def param_specs(config: GPT2Config):
    """``(path, hf_name, shape, transpose)`` for every parameter; Conv1D weights are (in, out): never transposed."""
    c = config
    e = c.n_embd
    specs = [ParamSpec("wte/embedding", f"{HF_PREFIX}wte.weight", (c.vocab_size, e), False),
             ParamSpec("wpe/embedding", f"{HF_PREFIX}wpe.weight", (c.n_positions, e), False)]

    def norm(path, hf):
        specs.append(ParamSpec(f"{path}/scale", f"{hf}.weight", (e,), False))
        specs.append(ParamSpec(f"{path}/bias", f"{hf}.bias", (e,), False))

    def conv1d(path, hf, fan_in, fan_out):
        specs.append(ParamSpec(f"{path}/kernel", f"{hf}.weight", (fan_in, fan_out), False))
        specs.append(ParamSpec(f"{path}/bias", f"{hf}.bias", (fan_out,), False))

    for i in range(c.n_layer):
        p, hf = f"{LAYER_PREFIX}_{i}", f"{HF_PREFIX}h.{i}"
        norm(f"{p}/ln_1", f"{hf}.ln_1")
        conv1d(f"{p}/attn/c_attn", f"{hf}.attn.c_attn", e, 3 * e)
        conv1d(f"{p}/attn/c_proj", f"{hf}.attn.c_proj", e, e)
        norm(f"{p}/ln_2", f"{hf}.ln_2")
        conv1d(f"{p}/mlp/c_fc", f"{hf}.mlp.c_fc", e, c.inner)
        conv1d(f"{p}/mlp/c_proj", f"{hf}.mlp.c_proj", c.inner, e)
    norm("ln_f", f"{HF_PREFIX}ln_f")
    if not c.tie_word_embeddings:
        specs.append(ParamSpec("lm_head/kernel", "lm_head.weight", (e, c.vocab_size), True))
    return specs


HANDLED = frozenset({
    "model_type", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
    "layer_norm_epsilon", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    "initializer_range", "torch_dtype", "dtype",
})
# Dropout (training-time regularization of full fine-tuning; jlora's base model has none), GPT2DoubleHeadsModel's
# summary head, n_ctx (an old alias of n_positions), and reorder_and_upcast_attn (same math, only changes fp16
# rounding) have no effect on jlora's forward pass.
IGNORED = hf_config.IGNORED | frozenset({
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_type", "summary_use_proj", "summary_activation",
    "summary_proj_to_labels", "summary_first_dropout", "n_ctx", "reorder_and_upcast_attn",
})
MUST_BE_DEFAULT = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                   "add_cross_attention": False}


def config_from_hf(d: dict, **overrides) -> GPT2Config:
    """Parses a GPT-2 ``config.json`` dict; ``overrides`` set GPT2Config fields (``dtype=...``).

    Examples:
        >>> config_from_hf({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256,
        ...                 "n_positions": 128, "resid_pdrop": 0.1}).inner
        256
    """
    if d.get("model_type") != "gpt2":
        raise ValueError(f"model_type {d.get('model_type')!r} is not 'gpt2'")
    hf_config.check_attrs(d, HANDLED, IGNORED - set(MUST_BE_DEFAULT), MUST_BE_DEFAULT, "gpt2")
    fields = dict(
        vocab_size=int(d.get("vocab_size", 50257)), n_positions=int(d.get("n_positions", 1024)),
        n_embd=int(d.get("n_embd", 768)), n_layer=int(d.get("n_layer", 12)), n_head=int(d.get("n_head", 12)),
        n_inner=d.get("n_inner"), activation_function=d.get("activation_function", "gelu_new"),
        layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        bos_token_id=d.get("bos_token_id"), eos_token_id=hf_config.eos_ids(d.get("eos_token_id")),
        pad_token_id=d.get("pad_token_id"), initializer_range=float(d.get("initializer_range", 0.02)),
        hf_dtype=hf_config.hf_dtype(d),
    )
    fields.update(overrides)
    return GPT2Config(**fields)


def config_to_hf(config: GPT2Config) -> dict:
    """A config.json dict for ``config`` that transformers' ``GPT2LMHeadModel`` loads."""
    c = config
    d = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
        "n_positions": c.n_positions, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
        "n_inner": c.n_inner, "activation_function": c.activation_function,
        "layer_norm_epsilon": c.layer_norm_epsilon, "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id, "pad_token_id": c.pad_token_id, "initializer_range": c.initializer_range,
        "eos_token_id": (list(c.eos_token_id) if len(c.eos_token_id) > 1 else
                         (c.eos_token_id[0] if c.eos_token_id else None)),
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
    }
    if c.hf_dtype is not None:
        d["dtype"] = d["torch_dtype"] = c.hf_dtype
    return d


# --- the family --------------------------------------------------------------------------------------------------

# Megatron tensor parallelism: c_attn (q, k and v side by side) and c_fc by output columns, the c_proj after each
# by input rows, so each attention and MLP block needs one reduction; wte by vocabulary rows. An untied lm_head
# stays whole over the tensor axis.
TENSOR_PARALLEL = (
    ("attn/c_attn", COLUMN), ("mlp/c_fc", COLUMN),
    ("attn/c_proj", ROW), ("mlp/c_proj", ROW),
    ("wte", VOCAB),
)

FAMILY = Family(
    name="gpt2", model_types=MODEL_TYPES, config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    make_model=make_model, param_specs=param_specs, layer_prefix=LAYER_PREFIX, init_cache=init_cache,
    tensor_parallel=TENSOR_PARALLEL,
    fan_in_fan_out=True,                                # Conv1D weights, (in, out)
    hf_prefix=HF_PREFIX,
    hf_buffers=r"\.attn\.(bias|masked_bias)$",          # causal-mask buffers, which older transformers saved
)
