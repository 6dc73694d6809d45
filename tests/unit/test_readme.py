"""The README is the operators' reference: every setting the code reads is documented there."""

from __future__ import annotations

from pathlib import Path

from service.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


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
