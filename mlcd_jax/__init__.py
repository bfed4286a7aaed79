"""mlcd_jax: Multi-Label Cluster Discrimination (MLCD) vision-encoder training in JAX/Flax."""

__version__ = "0.1.0"
