"""Test-suite settings.

- The run fails at start, with the install command, when a package of the ``[test]`` extra is missing (see
  ``tests/dependencies.py``): a missing test dependency must never shrink the suite into skips.
- Hypothesis runs derandomized (the same examples every run) when ``CI`` is set.
"""

from __future__ import annotations

import os

import pytest

from tests.dependencies import check_requirements, read_extra_requirements


def pytest_configure(config: pytest.Config) -> None:
    try:
        check_requirements(read_extra_requirements())
    except RuntimeError as err:
        raise pytest.UsageError(str(err)) from err
    # imported after the check, so that a missing hypothesis gets the message above instead of an ImportError
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")
