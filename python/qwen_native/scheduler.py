"""One queue per model: requests from any thread (or an asyncio loop, through a thread) join the running batch
between steps, each sequence in its own slot of the native KV cache.

A scheduler thread (started with the first request, ended by ``close``) repeats: admit waiting requests into
free slots (the slot whose cached ids share the longest prefix with the prompt, so a chat's next turn only
prefills its new ids), build one ragged pass of rows (a chunk of each unfinished prompt, the last token of each
sequence that is decoding), run it, and hand each sequence its logits row: sample, assemble text, publish pieces.
It never waits for a caller, so a slow or forgotten stream holds nothing but its own slot until it finishes; a
stream is stopped by its owner (``close()``), by its garbage collection, or by Ctrl-C in the thread waiting on it.

The steps are small: ``_admit`` (slots), a sequence's ``plan`` (what it feeds the pass: a prompt chunk, its last
token, or its last token and proposed ids to verify) and ``take`` (its logits rows: sample, accept the agreeing
proposals, assemble text), and ``_step`` running one pass for all of them."""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np

from . import _core  # the compiled extension (types: _core.pyi)
from .generation import Piece, TextAssembler, TokenLogprob
from .sampling import Sampler, SamplingParams, apply_penalties, log_probs
from .speculative import Distribution, Proposer

__all__ = ["Scheduler", "Request", "PREFILL_CHUNK"]

# Prompt ids of one sequence per step. Each prompt is cut the same way whatever else runs, so its arithmetic (and
# its tokens) do not depend on the batch.
PREFILL_CHUNK = 512
# Prompt rows a pass takes beside the first prompt chunk in it: later prompts wait for another pass, so prompts that
# arrive together are answered one after another (the first at once) instead of all at the end of one long pass,
# and the running sequences' decode steps come between them. Chunks are never cut to fit: the limit only defers.
# 64 (two ~30-token chat prompts) rather than 32: two prompts share one read of the weights, and in serve_bench with
# 8 clients (real 1.5B, bf16, Zen 4) TTFT p50 went 2.15 -> 1.70 s and p95 3.90 -> 2.85 s at the same per-stream
# rate (128: p50 1.97 s).
PASS_PROMPT_ROWS = 64
# Decode and verify rows of a pass beyond which proposals are cut (shared evenly among the sequences that have a
# proposer). Alone, a sequence's verify rows are nearly free (the weights are read once for all of them); with many
# sequences decoding the pass is compute-bound (on 2 Zen 3 cores, a pass of 8 rows took 2x one of 1, 16 rows 4x), so
# a rejected proposal would slow every sequence in the batch.
PASS_DECODE_ROWS = 32


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if diff.size else n


@dataclass
class Outcome:
    """What a finished request produced (engine.py turns it into a GenerationResult)."""

    text: str
    token_ids: List[int]
    finish_reason: str
    stop_string: Optional[str]
    prompt_tokens: int
    cached_tokens: int
    prefill_s: float
    decode_tokens: int  # generated ids that came from decode passes (all but the first)
    decode_passes: int  # passes that produced them (fewer when proposals were verified)
    decode_s: float
    ttft_s: float
    total_s: float
    logits: Optional[np.ndarray] = None  # a scoring request's (prompt_tokens, vocab) float32 logits
    logprobs: Optional[List[TokenLogprob]] = None  # each generated token's, when asked for
    proposed: int = 0  # ids a proposer put forward (speculative decoding)
    accepted: int = 0  # of which the model confirmed
    distributions: Optional[List[Tuple[np.ndarray, np.ndarray]]] = None  # each token's (ids, probs), when kept


class Request:
    """One generation as the scheduler and its caller share it. The caller reads pieces (``next_piece``) or waits
    for the outcome (``wait``), and may ``cancel``; the scheduler thread does everything else."""

    def __init__(self, ids: List[int], params: SamplingParams, seed: Optional[int], max_new_tokens: int,
                 stops: Sequence[str], eos: FrozenSet[int], stream: bool, t0: float, score: bool = False,
                 logprobs: Optional[int] = None, distributions: bool = False):
        self.ids = ids
        # Keep the distribution each sampled token was drawn from (a draft model's requests: the q of
        # speculative sampling).
        self.distributions = distributions
        self.logprobs = logprobs  # None, or how many alternatives to report with each token's log-probability
        # A scoring request generates nothing: it wants the logits of every prompt position, computed from an empty
        # cache in the scheduler's own scoring slot (the generation slots are left as they are).
        self.score = score
        self.params = params
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self.stops = stops
        self.eos = eos
        self.stream = stream
        self.t0 = t0
        # Proposes likely next ids from the ids so far (prompt lookup, a draft model); the next pass verifies them
        # all at once.
        self.proposer: Optional[Proposer] = None
        # The grammar the generated ids must follow (structured output, forced tool calls): grammar.Constraint.
        self.constraint: Any = None
        self.tools = False  # the caller reads tool calls out of the text (engine.py)
        self.cancelled = False
        self.done = False
        self.outcome: Optional[Outcome] = None
        self.error: Optional[BaseException] = None
        self._pieces: Deque[Piece] = deque()
        self._scheduler: Optional["Scheduler"] = None
        self._cond: Optional[threading.Condition] = None

    def next_piece(self) -> Optional[Piece]:
        """The next piece (a step's text, ids and log-probabilities), waiting for it; None once the generation is
        over. Raises what stopped it early."""
        assert self._cond is not None
        with self._cond:
            while not self._pieces and not self.done:
                self._cond.wait()
            if self._pieces:
                return self._pieces.popleft()
        if self.error is not None:
            raise self.error
        return None

    def wait(self, timeout: Optional[float] = None) -> Outcome:
        """Waits until the generation is over; its outcome, or raises what stopped it (TimeoutError after
        `timeout` seconds)."""
        assert self._cond is not None
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"the generation did not finish in {timeout} s")
        if self.error is not None:
            raise self.error
        assert self.outcome is not None
        return self.outcome

    def cancel(self) -> None:
        """Stop this generation (within one step; at once if it is the only work in the running pass)."""
        if self._scheduler is not None:
            self._scheduler.cancel(self)


@dataclass
class _Slot:
    ids: List[int] = field(default_factory=list)  # the ids whose keys and values this slot of the cache holds
    busy: bool = False
    used: int = 0  # when it was last given out (least recently used first among equals)


class _Sequence:
    """A request while it runs in a slot: its ids, what of them the cache holds, its sampler and text."""

    def __init__(self, request: Request, slot: int, cached: int, tokenizer: Any, masks: Any = None):
        """`masks`: an executor that computes a constrained sequence's next mask while the pass runs."""
        self.request = request
        self.slot = slot
        self.cached = cached                       # prompt ids reused from the slot's cache
        self.tokens: List[int] = list(request.ids)  # prompt + generated ids
        self.fed = cached                          # how many of `tokens` the slot holds
        self.generated: List[int] = []
        self.parts: List[str] = []
        self.assembler = TextAssembler(tokenizer, request.stops, request.eos)
        self.sampler = Sampler(request.params, request.seed)
        # Greedy without penalties, log-probabilities or a grammar needs only the argmax, which the core can return
        # alone.
        self.fast_greedy = (request.params.greedy and not request.params.penalized and request.logprobs is None
                            and request.constraint is None)
        self.constraint = request.constraint
        self._masks = masks
        self._mask: Any = None  # the future of the mask for the pass's first logits row
        self.logprobs: List[TokenLogprob] = []
        self.finish_reason: Optional[str] = None
        self.scores: List[np.ndarray] = []  # a scoring request's logits so far
        self.feed: List[int] = []      # what it feeds the next pass (plan)
        self.proposal: List[int] = []  # the proposed ids among them
        self.drafts: Optional[List[Distribution]] = None  # the proposer's distribution of each (None: certain)
        self.distributions: Optional[List[Distribution]] = [] if request.distributions else None
        self.logits = 0                # how many of its last rows need logits
        self.prefill_s = self.decode_s = 0.0
        self.decode_steps = 0
        self.ttft_s = 0.0

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.request.ids)

    def _limit(self, room: int, share: int) -> int:
        """How many ids may be proposed: no more than fit in `room` positions, are still to generate, or the pass
        can take (`share`)."""
        return max(0, min(room - 1, self.request.max_new_tokens - len(self.generated) - 1, share))

    def prepare(self, room: int, share: int) -> None:
        """Before a pass, for every sequence in it: lets the proposer start its work (a draft model's requests
        are all queued before any is waited for, so they run batched)."""
        if self.request.proposer is not None and not self.prefilling:
            self.request.proposer.prepare(self.tokens, self._limit(room, share))

    def plan(self, room: int, share: int) -> None:
        """Before a pass: what this sequence feeds it (`feed`) and how many of its last rows need logits
        (`logits`). A prompt chunk; else the last generated id, followed by proposed ids to verify when the
        request has a proposer."""
        if self._mask is not None:  # a pass that was interrupted left its mask unused: the matcher is ours again
            self._mask.result()
            self._mask = None
        if self.prefilling:
            self.feed = self.tokens[self.fed:min(len(self.request.ids), self.fed + PREFILL_CHUNK)]
            self.proposal = []
            if self.request.score:
                self.logits = len(self.feed)
            else:
                self.logits = 1 if self.fed + len(self.feed) == len(self.request.ids) else 0
            self._start_mask()
            return
        self.proposal, self.drafts = [], None
        proposer = self.request.proposer
        if proposer is not None:
            limit = self._limit(room, share)
            self.proposal = [int(t) for t in proposer(self.tokens, limit)][:limit]
            if self.constraint is not None and self.proposal:
                # Proposed ids past the first one the grammar refuses are never accepted: not computed. That one is
                # kept, so that sampling rejects it by the rule (its p is 0) and draws from the residual.
                self.proposal = self.proposal[:self.constraint.valid_prefix(self.proposal) + 1]
            self.drafts = proposer.distributions()
        self.feed = self.tokens[self.fed:self.fed + 1] + self.proposal
        self.logits = len(self.feed)
        self._start_mask()

    def _start_mask(self) -> None:
        """With a grammar: start computing the mask of the pass's first logits row (llguidance drops the GIL, so
        it runs while the pass does)."""
        if self.constraint is not None and self.logits and not self.request.score:
            self._mask = self._masks.submit(self.constraint.fill_mask) if self._masks is not None else None

    def _allowed(self, x: np.ndarray) -> None:
        """Masks the ids the grammar does not allow next out of the logits row `x` (in place)."""
        mask, self._mask = (self._mask.result() if self._mask is not None else self.constraint.fill_mask()), None
        self.constraint.apply(x, mask)

    def choose(self, logits_or_id: Any, i: int = -1) -> Tuple[int, Optional[TokenLogprob]]:
        """The next id from a row of logits (or the argmax id the core computed), and its log-probability record
        when the request asks for them. `i`: the row's index in a verified run, whose proposed id (if any) sampling
        accepts or replaces by the speculative-sampling rule."""
        if self.fast_greedy:
            return (int(logits_or_id) if np.ndim(logits_or_id) == 0 else int(np.argmax(logits_or_id))), None
        x, p = logits_or_id, self.request.params
        context = np.asarray(self.tokens, dtype=np.int64)
        if p.penalized:
            apply_penalties(x, context, p, generated=len(self.generated))
        if self.constraint is not None:
            self._allowed(x)
        proposed = self.proposal[i] if 0 <= i < len(self.proposal) else None
        draft = self.drafts[i] if proposed is not None and self.drafts is not None else None
        tok = self.sampler(x, context, inplace=True, penalized=True, proposed=proposed, draft=draft,
                           keep=self.distributions)
        if self.request.logprobs is None:
            return tok, None
        lp = log_probs(x, p)
        top: Tuple[Tuple[int, str, float], ...] = ()
        if self.request.logprobs:
            k = self.request.logprobs
            ids = np.argpartition(-lp, k - 1)[:k]
            ids = ids[np.argsort(-lp[ids], kind="stable")]
            top = tuple((int(i), self.assembler.token_text(int(i)), float(lp[i])) for i in ids)
        return tok, TokenLogprob(tok, self.assembler.token_text(tok), self.assembler.token_bytes(tok), float(lp[tok]),
                                 top)

    def take_scores(self, rows: np.ndarray) -> None:
        """After a pass of a scoring request: keep its rows of logits; done once the whole prompt ran."""
        self.scores.append(np.asarray(rows, dtype=np.float32))
        if not self.prefilling:
            self.finish_reason = "scored"

    def take(self, rows: Any) -> Tuple[Piece, int]:
        """After a pass: the rows of logits (or argmax ids) this sequence asked for. Picks the next id from each
        row while the proposal agrees (verification accepts the longest agreeing prefix, then the model's own
        next id). Returns what this step adds and how many fed rows to drop from the cache (the rejected
        proposals)."""
        text, ids, lps, confirmed = "", [], [], 0
        for i in range(len(rows)):
            tok, lp = self.choose(rows[i], i)
            ids.append(tok)
            if lp is not None:
                lps.append(lp)
                self.logprobs.append(lp)
            text += self.accept(tok)
            if self.finish_reason is not None or i >= len(self.proposal) or tok != self.proposal[i]:
                break
            confirmed += 1
        if self.proposal:
            assert self.request.proposer is not None
            self.request.proposer.learn(len(self.proposal), confirmed)
        return Piece(text, tuple(ids), tuple(lps)), len(self.proposal) - confirmed

    def accept(self, token: int) -> str:
        """Take a generated id; the text it completes. Sets finish_reason when the sequence is done."""
        if self.constraint is not None:
            self.constraint.consume(token)
        self.generated.append(token)
        self.tokens.append(token)
        piece = self.assembler.push(token)
        if self.assembler.finish_reason is not None:
            self.finish_reason = self.assembler.finish_reason
        elif len(self.generated) >= self.request.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            piece += self.assembler.finish()
            self.finish_reason = self.assembler.finish_reason or self.finish_reason
        if piece:
            self.parts.append(piece)
        return piece

    def outcome(self) -> Outcome:
        r = self.request
        return Outcome(text="".join(self.parts), token_ids=list(self.generated),
                       finish_reason=self.finish_reason or "length", stop_string=self.assembler.stop_string,
                       prompt_tokens=len(r.ids), cached_tokens=self.cached, prefill_s=self.prefill_s,
                       decode_tokens=max(0, len(self.generated) - 1), decode_passes=self.decode_steps,
                       decode_s=self.decode_s, ttft_s=self.ttft_s,
                       total_s=time.perf_counter() - r.t0,
                       logits=np.concatenate(self.scores) if self.scores else None,
                       logprobs=list(self.logprobs) if r.logprobs is not None else None,
                       proposed=r.proposer.proposed if r.proposer is not None else 0,
                       accepted=r.proposer.accepted if r.proposer is not None else 0,
                       distributions=self.distributions)


_LIVE: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    # At interpreter exit, stop the scheduler threads while Python still runs: a thread left inside the native
    # core would be torn down by the interpreter's shutdown in the middle of a pass.
    for s in list(_LIVE):
        s.close()


class Scheduler:
    """Runs the requests of one native model (``core``, with ``core.num_slots`` KV cache slots)."""

    def __init__(self, core: Any, tokenizer: Any, scoring_slot: bool = False):
        """`scoring_slot`: the core's last slot serves scoring requests only (the others generation only)."""
        self.core = core
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the scheduler thread waits here for requests
        self._waiting: Deque[Request] = deque()
        self._active: List[_Sequence] = []
        self._slots = [_Slot() for _ in range(int(core.num_slots))]
        self._max_context = int(core.max_context)
        self._scoring = len(self._slots) - 1 if scoring_slot else None
        self._in_flight: List[Request] = []  # the requests of the pass running now
        self._thread: Optional[threading.Thread] = None
        self._masks: Any = None  # a thread pool for grammar masks, made with the first constrained request
        self._closed = False
        self._clock = 0
        _LIVE.add(self)

    # -- the callers' side ---------------------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("this model has been closed")
            request._scheduler = self
            request._cond = threading.Condition(self._lock)
            self._waiting.append(request)
            if self._thread is None:  # started with the first request, kept until the model closes
                self._thread = threading.Thread(target=self._run, name="qwen_native scheduler", daemon=True)
                self._thread.start()
            self._work.notify()

    def cancel(self, request: Request) -> None:
        with self._lock:
            request._pieces.clear()
            if request.done or request.cancelled:
                return
            request.cancelled = True
            if request in self._waiting:
                self._waiting.remove(request)
                self._finish(request, None, None)
            elif request in self._in_flight and all(r.cancelled for r in self._in_flight):
                self.core.interrupt()  # nobody wants this pass any more: stop it at the next layer

    def close(self) -> None:
        """Stop every request (their callers get RuntimeError) and wait for the scheduler thread to end."""
        with self._lock:
            self._closed = True
            gone = RuntimeError("the model was closed while this generation was running")
            for r in list(self._waiting):
                self._finish(r, None, gone)
            self._waiting.clear()
            for s in self._active:
                s.request.cancelled = True
                self._finish(s.request, None, gone)
            if self._in_flight:
                self.core.interrupt()
            self._work.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if self._masks is not None:
            self._masks.shutdown(wait=False)

    def load(self) -> Tuple[int, int]:
        """(sequences running, requests waiting for a slot) now."""
        with self._lock:
            return len(self._active), len(self._waiting)

    @property
    def idle(self) -> bool:
        """True when no request waits or runs."""
        with self._lock:
            return not self._waiting and not self._active

    def consistent(self) -> bool:
        """Whether the bookkeeping of every slot matches the native cache (for tests; call while idle)."""
        return list(self.core.lengths) == [len(s.ids) for s in self._slots]

    # -- the scheduler thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    self._admit()
                    while not self._active and not self._closed:
                        self._work.wait()
                        self._admit()
                    if not self._active:  # closed
                        self._thread = None
                        return
                    batch = list(self._active)
                    self._in_flight = [s.request for s in batch]
                self._step(batch)
        except BaseException as e:  # a bug here must not leave callers waiting forever: they get the error
            with self._lock:
                for r in list(self._waiting) + [s.request for s in self._active]:
                    if not r.done:
                        self._finish(r, None, e)
                self._waiting.clear()
                self._active.clear()
                for slot in self._slots:
                    slot.busy = False
                self._thread = None

    def _admit(self) -> None:
        """(Under the lock.) Drop cancelled sequences, then give free slots to waiting requests in order."""
        for s in [s for s in self._active if s.request.cancelled]:
            self._release(s)
        # In order within each kind; a request that has to wait does not hold up the other kind.
        blocked = set()
        for r in list(self._waiting):
            if r.score in blocked:
                continue
            free = [i for i, sl in enumerate(self._slots) if not sl.busy and (i == self._scoring) == r.score]
            if not free:
                blocked.add(r.score)
                continue
            self._waiting.remove(r)
            try:
                self._active.append(self._place(r, free))
            except BaseException as e:  # the core refused (or a test's stand-in raised): this request ends
                self._finish(r, None, e)

    def _place(self, r: Request, free: List[int]) -> _Sequence:
        """(Under the lock.) The free slot with the longest cached prefix of r's prompt (least recently used
        among equals), truncated to that prefix."""
        self._resync(free)  # the core may have been used directly (tests, benchmarks)
        # At least the last prompt id is computed, for its logits; a scoring request computes every one.
        reuse = {i: 0 if r.score else min(common_prefix(self._slots[i].ids, r.ids), len(r.ids) - 1) for i in free}
        i = max(free, key=lambda j: (reuse[j], -self._slots[j].used))
        slot = self._slots[i]
        if len(slot.ids) > reuse[i]:
            try:
                self.core.truncate(reuse[i], slot=i)
            finally:
                del slot.ids[reuse[i]:]
                self._resync([i])
        self._clock += 1
        slot.busy, slot.used = True, self._clock
        if r.constraint is not None and self._masks is None:
            from concurrent.futures import ThreadPoolExecutor

            self._masks = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qwen_native masks")
        return _Sequence(r, i, reuse[i], self.tokenizer, self._masks)

    def _resync(self, slots: Sequence[int]) -> None:
        """Slots whose bookkeeping disagrees with the native cache (a call failed halfway, or the core was used
        directly) start empty."""
        lengths = list(self.core.lengths)
        for i in slots:
            if lengths[i] != len(self._slots[i].ids):
                self.core.reset(i)
                self._slots[i].ids = []

    def _release(self, s: _Sequence) -> None:
        """(Under the lock.) The sequence leaves its slot; the slot keeps its ids for a later prefix."""
        self._active.remove(s)
        self._slots[s.slot].busy = False
        if not s.request.done:
            self._finish(s.request, None, None)

    def _finish(self, r: Request, outcome: Optional[Outcome], error: Optional[BaseException]) -> None:
        """(Under the lock.) Mark a request over and wake its caller."""
        r.outcome, r.error, r.done = outcome, error, True
        if r._cond is not None:
            r._cond.notify_all()

    def _step(self, batch: List[_Sequence]) -> None:
        """One pass over the batch (each sequence's `plan`), then each sequence takes the logits it asked for."""
        slots: List[int] = []
        ids: List[int] = []
        positions: List[int] = []
        logit_rows: List[int] = []
        decoding = [s for s in batch if not s.prefilling]
        proposing = sum(s.request.proposer is not None for s in decoding)
        share = (PASS_DECODE_ROWS - len(decoding)) // proposing if proposing else 0
        t = time.perf_counter()  # a draft model's proposals are part of the pass's time
        for s in batch:
            s.prepare(self._max_context - s.fed, share)
        for s in batch:
            s.plan(self._max_context - s.fed, share)
        # Decode rows all; prompt chunks in order of arrival while they fit PASS_PROMPT_ROWS (at least one).
        taken, prompt_rows = [], 0
        for s in batch:
            if s.prefilling:
                if prompt_rows and prompt_rows + len(s.feed) > PASS_PROMPT_ROWS:
                    continue
                prompt_rows += len(s.feed)
            taken.append(s)
        batch = taken
        for s in batch:
            slots += [s.slot] * len(s.feed)
            positions += range(s.fed, s.fed + len(s.feed))
            ids += s.feed
            logit_rows += range(len(ids) - s.logits, len(ids))
        wants = [s for s in batch if s.logits]
        argmax = all(s.fast_greedy and not s.request.score for s in wants)
        try:
            out = self.core.forward(slots, ids, positions, logit_rows=logit_rows, argmax=argmax)
        except _core.Interrupted:  # only cancelled sequences (or a stale interrupt): the step is redone without them
            with self._lock:
                self._in_flight = []
            return
        except BaseException as e:
            self._fail(batch, e)
            return
        dt = time.perf_counter() - t
        for s in batch:  # the rows are in the cache now
            self._slots[s.slot].ids.extend(s.feed)
            if s.prefilling:
                s.prefill_s += dt
            else:
                s.decode_s += dt
                s.decode_steps += 1
            s.fed += len(s.feed)
        done: List[Tuple[_Sequence, Optional[Piece], Optional[BaseException]]] = []
        row = 0
        for s in wants:
            if s.request.score:
                s.take_scores(out[row:row + s.logits])
                row += s.logits
                done.append((s, None, None))
                continue
            try:
                first = not s.generated
                piece, rejected = s.take(out[row:row + s.logits])
                if rejected:  # the cache keeps the confirmed proposals only
                    s.fed -= rejected
                    self.core.truncate(s.fed, slot=s.slot)
                    del self._slots[s.slot].ids[s.fed:]
                if first:
                    s.ttft_s = time.perf_counter() - s.request.t0
                done.append((s, piece, None))
            except Exception as e:  # sampling refused the logits (NaN): this sequence ends with the error
                done.append((s, None, e))
            row += s.logits
        with self._lock:
            self._in_flight = []
            for s, new, error in done:
                r = s.request
                if new is not None and r.stream and not r.cancelled:
                    r._pieces.append(new)
                    assert r._cond is not None
                    r._cond.notify_all()
                if error is not None or s.finish_reason is not None:
                    if not r.done:
                        self._finish(r, None if error else s.outcome(), error)
                    self._release(s)

    def _fail(self, batch: List[_Sequence], error: BaseException) -> None:
        """A pass or its sampling raised: its sequences end with the error; slots whose bookkeeping may disagree
        with the cache start empty."""
        with self._lock:
            self._in_flight = []
            self._resync([s.slot for s in batch])
            for s in batch:
                if not s.request.done:
                    self._finish(s.request, None, error)
                if s in self._active:
                    self._release(s)
