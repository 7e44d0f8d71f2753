"""Does the simulation in DataLoader workers starve the model? Step time with live simulation vs
the same steps on batches generated beforehand, side by side in one process."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from slsg_train.data.input_size import choose_input_size_for, parse_auto
from slsg_train.data.loco import LocoCategory
from slsg_train.models import SLSG, preset, top_k_for_size
from slsg_train.simulation import AnomalySimulator, SimulationConfig, TextureBank
from slsg_train.training.config import LossConfig
from slsg_train.training.dataset import SimulatedAnomalyDataset, StepBatchSampler, collate_pairs, load_resized
from slsg_train.training.losses import training_step_loss
from slsg_train.training.precision import channels_last, resolve_precision
from slsg_train.training.trainer import resolve_device


def _timed_steps(model: SLSG, batches, steps: int, opt: torch.optim.Optimizer, precision: str,
                 device: torch.device, desc: str) -> list[float]:
    """Wall time per step, host-to-device copy included, as the trainer's loop does it."""
    times, it = [], iter(batches)
    t_prev = time.perf_counter()
    for _ in tqdm(range(steps), desc=desc, leave=False):
        images, masks = next(it)
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        loss, _ = training_step_loss(model, images, masks, LossConfig(), precision, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":  # kernels run asynchronously: the step ends when the GPU is done
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        times.append(now - t_prev)
        t_prev = now
    return times


def benchmark_pipeline(data_root: str | Path, category: str, image_size: tuple[int, int] | str = (256, 256),
                       steps: int = 20, warmup: int = 3, batch_size: int = 4, workers: int = 2,
                       preset_name: str = "default", precision: str = "auto",
                       device_name: str = "cpu") -> dict[str, Any]:
    """On ``device``, as training runs there: the faster the step (bf16, a GPU), the harder it is to keep fed."""
    device = resolve_device(device_name)
    precision = resolve_precision(precision, device)
    paths = LocoCategory(data_root, category).train_paths
    if isinstance(image_size, str):  # "auto[:N]": the size training would choose for these images
        image_size = choose_input_size_for(paths, parse_auto(image_size)).size
    images = load_resized(paths, image_size)
    sim_cfg = SimulationConfig().for_category(category)
    dataset = SimulatedAnomalyDataset(images, AnomalySimulator(sim_cfg, TextureBank.from_source(None)), seed=0)
    model = channels_last(SLSG(preset(preset_name)).to(device)).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    total = warmup + steps
    pregenerated = [collate_pairs([dataset[g] for g in idx]) for idx in StepBatchSampler(0, total, batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=StepBatchSampler(0, total, batch_size),
                                         num_workers=workers, collate_fn=collate_pairs, prefetch_factor=4,
                                         pin_memory=device.type == "cuda")
    live = _timed_steps(model, loader, total, opt, precision, device, "live simulation")[warmup:]
    cached = _timed_steps(model, itertools.cycle(pregenerated), total, opt, precision, device, "pre-generated")[warmup:]
    live_s, cached_s = float(np.median(live)), float(np.median(cached))
    return {"category": category, "image_size": list(image_size), "batch": f"{batch_size}+{batch_size}",
            "workers": workers, "steps": steps, "device": str(device), "precision": precision,
            "torch_threads": torch.get_num_threads(),
            "step_s_live_simulation": live_s, "step_s_pregenerated": cached_s, "ratio": live_s / cached_s,
            "top_k": top_k_for_size(*image_size)}
