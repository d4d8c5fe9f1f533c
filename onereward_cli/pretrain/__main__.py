"""`python -m onereward_cli.pretrain OUT`: train the tiny zoo on the synthetic world (see __init__)."""
from __future__ import annotations

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
