"""Shared fixtures: complete tiny model directories (random Qwen2 weights from fixtures.py + the byte-level BPE
tokenizer and Qwen2.5 chat template from tokenizer_fixture.py), a local Hugging Face cache, and loaded models.

``tiny_model_dir(**kw)`` writes a fresh directory; ``tiny_dir`` / ``tiny_model`` are one shared model (F32, vocab
512, untied) for tests that only read. Random tied-embedding models tend to repeat the last prompt token under
greedy decoding; pass ``tie_word_embeddings=False`` for varied output."""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Any, Callable, Dict, Optional

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import background  # noqa: E402
from fixtures import make_config, random_weights, write_checkpoint  # noqa: E402
from tokenizer_fixture import write_tokenizer  # noqa: E402

TINY_VOCAB = 512


def build_model_dir(directory: os.PathLike, *, dtype: str = "F32", shards: int = 1, seed: int = 0,
                    tied: Optional[bool] = None, generation_config: Optional[dict] = None,
                    chat_template: Any = None, tokenizer: bool = True, **config_overrides: Any) -> pathlib.Path:
    """Write a complete tiny model into `directory`: config.json, generation_config.json, safetensors (`dtype`,
    `shards`), tokenizer.json and tokenizer_config.json. Config overrides go to make_config (vocab_size defaults
    to 512 so the fixture tokenizer fits). generation_config None: eos = [<|im_end|>, <|endoftext|>], greedy.
    chat_template: None = Qwen2.5's, a string = that one, False = none."""
    directory = pathlib.Path(directory)
    config_overrides.setdefault("vocab_size", TINY_VOCAB)
    cfg = make_config(**config_overrides)
    if tied is not None:
        cfg["tie_word_embeddings"] = tied
    special: Dict[str, int] = {}
    if tokenizer:
        special = write_tokenizer(str(directory), cfg["vocab_size"], chat_template)
        cfg["bos_token_id"] = special["<|endoftext|>"]
        cfg["eos_token_id"] = special["<|im_end|>"]
    if generation_config is None:
        generation_config = {"bos_token_id": cfg.get("bos_token_id"), "do_sample": False,
                             "eos_token_id": [special.get("<|im_end|>", cfg.get("eos_token_id")),
                                              special.get("<|endoftext|>", cfg.get("bos_token_id"))]}
    weights = random_weights(cfg, seed=seed, tied=cfg["tie_word_embeddings"])
    write_checkpoint(str(directory), cfg, weights, dtype=dtype, shards=shards, generation_config=generation_config)
    return directory


@pytest.fixture
def tiny_model_dir(tmp_path: pathlib.Path) -> Callable[..., pathlib.Path]:
    """Factory: ``tiny_model_dir(dtype="F32", shards=1, seed=0, generation_config=None, chat_template=None,
    **config_overrides)`` → a fresh directory holding a complete tiny model."""
    count = [0]

    def make(**kw: Any) -> pathlib.Path:
        count[0] += 1
        return build_model_dir(tmp_path / f"model{count[0]}", **kw)

    return make


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """One tiny model directory (F32, vocab 512, untied lm_head so greedy output varies instead of repeating the
    last prompt token) shared by the whole session. Do not modify it."""
    return build_model_dir(tmp_path_factory.mktemp("tiny") / "model", tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir: pathlib.Path):
    """The default tiny model loaded once (float32, 1 thread). Tests may generate with it but not close it."""
    import qwen_native

    model = qwen_native.load(str(tiny_dir), dtype="float32", num_threads=1)
    yield model
    model.close()


def make_hf_cache(cache: pathlib.Path, repo_id: str, source: pathlib.Path, commit: str = "a" * 40,
                  branch: str = "main", files: Optional[list] = None) -> pathlib.Path:
    """Lay out `source`'s files as huggingface_hub writes its cache: models--org--name/blobs/<hash>,
    snapshots/<commit>/<file> symlinks to ../../blobs/<hash>, refs/<branch> holding the commit. Returns the
    snapshot directory."""
    import hashlib

    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    for name in files if files is not None else sorted(os.listdir(source)):
        data = (source / name).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        blob = repo_dir / "blobs" / digest
        blob.write_bytes(data)
        link = snap / name
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.join("..", "..", "blobs", digest), link)
    (repo_dir / "refs" / branch).write_text(commit)
    return snap


@pytest.fixture
def hf_cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """An empty Hugging Face cache directory with the Hub switched off (HF_HUB_OFFLINE=1, HF_HUB_CACHE pointing
    here, in the environment and in huggingface_hub's constants), so nothing can touch the network."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def read_json(path: os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# Tests whose work runs in a background job (tests/background.py): each module's `background_job()` gives
# (name, argv, env, cwd) or None when its test will skip.
@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    late = [item for item in items if hasattr(item.module, "background_job")]
    if not late:
        return
    items[:] = [item for item in items if item not in late] + late  # collected last, after the others ran
    for module in {item.module for item in late}:
        job = module.background_job()
        if job is not None:
            background.start(*job)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    background.stop_all()
