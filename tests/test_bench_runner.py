"""bench/run.py and the run-lists under bench/lists/: every entry validates (its kind, its output
path, its guidance settings through resolve_settings, its tool's flags), every result file the
README and docs/RESULTS.md cite is written by some entry, and the runner runs, skips and
regenerates entries."""
import json
import re
from pathlib import Path

import pytest
import yaml

from bench import run as runner
from bench.runlist import (KINDS, TOOLS, ListError, all_lists, build_entry, check_settings, load_list,
                           produced)

ROOT = Path(__file__).resolve().parent.parent
#: cited result files no entry writes, and why
NOT_REGENERATED = {
    "docs/results_dit/large_digit.md": "written by hand from the large_digit_* entries of bench/lists/dit.yml and "
                                       "runs of ADPs that are not shipped",
}


def entries():
    return [e for path in all_lists() for e in load_list(path)]


def tool_source(kind: str) -> str:
    cmd = TOOLS[kind][0]
    rel = cmd[1].replace(".", "/") + ".py" if cmd[0] == "-m" else cmd[0]
    return (ROOT / rel).read_text()


def test_every_list_loads_and_every_entry_validates():
    got = entries()
    assert {p.stem for p in all_lists()} >= {"quick", "methods", "guidance", "t2i", "dit", "cost", "faces"}
    for e in got:
        assert e.kind in KINDS, e.where
        assert Path(e.output).parts[0] in ("docs", "runs") and not Path(e.output).is_absolute(), e.where
        quick = runner.quick_entry(e)
        for variant in [e] + ([quick] if quick else []):
            check_settings(variant)         # every guided run's settings resolve on the entry's config
            if e.kind in TOOLS:             # every argument is a flag of the tool
                src = tool_source(e.kind)
                bad = [k for k in variant["args"] if f'"--{k}"' not in src]
                assert not bad, f"{e.where}: {bad} are not flags of {TOOLS[e.kind][0]}"
        if quick is not None:
            assert quick.output.startswith("runs/quick/"), e.where
    outputs = [e.output for e in got]
    assert len(outputs) == len(set(outputs)), sorted({o for o in outputs if outputs.count(o) > 1})


def cited_results() -> set[str]:
    """The result files and folders README.md and docs/RESULTS.md cite (paths under docs/)."""
    found = set()
    for doc in ("README.md", "docs/RESULTS.md"):
        text = (ROOT / doc).read_text()
        for m in re.finditer(r"docs/[\w./-]*[\w/]", text):
            if text[m.end():m.end() + 1] != "*":          # a glob (docs/results_*) names no file
                found.add(m.group())
        if doc.startswith("docs/"):        # paths relative to docs/
            found |= {f"docs/{m}" for m in re.findall(r"(?<![\w/])((?:results_\w+|bench_plots)/[\w.-]*)", text)}
    results = set()
    for p in found:
        p = p.rstrip(".")
        top = Path(p).parts[1] if len(Path(p).parts) > 1 else ""
        if top.startswith(("results_", "bench_plots")) or re.fullmatch(r"docs/(RESULTS_bench\w*\.md|\w+\.json|sweep_\w+\.md)", p):
            results.add(p.rstrip("/"))
    return results


def test_every_result_file_the_docs_cite_is_written_by_an_entry():
    made = {f for e in entries() for f in produced(e)}
    folders = {str(Path(f).parent) for f in made} | {str(Path(f).parent.parent) for f in made}
    cited = cited_results()
    assert {"docs/RESULTS_bench.md", "docs/results_t2i/summary.md", "docs/p2_scale.json"} <= cited
    missing = sorted(p for p in cited if p not in made and p not in folders and p not in NOT_REGENERATED)
    assert not missing, f"cited in the docs, written by no entry of bench/lists/: {missing}"
    assert all((ROOT / p).exists() for p in cited & set(NOT_REGENERATED))


def _list(tmp_path, entries_: dict) -> Path:
    path = tmp_path / "tiny.yml"
    path.write_text(yaml.safe_dump({"entries": entries_}, sort_keys=False))
    return path


@pytest.mark.parametrize("entry, message", [
    ({"kind": "nope", "output": "runs/x.md"}, "kind 'nope' is unknown"),
    ({"kind": "t2i_summary", "output": "/tmp/x.md", "results": "docs"}, "under docs/ or runs/"),
    ({"kind": "t2i_summary", "output": "runs/x.md"}, "needs the field 'results'"),
    ({"kind": "guidance", "output": "runs/x.md", "runs": [{"name": "a", "mode": "distribution",
      "targets": {"parity": "0.5"}, "running": True}]}, "unknown key(s) ['running']"),
    ({"kind": "guidance", "output": "runs/x.md", "runs": [{"name": "a", "mode": "vanilla",
      "guidance": {"preset": "paper"}}]}, "a vanilla run has no targets"),
    ({"kind": "guidance", "output": "runs/x.md", "cfg": 3, "runs": [{"name": "a", "mode": "vanilla"}]},
     "unknown field(s) ['cfg']"),
])
def test_a_malformed_entry_is_refused_with_its_name(tmp_path, entry, message):
    with pytest.raises(ListError) as e:
        load_list(_list(tmp_path, {"broken": entry}))
    assert "#broken" in str(e.value) and message in str(e.value)


def test_guidance_settings_are_the_settings_names_and_are_resolved(tmp_path):
    ok = {"name": "q", "mode": "distribution", "targets": {"parity": "0.5"},
          "guidance": {"estimator": "quota", "running_balance": True, "first_step": 1, "last_step": 25}}
    entry = load_list(_list(tmp_path, {"e": {"kind": "guidance", "output": "runs/e.md", "runs": [ok]}}))[0]
    check_settings(entry)
    bad = dict(ok, guidance={"running": True})
    entry = load_list(_list(tmp_path, {"e": {"kind": "guidance", "output": "runs/e.md", "runs": [bad]}}))[0]
    with pytest.raises(ListError, match=r"run 'q'.*unknown guidance setting\(s\) \['running'\]"):
        check_settings(entry)
    plain = {"name": "p", "mode": "distribution", "targets": {"parity": "0.5"}}
    entry = load_list(_list(tmp_path, {"e": {"kind": "guidance", "output": "runs/e.md", "runs": [ok, plain],
                                             "guidance": {"estimator": "median"}}}))[0]
    with pytest.raises(ListError, match="run 'p'.*estimator: 'median'"):       # a run's own setting wins
        check_settings(entry)


def test_from_copies_another_entry_and_a_cycle_is_refused(tmp_path):
    base = {"kind": "t2i_summary", "output": "runs/a.md", "results": "docs/results_t2i"}
    got = load_list(_list(tmp_path, {"a": base, "b": {"from": "a", "output": "runs/b.md"}}))
    assert got[1].kind == "t2i_summary" and got[1]["results"] == "docs/results_t2i" and got[1].output == "runs/b.md"
    dit = {e.name: e for e in load_list("dit")}
    assert dit["acceptance"]["runs"] == {e.name: e for e in load_list("t2i")}["acceptance"]["runs"]
    with pytest.raises(ListError, match="circular"):
        load_list(_list(tmp_path, {"a": {"from": "b"}, "b": {"from": "a"}}))


def test_t2i_runs_repeat_per_cfg_scale_and_take_the_prompts_digits():
    from bench.t2i_eval import expand_runs, runs_for
    runs = runs_for("cfg", "a small digit", [0, 1, 2, 3, 4])
    assert [(r["name"], r["cfg"]) for r in runs[:4]] == [("vanilla, CFG 1.5", 1.5), ("ours parity 50/50, CFG 1.5", 1.5),
                                                         ("vanilla, CFG 3", 3.0), ("ours parity 50/50, CFG 3", 3.0)]
    assert runs[0]["eval"]["digit"] == "0.2:0.2:0.2:0.2:0.2:0:0:0:0:0"
    got = expand_runs([{"name": "x", "mode": "distribution", "targets": {"digit": "prompt"}, "cfg": 7.5}], 3.0, None, [5])
    assert got[0]["cfg"] == 7.5 and got[0]["targets"]["digit"] == "0:0:0:0:0:1:0:0:0:0"


def test_a_tool_gets_its_output_and_args_as_flags():
    e = build_entry("p", {"kind": "p2_scale", "output": "docs/p2.json", "args": {"bs": [4, 16], "quick": True,
                                                                                   "json_off": False}}, ROOT / "x.yml")
    argv, how = runner.tool_argv(e, runner.Context(ROOT / "x.yml"))
    assert argv[1:] == ["-m", "bench.p2_scale", "--bs", "4", "16", "--quick", "--json", str(ROOT / "docs/p2.json")]
    e = build_entry("x", {"kind": "pixel_sweep", "output": "docs/results_pixel_baselines/sweep_xt.md"}, ROOT / "x.yml")
    argv, _ = runner.tool_argv(e, runner.Context(ROOT / "x.yml", into=Path("/tmp/t")))
    assert argv[-4:] == ["--out", "/tmp/t/docs/results_pixel_baselines", "--name", "sweep_xt"]


def test_dry_run_names_every_entry_and_writes_nothing(tmp_path, capsys):
    assert runner.main(["t2i", "--dry-run", "--into", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for e in load_list("t2i"):
        assert f"{e.name} [{e.kind}] -> " in out
    assert "python -m bench.t2i_fairness --method vanilla,ours,paper,augment" in out
    assert not any(tmp_path.iterdir())


def test_the_summary_entries_regenerate_their_committed_tables(tmp_path):
    """No sampling: the acceptance summaries read the stored tables, so the runner's output is the
    committed file byte for byte."""
    for lst, rel in (("t2i", "docs/results_t2i/summary.md"), ("dit", "docs/results_dit/summary.md")):
        assert runner.main([lst, "--only", "summary", "--into", str(tmp_path)]) == 0
        assert (tmp_path / rel).read_text() == (ROOT / rel).read_text(), rel


def test_a_tiny_guidance_entry_runs_end_to_end_then_is_skipped(tmp_path, capsys):
    lst = _list(tmp_path, {"tiny": {
        "kind": "guidance", "output": "runs/tiny/tiny.md", "n": 2, "bs": 2,
        "runs": [{"name": "vanilla", "mode": "vanilla", "eval": {"parity": "0.5"}},
                 {"name": "paper 50/50", "mode": "distribution", "targets": {"parity": "0.5"},
                  "guidance": {"preset": "paper"}}],
        "wall_ratios": [{"label": "paper / vanilla", "over": ["paper 50/50"], "under": ["vanilla"]}]}})
    into = tmp_path / "out"
    assert runner.main([str(lst), "--into", str(into), "--device", "cpu"]) == 0
    md = (into / "runs/tiny/tiny.md").read_text()
    rows = json.loads((into / "runs/tiny/tiny.json").read_text())
    assert md.startswith("tiny: n=2 (seeds 0-1), batch=2") and "\n\npaper / vanilla: " in md
    assert [r["name"] for r in rows] == ["vanilla", "paper 50/50"] and rows[1]["guidance"]["settings"]["preset"] == "paper"
    assert rows[1]["spec"]["guidance"] == {"preset": "paper"}
    capsys.readouterr()
    assert runner.main([str(lst), "--into", str(into)]) == 0          # done: skipped, nothing rewritten
    assert "exists; skipped" in capsys.readouterr().out and (into / "runs/tiny/tiny.md").read_text() == md
    assert runner.main([str(lst), "--only", "nope"]) == 2 and "no such entry" in capsys.readouterr().err
