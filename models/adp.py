"""Attribute Distribution Predictor (ADP): timestep-conditioned linear classifiers on h-space.

As in the original code, each attribute has **one linear head per DDIM timestep** of the
sampling grid (the choice of head is the time conditioning): logits = W_s · norm_s(h) + b_s, with
norm_s a fixed per-timestep standardisation (mean/std of the training h at that step, stored as
buffers). Standardisation keeps the heads linear in h and makes one learning rate fit every step.
Binary and multi-class attributes are handled alike (K classes per head).

A checkpoint carries everything the next step needs: attribute and class names, h shape,
timesteps, the model config and checkpoint hash it was trained for, data source and metrics.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from models.files import load_tensors, read_json_object, write_atomic

ADP_KIND = "balancing-act/adp-v1"


class ClassifierMismatchError(ValueError):
    """An h-classifier was trained for another model, h shape or timestep grid."""


class ADP(nn.Module):
    """Per-timestep linear heads, one set per attribute: h [N,C,H,W] -> logits [N,K]."""

    def __init__(self, h_shape: tuple[int, ...], timesteps: list[int],
                 attributes: dict[str, list[str]]):
        super().__init__()
        self.h_shape, self.timesteps = tuple(h_shape), [int(t) for t in timesteps]
        self.attributes = {a: list(c) for a, c in attributes.items()}
        d, s = int(torch.tensor(self.h_shape).prod()), len(self.timesteps)
        self.register_buffer("mean", torch.zeros(s, d))
        self.register_buffer("std", torch.ones(s, d))
        self.weight = nn.ParameterDict({a: nn.Parameter(torch.zeros(s, len(c), d))
                                        for a, c in self.attributes.items()})
        self.bias = nn.ParameterDict({a: nn.Parameter(torch.zeros(s, len(c)))
                                      for a, c in self.attributes.items()})
        for a, c in self.attributes.items():     # guidance directions, see compute_directions
            self.register_buffer(f"dir_{a}", torch.zeros(s, len(c), d))
            # M_s[:, c] = mean softmax (tau 1) of validation samples of class c, see calibrate
            self.register_buffer(f"conf_{a}", torch.eye(len(c)).repeat(s, 1, 1))
        self._index = {t: i for i, t in enumerate(self.timesteps)}
        #: the model's class fractions per attribute {attr: [K]} (training labels, or samples)
        self.class_prior: dict[str, list[float]] = {}
        #: text-to-image: the class fractions of each prompt's samples {prompt: {attr: [K]}}
        self.prompt_prior: dict[str, dict[str, list[float]]] = {}

    def priors(self, prompt: str | None = None) -> dict[str, list[float]]:
        """The model's class fractions for a run: the prompt's own when the ADP was trained on
        samples of that prompt (text-to-image), else those of all its training samples."""
        return self.prompt_prior.get(prompt) or self.class_prior

    def step_index(self, t: int) -> int:
        """Index of timestep t in the grid the heads were trained on."""
        if int(t) not in self._index:
            raise ClassifierMismatchError(
                f"the ADP has no head for timestep {t}; it was trained on the grid "
                f"{self.timesteps[:3]}...{self.timesteps[-3:]} ({len(self.timesteps)} steps). "
                f"Sample with the same number of DDIM steps and skip type, or retrain it.")
        return self._index[int(t)]

    def head_index(self, t: float, rule: str = "exact") -> int:
        """Step index of the head for timestep t: the exact one (``exact``), or the head of the
        nearest trained timestep (``nearest``), which must lie within one grid spacing of t (the
        grid of another scheduler or step count); further away is an error naming the range."""
        if rule == "exact":
            return self.step_index(int(round(float(t))))
        cache = self.__dict__.setdefault("_nearest", {})      # the same few timesteps every batch
        if float(t) not in cache:
            cache[float(t)] = self._nearest_index(float(t))
        return cache[float(t)]

    def _nearest_index(self, t: float) -> int:
        grid = torch.tensor(self.timesteps, dtype=torch.float64)
        s = int((grid - float(t)).abs().argmin())
        spacing = float((grid.sort().values.diff().abs().max()) if len(grid) > 1 else 0.0)
        if abs(float(grid[s]) - float(t)) > spacing:
            raise ClassifierMismatchError(
                f"timestep {float(t):g} is outside the range the ADP covers: heads for timesteps "
                f"{min(self.timesteps)}..{max(self.timesteps)} (spacing {spacing:g}); use a scheduler "
                f"grid inside it, leave the step unguided (--guide_steps), or retrain the ADP on it")
        return s

    def head_map(self, timesteps, rule: str = "exact") -> dict[str, int]:
        """{sampler timestep: the trained timestep whose head serves it} (for run.json); raises
        for a timestep the rule cannot serve."""
        return {f"{float(t):g}": self.timesteps[self.head_index(t, rule)] for t in timesteps}

    def normalise(self, h: torch.Tensor, s: int) -> torch.Tensor:
        """h [N,C,H,W] (or [N,D]) -> standardised flat h [N,D] for step index s."""
        return (h.reshape(len(h), -1).float() - self.mean[s]) / self.std[s]

    def logits(self, h: torch.Tensor, t: int, attrs: list[str] | None = None) -> dict[str, torch.Tensor]:
        """{attribute: logits [N,K]} for bottleneck features h at timestep t."""
        return self.logits_at(h, self.step_index(t), attrs)

    def logits_at(self, h: torch.Tensor, s: int, attrs: list[str] | None = None) -> dict[str, torch.Tensor]:
        """{attribute: logits [N,K]} for bottleneck features h with the heads of step index s."""
        z = self.normalise(h, s)
        return {a: nn.functional.linear(z, self.weight[a][s], self.bias[a][s])     # as nn.Linear
                for a in (attrs or self.attributes)}

    def logits_all_steps(self, h_steps: torch.Tensor, attr: str) -> torch.Tensor:
        """h_steps [N,S,D] at every grid step -> logits [N,S,K] (training / evaluation)."""
        z = (h_steps.float() - self.mean) / self.std
        return torch.einsum("nsd,skd->nsk", z, self.weight[attr]) + self.bias[attr]

    def raw_weight(self, attr: str, s: int) -> torch.Tensor:
        """Head weights in raw h coordinates [K,D]: logits = W_raw (h - mean) + b."""
        return self.weight[attr][s] / self.std[s]

    def has_directions(self) -> bool:
        """Whether guidance directions were computed (``compute_directions``; an imported
        classifier of the original code has none)."""
        return any(bool(getattr(self, f"dir_{a}").any()) for a in self.attributes)

    def direction(self, attr: str, s: int) -> torch.Tensor:
        """Guidance directions [K,D] at step index s: Cov_s(h) @ W_raw^T, one per class logit."""
        return getattr(self, f"dir_{attr}")[s]

    def confusion(self, attr: str, s: int) -> torch.Tensor:
        """M_s [K,K]: column c is the mean predicted distribution of true class c at step s."""
        return getattr(self, f"conf_{attr}")[s]

    @torch.no_grad()
    def calibrate(self, h_steps: torch.Tensor, labels: dict[str, torch.Tensor]) -> None:
        """Measure M_s on held-out h [N,S,D]: E[p_hat] = M_s p_true for a batch with class
        fractions p_true, so M_s^-1 p_hat is an unbiased estimate of p_true (as CLEAM corrects
        FD with a classifier's confusion). Early steps, where the heads are unsure, shrink p_hat
        towards uniform; the correction undoes that shrinkage."""
        self.calibrate_from_chunks([(h_steps, labels)])

    @torch.no_grad()
    def calibrate_from_chunks(self, chunks) -> None:
        """``calibrate`` on held-out data read in pieces: chunks (h [n,S,D], {attr: labels [n]}).
        M_s[:, c] = (sum of softmax(logits) over the samples of class c) / their count, the sums
        in float64. An attribute without labels, or a class without samples, keeps its M_s."""
        dev = self.mean.device
        sums = {a: torch.zeros(len(self.timesteps), len(c), len(c), dtype=torch.float64, device=dev)
                for a, c in self.attributes.items()}
        counts = {a: torch.zeros(len(c), dtype=torch.float64, device=dev) for a, c in self.attributes.items()}
        for h, labels in chunks:
            for a in self.attributes:
                if a in labels:
                    y = labels[a].to(dev).long()
                    probs = torch.softmax(self.logits_all_steps(h.to(dev), a), dim=-1)    # [n, S, K]
                    sums[a].index_add_(2, y, probs.permute(1, 2, 0).double())   # [S, K, true class]
                    counts[a] += torch.bincount(y, minlength=len(counts[a])).double()
        for a in self.attributes:
            seen = counts[a] > 0
            getattr(self, f"conf_{a}")[:, :, seen] = (sums[a][:, :, seen] / counts[a][seen]).float()

    @torch.no_grad()
    def compute_directions(self, h_steps: torch.Tensor, batch: int = 2048) -> None:
        """E_s = Cov_s(h) W_raw,s^T from training h [N,S,D]: the covariance-preconditioned
        gradient of each logit. A linear head's weight is about Cov^-1 (mu_1 - mu_0) (as in LDA),
        so moving h along Cov·w moves it along the class-mean difference, the direction the
        decoder actually responds to; the plain gradient w points into low-variance directions
        the decoder mostly ignores."""
        self.directions_from_chunks(h_steps[i:i + batch] for i in range(0, len(h_steps), batch))

    @torch.no_grad()
    def directions_from_chunks(self, chunks) -> int:
        """``compute_directions`` on training h read in pieces (chunks h [n,S,D]); returns N.
        Cov_s W^T = sum_i (h_i - mean_s) ((h_i - mean_s) · W_raw,s^T) / (N - 1), centred on the
        stored (training) mean and summed chunk by chunk: memory is one chunk plus [S,K,D] per
        attribute, never D x D."""
        acc = {a: torch.zeros_like(getattr(self, f"dir_{a}")) for a in self.attributes}
        n = 0
        for h in chunks:
            n += len(h)
            for s in range(len(self.timesteps)):
                hc = h[:, s].to(self.mean.device).float() - self.mean[s]         # [n, D]
                for a in self.attributes:
                    acc[a][s] += (hc @ self.raw_weight(a, s).T).T @ hc           # [K, D]
        for a in self.attributes:
            getattr(self, f"dir_{a}").copy_(acc[a] / max(n - 1, 1))
        return n

    # ---- checkpoints -------------------------------------------------------------------
    def save(self, path: str | Path, model_id: dict, data_source: dict, metrics: dict,
             imported: dict | None = None) -> None:
        """A ``.pt`` file (tensors and plain metadata only: loadable with ``weights_only=True``),
        or, for a path without that suffix, an ADP folder: ``config.json`` (everything but the
        tensors), ``model.safetensors`` and a ``README.md`` model card (``adp_card``)."""
        info = {"kind": ADP_KIND, "h_shape": list(self.h_shape), "timesteps": self.timesteps,
                "attributes": self.attributes, "model": model_id, "data_source": data_source, "metrics": metrics,
                "imported": imported, "class_prior": self.class_prior, "prompt_prior": self.prompt_prior}
        path = Path(path)
        if path.suffix == ".pt":
            torch.save({**info, "state_dict": self.state_dict()}, path)
            return
        from safetensors.torch import save as safetensors_bytes
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        write_atomic(path / "model.safetensors", safetensors_bytes(tensors))
        write_atomic(path / "config.json", (json.dumps(info, indent=1) + "\n").encode())
        write_atomic(path / "README.md", adp_card(info).encode())

    @classmethod
    def from_original(cls, heads: dict[str, tuple[dict[str, torch.Tensor], list[str]]],
                      timesteps: list[int], h_shape: tuple[int, ...]) -> "ADP":
        """An ADP from the original code's classifiers: {attribute: (state dict, class names)},
        each state dict holding one head per step, ``linears.{i}.weight [K, D]`` and ``.bias
        [K]`` (or the older ``linears.{i}.0.weight``), head i for ``timesteps[i]`` (the original
        grid in ascending order, without t = 999). Identity standardisation, so the logits equal
        the original's ``linears[i](h.flatten())``; no guidance directions (``compute_directions``
        adds them), identity confusion matrices."""
        adp = cls(h_shape, timesteps, {a: c for a, (_, c) in heads.items()})
        d = int(torch.tensor(h_shape).prod())
        for attr, (sd, classes) in heads.items():
            per_head = _original_heads(sd, attr)
            if sorted(per_head) != list(range(len(timesteps))):
                raise ClassifierMismatchError(
                    f"{attr}: the checkpoint has {len(per_head)} heads (indices {sorted(per_head)[:3]}...) "
                    f"but the model config's grid has {len(timesteps)} guided steps; it was made for "
                    f"another grid or number of steps")
            k = len(classes)
            for i, hd in per_head.items():
                w, b = hd.get("weight"), hd.get("bias")
                if w is None or b is None or tuple(w.shape) != (k, d) or tuple(b.shape) != (k,):
                    raise ClassifierMismatchError(
                        f"{attr}, head {i}: weight {None if w is None else tuple(w.shape)}, bias "
                        f"{None if b is None else tuple(b.shape)}; expected [{k}, {d}] and [{k}] for "
                        f"classes {classes} on h of shape {tuple(h_shape)} (another model, or another "
                        f"number of classes)")
                with torch.no_grad():
                    adp.weight[attr][i] = w.float()
                    adp.bias[attr][i] = b.float()
        return adp

    @classmethod
    def load(cls, path: str | Path, expect_model: dict | None = None,
             expect_h_shape: tuple[int, ...] | None = None) -> "ADP":
        """Load a checkpoint; refuse one made for another model or h shape (clear message)."""
        path = _adp_path(Path(path))
        ck = read_folder(path) if path.is_dir() else load_tensors(path, "an ADP checkpoint", ClassifierMismatchError)
        if not isinstance(ck, dict) or ck.get("kind") != ADP_KIND:
            hint = ""
            if isinstance(ck, dict) and any(str(k).startswith("linears.") for k in ck):
                hint = (": it looks like a classifier of the original code; import it with "
                        "python multi_classifier.py --import_original (README)")
            raise ClassifierMismatchError(f"{path} is not an ADP checkpoint of this project{hint}")
        if expect_h_shape is not None and tuple(ck["h_shape"]) != tuple(expect_h_shape):
            raise ClassifierMismatchError(
                f"{path} was trained on h of shape {tuple(ck['h_shape'])} but the model gives "
                f"{tuple(expect_h_shape)}: it belongs to another model ({ck['model']}).")
        if expect_model is not None:
            model = ck.get("model") if isinstance(ck.get("model"), dict) else {}
            want, have = expect_model.get("checkpoint_sha256"), model.get("checkpoint_sha256")
            if want and not have and not (ck.get("imported") and model.get("config") == expect_model.get("config")):
                raise ClassifierMismatchError(
                    f"{path} records no model checkpoint hash, so it cannot be checked to belong to "
                    f"the loaded model ({expect_model.get('config')}); retrain it (multi_classifier.py) "
                    f"or re-import it with the checkpoint file present")
            if want and have and want != have:
                raise ClassifierMismatchError(
                    f"{path} was trained for model {model.get('config')} with checkpoint "
                    f"sha256 {have[:12]}…, but the loaded model's checkpoint is {want[:12]}… "
                    f"({expect_model.get('config')}). A classifier must match its model; "
                    f"retrain it (multi_classifier.py) for this checkpoint.")
            for key in ("h_module", "h_pool"):        # where h is read (text-to-image families)
                if key in model and key in expect_model and model[key] != expect_model[key]:
                    raise ClassifierMismatchError(
                        f"{path} was trained on h read with {key} = {model[key]!r}, but the run reads it with "
                        f"{key} = {expect_model[key]!r}: set model.{key} to {model[key]!r} or retrain it there")
        adp = cls(tuple(ck["h_shape"]), ck["timesteps"], ck["attributes"])
        adp.load_state_dict(ck["state_dict"], strict=True)
        adp.meta = {k: ck.get(k) for k in ("model", "data_source", "metrics", "imported")}
        adp.class_prior = dict(ck.get("class_prior") or {})
        adp.prompt_prior = dict(ck.get("prompt_prior") or {})
        return adp.eval()


def _adp_path(path: Path) -> Path:
    """An ADP file or folder as given, or a hub id (``org/name``) from the local Hugging Face cache."""
    if path.exists():
        return path
    spec = str(path)
    if spec.count("/") == 1 and not path.suffix:
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(spec, local_files_only=True))
        except Exception:                         # not cached, or offline: the message below
            pass
    raise FileNotFoundError(f"h-classifier checkpoint not found: {path}. Train one with multi_classifier.py "
                            f"(see README), pass --adp PATH (a .pt file or an ADP folder) or a cached hub id")


def read_folder(folder: Path) -> dict:
    """An ADP folder (``config.json`` + ``model.safetensors``) as the dict a ``.pt`` file holds."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    info = read_json_object(folder / "config.json", "an ADP folder's config.json",
                            "restore the folder, or retrain with multi_classifier.py") \
        if (folder / "config.json").is_file() else None
    if info is None or not (folder / "model.safetensors").is_file():
        raise ClassifierMismatchError(f"{folder} is not an ADP folder: it needs config.json and model.safetensors "
                                      f"(written by multi_classifier.py --out FOLDER)")
    try:
        state = load_file(str(folder / "model.safetensors"))
    except (SafetensorError, OSError, ValueError) as e:
        raise ClassifierMismatchError(f"{folder / 'model.safetensors'} cannot be read ({e}); restore it or "
                                      f"retrain") from None
    return {**info, "state_dict": state}


def adp_card(info: dict) -> str:
    """The README.md model card of an ADP folder: the model, the data and labeller, accuracy per
    step and class fractions."""
    model, data, metrics = info.get("model") or {}, info.get("data_source") or {}, info.get("metrics") or {}
    c, hh, ww = (list(info["h_shape"]) + [1, 1])[:3]
    lines = [f"# ADP: {', '.join(info['attributes'])} for {model.get('config') or 'a diffusion model'}", "",
             "Attribute Distribution Predictor of Balancing Act (Parihar et al., CVPR 2024): one linear head per "
             "sampling timestep and attribute on the denoiser's h. Load it with `ADP.load(FOLDER)` or pass "
             "`--adp FOLDER` to main.py.", "",
             f"- model: `{model.get('checkpoint')}` (config `{model.get('config')}`, checkpoint sha256 "
             f"`{str(model.get('checkpoint_sha256'))[:16]}...`)",
             f"- h: shape {c}x{hh}x{ww}" + (f", module `{model['h_module']}`" if model.get("h_module") else "")
             + (f", pooled to {model['h_pool']}x{model['h_pool']}" if model.get("h_pool") else ""),
             f"- timesteps: {len(info['timesteps'])} ({min(info['timesteps'])}..{max(info['timesteps'])})",
             f"- data: {data.get('n', '?')} samples, source {data.get('source', '?')}, labeller "
             f"`{data.get('labeller', '-')}`", "", "| attribute | classes | class fractions | val. accuracy "
             "(first 10% of steps / last 20%) |", "|---|---|---|---|"]
    for attr, classes in info["attributes"].items():
        m = (metrics.get("attributes") or {}).get(attr) or {}
        prior = (info.get("class_prior") or {}).get(attr)
        frac = ", ".join(f"{p:.3f}" for p in prior) if prior else "-"
        acc = (f"{m['val_accuracy_first_10pct']:.3f} / {m['val_accuracy_last_20pct']:.3f}"
               if "val_accuracy_last_20pct" in m else "-")
        lines.append(f"| {attr} | {', '.join(classes)} | {frac} | {acc} |")
    per_step = {a: m.get("val_accuracy_per_step") for a, m in (metrics.get("attributes") or {}).items()
                if m.get("val_accuracy_per_step")}
    if per_step:
        lines += ["", "Validation accuracy per step (sampling order):", ""]
        lines += [f"- {a}: " + " ".join(f"{v:.2f}" for v in acc) for a, acc in per_step.items()]
    return "\n".join(lines) + "\n"


def _original_heads(sd: dict, attr: str) -> dict[int, dict[str, torch.Tensor]]:
    """{head index: {"weight", "bias"}} from an original classifier's state dict."""
    heads: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in sd.items():
        parts = str(key).split(".")
        ok = (parts[0] == "linears" and len(parts) in (3, 4) and parts[1].isdigit()
              and parts[-1] in ("weight", "bias") and (len(parts) == 3 or parts[2] == "0"))
        if not ok or not isinstance(v, torch.Tensor):
            raise ClassifierMismatchError(
                f"{attr}: unexpected entry {key!r}; a classifier of the original code holds "
                f"linears.{{i}}.weight / .bias (or linears.{{i}}.0.weight / .bias) tensors only")
        heads.setdefault(int(parts[1]), {})[parts[-1]] = v
    return heads
