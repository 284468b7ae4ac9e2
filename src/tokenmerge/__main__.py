"""``python -m tokenmerge``: the command line (what launchers such as ``torchrun -m`` and
``accelerate launch -m`` run)."""

import sys

from .cli.main import main

sys.exit(main())
