"""Balancing Act: distribution-guided debiasing of a pretrained diffusion model, at sampling time.

Generation (flags as in the original s_u_r.sh, plus clearer equivalents):
  python main.py --mode vanilla --n_test_img 100 --exp runs/vanilla
  python main.py --mode distribution --target parity=0.5 --bs_test 100 --exp runs/fair
  python main.py --mode distribution --target parity=0.5 --preset paper --exp runs/paper   # the original method
  python main.py --mode sample --target parity=1 --exp runs/odd        # class index per attribute
  python main.py --vanilla_generation False --sample False --attribute_list 1,0,0 --male 0.5 ...
Extraction of h-vectors (script_extract_he.sh):
  python main.py --just_precompute True --test_path_one DATA/ --attribute gender --savepath h/
  python main.py --extract_pseudo 2000 --savepath h/digits     # sample + label with a classifier
Demo on the embedded default (vanilla vs distribution-guided, same seeds, judged):
  python main.py --demo
"""
from __future__ import annotations

import sys

import diffusion_latent
from utils.app import cli
from utils.app.commands import extract


def main(argv: list[str] | None = None) -> int:
    """Run main.py's command line; returns the exit status (2: a user error, with a message)."""
    return cli.run(argv, generate=diffusion_latent.generate, demo=diffusion_latent.demo,
                   extract=extract)

if __name__ == "__main__":
    sys.exit(main())
