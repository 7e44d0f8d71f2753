"""Which parts the fused score listens to: a part whose own score does not separate simulated
anomalies from held-out normal images gets no say.

The fused map is a pixelwise maximum of every part's log-odds (SLSG's own map and each map check),
the fused image score a maximum again. A maximum takes every part's normal-image tail: a part at
chance adds false alarms and raises the threshold over the evidence of the parts that do separate.
So after the checks are fitted, :func:`select_fusion` scores the checks' scale images (normal,
held out of training) and anomalies simulated from them, measures each part's separation (image
AUROC against each anomaly kind it is judged on) and leaves out the parts near chance on every kind
(``chance_cutoff``), always keeping the best part and at least one map.

A part is judged only on simulated kinds it has not learnt: SLSG's network is trained on the
training simulation's structural and logical anomalies, and the composition check's autoencoder
on its logical ones (``composition_restoration``), so on those kinds their separation says how well
they learnt the simulation, not how they see new anomalies. The *part* kinds made here (a part
copied to another place, a part painted over with its surroundings) are in no training, and change
what a counting rule sees. A part left out costs nothing at inference: a check is removed from the
model (as one that finds nothing to model), SLSG's map is dropped from the maximum by
``SLSGConfig.fuse_slsg_map`` (the network still runs: the map is part of its graph).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from slsg_train.metrics.roc import auroc

SLSG_MAP = "slsg_map"  # SLSG's own map, in fusion reports (the checks go by their names)
# A part is near chance on a kind when its image AUROC is under NEAR_CHANCE, or within CHANCE_Z standard
# errors of 0.5 (the AUROC of a part at chance spreads by sqrt((n0 + n1 + 1) / (12 n0 n1)): 0.07 for 27 normal
# images and 54 anomalies); 2.5 because a part is kept on the best of up to four kinds
NEAR_CHANCE, CHANCE_Z = 0.6, 2.5
ANOMALIES_PER_IMAGE = 4  # simulated anomalies of each kind per scale image
MIN_IMAGES = 10  # held-out normal images below which nothing is left out (a part at chance then reaches 0.78)
STRUCTURAL, LOGICAL, PART_COPIED, PART_REMOVED = "structural", "logical", "part_copied", "part_removed"
KINDS = (STRUCTURAL, LOGICAL, PART_COPIED, PART_REMOVED)
# a part: a connected region this far (8-bit RGB distance) from the image's median colour, with an area
# between these shares of the image; the simulated part anomalies copy or remove one
PART_COLOUR_DISTANCE = 40.0
PART_AREA = (0.0005, 0.03)
PLACE_ATTEMPTS = 50  # random places tried for a copied part before the image gives none


def chance_cutoff(normal: int, anomalous: int) -> float:
    """The image AUROC under which a part's separation of ``normal`` from ``anomalous`` images is near
    chance (see ``CHANCE_Z``)."""
    spread = np.sqrt((normal + anomalous + 1) / (12 * normal * anomalous))
    return float(max(NEAR_CHANCE, 0.5 + CHANCE_Z * spread))


@dataclass(frozen=True)
class PartSeparation:
    """One part's image AUROC against each simulated kind it is judged on, and each kind's chance
    cutoff (:func:`chance_cutoff`); it separates when it beats the cutoff on some kind."""

    name: str
    by_kind: dict[str, float]
    cutoff: dict[str, float]

    @property
    def best(self) -> float:
        return max(self.by_kind.values())

    @property
    def near_chance(self) -> bool:
        return all(value < self.cutoff[kind] for kind, value in self.by_kind.items())


# ---------------------------------------------------------------- part-level simulated anomalies


def salience(image: np.ndarray) -> np.ndarray:
    """[H, W]: each pixel's colour distance from the image's median colour (the floor the parts lie on
    dominates the median, so parts stand out)."""
    pixels = image.astype(np.float32)
    return np.linalg.norm(pixels - np.median(pixels.reshape(-1, 3), axis=0), axis=2)


def find_parts(image: np.ndarray) -> list[np.ndarray]:
    """Bool [H, W] masks of the image's parts: connected regions of a clearly other colour than the
    median (``PART_COLOUR_DISTANCE``) that are small (``PART_AREA``) and clear of the image's border
    (what surrounds a container touches it)."""
    from scipy import ndimage

    labels, count = ndimage.label(salience(image) > PART_COLOUR_DISTANCE)
    if count == 0:
        return []
    area = image.shape[0] * image.shape[1]
    border = np.unique(np.r_[labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = [i for i in range(1, count + 1)
            if i not in border and PART_AREA[0] * area <= sizes[i] <= PART_AREA[1] * area]
    return [labels == i for i in keep]


def _box(mask: np.ndarray) -> tuple[slice, slice]:
    ys, xs = np.nonzero(mask)
    return slice(int(ys.min()), int(ys.max()) + 1), slice(int(xs.min()), int(xs.max()) + 1)


def copy_part(image: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """One part more: a random part's pixels pasted where its bounding box lands on no salient pixel
    (the floor); None when the image has no part or no free place was found."""
    parts = find_parts(image)
    if not parts:
        return None
    mask = parts[int(rng.integers(len(parts)))]
    rows, cols = _box(mask)
    h, w = rows.stop - rows.start, cols.stop - cols.start
    occupied = salience(image) > PART_COLOUR_DISTANCE
    for _ in range(PLACE_ATTEMPTS):
        y, x = int(rng.integers(image.shape[0] - h + 1)), int(rng.integers(image.shape[1] - w + 1))
        if not occupied[max(0, y - 2):y + h + 2, max(0, x - 2):x + w + 2].any():
            out = image.copy()
            part = mask[rows, cols]
            out[y:y + h, x:x + w][part] = image[rows, cols][part]
            return out
    return None


def remove_part(image: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """One part fewer: a random part (grown by a pixel) painted with the median colour of the ring
    around it; None when the image has no part."""
    from scipy import ndimage

    parts = find_parts(image)
    if not parts:
        return None
    grown = ndimage.binary_dilation(parts[int(rng.integers(len(parts)))], iterations=1)
    ring = ndimage.binary_dilation(grown, iterations=2) & ~grown
    out = image.copy()
    out[grown] = np.median(image[ring], axis=0).astype(np.uint8)
    return out


def simulated_anomalies(images: list[np.ndarray], simulation, seed: int,
                        per_image: int = ANOMALIES_PER_IMAGE) -> dict[str, list[np.ndarray]]:
    """``per_image`` anomalies of each kind (``KINDS``) made from each normal image; ``simulation``:
    the run's SimulationConfig (None: default settings)."""
    from slsg_train.simulation.config import SimulationConfig
    from slsg_train.simulation.foreground import estimate_foreground
    from slsg_train.simulation.logical import simulate_logical_anomaly
    from slsg_train.simulation.structural import simulate_structural_anomaly
    from slsg_train.simulation.textures import TextureBank

    simulation = simulation or SimulationConfig()
    textures = TextureBank.from_source(simulation.texture_source, seed=seed)
    rng = np.random.default_rng(seed)
    made: dict[str, list[np.ndarray]] = {kind: [] for kind in KINDS}
    makers: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray | None], np.ndarray | None]] = {
        STRUCTURAL: lambda im, fg, donor: simulate_structural_anomaly(im, rng, textures, simulation, fg).image,
        LOGICAL: lambda im, fg, donor: simulate_logical_anomaly(im, rng, simulation, fg, donor).image,
        PART_COPIED: lambda im, fg, donor: copy_part(im, rng),
        PART_REMOVED: lambda im, fg, donor: remove_part(im, rng),
    }
    for i, image in enumerate(images):
        foreground = estimate_foreground(image, simulation.foreground)
        donor = images[(i + 1) % len(images)] if len(images) > 1 else None
        for kind, make in makers.items():
            drawn = (make(image, foreground, donor) for _ in range(per_image))
            made[kind].extend(im for im in drawn if im is not None)  # part kinds need parts
    return {kind: frames for kind, frames in made.items() if frames}


# ---------------------------------------------------------------- each part's own score


@torch.no_grad()
def part_scores(model, images: list[np.ndarray], top_k: int, device: torch.device | str = "cpu",
                batch_size: int = 8) -> dict[str, np.ndarray]:
    """Each part's own image score (log-odds, [N]) of uint8 frames: SLSG's map (``SLSG_MAP``) and
    every fitted check by name, each scored as the fusion would score it alone."""
    from slsg_train.data.images import to_tensor
    from slsg_train.models.reference import MAP
    from slsg_train.models.slsg import anomaly_log_odds, image_score_log_odds

    was_training = model.training
    model.eval()
    scores: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch_size):
        x = torch.stack([to_tensor(im) for im in images[start:start + batch_size]]).to(device)
        out = model(x)
        size = tuple(out.logits.shape[-2:])
        batch = {SLSG_MAP: image_score_log_odds(anomaly_log_odds(out.logits), top_k)}
        for name, raw in (out.checks or {}).items():
            check = getattr(model, name)
            lo = check.log_odds(raw, size)
            batch[name] = image_score_log_odds(lo, top_k) if check.kind == MAP else lo
        for name, value in batch.items():
            scores.setdefault(name, []).append(value.float().cpu().numpy())
    model.train(was_training)
    return {name: np.concatenate(values) for name, values in scores.items()}


def learnt_kinds(model) -> dict[str, set[str]]:
    """The simulated kinds each part was trained on, and so is not judged on."""
    learnt = {SLSG_MAP: {STRUCTURAL, LOGICAL}}
    if model.composition_check is not None and model.config.composition_restoration > 0:
        learnt["composition_check"] = {LOGICAL}
    return learnt


def separations(normal: dict[str, np.ndarray], anomalous: dict[str, dict[str, np.ndarray]],
                learnt: dict[str, set[str]]) -> list[PartSeparation]:
    """Each part's AUROC of its ``normal`` scores against each kind's ``anomalous`` ones (kind -> part
    -> scores), leaving out the kinds the part learnt."""
    out = []
    for name, negatives in normal.items():
        by_kind, cutoff = {}, {}
        for kind, scored in anomalous.items():
            if kind in learnt.get(name, set()) or name not in scored:
                continue
            positives = scored[name]
            labels = np.r_[np.zeros(negatives.size), np.ones(positives.size)]
            by_kind[kind] = auroc(np.r_[negatives, positives], labels)
            cutoff[kind] = chance_cutoff(negatives.size, positives.size)
        out.append(PartSeparation(name, by_kind, cutoff))
    return out


def parts_to_leave_out(parts: list[PartSeparation], map_parts: set[str]) -> list[PartSeparation]:
    """The parts near chance on every kind they are judged on, never the best one, and never the last
    map (the anomaly map needs one); a part judged on no kind (SLSG's map where the images have no
    parts to copy or remove) stays in. ``map_parts``: the names of the parts that give a map (SLSG's
    and the map checks')."""
    judged = [p for p in parts if p.by_kind]
    if not judged:
        return []
    best = max(judged, key=lambda p: p.best)
    weak = [p for p in judged if p.near_chance and p is not best]
    if not [p for p in parts if p.name in map_parts and p not in weak]:  # keep the best map among the weak
        weak.remove(max((p for p in weak if p.name in map_parts), key=lambda p: p.best))
    return weak


def reason(part: PartSeparation, normal_images: int) -> str:
    """Why a part is left out, for the training output, the checkpoint and the model card."""
    kinds = ", ".join(f"{kind.replace('_', ' ')} {value:.2f} (chance under {part.cutoff[kind]:.2f})"
                      for kind, value in part.by_kind.items())
    return (f"separation {part.best:.2f} on {normal_images} held-out normal images and anomalies simulated from "
            f"them (image AUROC by kind: {kinds}): near chance, its normal images' tail would only raise the "
            f"threshold")


def select_fusion(model, images: list[np.ndarray], top_k: int, simulation=None, seed: int = 0,
                  device: torch.device | str = "cpu", per_image: int = ANOMALIES_PER_IMAGE) -> dict:
    """Measure each part's separation on ``images`` (normal, held out: the checks' scale images) and
    anomalies simulated from them, and leave the parts near chance out of the fusion: checks are
    removed from the model and its configuration, SLSG's map gets ``fuse_slsg_map`` False. Returns the
    report: ``separation`` (part -> kind -> AUROC) and ``left_out`` (part -> why). With one part there
    is nothing to choose."""
    import dataclasses

    from slsg_train.models.reference import MAP
    from slsg_train.training.calibration import leave_out_checks

    if not model.checks:
        return {}
    if len(images) < MIN_IMAGES:
        return {"skipped": f"{len(images)} held-out normal images are too few to tell a part at chance from one "
                           f"that separates ({MIN_IMAGES} needed): every part fused", "left_out": {}}
    normal = part_scores(model, images, top_k, device)
    made = simulated_anomalies(images, simulation, seed, per_image)
    anomalous = {kind: part_scores(model, frames, top_k, device) for kind, frames in made.items()}
    parts = separations(normal, anomalous, learnt_kinds(model))
    map_parts = {SLSG_MAP, *(c.name for c in model.checks if c.kind == MAP)}
    weak = parts_to_leave_out(parts, map_parts)
    left_out = {p.name: reason(p, len(images)) for p in weak}
    checks_out = [name for name in left_out if name != SLSG_MAP]
    if checks_out:
        leave_out_checks(model, checks_out)
    model.config = dataclasses.replace(model.config, fuse_slsg_map=SLSG_MAP not in left_out)
    return {"separation": {p.name: p.by_kind for p in parts}, "chance_cutoff": {p.name: p.cutoff for p in parts},
            "left_out": left_out, "normal_images": len(images),
            "anomalies": {kind: len(frames) for kind, frames in made.items()}}


def fusion_messages(report: dict) -> list[str]:
    """One line per part left out of the fusion, or why no part could be judged (training output, `slsg checks`)."""
    if "skipped" in report:
        return [f"fusion not selected: {report['skipped']}"]
    return [f"left out of the fusion: {part_label(name)}, {why}" for name, why in report.get("left_out", {}).items()]


def part_label(name: str) -> str:
    return "SLSG's own map" if name == SLSG_MAP else name.replace("_", " ")
