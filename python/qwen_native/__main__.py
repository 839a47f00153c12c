"""``python -m qwen_native``: the ``qwen-native`` command line."""

import sys

from .cli import main

sys.exit(main())
