"""mlcd_jax.cluster."""
