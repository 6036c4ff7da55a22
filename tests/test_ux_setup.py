"""Issue 17, item 1: what `make demo` / `make test` install, the packaging metadata, pytest's summary.

Fresh-clone checks: `make -n` with a virtual environment that does not exist yet prints every
command the targets would run, so nothing is installed by these tests.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def dry_run(target: str, tmp_path: Path) -> str:
    proc = subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'fresh-venv'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@needs_make
def test_demo_installs_no_system_package_and_no_browser(tmp_path):
    commands = dry_run("demo", tmp_path)
    assert "pip install" in commands  # it does build the venv ...
    assert "mixfx analyze examples/resnet_cnn.py" in commands
    for forbidden in ("apt-get", "playwright", "chromium"):  # ... and nothing else
        assert forbidden not in commands, commands


@needs_make
def test_make_test_installs_the_browser_and_says_what_it_installs(tmp_path):
    commands = dry_run("test", tmp_path)
    assert "pip install -q playwright" in commands
    assert "apt-get install -y -q chromium" in commands
    assert "installing playwright" in commands and "installing the system packages chromium" in commands
    assert "will be skipped" in commands  # without chromium (or root) the browser test skips


def test_license_is_an_spdx_string_and_setuptools_new_enough():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "MIT"
    requires = " ".join(meta["build-system"]["requires"])
    minimum = re.search(r"setuptools>=(\d+)", requires)
    assert minimum and int(minimum.group(1)) >= 77, requires  # PEP 639 strings need setuptools 77


def test_metadata_build_prints_no_license_deprecation(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("this environment's setuptools predates SPDX license strings")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    for pkg in ("mixfx", "passes"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "out").mkdir()
    proc = subprocess.run([sys.executable, "-c", "from setuptools import build_meta as b; "
                           "print(b.prepare_metadata_for_build_wheel('out'))"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "deprecated" not in (proc.stdout + proc.stderr).lower()
    metadata = next((tmp_path / "out").glob("*/METADATA")).read_text()
    assert "License-Expression: MIT" in metadata


def test_make_test_shows_pytests_summary(tmp_path):
    """`-q` once (pyproject's addopts), not twice: `-qq` hides the "N passed" line."""
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    pytest_line = next(line for line in recipe.splitlines() if "pytest" in line)
    assert "-q" not in pytest_line.split()
    addopts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    (tmp_path / "test_one.py").write_text("def test_one():\n    assert True\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", f"addopts={addopts}",
                           str(tmp_path / "test_one.py")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert re.search(r"\b1 passed\b", proc.stdout), proc.stdout
