"""Zero-shot accuracy through lm-eval-harness itself, offline (docs/method.md §5).

lm-eval's standard tasks download their data from the hub. We give lm-eval
task configs (YAML, its own format) that read the same tasks from local files
(``../shared/data/zeroshot`` or ``--task-data DIR``) and reproduce the standard
prompts, choices and metrics as closely as those files allow; lm-eval does the
scoring. :func:`write_task_configs` writes the YAMLs (with the data folder
filled in) so the very same configs also run through lm-eval's own CLI::

    d2prune tasks --task-data ../shared/data/zeroshot --out tasks/
    lm_eval --model hf --model_args pretrained=OUT_DIR --include_path tasks/ \\
            --tasks local_arc_easy,local_hellaswag ... --num_fewshot 0

Differences from the standard lm-eval tasks (also in the README):

* ``boolq``: the llm-foundry query is ``"Passage: {passage}\\nQuestion: {question}?"``;
  we drop the ``"Passage: "`` prefix and add ``"\\nAnswer:"`` -> the standard prompt.
* ``arc_easy`` / ``arc_challenge``: query ``"Question: {q}"`` + ``"\\nAnswer:"`` = standard.
* ``openbookqa``: query = the question stem = standard.
* ``winogrande``: llm-foundry's context options / continuation are the standard
  partial-evaluation inputs (context up to the blank + option; scored continuation).
* ``hellaswag``: the standard preprocessing on a **1000-item subset** of the
  10042 validation items (the only HellaSwag data available offline).
* ``rte``: GLUE validation (277), the standard prompt and choices.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import D2PruneError

log = logging.getLogger(__name__)

STANDARD_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
PREFIX = "local_"

# standard name -> (data file under the task-data folder, the metric docs/method.md reports)
TASK_FILES = {
    "boolq": ("llmfoundry/boolq.jsonl", "acc"),
    "rte": ("rte/validation.parquet", "acc"),
    "hellaswag": ("hellaswag/hellaswag_val_subset1000.jsonl", "acc_norm"),
    "winogrande": ("llmfoundry/winogrande.jsonl", "acc"),
    "arc_easy": ("llmfoundry/arc_easy.jsonl", "acc_norm"),
    "arc_challenge": ("llmfoundry/arc_challenge.jsonl", "acc_norm"),
    "openbookqa": ("llmfoundry/openbook_qa.jsonl", "acc_norm"),
    "piqa": ("llmfoundry/piqa.jsonl", "acc_norm"),
    "copa": ("llmfoundry/copa.jsonl", "acc"),
}

_UTILS = '''"""Document processing for d2prune's local lm-eval task configs."""
import re


def boolq_docs(dataset):
    def fix(doc):
        q = doc["query"]
        if q.startswith("Passage: "):
            q = q[len("Passage: "):]
        return {"prompt": q + "\\nAnswer:"}
    return dataset.map(fix)


def _hellaswag_preprocess(text):
    # identical to lm-eval's hellaswag/utils.py
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\\\[.*?\\\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_docs(dataset):
    def fix(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_preprocess(e) for e in doc["endings"]],
            "gold": int(doc["label"]),
        }
    return dataset.map(fix)
'''


def _mc_yaml(task: str, builder: str, split: str, path: str, text: str, target: str, choice: str,
             metrics: list[str], process: str | None = None) -> str:
    lines = [
        f"task: {task}",
        f"dataset_path: {builder}",
        "dataset_kwargs:",
        "  data_files:",
        f"    {split}: {json.dumps(path)}",
        f"{'test' if split == 'test' else 'validation'}_split: {split}",
        "output_type: multiple_choice",
        "num_fewshot: 0",  # the protocol (docs/method.md §5) is zero-shot; also the CLI's default without --num_fewshot
    ]
    if process:
        lines.append(f"process_docs: !function d2p_utils.{process}")
    lines += [f"doc_to_text: {json.dumps(text)}", f"doc_to_target: {json.dumps(target)}",
              f"doc_to_choice: {choice}", "metric_list:"]
    for m in metrics:
        lines += [f"  - metric: {m}", "    aggregation: mean", "    higher_is_better: true"]
    lines += ["metadata:", "  version: 1.0", ""]
    return "\n".join(lines)


def task_yamls(data_dir: str | os.PathLike) -> dict[str, str]:
    """``{file name: YAML text}`` of every local task, reading from ``data_dir``."""
    d = Path(data_dir).expanduser().resolve()
    f = {k: str(d / v[0]) for k, v in TASK_FILES.items()}
    acc, both = ["acc"], ["acc", "acc_norm"]
    y = {
        "boolq": _mc_yaml("local_boolq", "json", "validation", f["boolq"], "prompt", "gold", "choices", acc, "boolq_docs"),
        "rte": _mc_yaml("local_rte", "parquet", "validation", f["rte"],
                        "{{sentence1}}\nQuestion: {{sentence2}} True or False?\nAnswer:", "label", '["True", "False"]', acc),
        "hellaswag": _mc_yaml("local_hellaswag", "json", "validation", f["hellaswag"], "{{query}}", "gold", "choices", both,
                              "hellaswag_docs"),
        "winogrande": _mc_yaml("local_winogrande", "json", "validation", f["winogrande"], "gold", "continuation",
                               "context_options", acc),
        "arc_easy": _mc_yaml("local_arc_easy", "json", "test", f["arc_easy"], "{{query}}\nAnswer:", "gold", "choices", both),
        "arc_challenge": _mc_yaml("local_arc_challenge", "json", "test", f["arc_challenge"], "{{query}}\nAnswer:", "gold",
                                  "choices", both),
        "openbookqa": _mc_yaml("local_openbookqa", "json", "test", f["openbookqa"], "{{query}}", "gold", "choices", both),
        "piqa": _mc_yaml("local_piqa", "json", "validation", f["piqa"], "{{query}}Answer:", "gold", "choices", both),
        "copa": _mc_yaml("local_copa", "json", "validation", f["copa"], "{{query}}", "gold", "choices", acc),
    }
    return {f"{PREFIX}{k}.yaml": v for k, v in y.items()}


def default_task_data() -> Path | None:
    from ..io.data import find_shared_data

    shared = find_shared_data()
    return shared / "zeroshot" if shared and (shared / "zeroshot").is_dir() else None


def check_task_data(data_dir: str | os.PathLike | None, tasks: list[str]) -> Path:
    if data_dir is None:
        data_dir = default_task_data()
        if data_dir is None:
            raise D2PruneError("no zero-shot task data found: pass --task-data DIR (the layout of ../shared/data/zeroshot)")
    d = Path(data_dir)
    for t in tasks:
        p = d / TASK_FILES[t][0]
        if not p.is_file():
            raise D2PruneError(f"zero-shot data for {t} is missing: {p}; pass --task-data DIR with that layout")
    return d


def write_task_configs(data_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the local task YAMLs (+ their helper module) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in task_yamls(data_dir).items():
        (out / name).write_text(text)
    (out / "d2p_utils.py").write_text(_UTILS)
    return out


def parse_tasks(spec: str | list[str] | None) -> list[str]:
    names = list(STANDARD_TASKS) if spec in (None, "", "all") else (spec.split(",") if isinstance(spec, str) else list(spec))
    names = [n.strip().removeprefix(PREFIX) for n in names if n.strip()]
    bad = [n for n in names if n not in TASK_FILES]
    if bad:
        raise D2PruneError(f"unknown zero-shot task(s) {', '.join(bad)}: choose from {', '.join(TASK_FILES)}")
    return names


DEFAULT_BATCH_SIZE = 8  # lm-eval's batch size unless --batch-size says otherwise


@dataclass
class ZeroShotResult:
    tasks: dict[str, dict] = field(default_factory=dict)  # name -> {metric, value, acc, acc_norm, n}
    mean: float = 0.0
    limit: int | float | None = None
    batch_size: int = DEFAULT_BATCH_SIZE

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(results: dict, tasks: list[str], limit, batch_size) -> ZeroShotResult:
    """Our report from lm-eval's results dict: acc_norm where the standard task
    has it, else acc; the plain mean over the tasks."""
    out = ZeroShotResult(limit=limit, batch_size=batch_size)
    for t in tasks:
        r = results["results"][PREFIX + t]
        metric = TASK_FILES[t][1]
        row = {"metric": metric, "value": r[f"{metric},none"], "acc": r.get("acc,none"),
               "acc_norm": r.get("acc_norm,none"), "n": results.get("n-samples", {}).get(PREFIX + t, {}).get("effective")}
        out.tasks[t] = row
    out.mean = sum(v["value"] for v in out.tasks.values()) / max(len(out.tasks), 1)
    return out


def normalize_limit(limit: int | float | None) -> int | float | None:
    """``--limit``: a whole number of items (an int, recorded as such) or a
    fraction in (0, 1); anything else is an error."""
    if limit is None:
        return None
    if not (limit > 0 and (limit < 1 or float(limit).is_integer())):
        raise D2PruneError(f"--limit {limit} must be a whole number of items >= 1 or a fraction in (0, 1)")
    return int(limit) if limit >= 1 else limit


def check_zero_shot(tasks: str | list[str] | None = None, limit: int | float | None = None,
                    task_data: str | os.PathLike | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                    **_) -> tuple[list[str], Path]:
    """Validate zero-shot options before any work is done (a typo must not cost
    a whole prune): ``(task names, task-data folder)``."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise D2PruneError("zero-shot evaluation needs lm-eval: pip install 'd2prune[eval]'") from e
    normalize_limit(limit)
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise D2PruneError(f"--batch-size {batch_size!r} must be an integer >= 1")
    names = parse_tasks(tasks)
    return names, check_task_data(task_data, names)


def evaluate_zero_shot(model, tokenizer, tasks: str | list[str] | None = None, limit: int | float | None = None,
                       task_data: str | os.PathLike | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                       device: str | None = None) -> ZeroShotResult:
    """0-shot accuracy of an in-memory model through lm-eval's HF wrapper
    (no save / reload), with the local task configs."""
    names, data = check_zero_shot(tasks, limit, task_data, batch_size)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    limit = normalize_limit(limit)
    from ..io.modeling import pick_device

    home = next(model.parameters()).device
    dev = pick_device(device) if device else home
    with tempfile.TemporaryDirectory(prefix="d2prune-tasks-") as tmp:
        write_task_configs(data, tmp)
        try:  # lm-eval runs a model object where it lies: put it on the device, then back
            model.to(dev)
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(dev))
            res = lm_eval.simple_evaluate(model=lm, tasks=[PREFIX + t for t in names], num_fewshot=0, limit=limit,
                                          task_manager=TaskManager(include_path=tmp), log_samples=False,
                                          bootstrap_iters=0)
        finally:
            model.to(home)
    out = summarize(res, names, limit, batch_size)
    for t, r in out.tasks.items():
        log.info("%-14s %s %.4f", t, r["metric"], r["value"])
    log.info("zero-shot mean %.4f over %d tasks (limit %s)", out.mean, len(out.tasks), limit)
    return out
