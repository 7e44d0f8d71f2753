"""From reviews back to models, end to end with real components: a tiny trained SLSG checkpoint
exported to a repository, a gateway recording every inspection, operators' reviews through the API,
`slsg dataset from-reviews`, `slsg calibrate` on that data set, and `slsg promote`.

The story: version 1 was calibrated far too low (target rate 0.99) and flags nearly every normal
frame. Operators mark those false alarms; random-noise frames (far from every normal patch the
patch memory holds) are the real defects. Version 2 is recalibrated on the confirmed false alarms:
the gate passes it and --load deploys it (serving.json), which the gateway follows. Version 3 is recalibrated after an
operator wrongly marked the defects as false alarms: it misses them, the gate refuses it and the
gateway keeps serving version 2.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from slsg.contract import read_serving_state
from support import run_slsg as slsg
from slsg_gateway.server import BackgroundGateway
from slsg_gateway.settings import Settings

pytestmark = pytest.mark.slow
NORMALS, DEFECTS = 32, 6


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def export(checkpoint: Path, repository: Path, tmp: Path, name: str, *calibrate_args: str) -> None:
    """Export a copy of ``checkpoint`` recalibrated with ``calibrate_args`` as the next version."""
    copy = tmp / f"{name}.pt"
    shutil.copy(checkpoint, copy)
    slsg("calibrate", "--checkpoint", copy, *calibrate_args)
    slsg("export", "--checkpoint", copy, "--repository", repository, "--name", "tray", "--cpu-config")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loop")
    data, run = root / "data", root / "run"
    slsg("synth", data, "--categories", "tray", "--image-size", "96x64", "--train", "8", "--validation", "4",
         "--test-good", str(NORMALS), "--test-logical", "1", "--test-structural", "1")
    slsg("train", "--data", data, "--category", "tray", "--out", run, "--image-size", "64", "--steps", "3",
         "--pretrain-steps", "0", "--batch-size", "2", "--workers", "0", "--composition-steps", "10")
    repository = root / "repo"
    export(run / "checkpoint.pt", repository, root, "v1", "--fpr", "0.99")  # version 1: far too many flags
    return {"root": root, "data": data, "checkpoint": run / "checkpoint.pt", "repository": repository}


def inspect_all(url: str, frames: list[bytes]) -> list[dict]:
    answers = []
    for data in frames:
        r = httpx.post(f"{url}/v1/models/tray/inspect", content=data,
                       headers={"Content-Type": "image/png", "X-Line-Id": "line-1"}, timeout=60)
        assert r.status_code == 200, r.text
        answers.append(r.json())
    return answers


def review(url: str, record_ids: list[str], verdict: str) -> None:
    for record_id in record_ids:
        deadline = time.monotonic() + 30
        while (r := httpx.post(f"{url}/v1/inspections/{record_id}/review", timeout=30,
                               json={"verdict": verdict, "reviewer": "anna"})).status_code == 404:
            assert time.monotonic() < deadline, f"record {record_id} was never written"
            time.sleep(0.1)  # the record writer works in the background
        assert r.status_code == 200, r.text


def promote(trained, data: Path, candidate: int, url: str) -> tuple[int, dict]:
    proc = slsg("promote", "--candidate", f"tray:{candidate}", "--against", "tray:1", "--data", data,
                "--repository", trained["repository"], "--load", "--gateway", url, "--json", check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout[:proc.stdout.rindex("}") + 1])


def test_reviews_make_a_data_set_a_recalibration_and_a_gated_promotion(trained, tmp_path):
    normals = [p.read_bytes() for p in sorted((trained["data"] / "tray" / "test" / "good").glob("*.png"))]
    noise = [png(np.random.default_rng(i).integers(0, 256, (64, 96, 3), dtype=np.uint8)) for i in range(DEFECTS)]
    settings = Settings(repository=trained["repository"], port=0,
                        records=str(tmp_path / "records"), records_normal_sample=1.0, batch_window_ms=2)
    with BackgroundGateway(settings) as gw:
        answers = inspect_all(gw.url, normals + noise)
        assert sum(a["is_anomalous"] for a in answers[:NORMALS]) >= NORMALS // 4  # version 1 flags many
        normal_ids, defect_ids = [a["id"] for a in answers[:NORMALS]], [a["id"] for a in answers[NORMALS:]]
        review(gw.url, normal_ids, "false_alarm")
        review(gw.url, defect_ids, "defect")

        good_data = tmp_path / "reviewed"
        originals = trained["data"] / "tray" / "train" / "good"
        proc = slsg("dataset", "from-reviews", "--records", tmp_path / "records", "--model", "tray",
                    "--out", good_data, "--repository", trained["repository"], "--train-good", originals,
                    "--holdout", "0.5")  # half the false alarms for the gate: a margin over chance
        category = good_data / "tray"  # the category on the model's card
        counts = {f: len(list((category / f).glob("*.png")))
                  for f in ("train/good", "validation/good", "test/good", "test/reviewed_defect")}
        assert counts["validation/good"] + counts["test/good"] == NORMALS and counts["test/good"] >= 1
        assert counts["test/reviewed_defect"] == DEFECTS
        # the model's own training images, same names (calibrate refits the patch memory on them)
        assert sorted(p.name for p in (category / "train" / "good").iterdir()) == sorted(
            p.name for p in originals.iterdir())
        assert f"validation/good {counts['validation/good']}" in proc.stdout
        manifest = json.loads((category / "reviews_manifest.json").read_text())
        assert {e["record_id"] for e in manifest["images"]} == set(normal_ids + defect_ids)
        by_path = {p: e for e in manifest["images"] for p in e["paths"]}
        assert by_path["test/reviewed_defect/000.png"]["verdict"] == "defect"
        assert by_path["test/reviewed_defect/000.png"]["reviewer"] == "anna"
        mask = np.asarray(Image.open(category / by_path["test/reviewed_defect/000.png"]["mask"]))
        assert mask.shape == (64, 96) and mask.max() == 255  # the frame's own size, boxes or whole frame

        calibrated = slsg("calibrate", "--checkpoint", shutil.copy(trained["checkpoint"], tmp_path / "probe.pt"),
                          "--data", good_data)
        used = re.search(r"on (\d+) normal images \(scores [^;)]*(?:; the checks' scales on (\d+) others)?\)",
                         calibrated.stdout)
        assert int(used[1]) + int(used[2] or 0) >= counts["validation/good"], calibrated.stdout  # every review
        export(trained["checkpoint"], trained["repository"], tmp_path, "v2", "--data", str(good_data))
        code, result = promote(trained, good_data, 2, gw.url)
        assert code == 0 and result["passed"], result
        assert result["candidate"]["false_alarms"] <= result["incumbent"]["false_alarms"]
        assert result["candidate"]["misses"] == 0
        served = httpx.get(f"{gw.url}/v1/models").json()["models"][0]
        assert served["served_version"] == 2 and read_serving_state(trained["repository"], "tray").version == 2
        assert served["card"]["image_colour"] == "colour"  # training saw colour frames: the card says so

        review(gw.url, defect_ids, "false_alarm")  # an operator's mistake: the defects called false alarms
        bad_data = tmp_path / "mistaken"
        proc = slsg("dataset", "from-reviews", "--records", tmp_path / "records", "--model", "tray",
                    "--out", bad_data, "--repository", trained["repository"])  # no --train-good: the reviews'
        assert "note: train/good holds the reviewed false alarms" in proc.stderr
        bad_train = sorted(p.read_bytes() for p in (bad_data / "tray" / "train" / "good").iterdir())
        assert bad_train == sorted(p.read_bytes() for p in (bad_data / "tray" / "validation" / "good").iterdir())
        export(trained["checkpoint"], trained["repository"], tmp_path, "v3", "--data", str(bad_data))
        code, result = promote(trained, good_data, 3, gw.url)  # gated on the correct reviews
        assert code == 1 and not result["passed"]
        assert result["candidate"]["misses"] > result["incumbent"]["misses"]
        assert any(reason.startswith("misses") for reason in result["reasons"])
        assert read_serving_state(trained["repository"], "tray").version == 2  # nothing deployed
        assert httpx.get(f"{gw.url}/v1/models").json()["models"][0]["served_version"] == 2


def test_from_reviews_and_promote_refuse_what_they_cannot_do(trained, tmp_path):
    missing = slsg("dataset", "from-reviews", "--records", tmp_path / "nowhere", "--model", "tray",
                   "--out", tmp_path / "out", check=False)
    assert missing.returncode == 2 and "no record store at" in missing.stderr
    settings = Settings(repository=trained["repository"], port=0, records=str(tmp_path / "records"))
    with BackgroundGateway(settings):
        pass  # an empty store
    empty = slsg("dataset", "from-reviews", "--records", tmp_path / "records", "--model", "tray",
                 "--out", tmp_path / "out", check=False)
    assert empty.returncode == 2 and "no reviewed inspections of model 'tray'" in empty.stderr
    bad = slsg("promote", "--candidate", "tray", "--against", "tray:1", "--data", tmp_path, check=False)
    assert bad.returncode == 2 and "'tray' is not NAME:VERSION" in bad.stderr
    absent = slsg("promote", "--candidate", "tray:9", "--against", "tray:1", "--data", trained["data"],
                  "--repository", trained["repository"], check=False)
    assert absent.returncode == 2 and "no such model version" in absent.stderr and "versions [1" in absent.stderr
