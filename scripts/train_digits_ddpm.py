"""Train the embedded default: the biased 16x16 digits DDPM (configs/digits16.yml).

    python scripts/train_digits_ddpm.py                  # CPU or CUDA (--device auto), resumable
    python scripts/train_digits_ddpm.py --steps 3000     # a shorter run

Writes pretrained/digits16_ddpm.pt (EMA weights, native ADM keys) and
pretrained/digits16_ddpm.json (command, steps, seed, data fractions, wall time).
"""
from __future__ import annotations

import argparse
import sys

from models.loader import build_model, resolve_path
from utils.app.config import load_config, with_overrides
from utils.sampling.diffusion import Schedule
from models.digits import load_split
from utils.app.runtime import pick_device, setup_logging
from utils.data.train_ddpm import train_ddpm
from utils.app.cli import guarded


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits16.yml")
    p.add_argument("--steps", type=int, help="training steps (default: config train.steps)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="weights file (default: config model.checkpoint)")
    p.add_argument("--state", default="runs/digits16_train_state.pt", help="resumable training state")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    setup_logging()
    cfg = with_overrides(load_config(args.config), {
        "train.steps": args.steps, "train.batch_size": args.batch_size, "train.seed": args.seed})
    out = resolve_path(args.out or cfg["model"]["checkpoint"])
    tr = cfg["train"]
    split = load_split(cfg["model"]["image_size"])
    record = {"command": "python scripts/train_digits_ddpm.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "config": args.config, "data": split.metadata()}
    rec = train_ddpm(build_model(cfg["model"], args.config), split.train_x, Schedule.from_config(cfg["diffusion"]),
                     out, resolve_path(args.state), steps=tr["steps"], batch_size=tr["batch_size"], lr=tr["lr"],
                     ema_decay=tr["ema_decay"], warmup=tr["warmup"], seed=tr["seed"],
                     save_every=tr["save_every"], device=str(pick_device(args.device)), record=record)
    print(f"wrote {out} after {rec['steps']} steps in {rec['wall_time_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
