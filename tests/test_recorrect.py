"""Recorrecting stored reports from their fractions (scripts/recorrect_reports.py): the same
corrected figures as the correction called directly and as a live evaluation of the images,
only added fields, and clear refusals of reports it cannot recorrect."""
import json
import math

import numpy as np
import pytest
import torch

from models.judge import Judge, confusion_record
from scripts.recorrect_reports import (MARK, class_counts, only_added, recorrect_bench_row, recorrect_file,
                                       recorrect_report, strip_corrected)
from utils.evaluation.correction import bootstrap_corrected, confusion_matrix, correct_fractions
from utils.evaluation.evaluate import evaluate_images

ATTRS = {"tone": ["light", "dark"], "edge": ["low", "high"]}
CONFUSION = {"tone": np.array([[80, 20], [10, 90]]), "edge": np.array([[45, 5], [3, 47]])}


class ToyJudge(Judge):
    """tone: dark (1) when the mean pixel < 0; edge: high (1) when the corner pixel > 0."""
    attributes = ATTRS

    def __init__(self, confusion=None):
        self.calibration = confusion

    def predict(self, images):
        dark = (images.mean(dim=(1, 2, 3)) < 0).float()
        high = (images[:, 0, 0, 0] > 0).float()
        return {"tone": torch.stack([1 - dark, dark], 1), "edge": torch.stack([1 - high, high], 1)}


def _images(n_light: int, n_dark: int, n_high: int) -> torch.Tensor:
    x = torch.cat([torch.full((n_light, 1, 4, 4), 0.5), torch.full((n_dark, 1, 4, 4), -0.5)])
    x[:, 0, 0, 0] = -1.0
    x[:n_high, 0, 0, 0] = 1.0                   # the corner does not move the mean across 0
    return x


def _stored(counts, n, target=None) -> dict:
    """A report as the old evaluation stored it: argmax fractions of n images, FD if a target."""
    f = (np.asarray(counts) / n).tolist()
    m = {"num_classes": len(counts), "n": n, "fractions": f}
    if target is not None:
        m.update(target=target, fd=float(np.linalg.norm(np.asarray(target) - f)), fd_ci=[0.0, 1.0])
    return m


def test_recorrected_point_estimate_is_the_correction_of_the_stored_fractions():
    n = 200
    rep = {"name": "known", "n": n, "attributes": {"tone": _stored([130, 70], n, [0.5, 0.5]),
                                                   "edge": _stored([50, 150], n)},
           "joint": {"fractions": [0.2, 0.45, 0.05, 0.3], "fd": 0.3, "fd_ci": [0.2, 0.4]}}
    out = recorrect_report(rep, CONFUSION)
    tone = out["attributes"]["tone"]
    want = correct_fractions([0.65, 0.35], confusion_matrix(CONFUSION["tone"]))
    np.testing.assert_allclose(want, [(0.65 - 0.1) / 0.7, (0.35 - 0.2) / 0.7])    # by hand: 0.8a + 0.1(1-a)
    assert tone["fractions_corrected"] == want.tolist()
    assert tone["fd_corrected"] == pytest.approx(math.sqrt(2) * abs(want[0] - 0.5), abs=1e-12)
    # the interval is the live bootstrap's on labels with the stored counts
    live = bootstrap_corrected(np.repeat([0, 1], [130, 70]), CONFUSION["tone"], [0.5, 0.5])
    assert tone["fd_corrected_ci"] == live["fd_corrected_ci"]
    assert tone["fractions_corrected_ci"] == live["fractions_corrected_ci"]
    edge = out["attributes"]["edge"]           # no target: corrected fractions, no corrected FD
    assert edge["fractions_corrected"] is not None and "fd_corrected" not in edge
    assert out["joint"]["fd_corrected"] is None and out[MARK] is True
    assert only_added(rep, out) == [] and strip_corrected(out) == rep
    assert recorrect_report(out, CONFUSION) == out                 # recorrecting again changes nothing


def test_recorrected_report_equals_a_live_evaluation():
    judge = ToyJudge(confusion_record(CONFUSION, ATTRS, data="by hand"))
    targets = {"tone": [0.5, 0.5], "edge": [0.3, 0.7], "tone*edge": [0.25] * 4}
    live = json.loads(json.dumps(evaluate_images(_images(33, 67, 41), judge, targets)))
    again = recorrect_report(strip_corrected(live), judge.confusion_counts())
    assert again.pop(MARK) is True
    assert again == live
    assert live["joint_targets"]["tone*edge"]["fd_corrected"] is None


def test_an_attribute_without_a_stored_confusion_gets_none():
    rep = {"n": 10, "attributes": {"tone": _stored([4, 6], 10, [0.5, 0.5]), "edge": _stored([5, 5], 10)}}
    out = recorrect_report(rep, {"edge": CONFUSION["edge"]})["attributes"]
    assert out["tone"]["fractions_corrected"] is None and out["tone"]["fd_corrected"] is None
    assert out["edge"]["fractions_corrected"] is not None


def test_sample_runs_get_the_corrected_share_of_the_requested_class():
    rep = {"name": "sample dark", "n": 100, "spec": {"targets": {"tone": "1"}},
           "attributes": {"tone": _stored([10, 90], 100, [0.0, 1.0])}, "requested_class_share": 0.9, "wall_s": 1.0}
    out = recorrect_report(rep, CONFUSION)
    assert list(out)[:list(out).index("requested_class_share") + 2][-1] == "requested_class_share_corrected"
    assert out["requested_class_share_corrected"] == out["attributes"]["tone"]["fractions_corrected"][1]


def test_bench_rows_gain_the_fields_after_fd_ci():
    row = {"name": "r", "n": 100, "fractions": [0.6, 0.4], "fd": math.sqrt(2) * 0.1, "fd_ci": [0.0, 0.2],
           "frechet": 3.0}
    out = recorrect_bench_row(row, CONFUSION, "tone", [0.5, 0.5])
    assert list(out) == ["name", "n", "fractions", "fd", "fd_ci", "fractions_corrected", "fd_corrected",
                         "fd_corrected_ci", "frechet", MARK]
    assert out["fractions_corrected"] == correct_fractions([0.6, 0.4], confusion_matrix(CONFUSION["tone"])).tolist()
    with pytest.raises(ValueError, match="not \\|\\|target - fractions\\|\\|"):
        recorrect_bench_row(row, CONFUSION, "tone", [0.3, 0.7])


@pytest.mark.parametrize("drop, match", [("n", "image count 'n'"), ("fractions", "argmax 'fractions'")])
def test_refuses_a_report_without_n_or_fractions(drop, match):
    m = _stored([4, 6], 10, [0.5, 0.5])
    del m[drop]
    rep = {"name": "old", "attributes": {"tone": m}}            # no report-level n either
    with pytest.raises(ValueError, match=match):
        recorrect_report(rep, CONFUSION)
    with pytest.raises(ValueError, match="no 'attributes'"):
        recorrect_report({"n": 10}, CONFUSION)


def test_refuses_fractions_that_are_not_whole_counts_and_live_reports():
    with pytest.raises(ValueError, match="not whole counts"):
        class_counts([0.333, 0.667], 10)
    live = recorrect_report({"n": 10, "attributes": {"tone": _stored([4, 6], 10)}}, CONFUSION)
    del live[MARK]
    with pytest.raises(ValueError, match="already carries live corrected fields"):
        recorrect_report(live, CONFUSION)


def test_guidance_eval_files_keep_their_numbers_and_gain_the_column(tmp_path):
    rep = {"attributes": {"tone": {**_stored([130, 70], 200, [0.5, 0.5]), "confident_share": 0.9},
                          "edge": _stored([50, 150], 200)},
           "n": 200, "confident_share": 0.9, "name": "run a", "wall_s": 20.0, "spec": {"mode": "vanilla"}}
    (tmp_path / "x.json").write_text(json.dumps([rep], indent=1) + "\n")
    (tmp_path / "x.md").write_text("x: n=200\n\n| old table |\n|---|\n| row |\n\ntrailer line\n")
    rows = recorrect_file(tmp_path / "x.json", CONFUSION)
    assert rows[0][:3] == ("run a", "tone", rep["attributes"]["tone"]["fd"])
    new = json.loads((tmp_path / "x.json").read_text())
    assert only_added([rep], new) == [] and new[0][MARK] is True
    md = (tmp_path / "x.md").read_text()
    assert md.startswith("x: n=200\n\n| run |") and md.endswith("\n\ntrailer line\n")
    assert "corrected FD [95% CI]" in md and "0.650/0.350 (corr. 0.786/0.214)" in md


def test_a_pixel_sweep_table_is_checked_against_its_raw_fd(tmp_path):
    head = ("parity -> [0.5, 0.5]: n=200, seeds 0-199, batch 100, device cpu\n\n"
            "| run | judge fractions | FD [95% CI] | confident | Frechet | s/img | time / vanilla |\n"
            "|---|---|---|---|---|---|---|\n")
    path = tmp_path / "sweep.md"
    path.write_text(head + "| vanilla | 0.810/0.190 | 0.438 [0.361, 0.516] | 0.935 | 35.15 | 0.3592 | 1.00 |\n")
    conf = {"parity": np.array([[50, 0], [0, 50]])}
    (row,) = recorrect_file(path, conf)
    assert row[2] == pytest.approx(math.sqrt(2) * 0.31) and row[3] == pytest.approx(row[2])
    text = path.read_text()
    assert "| vanilla | 0.810/0.190 (corr. 0.810/0.190) | 0.438 [0.361, 0.516] | 0.438 [" in text
    assert "| 0.935 | 35.15 | 0.3592 | 1.00 |" in text
    again = text
    recorrect_file(path, conf)
    assert path.read_text() == again
    path.write_text(head + "| vanilla | 0.810/0.190 | 0.400 [0.361, 0.516] | 0.935 | 35.15 | 0.3592 | 1.00 |\n")
    with pytest.raises(ValueError, match="the table has"):
        recorrect_file(path, conf)
