"""config.json and generation_config.json, read and checked before anything is allocated.

Only the dense Qwen2 architecture (``Qwen2ForCausalLM``) is supported: every field the native core uses is
checked for presence, type and range here, so a bad file fails with a :class:`~qwen_native.errors.ConfigError`
naming the field instead of a crash or a huge allocation later.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Type

from . import _core  # the compiled extension (types: _core.pyi)
from ._checks import is_int as _is_int, is_number as _is_number, read_small, short as _short
from .errors import ConfigError

__all__ = ["Qwen2Config", "GenerationDefaults", "parse_config", "load_config", "parse_generation_config",
           "load_generation_config", "read_json"]

SUPPORTED_ARCHITECTURE = "Qwen2ForCausalLM"

# Upper bounds of the sizes (far above any real Qwen2 model: 7B has hidden 3584, 28 layers, 152064 vocab, 32768
# positions) that catch corrupt or hostile files before they turn into a multi-terabyte allocation: the core's own
# limits, read from it.
_LIMITS: Dict[str, int] = dict(_core.config_limits)


@dataclass(frozen=True)
class Qwen2Config:
    """The validated fields of a Qwen2 config.json. ``raw`` keeps the file's full contents."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    bos_token_id: Optional[int] = None
    eos_token_id: Tuple[int, ...] = ()
    torch_dtype: Optional[str] = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def to_core_dict(self) -> Dict[str, Any]:
        """The dict ``_core.Model`` reads (plain ints/floats/bools only)."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
        }


@dataclass(frozen=True)
class GenerationDefaults:
    """Decoding defaults from generation_config.json, completed the way transformers completes them: a field the
    file leaves out takes transformers' global default (do_sample False, temperature 1.0, top_k 50, top_p 1.0,
    repetition_penalty 1.0, min_p unset)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: Optional[float] = None
    repetition_penalty: float = 1.0
    eos_token_id: Tuple[int, ...] = ()
    bos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    max_new_tokens: Optional[int] = None


def read_json(path: str, what: Optional[str] = None, error: Type[Exception] = ConfigError) -> Dict[str, Any]:
    """Read a JSON object from `path`; `error` (ConfigError unless told) naming the file when it is missing,
    oversized or not a JSON object."""
    what = what or os.path.basename(path)
    raw = read_small(path, what, error)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise error(f"{what} at {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise error(f"{what} at {path} is nested too deeply to be a model file; the file is corrupt") from None
    if not isinstance(data, dict):
        raise error(f"{what} at {path} must hold a JSON object, not {type(data).__name__}")
    return data


def _to_float(v: Any) -> float:
    """float(v), with an int too large for a float (JSON allows 1e400 written as digits) as +-inf."""
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def _size(d: Mapping[str, Any], key: str, src: str, default: Any = None) -> int:
    v = d.get(key)
    if v is None:
        v = default
    if v is None:
        raise ConfigError(f"{src} is missing \"{key}\" (a positive integer); a Qwen2 config.json always has it")
    if not _is_int(v):
        raise ConfigError(f"{src}: \"{key}\" must be an integer, got {_short(v)}")
    if v <= 0:
        raise ConfigError(f"{src}: \"{key}\" must be positive, got {_short(v)}")
    if v > _LIMITS[key]:
        raise ConfigError(f"{src}: \"{key}\" = {_short(v)} is implausibly large (limit {_LIMITS[key]}); the file is "
                          "corrupt")
    return v


def _positive_float(d: Mapping[str, Any], key: str, src: str, default: float, upper: float = math.inf) -> float:
    v = d.get(key, default)
    if v is None:
        v = default
    if not _is_number(v):
        raise ConfigError(f"{src}: \"{key}\" must be a number, got {_short(v)}")
    v = _to_float(v)
    if not (math.isfinite(v) and 0.0 < v <= upper):
        bound = f" up to {upper:g}" if upper != math.inf else ""
        raise ConfigError(f"{src}: \"{key}\" must be a positive finite number{bound}, got {_short(v)}")
    return v


def _token_ids(v: Any, key: str, src: str) -> Tuple[int, ...]:
    """An id or list of ids (None → empty)."""
    if v is None:
        return ()
    items = v if isinstance(v, list) else [v]
    for t in items:
        if not _is_int(t) or t < 0:
            raise ConfigError(f"{src}: \"{key}\" must be a non-negative integer or a list of them, got {_short(v)}")
    return tuple(dict.fromkeys(items))


def parse_config(d: Mapping[str, Any], source: str = "config.json") -> Qwen2Config:
    """Validate a config.json dict; ConfigError naming the field on anything unsupported or out of range."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source} must be a JSON object, not {type(d).__name__}")
    src = source
    archs = d.get("architectures")
    if archs is not None:
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ConfigError(f"{src}: \"architectures\" must be a list of strings, got {_short(archs)}")
        if SUPPORTED_ARCHITECTURE not in archs:
            raise ConfigError(f"{src}: \"architectures\" is {_short(archs)}; only {SUPPORTED_ARCHITECTURE} "
                              "(dense Qwen2 / Qwen2.5 models) is supported")
    model_type = d.get("model_type")
    if model_type is not None and model_type != "qwen2":
        raise ConfigError(f"{src}: \"model_type\" is {_short(model_type)}; only \"qwen2\" "
                          f"({SUPPORTED_ARCHITECTURE}) is supported")
    if archs is None and model_type is None:
        raise ConfigError(f"{src} has neither \"architectures\" nor \"model_type\"; expected "
                          f"[\"{SUPPORTED_ARCHITECTURE}\"]")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{src}: \"hidden_act\" is {_short(act)}; only \"silu\" is supported")

    # Features the core does not implement: refuse rather than compute something else.
    rope_scaling = d.get("rope_scaling")
    if rope_scaling is not None:
        raise ConfigError(f"{src}: \"rope_scaling\" is set ({_short(rope_scaling)}); RoPE scaling (YaRN, dynamic, "
                          "linear) is not supported: only plain RoPE (rope_scaling null) is")
    rope_theta_default = 10000.0
    rope_params = d.get("rope_parameters")  # the transformers 5 spelling of rope_theta + rope_scaling
    if rope_params is not None:
        if not isinstance(rope_params, Mapping):
            raise ConfigError(f"{src}: \"rope_parameters\" must be an object, got {_short(rope_params)}")
        rtype = rope_params.get("rope_type", "default")
        if rtype != "default":
            raise ConfigError(f"{src}: \"rope_parameters.rope_type\" is {_short(rtype)}; only \"default\" (plain RoPE) "
                              "is supported")
        if "rope_theta" in rope_params:
            rope_theta_default = rope_params["rope_theta"]
    sliding = d.get("use_sliding_window", False)
    if not isinstance(sliding, bool):
        raise ConfigError(f"{src}: \"use_sliding_window\" must be true or false, got {_short(sliding)}")
    if sliding:
        raise ConfigError(f"{src}: \"use_sliding_window\" is true; sliding-window attention is not supported "
                          "(only full attention, use_sliding_window false)")

    vocab = _size(d, "vocab_size", src)
    hidden = _size(d, "hidden_size", src)
    inter = _size(d, "intermediate_size", src)
    layers = _size(d, "num_hidden_layers", src)
    heads = _size(d, "num_attention_heads", src)
    kv_heads = _size(d, "num_key_value_heads", src, default=heads)
    if heads % kv_heads:
        raise ConfigError(f"{src}: \"num_attention_heads\" ({heads}) is not a multiple of \"num_key_value_heads\" "
                          f"({kv_heads})")
    if d.get("head_dim") is not None:
        hd = _size(d, "head_dim", src)
    else:
        if hidden % heads:
            raise ConfigError(f"{src}: \"hidden_size\" ({hidden}) is not a multiple of \"num_attention_heads\" "
                              f"({heads}) and there is no \"head_dim\"")
        hd = hidden // heads
        if hd > _LIMITS["head_dim"]:
            raise ConfigError(f"{src}: head_dim = hidden_size / num_attention_heads = {hd} is implausibly large")
    if hd % 2:
        raise ConfigError(f"{src}: \"head_dim\" ({hd}) must be even for rotary embeddings")
    max_pos = _size(d, "max_position_embeddings", src)
    theta = _positive_float(d, "rope_theta", src, rope_theta_default, upper=_core.max_rope_theta)
    eps = _positive_float(d, "rms_norm_eps", src, 1e-6, upper=_core.max_rms_norm_eps)
    tie = d.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ConfigError(f"{src}: \"tie_word_embeddings\" must be true or false, got {_short(tie)}")
    bos = d.get("bos_token_id")
    if bos is not None and (not _is_int(bos) or bos < 0):
        raise ConfigError(f"{src}: \"bos_token_id\" must be a non-negative integer, got {_short(bos)}")
    eos = _token_ids(d.get("eos_token_id"), "eos_token_id", src)
    tdt = d.get("torch_dtype", d.get("dtype"))
    return Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hd, max_position_embeddings=max_pos,
        rope_theta=theta, rms_norm_eps=eps, tie_word_embeddings=tie, bos_token_id=bos, eos_token_id=eos,
        torch_dtype=tdt if isinstance(tdt, str) else None, raw=dict(d))


def load_config(path: str) -> Qwen2Config:
    """Read and validate config.json."""
    return parse_config(read_json(path, "config.json"), source=path)


def parse_generation_config(d: Optional[Mapping[str, Any]], config: Optional[Qwen2Config] = None,
                            source: str = "generation_config.json") -> GenerationDefaults:
    """Validate generation_config.json (None: the file is absent). EOS ids fall back to config.json's."""
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source} must be a JSON object, not {type(d).__name__}")
    src = source
    base = GenerationDefaults()

    def num(key: str, default: Any, check: Callable[[Any], bool], what: str) -> Any:
        v = d.get(key)
        if v is None:
            return default
        try:
            ok = _is_number(v) and check(v)
        except OverflowError:  # an integer too large for a float (math.isfinite(10**400))
            ok = False
        if not ok:
            raise ConfigError(f"{src}: \"{key}\" must be {what}, got {_short(v)}")
        return v

    do_sample = d.get("do_sample")
    if do_sample is None:
        do_sample = base.do_sample
    elif not isinstance(do_sample, bool):
        raise ConfigError(f"{src}: \"do_sample\" must be true or false, got {_short(do_sample)}")
    temperature = float(num("temperature", base.temperature, lambda v: math.isfinite(v) and v >= 0, "a number >= 0"))
    top_k = num("top_k", base.top_k, lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    top_p = float(num("top_p", base.top_p, lambda v: 0 < v <= 1, "a number in (0, 1]"))
    min_p = num("min_p", None, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    rep = float(num("repetition_penalty", base.repetition_penalty, lambda v: math.isfinite(v) and v > 0,
                    "a number > 0"))
    max_new = num("max_new_tokens", None, lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    eos = _token_ids(d.get("eos_token_id"), "eos_token_id", src)
    if not eos and config is not None:
        eos = config.eos_token_id
    bos = d.get("bos_token_id", config.bos_token_id if config is not None else None)
    if bos is not None and (not _is_int(bos) or bos < 0):
        raise ConfigError(f"{src}: \"bos_token_id\" must be a non-negative integer, got {_short(bos)}")
    pad = d.get("pad_token_id")
    if isinstance(pad, list):  # some files carry a list here; the first id is the one used
        pad = pad[0] if pad else None
    if pad is not None and (not _is_int(pad) or pad < 0):
        raise ConfigError(f"{src}: \"pad_token_id\" must be a non-negative integer, got {_short(pad)}")
    if config is not None:
        for t in eos:
            if t >= config.vocab_size:
                raise ConfigError(f"{src}: \"eos_token_id\" {t} is outside the vocabulary (vocab_size "
                                  f"{config.vocab_size})")
    return GenerationDefaults(do_sample=do_sample, temperature=temperature, top_k=int(top_k), top_p=top_p,
                              min_p=None if min_p is None else float(min_p), repetition_penalty=rep,
                              eos_token_id=eos, bos_token_id=bos, pad_token_id=pad, max_new_tokens=max_new)


def load_generation_config(path: Optional[str], config: Optional[Qwen2Config] = None) -> GenerationDefaults:
    """Read generation_config.json when `path` is given (None: the model has none; defaults apply)."""
    if path is None:
        return parse_generation_config(None, config)
    return parse_generation_config(read_json(path, "generation_config.json"), config, source=path)
