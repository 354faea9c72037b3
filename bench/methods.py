"""Every method side by side on the embedded default, ablations of ours, and cost scaling
(benchmark kind ``methods``; the tables of docs/RESULTS.md section 3).

    python bench/run.py methods              # docs/RESULTS_bench.md, docs/bench.json, docs/bench_plots/ (make bench)
    python bench/run.py quick                # the same tables on fewer images: < 5 min (make bench-quick)

On the embedded default (shared seeds, target parity 50/50, judged by the independent judge):
  1. methods: vanilla; rejection sampling with the judge (the oracle; how many it drew);
     sample guidance with the requested classes split in the target proportions (plain, and
     checked: misses redrawn); distribution guidance with the `paper` preset (the original
     code's step) and the `ours` preset (via the digit head, quota estimator, running balance
     counted by the finished-image check);
     pixel-space classifier guidance on x_t and on x0_hat (gradient through the U-Net);
     ours with the asymmetric reverse process;
  2. ablations of ours: batch size, guidance scale, guided timesteps, ADP training-set size
     (the grids are the entry's: batch_sizes, scales, guided_steps, adp_sizes);
  3. scaling: seconds per image and peak memory against batch size and number of DDIM steps.
Writes RESULTS_bench<suffix>.md (the entry's output), bench<suffix>.json and PNG plots under
bench_plots/ (``*<suffix>.png``) beside it, and the same tables into the entry's
``results_md`` between the markers <!-- SECTION:begin/end --> (no section: not written).
Figures: FD = ||p_target - p_judge||_2 (lower is better), corrected FD: the same with the judge's
fractions corrected for its confusion on held-out real data (utils/evaluation/correction.py;
"corr." fractions), Frechet = Frechet distance in the
judge's feature space to held-out real digits (lower is better), confident = share the judge
classifies with p >= 0.9 (higher is better), s/img = wall seconds per image, peak = peak
resident memory of the process during the row (CPU) or peak allocated GPU memory (CUDA).
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch

from models.adp import ADP
from models.labellers import load_labeller
from utils.app.config import load_config
from utils.app.runtime import pick_device
from utils.evaluation.evaluate import evaluate_images, fd_cell, judge_from_config, real_reference
from utils.evaluation.plots import line_plot
from utils.guidance import build_guide, build_plan
from utils.sampling.pipeline import load_adp_for, load_pipeline, plan_batches, sample_batches

TARGET = {"parity": [0.5, 0.5]}
OURS = dict(preset="ours")
PAPER = dict(preset="paper")


class PeakMemory:
    """Peak memory while the block runs: GPU allocator peak on CUDA, else resident set size
    sampled every 10 ms from /proc (MB)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb, self.start_mb, self._stop = device, 0.0, 0.0, threading.Event()

    def _rss_mb(self) -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        except OSError:
            return float("nan")

    def _watch(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._rss_mb())
            time.sleep(0.01)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2 ** 20
        else:
            self.start_mb = self._rss_mb()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        else:
            self._stop.set()
            self._thread.join()


class Bench:
    """Shared state: pipeline, ADP, judge, real reference; one method per kind of row."""

    def __init__(self, cfg: dict, device: torch.device):
        self.cfg, self.device = cfg, device
        self.pipe = load_pipeline(cfg, device)
        self.adp = load_adp_for(self.pipe, cfg["adp"])
        self.judge, self.real = judge_from_config(cfg), real_reference(cfg)
        self.labeller = load_labeller(cfg["labeller"]) if cfg.get("labeller") else None

    def _finish(self, name: str, imgs: list[np.ndarray], wall: float, mem: PeakMemory, **extra) -> dict:
        x = torch.from_numpy(np.concatenate(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
        rep = evaluate_images(x, self.judge, TARGET, self.real)
        par = rep["attributes"]["parity"]
        row = {"name": name, "n": len(x), "fractions": par["fractions"], "fd": par["fd"],
               "fd_ci": par["fd_ci"], "fractions_corrected": par.get("fractions_corrected"),
               "fd_corrected": par.get("fd_corrected"), "fd_corrected_ci": par.get("fd_corrected_ci"),
               "frechet": rep.get("frechet"), "confident": rep["confident_share"],
               "wall_s": wall, "s_per_img": wall / len(x), "peak_mb": mem.peak_mb,
               "extra_mb": mem.peak_mb - mem.start_mb, **extra}
        print(f"  {name}: parity {_parity(row)} FD {par['fd']:.3f} (corrected {fd_cell(row, 'fd_corrected')}) "
              f"Frechet {row['frechet']:.2f} confident {row['confident']:.3f} {row['s_per_img']:.4f} s/img",
              flush=True)
        return row

    def _timed(self, batches_iter):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0, imgs = time.time(), []
        for _, im, _ in batches_iter:
            imgs.append(im)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return imgs, time.time() - t0

    def h_run(self, name: str, seeds: list[int], bs: int, mode: str = "vanilla", targets=None,
              asymmetric: bool = False, adp: ADP | None = None, sample_classes: list[int] | None = None,
              **settings) -> dict:
        """Vanilla, sample- or distribution-guided h-space sampling of ``seeds``; ``settings``:
        guidance settings over the config's (e.g. preset="paper", check=False)."""
        adp = adp or self.adp

        def guide_for(m: str, raw: dict):
            plan = build_plan(self.cfg, m, raw, adp.attributes, settings, None, adp.priors())
            return build_guide(self.cfg, plan, adp, self.pipe.sampler.schedule.betas, labeller=self.labeller)
        extra = {}
        with PeakMemory(self.device) as mem:
            if mode == "sample":           # requested classes in the target proportions
                imgs, wall, redrawn = [], 0.0, None
                for c in (0, 1):
                    part = [s for s, k in zip(seeds, sample_classes) if k == c]
                    guide = guide_for("sample", {"parity": str(c)})
                    im, w = self._timed(sample_batches(self.pipe, plan_batches(part, bs), guide, asymmetric,
                                                       name, progress=False))
                    imgs, wall = imgs + im, wall + w
                    got = guide.summary()["redrawn_by_check"]
                    redrawn = None if got is None else (redrawn or 0) + got
                if redrawn is not None:
                    extra["redrawn"] = redrawn
            else:
                guide = guide_for(mode, targets or {"parity": "0.5"}) if mode == "distribution" else None
                imgs, wall = self._timed(sample_batches(self.pipe, plan_batches(seeds, bs), guide,
                                                        asymmetric, name, progress=False))
        return self._finish(name, imgs, wall, mem, **extra)

    def rejection(self, name: str, n: int, bs: int) -> dict:
        from utils.baselines.rejection import rejection_sample
        with PeakMemory(self.device) as mem:
            res = rejection_sample(self.pipe, self.judge, "parity", TARGET["parity"], n, bs, progress=False)
        return self._finish(name, [res.images], res.wall_s, mem, drawn=res.n_drawn)

    def pixel(self, name: str, seeds: list[int], bs: int, variant: str) -> dict:
        from utils.baselines.pixel_guidance import DEFAULT_SCALES, load_pixel_classifier, pixel_guidance_factory
        clf = load_pixel_classifier(self.cfg, self.device)
        mk = pixel_guidance_factory(self.pipe, clf, "distribution", TARGET, DEFAULT_SCALES[variant], variant)
        with PeakMemory(self.device) as mem:
            imgs, wall = self._timed(sample_batches(self.pipe, plan_batches(seeds, bs), mk, desc=name,
                                                    progress=False))
        return self._finish(name, imgs, wall, mem, scale=DEFAULT_SCALES[variant])


def methods(b: Bench, n: int, bs: int) -> list[dict]:
    seeds = list(range(n))
    rows = [b.h_run("vanilla", seeds, bs)]
    rows.append(b.rejection("rejection sampling (judge oracle)", n, bs))
    split = [0] * (n // 2) + [1] * (n - n // 2)            # requested classes, target proportions
    rows.append(b.h_run("sample guidance, classes split 50/50", seeds, bs, "sample", sample_classes=split,
                        check=False))
    rows.append(b.h_run("sample guidance, split 50/50, checked (ours: misses redrawn)", seeds, bs, "sample",
                        sample_classes=split, check=True))
    rows.append(b.h_run("distribution guidance, paper preset (the original's method)", seeds, bs, "distribution",
                        **PAPER))
    rows.append(b.h_run("distribution guidance, ours (defaults: via the digit head, quota, running balance, check)", seeds, bs,
                        "distribution", **OURS))
    rows.append(b.h_run("ours + asymmetric reverse process", seeds, bs, "distribution", asymmetric=True, **OURS))
    rows.append(b.pixel("pixel classifier guidance on x_t", seeds, bs, "xt"))
    rows.append(b.pixel("pixel guidance on x0_hat (through the U-Net)", seeds, bs, "x0"))
    van = rows[0]["s_per_img"]
    for r in rows:           # per delivered image (rejection pays for every image it drew)
        r["cost_vs_vanilla"] = r["s_per_img"] / van
    return rows


def ablations(b: Bench, entry, workdir: Path) -> dict[str, list[dict]]:
    """Batch size on sizes.batch images (a batch larger than that on one batch of its own size),
    the rest on sizes.ablation images."""
    n, n_batch = entry["sizes"]["ablation"], entry["sizes"]["batch"]
    seeds, bs = list(range(n)), min(100, n)
    out: dict[str, list[dict]] = {name: [] for name in ABLATIONS}
    for size in entry["batch_sizes"]:
        for label, kw in (("ours", OURS), ("paper", PAPER)):
            r = b.h_run(f"{label}, batch {size}", list(range(max(n_batch, size))), size, "distribution", **kw)
            out["batch size"].append({**r, "x": size, "series": label})
    from utils.guidance.settings import resolve_settings
    base = resolve_settings(b.cfg.get("guidance")).distribution_scale[0]
    for mult in entry["scales"]:
        r = b.h_run(f"ours, scale {base * mult:g}", seeds, bs, "distribution", distribution_scale=base * mult, **OURS)
        out["guidance scale"].append({**r, "x": base * mult, "series": "ours"})
    for first, last in entry["guided_steps"]:
        band = f"{first}:{last}"
        r = b.h_run(f"ours, steps {band}", seeds, bs, "distribution", first_step=first, last_step=last, **OURS)
        out["guided steps"].append({**r, "x": band, "series": "ours"})
    out["ADP training set"] = adp_sizes(b, seeds, entry["adp_sizes"], workdir)
    return out


def adp_sizes(b: Bench, seeds: list[int], sizes: list[int], workdir: Path) -> list[dict]:
    """ADPs trained on the first k pseudo-labelled samples of a fresh extraction (k in ``sizes``),
    and the shipped one (2,000 samples)."""
    from models.digits_judge import SVCLabeller
    from utils.data.adp_train import train_adp
    from utils.data.extract import extract_pseudo_labelled, load_h_dataset
    bs = min(100, len(seeds))
    data = workdir / f"h_pseudo_{max(sizes)}"
    extract_pseudo_labelled(b.pipe.sampler, list(range(100_000, 100_000 + max(sizes))), SVCLabeller(), data,
                            {"model": b.pipe.model_id, "config": b.cfg.get("name"), "labeller": "digits_svc"},
                            100, b.device)
    meta, h, labels = load_h_dataset([data], None)
    rows = []
    for k in sizes:
        adp, _ = train_adp(h[:k], {a: v[:k] for a, v in labels.items()}, meta)
        r = b.h_run(f"ours, ADP on {k} samples", seeds, bs, "distribution", adp=adp.to(b.device), **OURS)
        rows.append({**r, "x": k, "series": "ours"})
    r = b.h_run("ours, shipped ADP (2,000 samples)", seeds, bs, "distribution", **OURS)
    rows.append({**r, "x": b.adp.meta["data_source"].get("n", 2000), "series": "ours"})
    return rows


def scaling(b: Bench, entry) -> list[dict]:
    """Seconds per image and peak memory, vanilla vs ours, against batch size (the config's steps)
    and DDIM steps (batch 50; an ADP with random heads stands in on grids it was not trained for)."""
    from utils.sampling.diffusion import DDIMSampler
    rows, n = [], entry["scaling_n"]
    seeds = list(range(n))
    for bs in entry["scaling_batches"]:       # n images per row (a larger batch: one batch of its size)
        for label, mode in (("vanilla", "vanilla"), ("ours", "distribution")):
            r = b.h_run(f"{label}, batch {bs}", seeds[:max(bs, n)], bs, mode, **(OURS if mode != "vanilla" else {}))
            rows.append({**r, "axis": "batch", "x": bs, "series": label})
    orig = b.pipe.sampler
    for steps in entry["scaling_steps"]:
        b.pipe.sampler = DDIMSampler(b.pipe.net, orig.schedule, steps, orig.eta)
        adp = b.adp
        if steps != len(orig.timesteps):
            adp = ADP(b.adp.h_shape, b.pipe.sampler.timesteps, b.adp.attributes).to(b.device)
            torch.nn.init.normal_(adp.weight["parity"], std=1e-3)
            adp.dir_parity.copy_(adp.weight["parity"].detach())    # stand-in directions (timing only)
            adp.class_prior = dict(b.adp.class_prior)
        for label, mode in (("vanilla", "vanilla"), ("ours", "distribution")):
            r = b.h_run(f"{label}, {steps} steps", seeds[:min(n, 50)], min(n, 50), mode, adp=adp,
                        **(OURS if mode != "vanilla" else {}))
            rows.append({**r, "axis": "steps", "x": steps, "series": label})
    b.pipe.sampler = orig
    return rows


def _parity(r: dict) -> str:
    """'0.500/0.500', then ' (corr. 0.498/0.502)' when the row has judge-corrected fractions."""
    text = f"{r['fractions'][0]:.3f}/{r['fractions'][1]:.3f}"
    fc = r.get("fractions_corrected")
    return text if fc is None else text + f" (corr. {fc[0]:.3f}/{fc[1]:.3f})"


def md_methods(rows: list[dict]) -> str:
    lines = ["| method | parity (judge; corr. = corrected) | FD [95% CI] | corrected FD [95% CI] | Frechet | "
             "confident | s/img | cost / vanilla | peak MB (+ during row) | notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = (f"drew {r['drawn']} images for {r['n']}" if "drawn" in r else f"redrew {r['redrawn']}"
                if "redrawn" in r else f"scale {r['scale']}" if "scale" in r else "")
        lines.append(f"| {r['name']} | {_parity(r)} | {fd_cell(r)} | {fd_cell(r, 'fd_corrected')} | "
                     f"{r['frechet']:.2f} | {r['confident']:.3f} | {r['s_per_img']:.4f} | "
                     f"{r['cost_vs_vanilla']:.2f} | {r['peak_mb']:.0f} (+{r['extra_mb']:.0f}) | {note} |")
    return "\n".join(lines)


def md_rows(rows: list[dict], xlabel: str) -> str:
    lines = [f"| {xlabel} | run | parity (judge; corr. = corrected) | FD | corrected FD [95% CI] | Frechet | "
             "confident | s/img | peak MB (+ during row) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['x']} | {r['name']} | {_parity(r)} | {r['fd']:.3f} | {fd_cell(r, 'fd_corrected')} | "
                     f"{r['frechet']:.2f} | {r['confident']:.3f} | {r['s_per_img']:.4f} | {r['peak_mb']:.0f} (+{r['extra_mb']:.0f}) |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    """One line per competitor: is ours ahead on FD at equal or better quality? Quality counts
    as equal within the noise of the figures (Frechet within 5%, confident share within 0.02);
    'not ahead' lines name the figure that decides it."""
    ours = next(r for r in rows if r["name"].startswith("distribution guidance, ours"))
    out = []
    for r in rows:
        if r is ours or r["name"] == "vanilla" or r["name"].startswith("ours +"):
            continue
        fd_ok = ours["fd"] <= r["fd"]
        fr_ok = ours["frechet"] <= 1.05 * r["frechet"]
        conf_ok = ours["confident"] >= r["confident"] - 0.02
        cost = f"cost {ours['cost_vs_vanilla']:.2f}x vs {r['cost_vs_vanilla']:.2f}x vanilla"
        figs = (f"FD {ours['fd']:.3f} vs {r['fd']:.3f}, Frechet {ours['frechet']:.2f} vs {r['frechet']:.2f}, "
                f"confident {ours['confident']:.3f} vs {r['confident']:.3f}, {cost}")
        if fd_ok and fr_ok and conf_ok:
            how = "ahead of" if ours["fd"] < r["fd"] else "level with"
            out.append(f"- {how} **{r['name']}** on FD at equal or better quality ({figs})")
        else:
            why = [w for ok, w in ((fd_ok, "FD"), (fr_ok, "Frechet"), (conf_ok, "confident share")) if not ok]
            out.append(f"- **not** ahead of **{r['name']}**: behind on {', '.join(why)} ({figs})")
    return out


def replace_section(path: Path, key: str, body: str) -> None:
    """Put ``body`` between the markers ``<!-- key:begin -->`` and ``<!-- key:end -->`` of a
    Markdown file (appended at its end, with the markers, when they are not there yet)."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def plot(rows: list[dict], key: str, path: Path, title: str, xlabel: str, ylabel: str, log_x: bool = False):
    """One line per series; x numeric (log2 scale with log_x) or categorical (e.g. '1:25')."""
    if not rows:
        return
    series: dict[str, list] = {}
    for r in rows:
        series.setdefault(r["series"], []).append(r)
    numeric = all(isinstance(r["x"], (int, float)) for r in rows)
    xs = sorted({r["x"] for r in rows}) if numeric else list(dict.fromkeys(r["x"] for r in rows))
    if numeric:
        tx = [float(np.log2(x)) if log_x else float(x) for x in xs]
        fmt = (lambda v: f"{2 ** v:.3g}") if log_x else (lambda v: f"{v:g}")
    else:
        tx, fmt = [float(k) for k in range(len(xs))], (lambda v: str(xs[int(round(v))]))
    ys = {s: [next((r[key] for r in rs if r["x"] == x), float("nan")) for x in xs] for s, rs in series.items()}
    line_plot(path, tx, ys, title, xlabel + (" (log scale)" if log_x else ""), ylabel, x_format=fmt, x_ticks=tx)


def run_entry(entry, ctx) -> None:
    """Kind methods: sample every row, then write the report (write_report)."""
    device = pick_device(ctx.device)
    b = Bench(load_config(entry["config"]), device)
    sizes = entry["sizes"]
    t0 = time.time()
    print("methods", flush=True)
    res = {"methods": methods(b, sizes["main"], entry["methods_bs"])}
    print("ablations", flush=True)
    res["ablations"] = ablations(b, entry, ctx.out(entry["work"]))
    print("scaling", flush=True)
    res["scaling"] = scaling(b, entry)
    dev = f"{device}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else f" ({os.cpu_count()} CPU cores)")
    res.update(total_s=time.time() - t0, device=dev, sizes=sizes)
    write_report(res, ctx.out(entry.output), entry["suffix"], ctx.command(entry),
                 entry["section"] and (ctx.out(entry["results_md"]), entry["section"]))


ABLATIONS = ("batch size", "guidance scale", "guided steps", "ADP training set")
ABLATION_FIGURES = (("fd", "FD"), ("frechet", "Frechet"), ("confident", "confident share"))
SCALING_FIGURES = (("s_per_img", "time", "s/img"), ("peak_mb", "memory", "MB"))


def plot_name(what: str, figure: str, suffix: str) -> str:
    """'batch size', 'fd', '_quick' -> 'batch_size_fd_quick.png'."""
    return f"{what.replace(' ', '_')}_{figure}{suffix}.png"


def plot_names(suffix: str) -> list[str]:
    """Every plot a report writes (bench_plots/...)."""
    return ([plot_name(a, key, suffix) for a in ABLATIONS for key, _ in ABLATION_FIGURES]
            + [plot_name(f"scaling {axis}", lab, suffix) for axis in ("batch", "steps") for _, lab, _ in SCALING_FIGURES])


def write_report(res: dict, output: Path, suffix: str = "", command: str = "python bench/run.py methods",
                 section: tuple[Path, str] | None = None) -> None:
    """From one run's results: bench<suffix>.json and the plots (bench_plots/*<suffix>.png) in
    output's folder, the tables in ``section`` = (a Markdown file, its marker key), then
    ``output`` (RESULTS_bench<suffix>.md) itself."""
    out = output.parent
    plots = out / "bench_plots"
    plots.mkdir(parents=True, exist_ok=True)
    sizes = res.get("sizes") or {"main": res["methods"][0]["n"], "batch": res["ablations"]["batch size"][0]["n"],
                                 "ablation": res["ablations"]["guidance scale"][0]["n"]}
    figures = []
    for name, rows in res["ablations"].items():
        for key, lab in ABLATION_FIGURES:
            path = plots / plot_name(name, key, suffix)
            plot(rows, key, path, f"{lab} vs {name}", name, lab, log_x=name == "batch size")
            figures.append(path)
    for axis in ("batch", "steps"):
        rows = [r for r in res["scaling"] if r["axis"] == axis]
        for key, lab, unit in SCALING_FIGURES:
            path = plots / plot_name(f"scaling {axis}", lab, suffix)
            plot(rows, key, path, f"{unit} vs {axis}", axis, unit)
            figures.append(path)
    md = [f"Device: {res['device']}; total **{res['total_s'] / 60:.1f} min** (`{command}`). Target parity 50/50, "
          "judged by the independent judge.", "",
          f"### Methods (n = {sizes['main']}, same seeds; cost / vanilla = wall time per image relative to "
          "vanilla; rejection's cost counts every image it drew)", "", md_methods(res["methods"]), "",
          "Ours against each other method (generated from the table above):", "", *verdicts(res["methods"])]
    for name, rows in res["ablations"].items():
        size = (f"n = {sizes['batch']}; a larger batch: one batch of its size" if name == "batch size"
                else f"n = {sizes['ablation']}")
        md += ["", f"### Ablation: {name} ({size})", "", md_rows(rows, name)]
    md += ["", "### Scaling (time and peak memory; the floor is vanilla: guided time cannot be lower)", "",
           md_rows(res["scaling"], "batch / steps"), "",
           "Plots: " + ", ".join(f"[{f.stem}](bench_plots/{f.name})" for f in figures if f.exists())]
    body = "\n".join(md) + "\n"
    (out / f"bench{suffix}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    if section:
        replace_section(*section, body)
    output.write_text(f"# Benchmark ({suffix.strip('_') or 'full'})\n\n{body}")
    print(body)
