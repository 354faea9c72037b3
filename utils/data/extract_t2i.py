"""h-vector extraction for text-to-image models: generate over prompts, record the conditional
rows' h at every step (``T2IPipeline.draw(record=...)``), label the finished images; shards in
the format of ``utils.data.extract`` (resumable: finished shards are skipped, broken ones redone).

Batch k uses prompt k mod len(prompts), so each shard holds one prompt (recorded per shard).
Under torchrun, rank r of W extracts the shards k = r, r + W, ...: together the shards of one
process, each written once; rank 0 writes meta.json first.

``extract_t2i_folders`` is the original's way for text-to-image: the images of labelled class
folders, VAE-encoded and DDIM-inverted under a prompt (the empty one by default), h recorded at
every sampling timestep (``utils.sampling.text2image.invert``)."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from utils.data.extract import (_save_shard, _write_meta, check_image, images_sha256, list_class_folders, load_image,
                                shard_done)


def extract_t2i_pseudo(pipe, prompts: list[str], seeds: list[int], labeller, out: Path, meta: dict,
                       batch_size: int = 4, negative_prompt: str | None = None, rank: int = 0,
                       world: int = 1) -> Path:
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
    if rank == 0:
        _write_meta(out, meta)
    if world > 1:                         # the other ranks write shards once the folder is checked
        torch.distributed.barrier()
    batches = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
    mine = list(enumerate(batches))[rank::world]
    for k, batch in tqdm(mine, desc="extract (text-to-image, pseudo-labels)", disable=rank != 0):
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
    if world > 1:
        torch.distributed.barrier()
    return out


def extract_t2i_folders(pipe, root: Path, attribute: str, out: Path, meta: dict, batch_size: int = 4,
                        prompt: str = "", rank: int = 0, world: int = 1) -> Path:
    """h [n, S, C, H, W] (float16) per shard of the images of ``root/<class>/`` with their class
    as the label of ``attribute``; shards and resuming as ``extract_t2i_pseudo``."""
    from utils.sampling.text2image import invert
    classes = list_class_folders(root)
    for files in classes.values():
        for p in files:
            check_image(p)                  # every image, before anything is written
    items = [(p, c) for c, (_, files) in enumerate(classes.items()) for p in files]
    _, size, _ = pipe.image_shape
    meta = {**meta, "source": "folders", "folder": str(root), "timesteps": [int(round(t)) for t in pipe.timesteps],
            "h_shape": list(pipe.h_shape), "attributes": {attribute: list(classes)}, "shard_size": batch_size,
            "n": len(items), "images_sha256": images_sha256(classes), "eta": 0.0,
            "text": {"inversion_prompt": prompt, "steps": pipe.steps,
                     "scheduler": type(pipe.pipe.scheduler).__name__}}
    if rank == 0:
        _write_meta(out, meta)
    if world > 1:
        torch.distributed.barrier()
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    for k, batch in tqdm(list(enumerate(batches))[rank::world], desc="extract (text-to-image, DDIM inversion)",
                         disable=rank != 0):
        ids = [str(p) for p, _ in batch]
        if shard_done(out, k, ids, meta):
            continue
        x0 = torch.stack([load_image(p, size, 3) for p, _ in batch])
        _, hs = invert(pipe, x0, prompt)
        _save_shard(out, k, {"h": hs, "ids": ids, "labels": {attribute: torch.tensor([c for _, c in batch])}})
    if world > 1:
        torch.distributed.barrier()
    return out
