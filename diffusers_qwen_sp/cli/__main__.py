"""`python -m diffusers_qwen_sp.cli`: the same as `python -m diffusers_qwen_sp`."""

import sys

from . import main


if __name__ == "__main__":
    sys.exit(main())
