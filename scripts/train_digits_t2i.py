"""Train the text-to-image digits model (configs/digits16_t2i.yml): a tiny AutoencoderKL, then a
UNet2DConditionModel with a CLIPTextModel on its latents, each prompt with known digit fractions;
or, with configs/digits16_dit.yml, a PixArtTransformer2DModel on the U-Net default's VAE,
tokenizer and (as its start) text encoder, on the same prompts and pairs.

    python scripts/train_digits_t2i.py                        # CPU or CUDA (--device auto)
    python scripts/train_digits_t2i.py --resume               # continue from the training state
    python scripts/train_digits_t2i.py --steps 30 --vae_steps 30 --out runs/t2i_smoke
    python scripts/train_digits_t2i.py --config configs/digits16_dit.yml

Writes a diffusers StableDiffusionPipeline (PixArtSigmaPipeline) folder (default: the config's model.checkpoint,
pretrained/digits16_t2i) with record.json beside the weights: the command, the settings, every
prompt's exact parity / magnitude / digit fractions and the training statistics.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

from models.digits import load_split
from models.digits_t2i import build_components, parse_prompts, prompt_data, training_images, vocabulary, \
    write_word_tokenizer
from models.files import REPO_ROOT, resolve_path
from models.t2i import h_shape, resolve_model
from utils.app.cli import guarded
from utils.app.config import load_config
from utils.app.runtime import pick_device, setup_logging
from utils.config import RunConfig
from utils.data.train_t2i import T2ITrainSettings, save_pipeline, train_t2i, use_bf16


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits16_t2i.yml")
    p.add_argument("--out", help="pipeline folder (default: config model.checkpoint)")
    p.add_argument("--steps", type=int, help="U-Net steps (default: config train.steps)")
    p.add_argument("--vae_steps", type=int, help="VAE steps (default: config train.vae_steps)")
    p.add_argument("--batch_size", type=int, help="U-Net batch (default: config train.batch_size)")
    p.add_argument("--seed", type=int, help="default: config train.seed")
    p.add_argument("--state", help="training state (default: runs/<out folder name>_train_state.pt)")
    p.add_argument("--resume", action="store_true", help="continue from --state")
    p.add_argument("--overwrite", action="store_true", help="replace an existing pipeline folder at --out")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"),
                   help="bf16 autocast (auto: on CUDA and on CPUs with native bf16)")
    args = p.parse_args(argv)
    setup_logging()
    cfg = load_config(args.config)
    run = RunConfig.of(cfg)
    settings = T2ITrainSettings.from_config(run.train, {
        "steps": args.steps, "vae_steps": args.vae_steps, "batch_size": args.batch_size, "seed": args.seed})
    out = resolve_path(args.out or cfg["model"]["checkpoint"])
    if (out / "model_index.json").exists() and not (args.overwrite or args.resume):
        raise ValueError(f"{out} already holds a pipeline: pass --overwrite to replace it")
    state = resolve_path(args.state or f"runs/{out.name}_train_state.pt")
    device = pick_device(args.device)
    bf16 = use_bf16(device, args.amp)

    prompts = parse_prompts(run.prompts)
    split = load_split(cfg["model"]["resolution"])
    data = prompt_data(prompts, split.train_y, settings.subset_min, settings.seed, run.unconditional)
    with tempfile.TemporaryDirectory() as tok_dir:
        parts = build_components(Path(tok_dir), prompts, settings.max_length, settings.seed, settings.zero_snr,
                                 settings.denoiser, settings.init_from and resolve_model(settings.init_from))
    images = training_images(run.tint, split)                            # RGB in [-1, 1], channel mean = grey
    stats = train_t2i(parts, images, data, settings, state, args.resume, device, bf16)

    if out.exists():
        shutil.rmtree(out)
    save_pipeline(parts, out)
    write_word_tokenizer(out / "tokenizer", vocabulary(prompts))    # vocab.json + merges.txt, readable
    folder = resolve_model(str(out), run.family)                     # the family's own check
    net = parts[2]
    vae_scale = 2 ** (len(parts[3].config.block_out_channels) - 1)
    res = cfg["model"]["resolution"]
    shape = h_shape(net, res, vae_scale) if settings.denoiser == "unet" else \
        (net.inner_dim, res // vae_scale // net.config.patch_size, res // vae_scale // net.config.patch_size)
    record = {
        "command": "python scripts/train_digits_t2i.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": args.config, "settings": dataclasses.asdict(settings), "state": _shown(state),
        "images_from": f"the DDPM's training subset only (models/digits.py load_split().train_x, "
                       f"{len(split.train_y)} images, grey to RGB with tint {float(run.tint)}: "
                       f"models/digits_t2i.tinted)",
        "prompts": data.record(split.train_y, settings.cfg_dropout), "pairs_per_prompt": data.size,
        "data": split.metadata(), "training": stats,
        "model": {"resolution": cfg["model"]["resolution"], "vae_scale_factor": vae_scale,
                  "h_shape": list(shape),
                  "vocabulary": vocabulary(prompts), "max_length": settings.max_length}}
    (folder / "record.json").write_text(json.dumps(record, indent=2) + "\n")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"wrote {folder} ({size / 2**20:.1f} MiB, h {record['model']['h_shape']}) after "
          f"{settings.vae_steps} VAE + {settings.steps} U-Net steps in {stats['wall_time_s']} s")
    return 0


def _shown(path: Path) -> str:
    """A path as the record shows it: relative to the repository when inside it (no machine paths)."""
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return path.name


if __name__ == "__main__":
    raise SystemExit(main())

