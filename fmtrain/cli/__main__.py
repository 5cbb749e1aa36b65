"""``python -m fmtrain.cli``: the ``fmtrain`` command (what the launchers run on every rank)."""

import sys

from fmtrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
