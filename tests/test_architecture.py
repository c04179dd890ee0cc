"""The house's shape: imports point down (http -> serving -> core) and service.py only declares.

The contracts live in pyproject.toml and `lint-imports` (import-linter) checks them; the second
test proves the check can fail, on a copy of the package given one upward import.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
CONTRACTS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]


def lint_imports(cwd: Path, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(config), "--no-cache"],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_every_import_contract_is_kept():
    result = lint_imports(REPO, REPO / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {len(CONTRACTS['contracts'])} kept, 0 broken." in result.stdout


def test_an_upward_import_breaks_the_floors(tmp_path: Path):
    shutil.copytree(REPO / "image_classifier", tmp_path / "image_classifier")
    classifier = tmp_path / "image_classifier" / "core" / "classifier.py"
    source = classifier.read_text()
    upward = "import numpy as np\n\nfrom ..serving import metrics  # noqa: F401"
    classifier.write_text(source.replace("import numpy as np", upward, 1))
    floors = [c for c in CONTRACTS["contracts"] if c["name"].startswith(("Floors", "The core"))]
    config = tmp_path / ".importlinter"
    lines = [
        "[importlinter]",
        "root_package = image_classifier",
        "include_external_packages = True",
    ]
    for index, contract in enumerate(floors):
        lines.append(f"[importlinter:contract:{index}]")
        for key, value in contract.items():
            lines.append(
                f"{key} = " + ("\n    ".join(["", *value]) if isinstance(value, list) else value)
            )
    config.write_text("\n".join(lines) + "\n")
    result = lint_imports(tmp_path, config)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "image_classifier.core.classifier -> image_classifier.serving.metrics" in result.stdout
    assert "Contracts: 0 kept, 2 broken." in result.stdout  # the layers, and the core's own


def test_service_only_declares():
    lines = (REPO / "service.py").read_text().splitlines()
    assert len(lines) <= 120, f"service.py has {len(lines)} lines; it declares and delegates"
