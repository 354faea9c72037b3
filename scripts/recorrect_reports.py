"""Add judge-corrected fractions and FD to stored reports measured before the judge carried its
confusion, without regenerating a single image, and re-render their tables.

    python scripts/recorrect_reports.py                 # every stored report under docs/
    python scripts/recorrect_reports.py docs/results_speed/speed.json --dry_run
    python scripts/recorrect_reports.py --check_live 100   # live vs recorrected on fresh samples

A stored report's per-attribute ``fractions`` are exact argmax-label fractions of ``n`` images,
so they give the class counts c = n * fractions. Resampling the images with replacement is
exactly c* ~ Multinomial(n, c / n), so the labels ``np.repeat(arange(K), c)`` stand in for the
lost ones: ``corrected_attributes`` (the live code, its seed and 1,000 rounds) then draws the
same replicates it would have drawn on the images, and the corrected fractions, corrected FD and
their intervals are those a fresh evaluation would report (bit for bit; --check_live shows it).
Joint FDs get ``fd_corrected: None``, as live. Every recorrected report (or bench row) gets
``corrected_from_stored_fractions: true``; no other number changes.

Kinds of file: one report (scripts/evaluate.py --out; no table); a bench/guidance_eval.py
report list (``<name>.json``; its ``<name>.md`` table is re-rendered with that script's
``table``, the lines around the table kept); a bench/run_all.py result (``bench(_quick).json``;
RESULTS_bench(_quick).md re-rendered by ``run_all.py --report``, docs/RESULTS.md and the plots
left alone); a bench/pixel_guidance_sweep.py table stored without its JSON (``sweep_*.md``; the
counts are read back from its fractions and its n, and the corrected cells spliced into the rows).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import tempfile
from pathlib import Path

import numpy as np

from utils.app.cli import guarded
from utils.app.config import load_config
from utils.app.runtime import setup_logging
from utils.evaluation.correction import corrected_attributes
from utils.evaluation.evaluate import fd_cell, fractions_cell, judge_from_config
from utils.evaluation.metrics import bootstrap_fd

log = logging.getLogger("recorrect")

MARK = "corrected_from_stored_fractions"
#: fields the live evaluation adds per attribute, per joint FD, per sample run, per bench row
ATTR_FIELDS = ("fractions_corrected", "fractions_corrected_ci", "fd_corrected", "fd_corrected_ci")
ROW_FIELDS = ("fractions_corrected", "fd_corrected", "fd_corrected_ci")
SHARE_FIELD = "requested_class_share_corrected"
STORED = ["docs/results_acceptance/acceptance.json", "docs/results_preservation/preservation.json",
          "docs/results_preservation_within/preservation.json", "docs/results_sample/sample.json",
          "docs/results_balance/balance.json", "docs/results_balance_soft/balance.json",
          "docs/results_distributed/distributed.json", "docs/results_speed/speed.json",
          "docs/results_pixel_baselines/sweep_rejection.md", "docs/results_pixel_baselines/sweep_x0.md",
          "docs/results_pixel_baselines/sweep_xt.md", "docs/bench.json", "docs/bench_quick.json"]


# ---------------------------------------------------------------------------------------------
# counts back from fractions, and the live correction on them

def class_counts(fractions, n, where: str = "report") -> np.ndarray:
    """Class counts [K] = n * fractions, checked to be whole numbers that sum to n (argmax-label
    fractions of n images are; rounded or soft fractions are refused)."""
    if fractions is None or n is None:
        raise ValueError(f"{where}: need the argmax 'fractions' and the image count 'n' to recorrect, "
                         f"got fractions={fractions!r}, n={n!r}")
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or f.size < 2 or int(n) < 1:
        raise ValueError(f"{where}: fractions must be a list of >= 2 class fractions and n >= 1, "
                         f"got {fractions!r}, n={n!r}")
    c = np.rint(f * int(n))
    if np.abs(c - f * int(n)).max() > 1e-6 or c.sum() != int(n) or (c < 0).any():
        raise ValueError(f"{where}: fractions {f.tolist()} are not whole counts of n={n} images "
                         f"(n * fractions = {(f * int(n)).round(4).tolist()}); only exact argmax fractions "
                         "can be recorrected")
    return c.astype(np.int64)


def labels_from_counts(counts) -> np.ndarray:
    """Labels [N] with counts[k] images of class k: resampling them is resampling the images."""
    return np.repeat(np.arange(len(counts)), counts)


def _insert_after(d: dict, key: str, new: dict) -> dict:
    """A copy of d with ``new`` placed right after ``key`` (where the live code puts them)."""
    out = {}
    for k, v in d.items():
        out[k] = v
        if k == key:
            out.update(new)
    return out


def _check_fd(m: dict, target, where: str) -> None:
    """The stored FD must be ||target - fractions||: else the fractions or the target are not
    those the FD was measured on, and a corrected FD beside it would mislead."""
    fd = float(np.linalg.norm(np.asarray(target, float) - np.asarray(m["fractions"], float)))
    if abs(fd - m["fd"]) > 1e-9:
        raise ValueError(f"{where}: stored fd {m['fd']} is not ||target - fractions|| = {fd}")


def strip_corrected(rep: dict) -> dict:
    """A copy of a report without any corrected field or the recorrection mark."""
    rep = copy.deepcopy(rep)
    for m in rep.get("attributes", {}).values():
        for f in ATTR_FIELDS:
            m.pop(f, None)
    rep.get("joint", {}).pop("fd_corrected", None)
    for m in rep.get("joint_targets", {}).values():
        m.pop("fd_corrected", None)
    for f in (SHARE_FIELD, MARK):
        rep.pop(f, None)
    return rep


def _requested_class(rep: dict) -> tuple[str, int]:
    """(attribute, class) a sample run asked for: the plan's, else the one-hot target's."""
    attr = next(iter(rep["spec"]["targets"]))
    classes = rep.get("guidance", {}).get("classes")
    if classes:
        return attr, int(classes[attr])
    target = rep["attributes"][attr]["target"]
    return attr, int(np.argmax(target))


def recorrect_report(rep: dict, confusion: dict) -> dict:
    """A copy of an evaluate_images report (guidance_eval adds name, spec, ...) with the corrected
    fields the live evaluation adds, computed from each attribute's stored fractions and n with
    ``corrected_attributes`` (same seed and rounds); ``confusion``: {attribute: counts [K, K]}."""
    name = f"report {rep['name']!r}" if "name" in rep else "report"
    if MARK in rep:                       # recorrected before: compute again from the raw report
        rep = strip_corrected(rep)
    if "attributes" not in rep:
        raise ValueError(f"{name}: no 'attributes'; not an evaluation report")
    if any(f in m for m in rep["attributes"].values() for f in ATTR_FIELDS):
        raise ValueError(f"{name} already carries live corrected fields; nothing to recorrect")
    labels, targets = {}, {}
    for a, m in rep["attributes"].items():
        where = f"{name}, attribute {a!r}"
        labels[a] = labels_from_counts(class_counts(m.get("fractions"), m.get("n", rep.get("n")), where))
        if "fd" in m:
            if "target" not in m:
                raise ValueError(f"{where}: has an fd but no target")
            _check_fd(m, m["target"], where)
            targets[a] = m["target"]
    out = copy.deepcopy(rep)
    for a, fields in corrected_attributes(labels, targets, confusion).items():
        out["attributes"][a].update(fields)
    if "fd" in out.get("joint", {}):
        out["joint"]["fd_corrected"] = None
    for m in out.get("joint_targets", {}).values():
        m["fd_corrected"] = None
    if "requested_class_share" in out:
        a, c = _requested_class(out)
        m = out["attributes"][a]
        if m["fractions"][c] != out["requested_class_share"]:
            raise ValueError(f"{name}: requested_class_share {out['requested_class_share']} is not "
                             f"{a} class {c}'s fraction {m['fractions'][c]}")
        share = m["fractions_corrected"][c] if m.get("fractions_corrected") is not None else None
        out = _insert_after(out, "requested_class_share", {SHARE_FIELD: share})
    out[MARK] = True
    return out


def recorrect_bench_row(row: dict, confusion: dict, attr: str, target) -> dict:
    """A copy of a bench/run_all.py row (``attr``'s fractions, fd and n) with the corrected
    fields its ``Bench._finish`` takes from the live report, placed after ``fd_ci`` as there."""
    where = f"bench row {row.get('name')!r}"
    if MARK in row:                       # recorrected before: compute again from the raw row
        row = _strip_row(row)
    if any(f in row for f in ROW_FIELDS):
        raise ValueError(f"{where} already carries live corrected fields; nothing to recorrect")
    labels = labels_from_counts(class_counts(row.get("fractions"), row.get("n"), where))
    _check_fd(row, target, where)
    fields = corrected_attributes({attr: labels}, {attr: target}, confusion)[attr]
    out = _insert_after(row, "fd_ci", {f: fields[f] for f in ROW_FIELDS})
    out[MARK] = True
    return out


def _strip_row(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ROW_FIELDS + (MARK,)}


def _bench_rows(res: dict, fn) -> dict:
    """A copy of a run_all result with ``fn`` applied to every row of methods, ablations, scaling."""
    out = copy.deepcopy(res)
    out["methods"] = [fn(r) for r in res["methods"]]
    out["ablations"] = {k: [fn(r) for r in rows] for k, rows in res["ablations"].items()}
    out["scaling"] = [fn(r) for r in res["scaling"]]
    return out


def recorrect_bench(res: dict, confusion: dict, attr: str, target) -> dict:
    """bench(_quick).json with every row of methods, ablations and scaling recorrected."""
    return _bench_rows(res, lambda r: recorrect_bench_row(r, confusion, attr, target))


def only_added(old, new, path: str = "") -> list[str]:
    """Differences between old and new other than added keys; [] when new only adds fields."""
    if isinstance(old, dict) and isinstance(new, dict):
        errs = [f"{path}/{k}: removed" for k in old if k not in new]
        return errs + [e for k in old if k in new for e in only_added(old[k], new[k], f"{path}/{k}")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [e for i, (a, b) in enumerate(zip(old, new)) for e in only_added(a, b, f"{path}[{i}]")]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


# ---------------------------------------------------------------------------------------------
# files: guidance_eval report lists, run_all results, pixel sweep tables

def _split_table(text: str) -> tuple[list[str], list[str], list[str]]:
    """(lines before, the table's lines, lines after) of a Markdown text with one table."""
    lines = text.rstrip("\n").split("\n")
    rows = [i for i, line in enumerate(lines) if line.startswith("|")]
    if not rows or rows != list(range(rows[0], rows[-1] + 1)):
        raise ValueError("expected exactly one Markdown table")
    return lines[:rows[0]], lines[rows[0]:rows[-1] + 1], lines[rows[-1] + 1:]


def recorrect_guidance_eval(path: Path, confusion: dict, dry_run: bool) -> list[tuple]:
    """<name>.json (a list of reports) and its <name>.md, re-rendered by guidance_eval.table."""
    from bench.guidance_eval import table
    old = json.loads(path.read_text())
    new = [recorrect_report(r, confusion) for r in old]
    _assert_only_added(path, [strip_corrected(r) if MARK in r else r for r in old], new)
    md = path.with_suffix(".md")
    before, _, after = _split_table(md.read_text())
    text = "\n".join(before + [table(new)] + after) + "\n"
    if not dry_run:
        path.write_text(json.dumps(new, indent=1) + "\n")
        md.write_text(text)
    return [(r["name"], a, m.get("fd"), m.get("fd_corrected"), m.get("fd_corrected_ci"))
            for r in new for a, m in r["attributes"].items() if "fd" in m]


def recorrect_bench_file(path: Path, confusion: dict, dry_run: bool) -> list[tuple]:
    """bench(_quick).json and RESULTS_bench(_quick).md via ``bench/run_all.py --report`` into a
    scratch folder (it also writes plots and a RESULTS.md section, which are not copied back)."""
    from bench.run_all import TARGET, main as run_all
    (attr, target), = TARGET.items()
    old = json.loads(path.read_text())
    new = recorrect_bench(old, confusion, attr, target)
    rows = new["methods"] + [r for rs in new["ablations"].values() for r in rs] + new["scaling"]
    suffix = "_quick" if path.stem.endswith("_quick") else ""
    if path.name != f"bench{suffix}.json":
        raise ValueError(f"{path}: a run_all result must be named bench.json or bench_quick.json")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.json"
        src.write_text(json.dumps(new, indent=1, default=str) + "\n")
        if run_all(["--report", str(src), "--out", tmp] + (["--quick"] if suffix else [])) != 0:
            raise RuntimeError(f"bench/run_all.py --report {src} failed")
        md, js = (Path(tmp) / f"RESULTS_bench{suffix}.md").read_text(), (Path(tmp) / path.name).read_text()
    _assert_only_added(path, _bench_rows(old, _strip_row), json.loads(js))
    if not dry_run:
        path.write_text(js)
        (path.parent / f"RESULTS_bench{suffix}.md").write_text(md)
    return [(r["name"], attr, r["fd"], r["fd_corrected"], r["fd_corrected_ci"]) for r in rows]


PIXEL_HEAD = re.compile(r"^(\w+) -> \[([^\]]+)\]: n=(\d+),")


def recorrect_pixel_table(path: Path, confusion: dict, dry_run: bool) -> list[tuple]:
    """A bench/pixel_guidance_sweep.py table kept without its JSON: counts from each row's
    fractions and the header's n; the raw FD cell is recomputed from them and must equal the
    stored one; the corrected fractions and the corrected FD column are spliced in."""
    before, lines, after = _split_table(path.read_text())
    got = PIXEL_HEAD.match(before[0]) if before else None
    if got is None:
        raise ValueError(f"{path}: first line should read '<attr> -> [p, q]: n=N, ...', got {before[:1]}")
    attr, target, n = got[1], [float(v) for v in got[2].split(",")], int(got[3])
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    if "corrected FD [95% CI]" in head:       # recorrected before: take the raw columns back out
        lines = [_drop_cell(line, head.index("corrected FD [95% CI]")) for line in lines]
        lines = [re.sub(r" \(corr\. [^)]*\)", "", line) for line in lines]
        after = [line for line in after if not line.startswith("Corrected FD added")]
        while after and not after[-1].strip():
            after.pop()
        head = [c.strip() for c in lines[0].strip("|").split("|")]
    i_fr, i_fd = head.index("judge fractions"), head.index("FD [95% CI]")
    out, summary = [], []
    for line in lines[2:]:
        cells, rest = _cells(line)
        where = f"{path.name}, row {cells[0]!r}"
        counts = class_counts([float(v) for v in cells[i_fr].split("/")], n, where)
        labels = labels_from_counts(counts)
        fd, lo, hi = bootstrap_fd(labels, target, len(counts))
        m = {"fractions": (counts / n).tolist(), "fd": fd, "fd_ci": [lo, hi]}
        if fd_cell(m) != cells[i_fd] or fractions_cell(m) != cells[i_fr]:
            raise ValueError(f"{where}: counts {counts.tolist()} give {fractions_cell(m)} / FD {fd_cell(m)}, "
                             f"the table has {cells[i_fr]} / {cells[i_fd]}")
        m.update(corrected_attributes({attr: labels}, {attr: target}, confusion)[attr])
        cells[i_fr] = fractions_cell(m)
        cells.insert(i_fd + 1, fd_cell(m, "fd_corrected"))
        out.append("| " + " | ".join(cells) + " |" + rest)
        summary.append((cells[0], attr, fd, m["fd_corrected"], m["fd_corrected_ci"]))
    head[i_fr] = "judge fractions (corr. = corrected for its confusion)"
    head.insert(i_fd + 1, "corrected FD [95% CI]")
    note = (f"Corrected FD added from the stored fractions and n={n} by scripts/recorrect_reports.py "
            "(no JSON was kept; images not regenerated).")
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + out
    if not dry_run:
        path.write_text("\n".join(before + table + after + ["", note]) + "\n")
    return summary


def _cells(line: str) -> tuple[list[str], str]:
    """A table row's cells and any text after its closing '|' (the sweep's 'drawn ...' note)."""
    body, rest = line.rsplit("|", 1)
    return [c.strip() for c in body.strip().lstrip("|").split("|")], rest


def _drop_cell(line: str, i: int) -> str:
    cells, rest = _cells(line)
    del cells[i]
    return ("|" + "---|" * len(cells)) if set("".join(cells)) <= {"-"} else "| " + " | ".join(cells) + " |" + rest


def _assert_only_added(path: Path, old, new) -> None:
    errs = only_added(old, new)
    if errs:
        raise RuntimeError(f"{path}: recorrecting changed stored numbers: {errs[:5]}")


def recorrect_file(path: Path, confusion: dict, dry_run: bool = False) -> list[tuple]:
    """Recorrect one stored file in place (and re-render its table); returns one
    (run, attribute, fd, fd_corrected, fd_corrected_ci) per targeted attribute of each row."""
    if path.suffix == ".md":
        return recorrect_pixel_table(path, confusion, dry_run)
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "methods" in data:
        return recorrect_bench_file(path, confusion, dry_run)
    if isinstance(data, list):
        return recorrect_guidance_eval(path, confusion, dry_run)
    if isinstance(data, dict) and "attributes" in data:     # one report (scripts/evaluate.py --out)
        new = recorrect_report(data, confusion)
        _assert_only_added(path, strip_corrected(data), new)
        if not dry_run:
            path.write_text(json.dumps(new, indent=1) + "\n")
        return [(path.stem, a, m["fd"], m.get("fd_corrected"), m.get("fd_corrected_ci"))
                for a, m in new["attributes"].items() if "fd" in m]
    raise ValueError(f"{path}: not an evaluation report (list), a run_all bench JSON or a pixel sweep table")


# ---------------------------------------------------------------------------------------------
# live check: a fresh evaluation against its recorrected copy

def check_live(cfg: dict, judge, n: int, bs: int) -> list[str]:
    """Sample n vanilla images (seeds 0..n-1), evaluate them live with marginal and joint targets,
    strip the corrected fields, recorrect from the fractions: [] when every field is equal."""
    import torch
    from utils.evaluation.evaluate import evaluate_images
    from utils.sampling.pipeline import load_pipeline, plan_batches, sample_batches
    pipe = load_pipeline(cfg, torch.device("cpu"))
    imgs = [im for _, im, _ in sample_batches(pipe, plan_batches(list(range(n)), bs), desc="vanilla")]
    x = torch.from_numpy(np.concatenate(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    targets = {a: [1.0 / len(c)] * len(c) for a, c in judge.attributes.items()}   # every marginal
    first, second = list(judge.attributes)[:2]                                       # and a joint key
    k = len(judge.attributes[first]) * len(judge.attributes[second])
    targets[f"{first}*{second}"] = [1.0 / k] * k
    live = json.loads(json.dumps(evaluate_images(x, judge, targets)))
    again = recorrect_report(strip_corrected(live), judge.confusion_counts())
    again.pop(MARK)
    errs = [f"{k}: {d}" for k, d in (("report", only_added(live, again)), ("reverse", only_added(again, live))) if d]
    for a, m in live["attributes"].items():
        log.info("live %s: fd %s corrected %s | recorrected %s", a, fd_cell(m), fd_cell(m, "fd_corrected"),
                 fd_cell(again["attributes"][a], "fd_corrected"))
    return errs


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", help=f"stored reports (default: {len(STORED)} files under docs/)")
    p.add_argument("--config", default="configs/digits16.yml", help="its judge's stored confusion is used")
    p.add_argument("--dry_run", action="store_true", help="print the figures, write nothing")
    p.add_argument("--check_live", type=int, metavar="N",
                   help="instead: evaluate N fresh vanilla samples live and compare with their recorrected copy")
    p.add_argument("--bs", type=int, default=100, help="with --check_live: batch size")
    args = p.parse_args(argv)
    setup_logging()
    cfg = load_config(args.config)
    judge = judge_from_config(cfg)
    confusion = judge.confusion_counts()
    if not confusion:
        raise ValueError(f"the judge of {args.config} stores no confusion; run scripts/calibrate_judge.py first")
    if args.check_live:
        errs = check_live(cfg, judge, args.check_live, args.bs)
        print("live and recorrected reports are identical" if not errs else "\n".join(["DIFFERENT:"] + errs))
        return 0 if not errs else 1
    for path in [Path(s) for s in (args.paths or STORED)]:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such report")
        rows = recorrect_file(path, confusion, args.dry_run)
        print(f"{path}{' (dry run)' if args.dry_run else ''}:")
        for run, a, fd, fd_c, ci in rows:
            cor = "-" if fd_c is None else f"{fd_c:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
            print(f"  {run} | {a}: FD {fd:.3f} -> corrected {cor}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
