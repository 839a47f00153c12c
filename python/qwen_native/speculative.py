"""Proposals for speculative decoding: ids the model is likely to produce next, which the scheduler verifies in one
pass (the sequence's last token and the proposals as one run of rows; the agreeing prefix is kept, then the
model's own next id). On the CPU each verified row is a decode step's arithmetic bit for bit, so proposals never
change a greedy answer; a right one saves a pass, a wrong one costs its rows' compute. When sampling, each
proposed id is accepted by the speculative-sampling rule (``Sampler``: min(1, p/q), else a draw from the residual),
so the tokens are distributed exactly as without proposals.

Prompt lookup (transformers' ``prompt_lookup_num_tokens``): the ids that followed the latest earlier occurrence of
the sequence's last n ids (n from ``max_matching_ngram_size`` down to 1), in the prompt or the answer so far. Input
grounded work (edit this code, rewrite this JSON) repeats long spans of its prompt."""

from __future__ import annotations

import time
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

MAX_PROPOSED = 64  # prompt_lookup_num_tokens / num_assistant_tokens at most: longer runs cost more than they save

Distribution = Tuple[np.ndarray, np.ndarray]  # (token ids, probabilities)


class Proposer:
    """What the scheduler asks of a request's proposer: ``prepare`` (start work for the next pass, called for every
    sequence of a pass before any is asked, so work can run batched), ``__call__(tokens, limit)`` (at most `limit`
    proposed ids after `tokens`, the prompt and the answer so far), ``distributions`` (the probabilities the
    proposer drew each of them from; None: it picked them for sure) and ``learn`` (after the pass: how many of the
    proposed ids the model confirmed). ``proposed`` and ``accepted`` count ids."""

    proposed = 0
    accepted = 0

    def prepare(self, tokens: Sequence[int], limit: int) -> None:
        pass

    def __call__(self, tokens: Sequence[int], limit: int) -> List[int]:
        return []

    def distributions(self) -> Optional[List[Distribution]]:
        return None

    def learn(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted


class PromptLookup(Proposer):
    """A stateful proposer for one request: ``proposer(tokens)`` -> proposed ids (maybe none).

    It adapts to what is accepted: after a fully accepted proposal it proposes twice as many (up to ``num_tokens``),
    after a partly accepted one as many as were accepted plus one; after two proposals in a row that were rejected
    at their first id it stops proposing for ``pause`` steps, so text with nothing to look up costs plain decoding
    (a proposal is only made where an n-gram matches)."""

    def __init__(self, num_tokens: int, max_ngram: int = 2, pause: int = 8):
        self.num_tokens, self.max_ngram, self.pause = num_tokens, max_ngram, pause
        self.k = num_tokens
        self._misses = 0
        self._quiet = 0

    def learn(self, proposed: int, accepted: int) -> None:
        super().learn(proposed, accepted)
        if accepted == proposed:
            self.k = min(self.num_tokens, 2 * self.k)
            self._misses = 0
        else:
            self.k = max(1, accepted + 1)
            self._misses = self._misses + 1 if accepted == 0 else 0
            if self._misses >= 2:
                self._quiet, self._misses = self.pause, 0

    def __call__(self, tokens: Sequence[int], limit: int = MAX_PROPOSED) -> List[int]:
        if self._quiet:
            self._quiet -= 1
            return []
        return lookup(tokens, min(self.k, limit), self.max_ngram) if limit > 0 else []


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


class DraftModel(Proposer):
    """Proposals from a smaller model with the same vocabulary (transformers' ``assistant_model``): the ids it
    generates from the same ids, with the same sampling parameters, as a request in its own scheduler. That keeps
    its KV cache in step with the target: each request takes the slot holding the longest prefix of the target's
    ids, so after a rejection it continues from the accepted ones, and several sequences' drafts run batched.

    How many to propose adapts to what pays: with the rate `a` at which proposed ids are accepted (counted with
    decay), a draft step's measured time `d` and the target's one-row pass time `t`, k maximises the expected ids
    per pass over its cost, ((1 - a^(k+1)) / (1 - a)) / (k d + t (1 + ROW_COST k)). When plain decoding (k = 0)
    wins it stops proposing for `pause` passes, then probes again with two."""

    # A target pass verifying k proposals costs about (1 + ROW_COST k) one-row passes: bf16 on 2 Zen 3 cores, one
    # pass of 8 rows took ~2x one of 1 (the batched GEMV reads the weights once; its arithmetic grows with rows).
    ROW_COST = 0.12
    DECAY = 0.9  # weight of the past in the acceptance counts, per proposal
    WAIT_S = 120.0  # a draft that does not answer in this long (a closed or deadlocked model) is given up

    def __init__(self, submit: Callable[[Any], None], make_request: Callable[[List[int], int, Optional[int]], Any],
                 max_tokens: int, max_context: int, seed: Optional[int] = None, pause: int = 8):
        """`submit` queues a request in the draft model's scheduler; `make_request(ids, k, seed)` makes one that
        generates k ids after `ids` (keeping its distributions when sampling)."""
        self._submit, self._make = submit, make_request
        self.max_tokens, self.max_context, self.pause = max_tokens, max_context, pause
        self._rng = np.random.default_rng(seed)
        self._seeded = seed is not None
        self._hits, self._misses = 1.2, 0.8  # a prior of a = 0.6, worth two proposed ids
        self._d: Optional[float] = None  # seconds per draft step
        self._t: Optional[float] = None  # seconds per one-row target pass
        self._dists: Optional[List[Distribution]] = None
        self._k_fed = 0  # proposals in the pass since _returned
        self._returned: Optional[float] = None
        self._request: Any = None
        self._quiet = 0
        self._probe = False
        self._prepared = False
        self.disabled: Optional[BaseException] = None  # why it stopped proposing for good

    def learn(self, proposed: int, accepted: int) -> None:
        super().learn(proposed, accepted)
        self._hits = self.DECAY * self._hits + accepted
        self._misses = self.DECAY * self._misses + (accepted < proposed)

    def _timed(self) -> None:
        """At the start of a proposal: the target's pass (and its sampling) since the last one, per row."""
        if self._returned is not None:
            t = (time.perf_counter() - self._returned) / (1.0 + self.ROW_COST * self._k_fed)
            self._t = t if self._t is None else 0.7 * self._t + 0.3 * t
        self._returned = None

    def _choose_k(self, limit: int) -> int:
        if self._d is None or self._t is None:
            return min(4, self.max_tokens, limit)
        if self._probe:
            self._probe = False
            return min(2, self.max_tokens, limit)
        a = min(self._hits / (self._hits + self._misses), 0.999)
        best_k, best = 0, 1.0 / self._t
        for k in range(1, min(self.max_tokens, limit) + 1):
            rate = (1.0 - a ** (k + 1)) / (1.0 - a) / (k * self._d + self._t * (1.0 + self.ROW_COST * k))
            if rate > best:
                best_k, best = k, rate
        if best_k == 0:
            self._quiet, self._probe = self.pause, True
        return best_k

    def prepare(self, tokens: Sequence[int], limit: int) -> None:
        self._timed()
        self._request, self._k_fed, self._prepared = None, 0, True
        if self.disabled is not None or limit <= 0:  # no room this pass: nothing learnt about what pays
            return
        if self._quiet:
            self._quiet -= 1
            return
        k = min(self._choose_k(limit), self.max_context - len(tokens))
        if k <= 0:
            return
        seed = int(self._rng.integers(2 ** 62)) if self._seeded else None
        try:
            self._request = self._make(list(tokens), k, seed)
            self._submit(self._request)
        except BaseException as e:  # the draft model was closed: generation goes on without it
            self.disabled, self._request = e, None

    def __call__(self, tokens: Sequence[int], limit: int = MAX_PROPOSED) -> List[int]:
        if not self._prepared:
            self.prepare(tokens, limit)
        request, self._request, self._prepared = self._request, None, False
        ids: List[int] = []
        self._dists = None
        if request is not None:
            try:
                out = request.wait(timeout=self.WAIT_S)
            except BaseException as e:
                request.cancel()
                self.disabled = e
            else:
                ids = list(out.token_ids[:limit])
                self._dists = out.distributions[:len(ids)] if out.distributions is not None else None
                if out.decode_passes:  # a step's time; its first pass may have been a whole prompt's prefill
                    d = out.decode_s / out.decode_passes
                    self._d = d if self._d is None else 0.7 * self._d + 0.3 * d
        self._k_fed = len(ids)
        self._returned = time.perf_counter()
        return ids

    def distributions(self) -> Optional[List[Distribution]]:
        return self._dists
