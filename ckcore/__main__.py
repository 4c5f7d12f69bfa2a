"""``python -m ckcore``: the ``ckcore`` command (see :mod:`ckcore.cli`)."""

import sys

from ckcore.cli import main

if __name__ == "__main__":
    sys.exit(main())
