"""A real PostgreSQL server for tests: its own cluster (initdb + pg_ctl) in a temporary folder on a free
loopback port, from Debian's ``postgresql`` package. As root the server runs as the ``postgres`` user
(PostgreSQL refuses to run as root)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from support import free_ports


def postgres_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` holding initdb and pg_ctl, or None."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                        if Path(p).parent.name.isdigit() else 0)
    for folder in reversed(candidates):
        if os.access(Path(folder) / "initdb", os.X_OK) and os.access(Path(folder) / "pg_ctl", os.X_OK):
            return Path(folder)
    return None


def _as_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return ["runuser", "-u", name, "--"]
        except KeyError:
            continue
    raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")


@dataclass
class PostgresServer:
    url: str
    data: Path
    bindir: Path
    prefix: list[str]

    def stop(self) -> None:
        subprocess.run([*self.prefix, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                        "stop"], capture_output=True, timeout=60)


def start_postgres(root: Path) -> PostgresServer:
    """initdb a cluster under ``root`` and start it; trust authentication on 127.0.0.1 only."""
    bindir = postgres_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin")
    prefix = _as_user()
    root.mkdir(parents=True, exist_ok=True)
    if prefix:
        shutil.chown(root, user=prefix[2])
    data, sock = root / "data", root / "sock"
    run = lambda *args: subprocess.run([*prefix, *map(str, args)], capture_output=True, text=True,  # noqa: E731
                                       timeout=120, cwd=root)
    sock_made = run("mkdir", "-p", sock)
    assert sock_made.returncode == 0, sock_made.stderr
    init = run(bindir / "initdb", "-D", data, "-U", "slsg", "-A", "trust", "-E", "UTF8", "--no-sync")
    if init.returncode != 0:
        raise RuntimeError(f"initdb failed: {init.stderr}")
    port = free_ports(1)[0]
    options = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=40"
    start = run(bindir / "pg_ctl", "-D", data, "-o", options, "-l", root / "server.log", "-w", "-t", "60",
                "start")
    if start.returncode != 0:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        raise RuntimeError(f"pg_ctl start failed: {start.stderr}\n{log}")
    return PostgresServer(f"postgresql://slsg@127.0.0.1:{port}/postgres", data, bindir, prefix)
