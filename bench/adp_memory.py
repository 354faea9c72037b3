r"""Peak memory of ADP training from extraction shards, against the number of images N.

    python bench/adp_memory.py                         # the face and text-to-image h, N 200 and 2,000
    python bench/adp_memory.py --quick                 # a small h, under a minute
    python bench/adp_memory.py --dims 512x8x8:49 --n 200,2000 --shard_size 100

For each h shape and step count (``--dims CxHxW:S``) this writes synthetic h in the extraction
format (utils/data/extract.py: float16 h [n, S, C, H, W], one binary attribute whose classes
differ by a mean shift of +-1 on 64 coordinates, shards of ``--shard_size``) to a temporary
folder, then trains the ADP from it as ``multi_classifier.py --data`` does (``open_h_dataset``
then ``train_adp_stream``) in a fresh process per N, and prints a Markdown table of that
process's peak resident memory (VmHWM, which counts the memory-mapped shard pages it touched as
well as its own) and wall time. The folder for a smaller N holds links to the first shards of the
largest, so the disk holds N_max * S * C*H*W * 2 bytes once; everything is deleted afterwards.

glibc's allocator alone moves the peak by 10-20% from one run to the next (its mmap threshold
adapts to the sizes freed, and freed heap blocks stay resident), so each N runs ``--repeat``
times: the table gives the median peak and the range, and the ratio of the medians.
``--mmap_threshold BYTES`` fixes that threshold (MALLOC_MMAP_THRESHOLD_) in the training
processes: blocks above it always come from mmap and go back on free, which removes the spread.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from utils.app.cli import guarded
from utils.data.adp_train import train_adp_stream
from utils.data.extract import _save_shard, _write_meta, open_h_dataset

ACCEPTANCE = {"dims": "512x8x8:49,1280x8x8:50", "n": "200,2000"}
QUICK = {"dims": "64x4x4:10", "n": "100,1000"}


def parse_dims(spec: str) -> list[tuple[tuple[int, ...], int]]:
    """'512x8x8:49,1280x8x8:50' -> [((512, 8, 8), 49), ((1280, 8, 8), 50)]."""
    out = []
    for item in spec.split(","):
        shape, _, steps = item.strip().partition(":")
        try:
            out.append((tuple(int(v) for v in shape.split("x")), int(steps)))
        except ValueError:
            raise ValueError(f"--dims: {item!r} is not CxHxW:STEPS (e.g. 512x8x8:49)") from None
    return out


def vm_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS: resident now; VmHWM: its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def write_synthetic(folder: Path, h_shape: tuple[int, ...], steps: int, n: int, shard_size: int) -> None:
    """n samples of random float16 h in shards; the classes are shifted by -1 and +1 on 64 coordinates."""
    d = math.prod(h_shape)
    _write_meta(folder, {"model": {"config": "synthetic"}, "h_shape": list(h_shape),
                         "timesteps": list(range(steps - 1, -1, -1)), "source": "synthetic",
                         "attributes": {"a": ["a0", "a1"]}, "shard_size": shard_size, "n": n})
    g = torch.Generator().manual_seed(0)
    for k, start in enumerate(tqdm(range(0, n, shard_size), desc=f"write h {'x'.join(map(str, h_shape))}")):
        rows = min(shard_size, n - start)
        y = torch.randint(0, 2, (rows,), generator=g)
        h = torch.empty(rows, steps, d, dtype=torch.float16)
        for i in range(rows):                                        # one sample at a time: float32 is 4x
            h[i] = torch.randn(steps, d, generator=g)
            h[i, :, :64] += float(2 * y[i] - 1)
        _save_shard(folder, k, {"h": h.reshape(rows, steps, *h_shape), "ids": list(range(start, start + rows)),
                                "labels": {"a": y}})


def link_first(src: Path, dst: Path, n: int, shard_size: int) -> None:
    """An extraction folder of the first n samples of src (n a multiple of the shard size)."""
    dst.mkdir()
    meta = json.loads((src / "meta.json").read_text())
    (dst / "meta.json").write_text(json.dumps({**meta, "n": n}))
    for k in range(n // shard_size):
        os.symlink(src / f"shard_{k:05d}.pt", dst / f"shard_{k:05d}.pt")


def child(folder: Path, epochs: int, batch_size: int) -> None:
    """Train from folder; print one JSON line with peak RSS and wall time."""
    base = vm_kb("VmRSS")
    t0 = time.perf_counter()
    data = open_h_dataset([folder])
    _, metrics = train_adp_stream(data, data.meta, epochs=epochs, batch_size=batch_size, seed=0)
    print(json.dumps({"peak_rss_mb": vm_kb("VmHWM") / 1024, "import_rss_mb": base / 1024,
                      "wall_s": time.perf_counter() - t0, "shards": len(data.files),
                      "val_acc": metrics["attributes"]["a"]["val_accuracy_last_20pct"]}))


def measure(folder: Path, epochs: int, batch_size: int, mmap_threshold: int | None) -> dict:
    """Train from folder in a fresh process; its peak RSS (MB), wall time and validation accuracy."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(folder),
           "--epochs", str(epochs), "--batch_size", str(batch_size)]
    env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)} if mmap_threshold else {}))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"training on {folder} failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure_repeated(folder: Path, repeat: int, *args) -> dict:
    """``measure`` ``repeat`` times: median peak RSS and wall time, and the peak's range."""
    runs = [measure(folder, *args) for _ in range(repeat)]
    peaks = [r["peak_rss_mb"] for r in runs]
    return {**runs[0], "peak_rss_mb": statistics.median(peaks), "peak_min": min(peaks), "peak_max": max(peaks),
            "wall_s": statistics.median(r["wall_s"] for r in runs), "repeat": repeat}


def bench(dims, ns: list[int], shard_size: int, workdir: Path, repeat: int, *args) -> list[dict]:
    rows = []
    for h_shape, steps in dims:
        need = max(ns) * steps * math.prod(h_shape) * 2
        free = shutil.disk_usage(workdir).free
        if need > 0.9 * free:
            raise ValueError(f"h {h_shape} at {steps} steps for N={max(ns)} needs {need / 1e9:.1f} GB; "
                             f"{workdir} has {free / 1e9:.1f} GB free: lower --n or choose --workdir")
        tmp = Path(tempfile.mkdtemp(prefix="adp_memory_", dir=workdir))
        try:
            full = tmp / f"n{max(ns)}"
            write_synthetic(full, h_shape, steps, max(ns), shard_size)
            print(f"h {'x'.join(map(str, h_shape))}, {steps} steps: {need / 1e9:.2f} GB written to {tmp}", flush=True)
            for n in sorted(ns):
                folder = full if n == max(ns) else tmp / f"n{n}"
                if n != max(ns):
                    link_first(full, folder, n, shard_size)
                r = measure_repeated(folder, repeat, *args)
                rows.append({"h_shape": h_shape, "steps": steps, "n": n, **r})
                print(f"  N={n}: peak RSS {r['peak_rss_mb']:.0f} MB ({r['peak_min']:.0f}-{r['peak_max']:.0f}), "
                      f"{r['wall_s']:.0f} s", flush=True)
        finally:
            shutil.rmtree(tmp)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| h shape | steps | N | shards | peak RSS MB (median) | range MB | RSS after imports MB | wall s "
             "| val acc (last 20%) | peak RSS / smallest N's |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        first = next(x for x in rows if x["h_shape"] == r["h_shape"] and x["steps"] == r["steps"])
        lines.append(f"| {'x'.join(map(str, r['h_shape']))} | {r['steps']} | {r['n']} | {r['shards']} "
                     f"| {r['peak_rss_mb']:.0f} | {r['peak_min']:.0f}-{r['peak_max']:.0f} | {r['import_rss_mb']:.0f} "
                     f"| {r['wall_s']:.0f} | {r['val_acc']:.3f} "
                     f"| {r['peak_rss_mb'] / first['peak_rss_mb']:.3f} |")
    return "\n".join(lines)


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", help=f"h shapes and step counts, CxHxW:S,... (default {ACCEPTANCE['dims']})")
    p.add_argument("--n", help=f"numbers of images, comma-separated (default {ACCEPTANCE['n']})")
    p.add_argument("--quick", action="store_true", help=f"defaults {QUICK} instead")
    p.add_argument("--shard_size", type=int, default=50, help="samples per shard (the extraction's batch size)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs (memory, not accuracy, is measured)")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--workdir", default=tempfile.gettempdir(), help="where the synthetic shards go (deleted)")
    p.add_argument("--repeat", type=int, default=3, help="training runs per N (median and range of the peaks)")
    p.add_argument("--mmap_threshold", type=int, metavar="BYTES",
                   help="fix glibc's MALLOC_MMAP_THRESHOLD_ in the training processes (removes the spread)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(Path(args.child), args.epochs, args.batch_size)
        return 0
    defaults = QUICK if args.quick else ACCEPTANCE
    dims = parse_dims(args.dims or defaults["dims"])
    ns = sorted({int(v) for v in (args.n or defaults["n"]).split(",")})
    bad = [n for n in ns if n < 2 or n % args.shard_size]
    if bad:
        raise ValueError(f"--n {bad}: each N must be a multiple of --shard_size {args.shard_size}")
    if args.repeat < 1:
        raise ValueError(f"--repeat {args.repeat}: at least 1")
    rows = bench(dims, ns, args.shard_size, Path(args.workdir), args.repeat, args.epochs, args.batch_size,
                 args.mmap_threshold)
    allocator = f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold else "glibc defaults"
    print(f"\nADP training from shards: {args.epochs} epochs, batch {args.batch_size}, shards of {args.shard_size}, "
          f"{args.repeat} runs per N, allocator {allocator}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
