"""Next-token choice over one row of logits, with transformers' processors and semantics, in numpy.

Order (as transformers' ``generate``): repetition penalty → [greedy: argmax] → temperature → top-k → top-p →
min-p → sample from the softmax of what is left.

* repetition penalty (CTRL): each id seen in the context (optionally only its last ``repeat_last_n`` ids) once:
  a positive logit is divided by the penalty, a negative one multiplied.
* top-k keeps every token whose logit is >= the k-th largest (ties at the boundary are kept, as ``torch.topk``
  with ``<`` does).
* top-p keeps the smallest set of most likely tokens whose mass reaches p, including the token that crosses p
  (ascending cumulative mass <= 1 - p is removed); the most likely token always stays.
* min-p removes tokens whose probability is below ``min_p`` times the top token's probability.

Speed: a full sort of 151,936 logits costs ~10 ms, so none is done. With top-k the candidates come from one
``np.partition``; top-p alone looks only at tokens above a probability threshold, lowered until they hold mass p
(the nucleus is inside that set, since any token outside it has at least that much mass above it); min-p is a
threshold. Everything after that works on the few candidates.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._checks import short as _short

__all__ = ["SamplingParams", "Sampler", "apply_repetition_penalty", "apply_penalties", "log_probs", "candidates",
           "token_distribution", "check_sampling_args"]

IdSequence = Union[Sequence[int], np.ndarray]


def _real(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(v).__name__} {_short(v)}")
    try:
        f = float(v)
    except OverflowError:  # an int beyond the float range: as infinite, which every range check rejects
        f = math.inf if v > 0 else -math.inf  # type: ignore[operator]  # numbers.Real has no __gt__ in typeshed
    if math.isnan(f):
        raise ValueError(f"{name} must be a number, got NaN")
    return f


def _int(name: str, v: Any) -> int:
    if isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got bool {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(v).__name__} {_short(v)}") from None


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. ``do_sample=False`` (or ``temperature=0``) is greedy: only the repetition
    penalty applies before argmax. ``top_k=0``, ``top_p=1`` and ``min_p=0`` switch those filters off.
    ``repeat_last_n=0`` applies the repetition penalty over the whole context (prompt included), as
    transformers does; n > 0 only over the last n ids."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repeat_last_n: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise TypeError(f"do_sample must be True or False, got {self.do_sample!r}")
        check_sampling_args(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                            repetition_penalty=self.repetition_penalty, repeat_last_n=self.repeat_last_n,
                            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty)
        object.__setattr__(self, "do_sample", bool(self.do_sample))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_k", operator.index(self.top_k))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "min_p", float(self.min_p))
        object.__setattr__(self, "repetition_penalty", float(self.repetition_penalty))
        object.__setattr__(self, "repeat_last_n", operator.index(self.repeat_last_n))
        object.__setattr__(self, "presence_penalty", float(self.presence_penalty))
        object.__setattr__(self, "frequency_penalty", float(self.frequency_penalty))

    @property
    def greedy(self) -> bool:
        """True when the choice is an argmax (no sampling)."""
        return not self.do_sample or self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """True when a penalty changes the logits before the choice."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def check_sampling_args(*, temperature: Any = None, top_k: Any = None, top_p: Any = None, min_p: Any = None,
                        repetition_penalty: Any = None, repeat_last_n: Any = None, seed: Any = None,
                        max_new_tokens: Any = None, presence_penalty: Any = None,
                        frequency_penalty: Any = None) -> None:
    """Raise TypeError (wrong type) or ValueError (out of range) naming the first bad argument; None = unset."""
    if temperature is not None:
        t = _real("temperature", temperature)
        if not (0.0 <= t < math.inf):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {_short(temperature)}")
    if top_k is not None and _int("top_k", top_k) < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {_short(top_k)}")
    if top_p is not None:
        p = _real("top_p", top_p)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {_short(top_p)}")
    if min_p is not None:
        m = _real("min_p", min_p)
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {_short(min_p)}")
    if repetition_penalty is not None:
        r = _real("repetition_penalty", repetition_penalty)
        if not (0.0 < r < math.inf):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got "
                             f"{_short(repetition_penalty)}")
    if repeat_last_n is not None and _int("repeat_last_n", repeat_last_n) < 0:
        raise ValueError(f"repeat_last_n must be >= 0 (0 = the whole context), got {_short(repeat_last_n)}")
    for name, v in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if v is not None and not -2.0 <= _real(name, v) <= 2.0:
            raise ValueError(f"{name} must be in [-2, 2] (0 = off), got {_short(v)}")
    if seed is not None and _int("seed", seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {_short(seed)}")
    if max_new_tokens is not None and _int("max_new_tokens", max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {_short(max_new_tokens)}")


def apply_repetition_penalty(logits: np.ndarray, context: IdSequence, penalty: float,
                             last_n: int = 0) -> np.ndarray:
    """In place: CTRL repetition penalty over the ids of `context` (its last `last_n`, or all when 0), each id
    once. Returns `logits`."""
    if penalty == 1.0 or len(context) == 0:
        return logits
    ids = np.asarray(context[-last_n:] if last_n > 0 else context, dtype=np.int64)
    ids = np.unique(ids)
    ids = ids[(ids >= 0) & (ids < logits.shape[-1])]
    # In float64, then clipped into the logits' range: an extreme penalty (1e-300, 1e300) must not turn a logit
    # into inf or NaN.
    vals = logits[ids].astype(np.float64)
    with np.errstate(over="ignore", under="ignore"):
        out = np.where(vals < 0, vals * penalty, vals / penalty)
    big = float(np.finfo(logits.dtype).max)
    logits[ids] = np.clip(out, -big, big)
    return logits


def apply_penalties(logits: np.ndarray, context: IdSequence, params: SamplingParams, generated: int = 0) -> np.ndarray:
    """In place: the repetition penalty over the context (as apply_repetition_penalty), then OpenAI's presence and
    frequency penalties over the last `generated` ids of the context (the generated ones): a token's logit minus
    presence_penalty once if it was generated, minus frequency_penalty per time. Returns `logits`."""
    apply_repetition_penalty(logits, context, params.repetition_penalty, params.repeat_last_n)
    if (params.presence_penalty or params.frequency_penalty) and generated > 0:
        ids, counts = np.unique(np.asarray(context[len(context) - generated:], dtype=np.int64), return_counts=True)
        keep = (ids >= 0) & (ids < logits.shape[-1])
        ids, counts = ids[keep], counts[keep]
        logits[ids] -= (params.presence_penalty + params.frequency_penalty * counts).astype(logits.dtype)
    return logits


def log_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Log-probabilities of every token the way they are reported with generated tokens: log-softmax of the logits
    after the penalties and the temperature (temperature 1 when greedy), before top-k / top-p / min-p cut tokens
    away. `logits` must already carry the penalties."""
    x = np.asarray(logits, dtype=np.float64)
    if not params.greedy and params.temperature != 1.0:
        x = x / params.temperature
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def _check_logits(logits: np.ndarray) -> np.ndarray:
    if not isinstance(logits, np.ndarray) or logits.ndim != 1 or logits.size == 0:
        raise ValueError("logits must be a non-empty 1-D numpy array")
    if logits.dtype != np.float32 and logits.dtype != np.float64:
        logits = logits.astype(np.float32)
    return logits


_SMALL = 4096     # rows up to this size are simply sorted
_BINS = 4096      # histogram bins for the top-p cut of larger rows


def _nucleus(x: np.ndarray, z: np.ndarray, top_p: float) -> np.ndarray:
    """Indices (into `z`) of the tokens top-p keeps. `z` are unnormalised probabilities, increasing with the
    logits `x` (same shape; used only to bin the tokens).

    transformers removes a token when the mass of it and of everything less likely is <= (1 - top_p) of the
    total, i.e. keeps it while the mass strictly above it is < top_p of the total."""
    total = float(z.sum())
    limit = total - (1.0 - top_p) * total  # keep while the mass above < limit

    def exact(idx: np.ndarray, above0: float) -> np.ndarray:
        # idx: candidates with `above0` mass above all of them: sort them, cut where the mass crosses the limit.
        order = idx[np.argsort(-z[idx], kind="stable")]
        zs = z[order]
        above = above0 + (np.cumsum(zs) - zs)
        # At least one token: a top_p so small that 1 - top_p rounds to 1 leaves a limit of 0.
        return order[:max(1, int(np.count_nonzero(above < limit)))]

    n = z.shape[0]
    if n <= _SMALL:
        return exact(np.arange(n), 0.0)
    # Usually a few tokens hold the mass: take those above a small threshold; if they reach the limit, the
    # kept set lies among them (every other token has at least their mass above it).
    head = np.flatnonzero(z >= 1e-4 * total)
    if head.shape[0] <= _SMALL and float(z[head].sum()) >= limit:
        return exact(head, 0.0)
    # Otherwise bin the tokens by logit: bins above the crossing bin are kept whole, the crossing bin is sorted,
    # bins below are dropped. O(n), and the crossing bin is small.
    x32 = np.asarray(x, dtype=np.float32)
    hi, lo = float(x32.max()), float(x32.min())
    if hi == lo:  # all equal
        return exact(np.arange(n), 0.0)
    t = x32 - np.float32(lo)
    t *= np.float32((_BINS - 0.01) / (hi - lo))
    b = t.astype(np.int32)  # monotone in the logit, so in z
    np.clip(b, 0, _BINS - 1, out=b)
    mass = np.bincount(b, weights=z, minlength=_BINS)[::-1]   # mass[j]: the j-th bin from the top
    cum = np.cumsum(mass)
    j = min(int(np.searchsorted(cum, limit, side="left")), _BINS - 1)
    crossing = _BINS - 1 - j
    above0 = float(cum[j] - mass[j])
    whole = np.flatnonzero(b > crossing)
    part = exact(np.flatnonzero(b == crossing), above0)
    return np.concatenate([whole, part])


def _filter(logits: np.ndarray, params: SamplingParams) -> Tuple[Optional[np.ndarray], np.ndarray]:
    """(ids, z): the surviving token ids (None: the whole row) and their unnormalised probabilities."""
    V = logits.shape[0]
    top = float(logits.max())
    if not math.isfinite(top):
        raise RuntimeError("the model produced NaN or infinite logits; the weights or the computation are broken")
    k = params.top_k if 0 < params.top_k < V else 0

    ids: Optional[np.ndarray] = None  # None: the whole row
    if k:
        # The k largest, plus any tied with the k-th (transformers removes only logits < the k-th value).
        kth = np.partition(logits, V - k)[V - k]
        ids = np.flatnonzero(logits >= kth)
        row = logits[ids]
    else:
        row = logits
    lz = row.astype(np.float64)
    lz -= top
    with np.errstate(over="ignore", under="ignore"):
        if params.temperature != 1.0:
            lz /= params.temperature  # divided, not multiplied by 1/t: 1/5e-324 is inf, and 0 * inf NaN
        z = np.exp(lz)  # unnormalised probabilities; the top token has 1.0

    if params.top_p < 1.0:
        keep = _nucleus(row, z, params.top_p)
        z = z[keep]
        ids = keep if ids is None else ids[keep]
    if params.min_p > 0.0:
        # The top token (z = 1) always survives top-k and top-p, so min_p * its probability is min_p here.
        keep = np.flatnonzero(z >= params.min_p)
        z = z[keep]
        ids = keep if ids is None else ids[keep]
    return ids, z


def candidates(logits: np.ndarray, params: SamplingParams) -> Tuple[np.ndarray, np.ndarray]:
    """The tokens sampling may pick and their probabilities (summing to 1), after temperature, top-k, top-p and
    min-p (ids in no particular order). `logits` must already carry the repetition penalty."""
    logits = _check_logits(logits)
    ids, z = _filter(logits, params)
    if ids is None:
        ids = np.arange(logits.shape[0])
    return ids, z / z.sum()


def token_distribution(logits: np.ndarray, params: SamplingParams,
                       context: Optional[IdSequence] = None) -> np.ndarray:
    """The full-vocabulary probability vector sampling draws from (zeros where filtered); for greedy params, a
    one-hot at the argmax. For tests and inspection; :class:`Sampler` does not build it."""
    x = np.array(_check_logits(logits), copy=True)
    apply_repetition_penalty(x, context if context is not None else [], params.repetition_penalty,
                             params.repeat_last_n)
    out = np.zeros(x.shape[0], dtype=np.float64)
    if params.greedy:
        out[int(np.argmax(x))] = 1.0
        return out
    ids, probs = candidates(x, params)
    out[ids] = probs
    return out


class Sampler:
    """Picks next tokens with fixed params and its own seeded ``numpy.random.Generator`` (seed None: fresh OS
    entropy). The same seed, params and logits give the same tokens."""

    def __init__(self, params: SamplingParams, seed: Optional[int] = None):
        if not isinstance(params, SamplingParams):
            raise TypeError("params must be a SamplingParams")
        check_sampling_args(seed=seed)
        self.params = params
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray, context: IdSequence = (), inplace: bool = False, generated: int = 0,
                 penalized: bool = False, proposed: Optional[int] = None,
                 draft: Optional[Tuple[np.ndarray, np.ndarray]] = None,
                 keep: Optional[List[Tuple[np.ndarray, np.ndarray]]] = None) -> int:
        """The next token id for `logits` (vocab,), given the ids so far (`context`, for the penalties; its last
        `generated` ids are the generated ones). With `inplace`, `logits` may be overwritten; with `penalized`,
        they already carry the penalties.

        Speculative sampling: with `proposed` (an id a proposer put forward), the result is `proposed` with
        probability min(1, p/q) and otherwise a draw from the normalised residual max(0, p - q), where p is this
        distribution and q the proposer's (`draft`: its (ids, probabilities); None: a proposer that picks
        `proposed` for sure, as prompt lookup does). Either way the result is distributed exactly as p.
        `keep`: a list that gets this distribution's (ids, probabilities) appended (a draft model's q)."""
        p = self.params
        x = _check_logits(logits)
        if p.penalized and len(context) and not penalized:
            if not inplace or x is not logits:
                x = np.array(x, copy=True)
            apply_penalties(x, context, p, generated)
        if p.greedy:
            return int(np.argmax(x))
        ids, z = _filter(x, p)
        if ids is None and (keep is not None or proposed is not None):
            ids = np.arange(x.shape[0])
        if keep is not None:
            assert ids is not None
            keep.append((ids, z / z.sum()))
        u = self.rng.random()  # drawn even when one token is left, so the stream stays in step
        if proposed is not None:
            assert ids is not None
            probs = z / z.sum()
            at = np.flatnonzero(ids == proposed)
            p_x = float(probs[at[0]]) if at.size else 0.0
            q = np.zeros_like(probs)  # q at the ids p can pick
            if draft is None:
                q[at] = 1.0
            else:
                order = np.argsort(draft[0])
                pos = np.clip(np.searchsorted(draft[0], ids, sorter=order), 0, len(order) - 1)
                hit = draft[0][order[pos]] == ids
                q[hit] = draft[1][order[pos[hit]]]
            q_x = 1.0 if draft is None else float(q[at[0]]) if at.size else 0.0
            if p_x > 0.0 and u * q_x < p_x:
                return int(proposed)
            z = np.maximum(probs - q, 0.0)
            if not z.sum() > 0.0:  # p == q: a rejection has probability 0; keep p
                z = probs
            u = self.rng.random()
        if z.shape[0] == 1:
            return int(ids[0]) if ids is not None else 0
        cdf = np.cumsum(z)
        i = min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), z.shape[0] - 1)
        return int(ids[i]) if ids is not None else i
