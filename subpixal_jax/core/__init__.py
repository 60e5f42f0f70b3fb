"""Pure, jit-compilable kernels: no astropy, no I/O, no logging.

Modules here import only ``jax``, ``jax.numpy``, ``optax`` and each other.
They take arrays and static options, never WCS objects or files.
"""
