"""Shared pytest setup: the repository root is importable and nothing is ever downloaded."""
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"      # diffusers / huggingface_hub must never reach the Hub

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

# the tests use tiny models: one thread is faster than two fighting over a small CPU
torch.set_num_threads(1)

# diffusers and transformers give their loggers a handler on sys.stderr when first used; made here,
# it holds the session's stream rather than one test's captured (and later closed) stream
for _lib in ("diffusers", "transformers"):
    try:
        __import__(f"{_lib}.utils.logging", fromlist=["get_logger"]).get_logger(_lib)
    except ImportError:
        pass


@pytest.fixture(scope="session")
def tiny_adm():
    """A tiny random ADM U-Net on 16x16 grey images (random weights: a hard, non-smooth eps)."""
    from models.adm_unet import ADMConfig, ADMUNet
    torch.manual_seed(0)
    return ADMUNet(ADMConfig(image_size=16, in_channels=1, out_channels=1, model_channels=32,
                             channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                             num_head_channels=32)).eval()
