"""The text-to-image digits model: prompts with known, exact digit fractions over the DDPM's
training subset, a word-level CLIP tokenizer for their vocabulary, and the tiny architectures.

A prompt's spec (``prompts:`` of configs/digits16_t2i.yml) names the digits it may show and the
share of the even ones among them: ``{digits: [0, 1, 2, 3, 4], even: 0.8}`` gives 0, 2 and 4 a
total of 0.8 and 1 and 3 a total of 0.2, equal within each group; without ``even`` every digit
gets the same share. ``{mix: {a small digit: 0.75, a large digit: 0.25}}`` is the weighted
mixture of prompts listed before it; ``{mix: [{digits: [0, 1, 2, 3, 4], even: 0.82, weight:
0.75}, ..]}`` the weighted mixture of unnamed parts, each a spec of its own (a part carries the
prompt's text). Fractions are exact (``fractions.Fraction``); a prompt's training list
(``prompt_subset``) holds each digit exactly its share of the list, drawn from the training
subset's images of that digit, each image used as evenly often as the count allows.

The tokenizer is a stock ``CLIPTokenizer``: its vocabulary holds every prompt word with the
end-of-word mark (``digit</w>``) plus the pieces its merges pass through, and ``merges.txt``
builds each word left to right, so each vocabulary word is one token.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from fractions import Fraction
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import numpy as np

from models.digits import ATTRIBUTES, attribute_labels

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"

#: UNet2DConditionModel on 4x8x8 latents (16 px images, vae_scale_factor 2): 1.45M parameters,
#: h = mid_block's output 64x4x4
UNET = dict(sample_size=8, in_channels=4, out_channels=4,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], block_out_channels=[32, 64],
            layers_per_block=2, cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16)
#: PixArtTransformer2DModel on the same latents (the text-conditional transformer default,
#: configs/digits16_dit.yml): patch 2, so its tokens lie on the U-Net h's 4x4 grid; 6 blocks of
#: width 128 (4 heads of 32), cross-attention to the text encoder's 64-wide states through the
#: caption projection, adaLN-single timestep conditioning, no learned variance: 1.76M parameters
DIT = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=6, num_attention_heads=4,
           attention_head_dim=32, cross_attention_dim=128, norm_type="ada_norm_single",
           norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False)
#: AutoencoderKL, 3x16x16 <-> 4x8x8 (vae_scale_factor 2); scaling_factor is set after training
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32],
           down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
           layers_per_block=1, norm_num_groups=8, sample_size=16)
#: CLIPTextModel (vocab_size and the token ids come from the tokenizer)
TEXT_ENCODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
#: DDIMScheduler: the digits DDPM's linear betas with Stable Diffusion's step placement
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                 prediction_type="epsilon")
#: with ``train.zero_snr`` (Lin et al. 2024, "Common diffusion noise schedules and sample steps
#: are flawed"): the same betas rescaled to zero terminal SNR (abar_999 = 0, so the first step's
#: pure noise is exactly the training marginal), v-prediction, and trailing steps from t = 999
ZERO_SNR = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")


@dataclass(frozen=True)
class PromptSpec:
    """A prompt and the digits its training images show (module docstring)."""
    text: str
    digits: tuple[int, ...]
    even: Fraction | None = None       # total share of the even digits; None: uniform
    mix: tuple[tuple["PromptSpec", Fraction], ...] = ()    # a mixture of earlier prompts instead

    @classmethod
    def from_config(cls, text: str, spec: dict, earlier: dict[str, "PromptSpec"] | None = None) -> "PromptSpec":
        if text != text.strip().lower() or not all(w.isalpha() for w in text.split()):
            raise ValueError(f"prompt {text!r}: use lower-case words of letters separated by spaces")
        if isinstance(spec, dict) and set(spec) == {"mix"}:
            return cls._mixture(text, spec["mix"], earlier or {})
        return cls._digits(text, spec)

    @classmethod
    def _digits(cls, text: str, spec) -> "PromptSpec":
        unknown = sorted(set(spec or {}) - {"digits", "even"}) if isinstance(spec, dict) else ["?"]
        if unknown or not spec.get("digits"):
            raise ValueError(f"prompt {text!r}: expected {{digits: [..], even: share}} (even optional), "
                             f"{{mix: {{earlier prompt: weight, ..}}}} or {{mix: [{{digits: [..], even: share, "
                             f"weight: w}}, ..]}}, got {spec!r}")
        digits = tuple(int(d) for d in spec["digits"])
        if len(set(digits)) != len(digits) or not all(0 <= d <= 9 for d in digits):
            raise ValueError(f"prompt {text!r}: digits {list(digits)} must be distinct, each 0-9")
        even = spec.get("even")
        if even is not None:
            even = Fraction(str(even))         # "0.8" -> 4/5 exactly
            needed = {0} if even == 1 else {1} if even == 0 else {0, 1}      # parities it must have
            if not 0 <= even <= 1 or not needed <= {d % 2 for d in digits}:
                raise ValueError(f"prompt {text!r}: even {spec['even']} must lie in [0, 1], and its digits "
                                 f"{list(digits)} must hold both parities unless it is 0 or 1")
        return cls(text, digits, even)

    @classmethod
    def _mixture(cls, text: str, weights, earlier: dict[str, "PromptSpec"]) -> "PromptSpec":
        if isinstance(weights, list) and weights and all(isinstance(w, dict) and "weight" in w for w in weights):
            parts = tuple((cls._digits(text, {k: v for k, v in w.items() if k != "weight"}),
                           Fraction(str(w["weight"]))) for w in weights)
            shares = [w["weight"] for w in weights]
        elif isinstance(weights, dict) and weights:
            missing = [k for k in weights if k not in earlier]
            if missing:
                raise ValueError(f"prompt {text!r}: mix names {missing}, which are not listed before it "
                                 f"(listed: {list(earlier)})")
            parts = tuple((earlier[k], Fraction(str(w))) for k, w in weights.items())
            shares = list(weights.values())
        else:
            raise ValueError(f"prompt {text!r}: mix expects {{earlier prompt: weight, ..}} or a list of "
                             f"{{digits: [..], even: share, weight: w}}, got {weights!r}")
        if any(w <= 0 for _, w in parts) or sum(w for _, w in parts) != 1:
            raise ValueError(f"prompt {text!r}: mix weights {shares} must be > 0 and sum to 1")
        digits = tuple(sorted({d for p, _ in parts for d in p.digits}))
        return cls(text, digits, mix=parts)

    def digit_fractions(self) -> dict[int, Fraction]:
        """p(digit | prompt), exact; digits outside the spec are absent."""
        if self.mix:
            return mixture([p.digit_fractions() for p, _ in self.mix], [w for _, w in self.mix])
        if self.even is None:
            return {d: Fraction(1, len(self.digits)) for d in self.digits}
        evens = [d for d in self.digits if d % 2 == 0]
        odds = [d for d in self.digits if d % 2 == 1]
        out = {d: self.even / len(evens) for d in evens}
        out.update({d: (1 - self.even) / len(odds) for d in odds})
        return {d: out[d] for d in self.digits if out[d] > 0}

    def shown(self) -> dict:
        """The spec as the record shows it."""
        if self.mix and self.mix[0][0].text == self.text:    # unnamed parts carry the prompt's text
            return {"digits": list(self.digits),
                    "mix": [{**p.shown(), "weight": str(w)} for p, w in self.mix]}
        if self.mix:
            return {"digits": list(self.digits), "mix": {p.text: str(w) for p, w in self.mix}}
        return {"digits": list(self.digits), "even": None if self.even is None else str(self.even)}


def tinted(grey, labels, strength: float):
    """Grey digits [N,1,H,W] in [-1,1] -> RGB [N,3,H,W]: digits 0-4 warm (red raised, blue lowered
    by ``strength * (1 - |g|)``), digits 5-9 cool (the opposite). The channel mean is the grey
    image exactly, and pure black and white stay grey, so whatever reads the channel mean (the
    judge, the SVM labeller, the Frechet features) sees the untinted digit; ``strength`` 0 gives
    grey repeated to RGB, 1 is the most the range [-1, 1] allows.

    Why: classifier-free guidance samples ~ p(x|c)^w p(x)^(1-w), and where a prompt's minority
    digits look like the other set's majority (1, 3 like 5, 7, 9; 6, 8 like 0, 2, 4) the empty
    prompt's density there is raised by the other set and CFG thins them out: the prompts' biases
    sharpen with the scale. A tint that tells the two sets apart removes most of that overlap
    (docs/RESULTS.md 1h; scripts/research/t2i_cfg_sim.py measures it)."""
    import torch
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"tint {strength}: expected a strength in [0, 1] (0: grey, 1: the strongest tint)")
    if grey.ndim != 4 or grey.shape[1] != 1 or len(labels) != len(grey):
        raise ValueError(f"tinted: expected grey images [N,1,H,W] and N labels, got {tuple(grey.shape)} "
                         f"and {len(labels)} labels")
    chroma = float(strength) * (1 - grey.abs())
    sign = torch.as_tensor(np.where(np.asarray(labels) < 5, 1.0, -1.0), dtype=grey.dtype).view(-1, 1, 1, 1)
    return torch.cat([grey + sign * chroma, grey, grey - sign * chroma], dim=1)


def training_images(tint: float, split):
    """The RGB images a model trains on (and the simulator reads): the split's training digits
    with the config's ``tint`` (0: grey)."""
    return tinted(split.train_x, split.train_y, float(tint))


def parse_prompts(section: dict) -> list[PromptSpec]:
    """The ``prompts:`` mapping of a config -> specs (at least one; the empty prompt is reserved
    for classifier-free guidance; a ``mix`` names prompts listed before it)."""
    if not isinstance(section, dict) or not section:
        raise ValueError("prompts: expected a mapping {prompt: {digits: [..], even: share}}")
    if "" in section:
        raise ValueError("prompts: the empty prompt is the unconditional one (prompt dropout); do not list it")
    specs: dict[str, PromptSpec] = {}
    for text, spec in section.items():
        specs[text] = PromptSpec.from_config(text, spec, specs)
    return list(specs.values())


def mixture(fractions: list[dict[int, Fraction]], weights: list[Fraction]) -> dict[int, Fraction]:
    """sum_k w_k p_k(digit): e.g. the empty prompt's digits under uniform prompt dropout."""
    out: dict[int, Fraction] = {}
    for fr, w in zip(fractions, weights):
        for d, p in fr.items():
            out[d] = out.get(d, Fraction(0)) + w * p
    return dict(sorted(out.items()))


def attribute_fractions(digit_fractions: dict[int, Fraction]) -> dict:
    """{attribute: {class: fraction}} (parity, magnitude, digit) as floats, plus the exact digit
    fractions as "p/q" strings."""
    labels = attribute_labels(np.arange(10))
    out = {}
    for attr, names in ATTRIBUTES.items():
        out[attr] = {name: float(sum((p for d, p in digit_fractions.items() if labels[attr][d] == k),
                                     Fraction(0))) for k, name in enumerate(names)}
    out["digit_exact"] = {str(d): str(p) for d, p in sorted(digit_fractions.items())}
    return out


def subset_size(fractions: list[dict[int, Fraction]], minimum: int) -> int:
    """The smallest multiple of every fraction's denominator that is >= minimum, so that every
    prompt's list holds each digit an exact whole number of times."""
    step = math.lcm(*(p.denominator for fr in fractions for p in fr.values()))
    return step * max(1, -(-minimum // step))


def prompt_subset(fractions: dict[int, Fraction], labels: np.ndarray, size: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Indices into ``labels`` [N] (size of them): digit d exactly size * p(d) times, its images
    in a random order, repeated round-robin (each used floor or ceil of count / available times)."""
    out = []
    for d, p in sorted(fractions.items()):
        count = p * size
        if count.denominator != 1:
            raise ValueError(f"size {size} does not give digit {d} a whole count ({p} x {size}); "
                             f"use subset_size()")
        pool = np.flatnonzero(np.asarray(labels) == d)
        if len(pool) == 0:
            raise ValueError(f"digit {d} has no image in the training subset to draw from")
        order = rng.permutation(pool)
        out.append(np.resize(order, int(count)))
    return rng.permutation(np.concatenate(out))


@dataclass
class PromptData:
    """The training pairs of all prompts: pair k shows image ``image[k]`` of the training subset
    under prompt ``prompt[k]``; every prompt has ``size`` pairs (so a uniform pair is a uniform
    prompt). ``unconditional``: the index of the prompt whose pairs the empty prompt is trained on
    (None: a dropped pair keeps its image, so the empty prompt shows the prompts' uniform mixture)."""
    prompts: list[PromptSpec]
    image: np.ndarray
    prompt: np.ndarray
    size: int
    unconditional: int | None = None

    def empty_fractions(self) -> dict[int, Fraction]:
        """p(digit | empty prompt), exact."""
        if self.unconditional is not None:
            return self.prompts[self.unconditional].digit_fractions()
        n = len(self.prompts)
        return mixture([p.digit_fractions() for p in self.prompts], [Fraction(1, n)] * n)

    def record(self, labels: np.ndarray, dropout: float) -> dict:
        """Exact fractions per prompt (and for the empty prompt under ``dropout``), with how many
        distinct images each digit drew from and how often each is used (min, max)."""
        out = {}
        for k, spec in enumerate(self.prompts):
            idx = self.image[self.prompt == k]
            fr = spec.digit_fractions()
            measured = {d: Fraction(int(np.sum(labels[idx] == d)), len(idx)) for d in fr}
            if measured != fr:              # the list realises the spec exactly, or nothing ships
                raise AssertionError(f"prompt {spec.text!r}: list fractions {measured} != spec {fr}")
            uses = {d: np.unique(idx[labels[idx] == d], return_counts=True)[1] for d in fr}
            out[spec.text] = {**spec.shown(), "fractions": attribute_fractions(fr), "n_pairs": int(len(idx)),
                              "distinct_images": {str(d): int(len(u)) for d, u in uses.items()},
                              "uses_per_image": {str(d): [int(u.min()), int(u.max())] for d, u in uses.items()}}
        if self.unconditional is None:
            note = (f"the empty prompt (classifier-free guidance): each pair's prompt is dropped with "
                    f"probability {dropout}, so it shows the prompts' uniform mixture")
        else:
            note = (f"the empty prompt (classifier-free guidance): with probability {dropout} a pair becomes "
                    f"the empty prompt with an image drawn from {self.prompts[self.unconditional].text!r}'s "
                    f"pairs, so it shows that prompt's distribution")
        out[""] = {"note": note, "fractions": attribute_fractions(self.empty_fractions())}
        return out


def prompt_data(prompts: list[PromptSpec], labels: np.ndarray, minimum: int, seed: int,
                unconditional: str | None = None) -> PromptData:
    """Each prompt's ``prompt_subset`` of one common size (``subset_size`` >= minimum);
    ``unconditional``: the prompt whose distribution the empty prompt learns (PromptData)."""
    fractions = [p.digit_fractions() for p in prompts]
    size = subset_size(fractions, minimum)
    rng = np.random.default_rng(seed)
    image = [prompt_subset(fr, labels, size, rng) for fr in fractions]
    texts = [p.text for p in prompts]
    if unconditional is not None and unconditional not in texts:
        raise ValueError(f"unconditional: {unconditional!r} is not one of the prompts {texts}")
    return PromptData(prompts, np.concatenate(image), np.repeat(np.arange(len(prompts)), size), size,
                      None if unconditional is None else texts.index(unconditional))


def vocabulary(prompts: list[PromptSpec]) -> list[str]:
    """The prompts' words, sorted."""
    return sorted({w for p in prompts for w in p.text.split()})


def _word_merges(word: str) -> tuple[list[str], list[tuple[str, str]]]:
    """A word's initial symbols (its last letter carries the end-of-word mark) and the merges
    that join them left to right."""
    symbols = list(word[:-1]) + [word[-1] + EOW]
    merges, left = [], symbols[0]
    for s in symbols[1:]:
        merges.append((left, s))
        left += s
    return symbols, merges


def tokenizer_files(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab (token -> id: the two special tokens, each word with its end-of-word mark, then the
    pieces) and merges in rank order. Merges that extend a piece of two or more letters come
    first; each word's first merge comes before the first merge of any other word whose first two
    symbols occur inside it, so no word is cut by another word's merge."""
    parts = {w: _word_merges(w) for w in words}
    first = {w: m[0] for w, (_, m) in parts.items() if m}
    order = TopologicalSorter({w: () for w in first})
    for w in first:
        symbols = parts[w][0]
        for v in first:
            if v != w and first[v] != first[w] and first[v] in set(zip(symbols, symbols[1:])):
                order.add(v, w)                    # w's first merge ranks before v's
    try:
        ranked = list(order.static_order())
    except CycleError as e:
        raise ValueError(f"prompt words {e.args[1]} cut each other in BPE; rename one of them") from None
    merges = list(dict.fromkeys([m for w in words for m in parts[w][1][1:]] + [first[w] for w in ranked]))
    pieces = sorted({s for symbols, _ in parts.values() for s in symbols}
                    | {a + b for a, b in merges} | {a for a, _ in merges})
    tokens = [BOS, EOS] + [w + EOW for w in words]
    tokens += [p for p in pieces if p not in tokens]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_word_tokenizer(folder: Path, words: list[str], max_length: int | None = None) -> None:
    """A CLIPTokenizer folder in which each of ``words`` is one token (``tokenizer_files``);
    ``max_length`` None: vocab.json and merges.txt only (beside a saved tokenizer.json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tokenizer_files(words)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    if max_length is None:
        return
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
        **special}))
    (folder / "special_tokens_map.json").write_text(json.dumps(special))


def check_tokenizer(tokenizer, words: list[str]) -> None:
    """Each word must be exactly one known token, and the longest prompt must fit."""
    for w in words:
        ids = tokenizer(w, add_special_tokens=False).input_ids
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer splits {w!r} into {tokenizer.convert_ids_to_tokens(ids)}: "
                             f"expected the one token {w + EOW!r}")


def build_components(tokenizer_folder: Path, prompts: list[PromptSpec], max_length: int, seed: int,
                     zero_snr: bool = False, denoiser: str = "unet", init_from: Path | None = None):
    """(tokenizer, text encoder, denoiser, VAE, scheduler) with random weights drawn from ``seed``;
    the tokenizer is written to ``tokenizer_folder`` first; ``zero_snr``: the scheduler of
    ``ZERO_SNR``; ``denoiser``: ``unet`` (``UNET``) or ``dit`` (``DIT``). ``init_from``: a trained
    digits pipeline folder whose tokenizer, VAE (frozen, with its scaling_factor) and text
    encoder (the starting weights) are taken instead; it must know every prompt word."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    if denoiser not in ("unet", "dit"):
        raise ValueError(f"train.denoiser {denoiser!r}: expected unet or dit")
    torch.manual_seed(seed)
    longest = max(len(p.text.split()) for p in prompts) + 2          # + BOS, EOS
    if longest > max_length:
        raise ValueError(f"max_length {max_length} is shorter than the longest prompt ({longest} tokens)")
    words = vocabulary(prompts)
    if init_from is not None:
        tokenizer = CLIPTokenizer.from_pretrained(str(init_from / "tokenizer"))
        check_tokenizer(tokenizer, words)
        text = CLIPTextModel.from_pretrained(str(init_from / "text_encoder"))
    else:
        write_word_tokenizer(tokenizer_folder, words, max_length)
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_folder))
        check_tokenizer(tokenizer, words)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=max_length, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            **dict(TEXT_ENCODER)))
    width = text.config.hidden_size
    net = UNet2DConditionModel(**dict(UNET, cross_attention_dim=width)) if denoiser == "unet" else \
        PixArtTransformer2DModel(**dict(DIT, caption_channels=width))
    vae = AutoencoderKL.from_pretrained(str(init_from / "vae")) if init_from is not None else AutoencoderKL(**VAE)
    return tokenizer, text, net, vae, DDIMScheduler(**{**SCHEDULER, **(ZERO_SNR if zero_snr else {})})
