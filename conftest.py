"""pytest setup shared by tests/ and the doctests: 8 CPU devices, so the
sharding tests run on a (2, 4) or (8,) mesh on any machine. Set before any
JAX backend starts; the default device stays device 0."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
