"""Device choice, logging set-up and seeding shared by the entry points."""
from __future__ import annotations

import contextlib
import logging
import sys

import torch


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: this project runs on cpu or cuda (auto picks cuda when "
                         f"a GPU is visible)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA GPU is visible; "
                             "use --device cpu or --device auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return dev


def init_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process. Under ``torchrun`` (WORLD_SIZE > 1) this joins
    the process group: NCCL with one GPU per process (cuda:LOCAL_RANK) when CUDA is used, gloo
    on CPU. Without torchrun it is a single process (rank 0 of 1) on ``pick_device(device)``."""
    import os
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, pick_device(device)
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), dev


@contextlib.contextmanager
def process_group(device: str = "auto"):
    """``with process_group(flag) as (rank, world, device):`` ``init_distributed``, and the
    process group destroyed on leaving (also after an error) when torchrun started one."""
    import torch.distributed as dist
    rank, world, dev = init_distributed(device)
    try:
        yield rank, world, dev
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class _CurrentStderr(logging.StreamHandler):
    """A log handler writing to whatever ``sys.stderr`` is when it writes (a caller that swaps
    it, as a test capturing output does, never leaves the handler on a closed stream)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[_CurrentStderr()],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
