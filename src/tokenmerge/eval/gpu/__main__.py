"""``python -m tokenmerge.eval.gpu``: the prepared GPU benchmark (see :mod:`.cli`)."""

import sys

from .cli import main

sys.exit(main())
