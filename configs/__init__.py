"""The training and evaluation configs, shipped in the distribution as ``mlcd_jax.configs``.

In a checkout they are files (``python -m mlcd_jax.main --config=configs/demo.py``); installed, they
import by name (``from mlcd_jax.configs import demo``), so a notebook needs no checkout.
"""
