"""mlcd_jax.evaluate."""
