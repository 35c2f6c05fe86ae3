"""pip build of anee_fast. The Triton kernels ship as `anee_fast.kernels` from kernels/."""
from setuptools import setup

setup(
    name="anee_fast",
    version="0.1.0",
    description="Adaptive-depth transformer decoding (PROCESS/SKIP/EXIT per token and layer) "
                "on a paged KV cache",
    python_requires=">=3.10",
    packages=["anee_fast", "anee_fast.kernels"],
    package_dir={"anee_fast.kernels": "kernels"},
    install_requires=["torch>=2.6", "transformers>=4.56", "safetensors", "tqdm", "platformdirs",
                      "matplotlib", "numpy"],
    extras_require={"gguf": ["gguf", "accelerate"]},
    entry_points={"console_scripts": ["anee-fast = anee_fast.cli:main"]},
)
