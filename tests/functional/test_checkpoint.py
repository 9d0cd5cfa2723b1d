"""Checkpoint and restore: CRIU in the guest dumps the container's process tree into an image
directory on the host, and a new VM restores it (runc's command line; see README.md,
"Checkpoint and restore"). Needs criu on the host (the guest image carries it): make deps installs it, host_needs.py checks it."""
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest

from conftest import RUNTIME, poll, rt



def request(runtime, cid, msg, timeout=300):
    """One request to a container's monitor (what the CLI sends), its reply."""
    state = rt.State(runtime.root, cid)
    state.load()
    return rt.monitor_request(state, msg, timeout=timeout)


def vm_status(runtime, cid):
    """The container's VM as QEMU reports it (running, paused, ...)."""
    q = rt.Qmp(os.path.join(runtime.root, cid))
    try:
        return q.call("query-status")["status"]
    finally:
        q.close()


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
    gone, work = tmp_path / "gone", tmp_path / "work"
    r = runtime("checkpoint", "--image-path", gone, "--work-path", work, "ck1")
    assert r.returncode == 0, r.stderr
    assert (gone / "inventory.img").exists() and not (gone / "dump.log").exists()
    assert (work / "dump.log").exists(), "criu's log in the work directory"
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
    r = runtime("checkpoint", "--parent-path", "/x", "--image-path", tmp_path / "bad", "ck3")
    assert r.returncode == 1 and "must name a sibling" in r.stderr
    assert vm_status(runtime, "ck3") == "paused", "the VM stopped again after a failed checkpoint"
    r = runtime("checkpoint", "--leave-running", "--image-path", tmp_path / "img", "ck3")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "img" / "inventory.img").exists()
    assert runtime.state("ck3")["status"] == "paused" and vm_status(runtime, "ck3") == "paused"
    runtime("resume", "ck3", check=True)
    assert runtime("exec", "ck3", "true").returncode == 0


COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /vol/count; sleep 0.2; done"


def counter_bundle(runtime, vol):
    """A bundle whose shell counts in memory and writes the count to /vol/count (a volume)."""
    mounts = rt.default_spec()["mounts"] + [
        {"destination": "/vol", "type": "bind", "source": str(vol), "options": ["rbind", "rw"]}]
    return runtime.bundle(["sh", "-c", COUNTER], mounts=mounts)


def count(vol):
    """The counter's last value (0 when unreadable)."""
    try:
        return int((vol / "count").read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def test_restore_continues_the_count_under_a_new_id_and_bundle(runtime, tmp_path):
    vol = tmp_path / "vol"
    vol.mkdir()
    runtime("run", "-d", "-b", counter_bundle(runtime, vol), "cnt1", check=True)
    assert poll(lambda: count(vol) >= 5)
    kept = tmp_path / "kept"
    r = runtime("checkpoint", "--leave-running", "--image-path", kept, "cnt1")
    assert r.returncode == 0, r.stderr
    before = count(vol)
    assert poll(lambda: count(vol) > before + 2), "--leave-running: still counting"
    images = tmp_path / "images"
    r = runtime("checkpoint", "--image-path", images, "cnt1")
    assert r.returncode == 0, r.stderr
    assert runtime("state", "cnt1").returncode == 1, "checkpointed without --leave-running: gone"
    dumped = count(vol)
    (vol / "count").write_text("0\n")  # a count from zero would write 1, 2, ... here
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(os.path.join(counter_bundle(runtime, vol), "config.json"), moved)
    pid_file = tmp_path / "restored.pid"
    t0 = time.monotonic()
    r = runtime("restore", "-d", "-b", moved, "--image-path", images, "--pid-file", pid_file, "cnt2")
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    state = runtime.state("cnt2")
    assert state["status"] == "running" and state["bundle"] == str(moved)
    assert int(pid_file.read_text()) == state["pid"]
    assert poll(lambda: count(vol) > 0)
    assert dumped < count(vol) < dumped + 100, "continues from %d, not from zero" % dumped
    print("restore took %.1f s" % took)
    # restore onto an existing id: runc's error; the running one is untouched
    r = runtime("restore", "-d", "-b", moved, "--image-path", images, "cnt2")
    assert r.returncode == 1 and "container with given ID already exists" in r.stderr
    assert runtime.state("cnt2")["status"] == "running"
    # the first image (--leave-running) restores too, beside the running one
    r = runtime("restore", "-d", "-b", moved, "--image-path", kept, "--work-path", tmp_path / "w3",
                "cnt3")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "w3" / "restore.log").exists() and not (kept / "restore.log").exists()
    assert runtime("exec", "cnt3", "cat", "/vol/count").returncode == 0


def test_restore_of_a_missing_or_corrupt_image_leaves_nothing(runtime, tmp_path):
    bundle = runtime.bundle(["sleep", "300"])
    r = runtime("restore", "-d", "-b", bundle, "--image-path", tmp_path / "none", "bad1")
    assert r.returncode == 1
    assert r.stderr.count("level=error") == 1
    assert "%s: no such file or directory" % (tmp_path / "none" / "descriptors.json") in r.stderr
    assert "bad1" not in os.listdir(runtime.root)
    runtime("run", "-d", "-b", bundle, "good", check=True)
    images = tmp_path / "images"
    runtime("checkpoint", "--leave-running", "--image-path", images, "good", check=True)
    (images / "pstree.img").write_bytes(b"\0garbage")
    pid_file = tmp_path / "bad2.pid"
    r = runtime("restore", "-d", "-b", bundle, "--image-path", images, "--pid-file", pid_file, "bad2")
    assert r.returncode == 1 and r.stderr.count("level=error") == 1
    assert "criu failed" in r.stderr and "restore.log" in r.stderr, r.stderr
    assert "bad2" not in os.listdir(runtime.root) and not pid_file.exists()
    assert runtime.state("good")["status"] == "running"


def test_pre_dump_then_a_dump_on_it_restores(runtime, tmp_path):
    vol = tmp_path / "vol"
    vol.mkdir()
    bundle = counter_bundle(runtime, vol)
    runtime("run", "-d", "-b", bundle, "pre1", check=True)
    assert poll(lambda: count(vol) >= 3)
    r = runtime("checkpoint", "--pre-dump", "--image-path", tmp_path / "pre", "pre1")
    assert r.returncode == 0, r.stderr
    assert runtime.state("pre1")["status"] == "running", "a pre-dump leaves it running"
    assert (tmp_path / "pre" / "pages-1.img").exists()
    r = runtime("checkpoint", "--parent-path", "../pre", "--image-path", tmp_path / "final", "pre1")
    assert r.returncode == 0, r.stderr
    assert os.readlink(tmp_path / "final" / "parent") == "../pre"
    dumped = count(vol)
    (vol / "count").write_text("0\n")
    r = runtime("restore", "-d", "-b", bundle, "--image-path", tmp_path / "final", "pre2")
    assert r.returncode == 0, r.stderr
    assert poll(lambda: count(vol) > 0)
    assert dumped < count(vol) < dumped + 100
    r = runtime("checkpoint", "--parent-path", "../../x", "--image-path", tmp_path / "f2", "pre2")
    assert r.returncode == 1 and "must name a sibling" in r.stderr
    assert runtime.state("pre2")["status"] == "running"


def fd_table(runtime, cid):
    """The container's first process's open fds, as `ls -l /proc/1/fd` shows them (no inodes)."""
    r = runtime("exec", cid, "ls", "-l", "/proc/1/fd")
    assert r.returncode == 0, r.stderr
    return sorted(re.sub(r"\[\d+\]", "", " ".join(ln.split()[8:])) for ln in r.stdout.splitlines()[1:])


def cgroup_view(runtime, cid):
    """The container's cgroup as it sees it: /proc/1/cgroup and its /sys/fs/cgroup's files."""
    r = runtime("exec", cid, "sh", "-c", "cat /proc/1/cgroup; ls /sys/fs/cgroup")
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_a_listening_socket_the_fd_table_and_the_cgroup_view_survive(runtime, tmp_path):
    cgroup = {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
              "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
    bundle = runtime.bundle(["sh", "-c", "nc -ll -p 8080 -e echo hi & while :; do sleep 1; done"],
                            mounts=rt.default_spec()["mounts"] + [cgroup])
    runtime("run", "-d", "-b", bundle, "tcp1", check=True)
    assert poll(lambda: runtime("exec", "tcp1", "nc", "127.0.0.1", "8080").stdout.strip() == "hi")
    before, view = fd_table(runtime, "tcp1"), cgroup_view(runtime, "tcp1")
    assert "0::/\n" in view and "memory.max" in view
    r = runtime("checkpoint", "--tcp-established", "--image-path", tmp_path / "img", "tcp1")
    assert r.returncode == 0, r.stderr
    r = runtime("restore", "-d", "--tcp-established", "-b", bundle, "--image-path", tmp_path / "img", "tcp2")
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", "criu's own messages stay out of the container's stderr"
    assert runtime("exec", "tcp2", "nc", "127.0.0.1", "8080").stdout.strip() == "hi"
    assert fd_table(runtime, "tcp2") == before, "the same fds, none of criu's or the agent's"
    assert cgroup_view(runtime, "tcp2") == view, "its own cgroup namespace, not the guest's root"


def test_a_restored_process_reads_the_stdin_given_to_restore(runtime, tmp_path):
    vol = tmp_path / "vol"
    vol.mkdir()
    mounts = rt.default_spec()["mounts"] + [
        {"destination": "/vol", "type": "bind", "source": str(vol), "options": ["rbind", "rw"]}]
    script = "while [ ! -e /vol/go ]; do sleep 0.2; done; read l; echo \"got $l\" > /vol/out; sleep 300"
    bundle = runtime.bundle(["sh", "-c", script], mounts=mounts)
    runtime("run", "-d", "-b", bundle, "in1", check=True)
    runtime("checkpoint", "--image-path", tmp_path / "img", "in1", check=True)
    r = runtime("restore", "-d", "-b", bundle, "--image-path", tmp_path / "img", "in2",
                input="hello\n")
    assert r.returncode == 0, r.stderr
    (vol / "go").write_text("")
    assert poll(lambda: (vol / "out").exists())
    assert (vol / "out").read_text() == "got hello\n"


# ---------------------------------------------------------------------------
# podman: container checkpoint / restore, --export / --import
# ---------------------------------------------------------------------------

PM_COUNTER = "i=0; while true; do i=$((i+1)); echo $i; sleep 0.2; done"


@contextlib.contextmanager
def checked_podman(workdir, rootfs, image_archive=None, **kw):
    """A private podman (its own root, runroot and tmpdir: another host's) with this runtime
    registered and image bb imported from rootfs (or loaded from `podman save`'s image_archive,
    which keeps the image's id); after the block, nothing of it may be left."""
    import engines
    from test_engines import leftover_runtime_procs, state_dirs_of
    p = engines.Podman(workdir, RUNTIME, runtime_name="cc-oci-runtime", **kw)
    try:
        if image_archive:
            pm_ok(p.run("load", "-i", image_archive, timeout=120))
        else:
            p.import_image(rootfs, "bb")
        yield p
        p.run("rm", "-af", "-t", "0", timeout=120)
        left = leftover_runtime_procs(p.dir, p.short_run)
        states = state_dirs_of("/run/cc-oci-runtime", p.dir)
    finally:
        p.cleanup()
    assert not left, "runtime processes outlived their podman containers: %s" % left
    assert not states, "runtime state left behind: %s" % states


@pytest.fixture(scope="module")
def podman(rootfs, tmp_path_factory):
    """A private podman without a network; nothing left after."""
    with checked_podman(tmp_path_factory.mktemp("podman"), rootfs) as p:
        yield p


def counts(p, cid):
    """The numbers the counter has logged so far."""
    out = p.run("logs", cid, timeout=60).stdout
    return [int(w) for w in out.split() if w.isdigit()]


def pm_ok(r):
    """Assert a podman call succeeded; returns it."""
    assert r.returncode == 0, (r.args, r.returncode, r.stdout, r.stderr)
    return r


def test_podman_checkpoint_restore_continues(podman, tmp_path):
    pm_ok(podman.run_rt("run", "-d", "--name", "pc1", "bb", "sh", "-c", PM_COUNTER, timeout=120))
    assert poll(lambda: len(counts(podman, "pc1")) >= 5)
    pm_ok(podman.run_rt("container", "checkpoint", "--leave-running", "pc1", timeout=600))
    assert podman.run("inspect", "-f", "{{.State.Status}}", "pc1").stdout.strip() == "running"
    pm_ok(podman.run_rt("container", "checkpoint", "pc1", timeout=600))
    assert podman.run("inspect", "-f", "{{.State.Status}}", "pc1").stdout.strip() == "exited"
    dumped = counts(podman, "pc1")[-1]
    pm_ok(podman.run_rt("container", "restore", "pc1", timeout=600))
    assert podman.run("inspect", "-f", "{{.State.Status}}", "pc1").stdout.strip() == "running"
    assert poll(lambda: counts(podman, "pc1")[-1] > dumped + 3)
    seen = counts(podman, "pc1")
    assert seen == list(range(1, len(seen) + 1)), "one count on from %d, never from zero" % dumped
    # --export / --import: a new container (its own rootfs) goes on from the exported count
    tarball = tmp_path / "pc1.tar.gz"
    pm_ok(podman.run_rt("container", "checkpoint", "--export", tarball, "pc1", timeout=600))
    exported = counts(podman, "pc1")[-1]
    pm_ok(podman.run_rt("container", "restore", "--import", tarball, "--name", "pc2", timeout=600))
    assert poll(lambda: (counts(podman, "pc2") or [0])[-1] > exported + 3)
    seen = counts(podman, "pc2")  # podman imports the log (ctr.log) with the checkpoint
    assert seen == list(range(1, len(seen) + 1)), "one count on from %d, never from zero" % exported
    pm_ok(podman.run("rm", "-f", "-t", "0", "pc1", "pc2", timeout=120))


def test_podman_export_restores_under_a_second_podman_root(rootfs, tmp_path_factory, tmp_path):
    """checkpoint --export on one podman, then (that one gone) restore --import on another with
    storage of its own and the image loaded there too: a second host's podman, but for the
    kernel and criu. Both have the same run root path, as two hosts with podman's defaults do:
    podman 4.3 keeps the conmon pid file path config.dump names unless it is under its own run
    root, and under another one its directory does not exist (conmon then fails)."""
    runroot = tempfile.mkdtemp(prefix="pmr-", dir="/tmp")
    tarball, image = tmp_path / "px1.tar.zst", tmp_path / "bb.tar"
    with checked_podman(tmp_path_factory.mktemp("podman1"), rootfs, runroot=runroot) as first:
        pm_ok(first.run_rt("run", "-d", "--name", "px1", "bb", "sh", "-c", PM_COUNTER, timeout=120))
        assert poll(lambda: len(counts(first, "px1")) >= 5)
        pm_ok(first.run_rt("container", "checkpoint", "--export", tarball, "px1", timeout=600))
        exported = counts(first, "px1")[-1]
        # the image as the other host has it (from a registry): the same id, which restore
        # --import looks up (with another id podman 4.3 pulls the id as a name, and fails)
        pm_ok(first.run("save", "-o", image, "bb", timeout=120))
        image_id = first.run("image", "inspect", "-f", "{{.Id}}", "bb").stdout.strip()
        first_root = first.root
    assert not os.path.exists(runroot), "the first podman's run root is gone"
    with checked_podman(tmp_path_factory.mktemp("podman2"), rootfs, image_archive=image,
                        runroot=runroot) as second:
        assert second.root != first_root and second.run("ps", "-aq").stdout.split() == []
        assert second.run("image", "inspect", "-f", "{{.Id}}", "bb").stdout.strip() == image_id
        pm_ok(second.run_rt("container", "restore", "--import", tarball, "--name", "px2",
                            timeout=600))
        assert second.run("inspect", "-f", "{{.State.Status}}", "px2").stdout.strip() == "running"
        assert poll(lambda: (counts(second, "px2") or [0])[-1] > exported + 3)
        seen = counts(second, "px2")
        assert seen == list(range(1, len(seen) + 1)), "one count on from %d, never from zero" % exported
        pm_ok(second.run("rm", "-f", "-t", "0", "px2", timeout=120))
    assert not os.path.exists(runroot)


# ---------------------------------------------------------------------------
# podman with a network (netavark): a published port, established TCP
# ---------------------------------------------------------------------------

def free_port():
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, tries=50):
    """The body of a GET from the host (urllib, a few tries), or None."""
    for _ in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                return r.read().decode()
        except OSError:
            time.sleep(0.2)
    return None


def nat_rules_naming(port):
    """The host's iptables nat rules that name a port."""
    out = subprocess.run(["iptables", "-w", "-t", "nat", "-S"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if re.search(r"\b%d\b" % port, ln)]


@pytest.fixture(scope="module")
def pmnet(rootfs, tmp_path_factory):
    """A private podman with its netavark network; no tap and no nat rule of it left after."""
    with checked_podman(tmp_path_factory.mktemp("pmnet"), rootfs, network=True) as p:
        p.ports = []
        yield p
        p.run("rm", "-af", "-t", "0", timeout=120)
    taps = [ln for ln in subprocess.run(["ip", "-o", "link", "show"], capture_output=True,
                                        text=True).stdout.splitlines() if "cc-tap" in ln]
    assert not taps, taps
    rules = [r for port in p.ports for r in nat_rules_naming(port)]
    assert not rules, "nat rules of the published ports left: %s" % rules


def test_a_restored_http_server_serves_at_its_published_port(pmnet):
    port = free_port()
    pmnet.ports.append(port)
    script = "mkdir -p /www && echo $RANDOM$RANDOM > /www/index.html && exec httpd -f -p 8080 -h /www"
    pm_ok(pmnet.run_rt("run", "-d", "--name", "web1", "-p", "127.0.0.1:%d:8080" % port, "bb",
                       "sh", "-c", script, timeout=120))
    url = "http://127.0.0.1:%d/" % port
    page = http_get(url)
    assert page and page.strip().isdigit(), page
    assert nat_rules_naming(port)
    pm_ok(pmnet.run_rt("container", "checkpoint", "web1", timeout=600))
    assert pmnet.run("inspect", "-f", "{{.State.Status}}", "web1").stdout.strip() == "exited"
    assert http_get(url, tries=1) is None, "nothing serves while it is checkpointed"
    pm_ok(pmnet.run_rt("container", "restore", "web1", timeout=600))
    assert http_get(url) == page, "the same page from the restored httpd (not a new shell's)"
    top = pmnet.run_rt("exec", "web1", "ps", "-o", "pid,args").stdout
    assert re.search(r"^\s*1 httpd -f -p 8080", top, re.M), top
    pm_ok(pmnet.run("rm", "-f", "-t", "0", "web1", timeout=120))
    assert poll(lambda: not nat_rules_naming(port), timeout=10), nat_rules_naming(port)


def connect(addr, port):
    """A TCP connection to addr:port from the host, or None."""
    try:
        return socket.create_connection((addr, port), timeout=3)
    except OSError:
        return None


def echoed(conn, data, timeout=60):
    """What the peer sends back for data, once as many bytes arrive (b"" if it closes)."""
    conn.settimeout(timeout)
    conn.sendall(data)
    return received(conn, len(data))


def received(conn, n):
    got = b""
    while len(got) < n:
        chunk = conn.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


def tcp_states(p, cid, port):
    """The states (hex, 01 = ESTABLISHED, 0A = LISTEN) of the container's TCP sockets on a
    local port, from /proc/1/net/tcp and tcp6 in the guest (nc listens on IPv6's any address)."""
    out = pm_ok(p.run_rt("exec", cid, "cat", "/proc/1/net/tcp", "/proc/1/net/tcp6",
                         timeout=120)).stdout
    return sorted(ln.split()[3] for ln in out.splitlines()
                  if ln.split()[0] != "sl" and ln.split()[1].endswith(":%04X" % port))


def test_an_established_tcp_connection_to_the_host_survives_with_tcp_established(pmnet):
    """A host socket talks to `nc -l -e cat` in the container over podman's bridge, the tap
    and the VM's NIC: criu's TCP repair in the guest dumps the connection and restores it in
    the new VM (the same address from podman), and the host's end goes on with it. Without
    --tcp-established criu refuses the dump and the container runs on, connection and all."""
    pm_ok(pmnet.run_rt("run", "-d", "--name", "tcp1", "bb", "nc", "-l", "-p", "9000", "-e", "cat",
                       timeout=120))
    ip = pmnet.run("inspect", "-f", "{{.NetworkSettings.IPAddress}}", "tcp1").stdout.strip()
    conn = poll(lambda: connect(ip, 9000))
    assert conn, "no connection to %s:9000" % ip
    with conn:
        assert echoed(conn, b"one\n") == b"one\n"
        assert tcp_states(pmnet, "tcp1", 9000) == ["01"]
        r = pmnet.run_rt("container", "checkpoint", "tcp1", timeout=600)
        assert r.returncode != 0 and "consider using --tcp-established" in r.stderr, r.stderr
        assert pmnet.run("inspect", "-f", "{{.State.Status}}", "tcp1").stdout.strip() == "running"
        assert echoed(conn, b"two\n") == b"two\n", "a refused dump leaves the connection alone"
        pm_ok(pmnet.run_rt("container", "checkpoint", "--tcp-established", "--leave-running",
                           "tcp1", timeout=600))
        assert echoed(conn, b"three\n") == b"three\n", "--leave-running: the same connection"
        pm_ok(pmnet.run_rt("container", "checkpoint", "--tcp-established", "tcp1", timeout=600))
        assert pmnet.run("inspect", "-f", "{{.State.Status}}", "tcp1").stdout.strip() == "exited"
        pm_ok(pmnet.run_rt("container", "restore", "--tcp-established", "tcp1", timeout=600))
        assert pmnet.run("inspect", "-f", "{{.NetworkSettings.IPAddress}}", "tcp1").stdout.strip() == ip
        # (the host sends nothing while it is checkpointed: see README, what it would get)
        assert echoed(conn, b"four\n") == b"four\n", "the restored cat echoes on the same connection"
        assert tcp_states(pmnet, "tcp1", 9000) == ["01"]
    # the host closes: the restored cat reads its end of file, and the container exits
    assert poll(lambda: pmnet.run("inspect", "-f", "{{.State.Status}}", "tcp1").stdout.strip()
                == "exited"), "the restored process holds the host's connection"
    pm_ok(pmnet.run("rm", "tcp1", timeout=120))


# ---------------------------------------------------------------------------
# docker (experimental): checkpoint create, start --checkpoint
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def docker(rootfs, tmp_path_factory):
    """A private dockerd with experimental features (docker checkpoint) and this runtime."""
    import engines
    from test_engines import leftover_runtime_procs
    d = engines.Docker(tmp_path_factory.mktemp("docker"), RUNTIME, runtime_name="cc-oci-runtime",
                       experimental=True)
    try:
        d.import_image(rootfs, "bb")
        yield d
        ids = d.run("ps", "-aq", timeout=60).stdout.split()
        if ids:
            d.run("rm", "-f", *ids, timeout=120)
        left = leftover_runtime_procs(d.dir, d.exec_root)
    finally:
        d.stop()
    assert not left, "runtime processes outlived their docker containers: %s" % left


def start_from_checkpoint(docker, checkpoint, cid):
    """docker start --checkpoint; again after "content ... already exists": dockerd 20.10 writes
    the container's spec into containerd's content store, where the checkpoint already put the
    same blob unless containerd's garbage collector has removed it meanwhile (a race of theirs,
    before the runtime is called)."""
    for _ in range(3):
        r = docker.run("start", "--checkpoint", checkpoint, cid, timeout=600)
        if r.returncode == 0 or "already exists" not in r.stderr:
            break
        time.sleep(2)
    pm_ok(r)


def test_docker_checkpoint_and_start_from_it(docker):
    pm_ok(docker.run_rt("run", "-d", "--network", "none", "--name", "dc1", "bb", "sh", "-c",
                        PM_COUNTER, timeout=120))
    assert poll(lambda: len(counts(docker, "dc1")) >= 5)
    pm_ok(docker.run("checkpoint", "create", "--leave-running", "dc1", "cp0", timeout=600))
    assert docker.run("inspect", "-f", "{{.State.Status}}", "dc1").stdout.strip() == "running"
    pm_ok(docker.run("checkpoint", "create", "dc1", "cp1", timeout=600))
    assert poll(lambda: docker.run("inspect", "-f", "{{.State.Status}}", "dc1").stdout.strip()
                == "exited", timeout=10), "dockerd learns of the exit from containerd's event"
    assert "cp1" in docker.run("checkpoint", "ls", "dc1", timeout=60).stdout
    dumped = counts(docker, "dc1")[-1]
    start_from_checkpoint(docker, "cp1", "dc1")
    assert docker.run("inspect", "-f", "{{.State.Status}}", "dc1").stdout.strip() == "running"
    assert poll(lambda: counts(docker, "dc1")[-1] > dumped + 3)
    seen = counts(docker, "dc1")
    assert seen == list(range(1, len(seen) + 1)), "one count on from %d, never from zero" % dumped
    pm_ok(docker.run("rm", "-f", "dc1", timeout=120))


def test_podman_checkpoint_restore_with_a_terminal(podman):
    script = "i=0; while true; do i=$((i+1)); [ -t 1 ] && echo $i; sleep 0.2; done"
    pm_ok(podman.run_rt("run", "-dt", "--name", "pt1", "bb", "sh", "-c", script, timeout=120))
    assert poll(lambda: len(counts(podman, "pt1")) >= 5)
    pm_ok(podman.run_rt("container", "checkpoint", "pt1", timeout=600))
    dumped = counts(podman, "pt1")[-1]
    pm_ok(podman.run_rt("container", "restore", "pt1", timeout=600))
    assert poll(lambda: counts(podman, "pt1")[-1] > dumped + 3), "counts on, on a terminal"
    seen = counts(podman, "pt1")
    assert seen == list(range(1, len(seen) + 1))
    pm_ok(podman.run("rm", "-f", "-t", "0", "pt1", timeout=120))
