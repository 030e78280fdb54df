"""`make rehearse-team`: docs/team-service.md's one-host layout, every command on that page run together, on
loopback, on the page's ports; then traffic, the backups restored, and everything stopped by its PID.

    1. PostgreSQL on 5432 (a throwaway server: initdb into a temporary folder; the page's distribution service is
       the same server), databases `mlflow` and `gateway`
    2. Redis on 6379 (`redis-server`, no persistence: the page says there is nothing to back up)
    3. the MLflow server: the page's command (PostgreSQL backend store, served artifacts) on 5000
    4. the user's champion registered in that server (what `make pipeline` against it would promote)
    5. `make serve` with serving.replicas=2 (8000, 8001): the champion fetched from the server
    6. `make gateway` on PostgreSQL and Redis (its schema upgraded before it serves) on 8080
    7. `make token` for a user and an admin
    8. chat completions through the gateway with the openai client
    9. `make monitoring`, then the Prometheus command it prints (9090): targets up, recording rules read back
   10. `make prefect-up`, `make prefect-status`, `make prefect-down`
   11. backups as the page says: pg_dump of both databases, restored into new databases (the admin token
       authenticates against the restored gateway database; the champion's version is in the restored MLflow
       database), the artifact folder archived
   12. everything stopped (by PID); every port free again

Needs a champion in the configured registry (`make pipeline` first) and the packages `make setup` installs
(postgresql, redis-server, prometheus). Runs in a temporary folder (LLMOPS_CACHE and PREFECT_HOME point there): the
user's registry is only read. Writes docs/BENCHMARKS.md (section team-host). About 5 minutes on 2 cores.

    .venv/bin/python -m llmops bench team-host [--keep] [--no-write]
"""
from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from workspace import offline

import httpx

from benchmarks.report import update_section
from serving.gateway import GatewayDb
from serving.registry import champion_info, fetch_version_cached, promote
from workspace.config import add_cli_args, load_config
from workspace.paths import ROOT, VENVS
from workspace.pgserver import create_database, postgres_bin, throwaway_postgres
from workspace.processes import ManagedProcess, port_is_free
from workspace.tracking import configure, stage_run

PORTS = {"PostgreSQL": 5432, "Redis": 6379, "MLflow server": 5000, "Prefect server": 4200, "vLLM replica 1": 8000,
         "vLLM replica 2": 8001, "gateway": 8080, "Prometheus": 9090}  # docs/team-service.md's table
PROMPT = "회원 목록 화면을 생성해주세요. 필드: 이름, 이메일"


class Rehearsal:
    def __init__(self, work: Path, env: dict[str, str]):
        self.work, self.env = work, env
        self.rows: list[tuple[str, str, str, str, float]] = []

    @contextlib.contextmanager
    def step(self, name: str, command: str, port: str = "-"):
        t0 = time.monotonic()
        print(f"[team-host] {name}: {command}", flush=True)
        result = {"text": "ok"}
        try:
            yield result
        except BaseException as exc:
            self.rows.append((name, command, port, f"FAILED: {type(exc).__name__}: {str(exc)[:300]}",
                              round(time.monotonic() - t0, 1)))
            raise
        self.rows.append((name, command, port, result["text"], round(time.monotonic() - t0, 1)))
        print(f"[team-host] {name}: {result['text']} ({time.monotonic() - t0:.1f} s)", flush=True)

    def make(self, target: str, *variables: str, timeout: float = 600) -> subprocess.CompletedProcess:
        proc = subprocess.run(["make", "--no-print-directory", target, *variables], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"make {target} exited {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}")
        return proc

    def background(self, name: str, argv: list[str], health_url: str, timeout: float = 600) -> ManagedProcess:
        return ManagedProcess(argv, log_path=self.work / "logs" / f"{name}.log", env=self.env, cwd=ROOT,
                              health_url=health_url, what=name).start(timeout=timeout)


def _query(port: int, expr: str) -> list:
    r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr}, timeout=10).json()
    return r["data"]["result"] if r.get("status") == "success" else []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, dumps) afterwards")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/BENCHMARKS.md")
    args = ap.parse_args(argv)

    busy = [f"{what} {port}" for what, port in PORTS.items() if not port_is_free("127.0.0.1", port)]
    if busy:
        print(f"[team-host] the page's ports must be free on 127.0.0.1; in use: {', '.join(busy)} (stop what holds "
              "them: this rehearsal starts its own servers there)", file=sys.stderr)
        return 2
    for tool in ("redis-server", "prometheus", "make"):
        if shutil.which(tool) is None:
            print(f"[team-host] {tool} not found: `make setup` installs it", file=sys.stderr)
            return 2
    user = load_config(args.config, args.profile, args.overrides)
    configure(user)
    name = user.config.tracking.registered_model
    champ = champion_info(name)
    if champ is None:
        print(f"[team-host] {name} has no champion in {user.config.tracking.uri}: run `make pipeline` first",
              file=sys.stderr)
        return 2
    src = fetch_version_cached(name, champ["version"])

    work = Path(tempfile.mkdtemp(prefix="team-host-"))
    (work / "logs").mkdir()
    env = offline.subprocess_env(extra={"LLMOPS_CACHE": str(work / "cache"), "PREFECT_HOME": str(work / "prefect")})
    reh = Rehearsal(work, env)
    pg_bin = postgres_bin()
    failed = None
    with contextlib.ExitStack() as stack:
        try:
            # 1-3: the stores and the tracking server
            with reh.step("PostgreSQL", "initdb + postgres -p 5432 (the distribution's service in production); "
                          "databases mlflow, gateway", "5432") as r:
                pg = stack.enter_context(throwaway_postgres(port=PORTS["PostgreSQL"]))
                mlflow_db, gateway_db = create_database(pg, "mlflow"), create_database(pg, "gateway")
                r["text"] = f"up; {mlflow_db.split('@')[1]}, {gateway_db.split('@')[1]}"
            with reh.step("Redis", "redis-server --bind 127.0.0.1 --port 6379 --save ''", "6379") as r:
                redis = ManagedProcess(["redis-server", "--bind", "127.0.0.1", "--port", "6379", "--save", "",
                                        "--appendonly", "no"], log_path=work / "logs" / "redis.log", what="Redis",
                                       healthy=lambda: not port_is_free("127.0.0.1", 6379)).start(timeout=30)
                stack.callback(redis.stop)
                r["text"] = f"up (PID {redis.pid})"
            artifacts = work / "mlflow-artifacts"
            mlflow_cmd = [str(VENVS["workspace"] / "bin" / "mlflow"), "server", "--backend-store-uri", mlflow_db,
                          "--serve-artifacts", "--artifacts-destination", str(artifacts), "--host", "127.0.0.1",
                          "--port", "5000", "--workers", "1", "--expose-prometheus", str(work / "mlflow-metrics")]
            with reh.step("MLflow server", "mlflow server --backend-store-uri postgresql+psycopg://.../mlflow "
                          "--serve-artifacts --artifacts-destination DIR --host 127.0.0.1 --port 5000 "
                          "--expose-prometheus DIR", "5000") as r:
                server = reh.background("mlflow-server", mlflow_cmd, "http://127.0.0.1:5000/health", timeout=180)
                stack.callback(server.stop)
                r["text"] = f"up (PID {server.pid}), backend store on PostgreSQL"

            sets = ["tracking.uri=http://127.0.0.1:5000", "serving.replicas=2",
                    f"serving.gateway.database_url={gateway_db}", "serving.gateway.limits_storage=redis://127.0.0.1:6379/0",
                    *args.overrides]
            set_var = "SET=" + " ".join(sets)
            make_vars = [set_var, *([f"CONFIG={args.config}"] if args.config else []),
                         *([f"PROFILE={args.profile}"] if args.profile else [])]
            team = load_config(args.config, args.profile, sets)

            # 4: the champion, registered in the server (its bundle travels through the server's artifact proxy)
            with reh.step("champion registered", f"the user's {name} v{champ['version']} registered through "
                          "tracking.uri=http://127.0.0.1:5000", "5000") as r:
                configure(team)
                bundle = work / "bundle"
                shutil.copytree(src, bundle)
                with stage_run(team, "promote") as run:
                    done = promote(name, run.info.run_id, bundle, {k: v for k, v in champ["tags"].items() if k in (
                        "finetune_run_key", "base_model", "dataset_hash", "adapter_mode", "gate", "gate_mode")})
                files = sum(1 for p in artifacts.rglob("*") if p.is_file())
                r["text"] = f"v{done.version} @champion; {files} files under --artifacts-destination"

            # 5-7: make serve (2 replicas), make gateway, make token
            with reh.step("make serve", f"make serve {set_var.split()[0]} ... serving.replicas=2", "8000, 8001") as r:
                serve = reh.background("serve", ["make", "--no-print-directory", "serve", *make_vars],
                                       "http://127.0.0.1:8001/health", timeout=900)
                stack.callback(serve.stop)
                ok = [httpx.get(f"http://127.0.0.1:{p}/health", timeout=5).status_code == 200 for p in (8000, 8001)]
                r["text"] = f"{sum(ok)} of 2 replicas healthy (PID {serve.pid})"
                if not all(ok):
                    raise RuntimeError(f"replicas healthy: {ok}; log {serve.log_path}")
            with reh.step("make gateway", "make gateway SET=\"serving.gateway.database_url=postgresql+psycopg://... "
                          "serving.gateway.limits_storage=redis://127.0.0.1:6379/0\"", "8080") as r:
                gw = reh.background("gateway", ["make", "--no-print-directory", "gateway", *make_vars],
                                    "http://127.0.0.1:8080/healthz", timeout=300)
                stack.callback(gw.stop)
                log = gw.log_path.read_text(errors="replace")
                upgraded = re.search(r"schema \S+ -> \S+", log)
                r["text"] = f"up (PID {gw.pid}); {upgraded.group(0) if upgraded else 'schema at head'}"
            tokens = {}
            with reh.step("make token", "make token NAME=team-user ROLE=user; make token NAME=team-admin ROLE=admin") as r:
                for who, role in (("team-user", "user"), ("team-admin", "admin")):
                    out = reh.make("token", f"NAME={who}", f"ROLE={role}", *make_vars).stdout
                    tokens[role] = out.strip().splitlines()[-1].strip()
                r["text"] = "a user and an admin token (digests stored in PostgreSQL)"

            # 8: traffic through the gateway
            with reh.step("chat through the gateway", "openai client -> http://127.0.0.1:8080/v1, model champion",
                          "8080") as r:
                from openai import OpenAI

                client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key=tokens["user"], timeout=120)
                answers = []
                for i in range(6):
                    c = client.chat.completions.create(model="champion", max_tokens=32,
                                                       messages=[{"role": "user", "content": f"{PROMPT} ({i})"}])
                    answers.append(c.choices[0].message.content or "")
                if not all(a.strip() for a in answers):
                    raise RuntimeError(f"empty answers: {answers}")
                usage = GatewayDb(gateway_db).usage()
                r["text"] = (f"6 of 6 answered; {len(usage)} usage rows in PostgreSQL; first answer "
                             f"{answers[0][:60]!r}")

            # 9: make monitoring, then the command it prints
            with reh.step("make monitoring + Prometheus", "make monitoring; prometheus --config.file=... "
                          "--web.listen-address=127.0.0.1:9090 (the printed command)", "9090") as r:
                out = reh.make("monitoring", *make_vars).stdout
                line = next(x for x in out.splitlines() if x.startswith("start it:"))
                prom_argv = line.removeprefix("start it:").split()
                prom = ManagedProcess(prom_argv, log_path=work / "logs" / "prometheus.log", what="Prometheus",
                                      cwd=work / "cache" / "monitoring",
                                      health_url="http://127.0.0.1:9090/-/ready").start(timeout=60)
                stack.callback(prom.stop)
                exprs = ["gateway:requests_per_minute:rate5m", "gateway:ttft_seconds:p50_5m"]
                deadline, seen, up = time.monotonic() + 150, {}, {}
                while time.monotonic() < deadline and (len(seen) < len(exprs) or len(up) < 4):
                    stream = client.chat.completions.create(model="champion", max_tokens=8, stream=True,
                                                            messages=[{"role": "user", "content": PROMPT}])
                    "".join(c.choices[0].delta.content or "" for c in stream if c.choices)  # TTFT: streamed only
                    time.sleep(3)
                    up = {f"{s['metric']['job']}@{s['metric']['instance']}": s["value"][1]
                          for s in _query(9090, 'up{job=~"gateway|vllm|mlflow"}') if s["value"][1] == "1"}
                    seen = {e: _query(9090, e) for e in exprs if _query(9090, e)}
                if len(seen) < len(exprs) or len(up) < 4:
                    raise RuntimeError(f"targets up: {sorted(up)}; rules with data: {sorted(seen)}; "
                                       f"log {prom.log_path}")
                per_replica = {s["metric"]["instance"]: float(s["value"][1])
                               for s in _query(9090, "sum by (instance) (vllm:request_success_total)")}
                r["text"] = (f"promtool checks ok; up: {', '.join(sorted(up))}; recording rules read back: "
                             f"{', '.join(sorted(seen))}; requests per replica: {per_replica}")

            # 10: Prefect
            with reh.step("Prefect", "make prefect-up; make prefect-status; make prefect-down", "4200") as r:
                try:
                    reh.make("prefect-up", timeout=300)
                    status = reh.make("prefect-status").stdout
                finally:
                    reh.make("prefect-down")
                after = reh.make("prefect-status").stdout
                if "server: up" not in status or "server: down" not in after:
                    raise RuntimeError(f"status while up: {status!r}; after down: {after!r}")
                r["text"] = ("up: " + "; ".join(x.strip() for x in status.splitlines() if x.strip())[:200] +
                             " -> down")

            # 11: backups, restored
            with reh.step("backups restored", "pg_dump -Fc of mlflow and gateway; pg_restore into new databases; "
                          "tar of the artifact folder") as r:
                backup = work / "backup"
                backup.mkdir()
                for db in ("mlflow", "gateway"):
                    subprocess.run([str(pg_bin / "pg_dump"), "-h", "127.0.0.1", "-p", str(pg), "-U", "postgres", "-Fc",
                                    "-f", str(backup / f"{db}.dump"), db], check=True, capture_output=True, timeout=120)
                    restored = create_database(pg, f"{db}_restored")
                    subprocess.run([str(pg_bin / "pg_restore"), "-h", "127.0.0.1", "-p", str(pg), "-U", "postgres",
                                    "-d", restored.rsplit("/", 1)[1], "--no-owner", str(backup / f"{db}.dump")],
                                   check=True, capture_output=True, timeout=120)
                restored_gw = GatewayDb(gateway_db.rsplit("/", 1)[0] + "/gateway_restored")
                if restored_gw.check_token(tokens["admin"]) is None:
                    raise RuntimeError("the admin token does not authenticate against the restored gateway database")
                import psycopg

                with psycopg.connect(f"host=127.0.0.1 port={pg} user=postgres dbname=mlflow_restored") as conn:
                    versions = conn.execute("SELECT version FROM model_versions WHERE name = %s", (name,)).fetchall()
                if (int(done.version),) not in versions:
                    raise RuntimeError(f"v{done.version} is not in the restored MLflow database: {versions}")
                with tarfile.open(backup / "mlflow-artifacts.tgz", "w:gz") as tar:
                    tar.add(artifacts, arcname="mlflow-artifacts")
                sizes = {p.name: p.stat().st_size for p in backup.iterdir()}
                r["text"] = (f"restored: the admin token authenticates, v{done.version} in model_versions; sizes "
                             + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(sizes.items())))
        except Exception as exc:  # noqa: BLE001 - reported in the table, then stopped below
            failed = exc
    # 12: everything stopped (the ExitStack above, in reverse order: Prometheus, gateway, serve, MLflow, Redis, PG)
    left = [f"{what} {port}" for what, port in PORTS.items() if not port_is_free("127.0.0.1", port)]
    reh.rows.append(("stopped", "every process by its PID (process groups), in reverse order", "all",
                     "every port free" if not left else f"STILL IN USE: {', '.join(left)}", 0.0))
    table = ["| step | command | port | result | s |", "|---|---|---|---|---|"]
    table += [f"| {a} | `{b}` | {c} | {d.replace('|', '/')} | {e} |" for a, b, c, d, e in reh.rows]
    print("\n".join(table))
    ok = failed is None and not left
    if not args.no_write:
        body = (("Every step passed." if ok else f"**Failed**: {failed}") + "\n\n" + "\n".join(table) +
                "\n\nThe layout of docs/team-service.md on one host, on its ports, with the commands it names; the "
                "champion is the user's (`make pipeline`'s), registered into the rehearsal's MLflow server.")
        update_section("team-host", "Team host: docs/team-service.md run as one layout", "make rehearse-team", body)
    if args.keep:
        print(f"[team-host] kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    if failed is not None:
        print(f"[team-host] FAILED: {failed}", file=sys.stderr)
    return 0 if ok else 1

