"""A corpus directory: what build_corpus writes (per-source splits, chat JSONL, a manifest whose
sizes and sha256s match the files), what load_corpus makes of it, their errors, and
`anee-fast build-corpus`."""
import hashlib
import json
import shutil

import pytest
import torch
from test_chat_data import tiny_chat_llm, tiny_tokenizer

from anee_fast import cli
from anee_fast.eval.corpus import token_windows
from anee_fast.training.chat_data import read_jsonl
from anee_fast.training.mixed_corpus import build_corpus, load_corpus, read_manifest

FORTUNES = "\n%\n".join(f"Fortune number {i}: the water cycle is a short poem about tea."
                        for i in range(40))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(corpus directory, manifest, llm): pydoc and fake fortunes, 10 chat examples."""
    root = tmp_path_factory.mktemp("fortunes")
    (root / "tea").write_text(FORTUNES)
    (root / "coffee").write_text(FORTUNES.replace("tea", "coffee"))
    out = tmp_path_factory.mktemp("corpus") / "c"
    llm = tiny_chat_llm()
    manifest = build_corpus(out, llm, ["pydoc", "fortunes"], chat=10, max_chars=20_000,
                            max_new_tokens=8, roots={"fortunes": root}, command="test build",
                            progress=False)
    return out, manifest, llm


def test_build_writes_splits_chat_and_a_manifest_that_matches_the_files(built):
    out, manifest, llm = built
    assert manifest == read_manifest(out) == json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "test build" and manifest["model"] == llm.name
    assert set(manifest["sources"]) == {"pydoc", "fortunes"}
    for name, group in manifest["sources"].items():
        for split in ("train", "heldout"):
            entry = group[split]
            path = out / name / f"{split}.txt"
            text = path.read_text(encoding="utf-8")
            assert entry["file"] == f"{name}/{split}.txt" and entry["chars"] == len(text)
            assert entry["tokens"] == len(llm.tokenizer.encode(text, add_special_tokens=False))
            assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert group["train"]["last_document"] < group["heldout"]["first_document"]
        # The cap counts documents; the files add a blank line between them and a final newline.
        separators = 2 * (group["train"]["documents"] + group["heldout"]["documents"])
        total = group["train"]["chars"] + group["heldout"]["chars"]
        assert total <= 20_000 + separators
        assert group["heldout"]["chars"] >= 0.2 * (total - separators)
    # Whole fortunes held out, the last by name (tea/NNNNN): none of them is in training.
    train = (out / "fortunes" / "train.txt").read_text().split("\n\n")
    heldout = (out / "fortunes" / "heldout.txt").read_text().split("\n\n")
    assert all("tea." in fortune for fortune in heldout) and set(train).isdisjoint(heldout)
    assert sum("coffee." in fortune for fortune in train) == 40

    chat = manifest["chat"]
    assert (chat["train"]["examples"], chat["heldout"]["examples"]) == (8, 2)
    for split in ("train", "heldout"):
        examples = read_jsonl(out / "chat" / f"{split}.jsonl")
        assert len(examples) == chat[split]["examples"]
        assert chat[split]["answer_tokens"] == sum(len(e["answer_token_ids"]) for e in examples)
        assert all(1 <= len(e["answer_token_ids"]) <= 8 for e in examples)


def test_load_gives_prose_windows_and_one_window_per_chat_example(built):
    out, manifest, llm = built
    corpus = load_corpus(out, llm.tokenizer, seq_len=12, min_chat_tokens=16)
    assert set(corpus) == {"pydoc", "fortunes", "chat"}
    train, heldout = corpus["pydoc"]
    assert train == token_windows(llm.tokenizer, (out / "pydoc" / "train.txt").read_text(), 12)
    assert heldout and all(len(w) == 12 for w in train + heldout)
    examples = read_jsonl(out / "chat" / "train.jsonl")
    long_enough = [e for e in examples if len(e["prompt_token_ids"] + e["answer_token_ids"]) >= 16]
    wide = load_corpus(out, llm.tokenizer, seq_len=64, min_chat_tokens=16)
    assert wide["chat"][0] == [e["prompt_token_ids"] + e["answer_token_ids"] for e in long_enough]
    assert corpus["chat"][0] == [w[:12] for w in wide["chat"][0]]


def test_load_errors(built, tmp_path):
    out, _, llm = built
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "absent", llm.tokenizer, 12)
    with pytest.raises(ValueError, match="has no manifest.json"):
        load_corpus(tmp_path, llm.tokenizer, 12)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_corpus(tmp_path, llm.tokenizer, 12)
    with pytest.raises(ValueError, match="seq_len"):
        load_corpus(out, llm.tokenizer, 0)
    with pytest.raises(ValueError, match="no window of 100000 tokens"):
        load_corpus(out, llm.tokenizer, 100_000)

    other = tiny_tokenizer()
    other.add_tokens(["Tokenizer"])
    with pytest.raises(ValueError, match="built with another tokenizer"):
        load_corpus(out, other, 12)

    edited = shutil.copytree(out, tmp_path / "edited")
    lost = shutil.copytree(out, tmp_path / "lost")
    with (edited / "fortunes" / "heldout.txt").open("a") as f:
        f.write("edited\n")
    with pytest.raises(ValueError, match="heldout.txt changed since the build"):
        load_corpus(edited, llm.tokenizer, 12)
    (lost / "chat" / "train.jsonl").unlink()
    with pytest.raises(ValueError, match="train.jsonl is missing"):
        read_manifest(lost)


def test_build_errors(tmp_path):
    llm = tiny_chat_llm()
    with pytest.raises(ValueError, match="unknown text source 'web'"):
        build_corpus(tmp_path, llm, ["web"])
    with pytest.raises(ValueError, match="nothing to build"):
        build_corpus(tmp_path, llm, [], chat=0)
    with pytest.raises(ValueError, match="chat must be"):
        build_corpus(tmp_path, llm, [], chat=-1)
    with pytest.raises(FileNotFoundError, match="'fortunes' needs"):
        build_corpus(tmp_path / "c", llm, ["fortunes"], roots={"fortunes": tmp_path / "none"},
                     progress=False)
    assert not (tmp_path / "c" / "manifest.json").exists()


def _save_model(folder):
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                         max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_cli_build_corpus(tmp_path, capsys):
    model = _save_model(tmp_path / "model")
    out = tmp_path / "corpus"
    rc = cli.main(["build-corpus", "--out", str(out), "--sources", "pydoc", "--chat", "3",
                   "--max-new-tokens", "4", "--max-chars", "60000", "--model", str(model),
                   "--threads", "1", "--no-progress"])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    manifest = read_manifest(out)
    assert set(manifest["sources"]) == {"pydoc"} and manifest["chat"]["heldout"]["examples"] == 1
    assert manifest["command"] == (
        f"anee-fast build-corpus --out {out} --sources pydoc --chat 3 --max-new-tokens 4 "
        f"--batch-size 64 --max-chars 60000 --seed 0 --model {model} --min-layers 2 --threads 1")
    assert "pydoc:" in stdout and "chat: 2 train + 1 held-out examples" in stdout
    rc = cli.main(["build-corpus", "--out", str(out), "--sources", "pydoc,web"])
    assert rc == 1 and "--sources: unknown source 'web'" in capsys.readouterr().err
    rc = cli.main(["build-corpus", "--out", str(out), "--chat", "-1"])
    assert rc == 1 and "--chat must be >= 0" in capsys.readouterr().err
