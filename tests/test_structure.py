"""The code's shape: no import cycle among the package's modules, every
module importable on its own, and a method added from outside the package
(registered here, in the test module) reachable from the CLI parser and run
by the engine with no change anywhere else."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from conftest import C4, STORIES, WIKI, needs_shared, tiny_model
from d2prune import D2PruneError, PruneConfig, find_blocks, find_prunable, prune
from d2prune.cli import build_parser, main, method_options
from d2prune.config import METHOD_CONFIGS, MethodConfig, method_config, method_label, option
from d2prune.ops.masks import row_mask
from d2prune.engine.method import REGISTRY, LayerPruner, Method, register
from d2prune.io.modeling import weight_matrix
from d2prune.sweep import split_methods

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "d2prune"


# --------------------------------------------------------------------------- imports
def module_names() -> dict[str, Path]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = p.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in its text (inside
    functions too: a deferred import still closes a cycle). Importing a
    submodule from outside its subpackage also runs the subpackage's __init__."""
    modules = module_names()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:  # "d2prune.config.Sparsity" -> "d2prune.config"
                    t = t.rpartition(".")[0]
                if not t or t == name:
                    continue
                graph[name].add(t)
                parent = t.rpartition(".")[0]
                while parent and parent != "d2prune" and not name.startswith(parent + "."):
                    graph[name].add(parent)
                    parent = parent.rpartition(".")[0]
    graph.pop("d2prune", None)  # the package root imports its public API; nothing imports the root
    for deps in graph.values():
        deps.discard("d2prune")
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"d2prune.engine.calibration", "d2prune.methods.d2prune.search", "d2prune.pruning", "d2prune.methods.ria"} <= set(graph)
    assert cycles(graph) == []
    # the layering the issue asked for: the searches and the plain loop both sit on calibration
    assert "d2prune.engine.calibration" in graph["d2prune.methods.d2prune.search"] and "d2prune.engine.calibration" in graph["d2prune.pruning"]
    assert "d2prune.pruning" not in graph["d2prune.methods.d2prune.search"]
    assert not any(m.startswith("d2prune.methods.d2prune.search") for m in graph["d2prune.methods.d2prune.method"])


def test_the_cycle_check_sees_deferred_imports():
    graph = import_graph()
    graph["d2prune.methods.d2prune.method"] = graph["d2prune.methods.d2prune.method"] | {"d2prune.methods.d2prune.search"}
    assert cycles(graph), "a cycle closed by an import inside a function must be found"


# Each module is imported in a process of its own in which no module of the package has been
# imported yet: forked from an interpreter that loaded only third-party libraries, so every child
# starts as a fresh interpreter would, as far as d2prune is concerned, without paying their import
# time once per module. Which third-party modules to load first is asked of a throwaway interpreter
# that imports the package (everything it pulled in that is not d2prune).
_THIRD_PARTY = """
import sys
import d2prune  # noqa: F401
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] not in ("d2prune", "__main__") and "." in m
                      and not m.startswith("_") and m.split(".")[0] in ("torch", "transformers", "safetensors"))))
"""

_IMPORT_EACH = """
import importlib, os, sys
import torch, tqdm, transformers.pytorch_utils  # noqa: F401
for m in os.environ.get("PREIMPORT", "").split():
    try:
        importlib.import_module(m)
    except Exception:  # a module that only imports in some order: the child will import it itself
        pass
assert not [m for m in sys.modules if m.split(".")[0] == "d2prune"]
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException as e:
            print(f"{name}: {type(e).__name__}: {e}", flush=True)
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("failed:", failed)
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_every_module_imports_alone_in_a_fresh_process():
    import os

    names = sorted(m for m in module_names() if m != "d2prune.__main__")  # importing it runs the command
    third = subprocess.run([sys.executable, "-c", _THIRD_PARTY], capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr
    env = {**os.environ, "PREIMPORT": third.stdout.strip()}
    r = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *names], capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("failed: []"), r.stdout


# --------------------------------------------------------------------------- a method from outside
@dataclass(frozen=True)
class KeepFirstConfig(MethodConfig):
    """Toy: Wanda's score, except that the first ``keep`` input columns are never pruned."""

    name: ClassVar[str] = "keep-first"
    keep: int = option(2, "keep-first: leading input columns never pruned")


class KeepFirstLayer(LayerPruner):
    input_stats = ("sq_norm",)
    label = "keep-first"

    def __init__(self, name: str, sparsity, keep: int):
        super().__init__(name, sparsity)
        self.keep = keep

    def prune(self, W, stats):
        score = W.abs() * stats["sq_norm"].value.sqrt()
        score[:, : self.keep] = float("inf")
        mask = row_mask(score, self.sparsity)
        W[mask] = 0
        return W, mask


class KeepFirst(Method):
    config_type = KeepFirstConfig

    def layer(self, name, module, block_index):
        return KeepFirstLayer(name, self.sparsity, self.config.keep)


@pytest.fixture
def keep_first():
    """Registered for one test only (the registries are global)."""
    register(KeepFirst)
    try:
        yield
    finally:
        REGISTRY.pop(KeepFirstConfig)
        METHOD_CONFIGS.pop(KeepFirstConfig.name)


def test_toy_method_through_the_cli_parser_and_the_engine(keep_first, capsys):
    args = build_parser().parse_args(["prune", "--method", "keep-first", "--keep", "3", "--sparsity", "0.5"])
    cfg = method_config(args.method, **method_options(args))
    assert cfg == KeepFirstConfig(keep=3) and split_methods(method_label(cfg)) == [cfg]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--help"])
    assert "--keep KEEP keep-first: leading input columns never pruned (default 2)" in " ".join(
        capsys.readouterr().out.split())
    with pytest.raises(D2PruneError, match="takes no option"):  # its flag means nothing to another method
        wanda = build_parser().parse_args(["prune", "--method", "wanda", "--keep", "3"])
        method_config(wanda.method, **method_options(wanda))

    model = tiny_model("llama")
    layers = {f"{i}.{n}": m for i, b in enumerate(find_blocks(model).layers) for n, m in find_prunable(b).items()}
    dense = {n: weight_matrix(m).clone() for n, m in layers.items()}
    report = prune(model, PruneConfig(method=cfg, sparsity=args.sparsity, device="cpu"), torch.randint(0, 128, (3, 16)))
    assert len(report.layers) == len(layers)
    assert {r.how for r in report.layers} == {"keep-first"} and report.layers[0].error is not None
    for n, m in layers.items():
        W = weight_matrix(m)
        assert torch.equal(W[:, :3], dense[n][:, :3]), n
        assert torch.all((W == 0).sum(1) == W.shape[1] // 2), n


@needs_shared
def test_toy_method_through_the_whole_command(keep_first, tmp_path, capsys):
    rc = main(["prune", "--model", str(STORIES), "--method", "keep-first", "--keep", "4", "--sparsity", "0.5",
               "--calib-file", str(C4), "--nsamples", "2", "--seqlen", "32", "--eval-file", str(WIKI),
               "--eval-windows", "1", "--out", str(tmp_path / "out"), "--json", "-q"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert '"name": "keep-first"' in out.out and (tmp_path / "out" / "d2prune.json").is_file()


# --------------------------------------------------------------------------- layering
# The package's folders are a map of its architecture; each may import only the layers below it
# (and itself). Rank 0: the foundation modules at the top level; the applications (the public
# prune() entry point, the pipeline, CLI, sweep, fine-tuning, demo) sit above everything.
FOUNDATION = {"d2prune.errors", "d2prune.config"}
LAYERS = {"ops": 1, "io": 2, "engine": 3, "deploy": 3, "evaluation": 4, "methods": 5}
APPLICATIONS = 9


def layer_of(module: str) -> tuple[str, int]:
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS):
        return parts[1], LAYERS[parts[1]]
    return ("foundation", 0) if module in FOUNDATION else ("applications", APPLICATIONS)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, deps in sorted(graph.items()):
        name, rank = layer_of(m)
        for d in sorted(deps):
            dname, drank = layer_of(d)
            if dname != name and drank >= rank:
                bad.append(f"{m} ({name}) imports {d} ({dname})")
    return bad


def test_every_subpackage_imports_only_layers_below_it():
    graph = import_graph()
    assert {layer_of(m)[0] for m in graph} == set(LAYERS) | {"foundation", "applications"}, "a folder has no layer"
    assert upward_imports(graph) == []


def test_the_layering_check_sees_an_upward_import():
    graph = import_graph()
    graph["d2prune.io.resume"] = graph["d2prune.io.resume"] | {"d2prune.engine.calibration"}
    graph["d2prune.engine.method"] = graph["d2prune.engine.method"] | {"d2prune.deploy.compress"}
    assert len(upward_imports(graph)) == 2
