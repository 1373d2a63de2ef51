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
- ``merge in turn``: for each adapter, :func:`jlora.merge` (jitted, on the adapted q,v kernels only: a jitted merge
  of the whole params copies every leaf) into the base and a plain forward of its row, merge time included
  (forward only).

Forward: 16 rows x 128 tokens (full fp32 logits). Generation: greedy, 16 prompts x 32 tokens, 32 new tokens, one
jitted call (:func:`jlora.models.generate.generate`; time includes the prefill). Also: the time of
:func:`jlora.bank.put` (one adapter into a slot), the jit cache after swaps (no recompilation), the bank's bytes for
64 slots, compiled FLOPs (XLA cost analysis, unrolled layers, from 1- and 2-layer compiles as in
:mod:`bench.figures`) against the slot count and rank, and one layer's low-rank update computed by gathering the
rows' factors vs by one-hot einsums over the slots (the alternatives to the gather). Ratios are medians of
per-round ratios, of wall time and of process CPU time (the steadier one on a shared machine).
"""

from __future__ import annotations

import functools
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
    # warm-up: compile each executable once (a serial contender's 16 calls share one executable)
    for warm in (fns[BANK], fns[ONE], lambda: one_fwd(params, served[0], singles[0]),
                 lambda: base_fwd(merge(0), singles[0])):
        jax.block_until_ready(warm())
    samples = common.interleaved(fns, repeats=repeats, warmup=0)
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

    last = {}

    def timed_bank():
        last["bank"] = with_bank().tokens

    def serial():
        last["alone"] = [gen.generate(model, (params, served[i]), prompts[i:i + 1], apply_fn=lora_fn, **kw).tokens
                         for i in range(n)]

    fns = {BANK: timed_bank, ONE: lambda: gen.generate(model, (params, served[0]), prompts, apply_fn=lora_fn, **kw),
           SERIAL: serial}
    fns[BANK]()
    fns[ONE]()
    gen.generate(model, (params, served[0]), prompts[:1], apply_fn=lora_fn, **kw)      # compiles batch 1
    samples = common.interleaved(fns, repeats=repeats, warmup=0)
    same = int(np.sum(np.all(last["bank"] == np.concatenate(last["alone"]), axis=1)))
    return samples, with_bank, bank_state, {"rows whose tokens equal their adapter served alone": f"{same}/{n}"}


def _swap(params, bank, bank_fwd, rows, ids, bank_gen, bank_state, cfgs, ads, *, swaps: int) -> dict:
    """Median time of putting one adapter into a slot, and the jit caches before and after the swaps."""
    import jax

    from jlora import bank as B
    from jlora.models import generate as gen

    jax.block_until_ready(bank_fwd(params, bank, rows, ids))
    before = (bank_fwd._cache_size(), gen._generate._cache_size())
    times = []
    for k in range(swaps):           # other adapters (other alphas) into the slots
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
    """Bytes of a 64-slot bank at r=16 on q,v, with the analytic count (the bank itself under ``"bank"``)."""
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


@functools.lru_cache(maxsize=2)
def _small_model(layers: int):
    """The 1- and 2-layer SmolLM2-shaped models the FLOPs are counted on (made once per run)."""
    return common.jlora_model(common.hf_config(num_hidden_layers=layers))


def _forward_flops(layers: int, seq: int, *, slots: int | None, rank: int, batch: int = SLOTS) -> float:
    """Compiled FLOPs of a forward on ``batch`` x ``seq`` tokens: the base model (rank 0), one adapter
    (``slots=None``) or a bank of ``slots`` slots with every row on its own slot (``ids % slots``)."""
    import jax
    import jax.numpy as jnp

    import jlora
    from bench import steps
    from jlora import bank as B

    model, params = _small_model(layers)
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


def gather_update(x, a, b, scale, ids):
    """``scale[ids[i]] * (x[i] @ a[ids[i]]) @ b[ids[i]]`` per row, gathering each row's factors (jlora.bank's way)."""
    import jax.numpy as jnp

    h = jnp.einsum("bti,bir->btr", x, jnp.take(a, ids, axis=0))
    return jnp.einsum("btr,bro->bto", h, jnp.take(b, ids, axis=0)) * jnp.take(scale, ids)[:, None, None]


def one_hot_update(x, a, b, scale, ids):
    """The same update as one ``einsum('btd,bs,sdr->btr')`` with a one-hot (jnp chooses the contraction order)."""
    import jax
    import jax.numpy as jnp

    oh = jax.nn.one_hot(ids, a.shape[0], dtype=x.dtype)
    h = jnp.einsum("btd,bs,sdr->btr", x, oh * scale[None, :], a)
    return jnp.einsum("btr,bs,sro->bto", h, oh, b)


def all_slots_update(x, a, b, scale, ids):
    """The same update by running every slot on every token and keeping each row's slot with a one-hot."""
    import jax
    import jax.numpy as jnp

    oh = jax.nn.one_hot(ids, a.shape[0], dtype=x.dtype) * scale[None, :]
    h = jnp.einsum("btd,sdr->btsr", x, a) * oh[:, None, :, None]
    return jnp.einsum("btsr,sro->bto", h, b)


SCHEMES = {"gather": gather_update, "one-hot einsum": one_hot_update,
           "one-hot over every slot's output": all_slots_update}


def layer_inputs(n_slots: int, seq: int, rows: int = SLOTS, d: int = common.SMOLLM2["hidden_size"],
                 rank: int = common.RANK) -> tuple:
    """``(x, a, b, scale, ids)`` for one q_proj-shaped layer (d -> d) with ``n_slots`` slots, row i on slot
    ``i % n_slots``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    k = jax.random.split(jax.random.key(n_slots), 3)
    x = jax.random.normal(k[0], (rows, seq, d))
    a = jax.random.normal(k[1], (n_slots, d, rank)) / np.sqrt(d)
    b = jax.random.normal(k[2], (n_slots, rank, d)) / np.sqrt(rank)
    return x, a, b, jnp.linspace(1.0, 2.0, n_slots), jnp.arange(rows, dtype=jnp.int32) % n_slots


def _layer_schemes(seq: int, slot_counts, *, repeats: int, window: float) -> dict:
    """One q_proj-shaped low-rank update (16 rows x ``seq`` tokens, 576 -> 576, r=16) with per-row slots, the three
    :data:`SCHEMES`, timed interleaved (each sample about ``window`` seconds of calls), with XLA's FLOPs."""
    import jax
    import jax.numpy as jnp

    from bench import steps

    out = {}
    for n_slots in slot_counts:
        args = layer_inputs(n_slots, seq)
        fns = SCHEMES
        compiled = {name: jax.jit(f).lower(*args).compile() for name, f in fns.items()}
        want = compiled["gather"](*args)
        errs = {name: float(jnp.max(jnp.abs(c(*args) - want))) for name, c in compiled.items()}

        inner = {}
        for name, c in compiled.items():    # calls per sample: about ``window`` seconds each (calls take ~1 ms)
            t0 = time.perf_counter()
            jax.block_until_ready(c(*args))
            inner[name] = max(1, min(500, round(window / max(time.perf_counter() - t0, 1e-5))))

        def loop(c, k):
            def run():
                for _ in range(k):
                    y = c(*args)
                return jax.block_until_ready(y)
            return run

        samples = common.interleaved({name: loop(c, inner[name]) for name, c in compiled.items()}, repeats=repeats)
        per_call = {name: s.scaled(1.0 / inner[name]) for name, s in samples.items()}
        out[n_slots] = {name: {"ms": 1e3 * statistics.median(per_call[name].wall), "calls_per_sample": inner[name],
                               "flops": steps._flops(compiled[name]), "max |diff| vs gather": errs[name],
                               "vs gather": common.paired_ratio(per_call, name, "gather")}
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
    swap = _swap(params, bank, bank_fwd, rows, ids, bank_gen, bank_state, cfgs, ads, swaps=3 if quick else 5)
    del bank_state, bank_gen
    gc.collect()
    sizes = _bank_bytes(params)
    big = sizes.pop("bank")
    swap["put_64_slots_s"] = [round(t, 4) for t in _swap_big(big, cfgs, ads, swaps=3)]
    swap["put_64_slots_median_s"] = statistics.median(swap["put_64_slots_s"])
    del big, model, params, bank, served, ads
    gc.collect()
    t = done("swap and bytes", t)
    flops = _flops(seq, n_layers, grid_slots, grid_ranks)
    _small_model.cache_clear()
    t = done("flops", t)
    schemes = _layer_schemes(seq, (16,) if quick else (16, 64), repeats=max(3, repeats),
                             window=0.02 if quick else 0.1)
    done("layer schemes", t)

    fwd = {name: s.summary() for name, s in fwd_samples.items()}
    gen = {name: s.summary() for name, s in gen_samples.items()}
    pairs = {"bank / one adapter, forward": (fwd_samples, BANK, ONE),
             "bank / one adapter, generation": (gen_samples, BANK, ONE),
             "one at a time / bank, forward": (fwd_samples, SERIAL, BANK),
             "one at a time / bank, generation": (gen_samples, SERIAL, BANK),
             "merge in turn / bank, forward": (fwd_samples, MERGE, BANK)}
    ratios = {k: common.paired_ratio(*v) for k, v in pairs.items()}
    cpu_ratios = {k: common.paired_ratio(*v, field="cpu") for k, v in pairs.items()}
    results = {"setup": {"layers": n_layers, "slots": SLOTS, "rank": common.RANK, "targets": list(common.QV),
                         "alphas": [c.alpha for c in cfgs], "forward_tokens": [SLOTS, seq],
                         "prompt_tokens": [SLOTS, prompt], "new_tokens": new, "forward_repeats": repeats,
                         "generation_repeats": gen_repeats, "quick": quick},
               "forward": fwd, "generation": gen, "ratios": ratios, "cpu_ratios": cpu_ratios,
               "checks": {**fwd_checks, **gen_checks},
               "swap": swap, "bytes": sizes, "flops": flops, "layer_schemes": schemes,
               "section_s": time.perf_counter() - t_start, "phases_s": phases}
    return {"results": results, "markdown": _markdown(results)}


def _ms(x: float) -> str:
    return f"{x * 1e3:.0f}" if x >= 0.1 else f"{x * 1e3:.1f}"


def _markdown(res: dict) -> str:
    s, r, fwd, gen = res["setup"], res["ratios"], res["forward"], res["generation"]
    ck, sw, by, fl = res["checks"], res["swap"], res["bytes"], res["flops"]
    tokens, prompt = s["forward_tokens"], s["prompt_tokens"]

    def met(value, limit, at_least=False):
        return "yes" if (value >= limit if at_least else value <= limit) else "**no**"

    rows = []
    for name in (BANK, ONE, SERIAL, MERGE):
        g = gen.get(name)
        rows.append([name, _ms(fwd[name]["wall_median_s"]),
                     f"{fwd[name]['wall_median_s'] / fwd[BANK]['wall_median_s']:.2f}",
                     "-" if g is None else f"{g['wall_median_s']:.2f}",
                     "-" if g is None else f"{g['wall_median_s'] / gen[BANK]['wall_median_s']:.2f}"])
    targets = [("bank / one adapter, forward", 1.15, False), ("bank / one adapter, generation", 1.15, False),
               ("one at a time / bank, forward", 5.0, True), ("one at a time / bank, generation", 5.0, True),
               ("merge in turn / bank, forward", None, True)]
    cpu = res["cpu_ratios"]
    trows = [[name, f"{r[name]:.3f}", f"{cpu[name]:.3f}", "-" if lim is None else f"{'>=' if up else '<='} {lim:g}",
              "-" if lim is None else met(r[name], lim, up)] for name, lim, up in targets]
    f_serial, g_serial = r["one at a time / bank, forward"], r["one at a time / bank, generation"]
    md = [f"{s['slots']} adapters (r={s['rank']} on q,v, alphas {s['alphas'][0]:g}..{s['alphas'][-1]:g}), one per "
          f"row of a {s['slots']}-row batch, {s['layers']} layers; forward {tokens[0]} x {tokens[1]} tokens (fp32 "
          f"logits, median of {s['forward_repeats']}), greedy generation of {s['new_tokens']} tokens after "
          f"{prompt[0]} x {prompt[1]}-token prompts (one jitted call, prefill included, median of "
          f"{s['generation_repeats']}). Contenders alternate round by round; ratios are medians of per-round "
          f"ratios. \"one at a time\" serves each adapter on its own row through one compiled function (batch 1); "
          f"\"merge in turn\" merges each adapter's q,v kernels with a jitted `jlora.merge` and runs a plain "
          f"forward of its row.", "",
          common.md_table(["contender", "forward ms", "x bank", "generation s", "x bank"], rows), "",
          common.md_table(["ratio", "wall time", "CPU time", "target", "met (wall)"], trows), "",
          "Both ratios are medians of per-round ratios; on a shared machine the process CPU time is the steadier "
          "one (other processes stretch the wall time of whichever contender they overlap).", "",
          f"The contenders compute the same thing: max |logit| difference between a bank row and its adapter alone "
          f"{ck['max |bank - alone| logit']:.1e}, merged {ck['max |bank - merged| logit']:.1e}; "
          f"{ck['rows whose tokens equal their adapter served alone']} generated rows equal to their adapter's "
          f"alone. One merge of the q,v kernels takes {_ms(ck['merge_median_s'])} ms (a jitted merge of the whole "
          f"params, which copies every leaf: {_ms(ck['whole_params_merge_median_s'])} ms).", ""]
    if min(f_serial, g_serial) < 5:
        md += [f"Serving one at a time takes {f_serial:.2f}x the bank's time for the forward and {g_serial:.2f}x "
               f"for generation (CPU time: {cpu['one at a time / bank, forward']:.2f}x and "
               f"{cpu['one at a time / bank, generation']:.2f}x). A {tokens[1]}-token forward is compute-bound on "
               f"this CPU: 16 batch-1 forwards do the same matmul FLOPs as one 16-row forward, so batching has "
               f"little to save"
               + (" (here the 16 batch-1 calls were even a little cheaper)" if f_serial < 1 else "")
               + f", and merging in turn costs about the same too. Batching pays in decoding: one adapter alone takes "
               f"{gen[SERIAL]['wall_median_s'] / s['slots']:.2f} s for its {s['new_tokens']} tokens, all 16 in one "
               f"batch {gen[BANK]['wall_median_s']:.2f} s. A 16-row decoding step does 16 times the matmul FLOPs of a "
               f"1-row step, and on this CPU that work is no longer hidden behind reading the weights, which "
               f"holds the gain well under 16x (where a step is bound by reading the weights, as on accelerators, "
               f"it is larger; not measured here).", ""]
    kernels = 2 * by["layers"]
    md += [f"Swap: `jax.block_until_ready(jlora.bank.put(...))` of one adapter into a slot takes "
           f"{_ms(sw['put_median_s'])} ms (median of {len(sw['put_s'])}) in the {s['slots']}-slot bank and "
           f"{_ms(sw['put_64_slots_median_s'])} ms in a {by['slots']}-slot bank (eager updates of the "
           f"{kernels} covered kernels' slot arrays). Jit cache sizes (forward, generate) before the swaps "
           f"{tuple(sw['jit cache (forward, generate) before swaps'])}, after {tuple(sw['after swaps'])}: "
           + ("**recompiled**." if sw["recompiled"] else "no recompilation."), "",
           f"Bank bytes, {by['slots']} slots at r={s['rank']} on q,v ({by['layers']} layers): "
           f"{by['bytes']:,} B ({by['bytes'] / 2**20:.1f} MiB; analytic {by['analytic']:,} B: "
           f"{by['per_slot_bytes'] / 2**20:.2f} MiB of fp32 factors per slot; "
           f"{by['bytes'] / by['model_bytes_fp32']:.3f} of the fp32 base).", ""]
    base = fl["base forward flops"]
    frows = []
    for row in fl["rows"]:
        hot = row["one-hot over outputs extra flops"]
        frows.append([row["slots"], row["rank"], f"{row['low-rank flops (one adapter, analytic)'] / 1e9:.2f}",
                      f"{row['low-rank flops (one adapter, XLA)'] / 1e9:.2f}",
                      f"{row['gather extra flops (XLA)'] / 1e9:+.3f} ({row['gather extra flops (XLA)'] / base:.2%})",
                      f"{hot / 1e9:.1f} ({hot / base:.1%})", f"{row['one-hot over factors extra flops'] / 1e9:.3f}"])
    extras = sorted({round(row["gather extra flops (XLA)"]) for row in fl["rows"]})
    by_rank = {}
    for row in fl["rows"]:
        by_rank.setdefault(row["rank"], set()).add(round(row["gather extra flops (XLA)"]))
    constant = all(len(v) == 1 for v in by_rank.values())
    md += [f"FLOPs per forward ({fl['tokens']} tokens, {fl['layers']} layers; base forward {base / 1e9:.1f} GFLOP; "
           f"XLA cost analysis on unrolled layers, from 1- and 2-layer compiles). The bank's gather adds no matmul "
           f"FLOPs over one adapter of the same rank: each row's tokens meet only their own slot's factors, "
           f"`2 * T * r * (in + out)` per adapted layer whatever the slot count. XLA's count of the difference "
           f"(\"gather extra\") is elementwise work — the per-row scale applied to each adapted layer's "
           f"(tokens, out) output and the gather itself — "
           + (f"the same for every slot count at a given rank" if constant else
              f"**not constant over slot counts** ({extras})")
           + f". The alternatives: a one-hot over every slot's output costs `2 * T * (slots - 1) * r * (in + out)` "
           f"more per adapted layer (in % of the base forward); a one-hot contracted with the factors first is a "
           f"gather written as a matmul, `2 * B * slots * r * (in + out)` more.", "",
           common.md_table(["slots", "r", "one adapter's low-rank GFLOP", "same, XLA", "bank (gather) extra GFLOP, XLA",
                            "one-hot over outputs, extra GFLOP", "one-hot over factors, extra GFLOP"], frows), ""]
    srows = []
    for n_slots, schemes in res["layer_schemes"].items():
        for name, v in schemes.items():
            srows.append([n_slots, name, f"{v['ms']:.2f}", f"{v['vs gather']:.2f}", f"{v['flops'] / 1e6:.0f}",
                          f"{v['max |diff| vs gather']:.1e}"])
    ls = res["layer_schemes"]
    counts = list(ls)
    hot, ein = "one-hot over every slot's output", "one-hot einsum"
    md += [f"Why the gather: one q_proj-shaped low-rank update ({tokens[0]} rows x {tokens[1]} tokens, 576 -> 576, "
           f"r=16), each row on its own slot, three ways (jitted; ms per call, median; \"x gather\" is the median of "
           f"per-round ratios):", "",
           common.md_table(["slots", "scheme", "ms", "x gather", "MFLOP (XLA)", "max abs diff"], srows), "",
           "Gathering each row's A and B (`jlora.bank`) does the FLOPs of a single adapter and reads "
           "`B * r * (in + out)` factor values per layer, whatever the slot count. Running every slot on every token "
           "and masking with a one-hot multiplies the low-rank work by the slot count: "
           + ", ".join(f"{ls[n][hot]['vs gather']:.1f}x the gather's time at {n} slots" for n in counts)
           + ". A single `einsum('btd,bs,sdr->btr')` with a one-hot lets jnp contract the one-hot with the factors "
           "first (its FLOPs above show it), which is the gather done as a matmul: "
           + ", ".join(f"{ls[n][ein]['vs gather']:.2f}x the gather's time at {n} slots" for n in counts)
           + "; it reads every slot's factors on every call, so its cost grows with the bank while the gather's does "
           "not. With the gather, routing is an integer array: the compiled forward, generation and train step "
           "serve any bank contents and any mix of rows."]
    return "\n".join(md)
