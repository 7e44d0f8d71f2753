"""The authors' weights end to end: import -> score -> calibrate -> export -> gateway, with rule-B weights
in their file format (regenerated from the shared manifest) and the reference image."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from authors_fixtures import reference_dir, write_rule_b_weights
from slsg.contract import MODEL_CARD_KEY, ModelCard
from support import run_slsg as slsg

REFERENCE_SCORE = 0.6940891  # their code's top-100 mean for input.png with rule-B weights


def _scores(*args) -> list[dict]:
    return json.loads(slsg("score", *map(str, args), "--json").stdout)


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, Path]:
    ref = reference_dir()
    root = tmp_path_factory.mktemp("authors")
    weights = write_rule_b_weights(ref, root / "breakfast_box.tch")
    data = root / "data"
    slsg("synth", data, "--categories", "tray", "--image-size", "96x64", "--train", "2", "--validation", "3",
         "--test-good", "1", "--test-logical", "1", "--test-structural", "1")
    proc = slsg("import-authors", weights, "--category", "tray", "--out", root / "run")
    assert "313 tensors: 293 loaded" in proc.stdout and "uncalibrated" in proc.stdout
    # a frame of another size and shape, which the model must see resized their way (LANCZOS)
    coffee = np.asarray(Image.open(ref / "input.png").convert("RGB").resize((300, 180), Image.BICUBIC))
    Image.fromarray(coffee).save(root / "coffee.png")
    return {"ref": ref, "root": root, "data": data, "checkpoint": root / "run" / "checkpoint.pt",
            "input": ref / "input.png", "coffee": root / "coffee.png"}


def test_import_then_score_prints_the_authors_score(imported):
    proc = slsg("score", "--checkpoint", imported["checkpoint"], imported["input"])
    raw = float(proc.stdout.split("raw ")[1].split()[0])
    assert raw == pytest.approx(REFERENCE_SCORE, abs=1e-4) and "uncalibrated" in proc.stdout


def test_an_uncalibrated_import_is_refused_by_export_until_calibrated(imported, tmp_path):
    proc = slsg("export", "--checkpoint", imported["checkpoint"], "--repository", tmp_path / "repo", "--name", "bb",
                check=False)
    assert proc.returncode == 2 and "no calibration" in proc.stderr and "slsg calibrate" in proc.stderr
    assert not (tmp_path / "repo").exists()


def test_import_refuses_a_wrong_file_by_key_and_an_existing_run(imported, tmp_path):
    import torch

    from authors_fixtures import rule_b_state

    state = rule_b_state(imported["ref"])
    state["LKA128.AT.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    torch.save(state, tmp_path / "bad.tch")
    proc = slsg("import-authors", tmp_path / "bad.tch", "--category", "x", "--out", tmp_path / "run", check=False)
    assert proc.returncode == 2 and "'LKA128.AT.conv1.weight' has shape (128, 64, 1, 1)" in proc.stderr
    proc = slsg("import-authors", tmp_path / "bad.tch", "--category", "x", "--out", imported["root"] / "run",
                check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr


def test_calibrated_import_exports_and_the_gateway_answers_like_their_code(imported, tmp_path):
    from slsg_gateway.server import BackgroundGateway
    from slsg_gateway.settings import Settings
    from slsg_train.export.onnx_export import DEFAULT_TOLERANCE, score_gain
    from slsg_train.inference import load_model

    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(imported["checkpoint"].read_bytes())
    slsg("calibrate", "--checkpoint", checkpoint, "--data", imported["data"])
    rows = _scores("--checkpoint", checkpoint, imported["input"], imported["coffee"])
    assert rows[0]["raw_score"] == pytest.approx(REFERENCE_SCORE, abs=1e-4)
    calibration = load_model(checkpoint).calibration
    expected = calibration.calibrated_score(math.log(REFERENCE_SCORE / (1 - REFERENCE_SCORE)))
    tolerance = DEFAULT_TOLERANCE * score_gain(calibration)
    assert rows[0]["score"] == pytest.approx(expected, abs=tolerance)

    repo = tmp_path / "repo"
    slsg("export", "--checkpoint", checkpoint, "--repository", repo, "--name", "authors")
    session = ort.InferenceSession(str(repo / "authors" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    card = ModelCard.from_json(session.get_modelmeta().custom_metadata_map[MODEL_CARD_KEY])
    assert card.resize == "lanczos" and (card.input_height, card.input_width, card.top_k) == (256, 256, 100)

    settings = Settings(repository=repo, port=0, batch_window_ms=5, max_batch_size=4)
    with BackgroundGateway(settings) as gateway, httpx.Client(base_url=gateway.url, timeout=120) as client:
        served = [client.post("/v1/models/authors/inspect", content=path.read_bytes(),
                              headers={"Content-Type": "image/png"}).json()["score"]
                  for path in (imported["input"], imported["coffee"])]
    assert served[0] == pytest.approx(expected, abs=tolerance)
    assert served[1] == pytest.approx(rows[1]["score"], abs=tolerance)  # resized their way, as `slsg score`
    # the gateway resized the frame with the card's filter: the model's answer for the LANCZOS frame, not
    # for the bilinear one
    coffee = Image.open(imported["coffee"])
    answers = [session.run(["score"], {"image": np.asarray(coffee.resize((256, 256), f))[None]})[0][0, 0]
               for f in (Image.LANCZOS, Image.BILINEAR)]
    assert served[1] == pytest.approx(answers[0], abs=1e-5) and abs(answers[1] - answers[0]) > 1e-3
