"""ssa-megatron: SSA (Sparse Sparse Attention) pretraining on Megatron-core."""

import sys
from pathlib import Path

# Checked before setuptools runs so the user sees the reason, not a resolver error.
if sys.version_info < (3, 10):  # noqa: UP036 - the point is to refuse older interpreters
    found = ".".join(str(part) for part in sys.version_info[:3])
    sys.exit(
        f"ssa-megatron needs Python >= 3.10, but this is Python {found}. Create a virtual "
        "environment with a newer interpreter, e.g. `python3.11 -m venv .venv`."
    )

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    # torch is left as a range so that a cluster keeps its own CUDA build; CPU machines
    # install with `-c constraints/cpu.txt` (see README).
    "torch>=2.6",
    "megatron-core==0.16.1",
    "mosaicml-streaming==0.13.0",
    "sentencepiece>=0.2,<0.3",
    "triton>=3.2; platform_system == 'Linux'",
    "numpy>=1.26",
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "safetensors>=0.4",
    "tensorboard>=2.15",
    "pyarrow>=15",
]

EXTRAS = {
    "deepspeed": ["deepspeed==0.19.8"],
    "hf": ["transformers>=4.45", "tokenizers>=0.20"],
    "eval": ["matplotlib>=3.8"],
    # lm-evaluation-harness on exported models (`lm_eval --model hf --model_args pretrained=DIR,...`).
    "lmeval": ["lm_eval[hf]>=0.4.9,<0.5"],
    "te": ["transformer-engine[pytorch]"],
    # Liger's Triton kernels for model.fused_ops (RMSNorm, SwiGLU, LM-head linear + cross entropy).
    "gpu": ["liger-kernel==0.8.5"],
    # moto[server]: an S3-compatible server on 127.0.0.1 for the object-storage data tests.
    # pytest-xdist: the README's test command spreads the test files over two worker processes.
    "test": [
        "pytest==9.2.0", "pytest-timeout>=2.3", "pytest-xdist==3.8.0", "ruff==0.17.6", "moto[server]>=5.0"
    ],
}
EXTRAS["dev"] = sorted(
    {req for extra in ("deepspeed", "hf", "eval", "lmeval", "gpu", "test") for req in EXTRAS[extra]}
)

setup(
    name="ssa-megatron",
    version="0.1.0",
    description="Sparse Sparse Attention (SSA) pretraining on Megatron-core with Triton kernels",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ssa_megatron", "ssa_megatron.*", "kernels", "kernels.*"]),
    package_data={"ssa_megatron": ["hf/*.py"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    py_modules=["pretrain_ssa"],
    entry_points={"console_scripts": ["ssa-pretrain=pretrain_ssa:main"]},
    classifiers=["Programming Language :: Python :: 3", "License :: OSI Approved :: Apache Software License"],
)
