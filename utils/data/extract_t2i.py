"""h-vector extraction for text-to-image models: generate over prompts, record the conditional
rows' h at every step (``T2IPipeline.draw(record=...)``), label the finished images; shards in
the format of ``utils.data.extract`` (resumable: finished shards are skipped, broken ones redone).

Batch k uses prompt k mod len(prompts), so each shard holds one prompt (recorded per shard)."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from utils.data.extract import _save_shard, _write_meta, shard_done


def extract_t2i_pseudo(pipe, prompts: list[str], seeds: list[int], labeller, out: Path, meta: dict,
                       batch_size: int = 4, negative_prompt: str | None = None) -> Path:
    """Pseudo-labelled h [n, S, C, H, W] (float16) per shard with the labeller's classes.

    :param pipe: a ``utils.sampling.text2image.T2IPipeline``.
    :param labeller: ``predict(images [-1,1]) -> {attr: probs [N,K]}`` (e.g. the CLIP labeller).
    """
    timesteps = [int(round(t)) for t in pipe.timesteps]
    meta = {**meta, "source": "pseudo", "timesteps": timesteps, "h_shape": list(pipe.h_shape),
            "attributes": labeller.attributes, "shard_size": batch_size, "n": len(seeds), "eta": pipe.eta,
            "seeds": list(seeds), "text": {"prompts": prompts, "negative_prompt": negative_prompt,
                                          "cfg": pipe.cfg_scale, "steps": pipe.steps,
                                          "scheduler": type(pipe.pipe.scheduler).__name__}}
    _write_meta(out, meta)
    batches = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
    for k, batch in enumerate(tqdm(batches, desc="extract (text-to-image, pseudo-labels)")):
        prompt = prompts[k % len(prompts)]
        if shard_done(out, k, list(batch), meta, prompt):
            continue
        record: list[torch.Tensor] = []
        x0 = pipe.with_prompt(prompt, negative_prompt).draw(batch, record=record)
        if len(record) != len(timesteps):
            raise RuntimeError(f"recorded h at {len(record)} denoiser calls for {len(timesteps)} timesteps: "
                               f"a scheduler of order > 1 calls the denoiser more than once a step; use "
                               f"ddim, dpm or euler for extraction")
        probs = labeller.predict(x0)
        _save_shard(out, k, {"h": torch.stack(record, 1), "ids": list(batch), "prompt": prompt,
                             "labels": {a: p.argmax(1) for a, p in probs.items()},
                             "probs": {a: p.float() for a, p in probs.items()}})
    return out
