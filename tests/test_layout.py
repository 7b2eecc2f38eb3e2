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


def joined_command_lines(path):
    """Lines of a module docstring (what --help prints) where a `\\` meant as the shell's line continuation was
    read by Python as joining two lines: the second line's indent is left in the middle of the first."""
    doc = ast.get_docstring(ast.parse(open(path).read(), path), clean=False) or ""
    return [line for line in doc.splitlines() if "python " in line and "      --" in line]


def test_help_examples_keep_their_line_continuations(tmp_path):
    scripts = [os.path.join(d, f) for d in (ROOT, os.path.join(ROOT, "tools"), os.path.join(ROOT, "reference"))
               for f in sorted(os.listdir(d)) if f.endswith(".py")]
    assert len(scripts) > 12
    wrong = {os.path.relpath(p, ROOT): joined_command_lines(p) for p in scripts}
    assert not {k: v for k, v in wrong.items() if v}
    bad = tmp_path / "bad.py"
    bad.write_text('"""Usage.\n\n    python x.py --a 1 \\\n        --b 2\n"""\n')      # a single backslash in the source
    assert joined_command_lines(str(bad)) == ["    python x.py --a 1         --b 2"]
