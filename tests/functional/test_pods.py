"""Pods by hand through the CLI (CRI-O's annotations, as podman writes them) and with podman.

A pod is one VM: the sandbox restores it, each member runs in it with its own rootfs, mounts,
process and exit status, sharing the pod's localhost and hostname. The member's host process
(its --pid-file pid) is reaped here by a small sub-reaper, as conmon or containerd-shim would.
containerd's CRI path is in test_cri.py.
"""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import RUNTIME, poll, rt

def vms_under(root):
    """The containers under root that have a QEMU of their own (QEMU runs in its state dir)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            exe = os.path.basename(os.readlink("/proc/%s/exe" % pid))
            cwd = os.readlink("/proc/%s/cwd" % pid)
        except OSError:
            continue
        if exe.startswith("qemu-system") and os.path.dirname(cwd) == str(root):
            found.append(os.path.basename(cwd))
        elif exe.startswith("qemu-system"):  # a VM from the pool runs in its own directory
            try:
                with open(os.path.join(cwd, "container")) as f:
                    served = f.read().strip()
            except OSError:
                continue
            if os.path.dirname(served) == str(root):
                found.append(os.path.basename(served))
    return sorted(found)

CRIO_TYPE, CRIO_SANDBOX = "io.kubernetes.cri-o.ContainerType", "io.kubernetes.cri-o.SandboxID"
CRI_TYPE, CRI_SANDBOX = "io.kubernetes.cri.container-type", "io.kubernetes.cri.sandbox-id"
# create under a sub-reaper, then wait for the --pid-file process and write its exit status
REAPER = r"""
import ctypes, os, subprocess, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
status_file, pid_file = sys.argv[1], sys.argv[2]
r = subprocess.run(sys.argv[3:])
if r.returncode:
    open(status_file, "w").write("create failed %d" % r.returncode)
    sys.exit(0)
pid = int(open(pid_file).read())
while True:
    got, status = os.waitpid(-1, 0)
    if got == pid:
        break
code = os.waitstatus_to_exitcode(status)
open(status_file, "w").write(str(128 - code if code < 0 else code))
"""


class Member:
    """A container created under REAPER: its output file and, once it has ended, its status."""

    def __init__(self, runtime, cid, bundle):
        self.cid, d = cid, runtime.tmp / ("reaped-" + cid)
        d.mkdir()
        self.out, self.status_file, self.pid_file = d / "out", d / "status", d / "pid"
        argv = runtime.argv("create", "-b", bundle, "--pid-file", self.pid_file, cid)
        with open(self.out, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", REAPER, str(self.status_file),
                                          str(self.pid_file)] + argv,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        assert poll(lambda: self.pid_file.exists() or self.status_file.exists(), 60, 0.05)
        assert not self.status_file.exists(), self.out.read_text()

    def status(self, timeout=30):
        """The exit status of the member's host process."""
        self.proc.wait(timeout)
        return self.status_file.read_text()

    def output(self):
        """What the member wrote to its stdout and stderr."""
        return self.out.read_text()


def pod_bundle(runtime, args, sandbox_id=None, sandbox_pid=None, rootfs=None, keys=(CRIO_TYPE, CRIO_SANDBOX),
               **changes):
    """A bundle; with sandbox_id a member of that pod, in its namespaces as podman writes them."""
    b = runtime.bundle(args, **changes)
    conf = json.loads(open(os.path.join(b, "config.json")).read())
    if rootfs:
        conf["root"]["path"] = str(rootfs)
    if sandbox_id:
        conf["annotations"] = {keys[0]: "container", keys[1]: sandbox_id}
        conf.pop("hostname", None)
    if sandbox_pid:
        ns = {n["type"]: n for n in conf["linux"]["namespaces"]}
        for kind in ("network", "ipc", "uts"):
            ns[kind] = {"type": kind, "path": "/proc/%s/ns/%s" % (sandbox_pid, {"network": "net"}.get(kind, kind))}
        conf["linux"]["namespaces"] = list(ns.values())
    open(os.path.join(b, "config.json"), "w").write(json.dumps(conf))
    return b


@pytest.fixture
def sandbox(runtime, tmp_path):
    """A running sandbox container "sb" (sleep as its pause) and its pid."""
    b = runtime.bundle(["sleep", "100000"], hostname="podhost")
    runtime("create", "-b", b, "--pid-file", tmp_path / "sb.pid", "sb", check=True)
    runtime("start", "sb", check=True)
    return "sb", int((tmp_path / "sb.pid").read_text())


def own_rootfs(rootfs, tmp_path, name):
    """A copy of the busybox rootfs with a file naming it."""
    d = tmp_path / ("rootfs-" + name)
    subprocess.run(["cp", "-a", rootfs, str(d)], check=True)
    (d / "whoami").write_text(name + "\n")
    return d


def slot_mounts(runtime, sid):
    """The pod export's slot directories that have a member's files mounted, as QEMU's mount
    namespace has them (the sandbox monitor's, or a pooled VM's keeper's): what the VM can reach;
    a pooled sandbox's own files (slot 0) are not a member's."""
    with open(os.path.join(runtime.root, sid, "state.json")) as f:
        vm = json.load(f)["vm"]
    with open("/proc/%d/mountinfo" % vm["qemu_pid"]) as f:
        points = [line.split()[4] for line in f]
    own = os.path.join(vm.get("pool_dir") or "/nonexistent", rt.FILES_DIR, rt.POD_DIR, str(rt.POOL_SLOT))
    return sorted(p for p in points if "/%s/%s/" % (rt.FILES_DIR, rt.POD_DIR) in p + "/"
                  and p.rsplit("/", 1)[1].isdigit() and p != own)


def test_pod_members_share_the_vm_localhost_and_hostname_with_their_own_rootfs(runtime, sandbox, rootfs, tmp_path):
    sid, spid = sandbox
    web = pod_bundle(runtime, ["sh", "-c", "mkdir -p /www; cat /whoami > /www/index.html; "
                                           "exec httpd -f -p 8080 -h /www"],
                     sid, spid, own_rootfs(rootfs, tmp_path, "web"))
    client = pod_bundle(runtime, ["sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10; do "
                                              "wget -q -O - http://127.0.0.1:8080/ && break; sleep 0.5; done; "
                                              "hostname; cat /whoami; ls /rootfs-web 2>&1; exit 5"],
                        sid, spid, own_rootfs(rootfs, tmp_path, "client"))
    m1 = Member(runtime, "m-web", web)
    runtime("start", "m-web", check=True)
    m2 = Member(runtime, "m-client", client)
    assert runtime.state("m-client")["status"] == "created"
    assert vms_under(runtime.root) == ["sb"]  # one VM: the sandbox's
    runtime("start", "m-client", check=True)
    assert m2.status() == "5"
    assert m2.output().splitlines()[:3] == ["web", "podhost", "client"], m2.output()
    assert "No such file" in m2.output()
    assert runtime.state("m-client")["status"] == "stopped"
    r = runtime("exec", "m-web", "sh", "-c", "cat /whoami; echo $$")  # exec joins the member
    assert r.returncode == 0 and r.stdout.split()[0] == "web", r.stderr
    ps = runtime("ps", "m-web")
    assert "httpd" in ps.stdout and "sleep" not in ps.stdout, ps.stdout  # its processes, not the pod's
    assert runtime("delete", "m-client").returncode == 0
    assert len(slot_mounts(runtime, sid)) == 1  # the deleted member's files are gone from the VM
    assert runtime("kill", "m-web", "KILL").returncode == 0
    assert m1.status() == "137"
    assert runtime.state("sb")["status"] == "running"  # the rest of the pod runs on
    assert runtime("delete", "m-web").returncode == 0
    assert slot_mounts(runtime, sid) == []
    assert sorted(os.listdir(runtime.root)) == ["sb"]


def test_pod_member_mounts_keep_their_modes_at_the_host(runtime, sandbox, tmp_path):
    sid, spid = sandbox
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "data").write_text("original\n")
    caps = ["CAP_SYS_ADMIN", "CAP_CHOWN", "CAP_DAC_OVERRIDE"]
    b = pod_bundle(runtime, ["sh", "-c", "mount -o remount,rw /vol; echo changed > /vol/data; "
                                         "echo new > /vol/new; sleep 100"],
                   sid, spid, capabilities={k: caps for k in ("bounding", "effective", "permitted")},
                   mounts=rt.default_spec()["mounts"] + [
                       {"destination": "/vol", "type": "bind", "source": str(vol), "options": ["rbind", "ro"]}])
    m = Member(runtime, "m-ro", b)
    runtime("start", "m-ro", check=True)
    time.sleep(3)
    assert (vol / "data").read_text() == "original\n" and not (vol / "new").exists()
    plain = pod_bundle(runtime, ["sh", "-c", "mkdir -p /mnt/t; mount -t 9p -o trans=virtio share0 /mnt/t; "
                                             "echo rc=$?; ls /mnt/t"], sid, spid)
    m2 = Member(runtime, "m-plain", plain)
    runtime("start", "m-plain", check=True)
    assert m2.status() == "0"
    assert "rc=0" not in m2.output(), m2.output()  # no CAP_SYS_ADMIN: no 9p tag of the VM's
    runtime("delete", "--force", "m-ro")
    runtime("delete", "m-plain")
    assert m.status() == "137"


@pytest.mark.parametrize("victim", ["monitor", "qemu"])
def test_sandbox_killed_under_running_members_ends_them_and_delete_leaves_nothing(runtime, sandbox, victim):
    sid, spid = sandbox
    members = []
    for n in range(2):
        b = pod_bundle(runtime, ["sleep", "1000"], sid, spid)
        members.append(Member(runtime, "m-k%d" % n, b))
        runtime("start", "m-k%d" % n, check=True)
    qemu = json.loads(open(os.path.join(runtime.root, sid, "state.json")).read())["vm"]["qemu_pid"]
    os.kill(spid if victim == "monitor" else qemu, 9)  # the sandbox's monitor (QEMU's parent), or QEMU
    assert [m.status() for m in members] == ["137", "137"]
    assert {runtime.state(m.cid)["status"] for m in members} == {"stopped"}
    for cid in ("m-k0", "m-k1", sid):
        assert runtime("delete", "--force", cid).returncode == 0
    assert os.listdir(runtime.root) == [] and vms_under(runtime.root) == []


def test_pod_member_errors_leave_nothing(runtime, sandbox, tmp_path):
    sid, spid = sandbox
    cases = [
        (pod_bundle(runtime, ["true"], "nosuchsb", spid, keys=(CRI_TYPE, CRI_SANDBOX)),
         "pod: sandbox nosuchsb: no such container of this runtime"),
        (pod_bundle(runtime, ["true"], sid, spid, keys=(CRIO_TYPE, "x")), "a pod member needs its sandbox's id"),
    ]
    b = runtime.bundle(["true"])
    conf = json.loads(open(os.path.join(b, "config.json")).read())
    conf["annotations"] = {CRI_TYPE: "sidecar", CRI_SANDBOX: sid}
    open(os.path.join(b, "config.json"), "w").write(json.dumps(conf))
    cases.append((b, "unknown container type 'sidecar' (sandbox or container)"))
    b = runtime.bundle(["true"])
    conf["annotations"] = {CRI_TYPE: "sandbox", CRI_SANDBOX: sid}
    open(os.path.join(b, "config.json"), "w").write(json.dumps(conf))
    cases.append((b, "io.kubernetes.cri.sandbox-id: sb names another sandbox than this one (sb2)"))
    big = pod_bundle(runtime, ["true"], sid, spid)
    conf = json.loads(open(os.path.join(big, "config.json")).read())
    conf["linux"]["resources"] = {"memory": {"limit": 4 << 30}}
    open(os.path.join(big, "config.json"), "w").write(json.dumps(conf))
    cases.append((big, "does not fit the pod's VM"))
    for bundle, message in cases:
        r = runtime("create", "-b", bundle, "sb2")
        assert r.returncode == 1 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert sorted(os.listdir(runtime.root)) == [sid] and slot_mounts(runtime, sid) == []
    runtime("kill", sid, "KILL")
    runtime.wait_status(sid, "stopped")
    r = runtime("create", "-b", pod_bundle(runtime, ["true"], sid), "m-late")  # (its /proc/PID is gone)
    assert r.returncode == 1 and "pod: the pod's sandbox sb is stopped" in r.stderr, r.stderr
    assert sorted(os.listdir(runtime.root)) == [sid]


def test_pod_member_pause_freezes_only_the_member(runtime, sandbox):
    sid, spid = sandbox
    b = pod_bundle(runtime, ["sh", "-c", "while :; do date +%s%N > /tmp/tick; sleep 0.1; done"], sid, spid)
    m = Member(runtime, "m-p", b)
    runtime("start", "m-p", check=True)
    tick = lambda: runtime("exec", "m-p", "cat", "/tmp/tick").stdout  # noqa: E731
    assert poll(tick, 20)
    assert runtime("pause", "m-p").returncode == 0
    assert runtime.state("m-p")["status"] == "paused" and runtime.state(sid)["status"] == "running"
    before = tick()
    time.sleep(1)
    assert tick() == before  # frozen (exec runs beside it)
    assert runtime("resume", "m-p").returncode == 0
    assert poll(lambda: tick() != before, 10)
    runtime("delete", "--force", "m-p")
    assert m.status() == "137"


def test_kill_all_of_a_stopped_container_exits_0_as_runc(runtime, tmp_path):
    from test_runc_cli import RUNC
    b = runtime.bundle(["true"])
    runtime("create", "-b", b, "c-ka", check=True)
    runtime("start", "c-ka", check=True)
    runtime.wait_status("c-ka", "stopped")
    ours = runtime("kill", "--all", "c-ka", "9")
    plain = runtime("kill", "c-ka", "9")
    root = str(tmp_path / "runc-root")
    subprocess.run([RUNC, "--root", root, "run", "-d", "-b", b, "c-ka"], check=True, timeout=30,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    poll(lambda: json.loads(subprocess.run([RUNC, "--root", root, "state", "c-ka"], capture_output=True,
                                           text=True).stdout or "{}").get("status") == "stopped", 10)
    theirs = subprocess.run([RUNC, "--root", root, "kill", "--all", "c-ka", "9"], capture_output=True, text=True)
    theirs_plain = subprocess.run([RUNC, "--root", root, "kill", "c-ka", "9"], capture_output=True, text=True)
    subprocess.run([RUNC, "--root", root, "delete", "-f", "c-ka"])
    assert (ours.returncode, plain.returncode) == (theirs.returncode, theirs_plain.returncode) == (0, 1)
    assert "container not running" in plain.stderr and "container not running" in theirs_plain.stderr
    runtime("delete", "c-ka", check=True)


def test_pod_member_oom_and_stats_are_its_own(runtime, sandbox):
    sid, spid = sandbox
    b = pod_bundle(runtime, ["sh", "-c", "sleep 1; dd if=/dev/zero of=/dev/null bs=100M count=1; "
                                         "echo status=$?; sleep 1000"], sid, spid)
    conf = json.loads(open(os.path.join(b, "config.json")).read())
    conf["linux"]["resources"] = {"memory": {"limit": 48 << 20}}
    open(os.path.join(b, "config.json"), "w").write(json.dumps(conf))
    m = Member(runtime, "m-oom", b)
    events = subprocess.Popen(runtime.argv("events", "--interval", "60s", "m-oom"),
                              stdout=subprocess.PIPE, text=True)
    try:
        runtime("start", "m-oom", check=True)
        assert json.loads(events.stdout.readline())["type"] == "stats"
        assert json.loads(events.stdout.readline()) == {"type": "oom", "id": "m-oom"}
    finally:
        events.kill()
        events.wait()
    assert poll(lambda: "status=137" in m.output(), 20), m.output()
    stats = json.loads(runtime("events", "--stats", "m-oom", check=True).stdout)
    assert stats["data"]["memory"]["usage"]["limit"] == 48 << 20
    assert runtime("events", "--stats", sid).returncode == 0
    assert not os.path.exists(os.path.join(runtime.root, sid, "oom"))  # the sandbox had none
    runtime("delete", "--force", "m-oom", check=True)
