"""The code's structure as a contract: one owner per concept, checked on the source.

The layering (no module imports a higher layer, hence no import cycle) is checked by import-linter in
``make lint``; these tests pin what import-linter cannot see.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pneumodet import rundir

SRC = Path(__file__).resolve().parents[1] / "src" / "pneumodet"
RUN_FILE_NAMES = (rundir.CONFIG, rundir.METRICS, rundir.DONE, rundir.BEST_MODEL, rundir.LAST_MODEL, "last.ckpt",
                  rundir.INT8_MODEL)


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "static" not in p.parts)


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a module that are not docstrings (f-string parts included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = _docstring_nodes(tree)
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_only_the_run_folder_owner_spells_its_file_names() -> None:
    """A file of the run folder is named in ``rundir.py`` only; everyone else asks a ``RunDir``."""
    found = [f"{path.relative_to(SRC)}:{line}: {name!r} in {text!r}"
             for path in _modules() if path.name != "rundir.py"
             for line, text in _code_strings(path) for name in RUN_FILE_NAMES if name in text]
    assert not found, "\n".join(found)


def test_the_check_above_can_fail(tmp_path: Path) -> None:
    """The control: a module that spells a run file in code is found; in its docstring it is not."""
    module = tmp_path / "m.py"
    module.write_text('"""Reads best_model.pt."""\nPATH = "runs/x/best_model.pt"\n')
    assert [text for _, text in _code_strings(module) if rundir.BEST_MODEL in text] == ["runs/x/best_model.pt"]


@pytest.mark.parametrize("writer", ["os.replace(", ".write_text(", ".write_bytes(", "tempfile.mkstemp("])
def test_files_are_written_only_through_safeio(writer: str) -> None:
    """Every write goes through :mod:`pneumodet.safeio` (temporary file, fsync, rename): no module replaces
    or writes a file itself."""
    found = [f"{path.relative_to(SRC)}:{i}: {line.strip()}"
             for path in _modules() if path.name != "safeio.py"
             for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
             if writer in line and not line.lstrip().startswith("#")]
    assert not found, "\n".join(found)
