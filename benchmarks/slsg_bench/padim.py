"""PaDiM, a baseline run beside SLSG on the same data, backbone and metrics.

Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and
Localization" (ICPR 2020). A frozen ImageNet backbone describes each patch of a normal image by
the concatenation of three stages (strides 4, 8 and 16, upsampled to stride 4); a fixed random
subset of those channels is kept; each position gets its own Gaussian (mean and covariance over the
training images, plus 0.01 I); a test patch scores its Mahalanobis distance to its position's
Gaussian. The map is upsampled to the model input, smoothed (Gaussian, sigma 4) and its maximum is
the image score, as in the paper and anomalib.

The backbone is one of our registry's (``slsg_train.models.backbones``), so PaDiM and SLSG see the
same ImageNet features. Only the standard library and numpy are imported at module level; torch
and the training package load inside the functions (``slsg bench --help`` stays light).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slsg_bench.report import Table, environment

TAP_STRIDES = (4, 8, 16)  # the paper's layer1-3 of a ResNet (after its max-pool)
COVARIANCE_EPS = 0.01     # added to every covariance's diagonal (paper)
BLUR_SIGMA = 4.0          # px at the model input (paper, anomalib)


@dataclass(frozen=True)
class PadimConfig:
    """What ``slsg bench padim`` runs: data, model input (H, W), backbone, kept channels, seed."""

    data: Path
    category: str
    image_size: tuple[int, int] = (256, 256)
    backbone: str = "efficientnet_lite0"
    backbone_weights: str | None = "imagenet"
    features: int = 100
    seed: int = 0
    batch_size: int = 8
    threads: int = 1


@dataclass
class PadimModel:
    """The fitted model: backbone, kept channel indices and one Gaussian per position (stride 4)."""

    backbone: Any        # FeatureExtractor, eval mode
    taps: list[int]      # indices into the backbone's feature list, strides TAP_STRIDES
    channels: Any        # LongTensor [d], the kept channels of the concatenated taps
    mean: Any            # [h*w, d]
    inv_cov: Any         # [h*w, d, d]
    grid: tuple[int, int]


def feature_taps(strides: list[int]) -> list[int]:
    """Indices of the deepest feature at each stride of TAP_STRIDES (a ValueError names what is missing)."""
    taps = []
    for stride in TAP_STRIDES:
        found = [i for i, s in enumerate(strides) if s == stride]
        if not found:
            raise ValueError(f"PaDiM needs backbone features at strides {TAP_STRIDES}; this backbone has {strides}")
        taps.append(found[-1])
    return taps


def embed(backbone, taps: list[int], channels, batch):
    """ImageNet-normalised [N, 3, H, W] -> [N, d, H/4, W/4]: the taps upsampled to stride 4, concatenated,
    then the kept channels."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        features = backbone(batch)
        first = features[taps[0]]
        parts = [first] + [F.interpolate(features[i], size=first.shape[-2:], mode="nearest") for i in taps[1:]]
        return torch.cat(parts, dim=1).index_select(1, channels).float()


def fit_gaussians(embeddings) -> tuple[Any, Any]:
    """[N, d, h, w] -> (mean [h*w, d], inverse covariance [h*w, d, d]) per position; needs N >= 2."""
    import torch

    n, d, h, w = embeddings.shape
    if n < 2:
        raise ValueError(f"PaDiM needs at least 2 training images to fit a covariance, got {n}")
    x = embeddings.double().reshape(n, d, h * w).permute(2, 0, 1)        # [P, N, d]
    mean = x.mean(dim=1)                                                 # [P, d]
    centred = x - mean[:, None, :]
    cov = centred.transpose(1, 2) @ centred / (n - 1)                    # [P, d, d]
    cov += COVARIANCE_EPS * torch.eye(d, dtype=cov.dtype)
    return mean.float(), torch.linalg.inv(cov).float()


def mahalanobis(embeddings, mean, inv_cov):
    """[N, d, h, w] -> [N, h, w] Mahalanobis distance of each patch to its position's Gaussian."""
    import torch

    n, d, h, w = embeddings.shape
    diff = embeddings.reshape(n, d, h * w).permute(2, 0, 1) - mean[:, None, :]   # [P, N, d]
    squared = torch.einsum("pnd,pde,pne->np", diff, inv_cov, diff)
    return squared.clamp_min(0).sqrt().reshape(n, h, w)


def gaussian_blur(maps, sigma: float = BLUR_SIGMA):
    """[N, H, W] smoothed by a separable Gaussian (kernel 2 * round(4 sigma) + 1, reflected borders)."""
    import torch
    import torch.nn.functional as F

    radius = int(round(4 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=maps.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = maps[:, None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return x[:, 0]


def _batches(paths: list[Path], size: tuple[int, int], batch_size: int):
    import torch

    from slsg_train.data.loco import load_rgb
    from slsg_train.data.images import resize_rgb, to_tensor

    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        yield torch.stack([to_tensor(resize_rgb(load_rgb(p), size)) for p in chunk])


def fit_padim(cfg: PadimConfig, train_paths: list[Path]) -> PadimModel:
    """Fit PaDiM on the normal training images."""
    import torch

    from slsg_train.models.backbones import create_backbone

    backbone = create_backbone(cfg.backbone, weights=cfg.backbone_weights).eval()
    taps = feature_taps(list(backbone.strides))
    total = sum(backbone.channels[i] for i in taps)
    if not 1 <= cfg.features <= total:
        raise ValueError(f"--features must be in 1..{total} (the channels of {cfg.backbone}'s taps), "
                         f"got {cfg.features}")
    generator = torch.Generator().manual_seed(cfg.seed)
    channels = torch.randperm(total, generator=generator)[:cfg.features].sort().values
    embeddings = torch.cat([embed(backbone, taps, channels, b)
                            for b in _batches(train_paths, cfg.image_size, cfg.batch_size)])
    mean, inv_cov = fit_gaussians(embeddings)
    return PadimModel(backbone, taps, channels, mean, inv_cov, tuple(embeddings.shape[-2:]))


def score_batch(model: PadimModel, batch, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """ImageNet-normalised [N, 3, H, W] -> (anomaly maps [N, H, W] at the model input, image scores [N])."""
    import torch.nn.functional as F

    distances = mahalanobis(embed(model.backbone, model.taps, model.channels, batch), model.mean, model.inv_cov)
    maps = F.interpolate(distances[:, None], size=image_size, mode="bilinear", align_corners=False)[:, 0]
    maps = gaussian_blur(maps)
    return maps.numpy(), maps.flatten(1).max(dim=1).values.numpy()


def _pixel_metrics(samples, maps: list[np.ndarray]) -> dict[str, Any]:
    """Pixel AUROC and AU-sPRO over the test images with ground truth (as `slsg evaluate`: anomalous images
    without a usable mask are left out by name); unavailable, with the reason, when no anomalous image has one."""
    from slsg_train.evaluation.runner import upsample_map
    from slsg_train.metrics import ImageMaps, PixelROC, SPROByType

    left_out = {s.name: s.ground_truth_issue for s in samples if not s.has_ground_truth}
    if not any(s.is_anomalous and s.has_ground_truth for s in samples):
        return {"pixel_auroc": None, "au_spro": None, "left_out": left_out,
                "unavailable": "no anomalous test image has a mask (image labels only)"}
    spro, pixel = SPROByType(), PixelROC()
    for sample, amap in zip(samples, maps):
        if not sample.has_ground_truth:
            continue
        defects = []
        for mask in sample.masks:
            region = mask.load()
            defects.append((region, mask.defect.saturation_area(int(region.sum()))))
        image = ImageMaps(anomaly_map=upsample_map(amap, sample.size), defects=defects,
                          anomaly_type=sample.anomaly_type, name=sample.name)
        spro.add(image)
        pixel.add_image(image)
    return {"pixel_auroc": pixel.auroc(), "au_spro": spro.result(), "left_out": left_out}


def run_padim_bench(cfg: PadimConfig) -> dict[str, Any]:
    """Fit PaDiM on ``train/good`` of the category and score its test split with the project's metrics."""
    import torch

    from slsg_train.data.loco import LocoCategory
    from slsg_train.metrics import image_auroc_by_type

    torch.set_num_threads(cfg.threads)
    category = LocoCategory(cfg.data, cfg.category)
    samples = category.test_samples()
    t0 = time.perf_counter()
    model = fit_padim(cfg, list(category.train_paths))
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    maps, scores = [], []
    for batch in _batches([s.path for s in samples], cfg.image_size, cfg.batch_size):
        batch_maps, batch_scores = score_batch(model, batch, cfg.image_size)
        maps.extend(batch_maps)
        scores.extend(batch_scores.tolist())
    score_s = time.perf_counter() - t0
    types = [s.anomaly_type for s in samples]
    return {
        "benchmark": "padim", "environment": environment(cfg.threads), "category": cfg.category,
        "data": str(cfg.data), "image_size": list(cfg.image_size), "backbone": cfg.backbone,
        "features": cfg.features, "seed": cfg.seed, "train_images": len(category.train_paths),
        "counts": {t: types.count(t) for t in sorted(set(types))},
        "image_auroc": image_auroc_by_type(scores, types), **_pixel_metrics(samples, maps),
        "fit_seconds": round(fit_s, 2), "score_ms_per_image": round(1e3 * score_s / len(samples), 1),
        "scores": [{"image": s.name, "score": float(v)} for s, v in zip(samples, scores)],
    }


def padim_tables(r: dict[str, Any]) -> list[Table]:
    """The per-type image AUROC table (plus pixel metrics where the data set has masks)."""
    h, w = r["image_size"]
    rows = [[f"image AUROC {k}", v] for k, v in r["image_auroc"].items()]
    if r["pixel_auroc"] is not None:
        rows.append(["pixel AUROC", r["pixel_auroc"]])
        rows += [[f"AU-sPRO@{limit} mean", by_type.get("mean")] for limit, by_type in r["au_spro"].items()]
    else:
        rows.append(["pixel metrics", r["unavailable"]])
    if r["left_out"]:
        rows.append(["left out of pixel metrics", f"{len(r['left_out'])} images without a usable mask"])
    rows += [["fit s", r["fit_seconds"]], ["score ms / image", r["score_ms_per_image"]]]
    return [Table(f"PaDiM on {r['category']} at {w}x{h}, {r['backbone']}, {r['features']} channels, "
                  f"seed {r['seed']}, {r['train_images']} training images", ["measure", "value"], rows)]
