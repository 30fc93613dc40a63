"""The package's layers: no module imports a module of a higher layer, and the package's own
modules are imported at module level (the one exception says why)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mosa_scale"

# lowest first; a module may import its own layer and those below (README: Layout)
LAYERS: list[tuple[str, ...]] = [
    ("mosa_scale", "mosa_scale.config"),  # errors and the YAML loader
    ("mosa_scale.sparse", "mosa_scale.loss"),
    ("mosa_scale.backbones",),
    ("mosa_scale.adapters",),
    ("mosa_scale.data",),
    ("mosa_scale.config.run",),  # the run config composes every section
    ("mosa_scale.optim", "mosa_scale.model"),
    ("mosa_scale.ckpt",),
    ("mosa_scale.engine", "mosa_scale.eval"),
    ("mosa_scale.loop", "mosa_scale.plan", "mosa_scale.sweep", "mosa_scale.study"),
]
# function-level imports of the package's own modules that are there on purpose
DEFERRED: set[tuple[str, str]] = set()


def layer(module: str) -> int:
    best = (-1, -1)  # (prefix length, layer)
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best[0]:
                best = (len(p), i)
    assert best[1] >= 0, f"{module} is in no layer: add it to LAYERS"
    return best[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def own_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported mosa_scale module, whether the import sits inside a function) of one file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            elif isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            else:
                names = []
            found.extend((n, in_function) for n in names if n == "mosa_scale" or n.startswith("mosa_scale."))
            visit(child, inner)

    visit(tree, False)
    return found


def test_the_layers_cover_every_module_and_the_layer_list_is_checked():
    modules = [module_name(p) for p in sorted(PACKAGE.rglob("*.py"))]
    assert len(modules) > 60 and "mosa_scale.model.assembly" in modules
    assert [
        layer(m)
        for m in (
            "mosa_scale.config.errors",
            "mosa_scale.config.run",
            "mosa_scale.ckpt.consolidate",
            "mosa_scale.loop.trainer",
        )
    ] == [0, 5, 7, 9]


def test_no_module_imports_a_higher_layer():
    upward, deferred = [], set()
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        for target, in_function in own_imports(path):
            if layer(target) > layer(me):
                upward.append(f"{me} (layer {layer(me)}) imports {target} (layer {layer(target)})")
            if in_function:
                deferred.add((me, target))
    assert upward == []
    assert deferred == DEFERRED


def test_checkpoint_tools_import_no_training_code():
    code = (
        "import json, sys, mosa_scale.ckpt, mosa_scale.ckpt.consolidate, mosa_scale.ckpt.inspect; "
        "print(json.dumps(sorted({m.split('.')[1] for m in sys.modules if m.startswith('mosa_scale.')})))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    packages = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "ckpt" in packages and "model" in packages
    assert not packages & {"loop", "engine", "eval", "plan", "sweep", "study"}, packages
