"""Find a model's files: a local directory, or a Hugging Face Hub repo id (+ revision) through ``huggingface_hub``
(its cache, ``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE``, ``local_files_only``, progress bars).

The small files come first and config.json is validated before any weights are downloaded, so an unsupported
model fails in a second rather than after a multi-gigabyte download. Weights are ``model.safetensors``, or else
``model.safetensors.index.json`` and exactly the shards its ``weight_map`` names, each once; shard names must be
plain file names inside the snapshot.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple, Type, Union

from .checkpoint import read_index
from .config import load_config
from .errors import CheckpointError, ModelNotFoundError, QwenNativeError, TemplateError

__all__ = ["ModelFiles", "resolve", "is_local_path", "local_weights"]

PathLike = Union[str, "os.PathLike[str]"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ModelFiles:
    """Local paths of everything a model needs. Optional files are None when the model has none."""

    directory: str                      # the local directory, or the Hub snapshot directory
    config: str                         # config.json
    tokenizer: str                      # tokenizer.json
    tokenizer_config: Optional[str]     # tokenizer_config.json (special tokens, chat template)
    chat_template: Optional[str]        # chat_template.jinja (newer repos keep the template here)
    generation_config: Optional[str]    # generation_config.json
    weights: Tuple[str, ...]            # model.safetensors, or the shards named by the index, each once
    repo_id: Optional[str] = None       # None for a local directory
    revision: Optional[str] = None      # the commit the Hub files came from


def is_local_path(model: PathLike) -> bool:
    """True when `model` names a filesystem path rather than a Hub repo id."""
    s = os.fspath(model)
    if os.path.isdir(s):
        return True
    return (s.startswith((".", "/", "~")) or "\\" in s or s.count("/") > 1 or os.path.isabs(s)
            or os.path.exists(s))


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve(model: PathLike, *, revision: Optional[str] = None, local_files_only: Optional[bool] = None,
            cache_dir: Optional[PathLike] = None, token: Union[str, bool, None] = None,
            check_config: bool = True) -> ModelFiles:
    """Local paths of `model`'s files: a local directory, or a Hub repo id at `revision` (branch, tag or commit;
    default "main"), downloaded into the Hugging Face cache as needed.

    `local_files_only` (default: the ``HF_HUB_OFFLINE`` environment variable) never touches the network. With
    `check_config`, config.json is validated before the weights are looked up or downloaded.
    """
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a Hub repo id or a local directory path, got {type(model).__name__}")
    name = os.fspath(model)
    if not name:
        raise ValueError("model must not be empty: pass a Hub repo id such as 'Qwen/Qwen2.5-1.5B-Instruct' or a "
                         "local directory")
    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"revision must be a string, got {type(revision).__name__}")
    if os.path.isdir(name):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos, but {name!r} is a local directory")
        return _resolve_local(name, check_config)
    if is_local_path(name):
        if os.path.exists(name):
            raise ModelNotFoundError(f"{name} is a file; pass the model directory (the one holding config.json)")
        raise ModelNotFoundError(f"no such directory: {name}")
    return _resolve_hub(name, revision, local_files_only, cache_dir, token, check_config)


# ---------------------------------------------------------------------------------------------------------------
# Local directory


def _resolve_local(directory: str, check_config: bool) -> ModelFiles:
    directory = os.path.abspath(os.path.expanduser(directory))

    def path(fname: str) -> Optional[str]:
        p = os.path.join(directory, fname)
        return p if os.path.isfile(p) else None

    config = path("config.json")
    if config is None:
        raise ModelNotFoundError(f"{directory} has no config.json; is it a Hugging Face model directory?")
    if check_config:
        load_config(config)
    tokenizer = path("tokenizer.json")
    if tokenizer is None:
        raise TemplateError(f"{directory} has no tokenizer.json (the 'fast' tokenizer file qwen_native reads); "
                            "copy it from the model's Hub repo")
    return ModelFiles(directory=directory, config=config, tokenizer=tokenizer,
                      tokenizer_config=path("tokenizer_config.json"), chat_template=path("chat_template.jinja"),
                      generation_config=path("generation_config.json"), weights=local_weights(directory))


def local_weights(directory: str) -> Tuple[str, ...]:
    """The safetensors files of a local model directory: model.safetensors, else exactly the shards its
    model.safetensors.index.json names (CheckpointError when one is missing)."""
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(single):
        return (single,)
    index = os.path.join(directory, INDEX_FILE)
    if not os.path.isfile(index):
        raise CheckpointError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}; qwen_native reads "
                              "safetensors weights only")
    shards = read_index(index)
    missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
    if missing:
        raise CheckpointError(f"{index} names shard(s) missing from {directory}: {', '.join(missing)} (an "
                              "incomplete download? download the missing files again)")
    return tuple(os.path.join(directory, s) for s in shards)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face Hub


class _Hub:
    """hf_hub_download with errors turned into one clear message each."""

    def __init__(self, repo_id: str, revision: Optional[str], local_files_only: bool,
                 cache_dir: Optional[str], token: Union[str, bool, None]):
        import huggingface_hub  # imported lazily: local directories never need it
        from huggingface_hub import errors as hf_errors

        self.hf = huggingface_hub
        self.err = hf_errors
        self.repo_id = repo_id
        self.revision = revision
        self.local_files_only = local_files_only
        self.cache_dir = cache_dir
        self.token = token

    def _where(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id

    def _offline_hint(self) -> str:
        if self.local_files_only:
            return ("it is not in the local Hugging Face cache and downloads are off (HF_HUB_OFFLINE=1 or "
                    "local_files_only=True); run once with network access, or pass a local directory")
        return ("it is not in the local Hugging Face cache and the Hub could not be reached; check the network "
                "(or HF_ENDPOINT / proxy settings), or pass a local directory")

    def get(self, filename: str, required: bool = True,
            missing_error: Type[QwenNativeError] = ModelNotFoundError) -> Optional[str]:
        """Local path of `filename` (downloading it if needed); None when optional and absent."""
        e = self.err
        try:
            return self.hf.hf_hub_download(self.repo_id, filename, revision=self.revision,
                                           cache_dir=self.cache_dir, local_files_only=self.local_files_only,
                                           token=self.token)
        except e.GatedRepoError:
            raise ModelNotFoundError(
                f"{self.repo_id} is a gated repository: accept its terms on huggingface.co and log in "
                "(`hf auth login` or HF_TOKEN)") from None
        except e.RepositoryNotFoundError:
            raise ModelNotFoundError(
                f"repository {self.repo_id!r} not found on the Hugging Face Hub (check the name; private "
                "repositories need a login: `hf auth login` or HF_TOKEN)") from None
        except e.RevisionNotFoundError:
            raise ModelNotFoundError(f"revision {self.revision!r} not found in {self.repo_id}") from None
        except e.LocalEntryNotFoundError:
            if not required:
                return None
            raise missing_error(f"cannot get {filename} of {self._where()}: {self._offline_hint()}") from None
        except e.EntryNotFoundError:
            if not required:
                return None
            raise missing_error(f"{self._where()} has no {filename}") from None
        except OSError as exc:  # HTTP errors (HfHubHTTPError is an OSError), disk full, permissions
            raise ModelNotFoundError(f"cannot get {filename} of {self._where()}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _resolve_hub(repo_id: str, revision: Optional[str], local_files_only: Optional[bool],
                 cache_dir: Optional[PathLike], token: Union[str, bool, None], check_config: bool) -> ModelFiles:
    from huggingface_hub.utils import validate_repo_id
    from huggingface_hub.errors import HFValidationError

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ModelNotFoundError(
            f"{repo_id!r} is neither a local directory nor a valid Hub repo id ('name' or 'org/name')") from None
    offline = bool(local_files_only) or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
    if cache_dir is None and os.environ.get("HF_HUB_CACHE"):
        cache_dir = os.path.expandvars(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    hub = _Hub(repo_id, revision, offline, os.fspath(cache_dir) if cache_dir is not None else None, token)

    config = hub.get("config.json")
    assert config is not None
    snapshot = os.path.dirname(config)
    # Pin the commit the first file came from, so a branch that moves meanwhile cannot mix two versions.
    commit = os.path.basename(snapshot)
    if _COMMIT.match(commit):
        hub.revision = commit
    if check_config:
        load_config(config)
    tokenizer = hub.get("tokenizer.json", missing_error=TemplateError)
    assert tokenizer is not None
    tokenizer_config = hub.get("tokenizer_config.json", required=False)
    chat_template = hub.get("chat_template.jinja", required=False)
    generation_config = hub.get("generation_config.json", required=False)

    weights: List[str]
    single: Optional[str] = None
    try:
        single = hub.get(SINGLE_FILE, missing_error=CheckpointError)
    except CheckpointError as e:
        no_single = str(e)
    if single is not None:
        weights = [single]
    else:
        try:
            index = hub.get(INDEX_FILE, missing_error=CheckpointError)
        except CheckpointError:
            raise CheckpointError(f"{no_single}; nor {INDEX_FILE} (qwen_native reads safetensors weights "
                                  "only)") from None
        assert index is not None
        shards = read_index(index)
        weights = []
        for shard in shards:
            p = hub.get(shard, missing_error=CheckpointError)
            assert p is not None
            if os.path.normpath(os.path.dirname(p)) != os.path.normpath(os.path.dirname(index)):
                raise CheckpointError(f"shard {shard!r} resolved outside the snapshot directory ({p}); refusing "
                                      "to read it")
            weights.append(p)
    return ModelFiles(directory=snapshot, config=config, tokenizer=tokenizer, tokenizer_config=tokenizer_config,
                      chat_template=chat_template, generation_config=generation_config, weights=tuple(weights),
                      repo_id=repo_id, revision=hub.revision)
