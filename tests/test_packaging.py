"""`pip install .` (not only the editable install of `make`) carries every module and the UI.

setuptools takes only the packages pyproject.toml names; a list that forgets a subpackage builds a
wheel that imports fine from a checkout and fails everywhere else.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("image_classifier", "training_export", "client")


def test_the_wheel_holds_every_module_and_the_page(tmp_path: Path):
    source = tmp_path / "source"
    for name in (*PACKAGES, "requirements"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         str(source), "--wheel-dir", str(tmp_path / "wheel")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        path.relative_to(source).as_posix()
        for package in PACKAGES
        for path in (source / package).rglob("*")
        if path.suffix in {".py", ".html"}
    }
    assert "image_classifier/core/classifier.py" in expected
    assert "image_classifier/static/ui.html" in expected
    assert expected - in_wheel == set()
