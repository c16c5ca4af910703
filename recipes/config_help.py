"""One help text per :class:`recipes.configs.RecipeConfig` field, for ``python -m recipes.train
--help`` (every field is also a ``--<field>`` flag and a ``--set field=value`` key).

A new config field needs an entry here: ``tests/test_recipes_reporting.py`` fails otherwise.

Example:
    >>> FIELD_HELP["threads"].startswith("torch CPU threads")
    True
    >>> format_default(("seg", "normal")), format_default({"seg": 1.0}), format_default(None)
    ('seg,normal', 'seg=1.0', 'none')
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["FIELD_HELP", "format_default", "field_defaults"]

#: Field name → what it does (the ``(default: …)`` suffix is added by the parser).
FIELD_HELP: dict[str, str] = {
    # what this run is
    "name": "the run's name; the run folder is {out_dir}/{name} unless run_dir is set",
    "label": "the row label in the results table (e.g. Ours, Sing., C.-S.)",
    "paper": "where the run's row is in the paper (e.g. 'Table 4 · Ours'); informative only",
    # data
    "dataset": "nyuv2 | nyuv2_mtan | synthetic | imdb | wiki, or your own dataset as "
    "module:callable(...) returning a torch Dataset",
    "data_root": "folder of the dataset (see recipes/README.md for each layout)",
    "tasks": "comma-separated tasks to train (seg, normal, age, gender, or your own task names)",
    "crop": "training crop side in pixels (square crops after scaling)",
    "scale_min": "smallest random scale factor of the training augmentation",
    "scale_max": "largest random scale factor of the training augmentation",
    "mirror": "random horizontal flips while training",
    "mean": "input normalisation: imagenet, caffe_bgr (the official TF code) or none",
    "normals": "surface-normal targets: raw 0..255 vectors (official code) or unit vectors",
    "rescale_resize": "how the random rescale resizes images (bilinear) and labels (nearest): "
    "tf_legacy (TF1 resize_images / resize_nearest_neighbor, no half-pixel offset: the official "
    "code), align_corners_false (PyTorch's half-pixel) or align_corners_true",
    "synthetic_images": "dataset=synthetic: number of training images",
    "synthetic_test_images": "dataset=synthetic: number of test images",
    "synthetic_size": "dataset=synthetic: image size H,W",
    "synthetic_labelled": "dataset=synthetic: TASK=FRACTION,... of the training images that keep "
    "that task's labels (the others' are ignored: seg 255, normals invalid); {} for all",
    "face_resize": "imdb/wiki: resize faces to this side before the crop×crop crop",
    "test_subjects": "imdb/wiki: number of held-out subjects for the test split",
    "num_workers": "DataLoader worker processes per training process (0: load in the main one)",
    "cache_data": "keep decoded training samples in memory (per process and worker)",
    # model and fusion
    "model": "task network: a recipes model (deeplab_vgg16, deeplab_resnet101, alexnet_fcn32s, "
    "vgg16_classifier, demo_cnn) or module:callable(...) for every task",
    "models": "your own model per task: TASK=module:callable(...),... (its keys are the tasks)",
    "method": "single (one task), nddr, cross_stitch, sluice, or mul (hard sharing)",
    "shortcut": "add the paper's shortcut (concatenated fusion outputs into the head)",
    "shortcut_resize": "how the shortcut resizes feature maps: align_corners_false, "
    "align_corners_true or tf_legacy",
    "points": "fusion points: auto, or comma-separated module names (e.g. features.6,features.13)",
    "init": "NDDR initialisation: diagonal (alpha on the own task, beta on the others) or xavier",
    "alpha": "initial weight of a task's own features in NDDR / cross-stitch layers",
    "beta": "initial weight of the other tasks' features in NDDR / cross-stitch layers",
    "nddr_activation": "activation after each NDDR layer: auto (as the fused model), relu or none",
    "nddr_rank": "> 0: low-rank NDDR layers of this rank (0: full rank)",
    "nddr_groups": "> 1: grouped NDDR 1×1 convolutions with this many groups",
    "subspaces": "sluice networks: subspaces per layer",
    "cross_stitch_per_channel": "cross-stitch units with one weight per channel (not per layer)",
    "mul_trunk": "hard sharing: the shared trunk starts from the first task's weights or the "
    "average of all tasks'",
    "mul_shortcut": "method=mul with shortcut: shared (one reducer on the shared trunk, the "
    "official code) or per_task (one reducer per task)",
    "dropout": "override the p of every Dropout in the task models (none: keep the models')",
    "tf_same_pooling": "max pools pad as TF 'SAME' (asymmetric at even sizes, e.g. the 480×640 "
    "evaluation; equal to PyTorch's at odd sizes such as the 321 crops): auto (on for "
    "deeplab_vgg16, whose official code is TF; off for the Caffe AlexNet/ResNet), on or off",
    # initialisation
    "pretrained": "local ImageNet-style state dict loaded into every task model; empty: none",
    "init_from": "single-task weights per task: TASK=PATH,... ({out_dir} is replaced; {} for none)",
    "start": "start of the task models not in init_from: pretrained (the pretrained file), voc "
    "(the DeepLab-LargeFOV VOC weights in voc_weights, fc6/fc7 included: the official start) or "
    "voc_if_present (voc when that file exists, else pretrained with a WARNING in the log)",
    "voc_weights": "DeepLab-LargeFOV VOC weights for start=voc: a file written by python -m "
    "recipes.deeplab_weights convert, an .npz of HWIO arrays or a TF checkpoint prefix",
    # optimisation
    "steps": "optimizer steps of the whole run (the poly schedule spans them)",
    "batch_size": "global batch size (split over the DDP processes)",
    "lr": "base learning rate (SGD)",
    "momentum": "SGD momentum",
    "poly_power": "power of the per-step poly schedule lr·(1 − step/steps)^power",
    "weight_decay": "weight decay on weights (not on biases and norm parameters)",
    "fusion_lr_mult": "learning-rate multiplier of the fusion layers (none: 100 for NDDR, 1000 "
    "for cross-stitch and sluice)",
    "shortcut_lr_mult": "learning-rate multiplier of the shortcut reducers (none: as the fusion "
    "layers, fusion_lr_mult or 100; the official single-task and Mult. shortcut runs: 1)",
    "head_weight_lr_mult": "learning-rate multiplier of the classifier weights (fc8)",
    "head_bias_lr_mult": "learning-rate multiplier of the classifier biases (fc8)",
    "heads": "your own models' classifier modules (comma-separated names) that get "
    "head_weight_lr_mult / head_bias_lr_mult",
    "loss_weights": "per-task loss weights: TASK=WEIGHT,...",
    "weighting": "how the task losses are weighted: fixed (loss_weights), equal, uncertainty, "
    "dwa, rlw, gradnorm, famo (nddrify.weighting; not fixed: loss_weights are not applied)",
    "weighting_options": "options of the weighting: KEY=VALUE,... (dwa temperature; rlw seed; "
    "gradnorm alpha, lr; famo lr, gamma)",
    "aggregator": "none, or a gradient aggregator for the shared parameters: upgrad, mgda, "
    "pcgrad, cagrad, nashmtl, imtlg, alignedmtl, graddrop, ... (TorchJD; pip install "
    "'nddrify[mtl]'; one process, with weighting=fixed)",
    "aggregator_options": "options of the aggregator: KEY=VALUE,... (e.g. cagrad c=0.5)",
    "losses": "loss per task of your own dataset: TASK=ce|l1|l2|mse|cosine|bce (with literal "
    "arguments, e.g. ce(ignore_index=-1)) or module:callable,...",
    "loss_at": "compute dense losses at the output resolution (labels resized) or the input's",
    "freeze_bn": "keep the task networks' BatchNorm in eval mode (fusion norms still train)",
    "sync_bn": "synchronise BatchNorm statistics across DDP processes",
    # runtime
    "seed": "random seed (weights, data order, augmentation, dropout)",
    "device": "auto (CUDA when available), cpu or cuda",
    "amp": "mixed precision: none, bf16 (CPU or CUDA) or fp16 (CUDA, with a GradScaler)",
    "channels_last": "channels-last memory format for the network and its inputs",
    "out_dir": "folder of the run folders",
    "run_dir": "the run folder; empty means {out_dir}/{name}",
    "log_every": "log a training record (metrics.jsonl and a progress line) every N steps",
    "checkpoint_every": "write checkpoint.pt every N steps (and at the end, and on SIGINT/SIGTERM)",
    "eval_every": "evaluate every N steps (0: only at the end)",
    "eval_split": "split scored by the evaluation: test or train",
    "eval_batch_size": "batch size of the evaluation",
    "eval_max_images": "score only the first N images (0: the whole split)",
    "miou_absent": "classes absent from labels and predictions: exclude from the mIoU (official) "
    "or count as zero",
    "eval_resize": "how predictions are upsampled bilinearly to the label size for the metrics "
    "(and for loss_at=input): tf_legacy (TF1 resize_bilinear, no half-pixel offset: the official "
    "evaluation), align_corners_false (PyTorch's default) or align_corners_true",
    "metrics_convention": "official (NDDR-CNN: pooled normal angles, within ≤ t) or mtan "
    "(lorenmt/mtan: normals valid where sum ≠ 0, within < t, per-batch averages, x negated on "
    "mirrored training samples)",
    "progress": "show progress: a bar on a terminal, plain lines when stdout is not a terminal",
    "threads": "torch CPU threads while training (0: torch's default, one per core); on a "
    "machine shared with other jobs one thread can be much faster than oversubscribed cores",
}


def format_default(value: Any) -> str:
    """``value`` written as on the command line (``true``, ``none``, ``a,b``, ``k=v,...``,
    ``{}`` for an empty dict, ``""`` for an empty string)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) if value else '""'
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) if value else "{}"
    if value == "":
        return '""'
    return str(value)


def field_defaults() -> dict[str, Any]:
    """Field name → the default of :class:`recipes.configs.RecipeConfig`."""
    from .configs import RecipeConfig

    return {f.name: getattr(RecipeConfig(), f.name) for f in dataclasses.fields(RecipeConfig)}
