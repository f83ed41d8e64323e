"""``python -m sparse_sup [train|merge|inspect|plot] ...``: the same command line as ``sparse-sup``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
