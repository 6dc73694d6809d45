"""The README is the operators' reference: every setting the code reads is documented there, and
every setting the deployment files use is one the code reads."""

from __future__ import annotations

import re
from pathlib import Path

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DEPLOYMENT_FILES = [ROOT / "Dockerfile", *sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file())]


def test_every_setting_is_in_the_readme_table() -> None:
    text = README.read_text()
    missing = [name for name in Settings.model_fields if f"`HYBRID_{name.upper()}`" not in text]
    assert not missing, f"settings missing from the README: {missing}"


def test_the_readme_documents_no_setting_that_does_not_exist() -> None:
    documented = {
        line.split("`")[1] for line in README.read_text().splitlines() if line.startswith("| `HYBRID_")
    }
    known = {f"HYBRID_{name.upper()}" for name in Settings.model_fields}
    assert documented <= known, f"README rows for unknown settings: {documented - known}"


def test_every_setting_the_deployment_files_use_exists_and_is_documented() -> None:
    known = {f"HYBRID_{name.upper()}" for name in Settings.model_fields}
    table = {line.split("`")[1] for line in README.read_text().splitlines() if line.startswith("| `HYBRID_")}
    # As a variable (HYBRID_X) or as the secret file it may come from (hybrid_x in /run/secrets).
    used = {
        (path.relative_to(ROOT).as_posix(), name.upper())
        for path in DEPLOYMENT_FILES
        for name in re.findall(r"\b(?:HYBRID|hybrid)_[A-Za-z0-9_]*[A-Za-z0-9]", path.read_text())
    }
    assert len({name for _, name in used}) >= 10, "the deployment files were not found"
    unknown = sorted((path, name) for path, name in used if name not in known)
    assert not unknown, f"deployment files use settings the gateway does not have: {unknown}"
    assert {name for _, name in used} <= table
