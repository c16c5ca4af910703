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

#: A tiny synthetic run of the demo CNN from scratch, logging every step, no progress bar.
TINY_RUN = [
    "model=demo_cnn",
    *(s if not s.startswith("synthetic_images") else "synthetic_images=6" for s in TINY_SCENES),
    "progress=false",
    "log_every=1",
    "init_from={}",
    "pretrained=",
]


def free_port() -> int:
    """A TCP port free on this machine now (for a torch.distributed rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_two_processes(args: list[str], root: object, timeout: int = 120) -> object:
    """``torchrun --nproc_per_node=2 -m recipes.train ARGS`` from ``root`` on one CPU thread
    per process; the completed process."""
    import os
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "recipes.train",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    return subprocess.run(
        command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout
    )


#: The command-line arguments of the DDP equality tests: 3 steps of 4 images (2 per process),
#: synchronised BatchNorm, no dropout, half-pixel rescaling (see
#: ``test_recipes_train.test_ddp_two_processes_match_one_process`` for why).
DDP_EQUALITY_ARGS = [
    "synthetic_demo_nddr",
    "--no-eval",
    *(f"--set={o}" for o in TINY_RUN),
    "--set=batch_size=4",
    "--set=steps=3",
    "--set=lr=0.001",
    "--set=dropout=0",
    "--set=sync_bn=true",
    "--set=rescale_resize=align_corners_false",
]
