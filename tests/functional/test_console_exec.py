"""The runtime CLI as an engine drives it: console-socket hand-over, exec, pause/resume, ps, events, kill --all.

One VM per test. The test plays the engine: it owns the console socket and the pty master,
and it never waits for EOF on the stdout/stderr of create/run -d/exec -d (their monitors keep
them; conftest's Runtime uses temp files).
"""
import array
import fcntl
import json
import os
import re
import select
import socket
import struct
import subprocess
import termios
import time

from conftest import poll

ROWS, COLS = 25, 77  # process.consoleSize in config.json
PROMPT = "cc-prompt# "


def _alive(pid):
    """True while pid exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid, timeout=20):
    """Wait until pid has exited (reaped or a zombie of someone else); True if it did."""
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


def _recv_console(listener):
    """accept() one connection; return (payload, fds) of its single message, and whether it then closed."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(10)
        fds = array.array("i")
        msg, ancdata, flags, _ = conn.recvmsg(4096, socket.CMSG_SPACE(16 * fds.itemsize))
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        closed = conn.recv(1) == b""
    assert not flags & socket.MSG_CTRUNC, "control data truncated: more fds than expected"
    return msg, list(fds), closed


class Pty:
    """The engine's side of the container's terminal: write input, expect output."""

    def __init__(self, master):
        self.fd, self.buf = master, ""

    def write(self, text):
        os.write(self.fd, text.encode())

    def expect(self, pattern, timeout=30):
        """Read until pattern matches the unread output; consume and return the match."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.buf)
            if m:
                self.buf = self.buf[m.end():]
                return m
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError("no %r within %ss; terminal output so far: %r"
                                     % (pattern, timeout, self.buf))
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # EIO: every slave is closed
                data = b""
            if not data:
                raise AssertionError("terminal closed while waiting for %r: %r" % (pattern, self.buf))
            self.buf += data.decode(errors="replace")

    def set_size(self, rows, cols):
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def test_console_socket_handover_size_resize_and_ctrl_c(runtime, tmp_path):
    cid = "c-console"
    path = str(tmp_path / "console.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    master = None
    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm",
           "PS1=" + PROMPT]
    b = runtime.bundle(["sh"], terminal=True, env=env)
    conf = json.loads(open(os.path.join(b, "config.json")).read())
    conf["process"]["consoleSize"] = {"height": ROWS, "width": COLS}
    with open(os.path.join(b, "config.json"), "w") as f:
        json.dump(conf, f)
    try:
        # Like containerd: accept only after create has exited.
        r = runtime("create", "-b", b, "--console-socket", path, "--pid-file", tmp_path / "pid", cid)
        assert r.returncode == 0, r.stderr
        listener.settimeout(5)
        payload, fds, closed = _recv_console(listener)
        assert payload, "the console message must carry a non-empty payload"
        assert len(fds) == 1, "expected exactly one fd, got %s" % fds
        assert closed, "the runtime must close the connection after the one message"
        master = fds[0]
        assert os.isatty(master)
        listener.settimeout(0)
        try:
            listener.accept()
            raise AssertionError("a second console connection was made")
        except BlockingIOError:
            pass

        runtime("start", cid, check=True)
        tty = Pty(master)
        tty.expect(re.escape(PROMPT))
        tty.write("stty size; tty\n")
        tty.expect(r"^%d %d\r?$" % (ROWS, COLS))
        tty.expect(r"^/dev/\S+\r?$")
        tty.expect(re.escape(PROMPT))

        # The engine resizes the master; the guest's terminal follows (asynchronously).
        tty.set_size(40, 100)

        def resized():
            tty.write("stty size\n")
            m = tty.expect(r"^(\d+ \d+)\r?$")
            tty.expect(re.escape(PROMPT))
            return m.group(1) == "40 100"
        assert poll(resized, timeout=20, interval=0.5), "stty size never showed 40 100"

        # ^C reaches the foreground job in the guest, the shell survives and prompts again.
        tty.write("sleep 100\n")
        assert poll(lambda: runtime("exec", cid, "pidof", "sleep", input="").returncode == 0,
                     timeout=20), "sleep 100 never started"
        t0 = time.monotonic()
        tty.write("\x03")
        tty.expect(re.escape(PROMPT), timeout=20)
        assert time.monotonic() - t0 < 20
        assert runtime("exec", cid, "pidof", "sleep", input="").returncode != 0, "sleep survived ^C"
        tty.write("echo alive-$((6*7))\n")
        tty.expect(r"^alive-42\r?$")

        tty.write("exit 3\n")
        runtime.wait_status(cid, "stopped", timeout=30)
        runtime("delete", cid, check=True)
    finally:
        listener.close()
        if master is not None:
            os.close(master)


def test_exec_attached_and_detached(runtime, tmp_path):
    cid = "c-exec"
    runtime("run", "-d", "-b", runtime.bundle(["sleep", "1000"]), cid, input="", check=True)
    r = runtime("exec", cid, "sh", "-c", "echo out; echo err >&2; exit 5", input="")
    assert (r.returncode, r.stdout, r.stderr) == (5, "out\n", "err\n")
    data = "".join("exec line %d\n" % i for i in range(500))
    r = runtime("exec", cid, "cat", input=data)
    assert (r.returncode, r.stdout) == (0, data)

    # --process FILE, as both engines call it.
    proc = {"terminal": False, "user": {"uid": 0, "gid": 0}, "cwd": "/tmp",
            "env": ["PATH=/bin:/usr/bin", "WHO=from-process-json"],
            "args": ["sh", "-c", 'echo "$WHO"; pwd']}
    (tmp_path / "p1.json").write_text(json.dumps(proc))
    r = runtime("exec", "--process", tmp_path / "p1.json", cid, input="")
    assert (r.returncode, r.stdout) == (0, "from-process-json\n/tmp\n"), r.stderr

    # --detach: returns at once; the pid file names the exec's monitor, which is not ours to reap.
    proc["args"] = ["sh", "-c", "echo started > /dev/shm/det; sleep 3; echo done >> /dev/shm/det"]
    (tmp_path / "p2.json").write_text(json.dumps(proc))
    pid_file = tmp_path / "exec.pid"
    t0 = time.monotonic()
    r = runtime("exec", "--process", tmp_path / "p2.json", "--detach", "--pid-file", pid_file, cid,
                input="")
    assert r.returncode == 0 and r.stdout == "", r.stderr
    assert time.monotonic() - t0 < 30
    text = pid_file.read_text()
    assert text.isdigit(), "pid file must hold digits only (no newline): %r" % text
    pid = int(text)
    assert _alive(pid), "the pid file names no live process"
    try:
        os.waitpid(pid, os.WNOHANG)
        raise AssertionError("the detached exec's pid is our child")
    except ChildProcessError:
        pass  # re-parented: we reap nothing

    def det():
        return runtime("exec", cid, "cat", "/dev/shm/det", input="").stdout
    if not poll(lambda: det() == "started\ndone\n", timeout=30):
        guest = runtime("exec", cid, "ps", input="")
        raise AssertionError("the detached exec did not run to its end: %r; exec monitor %d %s; guest ps:\n%s%s"
                             % (det(), pid, "alive" if _alive(pid) else "gone", guest.stdout, guest.stderr))
    assert _wait_gone(pid), "the detached exec's monitor outlived its process"
    runtime("delete", "--force", cid, check=True)


def test_pause_and_resume_show_in_state(runtime):
    cid = "c-pause"
    runtime("run", "-d", "-b", runtime.bundle(["sleep", "1000"]), cid, input="", check=True)
    assert runtime.state(cid)["status"] == "running"
    runtime("pause", cid, check=True)
    assert runtime.state(cid)["status"] == "paused"
    assert runtime("pause", cid).returncode != 0
    runtime("resume", cid, check=True)
    assert runtime.state(cid)["status"] == "running"
    assert runtime("resume", cid).returncode != 0
    r = runtime("exec", cid, "echo", "after-resume", input="")
    assert (r.returncode, r.stdout) == (0, "after-resume\n"), r.stderr
    runtime("delete", "--force", cid, check=True)


def test_ps_json_and_events_stats(runtime):
    cid = "c-ps"
    b = runtime.bundle(["sh", "-c", "sleep 1000 & sleep 1000; wait"])
    runtime("run", "-d", "-b", b, cid, input="", check=True)
    r = runtime("ps", "--format", "json", cid)
    assert r.returncode == 0, r.stderr
    pids = json.loads(r.stdout)
    assert isinstance(pids, list) and pids, r.stdout
    assert all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in pids), r.stdout

    r = runtime("ps", cid)  # ps -ef's table of the guest's processes, in the container's pids
    assert r.returncode == 0, r.stderr
    header, *rows = [line.split(None, 7) for line in r.stdout.splitlines()]
    assert header == ["UID", "PID", "PPID", "C", "STIME", "TTY", "TIME", "CMD"]
    by_cmd = sorted((row[7], row[2]) for row in rows)
    assert by_cmd == [("sh -c sleep 1000 & sleep 1000; wait", "0"), ("sleep 1000", "1"),
                      ("sleep 1000", "1")], r.stdout
    r = runtime("ps", cid, "-o", "pid,comm")
    assert sorted(r.stdout.splitlines()[1:]) == ["    1 sh", "    2 sleep", "    3 sleep"], r.stdout

    r = runtime("events", "--stats", cid, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    ev = json.loads(lines[0])
    assert ev["type"] == "stats" and ev.get("id") == cid, ev
    cpu, mem = ev["data"]["cpu"], ev["data"]["memory"]
    assert isinstance(cpu["usage"]["total"], int) and cpu["usage"]["total"] > 0, ev
    assert isinstance(mem["usage"]["usage"], int) and mem["usage"]["usage"] > 0, ev
    runtime("delete", "--force", cid, check=True)


def test_kill_all_reaches_every_process(runtime):
    cid = "c-killall"
    script = ('trap "echo parent >> /dev/shm/k" USR1; '
              '(trap "echo child >> /dev/shm/k" USR1; echo child > /dev/shm/ready; while :; do sleep 1; done) & '
              'until [ -s /dev/shm/ready ]; do sleep 0.1; done; echo parent >> /dev/shm/ready; '
              'while :; do sleep 1; done')
    runtime("run", "-d", "-b", runtime.bundle(["sh", "-c", script]), cid, input="", check=True)
    # Signal only once both traps are set.
    assert poll(lambda: runtime("exec", cid, "cat", "/dev/shm/ready", input="").stdout == "child\nparent\n",
                 timeout=30)

    def marks():
        r = runtime("exec", cid, "cat", "/dev/shm/k", input="")
        return sorted(r.stdout.split()) if r.returncode == 0 else []
    # Without --all only the container's first process gets the signal.
    runtime("kill", cid, "USR1", check=True)
    assert poll(lambda: marks() == ["parent"], timeout=20), marks()
    time.sleep(2)
    assert marks() == ["parent"]
    runtime("kill", "--all", cid, "USR1", check=True)
    assert poll(lambda: marks() == ["child", "parent", "parent"], timeout=20), marks()
    # --all KILL ends them all: the container stops.
    runtime("kill", "--all", cid, "KILL", check=True)
    runtime.wait_status(cid, "stopped", timeout=30)
    runtime("delete", cid, check=True)
    assert cid not in os.listdir(runtime.root)


def test_kill_and_force_delete_of_paused_containers(runtime):
    b = runtime.bundle(["sleep", "1000"])
    for cid in ("c-pk", "c-pd"):
        runtime("run", "-d", "-b", b, cid, input="", check=True)
        runtime("pause", cid, check=True)
    runtime("kill", "c-pk", "KILL", check=True)
    runtime.wait_status("c-pk", "stopped", timeout=15)
    pid = runtime.state("c-pd")["pid"]
    runtime("delete", "--force", "c-pd", check=True)
    assert _wait_gone(pid)
    assert runtime("state", "c-pd").returncode != 0
    runtime("delete", "c-pk", check=True)


def test_exec_env_cwd_user_and_update(runtime):
    cid = "c-exopts"
    runtime("run", "-d", "-b", runtime.bundle(["sleep", "1000"]), cid, input="", check=True)
    r = runtime("exec", "-e", "FOO=from-exec", "--cwd", "/tmp", "-u", "1000:1001", cid,
                "sh", "-c", 'echo "$FOO $(pwd) $(id -u):$(id -g)"', input="")
    assert (r.returncode, r.stdout) == (0, "from-exec /tmp 1000:1001\n"), r.stderr
    r = runtime("exec", cid, "no-such-program", input="")
    assert r.returncode != 0 and "no such file or directory" in r.stderr
    r = runtime("update", "--resources", "-", cid, input='{"memory": {"limit": 67108864}}')
    assert r.returncode == 0, r.stderr
    r = runtime("update", "--resources", "-", cid, input='{"memory": {"limit": 1073741824}}')
    assert r.returncode == 1 and "does not fit the container's VM: it has 256M" in r.stderr
    assert runtime("update", "--resources", "-", cid, input="not json").returncode == 1
    runtime("delete", "--force", cid, check=True)


def test_foreground_run_with_terminal_uses_the_callers_tty(runtime):
    b = runtime.bundle(["sh", "-c", "tty; stty size; exit 4"], terminal=True)
    argv = " ".join(runtime.argv("run", "-b", b, "c-fgtty"))
    r = subprocess.run(["script", "-qec", "stty rows 21 cols 66; %s; echo rc=$?" % argv,
                        "/dev/null"], capture_output=True, text=True, timeout=120)
    out = r.stdout.replace("\r", "")
    assert re.search(r"^/dev/pts/\d+$", out, re.M), out
    assert "21 66" in out and "rc=4" in out, out
