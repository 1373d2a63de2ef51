"""The Llama family in Flax Linen: Llama 1/2/3 (incl. llama3 and linear RoPE scaling), Mistral, Qwen2/2.5,
Qwen3 and SmolLM, numerically matching transformers' PyTorch ``*ForCausalLM`` models.

One module covers them all; the differences are config fields: grouped KV heads (``num_key_value_heads``:
MHA, GQA, MQA), an explicit ``head_dim``, biases on q/k/v (Qwen2) or on every projection
(``attention_bias``/``mlp_bias`` in Llama and Qwen3), RMSNorm of q and k per head (Qwen3), Mistral's sliding
window, tied or untied output embeddings. Flax module names mirror HF's module names without the leading
``model.`` (``layers_3/self_attn/q_proj``), and every projection is a plain ``nn.Dense`` so the LoRA transform
can intercept it; a tied output projection is ``embed_tokens.attend``.

With ``scan_layers=True`` the layers are one ``nn.scan`` module named ``layers`` whose params (and the LoRA
collection) carry a leading layer axis; ``remat`` rematerializes each layer. Calling the model with
``cache=KVCache`` returns ``(logits, new_cache)`` (see :mod:`jlora.models.layers`).

:func:`config_from_hf` reads both transformers 4.x (``rope_theta``/``rope_scaling``/``torch_dtype``) and 5.x
(``rope_parameters``/``dtype``) config.json forms. Like penzai, it knows every attribute it reads or
deliberately ignores, and raises on anything else that is set to a non-default value, naming it.

:data:`FAMILY` declares the family for :mod:`jlora.models`, including its Megatron tensor-parallel rules
(:data:`TENSOR_PARALLEL`), which :mod:`jlora.parallel` applies:

Examples:
    >>> from jlora import parallel
    >>> mesh = parallel.make_mesh(fsdp=4, tensor=2)
    >>> parallel.leaf_spec("layers_0/self_attn/o_proj/kernel", (64, 32), mesh, FAMILY)   # row-parallel
    P('tensor', 'fsdp')
    >>> parallel.leaf_spec("layers/self_attn/q_proj/kernel", (2, 32, 64), mesh, FAMILY)  # scanned: layer axis kept
    P(None, 'fsdp', 'tensor')
    >>> parallel.leaf_spec("norm/scale", (32,), mesh, FAMILY)
    P(None,)
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

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LAYER_PREFIX = "layers"   # the layer stack: layers_{i} unrolled, layers scanned (HF: model.layers.{i})
HF_PREFIX = "model."      # the base model in HF names (LlamaForCausalLM.model)
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family model, plus jlora's compute settings.

    Attributes (HF names where HF has one):
        rope_type: "default", "linear" or "llama3"; the ``rope_*`` fields after it parametrize the scaling.
        attention_bias: biases on q/k/v projections. o_proj_bias: bias on o_proj. mlp_bias: biases in the MLP.
        qk_norm: RMSNorm of q and k over head_dim before RoPE (Qwen3).
        sliding_window: attend to at most this many most recent tokens (Mistral), None for full attention.
        eos_token_id: tuple of end-of-sequence ids (HF allows an int or a list).
        hf_dtype: the checkpoint's dtype as written in config.json (``"bfloat16"``), kept for saving.
        dtype: compute dtype. param_dtype: parameter dtype. Logits are always float32.
        scan_layers: run the layers as one ``nn.scan`` (params get a leading layer axis).
        remat: "none", "full" or "dots" (save only matmul outputs) activation rematerialization per layer.
        attention: the attention kernel without a KV cache, one of :data:`jlora.models.attention.IMPLEMENTATIONS`:
            "auto" (the fastest exact one of the platform), or one forced ("blocked", "xla", "cudnn", "splash").
    """

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    hf_dtype: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: str = "none"
    attention: str = "auto"

    def __post_init__(self):
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r} is not one of {IMPLEMENTATIONS}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not in the Llama family {MODEL_TYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 (the tokens each query sees, "
                             f"itself included) or None for full attention")
        if self.remat not in L.REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not one of {L.REMAT_POLICIES}")
        L.activation(self.hidden_act)
        self.inv_freq()   # validates the rope settings

    def inv_freq(self):
        return L.rope_inv_freq(self.head_dim, self.rope_theta, self.rope_type, self.rope_factor,
                               self.rope_low_freq_factor, self.rope_high_freq_factor,
                               self.rope_original_max_position_embeddings)


# --- the model ---------------------------------------------------------------------------------------------------

def _dense(c: LlamaConfig, features: int, use_bias: bool, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=c.dtype, param_dtype=c.param_dtype,
                    kernel_init=nn.initializers.normal(c.initializer_range), name=name)


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, m: L.Masking, cos, sin, kv):
        c = self.config
        b, t, _ = x.shape
        h, g, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = L.constrain(_dense(c, h * d, c.attention_bias, "q_proj")(x), L.HEADS).reshape(b, t, h, d)
        k = L.constrain(_dense(c, g * d, c.attention_bias, "k_proj")(x), L.HEADS).reshape(b, t, g, d)
        v = L.constrain(_dense(c, g * d, c.attention_bias, "v_proj")(x), L.HEADS).reshape(b, t, g, d)
        if c.qk_norm:
            q = L.RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name="q_norm")(q)
            k = L.RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name="k_norm")(k)
        q, k = L.apply_rope(q, cos, sin), L.apply_rope(k, cos, sin)
        out = L.attend(q, k, v, m, d ** -0.5, kv, window=c.sliding_window, implementation=c.attention)
        out = L.constrain(out.reshape(b, t, h * d), L.HEADS)
        return _dense(c, c.hidden_size, c.o_proj_bias, "o_proj")(out), (
            None if kv is None else (k, v))


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = _dense(c, c.intermediate_size, c.mlp_bias, "gate_proj")(x)
        up = _dense(c, c.intermediate_size, c.mlp_bias, "up_proj")(x)
        h = L.constrain(L.gated(c.hidden_act, gate, up), L.MLP)
        return _dense(c, c.hidden_size, c.mlp_bias, "down_proj")(h)


class DecoderLayer(nn.Module):
    """One pre-norm block. Signature ``(x, kv, shared) -> (x, new_kv)`` so that ``nn.scan`` can carry ``x``,
    slice ``kv`` (this layer's cache, read only) per layer and broadcast ``shared = (masking, cos, sin)``;
    ``new_kv`` is the new tokens' ``(k, v)``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, kv, shared):
        c = self.config
        m, cos, sin = shared
        x = L.constrain(x)
        h = L.RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name="input_layernorm")(x)
        h, new_kv = Attention(c, name="self_attn")(h, m, cos, sin, kv)
        x = L.constrain(x + h)
        h = L.RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name="post_attention_layernorm")(x)
        return L.constrain(x + MLP(c, name="mlp")(h)), new_kv


class LlamaForCausalLM(nn.Module):
    """``model.apply({"params": p}, input_ids, attention_mask=None, positions=None, cache=None, segment_ids=None)``.

    Returns float32 logits (B, T, vocab), or ``(logits, new_cache)`` when ``cache`` is given. ``segment_ids``
    (with per-example ``positions``) keeps the examples of a packed row from attending to each other.
    ``return_hidden=True`` (no cache) returns a :class:`jlora.loss.Hidden` instead of logits, for the fused loss.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2))
        >>> ids = jnp.array([[1, 2, 3]])
        >>> params = model.init(jax.random.key(0), ids)["params"]
        >>> model.apply({"params": params}, ids).shape
        (1, 3, 256)
    """

    config: LlamaConfig
    HIDDEN_OUTPUT: ClassVar[bool] = True   # takes return_hidden=True (see jlora.train.lm_loss)

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, cache: L.KVCache | None = None,
                 segment_ids=None, return_hidden: bool = False):
        c = self.config
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                         embedding_init=nn.initializers.normal(c.initializer_range), name="embed_tokens")
        x = embed(L.lookup_ids(input_ids, attention_mask, c.vocab_size))
        m = L.masking(input_ids, attention_mask, positions, cache, c.sliding_window, segment_ids)
        cos, sin = L.rope_cos_sin(m.positions, c.inv_freq(), c.dtype)
        kv = None if cache is None else (cache.k, cache.v)
        x, new_kv = L.run_layers(DecoderLayer, c, LAYER_PREFIX, x, kv, (m, cos, sin))
        x = L.RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name="norm")(x)
        head = embed if c.tie_word_embeddings else _dense(c, c.vocab_size, False, "lm_head")
        logits = L.output(x, head, return_hidden and cache is None)
        if cache is None:
            return logits
        return logits, L.append(cache, new_kv[0], new_kv[1], attention_mask)


def make_model(config: LlamaConfig) -> LlamaForCausalLM:
    return LlamaForCausalLM(config)


def init_cache(config: LlamaConfig, batch_size: int, max_len: int, dtype=None) -> L.KVCache:
    """An empty KV cache for ``batch_size`` rows of up to ``max_len`` tokens (prompt + generated)."""
    return L.make_cache(config.num_hidden_layers, batch_size, max_len, config.num_key_value_heads,
                        config.head_dim, config.dtype if dtype is None else dtype)


# --- HF names --------------------------------------------------------------------------------------------------

def param_specs(config: LlamaConfig):
    """``(path, hf_name, shape, transpose)`` for every parameter, in the unrolled layout."""
    c = config
    hd, h, g = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    specs = [ParamSpec("embed_tokens/embedding", f"{HF_PREFIX}embed_tokens.weight", (c.vocab_size, c.hidden_size),
                       False)]

    def linear(path, hf, fan_in, fan_out, bias):
        specs.append(ParamSpec(f"{path}/kernel", f"{hf}.weight", (fan_in, fan_out), True))
        if bias:
            specs.append(ParamSpec(f"{path}/bias", f"{hf}.bias", (fan_out,), False))

    for i in range(c.num_hidden_layers):
        p, hf = f"{LAYER_PREFIX}_{i}", f"{HF_PREFIX}layers.{i}"
        linear(f"{p}/self_attn/q_proj", f"{hf}.self_attn.q_proj", c.hidden_size, h * hd, c.attention_bias)
        linear(f"{p}/self_attn/k_proj", f"{hf}.self_attn.k_proj", c.hidden_size, g * hd, c.attention_bias)
        linear(f"{p}/self_attn/v_proj", f"{hf}.self_attn.v_proj", c.hidden_size, g * hd, c.attention_bias)
        linear(f"{p}/self_attn/o_proj", f"{hf}.self_attn.o_proj", h * hd, c.hidden_size, c.o_proj_bias)
        if c.qk_norm:
            specs.append(ParamSpec(f"{p}/self_attn/q_norm/scale", f"{hf}.self_attn.q_norm.weight", (hd,), False))
            specs.append(ParamSpec(f"{p}/self_attn/k_norm/scale", f"{hf}.self_attn.k_norm.weight", (hd,), False))
        linear(f"{p}/mlp/gate_proj", f"{hf}.mlp.gate_proj", c.hidden_size, c.intermediate_size, c.mlp_bias)
        linear(f"{p}/mlp/up_proj", f"{hf}.mlp.up_proj", c.hidden_size, c.intermediate_size, c.mlp_bias)
        linear(f"{p}/mlp/down_proj", f"{hf}.mlp.down_proj", c.intermediate_size, c.hidden_size, c.mlp_bias)
        specs.append(ParamSpec(f"{p}/input_layernorm/scale", f"{hf}.input_layernorm.weight", (c.hidden_size,), False))
        specs.append(ParamSpec(f"{p}/post_attention_layernorm/scale", f"{hf}.post_attention_layernorm.weight",
                               (c.hidden_size,), False))
    specs.append(ParamSpec("norm/scale", f"{HF_PREFIX}norm.weight", (c.hidden_size,), False))
    if not c.tie_word_embeddings:
        linear("lm_head", "lm_head", c.hidden_size, c.vocab_size, False)
    return specs


# --- HF config.json ----------------------------------------------------------------------------------------------

# Attributes read by config_from_hf.
HANDLED = frozenset({
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling",
    "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias", "hidden_act",
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "bos_token_id", "eos_token_id",
    "pad_token_id", "initializer_range", "torch_dtype", "dtype", "partial_rotary_factor",
})
# Attributes with no effect on the forward pass: every config's bookkeeping, pretraining_tp, which only splits
# matmuls in transformers 4.x without changing their result, and the base model's dropout (a regularizer of full
# fine-tuning, off in inference; jlora's base models have none, as with GPT-2's *_pdrop: LoRA dropout is the
# LoraConfig's). SmolLM2's config.json (written by nanotron) also carries ``is_llama_config`` and transformers.js
# settings.
IGNORED = hf_config.IGNORED | {"pretraining_tp", "is_llama_config", "transformers.js_config", "attention_dropout",
                               "mlp_dropout"}
# Attributes of features jlora does not implement, with the only value it accepts (None also accepted).
# ``rope_interleaved`` (nanotron): transformers ignores it and always rotates halves, as jlora does. ``use_mrope``
# (Qwen2-VL's multimodal rotary positions) is written as false in Qwen2 and DeepSeek-R1-Distill-Qwen configs.
MUST_BE_DEFAULT = {"use_sliding_window": False, "rope_interleaved": False, "use_mrope": False}


def _rope_settings(rp: dict) -> dict:
    """A rope dict's scaling settings, with 4.x's ``type`` read as ``rope_type`` and ``rope_theta`` left out."""
    out = {("rope_type" if k == "type" else k): v for k, v in rp.items() if k != "rope_theta"}
    out.setdefault("rope_type", "default")
    return out


def _rope(d: dict) -> dict:
    """Rope settings from either ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (4.x)."""
    v5, v4 = d.get("rope_parameters"), d.get("rope_scaling")
    if isinstance(v5, dict) and isinstance(v4, dict) and _rope_settings(v5) != _rope_settings(v4):
        raise ValueError(f"config.json has both rope_parameters {v5} (transformers 5) and rope_scaling {v4} (4.x), "
                         f"and they differ (transformers 5 would use rope_scaling and drop rope_parameters' "
                         f"rope_theta); keep the one you mean and delete the other")
    rp = dict(v4 or v5 or {})   # transformers 5 takes a non-empty rope_scaling, with the top-level rope_theta
    if rp and all(isinstance(v, dict) for v in rp.values()):
        raise ValueError(f"rope_parameters per layer type {sorted(rp)} are not supported")
    theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    prf = rp.get("partial_rotary_factor", d.get("partial_rotary_factor"))
    if prf is not None and prf != 1.0:
        raise ValueError(f"partial_rotary_factor={prf} is not supported (only 1.0: RoPE on the whole head)")
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"rope type {rope_type!r} (in rope_parameters/rope_scaling) is not supported; jlora "
                         f"implements 'default', 'linear' and 'llama3'")
    known = {"rope_theta", "rope_type", "type", "partial_rotary_factor", "factor", "low_freq_factor",
             "high_freq_factor", "original_max_position_embeddings"}
    unknown = sorted(set(rp) - known)
    if unknown:
        raise ValueError(f"rope_parameters keys {unknown} are not supported for rope type {rope_type!r}")
    out = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(rp["factor"])
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(rp["low_freq_factor"])
        out["rope_high_freq_factor"] = float(rp["high_freq_factor"])
        out["rope_original_max_position_embeddings"] = int(rp["original_max_position_embeddings"])
    return out


def config_from_hf(d: dict, **overrides) -> LlamaConfig:
    """Parses a Llama/Mistral/Qwen2/Qwen3 ``config.json`` dict (transformers 4.x or 5.x form).

    Args:
        d: the parsed config.json.
        **overrides: LlamaConfig fields to set, e.g. ``dtype=jnp.bfloat16, scan_layers=True``.

    Raises:
        ValueError: naming every attribute whose value asks for a feature jlora does not implement.

    Examples:
        >>> cfg = config_from_hf({"model_type": "qwen2", "vocab_size": 256, "hidden_size": 64,
        ...     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        ...     "num_key_value_heads": 2, "rope_theta": 1e6, "torch_dtype": "bfloat16"})
        >>> cfg.attention_bias, cfg.head_dim, cfg.rope_theta, cfg.hf_dtype
        (True, 16, 1000000.0, 'bfloat16')
    """
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not in the Llama family; supported: {MODEL_TYPES}")
    hf_config.check_attrs(d, HANDLED, IGNORED, MUST_BE_DEFAULT, model_type)
    layer_types = d.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ValueError(f"layer_types={layer_types} asks for sliding-window layers, which jlora does not "
                         f"implement for {model_type}; only 'full_attention' layers are supported")
    heads = int(d["num_attention_heads"])
    hidden = int(d["hidden_size"])
    biases = {
        "llama": (bool(d.get("attention_bias", False)),) * 2 + (bool(d.get("mlp_bias", False)),),
        "qwen3": (bool(d.get("attention_bias", False)),) * 2 + (False,),
        "qwen2": (True, False, False),
        "mistral": (False, False, False),
    }[model_type]
    fields = dict(
        vocab_size=int(d["vocab_size"]), hidden_size=hidden, intermediate_size=int(d["intermediate_size"]),
        num_hidden_layers=int(d["num_hidden_layers"]), num_attention_heads=heads,
        num_key_value_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or (128 if model_type == "qwen3" and "head_dim" not in d else hidden // heads)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=biases[0], o_proj_bias=biases[1], mlp_bias=biases[2],
        qk_norm=model_type == "qwen3", hidden_act=d.get("hidden_act", "silu"),
        sliding_window=(d.get("sliding_window", 4096) if model_type == "mistral" else None),
        model_type=model_type, bos_token_id=d.get("bos_token_id"),
        eos_token_id=hf_config.eos_ids(d.get("eos_token_id")),
        pad_token_id=d.get("pad_token_id"), initializer_range=float(d.get("initializer_range", 0.02)),
        hf_dtype=hf_config.hf_dtype(d), **_rope(d),
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def config_to_hf(config: LlamaConfig) -> dict:
    """A config.json dict for ``config`` that transformers 4.45+ and 5.x load (both rope forms are written).

    Examples:
        >>> d = config_to_hf(LlamaConfig(model_type="qwen2", attention_bias=True))
        >>> d["architectures"], d["rope_parameters"]
        (['Qwen2ForCausalLM'], {'rope_type': 'default', 'rope_theta': 10000.0})
    """
    c = config
    expected = _inexpressible_in_hf(c.model_type, c)
    if expected is not None:
        raise ValueError(expected)
    rope = {"rope_type": c.rope_type, "rope_theta": c.rope_theta}
    if c.rope_type in ("linear", "llama3"):
        rope["factor"] = c.rope_factor
    if c.rope_type == "llama3":
        rope.update(low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor,
                    original_max_position_embeddings=c.rope_original_max_position_embeddings)
    d = {
        "architectures": [_ARCHITECTURES[c.model_type]], "model_type": c.model_type,
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": c.hidden_act, "initializer_range": c.initializer_range,
        "bos_token_id": c.bos_token_id, "pad_token_id": c.pad_token_id,
        "eos_token_id": (list(c.eos_token_id) if len(c.eos_token_id) > 1 else
                         (c.eos_token_id[0] if c.eos_token_id else None)),
        "rope_parameters": rope, "rope_theta": c.rope_theta,
        "rope_scaling": None if c.rope_type == "default" else {k: v for k, v in rope.items() if k != "rope_theta"},
    }
    if c.model_type in ("llama", "qwen3"):
        d["attention_bias"] = c.attention_bias
    if c.model_type == "llama":
        d["mlp_bias"] = c.mlp_bias
    if c.model_type == "mistral":
        d["sliding_window"] = c.sliding_window
    if c.model_type in ("qwen2", "qwen3"):
        d["use_sliding_window"] = False
    if c.hf_dtype is not None:
        d["dtype"] = d["torch_dtype"] = c.hf_dtype
    return d


def _inexpressible_in_hf(model_type: str, c: LlamaConfig) -> str | None:
    """An error message when ``c``'s biases/norms cannot be expressed by HF's ``model_type`` class, else None."""
    want = {
        "llama": (c.attention_bias, c.attention_bias, c.mlp_bias, False),
        "qwen3": (c.attention_bias, c.attention_bias, False, True),
        "qwen2": (True, False, False, False),
        "mistral": (False, False, False, False),
    }[model_type]
    have = (c.attention_bias, c.o_proj_bias, c.mlp_bias, c.qk_norm)
    if want != have:
        return (f"model_type {model_type!r} in transformers has (attention_bias, o_proj_bias, mlp_bias, qk_norm) = "
                f"{want}, but the config has {have}; pick the model_type that matches")
    if c.sliding_window is not None and model_type != "mistral":
        return f"sliding_window={c.sliding_window} is only expressible as model_type 'mistral', not {model_type!r}"
    return None


# --- the family --------------------------------------------------------------------------------------------------

# Megatron tensor parallelism: q/k/v/gate/up by output columns, o/down by input rows, so each attention and MLP
# block needs one reduction; the embedding by vocabulary rows and lm_head by vocabulary columns.
TENSOR_PARALLEL = (
    ("self_attn/q_proj", COLUMN), ("self_attn/k_proj", COLUMN), ("self_attn/v_proj", COLUMN),
    ("mlp/gate_proj", COLUMN), ("mlp/up_proj", COLUMN),
    ("self_attn/o_proj", ROW), ("mlp/down_proj", ROW),
    ("embed_tokens", VOCAB), ("lm_head", COLUMN),
)

FAMILY = Family(
    name="llama", model_types=MODEL_TYPES, config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    make_model=make_model, param_specs=param_specs, layer_prefix=LAYER_PREFIX, init_cache=init_cache,
    tensor_parallel=TENSOR_PARALLEL,
    fan_in_fan_out=False,                       # nn.Linear weights, (out, in)
    hf_prefix=HF_PREFIX,
    hf_buffers=r"rotary_emb\.inv_freq$",        # RoPE frequencies, which older transformers saved
)
