"""Test-wide settings: 8 fake CPU devices so sharding tests see a real mesh."""
import os

# Must be set before jax initialises its backends, i.e. before any test imports jax.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
