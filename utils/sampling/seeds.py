"""A seed per sample: x_T and every eta > 0 noise draw come from the sample's own generator.

So an image depends only on its seed, never on the batch it was drawn in or on the batch size,
and vanilla and guided runs with the same seeds start from the same noise.
"""
from __future__ import annotations

import torch

MAX_SEED = 2 ** 32          # seeds are in [0, 2**32): torch generators, file names and sorting agree
MAX_IMAGES = 10_000_000     # the most seeds one command may name (their list is held in memory)


class SeededNoise:
    """Per-sample Gaussian streams: ``x_T()`` first, then ``step(i)`` once per sampling step."""

    def __init__(self, seeds: list[int], shape: tuple[int, ...], device: torch.device | str = "cpu"):
        self.shape, self.device = tuple(shape), device
        self.gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]

    def _draw(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.gens]).to(self.device)

    def x_T(self) -> torch.Tensor:
        """The starting noise [N, *shape] (drawn first from each sample's stream)."""
        return self._draw()

    def step(self, i: int) -> torch.Tensor:
        """The sigma_t z noise of step i (steps must be drawn in order)."""
        return self._draw()


def parse_seeds(spec: str | None, n: int, start: int = 0, most: int = MAX_IMAGES) -> list[int]:
    """``"0-99"`` or ``"3,5,9"`` -> a list; None -> ``start .. start+n-1``; at most ``most`` seeds."""
    if spec is None:
        if not 0 <= start and start + n <= MAX_SEED:
            raise ValueError(f"seeds {start}..{start + n - 1} are out of range: seeds must be in [0, 2**32) "
                             f"(--seed, --n_test_img)")
        seeds = list(range(start, start + n))
    else:
        seeds = []
        for part in str(spec).split(","):
            part = part.strip()
            try:
                if "-" in part:
                    a, b = (int(v) for v in part.split("-"))
                    if not 0 <= a <= b < MAX_SEED:
                        raise ValueError(f"--seeds {spec!r}: a range a-b needs 0 <= a <= b < 2**32")
                    if len(seeds) + b - a + 1 > most:
                        raise ValueError(f"--seeds {spec!r} names more than {most:,} seeds")
                    seeds.extend(range(a, b + 1))
                elif part:
                    seeds.append(int(part))
            except ValueError as e:
                if str(e).startswith("--seeds"):
                    raise
                raise ValueError(f"--seeds {spec!r}: expected seeds like 0-999 or 3,5,8") from None
        if not seeds:
            raise ValueError(f"--seeds {spec!r} names no seed")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"--seeds {spec!r} repeats a seed; each sample needs its own")
    bad = [s for s in (min(seeds), max(seeds)) if not 0 <= s < MAX_SEED]
    if bad:
        raise ValueError(f"seed {bad[0]} is out of range: seeds must be in [0, 2**32) (--seed, --seeds)")
    return seeds
