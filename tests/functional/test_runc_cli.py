"""runc's command line, differentially: runc (1.1) and this runtime run the same way on the same
bundle, and their exit codes, stdout and stderr are compared (ids equal; pids, times, ociVersion
and the guest's values normalised). Where an output is a layout (list's tabwriter, ps's
columns), runc's own output is fed back to this runtime's formatter and must come out the same.

Two VMs: one container taken through created -> running -> stopped, and one `run --keep`.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import RUNTIME, rt

RUNC = shutil.which("runc")
pytestmark = pytest.mark.skipif(RUNC is None, reason="runc is not installed")
CID = "diff-c1"
NAMES = (CID, "kept", "dbg", "nosuch")
LOG_TIME = re.compile(r'time="[^"]+"|"time":"[^"]+"')
ENV = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}  # ps's width


class Cli:
    """One runtime's command line with a private --root and its own container ids (the same
    length as the test's): runc's default cgroup path is the id, and a runtime that mirrors
    it must not share (and freeze) runc's. Its ids in the output read as the test's."""

    def __init__(self, argv0, root, tag):
        self.argv0, self.root, self.tag = argv0, root, tag

    def cid(self, name):
        """This runtime's id for the test's container name."""
        return name[:-1] + self.tag

    def __call__(self, *args, pass_fds=(), timeout=120):
        """(exit code, stdout, stderr) of one call; output through files (monitors keep it)."""
        ids = {self.cid(n): n for n in NAMES}
        args = [self.cid(a) if a in NAMES else str(a) for a in args]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            p = subprocess.run(self.argv0 + ["--root", self.root] + args,
                               stdin=subprocess.DEVNULL, stdout=out, stderr=err, timeout=timeout,
                               pass_fds=pass_fds, env=ENV, cwd=os.path.dirname(self.root))
            out.seek(0)
            err.seek(0)
            texts = [out.read().decode(), LOG_TIME.sub(_no_time, err.read().decode())]
        for mine, name in ids.items():
            texts = [t.replace(mine, name) for t in texts]
        return p.returncode, texts[0], texts[1]


@pytest.fixture
def pair(rootfs, tmp_path):
    """(runc, ours, bundle): both CLIs and one bundle (runc's spec, sleep, no terminal)."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    conf = rt.runc_spec()
    conf["root"] = {"path": rootfs, "readonly": False}
    conf["process"].update(terminal=False, args=["sleep", "300"])
    (bundle / "config.json").write_text(json.dumps(conf))
    runc = Cli([RUNC], str(tmp_path / "runc-root"), "R")
    ours = Cli([sys.executable, RUNTIME], str(tmp_path / "our-root"), "O")
    yield runc, ours, str(bundle)
    for cli in (runc, ours):
        for cid in (os.listdir(cli.root) if os.path.isdir(cli.root) else []):
            subprocess.run(cli.argv0 + ["--root", cli.root, "delete", "--force", cid],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=120)


def _no_time(match):
    """A log line's time, blanked (text or JSON)."""
    return 'time="T"' if match.group(0).startswith("time=") else '"time":"T"'


def both(pair, *args, **kw):
    """The results of the same call to runc and to this runtime."""
    runc, ours, _ = pair
    return runc(*args, **kw), ours(*args, **kw)


def same(pair, *args, **kw):
    """Assert that runc and this runtime give the same (code, stdout, stderr); return it."""
    theirs, mine = both(pair, *args, **kw)
    assert mine == theirs, args
    return mine


def table(text):
    """The cells of a whitespace-aligned table, a list per line."""
    return [line.split() for line in text.splitlines()]


def test_container_commands_match_runc(pair):
    runc, ours, bundle = pair
    for cli in (runc, ours):
        assert cli("create", "-b", bundle, CID)[0] == 0
    # exec into a created container (runc runs it), with additional gids and a uid
    same(pair, "exec", CID, "echo", "in-created")
    same(pair, "exec", "-u", "1000", "-g", "5", "-g", "7", CID, "id")
    same(pair, "kill", CID, "0")
    for argv in (["pause", CID], ["start", CID], ["pause", CID], ["resume", CID]):
        same(pair, *argv)  # a created container pauses; start refuses a paused one
    for cli in (runc, ours):
        assert cli("start", CID) == (0, "", "")
    st_theirs, st_mine = runc("state", CID)[1], ours("state", CID)[1]
    _check_state(st_theirs, st_mine)
    _check_list(pair)
    # signals: 0 is the liveness check; unknown names and numbers fail as runc's do
    for argv in (["kill", CID, "0"], ["kill", "--all", CID, "0"], ["kill", CID, "FOO"],
                 ["kill", CID, "99"], ["kill", "nosuch", "KILL"]):
        same(pair, *argv)
    # exec: flags, errors and exit codes (255 and "exec failed: ..." when it cannot run)
    for argv in (["exec", CID], ["exec", "-u", "x", CID, "true"], ["exec", "-g", "-1", CID, "true"],
                 ["exec", "--preserve-fds=1", CID, "sh", "-c", "echo kept; exit 3"],
                 ["exec", "--cwd", "/tmp", "-e", "A=b", CID, "sh", "-c", "echo $A; pwd"],
                 ["exec", "nosuch", "true"]):
        same(pair, *argv)
    assert both(pair, "exec", "-g", "x", CID, "true")[1][0] == runc("exec", "-g", "x", CID,
                                                                      "true")[0] == 1
    _check_process_file_from_fd(pair)
    _check_ps(pair)
    _check_events(pair)
    for argv in (["list", "-f", "xml"], ["ps", "-f", "xml", CID], ["resume", CID], ["delete", CID],
                 ["events", "--interval", "0", CID], ["state", "nosuch"],
                 ["--log-format", "xml", "list"]):
        same(pair, *argv)
    # checkpoint: runc's criu 3.17 cannot run on this host's kernel (kerndat fails); ours runs
    # criu in the VM, and --leave-running leaves the container running for the rest
    images = os.path.join(os.path.dirname(ours.root), "ckpt")
    code = ours("checkpoint", "--leave-running", "--image-path", images, CID)[0]
    assert code == (0 if rt.find_tool("criu") else 1)
    assert os.path.exists(os.path.join(images, "inventory.img")) == (code == 0)
    assert json.loads(ours("state", CID)[1])["status"] == "running"
    for cli in (runc, ours):
        assert cli("kill", CID, "KILL")[0] == 0
        assert _poll(lambda: json.loads(cli("state", CID)[1])["status"] == "stopped")
    for argv in (["kill", CID, "0"], ["start", CID], ["events", "--stats", CID], ["events", CID],
                 ["pause", CID]):
        same(pair, *argv)
    same(pair, "exec", CID, "true")
    same(pair, "ps", "--format", "json", CID)
    assert table(ours("ps", CID)[1]) == table(runc("ps", CID)[1])  # the header alone
    same(pair, "delete", CID)
    same(pair, "delete", CID)


def _poll(fn, timeout=30):
    """Call fn until it is true (or time runs out); its last value."""
    import time
    deadline = time.monotonic() + timeout
    while not fn() and time.monotonic() < deadline:
        time.sleep(0.2)
    return fn()


def _check_state(theirs, mine):
    """state: runc's bytes once pid, created and ociVersion are this runtime's."""
    t, m = json.loads(theirs), json.loads(mine)
    assert list(t) == list(m) and t["status"] == m["status"] == "running"
    expected = theirs
    for key in ("pid", "created", "ociVersion"):
        expected = expected.replace(json.dumps(t[key]), json.dumps(m[key]), 1)
    assert mine == expected


def _check_list(pair):
    """list: json is runc's encoding; the table is runc's tabwriter layout."""
    runc, ours, _ = pair
    t, m = runc("list", "-f", "json"), ours("list", "-f", "json")
    assert (t[0], m[0]) == (0, 0) and m[1].endswith("\n") and "\n" not in m[1][:-1]
    (ts,), (ms,) = json.loads(t[1]), json.loads(m[1])
    assert list(ts) == list(ms) and ms["owner"] == ts["owner"]
    assert rt.go_json([ts]) + "\n" == t[1] and rt.go_json([ms]) + "\n" == m[1]
    for cli in (runc, ours):
        code, out, err = cli("list")
        rows = table(out)
        assert code == 0 and rows[0] == ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"]
        assert rt.tabwriter([tuple(r) for r in rows]) == out  # runc's layout, reproduced
    assert same(pair, "list", "-q")[1] == CID + "\n"


def _check_process_file_from_fd(pair):
    """exec -p /dev/fd/N: the process file is an inherited pipe (`-p <(...)` in a shell)."""
    results = []
    for cli in pair[:2]:
        r, w = os.pipe()
        process = {"args": ["echo", "from-fd"], "cwd": "/", "env": ["PATH=/bin"]}
        os.write(w, json.dumps(process).encode())
        os.close(w)
        try:
            results.append(cli("exec", "-p", "/dev/fd/%d" % r, CID, pass_fds=(r,)))
        finally:
            os.close(r)
    assert results[1] == results[0] == (0, "from-fd\n", "")


def _check_ps(pair):
    """ps: the table is ps -ef's (header byte for byte); options after the id are ps's."""
    runc, ours, _ = pair
    for opts in ([], ["-e", "-x"], ["aux"], ["-o", "pid,comm,stat"], ["-ef"],
                 ["-o", "pid=PID,args=X"]):
        t, m = runc("ps", CID, *opts), ours("ps", CID, *opts)
        assert (t[0], m[0], t[2], m[2]) == (0, 0, "", ""), (opts, t, m)
        t_lines, m_lines = t[1].splitlines(), m[1].splitlines()
        assert m_lines[0] == t_lines[0], opts
        assert len(m_lines) == len(t_lines) == 2, (opts, t[1], m[1])
        t_row, m_row = t_lines[1].split(), m_lines[1].split()
        assert len(t_row) == len(m_row), (opts, t_row, m_row)
        head = t_lines[0].split()
        for name, a, b in zip(head, t_row, m_row):
            if name in ("UID", "USER", "TTY", "CMD", "COMMAND", "X"):
                assert a == b, (opts, name)
    code, out, err = ours("ps", CID)
    (row,) = table(out)[1:]
    assert row[1:3] == ["1", "0"]  # the container's own pids: its process is PID 1
    for opts in (["-o", "comm"], ["-o", "pid=,args"], ["--no-headers"]):
        same(pair, "ps", CID, *opts)  # no PID in the header: runc cannot filter the rows
    t, m = runc("ps", "--format", "json", CID), ours("ps", "--format", "json", CID)
    for out in (t[1], m[1]):
        assert out == rt.go_json(json.loads(out)) + "\n"


def _check_events(pair):
    """events --stats: one compact JSON line, the same envelope as runc's."""
    runc, ours, _ = pair
    t, m = runc("events", "--stats", CID), ours("events", "--stats", CID)
    assert (t[0], m[0]) == (0, 0)
    te, me = json.loads(t[1]), json.loads(m[1])
    assert list(te) == list(me) == ["type", "id", "data"] and te["id"] == me["id"] == CID
    assert t[1] == rt.go_json(te) + "\n" and m[1] == rt.go_json(me) + "\n"


def test_run_keep_and_commands_without_a_container(pair, tmp_path):
    runc, ours, bundle = pair
    conf = json.loads((tmp_path / "bundle" / "config.json").read_text())
    conf["process"]["args"] = ["sh", "-c", "exit 3"]
    (tmp_path / "bundle" / "config.json").write_text(json.dumps(conf))
    assert same(pair, "run", "--keep", "-b", bundle, "kept")[0] == 3
    for cli in (runc, ours):
        assert json.loads(cli("state", "kept")[1])["status"] == "stopped"
    same(pair, "delete", "kept")
    for argv in (["help"], ["h", "kill"], ["help", "exec"], ["--help"]):
        t, m = both(pair, *argv)
        assert (t[0], m[0], t[2], m[2]) == (0, 0, "", "") and m[1]
    for argv in (["bogus"], ["state"], ["list", "--bogus"], ["kill"]):
        t, m = both(pair, *argv)
        assert m[0] == t[0], argv
    t, m = both(pair, "features")
    assert (t[0], m[0]) == (0, 0)
    assert t[1] == rt.go_json(json.loads(t[1]), indent=4) + "\n"
    assert m[1] == rt.go_json(json.loads(m[1]), indent=4) + "\n"
    for flags in ([], ["--rootless"]):
        outs = []
        for cli, d in ((runc, tmp_path / "s-runc"), (ours, tmp_path / "s-ours")):
            d.mkdir(exist_ok=True)
            assert cli("spec", "-b", d, *flags) == (0, "", "")
            outs.append((d / "config.json").read_text())
            (d / "config.json").unlink()
        assert outs[1] == outs[0].replace('"1.0.2-dev"', json.dumps(rt.OCI_VERSION)), flags
    (tmp_path / "s-runc" / "config.json").write_text("{}")
    (tmp_path / "s-ours" / "config.json").write_text("{}")
    assert runc("spec", "-b", tmp_path / "s-runc") == ours("spec", "-b", tmp_path / "s-ours")
    assert runc("spec", "-b", tmp_path / "nope") == ours("spec", "-b", tmp_path / "nope")


def test_debug_and_log_formats_match_runc(pair, tmp_path):
    """--debug without --log writes level=debug lines on stderr; --log json lines are runc's."""
    runc, ours, bundle = pair
    for cli in (runc, ours):
        code, out, err = cli("--debug", "run", "-d", "-b", bundle, "dbg")
        assert code == 0 and out == ""
        assert any(line.startswith('time="T" level=debug msg=') for line in err.splitlines()), err
        cli("delete", "--force", "dbg")
    logs = []
    for cli, name in ((runc, "runc.json"), (ours, "ours.json")):
        log = tmp_path / name
        assert cli("--log", log, "--log-format", "json", "kill", "nosuch") == \
            (1, "", "container does not exist\n")
        logs.append(LOG_TIME.sub(_no_time, log.read_text()))
    assert logs[1] == logs[0] == '{"level":"error","msg":"container does not exist","time":"T"}\n'
    for fmt in ("text", "json"):
        same(pair, "--log-format", fmt, "kill", "nosuch")
