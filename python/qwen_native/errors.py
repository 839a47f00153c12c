"""Exceptions qwen_native raises on bad input. Each subclasses the builtin a caller would expect (ValueError for
bad files and values), so ``except ValueError`` keeps working."""

from __future__ import annotations


class QwenNativeError(Exception):
    """Base class of qwen_native's own exceptions."""


class CheckpointError(QwenNativeError, ValueError):
    """A weights file (safetensors or its index) is missing, truncated, corrupt or does not fit config.json."""


class ConfigError(QwenNativeError, ValueError):
    """config.json or generation_config.json is missing a field, has an invalid value, or describes an
    unsupported model."""


class TemplateError(QwenNativeError, ValueError):
    """The chat template or tokenizer files are missing, invalid, or tried something the sandbox forbids."""


class ModelNotFoundError(QwenNativeError, FileNotFoundError):
    """The model could not be found: no such local directory, no such Hub repository, revision or file, or the
    files are not in the local cache while offline."""


class ContextLengthError(QwenNativeError, ValueError):
    """The prompt, or the prompt plus max_new_tokens, does not fit in the model's context (max_context)."""
