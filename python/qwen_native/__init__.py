"""qwen_native: Qwen2 chat models from Python without PyTorch."""

from ._version import __version__

__all__ = ["__version__"]
