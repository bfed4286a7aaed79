"""The clustering job on Google Cloud Dataflow: ``--config=configs/cluster/beam_dataflow.py:project=P,bucket=B``.

Keys of the argument: ``project`` and ``bucket`` (required), ``region`` (default us-central1),
``workers`` (max Dataflow workers, default 100), ``gpu`` (an accelerator type such as ``nvidia-l4``:
the teacher runs on one GPU per worker VM, one Python process per VM so one model per GPU),
``image`` (an SDK container image with mlcd_jax installed: needed for GPU workers, whose jax must be
``jax[cuda12]``; without it workers install this checkout through ``--setup_file``, run from the repo root).
Outputs go to ``gs://BUCKET/mlcd_cluster``. Set the rest as usual, e.g. ``--config.source=...
--config.teacher=hf:/models/mlcd-vit-large-patch14-336 --config.num_clusters=1000000``, and check with
``--dry-run``. k-means runs in the launching process, at this scale as UNICOM's two levels on a
64-per-centroid sample (64M x d float32 in its memory; 8 parts, each fits one GPU). See launch/README.md, "Clustering on Dataflow / Flink / Spark".
"""

from mlcd_jax.cluster.config import default_config

_KEYS = ("project", "bucket", "region", "workers", "gpu", "image")
CPU_MACHINE = "n2-standard-16"  # the pixels teacher and assignment: CPU-bound, one process per core
GPU_MACHINE = {"nvidia-l4": "g2-standard-8"}  # other accelerators run on n1 machines
N1_GPU_MACHINE = "n1-standard-8"


def get_config(arg: str = ""):
    values = {"region": "us-central1", "workers": "100", "gpu": "", "image": ""}
    for item in filter(None, arg.split(",")):
        key, _, value = item.partition("=")
        if key not in _KEYS:
            raise ValueError(f"unknown key {key!r} in {arg!r}; known: {', '.join(_KEYS)}")
        values[key] = value
    missing = [k for k in ("project", "bucket") if not values.get(k)]
    if missing:
        raise ValueError(f"configs/cluster/beam_dataflow.py needs {' and '.join(missing)}: "
                         "--config=configs/cluster/beam_dataflow.py:project=P,bucket=B")
    bucket, gpu = values["bucket"], values["gpu"]
    options = [
        "--runner=DataflowRunner",
        f"--project={values['project']}",
        f"--region={values['region']}",
        f"--temp_location=gs://{bucket}/beam_tmp",
        f"--max_num_workers={values['workers']}",
        f"--sdk_container_image={values['image']}" if values["image"] else "--setup_file=./setup.py",
    ]
    if gpu:
        options += [
            f"--machine_type={GPU_MACHINE.get(gpu, N1_GPU_MACHINE)}",
            f"--dataflow_service_options=worker_accelerator=type:{gpu};count:1;install-nvidia-driver",
            "--experiments=no_use_multiple_sdk_containers",
        ]
    else:
        options.append(f"--machine_type={CPU_MACHINE}")
    c = default_config()
    c.runner = "beam"
    c.beam_options = " ".join(options)
    c.output_dir = f"gs://{bucket}/mlcd_cluster"
    c.num_clusters = 1_000_000
    c.top_l = 8
    c.max_points_per_centroid = 64
    c.kmeans_method = "hierarchical"
    c.kmeans_parts = 8
    return c
