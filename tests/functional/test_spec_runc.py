"""The spec inside the VM, measured against runc: the same bundle run by runc (installed) and
by this runtime, and what the workload itself observes compared. runc's output is the
expected value (never hard-coded); only what the guest kernel (6.1) legitimately shows
differently from the host's is normalised."""
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from conftest import rt
import engines

FIXTURES = "/work/shared/fixtures/engine-configs"
RUNC = shutil.which("runc")
DOCKER_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
               "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
               "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]
CAPS_SCRIPT = "grep -E '^(Cap|NoNewPrivs)' /proc/self/status; id"

pytestmark = pytest.mark.skipif(RUNC is None, reason="runc is not installed")


class Both:
    """Runs one bundle under runc and under this runtime."""

    def __init__(self, runtime, tmp):
        self.runtime, self.tmp, self.n = runtime, tmp, 0

    def bundle(self, args, **changes):
        """A bundle (conftest's Runtime.bundle); linux.* keys given as linux_KEY."""
        linux = {k[6:]: changes.pop(k) for k in list(changes) if k.startswith("linux_")}
        process = {k: changes.pop(k) for k in ("oomScoreAdj",) if k in changes}
        b = self.runtime.bundle(args, **changes)
        path = os.path.join(b, "config.json")
        with open(path) as f:
            conf = json.load(f)
        conf["linux"].update(linux)
        conf["process"].update(process)
        with open(path, "w") as f:
            json.dump(conf, f)
        return b

    def runc(self, bundle):
        """runc run of the bundle: (exit status, output)."""
        self.n += 1
        cid = "spec-runc-%d-%d" % (os.getpid(), self.n)
        root = str(self.tmp / "runc-root")
        try:
            p = subprocess.run([RUNC, "--root", root, "run", "--bundle", bundle, cid],
                               stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=60)
        finally:
            subprocess.run([RUNC, "--root", root, "delete", "--force", cid], capture_output=True)
        return p.returncode, p.stdout + p.stderr

    def ours(self, bundle):
        """This runtime's run of the bundle: (exit status, output)."""
        self.n += 1
        cid = "spec-ours-%d" % self.n
        r = self.runtime("run", "--bundle", bundle, cid, input="", timeout=180)
        return r.returncode, r.stdout + r.stderr

    def both(self, args, **changes):
        """(runc's, ours) for one bundle."""
        b = self.bundle(args, **changes)
        return self.runc(b), self.ours(b)


@pytest.fixture
def both(runtime, tmp_path):
    """A Both for the test."""
    return Both(runtime, tmp_path)


def caps(*names):
    """A process.capabilities object with the same names in the usual three sets."""
    return {k: list(names) for k in ("bounding", "effective", "permitted")}


def test_capabilities_docker_default(both):
    theirs, ours = both.both(["sh", "-c", CAPS_SCRIPT], capabilities=caps(*DOCKER_CAPS),
                             noNewPrivileges=False)
    assert "CapEff:\t00000000a80425fb" in theirs[1]
    assert ours == theirs


def test_capabilities_non_root_ambient_inheritable(both):
    c = caps("CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_KILL")
    c["inheritable"] = ["CAP_NET_BIND_SERVICE", "CAP_NET_RAW"]
    c["ambient"] = ["CAP_NET_BIND_SERVICE"]
    theirs, ours = both.both(["sh", "-c", CAPS_SCRIPT], capabilities=c,
                             user={"uid": 1000, "gid": 1000, "additionalGids": [5]})
    assert ours == theirs


def test_no_capabilities_object(both):
    b = both.bundle(["sh", "-c", CAPS_SCRIPT])
    path = os.path.join(b, "config.json")
    with open(path) as f:
        conf = json.load(f)
    del conf["process"]["capabilities"]
    with open(path, "w") as f:
        json.dump(conf, f)
    assert both.ours(b) == both.runc(b)


def test_seccomp_errno_and_argument_comparison(both):
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
               "syscalls": [{"names": ["mkdirat", "mkdir"], "action": "SCMP_ACT_ERRNO"},
                            {"names": ["fchmodat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 22,
                             "args": [{"index": 2, "value": 0o700, "op": "SCMP_CMP_EQ"}]},
                            {"names": ["chmod"], "action": "SCMP_ACT_ERRNO", "errnoRet": 22,
                             "args": [{"index": 1, "value": 0o700, "op": "SCMP_CMP_EQ"}]},
                            {"names": ["no_such_syscall"], "action": "SCMP_ACT_KILL"}]}
    script = ("mkdir /tmp/sc-$$; echo mkdir=$?; touch /tmp/f-$$; chmod 755 /tmp/f-$$; "
              "echo chmod755=$?; chmod 700 /tmp/f-$$; echo chmod700=$?; rm -f /tmp/f-$$")
    theirs, ours = both.both(["sh", "-c", script], linux_seccomp=profile)
    assert "mkdir=1" in theirs[1] and "chmod700=1" in theirs[1]
    assert ours == theirs


def test_seccomp_kill_action(both):
    profile = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_KILL_PROCESS"}]}
    theirs, ours = both.both(["sh", "-c", "echo before; exec sh -c 'echo $PPID'"],
                             linux_seccomp=profile)
    assert ours[0] == theirs[0] != 0


@pytest.mark.parametrize("fixture", ["docker-bridge-config.json", "podman-config.json"])
def test_engine_default_seccomp_profiles_load(both, fixture):
    with open(os.path.join(FIXTURES, fixture)) as f:
        profile = json.load(f)["linux"]["seccomp"]
    theirs, ours = both.both(["sh", "-c", "echo ok; ls / >/dev/null && echo ls"],
                             linux_seccomp=profile, capabilities=caps(*DOCKER_CAPS))
    assert theirs == (0, "ok\nls\n")
    assert ours == theirs


DEVICES = [{"path": "/dev/cc-null", "type": "c", "major": 1, "minor": 3, "fileMode": 0o640,
            "uid": 1000, "gid": 1001},
           {"path": "/dev/sub/cc-loop", "type": "b", "major": 7, "minor": 200, "fileMode": 0o600,
            "uid": 0, "gid": 6},
           {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}]


def test_linux_devices_nodes(both):
    script = "stat -c '%n %F %t:%T %a %u:%g' /dev/cc-null /dev/sub/cc-loop /dev/fuse"
    theirs, ours = both.both(["sh", "-c", script], linux_devices=DEVICES)
    assert theirs[0] == 0
    assert ours == theirs


def test_device_cgroup_denies(both):
    rules = [{"allow": False, "access": "rwm"},
             {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
             {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "r"}]
    script = ("for d in /dev/cc-null /dev/zero /dev/full /dev/sub/cc-loop; do "
              "head -c1 $d 2>&1 >/dev/null | sed 's/.*: //'; echo $d=$?; done; "
              "(echo x >/dev/fuse) 2>&1 | sed 's/.*: //'")
    c = caps(*DOCKER_CAPS)
    theirs, ours = both.both(["sh", "-c", script], linux_devices=DEVICES, capabilities=c,
                             linux_resources={"devices": rules})
    assert theirs[1].count("Operation not permitted") == 2  # the block device, fuse for writing
    assert ours == theirs


def _mounts(out, binds=()):
    """(mount point, type, options) of each /proc/self/mounts line; options that only the
    kernel version changes are dropped; the root and bind mounts (a 9p share here, the host's
    filesystem under runc) keep their mount point and ro/rw only."""
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) != 6:
            continue
        opts = [o for o in parts[3].split(",") if o not in ("inode64",)]
        if parts[1] == "/" or parts[1] in binds:
            rows.append((parts[1], opts[0]))
        else:
            rows.append((parts[1], parts[2], ",".join(opts)))
    return rows


def test_mount_order_proc_included(both, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    conf = rt.default_spec()
    mounts = [m for m in conf["mounts"] if m["destination"] != "/proc"]
    mounts.insert(3, {"destination": "/proc", "type": "proc", "source": "proc"})
    mounts.append({"destination": "/proc/driver", "type": "tmpfs", "source": "tmpfs",
                   "options": ["nosuid"]})
    for i, prop in enumerate(("rshared", "rslave", "rprivate", "shared")):
        mounts.append({"destination": "/mnt/p%d" % i, "type": "bind", "source": str(shared),
                       "options": ["rbind", prop]})
    theirs, ours = both.both(["cat", "/proc/self/mounts"], mounts=mounts,
                             linux_maskedPaths=[], linux_readonlyPaths=[])
    assert theirs[0] == 0 and [r[0] for r in _mounts(theirs[1])][:5] == [
        "/", "/dev", "/dev/pts", "/dev/shm", "/proc"]
    binds = [m["destination"] for m in mounts if m["type"] == "bind"]
    assert _mounts(ours[1], binds) == _mounts(theirs[1], binds)


def test_mount_propagation_shared(both, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    conf = rt.default_spec()
    mounts = conf["mounts"] + [{"destination": "/mnt/s", "type": "bind", "source": str(shared),
                                "options": ["rbind", "rshared"]}]
    script = "grep -c ' /mnt/s .*shared:' /proc/self/mountinfo"
    theirs, ours = both.both(["sh", "-c", script], mounts=mounts)
    assert theirs == (0, "1\n")
    assert ours == theirs


def test_oom_score_adj(both):
    theirs, ours = both.both(["cat", "/proc/self/oom_score_adj"], oomScoreAdj=437)
    assert theirs == (0, "437\n")
    assert ours == theirs


def test_user_namespace_maps(both):
    maps = {"uidMappings": [{"containerID": 0, "hostID": 0, "size": 2000},
                            {"containerID": 2000, "hostID": 102000, "size": 1000}],
            "gidMappings": [{"containerID": 0, "hostID": 0, "size": 3000}]}
    conf = rt.default_spec()
    mounts = [m for m in conf["mounts"] if m["destination"] != "/sys"]
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "user", "network")]
    theirs, ours = both.both(["sh", "-c", "cat /proc/self/uid_map /proc/self/gid_map; id"],
                             mounts=mounts, linux_namespaces=namespaces,
                             linux_uidMappings=maps["uidMappings"],
                             linux_gidMappings=maps["gidMappings"])
    assert theirs[0] == 0, theirs
    assert " 102000 " in theirs[1]
    assert ours == theirs


def test_start_container_hook_runs_inside(both):
    hook = {"path": "/bin/sh", "args": ["sh", "-c", "cat > /tmp/hook-$(id -u); echo hook ran"]}
    script = "grep -o '\"status\":\"[a-z]*\"' /tmp/hook-1000; rm -f /tmp/hook-1000; id -u"
    theirs, ours = both.both(["sh", "-c", script], hooks={"startContainer": [hook]},
                             user={"uid": 1000, "gid": 1000})
    assert theirs == (0, '"status":"created"\n1000\n')
    assert ours == theirs


def test_host_hooks_see_the_states_runc_gives_them(both, tmp_path):
    """prestart and createRuntime get status "creating", as from runc (here they run while the
    VM boots, once the monitor is in the container's namespaces). runc's poststart sees
    "created" or "running", as its process races it: not compared."""
    log, hook = tmp_path / "hook-states", tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\nprintf '%%s %%s\\n' \"$1\" \"$(grep -o '\"status\": *\"[a-z]*\"' "
                    "| tr -d ' ')\" >> %s\n" % log)
    hook.chmod(0o755)
    hooks = {name: [{"path": str(hook), "args": ["hook.sh", name]}]
             for name in ("prestart", "createRuntime")}
    b = both.bundle(["true"], hooks=hooks)
    assert both.runc(b)[0] == 0
    theirs = log.read_text()
    log.unlink()
    assert both.ours(b)[0] == 0
    assert theirs == 'prestart "status":"creating"\ncreateRuntime "status":"creating"\n'
    assert log.read_text() == theirs


def test_failing_start_container_hook_fails(both):
    hook = {"path": "/bin/false"}
    theirs, ours = both.both(["echo", "never"], hooks={"startContainer": [hook]})
    assert theirs[0] != 0 and ours[0] != 0
    assert "never" not in theirs[1] and "never" not in ours[1]


def test_create_container_hook_in_the_guest(runtime, both):
    """createContainer: runc runs the host's program (the runtime namespace, before pivot_root);
    here the program is the container's, run after the mounts in its mount namespace."""
    hook = {"path": "/bin/sh", "args": ["sh", "-c", "grep -c ' /dev/shm ' /proc/self/mounts "
                                                    "> /tmp/create-hook"]}
    r = both.ours(both.bundle(["sh", "-c", "cat /tmp/create-hook; rm /tmp/create-hook"],
                              hooks={"createContainer": [hook]}))
    assert r == (0, "1\n")
    bad = both.bundle(["echo", "never"], hooks={"createContainer": [{"path": "/bin/false"}]})
    r = runtime("create", "--bundle", bad, "spec-bad-hook")
    assert r.returncode != 0 and "createContainer hook /bin/false failed" in r.stderr
    assert runtime("state", "spec-bad-hook").returncode != 0


def _console_run(argv_create, argv_start, argv_delete, tmp_path):
    """create with --console-socket, start, and read the pty's output until the end."""
    path = str(tmp_path / ("console-%d.sock" % time.monotonic_ns()))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    try:
        with tempfile.TemporaryFile() as err:
            c = subprocess.run(argv_create + ["--console-socket", path], stdin=subprocess.DEVNULL,
                               stdout=err, stderr=err, timeout=180)
            assert c.returncode == 0, (argv_create, err.seek(0) or err.read())
        server.settimeout(30)
        conn, _ = server.accept()
        with conn:
            _msg, fds, _f, _a = socket.recv_fds(conn, 1024, 1)
        master = fds[0]
        subprocess.run(argv_start, check=True, timeout=60, capture_output=True)
        out = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                data = os.read(master, 4096)
            except OSError:
                break
            if not data:
                break
            out += data
        os.close(master)
        return out.decode().replace("\r", "")
    finally:
        server.close()
        subprocess.run(argv_delete, capture_output=True, timeout=60)


def test_terminal_owned_by_the_user(both, runtime, tmp_path):
    b = both.bundle(["sh", "-c", "stat -c '%u:%g %a' $(readlink /proc/self/fd/0); sleep 1"],
                    user={"uid": 1000, "gid": 1000}, terminal=True)
    root = str(tmp_path / "runc-root")
    theirs = _console_run([RUNC, "--root", root, "create", "--bundle", b, "tty-r"],
                          [RUNC, "--root", root, "start", "tty-r"],
                          [RUNC, "--root", root, "delete", "--force", "tty-r"], tmp_path)
    ours = _console_run(runtime.argv("create", "--bundle", b, "tty-o"), runtime.argv("start", "tty-o"),
                        runtime.argv("delete", "--force", "tty-o"), tmp_path)
    assert theirs.startswith("1000:5 620")
    assert ours == theirs


def _exec_in(argv_prefix, bundle, cid, *process_files):
    """create + start a sleeping container, exec each process file in it; [(status, output)]."""
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL,
             "stderr": subprocess.DEVNULL, "timeout": 180}
    try:
        subprocess.run(argv_prefix + ["create", "--bundle", bundle, cid], check=True, **quiet)
        subprocess.run(argv_prefix + ["start", cid], check=True, **quiet)
        results = []
        for process_file in process_files:
            r = subprocess.run(argv_prefix + ["exec", "--process", process_file, cid],
                               stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=120)
            results.append((r.returncode, r.stdout + r.stderr))
        return results
    finally:
        subprocess.run(argv_prefix + ["delete", "--force", cid], capture_output=True, timeout=60)


def test_exec_capabilities_and_seccomp(both, runtime, tmp_path):
    profile = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]}
    b = both.bundle(["sleep", "60"], capabilities=caps(*DOCKER_CAPS), linux_seccomp=profile,
                    oomScoreAdj=17)
    c = caps("CAP_KILL", "CAP_NET_RAW")
    c["inheritable"] = c["ambient"] = ["CAP_NET_RAW"]
    process = {"args": ["sh", "-c", CAPS_SCRIPT + "; mkdir /tmp/e-x; echo mkdir=$?; "
                        "cat /proc/self/oom_score_adj"],
               "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 1000, "gid": 1000},
               "capabilities": c, "noNewPrivileges": True}
    pfile, plain = tmp_path / "process.json", tmp_path / "plain.json"
    pfile.write_text(json.dumps(process))
    del process["capabilities"]  # then the container's, as runc has it
    plain.write_text(json.dumps(dict(process, user={"uid": 0, "gid": 0})))
    theirs = _exec_in([RUNC, "--root", str(tmp_path / "runc-root")], b, "exec-r", str(pfile),
                      str(plain))
    ours = _exec_in(runtime.argv(), b, "exec-o", str(pfile), str(plain))
    assert theirs[0][0] == 0 and "mkdir=1" in theirs[0][1]
    assert "CapAmb:\t0000000000002000" in theirs[0][1]
    assert "CapEff:\t00000000a80425fb" in theirs[1][1]
    assert ours == theirs


def test_exec_failure_after_start_is_the_process_stderr_and_status_1(both, runtime, tmp_path):
    """runc's start releases the process and returns: an exec that fails after it (here a file
    of no executable format) is the container's stderr and exit status 1; start succeeds."""
    root = engines.make_busybox_rootfs(tmp_path / "badroot")
    bad = os.path.join(str(root), "bad")
    with open(bad, "wb") as f:
        f.write(b"\0\1not a program")
    os.chmod(bad, 0o755)
    root_spec = {"path": str(root), "readonly": False}
    theirs, ours = both.both(["/bad"], root=root_spec)
    assert theirs == (1, "exec /bad: exec format error\n")
    assert ours == theirs
    b = both.bundle(["/bad"], root=root_spec)
    runtime("create", "-b", b, "spec-bad-exec", check=True)
    assert runtime("start", "spec-bad-exec").returncode == 0
    runtime.wait_status("spec-bad-exec", "stopped", timeout=60)
    runtime("delete", "spec-bad-exec", check=True)


# -- namespaces: paths checked, and what the host sees at /proc/<pid>/ns ------

NS_FILES = {"cgroup": "cgroup", "ipc": "ipc", "mount": "mnt", "network": "net", "pid": "pid",
            "user": "user", "uts": "uts"}  # type -> its /proc/PID/ns name (runc 1.1: no time)
DEFAULT_NAMESPACES = ("pid", "network", "ipc", "uts", "mount")
MAPS = {"uidMappings": [{"containerID": 0, "hostID": 0, "size": 65536}],
        "gidMappings": [{"containerID": 0, "hostID": 0, "size": 65536}]}


def _namespaces(*given, **paths):
    """linux.namespaces of the given types (new), then each of paths as {type: path}."""
    return [{"type": t} for t in given] + [{"type": t, "path": p} for t, p in paths.items()]


def _leftovers(cid):
    """What a refused create of cid may have left: processes naming it, cgroups, mounts."""
    found = [p for p in os.listdir("/proc") if p.isdigit() and cid.encode() in _cmdline(p)]
    for mount_point, _version, _controllers in rt.cgroup_hierarchies():
        for top, dirs, _files in os.walk(mount_point):
            found += [os.path.join(top, d) for d in dirs if d == cid]
    with open("/proc/self/mountinfo") as f:
        found += [ln for ln in f if cid in ln]
    return found


def _cmdline(pid):
    """A process's command line (b"" once gone)."""
    try:
        with open("/proc/%s/cmdline" % pid, "rb") as f:
            return f.read()
    except OSError:
        return b""


@pytest.mark.parametrize("kind", sorted(NS_FILES))
def test_namespace_path_of_another_type_is_refused_as_by_runc(both, runtime, kind):
    other = "uts" if kind == "ipc" else "ipc"
    path = "/proc/self/ns/" + other
    namespaces = _namespaces(*[t for t in DEFAULT_NAMESPACES if t != kind], **{kind: path})
    b = both.bundle(["true"], linux_namespaces=namespaces, **(
        {"linux_" + k: v for k, v in MAPS.items()} if kind == "user" else {}))
    theirs = both.runc(b)
    assert theirs[0] == 1 and "failed to setns into %s namespace: Invalid argument" % (
        {"mount": "mnt", "network": "net"}.get(kind, kind)) in theirs[1]
    ours = both.ours(b)
    index = [ns["type"] for ns in namespaces].index(kind)
    message = ("config.json: linux.namespaces[%d]: %s is %s %s namespace, not %s"
               % (index, path, "an" if other == "ipc" else "a", other, kind))
    assert ours[0] == theirs[0] and ours[1].endswith(' level=error msg="%s"\n' % message)
    cid = "spec-ours-%d" % both.n  # the id both.ours gave it
    assert cid not in os.listdir(runtime.root)
    assert _leftovers(cid) == []


def _ns_of(pid):
    """{type: /proc/PID/ns link} for NS_FILES, and the hostname in pid's uts namespace."""
    links = {t: os.readlink("/proc/%d/ns/%s" % (pid, name)) for t, name in NS_FILES.items()}
    host = subprocess.run(["nsenter", "-t", str(pid), "-u", "cat", "/proc/sys/kernel/hostname"],
                          capture_output=True, text=True, check=True).stdout.strip()
    return links, host


def _created_ns(argv_prefix, bundle, cid, tmp_path):
    """create the bundle (not started), then _ns_of the pid of --pid-file; deleted after."""
    pid_file = tmp_path / ("%s.pid" % cid)
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL,
             "stderr": subprocess.DEVNULL, "timeout": 180}
    try:
        subprocess.run(argv_prefix + ["create", "--bundle", bundle, "--pid-file", str(pid_file),
                                      cid], check=True, **quiet)
        return _ns_of(int(pid_file.read_text()))
    finally:
        subprocess.run(argv_prefix + ["delete", "--force", cid], capture_output=True, timeout=60)


def _differing(links, reference):
    """The namespace types whose link differs from reference's."""
    return {t for t in links if links[t] != reference[t]}


def test_host_sees_the_new_namespaces_the_config_asks_for_as_with_runc(both, runtime, tmp_path):
    host, host_name = _ns_of(os.getpid())
    b = both.bundle(["sleep", "30"], hostname="cc-ns-new",
                    linux_namespaces=_namespaces(*DEFAULT_NAMESPACES + ("cgroup",)))
    theirs = _created_ns([RUNC, "--root", str(tmp_path / "runc-root")], b, "ns-new-r", tmp_path)
    ours = _created_ns(runtime.argv(), b, "ns-new-o", tmp_path)
    assert _differing(theirs[0], host) == {"pid", "network", "ipc", "uts", "mount", "cgroup"}
    assert theirs[1] == "cc-ns-new" != host_name
    assert _differing(ours[0], host) == _differing(theirs[0], host)
    assert ours[1] == theirs[1]
    assert _ns_of(os.getpid()) == (host, host_name)


def test_host_sees_the_hosts_namespaces_the_config_does_not_ask_for(both, runtime, tmp_path):
    host, _name = _ns_of(os.getpid())
    b = both.bundle(["sleep", "30"], linux_namespaces=_namespaces("pid", "network", "mount"))
    path = os.path.join(b, "config.json")
    with open(path) as f:
        conf = json.load(f)
    del conf["hostname"]  # runc refuses a hostname without a uts namespace
    with open(path, "w") as f:
        json.dump(conf, f)
    theirs = _created_ns([RUNC, "--root", str(tmp_path / "runc-root")], b, "ns-few-r", tmp_path)
    ours = _created_ns(runtime.argv(), b, "ns-few-o", tmp_path)
    assert _differing(theirs[0], host) == {"pid", "network", "mount"}
    assert _differing(ours[0], host) == _differing(theirs[0], host)


def test_host_sees_the_user_namespace_only_inside_the_vm(both, runtime, tmp_path):
    """The documented difference: the monitor stays in the host's user namespace (QEMU needs
    the host's privileges over the taps and the files it exports); the guest has the new one."""
    host, _name = _ns_of(os.getpid())
    mounts = [m for m in rt.default_spec()["mounts"] if m["destination"] != "/sys"]
    b = both.bundle(["sleep", "30"], mounts=mounts,
                    linux_namespaces=_namespaces(*DEFAULT_NAMESPACES + ("user",)),
                    **{"linux_" + k: v for k, v in MAPS.items()})
    theirs = _created_ns([RUNC, "--root", str(tmp_path / "runc-root")], b, "ns-user-r", tmp_path)
    ours = _created_ns(runtime.argv(), b, "ns-user-o", tmp_path)
    assert _differing(theirs[0], host) - _differing(ours[0], host) == {"user"}
    assert _differing(ours[0], host) == {"pid", "network", "ipc", "uts", "mount"}


@pytest.fixture
def holder():
    """A process in new cgroup, ipc, uts, network and pid namespaces (PID 1 of the last);
    its host pid."""
    p = subprocess.Popen(["unshare", "--cgroup", "--ipc", "--uts", "--net", "--pid", "--fork",
                          "--kill-child", "sleep", "600"])
    try:
        pid = _sleeping_child(p.pid)
        yield pid
    finally:
        p.kill()
        p.wait()


def _sleeping_child(pid, timeout=10):
    """The pid of pid's only child, once it is there and has exec'd sleep."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
                child = int(f.read().split()[0])
            if _cmdline(child).startswith(b"sleep"):
                return child
        except (OSError, IndexError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError("unshare did not start its child")


def test_host_sees_the_namespaces_given_by_path_as_with_runc(both, runtime, tmp_path, holder):
    joined = ("cgroup", "ipc", "uts", "network", "pid")
    paths = {t: "/proc/%d/ns/%s" % (holder, NS_FILES[t]) for t in joined}
    b = both.bundle(["sleep", "30"], hostname="cc-ns-joined",
                    linux_namespaces=_namespaces("mount", **paths))
    want, _name = _ns_of(holder)
    theirs = _created_ns([RUNC, "--root", str(tmp_path / "runc-root")], b, "ns-path-r", tmp_path)
    assert {t: theirs[0][t] for t in joined} == {t: want[t] for t in joined}
    assert theirs[1] == "cc-ns-joined"  # runc sets the hostname in the joined uts namespace
    subprocess.run(["nsenter", "-t", str(holder), "-u", "hostname", "holder"], check=True)
    ours = _created_ns(runtime.argv(), b, "ns-path-o", tmp_path)
    assert {t: ours[0][t] for t in joined} == {t: want[t] for t in joined}
    assert ours[1] == theirs[1]
