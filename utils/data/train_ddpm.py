"""Train an eps-prediction DDPM (Ho et al. 2020, simple loss) on an in-memory image tensor.

Seeded, resumable (a training state is saved every ``save_every`` steps and picked up again),
with EMA weights, bf16 autocast, and a tqdm bar. Writes the EMA weights as a plain native state
dict, exactly as published checkpoints are, so they load through ``models.loader``.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from models.base import HSpaceUNet
from models.files import load_tensors
from utils.sampling.diffusion import Schedule

log = logging.getLogger(__name__)


def ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net, parameter by parameter."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - decay)


def train_ddpm(net: HSpaceUNet, data: torch.Tensor, schedule: Schedule, out_path: Path,
               state_path: Path, steps: int, batch_size: int = 128, lr: float = 2e-4,
               ema_decay: float = 0.999, warmup: int = 500, seed: int = 0,
               save_every: int = 1000, device: str = "cpu", record: dict | None = None) -> dict:
    """Train ``net`` on ``data`` [N,C,H,W] in [-1,1]; save EMA weights to ``out_path``.

    Resumes from ``state_path`` when it exists. Returns the training record (also written
    next to ``out_path`` as JSON).
    """
    torch.manual_seed(seed)
    net = net.to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start, elapsed, losses = 0, 0.0, []
    if state_path.exists():
        st = load_tensors(state_path, "a training state (--state)", ValueError)
        net.load_state_dict(st["net"]); ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"]); gen.set_state(st["gen"])
        start, elapsed = st["step"], st["elapsed"]
        log.info("resuming from %s at step %d", state_path, start)
    data = data.to(device)
    acf = schedule.alphas_cumprod.float().to(device)
    dev_type = "cuda" if str(device).startswith("cuda") else "cpu"
    # bf16 autocast on CUDA; on CPUs without native bf16 (AVX2-only) it is slower than fp32
    amp = dev_type == "cuda" or bool(getattr(torch.backends.cpu, "get_cpu_capability",
                                                 lambda: "")() in ("AVX512_BF16", "AMX"))
    t0 = time.time()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train ddpm")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup)
        idx = torch.randint(len(data), (batch_size,), generator=gen)
        t = torch.randint(schedule.num_train_steps, (batch_size,), generator=gen)
        noise = torch.randn((batch_size, *data.shape[1:]), generator=gen)
        x0, t, noise = data[idx.to(device)], t.to(device), noise.to(device)
        a = acf[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=amp):
            loss = (net(x_t, t).float() - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema_update(ema, net, ema_decay)
        losses.append(loss.detach())
        if step % 50 == 0:
            losses = [float(v) for v in losses]
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if (step + 1) % save_every == 0 or step + 1 == steps:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "gen": gen.get_state(), "step": step + 1,
                        "elapsed": elapsed + time.time() - t0}, state_path)
    elapsed += time.time() - t0
    losses = [float(v) for v in losses]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in ema.state_dict().items()}, out_path)
    rec = dict(record or {})
    rec.update({"steps": steps, "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay,
                "seed": seed, "device": str(device), "wall_time_s": round(elapsed, 1),
                "final_loss_mean_last_500": (sum(losses[-500:]) / max(len(losses[-500:]), 1))
                if losses else None,
                "parameters": sum(p.numel() for p in ema.parameters())})
    out_path.with_suffix(".json").write_text(json.dumps(rec, indent=2) + "\n")
    return rec
