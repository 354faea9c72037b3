"""bench/methods.py's report helpers: the generated section of docs/RESULTS.md and the verdicts."""
from bench.methods import replace_section, verdicts


def test_replace_section_rewrites_only_between_its_markers(tmp_path):
    f = tmp_path / "R.md"
    f.write_text("# head\n<!-- bench:begin -->\nold\n<!-- bench:end -->\ntail\n")
    replace_section(f, "bench", "new table\n")
    assert f.read_text() == "# head\n<!-- bench:begin -->\nnew table\n<!-- bench:end -->\ntail\n"
    replace_section(f, "bench-quick", "quick")            # no markers yet: appended with them
    assert f.read_text().endswith("tail\n\n<!-- bench-quick:begin -->\nquick\n<!-- bench-quick:end -->\n")
    replace_section(f, "bench", "newer")
    assert "newer" in f.read_text() and "new table" not in f.read_text() and "quick" in f.read_text()


def _row(name, fd, frechet, conf, cost=1.0):
    return {"name": name, "fd": fd, "frechet": frechet, "confident": conf, "cost_vs_vanilla": cost}


def test_verdicts_name_the_figure_that_decides():
    rows = [_row("vanilla", 0.4, 24.0, 0.94),
            _row("distribution guidance, ours (x)", 0.02, 15.0, 0.92),
            _row("sample guidance", 0.06, 15.5, 0.90),       # ours ahead (Frechet within 5%)
            _row("pixel x_t", 0.08, 10.0, 0.93),             # better Frechet: not ahead
            _row("pixel x0", 0.01, 14.0, 0.95),              # better on all three
            _row("tie", 0.02, 16.0, 0.90),                   # same FD, worse quality
            _row("ours + asymmetric", 0.5, 90.0, 0.5)]       # variants of ours are skipped
    v = verdicts(rows)
    assert len(v) == 4
    assert v[0].startswith("- ahead of **sample guidance**")
    assert v[1].startswith("- **not** ahead of **pixel x_t**: behind on Frechet (")
    assert v[2].startswith("- **not** ahead of **pixel x0**: behind on FD, Frechet, confident share (")
    assert v[3].startswith("- level with **tie** on FD at equal or better quality (")


def _full_row(name, x=None, **kw):
    r = {**_row(name, 0.1, 10.0, 0.9), "n": 10, "fractions": [0.5, 0.5], "fd_ci": [0.0, 0.2],
         "s_per_img": 0.2, "peak_mb": 400.0, "extra_mb": 10.0, "series": "ours", "x": x, **kw}
    return r


def test_report_is_rewritten_from_a_runs_json_without_sampling(tmp_path):
    from bench.methods import write_report
    res = {"methods": [_full_row("vanilla"), _full_row("distribution guidance, ours (defaults)")],
           "ablations": {"batch size": [_full_row("ours, batch 2", 2), _full_row("ours, batch 8", 8)],
                         "guidance scale": [_full_row("ours, scale 1", 1.0)],
                         "guided steps": [_full_row("ours, steps 1:25", "1:25"), _full_row("ours, steps 1:50", "1:50")],
                         "ADP training set": [_full_row("ours, ADP on 100", 100)]},
           "scaling": [_full_row("vanilla, batch 10", 10, axis="batch"), _full_row("ours, 20 steps", 20, axis="steps")],
           "total_s": 90.0, "device": "cpu (2 CPU cores)"}
    (tmp_path / "RESULTS.md").write_text("intro\n<!-- bench:begin -->\nold\n<!-- bench:end -->\nend\n")
    write_report(res, tmp_path / "RESULTS_bench.md", "", "python bench/run.py methods",
                 (tmp_path / "RESULTS.md", "bench"))
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("intro\n<!-- bench:begin -->\nDevice: cpu (2 CPU cores); total **1.5 min**")
    assert "old" not in text and text.endswith("<!-- bench:end -->\nend\n")
    assert "level with **distribution" not in text                     # ours is not compared with itself
    assert (tmp_path / "RESULTS_bench.md").read_text().startswith("# Benchmark (full)")
    assert (tmp_path / "bench_plots" / "guided_steps_fd.png").exists()  # categorical x axis
    assert (tmp_path / "bench_plots" / "batch_size_fd.png").exists()


def test_the_summarys_wall_time_item_uses_the_entrys_bound():
    """t2i_summary's wall-time row is met against its wall_bound (1.10 unless the entry names
    another; the transformer default's list names 1.05), read from the committed tables."""
    import json
    from bench.runlist import load_list
    from bench.t2i_summary import summary
    from models.files import resolve_path
    record = json.loads(resolve_path("pretrained/digits16_dit/record.json").read_text())["prompts"]
    folder = resolve_path("docs/results_dit")
    ratio = json.loads((folder / "speed.json").read_text())[0]["ratio"]
    rows = {b: summary(folder, record, b)[-1] for b in (ratio - 1e-3, ratio + 1e-3)}
    assert [r[3] for r in rows.values()] == ["**no**", "yes"]
    assert rows[ratio + 1e-3][2] == f"<= {ratio + 1e-3:.2f}"
    assert {e.name: e for e in load_list("dit")}["summary"]["wall_bound"] == 1.05
    assert {e.name: e for e in load_list("t2i")}["summary"]["wall_bound"] == 1.10
