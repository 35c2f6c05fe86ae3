"""Text for quality evaluation and controller training: a plain-text file or, offline, Python's
own docs, cut into token windows, split into training and held-out windows, and sampled.

The default corpus is `pydoc_data.topics` (the text of `help()` topics, English prose shipped
with every CPython), so evaluation and controller training need no download.
"""
from pathlib import Path


def corpus_text(path=None) -> str:
    """The text of a plain-text UTF-8 file, or by default the pydoc topics (sorted keys)."""
    if path is None:
        from pydoc_data.topics import topics
        return "\n\n".join(topics[key] for key in sorted(topics))
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"text file {str(path)!r} does not exist (give a plain-text file)")
    data = file.read_bytes()
    if b"\x00" in data:
        raise ValueError(f"{str(path)!r} is not a text file (it contains NUL bytes); "
                         "give a plain-text UTF-8 file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{str(path)!r} is not UTF-8 text ({err}); give a plain-text UTF-8 file") from None
    if not text.strip():
        raise ValueError(f"text file {str(path)!r} is empty")
    return text


def token_windows(tokenizer, text: str, seq_len: int) -> list:
    """The text's tokens (no special tokens) cut into consecutive windows of exactly seq_len."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    return [ids[start:start + seq_len] for start in range(0, len(ids) - seq_len + 1, seq_len)]


def split_windows(windows, heldout_fraction: float = 0.2) -> tuple:
    """(train, heldout): the last fraction of the windows is held out, so its topics are unseen."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    windows = list(windows)
    if len(windows) < 2:
        raise ValueError(f"need at least 2 windows to split into train and held-out, got {len(windows)}: "
                         "give more text or a shorter seq_len")
    num_heldout = min(len(windows) - 1, max(1, round(len(windows) * heldout_fraction)))
    cut = len(windows) - num_heldout
    return windows[:cut], windows[cut:]


def evenly_spaced(items, count: int) -> list:
    """count items spread evenly over the list (all of them when it is shorter)."""
    items = list(items)
    if count >= len(items):
        return items
    return [items[(i * len(items)) // count] for i in range(count)]
