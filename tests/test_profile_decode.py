"""python/profile_decode.py runs and counts what a GPU would launch (`--masked` on the CPU)."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

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
    assert 12 * 8 <= result["kernel_ops_per_step"] < result["launches_per_step"]
    assert "launch a kernel on a GPU" in capsys.readouterr().out
