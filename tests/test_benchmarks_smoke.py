"""Smoke test of the benchmarks: tiny sizes, every row written, no timing assertions."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

from benchmarks.run import ROWS, main

EXPECTED_ROWS = {
    "q_sample",
    "q_sample accuracy",
    "timestep embedding",
    "gradient checkpointing",
    "AlphaBlender",
    "training step",
    "DDIM sampling",
    "resume check",
    "quality evaluation",
}


def test_quick_run_writes_every_row(tmp_path: Any) -> None:
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    results = payload["results"]
    assert {r["row"] for r in results} == EXPECTED_ROWS
    for r in results:
        assert math.isfinite(r["value"]), r
        assert r["status"] in {"quick", "info"}, r
    meta = payload["meta"]
    assert meta["quick"] is True
    assert meta["torch_threads"] == torch.get_num_threads()
    assert set(meta["row_seconds"]) == set(ROWS)
    md = (tmp_path / "bench.md").read_text()
    assert "| row | case | compared | value | goal | status | context |" in md
    for name in EXPECTED_ROWS:
        assert f"| {name} |" in md
    assert md.count("\n| ") == len(results) + 1  # header + one line per result


def test_unknown_row_is_refused(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--quick", "--rows", "q_sample,nope", "--out", str(tmp_path)])
    assert "unknown rows ['nope']" in capsys.readouterr().err
