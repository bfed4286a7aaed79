"""ViT-B/16 trained with MLCD at the paper's settings (see mlcd_jax/config_lib.py)."""

from mlcd_jax.config_lib import model_config


def get_config():
    return model_config("B/16")
