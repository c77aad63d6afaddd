"""constraints/oldest.txt (what `make test-oldest` installs) pins exactly the floors that pyproject.toml declares."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENT = re.compile(r'^\s*"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?((?:[<>=!~]=?[^,"]+,?)*)",?\s*$')


def _floors() -> dict[str, str]:
    """``name -> X`` for every ``"name>=X..."`` requirement of pyproject.toml (dependencies and extras)."""
    floors: dict[str, str] = {}
    for line in (ROOT / "pyproject.toml").read_text().splitlines():
        match = REQUIREMENT.match(line)
        if match:
            lower = re.search(r">=([^,;]+)", match.group(2))  # up to the next specifier or marker
            if lower:
                floors[match.group(1).lower()] = lower.group(1).strip()
    return floors


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints" / "oldest.txt").read_text().splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()  # drop comments and environment markers
        if line:
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def _release(version: str) -> tuple[int, ...]:
    parts = [int(p) for p in version.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def test_parsers_see_the_files():
    floors, pins = _floors(), _pins()
    assert {"torch", "lightning", "einops", "numpy", "torchmetrics"} <= floors.keys()
    assert {"torch", "lightning", "einops", "numpy", "torchmetrics", "diffusers"} <= pins.keys()


def test_every_runtime_and_test_floor_is_pinned_at_the_floor():
    floors, pins = _floors(), _pins()
    unpinned = {"ruff", "mypy"}  # linters: `make test-oldest` runs only the tests
    missing = sorted(floors.keys() - pins.keys() - unpinned)
    assert missing == [], f"constraints/oldest.txt has no pin for {missing}"
    wrong = {name: (floors[name], pins[name]) for name in floors.keys() & pins.keys()}
    wrong = {name: pair for name, pair in wrong.items() if _release(pair[0]) != _release(pair[1])}
    assert wrong == {}, f"(pyproject floor, oldest pin) differ: {wrong}"
