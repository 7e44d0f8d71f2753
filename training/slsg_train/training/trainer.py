"""One SLSG training run: generative pre-training of the encoder, the detector, then calibration.

Works single-process and under ``torchrun`` (DistributedDataParallel; gloo on CPU, NCCL on CUDA).
All state lives in ``RUN_DIR/checkpoint.pt`` (written atomically every ``checkpoint_every`` steps),
so ``--resume`` continues exactly where a run stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from slsg import __version__
from slsg.image_modes import images_colour
from slsg_train.checkpoint import CheckpointError, RunCheckpoint, load_checkpoint, save_checkpoint
from slsg_train.data.input_size import choose_input_size_for, parse_auto
from slsg_train.data.loco import LocoCategory
from slsg_train.training.calibration import (CalibrationSplit, calibrate_threshold, fit_checks, left_out_messages,
                                             small_calibration_warning, split_for_calibration)
from slsg_train.training.config import TrainConfig
from slsg_train.training.fusion import fusion_messages
from slsg_train.training.dataset import (
    NormalImageDataset, SimulatedAnomalyDataset, StepBatchSampler, collate_pairs, load_resized,
)
from slsg_train.training.losses import training_step_loss
from slsg_train.training.precision import autocast, channels_last, resolve_precision
from slsg_train.training.pretrain import RestorationDecoder, RestorationModel, corrupt_patches, restoration_loss


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistEnv:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    env = DistEnv(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device_name.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    return env


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


def build_model_config(cfg: TrainConfig):
    """The SLSGConfig a new run of ``cfg`` trains."""
    from slsg_train.models import preset

    changes: dict[str, Any] = {"backbone_weights": cfg.backbone_weights, "allow_download": cfg.allow_download}
    if cfg.backbone:
        changes["backbone"] = cfg.backbone
    if cfg.pretrain.steps > 0:
        changes["freeze_encoder"] = cfg.pretrain.freeze_encoder_after
    return preset(cfg.preset, **{**changes, **cfg.model})


def set_encoder_trainable(model, trainable: bool) -> None:
    model.encoder.requires_grad_(trainable)
    model.config.freeze_encoder = not trainable
    model.train(model.training)  # re-applies the frozen-encoder eval mode


def cosine_lambda(total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the trained state; the reference checks are left out: only the main process fits
    them, after training."""
    h = hashlib.sha256()
    from slsg_train.models.slsg import CHECK_PREFIXES

    for name, tensor in sorted((k, v) for k, v in model.state_dict().items()
                               if not k.startswith(CHECK_PREFIXES)):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def average_buffers(module: torch.nn.Module) -> None:
    """DDP syncs buffers at the start of each forward, so each rank's last forward leaves its own
    BatchNorm statistics; average them (float) / take rank 0's (int) so every rank ends identical."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world)
        else:
            dist.broadcast(buf, src=0)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # simulation is numpy; keep the cores for the model


class TrainingRun:
    """Build everything from a TrainConfig (or a checkpoint to resume) and run the stages."""

    def __init__(self, cfg: TrainConfig, data_root: str | Path, run_dir: str | Path, resume: bool = False,
                 until_step: int | None = None, overrides: dict[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.ckpt_path = self.run_dir / "checkpoint.pt"
        self.resumed: RunCheckpoint | None = None
        if resume:
            self.resumed = load_checkpoint(self.ckpt_path)
            if self.resumed.train_config is None:
                raise CheckpointError(f"{self.ckpt_path} holds {self.resumed.stage} weights, not a training run "
                                      "to resume")
            cfg = dataclasses.replace(self.resumed.train_config, **(overrides or {}))
        self.cfg = cfg
        self.until_step = until_step
        self.env = init_distributed(cfg.device)
        self.device = resolve_device(cfg.device, self.env.local_rank)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.category = LocoCategory(data_root, cfg.category)
        self.input_size_choice = self._resolve_input_size()
        self.checks_left_out: dict[str, str] = {}  # check name -> why fit_checks left it out
        self.fusion: dict[str, Any] = {}  # which parts the fused score listens to (fit_checks' report)
        self.data_root = Path(data_root)
        self.log_path = self.run_dir / "train_log.jsonl"
        torch.manual_seed(cfg.seed)

    def _resolve_input_size(self) -> dict[str, Any] | None:
        """Turn ``image_size`` "auto[:N]" into (H, W) from the training images' headers, before anything is
        built; what was chosen (None if the size was given) goes into the checkpoint, and a resumed run keeps it."""
        if self.resumed is not None:
            return self.resumed.input_size_choice
        budget_side = parse_auto(self.cfg.image_size) if isinstance(self.cfg.image_size, str) else None
        if budget_side is None:
            return None
        choice = choose_input_size_for(self.category.train_paths, budget_side)
        self.cfg = dataclasses.replace(self.cfg, image_size=choice.size)
        return {**choice.to_dict(), "message": choice.describe()}

    # ---------------------------------------------------------------- helpers
    def log(self, event: str, **fields: Any) -> None:
        if not self.env.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record = {"time": round(time.time(), 3), "event": event, **fields}
        with self.log_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def _loader(self, dataset, start: int, stop: int, collate) -> DataLoader:
        sampler = StepBatchSampler(start, stop, self.cfg.batch_size, self.env.rank, self.env.world_size)
        workers = self.cfg.workers
        return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                          worker_init_fn=_worker_init if workers else None,
                          prefetch_factor=4 if workers else None, pin_memory=self.device.type == "cuda")

    def _checkpoint(self, model, stage: str, step: int, **extra: Any) -> RunCheckpoint:
        return RunCheckpoint(
            stage=stage, step=step, category=self.cfg.category, train_config=self.cfg,
            model_config=self.model_config, image_size=tuple(self.cfg.image_size), top_k=self.top_k,
            data_hash=self.data_hash, image_colour=self.image_colour, calibration_split=self.split.summary(),
            data_root=str(self.data_root.resolve()), model_state=model.state_dict(), project_version=__version__,
            input_size_choice=self.input_size_choice, checks_left_out=self.checks_left_out,
            fusion=self.fusion, created=datetime.now(UTC).isoformat(timespec="seconds"),
            **extra,
        )

    def _wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.env.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
        return module

    # ---------------------------------------------------------------- stages
    def run(self) -> Path:
        from slsg_train.models import SLSG, count_flops, count_parameters, top_k_for_size
        from slsg_train.simulation import AnomalySimulator, SimulationConfig, TextureBank

        cfg = self.cfg
        h, w = cfg.image_size
        self.top_k = top_k_for_size(h, w)
        resumed = self.resumed
        self.model_config = resumed.model_config if resumed else build_model_config(cfg)
        self.split = self._calibration_split(self.model_config.uses_reference)
        train_paths = self.split.train
        self.data_hash = self.category.data_hash()
        images = load_resized(train_paths, cfg.image_size)
        self.image_colour = images_colour(images)  # the model card says it; the gateway warns on a mismatch
        sim_cfg = SimulationConfig.from_dict(cfg.simulation) if cfg.simulation else SimulationConfig()
        if cfg.anomaly_source:
            sim_cfg = dataclasses.replace(sim_cfg, texture_source=cfg.anomaly_source)
        sim_cfg = sim_cfg.for_category(cfg.category)
        cfg.simulation = sim_cfg.to_dict()

        # a copy: the model changes its config (freezing the encoder); the checkpoint keeps the run's
        model_cfg = dataclasses.replace(self.model_config, **({"backbone_weights": None} if resumed else {}))
        model = channels_last(SLSG(model_cfg).to(self.device))
        if resumed:
            model.load_state_dict(resumed.model_state)
        stage = resumed.stage if resumed else "pretrain"
        step = resumed.step if resumed else 0
        if resumed:
            self.log("resume", stage=stage, step=step, precision=self.precision)

        if self.env.is_main and not resumed and self.input_size_choice is not None:
            self.log("input_size", **self.input_size_choice)
            tqdm.write(self.input_size_choice["message"])
        if self.env.is_main and not resumed:
            params = count_parameters(model)
            gflop = count_flops(model, h, w)
            self.log("start", config=cfg.to_dict(), parameters=params, gflop_per_image=gflop, precision=self.precision,
                     **self.split.summary(), world_size=self.env.world_size)
            tqdm.write(f"SLSG {model_cfg.backbone} @ {h}x{w}: {params['total'] / 1e6:.2f} M parameters "
                       f"({params['trainable'] / 1e6:.2f} M trainable), {gflop:.2f} GFLOP per image; "
                       f"training in {self.precision} on {self.device}")

        if stage == "pretrain":
            if cfg.pretrain.steps > 0 and step < cfg.pretrain.steps:
                finished = self._pretrain(model, images, step, resumed)
                if not finished:
                    return self.ckpt_path
            stage, step, resumed = "train", 0, None
            # the encoder the detector starts from is the pre-trained one, frozen (or not) per config
            set_encoder_trainable(model, not model_cfg.freeze_encoder)

        if stage == "train" and step < cfg.steps:
            textures = TextureBank.from_source(sim_cfg.texture_source, seed=cfg.seed)
            dataset = SimulatedAnomalyDataset(images, AnomalySimulator(sim_cfg, textures), cfg.seed, cfg.colour_jitter)
            finished = self._train(model, dataset, step, resumed)
            if not finished:
                return self.ckpt_path

        if self.env.is_main:
            calibration, stats = self._calibrate(model, images, sim_cfg)
            save_checkpoint(self.ckpt_path, self._checkpoint(model, "done", cfg.steps, calibration=calibration,
                                                             calibration_stats=stats))
            self.log("calibrated", calibration=dataclasses.asdict(calibration), stats=stats)
            tqdm.write(f"calibrated on {stats['num_images']} normal images never trained on"
                       + (f" (the checks' scales on {stats['scale_images']} others)" if stats["scale_images"] else "")
                       + f": raw threshold {calibration.raw_threshold:.4f} at target FPR {cfg.calibration_fpr:.2%}; "
                       f"new normal images expected at or above it {stats['expected_fpr']:.2%} of the time, under "
                       f"{stats['fpr_upper_90']:.2%} for nine calibration sets in ten; checkpoint {self.ckpt_path}")
            warning = small_calibration_warning(calibration)
            if warning:
                self.log("calibration_warning", message=warning)
                tqdm.write(f"warning: {warning}")
        if self.env.world_size > 1:
            (self.run_dir / f"weights_digest.rank{self.env.rank}.txt").write_text(weights_digest(model))
            dist.barrier()
        return self.ckpt_path

    def _calibration_split(self, has_checks: bool) -> CalibrationSplit:
        """A resumed run keeps the split it started with."""
        held = self.resumed.held_out_train(self.category) if self.resumed is not None else None
        return split_for_calibration(self.category, self.cfg.calibration_fpr, has_checks,
                                     self.cfg.calibration_holdout, held_out_train=held)

    def _calibrate(self, model, train_images: list[np.ndarray], sim_cfg) -> tuple[Any, dict]:
        """Fit the reference checks (their scales on the split's scale images), then the threshold on
        its threshold images."""
        cfg = self.cfg
        if model.reference_encoder is not None:
            fit = fit_checks(model, train_images, load_resized(self.split.scale, cfg.image_size), self.top_k,
                             self.device, seed=cfg.seed, simulation=sim_cfg, precision=self.precision,
                             select=True)
            self.log("checks", **fit)
            self.model_config = model.config  # a check left out is off in the checkpoint
            self.checks_left_out = fit.get("left_out", {})
            self.fusion = fit.get("fusion", {})
            for message in left_out_messages(fit) + fusion_messages(self.fusion):
                tqdm.write(message)
        threshold_images = load_resized(self.split.threshold, cfg.image_size)
        scale_images = len(self.split.scale) if model.reference_encoder is not None else 0
        calibration, stats = calibrate_threshold(model, threshold_images, self.top_k, cfg.calibration_fpr, self.device,
                                                 scale_images=scale_images)
        return calibration, {**stats, "held_out_train": self.split.held_out_train}

    def _pretrain(self, model, images: list[np.ndarray], start: int, resumed: RunCheckpoint | None) -> bool:
        cfg, pcfg = self.cfg, self.cfg.pretrain
        encoder = model.encoder
        decoder = channels_last(RestorationDecoder(encoder.channels, encoder.strides).to(self.device))
        if resumed and resumed.decoder_state is not None:
            decoder.load_state_dict(resumed.decoder_state)
        encoder.requires_grad_(True)
        net = self._wrap(RestorationModel(encoder, decoder))
        opt = torch.optim.Adam([
            {"params": encoder.parameters(), "lr": pcfg.lr_encoder},
            {"params": decoder.parameters(), "lr": pcfg.lr_decoder},
        ])
        if resumed and resumed.optimizer is not None:
            opt.load_state_dict(resumed.optimizer)
        dataset = NormalImageDataset(images, cfg.seed, cfg.colour_jitter)
        loader = self._loader(dataset, start, self._stop(pcfg.steps), torch.stack)
        gen = torch.Generator()
        encoder.train()
        bar = tqdm(total=pcfg.steps, initial=start, desc="pre-train", disable=not self.env.is_main, dynamic_ncols=True)
        step = start
        for batch in loader:
            batch = batch.to(self.device, non_blocking=True)
            gen.manual_seed(self._step_seed("pretrain", step))  # per-step seeds: a resumed run replays exactly
            torch.manual_seed(self._step_seed("pretrain-model", step))
            corrupted = corrupt_patches(batch, pcfg, gen)
            with autocast(self.precision, self.device):
                restored = net(corrupted)
            loss = restoration_loss(restored.float(), batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % cfg.log_every == 0 or step == pcfg.steps:
                self.log("step", stage="pretrain", step=step, loss=loss.item())
            if self.env.is_main and (step % cfg.checkpoint_every == 0 or step == pcfg.steps or step == self.until_step):
                save_checkpoint(self.ckpt_path, self._checkpoint(model, "pretrain", step, decoder_state=decoder.state_dict(),
                                                                 optimizer=opt.state_dict()))
        bar.close()
        average_buffers(encoder)
        return step >= pcfg.steps

    def _step_seed(self, stage: str, step: int) -> int:
        digest = hashlib.blake2b(f"{self.cfg.seed}/{stage}/{step}/{self.env.rank}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF

    def _stop(self, total: int) -> int:
        return min(total, self.until_step) if self.until_step else total

    def _train(self, model, dataset, start: int, resumed: RunCheckpoint | None) -> bool:
        cfg = self.cfg
        net = self._wrap(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(cfg.steps, cfg.optim.warmup_steps))
        if resumed and resumed.optimizer is not None:
            opt.load_state_dict(resumed.optimizer)
            sched.load_state_dict(resumed.scheduler)
        loader = self._loader(dataset, start, self._stop(cfg.steps), collate_pairs)
        model.train()  # a frozen encoder stays in eval mode (SLSG.train), keeping its BatchNorm statistics
        bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not self.env.is_main, dynamic_ncols=True)
        step, t_prev = start, time.perf_counter()
        for images, masks in loader:
            t_data = time.perf_counter()
            images, masks = images.to(self.device, non_blocking=True), masks.to(self.device, non_blocking=True)
            torch.manual_seed(self._step_seed("train", step))
            loss, parts = training_step_loss(net, images, masks, cfg.loss, self.precision, self.device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            t_end = time.perf_counter()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{sched.get_last_lr()[0]:.4f}")
            if step % cfg.log_every == 0 or step == cfg.steps:
                self.log("step", stage="train", step=step, loss=loss.item(), **parts, lr=sched.get_last_lr()[0],
                         data_wait_s=round(t_data - t_prev, 4), compute_s=round(t_end - t_data, 4))
            if self.env.is_main and (step % cfg.checkpoint_every == 0 or step == cfg.steps or step == self.until_step):
                save_checkpoint(self.ckpt_path, self._checkpoint(model, "train", step, optimizer=opt.state_dict(),
                                                                 scheduler=sched.state_dict()))
            t_prev = time.perf_counter()
        bar.close()
        average_buffers(model)
        return step >= cfg.steps

