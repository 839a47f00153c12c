"""Finding a model's files: local directories and a local Hugging Face cache built here (never the network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import make_hf_cache
from qwen_native.errors import CheckpointError, ConfigError, ModelNotFoundError, TemplateError
from qwen_native.hub import is_local_path, resolve

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


# -- local directories --------------------------------------------------------------------------------------------


def test_local_single_file(tiny_model_dir):
    d = tiny_model_dir()
    f = resolve(str(d))
    assert f.directory == str(d) and f.repo_id is None
    assert f.config == str(d / "config.json") and f.tokenizer == str(d / "tokenizer.json")
    assert f.tokenizer_config == str(d / "tokenizer_config.json")
    assert f.generation_config == str(d / "generation_config.json")
    assert f.chat_template is None
    assert f.weights == (str(d / "model.safetensors"),)


def test_local_sharded_each_shard_once(tiny_model_dir):
    d = tiny_model_dir(shards=3)
    f = resolve(d)  # a PathLike works too
    assert [os.path.basename(w) for w in f.weights] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    (d / "model-00009-of-00009.safetensors").write_bytes(b"not named by the index")
    assert len(resolve(d).weights) == 3


@pytest.mark.parametrize("bad", ["../x.safetensors", "/etc/x.safetensors", "sub/model.safetensors",
                                 "..\\x.safetensors", "model.bin", "", "C:x.safetensors"])
def test_index_naming_a_path_is_rejected(tiny_model_dir, bad):
    d = tiny_model_dir(shards=2)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = bad
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="plain"):
        resolve(d)


def test_index_naming_a_missing_shard(tiny_model_dir):
    d = tiny_model_dir(shards=2)
    os.remove(d / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        resolve(d)


def test_local_missing_files(tiny_model_dir, tmp_path):
    d = tiny_model_dir()
    os.remove(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        resolve(d)
    d = tiny_model_dir()
    os.remove(d / "tokenizer.json")
    with pytest.raises(TemplateError, match="tokenizer.json"):
        resolve(d)
    d = tiny_model_dir()
    os.remove(d / "config.json")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve(d)
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        resolve(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve(str(tiny_model_dir() / "config.json"))


def test_local_bad_config_is_checked(tiny_model_dir):
    d = tiny_model_dir()
    cfg = json.loads((d / "config.json").read_text())
    cfg["use_sliding_window"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="use_sliding_window"):
        resolve(d)
    assert resolve(d, check_config=False).config == str(d / "config.json")


def test_argument_errors(tiny_model_dir):
    d = tiny_model_dir()
    with pytest.raises(ValueError, match="revision"):
        resolve(d, revision="main")
    with pytest.raises(TypeError):
        resolve(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        resolve("")
    assert is_local_path("./x") and is_local_path("/x/y") and is_local_path("a/b/c")
    assert not is_local_path("Qwen/Qwen2.5-0.5B-Instruct") and not is_local_path("gpt2")


# -- a local Hugging Face cache, offline ---------------------------------------------------------------------------


@pytest.fixture
def calls(monkeypatch):
    """Record every hf_hub_download call (and check none of them may use the network)."""
    import huggingface_hub

    real = huggingface_hub.hf_hub_download
    seen = []

    def spy(repo_id, filename, **kw):
        assert kw.get("local_files_only") is True, "a test must never reach the network"
        seen.append((repo_id, filename, kw.get("revision")))
        return real(repo_id, filename, **kw)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    return seen


def test_hub_cache_resolves_offline(tiny_model_dir, hf_cache, calls):
    src = tiny_model_dir()
    snap = make_hf_cache(hf_cache, "org/tiny", src, commit=COMMIT)
    f = resolve("org/tiny")
    assert f.repo_id == "org/tiny" and f.revision == COMMIT
    assert f.directory == str(snap)
    assert f.weights == (str(snap / "model.safetensors"),)
    assert f.tokenizer == str(snap / "tokenizer.json") and f.chat_template is None
    # the path stays inside the snapshot; the content is the blob's
    assert os.path.islink(f.weights[0]) and os.path.realpath(f.weights[0]).startswith(str(hf_cache))
    names = [c[1] for c in calls]
    assert names[0] == "config.json" and len(names) == len(set(names))
    assert all(rev == COMMIT for _, name, rev in calls[1:])  # pinned to the commit config.json came from


def test_hub_cache_sharded_each_shard_once(tiny_model_dir, hf_cache, calls):
    src = tiny_model_dir(shards=3)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) > 3  # several tensors per shard: names repeat in the map
    snap = make_hf_cache(hf_cache, "org/sharded", src, commit=COMMIT)
    f = resolve("org/sharded")
    assert [os.path.basename(w) for w in f.weights] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert all(os.path.dirname(w) == str(snap) for w in f.weights)
    shard_calls = [name for _, name, _ in calls if name.startswith("model-")]
    assert sorted(shard_calls) == sorted(set(shard_calls)) and len(shard_calls) == 3


def test_hub_cache_index_with_parent_path_rejected(tiny_model_dir, hf_cache, calls):
    src = tiny_model_dir(shards=2)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "../x.safetensors" for k in index["weight_map"]}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    make_hf_cache(hf_cache, "org/evil", src, commit=COMMIT)
    with pytest.raises(CheckpointError, match=r"\.\./x\.safetensors"):
        resolve("org/evil")
    assert not any(name.endswith("x.safetensors") for _, name, _ in calls)


def test_hub_revisions(tiny_model_dir, hf_cache, calls):
    main_src = tiny_model_dir(seed=1)
    dev_src = tiny_model_dir(seed=2, shards=2)
    make_hf_cache(hf_cache, "org/multi", main_src, commit=COMMIT, branch="main")
    make_hf_cache(hf_cache, "org/multi", dev_src, commit=OTHER_COMMIT, branch="dev")
    assert resolve("org/multi").revision == COMMIT
    dev = resolve("org/multi", revision="dev")
    assert dev.revision == OTHER_COMMIT and len(dev.weights) == 2
    assert resolve("org/multi", revision=COMMIT).weights == resolve("org/multi").weights
    with pytest.raises(ModelNotFoundError):
        resolve("org/multi", revision="no-such-branch")


def test_hub_cache_missing_things(tiny_model_dir, hf_cache, calls):
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        resolve("org/absent")
    src = tiny_model_dir()
    make_hf_cache(hf_cache, "org/noweights", src, commit=COMMIT,
                  files=["config.json", "tokenizer.json", "tokenizer_config.json"])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        resolve("org/noweights")
    make_hf_cache(hf_cache, "org/notok", src, commit=COMMIT, files=["config.json", "model.safetensors"])
    with pytest.raises(TemplateError, match="tokenizer.json"):
        resolve("org/notok")
    # optional files may be absent
    make_hf_cache(hf_cache, "org/minimal", src, commit=COMMIT,
                  files=["config.json", "tokenizer.json", "model.safetensors"])
    f = resolve("org/minimal")
    assert f.generation_config is None and f.tokenizer_config is None and f.chat_template is None
    with pytest.raises(ModelNotFoundError, match="neither a local directory nor a valid Hub repo id"):
        resolve("bad name with spaces")


def test_hub_bad_config_stops_before_weights(tiny_model_dir, hf_cache, calls):
    src = tiny_model_dir()
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["MixtralForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    make_hf_cache(hf_cache, "org/moe", src, commit=COMMIT)
    with pytest.raises(ConfigError, match="architectures"):
        resolve("org/moe")
    assert [name for _, name, _ in calls] == ["config.json"]


def test_local_files_only_argument(tiny_model_dir, hf_cache, calls, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    make_hf_cache(hf_cache, "org/tiny", tiny_model_dir(), commit=COMMIT)
    assert resolve("org/tiny", local_files_only=True).revision == COMMIT  # `calls` checks local_files_only


def test_explicit_cache_dir(tiny_model_dir, hf_cache, tmp_path, calls):
    other = tmp_path / "elsewhere"
    make_hf_cache(other, "org/tiny", tiny_model_dir(), commit=COMMIT)
    with pytest.raises(ModelNotFoundError):
        resolve("org/tiny")
    assert resolve("org/tiny", cache_dir=str(other)).directory.startswith(str(other))


def test_load_and_generate_through_the_hub_cache(tiny_model_dir, hf_cache):
    import qwen_native

    make_hf_cache(hf_cache, "org/tiny", tiny_model_dir(), commit=COMMIT)
    with qwen_native.load("org/tiny", num_threads=1) as m:
        assert m.files.revision == COMMIT and m.name == "org/tiny"
        r = m.generate("hello", max_new_tokens=3)
        assert len(r.token_ids) >= 1


def test_hf_home_env_in_a_fresh_process(tiny_model_dir, tmp_path):
    """HF_HOME (read by huggingface_hub at import) locates the cache; HF_HUB_OFFLINE=1 keeps it offline."""
    home = tmp_path / "hf_home"
    make_hf_cache(home / "hub", "org/tiny", tiny_model_dir(), commit=COMMIT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    code = "from qwen_native.hub import resolve; f = resolve('org/tiny'); print(f.revision, len(f.weights))"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [COMMIT, "1"]
