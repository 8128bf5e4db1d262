"""``python -m sharpscope`` (and ``torchrun -m sharpscope``): the same as the ``sharpscope`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
