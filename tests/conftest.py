"""Shared fixtures: the real data and models of ../shared (skipped with a
reason when absent, so a user's clone still passes) and tiny models of each
architecture built from a config (no download)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
C4 = SHARED / "data" / "c4" / "c4-train.00000-of-01024.first1000.jsonl"
WIKI = SHARED / "data" / "wikitext-2-raw" / "test.jsonl"
WIKI_RAW = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"

needs_shared = pytest.mark.skipif(not STORIES.is_dir(), reason="../shared (real models and data) is not beside this checkout")

logging.getLogger("d2prune").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def stories():
    """(model, tokenizer) of the real stories260K; tests must deep-copy before pruning."""
    if not STORIES.is_dir():
        pytest.skip("../shared/models/stories260K is not available")
    from d2prune import load_model

    model, tok, _ = load_model(str(STORIES), dtype="float32")
    return model, tok


@pytest.fixture(scope="session")
def c4_docs():
    if not C4.is_file():
        pytest.skip("../shared/data/c4 is not available")
    from d2prune import read_texts

    return read_texts(C4)


@pytest.fixture(scope="session")
def stories_calib(stories, c4_docs):
    """16 x 128 C4 calibration tokens for stories260K (seed 0)."""
    from d2prune import sample_calibration

    return sample_calibration(stories[1], c4_docs, nsamples=16, seqlen=128, seed=0)


def tiny_config(arch: str):
    """A tiny randomly initialised config of each architecture family."""
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=64)
    if arch == "opt":
        return tf.OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                            max_position_embeddings=64, word_embed_proj_dim=32, do_layer_norm_before=True)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=64, n_inner=64)
    if arch == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, **common)
    if arch == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, sliding_window=8, **common)
    if arch == "qwen2":  # mixed sliding/full attention layers: blocks get different masks
        return tf.Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"], **common)
    if arch == "qwen3":
        return tf.Qwen3Config(num_key_value_heads=2, head_dim=8, **common)
    if arch == "phi3":
        return tf.Phi3Config(num_key_value_heads=2, pad_token_id=0, **common)
    if arch == "gemma2":
        return tf.Gemma2Config(num_key_value_heads=2, head_dim=8, sliding_window=4, attn_logit_softcapping=None, **common)
    raise ValueError(arch)


TINY_ARCHS = ["opt", "gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2"]


def tiny_model(arch: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    cfg._attn_implementation = "eager"  # masks are real tensors: exercises per-block masks
    model = tf.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def forward_calls(model, modules: dict, ids) -> dict:
    """``{name: [(inputs, output), ...]}``: what each of ``modules`` receives and
    returns in the model's own forward (not the engine's), one sample of ``ids`` at a time."""
    calls: dict = {n: [] for n in modules}

    def keep(name):
        def hook(module, inp, out):  # returns None: the output is left alone
            calls[name].append((inp, out))
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for j in range(ids.shape[0]):
                model(ids[j:j + 1], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return calls


class Crash(Exception):
    """Raised by :func:`crash_after_block`: a run that dies half way."""


def crash_after_block(monkeypatch, block: int, error: type[BaseException] = Crash) -> None:
    """Every following prune raises ``error`` right after block ``block``
    (0-based) is committed to its work folder (``monkeypatch.undo()`` ends it)."""
    import d2prune.io.resume as resume

    real = resume.WorkFolder.commit

    def commit(self, next_block, *a, **k):
        real(self, next_block, *a, **k)
        if next_block == block + 1:
            raise error()

    monkeypatch.setattr(resume.WorkFolder, "commit", commit)
