"""Zero-shot through lm-eval-harness on the local task data: prompts as the
standard tasks, in-memory evaluation == lm-eval's own CLI on the saved folder."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from conftest import SHARED, needs_shared
from d2prune import PruneConfig, prune, save_pruned
from d2prune.evaluation.zeroshot import STANDARD_TASKS, evaluate_zero_shot, write_task_configs

pytestmark = needs_shared
DATA = SHARED / "data" / "zeroshot"


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return write_task_configs(DATA, tmp_path_factory.mktemp("tasks"))


def _task(tasks_dir, name):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_dir)).load([f"local_{name}"])["tasks"][f"local_{name}"]


def test_prompts_follow_the_standard_tasks(tasks_dir):
    boolq = _task(tasks_dir, "boolq")
    doc = boolq.test_docs()[0] if boolq.has_test_docs() else boolq.validation_docs()[0]
    text = boolq.doc_to_text(doc)
    assert not text.startswith("Passage:") and "\nQuestion: " in text and text.endswith("?\nAnswer:")
    assert boolq.doc_to_choice(doc) == ["no", "yes"]

    arc = _task(tasks_dir, "arc_easy")
    doc = arc.test_docs()[0]
    assert arc.doc_to_text(doc).startswith("Question: ") and arc.doc_to_text(doc).endswith("\nAnswer:")

    wino = _task(tasks_dir, "winogrande")
    doc = wino.validation_docs()[0]
    assert isinstance(wino.doc_to_text(doc), int)  # partial evaluation, as lm-eval's winogrande

    rte = _task(tasks_dir, "rte")
    doc = rte.validation_docs()[0]
    assert rte.doc_to_text(doc).endswith(" True or False?\nAnswer:") and rte.doc_to_choice(doc) == ["True", "False"]

    # HellaSwag: the same documents as lm-eval's own preprocessing
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    hs = _task(tasks_dir, "hellaswag")
    ours = hs.validation_docs()
    raw = datasets.load_dataset("json", data_files=str(DATA / "hellaswag" / "hellaswag_val_subset1000.jsonl"), split="train")
    theirs = process_docs(raw)
    assert len(ours) == 1000
    for i in (0, 1, 500, 999):
        assert ours[i]["query"] == theirs[i]["query"] and ours[i]["choices"] == theirs[i]["choices"]
        assert ours[i]["gold"] == theirs[i]["gold"]


def test_in_memory_equals_lm_eval_cli_on_saved_folder(stories, stories_calib, tasks_dir, tmp_path):
    model = copy.deepcopy(stories[0])
    prune(model, PruneConfig(method="wanda", sparsity=0.5, device="cpu"), stories_calib)
    ours = evaluate_zero_shot(model, stories[1], tasks=list(STANDARD_TASKS), limit=6, task_data=DATA, batch_size=4,
                              device="cpu")
    out = save_pruned(model, stories[1], tmp_path / "pruned", {})
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={out},dtype=float32",
           "--include_path", str(tasks_dir), "--tasks", ",".join(f"local_{t}" for t in STANDARD_TASKS),
           "--num_fewshot", "0", "--limit", "6", "--batch_size", "4", "--device", "cpu",
           "--output_path", str(tmp_path / "cli")]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    (result_file,) = list((tmp_path / "cli").rglob("results_*.json"))
    cli = json.loads(result_file.read_text())["results"]
    for t, row in ours.tasks.items():
        assert row["acc"] == cli[f"local_{t}"]["acc,none"], t
        if row["acc_norm"] is not None:
            assert row["acc_norm"] == cli[f"local_{t}"]["acc_norm,none"], t
    assert len(ours.tasks) == 7 and 0 <= ours.mean <= 1
