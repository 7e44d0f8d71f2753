"""A real Triton server (pytriton's tritonserver, Python backend, CPU) over the toy contract model.

Everything runs on loopback with free ports; results are compared with in-process ONNX Runtime.
One module-scoped server (explicit model control) serves most tests; its last tests kill,
restart and stop it, so keep their order.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import model_config_pb2 as mc

from support import free_ports
from onnx_fixtures import make_card, write_contract_model
from slsg import cli
from slsg.contract import INPUT_IMAGE, OUTPUT_ANOMALY_MAP, OUTPUT_SCORE, Calibration
from slsg.triton_config import (
    ConfigError, card_from_config, load_config, parse_config, production_config, write_config,
)
from slsg_triton.local import LocalTriton, ShadowRepository, TritonStartError, find_tritonserver, shadow_config

pytestmark = pytest.mark.slow
CLIENTS = {"http": httpclient, "grpc": grpcclient}


def frames(count: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """Grey frames, each with a 6x6 patch of increasing redness (so frame i scores below frame i+1)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(95, 105, (count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        images[i, 5:11, 7:13] = (140 + 20 * i, 100, 100)
    return images


def run_ort(model_file: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the toy graph has an unused initializer; ORT warns about it
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    return dict(zip([OUTPUT_ANOMALY_MAP, OUTPUT_SCORE], session.run([OUTPUT_ANOMALY_MAP, OUTPUT_SCORE],
                                                                     {INPUT_IMAGE: images})))


def infer(protocol: str, url: str, images: np.ndarray, model: str = "toy", version: str = "") -> dict:
    client_module = CLIENTS[protocol]
    client = client_module.InferenceServerClient(url)
    tensor = client_module.InferInput(INPUT_IMAGE, list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    outputs = [client_module.InferRequestedOutput(name) for name in (OUTPUT_ANOMALY_MAP, OUTPUT_SCORE)]
    try:
        result = client.infer(model, [tensor], model_version=version, outputs=outputs)
    finally:
        client.close()
    return {name: result.as_numpy(name) for name in (OUTPUT_ANOMALY_MAP, OUTPUT_SCORE)}


def process_gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)  # the server's process group: server and backend stubs
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def source_repository(contract_repository, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("triton_source") / "repo"
    shutil.copytree(contract_repository.root, root)
    return root


@pytest.fixture(scope="module")
def server(source_repository):
    http, grpc, metrics = free_ports(3)
    triton = LocalTriton(source_repository, http, grpc, metrics, model_control_mode="explicit",
                         load_models=["toy"], startup_timeout=90)
    started = time.perf_counter()
    triton.start()
    print(f"\nTriton ready in {time.perf_counter() - started:.2f} s")
    yield triton
    triton.stop()


# -- without a server ------------------------------------------------------------------------------

def test_find_tritonserver_locates_binary_backend_and_stub():
    install = find_tritonserver()
    assert os.access(install.binary, os.X_OK)
    assert (install.backend_dir / "python" / "libtriton_python.so").is_file()
    assert install.python_stub.parent.name == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert install.env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_shadow_config_switches_backend_and_keeps_the_contract(contract_repository):
    production = parse_config(production_config("toy", contract_repository.card, tensorrt=True, instance_count=2))
    shadow = shadow_config(production, "toy")
    assert shadow.backend == "python" and not shadow.default_model_filename
    assert not shadow.HasField("optimization")  # TensorRT is for the GPU onnxruntime backend only
    assert [(g.count, g.kind) for g in shadow.instance_group] == [(2, mc.ModelInstanceGroup.KIND_CPU)]
    for kept in ("input", "output", "max_batch_size", "dynamic_batching", "version_policy"):
        assert getattr(shadow, kept) == getattr(production, kept), kept
    added = {"slsg_model_file": "model.onnx", "slsg_intra_op_threads": "1"}  # what onnx_model.py reads
    assert {k: v.string_value for k, v in shadow.parameters.items() if k in added} == added
    assert {k: v for k, v in shadow.parameters.items() if k not in added} == dict(production.parameters)
    assert card_from_config(shadow) == contract_repository.card


def test_shadow_repository_follows_source_after_files_settle(contract_repository, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(contract_repository.root, source)
    shadow = ShadowRepository(source, tmp_path / "work", settle_s=0.3)
    shadow.wait_synced(timeout=5)
    version_1 = shadow.models / "toy" / "1"
    assert (version_1 / "model.onnx").resolve() == (source / "toy" / "1" / "model.onnx").resolve()
    assert "TritonPythonModel" in (version_1 / "model.py").read_text()
    assert load_config(shadow.models / "toy" / "config.pbtxt").backend == "python"

    write_contract_model(source / "toy" / "2" / "model.onnx", contract_repository.card)
    assert shadow.sync() == 1 and not (shadow.models / "toy" / "2").exists()  # just written: not yet
    shadow.wait_synced(timeout=5)
    assert (shadow.models / "toy" / "2" / "model.onnx").is_file()

    shutil.rmtree(source / "toy" / "1")
    shadow.sync()
    assert sorted(p.name for p in (shadow.models / "toy").iterdir()) == ["2", "config.pbtxt"]
    assert [p.name for p in shadow.models.iterdir()] == ["toy"]  # staging lives outside models/

    config = source / "toy" / "config.pbtxt"
    config.write_text("max_batch_sise: 8")  # a broken edit after start: keep serving what we had
    shadow.sync()
    assert card_from_config(load_config(shadow.models / "toy" / "config.pbtxt")) == contract_repository.card
    renamed = dataclasses.replace(contract_repository.card, category="screw_bag")
    write_config(source, "toy", renamed)  # a fixed config is picked up
    shadow.sync()
    assert card_from_config(load_config(shadow.models / "toy" / "config.pbtxt")) == renamed
    (source / "toy" / "config.pbtxt").unlink()
    with pytest.raises(ConfigError, match="missing"):  # strict (before start-up): no config is an error
        shadow.sync(strict=True)


def test_cli_rejects_missing_repository(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert cli.main(["triton", "--repository", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_cli_names_the_broken_config(contract_repository, tmp_path, capsys):
    repo = tmp_path / "repo"
    shutil.copytree(contract_repository.root, repo)
    config = repo / "toy" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size", "max_batch_sise"))
    assert cli.main(["triton", "--repository", str(repo)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "max_batch_sise" in err


def test_inconsistent_server_options_are_rejected(contract_repository, tmp_path):
    with pytest.raises(ValueError, match="explicit"):
        LocalTriton(contract_repository.root, load_models=["toy"], model_control_mode="none")
    with pytest.raises(ValueError, match="model_control_mode"):
        LocalTriton(contract_repository.root, model_control_mode="sometimes")
    with pytest.raises(FileNotFoundError, match="nope"):  # names the missing model and what exists
        LocalTriton(contract_repository.root, *free_ports(3), model_control_mode="explicit",
                    load_models=["nope"], work_dir=tmp_path / "work").start()


def test_port_in_use_gives_an_error_with_the_server_log(contract_repository, tmp_path):
    http, grpc, metrics = free_ports(3)
    with socket.create_server(("127.0.0.1", http)):
        triton = LocalTriton(contract_repository.root, http, grpc, metrics, startup_timeout=60)
        with pytest.raises(TritonStartError, match=str(http)):
            triton.start()
    assert triton.work_dir is None and not triton.is_running()  # temp dir cleaned up


# -- one real server --------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("batch", [1, 3])
def test_inference_matches_in_process_onnxruntime(server, contract_repository, protocol, batch):
    images = frames(batch, seed=batch)
    url = server.http_url if protocol == "http" else server.grpc_url
    got = infer(protocol, url, images)
    want = run_ort(contract_repository.model_file(1), images)
    assert got[OUTPUT_ANOMALY_MAP].shape == (batch, 1, 64, 64) and got[OUTPUT_SCORE].shape == (batch, 1)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5)
    if batch > 1:  # bigger red patch -> higher score: the answers are per frame, not shared
        assert np.all(np.diff(got[OUTPUT_SCORE][:, 0]) > 0)


def test_concurrent_requests_are_each_answered_correctly(server, contract_repository):
    client = httpclient.InferenceServerClient(server.http_url, concurrency=6)
    images = frames(6, seed=7)
    pending = []
    for i in range(6):
        tensor = httpclient.InferInput(INPUT_IMAGE, [1, 64, 64, 3], "UINT8")
        tensor.set_data_from_numpy(images[i:i + 1])
        pending.append(client.async_infer("toy", [tensor]))
    got = np.concatenate([p.get_result().as_numpy(OUTPUT_SCORE) for p in pending])
    client.close()
    np.testing.assert_allclose(got, run_ort(contract_repository.model_file(1), images)[OUTPUT_SCORE], atol=1e-5)


def test_metadata_and_config_show_the_contract_and_card(server, contract_repository):
    http = httpclient.InferenceServerClient(server.http_url)
    meta = http.get_model_metadata("toy")
    assert meta["inputs"] == [{"name": INPUT_IMAGE, "datatype": "UINT8", "shape": [-1, 64, 64, 3]}]
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {OUTPUT_ANOMALY_MAP: [-1, 1, 64, 64],
                                                                OUTPUT_SCORE: [-1, 1]}
    http_config = http.get_model_config("toy")
    assert card_from_config(http_config) == contract_repository.card
    assert http_config["max_batch_size"] == 8 and http_config["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    http.close()
    with grpcclient.InferenceServerClient(server.grpc_url) as grpc:
        grpc_config = grpc.get_model_config("toy").config
    assert card_from_config(grpc_config) == contract_repository.card
    assert grpc_config.parameters["slsg.category"].string_value == "toy"
    assert grpc_config.version_policy.latest.num_versions == 2


def test_explicit_mode_loads_a_version_exported_after_start_and_unloads(server, source_repository,
                                                                       contract_repository):
    stricter = dataclasses.replace(contract_repository.card, calibration=Calibration(raw_threshold=0.6))
    model_2 = write_contract_model(source_repository / "toy" / "2" / "model.onnx", stricter)
    server.wait_synced()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert not client.is_model_ready("toy", "2")
    client.load_model("toy")
    assert client.is_model_ready("toy", "1") and client.is_model_ready("toy", "2")  # latest 2 versions

    images = frames(3, seed=11)
    v1, v2 = (infer("grpc", server.grpc_url, images, version=v)[OUTPUT_SCORE] for v in ("1", "2"))
    np.testing.assert_allclose(v2, run_ort(model_2, images)[OUTPUT_SCORE], atol=1e-5)
    assert np.all(v2 < v1)  # a higher raw threshold calibrates the same frames lower
    assert np.all(infer("http", server.http_url, images)[OUTPUT_SCORE] == v2)  # default: newest

    client.unload_model("toy")  # asynchronous: versions pass through UNLOADING
    def states() -> dict[str, str]:
        return {m.version: m.state for m in client.get_model_repository_index().models if m.name == "toy"}

    deadline = time.monotonic() + 30
    while set(states().values()) != {"UNAVAILABLE"} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert states() == {"1": "UNAVAILABLE", "2": "UNAVAILABLE"}
    assert not client.is_model_ready("toy", "1") and not client.is_model_ready("toy", "2")


def test_kill_then_restart_on_the_same_ports(server):
    pid = server.process.pid
    server.kill()
    assert process_gone(pid) and not server.is_running()
    with pytest.raises(Exception):
        httpclient.InferenceServerClient(server.http_url).is_server_live()
    server.start()  # preloads "toy" again (explicit mode, load_models)
    assert server.process.pid != pid
    assert infer("http", server.http_url, frames(1))[OUTPUT_SCORE].shape == (1, 1)


def test_stop_ends_server_and_stubs_and_removes_temp_work_dir(server):
    pid, work_dir = server.process.pid, server.work_dir
    assert (work_dir / "models" / "toy" / "1" / "model.py").is_file()
    server.stop()
    assert process_gone(pid) and not work_dir.exists()
    assert not list(Path("/dev/shm").glob(f"{server._shm_prefix}*"))


# -- the command, as a user runs it ------------------------------------------------------------------

def test_cli_poll_mode_serves_new_exports_and_exits_0_on_sigterm(contract_repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(contract_repository.root, repo)
    http, grpc, metrics = free_ports(3)
    command = [sys.executable, "-m", "slsg.cli", "triton", "--repository", str(repo), "--model-control-mode", "poll",
               "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
               "--log-file", str(tmp_path / "triton.log")]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
        wait_for(lambda: client.is_model_ready("toy", "1"), proc, 90)
        write_contract_model(repo / "toy" / "2" / "model.onnx", make_card(calibration=Calibration(raw_threshold=0.6)))
        wait_for(lambda: client.is_model_ready("toy", "2"), proc, 30)  # sync 0.5 s + settle + poll 1 s
        scores = {v: infer("http", f"127.0.0.1:{http}", frames(2), version=v)[OUTPUT_SCORE] for v in ("1", "2")}
        assert np.all(scores["2"] < scores["1"])
        client.close()  # else Triton waits out its exit timeout for this keep-alive connection
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    shadow = Path(err.split("shadow repository ")[1].split()[0])
    assert shadow.name == "models" and not shadow.parent.exists()
    with pytest.raises(Exception):
        httpclient.InferenceServerClient(f"127.0.0.1:{http}").is_server_live()


def wait_for(condition, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if condition():
                return
        except Exception:  # server not up yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"condition not met within {timeout} s")
