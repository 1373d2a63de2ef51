"""``python -m jlora.cli ...``: the ``jlora`` command (see :mod:`jlora.cli`)."""

from jlora.cli import console

console()
