"""mlcd_jax.interop."""
