"""torchrun for text-to-image (gloo, 2 CPU processes, the tiny random SD pipeline): extraction
writes the shards one process writes, and a distribution-guided run of global batch 4 (2 per
rank) gives the images and estimates of one process with batch 4."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from helpers import save_tiny_clip  # noqa: E402
from models.sd_tiny import save_tiny_sd  # noqa: E402
from utils.sampling.images import read_png  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(not TORCHRUN.exists() or not torch.distributed.is_available(),
                                reason="torchrun / torch.distributed not available")


def _main(*argv, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    done = subprocess.run([*launcher, str(ROOT / "main.py"), *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_t2i")
    sd, clip = save_tiny_sd(root / "sd"), save_tiny_clip(root / "clip")
    cfg = {"name": "tiny_sd_ddp", "model": {"family": "sd", "checkpoint": str(sd)},
           "sampling": {"steps": 4, "eta": 0.0, "cfg": 7.5}, "guidance": {"preset": "ours"},
           "labeller": {"kind": "clip", "model": str(clip),
                        "attributes": {"gender": {"female": "a photo of a woman", "male": "a photo of a man"}}}}
    path = root / "tiny.yml"
    path.write_text(yaml.safe_dump(cfg))
    return root, path


def _shards(folder: Path) -> dict:
    return {p.name: torch.load(p, weights_only=True) for p in sorted(folder.glob("shard_*.pt"))}


@pytest.mark.slow
def test_extraction_and_a_guided_run_under_torchrun_equal_one_process(setup):
    import multi_classifier
    root, cfg = setup
    for nproc in (1, 2):
        _main("--config", cfg, "--extract_pseudo", 12, "--prompts", _prompts(root), "--bs_test", 2,
              "--savepath", root / f"h{nproc}", nproc=nproc)
    one, two = _shards(root / "h1"), _shards(root / "h2")
    assert list(one) == list(two) == [f"shard_{k:05d}.pt" for k in range(6)]         # complete, each once
    for name in one:
        assert one[name]["ids"] == two[name]["ids"] and one[name]["prompt"] == two[name]["prompt"]
        assert torch.equal(one[name]["h"], two[name]["h"])
        assert all(torch.equal(one[name]["labels"][a], two[name]["labels"][a]) for a in one[name]["labels"])
    meta = [json.loads((root / f"h{n}" / "meta.json").read_text()) for n in (1, 2)]
    assert meta[0] == meta[1]
    assert multi_classifier.main(["--data", str(root / "h1"), "--attributes", "gender", "--out",
                                  str(root / "adp.pt"), "--epochs", "2"]) == 0
    runs = {}
    for nproc, bs in ((1, 4), (2, 2)):                      # the same global batches of 4
        out = root / f"run{nproc}"
        _main("--config", cfg, "--adp", root / "adp.pt", "--prompt", "a photo of a doctor", "--mode",
              "distribution", "--target", "gender=0.5", "--seeds", "0-7", "--bs_test", bs, "--no-check",
              "--exp", out, nproc=nproc)
        runs[nproc] = json.loads((out / "run.json").read_text())
        runs[nproc]["images"] = [read_png(out / f"{s:06d}.png") for s in range(8)]
    assert runs[2]["world_size"] == 2 and runs[2]["status"] == "complete"
    assert all((a == b).all() for a, b in zip(runs[1]["images"], runs[2]["images"]))
    e1, e2 = runs[1]["adp_distribution_last_step"], runs[2]["adp_distribution_last_step"]
    assert [e["seeds"] for e in e1] == [e["seeds"] for e in e2] == [[0, 3], [4, 7]]
    for a, b in zip(e1, e2):
        assert a["adp_distribution"]["gender"] == pytest.approx(b["adp_distribution"]["gender"], abs=1e-5)


def _prompts(root: Path) -> Path:
    path = root / "prompts.txt"
    path.write_text("a photo of a doctor\na photo of a nurse\n")
    return path
