"""`make serve`'s replicas: `serving.replicas` vLLM processes of the champion, listed in a replicas file the gateway
follows (<cache>/serve/replicas.json: each replica's URL, version and PID, rewritten atomically).

LoRA mode needs nothing more: the gateway loads other versions into the running replicas at run time. In merged
mode a replica serves one version's weights, so the supervisor watches the registry: when `champion` moves
(`make promote`, `make rollback`) it starts the new champion's replicas, lists them beside the old ones (the gateway
sends new requests to the version the alias now names), waits until the old replicas have nothing running (the
requests in flight finish where they started), then stops them and lists the new ones alone. A new version that
fails to start leaves the old replicas serving, and says so.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol

from workspace.config.load import LoadedConfig
from workspace.config.pipeline import adapter_mode
from workspace.paths import CACHE

REPLICAS_FILE = CACHE / "serve" / "replicas.json"


class Replica(Protocol):
    base_url: str
    pid: Optional[int]

    def start(self) -> object: ...
    def stop(self) -> bool: ...
    def busy(self) -> int: ...  # requests running or waiting


@dataclass
class Launched:
    version: str
    replicas: list


def write_replicas(path: Path, version: str, groups: list[Launched]) -> None:
    rows = [{"url": r.base_url, "version": g.version, "pid": r.pid} for g in groups for r in g.replicas]
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps({"champion": version, "replicas": rows, "updated": time.time()}, indent=2))
    os.replace(tmp, path)  # the gateway never reads half a file


def read_replicas(path: Path = REPLICAS_FILE) -> Optional[list[str]]:
    """The replica URLs `make serve` lists, or None when it is not running (no file, or a broken one)."""
    try:
        return [r["url"] for r in json.loads(path.read_text())["replicas"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Supervisor:
    def __init__(self, loaded: LoadedConfig, launch: Callable[[int], tuple[list, str]], *,
                 champion: Callable[[], Optional[str]], path: Path = REPLICAS_FILE, poll_s: Optional[float] = None,
                 settle_s: Optional[float] = None, drain_timeout_s: float = 300, log: Callable[[str], None] = print):
        """`launch(n)` starts n replicas of the CURRENT champion and returns (replicas, version); `champion()` reads
        the alias. `settle_s`: how long the gateway needs to see a new alias and replica list before the old replicas
        are judged idle (its registry refresh + health interval, doubled)."""
        cfg = loaded.config
        self.loaded, self.launch, self.champion, self.path, self.log = loaded, launch, champion, path, log
        self.n = cfg.serving.replicas
        self.mode = adapter_mode(cfg)[0]
        gw = cfg.serving.gateway
        self.poll_s = poll_s or gw.registry_refresh_s
        self.settle_s = settle_s if settle_s is not None else 2 * (gw.registry_refresh_s + gw.health_interval_s)
        self.drain_timeout_s = drain_timeout_s
        self.current: Optional[Launched] = None
        self.draining: list[tuple[Launched, float]] = []

    def start(self) -> Launched:
        replicas, version = self.launch(self.n)
        self.current = Launched(version, replicas)
        write_replicas(self.path, version, [self.current])
        return self.current

    def step(self) -> None:
        """One poll: follow a moved champion (merged mode), retire drained replicas."""
        now = time.monotonic()
        if self.mode == "merged":
            version = self.champion()
            if version is not None and version != self.current.version:
                self.log(f"[serve] champion moved v{self.current.version} -> v{version}: starting its replicas ...")
                try:
                    replicas, started = self.launch(self.n)
                except Exception as exc:  # noqa: BLE001 - the old version keeps serving
                    self.log(f"[serve] v{version} did not start ({exc}); v{self.current.version} keeps serving")
                    return
                self.draining.append((self.current, now))
                self.current = Launched(started, replicas)
                write_replicas(self.path, started, [self.current, *[g for g, _ in self.draining]])
                self.log(f"[serve] v{started} serving; v{self.draining[-1][0].version} drains")
        still = []
        for group, since in self.draining:
            idle = now - since >= self.settle_s and all(r.busy() == 0 for r in group.replicas)
            if idle or now - since > self.drain_timeout_s:
                for r in group.replicas:
                    r.stop()
                self.log(f"[serve] v{group.version} stopped ({'drained' if idle else 'drain timeout'})")
            else:
                still.append((group, since))
        if len(still) != len(self.draining):
            self.draining = still
            write_replicas(self.path, self.current.version, [self.current, *[g for g, _ in still]])

    def stop(self) -> None:
        for group in [g for g, _ in self.draining] + ([self.current] if self.current else []):
            for r in group.replicas:
                r.stop()
        self.path.unlink(missing_ok=True)

    def running(self) -> bool:
        return bool(self.current) and any(getattr(r, "running", True) for r in self.current.replicas)
