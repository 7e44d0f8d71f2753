"""A component check beside SLSG's map: are the right parts there, in the right numbers, sizes and colours?

Logical rules about loose parts (a bag holds two screws, two nuts and two washers; both washers have
one colour) are broken by images whose every patch looks normal, and the parts lie anywhere, so no
per-place model sees them. Component-based methods (ComAD, Liu et al. 2023; PSAD, Kim et al. 2024)
segment the parts of each image and compare the image's description by its parts with the normal
ones. This check does that in closed form, learnt from normal images only:

1. *Segmentation.* Each cell of a 64-cell grid is described by its colour and the reference encoder's
   stride-4 features (standardised, colour 85% of the variance) and given
   the nearest of ``clusters`` k-means centres fitted on the training images, then a 3x3 majority
   vote. Clusters whose connected regions are small on the training images are *part kinds*; the
   rest (background, the container) are left alone.
2. *Components.* Connected components of each part kind by label propagation: every cell starts
   with its own index and takes the largest label of its 3x3 neighbours of the same kind, a fixed
   number of times (max-pooling; exact for parts up to ``ITERATION_SHARE`` of the grid across).
   The cell that keeps its own index is its component's root; roots get slots by a cumulative sum.
3. *Description.* Per component: area and mean colour; per kind: the count of its components
   (those not smaller than a fragment) and their mean colour.
4. *Model and score.* Per kind, the normal count, component area and the spread of the components'
   colours around their kind's mean within one image, as mean and standard deviation over the
   training images, and which of them are *rules*: those the normal images hold steady (a kind with
   none is dropped; with no kind left the check is not applicable and is left out of the model).
   Each component scores the largest deviation among its kind's rules, in standard deviations beyond
   a tolerance, and its cells carry that score: the raw map marks an extra part's kind, the
   odd-sized part, the washer of the other colour, and for a missing part the kind's remaining
   parts. Cells with no deviation give no evidence to the fusion.

Everything at inference is tensor arithmetic ONNX exports (argmax, max-pooling, cumulative sum,
gather), so the check runs inside the exported graph. Its map is put on the local score's scale and
fused by a pixelwise max like the other map checks (``reference.py``). Not in the paper.
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from slsg.contract import PartKind

from .reference import MAP, Check, CheckNotApplicable, FitContext, ReferenceEncoder, local_log_odds, resize_patches

GRID_CELLS = 64  # the segmentation's grid has this many cells on the image's shorter side
FEATURE_STRIDES = (4,)  # the reference stages described with the colour (deeper ones blur the parts' edges)
# shares of the descriptor's variance: chromaticity (3 channels), brightness against the image's mean
# (lighting and the container's shade change from image to image; a part's hue does not), features
CHROMA_SHARE, BRIGHTNESS_SHARE = 0.8, 0.05
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MAX_COMPONENTS = 48  # component slots per image; roots beyond are not described
ITERATION_SHARE = 3  # label propagation runs grid side / this many steps
THING_AREA_SHARE = 0.03  # a part kind's typical component covers at most this share of the grid
FRAGMENT_SHARE = 0.3  # components below this share of their kind's typical area are fragments
KMEANS_PIXELS, KMEANS_STEPS = 60000, 30
# floors of the normal spreads: counts are whole numbers and identical on clean normal images; a shade
# difference under 0.005 in chromaticity (about two 8-bit levels of a mid-grey part) is no other colour
COUNT_STD_FLOOR, AREA_STD_SHARE, COLOUR_STD_FLOOR = 0.25, 0.1, 0.005
# which terms of the description are rules, learnt per kind from the normal images: its count where one
# value holds on this share of the training images, its area where the areas' robust coefficient of
# variation is at most this (a connector whose outline varies 25 % says nothing by its size)
COUNT_STABLE_SHARE, AREA_CV_MAX = 0.9, 0.2
TERMS = ("count", "area", "colour")
# a part's deviation counts beyond this many normal standard deviations: within it a normal part's noise
# would otherwise be fused as evidence, and a check with no rule broken must leave the other scores alone
DEVIATION_TOLERANCE = 1.0
NO_EVIDENCE = -30.0  # log-odds of cells without a deviation beyond the tolerance: below any other check's
COUNT_TOLERANCE_STDS = 2  # a count further than this many normal standard deviations is explained
GREY_SATURATION = 0.2  # part kinds less saturated than this are named "grey"
HUE_NAMES = ((15, "red"), (45, "orange"), (70, "yellow"), (160, "green"), (200, "cyan"), (260, "blue"),
             (300, "purple"), (345, "magenta"), (360, "red"))  # (upper hue in degrees, name)
# the image scores' spread on the calibration images, at least (in normal standard deviations): on clean
# parts every deviation is ~0, and dividing by that spread would turn rounding noise into anomalies
DEVIATION_STD_FLOOR = 0.5


class ComponentCheck(Check):
    """Image [B, 3, H, W] (normalised) and the reference encoder's maps -> deviation [B, 1, h, w] on its grid
    of each cell's part from the normal parts (0 off the parts)."""

    name, kind, raw_name = "component_check", MAP, "deviation"

    def __init__(self, channels: list[int], strides: list[int], clusters: int = 8, weight: float = 1.0) -> None:
        super().__init__(weight)
        self.levels = [i for i, s in enumerate(strides) if s in FEATURE_STRIDES]
        if clusters < 2 or weight <= 0 or not self.levels:
            raise ValueError(f"component check needs clusters >= 2, weight > 0 and a reference stage at stride "
                             f"{FEATURE_STRIDES}; got {clusters}, {weight}, strides {strides}")
        features = sum(channels[i] for i in self.levels)
        dim = 4 + features
        feature_share = 1 - CHROMA_SHARE - BRIGHTNESS_SHARE
        weights = ([(CHROMA_SHARE / 3) ** 0.5] * 3 + [BRIGHTNESS_SHARE ** 0.5]
                   + [(feature_share / features) ** 0.5] * features)
        self.register_buffer("channel_weight", torch.tensor(weights).view(1, dim, 1, 1))
        self.register_buffer("feature_mean", torch.zeros(1, dim, 1, 1))
        self.register_buffer("feature_std", torch.ones(1, dim, 1, 1))
        self.register_buffer("centroids", torch.zeros(clusters, dim))
        self.register_buffer("things", torch.zeros(clusters))  # 1: a part kind, 0: background / container
        self.register_buffer("min_area", torch.zeros(clusters))  # in cells; smaller components are fragments
        self.register_buffer("count_mean", torch.zeros(clusters))
        self.register_buffer("count_std", torch.ones(clusters))
        self.register_buffer("area_mean", torch.zeros(clusters))
        self.register_buffer("area_std", torch.ones(clusters))
        self.register_buffer("colour_std", torch.ones(clusters))
        self.register_buffer("terms", torch.ones(len(TERMS), clusters))  # 1: the term is a rule for the kind
        self._train_raw: np.ndarray | None = None  # the training images' raw image scores, between fit and fit_scale

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checks saved before the per-kind rules modelled every term of every part kind
        state_dict.setdefault(prefix + "terms", torch.ones_like(self.terms))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_config(cls, config, encoder: ReferenceEncoder) -> "ComponentCheck":
        return cls(encoder.channels, encoder.strides, config.component_clusters, config.component_weight)

    @property
    def clusters(self) -> int:
        return self.centroids.shape[0]

    # ------------------------------------------------------------------ segmentation

    def descriptor(self, x: Tensor, maps: list[Tensor]) -> Tensor:
        """[B, 4 + C, h, w]: each grid cell's chromaticity (r, g, b over their sum), brightness over the
        image's mean, and the chosen stages' features; unstandardised."""
        stride = grid_stride(x)
        grid = (x.shape[-2] // stride, x.shape[-1] // stride)
        mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        rgb = F.avg_pool2d(x * std + mean, stride).clamp_min(0)
        total = rgb.sum(1, keepdim=True) + 1e-3
        brightness = total / total.mean(dim=(2, 3), keepdim=True)
        feats = [F.interpolate(maps[i], size=grid, mode="bilinear", align_corners=False) for i in self.levels]
        return torch.cat([rgb / total, brightness] + feats, dim=1)

    def _weighted(self, descriptor: Tensor) -> Tensor:
        return (descriptor - self.feature_mean) / self.feature_std * self.channel_weight

    def segment(self, descriptor: Tensor) -> Tensor:
        """[B, K, h, w] one-hot kind of every cell: the nearest centre, then a 3x3 majority vote."""
        d = self._weighted(descriptor)
        c = self.centroids
        distance = (c * c).sum(1).view(1, -1, 1, 1) - 2 * torch.einsum("bdhw,kd->bkhw", d, c)
        nearest = self._one_hot(distance.argmin(dim=1))
        # whole-number vote counts (a sum of 0/1 by a depthwise convolution, exact in any order), so a tied
        # vote goes to the first kind in PyTorch and ONNX Runtime alike
        ones = torch.ones(self.clusters, 1, 3, 3, dtype=nearest.dtype, device=nearest.device)
        votes = F.conv2d(nearest, ones, padding=1, groups=self.clusters)
        return self._one_hot(votes.argmax(dim=1))

    def _one_hot(self, index: Tensor) -> Tensor:
        kinds = torch.arange(self.clusters, device=index.device).view(1, -1, 1, 1)
        return (index.unsqueeze(1) == kinds).to(self.centroids.dtype)

    # ------------------------------------------------------------------ components

    @staticmethod
    def propagate(mask: Tensor, iterations: int) -> Tensor:
        """[B, K, h, w] 0/1 masks -> [B, h, w] component labels (1-based index of the component's
        last cell; 0 off the masks), by ``iterations`` steps of 3x3 max-pooling within each mask."""
        h, w = mask.shape[-2:]
        index = torch.arange(1, h * w + 1, device=mask.device, dtype=mask.dtype).view(1, 1, h, w)
        labels = index * mask
        for _ in range(iterations):
            labels = F.max_pool2d(labels, 3, stride=1, padding=1) * mask
        return labels.sum(dim=1)  # the masks do not overlap

    def describe(self, x: Tensor, maps: list[Tensor]) -> dict[str, Tensor]:
        """:meth:`parts` of the image."""
        return self.parts(x, self.descriptor(x, maps))

    def parts(self, x: Tensor, descriptor: Tensor) -> dict[str, Tensor]:
        """The parts of image ``x`` with :meth:`descriptor` ``descriptor``: per slot ``area`` [B, S] (cells),
        ``colour`` [B, S, 3] (chromaticity), one-hot ``kind`` [B, S, K], ``valid`` [B, S] (a part, not a
        fragment), ``member`` [B, S, h*w] (its cells); per kind ``count`` [B, K] and ``kind_colour``
        [B, K, 3] (its parts' mean colour)."""
        colour_map = descriptor[:, :3]  # chromaticity: the lighting's gradient barely moves it
        kinds = self.segment(descriptor)
        h, w = kinds.shape[-2:]
        label = self.propagate(kinds * self.things.view(1, -1, 1, 1), max(1, max(h, w) // ITERATION_SHARE))
        flat = label.flatten(1)  # [B, N]
        index = torch.arange(1, h * w + 1, device=x.device, dtype=flat.dtype).view(1, -1)
        root = (flat == index).to(flat.dtype)
        slot = torch.cumsum(root, dim=1) * root
        slot = slot * (slot <= MAX_COMPONENTS).to(flat.dtype)
        lookup = torch.cat([torch.zeros_like(slot[:, :1]), slot], dim=1)  # label 0 (no part) -> slot 0
        cell_slot = torch.gather(lookup, 1, flat.long())
        slots = torch.arange(1, MAX_COMPONENTS + 1, device=x.device, dtype=flat.dtype).view(1, -1, 1)
        member = (cell_slot.unsqueeze(1) == slots).to(flat.dtype)  # [B, S, N]
        area = member.sum(-1)
        per_cell = area.clamp_min(1).unsqueeze(-1)
        colour = member @ colour_map.flatten(2).transpose(1, 2) / per_cell
        kind = member @ kinds.flatten(2).transpose(1, 2) / per_cell  # one-hot (a component has one kind)
        valid = (area >= kind @ self.min_area).to(area.dtype) * (area > 0).to(area.dtype)
        part = kind * valid.unsqueeze(-1)  # [B, S, K]
        count = part.sum(1)
        kind_colour = part.transpose(1, 2) @ colour / count.clamp_min(1).unsqueeze(-1)
        return {"area": area, "colour": colour, "kind": kind, "valid": valid, "member": member, "count": count,
                "kind_colour": kind_colour}

    def deviations(self, parts: dict[str, Tensor]) -> Tensor:
        """[B, S]: each part's largest deviation among the terms that are rules for its kind (count of
        its kind, its area, its colour against its kind's in the image), in normal standard deviations
        beyond ``DEVIATION_TOLERANCE``; 0 for fragments and empty slots."""
        kind = parts["kind"]
        count_z = (kind * ((parts["count"] - self.count_mean).abs() / self.count_std).unsqueeze(1)).sum(-1)
        area_z = (parts["area"] - kind @ self.area_mean).abs() / (kind @ self.area_std).clamp_min(1e-6)
        mean_colour = kind @ parts["kind_colour"]  # [B, S, 3]: the slot's kind's mean colour
        colour_z = (parts["colour"] - mean_colour).norm(dim=-1) / (kind @ self.colour_std).clamp_min(1e-6)
        use = kind @ self.terms.t()  # [B, S, 3]: which terms are rules for the slot's kind
        z = torch.stack([count_z, area_z, colour_z], dim=-1) * use
        return (z.amax(dim=-1) - DEVIATION_TOLERANCE).clamp_min(0) * parts["valid"]

    def log_odds(self, raw: Tensor, size: tuple[int, int]) -> Tensor:
        """As :meth:`Check.log_odds`, but cells whose part breaks no rule (and cells off the parts) give
        ``NO_EVIDENCE``: the map says nothing there, so the pixelwise max leaves the other maps alone."""
        up = resize_patches(raw, size)
        mapped = local_log_odds(up, self.scale, self.weight)
        return torch.where(up > 0, mapped, torch.full_like(mapped, NO_EVIDENCE))

    def forward(self, x: Tensor, maps: list[Tensor]) -> Tensor:
        return self.deviation_map(x, self.descriptor(x, maps))

    def deviation_map(self, x: Tensor, descriptor: Tensor) -> Tensor:
        """[B, 1, h, w]: each cell's part's :meth:`deviations` (0 off the parts), from the :meth:`descriptor`."""
        parts = self.parts(x, descriptor)
        cells = (parts["member"] * self.deviations(parts).unsqueeze(-1)).sum(1)  # [B, N]
        stride = grid_stride(x)
        return cells.view(x.shape[0], 1, x.shape[-2] // stride, x.shape[-1] // stride)

    def counts(self, x: Tensor, maps: list[Tensor]) -> Tensor:
        """[B, K]: how many parts of each kind the image holds (0 for the kinds that are not parts)."""
        return self.describe(x, maps)["count"] * self.things

    def part_columns(self) -> list[int]:
        """The part kinds whose count is a rule, ascending: the columns of the served ``part_counts``."""
        return [int(k) for k in torch.nonzero(self.things * self.terms[0]).flatten()]

    def part_kinds(self) -> list[PartKind]:
        """The model card's description of :meth:`part_columns`: name ("kind i (colour)"), expected count
        (the normal images' mean, rounded) and tolerance (``COUNT_TOLERANCE_STDS`` normal standard
        deviations, whole parts; 0 where the normal count never varies)."""
        return [PartKind(name=f"kind {i} ({self.colour_name(k)})", expected=int(round(float(self.count_mean[k]))),
                         tolerance=int(COUNT_TOLERANCE_STDS * float(self.count_std[k]) + 1e-6))
                for i, k in enumerate(self.part_columns(), start=1)]

    def colour_name(self, cluster: int) -> str:
        """A plain colour word for ``cluster``'s centre chromaticity (the descriptor's first three channels)."""
        centre = self.centroids[cluster] / self.channel_weight.flatten() * self.feature_std.flatten()
        chroma = (centre + self.feature_mean.flatten())[:3].clamp_min(0).tolist()
        top = max(chroma) or 1.0
        hue, saturation, _ = colorsys.rgb_to_hsv(*(c / top for c in chroma))
        if saturation < GREY_SATURATION:
            return "grey"
        return next(name for upper, name in HUE_NAMES if hue * 360 <= upper)

    # ------------------------------------------------------------------ fitting

    @torch.no_grad()
    def fit_scale(self, raw_scores: np.ndarray, local_scores: np.ndarray) -> None:
        """As :meth:`Check.fit_scale`, the raw scores' mean and spread taken over the scale images and the
        training images together: a normal image's raw score is 0 unless a part breaks a rule, so the
        few scale images (10-20) give a mean and spread that hang on whether one of them happens to;
        the training images are many, and the normal model's medians barely fit to them."""
        super().fit_scale(raw_scores, local_scores)
        train_raw = getattr(self, "_train_raw", None)
        pooled = np.concatenate([np.asarray(raw_scores, dtype=np.float64), train_raw]) if train_raw is not None \
            else np.asarray(raw_scores, dtype=np.float64)
        self.scale[0], self.scale[1] = float(pooled.mean()), max(float(pooled.std()), DEVIATION_STD_FLOOR)

    def collect(self, x: Tensor, maps: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(the batch's :meth:`descriptor` in float16, the batch) on the CPU: the fit segments every image."""
        return self.descriptor(x, maps).half().cpu(), x.half().cpu()

    @torch.no_grad()
    def fit(self, collected: list[tuple[Tensor, Tensor]], context: FitContext) -> dict:
        """Standardisation, k-means centres, which clusters are part kinds, then the normal parts' model."""
        descriptors = torch.cat([d for d, _ in collected])
        images = torch.cat([x for _, x in collected])
        device = self.centroids.device
        self._fit_standardisation(descriptors)
        generator = torch.Generator().manual_seed(context.seed)
        cells = self._weighted(descriptors.float()).permute(0, 2, 3, 1).reshape(-1, descriptors.shape[1])
        sample = cells[torch.randperm(cells.shape[0], generator=generator)[:KMEANS_PIXELS]]
        self.centroids.copy_(kmeans(sample.to(device), self.clusters, generator))
        self._fit_part_kinds(descriptors)
        if not bool(self.things.any()):
            raise CheckNotApplicable("no segment of the normal images forms small parts found about once an image "
                                     "(only background and container): nothing to count")
        candidates = [int(k) for k in torch.nonzero(self.things).flatten()]
        steadiness = self._fit_normal_parts(images, descriptors)
        kinds = [int(k) for k in torch.nonzero(self.things).flatten()]
        if not kinds:
            varying = "; ".join(f"cluster {k}: {steadiness[k]}" for k in candidates)
            raise CheckNotApplicable(f"none of the {len(candidates)} part kind(s) found is described steadily on the "
                                     f"normal images, so no count, size or colour rule can be learnt ({varying})")
        self._train_raw = self._train_raw_scores(images, descriptors, context.top_k)
        return {"clusters": self.clusters, "part_kinds": len(kinds),
                "count_mean": [round(float(self.count_mean[k]), 2) for k in kinds],
                "area_mean": [round(float(self.area_mean[k]), 1) for k in kinds],
                "rules": [[t for t, used in zip(TERMS, self.terms[:, k].tolist()) if used] for k in kinds],
                "dropped": {f"cluster {k}": steadiness[k] for k in candidates if k not in kinds}}

    def _train_raw_scores(self, images: Tensor, descriptors: Tensor, top_k: int | None,
                          batch: int = 32) -> np.ndarray | None:
        """The training images' raw image scores, for :meth:`fit_scale` (None without a top-K)."""
        if top_k is None:
            return None
        device, scores = self.centroids.device, []
        for i in range(0, len(images), batch):
            x = images[i:i + batch].to(device).float()
            raw = self.deviation_map(x, descriptors[i:i + batch].to(device).float())
            scores.append(self.image_raw(raw, tuple(x.shape[-2:]), top_k).double().cpu())
        return torch.cat(scores).numpy()

    def _fit_standardisation(self, descriptors: Tensor) -> None:
        d = descriptors.float()
        self.feature_mean.copy_(d.mean(dim=(0, 2, 3), keepdim=True))
        self.feature_std.copy_(d.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))

    def _segments(self, descriptors: Tensor, batch: int = 32):
        device = self.centroids.device
        for i in range(0, len(descriptors), batch):
            yield self.segment(descriptors[i:i + batch].to(device).float())

    def _fit_part_kinds(self, descriptors: Tensor) -> None:
        """Part kinds: clusters whose regions, fully separated into components, are small (half their
        cells lie in components under ``THING_AREA_SHARE`` of the grid) and found about once an image."""
        k = self.clusters
        small, total, counted = torch.zeros(k), torch.zeros(k), torch.zeros(k)
        for kinds in self._segments(descriptors):
            b, _, h, w = kinds.shape
            label = self.propagate(kinds, h + w).long().flatten(1)  # every component converged
            for i in range(b):
                area = torch.bincount(label[i], minlength=h * w + 1).float()
                cell_area = area[label[i]]
                cell_kind = kinds[i].flatten(1).argmax(0)
                tiny = cell_area < 2
                total += torch.bincount(cell_kind, minlength=k).float().cpu()
                small += torch.bincount(cell_kind, weights=(cell_area <= THING_AREA_SHARE * h * w).float(),
                                        minlength=k).cpu()
                roots = (label[i] == torch.arange(1, h * w + 1, device=label.device)) & ~tiny
                counted += torch.bincount(cell_kind[roots], minlength=k).float().cpu()
        images = len(descriptors)
        self.things.copy_(((small >= 0.5 * total.clamp_min(1)) & (counted / images >= 0.5)).float())

    def _fit_normal_parts(self, images: Tensor, descriptors: Tensor, batch: int = 32) -> dict[int, str]:
        """Fragment sizes from the part kinds' area per cell, then counts, areas and colour spreads, then
        which of them are rules (:meth:`_fit_terms`); returns how steady each part kind was."""
        self.min_area.zero_()
        areas = self._parts(images, descriptors, batch)
        k = self.clusters
        for j in range(k):  # the typical area: the area of the component a cell lies in, its median
            a = areas["area"][areas["kind"] == j]
            if a.numel():
                self.min_area[j] = FRAGMENT_SHARE * float(torch.quantile(a.repeat_interleave(a.long()), 0.5))
        parts = self._parts(images, descriptors, batch)
        counts = parts["counts"]  # [N, K]
        self.count_mean.copy_(counts.mean(0))
        self.count_std.copy_(counts.std(0).clamp_min(COUNT_STD_FLOOR))
        for j in range(k):
            keep = parts["kind"] == j
            a, spread = parts["area"][keep], parts["spread"][keep]
            if a.numel() >= 2:
                median = a.median()
                mad = (a - median).abs().median() * 1.4826
                self.area_mean[j], self.area_std[j] = median, max(float(mad), AREA_STD_SHARE * float(median))
                self.colour_std[j] = max(float(spread.pow(2).mean().sqrt()), COLOUR_STD_FLOOR)
        return self._fit_terms(counts, parts["area"], parts["kind"])

    def _fit_terms(self, counts: Tensor, area: Tensor, kind: Tensor) -> dict[int, str]:
        """Which terms are rules for each part kind, learnt from the training images' ``counts`` [N, K] and
        their parts' ``area`` and ``kind``: the count where one value holds on ``COUNT_STABLE_SHARE`` of the
        images, the area where its robust coefficient of variation is at most ``AREA_CV_MAX``, the colour
        (its spread around the kind's mean within an image) where the count is a rule of two or more parts
        (a kind found in varying numbers is no set of parts that share a colour: often shading, not parts).
        A kind with no rule stops being a part kind. Returns each part kind's steadiness, in words."""
        self.terms.zero_()
        steadiness = {}
        for k in [int(j) for j in torch.nonzero(self.things).flatten()]:
            modal = float(torch.unique(counts[:, k], return_counts=True)[1].max()) / max(len(counts), 1)
            a = area[kind == k]
            cv = float((a - a.median()).abs().median() * 1.4826 / a.median()) if a.numel() >= 2 else float("inf")
            steady_count = modal >= COUNT_STABLE_SHARE
            self.terms[:, k] = torch.tensor([steady_count, cv <= AREA_CV_MAX,
                                             steady_count and float(counts[:, k].float().median()) >= 2],
                                            dtype=self.terms.dtype)
            steadiness[k] = f"most common count on {modal:.0%} of the images, area varying {cv:.0%}"
        self.things.mul_((self.terms.sum(0) > 0).to(self.things.dtype))
        return steadiness

    def _parts(self, images: Tensor, descriptors: Tensor, batch: int) -> dict[str, Tensor]:
        """Every valid part of the training images: ``area``, ``kind``, colour ``spread`` (distance to its
        kind's mean colour in its image); and ``counts`` [N, K]."""
        device = self.centroids.device
        area, kind, spread, counts = [], [], [], []
        for i in range(0, len(images), batch):
            x = images[i:i + batch].to(device).float()
            parts = self.parts(x, descriptors[i:i + batch].to(device).float())
            valid = parts["valid"] > 0
            mean_colour = parts["kind"] @ parts["kind_colour"]
            area.append(parts["area"][valid].cpu())
            kind.append(parts["kind"].argmax(-1)[valid].cpu())
            spread.append((parts["colour"] - mean_colour).norm(dim=-1)[valid].cpu())
            counts.append(parts["count"].cpu())
        return {"area": torch.cat(area), "kind": torch.cat(kind), "spread": torch.cat(spread),
                "counts": torch.cat(counts)}


def grid_stride(x: Tensor) -> int:
    """The segmentation cell's side in input pixels: ``GRID_CELLS`` cells on the shorter side (at least 1 px)."""
    return max(1, min(int(x.shape[-2]), int(x.shape[-1])) // GRID_CELLS)


def kmeans(points: Tensor, clusters: int, generator: torch.Generator, steps: int = KMEANS_STEPS) -> Tensor:
    """[clusters, D] centres of ``points`` [N, D]: k-means++ seeding, then Lloyd steps (an emptied
    cluster takes the point farthest from its centre)."""
    n = points.shape[0]
    if n < clusters:
        raise ValueError(f"k-means needs at least {clusters} points, got {n}")
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [points[first]]
    nearest = ((points - centres[0]) ** 2).sum(1)
    for _ in range(clusters - 1):
        probability = (nearest / nearest.sum().clamp_min(1e-12)).cpu().double().numpy()
        rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=generator)))
        pick = int(rng.choice(n, p=probability / probability.sum()))
        centres.append(points[pick])
        nearest = torch.minimum(nearest, ((points - points[pick]) ** 2).sum(1))
    c = torch.stack(centres)
    for _ in range(steps):
        distance = torch.cdist(points, c)
        assign = distance.argmin(1)
        for j in range(clusters):
            members = points[assign == j]
            c[j] = members.mean(0) if len(members) else points[distance.min(1).values.argmax()]
    return c
