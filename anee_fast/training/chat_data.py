"""Chat-formatted distillation data answered by the full model itself.

A run with skipped layers must match the full model on what it is asked in chat, so the data is
the full model's own greedy answers (energy_budget=1.0, stop at EOS) to varied instructions,
each wrapped in the tokenizer's chat template the way `anee-fast generate` (`make run`) wraps a
user message (eval/chat_answers.chat_prompt_ids; the chat endpoint encodes one the same way).
Instructions are templates x topics; whole topics are held out, so held-out instructions are about
topics training never saw.
"""
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..engine.sampling import SamplingParams
from ..eval.chat_answers import chat_prompt_ids

MAX_NEW_TOKENS = 128
HELDOUT_FRACTION = 0.2
EXAMPLE_KEYS = ("instruction", "prompt_token_ids", "answer_token_ids", "answer_text")

# Each kind: the templates that fit its topics, and the topics ({} in a template is the topic).
SUBJECT_TEMPLATES = (
    "Explain {} in simple terms.",
    "Explain {} to a ten-year-old.",
    "Summarise what you know about {} in three sentences.",
    "List five interesting facts about {}.",
    "Write a haiku about {}.",
    "Write a short poem about {}.",
    "Write a very short story that involves {}.",
    "What are common misconceptions about {}?",
    "Why does {} matter?",
    "Give me a one-paragraph introduction to {}.",
    "Ask me three quiz questions about {}.",
)
SUBJECTS = (
    "photosynthesis", "the water cycle", "volcanoes", "black holes", "the internet", "honeybees",
    "the French Revolution", "inflation", "vaccines", "gravity", "rainbows", "machine learning",
    "the moon", "coffee", "friendship", "recycling", "the Roman Empire", "electricity", "DNA",
    "climate change", "sleep", "earthquakes", "the stock market", "jazz music", "chess",
    "the ocean", "democracy", "baking bread", "the human heart", "solar energy", "dinosaurs",
    "the printing press", "rain forests", "the immune system", "bicycles", "the speed of light",
    "autumn", "libraries", "mountains", "the Olympic Games", "penguins", "the Great Wall of China",
    "compound interest", "public transport", "tea", "the periodic table", "kindness",
    "video games", "the Moon landing", "glaciers", "the alphabet", "bridges", "the violin",
    "cloud computing", "deserts", "the Renaissance", "memory", "tides", "honey", "time zones",
)
PAIR_TEMPLATES = (
    "Compare {} and {}.",
    "What is the difference between {} and {}?",
    "Give one advantage and one disadvantage each of {} and {}.",
)
PAIRS = (
    ("cats", "dogs"), ("tea", "coffee"), ("trains", "planes"), ("books", "films"),
    ("summer", "winter"), ("Python", "JavaScript"), ("renting", "buying a home"),
    ("walking", "cycling"), ("the sun", "the moon"), ("weather", "climate"),
    ("viruses", "bacteria"), ("email", "letters"), ("city life", "country life"),
    ("solar power", "wind power"), ("a laptop", "a tablet"), ("rivers", "lakes"),
    ("saving", "investing"), ("paper books", "e-books"), ("frogs", "toads"),
    ("alligators", "crocodiles"), ("speed", "velocity"), ("a virus", "a worm in computing"),
    ("mountains", "hills"), ("baking", "frying"), ("chess", "checkers"),
)
TASK_TEMPLATES = (
    "Give step-by-step instructions to {}.",
    "List a few tips to {}.",
    "What do I need to {}?",
)
TASKS = (
    "make a cup of tea", "change a flat bicycle tyre", "plant a tree",
    "prepare for a job interview", "learn a new language", "write a cover letter", "start running",
    "cook rice", "save money each month", "organise a small party", "study for an exam",
    "keep a houseplant alive",
    "write a good email", "fall asleep faster", "make a budget", "clean a laptop keyboard",
    "learn to play the guitar", "pack for a weekend trip", "make pancakes", "back up my photos",
    "improve my handwriting", "start a vegetable garden", "give a short speech",
    "choose a good password", "read more books", "fix a squeaky door", "make friends in a new city",
    "bake chocolate chip cookies", "take better photos with a phone", "stay focused while working",
)
QUESTIONS = (
    "What is the capital of France?", "How many legs does a spider have?",
    "Who wrote Romeo and Juliet?", "What is the boiling point of water at sea level?",
    "Why is the sky blue?", "How many days are there in a leap year?",
    "What is the largest planet in the solar system?", "What do bees make?",
    "Who painted the Mona Lisa?", "What gas do plants take in from the air?",
    "How many continents are there?", "What is the freezing point of water in Fahrenheit?",
    "What is the tallest mountain on Earth?", "Which organ pumps blood through the body?",
    "What is the chemical symbol for gold?", "How many sides does a hexagon have?",
    "What language is spoken in Brazil?", "What is the longest river in Africa?",
    "Why do leaves change colour in autumn?", "What causes the seasons on Earth?",
    "How far is the Moon from the Earth?", "What is the square root of 81?",
    "Who was the first person to walk on the Moon?", "What is the main ingredient of guacamole?",
    "How many minutes are there in a day?", "Why do we have leap years?",
    "What is the smallest prime number?", "What does a thermometer measure?",
    "Which animal is known as the king of the jungle?", "What is the hardest natural substance?",
    "How do magnets work?", "Why does ice float on water?", "What is the currency of Japan?",
    "How many strings does a standard guitar have?", "What is an adjective?",
    "What is 15 multiplied by 12?", "Where do penguins live?", "What is a noun?",
    "Why do cats purr?", "How does a rainbow form?",
)
SENTENCE_TEMPLATES = (
    "Rewrite this sentence to sound more formal: {}",
    "Rewrite this sentence in simpler words: {}",
    "Fix the grammar of this sentence: {}",
)
SENTENCES = (
    "me and him goes to the shop every days.", "The meeting got moved cause the boss was sick.",
    "I ain't got no time for this right now.", "The results of the experiment was very surprising.",
    "We was going to call you but we forgot.", "This phone is super good and works really nice.",
    "The cat sat on the mat and it was happy and it purred.", "Can u send me the file asap?",
    "She don't like apples, but she like pears.", "The weather is real bad today so stay inside.",
    "Their going to the park after lunch.", "The report need to be finished by tomorrow.",
    "He runned to the station but the train has left.", "I seen that film three times already.",
    "Our team have won the match yesterday.", "Please let me know if you has any questions.",
    "The children was playing in the garden all afternoon.", "Its a nice day for a walk.",
    "Less people came to the concert than we expected.",
    "Everyone should bring their own lunch tomorrow.",
)
KINDS = {
    "subject": (SUBJECT_TEMPLATES, SUBJECTS),
    "pair": (PAIR_TEMPLATES, PAIRS),
    "task": (TASK_TEMPLATES, TASKS),
    "question": (("{}",), QUESTIONS),
    "sentence": (SENTENCE_TEMPLATES, SENTENCES),
}


@dataclass(frozen=True)
class Instruction:
    text: str
    kind: str      # a key of KINDS
    topic: str     # what is held out whole


def all_instructions() -> list:
    """Every template x topic instruction, in a fixed order."""
    out = []
    for kind, (templates, topics) in KINDS.items():
        for topic in topics:
            parts = topic if isinstance(topic, tuple) else (topic,)
            out += [Instruction(t.format(*parts), kind, " / ".join(parts)) for t in templates]
    return out


def chat_instructions(count: int, seed: int = 0,
                      heldout_fraction: float = HELDOUT_FRACTION) -> tuple:
    """(train, heldout) instructions, count in all, round(count * heldout_fraction) of them held
    out: per kind, a seeded heldout_fraction of the topics is held out with all its instructions,
    and each side is a seeded sample of its instructions."""
    pool = all_instructions()
    if isinstance(count, bool) or not isinstance(count, int) or not 2 <= count <= len(pool):
        raise ValueError(f"count must be an integer in [2, {len(pool)}] (the distinct "
                         f"instructions), got {count!r}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    rng = random.Random(seed)
    heldout_topics = set()
    for kind in KINDS:
        topics = sorted({i.topic for i in pool if i.kind == kind})
        rng.shuffle(topics)
        heldout_topics.update(topics[:max(1, round(len(topics) * heldout_fraction))])
    heldout = [i for i in pool if i.topic in heldout_topics]
    train = [i for i in pool if i.topic not in heldout_topics]
    num_heldout = min(len(heldout), max(1, round(count * heldout_fraction)))
    if count - num_heldout > len(train):
        raise ValueError(f"count {count} needs {count - num_heldout} training instructions; "
                         f"there are {len(train)}")
    return rng.sample(train, count - num_heldout), rng.sample(heldout, num_heldout)


def generate_chat_examples(llm, instructions, max_new_tokens: int = MAX_NEW_TOKENS,
                           batch_size: int = 32, progress: bool = False) -> list:
    """[{instruction, prompt_token_ids, answer_token_ids, answer_text}]: the full model's greedy
    answers (budget 1.0, EOS kept as the last answer token when it stopped), batch_size prompts
    per generate call (so their KV cache fits the default pool without preemption)."""
    if not getattr(llm.tokenizer, "chat_template", None):
        raise ValueError(f"the model {llm.name!r} has no tokenizer with a chat template: chat "
                         "data needs one")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    instructions = list(instructions)
    if not instructions:
        raise ValueError("no instructions given")
    params = SamplingParams(max_tokens=max_new_tokens)
    examples = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(instructions), desc="chat answers", unit="answer")
    try:
        for start in range(0, len(instructions), batch_size):
            batch = instructions[start:start + batch_size]
            prompts = [chat_prompt_ids(llm.tokenizer, i.text, chat=True)[0] for i in batch]
            outs = llm.generate(prompts, params, energy_budget=1.0)
            examples += [{"instruction": i.text, "prompt_token_ids": list(o.prompt_token_ids),
                          "answer_token_ids": list(o.token_ids), "answer_text": o.text}
                         for i, o in zip(batch, outs)]
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return examples


def write_jsonl(path, examples) -> Path:
    """One JSON object a line."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path) -> list:
    """The examples of a chat JSONL file, each checked for the fields generate_chat_examples
    writes."""
    examples = []
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e})") from None
            if not isinstance(example, dict) or any(k not in example for k in EXAMPLE_KEYS) or \
                    not all(_is_id_list(example[k])
                            for k in ("prompt_token_ids", "answer_token_ids")):
                raise ValueError(f"{path}:{number}: a chat example needs {', '.join(EXAMPLE_KEYS)} "
                                 "with lists of integer token ids")
            examples.append(example)
    return examples


def _is_id_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                           for t in value)
