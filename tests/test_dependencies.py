"""pyproject.toml's core dependencies are exactly the third-party packages jlora/ imports (anywhere: module level
or inside functions), mapped from import names to distributions by the installed packages' own metadata; imports
guarded by ``except ImportError`` belong to an extra instead. transformers and torch are test oracles, never core
dependencies, and importing the library and the command does not load them."""

import ast
import importlib.metadata
import pathlib
import re
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _name(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()   # PEP 503


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}


def _catches_import_errors(handler: ast.ExceptHandler) -> bool:
    kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(k, ast.Name) and k.id in _IMPORT_ERRORS for k in kinds)


def _guarded(tree: ast.AST) -> set[int]:
    """Line numbers of imports inside a ``try`` whose handlers catch ImportError (optional imports)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(map(_catches_import_errors, node.handlers)):
            lines |= {n.lineno for stmt in node.body for n in ast.walk(stmt)
                      if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


def third_party_imports() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``({top-level name: [file:line, ...]}, same for optional imports)`` over every module under jlora/."""
    required, optional = {}, {}
    for path in sorted((ROOT / "jlora").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        guarded = _guarded(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "jlora":
                    continue
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                (optional if node.lineno in guarded else required).setdefault(top, []).append(where)
    return required, optional


def _distributions(imports: dict[str, list[str]]) -> dict[str, set[str]]:
    """``{import name: {normalized distribution names}}`` from the installed packages' metadata."""
    table = importlib.metadata.packages_distributions()
    missing = sorted(set(imports) - set(table))
    assert not missing, f"imported but not installed (so no distribution is known): {missing} at " \
                        f"{[imports[m] for m in missing]}"
    return {top: {_name(d) for d in table[top]} for top in imports}


def test_core_dependencies_are_exactly_the_imports():
    required, _ = third_party_imports()
    declared = {_name(Requirement(r).name) for r in _project()["dependencies"]}
    dists = _distributions(required)
    undeclared = {top: required[top][:3] for top, names in dists.items() if not names & declared}
    assert not undeclared, f"jlora/ imports these but pyproject.toml's dependencies lack them: {undeclared}"
    unused = declared - set().union(*dists.values())
    assert not unused, f"core dependencies that nothing under jlora/ imports: {sorted(unused)}"


def test_optional_imports_are_in_an_extra():
    _, optional = third_party_imports()
    extras = {_name(Requirement(r).name) for reqs in _project()["optional-dependencies"].values() for r in reqs}
    for top, names in _distributions(optional).items():
        assert names & extras, f"{top} (optional, {optional[top][:3]}) is in no extra of pyproject.toml"


def test_transformers_and_torch_are_test_oracles_only():
    project = _project()
    core = {_name(Requirement(r).name) for r in project["dependencies"]}
    test = {_name(Requirement(r).name) for r in project["optional-dependencies"]["test"]}
    assert not core & {"transformers", "torch", "peft"}
    assert {"transformers", "torch", "peft"} <= test
    required, optional = third_party_imports()
    assert not {"transformers", "torch", "peft"} & (set(required) | set(optional))


def test_importing_the_library_and_command_loads_neither():
    code = ("import sys, jlora, jlora.cli, jlora.cli.run, jlora.cli.scoring, jlora.checkpoint, jlora.data, "
            "jlora.hf, jlora.hf.gguf, jlora.peft, jlora.parallel, jlora.models.generate; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
