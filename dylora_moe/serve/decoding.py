"""What happens to a row's logits and tokens: sampling as the OpenAI API defines it
(temperature, top_p, a seed per request), and the text that streams out of the tokens,
cut at the first stop string.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0   # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None
    ignore_eos: bool = False


def generator(seed: Optional[int], choice: int) -> Optional[torch.Generator]:
    """A row's own random stream: the same seed draws the same tokens whatever else shares
    the batch; each of a request's n choices draws its own."""
    base = int.from_bytes(os.urandom(8), "little") if seed is None else seed
    return torch.Generator().manual_seed((base * 1_000_003 + choice) % (2 ** 63))


def pick(logits: torch.Tensor, sampling: Sampling, rng: Optional[torch.Generator]) -> int:
    """One token from one row's logits (V,)."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        # nucleus: the most likely tokens until their mass reaches top_p (at least one)
        ordered, order = probs.sort(descending=True)
        before = ordered.cumsum(0) - ordered
        ordered[before >= sampling.top_p] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, ordered)
    return int(torch.multinomial(probs, 1, generator=rng))


def pick_rows(logits: torch.Tensor, samplings: Sequence[Sampling], rngs: Sequence) -> list[int]:
    """A token per row; greedy rows take one argmax over the batch."""
    greedy = logits.argmax(-1).tolist()
    return [g if s.temperature == 0 else pick(row, s, rng)
            for g, row, s, rng in zip(greedy, logits, samplings, rngs)]


class TextStream:
    """Tokens in, text deltas out. A delta is only sent once it is final: bytes of a
    character split across tokens wait for the rest, and text that might begin a stop
    string waits until it is clear it does not. The deltas of a row join to exactly
    the text a non-streaming response carries."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self._prefix = self._read = 0  # the decoded window: tokens[_prefix:_read] are text already
        self.text, self.sent = "", 0

    def push(self, token: int) -> tuple[str, bool]:
        """(text now final, whether a stop string ended the row)."""
        self.tokens.append(token)
        done = self._decode(final=False)
        return self._release(final=False) if not done else self._release(final=True, stopped=True)

    def flush(self) -> str:
        """The rest of the text when the row ends without a stop string."""
        stopped = self._decode(final=True)
        return self._release(final=True, stopped=stopped)[0]

    def _decode(self, final: bool) -> bool:
        before = self.tokenizer.decode(self.tokens[self._prefix:self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.tokens[self._prefix:], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.tokens)
        return self._cut_at_stop()

    def _cut_at_stop(self) -> bool:
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
        return bool(hits)

    def _release(self, final: bool, stopped: bool = False) -> tuple[str, bool]:
        end = len(self.text) if final else len(self.text) - self._held()
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out, stopped

    def _held(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest
