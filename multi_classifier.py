"""Train the Attribute Distribution Predictor (ADP) on extracted h-vectors: several attributes.

    python multi_classifier.py --data runs/h_digits_pseudo --attributes parity,magnitude,digit \
        --out pretrained/digits16_adp.pt

One linear head per (attribute, DDIM timestep); validation accuracy per timestep is printed
as a table, written next to the checkpoint (``.json``, ``.md``) and plotted (``.png``).
The checkpoint records attribute/class names, h shape, timesteps, the model it was trained for
(config + checkpoint sha256), the data source and the metrics.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models.loader import resolve_path  # noqa: E402
from utils.data.adp_train import train_adp  # noqa: E402
from utils.data.extract import load_h_dataset  # noqa: E402
from utils.evaluation.plots import accuracy_plot, accuracy_table  # noqa: E402
from utils.app.runtime import setup_logging  # noqa: E402


def build_parser(single: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="extraction folder(s) (meta.json + shards)")
    p.add_argument("--attribute" if single else "--attributes", required=single,
                   help="attribute to train" if single else "comma-separated attributes (default: all in the data)")
    p.add_argument("--out", required=True, help="ADP checkpoint to write (.pt)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--val_fraction", type=float, default=0.2)
    p.add_argument("--limit", type=int, help="use only the first N samples (ablations)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    return p


def run(args, attrs: list[str] | None) -> int:
    setup_logging()
    out = resolve_path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    try:
        meta, h, labels = load_h_dataset([resolve_path(d) for d in args.data], attrs)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    missing = [a for a in (attrs or []) if a not in labels]
    if missing:
        print(f"error: the data has no labels for {missing}; it has {list(meta['attributes'])}", file=sys.stderr)
        return 2
    if args.limit:
        h, labels = h[:args.limit], {a: v[:args.limit] for a, v in labels.items()}
    adp, metrics = train_adp(h, labels, meta, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             val_fraction=args.val_fraction, seed=args.seed)
    source = {"folders": [str(d) for d in args.data], "source": meta.get("source"),
              "labeller": meta.get("labeller"), "n": int(len(h))}
    out.parent.mkdir(parents=True, exist_ok=True)
    adp.save(out, meta["model"], source, metrics)
    table = accuracy_table(adp.timesteps, metrics)
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps({"model": meta["model"], "data_source": source,
                                                    "timesteps": adp.timesteps, "metrics": metrics}, indent=1) + "\n")
    accuracy_plot(adp.timesteps, metrics, out.with_suffix(".png"))
    print(table)
    for a, m in metrics["attributes"].items():
        print(f"{a}: val accuracy, last 20% of steps {m['val_accuracy_last_20pct']:.3f}; "
              f"first 10% {m['val_accuracy_first_10pct']:.3f}")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args, [a.strip() for a in args.attributes.split(",")] if args.attributes else None)


if __name__ == "__main__":
    raise SystemExit(main())
