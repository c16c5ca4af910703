"""Recipes that reproduce the NDDR-CNN paper with nddrify.

The paper's setups, built from torchvision parts and trained through :func:`nddrify.fuse`:

* :mod:`recipes.models`: DeepLab-LargeFOV VGG-16 (BN), DeepLab ResNet-101 (ASPP), AlexNet FCN-32s
  and the VGG-16 age/gender classifier;
* :mod:`recipes.data`: NYUv2 (official NDDR layout and the MTAN ``.npy`` build), IMDB-WIKI
  (``imdb.mat`` / ``wiki.mat``), the official augmentation, and a synthetic scene generator;
* :mod:`recipes.losses` and :mod:`recipes.metrics`: the paper's losses and metrics;
* :mod:`recipes.train` (``python -m recipes.train CONFIG``): single-task → fused training.

``recipes/README.md`` maps every row of the paper's tables to one command.

This folder imports as ``recipes`` from a checkout of the repository; installed (``pip install``)
it is the package ``nddrify_recipes``. Its modules import one another relatively, so both names
work. :mod:`nddrify` never imports it: the ``nddrify demo`` command finds :func:`recipes.demo.main`
through the ``nddrify.commands`` entry point.
"""

__all__: list[str] = []
