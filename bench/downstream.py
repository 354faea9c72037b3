"""Downstream use: does balancing the biased training data with guided samples help a classifier?

    OMP_NUM_THREADS=1 python bench/downstream.py                 # full run (~1,060 generated images)
    OMP_NUM_THREADS=1 python bench/downstream.py --quick         # smoke run (60 + 60 images, 100 steps)

One small CNN (``SmallCNN``), trained for a fixed number of steps, for each task (digit: 10
classes, parity: 2) on each of four training sets:

  (a) ``biased``: the DDPM's own training subset (``models/digits.py``: 530 real images, 80% even);
  (b) ``+ guided``: (a) plus ``n_add`` distribution-guided samples whose digit target makes
      (a)+(b) uniform over digits: target_k = (max_j c_j - c_k) / n_add with
      n_add = K max_j c_j - n (``balancing_fractions``). On the digits subset this is n_add = 530
      and 20% even, so the same set also balances parity 50/50 overall;
  (c) ``+ vanilla``: (a) plus n_add vanilla samples from the same seeds (the control: more data
      with the model's own bias);
  (d) ``balanced real``: (a) plus real digits in the counts (b) asks for, drawn from the judge
      split (real digits outside the subset and outside heldout): uniform over digits, same size
      as (b) (the ceiling: the balancing done with real images);
  (e) extra: (a) alone with minibatches drawn with weight 1 / class count (balances the class
      prior only, for free).

Generated images are labelled by the config's ``labeller`` (the SVM that labelled the ADP's
training data), never by the judge. Each classifier is scored on the held-out real digits:
overall accuracy and worst-class accuracy (the lowest per-class recall; range [0, 1], higher
is better), mean and std over ``--seeds`` (the seed sets the classifier's init and data order;
every condition sees the same seeds). Generation uses seeds ``--gen_seed`` .. +n_add - 1
(default 20000+, disjoint from the result runs' 0-999, 5000-5999 and 7000-7999), runs
``main.py`` and is cached under ``--out`` (a finished folder with the same seeds and target
is reused; ``--force`` regenerates). Writes ``results.md`` and ``results.json`` to ``--out``.
Diagnostics under the table: each added set's median distance to its nearest subset image (are
the generated images new?) and how often the judge agrees with the labeller's labels (a check
of the labels; the judge labels nothing that is trained on).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.digits import ATTRIBUTES, attribute_labels, load_split
from models.labellers import load_labeller
from utils.app.cli import guarded
from utils.app.config import load_config
from utils.app.runtime import setup_logging
from utils.evaluation.evaluate import judge_from_config
from utils.guidance.targets import parse_fraction_vector
from utils.sampling.images import read_images

log = logging.getLogger("downstream")
TASKS = ("digit", "parity")
CONDITIONS = ("(a) biased subset", "(b) + guided", "(c) + vanilla", "(d) balanced real",
              "(e) biased subset, class-balanced sampling")


# ---- the balancing arithmetic ---------------------------------------------------------------
def balancing_fractions(counts: np.ndarray) -> tuple[int, np.ndarray]:
    """Class counts c [K] -> (n_add, fractions [K]) such that c + n_add * fractions is uniform:
    n_add = K max(c) - sum(c), fractions_k = (max(c) - c_k) / n_add."""
    counts = np.asarray(counts, dtype=np.int64)
    n_add = int(len(counts) * counts.max() - counts.sum())
    if n_add == 0:
        raise ValueError(f"the class counts {counts.tolist()} are already uniform: nothing to balance")
    return n_add, (counts.max() - counts) / n_add


def split_counts(n: int, fractions: np.ndarray) -> np.ndarray:
    """n items -> integer counts [K] in the given fractions (largest remainder; sums to n)."""
    raw = np.asarray(fractions, dtype=np.float64) * n
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts


def target_spec(fractions: np.ndarray) -> str:
    """Fractions [K] -> main.py's ``--target digit=p0:p1:...`` value (sums to 1 within 1e-5)."""
    return "digit=" + ":".join(f"{p:.6f}" for p in fractions)


# ---- generation (main.py, cached) -----------------------------------------------------------
def _finished(folder: Path, seeds: list[int], mode: str, bs: int, target: str | None) -> bool:
    """Whether ``folder`` holds a complete run of exactly these seeds, mode, batch size and
    target; a folder holding another run is an error (``--force`` replaces it)."""
    record = folder / "run.json"
    if not record.is_file():
        return False
    run = json.loads(record.read_text())
    resolved = run.get("resolved", {})
    got = (resolved.get("guidance") or {}).get("requested") or {}
    want = {} if target is None else {"digit": parse_fraction_vector(
        "digit", target.split("=", 1)[1], ATTRIBUTES["digit"]).tolist()}   # as main.py stores it
    same_target = got.keys() == want.keys() and all(np.allclose(got[a], want[a], atol=1e-6) for a in want)
    if run.get("seeds") != seeds or resolved.get("mode") != mode or \
            resolved.get("batch_size") != bs or not same_target:
        raise ValueError(f"{folder} holds another run (other seeds, mode, batch size or target): "
                         f"pass --force to replace it, or another --out")
    return run.get("status") == "complete"


def generate(folder: Path, mode: str, seed: int, n: int, bs: int, config: str,
             fractions: np.ndarray | None, force: bool) -> float:
    """Sample n images from seeds seed..seed+n-1 into ``folder`` with main.py (skipped when a
    finished run of the same seeds, batch size and target is there); returns the seconds spent."""
    seeds = list(range(seed, seed + n))
    target = None if fractions is None else target_spec(fractions)
    if not force and folder.is_dir() and _finished(folder, seeds, mode, bs, target):
        log.info("%s: cached (%d images)", folder, n)
        return 0.0
    cmd = [sys.executable, str(ROOT / "main.py"), "--config", config, "--mode", mode,
           "--n_test_img", str(n), "--bs_test", str(bs), "--seed", str(seed), "--exp", str(folder)]
    if target is not None:
        cmd += ["--target", target]
    if folder.is_dir() and any(folder.iterdir()):
        cmd.append("--overwrite" if force else "--resume")
    log.info("generating: %s", " ".join(cmd))
    t0 = time.time()
    rc = subprocess.run(cmd, cwd=ROOT, env=os.environ.copy()).returncode
    if rc != 0:
        raise ValueError(f"generation into {folder} failed (exit {rc}); see main.py's message above")
    return time.time() - t0


def labelled_folder(folder: Path, labeller) -> tuple[torch.Tensor, np.ndarray]:
    """A run folder's images [N,1,16,16] in [-1,1] and the labeller's digit labels [N]."""
    _, x = read_images(folder)
    return x, labeller.predict(x)["digit"].argmax(1).numpy()


# ---- the classifier -------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """conv 16 -> pool -> conv 32 -> pool -> 64 -> n_classes logits, for [N,1,16,16]."""

    def __init__(self, n_classes: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_classifier(x: torch.Tensor, y: np.ndarray, n_classes: int, steps: int, seed: int,
                     balanced: bool = False, batch: int = 64, lr: float = 2e-3) -> SmallCNN:
    """SmallCNN trained with Adam on cross-entropy for ``steps`` minibatches drawn with
    replacement, uniformly over images or (``balanced``) with weight 1 / count of the image's
    class; ``seed`` sets the init and the data order."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net, yt = SmallCNN(n_classes), torch.as_tensor(y, dtype=torch.long)
    w = 1.0 / np.bincount(y)[y] if balanced else np.ones(len(y))
    w = torch.as_tensor(w, dtype=torch.float64)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        idx = torch.multinomial(w, batch, replacement=True, generator=gen)
        loss = F.cross_entropy(net(x[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def class_accuracies(pred: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[float, float, np.ndarray]:
    """(overall accuracy, worst-class accuracy = min per-class recall, per-class recall [K])."""
    per = np.array([np.mean(pred[y == k] == k) for k in range(n_classes)])
    return float(np.mean(pred == y)), float(per.min()), per


# ---- the four training sets -----------------------------------------------------------------
def real_topup(pool_y: np.ndarray, counts: np.ndarray, seed: int = 0) -> np.ndarray:
    """Indices into a real pool holding counts[k] images of each class k (seeded draw)."""
    rng = np.random.default_rng(seed)
    out = []
    for k, c in enumerate(counts):
        have = np.flatnonzero(pool_y == k)
        if len(have) < c:
            raise ValueError(f"the real pool holds {len(have)} images of class {k}, {c} needed")
        out.extend(rng.permutation(have)[:c])
    return np.sort(np.asarray(out, dtype=np.int64))


def nn_distance(query: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    """Distance of each query image [N,1,H,W] to its nearest image in ref [M,1,H,W]: RMS over
    pixels in [-1, 1] units ([N]; 0 = an exact copy of a reference image)."""
    d = torch.cdist(query.flatten(1).double(), ref.flatten(1).double()).min(1).values
    return (d / query[0].numel() ** 0.5).numpy()


def label_fractions(digits: np.ndarray) -> dict:
    """Digit and parity fractions of a label array."""
    k = len(ATTRIBUTES["digit"])
    d = np.bincount(digits, minlength=k) / len(digits)
    return {"digit": d.round(4).tolist(), "even": float(np.mean(digits % 2 == 0))}


def run(args) -> dict:
    """Generate (or reuse) the added images, build the five training sets, train and score
    every (set, task, seed); the raw results as a dict (``markdown`` formats it)."""
    cfg = load_config(args.config)
    split = load_split()
    k = len(ATTRIBUTES["digit"])
    counts = np.bincount(split.train_y, minlength=k)
    n_full, fractions = balancing_fractions(counts)
    n_add = args.n_add or n_full
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_gen = generate(out / "guided", "distribution", args.gen_seed, n_add, args.bs, args.config,
                     fractions, args.force)
    t_gen += generate(out / "vanilla", "vanilla", args.gen_seed, n_add, args.bs, args.config,
                      None, args.force)
    labeller = load_labeller(cfg["labeller"])
    gx, gy = labelled_folder(out / "guided", labeller)
    vx, vy = labelled_folder(out / "vanilla", labeller)
    top = real_topup(split.judge_y, split_counts(n_add, fractions))
    rx, ry = split.judge_x[top], split.judge_y[top]
    sets = {     # name -> (images, digit labels, class-balanced sampling)
        CONDITIONS[0]: (split.train_x, split.train_y, False),
        CONDITIONS[1]: (torch.cat([split.train_x, gx]), np.concatenate([split.train_y, gy]), False),
        CONDITIONS[2]: (torch.cat([split.train_x, vx]), np.concatenate([split.train_y, vy]), False),
        CONDITIONS[3]: (torch.cat([split.train_x, rx]), np.concatenate([split.train_y, ry]), False),
        CONDITIONS[4]: (split.train_x, split.train_y, True),
    }
    test_y = attribute_labels(split.heldout_y)
    results = {"n_add": n_add, "target": target_spec(fractions), "gen_seed": args.gen_seed,
               "steps": args.steps, "seeds": args.seeds, "generation_s": round(t_gen, 1),
               "added_label_fractions": {"guided (labeller)": label_fractions(gy),
                                         "vanilla (labeller)": label_fractions(vy),
                                         "target": fractions.round(4).tolist()},
               "diagnostics": diagnostics(cfg, split.train_x, {"guided": (gx, gy), "vanilla": (vx, vy),
                                                               "real top-up (d)": (rx, ry)}),
               "rows": []}
    t0 = time.time()
    for name, (x, digits, balanced) in sets.items():
        labels = attribute_labels(digits)
        for task in TASKS:
            nk = len(ATTRIBUTES[task])
            runs = []
            for s in args.seeds:
                net = train_classifier(x, labels[task], nk, args.steps, s, balanced)
                with torch.no_grad():
                    pred = net(split.heldout_x).argmax(1).numpy()
                acc, worst, per = class_accuracies(pred, test_y[task], nk)
                runs.append({"seed": s, "overall": acc, "worst": worst, "per_class": per.round(4).tolist()})
            results["rows"].append({"condition": name, "task": task, "n_train": len(digits),
                                    "fractions": label_fractions(digits), "runs": runs})
            log.info("%s / %s: worst %s", name, task, [round(r["worst"], 3) for r in runs])
    results["training_s"] = round(time.time() - t0, 1)
    return results


def diagnostics(cfg: dict, subset: torch.Tensor, added: dict) -> dict:
    """For each added set: the median nearest-neighbour distance to the biased subset
    (``nn_distance``) and, for generated sets, how often the config's judge agrees with the
    labeller's digit (a check of the labels only: the judge never labels training data)."""
    judge = judge_from_config(cfg)
    out = {}
    for name, (x, y) in added.items():
        row = {"median_nn_distance": float(np.median(nn_distance(x, subset)))}
        if "real" not in name:
            row["judge_agrees_digit"] = float(np.mean(judge.predict(x)["digit"].argmax(1).numpy() == y))
        out[name] = row
    return out


# ---- the report -----------------------------------------------------------------------------
def _ms(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def markdown(res: dict) -> str:
    """The results as Markdown: one row per condition and task, plus the paired differences."""
    lines = [f"Held-out real digits (457), {len(res['seeds'])} classifier seeds {res['seeds']}, "
             f"{res['steps']} steps each; mean ± std (population std over seeds). "
             f"{res['n_add']} generated images per generated set (seeds {res['gen_seed']}–"
             f"{res['gen_seed'] + res['n_add'] - 1}).", "",
             "| training set | task | n train | even share | digit share min / max "
             "| overall accuracy | worst-class accuracy | worst class (mode) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in res["rows"]:
        fr, runs = row["fractions"], row["runs"]
        worst_cls = [int(np.argmin(r["per_class"])) for r in runs]
        names = ATTRIBUTES[row["task"]]
        mode = names[max(set(worst_cls), key=worst_cls.count)]
        lines.append(f"| {row['condition']} | {row['task']} | {row['n_train']} | {fr['even']:.3f} "
                     f"| {min(fr['digit']):.3f} / {max(fr['digit']):.3f} "
                     f"| {_ms([r['overall'] for r in runs])} | {_ms([r['worst'] for r in runs])} "
                     f"| {mode} |")
    lines += ["", "Added images: median distance to their nearest image in the biased subset (RMS "
              "per pixel, [-1, 1] units; 0 = a copy) and, for generated ones, the share whose "
              "labeller digit the judge agrees with (a check of the labels, not used for training):",
              ""]
    lines += [f"- {name}: nearest-neighbour distance {row['median_nn_distance']:.3f}"
              + (f", judge agrees {row['judge_agrees_digit']:.3f}" if "judge_agrees_digit" in row else "")
              for name, row in res["diagnostics"].items()]
    lines += ["", "Paired by classifier seed, worst-class accuracy of (b) minus the others "
              "(mean ± std of the per-seed differences; each seed's values):", "",
              "| task | (b) − (a) | (b) − (c) | (b) − (d) | (b) − (e) |", "|---|---|---|---|---|"]
    by = {(r["condition"][:3], r["task"]): [x["worst"] for x in r["runs"]] for r in res["rows"]}
    for task in TASKS:
        cells = []
        for other in ("(a)", "(c)", "(d)", "(e)"):
            d = np.array(by[("(b)", task)]) - np.array(by[(other, task)])
            cells.append(f"{d.mean():+.3f} ± {d.std():.3f} ({', '.join(f'{v:+.3f}' for v in d)})")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    af = res["added_label_fractions"]
    lines += ["", "Digit fractions of the added images (labeller), 0–9:", "",
              f"- target: {' / '.join(f'{v:.3f}' for v in af['target'])}",
              *(f"- {key}: {' / '.join(f'{v:.3f}' for v in af[key]['digit'])} (even {af[key]['even']:.3f})"
                for key in ("guided (labeller)", "vanilla (labeller)"))]
    return "\n".join(lines) + "\n"


@guarded
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits16.yml")
    p.add_argument("--out", default=None, help="cache and report folder (default runs/downstream, "
                                                "runs/downstream_quick with --quick)")
    p.add_argument("--n_add", type=int, default=None,
                   help="generated images per set (default: the number that balances the subset)")
    p.add_argument("--bs", type=int, default=100, help="generation batch size")
    p.add_argument("--gen_seed", type=int, default=20000, help="first generation seed")
    p.add_argument("--steps", type=int, default=800, help="classifier training steps")
    p.add_argument("--seeds", default="0,1,2", help="classifier seeds, comma-separated")
    p.add_argument("--force", action="store_true", help="regenerate cached images")
    p.add_argument("--quick", action="store_true", help="smoke run: 60 images per set, 100 steps")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        args.n_add, args.steps, args.bs = args.n_add or 60, min(args.steps, 100), min(args.bs, 30)
    if args.n_add is not None and args.n_add < 1 or args.steps < 1 or args.bs < 1:
        raise ValueError("--n_add, --steps and --bs must be positive")
    args.out = args.out or ("runs/downstream_quick" if args.quick else "runs/downstream")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.time()
    res = run(args)
    res["wall_s"] = round(time.time() - t0, 1)
    md = markdown(res)
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(md)
    print(md)
    print(f"wall time {res['wall_s']:.0f} s (generation {res['generation_s']:.0f} s, "
          f"training {res['training_s']:.0f} s); written to {out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
