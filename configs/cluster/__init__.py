"""The clustering job's configs, shipped as ``mlcd_jax.configs.cluster``."""
