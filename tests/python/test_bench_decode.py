"""python/bench_decode.py runs end to end on a small case and writes its table, JSON and PNG
(speed is not asserted here), with J/token from an energy meter or "unavailable" and why, and
rejects a bad --conditional-layers list."""
import json
import math
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))

import bench_decode  # noqa: E402
from anee_fast.engine.energy import EnergyMeter  # noqa: E402


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
    out = capsys.readouterr().out
    assert "gpt2-124m" in out
    # No GPU energy counter on the CPU: no number, the column says so, the JSON says why.
    assert all(r["joules_per_token"] is None and r["joules_per_token_above_idle"] is None
               for r in rows)
    assert json.loads((tmp_path / "bd.json").read_text())["energy"] == {
        "unavailable": "no CUDA GPU (the device is cpu)"}
    assert out.count("unavailable") == 1 + len(rows)       # the run's header line and each row


class _WallCounter:
    """A device drawing a steady 100 W by the wall clock; its counter moves every 10 ms."""
    update_period_s = 0.01

    def millijoules(self):
        return int(time.monotonic() / 0.01) * 1000


def test_bench_decode_reports_joules_per_token_from_an_energy_meter(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_decode, "energy_meter",
                        lambda device: EnergyMeter(_WallCounter(), min_window_s=0.1))
    bench_decode.main(["--models", "gpt2-124m", "--batches", "2", "--budgets", "1",
                       "--new-tokens", "3", "--prompt-tokens", "4", "--repeats", "1",
                       "--backend", "native", "--anee-python", str(tmp_path / "none"),
                       "--device", "cpu", "--out", str(tmp_path / "bd")])
    result = json.loads((tmp_path / "bd.json").read_text())
    assert result["energy"]["idle_watts"] == pytest.approx(100, rel=0.05)
    [row] = result["rows"]
    # Differences of two windows on a shared CPU: finite, the sign not asserted.
    assert math.isfinite(row["joules_per_token"]) and math.isfinite(
        row["joules_per_token_above_idle"])
    assert "unavailable" not in capsys.readouterr().out


@pytest.mark.parametrize("value", ["on,sometimes", "off,off", ""])
def test_bench_decode_rejects_bad_conditional_layers(value):
    with pytest.raises(SystemExit):
        bench_decode.main(["--conditional-layers", value])


def test_bench_decode_keeps_the_other_variants_when_one_fails(tmp_path, capsys):
    """conditional_layers=True needs CUDA graphs, so on the CPU the variant `on` fails to build:
    its error is printed and recorded, `off` still gives its rows, and the run exits non-zero."""
    out = tmp_path / "bd"
    with pytest.raises(SystemExit) as exit_info:
        bench_decode.main(["--models", "gpt2-124m", "--batches", "1", "--budgets", "1",
                           "--new-tokens", "2", "--prompt-tokens", "4", "--repeats", "1",
                           "--backend", "native", "--anee-python", str(tmp_path / "none"),
                           "--conditional-layers", "on,off", "--device", "cpu", "--out", str(out)])
    assert "1 failed" in str(exit_info.value) and "needs CUDA graphs" in str(exit_info.value)
    result = json.loads((tmp_path / "bd.json").read_text())
    assert [(r["conditional_layers"], r["budget"]) for r in result["rows"]] == [(False, 1.0)]
    assert [(f["conditional_layers"], "needs CUDA graphs" in f["error"])
            for f in result["failures"]] == [(True, True)]
    assert (tmp_path / "bd.png").stat().st_size > 0
    assert "FAILED" in capsys.readouterr().out


def test_bench_decode_keeps_rows_measured_before_a_failure(tmp_path, monkeypatch):
    """A variant failing at batch 1, budget 0.5 keeps its budget-1.0 row, and batch 2 still runs."""
    calls = []
    real = bench_decode.ideal_speedup

    def fails_on_the_second_call(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return real(*args)

    monkeypatch.setattr(bench_decode, "ideal_speedup", fails_on_the_second_call)
    out = tmp_path / "bd"
    with pytest.raises(SystemExit, match="injected failure"):
        bench_decode.main(["--models", "gpt2-124m", "--batches", "1,2", "--budgets", "1,0.5",
                           "--new-tokens", "2", "--prompt-tokens", "4", "--repeats", "1",
                           "--backend", "native", "--anee-python", str(tmp_path / "none"),
                           "--device", "cpu", "--out", str(out)])
    result = json.loads((tmp_path / "bd.json").read_text())
    assert [(r["batch"], r["budget"]) for r in result["rows"]] == [(1, 1.0), (2, 1.0), (2, 0.5)]
    assert [(f["batch"], f["error"]) for f in result["failures"]] == [
        (1, "RuntimeError: injected failure")]


def test_prefill_and_decode_alternates_the_runs_so_a_drift_slows_both_alike(monkeypatch):
    """Each run costs prefill + per_step * (n - 1) seconds on a machine that gets 10% slower at
    every call: the runs take turns call by call, so their decode ratio stays within the drift
    of one turn (timed one after the other, the later run would look 1.5x slower or more)."""
    clock = {"now": 0.0, "speed": 1.0}
    monkeypatch.setattr(bench_decode, "time", type("Clock", (), {
        "perf_counter": staticmethod(lambda: clock["now"])}))
    calls = []

    def run_of(name, prefill, per_step):
        def run(n):
            calls.append((name, n))
            clock["now"] += (prefill + per_step * (n - 1)) * clock["speed"]
            clock["speed"] *= 1.1
        return run

    (pa, da), (pb, db) = bench_decode.prefill_and_decode(
        [run_of("a", 0.1, 0.01), run_of("b", 0.1, 0.01)], 9, repeats=3)
    assert calls == [("a", 1), ("b", 1), ("a", 9), ("b", 9)] * 3
    assert 1.0 < db / da < 1.25 and 1.0 < pb / pa <= 1.1 + 1e-9
    assert da > 0.01 and db > 0.01                      # the drift is in both


def test_prefill_and_decode_is_the_difference_of_medians(monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(bench_decode, "time", type("Clock", (), {
        "perf_counter": staticmethod(lambda: clock["now"])}))
    costs = iter([0.3, 1.0, 0.1, 0.7, 0.2, 2.0])        # run(1), run(5) alternately, 3 repeats

    def run(n):
        clock["now"] += next(costs)

    [(prefill, decode)] = bench_decode.prefill_and_decode([run], 5, repeats=3)
    assert prefill == pytest.approx(0.2) and decode == pytest.approx((1.0 - 0.2) / 4)
