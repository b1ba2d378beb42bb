"""Streaming through transformers' own loading rules (issue 18 item 3).

Tiny random models of each MoE family (and GPT-NeoX, whose ``embed_out`` is
the model's ``lm_head``; Llama as a control), 2 blocks, hidden 64, saved with
``save_pretrained`` - which writes the checkpoint layout real ones have (one
tensor per expert and projection, Mixtral's ``block_sparse_moe``): the
streamed reader builds every parameter of block ``i`` from block ``i``'s
tensors alone, bit for bit as ``from_pretrained``; a streamed prune saves the
tensors of the in-memory prune, under the input checkpoint's own names and
shapes; a checkpoint missing an expert's tensor, or holding one of the wrong
shape, is refused in one line naming it, before any block is pruned."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import C4
import moe_models
from d2prune.cli import main
from d2prune.errors import D2PruneError

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
              max_position_embeddings=64)


def _config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(intermediate_size=96, **COMMON)
    if arch in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"):  # the MoE tests' tiny configs
        return moe_models.config(arch)
    if arch == "deepseek_v3":  # block 0 dense, block 1 MoE with a shared expert
        return tf.DeepseekV3Config(moe_intermediate_size=32, intermediate_size=64, n_routed_experts=4,
                                   num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                                   topk_group=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                                   qk_nope_head_dim=8, v_head_dim=16, rope_scaling=None, **COMMON)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                                vocab_size=128, max_position_embeddings=64, eos_token_id=1, bos_token_id=0)
    raise ValueError(arch)


ARCHS = ["llama", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3", "gpt_neox"]
_FOLDERS: dict[tuple[str, str], Path] = {}


def _save_tokenizer(folder: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(folder)


def _checkpoint(tmp_path_factory, arch: str, dtype: torch.dtype = torch.float32) -> Path:
    """A ``save_pretrained`` folder of a tiny random ``arch`` (and a tokenizer).
    Every tensor its init leaves constant (zero biases, unit norms, DeepSeek-V3's
    router bias buffer) is perturbed, so reading it wrongly shows."""
    key = (arch, str(dtype))
    if key not in _FOLDERS:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(arch)).eval()
        with torch.no_grad():
            for t in model.state_dict(keep_vars=True).values():
                if t.is_floating_point() and t.numel() > 1 and bool((t == t.flatten()[0]).all()):
                    t.add_(torch.randn_like(t) * 0.02)
        folder = tmp_path_factory.mktemp(f"{arch}-{key[1].removeprefix('torch.')}")
        model.to(dtype).save_pretrained(folder)
        _save_tokenizer(folder, model.config.vocab_size)
        _FOLDERS[key] = folder
    return _FOLDERS[key]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _block_of(checkpoint_name: str) -> int | None:
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", checkpoint_name)
    return int(m.group(1)) if m else None


def _streamed_equals_from_pretrained(folder: Path, dtype: torch.dtype | None = None) -> None:
    """Every block parameter (and persistent buffer) the streamed reader
    materialises, and everything outside the blocks, equals ``from_pretrained``'s
    bit for bit; opening block ``i`` reads block ``i``'s checkpoint tensors only."""
    from transformers import AutoModelForCausalLM

    from d2prune.io.modeling import find_blocks
    from d2prune.io.streaming import StreamedBlocks, load_streamed

    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto")
    want = ref.state_dict()
    model, _, reader = load_streamed(str(folder), dtype)
    blocks = find_blocks(model)
    source = StreamedBlocks(blocks, reader)
    asked: list[str] = []
    real = reader.get_many
    reader.get_many = lambda names: asked.extend(names) or real(names)
    cpu = torch.device("cpu")
    for i in range(len(blocks)):
        asked.clear()
        with source.open(i, cpu) as block:
            got = {f"{blocks.prefix}.{i}.{n}": t for n, t in block.state_dict().items()}
            assert set(got) == {n for n in want if n.startswith(f"{blocks.prefix}.{i}.")}
            for n, t in got.items():
                assert t.dtype == want[n].dtype and torch.equal(t, want[n]), n
        assert asked and {_block_of(n) for n in asked} == {i}, f"block {i} read {sorted(set(asked))[:3]}"
        assert all(p.is_meta for p in block.parameters())  # released again
    with source.outside(model, cpu):
        rest = {n: t for n, t in model.state_dict().items() if not n.startswith(blocks.prefix + ".")}
        assert rest and set(rest) == {n for n in want if not n.startswith(blocks.prefix + ".")}
        for n, t in rest.items():
            assert t.dtype == want[n].dtype and torch.equal(t, want[n]), n


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_parameters_equal_from_pretrained(tmp_path_factory, arch):
    folder = _checkpoint(tmp_path_factory, arch)
    if arch in ("mixtral", "qwen3_moe", "deepseek_v3"):  # the checkpoint has what real ones have: a tensor per expert
        names = set(_tensors(folder))
        assert any(re.search(r"\.experts\.3\.(w1|gate_proj)\.weight$", n) for n in names)
        assert not any(n.endswith("experts.gate_up_proj") for n in names)
    _streamed_equals_from_pretrained(folder)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_streamed_parameters_equal_from_pretrained_in_bfloat16(tmp_path_factory, arch):
    """A bf16 checkpoint read in bf16 (DeepSeek-V3's router bias buffer stays fp32, as transformers keeps it)."""
    _streamed_equals_from_pretrained(_checkpoint(tmp_path_factory, arch, torch.bfloat16), torch.bfloat16)


def _prune(folder: Path, out: Path, stream: str, *method: str) -> None:
    method = method or ("--method", "sparsegpt", "--sparsity", "0.5")
    assert main(["-q", "prune", "--model", str(folder), *method,
                 "--stream", stream, "--calib-file", str(C4), "--nsamples", "2", "--seqlen", "16", "--no-eval",
                 "--seed", "0", "--out", str(out)]) == 0


@pytest.mark.skipif(not C4.is_file(), reason="../shared/data/c4 is not available")
@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_prune_equals_in_memory_in_the_checkpoints_layout(tmp_path_factory, tmp_path, arch):
    """Every tensor of the two outputs equal (experts included, pruned or not);
    the streamed output has the input's tensor names, shapes and dtypes, loads
    with ``from_pretrained`` and, streamed again, reads the same."""
    from transformers import AutoModelForCausalLM

    folder = _checkpoint(tmp_path_factory, arch)
    _prune(folder, tmp_path / "mem", "off")
    _prune(folder, tmp_path / "st", "on")
    assert json.loads((tmp_path / "st" / "d2prune.json").read_text())["memory"]["streamed"]
    mem, st, given = _tensors(tmp_path / "mem"), _tensors(tmp_path / "st"), _tensors(folder)
    assert st.keys() == mem.keys()
    for k in mem:
        assert st[k].dtype == mem[k].dtype and torch.equal(st[k], mem[k]), k
    layout = lambda tensors: {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}  # noqa: E731
    assert layout(st) == layout(given)
    assert any(not torch.equal(st[k], given[k]) for k in given if _block_of(k) is not None)  # something was pruned
    index = json.loads((tmp_path / "st" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(st)
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "st", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _streamed_equals_from_pretrained(tmp_path / "st")


@pytest.mark.skipif(not C4.is_file(), reason="../shared/data/c4 is not available")
@pytest.mark.parametrize("method", [("wanda", "2:4"), ("magnitude", "0.5"), ("ria", "2:4"), ("d2prune", "2:4")])
def test_every_method_streams_mixtrals_experts_like_in_memory(tmp_path_factory, tmp_path, method):
    """Mixtral's per-expert checkpoint tensors (w1/w2/w3), streamed: the output equals the in-memory one and
    every expert matrix is at the target (the other architectures: SparseGPT, above)."""
    folder = _checkpoint(tmp_path_factory, "mixtral")
    flags = ("--method", method[0], "--sparsity", method[1])
    _prune(folder, tmp_path / "mem", "off", *flags)
    _prune(folder, tmp_path / "st", "on", *flags)
    mem, st = _tensors(tmp_path / "mem"), _tensors(tmp_path / "st")
    assert st.keys() == mem.keys() and all(torch.equal(st[k], mem[k]) for k in mem)
    experts = {k: t for k, t in st.items() if re.search(r"\.experts\.\d+\.w[123]\.weight$", k)}
    assert len(experts) == 2 * 4 * 3  # 2 blocks x 4 experts x 3 matrices
    for k, w in experts.items():
        zero = (w == 0).reshape(w.shape[0], -1, 4) if method[1] == "2:4" else (w == 0)
        assert bool((zero.sum(-1) >= 2).all()) if method[1] == "2:4" else 0.5 <= float(zero.float().mean()) <= 0.51, k


# --------------------------------------------------------------------------- bad checkpoints
def _broken(tmp_path_factory, tmp_path: Path, change) -> Path:
    """The Mixtral checkpoint with ``change(tensors)`` applied."""
    src = _checkpoint(tmp_path_factory, "mixtral")
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


EXPERTS = "model.layers.{}.block_sparse_moe.experts.{}.{}.weight"


def _drop(*names):
    return lambda t: [t.pop(n) for n in names]


@pytest.mark.parametrize("change, message", [
    (_drop(EXPERTS.format(1, 2, "w1")),
     f"tensor {EXPERTS.format(1, 2, 'w1')} is missing from the checkpoint (model.layers.1.mlp.experts.gate_up_proj"),
    (_drop(EXPERTS.format(0, 1, "w2")),
     f"tensor {EXPERTS.format(0, 1, 'w2')} is missing from the checkpoint (model.layers.0.mlp.experts.down_proj"),
    (lambda t: t.update({EXPERTS.format(0, 1, "w3"): t[EXPERTS.format(0, 1, "w3")][:31]}),
     f"tensor {EXPERTS.format(0, 1, 'w3')} has shape [31, 64] where the other 3 tensors"),
    (_drop(*(EXPERTS.format(1, 3, w) for w in ("w1", "w2", "w3"))),  # the last expert, entirely
     "make model.layers.1.mlp.experts.gate_up_proj of shape [3, 64, 64]; MixtralForCausalLM wants [4, 64, 64]"),
    (_drop(*(EXPERTS.format(1, e, "w1") for e in range(4)), *(EXPERTS.format(1, e, "w3") for e in range(4))),
     "the checkpoint has no tensor for model.layers.1.mlp.experts.gate_up_proj of MixtralForCausalLM (read from "
     "model.layers.1.block_sparse_moe.experts.*.w1.weight)"),
    (lambda t: t.update({"model.layers.0.block_sparse_moe.gate.weight": torch.zeros(5, 64)}),
     "tensor model.layers.0.block_sparse_moe.gate.weight has shape [5, 64]; MixtralForCausalLM wants "
     "model.layers.0.mlp.gate.weight of shape [4, 64]"),
], ids=["expert-w1", "expert-w2", "wrong-shape", "last-expert", "layer-experts", "router"])
def test_bad_expert_tensors_are_named_before_anything_is_read(tmp_path_factory, tmp_path, change, message):
    from d2prune.io import streaming

    folder = _broken(tmp_path_factory, tmp_path, change)
    read = []
    real = streaming.read_safetensors
    streaming.read_safetensors = lambda *a: read.append(a) or real(*a)
    try:
        with pytest.raises(D2PruneError) as e:
            streaming.load_streamed(str(folder))
    finally:
        streaming.read_safetensors = real
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not read, "tensors were read before the checkpoint was checked"


def test_bad_expert_tensor_is_one_line_on_the_command_line(tmp_path_factory, tmp_path, capsys):
    folder = _broken(tmp_path_factory, tmp_path, _drop(EXPERTS.format(1, 2, "w1")))
    rc = main(["prune", "--model", str(folder), "--method", "sparsegpt", "--stream", "on", "--calib-file", str(C4),
               "--nsamples", "2", "--seqlen", "16", "--no-eval", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("d2prune: error: ")
    assert EXPERTS.format(1, 2, "w1") in err and not (tmp_path / "out").exists()


@pytest.mark.skipif(not C4.is_file(), reason="../shared/data/c4 is not available")
def test_streamed_resume_reads_finished_blocks_in_the_models_layout(tmp_path_factory, tmp_path, monkeypatch):
    """A streamed Mixtral run killed after block 0 resumes to the tensors of an
    uninterrupted run, in the checkpoint's layout; a finished block is read
    back from its work shard (the model's fused layout: its experts altered
    here, as pruning them would), not converted again from the input."""
    from conftest import Crash, crash_after_block

    from d2prune.io.modeling import find_blocks
    from d2prune.io.streaming import StreamedBlocks, load_streamed

    folder = _checkpoint(tmp_path_factory, "mixtral")
    _prune(folder, tmp_path / "whole", "on")
    crash_after_block(monkeypatch, 0)
    with pytest.raises(Crash):
        _prune(folder, tmp_path / "out", "on")
    monkeypatch.undo()
    path = tmp_path / ".out.work" / "block-00000.safetensors"
    shard = load_file(str(path))
    assert "model.layers.0.mlp.experts.gate_up_proj" in shard  # work shards hold the model's parameters

    model, _, reader = load_streamed(str(folder))
    source = StreamedBlocks(find_blocks(model), reader)
    altered = tmp_path / "altered.safetensors"
    save_file({k: (v * 2 if "experts" in k else v) for k, v in shard.items()}, str(altered))
    source.restore(0, altered)
    with source.open(0, torch.device("cpu")) as block:
        got = {f"model.layers.0.{n}": p for n, p in block.named_parameters()}
        assert got.keys() == shard.keys()
        assert all(torch.equal(got[k], shard[k] * 2 if "experts" in k else shard[k]) for k in shard)

    _prune(folder, tmp_path / "out", "on")
    assert json.loads((tmp_path / "out" / "d2prune.json").read_text())["memory"]["resumed_from_block"] == 1
    whole, out = _tensors(tmp_path / "whole"), _tensors(tmp_path / "out")
    assert whole.keys() == out.keys() == _tensors(folder).keys()
    assert all(torch.equal(whole[k], out[k]) for k in whole)


@pytest.mark.skipif(not C4.is_file(), reason="../shared/data/c4 is not available")
def test_compressed_moe_output_loads_like_the_dense_one(tmp_path_factory, tmp_path):
    """A streamed DeepSeek-V3 prune saved compressed (in the checkpoint's layout: a
    matrix per expert) loads with ``d2prune.deploy.compress.from_pretrained``
    into the in-memory prune's model, router bias buffer included, and streams again."""
    from transformers import AutoModelForCausalLM

    from d2prune.deploy.compress import from_pretrained

    folder = _checkpoint(tmp_path_factory, "deepseek_v3")
    _prune(folder, tmp_path / "mem", "off")
    assert main(["-q", "prune", "--model", str(folder), "--method", "sparsegpt", "--sparsity", "0.5", "--stream", "on",
                 "--calib-file", str(C4), "--nsamples", "2", "--seqlen", "16", "--no-eval", "--seed", "0",
                 "--save-format", "compressed", "--out", str(tmp_path / "c")]) == 0
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "mem").state_dict()
    got = from_pretrained(tmp_path / "c").state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    from d2prune.io.modeling import find_blocks
    from d2prune.io.streaming import StreamedBlocks, load_streamed

    model, _, reader = load_streamed(str(tmp_path / "c"))
    with StreamedBlocks(find_blocks(model), reader).open(1, torch.device("cpu")) as block:
        for n, t in block.state_dict().items():
            assert torch.equal(t, want[f"model.layers.1.{n}"]), n
