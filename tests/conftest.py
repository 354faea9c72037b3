"""Shared pytest setup: nothing is ever downloaded (the repository root and tests/ are importable
through pyproject.toml's pytest pythonpath)."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"      # diffusers / huggingface_hub must never reach the Hub

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
