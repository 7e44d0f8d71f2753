"""``slsg serve``: run the inspection gateway with uvicorn.

Every flag can also be given as an ``SLSG_*`` environment variable (flags win).
"""

from __future__ import annotations

import argparse
import os

# flag destination -> settings environment variable
_ENV = {
    "host": "SLSG_HOST", "port": "SLSG_PORT", "repository": "SLSG_REPOSITORY", "backend": "SLSG_BACKEND",
    "triton_url": "SLSG_TRITON_URL", "triton_protocol": "SLSG_TRITON_PROTOCOL", "workers": "SLSG_WORKERS",
    "records": "SLSG_RECORDS", "data_dir": "SLSG_DATA_DIR", "log_format": "SLSG_LOG_FORMAT",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1; SLSG_HOST)")
    parser.add_argument("--port", type=int, help="port (default 8080; SLSG_PORT)")
    parser.add_argument("--repository", help="model repository for the embedded backend (SLSG_REPOSITORY)")
    parser.add_argument("--backend", choices=["embedded", "triton"], help="inference backend (SLSG_BACKEND)")
    parser.add_argument("--triton-url", help="Triton address, e.g. 127.0.0.1:8001 (SLSG_TRITON_URL)")
    parser.add_argument("--triton-protocol", choices=["grpc", "http"], help="Triton protocol (SLSG_TRITON_PROTOCOL)")
    parser.add_argument("--workers", type=int, help="uvicorn worker processes (default 1; SLSG_WORKERS)")
    parser.add_argument("--data-dir", help="the gateway's data folder (default ./gateway-data; SLSG_DATA_DIR)")
    parser.add_argument("--records", help="inspection records: a folder, a postgresql:// URL or 'off' "
                                          "(default DATA_DIR/records; SLSG_RECORDS)")
    parser.add_argument("--log-level", default="info", help="uvicorn log level")
    parser.add_argument("--log-format", choices=["text", "json"],
                        help="the gateway's own log lines (backend down / back, errors) as text or JSON lines "
                             "(default text; SLSG_LOG_FORMAT)")


def run(args: argparse.Namespace) -> int:
    for dest, env in _ENV.items():
        value = getattr(args, dest, None)
        if value is not None:
            os.environ[env] = str(value)  # workers are separate processes: settings travel by environment
    import uvicorn

    from slsg_gateway.settings import Settings

    settings = Settings()
    uvicorn.run("slsg_gateway.app:app_from_env", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, log_level=args.log_level)
    return 0
