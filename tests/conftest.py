"""Test-suite settings: Hypothesis runs derandomized (the same examples every run) when ``CI`` is set."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
