"""Shared test paths. The ADM reference fixtures (data produced by guided-diffusion, see their README) live in
the repository, so a fresh clone tests with nothing beside it."""

from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "adm"
