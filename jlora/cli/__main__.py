"""``python -m jlora.cli ...``: the ``jlora`` command (see :mod:`jlora.cli`)."""

import sys

from jlora.cli import main

sys.exit(main())
