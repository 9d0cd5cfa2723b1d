"""Real engines with cc_oci_runtime.py as their OCI runtime: podman (conmon), dockerd 20.10 (its
containerd + containerd-shim-runc-v2) and ctr. Every container is a VM boot, so one daemon per
module, images imported once, one long-running container per engine shared by the tests that
only need a running container.

Each test removes what it created (the pm/dk/ct fixtures remove anything left over, killing
a wedged runtime process when an engine blocks on it), and each engine's teardown checks that
no runtime process outlived its container before it stops the daemon.
"""
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time

import pytest

import engines
from conftest import RUNTIME, poll, rt

NAME = "cc-oci-runtime"
ROWS, COLS = 30, 101  # the terminal size script(1) is given
# Long-running workloads: USR1 is logged, TERM ends it at once with status 0 ...
LOOP = ('trap "echo got-usr1" USR1; trap "echo got-term; exit 0" TERM; echo ready; echo ready > /dev/shm/ready; '
        'while :; do sleep 1; done')
# ... or TERM is ignored, so that only SIGKILL ends it. Both say "ready" once their traps are
# set: a signal that comes earlier finds no handler (and the first process of a pid namespace
# ignores the signals it has no handler for), so tests wait for it before they signal.
STUBBORN = "trap '' TERM; echo ready; while :; do sleep 1; done"
TIMEOUT = 120  # any single engine command
TTY_TIMEOUT = 90  # a terminal session under script(1): a runtime that never hands over the pty hangs it


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def _proc_cmdlines():
    """pid -> argv of every live (non-zombie) process."""
    return {pid: argv for pid, (_, argv, st) in engines.proc_table().items() if st != "Z"}


def runtime_procs(cid, subcommand=None):
    """Pids of runtime processes (CLI, monitor, exec monitor) and QEMUs of container cid."""
    pids = []
    for pid, argv in _proc_cmdlines().items():
        if pid == os.getpid():
            continue
        if any(a.endswith("cc_oci_runtime.py") for a in argv[:6]) and cid in argv:
            if subcommand is None or subcommand in argv:
                pids.append(pid)
        elif subcommand is None and argv[0].endswith("qemu-system-x86_64") and "cc-" + cid[:32] in argv:
            pids.append(pid)
    return pids


def kill_runtime_procs(cid, subcommand=None):
    """SIGKILL what runtime_procs finds (unwedges an engine waiting on a runtime process)."""
    pids = runtime_procs(cid, subcommand)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def leftover_runtime_procs(*markers, timeout=20):
    """Runtime processes and QEMUs among engines.find_procs(*markers), once they had timeout to go."""
    deadline = time.monotonic() + timeout
    while True:
        cmdlines = _proc_cmdlines()
        left = {pid: " ".join(cmdlines[pid])[:200] for pid in engines.find_procs(*markers)
                if pid in cmdlines and (any(a.endswith("cc_oci_runtime.py") for a in cmdlines[pid][:6])
                                        or cmdlines[pid][0].endswith("qemu-system-x86_64"))}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def state_dirs_of(root, prefix):
    """Runtime state dirs under root whose container's bundle is below prefix."""
    out = []
    for path in glob.glob(os.path.join(root, "*", "state.json")):
        try:
            with open(path) as f:
                bundle = json.load(f).get("bundle", "")
        except (OSError, ValueError):
            continue
        if bundle.startswith(str(prefix).rstrip("/") + "/"):
            out.append(os.path.dirname(path))
    return out


def wait_no_runtime_procs(cid, timeout=20):
    """Wait until no runtime process or QEMU of cid is left; return what is left."""
    deadline = time.monotonic() + timeout
    while True:
        left = runtime_procs(cid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def under_script(argv, env, timeout=TTY_TIMEOUT):
    """Run argv on a fresh pty of ROWS x COLS via script(1); CompletedProcess, None on timeout."""
    cmd = "stty rows %d cols %d; exec %s" % (ROWS, COLS, " ".join(shlex.quote(str(a)) for a in argv))
    try:
        return subprocess.run(["script", "-qec", cmd, "/dev/null"], env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def check_tty_output(r, what):
    """The output of `tty; stty size` on the container's terminal."""
    assert r is not None, "%s hung for %ss (the engine never got the pty master?)" % (what, TTY_TIMEOUT)
    out = r.stdout.replace("\r", "").replace("^@", "")  # ^@: the engines' NUL echoed by the pty (runc too)
    assert r.returncode == 0, (what, r.returncode, r.stdout, r.stderr)
    assert re.search(r"^/dev/pts/\d+$", out, re.M), (what, r.stdout)
    assert re.search(r"^%d %d$" % (ROWS, COLS), out, re.M), (what, r.stdout)


def wait_ready(logs):
    """Wait until the workload has said ready (logs() returns its output so far)."""
    assert poll(lambda: "ready" in logs(), timeout=30), "the workload never got ready: %r" % logs()


def ok(r, *want_out):
    """Assert exit 0 (and the stripped stdout if given); returns r."""
    assert r.returncode == 0, (r.args, r.returncode, r.stdout, r.stderr)
    if want_out:
        assert r.stdout.strip() == want_out[0], (r.args, r.stdout, r.stderr)
    return r


def top_rows(text):
    """The data rows of a `top` table (header dropped), each split on whitespace."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return [ln.split() for ln in lines[1:]]


def foreign_rows(rows, cid, cmd_words):
    """The rows that are neither the workload (one of cmd_words) nor the container's own VM."""
    def mine(row):
        line = " ".join(row)
        return any(w in line for w in cmd_words) or cid in line or "cc-" + cid[:32] in line
    return [r for r in rows if not mine(r)]


# ---------------------------------------------------------------------------
# engine fixtures
# ---------------------------------------------------------------------------

def _remove_podman(p, ids):
    """podman rm -f ids; if podman is stuck on the runtime, kill its processes and retry."""
    if not ids:
        return
    try:
        p.run("rm", "-f", "-t", "0", *ids, timeout=60)
    except subprocess.TimeoutExpired:
        for cid in ids:
            kill_runtime_procs(cid)
        p.run("rm", "-f", "-t", "0", *ids, timeout=60)


def _remove_docker(d, ids):
    """docker rm -f ids; if the shim is stuck on the runtime, kill its processes and retry."""
    if not ids:
        return
    try:
        d.run("rm", "-f", *ids, timeout=60)
    except subprocess.TimeoutExpired:
        for cid in ids:
            kill_runtime_procs(cid)
        d.run("rm", "-f", *ids, timeout=60)


@pytest.fixture(scope="module")
def podman(rootfs, tmp_path_factory):
    """One private podman for the module, image bb imported, cc-oci-runtime registered by name."""
    p = engines.Podman(tmp_path_factory.mktemp("podman"), RUNTIME, runtime_name=NAME)
    p.keep = set()
    try:
        p.import_image(rootfs, "bb")
        yield p
        _remove_podman(p, p.run("ps", "-aq", "--no-trunc", timeout=60).stdout.split())
        left = leftover_runtime_procs(p.dir, p.short_run)
        states = state_dirs_of("/run/cc-oci-runtime", p.dir)  # podman never passes --root
    finally:
        p.cleanup()
    assert not left, "runtime processes outlived their podman containers: %s" % left
    assert not states, "runtime state left behind: %s" % states
    assert not engines.find_procs(p.dir, p.short_run), "podman processes left behind"


@pytest.fixture
def pm(podman):
    """The module's podman; containers a test leaves (except shared ones) are removed after it."""
    yield podman
    ids = [i for i in podman.run("ps", "-aq", "--no-trunc", timeout=60).stdout.split()
           if i not in podman.keep]
    _remove_podman(podman, ids)


@pytest.fixture(scope="module")
def podman_loop(podman):
    """A long-running container (`run -d`) shared by the podman tests that need one running."""
    r = podman.run_rt("run", "-d", "--name", "loop", "bb", "sh", "-c", LOOP, timeout=TIMEOUT)
    cid = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "loop"
    podman.keep.add(cid)
    try:
        assert r.returncode == 0, ("podman run -d", r.returncode, r.stdout, r.stderr)
        wait_ready(lambda: podman.run("logs", cid, timeout=60).stdout)
        yield cid
    finally:
        podman.keep.discard(cid)
        _remove_podman(podman, [cid])


@pytest.fixture(scope="module")
def docker(rootfs, tmp_path_factory):
    """One private dockerd (and its containerd) for the module, image bb imported."""
    d = engines.Docker(tmp_path_factory.mktemp("docker"), RUNTIME, runtime_name=NAME)
    d.keep = set()
    try:
        d.import_image(rootfs, "bb")
        yield d
        _remove_docker(d, d.run("ps", "-aq", "--no-trunc", timeout=60).stdout.split())
        _remove_ctr(d, d.ctr("containers", "ls", "-q", timeout=60).stdout.split())
        left = leftover_runtime_procs(d.dir, d.exec_root)
        # runtime roots: dockerd's (EXEC_ROOT/runtime-runc/moby) and ctr's --runc-root
        states = glob.glob(os.path.join(d.exec_root, "*runc*", "*", "*", "state.json"))
    finally:
        d.stop()
    assert not left, "runtime processes outlived their docker/ctr containers: %s" % left
    assert not states, "runtime state left behind: %s" % states
    assert not engines.find_procs(d.dir, d.exec_root), "docker processes left behind"


@pytest.fixture
def dk(docker):
    """The module's dockerd; containers a test leaves (except shared ones) are removed after it."""
    yield docker
    ids = [i for i in docker.run("ps", "-aq", "--no-trunc", timeout=60).stdout.split()
           if i not in docker.keep]
    _remove_docker(docker, ids)


@pytest.fixture(scope="module")
def docker_loop(docker):
    """A long-running container (`run -d`) shared by the docker tests that need one running."""
    r = docker.run_rt("run", "-d", "--network", "none", "--name", "loop", "bb", "sh", "-c", LOOP,
                      timeout=TIMEOUT)
    cid = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "loop"
    docker.keep.add(cid)
    try:
        assert r.returncode == 0, ("docker run -d", r.returncode, r.stdout, r.stderr)
        wait_ready(lambda: docker.run("logs", cid, timeout=60).stdout)
        yield cid
    finally:
        docker.keep.discard(cid)
        _remove_docker(docker, [cid])


# ---------------------------------------------------------------------------
# podman
# ---------------------------------------------------------------------------

def pinspect(p, cid, fmt):
    return ok(p.run("inspect", "-f", fmt, cid, timeout=60)).stdout.strip()


def test_podman_run_rm_echo(pm):
    ok(pm.run_rt("run", "--rm", "bb", "echo", "hello from a VM", timeout=TIMEOUT), "hello from a VM")
    assert [i for i in pm.run("ps", "-aq").stdout.split() if i not in pm.keep] == []


def test_podman_cap_drop_all_cap_add_net_admin_as_runc(pm):
    args = ("run", "--rm", "--cap-drop", "ALL", "--cap-add", "NET_ADMIN", "bb", "sh", "-c",
            "grep -E '^Cap|NoNewPrivs' /proc/self/status; echo ok")
    theirs = pm.run("--runtime", shutil.which("runc"), *args, timeout=TIMEOUT)
    ours = pm.run_rt(*args, timeout=TIMEOUT)
    assert theirs.returncode == 0 and "CapEff:\t0000000000001000" in theirs.stdout, theirs
    assert (ours.returncode, ours.stdout) == (0, theirs.stdout)


def test_podman_exit_code(pm):
    r = pm.run_rt("run", "--rm", "bb", "sh", "-c", "echo out; echo err >&2; exit 42", timeout=TIMEOUT)
    assert (r.returncode, r.stdout, r.stderr) == (42, "out\n", "err\n")


def test_podman_run_i_pipes_stdin(pm):
    data = "".join("data line %d\n" % i for i in range(500))
    r = pm.run_rt("run", "--rm", "-i", "bb", "cat", input=data, timeout=TIMEOUT)
    assert (r.returncode, r.stdout) == (0, data), r.stderr


def test_podman_run_t_under_script(pm):
    r = under_script(pm.cmd("run", "--rm", "-t", "bb", "sh", "-c", "tty; stty size"), pm.env)
    check_tty_output(r, "podman run -t")


def test_podman_missing_program_is_127(pm):
    r = pm.run_rt("run", "--rm", "bb", "no-such-program", timeout=TIMEOUT)
    assert r.returncode == 127, (r.returncode, r.stderr)
    assert "no-such-program" in r.stderr


def test_podman_run_d_is_running(pm, podman_loop):
    assert pinspect(pm, podman_loop, "{{.State.Status}}") == "running"
    pid = int(pinspect(pm, podman_loop, "{{.State.Pid}}"))
    assert pid > 0
    os.kill(pid, 0)


def test_podman_exec(pm, podman_loop):
    r = pm.run_rt("exec", podman_loop, "sh", "-c", "echo in-exec; echo err >&2; exit 3", timeout=TIMEOUT)
    assert (r.returncode, r.stdout, r.stderr) == (3, "in-exec\n", "err\n")
    r = pm.run_rt("exec", "-i", podman_loop, "cat", input="exec stdin\n", timeout=TIMEOUT)
    assert (r.returncode, r.stdout) == (0, "exec stdin\n"), r.stderr


def test_podman_exec_it_under_script(pm, podman_loop):
    for _ in range(3):  # the terminal size must be there when the process starts, every time
        r = under_script(pm.cmd("exec", "-it", podman_loop, "sh", "-c", "tty; stty size"), pm.env)
        try:
            check_tty_output(r, "podman exec -it")
        finally:
            kill_runtime_procs(podman_loop, "exec")


def test_podman_kill_usr1_shows_in_logs(pm, podman_loop):
    ok(pm.run_rt("kill", "-s", "USR1", podman_loop, timeout=TIMEOUT))
    logs = poll(lambda: "got-usr1" in pm.run("logs", podman_loop, timeout=60).stdout, timeout=20)
    assert logs, pm.run("logs", podman_loop).stdout
    assert pinspect(pm, podman_loop, "{{.State.Status}}") == "running"


def test_podman_pause_unpause(pm, podman_loop):
    try:
        ok(pm.run_rt("pause", podman_loop, timeout=TIMEOUT))
        assert pinspect(pm, podman_loop, "{{.State.Status}}") == "paused"
        ok(pm.run_rt("unpause", podman_loop, timeout=TIMEOUT))
        assert pinspect(pm, podman_loop, "{{.State.Status}}") == "running"
        ok(pm.run_rt("exec", podman_loop, "echo", "after-unpause", timeout=TIMEOUT), "after-unpause")
    finally:
        if pm.run("inspect", "-f", "{{.State.Status}}", podman_loop).stdout.strip() == "paused":
            pm.run("unpause", podman_loop)


def test_podman_top_with_ps_options_lists_the_workload(pm, podman_loop):
    # ps(1) options are not psgo descriptors: podman runs ps in the container (an exec).
    r = ok(pm.run_rt("top", podman_loop, "-o", "pid,args", timeout=TIMEOUT))
    assert any("sleep 1" in ln for ln in r.stdout.splitlines()), r.stdout
    assert any("trap" in ln for ln in r.stdout.splitlines()), r.stdout


def test_podman_top_lists_the_container_not_the_host(pm, podman_loop):
    # Default descriptors: psgo reads /proc in the mount namespace of the container's pid.
    r = ok(pm.run_rt("top", podman_loop, timeout=TIMEOUT))
    rows = top_rows(r.stdout)
    assert rows, r.stdout
    foreign = foreign_rows(rows, podman_loop, ("sleep", "trap"))
    assert not foreign, "podman top lists %d host processes, e.g. %s" % (len(foreign), foreign[:3])


# ---------------------------------------------------------------------------
# the VM boundary for files (issue: read-only mounts, staged files, engine files)
# ---------------------------------------------------------------------------

def qemu_fsdevs(cid):
    """Paths and options of what container cid's QEMU exports (and whether it was restored from
    the template): its -fsdev options, or for a VM from the pool the mounts beneath its pod export
    in QEMU's mount namespace, as "path=<source>,...,readonly=on" when read-only."""
    cmdlines = _proc_cmdlines()
    for pid, a in cmdlines.items():
        if a[0].endswith("qemu-system-x86_64") and "cc-" + cid[:32] in a:
            return [x for i, x in enumerate(a) if i and a[i - 1] == "-fsdev"], "-incoming" in a
    for pid, a in cmdlines.items():  # a pooled VM names the container it serves in its directory
        try:
            vmdir = os.readlink("/proc/%d/cwd" % pid)
            with open(os.path.join(vmdir, "container")) as f:
                if os.path.basename(f.read().strip()) != cid or not a[0].endswith("qemu-system-x86_64"):
                    continue
            with open("/proc/%d/mountinfo" % pid) as f:
                mounts = [ln.split() for ln in f]
        except OSError:
            continue
        pod = os.path.join(vmdir, rt.FILES_DIR, rt.POD_DIR) + "/"
        return ["path=%s,%s%s" % (m[3], m[5], ",readonly=on" if "ro" in m[5].split(",") else "")
                for m in mounts if m[4].startswith(pod) and m[4].count("/") > pod.count("/")], True
    raise AssertionError("no QEMU of container %s" % cid)


def check_engine_files(run_exec, cid, hosts_path, conf_dir):
    """What a root workload with an engine's mounts can do to the host, checked on the host."""
    exports, restored = qemu_fsdevs(cid)
    assert restored, "warm start expected"
    parent = os.path.dirname(hosts_path)
    assert not any(("path=%s," % parent) in e for e in exports), exports
    assert [e for e in exports if ("path=%s," % conf_dir) in e and e.endswith(",readonly=on")], exports
    r = run_exec("sh", "-c", "mount -o remount,rw /conf; echo hacked > /conf/app.conf; "
                             "echo hacked > /conf/new; cat /conf/app.conf")
    assert r.stdout == "original\n", (r.stdout, r.stderr)
    assert sorted(os.listdir(conf_dir)) == ["app.conf"]
    with open(hosts_path, "a") as f:  # the engine updates /etc/hosts in place
        f.write("10.1.2.3 added-by-the-engine\n")
    assert "added-by-the-engine" in run_exec("cat", "/etc/hosts").stdout
    with open(os.path.join(parent, "hostname")) as f:
        assert run_exec("cat", "/etc/hostname").stdout == f.read()


@pytest.fixture
def conf_dir(tmp_path):
    """A host directory a container gets read-only."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "app.conf").write_text("original\n")
    return str(tmp_path / "conf")


def test_podman_engine_files_and_read_only_volume(pm, conf_dir):
    r = pm.run_rt("run", "-d", "--name", "files", "-v", conf_dir + ":/conf:ro", "bb", "sh", "-c",
                  "echo ready; while :; do sleep 1; done", timeout=TIMEOUT)
    cid = ok(r).stdout.strip().splitlines()[-1]
    wait_ready(lambda: pm.run("logs", cid, timeout=60).stdout)
    check_engine_files(lambda *a: pm.run("exec", cid, *a, timeout=TIMEOUT), cid,
                       pinspect(pm, cid, "{{.HostsPath}}"), conf_dir)


def _mem_usage_bytes(text):
    """Bytes in the usage half of an engine's "12.3MiB / 1GiB" (or "12.3MB / 1GB")."""
    m = re.match(r"\s*([0-9.]+)\s*([KMGT]?)i?B", text)
    assert m, text
    return float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2)]


def test_podman_memory_limit_stats_and_update(pm):
    r = pm.run_rt("run", "-d", "-m", "1g", "--cpus", "2", "bb", "sh", "-c",
                  "echo ready; while :; do sleep 1; done", timeout=TIMEOUT)
    cid = ok(r).stdout.strip().splitlines()[-1]
    wait_ready(lambda: pm.run("logs", cid, timeout=60).stdout)
    r = pm.run("exec", cid, "sh", "-c", "grep MemTotal /proc/meminfo; nproc; cat /sys/fs/cgroup/memory.max; "
               "dd if=/dev/zero of=/dev/null bs=400M count=1 2>/dev/null && echo held", timeout=TIMEOUT)
    lines = ok(r).stdout.split("\n")
    assert int(lines[0].split()[1]) * 1024 >= 1 << 30 and lines[1:4] == ["2", str(1 << 30), "held"], r.stdout
    usage = ok(pm.run("stats", "--no-stream", "--format", "{{.MemUsage}}", cid, timeout=60)).stdout
    assert _mem_usage_bytes(usage) > 0, usage
    ok(pm.run("update", "--memory", "512m", cid, timeout=60))
    assert ok(pm.run("exec", cid, "cat", "/sys/fs/cgroup/memory.max", timeout=TIMEOUT)).stdout.strip() == \
        str(512 << 20)


def test_podman_tmpfs_option(pm):
    r = pm.run_rt("run", "--rm", "--tmpfs", "/srv", "bb", "sh", "-c",
                  "echo x > /srv/f && cat /srv/f && grep ' /srv ' /proc/self/mountinfo | cut -d' ' -f9",
                  timeout=TIMEOUT)
    assert (r.returncode, r.stdout) == (0, "x\ntmpfs\n"), r.stderr


def test_podman_stop_honours_sigterm(pm):
    cid = ok(pm.run_rt("run", "-d", "--name", "st", "bb", "sh", "-c", LOOP, timeout=TIMEOUT)).stdout.strip()
    wait_ready(lambda: pm.run("logs", "st", timeout=60).stdout)
    t0 = time.monotonic()
    ok(pm.run_rt("stop", "st", timeout=TIMEOUT))  # default timeout 10 s: TERM must do it
    took = time.monotonic() - t0
    assert pinspect(pm, "st", "{{.State.Status}} {{.State.ExitCode}}") == "exited 0"
    assert took < 8, "stop took %.1fs: SIGTERM was not honoured" % took
    assert "got-term" in pm.run("logs", "st").stdout
    ok(pm.run_rt("rm", "st", timeout=TIMEOUT))
    assert not wait_no_runtime_procs(cid)


def test_podman_stop_timeout_kills_restart_and_rm_f(pm):
    cid = ok(pm.run_rt("run", "-d", "--name", "stub", "bb", "sh", "-c", STUBBORN,
                       timeout=TIMEOUT)).stdout.strip()
    wait_ready(lambda: pm.run("logs", "stub", timeout=60).stdout)
    t0 = time.monotonic()
    ok(pm.run_rt("stop", "-t", "2", "stub", timeout=TIMEOUT))
    took = time.monotonic() - t0
    assert pinspect(pm, "stub", "{{.State.Status}} {{.State.ExitCode}}") == "exited 137"
    assert 2 <= took < 30, took
    ok(pm.run_rt("restart", "stub", timeout=TIMEOUT))
    assert pinspect(pm, "stub", "{{.State.Status}}") == "running"
    ok(pm.run_rt("exec", "stub", "echo", "restarted", timeout=TIMEOUT), "restarted")
    ok(pm.run_rt("rm", "-f", "stub", timeout=TIMEOUT))
    assert "stub" not in pm.run("ps", "-a", "--format", "{{.Names}}").stdout.split()
    assert not wait_no_runtime_procs(cid), "runtime processes of the removed container remain"
    assert not os.path.exists(os.path.join("/run/cc-oci-runtime", cid))


# ---------------------------------------------------------------------------
# docker
# ---------------------------------------------------------------------------

def dinspect(d, cid, fmt):
    return ok(d.run("inspect", "-f", fmt, cid, timeout=60)).stdout.strip()


def drun(d, *args, **kw):
    """docker run with the runtime under test and no network."""
    kw.setdefault("timeout", TIMEOUT)
    return d.run_rt("run", "--network", "none", *args, **kw)


def test_docker_run_rm_echo(dk):
    ok(drun(dk, "--rm", "bb", "echo", "hello from a VM"), "hello from a VM")
    assert [i for i in dk.run("ps", "-aq", "--no-trunc").stdout.split() if i not in dk.keep] == []


def test_docker_exit_code(dk):
    r = drun(dk, "--rm", "bb", "sh", "-c", "echo out; echo err >&2; exit 42")
    assert (r.returncode, r.stdout, r.stderr) == (42, "out\n", "err\n")


def test_docker_run_i_pipes_stdin(dk):
    data = "".join("data line %d\n" % i for i in range(500))
    r = drun(dk, "--rm", "-i", "bb", "cat", input=data)
    assert (r.returncode, r.stdout) == (0, data), r.stderr


def test_docker_run_t_under_script(dk):
    # docker sizes the terminal only after start (as for exec): the workload waits for the size
    argv = dk.cmd("run", "--network", "none", "--rm", "-t", "--name", "tty", "bb", "sh", "-c", WAIT_SIZE)
    r = under_script(argv, dk.env)
    check_tty_output(r, "docker run -t")


def test_docker_missing_program_is_127(dk):
    r = drun(dk, "--rm", "bb", "no-such-program")
    assert r.returncode == 127, (r.returncode, r.stderr)
    assert "no-such-program" in r.stderr


def test_docker_run_d_is_running(dk, docker_loop):
    assert dinspect(dk, docker_loop, "{{.State.Status}}") == "running"
    pid = int(dinspect(dk, docker_loop, "{{.State.Pid}}"))
    assert pid > 0
    os.kill(pid, 0)


def test_docker_exec(dk, docker_loop):
    r = dk.run("exec", docker_loop, "sh", "-c", "echo in-exec; echo err >&2; exit 3", timeout=TIMEOUT)
    assert (r.returncode, r.stdout, r.stderr) == (3, "in-exec\n", "err\n")
    r = dk.run("exec", "-i", docker_loop, "cat", input="exec stdin\n", timeout=TIMEOUT)
    assert (r.returncode, r.stdout) == (0, "exec stdin\n"), r.stderr


# docker 20.10 resizes an exec's terminal only after the process started, so the process waits
# for its size; and the shim may drop a tty exec's last output when it exits at once, so it
# lingers. Both happen with runc as well.
WAIT_SIZE = ('tty; i=0; while [ -z "$(stty size 2>/dev/null)" ]; do i=$((i+1)); [ $i -gt 100 ] && exit 9; '
             'sleep 0.1; done; stty size; sleep 1')


def test_docker_exec_it_under_script(dk, docker_loop):
    for _ in range(3):
        r = under_script(dk.argv("exec", "-it", docker_loop, "sh", "-c", WAIT_SIZE), dk.env)
        try:
            check_tty_output(r, "docker exec -it")
        finally:
            kill_runtime_procs(docker_loop, "exec")  # unwedges the shim if it hung


def test_docker_kill_usr1_shows_in_logs(dk, docker_loop):
    ok(dk.run("kill", "-s", "USR1", docker_loop, timeout=TIMEOUT))
    logs = poll(lambda: "got-usr1" in dk.run("logs", docker_loop, timeout=60).stdout, timeout=20)
    assert logs, dk.run("logs", docker_loop).stdout
    assert dinspect(dk, docker_loop, "{{.State.Status}}") == "running"


def test_docker_pause_unpause(dk, docker_loop):
    try:
        ok(dk.run("pause", docker_loop, timeout=TIMEOUT))
        assert dinspect(dk, docker_loop, "{{.State.Status}}") == "paused"
        ok(dk.run("unpause", docker_loop, timeout=TIMEOUT))
        assert dinspect(dk, docker_loop, "{{.State.Status}}") == "running"
        ok(dk.run("exec", docker_loop, "echo", "after-unpause", timeout=TIMEOUT), "after-unpause")
    finally:
        if dk.run("inspect", "-f", "{{.State.Status}}", docker_loop).stdout.strip() == "paused":
            dk.run("unpause", docker_loop)


def test_docker_top_lists_the_container(dk, docker_loop):
    # dockerd runs the host's ps and keeps the rows whose PID the runtime's `ps --format json` gave.
    r = ok(dk.run("top", docker_loop, timeout=TIMEOUT))
    rows = top_rows(r.stdout)
    assert rows, "docker top lists no process:\n" + r.stdout
    # ps -ef truncates the command: look the PIDs (2nd column) up instead.
    cmdlines = _proc_cmdlines()
    full = [" ".join(cmdlines.get(int(row[1]), ["<gone>"])) for row in rows]
    foreign = foreign_rows([[c] for c in full], docker_loop, ("sleep", "trap"))
    assert not foreign, "docker top lists unrelated host processes: %s" % foreign[:3]


def test_docker_init_engine_files_and_read_only_volume(dk, conf_dir):
    r = drun(dk, "-d", "--init", "-v", conf_dir + ":/conf:ro", "bb", "sh", "-c",
             "echo ready; while :; do sleep 1; done")
    cid = ok(r).stdout.strip().splitlines()[-1]
    wait_ready(lambda: dk.run("logs", cid, timeout=60).stdout)
    assert "docker-init" in dk.run("exec", cid, "cat", "/proc/1/cmdline", timeout=TIMEOUT).stdout
    assert not any("path=/usr/bin," in e for e in qemu_fsdevs(cid)[0])
    check_engine_files(lambda *a: dk.run("exec", cid, *a, timeout=TIMEOUT), cid,
                       dinspect(dk, cid, "{{.HostsPath}}"), conf_dir)


def test_docker_memory_limit_stats_and_update(dk):
    r = drun(dk, "-d", "-m", "256m", "bb", "sh", "-c", "echo ready; while :; do sleep 1; done")
    cid = ok(r).stdout.strip().splitlines()[-1]
    wait_ready(lambda: dk.run("logs", cid, timeout=60).stdout)
    assert ok(dk.run("exec", cid, "cat", "/sys/fs/cgroup/memory.max", timeout=TIMEOUT)).stdout.strip() == \
        str(256 << 20)
    usage = ok(dk.run("stats", "--no-stream", "--format", "{{.MemUsage}}", cid, timeout=60)).stdout
    assert _mem_usage_bytes(usage) > 0, usage
    metrics = ok(dk.ctr("-n", "moby", "task", "metrics", cid, timeout=60)).stdout
    row = next(ln.split() for ln in metrics.splitlines() if ln.startswith("memory.usage_in_bytes")
               or ln.startswith("memory.current"))
    assert int(row[1]) > 0, metrics
    ok(dk.run("update", "-m", "128m", cid, timeout=60))
    assert ok(dk.run("exec", cid, "cat", "/sys/fs/cgroup/memory.max", timeout=TIMEOUT)).stdout.strip() == \
        str(128 << 20)


def test_docker_stop_honours_sigterm(dk):
    cid = ok(drun(dk, "-d", "--name", "st", "bb", "sh", "-c", LOOP)).stdout.strip()
    wait_ready(lambda: dk.run("logs", "st", timeout=60).stdout)
    t0 = time.monotonic()
    ok(dk.run("stop", "st", timeout=TIMEOUT))
    took = time.monotonic() - t0
    assert dinspect(dk, "st", "{{.State.Status}} {{.State.ExitCode}}") == "exited 0"
    assert took < 8, "stop took %.1fs: SIGTERM was not honoured" % took
    assert "got-term" in dk.run("logs", "st").stdout
    ok(dk.run("rm", "st", timeout=TIMEOUT))
    assert not wait_no_runtime_procs(cid)


def test_docker_stop_timeout_kills_restart_and_rm_f(dk):
    cid = ok(drun(dk, "-d", "--name", "stub", "bb", "sh", "-c", STUBBORN)).stdout.strip()
    wait_ready(lambda: dk.run("logs", "stub", timeout=60).stdout)
    t0 = time.monotonic()
    ok(dk.run("stop", "-t", "2", "stub", timeout=TIMEOUT))
    took = time.monotonic() - t0
    assert dinspect(dk, "stub", "{{.State.Status}} {{.State.ExitCode}}") == "exited 137"
    assert 2 <= took < 30, took
    ok(dk.run("restart", "stub", timeout=TIMEOUT))
    assert dinspect(dk, "stub", "{{.State.Status}}") == "running"
    ok(dk.run("exec", "stub", "echo", "restarted", timeout=TIMEOUT), "restarted")
    ok(dk.run("rm", "-f", "stub", timeout=TIMEOUT))
    assert "stub" not in dk.run("ps", "-a", "--format", "{{.Names}}").stdout.split()
    assert not wait_no_runtime_procs(cid), "runtime processes of the removed container remain"


# ---------------------------------------------------------------------------
# ctr (containerd 1.6 of that dockerd, default namespace, rootfs directory, --runc-binary)
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ctr_rootfs(tmp_path_factory):
    """ctr uses its rootfs in place, writable: a private copy."""
    return engines.make_busybox_rootfs(tmp_path_factory.mktemp("ctr") / "rootfs")


def ctr_detached_argv(d, rootfs, cid, *command):
    """`ctr run -d --null-io` with the runtime under test (ctr refuses --rm with -d)."""
    argv = d.ctr_argv(rootfs, cid, *command)
    argv.remove("--rm")
    i = argv.index("run") + 1
    argv[i:i] = ["-d", "--null-io"]
    return argv


def ctr_task_status(d, cid):
    """STATUS column of `ctr task ls` for cid ('' if no task)."""
    for row in top_rows(d.ctr("task", "ls", timeout=60).stdout):
        if row[0] == cid:
            return row[-1]
    return ""


def ctr_exec(d, cid, *command, exec_id="x", **kw):
    kw.setdefault("timeout", TIMEOUT)
    return d.ctr("task", "exec", "--exec-id", exec_id, "--fifo-dir", os.path.join(d.exec_root, "ctr-fifo"),
                 cid, *command, **kw)


def _remove_ctr(d, ids):
    """Kill and delete the tasks and containers in ids."""
    for cid in ids:
        try:
            d.ctr("task", "kill", "-s", "KILL", cid, timeout=30)
            poll(lambda: ctr_task_status(d, cid) in ("", "STOPPED"), timeout=20)
            d.ctr("task", "delete", "-f", cid, timeout=30)
            d.ctr("containers", "delete", cid, timeout=30)
        except subprocess.TimeoutExpired:
            kill_runtime_procs(cid)


@pytest.fixture
def ct(docker):
    """The module's dockerd for ctr; ctr containers a test leaves (except shared ones) are removed."""
    yield docker
    ids = [i for i in docker.ctr("containers", "ls", "-q", timeout=60).stdout.split() if i not in docker.keep]
    _remove_ctr(docker, ids)


@pytest.fixture(scope="module")
def ctr_loop(docker, ctr_rootfs):
    """A long-running ctr task (`ctr run -d`) shared by the ctr task tests."""
    cid = "ctr-loop"
    docker.keep.add(cid)
    try:
        r = engines._run(ctr_detached_argv(docker, ctr_rootfs, cid, "sh", "-c", LOOP),
                         env=docker.env, timeout=TIMEOUT)
        assert r.returncode == 0, ("ctr run -d", r.returncode, r.stdout, r.stderr)
        wait_ready(lambda: ctr_exec(docker, cid, "cat", "/dev/shm/ready", exec_id="ready").stdout)
        yield cid
    finally:
        docker.keep.discard(cid)
        _remove_ctr(docker, [cid])


def test_ctr_run_runc_binary(ct, ctr_rootfs):
    r = ct.ctr_run(ctr_rootfs, "ctr-once", "sh", "-c", "echo hi from ctr; exit 42", timeout=TIMEOUT)
    assert (r.returncode, r.stdout.replace("\r", "")) == (42, "hi from ctr\n"), r.stderr
    assert "ctr-once" not in ct.ctr("containers", "ls", "-q").stdout.split()
    assert not wait_no_runtime_procs("ctr-once")


def test_ctr_run_d_is_running(ct, ctr_loop):
    assert ctr_task_status(ct, ctr_loop) == "RUNNING"


def test_ctr_task_exec(ct, ctr_loop):
    r = ctr_exec(ct, ctr_loop, "sh", "-c", "echo in-exec; exit 3", exec_id="e1")
    assert (r.returncode, r.stdout) == (3, "in-exec\n"), r.stderr


def test_ctr_task_ps(ct, ctr_loop):
    r = ok(ct.ctr("task", "ps", ctr_loop, timeout=TIMEOUT))
    rows = top_rows(r.stdout)
    assert rows and all(row[0].isdigit() for row in rows), r.stdout


def test_ctr_task_pause_resume(ct, ctr_loop):
    try:
        ok(ct.ctr("task", "pause", ctr_loop, timeout=TIMEOUT))
        assert ctr_task_status(ct, ctr_loop) == "PAUSED"
        ok(ct.ctr("task", "resume", ctr_loop, timeout=TIMEOUT))
        assert ctr_task_status(ct, ctr_loop) == "RUNNING"
        r = ctr_exec(ct, ctr_loop, "echo", "after-resume", exec_id="e2")
        assert (r.returncode, r.stdout) == (0, "after-resume\n"), r.stderr
    finally:
        if ctr_task_status(ct, ctr_loop) == "PAUSED":
            ct.ctr("task", "resume", ctr_loop)


def test_ctr_task_kill_and_delete(ct, ctr_rootfs):
    cid = "ctr-kill"
    script = ('trap "echo usr1 >> /dev/shm/sig" USR1; trap "exit 7" TERM; echo ready > /dev/shm/ready; '
              'while :; do sleep 1; done')
    ok(engines._run(ctr_detached_argv(ct, ctr_rootfs, cid, "sh", "-c", script), env=ct.env, timeout=TIMEOUT))
    wait_ready(lambda: ctr_exec(ct, cid, "cat", "/dev/shm/ready", exec_id="ready").stdout)
    assert ctr_task_status(ct, cid) == "RUNNING"
    ok(ct.ctr("task", "kill", "-s", "USR1", cid, timeout=TIMEOUT))

    def got_usr1():
        return ctr_exec(ct, cid, "cat", "/dev/shm/sig", exec_id="k%d" % time.monotonic_ns()).stdout == "usr1\n"
    assert poll(got_usr1, timeout=20)
    ok(ct.ctr("task", "kill", cid, timeout=TIMEOUT))  # SIGTERM: the trap exits 7
    assert poll(lambda: ctr_task_status(ct, cid) == "STOPPED", timeout=30), ct.ctr("task", "ls").stdout
    r = ok(ct.ctr("task", "delete", cid, timeout=TIMEOUT))
    assert "exit code 7" in r.stderr, ("ctr task delete reports the task's status", r.stderr)
    assert ctr_task_status(ct, cid) == ""
    ok(ct.ctr("containers", "delete", cid, timeout=TIMEOUT))
    assert not wait_no_runtime_procs(cid)


def test_engine_containers_come_from_the_pool(pm, dk, runtime):
    """With a warmed VM ready in the host's pool (a CLI create refills it), podman's and docker's
    containers get it (their state names it); with the pool off (make test-functional-no-pool)
    they do not."""
    import test_pool
    pool_on = os.environ.get("CC_OCI_TEST_POOL") != "0"
    for name, engine in (("podman", pm), ("docker", dk)):
        if pool_on and name == "podman":  # (no refill under conmon: a CLI create refills it)
            test_pool.fill(runtime, rt.POOL_DIR)
        elif pool_on:  # docker's shim may run another python3 (another image, another pool):
            before = {k["dir"] for k in test_pool.ready(rt.POOL_DIR)}  # its own create refills it
            ok(engine.run_rt("run", "--rm", "--network", "none", "bb", "true", timeout=TIMEOUT))
            assert poll(lambda: {k["dir"] for k in test_pool.ready(rt.POOL_DIR)} - before, timeout=90)
        cid = ok(engine.run_rt("run", "-d", "--network", "none", "bb", "sleep", "100",
                               timeout=TIMEOUT)).stdout.strip().splitlines()[-1]
        roots = ["/run/cc-oci-runtime"] if name == "podman" else [engine.exec_root, engine.dir]
        states = [p for r in roots for p in glob.glob(os.path.join(r, "**", cid, "state.json"),
                                                       recursive=True)]
        assert states, "%s: no state of %s" % (name, cid)
        with open(states[0]) as f:
            vm = json.load(f)["vm"]
        assert bool(vm.get("pool_dir")) == pool_on, (name, vm)
        ok(engine.run("rm", "-f", cid, timeout=120))
