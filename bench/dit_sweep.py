"""Which block of the digits transformer default is h, and how it is pooled.

    python bench/run.py dit --only sweep               # docs/results_dit/sweep.md (its cells: bench/lists/dit.yml)
    python bench/dit_sweep.py --pools none             # the blocks 1, 3, 5 (early, middle, late), every token
    python bench/dit_sweep.py --blocks 3 --pools 2 1   # then the pooling at the best block
    python bench/dit_sweep.py --cells 5:2:ours-cap1    # one cell (block:pool:guidance variant)

For each block (early / middle / late of ``configs/digits16_dit.yml``'s six) the h of ``--n``
samples over the five training prompts is extracted once, as the README extracts it (``main.py
--extract_pseudo``, pseudo-labels by the config's labeller, never the judge), with every token of
the 4x4 grid kept; each pooling is that h average-pooled as the hook pools it (2: 2x2 cells, 1:
the mean token; 8x8, 4x4 and none are all the 4x4 grid itself here). An ADP is trained on each
(``multi_classifier.py``), its validation accuracy per attribute read from its card, and each is
used for ``ours`` parity 50/50 at batch 100 on ``--seed``... (the ``fresh`` entry of
bench/lists/t2i.yml, ``bench/t2i_eval.py --preset fresh``: vanilla and guided per prompt, the
independent judge). The seeds here (extraction 200000 on,
guidance 40000 on) are not those of the final figures (0-999, extraction 100000 on).
Writes ``sweep.md`` and ``sweep.json`` to --out, with the cells of earlier calls kept; every step
is skipped when its output exists. The U-Net default's row (its shipped ADP, the same seeds) is
added when ``--work``/eval_unet holds its run (the ``unet_fresh`` entry of bench/lists/dit.yml, run
before the sweep by ``python bench/run.py dit``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from models.files import REPO_ROOT

CONFIG = "configs/digits16_dit.yml"
PROMPTS = ["a digit", "a small digit", "a large digit", "a handwritten digit", "a number"]
BIASED = ["a digit", "a small digit", "a large digit"]
ATTRIBUTES = "parity,magnitude,digit"
UNET_ADP = "pretrained/digits16_t2i_adp.pt"
#: the guidance sections tried per cell (--guidance): the config's (the U-Net default's, for
#: v-prediction: the cap grows at the noisy steps) with the ADP's stored directions, as the sweep
#: chose h with them and with the digit quota (the config now steps along the run's own
#: covariance, its quota nested in even / odd), ours as it is, ours with smaller caps
GUIDANCE = {"config": {"direction": "covariance", "quota_level": "finer"}, "ours": {"preset": "ours"},
            "ours-cap1": {"preset": "ours", "max_step": 1.0}, "ours-cap0.5": {"preset": "ours", "max_step": 0.5}}


def run(cmd: list[str], log: Path) -> None:
    """One step in its own process (its log kept beside its output); an error stops the sweep."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, *cmd], cwd=REPO_ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    if rc:
        raise SystemExit(f"step failed ({rc}): {' '.join(cmd)}; see {log}")


def cell_config(base: dict, block: int, pool, adp: Path, out: Path, guidance: str = "config") -> Path:
    """The config of one cell: the default's with h at ``transformer_blocks.{block}`` pooled to
    ``pool``, the cell's ADP and the ``guidance`` variant's section."""
    cfg = json.loads(json.dumps(base))
    variant = GUIDANCE[guidance]
    cfg["guidance"] = {**cfg.get("guidance", {}), **variant} if guidance == "config" else variant
    width, side = cfg["model"]["h_shape"][0], cfg["model"]["h_shape"][1]
    g = side if pool == "none" else min(int(pool), side)
    cfg["model"].update(h_module=f"transformer_blocks.{block}", h_pool=pool if pool == "none" else int(pool),
                        h_shape=[width, g, g])
    cfg["adp"] = str(adp)
    path = out / (f"b{block}_p{pool}.yml" if guidance == "config" else f"b{block}_p{pool}_{guidance}.yml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def pooled_copy(src: Path, dst: Path, pool: int) -> None:
    """The extraction in ``src`` with h average-pooled to pool x pool cells, as ``models.hspace``
    pools it (meta.json says so: h_shape and the model's h_pool)."""
    dst.mkdir(parents=True, exist_ok=True)
    meta = json.loads((src / "meta.json").read_text())
    meta["h_shape"] = [meta["h_shape"][0], pool, pool]
    meta["model"]["h_pool"] = pool
    for shard in sorted(src.glob("shard_*.pt")):
        s = torch.load(shard, weights_only=False)
        h = s["h"]
        n, steps = h.shape[:2]
        s["h"] = F.adaptive_avg_pool2d(h.float().flatten(0, 1), pool).to(h.dtype).unflatten(0, (n, steps))
        torch.save(s, dst / shard.name)
    (dst / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def accuracy(adp: Path) -> dict[str, float]:
    """The ADP's validation accuracy per attribute, averaged over its timesteps (its card)."""
    from models.adp import ADP
    meta = ADP.load(adp).meta or {}
    per = {a: m.get("val_accuracy_per_step") for a, m in (meta.get("metrics", {}).get("attributes") or {}).items()}
    return {a: sum(v) / len(v) for a, v in per.items() if v}


def _mean_or_dash(values: list[float]) -> str:
    """The mean to 3 places, or - when a value is missing (a row of a sweep.json that lacks it)."""
    return "-" if any(v != v for v in values) else f"{sum(values) / len(values):.3f}"


def parse_cells(specs: list[str]) -> list[tuple[int, str, str]]:
    """'5:2:ours-cap1' -> (5, '2', 'ours-cap1'); the guidance part may be left out (config)."""
    cells = []
    for spec in specs:
        block, _, rest = spec.partition(":")
        pool, _, variant = rest.partition(":")
        variant = variant or "config"
        if not block.isdigit() or not pool or variant not in GUIDANCE:
            raise SystemExit(f"--cells {spec!r}: expected BLOCK:POOL[:GUIDANCE], e.g. 5:2:ours-cap1 "
                             f"(GUIDANCE one of {sorted(GUIDANCE)})")
        cells.append((int(block), pool, variant))
    return cells


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--pools", nargs="+", default=["none", "2", "1"])
    p.add_argument("--guidance", nargs="+", default=["config"], choices=sorted(GUIDANCE))
    p.add_argument("--cells", nargs="+", metavar="BLOCK:POOL:GUIDANCE",
                   help="the cells to run instead of the grid --blocks x --pools x --guidance, e.g. 5:2:ours-cap1")
    p.add_argument("--n", type=int, default=1000, help="extracted samples per block (over the five prompts)")
    p.add_argument("--n_eval", type=int, default=200, help="guided images per prompt")
    p.add_argument("--seed", type=int, default=40000, help="first guidance seed")
    p.add_argument("--extract_seed", type=int, default=200000)
    p.add_argument("--work", default="runs/dit_sweep")
    p.add_argument("--out", default="docs/results_dit")
    args = p.parse_args(argv)
    cells = parse_cells(args.cells) if args.cells else [
        (b, pool, g) for b in args.blocks for pool in args.pools for g in args.guidance]
    work, out = REPO_ROOT / args.work, REPO_ROOT / args.out
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((REPO_ROOT / CONFIG).read_text())
    (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    done = out / "sweep.json"
    rows = [r for r in (json.loads(done.read_text()) if done.exists() else [])
            if (r["block"], r["pool"], r.get("guidance", "config")) not in cells]
    for block, pool, variant in cells:
        h_full = work / f"h_b{block}"
        full_cfg = cell_config(base, block, "none", work / f"adp_b{block}_pnone", work)
        if not (h_full / "done").exists():
            run(["main.py", "--config", str(full_cfg), "--extract_pseudo", str(args.n), "--seed",
                 str(args.extract_seed), "--prompts", str(work / "prompts.txt"), "--bs_test", "100",
                 "--savepath", str(h_full)], work / f"extract_b{block}.log")
            (h_full / "done").write_text("")
        adp = work / f"adp_b{block}_p{pool}"
        data = h_full
        if pool != "none":
            data = work / f"h_b{block}_p{pool}"
            if not (data / "meta.json").exists():
                pooled_copy(h_full, data, int(pool))
        if not (adp / "config.json").exists():
            run(["multi_classifier.py", "--data", str(data), "--attributes", ATTRIBUTES, "--out", str(adp)],
                work / f"adp_b{block}_p{pool}.log")
        name = f"b{block}_p{pool}" + ("" if variant == "config" else f"_{variant}")
        ev = work / f"eval_{name}"
        if not (ev / "fresh.json").exists():
            run(["bench/t2i_eval.py", "--config", str(cell_config(base, block, pool, adp, work, variant)),
                 "--preset", "fresh", "--seed", str(args.seed), "--n", str(args.n_eval), "--out", str(ev)],
                work / f"eval_{name}.log")
        reports = json.loads((ev / "fresh.json").read_text())
        guided = [r for r in reports if r["spec"]["mode"] != "vanilla"]
        vanilla = {r["prompt"]: r for r in reports if r["spec"]["mode"] == "vanilla"}
        rows.append({"block": block, "pool": pool, "guidance": variant, "accuracy": accuracy(adp),
                     "parity_fd": {r["prompt"]: r["attributes"]["parity"]["fd"] for r in guided},
                     "confident": {r["prompt"]: r["confident_share"] for r in guided},
                     "confident_vanilla": {q: r["confident_share"] for q, r in vanilla.items()},
                     "frechet": {r["prompt"]: r["frechet"] for r in guided},
                     "frechet_vanilla": {q: r["frechet"] for q, r in vanilla.items()}})
        print(json.dumps(rows[-1]), flush=True)
    rows.sort(key=lambda r: (r["block"], ["none", "2", "1"].index(r["pool"]) if r["pool"] in ("none", "2", "1") else 9,
                             list(GUIDANCE).index(r.get("guidance", "config"))))
    lines = [f"h block / pooling sweep of {CONFIG}: ADP from {args.n} samples (seeds {args.extract_seed}+), "
             f"ours parity 50/50 at batch 100 on seeds {args.seed}-{args.seed + args.n_eval - 1} per prompt, "
             f"the independent judge", "",
             "| h | pooling | guidance | ADP val. accuracy parity / magnitude / digit | parity FD: "
             + " / ".join(BIASED) + " | mean FD | confident (vanilla), mean over prompts |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = " / ".join(f"{r['accuracy'].get(a, float('nan')):.3f}" for a in ATTRIBUTES.split(","))
        fds = [r["parity_fd"].get(q, float("nan")) for q in BIASED]
        pool = {"none": "none (4x4 grid)", "2": "2x2", "1": "mean"}.get(r["pool"], r["pool"])
        conf = [r["confident"].get(q, float("nan")) for q in BIASED]
        conf_v = [r.get("confident_vanilla", {}).get(q, float("nan")) for q in BIASED]
        lines.append(f"| transformer_blocks.{r['block']} | {pool} | {r.get('guidance', 'config')} | {acc} | "
                     + " / ".join(f"{v:.3f}" for v in fds) + f" | {sum(fds) / len(fds):.3f} | "
                     f"{sum(conf) / 3:.3f} ({_mean_or_dash(conf_v)}) |")
    unet = work / "eval_unet" / "fresh.json"      # the U-Net default on the same seeds, its shipped ADP
    if unet.exists():
        reports = json.loads(unet.read_text())
        guided = {r["prompt"]: r for r in reports if r["spec"]["mode"] != "vanilla"}
        vanilla = {r["prompt"]: r for r in reports if r["spec"]["mode"] == "vanilla"}
        acc = accuracy(REPO_ROOT / UNET_ADP)
        fds = [guided[q]["attributes"]["parity"]["fd"] for q in BIASED]
        lines.append("| U-Net default: mid_block (64x4x4; its ADP from 2,500 samples) | none | config | "
                     + " / ".join(f"{acc[a]:.3f}" for a in ATTRIBUTES.split(",")) + " | "
                     + " / ".join(f"{v:.3f}" for v in fds) + f" | {sum(fds) / 3:.3f} | "
                     f"{sum(guided[q]['confident_share'] for q in BIASED) / 3:.3f} "
                     f"({sum(vanilla[q]['confident_share'] for q in BIASED) / 3:.3f}) |")
    md = "\n".join(lines)
    (out / "sweep.md").write_text(md + "\n")
    (out / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
