"""python/bench_decode.py runs end to end on a small case and writes its table, JSON and PNG
(speed is not asserted here), and rejects a bad --conditional-layers list."""
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

import bench_decode  # noqa: E402


def test_bench_decode_writes_a_row_per_budget(tmp_path, capsys):
    out = tmp_path / "bd"
    bench_decode.main(["--models", "gpt2-124m", "--batches", "1", "--budgets", "1,0.5",
                       "--new-tokens", "2", "--prompt-tokens", "4", "--repeats", "1",
                       "--backend", "native", "--anee-python", str(tmp_path / "none"),
                       "--out", str(out)])
    rows = json.loads((tmp_path / "bd.json").read_text())["rows"]
    assert [(r["budget"], r["conditional_layers"], r["batch"]) for r in rows] == [
        (1.0, False, 1), (0.5, False, 1)]
    assert rows[0]["speedup_vs_full"] == 1.0 and rows[1]["compute"] < 0.75
    # One repeat of two tokens on a shared CPU: differences of times, finite but noisy.
    assert all(math.isfinite(r["ms_per_step"]) and math.isfinite(r["hf_ms_per_step"]) for r in rows)
    assert "make anee-env" in rows[0]["anee_note"]          # no ANEE environment: said so
    assert (tmp_path / "bd.png").stat().st_size > 0
    assert "gpt2-124m" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["on,sometimes", "off,off", ""])
def test_bench_decode_rejects_bad_conditional_layers(value):
    with pytest.raises(SystemExit):
        bench_decode.main(["--conditional-layers", value])
