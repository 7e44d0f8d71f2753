"""A synthetic data set in the MVTec LOCO AD layout, for tests and laptop demos (numpy + Pillow only).

Each category is a small scene grammar: normal images obey layout rules (which part sits where,
which colour goes with which connector) and vary in pose, per-part jitter, lighting and sensor
noise. *Logical* anomalies break a rule with normal-looking parts (missing, extra, swapped,
wrongly coloured or counted parts); *structural* anomalies damage the surface (scratches, dents,
stains, chipped parts, cut or kinked cables). Ground truth follows LOCO's conventions: one mask
PNG per defect, valued with the defect's ``pixel_value`` from ``defects_config.json``; a missing
part is marked where it should be, an extra part where it is.

Scenes are described in *canonical* coordinates (origin at the image centre, x right, y down,
one unit = the shorter image side), so any image size, square or not, renders the same scene.
Every image has its own random generator seeded from (seed, category, split, index): the data
set is reproducible byte for byte and independent of the order in which it is written.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from slsg_train.data.loco import DEFECTS_CONFIG, GOOD, DefectConfig

Colour = tuple[int, ...]  # RGB, or RGBA for translucent overlays
SUPERSAMPLE = 2  # scenes are drawn at 2x and box-filtered down for anti-aliased edges
MIN_IMAGE_SIDE = 32
MAX_ATTEMPTS = 20  # re-draws when a defect's mask vanishes at a tiny image size
SECOND_DEFECT_PROBABILITY = 0.2  # some LOCO test images carry two defects (two mask files)
TEST_TYPES = {"logical": "logical_anomalies", "structural": "structural_anomalies"}


# --------------------------------------------------------------------------- scene description


@dataclass
class Shape:
    """A filled polygon (``width == 0``) or an open polyline ``width`` wide, in canonical units."""

    points: np.ndarray  # (N, 2)
    fill: Colour
    width: float = 0.0


@dataclass
class Element:
    """A named object of the scene (the tray, a part, the cable); its mask is the union of its shapes."""

    name: str
    shapes: list[Shape]


@dataclass
class Scene:
    background: Colour
    elements: list[Element]
    pose: tuple[float, float, float, float]  # whole-object shift x, shift y, rotation (deg), scale
    lighting: tuple[float, float, float, float]  # gain, gradient x, gradient y, noise sigma
    attrs: dict = field(default_factory=dict)  # category facts the anomaly simulators need
    touched: set[str] = field(default_factory=set)  # elements already changed by a simulated defect

    def get(self, name: str) -> Element | None:
        return next((e for e in self.elements if e.name == name), None)

    def put(self, element: Element) -> None:
        """Replace the element of that name in place (keeping drawing order) or append it."""
        for i, e in enumerate(self.elements):
            if e.name == element.name:
                self.elements[i] = element
                return
        self.elements.append(element)

    def remove(self, name: str) -> Element:
        element = self.get(name)
        self.elements.remove(element)
        return element

    def untouched(self, prefix: str) -> list[str]:
        return [e.name for e in self.elements if e.name.startswith(prefix) and e.name not in self.touched]


@dataclass
class SimulatedDefect:
    """Where a simulated defect is: the union of ``region``, intersected with ``clip`` if given."""

    region: list[Shape]
    clip: list[Shape] | None = None


DefectDrawer = Callable[[Scene, np.random.Generator], SimulatedDefect | None]  # None: not applicable


@dataclass(frozen=True)
class DefectSpec:
    """A defect type of a synthetic category: its simulator and its sPRO saturation rule."""

    name: str
    simulate: DefectDrawer
    relative_saturation: bool
    saturation: float  # fraction of the defect's area (relative) or of the image area (absolute)


@dataclass(frozen=True)
class SynthCategory:
    name: str
    build_scene: Callable[[np.random.Generator], Scene]
    logical: tuple[DefectSpec, ...]
    structural: tuple[DefectSpec, ...]

    def defects_config(self, image_size: tuple[int, int]) -> list[DefectConfig]:
        """``defects_config.json`` entries; absolute thresholds become pixel counts at this size."""
        area = image_size[0] * image_size[1]
        return [DefectConfig(spec.name, 255 - 12 * i,
                             spec.saturation if spec.relative_saturation else max(1, round(spec.saturation * area)),
                             spec.relative_saturation)
                for i, spec in enumerate(self.logical + self.structural)]


@dataclass(frozen=True)
class SplitCounts:
    """Images per split (the LOCO layout has all five, so each needs at least one).

    The defaults are MVTec LOCO AD's sizes, rounded (per category it has 335-372 training, 48-69
    validation, and 75-138 test images of each kind). The reference checks model the normal images and
    are calibrated on the validation ones, so fewer make normal test images look rare: with 80 and 20,
    cable's logical image AUROC was 0.88 instead of 0.91-0.92.
    """

    train: int = 350
    validation: int = 60
    test_good: int = 100
    test_logical: int = 90
    test_structural: int = 90

    def plan(self) -> list[tuple[str, str, int]]:
        """(folder relative to the category, anomaly kind, count) for every split."""
        return [("train/good", GOOD, self.train), ("validation/good", GOOD, self.validation),
                ("test/good", GOOD, self.test_good), ("test/logical_anomalies", "logical", self.test_logical),
                ("test/structural_anomalies", "structural", self.test_structural)]


# --------------------------------------------------------------------------- geometry


def _rotate(points: np.ndarray, degrees: float, centre: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
    a = np.deg2rad(degrees)
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    return (np.asarray(points, float) - centre) @ rot + centre


def circle(cx: float, cy: float, r: float, n: int = 32, angle: float = 0.0) -> np.ndarray:
    t = np.deg2rad(angle) + np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def rounded_rect(cx: float, cy: float, w: float, h: float, r: float, angle: float = 0.0) -> np.ndarray:
    corners = [(w / 2 - r, h / 2 - r, 0), (-w / 2 + r, h / 2 - r, 90), (-w / 2 + r, -h / 2 + r, 180),
               (w / 2 - r, -h / 2 + r, 270)]
    t = np.deg2rad(np.linspace(0, 90, 6))
    pts = np.concatenate([np.stack([x + r * np.cos(t + np.deg2rad(a0)), y + r * np.sin(t + np.deg2rad(a0))], 1)
                          for x, y, a0 in corners])
    return _rotate(pts, angle) + (cx, cy)


def blob(cx: float, cy: float, r: float, rng: np.random.Generator, n: int = 14) -> np.ndarray:
    """An irregular closed outline (stains, chips) of mean radius ``r``."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
    radius = r * rng.uniform(0.55, 1.25, n)
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)


def bezier(p0: Sequence[float], p1: Sequence[float], p2: Sequence[float], n: int = 32) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(p1) + t ** 2 * np.asarray(p2)


def _jitter_colour(colour: Colour, rng: np.random.Generator, amount: int = 10) -> Colour:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def _shade(colour: Colour, delta: int, alpha: int | None = None) -> Colour:
    rgb = tuple(int(np.clip(c + delta, 0, 255)) for c in colour[:3])
    return rgb if alpha is None else rgb + (alpha,)


def _random_pose(rng: np.random.Generator) -> tuple[float, float, float, float]:
    return (rng.uniform(-0.025, 0.025), rng.uniform(-0.025, 0.025), rng.uniform(-3, 3), rng.uniform(0.97, 1.03))


def _random_lighting(rng: np.random.Generator) -> tuple[float, float, float, float]:
    angle, slope = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.15)
    return rng.uniform(0.88, 1.12), slope * np.cos(angle), slope * np.sin(angle), rng.uniform(1.5, 3.5)


# --------------------------------------------------------------------------- rendering


def _to_pixels(points: np.ndarray, scene: Scene, size: tuple[int, int], factor: int) -> list[tuple[float, float]]:
    height, width = size
    dx, dy, angle, scale = scene.pose
    p = _rotate(points * scale, angle) + (dx, dy)
    p = p * (min(height, width) * factor) + (width * factor / 2, height * factor / 2)
    return [tuple(xy) for xy in p.tolist()]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, scene: Scene, size: tuple[int, int], factor: int,
                fill: Colour | int) -> None:
    xy = _to_pixels(shape.points, scene, size, factor)
    if shape.width > 0:
        width = max(1, round(shape.width * scene.pose[3] * min(size) * factor))
        draw.line(xy, fill=fill, width=width, joint="curve")
    else:
        draw.polygon(xy, fill=fill)


def render(scene: Scene, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Uint8 (H, W, 3) image of the scene under its lighting, with sensor noise."""
    height, width = size
    canvas = Image.new("RGBA", (width * SUPERSAMPLE, height * SUPERSAMPLE), tuple(scene.background) + (255,))
    draw = ImageDraw.Draw(canvas)
    for element in scene.elements:
        for shape in element.shapes:
            if len(shape.fill) == 4:  # translucent: draw on its own layer and blend
                layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
                _draw_shape(ImageDraw.Draw(layer), shape, scene, size, SUPERSAMPLE, shape.fill)
                canvas.alpha_composite(layer)
                draw = ImageDraw.Draw(canvas)
            else:
                _draw_shape(draw, shape, scene, size, SUPERSAMPLE, tuple(shape.fill) + (255,))
    image = np.asarray(canvas.convert("RGB").resize((width, height), Image.BOX), dtype=np.float32)
    gain, gx, gy, sigma = scene.lighting
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    light = gain * (1 + gx * (x / width - 0.5) * 2 + gy * (y / height - 0.5) * 2)
    image = image * light[:, :, None] + rng.normal(0, sigma, image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def rasterize(shapes: Iterable[Shape], scene: Scene, size: tuple[int, int]) -> np.ndarray:
    """Bool (H, W) footprint of ``shapes`` at the image's resolution (no supersampling: masks are crisp)."""
    height, width = size
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for shape in shapes:
        _draw_shape(draw, shape, scene, size, 1, 255)
    return np.asarray(mask) > 0


def defect_mask(defect: SimulatedDefect, scene: Scene, size: tuple[int, int]) -> np.ndarray:
    mask = rasterize(defect.region, scene, size)
    return mask & rasterize(defect.clip, scene, size) if defect.clip is not None else mask


# --------------------------------------------------------------------------- shared defect simulators


def _inside(element: Element, rng: np.random.Generator, margin: float = 0.25) -> tuple[float, float]:
    """A random point in the central part of an element's bounding box."""
    pts = np.concatenate([s.points for s in element.shapes])
    lo, hi = pts.min(0), pts.max(0)
    span = hi - lo
    return tuple(rng.uniform(lo + margin * span, hi - margin * span))


def _on_outline(element: Element, rng: np.random.Generator) -> tuple[float, float]:
    pts = element.shapes[0].points
    return tuple(pts[rng.integers(len(pts))])


def simulate_scratch(scene: Scene, rng: np.random.Generator, target: str, colour_delta: int = 70) -> SimulatedDefect:
    element = scene.get(target)
    x, y = _inside(element, rng)
    heading = rng.uniform(0, 360)
    steps = np.cumsum(rng.uniform(0.025, 0.045, 4))
    turn = np.cumsum(rng.uniform(-20, 20, 4))
    pts = np.array([[x, y]] + [[x + s * np.cos(np.deg2rad(heading + t)), y + s * np.sin(np.deg2rad(heading + t))]
                               for s, t in zip(steps, turn)])
    scene.elements.append(Element(f"scratch:{target}", [Shape(pts, _shade(scene.attrs["surface"], colour_delta),
                                                              width=0.006)]))
    return SimulatedDefect([Shape(pts, (255,), width=0.012)], clip=element.shapes)


def simulate_stain(scene: Scene, rng: np.random.Generator, target: str, radius: float = 0.035) -> SimulatedDefect:
    x, y = _inside(scene.get(target), rng)
    outline = blob(x, y, radius * rng.uniform(0.8, 1.3), rng)
    colour = tuple(int(c) for c in rng.choice([(95, 65, 30), (40, 40, 40), (150, 120, 60)]))
    scene.elements.append(Element(f"stain:{target}", [Shape(outline, colour + (int(rng.integers(170, 220)),))]))
    return SimulatedDefect([Shape(outline, (255,))])


def simulate_dent(scene: Scene, rng: np.random.Generator, centre: tuple[float, float],
                  radius: float) -> SimulatedDefect:
    x, y = centre
    w, h = radius * rng.uniform(0.8, 1.3), radius * rng.uniform(0.6, 1.0)
    outline = _rotate(circle(0, 0, 1.0) * (w, h), rng.uniform(0, 180)) + (x, y)
    highlight = _rotate(circle(0, 0, 1.0) * (w * 0.6, h * 0.45), rng.uniform(0, 180)) + (x - w * 0.25, y - h * 0.3)
    surface = scene.attrs["surface"]
    scene.elements.append(Element("dent", [Shape(outline, _shade(surface, -75, 170)),
                                           Shape(highlight, _shade(surface, 60, 150))]))
    return SimulatedDefect([Shape(outline, (255,))])


def simulate_chip(scene: Scene, rng: np.random.Generator, target: str, under: Colour, radius: float) -> SimulatedDefect:
    """Break a chunk off an element's edge, showing what lies beneath; marked where material is gone."""
    element = scene.get(target)
    x, y = _on_outline(element, rng)
    chunk = blob(x, y, radius, rng, n=9)
    scene.elements.append(Element(f"chip:{target}", [Shape(chunk, under)]))
    scene.touched.add(target)
    return SimulatedDefect([Shape(chunk, (255,))], clip=[element.shapes[0]])


# --------------------------------------------------------------------------- category: tray


@dataclass(frozen=True)
class PartKind:
    name: str
    colour: Colour
    build: Callable[[float, float, Colour, Colour, float], list[Shape]]  # cx, cy, colour, hole colour, scale


def _washer(cx: float, cy: float, colour: Colour, under: Colour, scale: float) -> list[Shape]:
    return [Shape(circle(cx, cy, 0.068 * scale), colour), Shape(circle(cx, cy, 0.026 * scale), under)]


def _nut(cx: float, cy: float, colour: Colour, under: Colour, scale: float) -> list[Shape]:
    return [Shape(circle(cx, cy, 0.074 * scale, n=6), colour), Shape(circle(cx, cy, 0.03 * scale), _shade(colour, -60))]


def _pin(cx: float, cy: float, colour: Colour, under: Colour, scale: float) -> list[Shape]:
    return [Shape(rounded_rect(cx, cy, 0.055 * scale, 0.15 * scale, 0.02 * scale), colour),
            Shape(rounded_rect(cx, cy - 0.045 * scale, 0.055 * scale, 0.02 * scale, 0.005), _shade(colour, -50))]


TRAY_PART_KINDS = (PartKind("washer", (228, 140, 40), _washer), PartKind("nut", (55, 95, 205), _nut),
                   PartKind("pin", (60, 165, 80), _pin))  # one kind per column
TRAY_WRONG_COLOURS = ((150, 60, 170), (235, 225, 210), (200, 40, 60), (228, 140, 40), (55, 95, 205), (60, 165, 80))
TRAY_SLOT_X, TRAY_SLOT_Y, TRAY_SLOT_SIZE = (-0.28, 0.0, 0.28), (-0.16, 0.16), 0.19
TRAY_SIZE = (0.9, 0.66)


def _tray_part(scene: Scene, name: str, kind: PartKind, cx: float, cy: float, rng: np.random.Generator,
               colour: Colour | None = None, scale: float = 1.0, under: Colour | None = None) -> Element:
    angle = rng.uniform(-12, 12)  # per-part jitter: parts lie a little askew in their slots
    colour = colour if colour is not None else _jitter_colour(kind.colour, rng)
    shapes = kind.build(cx, cy, colour, under or scene.attrs["slot"], scale)
    return Element(name, [Shape(_rotate(s.points, angle, (cx, cy)), s.fill) for s in shapes])


def build_tray_scene(rng: np.random.Generator) -> Scene:
    """A tray with a 2x3 grid of slots, each holding the part of its column's kind and colour."""
    surface = _jitter_colour((192, 192, 186), rng, 8)
    slot = _shade(surface, -42)
    scene = Scene(_jitter_colour((58, 60, 66), rng, 6), [], _random_pose(rng), _random_lighting(rng),
                  attrs={"surface": surface, "slot": slot, "kinds": {}})
    scene.elements.append(Element("tray", [Shape(rounded_rect(0, 0, *TRAY_SIZE, 0.05), surface)]))
    for r, y in enumerate(TRAY_SLOT_Y):
        for c, x in enumerate(TRAY_SLOT_X):
            scene.elements.append(Element(f"slot:{r}{c}", [Shape(rounded_rect(x, y, TRAY_SLOT_SIZE, TRAY_SLOT_SIZE,
                                                                              0.03), slot)]))
    for r, y in enumerate(TRAY_SLOT_Y):
        for c, x in enumerate(TRAY_SLOT_X):
            cx, cy = x + rng.uniform(-0.012, 0.012), y + rng.uniform(-0.012, 0.012)
            scene.attrs["kinds"][f"part:{r}{c}"] = (c, cx, cy)
            scene.elements.append(_tray_part(scene, f"part:{r}{c}", TRAY_PART_KINDS[c], cx, cy, rng))
    return scene


def _pick(scene: Scene, rng: np.random.Generator, prefix: str) -> str | None:
    names = scene.untouched(prefix)
    return str(rng.choice(names)) if names else None


def tray_missing_part(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    name = _pick(scene, rng, "part:")
    if name is None:
        return None
    scene.touched.add(name)
    return SimulatedDefect(scene.remove(name).shapes)


def tray_extra_part(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    if scene.get("part:extra"):
        return None
    kind = TRAY_PART_KINDS[rng.integers(len(TRAY_PART_KINDS))]
    x, y = rng.uniform(-0.33, 0.33), rng.uniform(-0.01, 0.01)  # lying in the gap between the slot rows
    part = _tray_part(scene, "part:extra", kind, x, y, rng, under=scene.attrs["surface"])
    scene.elements.append(part)
    scene.touched.add(part.name)
    return SimulatedDefect(part.shapes)


def tray_swapped_parts(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    names = [n for n in scene.untouched("part:") if n in scene.attrs["kinds"]]
    pairs = [(a, b) for a in names for b in names if a < b and scene.attrs["kinds"][a][0] != scene.attrs["kinds"][b][0]]
    if not pairs:
        return None
    a, b = pairs[rng.integers(len(pairs))]
    (ka, xa, ya), (kb, xb, yb) = scene.attrs["kinds"][a], scene.attrs["kinds"][b]
    old = scene.get(a).shapes + scene.get(b).shapes
    new_a = _tray_part(scene, a, TRAY_PART_KINDS[kb], xa, ya, rng)
    new_b = _tray_part(scene, b, TRAY_PART_KINDS[ka], xb, yb, rng)
    scene.put(new_a)
    scene.put(new_b)
    scene.touched.update((a, b))
    return SimulatedDefect(old + new_a.shapes + new_b.shapes)


def tray_wrong_colour(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    name = _pick(scene, rng, "part:")
    if name is None or name not in scene.attrs["kinds"]:
        return None
    c, x, y = scene.attrs["kinds"][name]
    kind = TRAY_PART_KINDS[c]
    colours = [col for col in TRAY_WRONG_COLOURS if col != kind.colour]
    part = _tray_part(scene, name, kind, x, y, rng, colour=colours[rng.integers(len(colours))])
    scene.put(part)
    scene.touched.add(name)
    return SimulatedDefect(part.shapes)


def tray_wrong_count(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    """Two smaller parts squeezed into one slot instead of one."""
    name = _pick(scene, rng, "part:")
    if name is None or name not in scene.attrs["kinds"]:
        return None
    c, x, y = scene.attrs["kinds"][name]
    old = scene.get(name).shapes
    offset = 0.045 if TRAY_PART_KINDS[c].name != "pin" else 0.035
    parts = [_tray_part(scene, name, TRAY_PART_KINDS[c], x + d, y + d * 0.3, rng, scale=0.7) for d in (-offset, offset)]
    scene.put(Element(name, parts[0].shapes + parts[1].shapes))
    scene.touched.add(name)
    return SimulatedDefect(old + parts[0].shapes + parts[1].shapes)


def _tray_rim_point(rng: np.random.Generator) -> tuple[float, float]:
    """A point of bare tray surface: the rim above/below the slots or the gap between the rows."""
    return rng.uniform(-0.36, 0.36), float(rng.choice([-0.295, 0.0, 0.295])) + rng.uniform(-0.006, 0.006)


def tray_scratch(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    target = "tray" if rng.random() < 0.5 else _pick(scene, rng, "part:")
    return simulate_scratch(scene, rng, target) if target else None


def tray_dent(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    return simulate_dent(scene, rng, _tray_rim_point(rng), radius=0.028)


def tray_stain(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    return simulate_stain(scene, rng, "tray" if rng.random() < 0.6 else str(rng.choice(scene.untouched("slot:"))))


def tray_broken_part(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    name = _pick(scene, rng, "part:")
    return simulate_chip(scene, rng, name, scene.attrs["slot"], radius=0.04) if name else None


TRAY = SynthCategory(
    "tray", build_tray_scene,
    logical=(DefectSpec("missing_part", tray_missing_part, True, 1.0),
             DefectSpec("extra_part", tray_extra_part, False, 0.006),
             DefectSpec("swapped_parts", tray_swapped_parts, True, 1.0),
             DefectSpec("wrong_colour", tray_wrong_colour, True, 0.5),
             DefectSpec("wrong_count", tray_wrong_count, False, 0.008)),
    structural=(DefectSpec("scratch", tray_scratch, True, 1.0),
                DefectSpec("dent", tray_dent, True, 1.0),
                DefectSpec("stain", tray_stain, False, 0.002),
                DefectSpec("broken_part", tray_broken_part, True, 1.0)),
)


# --------------------------------------------------------------------------- category: cable

CABLE_COLOURS = {2: (232, 200, 40), 3: (40, 95, 215), 4: (210, 50, 40)}  # the rule: pins decide the colour
CABLE_WIDTH, CABLE_SAG = 0.03, (0.06, 0.15)
CONNECTOR_X, CONNECTOR_W = 0.33, 0.13


def _connector(name: str, cx: float, cy: float, pins: int, side: int, angle: float, body: Colour) -> Element:
    """Connector body with ``pins`` contacts along the edge facing the cable (``side`` +1 right, -1 left)."""
    h = 0.06 + 0.035 * pins
    shapes = [Shape(rounded_rect(cx, cy, CONNECTOR_W, h, 0.015), body)]
    for i in range(pins):
        py = cy - h / 2 + 0.03 + (h - 0.06) * (i + 0.5) / pins
        shapes.append(Shape(rounded_rect(cx + side * 0.03, py, 0.03, 0.022, 0.004), (95, 95, 100)))
    return Element(name, [Shape(_rotate(s.points, angle, (cx, cy)), s.fill) for s in shapes])


def _cable(p0: Sequence[float], p2: Sequence[float], sag: float, colour: Colour) -> Element:
    mid = (np.asarray(p0) + np.asarray(p2)) / 2 + (0, 2 * sag)  # control point: the curve's sag is half of it
    pts = bezier(p0, mid, p2)
    return Element("cable", [Shape(pts, _shade(colour, -70), CABLE_WIDTH * 1.3), Shape(pts, colour, CABLE_WIDTH)])


def _cable_with(scene: Scene, **change) -> Element:
    a = dict(scene.attrs["cable"], **change)
    return _cable(a["p0"], a["p2"], a["sag"], a["colour"])


def build_cable_scene(rng: np.random.Generator) -> Scene:
    """Two connectors with the same pin count, joined by a cable whose colour matches that count."""
    pins = int(rng.integers(2, 5))
    body = _jitter_colour((222, 222, 215), rng, 8)
    scene = Scene(_jitter_colour((92, 104, 112), rng, 6), [], _random_pose(rng), _random_lighting(rng),
                  attrs={"surface": body, "pins": pins, "body": body})
    ends = []
    for side, name in ((1, "connector:left"), (-1, "connector:right")):
        cx, cy = -side * CONNECTOR_X + rng.uniform(-0.02, 0.02), rng.uniform(-0.04, 0.04)
        scene.attrs[name] = (cx, cy)
        scene.elements.append(_connector(name, cx, cy, pins, side, rng.uniform(-5, 5), body))
        ends.append((cx + side * (CONNECTOR_W / 2 - 0.005), cy))
    sag = rng.uniform(*CABLE_SAG) * rng.choice([-1, 1])
    colour = _jitter_colour(CABLE_COLOURS[pins], rng)
    scene.attrs["cable"] = {"p0": ends[0], "p2": ends[1], "sag": sag, "colour": colour}
    scene.elements.insert(0, _cable_with(scene))  # under the connectors
    return scene


def _cable_untouched(scene: Scene) -> bool:
    return scene.get("cable") is not None and "cable" not in scene.touched


def _replace_cable(scene: Scene, **change) -> tuple[list[Shape], Element]:
    old = scene.get("cable").shapes
    new = _cable_with(scene, **change)
    scene.put(new)
    scene.touched.add("cable")
    return old, new


def cable_colour_mismatch(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    if not _cable_untouched(scene):
        return None
    wrong = [p for p in CABLE_COLOURS if p != scene.attrs["pins"]]
    _, new = _replace_cable(scene, colour=CABLE_COLOURS[wrong[rng.integers(len(wrong))]])
    return SimulatedDefect(new.shapes)


def cable_pin_count_mismatch(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    name = _pick(scene, rng, "connector:")
    if name is None:
        return None
    wrong = [p for p in CABLE_COLOURS if p != scene.attrs["pins"]]
    (cx, cy), side = scene.attrs[name], 1 if name.endswith("left") else -1
    old = scene.get(name)
    new = _connector(name, cx, cy, wrong[rng.integers(len(wrong))], side, rng.uniform(-5, 5), scene.attrs["body"])
    scene.put(new)
    scene.touched.add(name)
    return SimulatedDefect(old.shapes[:1] + new.shapes[:1])


def cable_missing(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    if not _cable_untouched(scene):
        return None
    scene.touched.add("cable")
    return SimulatedDefect(scene.remove("cable").shapes)


def cable_wrong_length(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    """Too long: the cable hangs in a deep loop; too short: it is pulled straight and stops halfway."""
    if not _cable_untouched(scene):
        return None
    a = scene.attrs["cable"]
    if rng.random() < 0.5:
        _, new = _replace_cable(scene, sag=float(np.sign(a["sag"])) * rng.uniform(0.3, 0.36))
    else:
        end = np.asarray(a["p0"]) + (np.asarray(a["p2"]) - a["p0"]) * rng.uniform(0.45, 0.65)
        _, new = _replace_cable(scene, p2=tuple(end), sag=rng.uniform(-0.01, 0.01))
    return SimulatedDefect(new.shapes)


def _cable_point(scene: Scene, t: float) -> tuple[np.ndarray, np.ndarray]:
    """Point and unit normal of the cable at parameter t."""
    pts = scene.get("cable").shapes[0].points
    i = int(np.clip(round(t * (len(pts) - 1)), 1, len(pts) - 2))
    tangent = pts[i + 1] - pts[i - 1]
    tangent /= np.linalg.norm(tangent)
    return pts[i], np.array([-tangent[1], tangent[0]])


def cable_cut(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    if not _cable_untouched(scene):
        return None
    point, normal = _cable_point(scene, rng.uniform(0.3, 0.7))
    tangent = np.array([normal[1], -normal[0]])
    half_gap, half_span = rng.uniform(0.012, 0.02), CABLE_WIDTH * 1.2
    band = np.array([point + s * half_gap * tangent + n * half_span * normal for s, n in
                     ((-1, -1), (1, -1), (1, 1), (-1, 1))])
    scene.elements.append(Element("cut", [Shape(band, scene.background)]))
    scene.touched.add("cable")
    return SimulatedDefect([Shape(band, (255,))], clip=scene.get("cable").shapes)


def cable_kink(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    """A sharp fold: the cable makes a spike sideways at one place."""
    if not _cable_untouched(scene):
        return None
    cable = scene.get("cable")
    pts = cable.shapes[0].points
    i = int(rng.integers(10, len(pts) - 10))
    tip = pts[i] + _cable_point(scene, i / (len(pts) - 1))[1] * rng.uniform(0.06, 0.09) * rng.choice([-1, 1])
    kinked = np.concatenate([pts[:i - 2], [tip], pts[i + 3:]])
    new = Element("cable", [Shape(kinked, s.fill, s.width) for s in cable.shapes])
    scene.put(new)
    scene.touched.add("cable")
    region = circle(*((pts[i] + tip) / 2), r=0.075)
    return SimulatedDefect([Shape(region, (255,))], clip=cable.shapes + new.shapes)


def cable_contamination(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    target = str(rng.choice([e.name for e in scene.elements if e.name.startswith(("connector:", "cable"))]))
    return simulate_stain(scene, rng, target, radius=0.03)


def cable_damaged_connector(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    name = _pick(scene, rng, "connector:")
    return simulate_chip(scene, rng, name, scene.background, radius=0.035) if name else None


CABLE = SynthCategory(
    "cable", build_cable_scene,
    logical=(DefectSpec("cable_colour_mismatch", cable_colour_mismatch, True, 1.0),
             DefectSpec("pin_count_mismatch", cable_pin_count_mismatch, True, 1.0),
             DefectSpec("missing_cable", cable_missing, True, 0.5),
             DefectSpec("wrong_cable_length", cable_wrong_length, False, 0.01)),
    structural=(DefectSpec("cut_cable", cable_cut, True, 1.0),
                DefectSpec("kinked_cable", cable_kink, True, 1.0),
                DefectSpec("contamination", cable_contamination, False, 0.0015),
                DefectSpec("damaged_connector", cable_damaged_connector, True, 1.0)),
)


# --------------------------------------------------------------------------- category: box


# Loose parts at random places in a box: only their numbers, sizes and one colour rule are fixed, so
# a check has to count. The washers' shade varies from image to image (brass to bronze), but the
# two washers of one box always share it.
BOX_COUNTS = {"washer": 2, "nut": 3, "screw": 2}
BOX_WASHER_SHADES = ((218, 172, 62), (192, 118, 52))  # the two ends of the washers' shade range
BOX_SIZE, BOX_FIELD = 0.86, 0.33  # the box's side; parts' centres lie within +-BOX_FIELD of its centre
BOX_PART_RADIUS = {"washer": 0.06, "nut": 0.055, "screw": 0.085}  # keep-out radius of each kind


def _box_shapes(kind: str, cx: float, cy: float, angle: float, colour: Colour, under: Colour,
                scale: float) -> list[Shape]:
    if kind == "washer":
        shapes = [Shape(circle(cx, cy, 0.05 * scale), colour), Shape(circle(cx, cy, 0.019 * scale), under)]
    elif kind == "nut":
        shapes = [Shape(circle(cx, cy, 0.046 * scale, n=6), colour), Shape(circle(cx, cy, 0.018 * scale),
                                                                            _shade(colour, -55))]
    else:  # a screw: shaft and a wider head at one end
        shapes = [Shape(rounded_rect(cx, cy + 0.015 * scale, 0.026 * scale, 0.13 * scale, 0.008 * scale), colour),
                  Shape(rounded_rect(cx, cy - 0.055 * scale, 0.05 * scale, 0.026 * scale, 0.008 * scale),
                        _shade(colour, -35))]
    return [Shape(_rotate(s.points, angle, (cx, cy)), s.fill) for s in shapes]


def _washer_shade(t: float, rng: np.random.Generator) -> Colour:
    a, b = np.asarray(BOX_WASHER_SHADES[0], float), np.asarray(BOX_WASHER_SHADES[1], float)
    return _jitter_colour(tuple(int(c) for c in np.rint(a + t * (b - a))), rng, 4)


def _box_colour(scene: Scene, kind: str, rng: np.random.Generator) -> Colour:
    if kind == "washer":
        return _washer_shade(scene.attrs["washer_t"], rng)
    return _jitter_colour({"nut": (70, 98, 175), "screw": (64, 150, 92)}[kind], rng, 8)


def _free_spot(scene: Scene, kind: str, rng: np.random.Generator) -> tuple[float, float] | None:
    """A random centre for a part of ``kind`` in the box, clear of every part placed so far."""
    ox, oy = scene.attrs["box_centre"]
    for _ in range(200):
        x, y = ox + rng.uniform(-BOX_FIELD, BOX_FIELD), oy + rng.uniform(-BOX_FIELD, BOX_FIELD)
        if all(np.hypot(x - px, y - py) > BOX_PART_RADIUS[kind] + BOX_PART_RADIUS[pk] + 0.012
               for pk, px, py in scene.attrs["parts"].values()):
            return x, y
    return None


def _box_part(scene: Scene, name: str, kind: str, rng: np.random.Generator, colour: Colour | None = None,
              scale: float = 1.0, at: tuple[float, float] | None = None) -> Element | None:
    """Place a new part (at a free spot unless ``at``) and record it; None when the box is full."""
    spot = at or _free_spot(scene, kind, rng)
    if spot is None:
        return None
    scene.attrs["parts"][name] = (kind, *spot)
    colour = colour if colour is not None else _box_colour(scene, kind, rng)
    return Element(name, _box_shapes(kind, *spot, rng.uniform(0, 360), colour, scene.attrs["surface"], scale))


def build_box_scene(rng: np.random.Generator) -> Scene:
    """A box, moved a little, holding 2 washers of one shade, 3 nuts and 2 screws at random places."""
    surface = _jitter_colour((206, 200, 188), rng, 6)
    centre = (rng.uniform(-0.02, 0.02), rng.uniform(-0.02, 0.02))
    scene = Scene(_jitter_colour((60, 62, 68), rng, 6), [], _random_pose(rng), _random_lighting(rng),
                  attrs={"surface": surface, "box_centre": centre, "parts": {}, "washer_t": rng.uniform(0, 1)})
    scene.elements.append(Element("box", [Shape(rounded_rect(*centre, BOX_SIZE, BOX_SIZE, 0.04), surface)]))
    for kind, count in BOX_COUNTS.items():
        for i in range(count):
            part = _box_part(scene, f"part:{kind}{i}", kind, rng)
            if part is None:  # practically never: the parts cover a fifth of the box
                raise RuntimeError("box: no free spot for a part")
            scene.elements.append(part)
    return scene


def _box_pick(scene: Scene, rng: np.random.Generator, kind: str = "") -> str | None:
    return _pick(scene, rng, f"part:{kind}")


def box_missing_part(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    name = _box_pick(scene, rng)
    if name is None:
        return None
    scene.touched.add(name)
    return SimulatedDefect(scene.remove(name).shapes)


def box_extra_part(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    kind = str(rng.choice(list(BOX_COUNTS)))
    part = _box_part(scene, f"part:{kind}extra", kind, rng)
    if part is None:
        return None
    scene.elements.append(part)
    scene.touched.add(part.name)
    return SimulatedDefect(part.shapes)


def box_wrong_size(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    """One part much smaller or larger than its kind's."""
    name = _box_pick(scene, rng)
    if name is None:
        return None
    kind, x, y = scene.attrs["parts"][name]
    old = scene.get(name)
    new = Element(name, _box_shapes(kind, x, y, rng.uniform(0, 360), old.shapes[0].fill, scene.attrs["surface"],
                                    float(rng.choice([rng.uniform(0.55, 0.68), rng.uniform(1.35, 1.5)]))))
    scene.put(new)
    scene.touched.add(name)
    return SimulatedDefect(old.shapes[:1] + new.shapes[:1])


def box_washer_mismatch(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    """The relation broken: one washer of a clearly other shade than its partner."""
    name = _box_pick(scene, rng, "washer")
    if name is None:
        return None
    t = scene.attrs["washer_t"]
    other = rng.uniform(t + 0.5, 1.0) if t < 0.5 else rng.uniform(0.0, t - 0.5)  # half the range away at least
    kind, x, y = scene.attrs["parts"][name]
    new = Element(name, _box_shapes(kind, x, y, rng.uniform(0, 360), _washer_shade(other, rng),
                                    scene.attrs["surface"], 1.0))
    scene.put(new)
    scene.touched.add(name)
    return SimulatedDefect(new.shapes[:1])


def _box_floor_point(scene: Scene, rng: np.random.Generator) -> tuple[float, float] | None:
    """A point of bare box floor, clear of the parts."""
    for _ in range(100):
        ox, oy = scene.attrs["box_centre"]
        x, y = ox + rng.uniform(-0.37, 0.37), oy + rng.uniform(-0.37, 0.37)
        if all(np.hypot(x - px, y - py) > BOX_PART_RADIUS[k] + 0.035 for k, px, py in scene.attrs["parts"].values()):
            return x, y
    return None


def box_scratch(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    target = "box" if rng.random() < 0.5 else _box_pick(scene, rng)
    return simulate_scratch(scene, rng, target) if target else None


def box_dent(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    spot = _box_floor_point(scene, rng)
    return simulate_dent(scene, rng, spot, radius=0.028) if spot else None


def box_dirt(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    spot = _box_floor_point(scene, rng)
    if spot is None:
        return None
    outline = blob(*spot, 0.028 * rng.uniform(0.8, 1.3), rng)
    colour = tuple(int(c) for c in rng.choice([(95, 65, 30), (40, 40, 40), (150, 120, 60)]))
    scene.elements.append(Element("dirt", [Shape(outline, colour + (int(rng.integers(170, 220)),))]))
    return SimulatedDefect([Shape(outline, (255,))])


def box_broken_part(scene: Scene, rng: np.random.Generator) -> SimulatedDefect | None:
    name = _box_pick(scene, rng)
    return simulate_chip(scene, rng, name, scene.attrs["surface"], radius=0.03) if name else None


BOX = SynthCategory(
    "box", build_box_scene,
    logical=(DefectSpec("missing_part", box_missing_part, True, 1.0),
             DefectSpec("extra_part", box_extra_part, True, 1.0),
             DefectSpec("wrong_size", box_wrong_size, True, 1.0),
             DefectSpec("washer_mismatch", box_washer_mismatch, True, 1.0)),
    structural=(DefectSpec("scratch", box_scratch, True, 1.0),
                DefectSpec("dent", box_dent, True, 1.0),
                DefectSpec("dirt", box_dirt, False, 0.0015),
                DefectSpec("broken_part", box_broken_part, True, 1.0)),
)

SYNTH_CATEGORIES: dict[str, SynthCategory] = {c.name: c for c in (TRAY, CABLE, BOX)}


# --------------------------------------------------------------------------- sampling and writing


def simulate_sample(category: SynthCategory, kind: str, index: int, size: tuple[int, int],
                    rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """One image of ``kind`` ("good", "logical", "structural") and its (defect name, bool mask) list.

    The first defect type cycles with ``index`` so every type appears; some images get a second one.
    """
    specs = {GOOD: (), "logical": category.logical, "structural": category.structural}[kind]
    for _ in range(MAX_ATTEMPTS):
        scene = category.build_scene(rng)
        chosen = [specs[index % len(specs)]] if specs else []
        if specs and len(specs) > 1 and rng.random() < SECOND_DEFECT_PROBABILITY:
            others = [s for s in specs if s is not chosen[0]]
            chosen.append(others[rng.integers(len(others))])
        defects = [(spec.name, spec.simulate(scene, rng)) for spec in chosen]
        defects = [(name, d) for i, (name, d) in enumerate(defects) if d is not None or i == 0]
        if defects and defects[0][1] is None:
            continue
        masks = [(name, defect_mask(d, scene, size)) for name, d in defects]
        if all(m.any() for _, m in masks):
            return render(scene, size, rng), masks
    raise RuntimeError(f"{category.name}: could not simulate a visible {kind} defect at size {size}")


def _sample_rng(seed: int, category: str, folder: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(category.encode()), zlib.crc32(folder.encode()), index])


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=1)


def _write_category(category: SynthCategory, folder: Path, size: tuple[int, int], counts: SplitCounts,
                    seed: int, progress) -> None:
    values = {d.defect_name: d.pixel_value for d in category.defects_config(size)}
    for split, kind, count in counts.plan():
        width = max(3, len(str(count - 1)))
        for i in range(count):
            rng = _sample_rng(seed, category.name, split, i)
            image, masks = simulate_sample(category, kind, i, size, rng)
            stem = f"{i:0{width}d}"
            _save_png(image, folder / split / f"{stem}.png")
            for j, (name, mask) in enumerate(masks):
                _save_png(mask.astype(np.uint8) * np.uint8(values[name]),
                          folder / "ground_truth" / TEST_TYPES[kind] / stem / f"{j:03d}.png")
            progress.update(1)
    config = [asdict(d) for d in category.defects_config(size)]
    (folder / DEFECTS_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def _check_arguments(names: list[str], image_size: tuple[int, int], counts: SplitCounts, seed: int) -> None:
    unknown = [n for n in names if n not in SYNTH_CATEGORIES]
    if unknown or not names:
        raise ValueError(f"unknown synthetic categories {unknown or names}; choose from {sorted(SYNTH_CATEGORIES)}")
    if len(image_size) != 2 or min(image_size) < MIN_IMAGE_SIDE:
        raise ValueError(f"image size (H, W)={image_size}: both sides must be at least {MIN_IMAGE_SIDE} pixels")
    bad = [split for split, _, n in counts.plan() if n < 1]
    if bad:
        raise ValueError(f"split counts must be at least 1 (the LOCO layout has every split); got 0 for {bad}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")


def write_synthetic_dataset(out: str | Path, categories: Iterable[str] | None = None,
                            image_size: tuple[int, int] = (256, 256), counts: SplitCounts = SplitCounts(),
                            seed: int = 0, overwrite: bool = False) -> list[Path]:
    """Write ``<out>/<category>/...`` in the MVTec LOCO AD layout; returns the category folders.

    ``image_size`` is (H, W). An existing non-empty category folder is an error unless ``overwrite``
    (then it is replaced); all folders are checked before anything is written or deleted.
    """
    from tqdm import tqdm

    out = Path(out)
    names = list(SYNTH_CATEGORIES) if categories is None else list(categories)
    _check_arguments(names, image_size, counts, seed)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder; expected a data set root folder")
    folders = [out / name for name in names]
    busy = [f for f in folders if f.exists() and (not f.is_dir() or any(f.iterdir()))]
    if busy and not overwrite:
        raise FileExistsError(f"{', '.join(map(str, busy))}: already exists and is not empty; "
                              f"pass --overwrite (overwrite=True) to replace it")
    total = len(names) * sum(n for _, _, n in counts.plan())
    with tqdm(total=total, desc="synth", unit="img") as progress:
        for name, folder in zip(names, folders):
            if folder.is_dir():
                shutil.rmtree(folder)
            elif folder.exists():
                folder.unlink()
            progress.set_postfix_str(name)
            _write_category(SYNTH_CATEGORIES[name], folder, tuple(image_size), counts, seed, progress)
    return folders
