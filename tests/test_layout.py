"""The layers of docs/ARCHITECTURE.md: mri/ below models/ below evaluation/ and simulation/; no module imports
from a layer above its own (imports inside functions included)."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYER = {"mri": 1, "models": 2, "evaluation": 3, "simulation": 3}


def imported_packages(path):
    """The top-level package of every module `path` imports, anywhere in the file."""
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def modules():
    for package in LAYER:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            yield from (os.path.join(folder, f) for f in files if f.endswith(".py"))


def test_no_module_imports_a_higher_layer():
    found = list(modules())
    assert len(found) > 30 and any(p.endswith(os.path.join("mri", "data", "store.py")) for p in found)
    wrong = []
    for path in found:
        own = LAYER[os.path.relpath(path, ROOT).split(os.sep)[0]]
        wrong += [f"{os.path.relpath(path, ROOT)} imports {p}" for p in imported_packages(path)
                  if LAYER.get(p, 0) > own]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("source, expected", [("from models import x\n", ["models"]),
                                              ("def f():\n    import evaluation.protocol\n", ["evaluation"]),
                                              ("from . import x\nimport numpy\n", ["numpy"])])
def test_imports_are_found_where_they_hide(tmp_path, source, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert list(imported_packages(str(path))) == expected
