"""``python -m d2prune`` (and ``torchrun ... -m d2prune``): the command line."""

import sys

from .cli import main

sys.exit(main())
