"""Per-prompt guidance directions for a text-to-image ADP: E_s = Cov_s(h | prompt) W_raw,s^T, the
covariance of one prompt's own vanilla h instead of the whole extraction's
(docs/results_dit/large_digit.md). Across every prompt of the DiT default, parity and magnitude
share a direction of h (most even digits are small), so the ADP's global directions move
"a large digit"'s samples towards 0, 2 and 4; within that prompt's samples magnitude barely
varies, so its covariance leaves that part of the direction out.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/research/dit_prompt_directions.py \\
        --adp pretrained/digits16_dit_adp --out runs/dit_pp/shipped \\
        --data runs/dit_more/h_300000 runs/dit_more/h_310000

writes one ADP folder per prompt found in the extraction shards (``OUT/<prompt with _>``): the
ADP unchanged but for its ``dir_*`` buffers (``ADP.directions_from_chunks`` on that prompt's
shards; heads, normalisation and confusion matrices are the ADP's own). Evaluate one with
``bench/t2i_eval.py --entry fresh --adp OUT/a_large_digit --prompts "a large digit" ...``.
The covariance of the run's own h at every step, which needs no stored directions and beat
these (the table in docs/results_dit/large_digit.md), is the guidance setting ``direction: batch``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from models.adp import ADP
from utils.data.extract import open_shard, read_meta, shard_files


def prompt_directions(adp_path: Path, folders: list[Path], out_root: Path) -> None:
    base = ADP.load(adp_path)
    by_prompt: dict[str, list] = {}
    for folder in folders:
        meta = read_meta(folder)
        missing = [t for t in base.timesteps if t not in meta["timesteps"]]
        if missing:
            raise SystemExit(f"{folder} has no h at timesteps {missing[:5]}: extract on the ADP's grid")
        idx = [meta["timesteps"].index(t) for t in base.timesteps]
        for path in shard_files(folder):
            shard = open_shard(path)
            by_prompt.setdefault(shard["prompt"], []).append(shard["h"].flatten(2)[:, idx].float())
    for prompt, hs in by_prompt.items():
        adp = ADP.load(adp_path)
        n = adp.directions_from_chunks(hs)
        out = out_root / prompt.replace(" ", "_")
        if out.exists():
            raise SystemExit(f"{out} exists: pick another --out (nothing was overwritten)")
        source = {**(adp.meta.get("data_source") or {}), "directions_prompt": prompt, "directions_n": n,
                  "directions_from": [str(f) for f in folders]}
        adp.save(out, adp.meta["model"], source, adp.meta.get("metrics") or {}, adp.meta.get("imported"))
        print(f"{prompt}: directions from {n} samples -> {out}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adp", required=True, type=Path)
    ap.add_argument("--data", required=True, nargs="+", type=Path, help="text-to-image extraction folders")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    prompt_directions(args.adp, args.data, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
