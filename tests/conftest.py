"""Test setup: 8 fake CPU devices so sharding tests can build real meshes, on the CPU platform (both
must precede `import jax`)."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
# CPU unless told otherwise (run tests/gpu with JAX_PLATFORMS=cuda): with libtpu installed for the
# compile-only TPU tests, JAX would otherwise try to open a TPU first in every process.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
