"""jlora benchmarks: every figure is a ratio measured side by side in one run (``python -m bench.run``).

Modules:
    common       the SmolLM2-135M shape, random models (Flax and torch), interleaved timing
    figures      deterministic figures: compiled FLOPs and memory, trainable fraction, checkpoint bytes
    train_speed  train step: jlora LoRA / jlora full / PEFT LoRA / torch full fine-tuning
    inference    forward base / unmerged / merged; generation tokens/s with the KV cache
    bank         many adapters on one base (jlora.bank): routed batch vs one adapter, one at a time, merging
    compile_time compile time of the train step with and without ``nn.scan`` over layers
    gpu          bf16 tokens/s and model FLOPs utilization on a GPU (skipped without one)
    run          runs the sections, writes ``bench/results/*.json`` and the table in ``bench/README.md``

Timings on a shared machine swing; each section alternates its contenders round by round and reports the
median of the per-round ratios, which is what the targets are about.
"""
