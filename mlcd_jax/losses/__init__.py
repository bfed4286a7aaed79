"""mlcd_jax.losses."""
