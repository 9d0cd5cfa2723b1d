#!/usr/bin/env python3
"""Checkpoint and restore with cc-oci-runtime (issue 19): their times, the image size, and a
restore against the cold start it replaces; runc with CRIU on the host tried beside it.

Stdlib only, Python 3.9+, run as root. Three workloads, each on a busybox rootfs:

  idle       `sleep 100000`, the VM sized by vm.json;
  mem200     busybox awk holding 200,000,000 bytes in its heap (`sprintf("%200000000s")`,
             then `system("sleep 100000")`), with linux.resources.memory.limit 512 MiB (the
             VM's size follows it); ready when the guest's /proc/1/status shows VmRSS of
             at least 190 MiB (read through `exec`, not timed), and read again in the
             restored container;
  slowstart  a shell that computes for seconds (a loop of --work iterations, about 4 s
             under TCG here) before it is ready, then writes a heartbeat file to a volume
             every 0.1 s: ready is the first heartbeat on the host.

For each workload, in one round: the runtime (the installed program, `--root TMP`) runs it
(`run -d`; for slowstart timed from `run -d` until the first heartbeat: its cold start),
waits until it is ready, `checkpoint --image-path IMG` (timed; without --leave-running, so
the container ends, as runc's default), then `restore -d -b BUNDLE --image-path IMG` under
a new id (timed: until restore returns, and for slowstart until the restored process's first
heartbeat, the heartbeat file removed before), then delete --force. The image size is the
sum of the image directory's file sizes (criu's dump.log, written elsewhere with
--work-path, is not in it). Then runc 1.1 does the same on the same bundle
(`runc --root TMP run -d`, `checkpoint`, and `restore -d` if the checkpoint worked): its
times, or the reason it failed (runc's error and the first `Error` lines of criu's
dump.log), are in the table. Workloads and runtimes are taken round robin, after one
unmeasured warm-up round. After every container: no state directory, no process naming
the temporary directory or working in it, no mount naming it.

A table of the figures follows (--json: the same as JSON). Everything lives in one temporary
directory, removed at the end; containers are deleted with delete --force in finally blocks,
and any process still naming the temporary directory is reported and killed.

    bench/checkpoint.py [-n 5] [--work 150000] [--only idle,mem200,slowstart] [--json] [--keep]
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.realpath(__file__))
sys.path.insert(0, HERE)
import bench as B  # noqa: E402  (bench/bench.py: processes, the program copy, the report)

rt, make_busybox_rootfs = B.rt, B.make_busybox_rootfs
BenchError, log, run_timed, quiet, _tail = B.BenchError, B.log, B.run_timed, B.quiet, B._tail

MIB = 1024.0 * 1024
HOLD_BYTES = 200000000
HOLD_READY_KB = 190 * 1024
MEM_LIMIT = 512 * 1024 * 1024
WORKLOADS = ("idle", "mem200", "slowstart")
BEAT = "beat"


def slowstart_script(work):
    """The slow starter: `work` loop iterations of arithmetic, then a heartbeat every 0.1 s."""
    return ("s=0; i=0; while [ $i -lt %d ]; do s=$(((s+i*i)%%1000003)); i=$((i+1)); done; "
            "n=0; while :; do n=$((n+1)); echo \"$s $n\" > /vol/%s.tmp; mv /vol/%s.tmp /vol/%s; "
            "sleep 0.1; done" % (work, BEAT, BEAT, BEAT))


ARGS = {
    "idle": lambda o: ["sleep", "100000"],
    "mem200": lambda o: ["awk", 'BEGIN { s = sprintf("%%%ds", ""); system("sleep 100000") }'
                         % HOLD_BYTES],
    "slowstart": lambda o: ["sh", "-c", slowstart_script(o.work)],
}


def mounts_naming(text):
    """The mount points of this mount namespace whose path or source contains text."""
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if text in line]


def tree_bytes(d):
    """Sum of the sizes of the regular files under d, and their number."""
    total = files = 0
    for top, _dirs, names in os.walk(d):
        for n in names:
            st = os.lstat(os.path.join(top, n))
            if not os.path.islink(os.path.join(top, n)):
                total += st.st_size
                files += 1
    return total, files


def criu_errors(log_path, n=3):
    """The first n `Error` lines of a criu log, without their timestamps."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [re.sub(r"^\(\s*[\d.]+\)\s*", "", ln.strip()) for ln in f if "Error" in ln]
    except OSError:
        return []
    return lines[:n]


class CheckpointBench(B.Bench):
    """Checkpoint/restore of three workloads under the runtime and runc, one temporary directory."""

    def setup(self):
        """The rootfs, the runtime's spec as the base config, a bundle per workload."""
        self.rootfs = make_busybox_rootfs(os.path.join(self.tmp, "rootfs"))
        spec_dir = os.path.join(self.tmp, "spec")
        os.makedirs(spec_dir)
        subprocess.run([self.program, "spec", "-b", spec_dir], check=True,
                       stdin=subprocess.DEVNULL)
        with open(os.path.join(spec_dir, "config.json")) as f:
            self.base = json.load(f)
        self.vol = os.path.join(self.tmp, "vol")
        os.makedirs(self.vol)
        self.bundles, self.vms = {}, {}
        for w in self.opts.only:
            self.bundles[w] = d = os.path.join(self.tmp, "bundle-" + w)
            os.makedirs(d)
            conf = json.loads(json.dumps(self.base))
            conf["process"].update(terminal=False, args=ARGS[w](self.opts))
            conf["root"]["path"] = self.rootfs
            if w == "mem200":
                conf["linux"].setdefault("resources", {})["memory"] = {"limit": MEM_LIMIT}
            if w == "slowstart":
                conf["mounts"].append({"destination": "/vol", "type": "bind", "source": self.vol,
                                       "options": ["rbind", "rw"]})
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(conf, f, indent=1)
            spec = rt.load_spec(d)
            self.vms[w] = rt.size_vm(rt.resolve_vm(spec), spec["resources"])
        self.timeout = max(float(v["boot_timeout"]) for v in self.vms.values()) + 60

    # -- commands --------------------------------------------------------------
    def argv(self, kind, *args):
        """One command line of the runtime ("cc") or of runc."""
        if kind == "cc":
            return [self.program, "--root", self.rt_root] + [str(a) for a in args]
        return [self.runc, "--root", self.runc_root] + [str(a) for a in args]

    def call(self, kind, *args, timeout=None):
        """(seconds, exit status, output) of one command."""
        self.seq += 1
        out = os.path.join(self.tmp, "out-%s-%d.txt" % (kind, self.seq))
        secs, rc = run_timed(self.argv(kind, *args), out, timeout or self.timeout)
        text = _tail(out, 4000)
        os.unlink(out)
        return secs, rc, text

    def timed(self, kind, *args):
        """Seconds one command took; BenchError unless it succeeded."""
        secs, rc, text = self.call(kind, *args)
        if rc != 0:
            name = "cc-oci-runtime" if kind == "cc" else "runc"
            raise BenchError("%s %s: exit status %d: %s"
                             % (name, " ".join(map(str, args)), rc, text[-1500:]))
        return secs

    def new_id(self, kind, w):
        self.seq += 1
        cid = "%s-%s-%d" % (kind, w, self.seq)
        (self.rt_ids if kind == "cc" else self.runc_ids).append(cid)
        return cid

    # -- readiness ---------------------------------------------------------------
    def beat(self):
        return os.path.join(self.vol, BEAT)

    def wait_beat(self, t0, what):
        """Seconds from t0 until the heartbeat file exists."""
        deadline = t0 + self.timeout + 60
        while not os.path.exists(self.beat()):
            if time.monotonic() > deadline:
                raise BenchError("%s: no heartbeat in %s" % (what, self.vol))
            time.sleep(0.01)
        return time.monotonic() - t0

    def guest_rss_kb(self, cid):
        """VmRSS (kB) of the container's first process, read in the guest."""
        secs, rc, text = self.call("cc", "exec", cid, "cat", "/proc/1/status", timeout=120)
        m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
        if rc != 0 or not m:
            raise BenchError("exec %s cat /proc/1/status: exit %d: %s" % (cid, rc, text[-500:]))
        return int(m.group(1))

    def wait_rss(self, cid):
        """The first process's VmRSS once it holds HOLD_READY_KB."""
        deadline = time.monotonic() + self.timeout + 60
        while True:
            rss = self.guest_rss_kb(cid)
            if rss >= HOLD_READY_KB:
                return rss
            if time.monotonic() > deadline:
                raise BenchError("%s: VmRSS %d kB, never %d" % (cid, rss, HOLD_READY_KB))
            time.sleep(0.5)

    def host_rss_kb(self, cid):
        """VmRSS (kB) of a runc container's process once it holds HOLD_READY_KB."""
        pid = json.loads(self.call("runc", "state", cid)[2])["pid"]
        deadline = time.monotonic() + 60
        while True:
            with open("/proc/%d/status" % pid) as f:
                rss = int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1))
            if rss >= HOLD_READY_KB:
                return rss
            if time.monotonic() > deadline:
                raise BenchError("runc %s: VmRSS %d kB, never %d" % (cid, rss, HOLD_READY_KB))
            time.sleep(0.1)

    # -- checks ------------------------------------------------------------------
    def check_clean(self, kind, ids):
        """BenchError if a state dir, a process or a mount of the temp dir outlives delete."""
        root = self.rt_root if kind == "cc" else self.runc_root
        deadline = time.monotonic() + 10
        while True:
            left = {"state dirs": sorted(os.listdir(root)) if os.path.isdir(root) else [],
                    "processes naming the temp dir": sorted(
                        set(B.procs_naming(self.tmp)) | set(B.procs_in(self.tmp))),
                    "mounts naming the temp dir": mounts_naming(self.tmp)}
            if not any(left.values()):
                return
            if time.monotonic() > deadline:
                raise BenchError("%s: after deleting %s: left %s"
                                 % (kind, " ".join(ids), {k: v for k, v in left.items() if v}))
            time.sleep(0.1)

    def force_delete(self, kind, ids):
        root = self.rt_root if kind == "cc" else self.runc_root
        for cid in ids:
            if os.path.exists(os.path.join(root, cid)):
                quiet(self.argv(kind, "delete", "--force", cid), timeout=120)

    # -- one round of one workload ---------------------------------------------------
    def fresh(self, name):
        d = os.path.join(self.tmp, name)
        shutil.rmtree(d, ignore_errors=True)
        return d

    def cc_once(self, w):
        """The runtime: run, ready, checkpoint, restore under a new id, ready, delete."""
        bundle, images = self.bundles[w], self.fresh("img-cc-" + w)
        work = self.fresh("work-cc-" + w)
        a, b = self.new_id("cc", w), self.new_id("cc", w)
        res = {}
        try:
            if w == "slowstart" and os.path.exists(self.beat()):
                os.unlink(self.beat())
            t0 = time.monotonic()
            res["run"] = self.timed("cc", "run", "-d", "-b", bundle, a)
            if w == "slowstart":
                res["cold_start"] = self.wait_beat(t0, a)
            elif w == "mem200":
                res["rss_kb"] = self.wait_rss(a)
            res["checkpoint"] = self.timed("cc", "checkpoint", "--image-path", images,
                                           "--work-path", work, a)
            if os.path.exists(os.path.join(self.rt_root, a)):
                raise BenchError("%s: still there after checkpoint" % a)
            res["image_bytes"], res["image_files"] = tree_bytes(images)
            if w == "slowstart":
                os.unlink(self.beat())
            t0 = time.monotonic()
            res["restore"] = self.timed("cc", "restore", "-d", "-b", bundle, "--image-path",
                                        images, "--work-path", work, b)
            if w == "slowstart":
                res["restore_ready"] = self.wait_beat(t0, b)
            elif w == "mem200":
                res["rss_restored_kb"] = self.guest_rss_kb(b)
            else:
                st = json.loads(self.call("cc", "state", b)[2] or "{}")
                if st.get("status") != "running":
                    raise BenchError("%s after restore: %s" % (b, st))
            self.timed("cc", "delete", "--force", b)
            self.check_clean("cc", [a, b])
        finally:
            self.force_delete("cc", [a, b])
            shutil.rmtree(images, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
        return res

    def runc_once(self, w):
        """runc with the host's criu on the same bundle: its times, or why it failed."""
        bundle, images = self.bundles[w], self.fresh("img-runc-" + w)
        work = self.fresh("work-runc-" + w)
        a = self.new_id("runc", w)
        res = {}
        try:
            if w == "slowstart" and os.path.exists(self.beat()):
                os.unlink(self.beat())
            t0 = time.monotonic()
            res["run"] = self.timed("runc", "run", "-d", "--bundle", bundle, a)
            if w == "slowstart":
                res["cold_start"] = self.wait_beat(t0, a)
            elif w == "mem200":
                res["rss_kb"] = self.host_rss_kb(a)
            secs, rc, text = self.call("runc", "checkpoint", "--image-path", images,
                                       "--work-path", work, a)
            if rc != 0:
                msgs = [m.replace("\\n", ", ") for m in re.findall(
                    r'level=error msg="((?:[^"\\]|\\.)*)"', text)] or [text.strip()]
                res["failed"] = {"step": "checkpoint", "exit": rc, "runc": msgs,
                                 "criu": criu_errors(os.path.join(work, "dump.log"))}
                return res
            res["checkpoint"] = secs
            res["image_bytes"], res["image_files"] = tree_bytes(images)
            if w == "slowstart" and os.path.exists(self.beat()):
                os.unlink(self.beat())
            t0 = time.monotonic()
            secs, rc, text = self.call("runc", "restore", "-d", "--bundle", bundle,
                                       "--image-path", images, "--work-path", work, a)
            if rc != 0:
                res["failed"] = {"step": "restore", "exit": rc, "runc": [text.strip()[-500:]],
                                 "criu": criu_errors(os.path.join(work, "restore.log"))}
                return res
            res["restore"] = secs
            if w == "slowstart":
                res["restore_ready"] = self.wait_beat(t0, a)
        finally:
            self.force_delete("runc", [a])
            self.check_clean("runc", [a])
            shutil.rmtree(images, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
        return res

    def rounds(self, n):
        """n rounds (after one unmeasured), round robin over workloads and runtimes."""
        kinds = [("cc", self.cc_once)] + ([("runc", self.runc_once)] if self.runc else [])
        samples = {k: {w: [] for w in self.opts.only} for k, _ in kinds}
        for i in range(n + 1):
            for w in self.opts.only:
                for kind, once in kinds:
                    r = once(w)
                    if i:
                        samples[kind][w].append(r)
                    log("%s %s %s: %s" % ("warm-up" if not i else "round %d/%d" % (i, n), kind, w,
                                          ", ".join("%s %s" % (k, ("%.3fs" % v) if isinstance(
                                              v, float) else v) for k, v in r.items()
                                              if k != "failed") or r.get("failed")))
        return samples


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

TIMES = ("run", "cold_start", "checkpoint", "restore", "restore_ready")


def figures(rounds):
    """Summaries of one runtime's rounds of one workload."""
    out = {}
    for key in TIMES + ("image_bytes", "rss_kb", "rss_restored_kb"):
        vals = [r[key] for r in rounds if key in r]
        if vals:
            out[key] = B.summary(vals)
    fails = [r["failed"] for r in rounds if "failed" in r]
    if fails:
        out["failed"] = fails[0]
        out["failed_rounds"] = len(fails)
    return out


LABELS = {"idle": "idle `sleep`", "mem200": "200 MB held (awk)", "slowstart": "slow start"}


def fmt(f, key):
    return "%.2f" % f[key]["median"] if key in f else "-"


def print_table(res):
    """The human-readable report."""
    env = res["env"]
    print("cc-oci-runtime checkpoint/restore benchmark: n=%d rounds (+1 warm-up), round robin "
          "with runc" % res["n"])
    print("host: %d CPUs, load average %s; QEMU accel=%s; criu %s on the host; runc %s"
          % (env["host_cpus"], env["loadavg"], env["accel"], env["criu"], env["runc"]))
    print("VMs: %s" % ", ".join("%s %s" % (w, m) for w, m in env["vm_memory"].items()))
    print()
    print("median seconds (min-max over the rounds); image = the image directory's files")
    print("%-20s %-6s %8s %8s %8s %8s %10s %9s" % ("workload", "", "run -d", "to ready",
                                                  "chkpt", "restore", "to ready", "image MB"))
    t = res["timings"]
    for w in res["workloads"]:
        for kind in ("cc", "runc"):
            f = t.get(kind, {}).get(w)
            if f is None:
                continue
            size = "%.1f" % (f["image_bytes"]["median"] / 1e6) if "image_bytes" in f else "-"
            line = "%-20s %-6s %8s %8s %8s %8s %10s %9s" % (
                LABELS[w] if kind == "cc" else "", kind, fmt(f, "run"), fmt(f, "cold_start"),
                fmt(f, "checkpoint"), fmt(f, "restore"), fmt(f, "restore_ready"), size)
            print(line)
            if "failed" in f:
                fl = f["failed"]
                print("%27s %s failed (exit %d, %d/%d rounds): %s" % (
                    "", fl["step"], fl["exit"], f["failed_rounds"], res["n"],
                    "; ".join(fl["runc"])))
                for e in fl["criu"]:
                    print("%27s   criu: %s" % ("", e))
    print()
    for w in res["workloads"]:
        f = t["cc"][w]
        ranges = ", ".join("%s %.2f-%.2f" % (k, f[k]["min"], f[k]["max"])
                           for k in TIMES if k in f)
        print("  %s (cc): %s" % (LABELS[w], ranges))
    m = t["cc"].get("mem200")
    if m:
        print("  200 MB: guest VmRSS of the first process %.1f MiB before checkpoint, %.1f MiB "
              "after restore" % (m["rss_kb"]["median"] / 1024, m["rss_restored_kb"]["median"] / 1024))
    print()
    print("summary (load average at the end: %s)" % res["loadavg_end"])
    B.print_goals(goal_rows(res))


def goal_rows(res):
    """(figure, value, goal, met) of the run."""
    rows = []
    s = res["timings"]["cc"].get("slowstart")
    if s:
        cold, back = s["cold_start"]["median"], s["restore_ready"]["median"]
        rows.append(("slow start: restore to ready / cold start to ready",
                     "%.2f/%.2f s" % (back, cold), "< 1", back < cold))
    for w in res["workloads"]:
        f = res["timings"].get("runc", {}).get(w)
        if f is not None:
            rows.append(("runc checkpoint of %s" % w, "failed" if "failed" in f else
                         "%.2f s" % f["checkpoint"]["median"], "-", None))
    rows.append(("nothing left after every delete", "yes", "yes", True))
    return rows


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def measure(bench, opts):
    bench.setup()
    samples = bench.rounds(opts.n)
    criu = rt.find_tool("criu")
    version = subprocess.run([criu, "--version"], capture_output=True, text=True).stdout.split()
    res = {"n": opts.n, "workloads": list(opts.only), "work_iterations": opts.work,
           "env": {"host_cpus": os.cpu_count(), "loadavg": loadavg(),
                   "accel": bench.vms[opts.only[0]]["accel_used"],
                   "vm_memory": {w: str(v["memory"]) for w, v in bench.vms.items()},
                   "criu": version[1] if len(version) > 1 else "?", "runc": bench.runc},
           "timings": {k: {w: figures(v) for w, v in per.items()} for k, per in samples.items()},
           "samples": samples, "loadavg_end": loadavg()}
    res["goals"] = [{"figure": f, "value": v, "goal": g, "met": m}
                    for f, v, g, m in goal_rows(res)]
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=5, help="measured rounds (default 5)")
    ap.add_argument("--work", type=int, default=150000,
                    help="loop iterations of the slow starter (default 150000: ~4 s under TCG)")
    ap.add_argument("--only", default=",".join(WORKLOADS),
                    help="workloads, comma-separated (default %s)" % ",".join(WORKLOADS))
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    opts = ap.parse_args(argv)
    opts.only = [w for w in opts.only.split(",") if w]
    if opts.n < 1 or not opts.only or set(opts.only) - set(WORKLOADS):
        ap.error("-n must be at least 1, --only a list of %s" % ", ".join(WORKLOADS))
    if os.geteuid() != 0:
        ap.error("must run as root (runc and the runtime's VM set-up need it)")
    if rt.find_tool("criu") is None:
        ap.error("needs criu on the host (the guest image carries it)")

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)
    os.environ.setdefault("CC_OCI_PYTHON", "/usr/bin/python3")  # not a pyenv shim: see README
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    tmp = tempfile.mkdtemp(prefix="cc-ckpt-")
    bench = CheckpointBench(tmp, opts)
    res, code = None, 0
    try:
        log("temporary directory %s" % tmp)
        res = measure(bench, opts)
    except BenchError as e:
        log("FAILED: %s" % e)
        code = 1
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
    finally:
        leftovers = B.clean_up(bench, tmp, opts.keep)
    B.report(res, leftovers, opts.json, print_table)
    return code


if __name__ == "__main__":
    sys.exit(main())
