"""skipside: depth-parallel training of video networks in JAX/Flax."""

import setuptools

setuptools.setup(
    name="skipside",
    version="0.1.0",
    description=(
        "Depth-parallel video training in JAX/Flax: Sideways, Skip-Sideways, "
        "multigrid and progressive training."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(
        include=["skipside", "skipside.*", "launch", "experiments", "experiments.*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.90",
        "ml_collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "pillow>=10",  # MovingDigits rendering and image decoding.
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.9",
        "array-record>=0.8",
        "scikit-learn>=1.3",
        "av>=14",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "nbclient>=0.10",
                 "nbformat>=5.10", "ipykernel", "matplotlib>=3.8"],
        "notebook": ["jupyter", "nbclient>=0.10", "nbformat>=5.10", "ipykernel", "matplotlib>=3.8"],
        "tf": ["tensorflow>=2.16", "tensorflow-datasets>=4.9.9"],
        "experiments": ["matplotlib>=3.8"],
        # Compile-only TPU planning (skipside/tpu_plan.py) on any machine.
        # jax[tpu] pins libtpu to the jax it names: unpinned, pip picks the
        # jax[tpu] of the jax it installs (0.10.x on Python 3.11, 0.11.x on
        # 3.12); with jax already installed, pin it: 'jax[tpu]==<jax version>'.
        "tpu": ["jax[tpu]>=0.10"],
    },
)
