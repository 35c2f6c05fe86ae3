"""Controllers by name: what `controller=` accepts anywhere in the public API."""
import os

from .anee_mlp import ANEEMLPController
from .base import Controller
from .controllers import BudgetController, HeuristicController, StaticController
from .trained import BudgetConditionedController, shipped_controller_path


CONTROLLER_NAMES = ("budget", "heuristic", "learned")
TRAINED_SUFFIXES = (".safetensors", ".json")
ANEE_SUFFIXES = (".pt", ".pth", ".bin")      # ANEE 0.4 controller files (torch.save)


def make_controller(controller) -> Controller:
    """Accepts a Controller, a name, a path to a controller file, or a per-layer action list.

    "learned" is the trained controller shipped for the embedded model; a directory or a
    .safetensors/.json path is a trained (budget-conditioned) controller; .pt/.pth/.bin files
    are ANEE 0.4 controllers. A name or a path gives one shared instance (a file is read again
    only when it changed): requests naming the same controller then form one group in a step,
    and its network runs once per layer for all of their rows.
    """
    if isinstance(controller, Controller):
        return controller
    if isinstance(controller, (list, tuple)):
        return StaticController(controller)
    if isinstance(controller, (str, os.PathLike)):
        name = os.fspath(controller)
        key = (name, _modified(name))
        if key not in _shared:
            _shared[key] = _build(name)
        return _shared[key]
    raise ValueError(f"unknown controller {controller!r}: use one of {', '.join(CONTROLLER_NAMES)}, "
                     "a controller file path, a list of per-layer actions, or a Controller")


_shared = {}     # (name or path, modification time) -> Controller


def _modified(path):
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _build(name) -> Controller:
    if name == "budget":
        return BudgetController()
    if name == "heuristic":
        return HeuristicController()
    if name == "learned":
        return BudgetConditionedController.load(shipped_controller_path())
    if os.path.isdir(name) or name.endswith(TRAINED_SUFFIXES):
        return BudgetConditionedController.load(name)
    if os.path.sep in name or name.endswith(ANEE_SUFFIXES) or os.path.exists(name):
        return ANEEMLPController.from_file(name)
    raise ValueError(f"unknown controller {name!r}: use one of {', '.join(CONTROLLER_NAMES)}, "
                     "a controller file path, a list of per-layer actions, or a Controller")
