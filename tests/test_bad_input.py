"""Every bad input gives a one-line error naming what to fix and leaves no
output folder (nor a temporary one) behind."""

from __future__ import annotations

import errno
import gzip
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import C4, ROOT, STORIES, WIKI, needs_shared
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
    (out / "d2prune.json").write_text("{}")  # a previous d2prune output
    (out / "keep.txt").write_text("x")
    rc, err, _ = _run(tmp_path, capsys)
    assert rc == 2 and "already exists: pass --overwrite" in err and len(err.splitlines()) == 1
    assert (out / "keep.txt").exists()
    rc, err, _ = _run(tmp_path, capsys, "--overwrite")
    assert rc == 0, err
    assert not (out / "keep.txt").exists() and (out / "d2prune.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.name != ".out.work"]


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
    (out / "d2prune.json").write_text("{}")  # a previous d2prune output: --overwrite may replace it
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


@pytest.mark.parametrize("command", [["prune"], ["eval", "--ppl"], ["finetune", "PRUNED", "--out", "OUT"]])
def test_eval_windows_zero_is_refused_by_every_command(capsys, command):
    """``--eval-windows 0`` was "all" for finetune and an error for prune and
    eval: now an error in each, one line saying how to ask for every window
    (``all``), which each command accepts."""
    from d2prune.cli import build_parser

    with pytest.raises(SystemExit) as e:
        main([*command, "--eval-windows", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("d2prune: error: "), err
    assert "argument --eval-windows: '0' is not a number of windows: give N >= 1, or all for every window" in err[0]
    parser = build_parser()
    assert parser.parse_args([*command, "--eval-windows", "all"]).eval_windows is None
    assert parser.parse_args([*command, "--eval-windows", "3"]).eval_windows == 3


@pytest.mark.parametrize("flag", ["--nsamples", "--seqlen", "--eval-windows"])
def test_demo_refuses_a_zero_count(capsys, flag):
    """``demo --eval-windows 0`` silently ran its default 16 windows: every count of the demo is >= 1."""
    with pytest.raises(SystemExit) as e:
        main(["demo", flag, "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and f"argument {flag}: '0' is not a positive integer" in err[0], err


def test_diagnose_help_names_its_real_default_eval_file(capsys):
    with pytest.raises(SystemExit):
        main(["diagnose", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: the file the pruned folder was evaluated on, else ../shared/data or $D2PRUNE_DATA, else the hub)" \
        in text


def test_diagnose_bad_options_before_loading(tmp_path, capsys):
    assert main(["diagnose", "--dense", str(STORIES), "--pruned", str(STORIES), "--windows", "0"]) == 2
    assert "--windows 0 must be an integer >= 1" in capsys.readouterr().err
    assert main(["diagnose", "--dense", str(STORIES), "--pruned", str(STORIES),
                 "--plot", str(tmp_path / "nodir" / "a.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


# --------------------------------------------------------------------------- hardening (issue 10)
EVIL_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('the model folder ran its code')\n"


def _one_line(err: str, match: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("d2prune: error: "), err
    assert match in lines[0], lines[0]
    return lines[0]


def _cli(*args, stdin: str = "", cwd=None) -> subprocess.CompletedProcess:
    """The real command in its own process (stdin, signals and exit status as a user gets them)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "d2prune", *map(str, args)], input=stdin, capture_output=True,
                          text=True, cwd=cwd or ROOT, env=env, timeout=600)


@pytest.fixture
def no_loading(monkeypatch):
    """Checks that must happen before the model loads: loading here is a test failure."""
    import d2prune.pipeline as pipeline

    def fail(*a, **k):
        raise AssertionError("loaded the model before validating the data")

    monkeypatch.setattr(pipeline, "open_model", fail)


def test_remote_code_never_runs_never_prompts(tmp_path):
    """An unknown model_type with an auto_map: transformers would ask on stdout whether to run the folder's
    Python file (and run it on "y"). We answer "y" on stdin: one line on stderr, nothing run, nothing on stdout."""
    marker = tmp_path / "ran"
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "custom-arch", "architectures": ["CustomForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}))
    (folder / "modeling_custom.py").write_text(EVIL_CODE.format(marker=str(marker)))
    out = tmp_path / "out"
    for cmd in (["prune", "--model", folder, "--out", out, "--calib-file", C4, "--eval-file", WIKI],
                ["eval", "--model", folder, "--ppl", "--eval-file", WIKI]):
        res = _cli(*cmd, stdin="y\n")
        assert res.returncode == 2 and res.stdout == "", (res.stdout, res.stderr)
        _one_line(res.stderr, "needs the Python code it ships (modeling_custom.CustomConfig")
        assert "trust_remote_code=False" in res.stderr
        assert not marker.exists() and not out.exists()


def test_auto_map_of_a_known_model_is_not_run_nor_saved(tmp_path, capsys):
    """A supported model_type with an auto_map loads with transformers' own class; the pruned
    folder's config no longer points at code it does not have."""
    marker = tmp_path / "ran"
    folder = tmp_path / "stories_auto_map"
    shutil.copytree(STORIES, folder)
    for name, auto_map in (("config.json", {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}),
                           ("tokenizer_config.json", {"AutoTokenizer": ["modeling_custom.CustomTokenizer", None]})):
        cfg = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**cfg, "auto_map": auto_map}))
    (folder / "modeling_custom.py").write_text(EVIL_CODE.format(marker=str(marker)))
    rc, err, out = _run(tmp_path, capsys, "--model", str(folder), "--method", "magnitude", "--no-eval")
    assert rc == 0, err
    assert not marker.exists()
    for name in ("config.json", "tokenizer_config.json"):
        assert "auto_map" not in json.loads((out / name).read_text())


def _tiny_bert(folder: Path, head: str = "BertForMaskedLM", **config) -> Path:
    import transformers as tf

    cfg = tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, **config)
    getattr(tf, head)(cfg).save_pretrained(folder)
    return folder


def _tiny_t5(folder: Path) -> Path:
    import transformers as tf

    cfg = tf.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    tf.T5ForConditionalGeneration(cfg).save_pretrained(folder)
    return folder


@pytest.fixture
def no_weights(monkeypatch):
    """Refusals from the config alone: reading weights here is a test failure."""
    import transformers

    def fail(*a, **k):
        raise AssertionError("weights loaded before the architecture was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)


@pytest.mark.parametrize("make,match", [
    (_tiny_bert, "(BertForMaskedLM) is not a causal LM"),
    (lambda f: _tiny_bert(f, "BertLMHeadModel"), "(BertLMHeadModel) is a bidirectional encoder"),
    (_tiny_t5, "(T5ForConditionalGeneration) is an encoder-decoder model"),
])
def test_non_causal_models_refused_before_loading(tmp_path, capsys, no_weights, make, match):
    folder = make(tmp_path / "model")
    _assert_clean_failure(*_run(tmp_path, capsys, "--model", str(folder)), match)


def test_bert_configured_as_decoder_is_causal(tmp_path):
    from d2prune.io.modeling import resolve_source

    folder = _tiny_bert(tmp_path / "decoder", "BertLMHeadModel", is_decoder=True)
    assert resolve_source(str(folder)).path == str(folder)


def test_overwrite_refuses_a_folder_d2prune_did_not_write(tmp_path, capsys, no_pruning):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    rc, err, _ = _run(tmp_path, capsys, "--overwrite")
    assert rc == 2
    _one_line(err, "is not empty and is not a d2prune output (no d2prune.json)")
    assert (out / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("where", [".", "..", "CWD"])
def test_overwrite_never_replaces_the_working_directory(tmp_path, capsys, monkeypatch, no_pruning, where):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "d2prune.json").write_text("{}")  # even one that looks like a previous output
    (tmp_path / "a" / "d2prune.json").write_text("{}")
    monkeypatch.chdir(work)
    out = str(work) if where == "CWD" else where
    args = ["-q", "prune", "--model", str(STORIES), "--seqlen", "64", "--nsamples", "4", "--calib-file", str(C4),
            "--eval-file", str(WIKI), "--out", out, "--overwrite"]
    assert main(args) == 2
    _one_line(capsys.readouterr().err, "is the working directory or a folder above it")
    assert (work / "d2prune.json").is_file() and [p.name for p in tmp_path.iterdir()] == ["a"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b", "d2prune.json"]


def test_overwrite_replaces_an_empty_folder(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    rc, err, out = _run(tmp_path, capsys, "--method", "magnitude", "--no-eval", "--overwrite")
    assert rc == 0, err
    assert (out / "d2prune.json").is_file()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _leftover(parent: Path, name: str, pid: int | None, host: str | None = None) -> Path:
    import socket

    folder = parent / name
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"half a model")
    if pid is not None:
        (folder / ".d2prune-tmp").write_text(f"{pid} {host or socket.gethostname()}\n")
    return folder


def test_stale_temporary_folders_reclaimed_by_the_next_save(tmp_path, capsys):
    dead = _dead_pid()
    stale = [_leftover(tmp_path, ".out.tmp-k1ll3d", dead), _leftover(tmp_path, ".out.old-k1ll3d", dead)]
    kept = [_leftover(tmp_path, ".out.tmp-lookalike", None),            # no marker: not ours
            _leftover(tmp_path, ".out.tmp-running", os.getpid()),       # its writer is alive
            _leftover(tmp_path, ".out.tmp-elsewhere", dead, "another-host"),  # another machine's process
            _leftover(tmp_path, ".other.tmp-k1ll3d", dead)]              # another target's
    rc, err, out = _run(tmp_path, capsys, "--method", "magnitude", "--no-eval")
    assert rc == 0, err
    assert (out / "d2prune.json").is_file() and not (out / ".d2prune-tmp").exists()
    assert not any(p.exists() for p in stale)
    assert all((p / "model.safetensors").is_file() for p in kept)


def test_save_killed_outright_is_cleaned_up_by_the_next_run(tmp_path, capsys):
    """A real SIGKILL in the middle of writing the weights, then the same command again."""
    script = f"""
import os, signal
from d2prune.io.save import save_pruned
def write(folder):
    (folder / "model-00001.safetensors").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
save_pruned(None, None, {str(tmp_path / 'out')!r}, {{}}, write_weights=write)
"""
    res = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert res.returncode == -signal.SIGKILL
    assert [p.name[:9] for p in tmp_path.iterdir()] == [".out.tmp-"]
    rc, err, out = _run(tmp_path, capsys, "--method", "magnitude", "--no-eval")
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".out.work") == ["out"]


def test_killed_swap_restores_the_previous_output(tmp_path):
    """Killed after the old output was moved aside and before the new one was in place: the next
    run puts the user's previous output back rather than deleting it."""
    from d2prune.io.save import reclaim_stale

    old = _leftover(tmp_path, ".out.old-k1ll3d", _dead_pid())
    (old / "x").mkdir()
    (old / "x" / "d2prune.json").write_text('{"previous": true}')
    reclaim_stale(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "d2prune.json").read_text()) == {"previous": True}
    assert not old.exists()


def test_interrupt_right_after_the_save(tmp_path, capsys, monkeypatch):
    import d2prune.pipeline as pipeline

    real = pipeline.save_pruned

    def save_then_interrupted(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt  # Ctrl-C the moment the output is in place

    monkeypatch.setattr(pipeline, "save_pruned", save_then_interrupted)
    rc, err, out = _run(tmp_path, capsys, "--method", "magnitude", "--no-eval")
    assert rc == 130 and err == "d2prune: interrupted"
    assert json.loads((out / "d2prune.json").read_text())["config"]["method"]["name"] == "magnitude"  # complete


def test_interrupt_during_the_save_leaves_nothing(tmp_path, capsys, monkeypatch):
    import transformers

    def interrupted(self, folder, *a, **k):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", interrupted)
    rc, err, out = _run(tmp_path, capsys, "--method", "magnitude", "--no-eval")
    assert rc == 130 and err == "d2prune: interrupted"
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.name != ".out.work"]


def test_interrupt_during_the_swap_waits_for_its_end():
    from d2prune.io.save import sigint_deferred

    steps = []
    with pytest.raises(KeyboardInterrupt):
        with sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("renamed")  # still runs: the swap is never cut in half
    assert steps == ["renamed"]


def test_interrupt_after_the_command_returns(tmp_path):
    """Ctrl-C while the interpreter shuts down (after main returned): no traceback, exit 130."""
    script = ("import os, signal, sys\nfrom d2prune.cli import main\n"
              f"sys.argv = ['d2prune', 'tasks', '--task-data', {str(ROOT.parent / 'shared/data/zeroshot')!r}, "
              f"'--out', {str(tmp_path / 'tasks')!r}]\n"
              "code = main()\nos.kill(os.getpid(), signal.SIGINT)\nsys.exit(code)\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert res.returncode == 130 and res.stderr == "d2prune: interrupted\n", res.stderr
    assert "wrote lm-eval task configs" in res.stdout


def _gz_truncated(path: Path) -> None:
    data = gzip.compress(C4.read_bytes())
    path.write_bytes(data[: len(data) // 2])


def _gz_bad_deflate(path: Path) -> None:
    path.write_bytes(gzip.compress(b"")[:10] + b"\xff" * 64)  # a valid header, then an invalid deflate block type


BAD_DATA = [
    ("calib.jsonl.gz", _gz_truncated, "the gzip data is truncated or corrupt (EOFError"),
    ("calib.jsonl.gz", _gz_bad_deflate, "line 1: the gzip data is truncated or corrupt (error: Error -3"),
    ("calib.jsonl", lambda p: p.write_text('{"text": "a"}\n123\n'), "line 2 is a number, not an object"),
    ("calib.jsonl", lambda p: p.write_text('{"text": "a"}\n{"text": null}\n'), "line 2: 'text' is null, not a string"),
    ("calib.jsonl", lambda p: p.write_text('{"text": 5}\n'), "line 1: 'text' is a number, not a string"),
    ("calib.jsonl", lambda p: p.write_text('{"body": "a"}\n'), "line 1 has no 'text' field"),
    ("calib.jsonl", lambda p: p.write_bytes(b'{"text": "a"}\n\n{"text": "caf\xe9"}\n'), "line 3 is not UTF-8 text"),
    ("calib.jsonl", lambda p: p.write_text('{"text": "a"}\n{"text": "b"\n'), "line 2 is not valid JSON"),
]


@pytest.mark.parametrize("flag", ["--calib-file", "--eval-file", "--c4-eval-file"])
@pytest.mark.parametrize("name,write,match", BAD_DATA, ids=[m.split("(")[0][:30] for _, _, m in BAD_DATA])
def test_malformed_data_files(tmp_path, capsys, no_loading, flag, name, write, match):
    bad = tmp_path / name
    write(bad)
    line = _one_line(_run(tmp_path, capsys, flag, str(bad))[1], match)
    assert str(bad) in line
    assert not (tmp_path / "out").exists()


def test_evaluation_text_shorter_than_seqlen(tmp_path, capsys, no_pruning):
    short = tmp_path / "wiki.jsonl"
    short.write_text(json.dumps({"text": "Too short to hold a window."}) + "\n")
    _assert_clean_failure(*_run(tmp_path, capsys, "--eval-file", str(short)),
                          "the wikitext2 evaluation text has")


def test_nan_weight_found_at_load_time(tmp_path, capsys, no_pruning):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "stories_nan"
    shutil.copytree(STORIES, bad)
    weights = load_file(bad / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    _assert_clean_failure(*_run(tmp_path, capsys, "--model", str(bad), "--stream", "off"),
                          f"NaN/Inf in weight model.layers.1.mlp.up_proj.weight of {bad}: the checkpoint is corrupt")


def _sweep(tmp_path, capsys, *extra, calib=C4):
    out = tmp_path / "sweep"
    rc = main(["-q", "sweep", "--model", str(STORIES), "--methods", "magnitude", "--sparsities", "0.5",
               "--seqlen", "64", "--nsamples", "4", "--calib-file", str(calib), "--eval-file", str(WIKI),
               "--eval-windows", "2", "--out", str(out), *extra])
    return rc, capsys.readouterr().err, out


def test_sweep_refuses_to_mix_settings(tmp_path, capsys):
    rc, err, out = _sweep(tmp_path, capsys)
    assert rc == 0, err
    before = {p: (out / p).read_bytes() for p in ("results.csv", "sweep.json")}
    other_calib = tmp_path / "c4_other.jsonl"
    other_calib.write_text("".join(C4.read_text().splitlines(keepends=True)[1:]))  # one document less
    for extra, calib, match in [
        (["--seed", "1"], C4, f"sweep {out} was made with seed=0; this run asks seed=1: use another --out"),
        (["--eval-windows", "3"], C4, "was made with eval_windows=2; this run asks eval_windows=3"),
        ([], other_calib, f"was made with calib_file={C4} (sha256"),
        (["--seed", "2", "--nsamples", "8"], C4, "was made with seed=0, nsamples=4; this run asks seed=2, nsamples=8"),
        (["--zero-shot", "--limit", "2"], C4, "was made with zero_shot=off; this run asks zero_shot={tasks=default, limit=2,"),
    ]:
        rc, err, _ = _sweep(tmp_path, capsys, *extra, calib=calib)
        assert rc == 2
        _one_line(err, match)
        assert {p: (out / p).read_bytes() for p in before} == before  # nothing appended, record untouched
    # growing the grid is a resume, not a change: one new cell, the old ones kept
    rc, err, _ = _sweep(tmp_path, capsys, "--sparsities", "0.5,0.6")
    assert rc == 0, err
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[:3] == before["results.csv"].decode().splitlines() and len(rows) == 4
    assert json.loads((out / "sweep.json").read_text())["grid"]["sparsities"] == ["0.5", "0.6"]


def test_sweep_same_file_elsewhere_is_the_same_data(tmp_path, capsys):
    rc, err, out = _sweep(tmp_path, capsys)
    assert rc == 0, err
    copy_ = tmp_path / "copy.jsonl"
    shutil.copyfile(C4, copy_)
    rc, err, _ = _sweep(tmp_path, capsys, calib=copy_)
    assert rc == 0, err


@pytest.mark.parametrize("argv", [["-q", "prune"], ["prune", "-q"], ["prune", "--quiet"], ["-q", "eval", "-q"]])
def test_quiet_before_or_after_the_subcommand(argv):
    from d2prune.cli import build_parser

    args = build_parser().parse_args(argv)
    assert args.quiet is True and args.verbose is False
    assert build_parser().parse_args(["prune", "-v"]).verbose is True
    assert build_parser().parse_args(["prune"]).quiet is False


@pytest.fixture
def fake_zero_shot(monkeypatch):
    import d2prune.evaluation.zeroshot as zeroshot

    calls = []

    class Result:
        def to_dict(self):
            return {"tasks": {"boolq": {"metric": "acc", "value": 0.5}}, "mean": 0.5, "limit": None}

    def fake(model, tok, **kw):
        calls.append(kw)
        return Result()

    monkeypatch.setattr(zeroshot, "evaluate_zero_shot", fake)
    return calls


def _eval(capsys, *extra):
    rc = main(["eval", "--model", str(STORIES), "--eval-file", str(WIKI), "--seqlen", "64", "--eval-windows", "2",
               *extra, "-q"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_eval_ppl_alone_is_perplexity_only(capsys, fake_zero_shot):
    rc, out, err = _eval(capsys, "--ppl")
    assert rc == 0, err
    assert "wikitext2 ppl" in out and "mean" not in out and fake_zero_shot == []


@pytest.mark.parametrize("extra", [["--ppl", "--zero-shot"], ["--ppl", "--tasks", "boolq"], []])
def test_eval_zero_shot_unless_ppl_alone(capsys, fake_zero_shot, extra):
    rc, out, err = _eval(capsys, *extra)
    assert rc == 0, err
    assert "mean" in out and len(fake_zero_shot) == 1
    assert ("wikitext2 ppl" in out) == ("--ppl" in extra)


def test_eval_zero_shot_option_without_zero_shot(capsys, fake_zero_shot):
    rc, out, err = _eval(capsys, "--ppl", "--limit", "5")
    assert rc == 2
    _one_line(err, "--limit set zero-shot options, but --ppl alone evaluates perplexity only: add --zero-shot")
