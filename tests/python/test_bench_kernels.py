"""python/bench_kernels.py runs, checks every backend against the reference before timing, and
writes its table, JSON and PNG (one quick case per op label; speed is not asserted here)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))

import bench_kernels  # noqa: E402


def test_bench_kernels_times_linear_with_its_epilogues(tmp_path, capsys):
    out = tmp_path / "bk"
    bench_kernels.main(["--device", "cpu", "--ops", "linear,linear_down,linear_down_masked,skip_kv",
                        "--rows", "1,3", "--shapes", "gpt2-small,llama-1b", "--budget", "0.01",
                        "--out", str(out)])
    result = json.loads((tmp_path / "bk.json").read_text())["rows"]
    labels = {(r["op"], r["shape"], r["rows"], r["backend"]) for r in result}
    for op in ("linear", "linear_down", "linear_down_masked", "skip_kv"):
        for shape in ("gpt2-small", "llama-1b"):
            assert {(op, shape, 3, "reference"), (op, shape, 3, "native")} <= labels
    assert all(r["time_us"] > 0 and r["bytes"] > 0 for r in result)
    assert (tmp_path / "bk.png").stat().st_size > 0
    assert "linear_down" in capsys.readouterr().out


def test_bench_kernels_times_each_models_gemv_per_weight_format(tmp_path, capsys):
    out = tmp_path / "bk"
    bench_kernels.main(["--device", "cpu", "--ops", "gemv", "--formats", "dense,q4_1",
                        "--gemv-rows", "1,3", "--gemv-shapes", "gpt2-small,smollm2-135m",
                        "--budget", "0.01", "--out", str(out)])
    result = json.loads((tmp_path / "bk.json").read_text())
    assert not result["failures"]
    got = {(r["shape"], r["matrix"], r["format"], r["rows"]) for r in result["rows"]}
    for shape in ("gpt2-small", "smollm2-135m"):
        for matrix in bench_kernels.GEMV_MATRICES:
            assert {(shape, matrix, f, n) for f in ("dense", "q4_1") for n in (1, 3)} <= got
    down = {r["shape"]: r["bytes"] for r in result["rows"]
            if (r["matrix"], r["format"], r["rows"], r["backend"]) == ("down", "dense", 1, "native")}
    assert down["smollm2-135m"] == 4 * (576 * 1536 + 1536)       # float32 weight + x
    assert all(r["pct_read"] > 0 and r["hot_gb_s"] > 0 for r in result["rows"])
    assert "hot GB/s" in capsys.readouterr().out
    assert (tmp_path / "bk_gemv.png").stat().st_size > 0


def _native_op_replaced(monkeypatch, op, wrong):
    """bench_kernels sees the native backend with `op` replaced by wrong(real_op, *args)."""
    real_ops_for = bench_kernels.ops_for

    class Replaced:
        def __init__(self, ops):
            self.ops = ops

        def __getattr__(self, name):
            real = getattr(self.ops, name)
            return (lambda *args, **kwargs: wrong(real, *args, **kwargs)) if name == op else real

    monkeypatch.setattr(bench_kernels, "ops_for", lambda name: Replaced(real_ops_for(name))
                        if name == "native" else real_ops_for(name))


def test_bench_kernels_records_a_mismatch_and_times_the_rest(tmp_path, monkeypatch):
    """A backend whose linear is wrong is not timed for linear: the mismatch is recorded and the
    run exits non-zero, while its norm, and the reference's linear, are still timed."""
    _native_op_replaced(monkeypatch, "linear", lambda real, *args, **kwargs: real(*args, **kwargs) + 1)
    out = tmp_path / "bk"
    with pytest.raises(SystemExit, match="MISMATCH: linear gpt2-small rows 3, backend native"):
        bench_kernels.main(["--device", "cpu", "--ops", "linear,norm", "--rows", "3",
                            "--shapes", "gpt2-small", "--budget", "0.01", "--out", str(out)])
    result = json.loads((tmp_path / "bk.json").read_text())
    assert {(r["op"], r["backend"]) for r in result["rows"]} == {
        ("linear", "reference"), ("norm", "reference"), ("norm", "native")}
    assert [(f["op"], f["backend"]) for f in result["failures"]] == [("linear", "native")]
    assert (tmp_path / "bk.png").stat().st_size > 0


def test_bench_kernels_refuses_an_unknown_op(capsys):
    """A removed op label (write_kv, skip_kv_exit) is an error, not a run of something else."""
    with pytest.raises(SystemExit):
        bench_kernels.main(["--device", "cpu", "--ops", "norm,skip_kv_exit"])
    assert "unknown --ops skip_kv_exit" in capsys.readouterr().err


def test_bench_kernels_times_the_depth_policys_ops(tmp_path):
    """policy_step and saturation_codes: checked against the reference, timed, with the bytes of
    their models (policy_step's 25 per row: its state and mask; saturation_codes' h and h_prev)."""
    bench_kernels.main(["--device", "cpu", "--ops", "policy_step,saturation_codes", "--rows", "1,3",
                        "--shapes", "smollm2-135m", "--budget", "0.01", "--out", str(tmp_path / "bk")])
    result = json.loads((tmp_path / "bk.json").read_text())
    assert not result["failures"]
    got = {(r["op"], r["rows"], r["backend"]): r["bytes"] for r in result["rows"]}
    for backend in ("reference", "native"):
        for n in (1, 3):
            assert got["policy_step", n, backend] == 25 * n
            assert got["saturation_codes", n, backend] == n * (2 * 4 * 576 + 4 + 1)


@pytest.mark.parametrize("wrong", ["mask", "state"])
def test_bench_kernels_checks_what_policy_step_returns_and_updates(tmp_path, monkeypatch, wrong):
    """A backend whose policy_step returns a wrong PROCESS mask, or leaves a wrong budget_left
    (updated in place), is a mismatch, not a timed row."""
    def policy_step(real, *args):
        process = real(*args)
        if wrong == "state":
            args[5].add_(1)              # budget_left
        return ~process if wrong == "mask" else process

    _native_op_replaced(monkeypatch, "policy_step", policy_step)
    with pytest.raises(SystemExit, match="MISMATCH: policy_step smollm2-135m rows 3, backend native"):
        bench_kernels.main(["--device", "cpu", "--ops", "policy_step", "--rows", "3", "--shapes",
                            "smollm2-135m", "--budget", "0.01", "--out", str(tmp_path / "bk")])
    result = json.loads((tmp_path / "bk.json").read_text())
    assert [r["backend"] for r in result["rows"]] == ["reference"]
