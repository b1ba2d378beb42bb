"""The engine with pruning disabled reproduces the model's own forward."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import TINY_ARCHS, needs_shared, tiny_model
from d2prune import D2PruneError, PruneConfig, find_blocks, prune
from d2prune.engine.sequential import capture_block_inputs, sequential_logits
from test_layer_error import direct_layer_errors

CPU = torch.device("cpu")


def _check_logits(model, ids):
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    got = torch.cat(list(sequential_logits(model, ids, CPU)))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_engine_reproduces_logits_tiny(arch, attn):
    model = tiny_model(arch)
    model.config._attn_implementation = attn
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (3, 16))
    _check_logits(model, ids)


@needs_shared
def test_engine_reproduces_logits_stories260k(stories, stories_calib):
    model, _ = stories
    _check_logits(model, stories_calib[:4])


def test_each_block_gets_its_own_mask():
    """Sliding-window and full-attention blocks receive different masks; the
    engine must hand each block its own (not block 0's)."""
    model = tiny_model("qwen2")
    ids = torch.randint(0, 128, (2, 16))
    inputs = capture_block_inputs(model, ids, CPU)
    m0 = inputs.calls[0][0].kwargs["attention_mask"]
    m1 = inputs.calls[1][0].kwargs["attention_mask"]
    assert m0 is not None and m1 is not None and not torch.equal(m0, m1)
    # stored once, not per sample: identical masks are shared objects
    assert inputs.calls[0][1].kwargs["attention_mask"] is m0
    assert inputs.hidden.shape == (2, 16, model.config.hidden_size)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_zero_sparsity_leaves_weights_identical(arch):
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune(model, PruneConfig(method="sparsegpt", sparsity=0.0, device="cpu"), torch.randint(0, 128, (2, 16)))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_arch_prunes_every_linear(arch, method):
    model = tiny_model(arch)
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 128, (4, 16))
    report = prune(model, PruneConfig(method=method, sparsity=0.5, device="cpu"), ids)
    blocks = find_blocks(model)
    n_linear = sum(1 for b in blocks.layers for m in b.modules() if hasattr(m, "weight") and m.weight is not None
                   and m.weight.dim() == 2 and type(m).__name__ in ("Linear", "Conv1D"))
    assert len(report.layers) == n_linear > 0
    want = direct_layer_errors(dense, model, ids)  # hooks on each Linear of the model's own forward
    for row in report.layers:
        assert 0.5 <= row.sparsity <= 0.51, row
        assert row.error == pytest.approx(want[row.name], rel=1e-4, abs=1e-6), (row, want[row.name])


def test_blocks_found_from_model_not_name():
    model = tiny_model("gpt2")
    blocks = find_blocks(model)
    assert blocks.prefix == "transformer.h" and len(blocks) == 3


def test_no_decoder_blocks_is_a_clear_error():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(D2PruneError, match="no repeated decoder blocks"):
        find_blocks(net)


@needs_shared
def test_block_by_block_perplexity_equals_full_model(stories):
    """Evaluation through the engine (for models that do not fit the device
    whole) gives the full model's perplexity."""
    from conftest import WIKI
    from d2prune import eval_text, eval_windows, perplexity

    windows = eval_windows(stories[1], eval_text("wikitext2", WIKI), 128)
    full = perplexity(stories[0], windows, max_windows=6, device="cpu", sequential=False)
    seq = perplexity(stories[0], windows, max_windows=6, device="cpu", sequential=True)
    assert abs(full.ppl - seq.ppl) < 1e-6 * full.ppl and seq.windows == 6
