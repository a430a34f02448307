"""``python -m dgmlab.grading``: the same command line as ``dgmlab-grade``."""

import sys

from .cli import main

sys.exit(main())
