"""Versions agree: the oldest-floor pins with pyproject.toml, and the package version with pyproject and CHANGELOG.

constraints/oldest.txt (what `make test-oldest` installs) pins exactly the floors that pyproject.toml declares.
``lightning_ldm.__version__`` is the one source of the version (pyproject reads it), and it agrees with CHANGELOG.md:
a development version is above every released section, a release has the newest dated section (docs/releasing.md).
"""

from __future__ import annotations

import json
import re
import sys
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from packaging.version import Version

import lightning_ldm

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

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
    # linters and the docs tools: `make test-oldest` runs only the tests
    unpinned = {"ruff", "mypy", "sphinx", "myst-parser"}
    missing = sorted(floors.keys() - pins.keys() - unpinned)
    assert missing == [], f"constraints/oldest.txt has no pin for {missing}"
    wrong = {name: (floors[name], pins[name]) for name in floors.keys() & pins.keys()}
    wrong = {name: pair for name, pair in wrong.items() if _release(pair[0]) != _release(pair[1])}
    assert wrong == {}, f"(pyproject floor, oldest pin) differ: {wrong}"


# --------------------------------------------------------------------------------------- package version, CHANGELOG
RELEASED = re.compile(r"^## \[(?P<version>[^\]]+)\] - (?P<date>\d{4}-\d{2}-\d{2})\s*$")
SECTION = re.compile(r"^## \[(?P<name>[^\]]+)\]")


def _changelog_sections() -> list[tuple[str, str | None]]:
    """``(name, date or None)`` for every ``## [...]`` heading of CHANGELOG.md, in file order."""
    sections: list[tuple[str, str | None]] = []
    for line in (ROOT / "CHANGELOG.md").read_text().splitlines():
        section, released = SECTION.match(line), RELEASED.match(line)
        if released:
            sections.append((released["version"], released["date"]))
        elif section:
            sections.append((section["name"], None))
    return sections


def _check_version_against_changelog(version: str, sections: list[tuple[str, str | None]]) -> None:
    """Raise ``AssertionError`` unless ``version`` agrees with the CHANGELOG ``sections`` (see the module docstring)."""
    assert sections and sections[0] == ("Unreleased", None), f"CHANGELOG must open with ## [Unreleased]: {sections[:1]}"
    undated = [name for name, date in sections[1:] if date is None]
    assert undated == [], f"CHANGELOG sections without a release date: {undated}"
    released = [(Version(name), date) for name, date in sections[1:]]
    assert released == sorted(released, reverse=True), f"CHANGELOG releases are not newest first: {released}"
    assert [d for _, d in released] == sorted((d for _, d in released), reverse=True), "release dates not descending"
    current = Version(version)
    if current.is_devrelease or current.is_prerelease:
        newest = released[0][0] if released else None
        assert newest is None or current > newest, (
            f"development version {version} is not above the newest released section [{newest}] of CHANGELOG.md"
        )
    else:
        assert released and released[0][0] == current, (
            f"release {version} must be the newest dated section of CHANGELOG.md, found {released[:1]}"
        )


def test_version_has_one_source():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"], "pyproject.toml must not repeat the version: it reads __version__"
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lightning_ldm.__version__"}
    assert str(Version(lightning_ldm.__version__)) == lightning_ldm.__version__, "not a normalized PEP 440 version"


def test_version_agrees_with_the_changelog():
    sections = _changelog_sections()
    assert ("0.1.0", "2026-11-29") in sections  # the parser sees the released sections
    _check_version_against_changelog(lightning_ldm.__version__, sections)


@pytest.mark.parametrize(
    ("version", "error"),
    [
        ("0.1.0.dev0", "not above the newest released section"),
        ("0.1.0", None),
        ("0.1.1rc1", None),
        ("0.2.0", "must be the newest dated section"),
        ("0.0.9", "must be the newest dated section"),
    ],
)
def test_version_check_catches_a_disagreement(version, error):
    sections = [("Unreleased", None), ("0.1.0", "2026-11-29"), ("0.0.1", "2026-01-02")]
    if error is None:
        _check_version_against_changelog(version, sections)
    else:
        with pytest.raises(AssertionError, match=error):
            _check_version_against_changelog(version, sections)


def test_changelog_check_catches_bad_sections():
    with pytest.raises(AssertionError, match="must open with"):
        _check_version_against_changelog("0.2.0.dev0", [("0.1.0", "2026-11-29")])
    with pytest.raises(AssertionError, match="without a release date"):
        _check_version_against_changelog("0.2.0.dev0", [("Unreleased", None), ("0.1.0", None)])
    with pytest.raises(AssertionError, match="not newest first"):
        _check_version_against_changelog(
            "0.3.0.dev0", [("Unreleased", None), ("0.1.0", "2026-01-01"), ("0.2.0", "2026-02-01")]
        )


def _is_this_checkout(dist: metadata.Distribution) -> bool:
    """The distribution was installed from this checkout: its metadata lies in it (an editable install's egg-info in
    the repository root, found first when the root is on ``sys.path``) or its ``direct_url.json`` points at it."""
    if Path(str(dist.locate_file(""))).resolve() == ROOT:
        return True
    direct_url = dist.read_text("direct_url.json")
    location = urlparse(json.loads(direct_url).get("url", "")) if direct_url else None
    return location is not None and location.scheme == "file" and Path(unquote(location.path)).resolve() == ROOT


def test_installed_metadata_has_the_package_version():
    try:
        dist = metadata.distribution("lightning_ldm")
    except metadata.PackageNotFoundError:
        pytest.skip("lightning_ldm is not installed (only imported from the checkout)")
    if not _is_this_checkout(dist):
        pytest.skip("the installed lightning_ldm is not this checkout")
    assert metadata.version("lightning_ldm") == lightning_ldm.__version__, (
        f"installed metadata says {dist.version}, the package {lightning_ldm.__version__}: reinstall (make setup)"
    )
