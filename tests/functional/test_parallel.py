"""Many containers at once (issue 8): ten VMs created, started, used and deleted in parallel.

No timing assertions: on a loaded 2-core TCG host ten parallel restores can take tens of
seconds, so every call gets a generous timeout and only the outcome is checked."""
import json
import os
from concurrent.futures import ThreadPoolExecutor

from conftest import Runtime, poll, rt

N = 10
TIMEOUT = 600  # seconds per CLI call: ten VMs share two TCG cores


def _naming(path):
    """Live (non-zombie) pids whose command line names path or whose cwd is under it."""
    found = []
    for e in os.listdir("/proc"):
        if not e.isdigit() or int(e) == os.getpid():
            continue
        try:
            with open("/proc/%s/stat" % e) as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            with open("/proc/%s/cmdline" % e, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink("/proc/%s/cwd" % e)
        except OSError:
            continue
        if path in cmd or cwd == path or cwd.startswith(path + "/"):
            found.append((int(e), cmd[:200]))
    return found


def _parallel(fn, items):
    """fn(item) for every item on N threads; the results in order (the first error raised)."""
    with ThreadPoolExecutor(max_workers=N) as pool:
        return list(pool.map(fn, items))


def test_ten_containers_in_parallel(runtime, tmp_path):
    root = str(tmp_path / "root")  # a private --root: `list` and the process scan see only ours
    os.mkdir(root)
    r = Runtime(root, tmp_path)
    bundle = runtime.bundle(["sleep", "1000"])
    ids = ["par%d" % i for i in range(N)]
    pid_files = {cid: tmp_path / ("%s.pid" % cid) for cid in ids}
    monitors, qemus = {}, {}

    def up(cid):
        c = r("create", "-b", bundle, "--pid-file", pid_files[cid], cid, timeout=TIMEOUT)
        assert c.returncode == 0, (cid, "create", c.stderr)
        s = r("start", cid, timeout=TIMEOUT)
        assert s.returncode == 0, (cid, "start", s.stderr)

    def down(cid):
        d = r("delete", "--force", cid, timeout=TIMEOUT)
        assert d.returncode == 0, (cid, "delete", d.stderr)

    try:
        _parallel(up, ids)
        for cid in ids:
            st = r.state(cid)
            assert (st["id"], st["status"]) == (cid, "running"), st
            monitors[cid] = int(pid_files[cid].read_text())
            assert st["pid"] == monitors[cid]
            with open(os.path.join(root, cid, "state.json")) as f:
                vm = json.load(f)["vm"]  # the monitor's child, or a pooled VM's (its keeper's)
            qemus[cid] = vm["qemu_pid"]
            assert rt.process_alive(vm["qemu_pid"], vm["qemu_start"]), "%s: no QEMU" % cid
            assert vm.get("pool_dir") or rt.host_child_pid(monitors[cid]) == vm["qemu_pid"]
        listing = json.loads(r("list", "-f", "json", check=True).stdout)
        assert sorted((c["id"], c["status"]) for c in listing) == [(c, "running") for c in sorted(ids)]

        def answer(cid):
            e = r("exec", cid, "sh", "-c", "echo $0; pidof sleep", cid, input="", timeout=TIMEOUT)
            return e.returncode, e.stdout.split()[:1], e.stderr
        answers = _parallel(answer, ids)
        assert [a[:2] for a in answers] == [(0, [cid]) for cid in ids], answers

        _parallel(down, ids)
    finally:
        for cid in ids:
            if os.path.exists(os.path.join(root, cid)):
                r("delete", "--force", cid, timeout=TIMEOUT)
    assert os.listdir(root) == []
    assert r("list", "-q", check=True).stdout == ""
    pids = set(monitors.values()) | set(qemus.values())
    assert poll(lambda: not [p for p in pids if rt.process_alive(p)], timeout=30), \
        "still alive: %s" % [p for p in pids if rt.process_alive(p)]
    assert poll(lambda: not _naming(root), timeout=30), _naming(root)
