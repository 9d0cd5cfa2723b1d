#!/usr/bin/env python3
"""Pods with cc-oci-runtime (issue 17 item 8): pod start time against runc, host memory per member.

Stdlib only, Python 3.9+, run as root. A pod is a sandbox (`sleep` as its pause, with CRI-O's
sandbox annotations) and 3 members (CRI-O's member annotations naming the sandbox, network,
IPC and UTS namespaces at /proc/<sandbox pid>/ns/..., a busybox rootfs of their own each):
member 1 runs `httpd -f -p 8080 -h /etc`, the others `sleep 1000`. In one run it measures:

  start      wall time from the sandbox's `create` to the last member's `start` returning;
             the sandbox alone (create + start) and the mean per member (create + start);
             the runtime run as the installed program against runc 1.1 on the same bundles
             (`runc --root TMP`: runc itself joins the namespaces by their paths), one pod
             of each per round, round robin, after one unmeasured warm-up round. After
             every pod: member 3 fetches member 1's page over the pod's localhost (not
             timed), then delete --force of the members, then of the sandbox (timed), and
             nothing may be left: no state directory, no process naming the temporary
             directory or working in it, no mount naming it;
  memory     host PSS (/proc/PID/smaps_rollup) of the pod's sandbox monitor + QEMU with the
             sandbox alone and again with its members up (each read after --settle
             seconds, and after each member's start), and of each member's host process
             (its --pid-file pid): one member costs its process's PSS + the growth of
             monitor + QEMU / 3 (goal <= 15 MiB). That growth leaves out the PSS shift of
             the file pages of QEMU's and Python's program files and libraries (all file
             mappings but guest RAM, from /proc/PID/smaps): they are shared with every
             other QEMU and Python process on the host, so their PSS moves by megabytes
             when other VMs start or end, not with the pod (the table shows the shift).
             For scale: one separate VM container (monitor + QEMU, `sleep 1000`) and an
             idle python3 -S (the floor of a Python host process).

A table of the figures, the ratios against runc and the goal follows (--json: the same as
JSON). Everything lives in one temporary directory, removed at the end; containers are
deleted with delete --force in finally blocks (members first), and any process still naming
the temporary directory is reported and killed.

    bench/pods.py [-n 5] [--members 3] [--settle 2] [--json] [--keep]
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.realpath(__file__))
sys.path.insert(0, HERE)
import bench as B  # noqa: E402  (bench/bench.py: processes, PSS, the program copy)

rt, make_busybox_rootfs = B.rt, B.make_busybox_rootfs
BenchError, log, run_timed, quiet, _tail = B.BenchError, B.log, B.run_timed, B.quiet, B._tail

CRIO_TYPE, CRIO_SANDBOX = "io.kubernetes.cri-o.ContainerType", "io.kubernetes.cri-o.SandboxID"
PAUSE = ["sleep", "100000"]
IDLE = ["sleep", "1000"]
NS_FILES = {"network": "net", "ipc": "ipc", "uts": "uts"}  # what a member shares, its /proc name
HTTPD = ["httpd", "-f", "-p", "8080", "-h", "/etc"]
FETCH = ("for i in $(seq 50); do wget -q -O - http://127.0.0.1:8080/passwd && exit 0; "
         "sleep 0.2; done; exit 1")
GOAL_MIB = 15
ROLLUP_FIELDS = ("Pss", "Pss_Anon", "Pss_File", "Rss")
PSS_FIELDS = ROLLUP_FIELDS + ("Shared_Code",)
MIB = 1024.0


def guest_ram_files(pid):
    """The files a QEMU maps as guest RAM (memory-backend-file mem-path=, a warm start's)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except OSError:
        return set()
    return {opt[len("mem-path="):] for a in args for opt in a.split(",")
            if opt.startswith("mem-path=")}


def shared_code_kb(pid):
    """PSS (kB) of the file pages of every file mapping but guest RAM: program files and
    libraries (QEMU's, Python's), whose PSS moves whenever another process on the host that
    maps them starts or ends."""
    ram, total, name, file_pss = guest_ram_files(pid), 0, None, 0
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            head = line.split(None, 5)
            if "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                name = head[5].strip() if len(head) > 5 else ""
                file_pss = 0
            elif name.startswith("/") and name not in ram:
                if head[0] == "Pss:":
                    file_pss = int(head[1])
                elif head[0] == "Anonymous:":  # (its copied-on-write pages are its own)
                    total += max(0, file_pss - int(head[1]))
    return total


def pss(pid):
    """The PSS fields (kB) of one process, with its name."""
    res = {f: B.smaps_kb(pid, f) for f in ROLLUP_FIELDS}
    res.update(Shared_Code=shared_code_kb(pid), pid=pid, comm=B.comm(pid))
    return res


def add(readings):
    """The field-wise sum of pss() readings."""
    return {f: sum(r[f] for r in readings) for f in PSS_FIELDS}


def sub(a, b):
    """The field-wise difference a - b of two sums."""
    return {f: a[f] - b[f] for f in PSS_FIELDS}


def mounts_naming(text):
    """The mount points of this mount namespace whose path or source contains text."""
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if text in line]


class PodBench(B.Bench):
    """Pods under the runtime (the installed program) and runc, in one temporary directory."""

    def setup(self):
        """The rootfs (one per container), the runtime's spec as the base config, the VM."""
        self.timeout = 120
        self.rootfs = make_busybox_rootfs(os.path.join(self.tmp, "rootfs"))
        self.member_rootfs = [make_busybox_rootfs(os.path.join(self.tmp, "rootfs-m%d" % i))
                              for i in range(self.opts.members)]
        spec_dir = os.path.join(self.tmp, "spec")
        os.makedirs(spec_dir)
        subprocess.run([self.program, "spec", "-b", spec_dir], check=True,
                       stdin=subprocess.DEVNULL)
        self.base = os.path.join(spec_dir, "config.json")
        probe = B.make_bundle(self.tmp, "bundle-probe", PAUSE, self.rootfs, self.base)
        conf = rt.load_spec(probe)
        self.vm = rt.size_vm(rt.resolve_vm(conf), conf["resources"])
        self.timeout = float(self.vm["boot_timeout"]) + 30

    # -- bundles -------------------------------------------------------------
    def bundle(self, name, args, rootfs, annotations=None, ns_pid=None):
        """A bundle (made anew) running args; with ns_pid in that process's net/ipc/uts."""
        d = os.path.join(self.tmp, "bundles", name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        with open(self.base) as f:
            conf = json.load(f)
        conf["process"].update(terminal=False, args=list(args))
        conf["root"]["path"] = rootfs
        conf["annotations"] = dict(annotations or {})
        if ns_pid:
            conf.pop("hostname", None)  # the sandbox's UTS namespace, the sandbox's hostname
            for ns in conf["linux"]["namespaces"]:
                if ns["type"] in NS_FILES:
                    ns["path"] = "/proc/%d/ns/%s" % (ns_pid, NS_FILES[ns["type"]])
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(conf, f, indent=1)
        return d

    def sandbox_bundle(self, sid):
        """The sandbox's bundle: CRI-O's sandbox annotations, `sleep` as the pause."""
        return self.bundle(sid, PAUSE, self.rootfs, {CRIO_TYPE: "sandbox", CRIO_SANDBOX: sid})

    def member_bundle(self, mid, i, sid, spid):
        """Member i's bundle: CRI-O's member annotations, the sandbox's namespaces."""
        return self.bundle(mid, HTTPD if i == 0 else IDLE, self.member_rootfs[i],
                           {CRIO_TYPE: "container", CRIO_SANDBOX: sid}, spid)

    # -- the two runtimes' commands ------------------------------------------
    def argv(self, kind, *args):
        """One command line of the runtime ("cc") or of runc."""
        if kind == "cc":
            return [self.program, "--root", self.rt_root] + list(args)
        return [self.runc, "--root", self.runc_root] + list(args)

    def timed(self, kind, *args):
        """Seconds one command took; BenchError unless it succeeded."""
        out = os.path.join(self.tmp, "out-%s.txt" % kind)
        secs, rc = run_timed(self.argv(kind, *args), out, self.timeout)
        if rc != 0:
            name = "cc-oci-runtime" if kind == "cc" else "runc"
            raise BenchError("%s %s: exit status %d: %s" % (name, " ".join(args), rc, _tail(out)))
        return secs

    def up(self, kind, sid, mids):
        """Create and start a sandbox, then each member; the times and the pids."""
        ids = self.rt_ids if kind == "cc" else self.runc_ids
        pid_file = os.path.join(self.tmp, "%s.pid" % sid)
        ids.append(sid)
        res = {"member_create": [], "member_start": [], "member_pids": []}
        t0 = time.monotonic()
        res["sandbox_create"] = self.timed(kind, "create", "-b", self.sandbox_bundle(sid),
                                           "--pid-file", pid_file, sid)
        res["sandbox_start"] = self.timed(kind, "start", sid)
        with open(pid_file) as f:
            res["sandbox_pid"] = spid = int(f.read())
        for i, mid in enumerate(mids):
            ids.append(mid)
            mpid = os.path.join(self.tmp, "%s.pid" % mid)
            res["member_create"].append(self.timed(kind, "create", "-b",
                                                   self.member_bundle(mid, i, sid, spid),
                                                   "--pid-file", mpid, mid))
            res["member_start"].append(self.timed(kind, "start", mid))
            with open(mpid) as f:
                res["member_pids"].append(int(f.read()))
        res["pod"] = time.monotonic() - t0
        return res

    def check_localhost(self, kind, mids):
        """The last member fetches the first one's page over the pod's localhost."""
        out = os.path.join(self.tmp, "out-fetch.txt")
        _, rc = run_timed(self.argv(kind, "exec", mids[-1], "sh", "-c", FETCH), out, 120)
        text = _tail(out)
        if rc != 0 or "root:x:0:0" not in text:
            raise BenchError("%s: %s could not fetch %s's page over localhost (exit %d): %s"
                             % (kind, mids[-1], mids[0], rc, text))

    def down(self, kind, sid, mids):
        """delete --force the members, then the sandbox; seconds, then a check nothing is left."""
        t0 = time.monotonic()
        for cid in list(mids) + [sid]:
            self.timed(kind, "delete", "--force", cid)
        secs = time.monotonic() - t0
        self.check_clean(kind, [sid] + list(mids))
        return secs

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

    def pod_once(self, kind):
        """One pod up, checked and deleted; its figures."""
        sid = self._id("%s-pod" % kind) + "-sb"
        mids = ["%s-m%d" % (sid[:-3], i) for i in range(self.opts.members)]
        try:
            res = self.up(kind, sid, mids)
            self.check_localhost(kind, mids)
            res["delete"] = self.down(kind, sid, mids)
        finally:
            self.force_delete(kind, [sid] + mids)
        return res

    def force_delete(self, kind, ids):
        """delete --force whatever of ids is left, members (all but the first) first."""
        root = self.rt_root if kind == "cc" else self.runc_root
        for cid in list(ids[1:]) + ids[:1]:
            if os.path.exists(os.path.join(root, cid)):
                quiet(self.argv(kind, "delete", "--force", cid))

    def start_times(self, n):
        """n rounds of one pod under each runtime (after one unmeasured), round robin."""
        kinds = ["cc"] + (["runc"] if self.runc else [])
        log("warm-up round (not measured): %s" % ", ".join(kinds))
        for kind in kinds:
            self.pod_once(kind)
        samples = {k: [] for k in kinds}
        for i in range(n):
            for kind in kinds:
                samples[kind].append(self.pod_once(kind))
            log("round %d/%d: %s" % (i + 1, n, "  ".join(
                "%s pod %.3fs (sandbox %.3fs)" % (k, v[-1]["pod"], v[-1]["sandbox_create"]
                                                  + v[-1]["sandbox_start"])
                for k, v in samples.items())))
        return samples

    # -- memory ----------------------------------------------------------------
    def vm_pss(self, monitor):
        """PSS of a VM container: its monitor and the monitor's children (QEMU)."""
        kids = B.children(monitor)
        if not kids:
            raise BenchError("monitor %d has no children (no QEMU?)" % monitor)
        parts = [pss(monitor)] + [pss(k) for k in kids]
        return {"parts": parts, "total": add(parts)}

    def single_vm(self, settle):
        """PSS of one separate VM container running `sleep 1000` (no pod)."""
        cid = self._id("cc-one")
        self.rt_ids.append(cid)
        pid_file = os.path.join(self.tmp, "%s.pid" % cid)
        try:
            b = self.bundle(cid, IDLE, self.rootfs)
            self.timed("cc", "create", "-b", b, "--pid-file", pid_file, cid)
            self.timed("cc", "start", cid)
            time.sleep(settle)
            with open(pid_file) as f:
                return self.vm_pss(int(f.read()))
        finally:
            self.force_delete("cc", [cid])

    def python_floor(self, settle):
        """PSS of an idle `python3 -S -E` of the monitors' interpreter (CC_OCI_PYTHON): what
        any Python host process costs."""
        python = shutil.which(os.environ.get("CC_OCI_PYTHON") or "python3")
        p = subprocess.Popen([python, "-S", "-E", "-c", "import time; time.sleep(600)", self.tmp],
                             stdin=subprocess.DEVNULL)
        try:
            time.sleep(min(settle, 1.0))
            return dict(pss(p.pid), python=python)
        finally:
            p.kill()
            p.wait()

    def pod_memory(self, settle):
        """PSS of the pod's monitor + QEMU alone, then with its members, and of each member."""
        sid = self._id("cc-mem") + "-sb"
        mids = ["%s-m%d" % (sid[:-3], i) for i in range(self.opts.members)]
        pid_file = os.path.join(self.tmp, "%s.pid" % sid)
        self.rt_ids.append(sid)
        try:
            self.timed("cc", "create", "-b", self.sandbox_bundle(sid), "--pid-file", pid_file, sid)
            self.timed("cc", "start", sid)
            with open(pid_file) as f:
                spid = int(f.read())
            time.sleep(settle)
            alone = self.vm_pss(spid)
            pids, steps = [], []
            for i, mid in enumerate(mids):
                self.rt_ids.append(mid)
                mpid = os.path.join(self.tmp, "%s.pid" % mid)
                self.timed("cc", "create", "-b", self.member_bundle(mid, i, sid, spid),
                           "--pid-file", mpid, mid)
                self.timed("cc", "start", mid)
                with open(mpid) as f:
                    pids.append(int(f.read()))
                time.sleep(settle)
                steps.append(self.vm_pss(spid)["total"])
            members = [pss(p) for p in pids]
            full = self.vm_pss(spid)
            for m, mid in zip(members, mids):
                m["id"] = mid
            self.check_localhost("cc", mids)
            self.down("cc", sid, mids)
        finally:
            self.force_delete("cc", [sid] + mids)
        n = len(mids)
        growth = sub(full["total"], alone["total"])
        member_sum = add(members)
        return {"settle_s": settle, "sandbox_alone": alone, "sandbox_with_members": full,
                "members": members, "vm_growth": growth,
                "vm_growth_by_member": [sub(b, a) for a, b in zip([alone["total"]] + steps, steps)],
                "vm_growth_counted_kb": growth["Pss"] - growth["Shared_Code"],
                "member_process_mean": {f: round(member_sum[f] / n, 1) for f in PSS_FIELDS},
                "per_member_kb": round((member_sum["Pss"] + growth["Pss"]
                                        - growth["Shared_Code"]) / n, 1)}

    def cleanup(self):
        """delete --force what is left (members before sandboxes), kill what names the temp dir."""
        def order(ids):
            return [c for c in ids if not c.endswith("-sb")] + [c for c in ids if c.endswith("-sb")]
        self.rt_ids, self.runc_ids = order(self.rt_ids), order(self.runc_ids)
        return B.Bench.cleanup(self)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def figures(rounds):
    """Per-round figures of one runtime: pod, sandbox, member mean, its create/start, delete."""
    def mean(v):
        return sum(v) / len(v)
    per = {"pod": [r["pod"] for r in rounds],
           "sandbox": [r["sandbox_create"] + r["sandbox_start"] for r in rounds],
           "member": [mean([c + s for c, s in zip(r["member_create"], r["member_start"])])
                      for r in rounds],
           "member_create": [mean(r["member_create"]) for r in rounds],
           "member_start": [mean(r["member_start"]) for r in rounds],
           "delete": [r["delete"] for r in rounds]}
    return {k: B.summary(v) for k, v in per.items()}


ROWS = (("pod", "pod: sandbox create .. last member start"),
        ("sandbox", "sandbox alone: create + start"),
        ("member", "per member: create + start (mean)"),
        ("member_create", "  of which create"),
        ("member_start", "  of which start"),
        ("delete", "delete --force the pod (members first)"))


def goal_rows(res):
    """(figure, value, goal, met) of the run."""
    rows = []
    r = res["ratios"]
    for key, label in (("pod", "pod start / runc's"), ("member", "member create + start / runc's")):
        if r.get(key) is not None:
            rows.append((label, "%.1fx" % r[key], "-", None))
    m = res.get("memory")
    if m:
        v = m["per_member_kb"] / MIB
        rows.append(("host memory each added member costs", "%.1f MiB" % v,
                     "<= %d MiB" % GOAL_MIB, v <= GOAL_MIB))
    rows.append(("nothing left after every pod's delete", "yes" if res["clean"] else "no",
                 "yes", bool(res["clean"])))
    return rows


def print_pss(label, r, extra=""):
    """One line of PSS figures."""
    print("  %-44s %7.1f MiB  (anon %.1f, file %.1f; RSS %.1f)%s"
          % (label, r["Pss"] / MIB, r["Pss_Anon"] / MIB, r["Pss_File"] / MIB, r["Rss"] / MIB,
             extra))


def print_table(res):
    """The human-readable report."""
    env = res["env"]
    print("cc-oci-runtime pod benchmark: n=%d rounds (+1 warm-up), round robin with runc"
          % res["n"])
    print("host: %d CPUs, load average %s; QEMU accel=%s machine=%s memory=%s cpus=%s"
          % (env["host_cpus"], env["loadavg"], env["accel"], env["machine"], env["memory"],
             env["vm_cpus"]))
    print("pod: sandbox `%s` + %d members (member 1 `%s`, the others `%s`), rootfs of their own"
          % (" ".join(PAUSE), res["members"], " ".join(HTTPD), " ".join(IDLE)))
    print()
    t = res["timings"]
    print("%-42s %8s %8s %8s   %8s %7s" % ("wall time (s)", "median", "min", "max",
                                            "runc med", "ratio"))
    for key, label in ROWS:
        s = t["cc"][key]
        line = "%-42s %8.3f %8.3f %8.3f" % (label, s["median"], s["min"], s["max"])
        if "runc" in t:
            rm = t["runc"][key]["median"]
            line += "   %8.3f %6.1fx" % (rm, s["median"] / rm if rm else float("nan"))
        print(line)
    if "runc" not in t:
        print("(runc not installed: no runc column)")
    m = res.get("memory")
    if m:
        n = len(m["members"])
        print()
        print("host memory (PSS, %.0f s after the last start), pod of sandbox + %d members:"
              % (m["settle_s"], n))
        print_pss("sandbox alone: monitor + QEMU", m["sandbox_alone"]["total"])
        for p in m["sandbox_alone"]["parts"]:
            print_pss("  %s pid %d" % (p["comm"], p["pid"]), p)
        print_pss("with %d members: monitor + QEMU" % n, m["sandbox_with_members"]["total"])
        for p in m["sandbox_with_members"]["parts"]:
            print_pss("  %s pid %d" % (p["comm"], p["pid"]), p)
        g = m["vm_growth"]
        print_pss("growth of monitor + QEMU", g)
        print("  %-44s %7.1f MiB  (QEMU's, Python's binaries + libraries, shared host-wide)"
              % ("  less: PSS shift of shared program files", g["Shared_Code"] / MIB))
        print("  %-44s %7.1f MiB  (/%d = %.1f MiB)" % ("  = what the members made the VM use",
                                                      m["vm_growth_counted_kb"] / MIB, n,
                                                      m["vm_growth_counted_kb"] / MIB / n))
        for i, g in enumerate(m["vm_growth_by_member"]):
            print("  %-44s %7.1f MiB  (anon %.1f; PSS %.1f, of which shared program files %.1f)"
                  % ("    with member %d (read %.0f s after its start)" % (i + 1, m["settle_s"]),
                     (g["Pss"] - g["Shared_Code"]) / MIB, g["Pss_Anon"] / MIB, g["Pss"] / MIB,
                     g["Shared_Code"] / MIB))
        for p in m["members"]:
            print_pss("member %s: host process pid %d" % (p["id"], p["pid"]), p)
        print_pss("member host process, mean", m["member_process_mean"])
        print("  %-44s %7.1f MiB  (goal <= %d MiB)"
              % ("each added member: process + VM use/%d" % n, m["per_member_kb"] / MIB, GOAL_MIB))
        print("for scale:")
        print_pss("one separate VM container: monitor + QEMU", res["single_vm"]["total"])
        print_pss("idle %s -S -E" % res["python_floor"]["python"], res["python_floor"])
    print()
    print("summary (load average at the end: %s)" % res["loadavg_end"])
    B.print_goals(goal_rows(res))


def loadavg():
    """The host's 1, 5 and 15 minute load averages."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def measure(bench, opts):
    """Every figure of the run, as one dict."""
    bench.setup()
    log("pod start: %d rounds, a pod of 1 sandbox + %d members per runtime per round"
        % (opts.n, opts.members))
    samples = bench.start_times(opts.n)
    mem = single = floor = None
    if not opts.no_memory:
        log("memory: one separate VM container")
        single = bench.single_vm(opts.settle)
        floor = bench.python_floor(opts.settle)
        log("memory: the sandbox alone, then with %d members" % opts.members)
        mem = bench.pod_memory(opts.settle)
    t = {k: figures(v) for k, v in samples.items()}
    res = {"n": opts.n, "members": opts.members,
           "env": {"host_cpus": os.cpu_count(), "loadavg": loadavg(),
                   "accel": bench.vm["accel_used"], "machine": bench.vm["machine"],
                   "memory": str(bench.vm["memory"]), "vm_cpus": bench.vm["cpus"],
                   "runc": bench.runc},
           "timings": t,
           "ratios": {k: B.ratio(t["cc"][k]["median"], t["runc"][k]["median"])
                      if "runc" in t else None for k, _ in ROWS},
           "samples": {k: v for k, v in samples.items()},
           "memory": mem, "single_vm": single, "python_floor": floor,
           "clean": True,  # (check_clean raises otherwise)
           "loadavg_end": loadavg()}
    res["goals"] = [{"figure": f, "value": v, "goal": g, "met": m}
                    for f, v, g, m in goal_rows(res)]
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=5, help="measured rounds (default 5)")
    ap.add_argument("--members", type=int, default=3, help="members per pod (default 3)")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds between the last start and a memory reading (default 2)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory figures")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    opts = ap.parse_args(argv)
    if opts.n < 1 or opts.members < 2:
        ap.error("-n must be at least 1 and --members at least 2")
    if os.geteuid() != 0:
        ap.error("must run as root (runc and the runtime's VM set-up need it)")

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)
    os.environ.setdefault("CC_OCI_PYTHON", "/usr/bin/python3")  # not a pyenv shim: see README
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    tmp = tempfile.mkdtemp(prefix="cc-pods-")
    bench = PodBench(tmp, opts)
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
