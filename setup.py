"""metagan_dist: meta-learned GANs (MAML, FOMAML, Reptile, Meta-SGD) at scale."""

from setuptools import find_packages, setup

setup(
    name="metagan_dist",
    version="0.1.0",
    description="Meta-learn a GAN over a pool of tasks so it adapts to a new one in a few steps",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["metagan_dist", "metagan_dist.*", "kernels", "kernels.*"]),
    # Loose on purpose: the GPU image ships torch 2.11, CPU machines 2.14.
    install_requires=[
        "torch>=2.4",
        "triton; platform_system == 'Linux'",  # the fused kernels; Linux torch wheels ship it already
        "torchvision",
        "numpy",
        "webdataset>=0.2.86",
        "omegaconf>=2.3",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib>=3.8",  # its bundled TrueType fonts render the embedded glyphs pool
        "pillow",
    ],
    entry_points={
        "console_scripts": [
            "metagan-make-shards=metagan_dist.data.make_shards:main",
            "metagan-adapt=metagan_dist.evaluation.adapt:main",
            "metagan-evaluate=metagan_dist.evaluation.evaluate:main",
        ]
    },
    extras_require={
        "dev": ["pytest>=7", "pytest-timeout>=2", "psutil>=5"],
        "deepspeed": ["deepspeed>=0.14"],
    },
)
