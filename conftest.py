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

# Files that the session's processes share (tests/conftest.py: transformers' SmolLM2 oracle, loaded once)
if "JLORA_TEST_SHARED" not in os.environ:
    os.environ["JLORA_TEST_SHARED"] = tempfile.mkdtemp(prefix="jlora-test-shared-")
    atexit.register(shutil.rmtree, os.environ["JLORA_TEST_SHARED"], ignore_errors=True)
# One persistent XLA compilation cache for the session's processes (pytest-xdist workers inherit it; removed at the
# end): tests that build the same tiny models compile each executable once (test_cli.py: 169 -> 146 s).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jlora-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Most tests compile many small programs and run each a few times, so compiling is most of their time. XLA's
# backend optimizations (LLVM's -O3 passes on the CPU) are off here: the suite ran in 585 s instead of 835 on
# 2 cores. XLA's HLO passes (fusion, layout, scheduling) still run, so the tests of compiled programs (memory,
# FLOPs, HLO text) see what users get. `make test-all` runs everything with the optimizations on.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
