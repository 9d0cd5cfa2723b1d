"""The OCI lifecycle in real VMs: run, create/start/state/kill/delete, stdio, config, clean-up."""
import json
import os
import signal
import subprocess
import time

import pytest

from conftest import rt


def test_run_exit_zero_prints_output(runtime):
    r = runtime("run", "-b", runtime.bundle(["echo", "hello"]), "c-run0")
    assert (r.returncode, r.stdout) == (0, "hello\n")
    assert os.listdir(runtime.root) == []  # run deletes the container when it ends


def test_run_exit_code_and_streams_apart(runtime):
    b = runtime.bundle(["sh", "-c", "echo out; echo err >&2; exit 3"])
    r = runtime("run", "-b", b, "c-run3")
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")


def test_stdin_is_piped_through_cat(runtime):
    data = "".join("line %d\n" % i for i in range(40000))  # far more than a pipe holds
    r = runtime("run", "-b", runtime.bundle(["cat"]), "c-cat", input=data)
    assert r.returncode == 0 and r.stdout == data


def test_stdin_from_dev_null_and_from_a_file(runtime, tmp_path):
    b = runtime.bundle(["sh", "-c", "wc -l; echo done"])
    with open(os.devnull) as null:
        r = subprocess.run(runtime.argv("run", "-b", b, "c-null"), stdin=null,
                           capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout.split()) == (0, ["0", "done"])
    f = tmp_path / "in.txt"
    f.write_text("a\nb\nc\n")
    with open(f) as src:
        r = subprocess.run(runtime.argv("run", "-b", b, "c-file"), stdin=src,
                           capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout.split()) == (0, ["3", "done"])


def test_kill_of_foreground_run_exits_137(runtime):
    proc = subprocess.Popen(runtime.argv("run", "-b", runtime.bundle(["sleep", "100"]), "c-k"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    runtime.wait_status("c-k", "running", timeout=60)
    assert runtime("kill", "c-k", "KILL").returncode == 0
    assert proc.wait(timeout=30) == 137
    assert os.listdir(runtime.root) == []


def test_lifecycle_states(runtime, tmp_path):
    pid_file = tmp_path / "pid"
    b = runtime.bundle(["sleep", "100"])
    r = runtime("create", "-b", b, "--pid-file", pid_file, "c-life", check=True)
    assert r.stdout == "" and r.stderr == ""
    pid = pid_file.read_text()
    assert pid.isdigit()  # no trailing newline
    st = runtime.state("c-life")
    assert (st["status"], st["pid"], st["bundle"], st["id"]) == ("created", int(pid), b, "c-life")
    assert {"ociVersion", "rootfs", "created", "owner"} <= set(st)
    assert "annotations" not in st  # runc omits them when empty
    assert runtime("create", "-b", b, "c-life").stderr.endswith(  # runc's logrus line
        ' level=error msg="container with id exists: c-life"\n')
    runtime("start", "c-life", check=True)
    assert runtime.state("c-life")["status"] == "running"
    assert "already running" in runtime("start", "c-life").stderr
    listing = json.loads(runtime("list", "-f", "json", check=True).stdout)
    assert [c["id"] for c in listing] == ["c-life"]
    assert "not stopped" in runtime("delete", "c-life").stderr
    runtime("kill", "c-life", "KILL", check=True)
    runtime.wait_status("c-life", "stopped")
    assert "container not running" in runtime("kill", "c-life", "KILL").stderr
    runtime("delete", "c-life", check=True)
    assert "container does not exist" in runtime("state", "c-life").stderr
    assert not rt.process_alive(int(pid))


def test_workload_is_pid1_and_term_needs_a_handler(runtime):
    """As with runc, the workload is PID 1 of its pid namespace: TERM without a handler is
    ignored, TERM with a handler is honoured."""
    script = 'echo pid=$$; trap "echo got-term; exit 0" TERM; while :; do sleep 0.2; done'
    b = runtime.bundle(["sh", "-c", script])
    r = runtime("run", "-d", "-b", b, "c-pid1")
    assert r.returncode == 0, r.stderr
    runtime("create", "-b", runtime.bundle(["sleep", "100"]), "c-noh", check=True)
    runtime("start", "c-noh", check=True)
    time.sleep(1)
    runtime("kill", "c-pid1", "TERM", check=True)
    runtime("kill", "c-noh", "TERM", check=True)
    runtime.wait_status("c-pid1", "stopped")
    time.sleep(1)
    assert runtime.state("c-noh")["status"] == "running"
    runtime("kill", "c-noh", "KILL", check=True)
    runtime.wait_status("c-noh", "stopped")
    for cid in ("c-pid1", "c-noh"):
        runtime("delete", cid, check=True)


def test_kill_of_created_container_stops_it(runtime):
    runtime("create", "-b", runtime.bundle(["sleep", "100"]), "c-ck", check=True)
    runtime("kill", "c-ck", "9", check=True)
    runtime.wait_status("c-ck", "stopped")
    runtime("delete", "c-ck", check=True)


def test_process_configuration_reaches_the_guest(runtime):
    script = 'echo "$FOO"; pwd; id -u; id -g; id -G; hostname; umask; ulimit -n'
    b = runtime.bundle(["sh", "-c", script], env=["PATH=/bin", "FOO=bar baz"], cwd="/tmp",
                       user={"uid": 1000, "gid": 1000, "additionalGids": [10, 20], "umask": 0o27},
                       rlimits=[{"type": "RLIMIT_NOFILE", "soft": 321, "hard": 321}],
                       hostname="vmhost")
    r = runtime("run", "-b", b, "c-conf")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:8] == ["bar baz", "/tmp", "1000", "1000", "1000 10 20",
                                        "vmhost", "0027", "321"]


def test_guest_kernel_is_not_the_host_kernel(runtime):
    r = runtime("run", "-b", runtime.bundle(["cat", "/proc/version"]), "c-kver")
    with open("/proc/version") as f:
        host = f.read()
    assert r.returncode == 0 and r.stdout.startswith("Linux version") and r.stdout != host


def test_readonly_rootfs_masked_paths_and_bind_mount(runtime, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "in.txt").write_text("from the host\n")
    single = tmp_path / "single.txt"
    single.write_text("one file\n")
    mounts = rt.default_spec()["mounts"] + [
        {"destination": "/data", "type": "bind", "source": str(shared), "options": ["rbind"]},
        {"destination": "/etc/single", "type": "bind", "source": str(single),
         "options": ["bind", "ro"]}]
    script = ("cat /data/in.txt; echo written > /data/out.txt; cat /etc/single; "
              "touch /rootfs-file 2>/dev/null || echo ro-root; "
              "echo x > /etc/single 2>/dev/null || echo ro-bind; "
              "wc -c < /proc/kcore")
    b = runtime.bundle(["sh", "-c", script], mounts=mounts,
                       root={"path": runtime_rootfs(runtime), "readonly": True})
    r = runtime("run", "-b", b, "c-mnt")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:6] == ["from the host", "one file", "ro-root", "ro-bind", "0", ""]
    assert (shared / "out.txt").read_text() == "written\n"


def runtime_rootfs(runtime):
    """The shared busybox rootfs path."""
    from conftest import ROOTFS
    return ROOTFS[0]


def test_missing_program_fails_create_and_leaves_nothing(runtime):
    for args in (["no-such-program"], ["/bin/no-such-program"]):
        r = runtime("run", "-b", runtime.bundle(args), "c-missing")
        assert r.returncode != 0
        assert "no such file or directory" in r.stderr
        assert os.listdir(runtime.root) == []


@pytest.mark.parametrize("victim", ["monitor", "qemu"])
def test_sigkill_of_monitor_or_qemu_shows_stopped(runtime, victim):
    cid = "c-sk-" + victim
    runtime("run", "-d", "-b", runtime.bundle(["sleep", "100"]), cid, check=True)
    with open(os.path.join(runtime.root, cid, "state.json")) as f:
        saved = json.load(f)
    monitor, qemu = saved["pid"], saved["vm"]["qemu_pid"]
    os.kill(monitor if victim == "monitor" else qemu, signal.SIGKILL)
    runtime.wait_status(cid, "stopped", timeout=15)
    runtime("delete", cid, check=True)
    deadline = time.monotonic() + 10
    while (rt.process_alive(monitor) or rt.process_alive(qemu)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not rt.process_alive(monitor) and not rt.process_alive(qemu)
    assert not os.path.exists(os.path.join(runtime.root, cid))


def test_hooks_run_with_state_in_the_container_netns(runtime, tmp_path):
    out = tmp_path / "hooks.log"
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\nstate=$(cat)\npid=$(echo \"$state\" | sed 's/.*\"pid\": *\\([0-9]*\\).*/\\1/')\n"
                    "echo \"$1 $(readlink /proc/$pid/ns/net) $state\" >> %s\n" % out)
    hook.chmod(0o755)
    hooks = {name: [{"path": str(hook), "args": ["hook.sh", name]}]
             for name in ("prestart", "createRuntime", "poststart", "poststop")}
    b = runtime.bundle(["true"], hooks=hooks)
    conf = json.load(open(os.path.join(b, "config.json")))
    conf["linux"]["namespaces"].append({"type": "network"})
    open(os.path.join(b, "config.json"), "w").write(json.dumps(conf))
    assert runtime("run", "-b", b, "c-hooks").returncode == 0
    lines = out.read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == ["prestart", "createRuntime", "poststart", "poststop"]
    host_ns = os.readlink("/proc/self/ns/net")
    assert lines[0].split()[1].startswith("net:[") and lines[0].split()[1] != host_ns
    state = json.loads(lines[0].split(None, 2)[2])
    assert state["id"] == "c-hooks" and state["status"] == "creating" and state["pid"] > 0  # runc's


def test_failing_prestart_hook_fails_create_and_tears_down(runtime, tmp_path):
    hooks = {"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", "echo nope >&2; exit 7"]}]}
    r = runtime("create", "-b", runtime.bundle(["sleep", "10"], hooks=hooks), "c-badhook")
    assert r.returncode != 0 and "prestart hook" in r.stderr and "nope" in r.stderr
    assert os.listdir(runtime.root) == []


def test_runs_under_the_system_python(runtime):
    """The guest image is built from whichever interpreter runs the runtime: Debian's too."""
    argv = ["/usr/bin/python3"] + runtime.argv("run", "-b", runtime.bundle(["echo", "sys-py"]),
                                               "c-syspy")[1:]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert (r.returncode, r.stdout) == (0, "sys-py\n"), r.stderr


def test_one_copied_file_is_enough(runtime, tmp_path):
    """Operators copy just the script (no .py name, no hypervisor.args or vm.json beside it)."""
    import shutil
    solo = tmp_path / "bin" / "cc-oci-runtime"
    solo.parent.mkdir()
    shutil.copy(runtime.argv()[1], solo)
    argv = [runtime.argv()[0], str(solo)] + runtime.argv("run", "-b",
                                                         runtime.bundle(["echo", "solo"]),
                                                         "c-solo")[2:]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert (r.returncode, r.stdout) == (0, "solo\n"), r.stderr


def test_qemu_runs_without_huge_pages_and_with_a_capped_translation_cache(runtime):
    runtime("create", "-b", runtime.bundle(["sleep", "100"]), "c-thp", check=True)
    with open(os.path.join(runtime.root, "c-thp", "state.json")) as f:
        qemu = json.load(f)["vm"]["qemu_pid"]
    with open("/proc/%d/status" % qemu) as f:
        status = dict(line.split(":", 1) for line in f.read().splitlines())
    assert status["THP_enabled"].strip() == "0", "huge pages round TCG's buffers up to 2 MiB"
    with open("/proc/%d/cmdline" % qemu, "rb") as f:
        argv = f.read().rstrip(b"\0").decode().split("\0")
    accel = argv[argv.index("-accel") + 1]
    assert accel in ("kvm", "tcg,tb-size=32"), accel  # the repository's vm.json: 32 MiB
    assert runtime("exec", "c-thp", "true").returncode == 0
    runtime("delete", "--force", "c-thp", check=True)


def test_more_bind_mounts_than_the_small_template_holds_restore_from_the_larger(runtime, tmp_path):
    small = rt.SHARE_SLOT_CLASSES[0]
    mounts = rt.default_spec()["mounts"]
    for i in range(small + 1):
        d = tmp_path / ("d%d" % i)
        d.mkdir()
        (d / "f").write_text("in d%d\n" % i)
        mounts.append({"destination": "/d%d" % i, "type": "bind", "source": str(d),
                       "options": ["rbind", "ro"]})
    b = runtime.bundle(["sh", "-c", "cat /d*/f"], mounts=mounts, vm={"pool": 0})  # (a pooled
    # VM takes any number of binds through its pod export: test_pool.py)
    for cid in ("c-many1", "c-many2"):  # the first may build the larger template
        r = runtime("run", "-b", b, cid)
        assert (r.returncode, r.stdout) == (0, "".join("in d%d\n" % i for i in range(small + 1)))
    runtime("create", "-b", b, "c-many3", check=True)
    with open(os.path.join(runtime.root, "c-many3", "state.json")) as f:
        qemu = json.load(f)["vm"]["qemu_pid"]
    with open("/proc/%d/cmdline" % qemu, "rb") as f:
        argv = f.read().rstrip(b"\0").decode().split("\0")
    assert "-incoming" in argv, "restored from the template with more slots"
    assert argv.count("-fsdev") == rt.SHARE_SLOT_CLASSES[1] + 1
    runtime("delete", "--force", "c-many3", check=True)
