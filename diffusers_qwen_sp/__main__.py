"""`python -m diffusers_qwen_sp`: see `diffusers_qwen_sp.cli`."""

import sys

from .cli import main


if __name__ == "__main__":
    sys.exit(main())
