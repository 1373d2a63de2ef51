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
