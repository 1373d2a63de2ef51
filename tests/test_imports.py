"""`import jlora` stays light: no torch, no transformers."""

import subprocess
import sys


def test_import_jlora_does_not_import_torch_or_transformers():
    code = ("import sys, jlora; heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy; print(jlora.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
