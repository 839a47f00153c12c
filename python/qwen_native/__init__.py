"""qwen_native: Qwen2 / Qwen2.5 chat models from Python without PyTorch, on a native C++ core.

    >>> import qwen_native
    >>> print(qwen_native.generate("Write a haiku about the sea.", "Qwen/Qwen2.5-0.5B-Instruct").text)
    >>> model = qwen_native.load("Qwen/Qwen2.5-Coder-1.5B-Instruct")
    >>> for piece in model.generate("Reverse a list in Python", stream=True):
    ...     print(piece, end="", flush=True)
"""

from ._version import __version__
from .engine import (DEFAULT_MODEL, GenerationOptions, GenerationResult, GenerationStream, Model, clear_model_cache,
                     generate, load)
from .errors import (CheckpointError, ConfigError, ContextLengthError, ModelNotFoundError, QwenNativeError,
                     TemplateError)

__all__ = [
    "__version__",
    "generate",
    "load",
    "Model",
    "GenerationResult",
    "GenerationStream",
    "GenerationOptions",
    "clear_model_cache",
    "DEFAULT_MODEL",
    "QwenNativeError",
    "CheckpointError",
    "ConfigError",
    "TemplateError",
    "ContextLengthError",
    "ModelNotFoundError",
]
