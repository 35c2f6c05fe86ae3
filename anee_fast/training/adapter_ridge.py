"""Training-free skip adapters: per layer, a ridge regression of the block's contribution on the
normed input the layer reads, cut to rank r.

For layer l, over calibration tokens: delta = block(h) - h, x = norm(h). Ridge with an intercept
gives delta ~ W^T x + b. The rank-r adapter keeps the r directions of the fitted values' largest
variance (reduced-rank regression): up = V_r, down = (W V_r)^T, bias = mean(delta) - V_r V_r^T
W^T mean(x). The inputs a layer sees depend on which earlier layers ran, so the statistics are
gathered under skip patterns drawn across budgets, and gathered again with the first fit's
adapters in place (`passes`): the refit sees the inputs that adapted skipping produces.
"""
import torch

from ..model.adapters import SkipAdapter
from .distillation import collate


class LayerMoments:
    """Sums over tokens of [x, 1][x, 1]^T and [x, 1] delta^T, float64."""

    def __init__(self, hidden: int):
        self.xx = torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64)
        self.xd = torch.zeros(hidden + 1, hidden, dtype=torch.float64)

    def add(self, x: torch.Tensor, delta: torch.Tensor):
        x1 = torch.cat([x.reshape(-1, x.shape[-1]), x.new_ones(x.shape[:-1].numel(), 1)], dim=1).double()
        self.xx += x1.T @ x1
        self.xd += x1.T @ delta.reshape(-1, delta.shape[-1]).double()


def solve_adapter(moments: LayerMoments, rank: int, ridge: float) -> SkipAdapter:
    """The rank-r ridge adapter from one layer's moments. ridge scales the penalty relative to
    the mean diagonal of x's second moment (the intercept is not penalised)."""
    xx, xd = moments.xx, moments.xd
    hidden = xd.shape[1]
    n = xx[-1, -1]
    penalty = torch.zeros_like(xx)
    penalty.diagonal()[:-1] = ridge * xx.diagonal()[:-1].mean()
    w1 = torch.linalg.solve(xx + penalty, xd)                  # [hidden + 1, hidden]
    w, b = w1[:-1], w1[-1]
    mean_x = xx[-1, :-1] / n
    cov_x = xx[:-1, :-1] / n - torch.outer(mean_x, mean_x)
    fitted_cov = w.T @ cov_x @ w                               # covariance of W^T x
    _, vecs = torch.linalg.eigh(fitted_cov)
    v = vecs[:, -min(rank, hidden):]                           # the top-r directions
    mean_delta = xd[-1] / n
    bias = mean_delta - v @ (v.T @ (w.T @ mean_x))
    return SkipAdapter(down=(w @ v).T.float().contiguous(), up=v.float().contiguous(),
                       bias=bias.float())


def random_skip_gates(num_windows: int, seq_len: int, depth, budgets: torch.Tensor,
                      generator) -> torch.Tensor:
    """float [B, T, L] gates: per token, as many randomly chosen decidable layers skipped as
    its window's budget (budgets [B]) leaves unpaid under `depth` (DepthAccounting)."""
    L, decidable = depth.num_layers, depth.decidable_layers
    D = len(decidable)
    skips = torch.tensor([D - depth.processable(float(b)) for b in budgets])     # [B]
    gates = torch.ones(num_windows, seq_len, L)
    order = torch.rand(num_windows, seq_len, D, generator=generator).argsort(dim=-1)
    skipped = order < skips[:, None, None]                                     # [B, T, D]
    gates[..., decidable] = (~skipped).float()
    return gates


@torch.no_grad()
def fit_ridge_adapters(forward, windows, depth, *, rank: int, ridge: float = 1e-2,
                       passes: int = 2, budget_range=(0.4, 1.0), batch: int = 4, pad_id: int = 0,
                       generator=None, progress: bool = True) -> list:
    """One SkipAdapter per layer of `forward` (GatedForward), fitted on `windows` (token lists,
    padded per batch with pad_id, padding left out) under random skip patterns at budgets drawn
    uniformly in budget_range; each pass after the first runs with the previous pass's
    adapters."""
    from tqdm import tqdm
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    generator = generator or torch.Generator().manual_seed(0)
    L, hidden = forward.spec.num_layers, forward.spec.hidden_size
    adapters = None
    for p in range(passes):
        moments = [LayerMoments(hidden) for _ in range(L)]
        starts = range(0, len(windows), batch)
        for start in tqdm(starts, desc=f"ridge pass {p + 1}/{passes}", unit="batch",
                          disable=not progress, leave=False):
            ids, mask = collate(windows[start:start + batch], pad_id)
            low, high = budget_range
            budgets = low + (high - low) * torch.rand(len(ids), generator=generator)
            gates = random_skip_gates(len(ids), ids.shape[1], depth, budgets, generator)
            record = []
            forward.run(ids, lambda l, h, hp: gates[..., l],
                        None if adapters is None else [a.tensors() for a in adapters], record)
            for l, (x, delta, _) in enumerate(record):
                moments[l].add(x[mask], delta[mask])
        adapters = [solve_adapter(m, rank, ridge) for m in moments]
    return adapters
