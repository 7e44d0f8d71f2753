"""The synthetic LOCO-style data set: written, then read back by the real reader and the real CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slsg_train.data.loco import LocoCategory
from slsg_train.data.synth import SYNTH_CATEGORIES, SplitCounts, write_synthetic_dataset

SIZE = (48, 64)  # (H, W), non-square
COUNTS = SplitCounts(train=6, validation=2, test_good=2, test_logical=12, test_structural=12)
SLSG = Path(sys.executable).parent / "slsg"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(root, image_size=SIZE, counts=COUNTS, seed=0)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", sorted(SYNTH_CATEGORIES))
def test_round_trip_through_the_reader(dataset, name):
    data = LocoCategory(dataset, name)
    assert data.layout == "loco" and "tray" in SYNTH_CATEGORIES
    assert (len(data.train_paths), len(data.validation_paths)) == (COUNTS.train, COUNTS.validation)
    samples = data.test_samples()
    by_type = {t: [s for s in samples if s.anomaly_type == t] for t in data.test_types}
    assert {t: len(v) for t, v in by_type.items()} == {
        "good": COUNTS.test_good, "logical_anomalies": COUNTS.test_logical,
        "structural_anomalies": COUNTS.test_structural}
    values = {d.pixel_value for d in data.defects}
    spec = SYNTH_CATEGORIES[name]
    seen = set()
    for s in samples:
        assert s.size == SIZE and s.load_image().shape == SIZE + (3,)
        assert len(s.masks) >= s.is_anomalous
        for m in s.masks:
            raw = np.asarray(Image.open(m.path))
            assert raw.ndim == 2 and raw.shape == SIZE and set(np.unique(raw)) - {0} <= values
            assert m.load().any(), m.path
            seen.add((s.anomaly_type, m.defect.defect_name))
    # every defect type of the category appears, under its own test type
    assert seen == {("logical_anomalies", d.name) for d in spec.logical} | {
        ("structural_anomalies", d.name) for d in spec.structural}
    config = json.loads((dataset / name / "defects_config.json").read_text())
    assert {e["relative_saturation"] for e in config} == {True, False}


def test_some_images_carry_two_defects(dataset):
    counts = [len(s.masks) for name in SYNTH_CATEGORIES for s in LocoCategory(dataset, name).test_samples()]
    assert max(counts) == 2 and counts.count(2) < counts.count(1)


def test_masks_mark_what_changed(dataset):
    """A logical defect's mask is where the image departs from the normal images (e.g. a missing part)."""
    data = LocoCategory(dataset, "tray")
    normal = np.mean([np.asarray(Image.open(p), float) for p in data.train_paths], axis=0)
    inside, outside = [], []
    for s in data.test_samples(["logical_anomalies"]):
        diff = np.abs(s.load_image().astype(float) - normal).mean(axis=2)
        mask = np.any([m.load() for m in s.masks], axis=0)
        inside.append(diff[mask].mean())
        outside.append(diff[~mask].mean())
    assert np.mean(inside) > 1.5 * np.mean(outside)


def test_normal_images_vary(dataset):
    images = [np.asarray(Image.open(p), np.int16) for p in LocoCategory(dataset, "tray").train_paths]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i] - images[j]).mean() > 2.0


def test_deterministic_for_a_seed(tmp_path):
    small = SplitCounts(2, 1, 1, 2, 2)
    for folder, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_synthetic_dataset(tmp_path / folder, ["tray"], SIZE, small, seed=seed)
    a, b, c = (_files(tmp_path / f) for f in "abc")
    assert a == b
    images = [k for k in a if k.endswith(".png") and "ground_truth" not in k]
    assert len(images) == 8 and all(a[k] != c[k] for k in images)


def test_existing_category_is_kept_without_overwrite(tmp_path):
    small = SplitCounts(1, 1, 1, 1, 1)
    write_synthetic_dataset(tmp_path, ["tray"], SIZE, small, seed=0)
    keep = tmp_path / "tray" / "notes.txt"
    keep.write_text("mine")
    with pytest.raises(FileExistsError, match="already exists and is not empty") as info:
        write_synthetic_dataset(tmp_path, ["cable", "tray"], SIZE, small, seed=1)
    assert str(tmp_path / "tray") in str(info.value)
    assert keep.read_text() == "mine" and not (tmp_path / "cable").exists()  # checked before writing anything
    write_synthetic_dataset(tmp_path, ["tray"], SIZE, small, seed=1, overwrite=True)
    assert not keep.exists() and len(LocoCategory(tmp_path, "tray").train_paths) == 1


@pytest.mark.parametrize("kwargs, problem", [
    ({"categories": ["tray", "lawnmower"]}, "unknown synthetic categories ['lawnmower']"),
    ({"image_size": (16, 64)}, "at least 32 pixels"),
    ({"counts": SplitCounts(train=0)}, "got 0 for ['train/good']"),
    ({"seed": -1}, "non-negative"),
])
def test_bad_arguments_are_refused(tmp_path, kwargs, problem):
    with pytest.raises(ValueError) as info:
        write_synthetic_dataset(tmp_path, **kwargs)
    assert problem in str(info.value) and not any(tmp_path.iterdir())


def test_console_script(tmp_path):
    args = [str(SLSG), "synth", str(tmp_path / "data"), "--categories", "tray", "--image-size", "80x40",
            "--train", "3", "--validation", "1", "--test-good", "1", "--test-logical", "2", "--test-structural", "2"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    data = LocoCategory(tmp_path / "data", "tray")
    assert len(data.train_paths) == 3 and all(s.size == (40, 80) for s in data.test_samples())
    again = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert subprocess.run(args + ["--overwrite"], capture_output=True, timeout=120).returncode == 0


def test_console_script_defaults_to_loco_sized_splits(tmp_path):
    """Without count flags, every split has SplitCounts' default size (LOCO's, rounded), and the
    validation split is large enough to calibrate a 1% false-positive rate on more than a handful."""
    done = subprocess.run([str(SLSG), "synth", str(tmp_path), "--categories", "cable", "--image-size", "32"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    default, root = SplitCounts(), tmp_path / "cable"
    for folder, _, count in default.plan():
        assert len(list((root / folder).glob("*.png"))) == count, folder
    assert default.train >= 300 and default.validation >= 50


def test_data_modules_do_not_import_torch():
    code = "import sys, slsg_train.data.synth, slsg_train.data.loco; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
