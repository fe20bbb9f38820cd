"""Test setup: 8 fake CPU devices so sharding tests can build real meshes (must precede `import jax`)."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
