"""Loading a safetensors file into a module with a clear error instead of torch's."""
from safetensors.torch import load_file


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
