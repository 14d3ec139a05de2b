"""ks-detr: KS-DETR as a detectron2 extension.

detectron2 has no PyPI release; install.sh (scripts/install_detectron2.sh) installs it first, so it
is deliberately not listed in install_requires (its fallback distribution is named
``sal-detectron2``; pip must not try to resolve ``detectron2`` by name).
"""
from setuptools import find_packages, setup

setup(
    name="ks-detr",
    version="0.2.0",
    description="KS-DETR: knowledge sharing in attention learning for DETR, as a detectron2 extension",
    packages=find_packages(include=["ks_detr", "ks_detr.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "torchvision", "pycocotools", "fvcore", "scipy"],
)
