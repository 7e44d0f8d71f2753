"""Training batches: normal images next to simulated-anomaly copies, built in DataLoader workers.

Every sample is a pure function of (seed, global sample index), so a resumed run or a
run on several DDP ranks sees exactly the samples a single uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from slsg_train.data.images import load_resized, resize_rgb, to_tensor  # noqa: F401 - used below and by trainers
from slsg_train.simulation import AnomalySimulator

def colour_jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation each scaled by a factor in [1-s, 1+s]."""
    if strength <= 0:
        return image
    b, c, s = rng.uniform(1 - strength, 1 + strength, size=3)
    x = image.astype(np.float32) * b
    x = (x - x.mean()) * c + x.mean()
    grey = x.mean(axis=2, keepdims=True)
    x = (x - grey) * s + grey
    return np.clip(x, 0, 255).astype(np.uint8)


class SimulatedAnomalyDataset(Dataset):
    """Item ``g`` -> (normal image, simulated-anomaly image, its mask), all tensors.

    ``g`` is a global sample index; the sample depends only on (seed, g).
    """

    def __init__(self, images: Sequence[np.ndarray], simulator: AnomalySimulator, seed: int,
                 jitter: float = 0.1):
        if len(images) < 2:
            raise ValueError("training needs at least 2 normal images (the logical simulation pastes from another one)")
        self.images = list(images)
        self.simulator = simulator
        self.seed = seed
        self.jitter = jitter

    def __len__(self) -> int:  # sampling is by index; the length only bounds the DataLoader's view
        return 2**62

    def __getitem__(self, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(g)])
        n = len(self.images)
        i, j, k = rng.integers(n), rng.integers(n), rng.integers(n - 1)
        normal = colour_jitter(self.images[i], self.jitter, rng)
        base = colour_jitter(self.images[j], self.jitter, rng)
        donor = self.images[k if k < j else k + 1]
        sim = self.simulator(base, rng, donor=donor)
        mask = torch.from_numpy(np.ascontiguousarray(sim.mask, dtype=np.float32))[None]
        return to_tensor(normal), to_tensor(sim.image), mask


class NormalImageDataset(Dataset):
    """Item ``g`` -> one colour-jittered normal image tensor (generative pre-training); depends only on (seed, g)."""

    def __init__(self, images: Sequence[np.ndarray], seed: int, jitter: float = 0.1):
        self.images, self.seed, self.jitter = list(images), seed, jitter

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, g: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, 7, int(g)])
        return to_tensor(colour_jitter(self.images[rng.integers(len(self.images))], self.jitter, rng))


def collate_pairs(items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack B normal + B simulated images -> images [2B,3,H,W], masks [2B,1,H,W] (normal masks are zero)."""
    normal, simulated, masks = zip(*items)
    images = torch.stack(normal + simulated)
    targets = torch.cat([torch.zeros_like(torch.stack(masks)), torch.stack(masks)])
    return images, targets


class StepBatchSampler(Sampler[list[int]]):
    """Yields, for steps ``start..stop-1``, the global sample indices of this rank's batch."""

    def __init__(self, start: int, stop: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.start, self.stop, self.batch_size = start, stop, batch_size
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            first = (step * self.world_size + self.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))
