"""Corpus windows and per-token quality metrics against the full-depth model."""
import math

import pytest
import torch
from conftest import build_model, num_layers_of, random_ids

from anee_fast import LLM
from anee_fast.eval.corpus import corpus_text, split_windows, token_windows
from anee_fast.eval.quality import full_logits, score_windows, token_kl, token_metrics


class CharTokenizer:
    """One token per character; add_special_tokens would prepend a BOS id 0."""

    def encode(self, text, add_special_tokens=True):
        return ([0] if add_special_tokens else []) + [ord(c) for c in text]


def test_default_corpus_is_the_pydoc_topics_in_key_order():
    from pydoc_data.topics import topics
    text = corpus_text()
    first, last = sorted(topics)[0], sorted(topics)[-1]
    assert text.startswith(topics[first]) and text.endswith(topics[last])
    assert len(text) > 100_000


def test_corpus_file_and_its_errors(tmp_path):
    good = tmp_path / "a.txt"
    good.write_text("héllo world\n", encoding="utf-8")
    assert corpus_text(good) == "héllo world\n"
    with pytest.raises(ValueError, match="does not exist"):
        corpus_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        corpus_text(tmp_path / "empty.txt")
    (tmp_path / "bin.dat").write_bytes(b"\x89PNG\x00\x01")
    with pytest.raises(ValueError, match="not a text file"):
        corpus_text(tmp_path / "bin.dat")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="UTF-8"):
        corpus_text(tmp_path / "latin.txt")


def test_token_windows_are_consecutive_exact_and_without_special_tokens():
    windows = token_windows(CharTokenizer(), "abcdefghij", 3)
    assert windows == [[97, 98, 99], [100, 101, 102], [103, 104, 105]]
    assert token_windows(CharTokenizer(), "ab", 3) == []
    with pytest.raises(ValueError, match="seq_len"):
        token_windows(CharTokenizer(), "abc", 0)


def test_split_holds_out_the_last_windows():
    windows = [[i] for i in range(10)]
    train, heldout = split_windows(windows, 0.2)
    assert train == windows[:8] and heldout == windows[8:]
    train, heldout = split_windows(windows[:2], 0.01)
    assert train == [[0]] and heldout == [[1]]
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_windows(windows, 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        split_windows(windows[:1])


def test_kl_is_zero_against_itself_and_positive_otherwise():
    torch.manual_seed(0)
    full = torch.randn(5, 11) * 4
    assert torch.allclose(token_kl(full, full), torch.zeros(5), atol=1e-6)
    other = full.clone()
    other[2] = torch.randn(11)
    kl = token_kl(full, other)
    assert kl.dtype == torch.float32 and kl[2] > 0 and kl[[0, 1, 3, 4]].abs().max() < 1e-6
    p, q = full.softmax(-1).double(), other.softmax(-1).double()
    assert torch.allclose(kl.double(), (p * (p / q).log()).sum(-1), atol=1e-5)


def test_kl_is_finite_for_extreme_logits():
    full = torch.tensor([[1000.0, -1000.0, 0.0]])
    logits = torch.tensor([[-1000.0, 1000.0, 0.0]])
    kl = token_kl(full, logits)
    assert torch.isfinite(kl).all() and kl[0] > 1000


def test_metrics_top1_and_nll():
    full = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    logits = torch.tensor([[2.0, 0.0, 1.0], [2.0, 0.0, 1.0]])
    m = token_metrics(full, logits, targets=torch.tensor([2]))
    assert m["top1"].tolist() == [True, False]
    assert m["nll"].shape == (1,)
    assert math.isclose(m["nll"][0].item(), -torch.log_softmax(logits[0], -1)[2].item(), rel_tol=1e-6)
    with pytest.raises(ValueError, match="targets"):
        token_metrics(full, logits, targets=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="shape"):
        token_kl(full, logits[:1])


def test_full_logits_match_a_single_full_forward_and_batching():
    model = build_model("llama_gqa", num_layers=3)
    llm = LLM(model, backend="reference")
    windows = [random_ids(model, n, seed=n).tolist() for n in (7, 12, 5)]
    got = full_logits(llm, windows, progress=False)
    for window, logits in zip(windows, got):
        assert torch.allclose(logits, llm.score(window), atol=1e-4)
    L = num_layers_of(model)
    skip_all = [torch.ones((len(w), L), dtype=torch.int8) for w in windows]
    skipped, traces = score_windows(llm, windows, skip_all, max_batch_tokens=8, progress=False)
    kl = torch.cat([token_kl(f, s) for f, s in zip(got, skipped)])
    assert kl.mean() > 1e-3
    assert all(tr.mean_compute < 1.0 for tr in traces)
