"""ViT-L/14 trained with MLCD at the paper's settings (see mlcd_jax/config_lib.py)."""

from mlcd_jax.config_lib import model_config

# The Cloud TPU slice this config trains the paper's batch of 32,768 on, as shipped (tests/test_aot.py
# compiles it there with libtpu: `python -m mlcd_jax.aot --config=configs/vitl14.py --topology=v5p-64`).
SLICE = "v5p-64"


def get_config():
    return model_config("L/14")
