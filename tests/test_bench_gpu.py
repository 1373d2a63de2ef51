"""bench/gpu.py's analytic model FLOPs (its MFU numerator, used where XLA cannot see inside cuDNN's attention) against
XLA's own count of a compiled LoRA step, on CPU: at 128 tokens the step uses the whole-matrix attention, which XLA
counts in full, so the two must agree up to the elementwise work and the masked half of the scores."""

import doctest
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common, gpu, steps  # noqa: E402


def test_model_flops_and_peak_doctests():
    """The FLOP count per token, and the peak per device kind (a substring match gave an H100 PCIe the SXM's peak
    and an L40S the L4's)."""
    assert doctest.testmod(gpu, raise_on_error=True).attempted == 3


@pytest.mark.slow
def test_model_flops_match_xla_count_of_a_small_llama_step():
    hf = dict(gpu.LLAMA_1B, vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
              num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    seq = 128
    model, params = common.jlora_model(hf)
    compiled = steps.jlora_lora(model, params, common.token_batch(batch=1, seq=seq, vocab=hf["vocab_size"]),
                                common.ALL_LINEAR)
    ratio = compiled.flops / (gpu.model_flops(hf, seq, common.ALL_LINEAR) * seq)
    assert 1.0 <= ratio <= 1.06, ratio
