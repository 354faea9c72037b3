"""utils/baselines/rejection.py: quotas, the acceptance rule on a stream with a known answer, the max-draw
error, and the pipeline path (tiny ADM, a fake judge) against an independent vanilla run."""
import numpy as np
import pytest
import torch

from models.judge import Judge
from utils.sampling.diffusion import DDIMSampler, Schedule
from utils.sampling.pipeline import Pipeline
from utils.sampling.images import to_uint8
from utils.baselines.rejection import accept_from_stream, class_quotas, rejection_sample
from utils.sampling.seeds import SeededNoise

SHAPE = (1, 16, 16)


def test_quotas_sum_to_n():
    assert class_quotas([0.5, 0.5], 5) == [3, 2]
    assert class_quotas([0.2, 0.8], 10) == [2, 8]
    assert class_quotas([1 / 3] * 3, 10) == [4, 3, 3]
    assert class_quotas([0.0, 1.0], 4) == [0, 4]
    with pytest.raises(ValueError, match="summing to 1"):
        class_quotas([0.6, 0.6], 4)


def _seed_stream(batch, n_max):
    """Images [b,1,1,1] whose single pixel is their seed."""
    for s in range(0, n_max, batch):
        seeds = list(range(s, min(s + batch, n_max)))
        yield seeds, np.asarray(seeds, dtype=np.uint8).reshape(-1, 1, 1, 1)


def test_accept_known_answer_by_seed():
    """Class 1 iff seed % 4 == 0 (25%); 50/50 of 4: seeds 0 (c1), 1, 2 (c0), 3 rejected, 4 (c1)."""
    out = accept_from_stream(_seed_stream(3, 100), lambda im: (im[:, 0, 0, 0] % 4 == 0).astype(int),
                             [2, 2], 100)
    assert out["seeds"] == [0, 1, 2, 4] and out["labels"] == [1, 0, 0, 1]
    assert out["n_needed"] == 5 and out["n_drawn"] == 6           # two batches of 3
    assert out["images"][:, 0, 0, 0].tolist() == [0, 1, 2, 4]


def test_accept_parity_20_80_known_answer():
    """Labels by seed parity; 1 even + 4 odd of 5: seeds 0, 1, 3, 5, 7 -> 8 examined."""
    out = accept_from_stream(_seed_stream(10, 100), lambda im: im[:, 0, 0, 0] % 2, [1, 4], 100)
    assert out["seeds"] == [0, 1, 3, 5, 7] and out["n_needed"] == 8 and out["n_drawn"] == 10


def test_max_draws_error_is_clear():
    with pytest.raises(RuntimeError, match=r"max_draws=20 .*accepted \[2, 0\] of \[2, 2\]"):
        accept_from_stream(_seed_stream(5, 20), lambda im: np.zeros(len(im), int), [2, 2], 20)


class BrightJudge(Judge):
    """Class 1 iff the image's mean is above 0.05 (a fake judge on real pixels)."""
    attributes = {"bright": ["dark", "bright"]}

    def predict(self, images):
        p1 = (images.flatten(1).mean(1) > 0.05).float()
        return {"bright": torch.stack([1 - p1, p1], dim=1)}


def test_rejection_sample_on_tiny_model(tiny_adm):
    sampler = DDIMSampler(tiny_adm, Schedule.from_config({}), 3, eta=1.0)
    pipe = Pipeline(tiny_adm, sampler, {}, SHAPE, torch.device("cpu"))
    noise = SeededNoise(list(range(10, 26)), SHAPE)              # the same seeds, drawn independently
    vanilla = to_uint8(sampler.sample(noise.x_T(), noise.step)[0])
    judge = BrightJudge()
    labels = judge.predict(torch.from_numpy(vanilla).permute(0, 3, 1, 2).float() / 127.5 - 1)["bright"].argmax(1)
    n1 = int(labels.sum())
    assert 2 <= n1 <= 14, "the fake judge needs two of each class among these seeds"
    res = rejection_sample(pipe, judge, "bright", [0.5, 0.5], 4, batch_size=4, first_seed=10,
                           max_draws=16, progress=False)
    first = sorted(10 + k for c in (0, 1) for k in np.flatnonzero(labels.numpy() == c)[:2])
    assert res.seeds == first and res.quotas == [2, 2] and res.labels == labels[[s - 10 for s in first]].tolist()
    assert res.n_needed == first[-1] - 10 + 1 and res.n_drawn == 4 * -(-res.n_needed // 4)
    assert (res.images == vanilla[[s - 10 for s in res.seeds]]).all()
    assert res.tensor().shape == (4, *SHAPE)
    with pytest.raises(ValueError, match="3 fractions but the judge has 2"):
        rejection_sample(pipe, judge, "bright", [0.2, 0.3, 0.5], 2, progress=False)
