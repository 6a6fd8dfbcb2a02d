"""Shared test paths. CI clones the repository with `shared/` beside it (../shared/fixtures/adm)."""

from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared/fixtures/adm"
