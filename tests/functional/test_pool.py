"""The VM pool (README "The VM pool"): warmed VMs, each kept by a keeper, handed to create. A
private pool directory per module; every keeper of it is gone at the end."""
import json
import os
import shutil
import signal
import time

import pytest

from conftest import ROOTFS, poll, rt


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    """A private CC_OCI_POOL_DIR for the runtime calls of this module; its keepers killed after."""
    path = str(tmp_path_factory.mktemp("pool"))
    old = os.environ.get("CC_OCI_POOL_DIR")
    os.environ["CC_OCI_POOL_DIR"] = path
    yield path
    if old is None:
        del os.environ["CC_OCI_POOL_DIR"]
    else:
        os.environ["CC_OCI_POOL_DIR"] = old
    for keeper in keepers(path):
        os.kill(keeper["pid"], signal.SIGKILL)
    assert poll(lambda: not qemus_of(path), timeout=10), "a pooled QEMU outlived its keeper"


def keepers(pool):
    """keeper.json of every VM of the pool whose keeper lives, with its directory."""
    out = []
    for group in os.listdir(pool):
        top = os.path.join(pool, group)
        for name in os.listdir(top) if os.path.isdir(top) else ():
            k = rt.read_json_quietly(os.path.join(top, name, "keeper.json"))
            if k and rt.process_alive(k["pid"], k["start"]):
                out.append(dict(k, dir=os.path.join(top, name), group=group))
    return out


def ready(pool):
    """The ready VMs' keepers (not warming, not used)."""
    return [k for k in keepers(pool) if k["group"] not in ("warming", "used")]


def qemus_of(pool):
    """Pids of QEMUs whose command line names the pool directory."""
    out = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmd and pool in cmd:
            out.append(pid)
    return out


def fill(runtime, pool):
    """A created and deleted container starts the refill; wait until a VM is ready."""
    if not ready(pool):
        runtime("run", "-b", runtime.bundle(["true"]), "pool-seed")
        assert poll(lambda: ready(pool), timeout=90), "the pool did not refill: %s" % \
            open(os.path.join(pool, "pool.log")).read()[-2000:]
    return ready(pool)[0]


def vm_state(runtime, cid):
    """The vm object of a container's state.json."""
    with open(os.path.join(runtime.root, cid, "state.json")) as f:
        return json.load(f)["vm"]


def test_a_container_from_the_pool_runs_and_the_pool_refills(runtime, pool_dir):
    first = fill(runtime, pool_dir)
    runtime("create", "-b", runtime.bundle(["sh", "-c", "echo hi; sleep 100"]), "pl1", check=True)
    vm = vm_state(runtime, "pl1")
    assert vm["pool_dir"] == os.path.join(pool_dir, "used", os.path.basename(first["dir"]))
    assert vm["qemu_pid"] and rt.process_alive(vm["qemu_pid"], vm["qemu_start"])
    with open("/proc/%d/cgroup" % vm["qemu_pid"]) as f:
        qemu_cgroups = f.read()
    assert "/pl1" in qemu_cgroups and rt.POOL_CGROUP not in qemu_cgroups, "QEMU in the container's cgroup"
    with open("/proc/%d/cmdline" % vm["qemu_pid"], "rb") as f:
        argv = f.read().decode()
    assert ROOTFS[0] not in argv and "/pl1/" not in argv, "its files arrive beneath the pod export"
    runtime("start", "pl1", check=True)
    r = runtime("exec", "pl1", "cat", "/etc/passwd")
    assert r.returncode == 0 and "root:" in r.stdout, r.stderr
    assert runtime("exec", "pl1", "hostname").stdout.strip() == "runc", "the bundle's, not the warm-up's"
    assert poll(lambda: ready(pool_dir), timeout=90), "the pool refills after a create took its VM"
    assert runtime("kill", "pl1", "KILL").returncode == 0
    runtime.wait_status("pl1", "stopped")
    runtime("delete", "pl1", check=True)
    assert poll(lambda: not os.path.exists(vm["pool_dir"]), timeout=10), "the used VM's directory goes"
    assert poll(lambda: not rt.process_alive(vm["qemu_pid"], vm["qemu_start"]), timeout=10)


def test_a_pooled_vm_exports_its_files_alone_and_read_only_ones_stay_so(runtime, pool_dir, tmp_path):
    fill(runtime, pool_dir)
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "f").write_text("host\n")
    mounts = rt.default_spec()["mounts"] + [
        {"destination": "/ro", "type": "bind", "source": str(ro), "options": ["rbind", "ro"]}]
    caps = {k: ["CAP_SYS_ADMIN", "CAP_DAC_OVERRIDE"] for k in ("bounding", "effective", "permitted")}
    runtime("run", "-d", "-b", runtime.bundle(["sleep", "100"], mounts=mounts, capabilities=caps,
                                              noNewPrivileges=False), "pl2", check=True)
    vm = vm_state(runtime, "pl2")
    with open("/proc/%d/mountinfo" % vm["qemu_pid"]) as f:
        pod = os.path.join(vm["pool_dir"], rt.FILES_DIR, rt.POD_DIR) + "/"
        exported = sorted(ln.split()[4][len(pod):] for ln in f if ln.split()[4].startswith(pod))
    assert exported[:1] == ["0"] and all(e.startswith("0/") for e in exported[1:]), exported
    assert "0/rootfs" in exported and len(exported) >= 3, "its rootfs and bind, in slot 0 only"
    r = runtime("exec", "pl2", "sh", "-c", "mount -o remount,rw /ro; echo x > /ro/f; echo rc=$?")
    assert r.stdout.strip().splitlines()[-1] != "rc=0" and (ro / "f").read_text() == "host\n", \
        "read-only on the host, whatever the guest does: %r" % r.stderr
    r = runtime("exec", "pl2", "sh", "-c", "ls /; cat /proc/mounts | grep -c warmup")
    assert "bin" in r.stdout.split() and r.stdout.split()[-1] == "0", "its own root, no warm-up"
    runtime("delete", "--force", "pl2", check=True)


def test_killed_pool_parts_leave_nothing_and_create_still_works(runtime, pool_dir):
    k = fill(runtime, pool_dir)
    qemu = int(open("/proc/%d/task/%d/children" % (k["pid"], k["pid"])).read().split()[0])
    os.kill(qemu, signal.SIGKILL)  # a pooled VM died: its keeper removes it
    assert poll(lambda: not os.path.exists(k["dir"]) and not rt.process_alive(k["pid"], k["start"]),
                timeout=10), "a dead pooled VM is removed"
    r = runtime("run", "-b", runtime.bundle(["echo", "restored"]), "pl3")
    assert (r.returncode, r.stdout) == (0, "restored\n"), r.stderr
    warming = poll(lambda: [w for w in keepers(pool_dir) if w["group"] == "warming"], timeout=30)
    assert warming, "the run started a refill"
    os.kill(warming[0]["pid"], signal.SIGKILL)  # a refill killed mid-way: its QEMU dies with it
    assert poll(lambda: len(qemus_of(pool_dir)) == 0, timeout=10)
    runtime("run", "-b", runtime.bundle(["true"]), "pl4", check=True)  # its refill collects garbage
    assert poll(lambda: not os.path.exists(warming[0]["dir"]), timeout=60)
    k = fill(runtime, pool_dir)
    runtime("run", "-d", "-b", runtime.bundle(["sleep", "100"]), "pl5", check=True)
    vm = vm_state(runtime, "pl5")
    assert vm.get("pool_dir")
    os.kill(runtime.state("pl5")["pid"], signal.SIGKILL)  # the monitor: its keeper ends QEMU
    assert poll(lambda: not rt.process_alive(vm["qemu_pid"], vm["qemu_start"]), timeout=10)
    assert poll(lambda: not os.path.exists(vm["pool_dir"]), timeout=10)
    runtime("delete", "--force", "pl5", check=True)


def test_a_deleted_pool_directory_ends_its_vms_and_create_restores(runtime, pool_dir):
    k = fill(runtime, pool_dir)
    qemu = int(open("/proc/%d/task/%d/children" % (k["pid"], k["pid"])).read().split()[0])
    start = rt.proc_start_time(qemu)
    shutil.rmtree(os.path.join(pool_dir, k["group"]))
    assert poll(lambda: not rt.process_alive(k["pid"], k["start"]), timeout=10)
    assert poll(lambda: not rt.process_alive(qemu, start), timeout=10)
    r = runtime("run", "-b", runtime.bundle(["echo", "ok"]), "pl6")
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr


def test_the_pool_off_restores_and_refills_nothing(runtime, pool_dir):
    os.environ["CC_OCI_POOL"] = "0"
    try:
        poll(lambda: not [k for k in keepers(pool_dir) if k["group"] == "warming"], timeout=60)
        before = {k["pid"] for k in keepers(pool_dir)}
        runtime("create", "-b", runtime.bundle(["sleep", "100"]), "pl7", check=True)
        assert "pool_dir" not in vm_state(runtime, "pl7")
        runtime("delete", "--force", "pl7", check=True)
        time.sleep(2)
        assert {k["pid"] for k in keepers(pool_dir)} <= before, "no refill"
    finally:
        del os.environ["CC_OCI_POOL"]


def test_pool_processes_are_in_no_containers_cgroup_session_or_namespace(runtime, pool_dir):
    k = fill(runtime, pool_dir)
    runtime("run", "-d", "-b", runtime.bundle(["sleep", "100"]), "pl8", check=True)
    monitor = runtime.state("pl8")["pid"]
    with open("/proc/%d/cgroup" % k["pid"]) as f:
        lines = [ln for ln in f.read().splitlines() if ln.split(":")[1]]
    assert lines and all(ln.split(":", 2)[2].startswith("/" + rt.POOL_CGROUP) for ln in lines), lines
    assert os.getsid(k["pid"]) not in (os.getsid(monitor), os.getsid(0))
    for ns in ("net", "ipc", "uts", "pid"):
        assert os.readlink("/proc/%d/ns/%s" % (k["pid"], ns)) != os.readlink("/proc/%d/ns/%s" % (monitor, ns)), ns
    runtime("delete", "--force", "pl8", check=True)


def test_every_9p_tag_of_a_pooled_vm_is_empty_or_in_use_and_none_written(runtime, pool_dir):
    from test_security import MOUNT_ALL, privileged
    fill(runtime, pool_dir)
    r = runtime("run", "-b", privileged(runtime, ["sh", "-c", MOUNT_ALL]), "pl9")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert not [ln for ln in lines if "WROTE" in ln], r.stdout
    mounted = {ln.split(":")[0] for ln in lines}
    assert rt.POOL_POD_TAG not in mounted, "the pod export is the agent's (one mount per channel)"
    assert mounted and all(ln.endswith(":") or ln.endswith(": ") for ln in lines), \
        "the rootfs tag and the spare slots export an empty directory: %r" % r.stdout
