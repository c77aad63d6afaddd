"""Test-suite settings.

- The run fails at start, with the install command, when a package of the ``[test]`` extra is missing (see
  ``tests/dependencies.py``): a missing test dependency must never shrink the suite into skips.
- Hypothesis runs derandomized (the same examples every run) when ``CI`` is set.
- torch's process-wide deterministic-algorithms setting (which ``Trainer(deterministic=True)`` turns on, see
  ``tests/lightning_helpers.make_trainer``) is put back after every test, so that no test depends on test order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

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


@pytest.fixture(autouse=True)
def _restore_deterministic_algorithms() -> Iterator[None]:
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    if cublas is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
