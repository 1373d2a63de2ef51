"""The architecture holds: the core reads alone (its import graph), and its size is what docs/architecture.md says."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "jlora"
CORE = ("config", "tree", "adapter", "lora", "transform", "fusion", "train", "loss")


def _jlora_imports(path: pathlib.Path) -> set[str]:
    """The first component under ``jlora.`` of every jlora module that ``path`` imports (anywhere in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "jlora"]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "jlora" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_core_imports_only_core():
    for name in CORE:
        outside = _jlora_imports(PKG / f"{name}.py") - set(CORE)
        assert not outside, f"jlora/{name}.py imports {sorted(outside)}, outside the core {CORE}"


def test_import_graph_checker_sees_every_import_form(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import jlora.models\nfrom jlora import peft\nfrom jlora.variants.dora import x\n"
                     "def f():\n    from jlora.cli import run\n")
    assert _jlora_imports(probe) == {"models", "peft", "variants", "cli"}


def test_core_size_is_the_documented_one():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    bound = int(re.search(r"core is at most ([\d,]+) lines", doc).group(1).replace(",", ""))
    total = sum(len((PKG / f"{name}.py").read_text().splitlines()) for name in CORE)
    assert total <= bound, f"the core has {total} lines; docs/architecture.md promises at most {bound}"
    assert bound - total < 200, f"docs/architecture.md's bound {bound} is stale: the core has {total} lines"


def test_docs_point_inside_the_repository():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        outside = ("../" + "shared", "shared/" + "DESIGN")     # the team's folder beside the repository
        assert not any(o in text for o in outside), path
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if not target.startswith(("http://", "https://")):
                assert (path.parent / target).exists(), f"{path.name} links to missing {target}"
