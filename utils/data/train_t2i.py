"""Train the text-to-image digits model (configs/digits16_t2i.yml) and save it as a stock
diffusers ``StableDiffusionPipeline`` folder.

1. VAE: x [B,3,16,16] -> q(z|x) = N(mu, sigma^2) on [B,4,8,8] -> x_hat;
   loss = MSE(x_hat, x) + kl_weight * KL(q(z|x) || N(0, I)) / (elements of z)
          + colour_weight * MSE(mu[:, -1], colour_target(x)),
   the last term (when ``colour_weight`` > 0, as in configs/digits16_t2i.yml and
   configs/digits16_dit.yml) making the last latent channel carry the image's overall colour
   (warm or cool: the sign of its mean red minus blue) as a flat map, the way a large VAE's
   latents carry global colour, so that the tint that tells the digit sets apart is not hidden by
   the noise of the first sampling steps. It removes CFG's pull on the prompts' parity in the
   exact-score simulator (CHANGELOG.md).
   Then ``scaling_factor`` = 1 / std(z) over the training images (Stable Diffusion's convention:
   latents of unit variance); the VAE is frozen.
2. U-Net and text encoder together: eps-prediction (Ho et al. 2020, the simple loss) on
   z_0 = scaling_factor * z, z ~ q(z|x), z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps;
   with ``zero_snr`` (as in both shipped configs) v-prediction instead, v = sqrt(abar_t) eps -
   sqrt(1 - abar_t) z_0 (Salimans & Ho 2022), on the betas rescaled to zero terminal SNR, and the
   saved scheduler samples with trailing steps from t = 999 (Lin et al. 2024;
   models/digits_t2i.ZERO_SNR): eps-prediction cannot give z_0 where abar = 0, and with the stock
   schedule the first step's pure noise lacks the sqrt(abar_981) z_0 the model was trained to
   see, which shifts the set shares the colour channel carries. A v-model's image follows an edit
   of h sqrt(abar_t) times as much as an eps-model's, so its configs let the guide's step cap grow
   at the noisy steps (``guidance.cap_growth``; CHANGELOG.md);
   each pair's prompt is replaced by the empty prompt with probability ``cfg_dropout``
   (classifier-free guidance, Ho & Salimans 2022), and its image by one of the unconditional
   prompt's images when the data names one (``PromptData.unconditional``). EMA weights of both
   are saved.

Seeded (one CPU generator draws every batch, timestep and noise), resumable (the whole state is
saved every ``save_every`` steps of either phase and at each phase's end), bf16 autocast where it
is fast (CUDA, CPUs with native bf16), and a tqdm bar per phase.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from models.digits_t2i import PromptData
from models.files import load_tensors
from utils.data.train_ddpm import ema_update

log = logging.getLogger(__name__)

#: settings a resumed run may change (the rest must match the state's)
CHANGEABLE_ON_RESUME = ("steps", "save_every")


@dataclass(frozen=True)
class T2ITrainSettings:
    """The ``train:`` section of configs/digits16_t2i.yml (every key required but those with a default)."""
    steps: int              # U-Net + text encoder steps
    vae_steps: int
    batch_size: int         # U-Net batch
    vae_batch_size: int
    lr: float               # AdamW, linear warm-up over ``warmup`` steps, then constant
    vae_lr: float           # Adam, constant
    kl_weight: float        # per latent element, relative to the per-pixel MSE
    ema_decay: float        # at most; min(ema_decay, (1 + step) / (10 + step))
    warmup: int
    cfg_dropout: float      # probability that a pair's prompt becomes the empty prompt
    seed: int
    save_every: int
    subset_min: int         # each prompt's list holds at least this many pairs
    max_length: int         # tokenizer.model_max_length (tokens, BOS and EOS included)
    colour_weight: float = 0.0   # the VAE's colour channel (module docstring, 1.); 0: none
    colour_scale: float = 1.5    # its target: +colour_scale warm, -colour_scale cool
    zero_snr: bool = False       # v-prediction on betas rescaled to zero terminal SNR (module docstring, 2.)
    denoiser: str = "unet"       # unet (UNet2DConditionModel) or dit (PixArtTransformer2DModel)
    init_from: str | None = None  # a trained digits pipeline: its tokenizer, VAE (kept) and text encoder (start)

    @classmethod
    def defaults(cls) -> dict:
        """The optional keys and their values when absent (states saved before they existed too)."""
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}

    @classmethod
    def from_config(cls, section: dict, overrides: dict | None = None) -> "T2ITrainSettings":
        """Validated settings from the YAML section and CLI overrides (None: not given)."""
        values = dict(section or {})
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        defaults = cls.defaults()
        unknown, missing = sorted(set(values) - set(fields)), sorted(set(fields) - set(values) - set(defaults))
        if unknown or missing:
            raise ValueError(f"train: unknown key(s) {unknown}, missing key(s) {missing}; expected {list(fields)}")
        values = {**defaults, **values}
        for name, kind in fields.items():
            v = values[name]
            ok = {"int": isinstance(v, int) and not isinstance(v, bool), "bool": isinstance(v, bool),
                  "str": isinstance(v, str), "str | None": v is None or isinstance(v, str)}.get(
                kind, isinstance(v, (int, float)) and not isinstance(v, bool))
            if not ok:
                want = {"int": "an integer", "bool": "true or false", "str": "a string",
                        "str | None": "a folder or null"}.get(kind, "a number")
                raise ValueError(f"train.{name} = {v!r}: expected {want}")
        s = cls(**{k: (float(v) if fields[k] == "float" else v) for k, v in values.items()})
        if s.denoiser not in ("unet", "dit"):
            raise ValueError(f"train.denoiser {s.denoiser!r}: expected unet or dit")
        if s.vae_steps < 0 or (s.vae_steps == 0) != (s.init_from is not None):
            raise ValueError(f"train.vae_steps {s.vae_steps} with train.init_from {s.init_from!r}: a VAE is "
                             f"either trained (vae_steps >= 1, no init_from) or taken from init_from (vae_steps 0)")
        for name in ("steps", "batch_size", "vae_batch_size", "save_every", "subset_min", "max_length"):
            if getattr(s, name) < 1:
                raise ValueError(f"train.{name} = {getattr(s, name)}: must be >= 1")
        if not 0 <= s.cfg_dropout < 1 or not 0 <= s.ema_decay < 1:
            raise ValueError(f"train.cfg_dropout {s.cfg_dropout} and train.ema_decay {s.ema_decay} must lie in [0, 1)")
        if s.colour_weight < 0 or s.colour_scale <= 0:
            raise ValueError(f"train.colour_weight {s.colour_weight} must be >= 0 and train.colour_scale "
                             f"{s.colour_scale} > 0")
        return s


def use_bf16(device: torch.device, amp: str) -> bool:
    """``amp`` auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512_BF16, AMX); on
    AVX2-only CPUs bf16 is emulated and many times slower than fp32. ``bf16`` / ``off`` force it."""
    if amp not in ("auto", "bf16", "off"):
        raise ValueError(f"--amp {amp!r}: expected auto, bf16 or off")
    if amp != "auto":
        return amp == "bf16"
    native = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")() in ("AVX512_BF16", "AMX")
    return device.type == "cuda" or native


class _State:
    """Everything a resumed run needs: modules, optimisers, the generator, progress counters."""

    def __init__(self, modules: dict, gen: torch.Generator, settings: T2ITrainSettings, path: Path):
        self.modules, self.gen, self.settings, self.path = modules, gen, settings, path
        self.info = {"vae_step": 0, "step": 0, "elapsed": 0.0, "scaling_factor": None, "sittings": 1,
                     "vae_losses": [], "losses": []}
        self._t0 = time.time()

    def load(self) -> None:
        st = load_tensors(self.path, "a text-to-image training state (--resume)", ValueError)
        mine, theirs = dataclasses.asdict(self.settings), {**T2ITrainSettings.defaults(), **st["settings"]}
        differ = [k for k in mine if k not in CHANGEABLE_ON_RESUME and mine[k] != theirs.get(k)]
        if differ:
            raise ValueError(f"--resume {self.path}: settings {differ} differ from the state's "
                             f"({ {k: theirs.get(k) for k in differ} }); only {list(CHANGEABLE_ON_RESUME)} may change")
        for name, module in self.modules.items():
            module.load_state_dict(st[name])
        self.gen.set_state(st["gen"])
        self.info = {**st["info"], "sittings": st["info"]["sittings"] + 1}
        log.info("resuming from %s: VAE step %d, U-Net step %d", self.path, self.info["vae_step"], self.info["step"])

    def save(self) -> None:
        """Write atomically (a temporary name, then rename)."""
        self.info["elapsed"] = self.elapsed()
        self._t0 = time.time()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        torch.save({**{k: m.state_dict() for k, m in self.modules.items()}, "gen": self.gen.get_state(),
                    "info": self.info, "settings": dataclasses.asdict(self.settings)}, tmp)
        os.replace(tmp, self.path)

    def elapsed(self) -> float:
        return self.info["elapsed"] + time.time() - self._t0


def train_t2i(parts: tuple, images: torch.Tensor, data: PromptData, s: T2ITrainSettings,
              state_path: Path, resume: bool, device: torch.device, bf16: bool) -> dict:
    """Train ``parts`` = (tokenizer, text encoder, U-Net, VAE, scheduler) in place on ``images``
    [N,3,16,16] in [-1,1] and the prompt pairs ``data``; on return the text encoder and U-Net
    hold their EMA weights and the VAE its ``scaling_factor``. Returns the training statistics."""
    if state_path.exists() and not resume:
        raise ValueError(f"a training state exists at {state_path}: pass --resume to continue it, "
                         f"or delete it to start over")
    if resume and not state_path.exists():
        raise FileNotFoundError(f"--resume: no training state at {state_path}")
    tokenizer, text, unet, vae, scheduler = parts
    for m in (text, unet, vae):
        m.to(device)
    ema_text = copy.deepcopy(text).eval().requires_grad_(False)
    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    vae_opt = torch.optim.Adam(vae.parameters(), lr=s.vae_lr)
    opt = torch.optim.AdamW([*unet.parameters(), *text.parameters()], lr=s.lr, weight_decay=0.0)
    state = _State({"vae": vae, "text": text, "unet": unet, "ema_text": ema_text, "ema_unet": ema_unet,
                    "vae_opt": vae_opt, "opt": opt}, torch.Generator("cpu").manual_seed(s.seed), s, state_path)
    if resume:
        state.load()
    images = images.to(device)
    _train_vae(vae, vae_opt, images, s, state, device, bf16)
    vae.eval().requires_grad_(False)
    mean, std = vae_posterior(vae, images)
    if state.info["scaling_factor"] is None and s.vae_steps == 0:
        state.info["scaling_factor"] = float(vae.config.scaling_factor)       # the init_from VAE's own
    if state.info["scaling_factor"] is None:
        z = mean + std * torch.randn(mean.shape, generator=torch.Generator("cpu").manual_seed(s.seed)).to(device)
        state.info["scaling_factor"] = float(1 / z.float().std())
    sf = state.info["scaling_factor"]
    tokens = tokenizer([p.text for p in data.prompts] + [""], padding="max_length",
                       max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
    mask = tokens.attention_mask.to(device) if is_transformer(unet) else None
    _train_denoiser(text, unet, ema_text, ema_unet, opt, (mean * sf, std * sf),
                    (tokens.input_ids.to(device), mask), data,
                    scheduler.alphas_cumprod.float().to(device), s, state, device, bf16,
                    scheduler.config.prediction_type)
    text.load_state_dict(ema_text.state_dict())
    unet.load_state_dict(ema_unet.state_dict())
    vae.register_to_config(scaling_factor=sf)
    with torch.no_grad():
        recon = vae.decode(mean).sample.float()
    info = state.info
    return {"scaling_factor": sf, "vae_recon_mse_train": float((recon - images).pow(2).mean()),
            "vae_loss_last_100": _tail_mean(info["vae_losses"], 100),
            "loss_last_500": _tail_mean(info["losses"], 500), "vae_steps": s.vae_steps, "steps": s.steps,
            "wall_time_s": round(state.elapsed(), 1), "sittings": info["sittings"], "device": str(device),
            "bf16_autocast": bf16,
            "parameters": {"unet": _count(unet), "text_encoder": _count(text), "vae": _count(vae)}}


def _train_vae(vae, opt, images: torch.Tensor, s: T2ITrainSettings, state: _State, device, bf16: bool) -> None:
    """Phase 1 (module docstring), from the state's VAE step to ``s.vae_steps``."""
    if state.info["vae_step"] >= s.vae_steps:
        return
    vae.train()
    gen, losses = state.gen, []
    target = colour_target(images, s.colour_scale).view(-1, 1, 1)       # flat over the latent's h x w
    bar = tqdm(range(state.info["vae_step"], s.vae_steps), initial=state.info["vae_step"], total=s.vae_steps,
               desc="train vae")
    for step in bar:
        idx = torch.randint(len(images), (s.vae_batch_size,), generator=gen).to(device)
        x = images[idx]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
            recon = vae.decode(z).sample
        mse = (recon.float() - x).pow(2).mean()
        kl = post.kl().float().mean() / z[0].numel()
        loss = mse + s.kl_weight * kl
        if s.colour_weight > 0:
            loss = loss + s.colour_weight * (post.mean[:, -1].float() - target[idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        state.info["vae_step"] = step + 1
        losses = _bookkeep(state, bar, losses, "vae_losses", step + 1, s.vae_steps, 25, s.save_every)


def image_colour(images: torch.Tensor) -> torch.Tensor:
    """Each RGB image's overall colour: its mean red minus blue [N] (0 for grey images; the
    tinted digits: positive for 0-4, negative for 5-9, models/digits_t2i.tinted)."""
    return (images[:, 0] - images[:, 2]).float().mean((1, 2))


def colour_target(images: torch.Tensor, scale: float) -> torch.Tensor:
    """The value [N] the VAE's last latent channel is trained towards at every position:
    ``+scale`` for a warm image, ``-scale`` for a cool one, 0 for a grey one. Only the sign: an
    image's colour magnitude follows how much mid-grey ink it has (a 0 more than a 1), and a
    channel carrying it lets classifier-free guidance favour the inkier digits of every prompt."""
    return scale * image_colour(images).sign()


@torch.no_grad()
def vae_posterior(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """q(z|x)'s mean and std [N,4,8,8] for every image."""
    out = [vae.encode(images[i:i + batch]).latent_dist for i in range(0, len(images), batch)]
    return torch.cat([d.mean for d in out]).float(), torch.cat([d.std for d in out]).float()


def _train_denoiser(text, unet, ema_text, ema_unet, opt, latents, ids: torch.Tensor, data: PromptData,
                    alphas_cumprod: torch.Tensor, s: T2ITrainSettings, state: _State, device, bf16: bool,
                    prediction: str = "epsilon") -> None:
    """Phase 2 (module docstring): ``latents`` = (mean, std) of q(z|x) already scaled;
    ``ids`` = (token ids [P+1, L], the prompts' then the empty prompt's, and their attention mask
    [P+1, L] or None): the transformer's pipeline (PixArt) masks the padding in the text encoder
    and in cross-attention, the U-Net's does not; ``prediction``: the scheduler's
    prediction_type, epsilon or v_prediction."""
    denoiser_target(torch.zeros(()), torch.zeros(()), torch.ones(()), prediction)     # refuse an unknown type now
    if state.info["step"] >= s.steps:
        return
    text.train()
    unet.train()
    mean, std = latents
    ids, mask = ids
    pair_image = torch.as_tensor(data.image, device=device)
    pair_prompt = torch.as_tensor(data.prompt, device=device)
    empty, gen, losses, params = len(data.prompts), state.gen, [], [*unet.parameters(), *text.parameters()]
    bar = tqdm(range(state.info["step"], s.steps), initial=state.info["step"], total=s.steps, desc="train unet")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = s.lr * min(1.0, (step + 1) / s.warmup)
        k, drop = (v.to(device) for v in draw_pairs(data, s.batch_size, s.cfg_dropout, gen))
        t = torch.randint(len(alphas_cumprod), (s.batch_size,), generator=gen).to(device)
        z_noise = torch.randn((s.batch_size, *mean.shape[1:]), generator=gen).to(device)
        noise = torch.randn((s.batch_size, *mean.shape[1:]), generator=gen).to(device)
        img = pair_image[k]
        z0 = mean[img] + std[img] * z_noise                         # z ~ q(z|x), scaled
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise                # q(z_t | z_0)
        prompt = torch.where(drop, torch.full_like(k, empty), pair_prompt[k])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            emb = text(ids, attention_mask=mask)[0][prompt]         # the pipeline's prompt_embeds
            target = denoiser_target(z0, noise, a, prediction)
            out = denoise(unet, z_t, t, emb, None if mask is None else mask[prompt])
            loss = (out.float() - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(s.ema_decay, (1 + step) / (10 + step))          # warm-up: no trace of the
        ema_update(ema_unet, unet, decay)                           # random start in a short run
        ema_update(ema_text, text, decay)
        losses.append(loss.detach())
        state.info["step"] = step + 1
        losses = _bookkeep(state, bar, losses, "losses", step + 1, s.steps, 50, s.save_every)


def is_transformer(model) -> bool:
    """Is the denoiser the PixArt transformer (else the U-Net)?"""
    return type(model).__name__ == "PixArtTransformer2DModel"


def denoise(model, z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The denoiser's output for z_t at t under the prompt states ``emb``, called as its stock
    pipeline calls it (PixArt: the padding mask and no resolution conditions)."""
    if is_transformer(model):
        return model(z_t, encoder_hidden_states=emb, timestep=t, encoder_attention_mask=mask,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    return model(z_t, t, encoder_hidden_states=emb).sample


def denoiser_target(z0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor, prediction: str) -> torch.Tensor:
    """What the U-Net learns to output for z_t = sqrt(abar) z0 + sqrt(1 - abar) noise: the noise
    (epsilon) or v = sqrt(abar) noise - sqrt(1 - abar) z0 (v_prediction), as the scheduler reads it."""
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return abar.sqrt() * noise - (1 - abar).sqrt() * z0
    raise ValueError(f"prediction_type {prediction!r}: expected epsilon or v_prediction")


def draw_pairs(data: PromptData, batch: int, dropout: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch: pair indices k [B] into ``data`` and the rows whose prompt becomes the empty
    one, drop [B] (probability ``dropout``). A dropped row shows one of the unconditional prompt's
    images when the data names one (its pairs are the ``size`` consecutive ones of its index), so
    the empty prompt learns that prompt's distribution instead of the prompts' mixture."""
    k = torch.randint(len(data.image), (batch,), generator=gen)
    drop = torch.rand(batch, generator=gen) < dropout
    if data.unconditional is not None:
        own = data.unconditional * data.size + torch.randint(data.size, (batch,), generator=gen)
        k = torch.where(drop, own, k)
    return k, drop


def _bookkeep(state, bar, losses: list, key: str, done: int, total: int, log_every: int,
              save_every: int) -> list:
    """Every ``log_every`` steps (and at a save) move the pending losses to ``state.info[key]`` and
    show their recent mean; every ``save_every`` steps and at the end save the state. Returns the
    losses still pending."""
    save = done % save_every == 0 or done == total
    if done % log_every == 0 or save:
        state.info[key] += [float(v) for v in losses]
        losses = []
        bar.set_postfix(loss=f"{_tail_mean(state.info[key], log_every):.4f}")
    if save:
        state.save()
    return losses


def _tail_mean(values: list[float], n: int) -> float | None:
    return sum(values[-n:]) / len(values[-n:]) if values else None


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_pipeline(parts: tuple, folder: Path) -> None:
    """The stock pipeline of ``parts`` in ``folder``: ``StableDiffusionPipeline`` (no safety
    checker) for the U-Net, ``PixArtSigmaPipeline`` for the transformer."""
    from diffusers import PixArtSigmaPipeline, StableDiffusionPipeline
    tokenizer, text, unet, vae, scheduler = parts
    if is_transformer(unet):
        PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text.cpu(), vae=vae.cpu(), transformer=unet.cpu(),
                            scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
        return
    pipe = StableDiffusionPipeline(vae=vae.cpu(), text_encoder=text.cpu(), tokenizer=tokenizer, unet=unet.cpu(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
