"""Category routing: embed the prompt, find its category, hard-skip that category's least
important layers.

Design (our controllers see one layer's per-token hidden states, not the whole prompt, so the
routing is per sequence and done before the run):
- the prompt embedding is the mean residual entering layer min_layers (i.e. after the forced
  first layers, 2 by default) over the window's first `prefix_len` tokens, L2-normalised;
- categories are k-means clusters (seeded k-means++) of the training windows' embeddings; the
  index is the k centroids and routing picks the nearest one;
- a category's per-layer importance is the mean KL to the full model when that layer alone is
  skipped, on that category's training windows;
- for a budget, the category's skip set is its n least important layers, n the fewest that make
  the set's compute fit the budget; the window is then run with a StaticController of that set.
"""
import torch
import torch.nn.functional as F

from ..actions import EXIT, PROCESS
from ..control.base import Controller
from .quality import full_logits
from .static_search import mean_kls, load_cached, save_cached, skip_set_compute, windows_key


class _EmbeddingProbe(Controller):
    """Records the residual entering `layer` for every token, then EXITs (nothing more to run)."""
    name = "embedding-probe"

    def __init__(self, layer: int):
        self.layer = layer
        self.h = None

    def propose(self, ctx):
        if ctx.layer == self.layer:
            self.h = ctx.h.float().cpu()
            return torch.full((ctx.h.shape[0],), EXIT, dtype=torch.int8, device=ctx.h.device)
        return torch.full((ctx.h.shape[0],), PROCESS, dtype=torch.int8, device=ctx.h.device)



def nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """[N] long: the index of each row's nearest centroid (Euclidean)."""
    return torch.cdist(x.float(), centroids.float().to(x.device)).argmin(dim=1)

def prompt_embeddings(llm, windows, prefix_len: int = 32) -> torch.Tensor:
    """[N, hidden] L2-normalised mean residual after the forced first layers over each prefix."""
    layer = llm.depth.min_layers
    if layer < 1 or layer >= llm.num_layers:
        raise ValueError(f"category routing embeds after the forced first layers: min_layers must be "
                         f"in 1..{llm.num_layers - 1}, got {layer}")
    rows = []
    for window in windows:
        probe = _EmbeddingProbe(layer)
        llm.score(list(window[:prefix_len]), energy_budget=1.0, controller=probe)
        if probe.h is None:
            raise RuntimeError(f"the embedding probe was never asked at layer {layer}")
        rows.append(probe.h.mean(0))
    return F.normalize(torch.stack(rows), dim=-1)


def kmeans(points: torch.Tensor, k: int, seed: int = 0, iterations: int = 50) -> torch.Tensor:
    """[k, D] float32 centroids of the rows of `points`: Lloyd's algorithm (Euclidean) from a
    k-means++ start (each next seed drawn with probability proportional to its squared distance
    from the seeds so far), stopping early once an iteration moves no centroid. A row's class is
    nearest(row, centroids)."""
    n = points.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in 1..{n} (the number of points), got {k!r}")
    x = points.float()
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(n, (1,), generator=g)].clone()
    for _ in range(k - 1):
        d2 = torch.cdist(x, centroids).min(dim=1).values.pow(2)
        centroids = torch.cat([centroids, x[torch.multinomial(d2 + 1e-12, 1, generator=g)]])
    for _ in range(iterations):
        assign = nearest(x, centroids)
        updated = centroids.clone()
        for c in range(k):
            members = assign == c
            if members.any():
                updated[c] = x[members].mean(0)
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids


class CategoryRouter:
    """Centroids of the training categories and each category's per-layer importance."""

    def __init__(self, centroids: torch.Tensor, importance: list, layers: list, prefix_len: int):
        self.centroids = centroids
        self.importance = importance      # [k] lists of KL per entry of `layers`
        self.layers = layers              # the skippable layers the importances refer to
        self.prefix_len = prefix_len

    @classmethod
    def build(cls, llm, windows, k: int = 4, windows_per_category: int = 2, prefix_len: int = 32,
              seed: int = 0, progress: bool = True, use_cache: bool = True):
        """Clusters the training windows, then ablates each skippable layer per category."""
        settings = {"k": k, "per_category": windows_per_category, "prefix": prefix_len, "seed": seed}
        key = windows_key(llm, windows, settings)
        cached = load_cached("router", key) if use_cache else None
        if cached is not None:
            return cls(torch.tensor(cached["centroids"]), cached["importance"], cached["layers"], prefix_len)
        embeddings = prompt_embeddings(llm, windows, prefix_len)
        centroids = kmeans(embeddings, k, seed=seed)
        labels = nearest(embeddings, centroids)
        layers = llm.depth.decidable_layers
        importance = []
        for category in range(k):
            members = [windows[i] for i in torch.nonzero(labels == category)[:, 0].tolist()]
            members = members[:windows_per_category]
            if not members:
                raise RuntimeError(f"k-means left category {category} empty")
            full = full_logits(llm, members, progress=progress)
            importance.append(mean_kls(llm, members, full, [[layer] for layer in layers],
                                        f"category {category} ablation", progress))
        if use_cache:
            save_cached("router", key, {"centroids": centroids.tolist(), "importance": importance,
                                        "layers": layers})
        return cls(centroids, importance, layers, prefix_len)

    def route(self, llm, windows) -> list:
        """The nearest category of each window's prefix."""
        return nearest(prompt_embeddings(llm, windows, self.prefix_len), self.centroids).tolist()

    def skip_set(self, llm, category: int, budget: float) -> list:
        """The category's fewest least-important layers whose skipping fits the budget."""
        order = [layer for _, layer in sorted(zip(self.importance[category], self.layers))]
        limit = llm.depth.effective_budget(budget) + 1e-9
        skip_cost, L = llm.depth.skip_cost, llm.num_layers
        for n in range(len(order) + 1):
            if skip_set_compute(order[:n], L, skip_cost) <= limit:
                return sorted(order[:n])
        raise ValueError(f"no skip set of this router fits budget {budget}")
