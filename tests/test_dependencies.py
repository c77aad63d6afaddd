"""The suite's dependency check (tests/dependencies.py, called from conftest.py): a missing package fails the run."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.dependencies import (
    INSTALL_COMMAND,
    PYPROJECT,
    check_requirements,
    import_name,
    missing_requirements,
    read_extra_requirements,
)


def test_reads_the_test_extra_from_pyproject():
    requirements = read_extra_requirements()
    names = {r.split(">")[0].split("[")[0].split("=")[0].strip() for r in requirements}
    assert {"pytest", "pytest-xdist", "hypothesis", "diffusers", "jsonargparse", "matplotlib", "pillow"} <= names
    assert PYPROJECT.name == "pyproject.toml" and PYPROJECT.is_file()


def test_this_environment_satisfies_the_test_extra():
    assert missing_requirements(read_extra_requirements()) == []
    check_requirements(read_extra_requirements())  # does not raise


@pytest.mark.parametrize(
    ("distribution", "module"),
    [
        ("pillow", "PIL"),
        ("Pillow", "PIL"),
        ("scikit-learn", "sklearn"),
        ("pytest-xdist", "xdist"),
        ("pytest_xdist", "xdist"),
        ("PyYAML", "yaml"),
        ("typing-extensions", "typing_extensions"),
        ("diffusers", "diffusers"),
    ],
)
def test_import_names(distribution, module):
    assert import_name(distribution) == module


def test_a_missing_package_fails_with_its_name_and_the_install_command():
    fake = ["pytest>=8", "no-such-package-xyz>=1.0", "another_missing.pkg"]
    with pytest.raises(RuntimeError, match=r"and 2 are missing or too old:") as info:
        check_requirements(fake)
    message = str(info.value)
    assert "  - no-such-package-xyz>=1.0 (module 'no_such_package_xyz' is not importable)" in message
    assert "  - another_missing.pkg (module 'another_missing_pkg' is not importable)" in message
    assert "pytest>=8" not in message
    assert message.count("\n  - ") == 2
    assert f"Install them with: {INSTALL_COMMAND}" in message
    assert INSTALL_COMMAND == 'pip install -e ".[test]"'


def test_one_missing_package_message_is_singular():
    with pytest.raises(RuntimeError, match=r"and 1 is missing or too old:\n  - no-such-package-xyz \(module"):
        check_requirements(["no-such-package-xyz"])


def test_a_too_old_version_is_reported_with_the_installed_one():
    installed = importlib.metadata.version("pytest")
    with pytest.raises(RuntimeError, match=rf"  - pytest>=999 \(version {installed} is installed\)"):
        check_requirements(["pytest>=999"])


def test_marker_excluding_this_interpreter_is_not_required():
    assert missing_requirements(['no-such-package-xyz; python_version < "3"']) == []
    assert missing_requirements(['no-such-package-xyz; python_version >= "3"']) != []


def test_invalid_requirement_is_reported():
    problems = missing_requirements(["pytest >>= 8"])
    assert len(problems) == 1 and problems[0].startswith("'pytest >>= 8': not a valid requirement")


def test_extras_pull_in_their_distributions(monkeypatch):
    assert missing_requirements(["jsonargparse[signatures]>=4.27"]) == []
    monkeypatch.setattr(
        importlib.metadata,
        "requires",
        lambda name: ['no-such-dist>=1; extra == "fancy"', 'also-missing; extra == "other"', "pytest"],
    )
    assert missing_requirements(["pytest[fancy]"]) == ["pytest[fancy] (extra [fancy] needs no-such-dist>=1)"]


def test_pyproject_without_the_extra_is_refused(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\n[project.optional-dependencies]\ndocs = ["sphinx"]\n')
    with pytest.raises(RuntimeError, match=r"declares no \[test\] extra; it declares \['docs'\]"):
        read_extra_requirements(pyproject)
    assert read_extra_requirements(pyproject, extra="docs") == ["sphinx"]


def test_pytest_run_stops_at_start_when_a_test_dependency_is_missing(tmp_path):
    """End to end: hide diffusers from the interpreter; pytest exits with a usage error naming it, runs nothing."""
    (tmp_path / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import importlib.abc
            import sys


            class Hide(importlib.abc.MetaPathFinder):
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] == "diffusers":
                        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                    return None


            sys.meta_path.insert(0, Hide())
            """
        )
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", "tests/test_ops.py"],
        cwd=root,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert "diffusers>=0.30 (module 'diffusers' is not importable)" in result.stderr
    assert 'Install them with: pip install -e ".[test]"' in result.stderr
    assert "collected" not in result.stdout


# --- the suite's shape: parity tests in their own files, no skips for missing packages --------------------------------
TESTS = Path(__file__).resolve().parent
# Files owned by other branches that still break the rules below. Each entry must still be an offender (checked), so
# the list shrinks as they are fixed: remove the entry in the commit that fixes the file.
KNOWN_IMPORTORSKIP: set[str] = set()
KNOWN_DIFFUSERS_OUTSIDE_PARITY: set[str] = set()


def _calls_importorskip(tree: ast.AST) -> bool:
    return any(
        isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "importorskip"
        for node in ast.walk(tree)
    )


def _uses_diffusers(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "diffusers" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "diffusers":
            return True
        if isinstance(node, ast.Constant) and node.value == "diffusers":  # importorskip("diffusers"), import_module
            return True
    return False


def _test_files() -> list[Path]:
    files = sorted(TESTS.glob("test_*.py"))
    assert len(files) > 20, files  # the glob found the suite
    return files


def test_no_test_file_skips_on_a_missing_import():
    offenders = {f.name for f in _test_files() if _calls_importorskip(ast.parse(f.read_text()))}
    assert offenders - KNOWN_IMPORTORSKIP == set(), "use a plain import: a missing package must fail, not skip"
    assert KNOWN_IMPORTORSKIP - offenders == set(), "fixed: remove it from KNOWN_IMPORTORSKIP"


def test_diffusers_is_used_only_in_parity_files():
    offenders = {
        f.name
        for f in _test_files()
        if not f.name.endswith("_diffusers.py")
        and f.name not in (Path(__file__).name, "test_versions.py")  # they name "diffusers", import nothing of it
        and _uses_diffusers(ast.parse(f.read_text()))
    }
    assert offenders - KNOWN_DIFFUSERS_OUTSIDE_PARITY == set(), (
        "move diffusers parity tests to test_<module>_diffusers.py"
    )
    assert KNOWN_DIFFUSERS_OUTSIDE_PARITY - offenders == set(), "fixed: remove it from KNOWN_DIFFUSERS_OUTSIDE_PARITY"
    parity = [f for f in _test_files() if f.name.endswith("_diffusers.py")]
    assert len(parity) >= 4 and all(_uses_diffusers(ast.parse(f.read_text())) for f in parity)
