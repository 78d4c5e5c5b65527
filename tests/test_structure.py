"""The package's shape, enforced: imports flow one way between the stages, no module imports itself
back through a cycle, and the light entry points (``moorize --help``, the ONNX Runtime runtime)
never import torch."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOTS = {"moorize": REPO / "moorize", "moorize.exporters": REPO / "exporters"}

# stage -> the stages it may import (besides itself); "moorize" is the package root (the lazy public API)
ALLOWED = {
    "errors": set(),
    "version": set(),
    "process": set(),
    "compat": set(),  # what differs between supported torch / transformers releases
    "options": {"errors", "selectors"},
    "selectors": {"errors"},  # a name or pattern the user gives must match something: one helper, one message
    "assets": {"errors"},
    "environment": {"assets", "errors", "version", "selectors"},  # `moorize env`: versions, devices, shipped checkpoints
    "io": {"errors", "selectors"},
    "conversion": {"options", "io", "errors", "version", "process", "selectors"},
    "model": {"options", "io", "errors", "selectors", "compat"},
    "training": {"options", "model", "io", "errors", "selectors"},
    "runtime": {"io", "errors", "selectors"},  # executes an export: ONNX Runtime and numpy, never torch
    "exporters": {"options", "model", "io", "errors", "version", "compat", "runtime"},
    # MoORE -> LoRA: the model's task matrices, the source read as conversion reads it, conversion's devices
    "lora": {"options", "model", "conversion", "io", "errors", "version", "compat"},
    "serving": {"runtime", "io", "errors", "version", "process", "options", "selectors"},  # runs exports; never the exporters
    "quickstart": {"conversion", "model", "io", "errors", "assets"},
    "cli": {"conversion", "model", "training", "exporters", "lora", "runtime", "serving", "io", "errors", "quickstart",
            "version", "process", "options", "environment", "selectors"},
    "__main__": {"cli"},
    "moorize": {"errors", "version", "io", "conversion", "model", "training", "lora"},  # the lazy public API
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = [p for p in path.relative_to(root).with_suffix("").parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = modules()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def stage(name: str) -> str:
    parts = name.split(".")
    if parts[:2] == ["moorize", "exporters"]:
        return "exporters"
    return parts[1] if len(parts) > 1 else "moorize"


def imports_of(name: str) -> set[str]:
    """Every moorize module ``name`` imports, at module level or inside functions."""
    tree = ast.parse(MODULES[name].read_text())
    base = name.split(".") if is_package(name) else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("moorize")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("moorize"):
                continue
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t not in MODULES and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in MODULES and t != name:
                found.add(t)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def test_every_module_is_in_a_known_stage():
    assert {stage(m) for m in MODULES} <= set(ALLOWED), sorted({stage(m) for m in MODULES} - set(ALLOWED))


def test_imports_flow_one_way_between_stages():
    wrong = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() for t in ts
                   if stage(t) != stage(m) and stage(t) not in ALLOWED[stage(m)])
    assert wrong == []


# Deprecated alias modules: they re-export a module that moved, for one release, and hold nothing of their own.
ALIASES = {"moorize.exporters.ort": "moorize.runtime"}


def test_exporters_hold_no_command_and_no_runtime():
    """The export backends write exports; the click commands live in moorize/cli and the runtime that runs an
    export in moorize/runtime (its one alias module aside)."""
    for name, path in MODULES.items():
        if stage(name) != "exporters" or name in ALIASES:
            continue
        tree = ast.parse(path.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "click" not in imported, f"{name} imports click: commands belong in moorize/cli"
        assert GRAPH[name] & {"moorize.runtime.session", "moorize.runtime.generation"} == set(), name
        defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert not defined & {"generate", "generate_ids", "sample_nucleus", "MoOREOrtModel"}, name


def test_alias_modules_only_re_export():
    for alias, target in ALIASES.items():
        tree = ast.parse(MODULES[alias].read_text())
        assert not [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))], alias
        assert all(t.startswith(target) for t in GRAPH[alias]), GRAPH[alias]


def test_the_alias_of_the_old_runtime_module_still_works():
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            "try:\n    import moorize.exporters.ort\nexcept DeprecationWarning as w:\n    print(w)\n"
            "import sys; sys.modules.pop('moorize.exporters.ort', None); warnings.simplefilter('ignore')\n"
            "from moorize.exporters.ort import MoOREOrtModel; from moorize.runtime import MoOREOrtModel as M\n"
            "print(MoOREOrtModel is M)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "moved to moorize.runtime" in res.stdout and res.stdout.strip().endswith("True"), res.stdout


def test_no_import_cycles():
    """Depth-first search over every import (function-level ones too): no module reaches itself."""
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert cycles == []


@pytest.mark.parametrize("code", [
    "import moorize.cli; moorize.cli.cli(['--help'], standalone_mode=False)",
    "import moorize.cli; moorize.cli.cli(['inspect', '--help'], standalone_mode=False)",
    "import moorize.cli; moorize.cli.cli(['train', '--help'], standalone_mode=False)",
    "import moorize.cli; moorize.cli.cli(['convert', '--help'], standalone_mode=False)",
    "import moorize.runtime.session, moorize.runtime.generation, moorize.runtime.sampling",
    "import moorize.cli; moorize.cli.cli(['run', '--help'], standalone_mode=False)",
    "import moorize.cli; moorize.cli.cli(['export', '--help'], standalone_mode=False)",
    "import moorize.cli; moorize.cli.cli(['serve', '--help'], standalone_mode=False)",
    "import moorize.serving.app, moorize.serving.engine, moorize.serving.server",
    "import moorize; moorize.MoorizeError",
    # inspect reads moorize.json only: a real factored checkpoint, summarised without torch
    f"import moorize.cli; moorize.cli.cli(['inspect', {str(REPO / 'tests/fixtures/v0_1/factored')!r}], "
    "standalone_mode=False)",
])
def test_light_entry_points_do_not_import_torch(code):
    probe = f"import sys; {code}; print('torch' in sys.modules, 'transformers' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "False False", res.stdout


def test_the_public_api_is_complete():
    import moorize

    for name in moorize.__all__:
        assert getattr(moorize, name) is not None, name


def test_ruff_is_clean():
    """The lint configuration in pyproject.toml (pyflakes, pycodestyle, import order, bugbear) holds everywhere."""
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_wheel_holds_every_module(tmp_path):
    """What `pip install moorize` (not editable) gets: every module of the tree. A package missing from
    pyproject's list installs without it, and the editable install CI uses would never notice."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    tree = tmp_path / "src"
    for rel in tracked:
        if (REPO / rel).is_file():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            (tree / rel).write_bytes((REPO / rel).read_bytes())
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(tree), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "wheel")], capture_output=True, text=True)
    assert built.returncode == 0, "the tracked tree does not build (an untracked package?):\n" + built.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("moorize-*.whl")
    packed = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    expected = {name.replace(".", "/") + ("/__init__.py" if is_package(name) else ".py") for name in MODULES}
    assert expected - packed == set(), "modules the wheel lacks (add their package to pyproject's list)"
