"""python/bench_host.py times the engine's own part of a decode step (speed is not asserted)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))

import bench_host  # noqa: E402


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_bench_host_splits_a_step_into_model_and_host(tmp_path, capsys, temperature):
    out = tmp_path / "bh"
    bench_host.main(["--batches", "1,3", "--steps", "3", "--device", "cpu", "--vocab", "300",
                     "--temperature", str(temperature), "--out", str(out)])
    result = json.loads((tmp_path / "bh.json").read_text())
    assert [r["batch"] for r in result["rows"]] == [1, 3] and result["captured"] is False
    assert result["temperature"] == temperature and result["vocab"] == 300
    for r in result["rows"]:     # the host part: each step less its own model step, so >= 0
        assert 0 < r["model_us"] < r["step_us"] and 0 <= r["host_us"] < r["step_us"]
    assert "host us" in capsys.readouterr().out
