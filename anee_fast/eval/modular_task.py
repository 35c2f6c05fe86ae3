"""Chained modular arithmetic with a difficulty knob.

An example chains exactly `num_ops` binary operations (+, -, *) over digits mod `modulus`,
evaluated left to right, then "=": `<bos> 3 + 4 * 2 - 1 =` is ((3 + 4) * 2 - 1) mod 5 = 3. Every
digit's target is the running value of the chain up to it and the "=" token's target is the
answer, the chain's value. The running value after k operations needs the one after k - 1, so
the answer needs num_ops sequential steps: difficulty is known exactly and no label says it.

(A variant that writes the expression in prefix notation and supervises only the answer did not
learn beyond 2 operators at CPU scale, see docs/recurrent.md.)
"""
from dataclasses import dataclass

import torch

SPECIALS = ("<pad>", "<bos>", "=")
OPERATORS = ("+", "-", "*")
IGNORE = -100          # target of tokens that predict nothing (cross_entropy's ignore_index)


@dataclass(frozen=True)
class ModularTask:
    modulus: int = 5

    def __post_init__(self):
        if isinstance(self.modulus, bool) or not isinstance(self.modulus, int) or not 2 <= self.modulus <= 97:
            raise ValueError(f"modulus must be an integer in [2, 97], got {self.modulus!r}")

    @property
    def vocab(self) -> list:
        return list(SPECIALS) + list(OPERATORS) + [str(d) for d in range(self.modulus)]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def token_id(self, token: str) -> int:
        return self.vocab.index(token)

    def digit_id(self, value: int) -> int:
        return len(SPECIALS) + len(OPERATORS) + value

    def prompt_length(self, num_ops: int) -> int:
        """<bos>, num_ops + 1 digits, num_ops operators, "="."""
        return 2 * num_ops + 3

    def sample(self, num_ops: int, generator: torch.Generator) -> tuple:
        """(prompt token ids, targets): targets[i] is the running value's token id at a digit,
        the answer's at "=" (targets[-1]) and IGNORE elsewhere."""
        if isinstance(num_ops, bool) or not isinstance(num_ops, int) or num_ops < 0:
            raise ValueError(f"num_ops must be an integer >= 0, got {num_ops!r}")
        digits = torch.randint(self.modulus, (num_ops + 1,), generator=generator).tolist()
        ops = torch.randint(len(OPERATORS), (num_ops,), generator=generator).tolist()
        value = digits[0]
        prompt = [self.token_id("<bos>"), self.digit_id(value)]
        targets = [IGNORE, self.digit_id(value)]
        for op, digit in zip(ops, digits[1:]):
            value = (value + digit, value - digit, value * digit)[op] % self.modulus
            prompt += [len(SPECIALS) + op, self.digit_id(digit)]
            targets += [IGNORE, self.digit_id(value)]
        return prompt + [self.token_id("=")], targets + [self.digit_id(value)]

    def batch(self, num_ops, generator: torch.Generator) -> tuple:
        """(ids [n, T], targets [n, T]) for a list of num_ops, right-padded (<pad>, IGNORE)."""
        examples = [self.sample(n, generator) for n in num_ops]
        width = max(len(p) for p, _ in examples)
        ids = torch.full((len(examples), width), self.token_id("<pad>"), dtype=torch.long)
        targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for i, (prompt, target) in enumerate(examples):
            ids[i, :len(prompt)] = torch.tensor(prompt)
            targets[i, :len(target)] = torch.tensor(target)
        return ids, targets

    def decode(self, ids) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)
