"""Bad input through the CLI: one clear error, non-zero exit, nothing left behind."""
import json
import os
import subprocess

import pytest

from conftest import RUNTIME, rt

BROKEN = [  # (change to a good config, text the error must contain)
    ({"process": {"args": []}}, "process.args: must be a non-empty list of strings"),
    ({"process": {"args": "sh"}}, "process.args"),
    ({"process": {"args": ["sh"], "env": ["NOEQUALS"]}}, "process.env"),
    ({"process": {"args": ["sh"], "cwd": "relative"}}, "process.cwd: must be an absolute path"),
    ({"process": {"args": ["sh"], "user": {"uid": -1}}}, "process.user.uid"),
    ({"process": {"args": ["sh"], "rlimits": [{"type": "RLIMIT_BOGUS", "soft": 1, "hard": 1}]}},
     "process.rlimits[0].type"),
    ({"process": {"args": ["sh"], "terminal": "yes"}}, "process.terminal: must be a boolean"),
    ({"root": {"path": "/no/such/rootfs"}}, "root.path"),
    ({"root": "rootfs"}, "root: must be an object"),
    ({"ociVersion": 1}, "ociVersion"),
    ({"mounts": [{"destination": "relative", "type": "tmpfs"}]}, "mounts[0].destination"),
    ({"mounts": [{"destination": "/x", "type": "bind", "source": "/no/such/dir"}]},
     "mounts[0].source"),
    ({"hostname": 7}, "hostname: must be a string"),
    ({"hooks": {"prestart": [{"path": "relative"}]}}, "hooks.prestart[0].path"),
    ({"annotations": {"a": 1}}, "annotations.a"),
    ({"linux": {"namespaces": [{"type": "bogus"}]}}, "linux.namespaces[0].type"),
    ({"linux": {"namespaces": [{"type": "network", "path": "/no/such/ns"}]}},
     "linux.namespaces[0].path"),
    ({"vm": {"accel": "warp"}}, "vm.accel"),
    ({"vm": {"path": "/no/such/qemu"}}, "QEMU not found"),
    ({"vm": {"kernel": {"path": "/no/such/kernel"}}}, "vm.kernel.path"),
]


def _create(tmp_path, conf_text, cid="bad"):
    root, log = tmp_path / "root", tmp_path / "log.json"
    r = subprocess.run([RUNTIME, "--root", str(root), "--log", str(log), "--log-format=json",
                        "create", "-b", str(tmp_path), cid], capture_output=True, text=True,
                       timeout=60)
    return r, root, log


def _assert_clean_failure(r, root, log, text):
    assert r.returncode != 0
    assert text in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    lines = [json.loads(ln) for ln in log.read_text().splitlines()]
    errors = [ln for ln in lines if ln["level"] == "error"]
    assert len(errors) == 1 and errors[0]["msg"] == r.stderr.strip()
    assert not root.exists() or os.listdir(root) == []


@pytest.mark.parametrize("change,text", BROKEN, ids=[t for _, t in BROKEN])
def test_broken_config_is_refused_cleanly(tmp_path, rootfs, change, text):
    conf = rt.default_spec()
    conf["root"]["path"] = rootfs
    conf["process"]["terminal"] = False
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(conf.get(key), dict) and key != "root":
            conf[key].update(value)
        else:
            conf[key] = value
    (tmp_path / "config.json").write_text(json.dumps(conf))
    _assert_clean_failure(*_create(tmp_path, None), text)


@pytest.mark.parametrize("content,text", [
    (None, "no such file or directory"), ("{not json", "invalid JSON"), ("[]", "JSON object"),
    ('{"root": {"path": "rootfs"}}', "ociVersion: missing")])
def test_missing_or_invalid_config_json(tmp_path, content, text):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    _assert_clean_failure(*_create(tmp_path, content), text)


def test_bad_container_ids(tmp_path):
    for cid, text in (("a/b", "invalid container id"), ("..", "invalid container id")):
        r, root, log = _create(tmp_path, None, cid)
        log.unlink()
        r, root, log = _create(tmp_path, None, cid)
        _assert_clean_failure(r, root, log, text)


def test_missing_bundle(tmp_path):
    r = subprocess.run([RUNTIME, "--root", str(tmp_path / "root"), "create", "-b",
                        str(tmp_path / "nope"), "x"], capture_output=True, text=True)
    assert r.returncode == 1 and "no such directory" in r.stderr
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("command", ["create", "start", "run", "state", "kill", "delete", "list",
                                     "spec", "features", "version", "check"])
def test_every_command_has_help(command):
    r = subprocess.run([RUNTIME, command, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("usage: cc-oci-runtime " + command)
