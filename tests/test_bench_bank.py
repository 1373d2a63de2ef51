"""The fast parts of the bank benchmark (bench/bank.py) and of the README a partial bench run writes (bench/run.py).

The whole section takes about a minute even at one layer (it compiles 30-layer-vocabulary models and three
generation loops), so it is not run here: `python -m bench.run --sections bank --quick` runs it. These tests check
what the section's claims rest on: the three ways of computing a per-row low-rank update agree with a plain numpy
reference, and XLA's FLOPs for them match the analytic counts the section prints; and a partial run keeps every
other section of bench/README.md, and its step-time targets show the spread of their per-round ratios.
"""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import bank, run  # noqa: E402


@pytest.mark.parametrize("n_slots", [4, 16])
def test_update_schemes_equal_numpy_and_their_flops_match_the_analytic_counts(n_slots):
    import jax

    from bench import steps

    seq, d, r = 6, 64, 8
    x, a, b, scale, ids = args = bank.layer_inputs(n_slots, seq, d=d, rank=r)
    xn, an, bn, sn = (np.asarray(v, np.float64) for v in (x, a, b, scale))
    want = np.stack([sn[s] * (xn[i] @ an[s]) @ bn[s] for i, s in enumerate(np.asarray(ids))])
    flops = {}
    for name, fn in bank.SCHEMES.items():
        compiled = jax.jit(fn).lower(*args).compile()
        np.testing.assert_allclose(np.asarray(compiled(*args)), want, rtol=1e-4, atol=1e-4, err_msg=name)
        flops[name] = steps._flops(compiled)
    tokens, rows = bank.SLOTS * seq, bank.SLOTS
    lora = 2 * tokens * r * (d + d)
    # the low-rank matmuls, the per-row scale on the output, and XLA's count of one per gathered factor value
    assert flops["gather"] == pytest.approx(lora + tokens * d + rows * r * (d + d), rel=0.01)
    assert flops["one-hot over every slot's output"] - flops["gather"] == pytest.approx(
        2 * tokens * (n_slots - 1) * r * (d + d), rel=0.05)
    # jnp contracts the one-hot with the factors first: a gather done as a matmul, 2 B N r (in + out) more at most
    extra = flops["one-hot einsum"] - flops["gather"]
    assert 0 < extra <= 1.05 * 2 * rows * n_slots * r * (d + d)


def _report(sections):
    return {"started": "2030-01-01T00:00:00Z", "quick": False, "total_s": 1.0, "sections": sections,
            "environment": {"processor": "CPU", "vector_extensions": ["avx2"], "threads": 2, "jax": "x",
                            "load_average_at_start": [0.0]}}


def test_a_partial_run_keeps_every_other_readme_section(tmp_path):
    readme = os.path.join(ROOT, "bench", "README.md")
    previous = run._previous_readme(readme)
    kept = [n for n in run.SECTIONS if n != "bank" and run.TITLES[n] in previous["blocks"]]
    assert {"figures", "train", "inference"} <= set(kept)
    ratios = {"bank / one adapter, forward": 1.01, "bank / one adapter, generation": 1.02,
              "one at a time / bank, forward": 1.0, "one at a time / bank, generation": 4.0}
    text = run._readme(_report({"bank": {"markdown": "NEW BANK TABLE", "results": {"ratios": ratios}}}), previous)
    for name in kept:
        block = previous["blocks"][run.TITLES[name]]
        assert f"## {run.TITLES[name]}\n\n{block}\n" in text
    assert "NEW BANK TABLE" in text
    again = run._previous_readme_text(text)
    labels = [row[0] for row in again["targets"]]
    assert [row[0] for row in previous["targets"] if "bank" not in row[0] and "one at a time" not in row[0]] \
        == [lab for lab in labels if "bank" not in lab and "one at a time" not in lab]
    assert "16 adapters one at a time (batch 1) / bank, generation" in labels
    row = next(r for r in again["targets"] if r[0].endswith("/ bank, generation"))
    assert row[1:4] == ["4.000", ">= 5.00", "**no**"]
    # rendering the result again changes nothing (kept rows keep the run that measured them, once)
    path = tmp_path / "README.md"
    path.write_text(text)
    assert run._readme(_report({"bank": {"markdown": "NEW BANK TABLE", "results": {"ratios": ratios}}}),
                       run._previous_readme(str(path))) == text


def test_step_targets_show_the_range_of_their_per_round_ratios():
    group = {"jlora LoRA": {"wall_s": [3.0, 3.3, 2.7]}, "PEFT LoRA": {"wall_s": [3.0, 3.0, 3.0]},
             "ratios": {"jlora LoRA / PEFT LoRA (wall)": 1.0}}
    step = {"jlora LoRA": {"wall_s": [1.7, 1.8]}, "PEFT LoRA": {"wall_s": [2.0, 2.0]}, "ratio_wall": 0.875,
            "ratio_cpu": 0.875}
    table = run._targets(_report({"train": {"results": {"1": {"groups": {"q,v": group}}}},
                                  "long_context": {"results": {"step": step}}}))
    rows = {r[0]: r for r in ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:])}
    assert "rounds 0.900-1.100" in rows["jlora LoRA / PEFT LoRA step, q,v, 1 thread"][4]
    assert "rounds 0.850-0.900" in rows["jlora LoRA / PEFT LoRA step, T=2048, batch 1, q,v, 1 thread"][4]
