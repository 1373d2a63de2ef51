"""Root pytest configuration, shared by doctests in jlora/ and tests in tests/: set before jax is imported."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# jlora.data's decoded copies of Parquet files: in a folder of this test session (removed at its end), not ~/.cache
if "JLORA_DATA_CACHE" not in os.environ:
    os.environ["JLORA_DATA_CACHE"] = tempfile.mkdtemp(prefix="jlora-data-cache-")
    atexit.register(shutil.rmtree, os.environ["JLORA_DATA_CACHE"], ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
