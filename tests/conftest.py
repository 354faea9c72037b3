"""Shared pytest setup: the repository root is importable and nothing is ever downloaded."""
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"      # diffusers / huggingface_hub must never reach the Hub

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

# the tests use tiny models: one thread is faster than two fighting over a small CPU
torch.set_num_threads(1)
