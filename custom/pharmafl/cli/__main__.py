"""``python -m pharmafl.cli``: the same as the ``pharmafl`` command."""

import sys

from pharmafl.cli import main

sys.exit(main())
