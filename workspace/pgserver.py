"""A throwaway PostgreSQL server for the tests and the team-host rehearsal: `initdb` into a folder (trust auth on
loopback only, no fsync), `postgres` on a 127.0.0.1 port, stopped (pg_ctl's fast shutdown, then its process group)
and removed after. No system service is involved. Debian's `postgresql` package (installed by `make setup`)
provides the binaries; PostgreSQL refuses to run as root, so as root it runs as the `postgres` user.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, Optional

from workspace.processes import ManagedProcess, ProcessError, free_port

INSTALL_HINT = ("`make setup` installs Debian's postgresql "
                "(sudo apt-get install -y --no-install-recommends postgresql)")


def postgres_bin() -> Path:
    """The newest installed server's bin folder; ProcessError naming the install command when there is none."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise ProcessError(f"no PostgreSQL server binaries under /usr/lib/postgresql: {INSTALL_HINT}")
    return found[-1].parent


def _ready(port: int) -> bool:
    import psycopg

    try:
        psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", connect_timeout=2).close()
        return True
    except psycopg.OperationalError:
        return False


@contextlib.contextmanager
def throwaway_postgres(port: Optional[int] = None, timeout: float = 60) -> Iterator[int]:
    """Start a fresh server (on `port`, or a free one) and yield its port; everything is removed afterwards."""
    bin_dir = postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="llmops-pg-"))  # not under a 0700 parent: the postgres user must read it
    data = root / "data"
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres", "postgres")
    try:
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True, timeout=120)
        port = port or free_port("127.0.0.1")
        server = ManagedProcess([*as_user, str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(root),
                                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                                log_path=root / "server.log", healthy=lambda: _ready(port), what="PostgreSQL")
        server.start(timeout=timeout)
        try:
            yield port
        finally:  # a fast shutdown (clients are disconnected), then the process group if anything is left
            subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                           capture_output=True, timeout=60)
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def create_database(port: int, name: Optional[str] = None) -> str:
    """A new empty database on the server at `port` (a random name unless given); its SQLAlchemy URL (psycopg 3)."""
    import psycopg

    name = name or "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/{name}"
