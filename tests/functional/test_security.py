"""The VM boundary for files, judged from the host: a workload that is root with every
capability remounts, writes and mounts every 9p tag its VM has; the host must see no change
beyond the container's own writable mounts (see README, "Security model")."""
import json
import os
import subprocess

import pytest

import cc_oci_runtime as rt
from conftest import poll

ALL_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
            "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
            "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
            "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
            "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
            "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
            "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
            "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ"]
TAGS = ["rootfs"] + ["share%d" % i for i in range(rt.SHARE_SLOTS)]
# Mount every 9p tag of the VM (a tag the agent already uses is busy) and try to write there.
MOUNT_ALL = ("for t in %s; do mkdir -p /dev/m/$t; "
             "if mount -t 9p -o trans=virtio,version=9p2000.L $t /dev/m/$t 2>/dev/null; then "
             "echo \"$t: $(ls -A /dev/m/$t | tr '\\n' ' ')\"; "
             "touch /dev/m/$t/planted-$t 2>/dev/null && echo \"$t: WROTE\"; fi; done; true" % " ".join(TAGS))


def privileged(runtime, args, **changes):
    """A bundle whose workload is root with every capability (the worst case)."""
    caps = {k: ALL_CAPS for k in ("bounding", "effective", "inheritable", "permitted", "ambient")}
    return runtime.bundle(args, capabilities=caps, **changes)


def qemu_argv(runtime, cid):
    """The argv of the container's QEMU (from its state)."""
    pid = runtime.state(cid)["pid"]
    with open(os.path.join(runtime.root, cid, "state.json")) as f:
        qemu = json.load(f)["vm"]["qemu_pid"]
    with open("/proc/%d/cmdline" % qemu, "rb") as f:
        argv = f.read().rstrip(b"\0").decode().split("\0")
    return pid, qemu, argv


def fsdevs(argv):
    """{path: options} of every -fsdev in argv."""
    out = {}
    for i, a in enumerate(argv[:-1]):
        if a == "-fsdev":
            opts = dict(o.split("=", 1) for o in argv[i + 1].replace(",,", "\0").split(",")[1:])
            out.setdefault(opts.pop("path").replace("\0", ","), []).append(opts)
    return out


@pytest.fixture
def host_files(tmp_path):
    """A host directory with a config file and a data file, and a hosts-like file elsewhere."""
    conf = tmp_path / "srv-conf"
    conf.mkdir()
    (conf / "app.conf").write_text("original\n")
    (conf / "secret").write_text("not given to the container\n")
    etc = tmp_path / "engine-dir"
    etc.mkdir()
    (etc / "hosts").write_text("127.0.0.1 localhost\n")
    (etc / "hostconfig.json").write_text("{}\n")
    return conf, etc


def test_read_only_bind_mounts_stay_read_only_after_remount(runtime, host_files):
    conf, etc = host_files
    mounts = rt.default_spec()["mounts"] + [
        {"destination": "/conf", "type": "bind", "source": str(conf), "options": ["rbind", "ro"]},
        {"destination": "/etc/app.conf", "type": "bind", "source": str(conf / "app.conf"),
         "options": ["rbind", "ro"]}]
    script = ("mount -o remount,rw /conf && echo remounted; echo hacked > /conf/app.conf; "
              "echo hacked > /conf/new; mount -o remount,rw /etc/app.conf; echo hacked > /etc/app.conf; "
              "mount -o remount,rw /; echo hacked > /planted; echo done")
    b = privileged(runtime, ["sh", "-c", script], mounts=mounts)
    r = runtime("run", "-b", b, "ro-binds")
    assert r.returncode == 0 and "done" in r.stdout, r.stderr
    assert "remounted" in r.stdout, "the guest's own remount is expected to work"
    assert r.stderr.count("Read-only file system") >= 3, r.stderr
    assert (conf / "app.conf").read_text() == "original\n"
    assert sorted(os.listdir(conf)) == ["app.conf", "secret"]


def test_read_only_rootfs_stays_read_only_after_remount(runtime, tmp_path, rootfs):
    import shutil
    own = tmp_path / "rootfs"
    shutil.copytree(rootfs, own, symlinks=True)
    before = sorted(os.listdir(own / "etc"))
    script = "mount -o remount,rw / && echo remounted; echo hacked > /etc/passwd; touch /etc/planted; echo done"
    b = privileged(runtime, ["sh", "-c", script],
                   root={"path": str(own), "readonly": True},
                   mounts=rt.default_spec()["mounts"] + [{"destination": "/made/here", "type": "tmpfs",
                                                          "source": "tmpfs"}])
    r = runtime("run", "-b", b, "ro-root")
    assert r.returncode == 0 and "remounted" in r.stdout and "done" in r.stdout, r.stderr
    assert "Read-only file system" in r.stderr
    assert sorted(os.listdir(own / "etc")) == before
    assert "hacked" not in (own / "etc" / "passwd").read_text()
    assert os.path.isdir(own / "made" / "here"), "the host makes a read-only rootfs's mount points"


def test_every_9p_tag_mounted_and_written_leaves_the_host_untouched(runtime, host_files, tmp_path):
    conf, etc = host_files
    data = tmp_path / "data"
    data.mkdir()
    mounts = rt.default_spec()["mounts"] + [
        {"destination": "/data", "type": "bind", "source": str(data), "options": ["rbind"]},
        {"destination": "/etc/hosts", "type": "bind", "source": str(etc / "hosts"), "options": ["rbind"]}]
    a = privileged(runtime, ["sh", "-c", "echo from-a > /data/a; echo ready; sleep 1000"], mounts=mounts,
                   vm={"pool": 0})  # restored VMs' tags (a pooled VM's: test_pool.py)
    runtime("create", "-b", a, "first", check=True)
    runtime("start", "first", check=True)
    cache_empty = os.path.join(rt.CACHE_DIR, "empty")
    b = privileged(runtime, ["sh", "-c", MOUNT_ALL], vm={"pool": 0})
    r = runtime("run", "-b", b, "second")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert not [ln for ln in lines if "WROTE" in ln], r.stdout
    spare = [ln for ln in lines if ln.startswith("share")]
    # the second container has no binds: all spare, in the template with the fewest slots;
    # the first spare one is its pod export, which holds only its empty member slots
    assert len(spare) == rt.SHARE_SLOT_CLASSES[0], r.stdout
    pod, spare = spare[0], spare[1:]
    assert sorted(pod.split()[1:]) == sorted(str(n) for n in range(rt.POD_SLOTS)), pod
    assert all(ln.endswith(":") or ln.endswith(": ") for ln in spare), "spare slots are not empty: %s" % spare
    assert os.listdir(cache_empty) == []
    # and the first container, whose spare tags are its own, writes only its own writable mounts
    r = runtime("exec", "first", "sh", "-c", MOUNT_ALL)
    assert r.returncode == 0, r.stderr
    assert not [ln for ln in r.stdout.splitlines() if "WROTE" in ln], r.stdout
    assert sorted(os.listdir(etc)) == ["hostconfig.json", "hosts"]
    assert os.listdir(data) == ["a"]
    runtime("kill", "first", "KILL")
    runtime("delete", "--force", "first", check=True)


def test_qemu_exports_only_the_given_files_and_read_only_mounts_read_only(runtime, host_files):
    conf, etc = host_files
    mounts = rt.default_spec()["mounts"] + [
        {"destination": "/etc/hosts", "type": "bind", "source": str(etc / "hosts"), "options": ["rbind", "rw"]},
        {"destination": "/etc/app.conf", "type": "bind", "source": str(conf / "app.conf"), "options": ["ro"]},
        {"destination": "/conf", "type": "bind", "source": str(conf), "options": ["rbind", "ro"]}]
    b = privileged(runtime, ["sh", "-c", "echo ready; sleep 1000"], mounts=mounts,
                   vm={"pool": 0})  # a VM restored for it (test_pool.py: a pooled VM's exports)
    runtime("create", "-b", b, "exports", check=True)
    _, qemu, argv = qemu_argv(runtime, "exports")
    exports = fsdevs(argv)
    assert str(etc) not in exports, "a file's parent directory is exported"
    assert [o.get("readonly") for o in exports[str(conf)]] == ["on"]
    assert "-incoming" in argv, "warm start expected (restored from the template)"
    state_dir = os.path.join(runtime.root, "exports")
    staged = {p: o for p, o in exports.items() if p.startswith(state_dir)}
    assert staged, exports
    assert all(o.get("readonly") == "on" for p, opts in staged.items()
               if not p.endswith(("/rw", "/" + rt.POD_DIR)) for o in opts)
    assert [o.get("readonly") for o in staged[state_dir + "/files/rw"]] == [None]
    # the pod export: writable for members' read-write files, itself on the read-only tmpfs
    assert [o.get("readonly") for o in staged[state_dir + "/files/pod"]] == [None]
    pod = subprocess.run(["nsenter", "-t", str(qemu), "-m", "sh", "-c",
                          "cd %s/files/pod && ls -A 0 && touch planted 0/planted" % state_dir],
                         capture_output=True, text=True)
    assert pod.stdout == "" and "Read-only file system" in pod.stderr, (pod.stdout, pod.stderr)
    # In QEMU's mount namespace: each staging directory holds just the given files, on a tmpfs
    # that is read-only, and the spare slots' directory is empty.
    listing = subprocess.run(["nsenter", "-t", str(qemu), "-m", "sh", "-c",
                              "cd %s/files && ls -A ro rw empty && touch rw/planted" % state_dir],
                             capture_output=True, text=True)
    assert listing.stdout.split() == ["empty:", "ro:", "1", "rw:", "0"], listing.stdout
    assert "Read-only file system" in listing.stderr
    # an in-place change of a bind-mounted file (an engine updating /etc/hosts) shows inside
    runtime("start", "exports", check=True)
    with open(etc / "hosts", "a") as f:
        f.write("10.1.2.3 added-later\n")
    r = runtime("exec", "exports", "cat", "/etc/hosts")
    assert "10.1.2.3 added-later" in r.stdout, (r.stdout, r.stderr)
    r = runtime("exec", "exports", "sh", "-c", "echo 10.9.9.9 from-inside >> /etc/hosts")
    assert r.returncode == 0, r.stderr
    assert "from-inside" in (etc / "hosts").read_text()
    runtime("kill", "exports", "KILL")
    runtime("delete", "--force", "exports", check=True)


def test_workload_cannot_reach_the_agents_mounts(runtime, host_files):
    conf, _ = host_files
    mounts = rt.default_spec()["mounts"] + [
        {"destination": "/etc/app.conf", "type": "bind", "source": str(conf / "app.conf"), "options": ["ro"]}]
    # pivot_root, not chroot: the container's mount namespace holds no agent mount
    script = "grep -c ' 9p ' /proc/self/mountinfo; ls /run/cc 2>&1; awk '{print $5}' /proc/self/mountinfo"
    b = privileged(runtime, ["sh", "-c", script], mounts=mounts)
    r = runtime("run", "-b", b, "pivot")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[0] == "2", r.stdout  # the rootfs and the one file, nothing else over 9p
    assert "/run/cc/root" not in r.stdout and "/run/cc/shares" not in r.stdout
    assert "No such file or directory" in r.stdout  # no /run/cc in the container


def test_tmpfs_on_an_absolute_symlink_stays_in_the_rootfs(runtime, tmp_path, rootfs):
    import shutil
    own = tmp_path / "rootfs"
    shutil.copytree(rootfs, own, symlinks=True)
    os.makedirs(own / "var" / "cache")
    os.symlink("/var/cache", own / "cachelink")
    b = runtime.bundle(["sh", "-c", "grep ' /var/cache ' /proc/self/mountinfo | cut -d' ' -f5,9"],
                       root={"path": str(own), "readonly": False},
                       mounts=rt.default_spec()["mounts"] + [
                           {"destination": "/cachelink", "type": "tmpfs", "source": "tmpfs"}])
    r = runtime("run", "-b", b, "symlink-tmpfs")
    assert (r.returncode, r.stdout.strip()) == (0, "/var/cache tmpfs"), r.stderr


def test_read_only_dev_tmpfs(runtime):
    mounts = [m if m["destination"] != "/dev" else dict(m, options=m["options"] + ["ro"])
              for m in rt.default_spec()["mounts"]]
    b = runtime.bundle(["sh", "-c", "ls /dev/null /dev/pts/ptmx >/dev/null && touch /dev/x"], mounts=mounts)
    r = runtime("run", "-b", b, "ro-dev")
    assert r.returncode == 1 and "Read-only file system" in r.stderr, (r.returncode, r.stderr)


def test_bind_source_relative_to_the_bundle(runtime):
    b = runtime.bundle(["cat", "/b/config.json"])
    with open(os.path.join(b, "config.json")) as f:
        conf = json.load(f)
    conf["mounts"].append({"destination": "/b", "type": "bind", "source": ".", "options": ["rbind", "ro"]})
    with open(os.path.join(b, "config.json"), "w") as f:
        json.dump(conf, f)
    r = runtime("run", "-b", b, "relative-bind")
    assert r.returncode == 0 and '"destination": "/b"' in r.stdout.replace('":"', '": "'), r.stderr


def test_tmpfs_copyup_starts_with_the_directory_and_keeps_writes_off_the_host(runtime, tmp_path, rootfs):
    import shutil
    own = tmp_path / "rootfs"
    shutil.copytree(rootfs, own, symlinks=True)
    b = runtime.bundle(["sh", "-c", "cat /etc/passwd | head -1; echo new > /etc/new; ls /etc; grep ' /etc ' /proc/self/mountinfo | cut -d' ' -f9"],
                       root={"path": str(own), "readonly": False},
                       mounts=rt.default_spec()["mounts"] + [  # podman's --tmpfs /etc
                           {"destination": "/etc", "type": "tmpfs", "source": "tmpfs",
                            "options": ["rw", "rprivate", "nosuid", "nodev", "tmpcopyup"]}])
    r = runtime("run", "-b", b, "copyup")
    assert r.returncode == 0, r.stderr
    before = sorted(os.listdir(own / "etc"))
    assert r.stdout.split() == ["root:x:0:0:root:/root:/bin/sh"] + sorted(before + ["new"]) + ["tmpfs"]
    assert "new" not in before
