"""Section: many adapters on one base (:mod:`jlora.bank`): a batch routed over 16 adapters vs the alternatives.

SmolLM2-135M shape (random fp32 weights), 16 adapters of rank 16 on q,v with 16 different alphas (and random,
non-zero factors), one per row of a 16-row batch. Contenders, alternated round by round in one run
(:func:`bench.common.interleaved`):

- ``bank``: :func:`jlora.bank.apply` (forward) / :func:`jlora.bank.apply_fn` (generation), one call, row ``i``
  routed to slot ``i``;
- ``one adapter``: the same batch with a single adapter for every row (:func:`jlora.apply`,
  :func:`jlora.models.generate.lora_apply_fn`): what the bank's routing costs;
- ``one at a time``: the 16 adapters served in turn, batch 1 each, through one compiled function (each adapter's
  scale is folded into its B so one config serves all 16: the same outputs, and no recompiles);
- ``merge in turn``: for each adapter, :func:`jlora.merge` (jitted) into the base and a plain forward of its row,
  merge time included (forward only).

Forward: 16 rows x 128 tokens (full fp32 logits). Generation: greedy, 16 prompts x 32 tokens, 32 new tokens, one
jitted call (:func:`jlora.models.generate.generate`; time includes the prefill). Also: the time of
:func:`jlora.bank.put` (one adapter into a slot), the jit cache after swaps (no recompilation), the bank's bytes for
64 slots, compiled FLOPs (XLA cost analysis, unrolled layers, from 1- and 2-layer compiles as in
:mod:`bench.figures`) against the slot count and rank, and one layer's low-rank update computed by gathering the
rows' factors vs by one-hot einsums over the slots (the alternatives to the gather).
"""

from __future__ import annotations

import statistics
import time

from bench import common

SLOTS = 16              # adapters, one per batch row
SEQ = 128               # forward tokens per row
PROMPT, NEW = 32, 32    # generation: prompt tokens per row, new tokens
BYTES_SLOTS = 64        # the bank whose bytes are reported
GRID_SLOTS, GRID_RANKS = (4, 16, 64), (8, 16)
BANK = "bank, 16 adapters"
ONE, SERIAL, MERGE = "one adapter", "one at a time (16 calls, batch 1)", "merge in turn (16 merges + forwards)"


def _adapters(params, n: int, seed: int = 0):
    """``(configs, adapters, common_cfg, served)``: n random rank-16 q,v adapters with alphas 16, 18, ...; and
    the same adapters with their scale folded into B for ``common_cfg`` (one config: one compiled function)."""
    import jax

    import jlora
    from jlora import adapter as adapter_lib
    from jlora import tree as tree_lib

    common_cfg = jlora.LoraConfig(rank=common.RANK, alpha=common.ALPHA, targets=common.QV)
    cfgs, ads, served = [], [], []
    for i in range(n):
        cfg = jlora.LoraConfig(rank=common.RANK, alpha=16.0 + 2.0 * i, targets=common.QV)
        init = jlora.init(params, cfg, key=jax.random.key(seed + 100 + i))
        nodes, folded = {}, {}
        for k, (path, node) in enumerate(adapter_lib.adapter_items(init)):
            b = 0.02 * jax.random.normal(jax.random.key(seed * 7919 + 1000 * i + k), node.b.shape, node.b.dtype)
            nodes[path] = node.replace(b=b)
            folded[path] = node.replace(b=b * (cfg.scale(path) / common_cfg.scale(path)))
        cfgs.append(cfg)
        ads.append(tree_lib.unflatten(nodes))
        served.append(tree_lib.unflatten(folded))
    return cfgs, ads, common_cfg, served


def _fill(params, cfgs, ads, capacity: int):
    from jlora import bank as B

    bank = B.create(params, capacity=capacity, rank=common.RANK, targets=common.QV)
    for slot, (ad, cfg) in enumerate(zip(ads, cfgs)):
        bank = B.put(bank, slot, ad, cfg)
    return bank


def _forward(model, params, bank, served, common_cfg, ids, *, repeats: int):
    """Forward contenders, interleaved; returns (samples, fns-for-checks)."""
    import jax
    import jax.numpy as jnp

    import jlora
    from jlora import adapter as adapter_lib
    from jlora import bank as B

    n = ids.shape[0]
    rows = jnp.arange(n, dtype=jnp.int32)
    bank_fwd = jax.jit(lambda p, b, r, x: B.apply(model, p, b, r, x))
    one_fwd = jax.jit(lambda p, a, x: jlora.apply(model, p, a, common_cfg, x))
    base_fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
    # jit(merge) of the whole params would return (copy) every leaf; merging only the adapted kernels and
    # putting them back outside jit is the fast way to merge in turn
    flat = jlora.tree.flatten(params)
    adapted = [p for p, _ in adapter_lib.adapter_items(served[0])]
    kernels = jlora.tree.unflatten({p: flat[p] for p in adapted})
    merge_kernels = jax.jit(lambda k, a: jlora.merge(k, a, common_cfg))
    whole_merge = jax.jit(lambda p, a: jlora.merge(p, a, common_cfg))

    def merge(i):
        return jlora.tree.unflatten({**flat, **jlora.tree.flatten(merge_kernels(kernels, served[i]))})

    singles = [ids[i:i + 1] for i in range(n)]

    def serial():
        for i in range(n):
            jax.block_until_ready(one_fwd(params, served[i], singles[i]))

    def merged():
        for i in range(n):
            jax.block_until_ready(base_fwd(merge(i), singles[i]))

    fns = {BANK: lambda: jax.block_until_ready(bank_fwd(params, bank, rows, ids)),
           ONE: lambda: jax.block_until_ready(one_fwd(params, served[0], ids)),
           SERIAL: serial, MERGE: merged}
    samples = common.interleaved(fns, repeats=repeats)
    # the contenders compute the same logits: each bank row equals its adapter served alone and merged
    out = bank_fwd(params, bank, rows, ids)
    err_alone = max(float(jnp.max(jnp.abs(out[i] - one_fwd(params, served[i], singles[i])[0]))) for i in range(n))
    err_merged = max(float(jnp.max(jnp.abs(out[i] - base_fwd(merge(i), singles[i])[0]))) for i in range(n))
    del out
    jax.block_until_ready(whole_merge(params, served[0]))
    merge_s, whole_s = [], []
    for k in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(merge(k))
        merge_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(whole_merge(params, served[k]))
        whole_s.append(time.perf_counter() - t0)
    checks = {"max |bank - alone| logit": err_alone, "max |bank - merged| logit": err_merged,
              "merge_median_s": statistics.median(merge_s), "whole_params_merge_median_s": statistics.median(whole_s)}
    return samples, bank_fwd, rows, checks


def _generation(model, params, bank, served, common_cfg, prompts, new: int, *, repeats: int):
    import jax.numpy as jnp
    import numpy as np

    from jlora import bank as B
    from jlora.models import generate as gen

    n = prompts.shape[0]
    rows = jnp.arange(n, dtype=jnp.int32)
    bank_fn, lora_fn = B.apply_fn(model), gen.lora_apply_fn(model, common_cfg)
    kw = dict(max_new_tokens=new, eos_token_id=())

    bank_state = {"bank": bank}

    def with_bank():
        return gen.generate(model, (params, bank_state["bank"], rows), prompts, apply_fn=bank_fn, **kw)

    def serial():
        return [gen.generate(model, (params, served[i]), prompts[i:i + 1], apply_fn=lora_fn, **kw) for i in range(n)]

    fns = {BANK: with_bank, ONE: lambda: gen.generate(model, (params, served[0]), prompts, apply_fn=lora_fn, **kw),
           SERIAL: serial}
    samples = common.interleaved(fns, repeats=repeats)
    together = with_bank().tokens
    alone = np.concatenate([o.tokens for o in serial()])
    same = int(np.sum(np.all(together == alone, axis=1)))
    return samples, with_bank, bank_state, {"rows whose tokens equal their adapter served alone": f"{same}/{n}"}


def _swap(params, bank, bank_fwd, rows, ids, bank_gen, bank_state, cfgs, ads, *, swaps: int) -> dict:
    """Median time of putting one adapter into a slot, and the jit caches before and after the swaps."""
    import jax

    from jlora import bank as B
    from jlora.models import generate as gen

    jax.block_until_ready(bank_fwd(params, bank, rows, ids))
    before = (bank_fwd._cache_size(), gen._generate._cache_size())
    times = []
    for k in range(swaps):
        src = (k + 5) % len(ads)
        t0 = time.perf_counter()
        bank = jax.block_until_ready(B.put(bank, k % bank.capacity, ads[src], cfgs[src]))
        times.append(time.perf_counter() - t0)
        jax.block_until_ready(bank_fwd(params, bank, rows, ids))
    bank_state["bank"] = bank
    bank_gen()
    after = (bank_fwd._cache_size(), gen._generate._cache_size())
    return {"put_median_s": statistics.median(times), "put_s": [round(t, 4) for t in times],
            "jit cache (forward, generate) before swaps": before, "after swaps": after,
            "recompiled": after != before}


def _bank_bytes(params) -> dict:
    """Bytes of a 64-slot bank at r=16 on q,v, with the analytic count, and the time to swap into it."""
    import jax

    from jlora import bank as B

    big = B.create(params, capacity=BYTES_SLOTS, rank=common.RANK, targets=common.QV)
    got = B.nbytes(big)
    c = common.SMOLLM2
    d, kv = c["hidden_size"], c["num_key_value_heads"] * c["head_dim"]
    hq = c["num_attention_heads"] * c["head_dim"]
    layers = sum(1 for p in big.paths if "q_proj" in p)
    per_slot = layers * 4 * (common.RANK * (d + hq) + common.RANK * (d + kv))          # fp32 factors
    want = BYTES_SLOTS * (per_slot + layers * 2 * (4 + 4))                             # + scale, rank per path
    return {"slots": BYTES_SLOTS, "bytes": got, "analytic": want, "per_slot_bytes": per_slot, "layers": layers,
            "model_bytes_fp32": common.tree_bytes(params), "bank": big}


def _swap_big(big, cfgs, ads, *, swaps: int) -> list[float]:
    import jax

    from jlora import bank as B

    times = []
    for k in range(swaps):
        t0 = time.perf_counter()
        big = jax.block_until_ready(B.put(big, (7 * k) % big.capacity, ads[k % len(ads)], cfgs[k % len(cfgs)]))
        times.append(time.perf_counter() - t0)
    return times


def _forward_flops(layers: int, seq: int, *, slots: int | None, rank: int, batch: int = SLOTS) -> float:
    """Compiled FLOPs of a forward on ``batch`` x ``seq`` tokens: the base model (rank 0), one adapter
    (``slots=None``) or a bank of ``slots`` slots with every row on its own slot (``ids % slots``)."""
    import jax
    import jax.numpy as jnp

    import jlora
    from bench import steps
    from jlora import bank as B

    model, params = common.jlora_model(common.hf_config(num_hidden_layers=layers))
    x = jnp.asarray(common.token_batch(batch=batch, seq=seq))
    if rank == 0:
        return steps._flops(jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, x).compile())
    cfg = jlora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=common.QV)
    if slots is None:
        ad = jlora.init(params, cfg, key=jax.random.key(1))
        f = jax.jit(lambda p, a, x: jlora.apply(model, p, a, cfg, x))
        return steps._flops(f.lower(params, ad, x).compile())
    bank = B.create(params, capacity=slots, rank=rank, targets=common.QV)
    rows = jnp.arange(batch, dtype=jnp.int32) % slots
    f = jax.jit(lambda p, b, r, x: B.apply(model, p, b, r, x))
    return steps._flops(f.lower(params, bank, rows, x).compile())


def _flops(seq: int, layers: int, grid_slots, grid_ranks) -> dict:
    """XLA's FLOPs of the bank forward vs one adapter per (slots, rank), and the one-hot schemes' analytic extra.

    Layers are identical, so a count is affine in depth: 1- and 2-layer compiles give any depth; the bank's extra
    over one adapter is all in the adapted layers, so the 1-layer difference times the depth is the model's."""
    c = common.SMOLLM2
    d, hq, kv = c["hidden_size"], c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    shapes = [(d, hq), (d, kv)]                     # q_proj, v_proj: (in, out)
    tokens = SLOTS * seq
    base = [_forward_flops(n, seq, slots=None, rank=0) for n in (1, 2)]
    base_l = base[0] + (layers - 1) * (base[1] - base[0])
    rows = []
    for r in grid_ranks:
        one = [_forward_flops(n, seq, slots=None, rank=r) for n in (1, 2)]
        one_l = one[0] + (layers - 1) * (one[1] - one[0])
        lora = layers * sum(2 * tokens * r * (i + o) for i, o in shapes)      # one adapter's low-rank matmuls
        for n_slots in grid_slots:
            bank1 = _forward_flops(1, seq, slots=n_slots, rank=r)
            extra_xla = layers * (bank1 - one[0])
            rows.append({"slots": n_slots, "rank": r, "one adapter forward flops": one_l,
                         "low-rank flops (one adapter, analytic)": lora,
                         "low-rank flops (one adapter, XLA)": one_l - base_l,
                         "gather extra flops (XLA)": extra_xla,
                         "one-hot over outputs extra flops": layers * sum(2 * tokens * (n_slots - 1) * r * (i + o)
                                                                          for i, o in shapes),
                         "one-hot over factors extra flops": layers * sum(2 * SLOTS * n_slots * r * (i + o)
                                                                          for i, o in shapes)})
    return {"base forward flops": base_l, "tokens": tokens, "layers": layers, "rows": rows}


def _layer_schemes(seq: int, slot_counts, *, repeats: int, inner: int) -> dict:
    """One q_proj-shaped low-rank update (16 rows x ``seq`` tokens, 576 -> 576, r=16) with per-row slots, three
    ways: gathering the rows' factors (jlora.bank), ``einsum('btd,bs,sdr->btr')`` with a one-hot (jnp picks the
    contraction order), and the one-hot applied to every slot's output (``btd,sdr->btsr``, then over s and r)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench import steps

    d_in = d_out = common.SMOLLM2["hidden_size"]
    r = common.RANK
    out = {}
    for n_slots in slot_counts:
        k = jax.random.split(jax.random.key(n_slots), 4)
        x = jax.random.normal(k[0], (SLOTS, seq, d_in))
        a = jax.random.normal(k[1], (n_slots, d_in, r)) / np.sqrt(d_in)
        b = jax.random.normal(k[2], (n_slots, r, d_out)) / np.sqrt(r)
        scale = jnp.linspace(1.0, 2.0, n_slots)
        ids = jnp.arange(SLOTS, dtype=jnp.int32) % n_slots

        def gather(x, a, b, scale, ids):
            h = jnp.einsum("bti,bir->btr", x, jnp.take(a, ids, axis=0))
            return jnp.einsum("btr,bro->bto", h, jnp.take(b, ids, axis=0)) * jnp.take(scale, ids)[:, None, None]

        def one_hot(x, a, b, scale, ids):
            oh = jax.nn.one_hot(ids, a.shape[0], dtype=x.dtype) * scale[None, :]
            h = jnp.einsum("btd,bs,sdr->btr", x, oh, a)
            return jnp.einsum("btr,bs,sro->bto", h, jax.nn.one_hot(ids, a.shape[0], dtype=x.dtype), b)

        def all_slots(x, a, b, scale, ids):
            oh = jax.nn.one_hot(ids, a.shape[0], dtype=x.dtype) * scale[None, :]
            h = jnp.einsum("btd,sdr->btsr", x, a) * oh[:, None, :, None]
            return jnp.einsum("btsr,sro->bto", h, b)

        args = (x, a, b, scale, ids)
        fns = {"gather": gather, "one-hot einsum": one_hot, "one-hot over every slot's output": all_slots}
        compiled = {name: jax.jit(f).lower(*args).compile() for name, f in fns.items()}
        want = compiled["gather"](*args)
        errs = {name: float(jnp.max(jnp.abs(c(*args) - want))) for name, c in compiled.items()}

        def loop(c):
            def run():
                for _ in range(inner):
                    y = c(*args)
                return jax.block_until_ready(y)
            return run

        samples = common.interleaved({name: loop(c) for name, c in compiled.items()}, repeats=repeats)
        out[n_slots] = {name: {"ms": 1e3 * statistics.median(samples[name].wall) / inner,
                               "flops": steps._flops(compiled[name]), "max |diff| vs gather": errs[name],
                               "vs gather": common.paired_ratio(samples, name, "gather")}
                        for name in compiled}
    return out


def run(*, repeats: int = 5, layers: int | None = None, quick: bool = False) -> dict:
    """Measures everything above; ``quick`` shortens sequences, generation and the FLOPs grid (a smoke run)."""
    import gc

    import jax.numpy as jnp

    seq, prompt, new = (32, 8, 8) if quick else (SEQ, PROMPT, NEW)
    grid_slots, grid_ranks = ((16,), (16,)) if quick else (GRID_SLOTS, GRID_RANKS)
    hf = common.hf_config(**({} if layers is None else {"num_hidden_layers": layers}))
    n_layers = hf["num_hidden_layers"]
    t_start = time.perf_counter()
    phases = {}

    def done(name, t0):
        phases[name] = round(time.perf_counter() - t0, 1)
        return time.perf_counter()

    t = time.perf_counter()
    model, params = common.jlora_model(hf)
    cfgs, ads, common_cfg, served = _adapters(params, SLOTS)
    bank = _fill(params, cfgs, ads, SLOTS)
    ids = jnp.asarray(common.token_batch(batch=SLOTS, seq=seq, seed=3))
    prompts = common.token_batch(batch=SLOTS, seq=prompt, seed=4)
    t = done("setup", t)
    fwd_samples, bank_fwd, rows, fwd_checks = _forward(model, params, bank, served, common_cfg, ids, repeats=repeats)
    t = done("forward", t)
    gen_repeats = max(2, (repeats + 1) // 2)
    gen_samples, bank_gen, bank_state, gen_checks = _generation(model, params, bank, served, common_cfg, prompts,
                                                                new, repeats=gen_repeats)
    t = done("generation", t)
    swap = _swap(params, bank, bank_fwd, rows, ids, bank_gen, bank_state, cfgs, ads, swaps=3 if quick else 7)
    del bank_state, bank_gen
    gc.collect()
    sizes = _bank_bytes(params)
    big = sizes.pop("bank")
    swap["put_64_slots_s"] = [round(t, 4) for t in _swap_big(big, cfgs, ads, swaps=3 if quick else 5)]
    swap["put_64_slots_median_s"] = statistics.median(swap["put_64_slots_s"])
    del big, model, params, bank, served, ads
    gc.collect()
    t = done("swap and bytes", t)
    flops = _flops(seq, n_layers, grid_slots, grid_ranks)
    t = done("flops", t)
    schemes = _layer_schemes(seq, (16,) if quick else (16, 64), repeats=max(3, repeats), inner=3 if quick else 10)
    done("layer schemes", t)

    fwd = {name: s.summary() for name, s in fwd_samples.items()}
    gen = {name: s.summary() for name, s in gen_samples.items()}
    ratios = {"bank / one adapter, forward": common.paired_ratio(fwd_samples, BANK, ONE),
              "bank / one adapter, generation": common.paired_ratio(gen_samples, BANK, ONE),
              "one at a time / bank, forward": common.paired_ratio(fwd_samples, SERIAL, BANK),
              "one at a time / bank, generation": common.paired_ratio(gen_samples, SERIAL, BANK),
              "merge in turn / bank, forward": common.paired_ratio(fwd_samples, MERGE, BANK)}
    results = {"setup": {"layers": n_layers, "slots": SLOTS, "rank": common.RANK, "targets": list(common.QV),
                         "alphas": [c.alpha for c in cfgs], "forward_tokens": [SLOTS, seq],
                         "prompt_tokens": [SLOTS, prompt], "new_tokens": new, "forward_repeats": repeats,
                         "generation_repeats": gen_repeats, "quick": quick},
               "forward": fwd, "generation": gen, "ratios": ratios, "checks": {**fwd_checks, **gen_checks},
               "swap": swap, "bytes": sizes, "flops": flops, "layer_schemes": schemes,
               "section_s": time.perf_counter() - t_start, "phases_s": phases}
    return {"results": results, "markdown": _markdown(results)}


def _ms(x: float) -> str:
    return f"{x * 1e3:.0f}" if x >= 0.1 else f"{x * 1e3:.1f}"


def _markdown(res: dict) -> str:
    s, r, fwd, gen = res["setup"], res["ratios"], res["forward"], res["generation"]
    ck, sw, by, fl = res["checks"], res["swap"], res["bytes"], res["flops"]

    def met(value, limit, at_least=False):
        ok = value >= limit if at_least else value <= limit
        return "yes" if ok else "**no**"

    rows = []
    for name in (BANK, ONE, SERIAL, MERGE):
        g = gen.get(name)
        rows.append([name, _ms(fwd[name]["wall_median_s"]),
                     f"{fwd[name]['wall_median_s'] / fwd[BANK]['wall_median_s']:.2f}",
                     "-" if g is None else f"{g['wall_median_s']:.2f}",
                     "-" if g is None else f"{g['wall_median_s'] / gen[BANK]['wall_median_s']:.2f}"])
    tokens, prompt = s["forward_tokens"], s["prompt_tokens"]
    md = [f"{s['slots']} adapters (r={s['rank']} on q,v, alphas {s['alphas'][0]:g}..{s['alphas'][-1]:g}), one per "
          f"row of a {s['slots']}-row batch, {s['layers']} layers; forward {tokens[0]} x {tokens[1]} tokens (fp32 "
          f"logits, median of {s['forward_repeats']}), greedy generation of {s['new_tokens']} tokens after "
          f"{prompt[0]} x {prompt[1]}-token prompts (one jitted call, prefill included, median of "
          f"{s['generation_repeats']}). Contenders alternate round by round; ratios are medians of per-round "
          f"ratios. \"one at a time\" serves each adapter on its own row through one compiled function (batch 1); "
          f"\"merge in turn\" runs a jitted `jlora.merge` and a plain forward per adapter.", "",
          common.md_table(["contender", "forward ms", "x bank", "generation s", "x bank"], rows), "",
          common.md_table(["ratio", "measured", "target", "met"], [
              ["bank / one adapter, forward", f"{r['bank / one adapter, forward']:.3f}", "<= 1.15",
               met(r["bank / one adapter, forward"], 1.15)],
              ["bank / one adapter, generation", f"{r['bank / one adapter, generation']:.3f}", "<= 1.15",
               met(r["bank / one adapter, generation"], 1.15)],
              ["one at a time / bank, forward", f"{r['one at a time / bank, forward']:.2f}", ">= 5",
               met(r["one at a time / bank, forward"], 5, True)],
              ["one at a time / bank, generation", f"{r['one at a time / bank, generation']:.2f}", ">= 5",
               met(r["one at a time / bank, generation"], 5, True)],
              ["merge in turn / bank, forward", f"{r['merge in turn / bank, forward']:.2f}", "-", "-"]]), "",
          f"Same outputs: max |logit| difference between a bank row and its adapter alone "
          f"{ck['max |bank - alone| logit']:.1e}, and merged {ck['max |bank - merged| logit']:.1e}; generated "
          f"tokens: {ck['rows whose tokens equal their adapter served alone']} rows equal to their adapter served "
          f"alone. One jitted merge takes {_ms(ck['merge_median_s'])} ms.", "",
          f"On a CPU a 128-token row is compute-bound: the 16 batch-1 forwards do the same FLOPs as the batched one, "
          f"so serving one at a time costs about the same there, and the >= 5x target is not reachable for the "
          f"forward on this machine; batching pays in decoding, where each step of a single row is bound by reading "
          f"the weights (on an accelerator, by far more).", "",
          f"Swap: `jax.block_until_ready(jlora.bank.put(...))` of one adapter into a slot takes "
          f"{_ms(sw['put_median_s'])} ms (median of {len(sw['put_s'])}) in the {s['slots']}-slot bank and "
          f"{_ms(sw['put_64_slots_median_s'])} ms in a {by['slots']}-slot bank (eager: each covered kernel's "
          f"slot array is rewritten). Jit cache sizes (forward, generate) before the swaps {tuple(sw['jit cache (forward, generate) before swaps'])}, "
          f"after {tuple(sw['after swaps'])}: "
          + ("**recompiled**." if sw["recompiled"] else "no recompilation."), "",
          f"Bank bytes, {by['slots']} slots at r={s['rank']} on q,v ({by['layers']} layers): "
          f"{by['bytes']:,} B ({by['bytes'] / 2**20:.1f} MiB; analytic {by['analytic']:,} B; "
          f"{by['per_slot_bytes'] / 2**20:.2f} MiB per slot, {by['bytes'] / by['model_bytes_fp32']:.3f} of the "
          f"fp32 base).", ""]
    base = fl["base forward flops"]
    frows = []
    for row in fl["rows"]:
        lora = row["low-rank flops (one adapter, analytic)"]
        frows.append([row["slots"], row["rank"], f"{lora / 1e9:.2f}", f"{row['low-rank flops (one adapter, XLA)'] / 1e9:.2f}",
                      f"{row['gather extra flops (XLA)'] / 1e9:+.4f}",
                      f"{row['one-hot over outputs extra flops'] / 1e9:.1f} ({row['one-hot over outputs extra flops'] / base:.1%})",
                      f"{row['one-hot over factors extra flops'] / 1e9:.4f}"])
    md += [f"Extra FLOPs per forward ({fl['tokens']} tokens, {fl['layers']} layers; base forward "
           f"{base / 1e9:.1f} GFLOP, XLA cost analysis on unrolled layers): the bank's gather adds none over one "
           f"adapter at the same rank — each row's tokens meet only their own slot's factors, "
           f"`2 * T * r * (in + out)` per adapted layer whatever the slot count; XLA's count of the difference is "
           f"the gather's and per-row scale's elementwise work. A one-hot einsum over every slot's output costs "
           f"`2 * T * (slots - 1) * r * (in + out)` more (in % of the base forward); a one-hot contracted with the "
           f"factors first is a gather written as a matmul, `2 * B * slots * r * (in + out)`.", "",
           common.md_table(["slots", "r", "one adapter's low-rank GFLOP", "same, XLA", "gather extra GFLOP (XLA)",
                            "one-hot over outputs extra GFLOP", "one-hot over factors extra GFLOP"], frows), ""]
    srows = []
    for n_slots, schemes in res["layer_schemes"].items():
        for name, v in schemes.items():
            srows.append([n_slots, name, f"{v['ms']:.2f}", f"{v['vs gather']:.2f}", f"{v['flops'] / 1e6:.0f}",
                          f"{v['max |diff| vs gather']:.1e}"])
    gather16 = res["layer_schemes"][next(iter(res["layer_schemes"]))]
    md += ["Why the gather: one q_proj-shaped low-rank update (16 rows x "
           f"{tokens[1]} tokens, 576 -> 576, r=16), each row on its own slot, computed three ways (jitted, median "
           f"per call):", "",
           common.md_table(["slots", "scheme", "ms", "x gather", "MFLOP (XLA)", "max |diff|"], srows), "",
           "Gathering each row's A and B (what `jlora.bank` does) does the FLOPs of a single adapter and moves "
           "`B * r * (in + out)` factor values per layer, whatever the slot count. Running every slot on every "
           "token and masking with a one-hot scales the low-rank work by the slot count "
           f"({gather16['one-hot over every slot' + chr(39) + 's output']['vs gather']:.1f}x the gather's time at "
           f"{next(iter(res['layer_schemes']))} slots here). A single `einsum('btd,bs,sdr->btr')` lets jnp contract "
           "the one-hot with the factors first, which is the gather done as a matmul: nearly as fast, but it reads "
           "every slot's factors on every call and still adds `2 * B * slots * r * (in + out)` FLOPs, so it grows "
           "with the bank while the gather does not. The gather is also what keeps slots swappable as data: the "
           "routing is an integer array, so the compiled forward, generation and train step never change."]
    return "\n".join(md)
