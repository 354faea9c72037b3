r"""The Attribute Distribution Predictor (ADP): train it on extracted h-vectors, import the
original code's classifiers, or add guidance directions to an ADP from an extraction.

    python multi_classifier.py --data runs/h_digits_pseudo --attributes parity,magnitude,digit \
        --out runs/digits16_adp.pt
    python multi_classifier.py --import_original gender.pt --attribute gender --classes female,male \
        --config configs/celeba_hq_p2.yml --out pretrained/celebahq_gender_original.pt
    python multi_classifier.py --directions_from runs/h_faces --adp pretrained/celebahq_gender_original.pt \
        --out pretrained/celebahq_gender_directions.pt

Training: one linear head per (attribute, DDIM timestep); validation accuracy per timestep is
printed as a table, written next to the checkpoint (``.json``, ``.md``) and plotted (``.png``).
The h-vectors stay on disk and are read a few rows at a time from the memory-mapped shards, so
memory does not grow with the number of samples (utils/data/adp_train.py).
Import: the original's ``classification_checkpoints/new_model/*.pt`` (``linears.{i}.weight``,
one head per step of its grid ``int(linspace(0, 1, 50) * 999)``, none for t = 999) become an ADP
of this project with identical logits, tied to the config's model; it runs with ``--preset
paper``. The ``ours`` preset also needs guidance directions: ``--directions_from`` an extraction
(script_extract_he.sh) of the same model adds them (and the confusion matrices when the
extraction has labels for the attribute).
Every checkpoint records attribute/class names, h shape, timesteps, the model it was made for
(config + checkpoint sha256 when the file is present), its data source and metrics.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from models.adp import ADP, ClassifierMismatchError  # noqa: E402
from models.files import (check_writable, checkpoint_sha256, load_tensors, model_identity,  # noqa: E402
                          resolve_path)
from models.t2i import is_text_to_image  # noqa: E402
from utils.app.cli import guarded, input_path, output_path  # noqa: E402
from utils.app.config import load_config  # noqa: E402
from utils.app.runtime import setup_logging  # noqa: E402
from utils.config import RunConfig  # noqa: E402
from utils.data.adp_train import train_adp_stream  # noqa: E402
from utils.data.extract import load_h_dataset, open_h_dataset  # noqa: E402
from utils.evaluation.plots import accuracy_plot, accuracy_table  # noqa: E402
from utils.sampling.diffusion import ddim_timesteps  # noqa: E402


def build_parser(single: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", help="(train) extraction folder(s) (meta.json + shards)")
    p.add_argument("--attribute" if single else "--attributes", required=single,
                   help="attribute to train" if single else "comma-separated attributes (default: all "
                   "in the data; with --import_original: one name per file)")
    p.add_argument("--out", required=True, help="ADP to write: NAME.pt, or a FOLDER (config.json, "
                   "model.safetensors, README.md model card)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--val_fraction", type=float, default=0.2)
    p.add_argument("--limit", type=int, help="use only the first N samples (ablations)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    if not single:
        p.add_argument("--attribute", dest="attributes", help=argparse.SUPPRESS)
        g = p.add_argument_group("the original code's classifiers")
        g.add_argument("--import_original", nargs="+", metavar="PT",
                       help="original classifier file(s) (linears.{i}.weight / .bias), one per attribute")
        g.add_argument("--classes", action="append",
                       help="class names of the imported heads, e.g. female,male (once for all, or once per file)")
        g.add_argument("--config", help="(import) the model config the classifiers belong to")
        g.add_argument("--directions_from", nargs="+", metavar="H_FOLDER",
                       help="extraction folder(s) of the ADP's model: add guidance directions to --adp")
        g.add_argument("--adp", help="(directions, priors) the ADP checkpoint to complete")
        g.add_argument("--priors_from_samples", type=int, metavar="N",
                       help="store the model's class fractions in --adp: the ADP's own predictions at "
                            "the last step on N vanilla samples (seeds 100000 on) of --config's model")
    return p


def check_numbers(args) -> None:
    """Ranges of the numeric options, before anything is read or written."""
    if args.epochs < 1:
        raise ValueError(f"--epochs {args.epochs}: --epochs must be >= 1 (passes over the training samples)")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size {args.batch_size}: the batch size must be >= 1 (default 128)")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr {args.lr}: the learning rate must be a finite number > 0 (default 1e-3)")
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val_fraction {args.val_fraction}: expected --val_fraction in (0, 1), the share "
                         f"of samples held out for validation (default 0.2)")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: give N >= 1 samples, or leave --limit out to use them all")
    n = getattr(args, "priors_from_samples", None)
    if n is not None and n < 1:
        raise ValueError(f"--priors_from_samples {n}: the number of vanilla samples must be >= 1 (e.g. 1000)")


def command(args) -> str:
    """What to do: train (--data), import, directions or priors; one of them."""
    given = [flag for flag, on in (("--data", args.data),
                                   ("--import_original", getattr(args, "import_original", None)),
                                   ("--directions_from", getattr(args, "directions_from", None)),
                                   ("--priors_from_samples", getattr(args, "priors_from_samples", None) is not None))
             if on]
    if len(given) > 1:
        raise ValueError(f"give one of --data (train), --import_original, --directions_from or "
                         f"--priors_from_samples, not {' and '.join(given)}")
    if not given:
        raise ValueError("training needs --data (extraction folders); or --import_original / --directions_from")
    return given[0].lstrip("-")


#: what an ADP folder holds (``ADP.save``), and its reports when trained here
FOLDER_FILES = ("config.json", "model.safetensors", "README.md")
FOLDER_REPORTS = ("accuracy.md", "accuracy.png")


def check_out(out: Path, overwrite: bool, reports: bool) -> None:
    """Refuse, before anything is read or written, an --out that cannot be written or would
    replace files without --overwrite. ``--out NAME.pt``: a checkpoint file (``reports``: its
    .md/.json/.png beside it); ``--out FOLDER`` (no suffix): an ADP folder (config.json,
    model.safetensors, README.md; ``reports``: accuracy.md and accuracy.png in it)."""
    if out.suffix == "":
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; an ADP folder is made at a new or existing folder")
        targets = [out / n for n in FOLDER_FILES + (FOLDER_REPORTS if reports else ())]
    elif out.is_dir() or out.suffix != ".pt":
        raise ValueError(f"--out {out}: give a checkpoint file NAME.pt (its .json/.md/.png reports are written "
                         f"beside it) or a folder name without a suffix (an ADP folder: config.json, "
                         f"model.safetensors, README.md), e.g. --out {out.with_suffix('.pt')} or --out "
                         f"{out.with_suffix('')}")
    else:
        targets = [out, *(out.with_suffix(s) for s in (".md", ".json", ".png") if reports)]
    folders = [p for p in targets if p.is_dir()]
    if folders:
        raise ValueError(f"--out {out}: {folders[0]} (a report written beside it) is a folder; choose another --out")
    existing = [p.name for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"--out {out}: {', '.join(existing)} exist{'s' if len(existing) == 1 else ''} in "
                              f"{out.parent}; pass --overwrite to replace, or choose another --out")
    check_writable(out, "--out")


def train(args, attrs: list[str] | None, out: Path) -> int:
    data = open_h_dataset([resolve_path(input_path(d)) for d in args.data], attrs)   # h stays on disk
    meta = data.meta
    if args.limit is not None:
        data = data.head(args.limit)
    adp, metrics = train_adp_stream(data, meta, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                    val_fraction=args.val_fraction, seed=args.seed)
    source = {"folders": [str(d) for d in args.data], "source": meta.get("source"),
              "labeller": meta.get("labeller"), "n": len(data)}
    out.parent.mkdir(parents=True, exist_ok=True)
    adp.save(out, meta["model"], source, metrics)
    table = accuracy_table(adp.timesteps, metrics)
    if out.suffix == "":                    # an ADP folder: config.json already holds what the .json would
        (out / "accuracy.md").write_text(table + "\n")
        accuracy_plot(adp.timesteps, metrics, out / "accuracy.png")
    else:
        out.with_suffix(".md").write_text(table + "\n")
        out.with_suffix(".json").write_text(json.dumps({"model": meta["model"], "data_source": source,
                                                        "timesteps": adp.timesteps, "metrics": metrics,
                                                        "class_prior": adp.class_prior,
                                                        "prompt_prior": adp.prompt_prior or None}, indent=1) + "\n")
        accuracy_plot(adp.timesteps, metrics, out.with_suffix(".png"))
    print(table)
    for a, m in metrics["attributes"].items():
        print(f"{a}: val accuracy, last 20% of steps {m['val_accuracy_last_20pct']:.3f}; "
              f"first 10% {m['val_accuracy_first_10pct']:.3f}")
    print(f"wrote {out}")
    return 0


def read_original(path: Path) -> dict[str, torch.Tensor]:
    """An original classifier's state dict (tensors only: nothing in it can run)."""
    sd = load_tensors(path, "a classifier of the original code (a state dict)", ClassifierMismatchError)
    if not isinstance(sd, dict):
        raise ClassifierMismatchError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return sd


def import_original(args, out: Path) -> int:
    """The original's classifiers -> one ADP tied to the config's model and grid."""
    from models.loader import build_model
    files = [resolve_path(input_path(f)) for f in args.import_original]
    names = [a.strip() for a in (args.attributes or "").split(",") if a.strip()]
    if len(names) != len(files):
        raise ValueError(f"--import_original: give one attribute name per file with --attribute "
                         f"(got {len(files)} files and names {names})")
    classes = [[c.strip() for c in spec.split(",")] for spec in (args.classes or ["0,1"])]
    if len(classes) == 1:
        classes = classes * len(files)
    if len(classes) != len(files) or any(len(c) < 2 for c in classes):
        raise ValueError("--classes: class names (at least two, comma-separated) once for all files or once per file")
    if not args.config:
        raise ValueError("--import_original needs --config (the model config the classifiers belong to)")
    cfg = load_config(input_path(args.config))
    if is_text_to_image(cfg["model"].get("family")):
        return _import_original_sd(args, cfg, files, names, classes, out)
    s = RunConfig.of(cfg).sampling
    if s.skip_type != "original":
        raise ValueError(f"config {cfg['name']} samples on the '{s.skip_type}' grid; the "
                         f"original's classifiers belong to its grid int(linspace(0, 1, S) * 999): set "
                         f"sampling.skip_type: original in the config")
    grid = ddim_timesteps(int(cfg["diffusion"].get("num_diffusion_timesteps", 1000)),
                          s.steps, "original")
    timesteps = sorted(grid[1:])               # head i <-> the i-th step of the ascending grid
    heads = {a: (read_original(f), c) for a, f, c in zip(names, files, classes)}   # read first: cheap
    h_shape = tuple(cfg["model"].get("h_shape") or build_model(cfg["model"], cfg["name"]).h_shape)
    adp = ADP.from_original(heads, timesteps, h_shape)
    model_id = model_identity(cfg["name"], cfg["model"]["checkpoint"],
                              checkpoint_sha256(cfg["model"], missing_ok=True))
    imported = {"files": [f.name for f in files], "layout": "linears.{i} (Balancing Act original code)",
                "grid": "original", "temperature": 8.0}
    out.parent.mkdir(parents=True, exist_ok=True)
    adp.save(out, model_id, {"source": "imported", "files": [f.name for f in files]}, {}, imported)
    tie = "its checkpoint's sha256" if model_id["checkpoint_sha256"] else "the config only (checkpoint file absent)"
    print(f"wrote {out}: {len(timesteps)} heads per attribute {dict(zip(names, classes))}, h {h_shape}, "
          f"tied to {cfg['name']} by {tie}; run with --preset paper, or add directions with --directions_from")
    return 0


#: the original Stable Diffusion code's heads: linears.{i} for timestep 1 + 20 i (i = 0..49)
SD_ORIGINAL_TIMESTEPS = list(range(1, 1000, 20))


def _import_original_sd(args, cfg: dict, files, names, classes, out: Path) -> int:
    """The original's Stable Diffusion heads (Linear(C*H*W -> K) per timestep of [1, 21, ..., 981])
    -> one ADP tied to the config's SD model when its folder is present."""
    from models.t2i import model_sha256, resolve_model
    res = int(cfg["model"].get("resolution", 512))
    h_shape = tuple(cfg["model"].get("h_shape") or (1280, res // 64, res // 64))
    heads = {a: (read_original(f), c) for a, f, c in zip(names, files, classes)}
    adp = ADP.from_original(heads, SD_ORIGINAL_TIMESTEPS, h_shape)
    try:
        sha = model_sha256(resolve_model(str(cfg["model"]["checkpoint"])))
    except ValueError:
        sha = None
    model_id = model_identity(cfg["name"], cfg["model"]["checkpoint"], sha)
    imported = {"files": [f.name for f in files], "layout": "linears.{i} (Balancing Act original SD code)",
                "grid": "1 + 20 i", "temperature": 8.0}
    out.parent.mkdir(parents=True, exist_ok=True)
    adp.save(out, model_id, {"source": "imported", "files": [f.name for f in files]}, {}, imported)
    print(f"wrote {out}: {len(SD_ORIGINAL_TIMESTEPS)} heads per attribute {dict(zip(names, classes))}, h {h_shape}, "
          f"tied to {cfg['name']} by {'the model folder sha256' if sha else 'the config only (model absent)'}")
    return 0


def add_directions(args, out: Path) -> int:
    """Guidance directions (and, with labels, confusion matrices) for an ADP from an extraction."""
    if not args.adp:
        raise ValueError("--directions_from needs --adp (the ADP to complete)")
    adp = ADP.load(resolve_path(input_path(args.adp)))
    meta, h, labels = load_h_dataset([resolve_path(input_path(d)) for d in args.directions_from], None)
    if tuple(meta["h_shape"]) != adp.h_shape:
        raise ClassifierMismatchError(f"the extraction's h shape {tuple(meta['h_shape'])} is not the ADP's {adp.h_shape}")
    want, have = adp.meta["model"].get("checkpoint_sha256"), meta["model"].get("checkpoint_sha256")
    if want and have and want != have:
        raise ClassifierMismatchError("the extraction was made with another model checkpoint than the ADP's")
    missing = [t for t in adp.timesteps if t not in meta["timesteps"]]
    if missing:
        raise ClassifierMismatchError(f"the extraction has no h at timesteps {missing[:5]}...; extract "
                                      f"on the ADP's grid (the config's sampling.skip_type and steps)")
    h = h[:, [meta["timesteps"].index(t) for t in adp.timesteps]]
    adp.compute_directions(h)
    calibrated = [a for a in adp.attributes if a in labels]
    if calibrated:
        adp.calibrate(h, {a: labels[a] for a in calibrated})
    source = {**(adp.meta.get("data_source") or {}), "directions_from": [str(d) for d in args.directions_from],
              "directions_n": int(len(h)), "calibrated": calibrated}
    out.parent.mkdir(parents=True, exist_ok=True)
    adp.save(out, adp.meta["model"], source, adp.meta.get("metrics") or {}, adp.meta.get("imported"))
    print(f"wrote {out}: directions from {len(h)} samples; confusion matrices for {calibrated or 'none (no labels)'}")
    return 0


def add_priors(args, out: Path) -> int:
    """The model's class fractions, from the ADP's own predictions on vanilla samples."""
    from utils.app.runtime import pick_device
    from utils.sampling.pipeline import load_adp_for, load_pipeline, plan_batches
    from utils.sampling.seeds import SeededNoise
    if not args.adp:
        raise ValueError("--priors_from_samples N needs --adp (the ADP to complete)")
    cfg = load_config(input_path(args.config or "configs/digits16.yml"))
    pipe = load_pipeline(cfg, pick_device("auto"))
    path = resolve_path(input_path(args.adp))
    adp = load_adp_for(pipe, path)
    last = pipe.sampler.timesteps[-1]
    counts = {a: torch.zeros(len(c), dtype=torch.float64) for a, c in adp.attributes.items()}
    seeds = list(range(100_000, 100_000 + args.priors_from_samples))
    for batch in plan_batches(seeds, 100):
        noise = SeededNoise(batch, pipe.image_shape, pipe.device)
        seen = {}

        def record(h, step):
            if step.t == last:
                seen.update({a: v.argmax(1).cpu() for a, v in adp.logits(h, step.t).items()})
            return h
        pipe.sampler.sample(noise.x_T(), noise.step, edit_h=record)
        for a, pred in seen.items():
            counts[a] += torch.bincount(pred, minlength=len(counts[a])).double()
    adp = ADP.load(path)                     # on the CPU, as it was
    adp.class_prior = {a: (c / c.sum()).tolist() for a, c in counts.items()}
    source = {**(adp.meta.get("data_source") or {}),
              "class_prior_from": f"the ADP's last-step predictions on {len(seeds)} vanilla samples, "
                                  f"seeds {seeds[0]}-{seeds[-1]}"}
    out.parent.mkdir(parents=True, exist_ok=True)
    adp.save(out, adp.meta["model"], source, adp.meta.get("metrics") or {}, adp.meta.get("imported"))
    print(f"wrote {out}: class fractions " + "; ".join(f"{a} " + "/".join(f"{v:.3f}" for v in p)
                                                      for a, p in adp.class_prior.items()))
    return 0


def run(args, attrs: list[str] | None) -> int:
    setup_logging()
    check_numbers(args)
    what = command(args)
    out = output_path(args.out)
    check_out(out, args.overwrite, reports=what == "data")
    if what == "import_original":
        return import_original(args, out)
    if what == "directions_from":
        return add_directions(args, out)
    if what == "priors_from_samples":
        return add_priors(args, out)
    return train(args, attrs, out)


@guarded
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    attrs = None
    if args.attributes is not None and not args.import_original:
        attrs = [a.strip() for a in args.attributes.split(",") if a.strip()]
        if not attrs:
            raise ValueError(f"--attributes {args.attributes!r} names no attribute; e.g. --attributes parity,digit")
    return run(args, attrs)


if __name__ == "__main__":
    raise SystemExit(main())
