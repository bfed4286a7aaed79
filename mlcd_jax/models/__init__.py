"""mlcd_jax.models."""
