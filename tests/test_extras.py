"""The optional extras in pyproject.toml: ``all`` must install every extra meant for users."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

NOT_FOR_USERS = {"all", "bench", "dev"}
"""Extras that ``all`` leaves out: itself, and the ones that only the project's developers install."""


def _self_reference(requirement: str) -> set[str]:
    """Return the extras named by a requirement of the form ``pikku-mq[a,b]``."""
    match = re.fullmatch(r"pikku-mq\[([a-z0-9_,\s-]+)\]", requirement.strip())
    assert match is not None, f"expected pikku-mq[...], got {requirement!r}"
    return {name.strip() for name in match.group(1).split(",")}


def test_all_extra_lists_every_extra() -> None:
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    included: set[str] = set()
    for requirement in extras["all"]:
        included |= _self_reference(requirement)

    assert included == set(extras) - NOT_FOR_USERS
