"""A text-conditional config against its acceptance list, read from the stored benchmark rows
(the JSON files of bench/t2i_eval.py's entries) and the model's training record; one markdown
table, no sampling (benchmark kind ``t2i_summary``).

    python bench/run.py t2i --only summary            # docs/results_t2i/summary.md
    python bench/t2i_summary.py --out docs/results_t2i/summary.md        # the same, by flags

Bounds: vanilla even share within 0.05 of the record (CFG 3 and 7.5); parity 50/50 FD <= 0.03
at batch 100 and <= 0.05 at batch 8 with the running balance; 20/80 FD <= 0.05; under parity
guidance "a small digit" >= 95% digits 0-4 and "a large digit" >= 95% digits 5-9; Frechet within
1.25x of vanilla's and confident share within 5 points below vanilla's (parity 50/50 rows; the
20/80 rows are reported against real digits reweighted to 20/80); guided / vanilla wall time
<= 1.10 (the U-Net default's; an entry's ``wall_bound``, --wall_bound: another, the transformer
default's 1.05).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.files import resolve_path
from utils.app.cli import guarded
from utils.app.config import load_config

HOLDS = ("a small digit", "a large digit")


def _find(folders: Path | list[Path], preset: str) -> Path | None:
    """The first of the folders holding ``<preset>.json``."""
    for folder in folders if isinstance(folders, list) else [folders]:
        if (folder / f"{preset}.json").exists():
            return folder / f"{preset}.json"
    return None


def _rows(folders: Path | list[Path], preset: str) -> list[dict]:
    path = _find(folders, preset)
    if path is None:
        raise FileNotFoundError(f"{preset}.json is missing from {folders}: run its entry first "
                                f"(python bench/run.py t2i --only {preset})")
    return json.loads(path.read_text())


def _pick(rows: list[dict], prompt: str, name: str) -> dict | None:
    return next((r for r in rows if r["prompt"] == prompt and r["name"] == name), None)


def _ok(flag: bool) -> str:
    return "yes" if flag else "**no**"


def summary(folder: Path | list[Path], record: dict, wall_bound: float = 1.10) -> list[tuple[str, str, str, str]]:
    """(item, figures, bound, met) rows from the tables in ``folder`` (or the first of several
    folders that holds each); ``wall_bound``: the guided / vanilla wall-time bound."""
    van, acc = _rows(folder, "vanilla"), _rows(folder, "acceptance")
    prompts = list(dict.fromkeys(r["prompt"] for r in van))
    biased = list(dict.fromkeys(r["prompt"] for r in acc))
    out = []
    for cfg in (3, 7.5):
        figs, met = [], True
        for q in prompts:
            r = _pick(van, q, f"vanilla, CFG {cfg:g}")
            want = record[q]["fractions"]["parity"]["even"]
            got = r["attributes"]["parity"]["fractions"][0]
            met &= abs(got - want) <= 0.05
            figs.append(f"{q}: {got:.3f} vs {want:.2f}")
        out.append((f"the bias is real: vanilla even share vs the record, CFG {cfg:g}", "; ".join(figs),
                    "within 0.05", _ok(met)))
    for name, bound in (("ours parity 50/50, batch 100", 0.03),
                        ("ours parity 50/50, batch 8, running balance", 0.05),
                        ("ours parity 20/80 (even/odd)", 0.05)):
        fds = [_pick(acc, q, name)["attributes"]["parity"]["fd"] for q in biased]
        out.append((f"{name}: FD", " / ".join(f"{v:.3f}" for v in fds), f"<= {bound}",
                    _ok(all(v <= bound for v in fds))))
    uni = "ours digit uniform over the prompt's digits"
    out.append(("digit uniform over the prompt's digits: digit FD (vanilla)", " / ".join(
        f"{_pick(acc, q, uni)['attributes']['digit']['fd']:.3f} "
        f"({_pick(acc, q, 'vanilla, CFG 3')['attributes']['digit']['fd']:.3f})" for q in biased), "reported", "-"))
    for name in ("ours parity 50/50, batch 100", "ours parity 50/50, batch 8, running balance"):
        held = [(q, _pick(acc, q, name)["in_prompt"], _pick(acc, q, "vanilla, CFG 3")["in_prompt"])
                for q in biased if q in HOLDS]
        out.append((f"the prompt holds, {name} (vanilla)", "; ".join(f"{q}: {v:.3f} ({w:.3f})" for q, v, w in held),
                    ">= 0.95", _ok(all(v >= 0.95 for _, v, _ in held))))
    for name in ("ours parity 50/50, batch 100", "ours parity 50/50, batch 8, running balance"):
        pairs = [(_pick(acc, q, name), _pick(acc, q, "vanilla, CFG 3")) for q in biased]
        fr_ok = all(g["frechet"] <= 1.25 * v["frechet"] for g, v in pairs)
        cs_ok = all(g["confident_share"] >= v["confident_share"] - 0.05 for g, v in pairs)
        out.append((f"quality, {name}: Frechet (vanilla); confident (vanilla)", " / ".join(
            f"{g['frechet']:.2f} ({v['frechet']:.2f}); {g['confident_share']:.3f} ({v['confident_share']:.3f})"
            for g, v in pairs), "<= 1.25x; >= vanilla - 0.05", _ok(fr_ok and cs_ok)))
    name = "ours parity 20/80 (even/odd)"       # farther from balanced real digits by design
    out.append((f"quality, {name}: Frechet to real digits reweighted to 20/80 (vanilla, to balanced)", " / ".join(
        f"{_pick(acc, q, name)['frechet_matched']:.2f} ({_pick(acc, q, 'vanilla, CFG 3')['frechet']:.2f})"
        for q in biased), "reported", "-"))
    for preset in ("rows", "compare"):
        if _find(folder, preset) is not None:
            rows = _rows(folder, preset)
            n = rows[0]["n"]
            for name in dict.fromkeys(r["name"] for r in rows if r["spec"]["mode"] != "vanilla"):
                picked = [_pick(rows, q, name) for q in biased]
                out.append((f"{preset} (n={n}): {name}", " / ".join(
                    f"FD {r['attributes']['parity']['fd']:.3f}, Frechet {r['frechet']:.2f}, confident "
                    f"{r['confident_share']:.3f}, in prompt {r['in_prompt']:.3f}, {r['wall_s'] / r['n']:.3f} s/img"
                    for r in picked if r), "side by side", "-"))
    if _find(folder, "speed") is not None:
        for r in _rows(folder, "speed"):
            out.append((f"guided / vanilla wall time, {r['prompt']}, {r['batches']} batches of {r['batch']}",
                        f"{r['ratio']:.3f} ({r['median_s']['guided']:.2f} vs {r['median_s']['vanilla']:.2f} s)",
                        f"<= {wall_bound:.2f}", _ok(r["ratio"] <= wall_bound)))
    return out


def markdown(folders: Path | list[Path], config: str, wall_bound: float = 1.10) -> str:
    """The summary table of the tables in ``folders`` for ``config``'s model."""
    cfg = load_config(config)
    record = json.loads((resolve_path(cfg["model"]["checkpoint"]) / "record.json").read_text())["prompts"]
    lines = ["| item | figure (per prompt) | bound | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary(folders, record, wall_bound)]
    return "\n".join(lines)


def run_entry(entry, ctx) -> None:
    """Kind t2i_summary: the table of ``results`` (under --into DIR first, then the repository)."""
    folders = [ctx.out(entry["results"]), resolve_path(entry["results"])]
    md = markdown(list(dict.fromkeys(folders)), entry["config"], entry["wall_bound"])
    ctx.out(entry.output).write_text(md + "\n")
    print(md)


@guarded
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits16_t2i.yml")
    p.add_argument("--results", default="docs/results_t2i", help="the folder of the t2i tables (their .json files)")
    p.add_argument("--out", help="also write the table here")
    p.add_argument("--wall_bound", type=float, default=1.10, help="the guided / vanilla wall-time bound")
    args = p.parse_args(argv)
    md = markdown(Path(args.results), args.config, args.wall_bound)
    if args.out:
        Path(args.out).write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
