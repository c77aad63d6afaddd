"""The test suite's own dependency check: every package of the ``[test]`` extra must be installed, or the run fails.

A missing test dependency must never turn into skipped tests. ``conftest.py`` calls :func:`check_requirements` with the
``[test]`` list read from ``pyproject.toml`` (so that the list cannot drift from the one users install), and the run
stops with one message that names every missing package and the command that installs them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from collections.abc import Iterable
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
INSTALL_COMMAND = 'pip install -e ".[test]"'

#: Distribution names (normalized) whose import name differs from the name with "-" replaced by "_".
IMPORT_NAMES = {
    "pillow": "PIL",
    "scikit-learn": "sklearn",
    "scikit-image": "skimage",
    "pytest-xdist": "xdist",
    "pytest-cov": "pytest_cov",
    "pytest-timeout": "pytest_timeout",
    "pyyaml": "yaml",
    "opencv-python": "cv2",
    "opencv-python-headless": "cv2",
    "beautifulsoup4": "bs4",
}


def normalize(name: str) -> str:
    """PEP 503 name normalization: lower case, runs of ``-_.`` become one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def import_name(distribution: str) -> str:
    """The top-level module a distribution provides (``pillow`` → ``PIL``, ``pytest-xdist`` → ``xdist``)."""
    name = normalize(distribution)
    return IMPORT_NAMES.get(name, name.replace("-", "_"))


def read_extra_requirements(pyproject: Path = PYPROJECT, extra: str = "test") -> list[str]:
    """The requirement strings of ``[project.optional-dependencies].<extra>`` in ``pyproject``.

    Raises:
        RuntimeError: if ``pyproject`` has no such extra, or Python < 3.11 lacks both ``tomllib`` and ``tomli``.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError as err:
            raise RuntimeError(f"reading {pyproject} on Python 3.10 needs tomli; run: pip install tomli") from err
    with pyproject.open("rb") as f:
        data = tomllib.load(f)
    extras = data.get("project", {}).get("optional-dependencies", {})
    if extra not in extras:
        raise RuntimeError(f"{pyproject} declares no [{extra}] extra; it declares {sorted(extras)}")
    return list(extras[extra])


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_requirements(requirements: Iterable[str]) -> list[str]:
    """One line per requirement that this environment does not satisfy (empty when all are).

    A requirement is satisfied when its module is importable (found by ``importlib.util.find_spec``, not imported),
    its installed version matches the specifier, and the distributions its extras pull in are installed. A
    requirement whose environment marker excludes this interpreter (``; python_version < "3.11"``) is skipped.
    """
    problems = []
    for line in requirements:
        try:
            req = Requirement(line)
        except InvalidRequirement as err:
            problems.append(f"{line!r}: not a valid requirement ({err})")
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        module = import_name(req.name)
        if not _importable(module):
            problems.append(f"{line} (module {module!r} is not importable)")
            continue
        version = _installed_version(req.name)
        if version is None:
            problems.append(f"{line} (module {module!r} imports, but no distribution {req.name!r} is installed)")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{line} (version {version} is installed)")
            continue
        for extra in sorted(req.extras):
            for sub_line in importlib.metadata.requires(req.name) or []:
                sub = Requirement(sub_line)
                if sub.marker is not None and sub.marker.evaluate({"extra": extra}) and not _satisfied(sub):
                    problems.append(f"{line} (extra [{extra}] needs {sub_line.split(';')[0].strip()})")
    return problems


def _satisfied(req: Requirement) -> bool:
    version = _installed_version(req.name)
    return version is not None and (not req.specifier or req.specifier.contains(version, prereleases=True))


def check_requirements(requirements: Iterable[str]) -> None:
    """Raise when a requirement is not satisfied, naming each one and the command that installs them all.

    Raises:
        RuntimeError: listing the unsatisfied requirements and ``pip install -e ".[test]"``.
    """
    problems = missing_requirements(requirements)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise RuntimeError(
            f"the test suite needs every package of the [test] extra, and {len(problems)} "
            f"{'is' if len(problems) == 1 else 'are'} missing or too old:\n{listed}\n"
            f"Install them with: {INSTALL_COMMAND}\n"
            "(tests are never skipped for a missing test dependency: a smaller suite would pass silently)"
        )
