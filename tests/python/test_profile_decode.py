"""python/profile_decode.py runs and counts what a GPU would launch (`--masked` on the CPU)."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))

import profile_decode  # noqa: E402


def test_masked_profile_counts_kernel_launching_ops(tmp_path, capsys):
    out = tmp_path / "profile.json"
    profile_decode.main(["--model", "gpt2-124m", "--steps", "1", "--prompt-tokens", "4", "--masked",
                         "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["masked"] is True and result["layers"] == 12
    names = {r["name"] for r in result["by_name"]}
    assert {"anee_fast::policy_step", "anee_fast::add_norm", "anee_fast::linear"} <= names
    # Views are left out of the kernel count, and every layer launches at least its block's ops.
    assert 12 * 7 <= result["kernel_ops_per_step"] < result["launches_per_step"]
    assert "would launch on a GPU" in capsys.readouterr().out


def test_graph_step_profile_counts_only_the_captured_step(tmp_path):
    """--graph-step profiles the static-buffer step a CUDA graph records: the layers and the LM
    head, not the host's batch building or the sampling (argmax) around it."""
    counts = {}
    for graph_step in (False, True):
        out = tmp_path / f"profile{graph_step}.json"
        profile_decode.main(["--model", "gpt2-124m", "--steps", "1", "--prompt-tokens", "4",
                             "--masked", "--out", str(out)] + ["--graph-step"] * graph_step)
        result = json.loads(out.read_text())
        assert result["graph_step"] is graph_step
        counts[graph_step] = (result["kernel_ops_per_step"], {r["name"] for r in result["by_name"]})
    (eager, eager_names), (graph, graph_names) = counts[False], counts[True]
    assert "aten::argmax" in eager_names and "aten::argmax" not in graph_names
    # Seven kernels a layer: the decision, K/V+Q, attention, out projection, add_norm, up, down;
    # the out and down projections' row mask keeps a SKIP row's residual (no `where`).
    assert "aten::where" not in graph_names
    assert 12 * 7 <= graph < eager


class _Event:
    def __init__(self, name, *children):
        self.name, self.cpu_children = name, list(children)


def test_kernel_count_leaves_out_views_and_counts_copying_casts():
    assert profile_decode.kernel_ops(_Event("aten::slice", _Event("aten::as_strided"))) == 0
    assert profile_decode.kernel_ops(_Event("aten::to")) == 0                      # no-op cast
    assert profile_decode.kernel_ops(_Event("aten::to", _Event("aten::_to_copy"))) == 1
    assert profile_decode.kernel_ops(_Event("aten::where", _Event("aten::where"))) == 1
    # Inside our ops: a weight cast nested at any depth is a kernel of its own.
    cast = _Event("aten::to", _Event("aten::_to_copy", _Event("aten::copy_")))
    assert profile_decode.kernel_ops(_Event("anee_fast::norm", cast, cast, _Event("aten::empty"))) == 3
