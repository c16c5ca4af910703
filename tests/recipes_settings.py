"""Settings shared by the recipes' tests: tiny synthetic runs (32×32 scenes, 2 images a batch,
in-process data loading) that train in a second or two on one CPU thread."""

#: ``key=value`` overrides of a tiny synthetic run; each test file adds its own.
TINY_SCENES = [
    "crop=32",
    "synthetic_size=32,32",
    "synthetic_images=4",
    "synthetic_test_images=2",
    "batch_size=2",
    "eval_batch_size=2",
    "num_workers=0",
]
