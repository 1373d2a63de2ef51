"""KV-cache decoding: token-identical to recomputing the whole sequence, batched left-padded decoding equals
per-prompt decoding, top-k=1 equals greedy, EOS stops rows, and the greedy tokens equal transformers'
``generate`` on the same tiny random weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jlora
from jlora import models
from jlora.models import generate as gen


@functools.lru_cache(maxsize=None)
def _model(kind="llama", scan=False):
    torch.manual_seed(0)
    if kind == "gpt2":
        hf_cfg = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    elif kind == "mistral":   # a sliding window shorter than the prompts: the cache must apply it too
        hf_cfg = transformers.MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=1, sliding_window=5)
    else:
        hf_cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, eos_token_id=[2, 3])
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():   # larger weights than HF's init, so the logits are not all near-ties
        for name, p in hf.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 * (0.3 if "wpe" in name else 1.5))
    fam = models.family_for(hf_cfg.model_type)
    cfg = fam.config_from_hf(hf_cfg.to_dict(), scan_layers=scan)
    sd = hf.state_dict()
    return hf, fam.make_model(cfg), models.params_from_hf(fam, cfg, lambda k: sd[k].numpy())


PROMPTS = [[5, 17, 99, 42, 7, 8, 200], [33, 12], [250, 1, 64, 64]]


@pytest.mark.parametrize("kind, scan", [("llama", False), ("llama", True), ("gpt2", False), ("mistral", False)])
def test_cache_is_token_identical_to_recompute(kind, scan):
    _, model, params = _model(kind, scan)
    a = gen.generate(model, params, PROMPTS, max_new_tokens=64, eos_token_id=())
    b = gen.generate(model, params, PROMPTS, max_new_tokens=64, eos_token_id=(), use_cache=False)
    assert a.tokens.shape == (3, 64)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert len(set(a.tokens[0].tolist())) > 5, "degenerate output makes the comparison weak"


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_greedy_matches_transformers_generate(kind):
    hf, model, params = _model(kind)
    out = gen.generate(model, params, [PROMPTS[0]], max_new_tokens=16, eos_token_id=())
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(out.tokens[0], ref[0, len(PROMPTS[0]):].numpy())


def test_batched_left_padding_equals_per_prompt():
    _, model, params = _model()
    batch = gen.generate(model, params, PROMPTS, max_new_tokens=16, eos_token_id=())
    for i, p in enumerate(PROMPTS):
        alone = gen.generate(model, params, [p], max_new_tokens=16, eos_token_id=())
        np.testing.assert_array_equal(batch.tokens[i], alone.tokens[0])
    ids, mask = gen.pad_prompts(PROMPTS)   # an array with a mask gives the same tokens
    arr = gen.generate(model, params, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=())
    np.testing.assert_array_equal(arr.tokens, batch.tokens)


def test_sampling():
    _, model, params = _model()
    greedy = gen.generate(model, params, PROMPTS, max_new_tokens=16, eos_token_id=())
    k1 = gen.generate(model, params, PROMPTS, max_new_tokens=16, eos_token_id=(), temperature=0.7, top_k=1,
                      key=jax.random.key(3))
    np.testing.assert_array_equal(k1.tokens, greedy.tokens)
    s1 = gen.generate(model, params, PROMPTS, max_new_tokens=16, eos_token_id=(), temperature=1.0, top_k=50,
                      top_p=0.9, key=jax.random.key(4))
    s2 = gen.generate(model, params, PROMPTS, max_new_tokens=16, eos_token_id=(), temperature=1.0, top_k=50,
                      top_p=0.9, key=jax.random.key(4))
    s3 = gen.generate(model, params, PROMPTS, max_new_tokens=16, eos_token_id=(), temperature=1.0, top_k=50,
                      top_p=0.9, key=jax.random.key(5))
    np.testing.assert_array_equal(s1.tokens, s2.tokens)          # explicit key: reproducible
    assert not np.array_equal(s1.tokens, s3.tokens)
    with pytest.raises(ValueError, match="key"):
        gen.generate(model, params, PROMPTS, max_new_tokens=2, temperature=1.0)
    # a legacy uint32[2] key is the same key; a float32-subnormal temperature is greedy, as in the per-row path
    legacy = gen.generate(model, params, PROMPTS, max_new_tokens=16, eos_token_id=(), temperature=1.0, top_k=50,
                          top_p=0.9, key=jax.random.PRNGKey(4))
    np.testing.assert_array_equal(legacy.tokens, s1.tokens)
    tiny = gen.generate(model, params, PROMPTS, max_new_tokens=16, eos_token_id=(), temperature=1e-38,
                        key=jax.random.key(3))
    np.testing.assert_array_equal(tiny.tokens, greedy.tokens)


def test_sampling_filters_against_numpy():
    """top-k / top-p keep exactly the tokens a numpy reference keeps (checked through draw frequencies)."""
    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]], jnp.float32))
    keys = jax.random.split(jax.random.key(0), 2000)
    draw = lambda s: np.asarray(jax.vmap(lambda k: s(logits, k))(keys))[:, 0]
    assert set(draw(gen.Sampling(1.0, top_k=2)).tolist()) == {0, 1}
    assert set(draw(gen.Sampling(1.0, top_p=0.8)).tolist()) == {0, 1, 2}    # 0.5 + 0.2 < 0.8 <= 0.85
    freq = np.bincount(draw(gen.Sampling(1.0)), minlength=5) / 2000
    np.testing.assert_allclose(freq, [0.5, 0.2, 0.15, 0.1, 0.05], atol=0.04)


def test_eos_stops_rows():
    _, model, params = _model()
    free = gen.generate(model, params, PROMPTS, max_new_tokens=16, eos_token_id=())
    eos = int(free.tokens[1, 3])                # row 1 produces this id at step 3 (or earlier)
    out = gen.generate(model, params, PROMPTS, max_new_tokens=16, eos_token_id=[eos, 255], pad_token_id=0)
    for row, toks in zip(out.to_lists(), free.tokens):
        n = len(row)
        assert row == toks[:n].tolist()
        assert (eos in row and row[-1] == eos and eos not in row[:-1]) or n == 16
    n1 = out.lengths[1]
    assert n1 <= 4 and (out.tokens[1, n1:] == 0).all()
    # every row stops -> the loop ends early, and the output keeps its (B, max_new_tokens) shape
    one = gen.generate(model, params, [PROMPTS[1]], max_new_tokens=16, eos_token_id=eos)
    assert one.lengths[0] == n1 and one.tokens.shape == (1, 16)


def test_unmerged_lora_adapters_equal_merged():
    _, model, params = _model()
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    adapters = jlora.init(params, cfg, key=jax.random.key(0))
    adapters = jax.tree.map(lambda x: 0.3 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), adapters)
    merged = jlora.merge(params, adapters, cfg)
    a = gen.generate(model, merged, PROMPTS, max_new_tokens=16, eos_token_id=())
    b = gen.generate(model, (params, adapters), PROMPTS, max_new_tokens=16, eos_token_id=(),
                     apply_fn=gen.lora_apply_fn(model, cfg))
    base = gen.generate(model, params, PROMPTS, max_new_tokens=16, eos_token_id=())
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, base.tokens)


@pytest.mark.slow   # ~12 s of compiles
def test_per_row_settings_equal_each_row_alone_and_share_one_compilation():
    """Each row of a batch with its own temperature/top-k/top-p/key draws exactly what it draws alone (so a row's
    tokens do not depend on its neighbours), and other settings reuse the compilation."""
    _, model, params = _model()
    settings = [(0.0, 0, 1.0), (0.8, 5, 1.0), (1.2, 0, 0.9), (1.0, 0, 1.0)]
    prompts = PROMPTS + [[9, 9, 9]]
    keys = jax.random.split(jax.random.key(7), 4)
    temp, top_k, top_p = (list(x) for x in zip(*settings))
    out = gen.generate(model, params, prompts, max_new_tokens=12, eos_token_id=(), temperature=temp, top_k=top_k,
                       top_p=top_p, key=keys)
    for r, ((t, k, p), prompt) in enumerate(zip(settings, prompts)):
        alone = gen.generate(model, params, [prompt], max_new_tokens=12, eos_token_id=(), temperature=t,
                             top_k=k or None, top_p=p, key=keys[r])
        np.testing.assert_array_equal(out.tokens[r], alone.tokens[0])
    assert len({tuple(row) for row in out.tokens.tolist()}) == 4
    size = gen._generate._cache_size()
    again = gen.generate(model, params, prompts, max_new_tokens=12, eos_token_id=(), temperature=[0.5, 0.0, 2.0, 0.1],
                         top_k=[3, 0, 0, 7], top_p=[1.0, 1.0, 0.5, 0.95], key=keys[::-1])
    assert gen._generate._cache_size() == size and not np.array_equal(again.tokens, out.tokens)
    with pytest.raises(ValueError, match="one per row"):
        gen.generate(model, params, prompts, max_new_tokens=2, temperature=[1.0, 1.0], key=jax.random.key(0))
    # one key with per-row settings: each row draws with its own key from it (the same prompt twice differs)
    twice = gen.generate(model, params, [prompts[1]] * 2, max_new_tokens=12, eos_token_id=(), temperature=[1.0, 1.0],
                         key=jax.random.key(3))
    mine = gen.generate(model, params, [prompts[1]] * 2, max_new_tokens=12, eos_token_id=(), temperature=[1.0, 1.0],
                        key=jax.random.split(jax.random.key(3), 2))
    np.testing.assert_array_equal(twice.tokens, mine.tokens)
    assert not np.array_equal(twice.tokens[0], twice.tokens[1])
    with pytest.raises(ValueError, match="key"):
        gen.generate(model, params, prompts, max_new_tokens=2, temperature=[1.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"temperature \[nan, 0.0, 0.0, 0.0\] must be finite"):   # not greedy
        gen.generate(model, params, prompts, max_new_tokens=2, temperature=[float("nan"), 0, 0, 0], key=keys)
    with pytest.raises(ValueError, match="temperature=nan must be a finite number"):
        gen.generate(model, params, prompts, max_new_tokens=2, temperature=float("nan"), key=keys[0])
    # a top_k past the vocabulary (and past int32) keeps every token: the same draw as no top_k
    big = gen.generate(model, params, prompts, max_new_tokens=12, eos_token_id=(), temperature=temp,
                       top_k=[10 ** 12, 0, 2 ** 40, 0], top_p=top_p, key=keys)
    np.testing.assert_array_equal(big.tokens[[0, 2]], gen.generate(
        model, params, prompts, max_new_tokens=12, eos_token_id=(), temperature=temp, top_k=[0, 0, 0, 0],
        top_p=top_p, key=keys).tokens[[0, 2]])


class _Recorder:
    """An ``on_step`` hook: records each step's tokens and ends row 1 after step 2 and every row after step 5."""

    def __init__(self):
        self.steps = []

    def __call__(self, step, tokens, done):
        self.steps.append((int(step), np.asarray(tokens).tolist(), np.asarray(done).tolist()))
        stop = np.zeros(len(tokens), bool)
        stop[1] = int(step) == 2
        return stop | (int(step) >= 5)


def test_on_step_streams_every_token_and_ends_rows():
    _, model, params = _model()
    free = gen.generate(model, params, PROMPTS, max_new_tokens=16, eos_token_id=())
    hook = _Recorder()
    out = gen.generate(model, params, PROMPTS, max_new_tokens=16, eos_token_id=(), on_step=hook)
    assert [s for s, _, _ in hook.steps] == list(range(6))           # every row ended after step 5: loop stopped
    streamed = np.asarray([t for _, t, _ in hook.steps]).T           # (B, 6) tokens in the order they came
    assert out.lengths.tolist() == [6, 3, 6]
    np.testing.assert_array_equal(out.tokens[:, :6][[0, 2]], free.tokens[:, :6][[0, 2]])
    np.testing.assert_array_equal(out.tokens[1, :3], free.tokens[1, :3])
    assert (out.tokens[1, 3:] == 0).all() and (out.tokens[:, 6:] == 0).all()
    np.testing.assert_array_equal(streamed[[0, 2]], out.tokens[[0, 2], :6])
    np.testing.assert_array_equal(streamed[1, :3], out.tokens[1, :3])
