"""``slsg triton``: run a real Triton server on this machine's CPU over a model repository.

The production repository (onnxruntime backend) is served through a generated Python-backend
shadow repository that follows new exports (see ``slsg_triton.local``). Ctrl-C or
SIGTERM stops the server cleanly and exits 0. Standard library only at module level.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", required=True, help="production model repository (<name>/config.pbtxt, "
                        "<name>/<version>/model.onnx)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to serve other machines)")
    parser.add_argument("--model-control-mode", choices=("none", "poll", "explicit"), default="none",
                        help="none: load all at start; poll: follow the repository; explicit: repository API")
    parser.add_argument("--load-model", action="append", default=[], metavar="NAME",
                        help="with explicit mode: load NAME at start (repeatable)")
    parser.add_argument("--work-dir", default=None,
                        help="where the shadow repository goes (default: a temp dir removed on exit)")
    parser.add_argument("--intra-op-threads", type=int, default=1, help="ONNX Runtime threads per model instance")
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    parser.add_argument("--exit-timeout", type=int, default=5,
                        help="seconds Triton waits on shutdown for in-flight requests and open connections")
    parser.add_argument("--log-file", default="-", help="server log file (default: this terminal)")
    parser.add_argument("--log-verbose", action="count", default=0, help="Triton verbose log (repeat for more)")


def _stop_on_signals(stop: threading.Event, ready: threading.Event) -> dict[int, object]:
    """SIGINT/SIGTERM: once serving, ask the main loop to stop; during start-up, interrupt it."""
    def handler(signum: int, frame: object) -> None:
        if not ready.is_set():
            raise KeyboardInterrupt
        stop.set()

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def run(args: argparse.Namespace) -> int:
    from slsg_triton.local import LocalTriton, TritonStartError

    stop, ready = threading.Event(), threading.Event()
    previous = _stop_on_signals(stop, ready)
    try:
        try:
            server = LocalTriton(
                args.repository, args.http_port, args.grpc_port, args.metrics_port,
                model_control_mode=args.model_control_mode, load_models=args.load_model, work_dir=args.work_dir,
                startup_timeout=args.startup_timeout, log_path=args.log_file, host=args.host,
                intra_op_threads=args.intra_op_threads, log_verbose=args.log_verbose,
                exit_timeout_s=args.exit_timeout,
            )
            server.start()
        except (OSError, ValueError, TritonStartError) as exc:  # ValueError includes ConfigError
            print(f"slsg triton: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # start() has already shut the half-started server down
            print("slsg triton: interrupted during start-up", file=sys.stderr)
            return 0
        ready.set()
        print(f"slsg triton: ready (pid {server.process.pid}): HTTP {server.http_url}, gRPC {server.grpc_url}, "
              f"metrics {server.metrics_url}; shadow repository {server.shadow_repository}",
              file=sys.stderr, flush=True)
        try:
            while not stop.wait(0.5):
                if not server.is_running():
                    print(f"slsg triton: server exited with code {server.process.returncode}", file=sys.stderr)
                    return 1
        finally:
            server.stop()
        print("slsg triton: stopped", file=sys.stderr)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
