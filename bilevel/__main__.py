"""``python -m bilevel ...``: the same command line as the ``bilevel`` console script."""

import sys

from bilevel.cli import main

if __name__ == "__main__":
    sys.exit(main())
