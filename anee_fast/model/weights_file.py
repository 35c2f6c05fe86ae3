"""Files of learned parts (controllers, skip adapters): a .json config beside a .safetensors file,
and loading the latter into a module with a clear error instead of torch's."""
import json
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


def read_config(path, stem: str, what: str, file_format: str, version: int) -> tuple:
    """(config, json path, safetensors path) of a file pair (file_pair), the JSON checked to be
    a dict of `file_format` at `version`; a missing file or another format is a clear error."""
    json_path, weights_path = file_pair(path, False, stem, what)
    for p in (json_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{what} file not found: {p} ({what} are a .json config plus "
                                    "a .safetensors file)")
    try:
        config = json.loads(json_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != file_format:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{json_path} is not a {what} config: format must be {file_format!r}, "
                         f"got {got!r}")
    if config.get("version") != version:
        raise ValueError(f"{json_path}: {what} format version {config.get('version')!r} is not "
                         f"supported (this anee_fast reads version {version})")
    return config, json_path, weights_path


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
