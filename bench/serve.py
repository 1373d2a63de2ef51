"""Section: serving. Tokens/s of ``jlora serve``'s engine with 8 concurrent clients on 8 different adapters vs 8
clients on the base (target: adapters >= 0.85 of the base).

The SmolLM2-135M shape with random weights (``nn.scan`` over the layers), the engine of ``jlora serve``
(:class:`jlora.serve.engine.Engine`: a bank of 8 slots, batches padded to 8 rows) driven in-process by 8 client
threads, each sending one request at a time through :meth:`Engine.generate` (the HTTP layer adds the same small
cost to both sides, so it is left out). Every request: a 32-token prompt, 64 new tokens (``ignore_eos``, so every
request decodes the same number of tokens). Base clients all name the base, so their batches run the plain model;
adapter clients name 8 adapters of rank 16 (the demo's q, k, v, o; also all linear layers), so every batch mixes 8
adapters through the bank. Rounds alternate the two sides; the ratio is the median over rounds.
"""

from __future__ import annotations

import statistics
import threading
import time

from bench import common

PROMPT, NEW, CLIENTS, REQUESTS = 32, 64, 8, 2    # per client per round


def _loaded(layers):
    from jlora.hf import Loaded
    from jlora.models import family_for

    hf = common.hf_config(**({} if layers is None else {"num_hidden_layers": layers}))
    model, params = common.jlora_model(hf, scan_layers=True)
    return Loaded(model, params, model.config, None, "smollm2-random", family_for("llama"), hf)


def _engine(loaded, targets):
    import jax

    import jlora
    from jlora.serve.engine import Engine, EngineConfig

    engine = Engine(loaded, EngineConfig(slots=CLIENTS, rank=common.RANK, targets=targets, max_batch=CLIENTS,
                                         batch_sizes=(CLIENTS,), max_queue=4 * CLIENTS, window_ms=20))
    lay = engine.layout
    cfg = jlora.LoraConfig(rank=common.RANK, alpha=common.ALPHA, targets=targets)
    for i in range(CLIENTS):
        ads = jlora.init(loaded.params, cfg, key=jax.random.key(i), layout=lay)
        ads = jax.tree.map(lambda x: x + 0.01, ads)           # a non-zero B: the low-rank path computes for real
        engine.put_adapter(f"a{i}", ads, cfg)
    return engine


def _round(engine, models, prompts) -> float:
    """Tokens/s of CLIENTS threads, client i sending REQUESTS requests for ``models[i]``."""
    tokens = [0] * len(models)
    gate = threading.Barrier(len(models) + 1)

    def client(i):
        gate.wait()
        for _ in range(REQUESTS):
            out = engine.generate(prompts[i], adapter=models[i], max_tokens=NEW, ignore_eos=True)
            tokens[i] += len(out.tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return sum(tokens) / (time.perf_counter() - t0)


def _compare(loaded, targets, prompts, repeats) -> dict:
    engine = _engine(loaded, targets)
    sides = {"base": [None] * CLIENTS, "8 adapters": [f"a{i}" for i in range(CLIENTS)]}
    try:
        for models in sides.values():           # compile both: the plain model and the bank
            engine.generate(prompts[0], adapter=models[0], max_tokens=NEW, ignore_eos=True)
        compiles = engine.metrics.snapshot()["compiles"]["generate"]
        samples = {name: [] for name in sides}
        names = list(sides)
        for r in range(repeats):
            for name in names[r % 2:] + names[:r % 2]:
                samples[name].append(_round(engine, sides[name], prompts))
    finally:
        engine.close()                          # waits for the last batch's metrics
    snap = engine.metrics.snapshot()
    ratios = [a / b for a, b in zip(samples["8 adapters"], samples["base"])]
    shared = [b for b in snap["batches"]["recent"] if len(b["models"]) == CLIENTS]
    return {"tokens_per_s": {k: [round(x, 1) for x in v] for k, v in samples.items()},
            "median_tokens_per_s": {k: statistics.median(v) for k, v in samples.items()},
            "ratio": statistics.median(ratios), "recompiles_while_timed": snap["compiles"]["generate"] - compiles,
            "batches_with_8_adapters": len(shared), "rows_histogram": snap["batches"]["rows_histogram"]}


def run(*, repeats: int = 5, layers: int | None = None) -> dict:
    repeats = max(3, repeats // 2 + 1)
    loaded = _loaded(layers)
    prompts = common.token_batch(batch=CLIENTS, seq=PROMPT, seed=2).tolist()
    results = {"setup": {"clients": CLIENTS, "requests_per_client_per_round": REQUESTS, "prompt_tokens": PROMPT,
                         "new_tokens": NEW, "rank": common.RANK, "layers": loaded.config.num_hidden_layers,
                         "rounds": repeats}}
    rows = []
    for label, targets in (("q, k, v, o (the demo's)", ("q_proj", "k_proj", "v_proj", "o_proj")),
                           ("all linear", common.ALL_LINEAR)):
        res = _compare(loaded, targets, prompts, repeats)
        results[label] = res
        med = res["median_tokens_per_s"]
        rows.append([label, f"{med['base']:.1f}", f"{med['8 adapters']:.1f}", f"{res['ratio']:.3f}",
                     "yes" if res["ratio"] >= 0.85 else "**no**", str(res["recompiles_while_timed"])])
    md = [f"`jlora serve`'s engine, {CLIENTS} concurrent clients (one request at a time each, {PROMPT}-token "
          f"prompts, {NEW} new tokens), SmolLM2-135M shape ({loaded.config.num_hidden_layers} layers, random "
          f"weights, nn.scan), batches padded to {CLIENTS} rows; median of {repeats} rounds of {REQUESTS} requests "
          f"per client. Base: every client names the base (the plain model decodes). Adapters: client i names "
          f"adapter i (r = {common.RANK}), so each batch mixes {CLIENTS} adapters through the bank. Target: adapters "
          f"/ base >= 0.85.", "",
          common.md_table(["bank covers", "base tokens/s", "8 adapters tokens/s", "adapters / base", ">= 0.85",
                           "recompiles while timed"], rows)]
    return {"results": results, "markdown": "\n".join(md)}
