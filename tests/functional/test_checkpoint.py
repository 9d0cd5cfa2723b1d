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
