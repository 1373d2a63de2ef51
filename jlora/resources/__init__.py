"""Data files shipped inside the jlora package, so that an installed jlora finds them without a repository checkout.

* :data:`GENERAL`, ``general.jsonl``: the general prompt set of the side-effect report (:mod:`jlora.side_effects`),
  the default ``eval.general`` of a run config. It is a byte-identical copy of the repository's
  ``examples/data/general.jsonl`` (a test holds them equal): 322 prompt/completion pairs of everyday questions,
  short facts, definitions, instructions, small code, arithmetic, unit conversions and short stories, none of it the
  demo's JSON task, generated with a fixed seed by ``examples/data/make_general.py`` from text written for this
  project. Licence: the same as jlora (Apache-2.0, ``LICENSE``).

Examples:
    >>> GENERAL.name, GENERAL.is_file()
    ('general.jsonl', True)
"""

import pathlib

GENERAL = pathlib.Path(__file__).resolve().with_name("general.jsonl")

__all__ = ["GENERAL"]
