"""Tiny random text-to-image pipelines of six diffusers families, and the published denoisers'
architectures for shape checks on the meta device.

``save_tiny(family, folder)`` builds the family's stock diffusers pipeline (``PIPELINE_CLASS``)
from tiny random components and saves it; ``DiffusionPipeline.from_pretrained(folder,
local_files_only=True)`` loads it back offline. Every tokenizer is built here by code (CLIP: the
character vocabulary of ``models.sd_tiny``; T5 and Gemma: a character vocabulary in the
``tokenizers`` library), nothing is downloaded. Each family keeps its published scheduler type and
text-encoder layout; the denoisers have 16k-262k parameters (sd: models.sd_tiny's U-Net, about 1M)
and two blocks or levels (Flux: one double-stream and one single-stream block). Generate at
``TINY_RESOLUTION[family]`` px (sd 16: h on 4x4; the others 32: h on 8x8) and pass
``CALL_KWARGS[family]`` (the CFG scale; PixArt-Sigma and SANA also need
``use_resolution_binning=False``: their smallest aspect-ratio bins are 256 and 512 px).

``PUBLISHED[family]`` holds the published denoiser's ``config.json`` architecture keys;
``meta_denoiser(family)`` builds it on the meta device (no memory), ``published_token_grid`` and
``published_width`` give the shape of its h output, and ``meta_h_shape`` runs a meta forward pass
to read that shape off a hook.

    python -m models.tiny_families sana runs/tiny_sana
"""
from __future__ import annotations

import string
import sys
import tempfile
from pathlib import Path

import torch

from models.sd_tiny import SD15_UNET, save_tiny_sd, tiny_sd_pipeline, write_char_tokenizer
from models.t2i import FAMILIES as T2I_FAMILIES

FAMILIES = tuple(T2I_FAMILIES)
PIPELINE_CLASS = {f: T2I_FAMILIES[f].pipeline for f in FAMILIES}
#: the pipeline attribute that holds the denoiser
DENOISER = {f: T2I_FAMILIES[f].denoiser for f in FAMILIES}
#: image side (px) of the tiny pipelines: also their default height/width
TINY_RESOLUTION = {"sd": 16, "sdxl": 32, "sd3": 32, "flux": 32, "pixart_sigma": 32, "sana": 32}
#: keyword arguments each family's call takes besides prompt/steps/size/generator/output_type:
#: the published guidance scale (Flux: the distilled guidance embedding, not CFG), and for
#: PixArt/SANA no resolution binning and no caption cleaning (which depends on bs4/ftfy)
CALL_KWARGS = {"sd": {"guidance_scale": 7.5}, "sdxl": {"guidance_scale": 5.0}, "sd3": {"guidance_scale": 3.5},
               "flux": {"guidance_scale": 3.5},
               "pixart_sigma": {"guidance_scale": 4.5, "use_resolution_binning": False, "clean_caption": False},
               "sana": {"guidance_scale": 4.5, "use_resolution_binning": False, "clean_caption": False}}

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=[320, 640, 1280], layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
    transformer_layers_per_block=[1, 2, 10], use_linear_projection=True, addition_embed_type="text_time",
    addition_embed_type_num_heads=64, addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
SD35_LARGE_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
    pos_embed_max_size=192, qk_norm="rms_norm")
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=[16, 56, 56])
PIXART_SIGMA_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=4, out_channels=8, num_layers=28, attention_head_dim=72,
    num_attention_heads=16, cross_attention_dim=1152, caption_channels=4096, attention_bias=True,
    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=2, use_additional_conditions=False)
SANA_1600M_TRANSFORMER = dict(
    sample_size=32, patch_size=1, in_channels=32, out_channels=32, num_layers=20, num_attention_heads=70,
    attention_head_dim=32, num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
    caption_channels=2304, mlp_ratio=2.5, attention_bias=False, norm_elementwise_affine=False, norm_eps=1e-6,
    interpolation_scale=None)

PUBLISHED = {
    "sd": dict(model="runwayml/stable-diffusion-v1-5", resolution=512, denoiser_class="UNet2DConditionModel",
               config=SD15_UNET, vae_scale_factor=8),
    "sdxl": dict(model="stabilityai/stable-diffusion-xl-base-1.0", resolution=1024,
                 denoiser_class="UNet2DConditionModel", config=SDXL_UNET, vae_scale_factor=8),
    "sd3": dict(model="stabilityai/stable-diffusion-3.5-large", resolution=1024,
                denoiser_class="SD3Transformer2DModel", config=SD35_LARGE_TRANSFORMER, vae_scale_factor=8),
    "flux": dict(model="black-forest-labs/FLUX.1-dev", resolution=1024, denoiser_class="FluxTransformer2DModel",
                 config=FLUX_DEV_TRANSFORMER, vae_scale_factor=8),
    "pixart_sigma": dict(model="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", resolution=1024,
                         denoiser_class="PixArtTransformer2DModel", config=PIXART_SIGMA_TRANSFORMER,
                         vae_scale_factor=8),
    "sana": dict(model="Efficient-Large-Model/Sana_1600M_1024px_diffusers", resolution=1024,
                 denoiser_class="SanaTransformer2DModel", config=SANA_1600M_TRANSFORMER, vae_scale_factor=32),
}
#: text tokens the published pipelines feed the denoiser (SD3: 77 CLIP + 256 T5; Flux: 512 T5)
PUBLISHED_TEXT_TOKENS = {"sd": 77, "sdxl": 77, "sd3": 333, "flux": 512, "pixart_sigma": 300, "sana": 300}

# T5 and Gemma vocabularies: one token per printable ASCII character
_CHARS = string.ascii_letters + string.digits + string.punctuation


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown diffusers family {family!r}: use one of {', '.join(FAMILIES)}")
    return family


# ---- tokenizers and text encoders -------------------------------------------------------------

def clip_tokenizer(folder: Path):
    """The character-level CLIPTokenizer of models.sd_tiny (64 tokens), written to ``folder``."""
    from transformers import CLIPTokenizer
    write_char_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(str(folder))


def t5_tokenizer(max_length: int = 512):
    """A T5TokenizerFast over single characters: a Unigram model with T5's metaspace pre-tokenizer,
    ids 0/1/2 = <pad>/</s>/<unk>, and </s> appended to every sequence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in _CHARS]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def gemma_tokenizer(max_length: int = 2048):
    """A GemmaTokenizerFast over single characters (a BPE model without merges; spaces become
    '\u2581'), ids 0..3 = <pad>/<eos>/<bos>/<unk>, <bos> prepended, right padding."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import GemmaTokenizerFast
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + ["\u2581", "\n"] + list(_CHARS))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    return GemmaTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                              unk_token="<unk>", padding_side="right", model_max_length=max_length)


def clip_text(tokenizer, hidden: int, projection: int | None = None):
    """A two-layer CLIP text encoder (with a text projection of ``projection`` when given)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                         projection_dim=projection or hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def t5_text(tokenizer, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def gemma_text(tokenizer, hidden: int = 32):
    from transformers import Gemma2Config, Gemma2Model
    return Gemma2Model(Gemma2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    max_position_embeddings=tokenizer.model_max_length, sliding_window=256,
                                    pad_token_id=0, eos_token_id=1, bos_token_id=2))


def tiny_vae(latent_channels: int, scaling: float, shift: float | None = None):
    """A two-level AutoencoderKL (vae_scale_factor 2); SD3/Flux style (a shift, no quant convs)
    when ``shift`` is given."""
    from diffusers import AutoencoderKL
    flow = shift is not None
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=[16, 32],
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=16, sample_size=32, scaling_factor=scaling, shift_factor=shift,
                         use_quant_conv=not flow, use_post_quant_conv=not flow)


# ---- the tiny pipelines -----------------------------------------------------------------------

def _sdxl(tmp: Path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    tok, tok2 = clip_tokenizer(tmp / "tok"), clip_tokenizer(tmp / "tok2")
    text, text2 = clip_text(tok, 16), clip_text(tok2, 16, projection=16)
    # cross-attention on both encoders' hidden states (16 + 16); micro-conditioning: 6 size/crop
    # numbers of 8 channels each + the second encoder's pooled projection (16)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=[16, 32], layers_per_block=1,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[2, 4], transformer_layers_per_block=[1, 1], use_linear_projection=True,
        cross_attention_dim=32, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    return StableDiffusionXLPipeline(vae=tiny_vae(4, 0.13025), text_encoder=text, text_encoder_2=text2,
                                     tokenizer=tok, tokenizer_2=tok2, unet=unet, scheduler=sched)


def _sd3(tmp: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    tok, tok2, tok3 = clip_tokenizer(tmp / "tok"), clip_tokenizer(tmp / "tok2"), t5_tokenizer(256)
    # CLIP hidden states (16 + 16) are zero-padded to the T5 width (32) and joined along the tokens
    net = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16,
                                qk_norm="rms_norm")
    return StableDiffusion3Pipeline(
        transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(16, 1.5305, 0.0609),
        text_encoder=clip_text(tok, 16, projection=16), tokenizer=tok,
        text_encoder_2=clip_text(tok2, 16, projection=16), tokenizer_2=tok2,
        text_encoder_3=t5_text(tok3, 32), tokenizer_3=tok3)


def _flux(tmp: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    tok, tok2 = clip_tokenizer(tmp / "tok"), t5_tokenizer(512)
    # 16 latent channels packed 2x2 into 64-channel tokens, as FLUX.1-dev; rope axes sum to the head dim
    net = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                 pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 6, 6])
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=sched, vae=tiny_vae(16, 0.3611, 0.1159), text_encoder=clip_text(tok, 32),
                        tokenizer=tok, text_encoder_2=t5_text(tok2, 32), tokenizer_2=tok2, transformer=net)


def _pixart_sigma(tmp: Path):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    tok = t5_tokenizer(300)
    # sample_size 16 is no aspect-ratio bin size: a call that keeps resolution binning on fails loudly
    net = PixArtTransformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                                   attention_head_dim=8, num_attention_heads=2, cross_attention_dim=16,
                                   caption_channels=32, attention_bias=True, activation_fn="gelu-approximate",
                                   num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                   norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False)
    return PixArtSigmaPipeline(tokenizer=tok, text_encoder=t5_text(tok, 32), vae=tiny_vae(4, 0.13025),
                               transformer=net, scheduler=DPMSolverMultistepScheduler())


def _sana(tmp: Path):
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    tok = gemma_tokenizer()
    # a three-stage DC-AE: vae_scale_factor 4, 32 px -> 8x8 latents of 8 channels
    vae = AutoencoderDC(in_channels=3, latent_channels=8, attention_head_dim=8,
                        encoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"],
                        decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"],
                        encoder_block_out_channels=[8, 16, 16], decoder_block_out_channels=[8, 16, 16],
                        encoder_layers_per_block=[1, 1, 1], decoder_layers_per_block=[1, 1, 1],
                        encoder_qkv_multiscales=[[], [], [5]], decoder_qkv_multiscales=[[], [], [5]],
                        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
    # sample_size 8 is no aspect-ratio bin size (see _pixart_sigma)
    net = SanaTransformer2DModel(sample_size=8, patch_size=1, in_channels=8, out_channels=8, num_layers=2,
                                 num_attention_heads=2, attention_head_dim=8, num_cross_attention_heads=2,
                                 cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
                                 mlp_ratio=2.5, attention_bias=False, interpolation_scale=None)
    sched = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    return SanaPipeline(tokenizer=tok, text_encoder=gemma_text(tok, 32), vae=vae, transformer=net, scheduler=sched)


_BUILDERS = {"sdxl": _sdxl, "sd3": _sd3, "flux": _flux, "pixart_sigma": _pixart_sigma, "sana": _sana}


def tiny_pipeline(family: str, seed: int = 0):
    """The family's stock pipeline of tiny random components ("sd": models.sd_tiny's)."""
    check_family(family)
    with tempfile.TemporaryDirectory(prefix="tiny_tok_") as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "sd":
            return tiny_sd_pipeline(seed, Path(tmp))
        return _BUILDERS[family](Path(tmp))


def save_tiny(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Build the family's tiny random pipeline and save it to ``folder`` (safetensors); returns it."""
    check_family(family)
    if family == "sd":
        with torch.random.fork_rng(devices=[]):
            return save_tiny_sd(folder, seed)
    folder = Path(folder)
    tiny_pipeline(family, seed).save_pretrained(folder, safe_serialization=True)
    return folder


# ---- the published denoisers on the meta device -----------------------------------------------

def meta_denoiser(family: str):
    """The published denoiser (PUBLISHED[family]) with its weights on the meta device."""
    import diffusers
    pub = PUBLISHED[check_family(family)]
    with torch.device("meta"):
        return getattr(diffusers, pub["denoiser_class"]).from_config(pub["config"])


def _patch(family: str, config: dict) -> int:
    # Flux packs 2x2 latent patches into one token in the pipeline (its config patch_size is 1)
    return 2 if family == "flux" else config.get("patch_size", 1)


def token_grid(family: str, config: dict, resolution: int, vae_scale_factor: int) -> tuple[int, int]:
    """(gh, gw) of the h output at ``resolution`` px: the U-Net mid-block's spatial size, or the
    image-token grid (latent side / patch) of a transformer."""
    side = resolution // vae_scale_factor
    if DENOISER[check_family(family)] == "unet":
        side //= 2 ** (len(config["block_out_channels"]) - 1)
    else:
        side //= _patch(family, config)
    return side, side


def h_width(family: str, config: dict) -> int:
    """Channels of the h output: the U-Net's last block width, a transformer's heads x head dim."""
    if DENOISER[check_family(family)] == "unet":
        return config["block_out_channels"][-1]
    return config["num_attention_heads"] * config["attention_head_dim"]


def published_token_grid(family: str) -> tuple[int, int]:
    pub = PUBLISHED[check_family(family)]
    return token_grid(family, pub["config"], pub["resolution"], pub["vae_scale_factor"])


def published_width(family: str) -> int:
    return h_width(family, PUBLISHED[check_family(family)]["config"])


def h_module_name(family: str) -> str:
    """The module whose output a forward hook reads as h: the U-Net mid-block, or the first
    (double-stream / joint) transformer block."""
    return "mid_block" if DENOISER[check_family(family)] == "unet" else "transformer_blocks.0"


def meta_inputs(family: str, batch: int = 1) -> dict:
    """Meta-device keyword inputs of the published denoiser at its published resolution."""
    pub, cfg = PUBLISHED[check_family(family)], PUBLISHED[family]["config"]
    side, text = pub["resolution"] // pub["vae_scale_factor"], PUBLISHED_TEXT_TOKENS[family]
    m = dict(device="meta")
    ctx = cfg.get("cross_attention_dim") if DENOISER[family] == "unet" else \
        cfg.get("joint_attention_dim", cfg.get("caption_channels"))
    t = torch.empty(batch, **m)
    if family == "flux":
        n = (side // 2) ** 2
        return dict(hidden_states=torch.empty(batch, n, cfg["in_channels"], **m), timestep=t, guidance=t,
                    encoder_hidden_states=torch.empty(batch, text, ctx, **m),
                    pooled_projections=torch.empty(batch, cfg["pooled_projection_dim"], **m),
                    img_ids=torch.empty(n, 3, **m), txt_ids=torch.empty(text, 3, **m), return_dict=False)
    first = "sample" if DENOISER[family] == "unet" else "hidden_states"
    kw = {first: torch.empty(batch, cfg["in_channels"], side, side, **m), "timestep": t,
          "encoder_hidden_states": torch.empty(batch, text, ctx, **m), "return_dict": False}
    if family == "sdxl":
        text_embeds = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        kw["added_cond_kwargs"] = dict(text_embeds=torch.empty(batch, text_embeds, **m),
                                       time_ids=torch.empty(batch, 6, **m))
    elif family == "sd3":
        kw["pooled_projections"] = torch.empty(batch, cfg["pooled_projection_dim"], **m)
    elif family in ("pixart_sigma", "sana"):
        kw["encoder_attention_mask"] = torch.empty(batch, text, **m)
        if family == "pixart_sigma":
            kw["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    return kw


def meta_h_shape(family: str, batch: int = 1) -> tuple[int, ...]:
    """Shape of h (``h_module_name``'s output; the image-token tensor of a transformer block's
    (encoder_hidden_states, hidden_states) pair) in a meta forward pass of the published denoiser."""
    net, found = meta_denoiser(family), []

    def grab(_module, _args, out):
        found.append(tuple((out[-1] if isinstance(out, tuple) else out).shape))

    with torch.no_grad(), net.get_submodule(h_module_name(family)).register_forward_hook(grab):
        net(**meta_inputs(family, batch))
    return found[0]


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: python -m models.tiny_families FAMILY FOLDER  (FAMILY: {', '.join(FAMILIES)})")
    print(save_tiny(sys.argv[1], sys.argv[2]))
