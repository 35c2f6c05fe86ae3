"""Prefix modular arithmetic with a difficulty knob (the ANIRA seed's MANO, in spirit).

An example is a random expression with exactly `num_ops` binary operators (+, -, *) over digits
mod `modulus`, written in prefix notation, then "=": `<bos> + * 3 4 - 1 2 =`. The answer is the
expression's value mod `modulus`, predicted at the "=" token. num_ops is the number of operations
the answer needs, so difficulty is known exactly and no label ever says it.
"""
from dataclasses import dataclass

import torch

SPECIALS = ("<pad>", "<bos>", "=")
OPERATORS = ("+", "-", "*")


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
        """<bos>, 2 * num_ops + 1 symbols, "="."""
        return 2 * num_ops + 3

    def sample(self, num_ops: int, generator: torch.Generator) -> tuple:
        """(prompt token ids, answer token id) of a random expression with num_ops operators."""
        if isinstance(num_ops, bool) or not isinstance(num_ops, int) or num_ops < 0:
            raise ValueError(f"num_ops must be an integer >= 0, got {num_ops!r}")
        symbols, value = self._expression(num_ops, generator)
        prompt = [self.token_id("<bos>")] + symbols + [self.token_id("=")]
        return prompt, self.digit_id(value)

    def _expression(self, num_ops: int, g) -> tuple:
        """(prefix symbols, value): the left operand takes a uniform share of the operators."""
        if num_ops == 0:
            digit = int(torch.randint(self.modulus, (), generator=g))
            return [self.digit_id(digit)], digit
        left_ops = int(torch.randint(num_ops, (), generator=g))
        op = int(torch.randint(len(OPERATORS), (), generator=g))
        left, a = self._expression(left_ops, g)
        right, b = self._expression(num_ops - 1 - left_ops, g)
        value = (a + b, a - b, a * b)[op] % self.modulus
        return [len(SPECIALS) + op] + left + right, value

    def batch(self, num_ops, generator: torch.Generator) -> tuple:
        """(ids [n, T] right-padded, answer position [n], answer id [n]) for a list of num_ops."""
        examples = [self.sample(n, generator) for n in num_ops]
        width = max(len(p) for p, _ in examples)
        ids = torch.full((len(examples), width), self.token_id("<pad>"), dtype=torch.long)
        for i, (prompt, _) in enumerate(examples):
            ids[i, :len(prompt)] = torch.tensor(prompt)
        where = torch.tensor([len(p) - 1 for p, _ in examples])
        answers = torch.tensor([a for _, a in examples])
        return ids, where, answers

    def decode(self, ids) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)
