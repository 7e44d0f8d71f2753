"""``python -m slsg_bench.gpu`` on the CPU: the GPU script's three stages at tiny sizes, for real.

A lent GPU session runs this script once (docs/gpu.md); here it must fall back to ONNX Runtime's
CPU provider, say so, and still run every stage for real: the toy contract model alone (fp32 and the
fp16 copy it makes), the real ``tritonserver`` of nvidia-pytriton with concurrent gRPC clients, and
a real ``slsg serve`` process in front of it fed JPEG frames. The checks are on the report's
structure and on counts that must agree (Triton counts every image the clients got back), never on
timings.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from onnx_fixtures import make_card, write_contract_model
from slsg.contract import model_path
from slsg.triton_config import write_config
from slsg_bench.gpu import FALLBACK_MESSAGE, REPORT_JSON, REPORT_MD

TOY_SIZE = 64


@pytest.fixture(scope="module")
def toy_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gpu_bench_toy")
    card = make_card("toy", size=TOY_SIZE)
    write_contract_model(model_path(root, "toy", 1), card)
    write_config(root, "toy", card, gpu=False, max_batch_size=8)
    time.sleep(0.4)  # LocalTriton publishes a version once its files are 0.3 s old
    return root


def has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def run_script(*argv: str, timeout: float = 150) -> subprocess.CompletedProcess:
    """The script as a lent machine runs it: its own process, ``python -m slsg_bench.gpu``."""
    return subprocess.run([sys.executable, "-m", "slsg_bench.gpu", *argv], capture_output=True, text=True,
                          timeout=timeout)


def check_model_stage(stage: dict) -> None:
    results = {r["variant"]: r for r in stage["results"]}
    assert set(results) == {"cpu fp32", "cpu fp16"}, stage
    for result in results.values():
        assert "error" not in result, result
        assert set(result["by_batch"]) == {"1", "2"}
        assert all(r["images_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in result["by_batch"].values())
    # the fp16 copy keeps the score tail in fp32: its score stays within fp16 rounding of the map
    assert results["cpu fp16"]["vs_fp32"]["score_max_abs"] < 1e-2
    assert any("no CUDA provider" in m for m in stage["messages"])


def check_triton_stage(stage: dict) -> None:
    [level] = stage["levels"]
    triton = level["triton"]
    assert level["clients"] == 2 and level["failures"] == 0 and level["ok"] > 0
    assert triton["requests"] == triton["images"] == level["ok"]  # single frames: one image per request
    assert 1 <= triton["mean_batch"] <= stage["max_batch_size"]
    assert triton["queue_ms"] >= 0 and triton["compute_infer_ms"] > 0 and triton["request_ms"] > 0
    assert stage["backend_devices"] and all("CPUExecutionProvider" in d for d in stage["backend_devices"])


def check_service_stage(stage: dict) -> None:
    [run] = stage["runs"]
    assert run["gateways"] == 1 and [lv["concurrency"] for lv in run["levels"]][0] == 1
    for level in run["levels"]:
        assert level["failures"] == 0 and level["ok"] > 0, level
        assert level["triton"]["images"] == level["ok"]  # every frame the gateway answered went through Triton
        assert 1 <= level["gateway_mean_batch"] <= stage["gateway_max_batch"]
        server = level["server_median_ms"]
        assert server["total"] >= server["infer"] > 0 and server["decode"] > 0
    assert stage["gateways_needed"] == 1 and stage["frame_size"] == [320, 256]


@pytest.mark.slow
def test_gpu_script_falls_back_to_the_cpu_and_runs_every_stage(toy_repository: Path, tmp_path: Path) -> None:
    from slsg_triton.local import TritonNotFoundError, find_tritonserver

    try:
        find_tritonserver()
    except TritonNotFoundError as exc:
        pytest.skip(str(exc))
    if has_cuda():
        pytest.skip("this onnxruntime has the CUDA provider: the script measures the GPU, not the fallback")
    out = tmp_path / "report"
    done = run_script("--repository", str(toy_repository), "--name", "toy", "--out", str(out), "--budget-s", "120",
                      "--frame-size", "320x256", "--threads", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert FALLBACK_MESSAGE in done.stdout
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["fallback"] is True and report["fallback_message"] == FALLBACK_MESSAGE
    assert report["model"]["input_size"] == [TOY_SIZE, TOY_SIZE] and report["devices"] == []
    check_model_stage(report["stages"]["model"])
    check_triton_stage(report["stages"]["triton"])
    check_service_stage(report["stages"]["service"])
    markdown = (out / REPORT_MD).read_text()
    assert FALLBACK_MESSAGE in markdown
    for title in ("1. the model alone", "2. Triton, dynamic batching", "3. the whole service"):
        assert title in markdown
    assert (out / "tritonserver.log").is_file()


def test_gpu_script_skips_what_the_budget_does_not_allow(toy_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    # stage 2 needs 30 s left after stage 1: a 25 s budget leaves stage 1 alone (its share: 35 %, ~9 s)
    done = run_script("--repository", str(toy_repository), "--name", "toy", "--out", str(out), "--budget-s", "25",
                      "--threads", "1", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["stages"]["model"]["results"], report["stages"]["model"]
    assert report["stages"]["triton"] == {"skipped": "over the time budget before stage 2"}
    assert "over the time budget before stage 2" in (out / REPORT_MD).read_text()


def test_gpu_script_names_what_is_missing(toy_repository: Path, tmp_path: Path) -> None:
    done = run_script("--repository", str(toy_repository), "--name", "absent", "--out", str(tmp_path), timeout=60)
    assert done.returncode == 2 and "no servable version of model 'absent'" in done.stderr
    done = run_script("--repository", str(toy_repository), "--name", "toy", "--out", str(tmp_path),
                      "--batch-sizes", "0,8", timeout=60)
    assert done.returncode == 2 and "expected integers >= 1" in done.stderr


@pytest.mark.slow
def test_triton_stub_runs_in_the_environment_it_is_given(toy_repository: Path, tmp_path: Path) -> None:
    """``--stub-environment``: the backend stub's embedded Python takes its packages from that venv (on a GPU
    machine, one with numpy<2 next to the image's numpy 2) and still serves the model right."""
    import sysconfig
    import venv

    import numpy as np
    import tritonclient.grpc as grpcclient

    from slsg_gateway.server import free_port
    from slsg_triton.local import LocalTriton, TritonNotFoundError, find_tritonserver

    try:
        find_tritonserver()
    except TritonNotFoundError as exc:
        pytest.skip(str(exc))
    env_dir = tmp_path / "stub-env"
    venv.create(env_dir, with_pip=False)
    stub_site = subprocess.run([str(env_dir / "bin" / "python3"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    marker = tmp_path / "stub-started"
    # a .pth line that starts with "import" runs when that environment's Python starts: here, only the stub's
    (Path(stub_site) / "slsg-serving.pth").write_text(
        f"{sysconfig.get_paths()['purelib']}\nimport pathlib; pathlib.Path({str(marker)!r}).write_text('stub')\n")
    frames = np.full((2, TOY_SIZE, TOY_SIZE, 3), 128, np.uint8)
    frames[0, :8, :8] = (255, 0, 0)  # the toy model scores redness
    with LocalTriton(toy_repository, free_port(), free_port(), free_port(), model_control_mode="explicit",
                     load_models=["toy"], stub_environment=env_dir) as server:
        tensor = grpcclient.InferInput("image", list(frames.shape), "UINT8")
        tensor.set_data_from_numpy(frames)
        scores = grpcclient.InferenceServerClient(server.grpc_url).infer("toy", [tensor]).as_numpy("score").ravel()
    assert marker.read_text() == "stub"
    assert scores[0] > 0.5 > scores[1]


def test_load_plan_spreads_cameras_and_picks_the_fewest_gateways() -> None:
    from slsg_bench.gpu_service import ServiceStageConfig, concurrency_levels, gateways_needed, split_cameras

    assert split_cameras(5, 2) == [3, 2] and split_cameras(1, 4) == [1] and sum(split_cameras(64, 3)) == 64
    cfg = ServiceStageConfig(gateway_counts=(1, 2), start_concurrency_per_gateway=4, max_concurrency=40,
                             seconds_per_level=1.0, load_processes=2, frame_size=(64, 64), gateway_max_batch=8)
    assert concurrency_levels(1, cfg) == [4, 8, 16, 32] and concurrency_levels(2, cfg) == [8, 16, 32]
    # 2 gateways reach 190 of the best 195 images/s (within 5 %): a third and fourth do not pay
    assert gateways_needed({1: 100.0, 2: 190.0, 4: 195.0}, 0.05) == 2
    assert gateways_needed({}, 0.05) is None
