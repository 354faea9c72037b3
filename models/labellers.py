"""Image classifiers that label or check generated images, by name or file."""
from __future__ import annotations

from models.files import resolve_path
from models.judge import Judge, load_judge

#: built-in labellers by name -> (module, class)
BUILTIN = {"digits_svc": ("models.digits_judge", "SVCLabeller")}


def load_labeller(spec: str) -> Judge:
    """A labeller by name (``digits_svc``: the embedded default's SVM on pixels) or a judge
    file (.pt / .onnx) with ``predict(images) -> {attribute: probabilities [N,K]}``."""
    if spec in BUILTIN:
        import importlib
        module, cls = BUILTIN[spec]
        return getattr(importlib.import_module(module), cls)()
    path = resolve_path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"labeller {spec!r} not found ({path}): give {sorted(BUILTIN)} or a "
                                f"classifier file (.pt / .onnx); or turn the check off with --no-check")
    return load_judge(str(path))
