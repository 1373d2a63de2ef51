"""jlora: LoRA fine-tuning for JAX/Flax."""
