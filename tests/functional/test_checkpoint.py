"""Checkpoint and restore: CRIU in the guest dumps the container's process tree into an image
directory on the host, and a new VM restores it (runc's command line; see README.md,
"Checkpoint and restore"). Needs criu on the host (the guest image carries it)."""
import json
import os

import pytest

from conftest import rt

pytestmark = pytest.mark.skipif(rt.find_tool("criu") is None, reason="no criu on the host")


def request(runtime, cid, msg, timeout=300):
    """One request to a container's monitor (what the CLI sends), its reply."""
    state = rt.State(runtime.root, cid)
    state.load()
    return rt.monitor_request(state, msg, timeout=timeout)


def test_criu_check_passes_in_the_guest(runtime):
    runtime("run", "-d", "-b", runtime.bundle(["sleep", "300"]), "ck0", check=True)
    reply = request(runtime, "ck0", {"op": "criu_check"})
    assert reply["status"] == 0 and "Looks good." in reply["output"], reply["output"]


def test_checkpoint_leave_running_and_without(runtime, tmp_path):
    runtime("run", "-d", "-b", runtime.bundle(["sleep", "300"]), "ck1", check=True)
    kept = tmp_path / "kept"
    r = runtime("checkpoint", "--leave-running", "--image-path", kept, "ck1")
    assert r.returncode == 0, r.stderr
    for name in ("inventory.img", "pstree.img", "descriptors.json", "dump.log"):
        assert (kept / name).exists(), name
    assert json.loads((kept / "descriptors.json").read_text())[1].startswith("pipe:[")
    assert runtime.state("ck1")["status"] == "running"
    assert not os.listdir(os.path.join(runtime.root, "ck1", "members")), "slot given back"
    gone = tmp_path / "gone"
    r = runtime("checkpoint", "--image-path", gone, "ck1")
    assert r.returncode == 0, r.stderr
    assert (gone / "inventory.img").exists()
    r = runtime("state", "ck1")
    assert r.returncode == 1 and "container does not exist" in r.stderr


def test_checkpoint_refuses_created_and_missing_as_runc(runtime, tmp_path):
    runtime("create", "-b", runtime.bundle(["sleep", "300"]), "ck2", check=True)
    r = runtime("checkpoint", "--image-path", tmp_path / "img", "ck2")
    assert r.returncode == 1 and "Container cannot be checkpointed in created state" in r.stderr
    r = runtime("checkpoint", "--image-path", tmp_path / "img", "nosuch")
    assert r.returncode == 1 and "container does not exist" in r.stderr
    assert runtime.state("ck2")["status"] == "created"


def test_checkpoint_of_a_paused_container_leaves_it_paused(runtime, tmp_path):
    runtime("run", "-d", "-b", runtime.bundle(["sleep", "300"]), "ck3", check=True)
    runtime("pause", "ck3", check=True)
    r = runtime("checkpoint", "--leave-running", "--image-path", tmp_path / "img", "ck3")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "img" / "inventory.img").exists()
    assert runtime.state("ck3")["status"] == "paused"
    runtime("resume", "ck3", check=True)
    assert runtime("exec", "ck3", "true").returncode == 0
