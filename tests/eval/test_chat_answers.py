"""Chat answers on a tiny random Llama with an offline-built tokenizer and chat template: the full
model's answers are plain greedy generations of the templated prompt, the figures and flags are
what the module doc says, and `anee-fast eval --chat-answers` writes them."""
import json
import math

import pytest
import torch
from conftest import hf_logits

from anee_fast import LLM, SamplingParams
from anee_fast.cli import main
from anee_fast.control.controllers import StaticController
from anee_fast.eval.chat_answers import (DEFAULT_PROMPTS, chat_answers, chat_prompt_ids, ends_early,
                                         format_chat_markdown, format_chat_summary, loops)
from anee_fast.eval.quality import distinct2

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{% endif %}")
WORDS = ("the a of to is in and what how write give explain make cup tea capital france haiku "
         "autumn tips hash table plot sky blue light red sea user assistant , . ? !").split()
LAYERS = 4
MAX_TOKENS = 10


def _tokenizer(eos="<|im_end|>"):
    """A WordLevel tokenizer with a chat template, built here (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
                                        + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token=eos)
    fast.chat_template = TEMPLATE
    return fast


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF model, its LLM, the saved model folder)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path_factory.mktemp("chat_llama")
    tokenizer = _tokenizer()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=83,
                         num_hidden_layers=LAYERS, num_attention_heads=6, num_key_value_heads=2,
                         max_position_embeddings=256, initializer_range=0.2,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    return model, LLM(str(folder), backend="reference", device="cpu"), str(folder)


def _templated(tokenizer, prompt):
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def test_full_answers_are_greedy_generations_of_the_templated_prompt(tiny):
    model, llm, _ = tiny
    records = chat_answers(llm, DEFAULT_PROMPTS, [1.0, 0.5], ["budget", "heuristic"],
                           max_tokens=MAX_TOKENS, progress=False)
    runs = [("full", 1.0), ("budget", 1.0), ("budget", 0.5), ("heuristic", 1.0), ("heuristic", 0.5)]
    assert [(r["controller"], r["budget"], r["prompt"]) for r in records] == [
        (name, budget, p) for name, budget in runs for p in DEFAULT_PROMPTS]
    n = len(DEFAULT_PROMPTS)
    for i, prompt in enumerate(DEFAULT_PROMPTS):
        ids = _templated(llm.tokenizer, prompt)
        assert chat_prompt_ids(llm.tokenizer, prompt) == (ids, True)
        direct = llm.generate(ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))[0]
        full, budget_full = records[i], records[n + i]
        assert full["token_ids"] == direct.token_ids and full["text"] == direct.text
        assert full["tokens"] == len(direct.token_ids) and full["compute"] == 1.0
        assert full["ppl_ratio"] == 1.0 and full["ends_early"] is (not direct.text.strip())
        assert full["distinct2"] == distinct2(direct.token_ids)
        # The budget controller at 1.0 runs every layer: the same answer.
        assert budget_full["token_ids"] == full["token_ids"]
        assert budget_full["ppl_ratio"] == pytest.approx(1.0, rel=1e-5)
        # ppl_under_full: the full model's perplexity of the answer given the prompt.
        for r in (full, records[2 * n + i]):
            logits = hf_logits(model, ids + r["token_ids"])[len(ids) - 1:-1]
            nll = -torch.log_softmax(logits, -1)[torch.arange(r["tokens"]), r["token_ids"]]
            assert r["ppl_under_full"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-4)
            assert r["ppl_ratio"] == pytest.approx(r["ppl_under_full"] / full["ppl_under_full"])
            assert r["loops"] is loops(r["distinct2"], full["distinct2"])
    cap = llm.depth.effective_budget(0.5) + 1e-6
    # The prompt read at full depth (the default, as `generate` reads it), the answer at 0.5.
    assert all(r["answer_compute"] <= cap < r["compute"] and r["prompt_budget"] == 1.0
               for r in records if r["budget"] == 0.5)
    at_budget = chat_answers(llm, DEFAULT_PROMPTS[:1], [0.5], ["budget"], max_tokens=MAX_TOKENS,
                             progress=False, prompt_budget=None)[1]
    assert at_budget["compute"] <= cap and at_budget["prompt_budget"] == 0.5
    assert any(r["token_ids"] != records[i % n]["token_ids"] for i, r in enumerate(records))


def test_answers_stop_at_eos_and_short_ones_are_flagged(tiny):
    """With the full model's third answer token made the EOS, its answer stops there; every
    record's flag is ends_early of its figures against the full model's answer."""
    model, llm, _ = tiny
    first = chat_answers(llm, DEFAULT_PROMPTS[:1], [], [], max_tokens=MAX_TOKENS, progress=False)
    answer = first[0]["token_ids"]
    stopping = LLM(model, backend="reference", device="cpu",
                   tokenizer=_tokenizer(eos=llm.tokenizer.convert_ids_to_tokens(answer[2])))
    records = chat_answers(stopping, DEFAULT_PROMPTS[:2], [0.5, 0.25], ["budget"],
                           max_tokens=MAX_TOKENS, progress=False)
    full = records[0]
    assert full["finish_reason"] == "stop"
    assert full["token_ids"] == answer[:answer.index(answer[2]) + 1]
    for i, r in enumerate(records):
        own = records[i % 2]
        assert r["ends_early"] == ends_early(r["text"], r["tokens"], r["finish_reason"],
                                             own["tokens"], own["finish_reason"])
        assert r["finish_reason"] == "length" or r["token_ids"][-1] == stopping.tokenizer.eos_token_id


@pytest.mark.parametrize("text, tokens, reason, full_tokens, full_reason, expected", [
    ("", 1, "stop", 1, "stop", True),                 # empty is always early
    ("  \n", 3, "stop", 40, "length", True),
    ("Paris", 2, "stop", 30, "stop", True),
    ("Paris", 5, "stop", 6, "stop", True),            # 5 tokens is within 5
    ("Paris", 2, "stop", 4, "stop", False),           # the full model ends as early
    ("Paris .", 6, "stop", 30, "stop", False),
    ("a b c", 3, "length", 30, "stop", False),        # cut by max_tokens, not ended
    ("a b c", 3, "stop", 3, "length", True),          # the full model went on
])
def test_ends_early(text, tokens, reason, full_tokens, full_reason, expected):
    assert ends_early(text, tokens, reason, full_tokens, full_reason) is expected


@pytest.mark.parametrize("d2, full_d2, expected", [
    (0.3, 0.8, True),            # under half the full answer's distinct 2-grams
    (0.4, 0.8, False),           # exactly half: not a loop
    (0.2, 0.3, False),           # the full model repeats itself as much
    (None, 0.8, False),          # a one-token answer has no 2-grams
    (0.2, None, False),
])
def test_loops(d2, full_d2, expected):
    assert loops(d2, full_d2) is expected


def test_formatters_show_each_answer_under_its_prompt():
    base = {"compute": 1.0, "answer_compute": 1.0, "prompt_budget": 1.0, "finish_reason": "stop",
            "ppl_under_full": 4.0, "ppl_ratio": 1.0, "ends_early": False, "distinct2": 1.0,
            "loops": False}
    records = [
        {**base, "prompt": "P1", "controller": "full", "budget": 1.0, "text": "one\ntwo", "tokens": 9},
        {**base, "prompt": "P2", "controller": "full", "budget": 1.0, "text": "three", "tokens": 7},
        {**base, "prompt": "P1", "controller": "heuristic", "budget": 0.5, "text": "", "tokens": 1,
         "compute": 0.6, "answer_compute": 0.5, "ppl_under_full": 8.0, "ppl_ratio": 2.0,
         "ends_early": True,
         "distinct2": None},
        {**base, "prompt": "P2", "controller": "heuristic", "budget": 0.5, "text": "x", "tokens": 96,
         "compute": 0.6, "answer_compute": 0.5, "finish_reason": "length", "ppl_ratio": 4.0,
         "distinct2": 0.25, "loops": True},
    ]
    summary = format_chat_summary(records).splitlines()
    assert summary[0].split()[2:4] == ["compute", "answer"]
    assert summary[2].split() == ["full", "1.00", "1.000", "1.000", "2", "0", "0", "1", "1.000",
                                  "8.0"]
    assert summary[3].split() == ["heuristic", "0.50", "0.600", "0.500", "2", "1", "1", "3",
                                  "0.250", "48.5"]
    md = format_chat_markdown(records)
    assert "the prompt read at prompt budget 1" in md
    assert "compute 0.600 (answer 0.500)" in md
    p1, p2 = md.split("## 1. P1")[1].split("## 2. P2")
    assert p1.index("**full**") < p1.index("> one\n> two") < p1.index("**heuristic @ 0.5**")
    assert "> *(empty)*" in p1 and "**ENDS EARLY**" in p1 and "x2.00" in p1
    assert "dist2" not in p1.split("**heuristic @ 0.5**")[1]
    assert "cut at max_tokens" in p2 and "dist2 0.25" in p2 and "ENDS EARLY" not in p2
    assert "**LOOPS**" in p2 and "LOOPS" not in p1


def test_per_window_controllers_and_bad_arguments_are_refused(tiny):
    _, llm, _ = tiny
    routed = {"router": lambda b: [StaticController([0] * LAYERS)] * 3}
    with pytest.raises(ValueError, match="one controller per held-out window"):
        chat_answers(llm, DEFAULT_PROMPTS[:1], [0.5], routed, progress=False)
    with pytest.raises(ValueError, match="max_tokens"):
        chat_answers(llm, DEFAULT_PROMPTS[:1], [0.5], ["budget"], max_tokens=0, progress=False)
    with pytest.raises(ValueError, match="no prompts"):
        chat_answers(llm, [], [0.5], ["budget"], progress=False)


def test_cli_eval_writes_chat_answers(tiny, tmp_path, capsys, monkeypatch):
    _, _, folder = tiny
    monkeypatch.setenv("ANEE_FAST_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS[(7 * i) % len(WORDS)] for i in range(900)))
    md, records_json = tmp_path / "out" / "chat.md", tmp_path / "q.json"
    rc = main([str(a) for a in [
        "eval", "--model", folder, "--device", "cpu", "--backend", "reference", "--text", text,
        "--seq-len", "40", "--windows", "1", "--budgets", "1,0.5", "--controllers", "budget,router",
        "--router-k", "2", "--search-windows", "2", "--chat-answers", md, "--chat-max-tokens", "6",
        "--json", records_json, "--no-progress"]])
    out, err = capsys.readouterr()
    assert rc == 0, err
    head = out.splitlines()[0].split()
    assert "gen_ppl" in head and "dist2" in head
    records = json.loads(records_json.read_text())
    assert all(r["gen_ppl"] > 0 and 0 < r["distinct2"] <= 1 for r in records)
    assert "note: chat answers leave out the router" in out
    assert f"chat answers: {md}" in out
    written = md.read_text()
    for number, prompt in enumerate(DEFAULT_PROMPTS, 1):
        assert f"## {number}. {prompt}" in written
    assert written.count("**full**") == 6 and written.count("**budget @ 0.5**") == 6
    assert "router" not in written
    summary = [line.split()[:2] for line in out.splitlines()
               if line.split()[:1] in (["full"], ["budget"]) and len(line.split()) == 10]
    assert summary == [["full", "1.00"], ["budget", "1.00"], ["budget", "0.50"]]


def test_cli_eval_answers_a_chat_set(tiny, tmp_path, capsys, monkeypatch):
    """--chat-set: the file's first --chat-set-size instructions answered by the full model and
    every controller at every budget; the summary printed, the records beside --json."""
    _, _, folder = tiny
    monkeypatch.setenv("ANEE_FAST_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS[(7 * i) % len(WORDS)] for i in range(900)))
    instructions = ["Name a colour.", "Count to three.", "Say hello."]
    chat_set = tmp_path / "heldout.jsonl"
    chat_set.write_text("".join(json.dumps({"instruction": i, "prompt_token_ids": [1, 2],
                                            "answer_token_ids": [3], "answer_text": "x"}) + "\n"
                                for i in instructions))
    rc = main([str(a) for a in [
        "eval", "--model", folder, "--device", "cpu", "--backend", "reference", "--text", text,
        "--seq-len", "40", "--windows", "1", "--budgets", "1,0.5", "--controllers", "budget",
        "--search-windows", "2", "--chat-set", chat_set, "--chat-set-size", "2",
        "--chat-max-tokens", "6", "--json", tmp_path / "q.json", "--no-progress"]])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "chat set: 2 instructions" in out
    assert f"chat set records: {tmp_path / 'q_chat_set.json'}" in out
    records = json.loads((tmp_path / "q_chat_set.json").read_text())
    assert [(r["controller"], r["budget"], r["prompt"]) for r in records] == [
        (name, budget, p) for name, budget in [("full", 1.0), ("budget", 1.0), ("budget", 0.5)]
        for p in instructions[:2]]
    assert all(isinstance(r["loops"], bool) for r in records)
    summary = [line.split()[:2] for line in out.split("chat set: 2 instructions")[1].splitlines()
               if line.split()[:1] in (["full"], ["budget"]) and len(line.split()) == 10]
    assert summary == [["full", "1.00"], ["budget", "1.00"], ["budget", "0.50"]]


@pytest.mark.parametrize("args, message", [
    (["--chat-set-size", "2"], "--chat-set-size needs --chat-set"),
    (["--chat-set", "CHAT", "--chat-set-size", "0"], "--chat-set-size must be >= 1, got 0"),
    (["--chat-set", "MISSING"], "--chat-set: "),
    (["--chat-set", "EMPTY"], "holds no examples"),
    (["--chat-set", "BAD"], "not JSON"),
])
def test_cli_eval_refuses_a_bad_chat_set_before_loading(tmp_path, capsys, monkeypatch, args,
                                                        message):
    monkeypatch.setattr("anee_fast.cli._load_llm", lambda *a, **k: pytest.fail("model loaded"))
    files = {"CHAT": tmp_path / "chat.jsonl", "MISSING": tmp_path / "missing.jsonl",
             "EMPTY": tmp_path / "empty.jsonl", "BAD": tmp_path / "bad.jsonl"}
    files["CHAT"].write_text(json.dumps({"instruction": "Hi.", "prompt_token_ids": [1],
                                         "answer_token_ids": [2], "answer_text": "x"}) + "\n")
    files["EMPTY"].write_text("")
    files["BAD"].write_text("{not json\n")
    assert main(["eval"] + [str(files.get(a, a)) for a in args]) == 1
    assert message in capsys.readouterr().err


def test_cli_eval_refuses_a_bad_chat_max_tokens_before_loading(capsys):
    assert main(["eval", "--chat-max-tokens", "0"]) == 1
    assert "--chat-max-tokens must be >= 1" in capsys.readouterr().err


def test_cli_eval_refuses_a_bad_chat_prompt_budget_before_loading(capsys):
    assert main(["eval", "--chat-prompt-budget", "1.5"]) == 1
    assert "--chat-prompt-budget: prompt_budget must be a number in [0, 1]" in \
        capsys.readouterr().err
