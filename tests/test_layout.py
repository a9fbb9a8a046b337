"""The layout of the packages: no import cycle, the aggregator without torch, one defense per
top-level module of defenses/ (adding one is one file there and one in search_spaces/)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("defenses", "orchestrator", "search_spaces")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, file: Path, known: set[str]) -> set[str]:
    """Every project module ``file`` imports, wherever the import statement is: at module
    level, inside a function, under ``TYPE_CHECKING``. A script's ``__main__.py`` counts too."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # ``from P import m`` of a submodule depends on P.m; of a name defined in P, on P
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def import_cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    mods = _modules()
    graph = {m: _imports(m, f, set(mods)) for m, f in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
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
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_packages_have_no_import_cycle():
    assert import_cycles() == []


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    pkg = tmp_path / "orchestrator"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from orchestrator.b import g\n")  # inside a function
    (pkg / "b.py").write_text("from . import a\n")
    for other in ("defenses", "search_spaces"):
        (tmp_path / other).mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert import_cycles() == [["orchestrator.a", "orchestrator.b"]]


def test_the_aggregator_and_exporters_import_without_torch():
    # they run on a laptop that holds only the CSVs; a torch import would also cost seconds
    code = ("import sys, orchestrator.aggregate.cli, orchestrator.export; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# --- adding a defense is one file in defenses/ and one in search_spaces/ ---------------------

NOISE_AT = '''"""Training on inputs with uniform noise: a throwaway defense written by a test."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from defenses.core.base import LossDefense


@dataclasses.dataclass(frozen=True)
class NoiseATParams:
    sigma: float = 0.1


class NoiseAT(LossDefense):
    name = "noise_at"
    Params = NoiseATParams

    def loss(self, x, y, epoch):
        noisy = (x + self.params.sigma * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
        return F.cross_entropy(self.model(noisy), y)
'''

TRIAL = '''
import json, sys
from defenses.core import registry
from orchestrator.spec import build_space, parse
from orchestrator.trial import run_trial

spec = parse({"dataset": "mnist5k", "model": "small_cnn", "epochs": 1, "train_samples": 200,
              "eval_samples": 40, "batch_size": 50,
              "threat_model": {"eps": 0.3, "attacks": ["fgsm"], "masking_samples": 0},
              "defenses": ["noise_at"]})
assert "noise_at" in registry.names(), registry.names()
assert set(build_space(spec, "noise_at")) == {"sigma"}
rec = run_trial({"defense": "noise_at", "hp": {"sigma": 0.2}, "spec": spec, "run_dir": sys.argv[1]})
print(json.dumps({"status": rec.status, "clean": rec.clean_acc, "error": rec.error}))
'''


def _package_copy(tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "project"
    for pkg in ("defenses", "search_spaces"):
        shutil.copytree(ROOT / pkg, copy / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _python(code: str, path: Path, *args: str) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "PYTHONPATH": f"{path}{os.pathsep}{ROOT}"}  # the copy's packages first
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=path,
                          capture_output=True, text=True, timeout=600)


def test_adding_a_defense_is_one_file_in_defenses_and_one_in_search_spaces(tmp_path):
    import json

    copy = _package_copy(tmp_path)
    (copy / "defenses" / "noise_at.py").write_text(NOISE_AT)
    (copy / "search_spaces" / "noise_at.py").write_text(
        'SPACE = {"sigma": {"low": 0.05, "high": 0.3}}\nKEY_HPARAMS = ["sigma"]\n')
    done = _python(TRIAL, copy, str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # completed, and above chance (10 %) after four steps: it trained with its own loss
    assert result["status"] == "completed" and result["clean"] > 0.15, result


def test_a_top_level_module_that_is_no_defense_is_refused(tmp_path):
    copy = _package_copy(tmp_path)
    (copy / "defenses" / "helpers.py").write_text("def helper():\n    return 1\n")
    done = _python("from defenses.core import registry; registry.names()", copy)
    assert done.returncode != 0
    assert ("RegistryError: defenses/helpers.py defines no defense (a registered Defense subclass "
            "with a name); library code goes into a subpackage") in done.stderr
