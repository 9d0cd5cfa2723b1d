"""linux.resources in real VMs: the VM's size, the limits in the guest's cgroup, the host
cgroup at linux.cgroupsPath, update and events."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import cc_oci_runtime as rt
from conftest import RUNTIME, poll

MIB = 1 << 20
CGROUP_MOUNT = {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}


def limited(runtime, args, resources, cgroups_path=None, **changes):
    """A bundle with linux.resources (and the cgroup mount runc's spec has)."""
    b = runtime.bundle(args, mounts=rt.default_spec()["mounts"] + [CGROUP_MOUNT], **changes)
    path = os.path.join(b, "config.json")
    with open(path) as f:
        conf = json.load(f)
    conf["linux"]["resources"] = resources
    if cgroups_path:
        conf["linux"]["cgroupsPath"] = cgroups_path
    with open(path, "w") as f:
        json.dump(conf, f)
    return b


def qemu_of(runtime, cid):
    """The QEMU pid and argv of a created container."""
    with open(os.path.join(runtime.root, cid, "state.json")) as f:
        pid = json.load(f)["vm"]["qemu_pid"]
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        return pid, f.read().rstrip(b"\0").decode().split("\0")


def memory_cgroup(path):
    """The host's memory-controller directory of a cgroup path (v1 here, or v2)."""
    for mount_point, version, controllers in rt.cgroup_hierarchies():
        if version == 2 or "memory" in controllers:
            return mount_point + path


def test_memory_limit_sizes_the_vm_and_holds_a_big_workload(runtime):
    script = ("grep MemTotal /proc/meminfo; cat /sys/fs/cgroup/memory.max; "
              "dd if=/dev/zero of=/dev/null bs=400M count=1 2>/dev/null && echo held-400MB")
    b = limited(runtime, ["sh", "-c", script], {"memory": {"limit": 1024 * MIB}})
    r = runtime("run", "-b", b, "big1")  # the first of its size may build the template
    assert r.returncode == 0, r.stderr
    runtime("create", "-b", b, "big2", check=True)
    _, argv = qemu_of(runtime, "big2")
    assert "-incoming" in argv, "a second container of this size is restored from its template"
    assert argv[argv.index("-m") + 1] == rt.size_vm({}, {"memory": {"limit": 1024 * MIB}})["memory"]
    runtime("start", "big2", check=True)
    runtime.wait_status("big2", "stopped", timeout=60)
    lines = r.stdout.split("\n")
    assert int(lines[0].split()[1]) * 1024 >= 1024 * MIB, r.stdout
    assert lines[1:3] == [str(1024 * MIB), "held-400MB"], r.stdout
    runtime("delete", "big2", check=True)


def test_oom_inside_the_guest_is_reported_by_events(runtime):
    b = limited(runtime, ["sh", "-c", "sleep 1; dd if=/dev/zero of=/dev/null bs=400M count=1; "
                          "echo status=$?; sleep 1000"], {"memory": {"limit": 96 * MIB}})
    with open(os.path.join(runtime.tmp, "oom.out"), "w") as out:
        subprocess.run(runtime.argv("create", "-b", b, "oom"), stdout=out, check=True)
    events = subprocess.Popen(runtime.argv("events", "--interval", "60s", "oom"),
                              stdout=subprocess.PIPE, text=True)
    try:
        runtime("start", "oom", check=True)
        line = events.stdout.readline()  # the first stats line, then the oom event
        assert json.loads(line)["type"] == "stats"
        event = json.loads(events.stdout.readline())
        assert event == {"type": "oom", "id": "oom"}
    finally:
        events.kill()
        events.wait()
    assert poll(lambda: "status=137" in open(os.path.join(runtime.tmp, "oom.out")).read(), timeout=20)
    stats = json.loads(runtime("events", "--stats", "oom", check=True).stdout)
    assert stats["data"]["memory"]["usage"]["limit"] == 96 * MIB
    runtime("kill", "oom", "KILL")
    runtime("delete", "--force", "oom", check=True)


def test_cpu_quota_gives_vcpus_and_pids_limit_stops_a_fork_bomb(runtime):
    # the bomb's shell dies when fork fails; builtins only afterwards (every pid is taken)
    script = ("nproc; cat /sys/fs/cgroup/cpu.max /sys/fs/cgroup/pids.max; "
              "(i=0; while [ $i -lt 300 ]; do sleep 30 & i=$((i+1)); done) 2>/dev/null; echo bomb=$?; "
              "read n < /sys/fs/cgroup/pids.current; echo $n; echo still-alive")
    b = limited(runtime, ["sh", "-c", script],
                {"cpu": {"quota": 200000, "period": 100000}, "pids": {"limit": 40}})
    bystander = runtime.bundle(["sleep", "1000"])
    runtime("create", "-b", bystander, "bystander", check=True)
    runtime("start", "bystander", check=True)
    r = runtime("run", "-b", b, "cpus")
    assert runtime.state("bystander")["status"] == "running"  # another container lives on
    assert runtime("exec", "bystander", "echo", "alive").stdout == "alive\n"
    runtime("delete", "--force", "bystander", check=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[:5] == ["2", "200000", "100000", "40", "bomb=2"], r.stdout
    assert 30 < int(lines[5]) <= 40 and lines[6] == "still-alive", r.stdout


def test_host_cgroup_holds_monitor_and_qemu_and_goes_at_delete(runtime):
    path = "/cc-oci-test/%d" % os.getpid()
    b = limited(runtime, ["sleep", "1000"], {"memory": {"limit": 128 * MIB}}, cgroups_path=path)
    runtime("create", "-b", b, "cg", check=True)
    monitor = runtime.state("cg")["pid"]
    qemu, argv = qemu_of(runtime, "cg")
    mem = memory_cgroup(path)
    with open(os.path.join(mem, "cgroup.procs")) as f:
        assert {monitor, qemu} <= {int(p) for p in f.read().split()}
    limit_file = "memory.limit_in_bytes" if os.path.exists(mem + "/memory.limit_in_bytes") else "memory.max"
    with open(os.path.join(mem, limit_file)) as f:
        vm_bytes = rt._size_bytes(argv[argv.index("-m") + 1])
        assert int(f.read()) == vm_bytes + rt.HOST_OVERHEAD_MIB * MIB
    runtime("delete", "--force", "cg", check=True)
    assert not os.path.exists(mem)
    # after SIGKILL of the monitor too
    runtime("create", "-b", b, "cg2", check=True)
    os.kill(runtime.state("cg2")["pid"], signal.SIGKILL)
    runtime("delete", "--force", "cg2", check=True)
    assert not os.path.exists(mem)
    for mount_point, _, _ in rt.cgroup_hierarchies():
        for d in (mount_point + path, os.path.dirname(mount_point + path)):
            if os.path.isdir(d):
                os.rmdir(d)


def test_update_changes_the_limits_inside_and_refuses_beyond_the_vm(runtime):
    b = limited(runtime, ["sh", "-c", "echo ready; sleep 1000"], {"memory": {"limit": 256 * MIB}})
    runtime("create", "-b", b, "upd", check=True)
    runtime("start", "upd", check=True)
    runtime("update", "--memory", "64m", "--pids-limit", "30", "--cpu-quota", "50000", "upd", check=True)
    r = runtime("exec", "upd", "cat", "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/pids.max",
                "/sys/fs/cgroup/cpu.max")
    assert r.stdout.split() == [str(64 * MIB), "30", "50000", "100000"], (r.stdout, r.stderr)
    res = os.path.join(runtime.tmp, "res.json")
    with open(res, "w") as f:
        json.dump({"memory": {"limit": 100 * MIB}}, f)
    runtime("update", "-r", res, "upd", check=True)
    r = runtime("exec", "upd", "cat", "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/pids.max")
    assert r.stdout.split() == [str(100 * MIB), "30"], r.stdout
    with open(os.path.join(runtime.root, "upd", "state.json")) as f:
        vm_memory = json.load(f)["vm"]["memory"]
    r = runtime("update", "--memory", "8g", "upd")
    assert r.returncode == 1
    assert 'msg="memory limit 8192 MiB does not fit the container\'s VM: it has %s, room for' % vm_memory \
        in r.stderr, r.stderr
    stats = json.loads(runtime("events", "--stats", "upd", check=True).stdout)
    assert stats["type"] == "stats" and stats["id"] == "upd"
    data = stats["data"]
    assert data["memory"]["usage"]["limit"] == 100 * MIB and data["memory"]["usage"]["usage"] > 0
    assert data["pids"] == {"current": 1, "limit": 30}  # sh has exec'd sleep
    assert data["cpu"]["usage"]["total"] > 0
    runtime("kill", "upd", "KILL")
    runtime("delete", "--force", "upd", check=True)
