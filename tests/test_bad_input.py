"""Every bad input gives a one-line error naming what to fix and leaves no
output folder (nor a temporary one) behind."""

from __future__ import annotations

import errno
import json
import logging

import pytest
import torch

from conftest import C4, STORIES, WIKI, needs_shared
from d2prune import D2PruneError, PruneConfig, prune
from d2prune.cli import main
from d2prune.methods.sparsegpt import inverse_hessian_factor

pytestmark = needs_shared


def _run(tmp_path, capsys, *extra, out_name="out"):
    out = tmp_path / out_name
    args = ["-q", "prune", "--model", str(STORIES), "--seqlen", "64", "--nsamples", "4", "--calib-file", str(C4),
            "--eval-file", str(WIKI), "--eval-windows", "2", "--out", str(out), *extra]
    rc = main(args)
    err = capsys.readouterr().err.strip()
    return rc, err, out


def _assert_clean_failure(rc, err, out, match):
    assert rc == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("d2prune: error: "), err
    assert match in lines[0], lines[0]
    assert not out.exists()
    # the resume work folder (.out.work) is kept on purpose: rerunning the command resumes from it
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and p.name != f".{out.name}.work"], \
        "temporary folder left behind"


def test_good_run_writes_everything(tmp_path, capsys):
    rc, err, out = _run(tmp_path, capsys, "--method", "wanda", "--sparsity", "2:4")
    assert rc == 0, err
    rec = json.loads((out / "d2prune.json").read_text())
    assert rec["config"]["method"]["name"] == "wanda" and rec["config"]["sparsity"]["pattern"] == "2:4"
    assert rec["evaluation"]["wikitext2"]["windows"] == 2 and rec["data"]["nsamples"] == 4
    assert len(rec["layers"]) == 35 and {"name", "shape", "sparsity", "error", "seconds"} <= set(rec["layers"][0])
    assert "torch" in rec["versions"] and "transformers" in rec["versions"]


@pytest.mark.parametrize("sparsity,match", [("1.5", "out of range"), ("-0.2", "out of range"), ("4:4", "0 < N < M"),
                                            ("0:4", "0 < N < M"), ("half", "cannot parse sparsity")])
def test_bad_sparsity(tmp_path, capsys, sparsity, match):
    _assert_clean_failure(*_run(tmp_path, capsys, "--sparsity", sparsity), match)


def test_nm_not_dividing_a_layer_names_it(tmp_path, capsys):
    _assert_clean_failure(*_run(tmp_path, capsys, "--sparsity", "4:8"), "model.layers.0.mlp.down_proj")


def test_missing_model_path(tmp_path, capsys):
    _assert_clean_failure(*_run(tmp_path, capsys, "--model", str(tmp_path / "nope")), "does not exist")


def test_corrupt_model_folder(tmp_path, capsys):
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    _assert_clean_failure(*_run(tmp_path, capsys, "--model", str(bad)), "could not load model")


def test_corrupt_weights(tmp_path, capsys):
    bad = tmp_path / "corrupt_w"
    bad.mkdir()
    (bad / "config.json").write_text((STORIES / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    _assert_clean_failure(*_run(tmp_path, capsys, "--model", str(bad)), "could not load model")


def test_unknown_architecture(tmp_path, capsys):
    bad = tmp_path / "unknown_arch"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "no-such-arch", "architectures": ["NoSuchForCausalLM"]}))
    _assert_clean_failure(*_run(tmp_path, capsys, "--model", str(bad)), "could not load model")


def test_calibration_text_too_short(tmp_path, capsys):
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(json.dumps({"text": "A tiny story."}) for _ in range(5)))
    rc, err, out = _run(tmp_path, capsys, "--calib-file", str(short))
    _assert_clean_failure(rc, err, out, "no calibration document is longer than seqlen=64")


def test_missing_calibration_file(tmp_path, capsys):
    _assert_clean_failure(*_run(tmp_path, capsys, "--calib-file", str(tmp_path / "none.jsonl")), "does not exist")


def test_existing_output_refused_then_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc, err, _ = _run(tmp_path, capsys)
    assert rc == 2 and "already exists: pass --overwrite" in err and len(err.splitlines()) == 1
    assert (out / "keep.txt").exists()
    rc, err, _ = _run(tmp_path, capsys, "--overwrite")
    assert rc == 0, err
    assert not (out / "keep.txt").exists() and (out / "d2prune.json").is_file()


def test_full_disk(tmp_path, capsys, monkeypatch):
    import transformers

    def no_space(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", no_space)
    _assert_clean_failure(*_run(tmp_path, capsys), "no space left on device")


def test_nan_in_activations(stories, stories_calib):
    import copy

    model = copy.deepcopy(stories[0])
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(D2PruneError, match="NaN/Inf") as e:
        prune(model, PruneConfig(method="sparsegpt", sparsity=0.5, device="cpu"), stories_calib[:4])
    assert "\n" not in str(e.value)


def test_singular_hessian_retries_with_more_damping(caplog):
    H = torch.diag(torch.tensor([1.0, -0.5, 0.5, 0.0]))  # indefinite: plain damping cannot factor it
    with caplog.at_level(logging.WARNING, logger="d2prune"):
        U, dead = inverse_hessian_factor(H, 0.01, "toy")
    assert torch.isfinite(U).all() and dead.tolist() == [False, False, False, True]
    assert any("retrying" in r.message for r in caplog.records)


def test_full_disk_reported_by_safetensors(tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk with its own exception type, not OSError."""
    import transformers
    from safetensors import SafetensorError

    def no_space(self, *a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", no_space)
    _assert_clean_failure(*_run(tmp_path, capsys), "no space left on device")


def test_overwrite_failure_keeps_previous_output(tmp_path, capsys, monkeypatch):
    import transformers

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")

    def broken(self, *a, **k):
        raise RuntimeError("disk went away")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", broken)
    rc, err, _ = _run(tmp_path, capsys, "--overwrite")
    assert rc == 2 and len(err.splitlines()) == 1 and "could not write" in err
    assert (out / "keep.txt").read_text() == "x"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.name != ".out.work"]


@pytest.fixture
def no_pruning(monkeypatch):
    """Checks that must happen before the (long) prune: pruning here is a test failure."""
    import d2prune.pipeline as pipeline

    def fail(*a, **k):
        raise AssertionError("pruned before validating the options")

    monkeypatch.setattr(pipeline, "prune", fail)


@pytest.mark.parametrize("extra,match", [
    (["--eval-file", "MISSING"], "does not exist"),
    (["--eval-file", "NOTJSON"], "NOTJSON"),
    (["--zero-shot", "--tasks", "boolq,foo"], "unknown zero-shot task(s) foo"),
    (["--zero-shot", "--limit", "-1"], "--limit -1.0 must be"),
    (["--zero-shot", "--limit", "2.5"], "--limit 2.5 must be"),
    (["--seqlen", "4096"], "exceeds the model's context of 512"),
])
def test_options_checked_before_pruning(tmp_path, capsys, no_pruning, extra, match):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not json\n")
    extra = [str(tmp_path / "missing.jsonl") if a == "MISSING" else str(bad) if a == "NOTJSON" else a for a in extra]
    match = match.replace("NOTJSON", str(bad))
    _assert_clean_failure(*_run(tmp_path, capsys, "--method", "wanda", "--sparsity", "0.5", *extra), match)


@pytest.mark.parametrize("argv,match", [(["prune", "--method", "foo"], "invalid choice: 'foo'"),
                                        (["bogus"], "invalid choice: 'bogus'"),
                                        (["prune", "--nsamples", "x"], "invalid int value")])
def test_argparse_errors_are_one_line(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("d2prune: error: ") and match in err[0], err


def test_diagnose_bad_options_before_loading(tmp_path, capsys):
    assert main(["diagnose", "--dense", str(STORIES), "--pruned", str(STORIES), "--windows", "0"]) == 2
    assert "--windows 0 must be an integer >= 1" in capsys.readouterr().err
    assert main(["diagnose", "--dense", str(STORIES), "--pruned", str(STORIES),
                 "--plot", str(tmp_path / "nodir" / "a.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
