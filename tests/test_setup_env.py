"""`make setup` is idempotent: a current stamp means no work, and the stamp follows the lock file."""
from __future__ import annotations

from workspace import setup_env
from workspace.paths import ROOT


def test_stamps_are_current_and_rebuild_is_a_no_op():
    for env in setup_env.CPU_ENVS:  # the CUDA variants are built by `make setup GPU=1` on a GPU machine only
        assert setup_env.build(env) is False, f"{env} was rebuilt: its stamp does not match its lock"


def test_stamp_key_follows_the_lock_contents(tmp_path, monkeypatch):
    lock = tmp_path / "train.lock"
    lock.write_text("torch==2.13.0+cpu\n")
    monkeypatch.setattr(setup_env, "REQ", tmp_path)
    a = setup_env.stamp_key("train")
    lock.write_text("torch==2.13.0+cpu\npeft==0.18.1\n")
    assert setup_env.stamp_key("train") != a


def test_locks_pin_every_package_exactly_and_exclude_broken_cuda_builds():
    for name in ("workspace.lock", "train.lock", "serve.lock"):
        lines = [l for l in (ROOT / "requirements" / name).read_text().splitlines() if l and not l.startswith("#")]
        assert lines, name
        assert all("==" in l for l in lines), f"{name}: unpinned line"
        names = {l.split("==")[0].lower() for l in lines}
        assert "torch" in names
        assert not names & {"torchvision", "torchcodec", "triton"}, f"{name} holds a CUDA-only package"
        assert not any(n.startswith("nvidia-") for n in names), f"{name} pulls CUDA libraries"
