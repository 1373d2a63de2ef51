"""Section 4: compile time of the LoRA train step (r = 16 on q,v), 30 unrolled layers vs one ``nn.scan``.

Measured as the wall time of ``jit(step).lower(...).compile()`` (tracing + XLA compilation) for each variant; the
two are different programs, so neither hits the other's compilation cache. Random params differ between the
layouts (init draws per layout), so their first-step losses are close but not equal.
"""

from __future__ import annotations

from bench import common, steps


def run(*, layers: int | None = None) -> dict:
    hf = common.hf_config(**({} if layers is None else {"num_hidden_layers": layers}))
    ids = common.token_batch()
    out = {}
    for name, scan in (("unrolled", False), ("scan", True)):
        model, params = common.jlora_model(hf, scan_layers=scan)
        c = steps.jlora_lora(model, params, ids, common.QV)
        c.run()
        out[name] = {"compile_s": c.compile_s, "first_loss": c.loss(),
                     "generated_code_bytes": c.memory.get("generated_code_size_in_bytes")}
    out["scan / unrolled"] = out["scan"]["compile_s"] / out["unrolled"]["compile_s"]
    md = [f"LoRA train step (r=16 on q,v), {hf['num_hidden_layers']} layers, `jit(...).lower().compile()`:", "",
          common.md_table(["layers", "compile s", "first-step loss"],
                          [[n, f"{out[n]['compile_s']:.1f}", f"{out[n]['first_loss']:.4f}"]
                           for n in ("unrolled", "scan")]), "",
          f"scan / unrolled compile time: {out['scan / unrolled']:.2f}"]
    return {"results": out, "markdown": "\n".join(md)}
