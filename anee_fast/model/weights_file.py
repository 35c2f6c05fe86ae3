"""Files of learned parts (controllers, skip adapters): a .json config beside a .safetensors file,
and loading the latter into a module with a clear error instead of torch's."""
import os
from pathlib import Path

from safetensors.torch import load_file


def file_pair(path, create: bool, stem: str, what: str):
    """(json, safetensors) paths for a directory (holding <stem>.json + <stem>.safetensors), a
    .json or a .safetensors path (its partner beside it). create: make the folder."""
    path = Path(os.fspath(path))
    if path.suffix in (".json", ".safetensors"):
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_suffix(".json"), path.with_suffix(".safetensors")
    if create:
        path.mkdir(parents=True, exist_ok=True)
    elif not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path} (give a directory holding {stem}.json + "
                                f"{stem}.safetensors, or a .json/.safetensors path)")
    return path / f"{stem}.json", path / f"{stem}.safetensors"


def load_matching(module, path, what: str, described_by: str):
    """Loads `path` into `module`; a file that cannot be read, or whose tensor names and shapes
    differ from the module built from `described_by` (its config), is a ValueError."""
    try:
        state = load_file(str(path))
    except Exception as e:
        raise ValueError(f"cannot read {what} {path}: {e}") from None
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        raise ValueError(f"{path}: weights do not match {described_by}: expected {expected}, got {got}")
    module.load_state_dict(state)
    return module
