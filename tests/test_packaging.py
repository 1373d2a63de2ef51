"""What a pip-installed jlora (a wheel, no repository checkout) needs is in the package: the default general prompt
set of the side-effect report (``eval.general``) as package data, and the licence file pyproject.toml declares."""

import fnmatch
import pathlib
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

import jlora
from jlora import resources
from jlora.cli import config as runconfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_default_general_set_is_the_packaged_copy_of_the_examples_one():
    """A config without eval.general (a pip-installed `jlora train`) resolves to the file shipped inside the
    package, whatever the working directory, and it is byte for byte the repository's examples/data/general.jsonl
    (so the demo's numbers do not depend on which one a config names)."""
    general = pathlib.Path(runconfig.parse({}).eval.general)
    assert general.is_absolute() and general.is_file()
    assert general == resources.GENERAL and general.is_relative_to(pathlib.Path(jlora.__file__).parent)
    assert general.read_bytes() == (ROOT / "examples" / "data" / "general.jsonl").read_bytes()
    assert runconfig.parse({"eval": {"general": "examples/data/general.jsonl"}}).eval.general == (
        "examples/data/general.jsonl")                                          # a config that names one keeps it


def test_package_data_ships_every_resource_file():
    """setuptools puts only .py files in the wheel unless package-data names the others: every data file under
    jlora/resources/ matches a pattern of [tool.setuptools.package-data]."""
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["jlora.resources"]
    data = [p.name for p in (ROOT / "jlora" / "resources").iterdir() if p.is_file() and p.suffix not in (".py", ".pyc")]
    assert "general.jsonl" in data
    missing = [name for name in data if not any(fnmatch.fnmatch(name, pattern) for pattern in patterns)]
    assert not missing, f"add {missing} to [tool.setuptools.package-data] in pyproject.toml, or the wheel lacks them"


def test_the_declared_licence_file_is_the_apache_license():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_the_wheel_holds_the_general_set_and_the_licence(tmp_path):
    """The wheel itself (built in a few seconds, without network: by the installed setuptools, which pyproject's
    license-files needs at 77 or later)."""
    pytest.importorskip("setuptools", minversion="77")
    source = tmp_path / "source"      # a copy: pip builds in the tree, and the checkout keeps no build/ folder
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (source / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "jlora", source / "jlora", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(source)], check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheel").glob("jlora-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert z.read("jlora/resources/general.jsonl") == resources.GENERAL.read_bytes()
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), names
