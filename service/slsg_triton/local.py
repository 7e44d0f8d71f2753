"""A real Triton Inference Server on this machine's CPU, without a container.

The ``nvidia-pytriton`` wheel ships Triton's ``tritonserver`` binary (2.51) with only the
Python backend; there is no onnxruntime backend. So ``LocalTriton`` serves a production
model repository (``<name>/config.pbtxt`` for the onnxruntime backend, ``<name>/<v>/model.onnx``)
through a generated *shadow repository* in a work directory:

- ``<work>/models/<name>/config.pbtxt``: the production configuration with
  ``backend: "python"`` and a KIND_CPU instance group; inputs, outputs, max_batch_size,
  dynamic batching, parameters (model card) and version policy are kept, so clients see the
  same model as in production;
- ``<work>/models/<name>/<v>/``: symlinks to the source version's files plus a generated
  ``model.py`` (``onnx_model.py``) that runs ``model.onnx`` with ONNX Runtime (CUDA when available, else CPU),
  one ORT run per ``execute()`` call over all requests the dynamic batcher gathered;
- ``<work>/backends/python/``: the wheel's Python backend plus the backend stub built for
  this interpreter's Python version (the wheel keeps stubs per version elsewhere).

Keeping the shadow in sync: it is synced right before the server starts, then a background
thread re-syncs every ``sync_interval`` seconds (default 0.5). Versions and models added to
the source repository appear in the shadow once their files have been unchanged for
``settle_s`` (0.3 s), so a half-written export is never published; removed ones disappear.
What Triton does with the changes depends on the model-control mode: ``none`` ignores
them, ``poll`` loads/unloads them on its next poll (1 s), ``explicit`` loads them on a
repository-API ``load`` call (call ``wait_synced()`` first to be sure the shadow is current).
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterable

from slsg.contract import CONFIG_FILENAME, MODEL_FILENAME, list_versions
from slsg.triton_config import ConfigError, config_to_text, load_config

LOG = logging.getLogger(__name__)
MODEL_CONTROL_MODES = ("none", "poll", "explicit")
PYTHON_STUB = "triton_python_backend_stub"
SHADOW_MODEL_SCRIPT = "model.py"

MODEL_SCRIPT = Path(__file__).with_name("onnx_model.py")  # runs inside the backend stub (numpy<2)


class TritonNotFoundError(FileNotFoundError):
    """The ``tritonserver`` binary (or its Python backend stub) is not installed."""


class TritonStartError(RuntimeError):
    """The server exited or did not become ready; the message carries the end of its log."""


# ---------------------------------------------------------------------------------------------
# The installed server


@dataclass(frozen=True)
class TritonInstall:
    """Where the pytriton wheel keeps Triton, and the environment its Python backend needs."""

    binary: Path
    backend_dir: Path  # the wheel's backends/ (python backend without a stub)
    python_stub: Path  # the stub for this interpreter's Python version
    env: dict[str, str] = field(repr=False)

    def assemble_backends(self, dest: Path) -> Path:
        """A backend directory ``dest`` = the wheel's backends (symlinked) plus the matching stub.

        The Python backend looks for its stub only next to ``libtriton_python.so``.
        """
        python_dir = dest / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        sources = [p for p in (self.backend_dir / "python").iterdir() if p.is_file()] + [self.python_stub]
        for src in sources:
            link = python_dir / src.name
            if not link.exists():
                link.symlink_to(src)
        return dest


def _python_env() -> dict[str, str]:
    """Environment for tritonserver: this venv's bin/ first (the stub's Python finds its
    site-packages, with numpy<2, from there) and this interpreter's libpython first."""
    env = os.environ.copy()
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")]).rstrip(os.pathsep)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    lib_paths = [libdir] if libdir and Path(libdir).is_dir() else []
    if env.get("LD_LIBRARY_PATH"):
        lib_paths.append(env["LD_LIBRARY_PATH"])
    if lib_paths:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_paths)
    return env


def find_tritonserver() -> TritonInstall:
    """Locate ``tritonserver`` in the installed ``nvidia-pytriton`` wheel (without importing it)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotFoundError(
            "tritonserver not found: the 'nvidia-pytriton' package is not installed "
            "(pip install -e '.[triton]')")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        binary=root / "bin" / "tritonserver",
        backend_dir=root / "backends",
        python_stub=root / "python_backend_stubs" / version / PYTHON_STUB,
        env=_python_env(),
    )
    for what, path in (("binary", install.binary), ("Python backend", install.backend_dir / "python"),
                       (f"Python {version} backend stub", install.python_stub)):
        if not path.exists():
            raise TritonNotFoundError(f"tritonserver {what} not found at {path} (nvidia-pytriton install broken?)")
    return install


# ---------------------------------------------------------------------------------------------
# The shadow repository


def shadow_config(production: Any, name: str, intra_op_threads: int = 1) -> Any:
    """The production ``ModelConfig`` rewritten for the Python backend on CPU, with the settings
    ``onnx_model.py`` reads from its parameters."""
    from tritonclient.grpc import model_config_pb2

    if production.backend not in ("onnxruntime", "") or production.platform not in ("", "onnxruntime_onnx"):
        raise ConfigError(f"model {name!r}: only ONNX models can be served locally "
                          f"(backend={production.backend!r}, platform={production.platform!r})")
    if production.name and production.name != name:
        raise ConfigError(f"model {name!r}: config.pbtxt names it {production.name!r}; Triton requires the folder name")
    cfg = type(production)()
    cfg.CopyFrom(production)
    cfg.name = name
    cfg.backend = "python"
    for unused in ("platform", "default_model_filename", "optimization"):  # ORT/TensorRT-only settings
        cfg.ClearField(unused)
    count = sum(group.count for group in production.instance_group) or 1
    del cfg.instance_group[:]
    cfg.instance_group.add(count=count, kind=model_config_pb2.ModelInstanceGroup.KIND_CPU)
    cfg.parameters["slsg_model_file"].string_value = MODEL_FILENAME
    cfg.parameters["slsg_intra_op_threads"].string_value = str(intra_op_threads)
    return cfg


def _newest_mtime(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.iterdir()), default=folder.stat().st_mtime)


class ShadowRepository:
    """Mirrors a production repository as a Python-backend repository under ``root``."""

    def __init__(self, source: Path, root: Path, intra_op_threads: int = 1, settle_s: float = 0.3):
        self.source = Path(source).resolve()
        self.models = Path(root) / "models"
        self._staging = Path(root) / "staging"  # outside models/: Triton would take it for a model
        self._intra_op_threads = intra_op_threads
        self.settle_s = settle_s
        self._configs: dict[str, tuple[tuple[int, int], str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported: set[str] = set()

    # -- one pass ------------------------------------------------------------------------------
    def sync(self, strict: bool = False) -> int:
        """Bring the shadow in line with the source; returns how many versions are still settling.

        ``strict`` raises on a broken model (used before start-up); otherwise it is logged once
        and skipped, so one bad export never takes the other models down.
        """
        with self._lock:
            self.models.mkdir(parents=True, exist_ok=True)
            self._staging.mkdir(parents=True, exist_ok=True)
            pending, wanted = 0, set()
            for src in sorted(p for p in self.source.iterdir() if p.is_dir()):
                try:
                    pending += self._sync_model(src.name, wanted)
                except (ConfigError, OSError) as exc:
                    if strict:
                        raise
                    if str(exc) not in self._reported:
                        self._reported.add(str(exc))
                        LOG.warning("shadow repository: skipping %s: %s", src.name, exc)
            for stale in (p for p in self.models.iterdir() if p.name not in wanted):
                shutil.rmtree(stale, ignore_errors=True)
            return pending

    def _sync_model(self, name: str, wanted: set[str]) -> int:
        src = self.source / name
        versions = list_versions(self.source, name)
        if not versions:
            return 0
        wanted.add(name)  # from here on, a failure keeps the shadow as it was
        config_text = self._config_text(src / CONFIG_FILENAME, name)
        settled = [v for v in versions if time.time() - _newest_mtime(src / str(v)) >= self.settle_s]
        target = self.models / name
        if not target.is_dir():  # publish a new model whole: config and versions in one rename
            if settled:
                stage = Path(tempfile.mkdtemp(dir=self._staging, prefix=f"{name}."))
                (stage / CONFIG_FILENAME).write_text(config_text, encoding="utf-8")
                for v in settled:
                    self._mirror_version(src / str(v), stage / str(v))
                os.rename(stage, target)
            return len(versions) - len(settled)
        self._update_config(target / CONFIG_FILENAME, config_text)
        present = {int(p.name) for p in target.iterdir() if p.is_dir() and p.name.isdigit()}
        for v in sorted(set(settled) - present):
            stage = Path(tempfile.mkdtemp(dir=self._staging, prefix=f"{name}.{v}."))
            self._mirror_version(src / str(v), stage)
            os.rename(stage, target / str(v))
        for v in present - set(versions):
            shutil.rmtree(target / str(v), ignore_errors=True)
        return len(versions) - len(settled)

    def _config_text(self, path: Path, name: str) -> str:
        if not path.is_file():
            raise ConfigError(f"{path}: missing (a model folder needs config.pbtxt next to its versions)")
        stat = path.stat()
        key = (stat.st_mtime_ns, stat.st_size)
        cached = self._configs.get(name)
        if cached is None or cached[0] != key:
            cached = (key, config_to_text(shadow_config(load_config(path), name, self._intra_op_threads)))
            self._configs[name] = cached
        return cached[1]

    def _update_config(self, target: Path, text: str) -> None:
        if target.is_file() and target.read_text(encoding="utf-8") == text:
            return
        fd, tmp = tempfile.mkstemp(dir=self._staging, suffix=".pbtxt")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)

    def _mirror_version(self, src: Path, dest: Path) -> None:
        """Symlink every file of the version (model.onnx and any external-data files) + model.py."""
        dest.mkdir(parents=True, exist_ok=True)
        for item in src.iterdir():
            if item.name != SHADOW_MODEL_SCRIPT:
                (dest / item.name).symlink_to(item.resolve())
        shutil.copyfile(MODEL_SCRIPT, dest / SHADOW_MODEL_SCRIPT)

    # -- keeping it current ----------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return sorted(p.name for p in self.models.iterdir() if p.is_dir()) if self.models.is_dir() else []

    def wait_synced(self, timeout: float = 10.0) -> None:
        """Sync until no source version is still settling (new exports published)."""
        deadline = time.monotonic() + timeout
        while self.sync() > 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"shadow of {self.source} still has unsettled versions after {timeout:.0f} s")
            time.sleep(self.settle_s / 3)

    def start(self, interval: float = 0.5) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(interval,), name="triton-shadow-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self, interval: float) -> None:
        last_error = ""
        while not self._stop.wait(interval):
            try:
                self.sync()
                last_error = ""
            except Exception as exc:  # e.g. a folder vanished mid-scan: retry next pass, log once
                if str(exc) != last_error:
                    LOG.warning("shadow repository sync failed (retrying every %.1f s): %s", interval, exc)
                last_error = str(exc)


# ---------------------------------------------------------------------------------------------
# The server


def _wait_group_gone(pgid: int, timeout: float) -> None:
    """Wait until the killed stubs (re-parented to init once the server died) have been reaped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.02)
    LOG.warning("processes of group %d still present %.0f s after SIGKILL", pgid, timeout)


class LocalTriton:
    """``tritonserver`` over a production repository, on CPU. A context manager.

    ``exit_timeout_s``: how long Triton waits on shutdown for in-flight requests and open client
    connections (keep-alive HTTP clients hold it for the whole timeout).
    ``stub_environment``: a virtual environment for the Python backend stubs (one with numpy<2 where this
    interpreter has numpy 2, with which the stub returns empty outputs); default: this interpreter's.
    ``log_path``: where the server log goes; ``None`` = ``<work_dir>/tritonserver.log``,
    ``"-"`` = this process's stderr. ``work_dir=None`` uses a temporary directory that
    ``stop()`` removes. ``kill()`` is a hard kill for fault tests; ``start()`` works again after it.
    """

    def __init__(self, repository: str | os.PathLike[str], http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, model_control_mode: str = "none", load_models: Iterable[str] = (),
                 work_dir: str | os.PathLike[str] | None = None, startup_timeout: float = 120.0,
                 log_path: str | os.PathLike[str] | None = None, *, host: str = "127.0.0.1",
                 intra_op_threads: int = 1, sync_interval: float = 0.5, log_verbose: int = 0,
                 exit_timeout_s: int = 5, stub_environment: str | os.PathLike[str] | None = None):
        if model_control_mode not in MODEL_CONTROL_MODES:
            raise ValueError(f"model_control_mode must be one of {MODEL_CONTROL_MODES}, got {model_control_mode!r}")
        if load_models and model_control_mode != "explicit":
            raise ValueError("load_models (--load-model) needs model_control_mode 'explicit'")
        self.repository = Path(repository)
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.model_control_mode = model_control_mode
        self.load_models = tuple(load_models)
        self.startup_timeout = startup_timeout
        self.host = host
        self.intra_op_threads = intra_op_threads
        self.sync_interval = sync_interval
        self.log_verbose = log_verbose
        self.exit_timeout_s = exit_timeout_s
        self.stub_environment = Path(stub_environment) if stub_environment is not None else None
        self._requested_work_dir = Path(work_dir) if work_dir is not None else None
        self._requested_log = log_path
        self.work_dir: Path | None = None
        self.log_path: Path | None = None
        self.shadow: ShadowRepository | None = None
        self.process: subprocess.Popen | None = None
        self._log_file: Any = None
        self._shm_prefix = ""

    # -- addresses --------------------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"{self._client_host}:{self.metrics_port}"

    @property
    def shadow_repository(self) -> Path | None:
        return self.shadow.models if self.shadow else None

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- life cycle ------------------------------------------------------------------------------
    def __enter__(self) -> "LocalTriton":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "LocalTriton":
        """Sync the shadow repository, launch the server and wait until it is ready."""
        if self.is_running():
            raise RuntimeError(f"Triton is already running (pid {self.process.pid})")
        self._check_repository()
        install = find_tritonserver()
        try:
            self._launch(install)
            self.wait_ready(self.startup_timeout)
        except BaseException:
            self.stop()  # no half-started server, no leftover temp dir
            raise
        return self

    def _launch(self, install: TritonInstall) -> None:
        self._prepare_work_dir()
        backends = install.assemble_backends(self.work_dir / "backends")
        self.shadow.sync(strict=True)
        self.shadow.wait_synced(timeout=10.0)  # a version exported just now is published after settle_s
        self._check_models()
        self._shm_prefix = f"slsg{os.getpid()}_{secrets.token_hex(3)}_"
        self._open_log()
        self.process = subprocess.Popen(
            self._command(install.binary, backends), env=self._server_env(install), stdin=subprocess.DEVNULL,
            stdout=self._log_file, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us, and we shut the server down in order
        )
        atexit.register(self.stop)
        self.shadow.start(self.sync_interval)

    def _server_env(self, install: TritonInstall) -> dict[str, str]:
        """The server's environment, which its backend stubs inherit; with ``stub_environment`` its ``bin``
        comes first on PATH: the stub's embedded Python takes its site-packages from the first ``python3``
        there (it ignores PYTHONPATH)."""
        env = dict(install.env)
        if self.stub_environment is not None:
            env["PATH"] = os.pathsep.join([str(self.stub_environment / "bin"), env.get("PATH", "")])
        return env

    def _check_repository(self) -> None:
        if not self.repository.exists():
            raise FileNotFoundError(f"model repository {self.repository} does not exist")
        if not self.repository.is_dir():
            raise NotADirectoryError(f"model repository {self.repository} is not a directory")

    def _prepare_work_dir(self) -> None:
        if self.work_dir is None:
            if self._requested_work_dir is not None:
                if self._requested_work_dir.resolve().is_relative_to(self.repository.resolve()):
                    raise ValueError(f"work dir {self._requested_work_dir} must lie outside the model repository")
                self.work_dir = self._requested_work_dir
                self.work_dir.mkdir(parents=True, exist_ok=True)
            else:
                self.work_dir = Path(tempfile.mkdtemp(prefix="slsg-triton-"))
        if self.shadow is None:
            self.shadow = ShadowRepository(self.repository, self.work_dir, self.intra_op_threads)

    def _check_models(self) -> None:
        served = self.shadow.model_names()
        missing = [m for m in self.load_models if m not in served]
        if missing:
            raise FileNotFoundError(f"--load-model {', '.join(missing)}: not in model repository {self.repository} "
                                    f"(servable: {', '.join(served) or 'none'})")
        if not served and self.model_control_mode == "none":
            raise FileNotFoundError(
                f"model repository {self.repository} has no servable model "
                f"(expected <name>/{CONFIG_FILENAME} and <name>/<version>/{MODEL_FILENAME})")

    def _open_log(self) -> None:
        if self._requested_log == "-":
            self.log_path, self._log_file = None, None  # inherit stderr
            return
        self.log_path = Path(self._requested_log) if self._requested_log else self.work_dir / "tritonserver.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")

    def _command(self, binary: Path, backends: Path) -> list[str]:
        cmd = [
            str(binary), f"--model-repository={self.shadow.models}", f"--backend-directory={backends}",
            f"--http-address={self.host}", f"--grpc-address={self.host}", f"--metrics-address={self.host}",
            f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}", f"--metrics-port={self.metrics_port}",
            f"--model-control-mode={self.model_control_mode}", f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            f"--log-verbose={self.log_verbose}",
        ]
        if self.model_control_mode == "poll":
            cmd.append("--repository-poll-secs=1")
        cmd += [f"--load-model={name}" for name in self.load_models]
        return cmd

    def wait_ready(self, timeout: float) -> None:
        """Block until ``/v2/health/ready`` answers 200; raise with the log's tail if the server dies."""
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while True:
            if not self.is_running():
                code = None if self.process is None else self.process.returncode
                raise TritonStartError(f"tritonserver exited (code {code}) during start-up.\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TritonStartError(f"tritonserver not ready after {timeout:.0f} s at {url}.\n{self.log_tail()}")
            time.sleep(0.1)

    def wait_synced(self, timeout: float = 10.0) -> None:
        """Make sure every settled source version is in the shadow (before an explicit load)."""
        if self.shadow is None:
            raise RuntimeError("LocalTriton has not been started")
        self.shadow.wait_synced(timeout)

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(server log went to stderr)"
        text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "last server log lines:\n" + "\n".join(text[-lines:])

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM, then SIGKILL after the exit timeout); removes a temp work dir."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=self.exit_timeout_s + 5)
            except subprocess.TimeoutExpired:
                LOG.warning("tritonserver did not stop in time; killing it")
        self._reap()
        atexit.unregister(self.stop)
        if self.work_dir is not None and self._requested_work_dir is None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir, self.shadow = None, None

    def kill(self) -> None:
        """Hard kill of the server and its backend stubs (simulates a crash); keeps the work dir."""
        self._reap()

    def _reap(self) -> None:
        if self.process is not None:
            try:  # the server's own process group: the server and its Python backend stubs
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.process.wait()
            _wait_group_gone(self.process.pid, timeout=5.0)
        if self.shadow is not None:
            self.shadow.stop()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._shm_prefix:  # regions a killed backend could not unlink
            for region in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
                region.unlink(missing_ok=True)
