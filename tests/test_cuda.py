"""CUDA paths (skipped without a GPU; CI has none): the engine on an
accelerator with the model in CPU memory, fp16 blocks, fp32 statistics."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from d2prune import PruneConfig, find_blocks, find_prunable, prune
from d2prune.engine.sequential import sequential_logits
from d2prune.io.modeling import weight_matrix

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")


def test_engine_on_cuda_matches_cpu_forward():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    got = torch.cat(sequential_logits(model, ids, CUDA)).cpu()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert next(model.parameters()).device.type == "cpu"  # blocks went back home


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "d2prune:frozen=k"])
def test_fp16_prune_on_cuda(method):
    from d2prune.config import parse_method_spec

    model = tiny_model("qwen2").half()
    prune(model, PruneConfig(method=parse_method_spec(method), sparsity="2:4", device="cuda"), torch.randint(0, 128, (4, 16)))
    for b in find_blocks(model).layers:
        for n, lin in find_prunable(b).items():
            W = weight_matrix(lin)
            assert W.dtype == torch.float16 and W.device.type == "cpu"
            assert torch.all((W == 0).reshape(W.shape[0], -1, 4).sum(-1) >= 2), n
