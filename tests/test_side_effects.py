"""jlora.side_effects against plain references on a tiny model: KL, top-1 agreement and losses computed by hand with
numpy from both models' logits (the adapted model's from merged weights, not the unmerged path), greedy
continuations from jlora.models.generate's uncached path, intruder dimensions from numpy SVDs; exactly 0 KL,
100% agreement, 0 loss change and 100% identical continuations for a zero adapter; and the general prompt set."""

import collections
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import data
from jlora import side_effects as se
from jlora.hf.tokenizer import Tokenizer
from jlora.models import generate as gen
from jlora.models.llama import LlamaConfig, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERAL = os.path.join(ROOT, "examples", "data", "general.jsonl")
VALID = os.path.join(ROOT, "examples", "data", "valid.jsonl")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CFG = jlora.LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj", "down_proj"))


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE trained here on the general set and the task data."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [r["prompt"] + r["completion"] for r in data.read_jsonl(GENERAL)] + open(VALID).read().splitlines()
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", pad_token="</s>", add_bos_token=True,
                     chat_template=CHATML, extra_eos_token_ids=[backend.token_to_id("<|im_end|>")])


@pytest.fixture(scope="module")
def tiny(tok):
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=(tok.eos_token_id,),
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    return model, params


def _adapters(params, zero_b=False, seed=0, scale=0.5):
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: jlora.init(params, CFG, key=jax.random.key(0)))
    fill = lambda path, x: jnp.asarray(  # noqa: E731
        np.zeros(x.shape) if zero_b and jax.tree_util.keystr(path).endswith(".b") else scale * rng.normal(
            size=x.shape), x.dtype)
    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def general(tok):
    with pytest.warns(UserWarning, match="1 of 10 examples exceed max_length=128 and were truncated"):
        return se.load_general(GENERAL, tok, limit=10, max_length=128)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_token_stats_equal_a_numpy_reference(tiny, general, tok):
    model, params = tiny
    adapters = _adapters(params)
    merged = jlora.merge(params, adapters, CFG)
    stats = se.token_stats(model, params, adapters, CFG, general.texts, batch_size=4, pad_id=tok.pad_token_id)
    # every text in one right-padded batch without a mask (causal: padding after a text cannot reach it)
    width = max(len(ex) for ex in general.texts)
    ids = jnp.asarray([list(ex.input_ids) + [0] * (width - len(ex)) for ex in general.texts])
    all_lp = _log_softmax(jax.jit(model.apply)({"params": params}, ids))
    all_lq = _log_softmax(jax.jit(model.apply)({"params": merged}, ids))
    kl, agree, nll_b, nll_a, n, per_text = 0.0, 0, 0.0, 0.0, 0, []
    for ex, lp, lq in zip(general.texts, all_lp, all_lq):
        lp, lq = lp[:len(ex) - 1], lq[:len(ex) - 1]
        target = np.asarray(ex.input_ids[1:])
        k = (np.exp(lp) * (lp - lq)).sum(-1)
        kl, n = kl + k.sum(), n + len(target)
        agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        nll_b -= lp[np.arange(len(target)), target].sum()
        nll_a -= lq[np.arange(len(target)), target].sum()
        per_text.append(k.mean())
    assert stats["tokens"] == n and stats["texts"] == len(general.texts)
    assert stats["kl"] > 1e-3, "the adapters must move the model"
    np.testing.assert_allclose(stats["kl"], kl / n, rtol=1e-4)
    np.testing.assert_allclose(stats["per_text_kl"], per_text, rtol=1e-4)
    assert stats["top1_agreement_pct"] == pytest.approx(100 * agree / n)
    assert 0 < stats["top1_agreement_pct"] < 100
    np.testing.assert_allclose([stats["loss_base"], stats["loss_adapted"]], [nll_b / n, nll_a / n], rtol=1e-5)
    assert stats["loss_change"] == pytest.approx(stats["loss_adapted"] - stats["loss_base"])


def test_task_loss_counts_completion_tokens_only(tiny, tok):
    model, params = tiny
    adapters = _adapters(params, seed=1)
    examples = data.load(VALID, tok, max_length=512)[:4]
    stats = se.token_stats(model, params, adapters, CFG, examples, batch_size=4, pad_id=tok.pad_token_id)
    merged = jlora.merge(params, adapters, CFG)
    width = max(len(ex) for ex in examples)
    ids = jnp.asarray([list(ex.input_ids) + [0] * (width - len(ex)) for ex in examples])
    all_lq = _log_softmax(jax.jit(model.apply)({"params": merged}, ids))
    nll, n = 0.0, 0
    for ex, lq in zip(examples, all_lq):
        for t in range(len(ex.prompt_ids), len(ex)):      # token t is a target, predicted at t - 1
            nll -= lq[t - 1, ex.input_ids[t]]
            n += 1
    assert stats["tokens"] == n == sum(len(ex.completion_ids) for ex in examples)
    np.testing.assert_allclose(stats["loss_adapted"], nll / n, rtol=1e-5)


def test_inputs_with_nothing_to_measure_are_refused(tiny, tok):
    """No target token, no continuation, no task prompt: an error, not 0/0 written as 0% agreement or NaN."""
    model, params = tiny
    untrained = [data.Example((5, 6), ()), data.Example((), (7,))]     # all prompt; one token: no next token
    with pytest.raises(ValueError, match="none of the 2 examples has a target token"):
        se.token_stats(model, params, _adapters(params), CFG, untrained, pad_id=tok.pad_token_id)
    with pytest.raises(ValueError, match="none of the 1 examples has a target token"):   # empty: no Loader error
        se.token_stats(model, params, _adapters(params), CFG, [data.Example((), (), "empty.jsonl:1")])
    # a one-token text beside others: nothing to compare there, so no 0.0 in the per-text figures
    stats = se.token_stats(model, params, _adapters(params), CFG, [data.Example((), (5, 6, 7)), untrained[1]])
    assert stats["texts"] == 2 and stats["tokens"] == 2 and len(stats["per_text_kl"]) == 1
    assert stats["per_text_kl"][0] == pytest.approx(stats["kl"])
    with pytest.raises(ValueError, match="no continuations to compare"):
        se.continuation_stats([], [])
    with pytest.raises(ValueError, match="no task prompts to score"):
        se.task_score([], [], [], lambda out, target: True, decode=str)


def test_continuations_equal_uncached_generation_with_merged_weights(tiny, general, tok):
    model, params = tiny
    adapters = _adapters(params, seed=2)
    merged = jlora.merge(params, adapters, CFG)
    prompts = [list(p) for p in general.prompts]
    base, adapted = se.continuations(model, params, adapters, CFG, prompts, max_new_tokens=6, batch_size=4)
    # the reference: all prompts in one batch, no KV cache (the recompute-everything path), merged weights
    assert base == gen.generate(model, params, prompts, max_new_tokens=6, use_cache=False).to_lists()
    assert adapted == gen.generate(model, merged, prompts, max_new_tokens=6, use_cache=False).to_lists()
    stats = se.continuation_stats(base, adapted, decode=tok.decode, prompts=prompts)
    same = [b == a for b, a in zip(base, adapted)]
    assert stats["identical_continuations_pct"] == 100 * sum(same) / len(same) < 100
    assert len(stats["examples"]) == min(3, len(same) - sum(same))
    assert stats["examples"][0]["base"] == tok.decode(base[same.index(False)])


def test_zero_adapter_changes_nothing_exactly(tiny, general, tok, tmp_path):
    model, params = tiny
    zero = _adapters(params, zero_b=True)            # nonzero A, B = 0: the update is exactly zero
    examples = data.load(VALID, tok, max_length=512)[:4]
    prompts = data.eval_prompts(VALID, tok, limit=3)
    scorer = lambda out, target: out.strip() == target  # noqa: E731
    scorer.label = "exact JSON"
    report = se.evaluate(model, params, zero, CFG, general=general, task=examples, task_prompts=prompts,
                         scorer=scorer, decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
                         batch_size=4, max_new_tokens=6, pad_token_id=tok.pad_token_id, intruders=True,
                         intruder_top_k=4)
    g, t = report["general"], report["task"]
    assert g["kl"] == 0.0 and set(g["per_text_kl"]) == {0.0}
    assert g["top1_agreement_pct"] == 100.0
    assert g["loss_change"] == 0.0 and g["loss_base"] > 0
    assert g["identical_continuations_pct"] == 100.0 and g["prompts"] == len(general.prompts)
    assert g["examples"] == []
    assert t["kl"] == 0.0 and t["loss_base"] == t["loss_adapted"] and t["tokens"] > 0
    assert t["score_base_pct"] == t["score_adapted_pct"] and t["metric"] == "exact JSON" and t["prompts"] == 3
    assert report["intruders"]["total"] == 0 and report["intruders"]["matrices"] == 6

    lines = se.summary(report).splitlines()
    assert lines[0].startswith("task: exact JSON 0.0% -> 0.0%, loss ")
    assert lines[1].startswith("general prompts: KL 0.0000 nats/token, top-1 agreement 100.0%")
    written = se.save(report, tmp_path)
    assert json.loads(written["report"].read_text()) == report
    assert written["plot"].stat().st_size > 1000


def test_plot_leaves_matplotlib_global_state_alone(tmp_path):
    """A notebook calling side_effects.save keeps its backend (plot used to switch the session to Agg) and its
    pyplot figures; the PNG is written all the same."""
    matplotlib = pytest.importorskip("matplotlib")
    report = {"task": {"loss_base": 2.0, "loss_adapted": 0.5, "metric": "exact JSON", "score_base_pct": 0.0,
                       "score_adapted_pct": 84.0},
              "general": {"kl": 0.02, "per_text_kl": [0.01, 0.03, 0.02], "top1_agreement_pct": 96.4,
                          "loss_base": 3.0, "loss_adapted": 3.05}}
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        import matplotlib.pyplot as plt

        figures = plt.get_fignums()
        path = se.plot(report, tmp_path / "report.png")
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == figures
    finally:
        matplotlib.use(before)
    assert path == tmp_path / "report.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_intruder_dimensions_equal_a_numpy_reference():
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(12, 8)), jnp.float32)},
              "stack": {"kernel": jnp.asarray(rng.normal(size=(3, 8, 10)), jnp.float32)}}
    lay = {"dense/kernel": jlora.KernelLayout("Dense"), "stack/kernel": jlora.KernelLayout("Dense", lead=1)}
    cfg = jlora.LoraConfig(rank=2, alpha=2, targets=("dense", "stack"))
    shapes = jax.eval_shape(lambda: jlora.init(params, cfg, key=jax.random.key(0), layout=lay))
    adapters = jax.tree.map(lambda x: jnp.asarray(2.0 * rng.normal(size=x.shape), x.dtype), shapes)
    out = se.intruder_dimensions(params, adapters, cfg, top_k=4, threshold=0.6)
    merged = jlora.merge(params, adapters, cfg)
    expected = {}
    for path in ("dense/kernel", "stack/kernel"):
        w0 = np.asarray(jlora.tree.flatten(params)[path], np.float64).reshape(-1, *params[path[:-7]]["kernel"]
                                                                                .shape[-2:])
        w1 = np.asarray(jlora.tree.flatten(merged)[path], np.float64).reshape(w0.shape)
        count = 0
        for a, b in zip(w0, w1):
            u0 = np.linalg.svd(a.T, full_matrices=False)[0]          # output-space singular vectors of the base
            u1 = np.linalg.svd(b.T, full_matrices=False)[0][:, :4]   # the adapted weight's top 4
            count += int((np.abs(u1.T @ u0).max(axis=1) < 0.6).sum())
        expected[path] = count
    assert out["per_path"] == expected and out["total"] == sum(expected.values()) > 0
    assert out["matrices"] == 4



def test_intruders_of_a_pissa_adapter_compare_with_the_original_weights():
    """PiSSA's adapters run on a residual base; at step 0 the adapted model is the original one, so the report
    (given the original weights as base_params) counts no intruders, as KL 0 and 100% agreement say."""
    from jlora.variants.inits import init_with_base

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    cfg = jlora.LoraConfig(rank=12, alpha=12, targets=("q_proj", "down_proj"), init="pissa")
    adapters, residual = init_with_base(params, cfg, key=jax.random.key(1))
    texts = [data.Example((), tuple(int(t) for t in np.random.default_rng(i).integers(1, 64, 12)))
             for i in range(2)]
    report = se.evaluate(model, residual, adapters, cfg, general=texts, base_params=params, intruders=True,
                         intruder_top_k=8)
    assert report["general"]["top1_agreement_pct"] == 100.0
    assert report["intruders"]["total"] == 0 and report["intruders"]["matrices"] == 2
    # against the residual itself, the same adapters do look intruded: the base matters
    assert se.intruder_dimensions(residual, adapters, cfg, top_k=8)["total"] > 0


@pytest.mark.parametrize("kwargs, message", [({"top_k": -1}, "top_k must be an int >= 1"),
                                             ({"top_k": 0}, "top_k must be an int >= 1"),
                                             ({"threshold": 1.5}, "threshold must be")])
def test_intruder_dimensions_refuse_bad_settings(kwargs, message):
    params = {"dense": {"kernel": jnp.ones((6, 4), jnp.float32)}}
    cfg = jlora.LoraConfig(rank=2, alpha=2, targets=("dense",))
    with pytest.raises(ValueError, match=message):
        se.intruder_dimensions(params, jlora.init(params, cfg, key=jax.random.key(0)), cfg, **kwargs)

# ------------------------------------------------------------------------------------------ the general set

def test_general_set_is_varied_valid_and_not_the_task(tok):
    records = data.read_jsonl(GENERAL)
    assert 300 <= len(records) <= 400
    assert len({r["prompt"] for r in records}) == len(records)
    kinds = collections.Counter(r["kind"] for r in records)
    assert len(kinds) >= 8 and max(kinds.values()) < 0.3 * len(records)
    assert not any("JSON" in r["prompt"] + r["completion"] for r in records)   # the demo task is JSON extraction
    spec = importlib.util.spec_from_file_location("make_general", os.path.join(ROOT, "examples", "data",
                                                                               "make_general.py"))
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    assert make.generate() == records                                          # regenerated byte for byte
    raw = se.load_general(GENERAL, tok, limit=5)
    chat = se.load_general(GENERAL, tok, limit=5, chat=True)
    start = tok.encode("<|im_start|>", add_special_tokens=False)
    assert all(list(p[:len(start)]) == start for p in chat.prompts)          # the chat template's turns
    assert tok.decode(raw.texts[0].input_ids, skip_special_tokens=True).startswith(records[0]["prompt"])
    assert all(sum(ex.loss_mask) == len(ex) for ex in raw.texts)               # the whole text is scored
