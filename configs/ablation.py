"""The paper's ablations (Tab. 5) as one config: ``--config=configs/ablation.py:k=100000,r=0.01,l=4``.

Keys of the argument: ``model`` (preset, default B/32 as in the paper's ablations), ``k`` (prototypes,
100K .. 5M), ``r`` (sampling ratio, 0.01 .. 1), ``l`` (positive labels, 1 .. 32), ``loss`` (mlcd, mlc,
softmax). The matching clustering run must use the same k and l
(``python -m mlcd_jax.cluster --config.num_clusters=K --config.top_l=L``); the similarity-threshold
positives of Tab. 5d are a clustering option (``--config.assign=threshold``).
"""

from mlcd_jax.config_lib import model_config

_KEYS = {"model": str, "k": int, "r": float, "l": int, "loss": str}


def get_config(arg: str = ""):
    values = {"model": "B/32", "k": 1_000_000, "r": 0.1, "l": 8, "loss": "mlcd"}
    for item in filter(None, arg.split(",")):
        key, _, value = item.partition("=")
        if key not in _KEYS:
            raise ValueError(f"unknown ablation key {key!r} in {arg!r}; known: {sorted(_KEYS)}")
        values[key] = _KEYS[key](value)
    return model_config(
        values["model"],
        **{"loss.num_classes": values["k"], "loss.sample_ratio": values["r"], "loss.top_l": values["l"],
           "loss.kind": values["loss"]},
    )
