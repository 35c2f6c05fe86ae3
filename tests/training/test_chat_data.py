"""Chat distillation data: templated instructions with whole topics held out, and the full model's
greedy answers to them through the chat template, on a tiny Llama with a word-level tokenizer."""
import json

import pytest
from conftest import build_model

from anee_fast import LLM, SamplingParams
from anee_fast.eval.chat_answers import chat_prompt_ids
from anee_fast.training.chat_data import (EXAMPLE_KEYS, all_instructions, chat_instructions,
                                          generate_chat_examples, read_jsonl, write_jsonl)

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} "
                 "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant{% endif %}")


def tiny_tokenizer(chat: bool = True):
    """A word-level tokenizer of a few words (ids below the tiny model's vocab of 101), EOS id 2,
    with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["explain write a short poem about the water cycle tea coffee what is how do I user "
         "assistant list five tips facts in simple terms to give steps for compare and . ? ,"],
        trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>",
                                                  "<|im_end|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_chat_llm(chat: bool = True):
    return LLM(build_model("llama_gqa", 3), backend="reference", device="cpu",
               tokenizer=tiny_tokenizer(chat))


def test_instructions_are_distinct_and_many():
    pool = all_instructions()
    assert len(pool) >= 500 and len({i.text for i in pool}) == len(pool)
    assert {i.kind for i in pool} == {"subject", "pair", "task", "question", "sentence"}


def test_whole_topics_are_held_out_deterministically():
    train, heldout = chat_instructions(400, seed=0)
    assert (len(train), len(heldout)) == (320, 80)
    assert {i.topic for i in train}.isdisjoint(i.topic for i in heldout)
    assert {i.kind for i in heldout} == {"subject", "pair", "task", "question", "sentence"}
    assert len({i.text for i in train + heldout}) == 400
    assert chat_instructions(400, seed=0) == (train, heldout)
    assert chat_instructions(400, seed=1) != (train, heldout)
    assert [len(side) for side in chat_instructions(10, seed=3, heldout_fraction=0.5)] == [5, 5]
    for bad in (1, len(all_instructions()) + 1, 2.0, True):
        with pytest.raises(ValueError, match="count must be"):
            chat_instructions(bad)
    with pytest.raises(ValueError, match="heldout_fraction"):
        chat_instructions(10, heldout_fraction=0.0)


def test_answers_are_the_full_models_greedy_generations_through_the_chat_template(tmp_path):
    llm = tiny_chat_llm()
    instructions = chat_instructions(7, seed=0)[0]
    examples = generate_chat_examples(llm, instructions, max_new_tokens=6, batch_size=4)
    assert [e["instruction"] for e in examples] == [i.text for i in instructions]
    for instruction, example in zip(instructions, examples):
        prompt, used = chat_prompt_ids(llm.tokenizer, instruction.text, chat=True)
        assert used and example["prompt_token_ids"] == prompt
        assert prompt[0] == llm.tokenizer.convert_tokens_to_ids("<|im_start|>")
        alone = llm.generate(prompt, SamplingParams(max_tokens=6), energy_budget=1.0)[0]
        assert example["answer_token_ids"] == alone.token_ids
        assert example["answer_text"] == alone.text
        assert 1 <= len(example["answer_token_ids"]) <= 6

    path = write_jsonl(tmp_path / "chat.jsonl", examples)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(instructions)
    assert all(set(json.loads(line)) == set(EXAMPLE_KEYS) for line in lines)
    assert read_jsonl(path) == examples


def test_bad_jsonl_and_a_model_without_chat_template_are_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: a chat example needs"):
        read_jsonl(bad)
    bad.write_text(json.dumps(dict.fromkeys(EXAMPLE_KEYS, "1 2")) + "\n")
    with pytest.raises(ValueError, match="lists of integer token ids"):
        read_jsonl(bad)
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not JSON"):
        read_jsonl(bad)
    instructions = chat_instructions(2)[0]
    with pytest.raises(ValueError, match="chat template"):
        generate_chat_examples(tiny_chat_llm(chat=False), instructions)
    with pytest.raises(ValueError, match="batch_size"):
        generate_chat_examples(tiny_chat_llm(), instructions, batch_size=0)
