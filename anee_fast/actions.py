"""Action codes and the rule that turns an action matrix into per-layer PROCESS masks.

PROCESS runs the whole block, SKIP only writes the layer's K/V, EXIT turns the layer and every
later one into SKIP for that token. K/V are written in every case, so the cache stays complete.
"""
import torch

PROCESS, SKIP, EXIT = 0, 1, 2
ACTION_NAMES = ("PROCESS", "SKIP", "EXIT")


def validate_actions(actions, num_tokens: int, num_layers: int) -> torch.Tensor:
    """Checks shape, dtype and codes of a user-given action matrix; returns it as int8."""
    if not isinstance(actions, torch.Tensor):
        actions = torch.as_tensor(actions)
    if actions.dtype.is_floating_point or actions.dtype == torch.bool or actions.is_complex():
        raise ValueError(f"actions must be an integer tensor (int8 codes 0/1/2), got {actions.dtype}")
    if tuple(actions.shape) != (num_tokens, num_layers):
        raise ValueError(
            f"actions must have shape [tokens, layers] = [{num_tokens}, {num_layers}], "
            f"got {list(actions.shape)}")
    if actions.numel() and (actions.min() < PROCESS or actions.max() > EXIT):
        bad = actions[(actions < PROCESS) | (actions > EXIT)].unique().tolist()
        raise ValueError(f"unknown action codes {bad}: use 0=PROCESS, 1=SKIP, 2=EXIT")
    return actions.to(torch.int8)


def process_mask(actions: torch.Tensor) -> torch.Tensor:
    """[T, L] bool: True where the block runs. An EXIT at layer l makes l.. SKIP."""
    exited = torch.cummax((actions == EXIT).to(torch.int8), dim=1).values.bool()
    return (actions == PROCESS) & ~exited


def canonical_actions(actions: torch.Tensor) -> torch.Tensor:
    """Marks every layer after an EXIT as EXIT too, the form traces record."""
    exited = torch.cummax((actions == EXIT).to(torch.int8), dim=1).values.bool()
    return torch.where(exited, torch.full_like(actions, EXIT), actions)
