"""The environment runner: live output, failures with exit code and tail, timeouts that kill the group."""
from __future__ import annotations

import time

import pytest

from workspace.envrunner import EnvCommandError, EnvMissingError, EnvTimeoutError, run_in_env


def test_success_streams_lines_to_callback_and_log(tmp_path):
    seen: list[str] = []
    log = tmp_path / "run.log"
    res = run_in_env("train", ["python", "-c", "import sys, torch; print('line-1'); print('torch', torch.__version__)"],
                     timeout=120, log_path=log, on_line=seen.append, echo=False)
    assert res.returncode == 0
    assert seen[0] == "line-1" and seen[1].startswith("torch 2.13.0")
    assert "line-1" in log.read_text()


def test_offline_variables_reach_the_child():
    seen: list[str] = []
    run_in_env("serve", ["python", "-c", "import os; print(os.environ['HF_HUB_OFFLINE'], os.environ['DO_NOT_TRACK'])"],
               timeout=60, on_line=seen.append, echo=False)
    assert seen == ["1 1"]


def test_failure_reports_exit_code_and_last_lines(tmp_path):
    code = "import sys\nfor i in range(100): print('out', i)\nsys.exit(3)"
    with pytest.raises(EnvCommandError) as err:
        run_in_env("train", ["python", "-c", code], timeout=60, log_path=tmp_path / "f.log", echo=False, what="demo")
    exc = err.value
    assert exc.returncode == 3
    assert exc.tail[-1] == "out 99" and len(exc.tail) == 40
    assert "demo (in the train environment) failed with exit code 3" in str(exc)
    assert "out 99" in str(exc) and str(tmp_path / "f.log") in str(exc)


def test_timeout_kills_the_process_group(tmp_path):
    marker = tmp_path / "child.pid"
    # the parent spawns a grandchild that would outlive a plain kill of the parent
    code = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        f"open({str(marker)!r}, 'w').write(str(p.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(300)\n"
    )
    with pytest.raises(EnvTimeoutError) as err:  # raised by the timeout path, not after the child's 300 s
        run_in_env("workspace", ["python", "-c", code], timeout=5, echo=False)
    assert "did not finish within 5 s" in str(err.value) and "started" in err.value.tail
    pid = int(marker.read_text())
    time.sleep(0.5)
    assert not _alive(pid), "the grandchild survived the timeout"


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for init to reap it)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            state = next(line for line in fh if line.startswith("State:"))
    except FileNotFoundError:
        return False
    return "Z" not in state.split()[1]


def test_missing_program_explains_the_fix():
    with pytest.raises(EnvMissingError, match="make setup"):
        run_in_env("train", ["no-such-program"], timeout=5)
    with pytest.raises(EnvMissingError, match="unknown environment"):
        run_in_env("nope", ["python"], timeout=5)


def test_a_kill_is_not_called_out_of_memory(tmp_path):
    """A child killed by SIGKILL while the kernel's oom_kill counter stays put is reported as killed by signal 9,
    not as out of memory, and the finetune stage does not advise QLoRA to a QLoRA run."""
    from finetune.train import explain_failure
    from workspace.processes import oom_kill_count

    assert oom_kill_count() is not None  # this machine exposes the counter (cgroup or /proc/vmstat)
    code = "import os, signal; print('training step 3', flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    with pytest.raises(EnvCommandError) as err:
        run_in_env("train", ["python", "-c", code], timeout=60, log_path=tmp_path / "k.log", echo=False, what="training")
    exc = err.value
    assert exc.returncode == -9 and exc.oom_killed is False
    assert "killed by signal 9 (SIGKILL); no out-of-memory kill was recorded" in str(exc)
    assert "out of memory" not in str(exc).replace("out-of-memory kill was recorded", "")
    why = explain_failure(exc, tmp_path / "k.log", method="qlora")
    assert "killed by signal 9 (SIGKILL)" in why and "ran out of memory" not in why and "use method qlora" not in why
    assert "resumes" in why


PARENT = """
import sys, threading, time
from pathlib import Path
from workspace.envrunner import run_in_env
from workspace.processes import ManagedProcess
out, port = Path(sys.argv[1]), int(sys.argv[2])
server = ManagedProcess(["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1"], log_path=out / "server.log",
                        health_url=f"http://127.0.0.1:{port}/")
server.start(timeout=60)
(out / "server.pgid").write_text(str(server.pid))
code = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)"
threading.Thread(target=run_in_env, args=("workspace", ["python", "-c", code, str(out / "job.pid")]),
                 kwargs={"echo": False}, daemon=True).start()
while not (out / "job.pid").exists():
    time.sleep(0.1)
print("ready", flush=True)
time.sleep(600)
"""


def test_children_die_with_a_parent_killed_by_sigkill(tmp_path):
    """A server (ManagedProcess, as vLLM) and a one-shot job (run_in_env, as training, started from a worker thread)
    are gone, and the port free, within seconds of their parent's SIGKILL."""
    import os
    import signal
    import subprocess
    import sys

    from workspace.paths import ROOT
    from workspace.processes import free_port, port_is_free

    port = free_port()
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path), str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        server_group = int((tmp_path / "server.pgid").read_text())
        job = int((tmp_path / "job.pid").read_text())
        assert _alive(job) and not port_is_free("127.0.0.1", port)
        os.kill(parent.pid, signal.SIGKILL)  # no handler, no cleanup: only what the children do themselves
        parent.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (_alive(job) or _group_alive(server_group)):
            time.sleep(0.2)
        assert not _alive(job), "the job outlived its parent"
        assert not _group_alive(server_group), "the server outlived its parent"
        assert port_is_free("127.0.0.1", port)
    finally:
        for pgid in [parent.pid] + ([server_group] if "server_group" in locals() else []):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if "job" in locals() and _alive(job):
            os.kill(job, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    from workspace.guard import process_table

    return any(group == pgid and state != b"Z" for _, group, state in process_table().values())


@pytest.mark.slow  # a whole flow command (Prefect's temporary server)
def test_a_killed_command_takes_prefects_temporary_server_with_it(tmp_path):
    """`make prepare` (any flow command) runs under the guard: killed by SIGKILL, the temporary Prefect API server
    that Prefect itself started for the run (a uvicorn process the workspace does not manage) goes too."""
    import os
    import signal
    import subprocess
    import sys

    from workspace.paths import ROOT

    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"))
    env.pop("LLMOPS_GUARD_PID", None)
    guard = subprocess.Popen([sys.executable, "-m", "llmops", "prepare", "--force", "--set", f"data.output_dir={tmp_path}"],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, flow, server = time.monotonic() + 120, None, None
        while time.monotonic() < deadline and server is None:
            kids = _children(guard.pid)
            flow = next((k for k in kids if "llmops prepare" in _cmdline(k)), None)
            server = next((k for k in _children(flow) if "uvicorn" in _cmdline(k)), None) if flow else None
            assert guard.poll() is None, "the command ended before its Prefect server was seen"
            time.sleep(0.1)
        assert flow and server, "no temporary Prefect server seen under the command"
        os.kill(flow, signal.SIGKILL)
        assert guard.wait(timeout=30) == -signal.SIGKILL  # the guard reports the kill as what it was
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _alive(server):
            time.sleep(0.2)
        assert not _alive(server), "Prefect's temporary server outlived the killed command"
    finally:
        try:
            os.killpg(guard.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _children(pid: int) -> list[int]:
    from workspace.guard import process_table

    return [child for child, (ppid, _, _) in process_table().items() if ppid == pid]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
