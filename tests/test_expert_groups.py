"""A MoE block's experts read, pruned and written in groups (docs/moe.md §4).

A streamed prune with ``--expert-group G`` never holds more than G experts'
rows of a block's fused expert parameters, and its output - every tensor, and
every report row (sparsity, error, routed tokens, where the statistics came
from) - equals the in-memory prune of the whole block, bit for bit: the groups
see the same calibration inputs and their outputs are summed in the same
order. Tiny random models of each MoE family (tests/moe_models.py configs,
saved in the checkpoint layout real ones have)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import C4, WIKI, Crash, crash_after_block
from d2prune.cli import main
from d2prune.errors import D2PruneError
from test_stream_mapping import _checkpoint, _tensors

pytestmark = pytest.mark.skipif(not C4.is_file(), reason="../shared/data/c4 is not available")


def _prune(folder: Path, out: Path, stream: str, *extra: str, method=("--method", "sparsegpt", "--sparsity", "0.5"),
           evaluate: bool = False) -> dict:
    assert main(["-q", "prune", "--model", str(folder), *method, "--stream", stream, "--calib-file", str(C4),
                 "--nsamples", "2", "--seqlen", "16", *([] if evaluate else ["--no-eval"]), "--seed", "0",
                 "--out", str(out), *extra]) == 0
    return json.loads((out / "d2prune.json").read_text())


def _same_outputs(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    ra, rb = (json.loads((f / "d2prune.json").read_text())["layers"] for f in (a, b))
    assert [r["name"] for r in ra] == [r["name"] for r in rb]
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if k != "seconds"} == {k: v for k, v in y.items() if k != "seconds"}, x["name"]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3"])
def test_experts_in_groups_equal_the_whole_block(tmp_path_factory, tmp_path, arch, monkeypatch):
    """SparseGPT 0.5, groups of 3 of the 4 experts (the last group shorter): the
    grouped path ran (its propagation too), read no expert parameter whole,
    and its output equals the in-memory prune's."""
    import d2prune.engine.expert_groups as groups
    import d2prune.io.streaming as streaming

    folder = _checkpoint(tmp_path_factory, arch)
    _prune(folder, tmp_path / "mem", "off", "--moe-min-tokens", "0")  # routed statistics
    seen: list[tuple[str, int]] = []
    real_rows = streaming.CheckpointReader.param_rows
    monkeypatch.setattr(streaming.CheckpointReader, "param_rows",
                        lambda self, name, e0, e1: seen.append((name, e1 - e0)) or real_rows(self, name, e0, e1))
    whole: list[str] = []
    real_params = streaming.CheckpointReader.params
    monkeypatch.setattr(streaming.CheckpointReader, "params",
                        lambda self, names: whole.extend(names) or real_params(self, names))
    propagated: list[int] = []
    real_prop = groups.propagate_in_groups
    monkeypatch.setattr(groups, "propagate_in_groups", lambda *a, **k: propagated.append(a[1]) or real_prop(*a, **k))
    record = _prune(folder, tmp_path / "st", "on", "--expert-group", "3", "--moe-min-tokens", "0")
    monkeypatch.undo()
    moe_blocks = [1] if arch == "deepseek_v3" else [0, 1]
    assert propagated == moe_blocks
    assert seen and {n for n, _ in seen} and max(g for _, g in seen) == 3 and min(g for _, g in seen) == 1
    fused = {n for n, _ in seen}
    assert not fused & set(whole)  # never read whole, neither from the checkpoint nor from the work folder
    assert record["memory"]["streamed"]
    _same_outputs(tmp_path / "mem", tmp_path / "st")


def test_groups_with_every_statistics_option(tmp_path_factory, tmp_path):
    """Wanda 2:4 under each way of choosing an expert's statistics - the
    few-token fallback (2 x 16 tokens give every expert fewer than 64),
    ``weighted``, ``all`` - and ``--fast``: grouped == whole, rows included."""
    folder = _checkpoint(tmp_path_factory, "qwen3_moe")
    wanda = ("--method", "wanda", "--sparsity", "2:4")
    cases = [((), r"all tokens \(routed (\d+ < 64|none)\)"), (("--moe-min-tokens", "0", "--moe-calibration", "weighted"),
             r"routed, gate-weighted|all tokens \(routed none\)"), (("--moe-calibration", "all"), r"all tokens"),
             (("--moe-min-tokens", "0", "--fast"), r"routed|all tokens \(routed none\)")]
    for k, (extra, label) in enumerate(cases):
        _prune(folder, tmp_path / f"mem{k}", "on", *extra, method=wanda)
        rec = _prune(folder, tmp_path / f"st{k}", "on", "--expert-group", "2", *extra, method=wanda)
        _same_outputs(tmp_path / f"mem{k}", tmp_path / f"st{k}")
        experts = [r for r in rec["layers"] if ".experts." in r["name"]]
        assert len(experts) == 2 * 4 * 3 and all(re.fullmatch(label, r["statistics"]) for r in experts), extra
        assert sum(r["tokens"] for r in experts) == 3 * 2 * 2 * 16 * 2  # 3 projections x 2 blocks x 32 tokens x top-2


def test_grouped_evaluation_matches_the_whole_block(tmp_path_factory, tmp_path, monkeypatch):
    """The pruned model's perplexity, evaluated block by block with the experts
    in groups, equals the one of the in-memory model (up to float rounding:
    the in-memory forward is the model's own)."""
    folder = _checkpoint(tmp_path_factory, "mixtral")
    flags = ("--eval-windows", "2", "--eval-file", str(WIKI))
    mem = _prune(folder, tmp_path / "mem", "off", *flags, evaluate=True)
    import d2prune.engine.expert_groups as groups
    import d2prune.engine.sequential as sequential

    propagated: list[int] = []
    real = sequential.propagate_in_groups
    spy = lambda *a, **k: propagated.append(a[1]) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(groups, "propagate_in_groups", spy)  # the prune's
    monkeypatch.setattr(sequential, "propagate_in_groups", spy)  # every other propagation's (the evaluation)
    st = _prune(folder, tmp_path / "st", "on", "--expert-group", "3", *flags, evaluate=True)
    assert propagated == [0, 1, 0, 1]  # the prune's propagation, then the evaluation's
    a, b = mem["evaluation"]["wikitext2"]["ppl"], st["evaluation"]["wikitext2"]["ppl"]
    assert a == pytest.approx(b, rel=1e-5)


def test_a_grouped_run_resumes_bit_identically(tmp_path_factory, tmp_path, monkeypatch):
    """Killed after block 0 (its experts grouped) is committed: the rerun reads
    block 0's pruned experts back from the work folder a group at a time to
    propagate them, and the output equals the uninterrupted run's."""
    folder = _checkpoint(tmp_path_factory, "mixtral")
    _prune(folder, tmp_path / "whole", "on", "--expert-group", "3")
    crash_after_block(monkeypatch, 0)
    with pytest.raises(Crash):
        _prune(folder, tmp_path / "out", "on", "--expert-group", "3")
    monkeypatch.undo()
    record = _prune(folder, tmp_path / "out", "on", "--expert-group", "3")
    assert record["memory"]["resumed_from_block"] == 1
    _same_outputs(tmp_path / "whole", tmp_path / "out")


def test_auto_reads_experts_in_groups_only_when_a_block_does_not_fit(tmp_path_factory, tmp_path, monkeypatch):
    """``--expert-group auto`` (the default): whole blocks when the estimate
    fits; with one byte less of RAM than the whole-block estimate, the largest
    group that fits - and the output is still the whole-block one."""
    import d2prune.pipeline as pipeline

    folder = _checkpoint(tmp_path_factory, "qwen2_moe")
    budgets = []
    real = pipeline.check_fits
    monkeypatch.setattr(pipeline, "check_fits", lambda budget, *a, **k: budgets.append(budget) or real(budget, *a, **k))
    whole = _prune(folder, tmp_path / "whole", "on", "--moe-min-tokens", "0")
    assert whole["memory"]["expert_group"] is None
    ram = max(budgets[0].host_ram, budgets[0].block) - 1
    monkeypatch.setattr(pipeline, "available_ram", lambda: ram)
    grouped = _prune(folder, tmp_path / "grouped", "on", "--moe-min-tokens", "0")
    assert grouped["memory"]["expert_group"] == 3  # the largest group under 4 experts
    assert budgets[-1].host_ram <= ram
    _same_outputs(tmp_path / "whole", tmp_path / "grouped")


@pytest.mark.parametrize("flags,message", [
    (("--stream", "off", "--expert-group", "2"), "--expert-group 2 reads a block's experts from disk"),
    (("--stream", "on", "--expert-group", "2", "--allocation", "owl", "--sparsity", "0.6"),
     "--allocation owl scores every block whole"),
    (("--stream", "on", "--expert-group", "2", "--method", "d2prune"), "give --frozen q, k, v or none"),
    (("--stream", "on", "--expert-group", "0"), "a number of experts"),
])
def test_what_groups_cannot_do_is_refused_in_one_line(tmp_path_factory, tmp_path, capsys, flags, message):
    folder = _checkpoint(tmp_path_factory, "mixtral")
    args = ["prune", "--model", str(folder), "--calib-file", str(C4), "--nsamples", "2", "--seqlen", "16", "--no-eval",
            "--out", str(tmp_path / "out"), *flags]
    if "--method" not in flags:
        args += ["--method", "wanda"]
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err, err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the pieces
def test_safetensors_written_piece_by_piece_equal_save_file(tmp_path):
    """Rows of a 3-D tensor written out of order, and whole tensors, make the
    file ``save_file`` makes (loaded back equal); a tensor left unfinished is
    refused at close and nothing is left at the path."""
    from d2prune.io.streaming import SafetensorsWriter

    g = torch.Generator().manual_seed(0)
    want = {"a.experts": torch.randn(5, 3, 4, generator=g).to(torch.bfloat16), "b.norm": torch.randn(7, generator=g),
            "c.idx": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    w = SafetensorsWriter(tmp_path / "x.safetensors", {k: (tuple(v.shape), v.dtype) for k, v in want.items()},
                          {"format": "pt"})
    w.write("a.experts", want["a.experts"][3:], 3)
    w.write("b.norm", want["b.norm"])
    w.write("a.experts", want["a.experts"][:3], 0)
    w.write("c.idx", want["c.idx"])
    w.close()
    got = load_file(str(tmp_path / "x.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    w = SafetensorsWriter(tmp_path / "y.safetensors", {"a": ((2, 2), torch.float32)})
    w.write("a", torch.ones(1, 2), 0)
    with pytest.raises(D2PruneError, match="was not written whole"):
        w.close()
    w.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_fused_experts_written_back_a_group_at_a_time(tmp_path_factory, tmp_path, monkeypatch, arch):
    """The output's per-expert tensors (Mixtral) and fused ones (GPT-OSS),
    converted from the work folder a few experts at a time, equal the
    conversion done whole."""
    import d2prune.io.streaming as streaming

    folder = _checkpoint(tmp_path_factory, arch)
    _prune(folder, tmp_path / "whole", "on")
    monkeypatch.setattr(streaming, "EXPERT_CHUNK_BYTES", 1)  # one expert at a time
    _prune(folder, tmp_path / "chunked", "on")
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "chunked")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_expert_sent_no_token_is_not_zeroed_even_without_the_fallback(tmp_path_factory, tmp_path):
    """With ``--moe-min-tokens 0`` (no few-token fallback), an expert the router
    sends no calibration token has no statistics at all: SparseGPT would zero
    every column of its never-seen inputs - the whole expert. It gets all-token
    statistics instead, recorded as such, and is pruned to the target."""
    folder = _checkpoint(tmp_path_factory, "qwen2_moe")
    rec = _prune(folder, tmp_path / "out", "on", "--moe-min-tokens", "0")
    none = [r for r in rec["layers"] if r.get("tokens") == 0]
    assert none and all(r["statistics"] == "all tokens (routed none)" for r in none)
    assert all(0.5 <= r["sparsity"] < 0.52 for r in rec["layers"] if r["how"] == "sparsegpt")
    assert all(r["statistics"] == "routed" for r in rec["layers"] if r.get("tokens"))


def test_eval_reads_experts_in_groups_when_a_block_does_not_fit(tmp_path_factory, monkeypatch):
    """``d2prune eval --ppl`` of a streamed MoE whose block does not fit: its
    experts go in groups, and the perplexity is the whole-block one."""
    import d2prune.engine.sequential as sequential
    import d2prune.io.streaming as streaming
    import d2prune.pipeline as pipeline

    folder = _checkpoint(tmp_path_factory, "mixtral")
    monkeypatch.setattr(streaming, "STREAM_RAM_SHARE", 0.0)  # --stream auto streams it
    whole = pipeline.evaluate_model(str(folder), None, ppl=True, eval_file=str(WIKI), seqlen=16, eval_windows=2)
    opened = streaming.open_model(str(folder), "auto", torch.device("cpu"), "on")
    need = max(pipeline.estimate(opened, 1, 16, torch.device("cpu"), 0).block,
               pipeline.estimate(opened, 1, 16, torch.device("cpu"), 0).host_ram)
    monkeypatch.setattr(pipeline, "available_ram", lambda: need - 1)
    propagated = []
    real = sequential.propagate_in_groups
    monkeypatch.setattr(sequential, "propagate_in_groups", lambda *a, **k: propagated.append(a[1]) or real(*a, **k))
    grouped = pipeline.evaluate_model(str(folder), None, ppl=True, eval_file=str(WIKI), seqlen=16, eval_windows=2)
    assert propagated == [0, 1]
    assert grouped["ppl"]["ppl"] == pytest.approx(whole["ppl"]["ppl"], rel=1e-6)


def test_a_replay_that_does_not_match_the_recorded_calls_fails_loudly():
    """The grouped outputs are handed back call by call in the recorded order: a
    block that calls its experts with other rows, more often or less often than
    when they were recorded is refused, never given another call's outputs."""
    from types import SimpleNamespace

    from d2prune.engine.sequential import _Replay

    rec = SimpleNamespace(calls=[(0, 3, None, None), (3, 2, None, None)])
    out = torch.arange(10.0).reshape(5, 2)
    x3, x2 = torch.zeros(3, 2), torch.zeros(2, 2)
    r = _Replay(rec, out)
    assert torch.equal(r(x3, None, None), out[:3]) and torch.equal(r(x2, None, None), out[3:])
    r.check_done()
    with pytest.raises(D2PruneError, match="call 3 of 2"):
        r(x2, None, None)  # one call too many
    r = _Replay(rec, out)
    with pytest.raises(D2PruneError, match="call 1 of 2"):
        r(x2, None, None)  # other rows than recorded
    r = _Replay(rec, out)
    r(x3, None, None)
    with pytest.raises(D2PruneError, match="call 2 of 2"):
        r.check_done()  # one call too few
