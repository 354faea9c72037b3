"""Run-lists: YAML files under bench/lists/ naming the benchmark entries behind every published table.

A list is a mapping ``entries: {NAME: ENTRY, ...}`` (and an optional ``about:`` line). An entry is

    NAME:
      kind: guidance            # which benchmark runs it (KINDS below)
      output: docs/results_acceptance/acceptance.md    # the file that marks it done (under docs/ or runs/)
      about: one line on what it measures
      from: OTHER               # optional: start from entry OTHER of this list (or FILE.yml#OTHER)
      quick: {n: 8}             # optional: the overrides of ``bench/run.py --quick``
      ...                       # the kind's own fields (KINDS[kind].fields, their defaults)

Guided run specs (kinds ``guidance`` and ``t2i``) are mappings of RUN_KEYS; their ``guidance:``
mapping holds guidance settings by their field names (utils/guidance/settings.py: preset,
estimator, running_balance, refine, refine_within, check, max_step, distribution_scale,
first_step, last_step, ...), passed to ``resolve_settings`` as they are, over the entry's own
``guidance:`` mapping and the config's section. Targets are strings as ``--target`` takes them
(quote them in YAML: ``"0.5"``, ``"0.6:0.2:0.1:0.1"``); ``prompt`` (text-to-image, the digit
attribute) is uniform over the prompt's digits.

The kinds in TOOLS run an argparse tool in its own process: ``args:`` are its flags (``{bs: [4,
16], quick: true}`` -> ``--bs 4 16 --quick``), ``env:`` its environment over the runner's.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from models.files import REPO_ROOT

LISTS = REPO_ROOT / "bench" / "lists"
REQUIRED = object()
#: the keys of one run spec (kinds guidance and t2i)
RUN_KEYS = {"name", "mode", "targets", "eval", "match", "bs", "local", "guidance", "cfg"}
MODES = ("vanilla", "distribution", "sample")
COMMON = {"kind", "output", "about", "from", "quick"}


@dataclass(frozen=True)
class Kind:
    """A benchmark kind: ``run`` ("module:function", called as function(entry, ctx)), its entry
    fields with their defaults (REQUIRED: must be given), the overrides ``--quick`` applies (an
    entry's own ``quick:`` goes over them; None, and no ``quick:`` in the entry: --quick skips it)."""
    run: str
    fields: dict[str, Any]
    quick: dict[str, Any] | None = None
    about: str = ""


#: benchmarks run by an argparse tool: kind -> (command, how the output reaches it).
#: The output is passed as ``--json FILE`` or ``--out FILE``, as ``--out`` its folder
#: (``--out/``; ``--out/name``: and ``--name`` its stem), or is the tool's stdout.
TOOLS: dict[str, tuple[list[str], str]] = {
    "p2_scale": (["-m", "bench.p2_scale"], "--json"),
    "p2_paper_smoke": (["-m", "bench.p2_paper_smoke"], "stdout"),
    "t2i_overhead": (["-m", "bench.t2i_overhead"], "stdout"),
    "t2i_families": (["-m", "bench.t2i_families"], "stdout"),
    "adp_memory": (["-m", "bench.adp_memory"], "stdout"),
    "fairness": (["-m", "bench.t2i_fairness"], "--out/"),
    "downstream": (["-m", "bench.downstream"], "--out/"),
    "dit_sweep": (["-m", "bench.dit_sweep"], "--out/"),
    "pixel_sweep": (["-m", "bench.pixel_guidance_sweep"], "--out/name"),
    "face_judges": (["scripts/face_judge_report.py"], "--json"),
    "calibrate_judge": (["scripts/calibrate_judge.py", "--dry_run"], "stdout"),
    "evaluate": (["scripts/evaluate.py"], "--out"),
}
TOOL_FIELDS = {"args": {}, "env": {}}
_HOW = {"--json": "--json OUTPUT", "--out": "--out OUTPUT", "--out/": "--out OUTPUT's folder",
        "--out/name": "--out OUTPUT's folder --name its stem", "stdout": "> OUTPUT"}

KINDS: dict[str, Kind] = {
    "guidance": Kind("bench.guidance_eval:run_entry", {
        "config": "configs/digits16.yml", "adp": None, "n": 1000, "bs": 100, "seed": 0, "asymmetric": False,
        "guidance": {}, "runs": REQUIRED, "wall_ratios": [], "processes": 1},
        {"n": 4, "bs": 4}, "guided and vanilla runs on an unconditional config, judged (bench/guidance_eval.py)"),
    "adp_vs_judge": Kind("bench.adp_vs_judge:run_entry", {
        "config": "configs/digits16.yml", "adp": None, "n": 200, "bs": 100, "seed": 0, "guidance": {},
        "runs": REQUIRED},
        {"n": 4, "bs": 4}, "the ADP's last-step prediction against the judge per sample (bench/adp_vs_judge.py)"),
    "t2i": Kind("bench.t2i_eval:run_entry", {
        "config": "configs/digits16_t2i.yml", "adp": None, "prompts": REQUIRED, "n": 1000, "bs": 100, "seed": 0,
        "cfg": 3.0, "cfg_scales": None, "guidance": {}, "runs": REQUIRED, "cache": "runs/t2i_vanilla_cache",
        "labeller": None},
        {"n": 4, "bs": 4}, "runs per prompt of a text-to-image config, judged (bench/t2i_eval.py)"),
    "t2i_speed": Kind("bench.t2i_eval:run_speed_entry", {
        "config": "configs/digits16_t2i.yml", "adp": None, "prompts": REQUIRED, "n": 500, "bs": 100,
        "targets": {"parity": "0.5"}, "guidance": {}, "labeller": None},
        {"n": 4, "bs": 2}, "guided / vanilla wall time per prompt, batches alternating (bench/t2i_eval.py)"),
    "t2i_summary": Kind("bench.t2i_summary:run_entry", {
        "config": "configs/digits16_t2i.yml", "results": REQUIRED, "wall_bound": 1.10},
        {}, "the acceptance list read from stored t2i tables, no sampling (bench/t2i_summary.py)"),
    "methods": Kind("bench.methods:run_entry", {
        "config": "configs/digits16.yml", "sizes": {"main": 150, "batch": 100, "ablation": 100},
        "methods_bs": 100, "batch_sizes": [2, 8, 32, 100, 200], "scales": [0.25, 0.5, 1.0, 2.0],
        "guided_steps": [[1, 50], [1, 25], [25, 50], [10, 40]], "adp_sizes": [100, 500],
        "scaling_n": 100, "scaling_batches": [10, 50, 100], "scaling_steps": [20, 50, 100],
        "work": "runs/bench", "suffix": "", "section": "bench", "results_md": "docs/RESULTS.md"},
        {"sizes": {"main": 4, "batch": 4, "ablation": 4}, "methods_bs": 4, "batch_sizes": [2], "scales": [1.0],
         "guided_steps": [[1, 50]], "adp_sizes": [20], "scaling_n": 4, "scaling_batches": [2],
         "scaling_steps": [10], "section": None},
        "every method side by side, ablations, time and memory scaling (bench/methods.py)"),
    **{name: Kind("bench.run:run_tool", TOOL_FIELDS, None, f"runs python {' '.join(cmd)} {_HOW[how]}")
       for name, (cmd, how) in TOOLS.items()},
}


class ListError(ValueError):
    """A run-list or one of its entries is malformed; the message names the file and the entry."""


@dataclass
class Entry:
    """One entry of a run-list, its fields complete (the kind's defaults filled in)."""
    name: str
    kind: str
    output: str
    fields: dict[str, Any]
    source: Path
    about: str = ""
    quick: dict[str, Any] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    @property
    def where(self) -> str:
        return f"{_rel(self.source)}#{self.name}"

    def with_fields(self, overrides: dict[str, Any]) -> "Entry":
        """A copy with ``overrides`` over the fields (``output`` too), checked like the list's."""
        raw = {"kind": self.kind, "output": self.output, **copy.deepcopy(self.fields), **overrides}
        e = build_entry(self.name, raw, self.source)
        e.about, e.quick, e.overrides = self.about, self.quick, {**self.overrides, **overrides}
        return e


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def list_path(name: str | Path) -> Path:
    """A list by path, or by name under bench/lists/ ('t2i' -> bench/lists/t2i.yml)."""
    p = Path(name)
    for cand in (p, REPO_ROOT / p, LISTS / p, LISTS / f"{p}.yml"):
        if cand.is_file():
            return cand.resolve()
    known = sorted(f.stem for f in LISTS.glob("*.yml"))
    raise ListError(f"run-list {name} not found; the lists in {_rel(LISTS)}: {known}")


def _read(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ListError(f"{_rel(path)} is not valid YAML: {' '.join(str(e).split())[:300]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict) or not data["entries"]:
        raise ListError(f"{_rel(path)}: a run-list is a mapping with 'entries: {{NAME: {{kind: ..., output: ...}}}}'")
    unknown = sorted(set(data) - {"about", "entries"})
    if unknown:
        raise ListError(f"{_rel(path)}: unknown top-level key(s) {unknown}; allowed: about, entries")
    return data


def _raw_entry(path: Path, name: str, seen: tuple = ()) -> dict:
    """The entry's mapping with ``from:`` resolved (the other entry's fields, then its own)."""
    entries = _read(path)["entries"]
    if name not in entries:
        raise ListError(f"{_rel(path)} has no entry {name!r}; its entries: {list(entries)}")
    raw = entries[name]
    if not isinstance(raw, dict):
        raise ListError(f"{_rel(path)}#{name}: an entry is a mapping (kind:, output:, ...), got {raw!r}")
    raw = copy.deepcopy(raw)
    base = raw.pop("from", None)
    if base is None:
        return raw
    file, _, other = str(base).rpartition("#")
    src = list_path(file) if file else path
    if (src, other) in seen or (src == path and other == name):
        raise ListError(f"{_rel(path)}#{name}: 'from: {base}' is circular")
    parent = _raw_entry(src, other, seen + ((path, name),))
    parent.pop("about", None)
    parent.pop("quick", None)
    return {**parent, **raw}


def build_entry(name: str, raw: dict, source: Path) -> Entry:
    """Check an entry's mapping against its kind and fill in the defaults."""
    where = f"{_rel(source)}#{name}"
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ListError(f"{where}: kind {kind!r} is unknown; kinds: {sorted(KINDS)}")
    spec = KINDS[kind]
    unknown = sorted(set(raw) - COMMON - set(spec.fields))
    if unknown:
        raise ListError(f"{where}: unknown field(s) {unknown} for kind {kind}; allowed: "
                        f"{sorted(COMMON - {'from'} | set(spec.fields))}")
    output = raw.get("output")
    if not isinstance(output, str) or Path(output).is_absolute() or Path(output).parts[:1] not in (("docs",), ("runs",)) \
            or ".." in Path(output).parts:
        raise ListError(f"{where}: output must be a file path under docs/ or runs/, relative to the repository, "
                        f"got {output!r}")
    fields = {}
    for key, default in spec.fields.items():
        if key in raw:
            fields[key] = copy.deepcopy(raw[key])
        elif default is REQUIRED:
            raise ListError(f"{where}: kind {kind} needs the field {key!r}")
        else:
            fields[key] = copy.deepcopy(default)
    quick = raw.get("quick")
    if quick is not None and not isinstance(quick, dict):
        raise ListError(f"{where}: quick: must be a mapping of field overrides, got {quick!r}")
    entry = Entry(name, kind, output, fields, source, str(raw.get("about") or ""), quick)
    check_fields(entry)
    return entry


def _check_runs(entry: Entry) -> None:
    runs = entry["runs"]
    if not isinstance(runs, list) or not runs:
        raise ListError(f"{entry.where}: runs: must be a non-empty list of run specs")
    names = []
    for k, run in enumerate(runs):
        what = f"{entry.where}, run {k} ({run.get('name') if isinstance(run, dict) else run!r})"
        if not isinstance(run, dict):
            raise ListError(f"{what}: a run spec is a mapping (name:, mode:, ...)")
        unknown = sorted(set(run) - RUN_KEYS)
        if unknown:
            raise ListError(f"{what}: unknown key(s) {unknown}; allowed: {sorted(RUN_KEYS)} (guidance settings go "
                            f"under guidance:, by their names in utils/guidance/settings.py)")
        if "cfg" in run and entry.kind != "t2i":
            raise ListError(f"{what}: cfg: (a CFG scale) is for text-to-image runs (kind t2i)")
        if not isinstance(run.get("name"), str) or run.get("mode") not in MODES:
            raise ListError(f"{what}: needs name: (text) and mode: (one of {list(MODES)})")
        if run["mode"] == "vanilla" and ("targets" in run or "guidance" in run):
            raise ListError(f"{what}: a vanilla run has no targets: or guidance: (eval: names what is measured)")
        if run["mode"] != "vanilla" and not isinstance(run.get("targets"), dict):
            raise ListError(f"{what}: a guided run needs targets: {{attribute: value}}")
        for key in ("targets", "eval", "match"):
            if key in run:
                if not isinstance(run[key], dict) or not all(isinstance(v, (str, int, float)) for v in run[key].values()):
                    raise ListError(f"{what}: {key}: must map attributes to target strings, e.g. {{parity: \"0.5\"}}")
                run[key] = {str(a): str(v) for a, v in run[key].items()}
        if not isinstance(run.get("guidance", {}), dict):
            raise ListError(f"{what}: guidance: must be a mapping of guidance settings")
        names.append(run["name"])
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup and entry.kind == "guidance":
        raise ListError(f"{entry.where}: run names {dup} repeat; each row needs its own name")


def check_fields(entry: Entry) -> None:
    """Shape checks of an entry's fields that need no model (run specs, numbers, mappings)."""
    f = entry.fields
    for key in ("n", "bs", "seed", "processes"):
        if key in f and (isinstance(f[key], bool) or not isinstance(f[key], int) or f[key] < (0 if key == "seed" else 1)):
            raise ListError(f"{entry.where}: {key}: must be an integer >= {0 if key == 'seed' else 1}, got {f[key]!r}")
    for key in ("guidance", "args", "env", "targets"):
        if key in f and not isinstance(f[key], dict):
            raise ListError(f"{entry.where}: {key}: must be a mapping, got {f[key]!r}")
    if "runs" in f:
        _check_runs(entry)
    if "prompts" in f and (not isinstance(f["prompts"], list) or not f["prompts"]
                           or not all(isinstance(q, str) for q in f["prompts"])):
        raise ListError(f"{entry.where}: prompts: must be a non-empty list of prompt texts")


def guidance_overrides(entry: Entry, run: dict | None = None) -> dict[str, Any]:
    """The settings a run asks for: the entry's guidance: mapping, then the run's."""
    return {**entry.get("guidance", {}), **((run or {}).get("guidance") or {})}


def check_settings(entry: Entry) -> None:
    """Every guided run's settings resolve (utils.guidance.settings.resolve_settings) on the
    entry's config: unknown names, wrong types and bad values are errors naming the run."""
    from utils.app.config import load_config
    from utils.config import RunConfig
    from utils.guidance.settings import SettingsError, resolve_settings
    if "config" not in entry.fields:
        return
    cfg = load_config(entry["config"])
    rc = RunConfig.of(cfg, require_model=False)
    runs = entry.get("runs") or ([{"name": "(the entry)", "mode": "distribution"}] if "guidance" in entry.fields else [])
    for run in runs:
        if run["mode"] == "vanilla":
            continue
        try:
            resolve_settings(rc.guidance, guidance_overrides(entry, run), rc.family)
        except SettingsError as e:
            raise ListError(f"{entry.where}, run {run['name']!r}: {e}") from None


#: kind -> the files an entry writes beside its output (names in its output's folder; {stem}: the output's)
COMPANIONS = {"guidance": ["{stem}.json"], "t2i": ["{stem}.json"], "t2i_speed": ["{stem}.json"],
              "adp_vs_judge": ["{stem}.json"], "pixel_sweep": ["{stem}.json"], "dit_sweep": ["sweep.json"],
              "fairness": ["fairness.json", "fairness.png"], "downstream": ["results.json"]}


def produced(entry: Entry) -> list[str]:
    """The files an entry writes (relative to the repository): its output and the files beside it."""
    out = Path(entry.output)
    names = [n.format(stem=out.stem) for n in COMPANIONS.get(entry.kind, [])]
    if entry.kind == "methods":
        from bench.methods import plot_names
        suffix = entry["suffix"]
        names = [f"bench{suffix}.json"] + [f"bench_plots/{n}" for n in plot_names(suffix)]
    return [entry.output] + [str(out.parent / n) for n in names]


def load_list(name: str | Path) -> list[Entry]:
    """Every entry of a run-list, checked, in the file's order."""
    path = list_path(name)
    return [build_entry(n, _raw_entry(path, n), path) for n in _read(path)["entries"]]


def all_lists() -> list[Path]:
    """The run-lists under bench/lists/, in name order."""
    return sorted(LISTS.glob("*.yml"))
