"""mlcd_jax.data."""
