"""config.json / generation_config.json validation: every bad field is a ConfigError naming it, before any
weights are read or memory allocated."""

from __future__ import annotations

import json

import pytest

from fixtures import make_config
from qwen_native.config import (GenerationDefaults, load_config, load_generation_config, parse_config,
                                parse_generation_config)
from qwen_native.errors import ConfigError


def test_base_config_parses():
    c = parse_config(make_config())
    assert (c.vocab_size, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        (300, 64, 4, 2, 16)
    assert c.tie_word_embeddings is True and c.rope_theta == 10000.0 and c.eos_token_id == (257,)
    core = c.to_core_dict()
    assert core["head_dim"] == 16 and set(core) >= {"vocab_size", "rms_norm_eps", "tie_word_embeddings"}


def test_real_qwen25_config_parses():
    cfg = {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
           "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
           "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
           "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
           "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
           "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True,
           "use_sliding_window": False, "vocab_size": 151936}
    c = parse_config(cfg)
    assert c.head_dim == 64 and c.max_position_embeddings == 32768 and c.torch_dtype == "bfloat16"


def test_explicit_head_dim_and_default_kv_heads():
    c = parse_config(make_config(head_dim=32, num_key_value_heads=None))
    assert c.head_dim == 32 and c.num_key_value_heads == 4


def test_transformers5_rope_parameters():
    cfg = make_config(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    del cfg["rope_theta"]
    assert parse_config(cfg).rope_theta == 1e6
    with pytest.raises(ConfigError, match="rope_parameters.rope_type"):
        parse_config(make_config(rope_parameters={"rope_type": "yarn", "factor": 4.0}))


@pytest.mark.parametrize("overrides, field", [
    ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
    ({"architectures": "Qwen2ForCausalLM"}, "architectures"),
    ({"model_type": "qwen2_moe"}, "model_type"),
    ({"architectures": None, "model_type": None}, "architectures"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"use_sliding_window": "no"}, "use_sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"vocab_size": None}, "vocab_size"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"vocab_size": -5}, "vocab_size"),
    ({"vocab_size": 300.0}, "vocab_size"),
    ({"vocab_size": "300"}, "vocab_size"),
    ({"vocab_size": True}, "vocab_size"),
    ({"vocab_size": 10 ** 12}, "vocab_size"),
    ({"hidden_size": 1 << 30}, "hidden_size"),
    ({"intermediate_size": 0}, "intermediate_size"),
    ({"num_hidden_layers": 100000}, "num_hidden_layers"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"num_attention_heads": 5, "num_key_value_heads": 5}, "num_attention_heads"),  # 64 % 5 != 0
    ({"head_dim": 15}, "head_dim"),
    ({"head_dim": 4096}, "head_dim"),
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
    ({"max_position_embeddings": 1 << 40}, "max_position_embeddings"),
    ({"rope_theta": 0}, "rope_theta"),
    ({"rope_theta": "big"}, "rope_theta"),
    ({"rope_theta": float("inf")}, "rope_theta"),
    ({"rope_theta": 10 ** 400}, "rope_theta"),  # beyond the float range: was an OverflowError
    ({"rope_theta": 2 ** 62}, "rope_theta"),  # above the core's bound (1e12): was accepted here, refused there
    ({"rms_norm_eps": -10 ** 400}, "rms_norm_eps"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps"),
    ({"rms_norm_eps": 2.0}, "rms_norm_eps"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ({"eos_token_id": -1}, "eos_token_id"),
    ({"eos_token_id": [1, "x"]}, "eos_token_id"),
    ({"bos_token_id": 1.5}, "bos_token_id"),
])
def test_bad_field_is_named(overrides, field):
    cfg = make_config(**overrides)
    for k, v in overrides.items():
        if v is None:
            del cfg[k]
    with pytest.raises(ConfigError) as e:
        parse_config(cfg)
    assert field in str(e.value)


def test_non_object_config():
    with pytest.raises(ConfigError, match="JSON object"):
        parse_config([1, 2])  # type: ignore[arg-type]


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(str(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(str(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text(json.dumps(make_config(num_key_value_heads=3)))
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        load_config(str(tmp_path / "config.json"))


def test_bad_config_fails_before_weights_are_read(tiny_model_dir):
    """A bad config.json is reported even though the weights file is garbage: config comes first."""
    import qwen_native

    d = tiny_model_dir()
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ConfigError, match="rope_scaling"):
        qwen_native.load(str(d))


# -- generation_config.json ---------------------------------------------------------------------------------------


def test_generation_defaults_like_transformers():
    g = parse_generation_config(None)
    assert g == GenerationDefaults()
    assert (g.do_sample, g.temperature, g.top_k, g.top_p, g.min_p, g.repetition_penalty) == (
        False, 1.0, 50, 1.0, None, 1.0)


def test_qwen_generation_config():
    cfg = parse_config(make_config(vocab_size=151936, eos_token_id=151645))
    g = parse_generation_config({"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                                 "eos_token_id": [151645, 151643], "repetition_penalty": 1.1, "temperature": 0.7,
                                 "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0"}, cfg)
    assert g.do_sample and g.temperature == 0.7 and g.top_k == 20 and g.top_p == 0.8
    assert g.repetition_penalty == 1.1 and g.eos_token_id == (151645, 151643) and g.pad_token_id == 151643


def test_eos_falls_back_to_config():
    cfg = parse_config(make_config())
    assert parse_generation_config({"do_sample": False}, cfg).eos_token_id == (257,)
    assert load_generation_config(None, cfg).eos_token_id == (257,)


@pytest.mark.parametrize("gen, field", [
    ({"do_sample": "yes"}, "do_sample"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"min_p": 2}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"eos_token_id": "x"}, "eos_token_id"),
    ({"eos_token_id": [100000]}, "eos_token_id"),  # outside vocab_size 300
    ({"pad_token_id": -3}, "pad_token_id"),
    ({"temperature": 10 ** 400}, "temperature"),  # math.isfinite(10**400) raised OverflowError
    ({"repetition_penalty": 10 ** 400}, "repetition_penalty"),
])
def test_bad_generation_field_is_named(gen, field):
    cfg = parse_config(make_config())
    with pytest.raises(ConfigError) as e:
        parse_generation_config(gen, cfg)
    assert field in str(e.value)
