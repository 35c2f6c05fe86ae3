"""A mixed distillation corpus on disk: several English text sources and the full model's own
chat answers, each with its own held-out split, built once offline and loaded as token windows.

Layout of a corpus directory:
    <source>/train.txt, <source>/heldout.txt   per text source (eval/text_sources.py)
    chat/train.jsonl, chat/heldout.jsonl       the full model's chat answers (chat_data.py)
    manifest.json                              written last: what was built, sizes, sha256s
A directory without manifest.json is a build that did not finish.
"""
import datetime
import hashlib
import json
import sys
import time
from pathlib import Path

from ..eval.corpus import token_windows
from ..eval.text_sources import (DEFAULT_DOC_CHARS, DEFAULT_MAX_CHARS, HELDOUT_FRACTION, SOURCES,
                                 join_documents, source_documents, split_documents)
from .chat_data import (MAX_NEW_TOKENS, chat_instructions, generate_chat_examples, read_jsonl,
                        write_jsonl)

DEFAULT_SOURCES = tuple(SOURCES)
CHAT = "chat"
MANIFEST = "manifest.json"
FORMAT = 1
MIN_CHAT_TOKENS = 16
# Encoded at build time and again at load time: the chat token ids are only valid for the
# tokenizer that made them.
TOKENIZER_PROBE = "Tokenizer check: The quick brown fox jumps over the lazy dog, 1234567890."


def build_corpus(out_dir, llm, sources=DEFAULT_SOURCES, chat: int = 0, *, seed: int = 0,
                 max_chars: int = DEFAULT_MAX_CHARS, doc_chars: int = DEFAULT_DOC_CHARS,
                 heldout_fraction: float = HELDOUT_FRACTION, max_new_tokens: int = MAX_NEW_TOKENS,
                 batch_size: int = 32, roots=None, command=None, progress: bool = True) -> dict:
    """Writes the corpus of `sources` (names of eval/text_sources.SOURCES) and `chat` chat
    examples answered by `llm` (batch_size per generate call) into out_dir; returns the
    manifest. roots: {source: directory} read instead of the machine's own place; command: what
    to record as the command (default: this process's argv)."""
    sources = list(sources)
    roots = dict(roots or {})
    unknown = [s for s in sources + list(roots) if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown text source {unknown[0]!r}; known: {', '.join(SOURCES)}")
    if len(set(sources)) != len(sources):
        raise ValueError(f"a source is named twice: {sources}")
    if isinstance(chat, bool) or not isinstance(chat, int) or chat < 0:
        raise ValueError(f"chat must be an integer >= 0 (examples), got {chat!r}")
    if not sources and not chat:
        raise ValueError("nothing to build: give text sources or chat examples")
    tokenizer = llm.tokenizer
    if tokenizer is None:
        raise ValueError(f"the model {llm.name!r} has no tokenizer: a corpus needs one")
    instructions = chat_instructions(chat, seed, heldout_fraction) if chat else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)     # the directory is unfinished until it is rewritten
    now = datetime.datetime.now(datetime.timezone.utc)
    manifest = {"format": FORMAT, "model": llm.name,
                "command": " ".join(sys.argv) if command is None else command,
                "created": now.isoformat(timespec="seconds"),
                "seed": seed, "max_chars": max_chars, "doc_chars": doc_chars,
                "heldout_fraction": heldout_fraction,
                "tokenizer_check": _tokenizer_check(tokenizer),
                "sources": {}, "wall_s": {}}
    for name in sources:
        start = time.perf_counter()
        documents = source_documents(name, roots.get(name), max_chars, doc_chars, progress)
        train, heldout = split_documents(documents, heldout_fraction)
        (out / name).mkdir(exist_ok=True)
        manifest["sources"][name] = {
            split: _write_text(out, f"{name}/{split}.txt", docs, tokenizer)
            for split, docs in (("train", train), ("heldout", heldout))}
        manifest["wall_s"][name] = round(time.perf_counter() - start, 1)
    if chat:
        start = time.perf_counter()
        (out / CHAT).mkdir(exist_ok=True)
        manifest[CHAT] = {"max_new_tokens": max_new_tokens, "energy_budget": 1.0, "greedy": True}
        for split, chosen in zip(("train", "heldout"), instructions):
            examples = generate_chat_examples(llm, chosen, max_new_tokens, batch_size, progress)
            manifest[CHAT][split] = _write_chat(out, f"{CHAT}/{split}.jsonl", examples,
                                                tokenizer.eos_token_id)
        manifest["wall_s"][CHAT] = round(time.perf_counter() - start, 1)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _write_text(out: Path, relative: str, documents, tokenizer) -> dict:
    text = join_documents(documents) + "\n"
    (out / relative).write_text(text, encoding="utf-8")
    return {"file": relative, "documents": len(documents), "first_document": documents[0][0],
            "last_document": documents[-1][0], "chars": len(text),
            "tokens": len(tokenizer.encode(text, add_special_tokens=False)),
            "sha256": _sha256(out / relative)}


def _write_chat(out: Path, relative: str, examples, eos_token_id) -> dict:
    write_jsonl(out / relative, examples)
    return {"file": relative, "examples": len(examples),
            "prompt_tokens": sum(len(e["prompt_token_ids"]) for e in examples),
            "answer_tokens": sum(len(e["answer_token_ids"]) for e in examples),
            "stopped_at_eos": sum(e["answer_token_ids"][-1:] == [eos_token_id] for e in examples),
            "sha256": _sha256(out / relative)}


def _tokenizer_check(tokenizer) -> str:
    """sha256 of the probe's token ids under this tokenizer."""
    ids = [int(t) for t in tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(corpus_dir) -> dict:
    """The manifest of a finished corpus directory, its files checked against their sha256."""
    root = Path(corpus_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus directory {str(corpus_dir)!r} does not exist "
                                "(build it with anee-fast build-corpus)")
    path = root / MANIFEST
    if not path.is_file():
        raise ValueError(f"{str(corpus_dir)!r} has no {MANIFEST}: not a corpus directory, or its "
                         "build did not finish (build it again)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a corpus manifest of format {FORMAT}")
    for entry in _file_entries(manifest):
        file = root / entry["file"]
        if not file.is_file():
            raise ValueError(f"corpus file {file} is missing (build the corpus again)")
        if _sha256(file) != entry["sha256"]:
            raise ValueError(f"corpus file {file} changed since the build (sha256 differs from "
                             f"{MANIFEST})")
    return manifest


def _file_entries(manifest) -> list:
    groups = list(manifest.get("sources", {}).values())
    if CHAT in manifest:
        groups.append(manifest[CHAT])
    return [group[split] for group in groups for split in ("train", "heldout")]


def load_corpus(corpus_dir, tokenizer, seq_len: int,
                min_chat_tokens: int = MIN_CHAT_TOKENS) -> dict:
    """{source: (train_windows, heldout_windows)} of token-id lists: each text source cut into
    windows of exactly seq_len (token_windows); under "chat", one window per example, prompt then
    answer, cut to seq_len, examples of fewer than min_chat_tokens tokens in all dropped."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")
    manifest = read_manifest(corpus_dir)
    if _tokenizer_check(tokenizer) != manifest.get("tokenizer_check"):
        raise ValueError(f"{str(corpus_dir)!r} was built with another tokenizer (model "
                         f"{manifest.get('model')!r}): build it again for this one")
    root = Path(corpus_dir)
    corpus = {}
    for name, group in manifest.get("sources", {}).items():
        corpus[name] = tuple(
            token_windows(tokenizer, (root / group[split]["file"]).read_text(encoding="utf-8"),
                          seq_len)
            for split in ("train", "heldout"))
    if CHAT in manifest:
        corpus[CHAT] = tuple(
            [ids[:seq_len] for ids in (e["prompt_token_ids"] + e["answer_token_ids"]
                                       for e in read_jsonl(root / manifest[CHAT][split]["file"]))
             if len(ids) >= min_chat_tokens]
            for split in ("train", "heldout"))
    for name, (train, heldout) in corpus.items():
        for split, windows in (("train", train), ("heldout", heldout)):
            if not windows:
                raise ValueError(f"the corpus's {name} {split} split has no window of {seq_len} "
                                 f"tokens (chat: no example of {min_chat_tokens} or more): use "
                                 "a shorter seq_len or a larger corpus")
    return corpus
