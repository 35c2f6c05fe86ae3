"""anee_fast.eval.plots writes readable PNGs for synthetic traces and for a real generate() trace."""
import matplotlib
import matplotlib.image
import pytest
import torch

from anee_fast import EXIT, PROCESS, SKIP
from anee_fast.eval import plots
from anee_fast.trace import Trace

PLOTTERS = [plots.plot_heatmap, plots.plot_compute, plots.plot_depth_profile]


def synthetic_trace(T=23, L=7, n_prompt=9, budget=0.5, skip_cost=0.2, seed=0):
    """Every code present; EXIT rows stay EXIT to the last layer, as traces record them."""
    g = torch.Generator().manual_seed(seed)
    actions = torch.randint(0, 2, (T, L), generator=g).to(torch.int8)
    actions[:, :2] = PROCESS
    exit_at = torch.randint(2, L + 1, (T,), generator=g)
    for t in range(T):
        actions[t, exit_at[t]:] = EXIT
    run = (actions == PROCESS).sum(1).float()
    compute = (run + (L - run) * skip_cost) / L
    return Trace(actions, compute.float(), budget, skip_cost, num_prompt_tokens=n_prompt)


def read_png(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    return image


@pytest.mark.parametrize("plot", PLOTTERS, ids=lambda f: f.__name__)
def test_writes_readable_png(plot, tmp_path):
    trace = synthetic_trace()
    assert {PROCESS, SKIP, EXIT} <= set(trace.actions.unique().tolist())
    path = tmp_path / "nested" / "dir" / f"{plot.__name__}.png"   # parent dirs get created
    returned = plot(trace, path)
    assert str(returned) == str(path)
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = read_png(path)
    assert image[..., :3].std() > 0.01          # not a blank canvas


def test_heatmap_colours_follow_the_actions(tmp_path):
    """An all-PROCESS trace and an all-EXIT-after-layer-0 trace draw different pictures."""
    T, L = 12, 6
    full = Trace(torch.zeros((T, L), dtype=torch.int8), torch.ones(T), 1.0, 0.2, 4)
    early = torch.full((T, L), EXIT, dtype=torch.int8)
    early[:, 0] = PROCESS
    shallow = Trace(early, torch.full((T,), (1 + 5 * 0.2) / 6), 0.3, 0.2, 4)
    a = read_png(plots.plot_heatmap(full, tmp_path / "full.png", title="same"))
    b = read_png(plots.plot_heatmap(shallow, tmp_path / "shallow.png", title="same"))
    assert a.shape == b.shape
    assert abs(a[..., :3] - b[..., :3]).mean() > 0.01


def test_heatmap_token_labels(tmp_path):
    trace = synthetic_trace(T=10)
    tokens = ["Hello", " world", "\n", "$x$", " ", "a" * 40, "é", "<|im_end|>", "x", "y"]
    path = plots.plot_heatmap(trace, tmp_path / "labels.png", tokens=tokens, title="labelled")
    read_png(path)
    # Too many tokens for labels: still a plot, with numeric ticks.
    long = synthetic_trace(T=150, L=30)
    read_png(plots.plot_heatmap(long, tmp_path / "long.png", tokens=[str(i) for i in range(150)]))
    with pytest.raises(ValueError, match="tokens"):
        plots.plot_heatmap(trace, tmp_path / "bad.png", tokens=["only", "two"])


def test_options_and_edge_cases(tmp_path):
    trace = synthetic_trace()
    read_png(plots.plot_compute(trace, tmp_path / "floor.png", floor=0.3, title="with floor"))
    read_png(plots.plot_depth_profile(trace, tmp_path / "gen.png", generated_only=True))
    one = Trace(torch.zeros((1, 3), dtype=torch.int8), torch.ones(1), 0.5, 0.1, 1)
    for plot in PLOTTERS:
        read_png(plot(one, tmp_path / f"one_{plot.__name__}.png"))
    with pytest.raises(ValueError, match="generated"):
        plots.plot_depth_profile(one, tmp_path / "none.png", generated_only=True)
    empty = Trace(torch.zeros((0, 3), dtype=torch.int8), torch.zeros(0), 0.5, 0.1, 0)
    with pytest.raises(ValueError, match="at least one token"):
        plots.plot_compute(empty, tmp_path / "empty.png")


def test_draws_without_pyplot():
    """Agg canvas only: no display needed and the caller's pyplot backend is left alone."""
    import inspect
    source = inspect.getsource(plots)
    assert "pyplot" not in source.replace("never through pyplot", "")
    assert "matplotlib.use(" not in source


def test_plots_of_a_real_generate_trace(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    from anee_fast import LLM, SamplingParams
    torch.manual_seed(0)
    config = GPT2Config(n_layer=6, n_embd=64, n_head=4, vocab_size=97, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    llm = LLM(GPT2LMHeadModel(config).eval(), backend="reference", device="cpu", min_layers=1)
    prompt = [5, 17, 33, 2, 81, 40, 11]
    out = llm.generate(prompt, SamplingParams(max_tokens=6, ignore_eos=True), energy_budget=0.4,
                       controller="budget")[0]
    trace = out.trace
    assert trace.actions.shape == (len(prompt) + len(out.token_ids) - 1, 6)
    assert trace.num_prompt_tokens == len(prompt)
    ids = (prompt + out.token_ids)[:trace.actions.shape[0]]
    paths = [plots.plot_heatmap(trace, tmp_path / "real" / "heatmap.png", tokens=[str(i) for i in ids]),
             plots.plot_compute(trace, tmp_path / "real" / "compute.png"),
             plots.plot_depth_profile(trace, tmp_path / "real" / "depth.png")]
    for path in paths:
        read_png(path)
