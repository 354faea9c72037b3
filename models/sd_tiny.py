"""Tiny random Stable Diffusion pipelines (tests, benchmarks, smoke runs), built and saved
locally: nothing is downloaded.

``save_tiny_sd(folder)`` writes a complete diffusers ``StableDiffusionPipeline`` folder
(``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``)
with random weights: a UNet2DConditionModel with two levels (h = 64x4x4 at 16 px), a two-level
AutoencoderKL (vae_scale_factor 2), a two-layer CLIPTextModel and a character-level
CLIPTokenizer whose vocabulary this module writes. ``SD15_UNET`` holds the published
``unet/config.json`` values of Stable Diffusion 1.5 (for shape checks and benchmarks at full size).

    python -m models.sd_tiny runs/tiny_sd
"""
from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import torch

#: Stable Diffusion 1.5's unet/config.json (the architecture keys)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
    freq_shift=0, down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                    "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768,
    attention_head_dim=8)

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], block_out_channels=[32, 64], layers_per_block=1,
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16)


def write_char_tokenizer(folder: Path, max_length: int = 64) -> None:
    """A CLIPTokenizer folder whose vocabulary is single characters (each also with the
    end-of-word mark) and no merges: every word is spelt out character by character."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(string.ascii_lowercase + string.digits + ".,!?'-"))
    tokens = ["<|startoftext|>", "<|endoftext|>", "!"] + [c for c in chars if c != "!"] + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "do_lower_case": True}))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}))


def tiny_sd_pipeline(seed: int = 0, tokenizer_folder: Path | None = None, unet: dict | None = None):
    """A StableDiffusionPipeline of tiny random components (``tokenizer_folder``: where the
    character tokenizer is written; a temporary folder when None)."""
    import tempfile
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(seed)
    tok_dir = Path(tokenizer_folder or tempfile.mkdtemp(prefix="tiny_tok_"))
    write_char_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    unet_cfg = dict(TINY_UNET, **(unet or {}))
    net = UNet2DConditionModel(**unet_cfg)
    vae = AutoencoderKL(block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=16, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=unet_cfg["cross_attention_dim"],
                                        intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                        max_position_embeddings=tokenizer.model_max_length,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=net, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_tiny_sd(folder: str | Path, seed: int = 0, unet: dict | None = None) -> Path:
    """Build and save a tiny random pipeline folder; returns it."""
    folder = Path(folder)
    pipe = tiny_sd_pipeline(seed, folder / "tokenizer", unet)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


if __name__ == "__main__":
    print(save_tiny_sd(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny_sd"))
