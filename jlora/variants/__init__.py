"""Variants of plain LoRA, each plugged into the core through :mod:`jlora.adapter`'s hook tables.

- :mod:`jlora.variants.dora`: DoRA (weight-decomposed LoRA), an adapter variant with a trained magnitude.
- :mod:`jlora.variants.inits`: PiSSA and OLoRA, inits that take A and B from the kernel and return the residual
  base (:func:`init_with_base`).
- :mod:`jlora.variants.quant`: QLoRA's NF4 frozen kernels (:func:`quantize`), a kernel type.

Importing this package registers the hooks; ``import jlora`` does so.
"""

from jlora.variants import dora, inits, quant
from jlora.variants.inits import init_with_base
from jlora.variants.quant import quantize

__all__ = ["dora", "inits", "quant", "init_with_base", "quantize"]
