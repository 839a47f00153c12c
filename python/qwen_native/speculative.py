"""Proposals for speculative decoding: ids the model is likely to produce next, which the scheduler verifies in one
pass (the sequence's last token and the proposals as one run of rows; the agreeing prefix is kept, then the
model's own next id). On the CPU each verified row is a decode step's arithmetic bit for bit, so proposals never
change a greedy answer; a right one saves a pass, a wrong one costs its rows' compute.

Prompt lookup (transformers' ``prompt_lookup_num_tokens``): the ids that followed the latest earlier occurrence of
the sequence's last n ids (n from ``max_matching_ngram_size`` down to 1), in the prompt or the answer so far. Input
grounded work (edit this code, rewrite this JSON) repeats long spans of its prompt."""

from __future__ import annotations

from typing import List, Sequence

MAX_PROPOSED = 64  # prompt_lookup_num_tokens at most: longer runs cost more than a pass saves


class PromptLookup:
    """A stateful proposer for one request: ``proposer(tokens)`` -> proposed ids (maybe none).

    It adapts to what is accepted: after a fully accepted proposal it proposes twice as many (up to ``num_tokens``),
    after a partly accepted one as many as were accepted plus one; after two proposals in a row that were rejected
    at their first id it stops proposing for ``pause`` steps, so text with nothing to look up costs plain decoding
    (a proposal is only made where an n-gram matches)."""

    def __init__(self, num_tokens: int, max_ngram: int = 2, pause: int = 8):
        self.num_tokens, self.max_ngram, self.pause = num_tokens, max_ngram, pause
        self.k = num_tokens
        self._last: List[int] = []  # the previous proposal
        self._at = 0  # len(tokens) when it was made
        self._misses = 0
        self._quiet = 0
        self.proposed = self.accepted = 0  # totals, for the result's statistics

    def _learn(self, tokens: Sequence[int]) -> None:
        if not self._last:
            return
        got = tokens[self._at:self._at + len(self._last)]
        a = next((i for i, (x, y) in enumerate(zip(got, self._last)) if x != y), min(len(got), len(self._last)))
        self.accepted += a
        if a == len(self._last):
            self.k = min(self.num_tokens, 2 * self.k)
            self._misses = 0
        else:
            self.k = max(1, a + 1)
            self._misses = self._misses + 1 if a == 0 else 0
            if self._misses >= 2:
                self._quiet, self._misses = self.pause, 0
        self._last = []

    def __call__(self, tokens: Sequence[int]) -> List[int]:
        self._learn(tokens)
        if self._quiet:
            self._quiet -= 1
            return []
        proposal = lookup(tokens, self.k, self.max_ngram)
        self._last, self._at = proposal, len(tokens)
        self.proposed += len(proposal)
        return proposal


def lookup(tokens: Sequence[int], k: int, max_ngram: int) -> List[int]:
    """Up to k ids that followed the latest earlier occurrence of the last n ids of `tokens` (the longest n <=
    max_ngram that occurs before)."""
    t = list(tokens)
    n_tokens = len(t)
    for n in range(min(max_ngram, n_tokens - 1), 0, -1):
        tail = t[n_tokens - n:]
        for start in range(n_tokens - n - 1, -1, -1):  # latest first; the match must end before the tail does
            if t[start:start + n] == tail:
                follow = t[start + n:start + n + k]
                if follow:
                    return follow
    return []
