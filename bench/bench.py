#!/usr/bin/env python3
"""Issue 8's figures of cc-oci-runtime, against runc, a bare QEMU boot and python -c pass.

Stdlib only, Python 3.9+, run as root. In one run it measures:

  runtime    wall time of `cc_oci_runtime.py --root TMP run -b BUNDLE ID` of /bin/true;
  runc       wall time of `runc --root TMP run --bundle BUNDLE ID` on the same bundle
             (skipped when runc is not installed);
  bare QEMU  wall time of booting the same uncompressed vmlinux with the same QEMU
             machine/accelerator/CPU/memory/kernel command line the runtime uses
             (taken from the runtime's own resolve_vm/qemu_command, minus the agent
             socket, QMP and 9p devices that need a host-side peer) and a tiny busybox
             initramfs whose /init runs /bin/true and powers off: the floor any VM
             runtime pays on this host (goal: warm start <= 0.10x of it);
  CLI        the runtime run as a program (as engines run it): state, list, kill 0 and
             ps on a running container, start of a freshly created container and delete
             of a stopped one, against /usr/bin/python3 -c pass (goal <= 2.0x each);
  memory     PSS (/proc/PID/smaps_rollup) of one idle container (`sleep 1000`): its
             monitor (the --pid-file pid) and the monitor's children (QEMU), goal
             <= 80 MiB; and the mean of 10 idle containers up at once, goal <= 48 MiB;
  density    (--density N) N idle containers created and started 5 at a time: all must
             be running and answer exec; total and mean PSS, the time to create and to
             delete (--force, 5 at a time) them all, and nothing may be left (state
             dirs, monitors, QEMUs, processes naming the state root);
  engines    (--engines N) bench/engines.py: podman/docker run --rm true with this
             runtime against runc (goal <= 2.5x), and a timeline of one run of each.

The three run timings are taken round-robin (one of each per round) after one unmeasured
warm-up of each, so that load changes on a shared machine hit all of them alike; so are
the CLI commands and python -c pass. A summary table lists every target, its goal and
whether it is met (--json: the same as JSON, "goals"). Everything lives in one temporary
directory, removed at the end; containers are deleted with delete --force in finally
blocks, and any process still naming the temporary directory in its command line is
reported and killed.

    bench/bench.py [-n 10] [--density 50] [--engines 5] [--json] [--boot-timeout S]
                   [--settle 2] [--keep] [--memory-limit 2g]
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.realpath(__file__))
REPO = os.path.dirname(HERE)
RUNTIME = os.path.join(REPO, "cc_oci_runtime.py")
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests", "functional"))
import cc_oci_runtime as rt  # noqa: E402
from engines import make_busybox_rootfs  # noqa: E402

BUSYBOX = "/bin/busybox"
PROGRAM = "/bin/true"
MARKER = "bench-init-ok"


class BenchError(Exception):
    """A measurement failed; the message says which and why."""


def log(msg):
    """Progress on stderr (stdout carries only the result)."""
    sys.stderr.write("bench: %s\n" % msg)
    sys.stderr.flush()


def _tail(path, n=1500):
    """The end of a text file, for error messages."""
    try:
        with open(path, "rb") as f:
            return f.read()[-n:].decode(errors="replace").strip()
    except OSError:
        return ""


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------

def run_timed(argv, out_path, timeout, cwd=None, env=None):
    """Run argv with stdin from /dev/null and output in out_path; (seconds, exit code).

    Output goes to a file, not a pipe: a runtime's monitor inherits stdout/stderr and
    would keep a pipe open. The wait is a blocking waitpid (Popen.wait(timeout) polls
    with sleeps of up to 50 ms, too coarse for runc); a timer kills the process group
    on timeout."""
    import threading
    with open(out_path, "wb") as out:
        expired = []

        def kill():
            expired.append(True)
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        t0 = time.monotonic()
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             cwd=cwd, env=env, start_new_session=True)
        timer = threading.Timer(timeout, kill)
        timer.daemon = True
        timer.start()
        try:
            rc = p.wait()
            secs = time.monotonic() - t0
        except BaseException:
            kill()
            p.wait()
            raise
        finally:
            timer.cancel()
        if expired:
            raise BenchError("%s: timed out after %ss; output: %s"
                             % (" ".join(argv[:6]), timeout, _tail(out_path)))
        return secs, rc


def quiet(argv, timeout=60):
    """Run a clean-up command, ignoring its result."""
    try:
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        pass


def procs_naming(text):
    """pid -> command line of every process whose command line contains text."""
    found = {}
    me = os.getpid()
    for e in os.listdir("/proc"):
        if not e.isdigit() or int(e) == me:
            continue
        try:
            with open("/proc/%s/cmdline" % e, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if text in cmd:
            found[int(e)] = cmd
    return found


def children(pid):
    """Direct children of pid (from every thread's children list)."""
    out = []
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return out
    for t in tasks:
        try:
            with open("/proc/%d/task/%s/children" % (pid, t)) as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return sorted(set(out))


def smaps_kb(pid, field="Pss"):
    """One field (kB) of /proc/PID/smaps_rollup."""
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise BenchError("/proc/%d/smaps_rollup has no %s line" % (pid, field))


def procs_in(path):
    """pid -> working directory of every process working in path or below it."""
    found = {}
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            cwd = os.readlink("/proc/%s/cwd" % e)
        except OSError:
            continue
        if cwd == path or cwd.startswith(path.rstrip("/") + "/"):
            found[int(e)] = cwd
    return found


def meminfo_kb(field):
    """One field (kB) of /proc/meminfo."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def uuid_hex():
    return os.urandom(6).hex()


def container_pss(monitor):
    """PSS and RSS of a container's monitor and of the monitor's children (QEMU)."""
    kids = children(monitor)
    if not kids:
        raise BenchError("monitor %d has no children (no QEMU?)" % monitor)
    res = {"monitor": {"pid": monitor, "comm": comm(monitor), "pss_kb": smaps_kb(monitor),
                       "rss_kb": smaps_kb(monitor, "Rss")}, "children": []}
    for k in kids:
        res["children"].append({"pid": k, "comm": comm(k), "pss_kb": smaps_kb(k),
                                "rss_kb": smaps_kb(k, "Rss")})
    res["total_pss_kb"] = res["monitor"]["pss_kb"] + sum(c["pss_kb"] for c in res["children"])
    return res


def comm(pid):
    """The short name of a process."""
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return "?"


# ---------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------

def write_config(path, args, rootfs, base):
    """config.json: base spec with a non-terminal process running args on rootfs."""
    with open(base) as f:
        conf = json.load(f)
    conf["process"]["terminal"] = False
    conf["process"]["args"] = list(args)
    conf["root"]["path"] = rootfs
    with open(path, "w") as f:
        json.dump(conf, f, indent=1)


def make_bundle(tmp, name, args, rootfs, base_spec):
    """A bundle directory whose config.json runs args on the shared rootfs."""
    d = os.path.join(tmp, name)
    os.makedirs(d)
    write_config(os.path.join(d, "config.json"), args, rootfs, base_spec)
    return d


def build_bare_initrd(path):
    """A busybox initramfs: /init runs PROGRAM, prints MARKER and powers off."""
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    init = ("#!/bin/busybox sh\n"
            "%s && /bin/busybox echo %s\n"
            "/bin/busybox poweroff -f\n" % (PROGRAM, MARKER))
    with open(path, "wb") as f:
        w = rt.CpioWriter(f)
        w.add_dir("dev")
        w.add_device("dev/console", True, 5, 1)
        w.add_device("dev/null", True, 1, 3, 0o666)
        w.add_file("bin/busybox", busybox, 0o755)
        w.add_symlink("bin/sh", "busybox")
        w.add_symlink(PROGRAM.lstrip("/"), "busybox")
        w.add_file("init", init.encode(), 0o755)
        w.close()


NO_VALUE = {"-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-S",
            "-no-hpet", "-enable-kvm", "-no-shutdown", "-snapshot"}


def bare_qemu_argv(argv, initrd):
    """The runtime's QEMU argv without what needs a host-side peer; (argv, dropped)."""
    pairs, i = [], 1
    while i < len(argv):
        opt = argv[i]
        if opt in NO_VALUE or i + 1 >= len(argv):
            pairs.append((opt, None))
            i += 1
        else:
            pairs.append((opt, argv[i + 1]))
            i += 2
    dropped_chardevs = set()
    for opt, val in pairs:
        if opt == "-chardev" and val.split(",")[0] in ("socket", "pipe", "stdio", "pty"):
            dropped_chardevs.update(p[3:] for p in val.split(",") if p.startswith("id="))
    out, dropped = [argv[0]], []
    for opt, val in pairs:
        drop = opt in ("-qmp", "-fsdev", "-monitor")
        if opt == "-chardev":
            drop = val.split(",")[0] in ("socket", "pipe", "stdio", "pty")
        if opt == "-device":
            drv = val.split(",")[0]
            drop = (drv.startswith(("virtio-9p", "virtio-serial", "virtserialport"))
                    or any("chardev=%s" % c in val.split(",") for c in dropped_chardevs))
        if drop:
            dropped.append("%s %s" % (opt, val))
            continue
        if opt == "-initrd":
            val = initrd
        out += [opt] if val is None else [opt, val]
    for need in ("-kernel", "-initrd", "-append", "-machine", "-accel"):
        if need not in out:
            raise BenchError("bare QEMU: the runtime's QEMU command has no %s" % need)
    return out, dropped


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------

class Bench:
    def __init__(self, tmp, opts):
        self.tmp, self.opts = tmp, opts
        self.rt_root = os.path.join(tmp, "rt-root")
        self.runc_root = os.path.join(tmp, "runc-root")
        self.rt_ids, self.runc_ids = [], []
        self.seq = 0
        self.runc = shutil.which("runc")
        self.python = sys.executable
        # the runtime as users and engines run it: the installed program (its shell header
        # and cached code) under /usr/bin/python3 (CC_OCI_PYTHON, set in main)
        self.program = os.path.join(tmp, "cc-oci-runtime")
        shutil.copy(RUNTIME, self.program)
        os.chmod(self.program, 0o755)
        for name in ("vm.json", "hypervisor.args"):  # beside it, as installed: the checkout's
            if os.path.isfile(os.path.join(REPO, name)):  # settings, as the bare boot's
                shutil.copy(os.path.join(REPO, name), os.path.join(tmp, name))

    # -- set-up ------------------------------------------------------------
    def setup(self):
        tmp = self.tmp
        self.rootfs = make_busybox_rootfs(os.path.join(tmp, "rootfs"))
        spec_dir = os.path.join(tmp, "spec")
        os.makedirs(spec_dir)
        subprocess.run([self.program, "spec", "-b", spec_dir], check=True,
                       stdin=subprocess.DEVNULL)
        base = os.path.join(spec_dir, "config.json")
        if self.opts.memory_limit:  # linux.resources.memory.limit for every bundle (runc's too)
            with open(base) as f:
                spec = json.load(f)
            spec["linux"].setdefault("resources", {})["memory"] = {
                "limit": rt._ram_bytes(self.opts.memory_limit)}
            with open(base, "w") as f:
                json.dump(spec, f, indent=1)
        # one bundle, shared by the runtime and runc (the runtime's default spec is runc's)
        self.bundle = make_bundle(tmp, "bundle", [PROGRAM], self.rootfs, base)
        self.sleep_bundle = make_bundle(tmp, "bundle-sleep", ["sleep", "1000"], self.rootfs, base)
        self.runc_bundle = self.bundle
        # the VM the runtime would start for this bundle (also builds/validates the cache)
        conf = rt.load_spec(self.bundle)
        self.vm = rt.size_vm(rt.resolve_vm(conf), conf["resources"])
        self.vm_boot_timeout = float(self.vm["boot_timeout"])
        self.timeout = self.opts.boot_timeout or self.vm_boot_timeout + 30
        image = self.vm.get("image") or rt.guest_image(self.vm)
        bare_dir = os.path.join(tmp, "bare")
        os.makedirs(bare_dir)
        self.bare_dir = bare_dir
        self.bare_initrd = os.path.join(bare_dir, "initrd.cpio")
        build_bare_initrd(self.bare_initrd)
        full = rt.qemu_command("bench-bare", self.vm, conf, bare_dir, image)
        self.bare_argv, self.bare_dropped = bare_qemu_argv(full, self.bare_initrd)
        self.kernel_cmdline = self.bare_argv[self.bare_argv.index("-append") + 1]

    def _runc_fallback(self):
        """A bundle with `runc spec`'s config (used if runc rejects the shared one)."""
        d = os.path.join(self.tmp, "runc-spec")
        os.makedirs(d)
        subprocess.run([self.runc, "spec", "--bundle", d], check=True, stdin=subprocess.DEVNULL)
        b = make_bundle(self.tmp, "bundle-runc", [PROGRAM], self.rootfs, os.path.join(d, "config.json"))
        return b

    def _id(self, prefix):
        self.seq += 1
        return "%s%d" % (prefix, self.seq)

    # -- one sample of each ------------------------------------------------
    def runtime_once(self):
        cid = self._id("rt")
        self.rt_ids.append(cid)
        out = os.path.join(self.tmp, "out-%s.txt" % cid)
        try:
            secs, rc = run_timed([self.program, "--root", self.rt_root, "run", "-b",
                                  self.bundle, cid], out, self.timeout)
        finally:
            quiet([self.program, "--root", self.rt_root, "delete", "--force", cid])
        if rc != 0:
            raise BenchError("cc-oci-runtime run %s: exit status %d: %s" % (cid, rc, _tail(out)))
        return secs

    def runc_once(self):
        cid = self._id("runc")
        self.runc_ids.append(cid)
        out = os.path.join(self.tmp, "out-%s.txt" % cid)
        try:
            secs, rc = run_timed([self.runc, "--root", self.runc_root, "run", "--bundle",
                                  self.runc_bundle, cid], out, 60)
        finally:
            quiet([self.runc, "--root", self.runc_root, "delete", "--force", cid])
        if rc != 0:
            raise BenchError("runc run %s: exit status %d: %s" % (cid, rc, _tail(out)))
        return secs

    def bare_once(self):
        n = self._id("bare")
        console = os.path.join(self.bare_dir, "console.log")
        if os.path.exists(console):
            os.unlink(console)
        out = os.path.join(self.tmp, "out-%s.txt" % n)
        secs, rc = run_timed(self.bare_argv, out, self.timeout, cwd=self.bare_dir)
        text = _tail(console, 4000)
        if rc != 0 or MARKER not in text:
            raise BenchError("bare QEMU boot: exit status %d, %s in console.log: qemu: %s; "
                             "console: %s" % (rc, "marker" if MARKER in text else "no marker",
                                              _tail(out), text[-800:]))
        return secs

    def timings(self, n):
        kinds = [("runtime", self.runtime_once)]
        if self.runc:
            kinds.append(("runc", self.runc_once))
        kinds.append(("bare_qemu", self.bare_once))
        log("warm-up (not measured): %s" % ", ".join(k for k, _ in kinds))
        for name, fn in kinds:
            if name == "runc":
                try:
                    fn()
                except BenchError as e:
                    log("runc rejected the shared bundle (%s); using `runc spec`'s config" % e)
                    self.runc_bundle = self._runc_fallback()
                    fn()
            else:
                fn()
        samples = {k: [] for k, _ in kinds}
        for i in range(n):
            for name, fn in kinds:
                samples[name].append(fn())
            log("round %d/%d: %s" % (i + 1, n, "  ".join(
                "%s %.3fs" % (k, v[-1]) for k, v in samples.items())))
        return samples

    # -- the CLI's own start-up, run as a program as engines run it -------------
    def cli(self, n, n_lifecycle):
        """Median wall time of the short commands, against /usr/bin/python3 -c pass (the
        runtime run as a program: its shell header, cached code): state, list, kill 0 and
        ps on one running container (n rounds), then start of a freshly created /bin/true
        container and delete of it once stopped (n_lifecycle rounds, one create each,
        not timed); every round also takes one python -c pass."""
        program = self.program
        env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""),
                   CC_OCI_PYTHON="/usr/bin/python3")
        base = [program, "--root", self.rt_root]
        cid = self._id("cli")
        self.rt_ids.append(cid)

        def timed(argv, what):
            """Wall time of argv (run_timed's blocking waitpid: subprocess.run's timeout polls
            at growing intervals and rounds short times up to 15, 31, 63 ms)."""
            out = os.path.join(self.tmp, "out-cli.txt")
            secs, rc = run_timed(argv, out, 60, env=env)
            if rc != 0:
                raise BenchError("%s: exit status %d: %s" % (what, rc, _tail(out)))
            return secs
        floor = ["/usr/bin/python3", "-c", "pass"]
        try:
            self.create(cid, self.sleep_bundle, start=True)
            timed(base + ["state", cid], "state")  # the first run compiles and caches
            kinds = {"python -c pass": floor,
                     "state": base + ["state", cid], "list": base + ["list"],
                     "kill 0": base + ["kill", cid, "0"], "ps": base + ["ps", cid]}
            samples = {k: [] for k in kinds}
            samples.update(start=[], delete=[])
            for _ in range(n):
                for k, argv in kinds.items():
                    samples[k].append(timed(argv, k))
        finally:
            quiet([self.program, "--root", self.rt_root, "delete", "--force", cid])
        for i in range(n_lifecycle):
            lid = self._id("cli")
            self.rt_ids.append(lid)
            try:
                self.create(lid, self.bundle)
                samples["python -c pass"].append(timed(floor, "python"))
                samples["start"].append(timed(base + ["start", lid], "start " + lid))
                self.wait_status(lid, "stopped")
                samples["delete"].append(timed(base + ["delete", lid], "delete " + lid))
                if os.path.exists(os.path.join(self.rt_root, lid)):
                    raise BenchError("delete %s left its state directory" % lid)
            finally:
                quiet([self.program, "--root", self.rt_root, "delete", "--force", lid])
        return {k: round(statistics.median(v), 4) for k, v in samples.items()}

    # -- helpers for containers the measurements keep ---------------------------
    def call(self, args, timeout=None, what=None):
        """One CLI call (not timed); its output. BenchError unless it succeeds."""
        out = os.path.join(self.tmp, "out-call-%d-%s.txt" % (os.getpid(), uuid_hex()))
        try:
            _, rc = run_timed([self.program, "--root", self.rt_root] + list(args), out,
                              timeout or self.timeout)
            with open(out, errors="replace") as f:
                text = f.read()
        finally:
            if os.path.exists(out):
                os.unlink(out)
        if rc != 0:
            raise BenchError("%s: exit status %d: %s" % (what or " ".join(args[:2]), rc,
                                                         text[-1500:].strip()))
        return text

    def create(self, cid, bundle, start=False, pid_file=None):
        """create (and start) cid; BenchError on failure."""
        self.call(["create", "-b", bundle] + (["--pid-file", pid_file] if pid_file else [])
                  + [cid], what="create " + cid)
        if start:
            self.call(["start", cid], timeout=120, what="start " + cid)

    def state(self, cid):
        """The parsed `state` of cid."""
        text = self.call(["state", cid], timeout=120, what="state " + cid)
        try:
            return json.loads(text)
        except ValueError:
            raise BenchError("state %s: not JSON: %s" % (cid, text[-500:]))

    def wait_status(self, cid, status, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            got = self.state(cid)["status"]
            if got == status:
                return
            if time.monotonic() > deadline:
                raise BenchError("%s is %s, not %s, after %ds" % (cid, got, status, timeout))
            time.sleep(0.05)

    # -- memory of one idle container --------------------------------------
    def memory(self, settle):
        cid = self._id("mem")
        self.rt_ids.append(cid)
        pid_file = os.path.join(self.tmp, "%s.pid" % cid)
        try:
            self.create(cid, self.sleep_bundle, start=True, pid_file=pid_file)
            time.sleep(settle)
            state = self.state(cid)
            with open(pid_file) as f:
                monitor = int(f.read().strip())
            if state["status"] != "running" or state["pid"] != monitor:
                raise BenchError("state %s: status %s pid %s (pid file: %d)"
                                 % (cid, state["status"], state["pid"], monitor))
            result = container_pss(monitor)
            result["settle_s"] = settle
            result["vm_memory"] = str(self.vm["memory"])
            return result
        finally:
            quiet([self.program, "--root", self.rt_root, "delete", "--force", cid])

    # -- many idle containers at once ---------------------------------------
    def fleet(self, n, prefix, settle, parallel=5):
        """n idle `sleep` containers, created and started `parallel` at a time: all must
        be running and answer exec; their PSS (each monitor + its children), the time to
        create them all and to delete them all (delete --force, `parallel` at a time),
        and a check that nothing is left (state dirs, monitors, QEMUs, processes naming
        the state root or working in it)."""
        from concurrent.futures import ThreadPoolExecutor
        ids = [self._id(prefix + "-") for _ in range(n)]
        self.rt_ids.extend(ids)
        pid_files = {c: os.path.join(self.tmp, "%s.pid" % c) for c in ids}
        res = {"n": n, "parallel": parallel, "settle_s": settle}

        def up(cid):
            self.create(cid, self.sleep_bundle, start=True, pid_file=pid_files[cid])

        def answer(cid):
            out = self.call(["exec", cid, "echo", cid], timeout=300, what="exec " + cid)
            if out.strip() != cid:
                raise BenchError("exec %s: printed %r" % (cid, out[-200:]))

        def down(cid):
            self.call(["delete", "--force", cid], timeout=300, what="delete --force " + cid)
        pids = set()
        try:
            with ThreadPoolExecutor(max_workers=parallel) as pool:
                t0 = time.monotonic()
                list(pool.map(up, ids))
                res["create_s"] = round(time.monotonic() - t0, 3)
                log("%d containers created and started in %.1fs; waiting %.1fs"
                    % (n, res["create_s"], settle))
                time.sleep(settle)
                per = []
                for cid in ids:
                    with open(pid_files[cid]) as f:
                        monitor = int(f.read().strip())
                    m = container_pss(monitor)
                    pids.add(monitor)
                    pids.update(c["pid"] for c in m["children"])
                    per.append(m["total_pss_kb"])
                res["total_pss_kb"] = sum(per)
                res["mean_pss_kb"] = round(sum(per) / n, 1)
                res["min_pss_kb"], res["max_pss_kb"] = min(per), max(per)
                res["host_mem_available_kb"] = meminfo_kb("MemAvailable")
                bad = [(c, s["status"]) for c, s in ((c, self.state(c)) for c in ids)
                       if s["status"] != "running"]
                if bad:
                    raise BenchError("not running: %s" % bad)
                res["all_running"] = True
                t0 = time.monotonic()
                list(pool.map(answer, ids))
                res["exec_all_s"] = round(time.monotonic() - t0, 3)
                res["all_answer_exec"] = True
                t0 = time.monotonic()
                list(pool.map(down, ids))
                res["delete_s"] = round(time.monotonic() - t0, 3)
        finally:
            for cid in ids:
                if os.path.exists(os.path.join(self.rt_root, cid)):
                    quiet([self.program, "--root", self.rt_root, "delete", "--force", cid])
        deadline = time.monotonic() + 10
        while True:
            left = {"state dirs": sorted(c for c in ids
                                         if os.path.exists(os.path.join(self.rt_root, c))),
                    "live pids": sorted(p for p in pids if rt.process_alive(p)),
                    "processes naming the root": sorted(
                        set(procs_naming(self.rt_root)) | set(procs_in(self.rt_root)))}
            if not any(left.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        res["left"] = {k: v for k, v in left.items() if v}
        res["clean"] = not res["left"]
        if not res["clean"]:
            raise BenchError("after deleting %d containers: left %s" % (n, res["left"]))
        return res

    # -- clean-up ----------------------------------------------------------
    def cleanup(self):
        """delete --force everything, then kill whatever still names the temp dir."""
        for cid in self.rt_ids:
            if os.path.exists(os.path.join(self.rt_root, cid)):
                quiet([self.program, "--root", self.rt_root, "delete", "--force", cid])
        if self.runc:
            for cid in self.runc_ids:
                if os.path.exists(os.path.join(self.runc_root, cid)):
                    quiet([self.runc, "--root", self.runc_root, "delete", "--force", cid])
        left = procs_naming(self.tmp)
        for pid, cmd in left.items():
            log("left-over process %d killed: %s" % (pid, cmd[:200]))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while left and time.monotonic() < deadline and any(
                rt.process_alive(pid) for pid in left):
            time.sleep(0.05)
        return left


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def summary(values):
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "samples": [round(v, 4) for v in values]}


def ratio(a, b):
    return round(a / b, 3) if b else None


GOALS = {"cli": 2.0, "warm_start": 0.10, "idle_one_mib": 80, "idle_ten_mean_mib": 48}
CLI_FIGURES = ("state", "start", "kill 0", "delete", "list", "ps")


def goal_rows(res):
    """(figure, value, goal, met) for every target of issue 8 this run measured."""
    rows = []
    cli = res.get("cli")
    if cli:
        floor = cli["python -c pass"]
        for k in CLI_FIGURES:
            if k in cli:
                r = cli[k] / floor
                rows.append(("CLI %s / python -c pass" % k, "%.2fx" % r,
                             "<= %.1fx" % GOALS["cli"], r <= GOALS["cli"]))
    r = res["ratios"]["runtime/bare_qemu"]
    rows.append(("warm start: run /bin/true / bare QEMU boot", "%.3fx" % r,
                 "<= %.2fx" % GOALS["warm_start"], r <= GOALS["warm_start"]))
    m = res.get("memory")
    if m:
        v = m["total_pss_kb"] / 1024
        rows.append(("idle container alone, PSS", "%.1f MiB" % v,
                     "<= %d MiB" % GOALS["idle_one_mib"], v <= GOALS["idle_one_mib"]))
    m = res.get("memory10")
    if m:
        v = m["mean_pss_kb"] / 1024
        rows.append(("%d idle containers, mean PSS each" % m["n"], "%.1f MiB" % v,
                     "<= %d MiB" % GOALS["idle_ten_mean_mib"], v <= GOALS["idle_ten_mean_mib"]))
    d = res.get("density")
    if d:
        rows.append(("density %d: all running, all answer exec" % d["n"],
                     "yes" if d.get("all_answer_exec") else "no", "yes",
                     bool(d.get("all_running") and d.get("all_answer_exec"))))
        rows.append(("density %d: nothing left after delete" % d["n"],
                     "yes" if d.get("clean") else "no", "yes", bool(d.get("clean"))))
        rows.append(("density %d: mean PSS each" % d["n"], "%.1f MiB" % (d["mean_pss_kb"] / 1024),
                     "-", None))
    eng = res.get("engines")
    if eng:
        rows += ENGINES.goals(eng)
    return rows


def print_fleet(title, f):
    print("%s (created %d at a time, PSS %.0f s after the last start):"
          % (title, f["parallel"], f["settle_s"]))
    print("  total PSS (monitors + QEMUs)        %9.1f MiB" % (f["total_pss_kb"] / 1024))
    print("  mean PSS per container              %9.1f MiB  (min %.1f, max %.1f)"
          % (f["mean_pss_kb"] / 1024, f["min_pss_kb"] / 1024, f["max_pss_kb"] / 1024))
    print("  create + start all                  %9.1f s   (%.2f s per container)"
          % (f["create_s"], f["create_s"] / f["n"]))
    print("  exec in every one                   %9.1f s" % f["exec_all_s"])
    print("  delete --force all                  %9.1f s   (%.2f s per container)"
          % (f["delete_s"], f["delete_s"] / f["n"]))
    print("  all running / all answer exec / nothing left: %s / %s / %s"
          % tuple("yes" if f.get(k) else "NO" for k in ("all_running", "all_answer_exec", "clean")))
    if f.get("host_mem_available_kb"):
        print("  host MemAvailable with all of them up  %.1f GiB"
              % (f["host_mem_available_kb"] / 1024 / 1024))


def print_table(res):
    env = res["env"]
    print("cc-oci-runtime start-up benchmark: n=%d per kind (+1 warm-up), round-robin"
          % res["n"])
    print("host: %d CPUs, load average %s; QEMU accel=%s machine=%s memory=%s cpus=%s"
          % (env["host_cpus"], env["loadavg"], env["accel"], env["machine"], env["memory"],
             env["vm_cpus"]))
    print("kernel: %s (booted as %s)" % (env["kernel"], env["kernel_image"]))
    print()
    labels = {"runtime": "cc-oci-runtime run /bin/true", "runc": "runc run /bin/true",
              "bare_qemu": "bare QEMU boot, /init = /bin/true"}
    print("%-36s %9s %9s %9s" % ("wall time (s)", "median", "min", "max"))
    for k in ("runtime", "runc", "bare_qemu"):
        s = res["timings"].get(k)
        if s is None:
            print("%-36s %9s" % (labels[k], "n/a (runc not installed)"))
            continue
        print("%-36s %9.3f %9.3f %9.3f" % (labels[k], s["median"], s["min"], s["max"]))
    print()
    r = res["ratios"]
    if r.get("runtime/runc") is not None:
        print("ratio runtime/runc (medians)          %9.1fx" % r["runtime/runc"])
    print("ratio runtime/bare-QEMU (medians)     %9.2fx  (goal <= %.2fx)"
          % (r["runtime/bare_qemu"], GOALS["warm_start"]))
    print("runtime overhead over bare QEMU       %9.3f s" % r["runtime-bare_qemu_s"])
    cli = res.get("cli")
    if cli:
        print()
        floor = cli["python -c pass"]
        print("CLI as a program (median, /usr/bin/python3)   time    ratio to python -c pass"
              " (goal <= %.1fx)" % GOALS["cli"])
        for k, v in cli.items():
            print("  %-42s %6.1f ms %6.2fx" % (k, v * 1000, v / floor))
    m = res.get("memory")
    if m:
        print()
        print("idle container (sleep 1000, %.0f s after start), host PSS:" % m["settle_s"])
        mon = m["monitor"]
        print("  %-34s %8.1f MiB  (RSS %.1f MiB)"
              % ("monitor pid %d (%s)" % (mon["pid"], mon["comm"]), mon["pss_kb"] / 1024,
                 mon["rss_kb"] / 1024))
        for c in m["children"]:
            print("  %-34s %8.1f MiB  (RSS %.1f MiB; guest RAM %s)"
                  % ("child pid %d (%s)" % (c["pid"], c["comm"]), c["pss_kb"] / 1024,
                     c["rss_kb"] / 1024, m["vm_memory"]))
        print("  %-34s %8.1f MiB  (goal <= %d MiB)" % ("total", m["total_pss_kb"] / 1024,
                                                      GOALS["idle_one_mib"]))
    if res.get("memory10"):
        print()
        print_fleet("%d idle containers at once" % res["memory10"]["n"], res["memory10"])
    if res.get("density"):
        print()
        print_fleet("density: %d idle containers" % res["density"]["n"], res["density"])
    if res["bare_qemu_dropped"]:
        print()
        print("bare QEMU = the runtime's QEMU command without: %s"
              % "; ".join(res["bare_qemu_dropped"]))
    eng = res.get("engines")
    if eng:
        print()
        for name in ("podman", "docker"):
            e = eng.get(name)
            if not e:
                continue
            print("%s run --rm bb true (n=%d)" % (name, len(next(iter(e["times"].values()))["samples"])))
            for kind, t in e["times"].items():
                print("  %-28s median %.3f s  (min %.3f, max %.3f)"
                      % (kind, t["median"], t["min"], t["max"]))
            print("  ratio: %.2fx (goal <= %.1fx)" % (e["ratio"], ENGINES.GOAL))
            if e.get("timeline"):
                ENGINES.print_timeline("`%s run --rm bb true`" % name, e["timeline"])
            print()
    print()
    print("summary of issue 8's targets (load average at the end: %s)" % res.get("loadavg_end", "?"))
    print_goals(goal_rows(res))


def _load_engines():
    """bench/engines.py as a module (tests/functional/engines.py owns the name `engines`)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_engines", os.path.join(HERE, "engines.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ENGINES = None


def print_goals(rows):
    """The summary table: a figure, its value and goal, and whether it is met, a row each."""
    w = max(len(r[0]) for r in rows)
    print("  %-*s %12s  %-10s %s" % (w, "figure", "value", "goal", "met?"))
    for fig, val, goal, met in rows:
        print("  %-*s %12s  %-10s %s" % (w, fig, val, goal,
                                         "-" if met is None else ("yes" if met else "NO")))


def clean_up(bench, tmp, keep):
    """After a run: what bench.cleanup() killed ({pid: cmdline}); tmp removed unless kept."""
    try:
        return bench.cleanup()
    finally:
        if keep:
            log("kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def report(res, leftovers, as_json, table):
    """Print a run's results (JSON, or table(res)) with the processes that outlived it."""
    if res is None:
        return
    res["leftover_processes"] = {str(k): v for k, v in leftovers.items()}
    if as_json:
        print(json.dumps(res, indent=2))
        return
    table(res)
    if leftovers:
        print("\nWARNING: %d process(es) outlived delete --force and were killed: %s"
              % (len(leftovers), ", ".join(map(str, leftovers))))


def main(argv=None):
    global ENGINES
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10, help="measured runs of each kind (default 10)")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    ap.add_argument("--boot-timeout", type=float, default=0,
                    help="timeout of each run/boot in seconds (default: vm boot_timeout + 30)")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds between start and the memory reading (default 2)")
    ap.add_argument("--no-memory", action="store_true",
                    help="skip the memory measurements (one and ten idle containers)")
    ap.add_argument("--density", type=int, default=0, metavar="N",
                    help="also start N idle containers (5 at a time), check and delete them")
    ap.add_argument("--parallel", type=int, default=5,
                    help="containers created/deleted at once by --density and the 10-container "
                         "memory figure (default 5)")
    ap.add_argument("--engines", type=int, default=0, metavar="N",
                    help="also run bench/engines.py's podman/docker figures, N runs per kind")
    ap.add_argument("--no-docker", action="store_true", help="with --engines: podman only")
    ap.add_argument("--memory-limit", default="",
                    help="a memory limit for the containers (e.g. 256m, 2g): sizes the VM")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    opts = ap.parse_args(argv)
    if opts.n < 1:
        ap.error("-n must be at least 1")
    if os.geteuid() != 0:
        ap.error("must run as root (runc and the runtime's VM set-up need it)")
    if opts.engines:
        ENGINES = _load_engines()

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)
    os.environ.setdefault("CC_OCI_PYTHON", "/usr/bin/python3")  # not a pyenv shim: see README
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    tmp = tempfile.mkdtemp(prefix="cc-bench-")
    bench = Bench(tmp, opts)
    code = 0
    leftovers = {}
    try:
        log("temporary directory %s" % tmp)
        bench.setup()
        log("bare QEMU: %s" % " ".join(bench.bare_argv))
        samples = bench.timings(opts.n)
        log("CLI: short commands as a program, against python -c pass")
        cli = bench.cli(max(opts.n, 10), max(opts.n, 5))
        mem = mem10 = dens = None
        if not opts.no_memory:
            log("memory: create + start a `sleep 1000` container, wait %.1fs" % opts.settle)
            mem = bench.memory(opts.settle)
            log("memory: 10 idle containers at once")
            mem10 = bench.fleet(10, "ten", opts.settle, opts.parallel)
        if opts.density:
            log("density: %d idle containers, %d at a time" % (opts.density, opts.parallel))
            dens = bench.fleet(opts.density, "dens", opts.settle, opts.parallel)
        eng = None
        if opts.engines:
            log("engines: podman%s, %d runs per kind" % ("" if opts.no_docker else " and docker",
                                                         opts.engines))
            try:
                eng = ENGINES.run_all(opts.engines, docker=not opts.no_docker, echo=False)
            except (SystemExit, RuntimeError, OSError, subprocess.SubprocessError) as e:
                raise BenchError("engines: %s" % e)
        t = {k: summary(v) for k, v in samples.items()}
        rmed, bmed = t["runtime"]["median"], t["bare_qemu"]["median"]
        res = {
            "n": opts.n,
            "env": {"host_cpus": os.cpu_count(), "loadavg": " ".join(
                        open("/proc/loadavg").read().split()[:3]),
                    "accel": bench.vm["accel_used"], "machine": bench.vm["machine"],
                    "memory": str(bench.vm["memory"]), "vm_cpus": bench.vm["cpus"],
                    "kernel": bench.vm["kernel_path"], "kernel_image": bench.vm["kernel_image"],
                    "kernel_cmdline": bench.kernel_cmdline, "qemu": bench.vm["qemu"],
                    "runc": bench.runc, "runc_bundle_config": os.path.basename(bench.runc_bundle)},
            "timings": t,
            "ratios": {"runtime/runc": ratio(rmed, t["runc"]["median"]) if "runc" in t else None,
                       "runtime/bare_qemu": ratio(rmed, bmed),
                       "runtime-bare_qemu_s": round(rmed - bmed, 4)},
            "memory": mem,
            "memory10": mem10,
            "density": dens,
            "engines": eng,
            "cli": cli,
            "bare_qemu_argv": bench.bare_argv,
            "bare_qemu_dropped": bench.bare_dropped,
            "loadavg_end": " ".join(open("/proc/loadavg").read().split()[:3]),
        }
        res["goals"] = [{"figure": f, "value": v, "goal": g, "met": m}
                        for f, v, g, m in goal_rows(res)]
    except BenchError as e:
        log("FAILED: %s" % e)
        res, code = None, 1
    except KeyboardInterrupt:
        log("interrupted")
        res, code = None, 130
    finally:
        leftovers = clean_up(bench, tmp, opts.keep)
    report(res, leftovers, opts.json, print_table)
    return code


if __name__ == "__main__":
    sys.exit(main())
