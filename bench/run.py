"""The benchmark runner: runs the entries of run-lists (bench/lists/*.yml), each into its output file.

    python bench/run.py bench/lists/quick.yml                    # make bench-quick (< 5 min)
    python bench/run.py bench/lists/*.yml                        # make bench: every published table (hours)
    python bench/run.py t2i --only acceptance summary            # some entries of bench/lists/t2i.yml
    python bench/run.py t2i --dry-run                            # what would run, and into which file
    python bench/run.py guidance --only acceptance --set seed=40000 --into runs/fresh_seeds
    python bench/run.py t2i --quick --into runs/smoke            # every entry at its smallest size

An entry whose output file exists is skipped (rerun it with --overwrite), so an interrupted
``make bench`` picks up where it stopped; an entry writes its output file last, after the files
beside it. ``--into DIR`` writes the outputs under DIR instead of the repository (inputs such as
a summary's tables are read from DIR when they are there, else from the repository).
``--quick`` runs each entry with its ``quick:`` overrides (else its kind's smallest sizes) into
runs/quick/, never over a published table. An entry with ``processes: N`` is started under
torchrun with N processes. ``--device`` is the device of the kinds that run in this process; an
entry run by a tool of its own takes its device from its ``args`` (the tools' defaults: the
figures' device). The list format and the kinds: bench/runlist.py.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.runlist import KINDS, TOOLS, Entry, ListError, _rel, check_settings, list_path, load_list
from models.files import REPO_ROOT
from utils.app.cli import guarded

log = logging.getLogger("bench")
QUICK_ROOT = Path("runs") / "quick"


class EntryFailed(RuntimeError):
    """An entry's benchmark stopped with an error; the outputs of the entries before it stay."""


@dataclass
class Context:
    """Where an entry writes and reads, and how it was asked to run."""
    list_path: Path
    device: str = "auto"
    into: Path | None = None
    quick: bool = False

    def out(self, rel: str | Path) -> Path:
        """An output path of the list (relative to the repository) as this run writes it."""
        return (self.into or REPO_ROOT) / rel

    def command(self, entry: Entry) -> str:
        """The runner's command line that runs this entry alone."""
        sets = "".join(f" --set {k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                       for k, v in entry.overrides.items() if not self.quick)
        return (f"python bench/run.py {_rel(self.list_path)} --only {entry.name}{sets}"
                + (" --quick" if self.quick else ""))


def quick_entry(entry: Entry) -> Entry | None:
    """The entry at its quick size, into runs/quick/ (None: it has no quick size)."""
    kind = KINDS[entry.kind]
    if entry.quick is None and kind.quick is None:
        return None
    over = {**(kind.quick or {}), **(entry.quick or {})}
    over.setdefault("output", str(QUICK_ROOT / entry.output))
    if "results" in entry.fields:           # a summary reads the quick tables
        over.setdefault("results", str(QUICK_ROOT / entry["results"]))
    return entry.with_fields(over)


def tool_argv(entry: Entry, ctx: Context) -> tuple[list[str], str]:
    """(the command line, how its output is delivered) of an entry run by an argparse tool:
    ``args`` as flags (true: a bare flag; false/null: left out; a list: several values)."""
    cmd, how = TOOLS[entry.kind]
    argv = [sys.executable, *cmd]
    for key, value in entry["args"].items():
        if value is None or value is False:
            continue
        argv.append(f"--{key}")
        if value is not True:
            argv += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    out = ctx.out(entry.output)
    if how in ("--json", "--out"):
        argv += [how, str(out)]
    elif how.startswith("--out/"):
        argv += ["--out", str(out.parent)] + (["--name", out.stem] if how == "--out/name" else [])
    return argv, how


def run_tool(entry: Entry, ctx: Context) -> None:
    """Run the entry's tool in its own process (repository root, the entry's env: over this one's)."""
    argv, how = tool_argv(entry, ctx)
    out = ctx.out(entry.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{k: str(v) for k, v in entry["env"].items()}}
    log.info("%s: %s", entry.name, " ".join(argv))
    if how == "stdout":
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)
        lines = []
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line)
        rc = proc.wait()
        if rc == 0:
            out.write_text("".join(lines).lstrip("\n"))
    else:
        rc = subprocess.run(argv, cwd=REPO_ROOT, env=env).returncode
    if rc != 0:
        raise EntryFailed(f"{entry.where}: {' '.join(argv[1:])} failed (exit {rc}); its message is above")
    if not out.exists():
        raise EntryFailed(f"{entry.where}: {' '.join(argv[1:])} finished but wrote no {out}")


def describe(entry: Entry, ctx: Context) -> str:
    """One line on what an entry runs: its tool's command line, or the runner's and its sizes."""
    if entry.kind in TOOLS:
        argv, how = tool_argv(entry, ctx)
        env = "".join(f"{k}={v} " for k, v in entry["env"].items())
        line = env + "python " + " ".join(argv[1:]) + (f" > {_rel(ctx.out(entry.output))}" if how == "stdout" else "")
        return line.replace(f"{REPO_ROOT}/", "")
    f = entry.fields
    parts = [f"config {f['config']}"]
    if "runs" in f:
        parts.append(f"{len(f['runs'])} run(s)" + (f" x CFG {f['cfg_scales']}" if f.get("cfg_scales") else ""))
    if "prompts" in f:
        parts.append(f"{len(f['prompts'])} prompt(s)")
    if "n" in f:
        seeds = f"seeds {f.get('seed', 0)}-{f.get('seed', 0) + f['n'] - 1}" if "seed" in f else f"{f['n']} images"
        parts.append(f"n {f['n']} ({seeds}), batch {f['bs']}")
    if f.get("processes", 1) > 1:
        parts.append(f"{f['processes']} processes (torchrun)")
    return ctx.command(entry) + "  # " + ", ".join(parts)


def _torchrun(entry: Entry, ctx: Context, argv_tail: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(entry["processes"]),
           str(REPO_ROOT / "bench" / "run.py"), str(ctx.list_path), "--only", entry.name, "--overwrite",
           "--device", ctx.device, *argv_tail]
    log.info("%s: %s", entry.name, " ".join(cmd))
    rc = subprocess.run(cmd, cwd=REPO_ROOT).returncode
    if rc != 0:
        raise EntryFailed(f"{entry.where}: torchrun with {entry['processes']} processes failed (exit {rc})")


def run_entry(entry: Entry, ctx: Context, argv_tail: list[str] | None = None) -> None:
    """Run one entry into ctx.out(entry.output)."""
    if entry.get("processes", 1) > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _torchrun(entry, ctx, argv_tail or [])
    module, _, func = KINDS[entry.kind].run.partition(":")
    ctx.out(entry.output).parent.mkdir(parents=True, exist_ok=True)
    getattr(importlib.import_module(module), func)(entry, ctx)


def parse_sets(values: list[str]) -> dict:
    """--set KEY=VALUE (VALUE read as YAML: 1000, true, [1, 2], {preset: paper})."""
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ListError(f"--set {item!r}: expected KEY=VALUE, e.g. --set seed=40000")
        out[key] = yaml.safe_load(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    kinds = "\n".join(f"  {name:16s}{kind.about}" for name, kind in KINDS.items())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"benchmark kinds (an entry's kind:):\n{kinds}")
    p.add_argument("lists", nargs="+", help="run-list files, or names under bench/lists/ (t2i = bench/lists/t2i.yml)")
    p.add_argument("--only", nargs="+", metavar="ENTRY", help="run only these entries (of any of the lists)")
    p.add_argument("--dry-run", action="store_true", help="print each entry's command and output; run nothing")
    p.add_argument("--quick", action="store_true", help="each entry at its quick size, into runs/quick/")
    p.add_argument("--overwrite", action="store_true", help="rerun entries whose output exists")
    p.add_argument("--into", metavar="DIR", help="write the outputs under DIR instead of the repository")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the selected entries (VALUE as YAML), e.g. --set n=200")
    p.add_argument("--device", default="auto")
    return p


@guarded
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from utils.app.runtime import setup_logging
    setup_logging()
    sets = parse_sets(args.set)
    into = Path(args.into).resolve() if args.into else None
    plan = []
    for name in args.lists:
        path = list_path(name)
        for entry in load_list(path):
            if args.only and entry.name not in args.only:
                continue
            ctx = Context(path, args.device, into, args.quick)
            if args.quick:
                quick = quick_entry(entry)
                if quick is None:
                    print(f"{entry.name}: no quick size (kind {entry.kind}); skipped under --quick")
                    continue
                entry = quick
            if sets:
                entry = entry.with_fields(sets)
            check_settings(entry)
            plan.append((entry, ctx))
    if args.only:
        missing = sorted(set(args.only) - {e.name for e, _ in plan} - _names_without_quick(args))
        if missing:
            known = sorted({e.name for n in args.lists for e in load_list(n)})
            raise ListError(f"--only {missing}: no such entry in {args.lists}; entries: {known}")
    tail = (["--quick"] if args.quick else []) + (["--into", str(into)] if into else []) \
        + [x for s in args.set for x in ("--set", s)]
    for entry, ctx in plan:
        out = ctx.out(entry.output)
        exists = out.exists() and not args.overwrite
        if args.dry_run:
            print(f"{entry.name} [{entry.kind}] -> {_rel(out)}{'  (exists: skipped)' if exists else ''}"
                  + (f"\n    {entry.about}" if entry.about else "") + f"\n    {describe(entry, ctx)}")
            continue
        if exists:
            print(f"{entry.name}: {_rel(out)} exists; skipped (--overwrite reruns it)", flush=True)
            continue
        print(f"== {entry.name} [{entry.kind}] -> {_rel(out)}", flush=True)
        try:
            run_entry(entry, ctx, tail)
        except EntryFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


def _names_without_quick(args) -> set[str]:
    """Entries --only named that --quick skipped for having no quick size (not an error)."""
    if not args.quick:
        return set()
    return {e.name for n in args.lists for e in load_list(n) if quick_entry(e) is None}


if __name__ == "__main__":
    raise SystemExit(main())
