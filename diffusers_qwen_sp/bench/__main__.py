"""`python -m diffusers_qwen_sp.bench`: the same as `python -m diffusers_qwen_sp bench`."""

import sys

from ..cli import main


if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
