"""python/bench_kernels.py runs, checks every backend against the reference before timing, and
writes its table, JSON and PNG (one quick case per op label; speed is not asserted here)."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

import bench_kernels  # noqa: E402


def test_bench_kernels_times_linear_with_its_epilogues(tmp_path, capsys):
    out = tmp_path / "bk"
    bench_kernels.main(["--device", "cpu", "--ops", "linear,linear_down,linear_down_masked,skip_kv",
                        "--rows", "1,3", "--shapes", "gpt2-small,llama-1b", "--budget", "0.01",
                        "--out", str(out)])
    result = json.loads((tmp_path / "bk.json").read_text())["results"]
    labels = {(r["op"], r["shape"], r["rows"], r["backend"]) for r in result}
    for op in ("linear", "linear_down", "linear_down_masked", "skip_kv"):
        for shape in ("gpt2-small", "llama-1b"):
            assert {(op, shape, 3, "reference"), (op, shape, 3, "native")} <= labels
    assert all(r["time_us"] > 0 and r["bytes"] > 0 for r in result)
    assert (tmp_path / "bk.png").stat().st_size > 0
    assert "linear_down" in capsys.readouterr().out
