"""Test fixtures. JAX flags (8 CPU devices, strict rank promotion) are set in the root conftest.py."""
