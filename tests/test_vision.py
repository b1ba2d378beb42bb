"""Vision transformers through the same engine: tiny ViT / DeiT configs
(engine == the model's own forward) and a ViT trained here on real images
(scikit-learn's handwritten digits), pruned from the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import STORIES, needs_shared
from d2prune import PruneConfig, find_blocks, find_prunable, prune
from d2prune.cli import main
from d2prune.config import method_config
from d2prune.engine.sequential import sequential_logits

CPU = torch.device("cpu")


def tiny_vision(kind: str):
    import transformers as tf

    kw = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, num_labels=10)
    torch.manual_seed(0)
    if kind == "vit":
        return tf.ViTForImageClassification(tf.ViTConfig(**kw)).eval()
    if kind == "deit":
        return tf.DeiTForImageClassification(tf.DeiTConfig(**kw)).eval()
    return tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**kw)).eval()  # the distillation token


KINDS = ["vit", "deit", "deit-distilled"]


@pytest.mark.parametrize("kind", KINDS)
def test_engine_reproduces_logits_vision(kind):
    model = tiny_vision(kind)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(pixel_values=x).logits
    got = torch.cat(list(sequential_logits(model, x, CPU)))
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_vision_blocks_prune_every_linear_exactly(kind):
    model = tiny_vision(kind)
    blocks = find_blocks(model)
    report = prune(model, PruneConfig(method="magnitude", sparsity=0.5), torch.randn(4, 3, 32, 32))
    names = {f"{blocks.prefix}.{i}.{n}" for i in range(len(blocks)) for n in find_prunable(blocks[i])}
    assert {r.name for r in report.layers} == names  # query/key/value, attention output, both MLP Linears
    for i in range(len(blocks)):
        for layer in find_prunable(blocks[i]).values():
            assert int((layer.weight == 0).sum()) == layer.weight.numel() // 2
    head = model.classifier.weight if kind != "deit-distilled" else model.cls_classifier.weight
    assert int((head == 0).sum()) == 0  # the classifier is not a block Linear


@pytest.mark.parametrize("frozen", ["k", "auto", "per-layer"])
def test_d2prune_qkv_choice_on_vit_attention(frozen):
    """ViT names its projections query / key / value: D²Prune freezes the chosen
    one (pruned with D2-Wanda, never updated) and updates the others."""
    model = tiny_vision("vit")
    g = torch.Generator().manual_seed(2)
    calib, held = torch.randn(8, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = prune(model, PruneConfig(method=method_config("d2prune", frozen=frozen), sparsity=0.5), calib,
                   heldout=held, heldout_labels=torch.arange(4))
    summary = report.method
    if frozen == "auto":
        assert summary["chosen"] in ("q", "k", "v") and set(summary["heldout_ppl"]) == {"q", "k", "v"}
        assert all(math.isfinite(v) for v in summary["heldout_ppl"].values())
    choice = {"k": "key", "auto": {"q": "query", "k": "key", "v": "value"}.get(summary.get("chosen"))}.get(frozen)
    for name, p in model.named_parameters():
        if not name.endswith("weight") or ".layers." not in name or "layernorm" in name:
            continue
        kept = p != 0
        unchanged = torch.equal(p[kept], before[name][kept])
        if choice is not None and f".{choice}." in name:
            assert unchanged, f"{name}: the frozen projection's kept weights must not be updated"
        elif choice is not None and any(f".{r}." in name for r in ("query", "key", "value")):
            assert not unchanged, f"{name}: a non-frozen projection gets the SparseGPT update"


def test_heldout_images_need_labels():
    from d2prune import D2PruneError

    model = tiny_vision("vit")
    with pytest.raises(D2PruneError, match="labels"):
        prune(model, PruneConfig(method="d2prune", sparsity=0.5), torch.randn(4, 3, 32, 32),
              heldout=torch.randn(2, 3, 32, 32))
    with pytest.raises(D2PruneError, match="pixel values"):
        prune(model, PruneConfig(method="wanda", sparsity=0.5), torch.zeros(4, 16, dtype=torch.long))
    with pytest.raises(D2PruneError, match="not a language model"):
        prune(model, PruneConfig(method="pruner-zero", sparsity=0.5), torch.randn(4, 3, 32, 32))


def test_image_folder_labels(tmp_path):
    from d2prune import D2PruneError
    from d2prune.evaluation.vision import image_folder

    from PIL import Image

    for c in ("n02", "n01", "n03"):
        (tmp_path / c).mkdir()
        for k in range(2):
            Image.new("RGB", (4, 4), (k, 0, 0)).save(tmp_path / c / f"{k}.png")
    (tmp_path / "n01" / "notes.txt").write_text("not an image")
    folder = image_folder(tmp_path)
    assert folder.classes == ("n01", "n02", "n03") and len(folder) == 6
    assert folder.labels({"n03": 7, "n01": 5, "n02": 0}, 10) == ([5, 5, 0, 0, 7, 7], "label2id")
    assert folder.labels({"cat": 0}, 10) == ([0, 0, 1, 1, 2, 2], "sorted folders")  # ImageNet wnids sort to indices
    with pytest.raises(D2PruneError, match="3 class folders but the model classifies 2"):
        folder.labels({"cat": 0}, 2)
    with pytest.raises(D2PruneError, match="not a folder"):
        image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(D2PruneError, match="no class sub-folders"):
        image_folder(tmp_path / "empty")


# --------------------------------------------------------------------------- a ViT trained on real images
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """(model dir, train dir, test dir, dense top-1): a 4-block ViT (hidden 64,
    32x32 inputs, 8x8 patches) trained 30 epochs on 1438 digits."""
    pytest.importorskip("sklearn")
    from digits_vit import train_vit, write_digits

    root = tmp_path_factory.mktemp("digits")
    train, test = write_digits(root)
    model = train_vit(root / "vit", train)
    out = root / "dense.json"
    assert main(["-q", "eval", "--model", str(model), "--eval-images", str(test), "--output", str(out)]) == 0
    top1 = json.loads(out.read_text())["images"]["top1"]
    assert top1 > 0.93, f"the digits ViT should be well trained (top-1 {top1})"
    return model, train, test, top1


def _prune(digits, tmp_path, method: str, sparsity: str, *extra: str) -> dict:
    model, train, test, _ = digits
    out = tmp_path / f"{method}-{sparsity}"
    assert main(["-q", "prune", "--model", str(model), "--method", method, "--sparsity", sparsity,
                 "--calib-images", str(train), "--eval-images", str(test), "--nsamples", "128",
                 "--out", str(out), *extra]) == 0
    return json.loads((out / "d2prune.json").read_text())


def test_digits_vit_pruned_from_the_command_line(digits, tmp_path):
    """At 70%, SparseGPT and D²Prune keep more accuracy than magnitude; the
    accuracy is recorded, the folder reloads with the same accuracy."""
    _, train, test, dense = digits
    top1 = {}
    for method in ("magnitude", "sparsegpt", "d2prune"):
        rec = _prune(digits, tmp_path, method, "0.7")
        ev = rec["evaluation"]["images"]
        assert ev["images"] == ev["total_images"] == 359 and ev["top5"] is not None
        assert ev["label_source"] == "label2id"
        assert rec["data"]["calib_images"] == str(train) and rec["data"]["nsamples"] == 128
        assert abs(rec["sparsity"] - 0.7) < 0.005
        top1[method] = ev["top1"]
    assert top1["sparsegpt"] > top1["magnitude"] and top1["d2prune"] > top1["magnitude"], top1
    assert top1["sparsegpt"] > dense - 0.03, (top1, dense)
    rec = json.loads((tmp_path / "d2prune-0.7" / "d2prune.json").read_text())
    assert rec["method_summary"]["chosen"] in ("q", "k", "v")  # --frozen auto on held-out images
    out = tmp_path / "eval.json"
    assert main(["-q", "eval", "--model", str(tmp_path / "d2prune-0.7"), "--eval-images", str(test),
                 "--output", str(out)]) == 0
    assert json.loads(out.read_text())["images"]["top1"] == pytest.approx(top1["d2prune"], abs=1e-9)


def test_digits_vit_diagnose_and_n_m(digits, tmp_path):
    rec = _prune(digits, tmp_path, "sparsegpt", "2:4", "--eval-windows", "64", "--save-format", "compressed")
    assert rec["sparsity"] == 0.5 and rec["evaluation"]["images"]["images"] == 64
    assert rec["compression"]["sparse_matrices_ratio"] < 0.6  # the 2:4 layout: values + 2-bit indices
    folder = tmp_path / "sparsegpt-2:4"
    out = tmp_path / "eval.json"  # the compressed folder loads back with the accuracy it was saved with
    assert main(["-q", "eval", "--model", str(folder), "--eval-images", str(digits[2]), "--eval-windows", "64",
                 "--output", str(out)]) == 0
    assert json.loads(out.read_text())["images"]["top1"] == pytest.approx(rec["evaluation"]["images"]["top1"], abs=1e-9)
    assert main(["-q", "diagnose", "--dense", str(digits[0]), "--pruned", str(folder), "--windows", "4"]) == 0
    att = json.loads((folder / "attention.json").read_text())
    assert att["windows"] == 4 and att["images"] == str(digits[2])  # the folder it was evaluated on
    assert all(r["kl"] > 0 and math.isfinite(r["kl"]) for r in att["blocks"])


def test_vision_bad_input(digits, tmp_path, capsys):
    model, train, test, _ = digits
    base = ["prune", "--model", str(model), "--method", "wanda", "--out", str(tmp_path / "o")]
    cases = [
        (base, "calibrate it on images with --calib-images"),
        (base + ["--calib-images", str(tmp_path / "nope")], "is not a folder"),
        (base + ["--calib-images", str(train), "--nsamples", "5000"], "fewer than --nsamples 5000"),
        (base + ["--calib-images", str(train), "--stream", "on"], "use --stream off"),
        (base + ["--calib-images", str(train), "--calib-file", "x.jsonl"], "--calib-file is for language models"),
        (base + ["--calib-images", str(train), "--method", "pruner-zero"], "not a language model"),
        (["eval", "--model", str(model), "--eval-images", str(test), "--ppl"], "drop them"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("d2prune: error:") and message in err and "\n" not in err, (argv, err)
    assert not (tmp_path / "o").exists()


@needs_shared
def test_language_model_refuses_images(digits, tmp_path, capsys):
    assert main(["prune", "--model", str(STORIES), "--method", "wanda", "--calib-images", str(digits[1])]) == 2
    assert "--calib-images is for image classifiers" in capsys.readouterr().err


def test_load_model_keeps_the_distillation_head(tmp_path):
    from d2prune import load_model
    from digits_vit import processor

    model = tiny_vision("deit-distilled")
    model.save_pretrained(tmp_path)
    processor().save_pretrained(tmp_path)
    loaded, proc, _ = load_model(str(tmp_path))
    assert type(loaded).__name__ == "DeiTForImageClassificationWithTeacher"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, model(pixel_values=x).logits)
