#!/usr/bin/env python3
"""The VM pool of cc-oci-runtime: the same figures with the pool and without it, in one run.

Stdlib only, Python 3.9+, run as root. The runtime runs as bench.py runs it: the installed
program (a copy of cc_oci_runtime.py in the temporary directory, beside the checkout's
vm.json) under /usr/bin/python3 (CC_OCI_PYTHON), so that one guest image, one template and
one pool key serve every figure. "With the pool" is CC_OCI_POOL=<vm.pool, at least 1> in the
runtime's environment, "without" CC_OCI_POOL=0; the pool lives in a private CC_OCI_POOL_DIR
under the temporary directory (the host's pool is not touched). Every runtime invocation
also gets --global-log FILE: its "created ID (..., a VM from the pool)" lines count the pool's
hits. In one run it measures:

  run        wall time of `cc-oci-runtime --root TMP run -b BUNDLE ID` of /bin/true with the
             pool and without, and the bare QEMU boot of bench.py (the same vmlinux and
             QEMU machine, a busybox initramfs whose /init runs /bin/true and powers off):
             goal: run with the pool <= 0.10x of the bare boot;
  engines    (--engines N) wall time of `podman run --rm --network none bb true` and of
             `docker run --rm --network none bb true` (private engine state, as in
             bench/engines.py) with this runtime, pool on and off, against runc (goal <=
             2.5x). The runtime is registered through two small sh wrappers, both named
             cc-oci-runtime (podman matches runtime_supports_json by name), that set
             CC_OCI_POOL (and CC_OCI_POOL_DIR, CC_OCI_PYTHON) and exec the program: so one
             podman and one dockerd serve both, whatever environment the engine passes on
             (each wrapper costs one sh exec per runtime invocation);
  burst      (--burst N, default 10) N `sleep` containers created (not started) --parallel
             at a time (default 5, as bench.py's density), with the pool (it holds vm.pool
             ready VMs at the start) and without: the time until all are created, and how
             many came from the pool; then they are deleted (--force, not timed);
  exec       the first `exec ID true` into a freshly created and started `sleep` container
             (create and start not timed), with the pool and without;
  memory     PSS (/proc/PID/smaps_rollup) of the idle pool itself (each ready VM's keeper,
             from its keeper.json, and its QEMU, the keeper's child), read with one idle
             `sleep` container without the pool up (monitor + QEMU, found from state.json
             vm.qemu_pid); then a `sleep` container takes the ready VM and both containers
             are read again (the pooled one: its monitor + its QEMU; the keeper that still
             holds the VM is shown beside), each reading --settle seconds after the last start.

Timed kinds are taken round robin (one of each per round) after one unmeasured warm-up round
(-n rounds; the burst --burst-rounds). After each measurement that took (or tried to take) a
VM from the pool the bench waits until the pool holds a ready VM again (<pool dir>/<key>/
non-empty, --refill-timeout) before anything else runs, so that no refill competes with the
next measurement (the idle pooled VM does stay up while "without the pool" is measured); the
wait, and the refill's own time (from the taking create's log line to the new VM's arrival in
the pool directory), are reported. When no refill has begun --refill-grace seconds into that
wait (nothing in <pool dir>/warming/, the pool short), the bench starts one itself as create
does (refill_pool of the program copy: the same key) and counts it; no refill time is taken
then (a safeguard: the runtime's own refill should always begin). The first exec waits while a refill is starting a VM (<pool dir>/warming/ non-empty), then is timed. The summary lists each figure with its ratio and goal (--json:
the same as JSON). At the end the containers are deleted (--force), the keepers of the private
pool (their pids from keeper.json) and any refill are killed, and nothing may be left: no
process naming the temporary directory or working in it (QEMUs included), no state directory.

    bench/pool.py [-n 5] [--engines N] [--no-docker] [--burst 10] [--parallel 5]
                  [--burst-rounds 1] [--settle 2] [--refill-timeout 60] [--json] [--keep]
"""
import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.realpath(__file__))
sys.path.insert(0, HERE)
import bench as B  # noqa: E402  (bench/bench.py: processes, PSS, the program copy, bare boot)

rt = B.rt
BenchError, log, run_timed, quiet, _tail = B.BenchError, B.log, B.run_timed, B.quiet, B._tail
ENG = B._load_engines()  # bench/engines.py: its timed() and the engines' private set-ups

GOAL_RUN = B.GOALS["warm_start"]  # run /bin/true with the pool / bare QEMU boot
GOAL_ENGINE = ENG.GOAL  # engine run --rm true with this runtime / with runc
POOLED = "a VM from the pool"  # the runtime's "created" log line of a pooled create
MIB = 1024.0

WRAPPER = """#!/bin/sh
# cc-oci-runtime for bench/pool.py: the pool %(what)s, hits counted in the global log.
CC_OCI_POOL=%(size)s CC_OCI_POOL_DIR=%(dir)s CC_OCI_PYTHON=%(python)s
export CC_OCI_POOL CC_OCI_POOL_DIR CC_OCI_PYTHON
exec %(program)s --global-log %(glog)s "$@"
"""


KICK = """
import importlib.machinery, importlib.util, sys
prog, bundle = sys.argv[1], sys.argv[2]
sys.argv = [prog]  # (so that the refill execs a fresh interpreter, as the runtime's does)
loader = importlib.machinery.SourceFileLoader("cc_oci_runtime", prog)
rt = importlib.util.module_from_spec(importlib.util.spec_from_loader("cc_oci_runtime", loader))
loader.exec_module(rt)
conf = rt.load_spec(bundle)
vm = rt.size_vm(rt.resolve_vm(conf), conf["resources"])
rt.refill_pool(vm, vm.get("image") or rt.guest_image(vm))
"""


class PoolBench(B.Bench):
    """bench.py's Bench with the pool switched on and off (CC_OCI_POOL in os.environ, which
    every runtime invocation inherits) and its hits read from the global log."""

    def __init__(self, tmp, opts):
        super().__init__(tmp, opts)
        self.pool_dir = os.path.join(tmp, "pool")
        self.glog = os.path.join(tmp, "global.log")
        os.environ["CC_OCI_POOL_DIR"] = self.pool_dir
        self.pool_size = 1
        self.keys = set()
        self.kicks = 0  # refills the bench started itself (the runtime's did not come)
        self.pool_stats = {}  # {what: {pooled kind: {"hits", "tries", "wait_s", "refill_s"}}}

    def setup(self):
        super().setup()
        self.pool_size = max(1, int(self.vm.get("pool") or 0))
        if not self.vm.get("accel_used") or not self.vm.get("template", True):
            raise BenchError("no pool for this VM (vm.template is off or no accelerator)")

    # -- the pool switch and its hits ---------------------------------------
    def pool(self, on, size=None):
        """Switch the pool on (CC_OCI_POOL=size, default vm.pool) or off for what follows."""
        os.environ["CC_OCI_POOL"] = str(size or self.pool_size) if on else "0"

    def call(self, args, timeout=None, what=None):
        """Bench.call with the global log (create's "created" line says whether it was pooled)."""
        return super().call(["--global-log", self.glog] + list(args), timeout, what)

    def log_offset(self):
        try:
            return os.path.getsize(self.glog)
        except OSError:
            return 0

    def creates_since(self, offset):
        """[(epoch, container id, pooled)] of the creates logged after offset."""
        try:
            with open(self.glog, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            parts = line.split(" ", 4)
            if len(parts) == 5 and parts[2] == "info" and parts[4].startswith("created "):
                try:
                    when = ENG._epoch(parts[0])
                except ValueError:
                    when = None
                out.append((when, parts[4].split()[1], POOLED in parts[4]))
        return out

    # -- the pool's directory -------------------------------------------------
    def pool_keys(self):
        """The pool keys a refill has started (each refill takes <pool dir>/<key>.lock)."""
        try:
            self.keys |= {n[:-5] for n in os.listdir(self.pool_dir) if n.endswith(".lock")}
        except FileNotFoundError:
            pass
        return sorted(self.keys)

    def ready_vms(self, key):
        """The ready VMs' directories of one pool key."""
        d = os.path.join(self.pool_dir, key)
        try:
            return [os.path.join(d, n) for n in sorted(os.listdir(d))]
        except FileNotFoundError:
            return []

    def keepers(self):
        """{keeper pid: (its keeper.json, VM directory)} of every VM of the private pool
        (ready, claimed and warming) whose keeper still runs."""
        found = {}
        try:
            groups = os.listdir(self.pool_dir)
        except FileNotFoundError:
            return found
        for group in groups:
            top = os.path.join(self.pool_dir, group)
            if not os.path.isdir(top):
                continue
            for name in os.listdir(top):
                k = rt.read_json_quietly(os.path.join(top, name, "keeper.json"))
                if k and rt.process_alive(k.get("pid"), k.get("start")):
                    found[k["pid"]] = (k, os.path.join(top, name))
        return found

    def warming(self):
        """The VMs a refill is starting now (<pool dir>/warming/)."""
        try:
            return os.listdir(os.path.join(self.pool_dir, "warming"))
        except FileNotFoundError:
            return []

    def kick_refill(self, size):
        """Start a refill as the runtime's create does (refill_pool of the program copy, so
        the same pool key), for when the runtime's own refill did not come."""
        out = os.path.join(self.tmp, "out-kick.txt")
        _, rc = run_timed(["/usr/bin/python3", "-c", KICK, self.program, self.sleep_bundle],
                          out, 60, env=dict(os.environ, CC_OCI_POOL=str(size)))
        if rc != 0:
            raise BenchError("starting a refill failed: %s" % _tail(out))

    def wait_quiet(self):
        """Wait while a refill is starting a VM (so that it does not compete with what is
        measured next)."""
        deadline = time.monotonic() + self.opts.refill_timeout
        while self.warming() and time.monotonic() < deadline:
            time.sleep(0.02)

    def wait_refill(self, count=1, since=None, sink=None):
        """Wait until every pool key holds count ready VMs; (seconds waited, refill seconds:
        from `since` (epoch, the taking create's log line) to the newest VM's arrival). When
        no refill has begun --refill-grace seconds into the wait (nothing warming, the pool
        short), start one (kick_refill; counted in sink["kicked"]; no refill time then)."""
        t0 = time.monotonic()
        deadline = t0 + self.opts.refill_timeout
        kicked, last = False, t0
        while True:
            keys = self.pool_keys()
            if keys and all(len(self.ready_vms(k)) >= count for k in keys):
                break
            if time.monotonic() - last > self.opts.refill_grace and not self.warming():
                held = sorted(p for p, (_k, d) in self.keepers().items()
                              if os.path.basename(os.path.dirname(d)) == "used")
                log("no refill began %.0f s into the wait: starting one (keepers of claimed "
                    "VMs alive: %s)" % (time.monotonic() - t0, held or "none"))
                self.kick_refill(max(count, self.pool_size))  # (again each --refill-grace while none begins)
                last = time.monotonic()
                kicked = True
                self.kicks += 1
                if sink is not None:
                    sink["kicked"] = sink.get("kicked", 0) + 1
            if time.monotonic() > deadline:
                raise BenchError("the pool holds no ready VM %.0f s after it was used (keys %s; "
                                 "pool.log: %s)" % (self.opts.refill_timeout, keys or "none",
                                                    _tail(os.path.join(self.pool_dir, "pool.log"))))
            time.sleep(0.02)
        waited = time.monotonic() - t0
        refill = None
        if since and not kicked:
            arrived = [os.stat(v).st_ctime for k in keys for v in self.ready_vms(k)]
            if arrived and max(arrived) > since:
                refill = max(arrived) - since
        return waited, refill

    def after_pooled(self, offset, sink, count=1):
        """After a measurement with the pool: its hits (from the log), then the refill's wait
        and time, recorded in sink ({"hits", "tries", "wait_s", "refill_s"})."""
        creates = self.creates_since(offset)
        hits = [c for c in creates if c[2]]
        sink["tries"] += len(creates)
        sink["hits"] += len(hits)
        waited, refill = self.wait_refill(count, since=max((c[0] or 0) for c in hits)
                                          if hits else None, sink=sink)
        sink["wait_s"].append(round(waited, 3))
        if refill is not None:
            sink["refill_s"].append(round(refill, 3))
        return len(hits)

    # -- 1. run /bin/true -----------------------------------------------------
    def run_once(self, pooled):
        """One timed `run /bin/true`, with the pool or without."""
        self.pool(pooled)
        cid = self._id("run-p" if pooled else "run-n")
        self.rt_ids.append(cid)
        out = os.path.join(self.tmp, "out-%s.txt" % cid)
        try:
            secs, rc = run_timed([self.program, "--root", self.rt_root, "--global-log", self.glog,
                                  "run", "-b", self.bundle, cid], out, self.timeout)
        finally:
            quiet([self.program, "--root", self.rt_root, "delete", "--force", cid])
        if rc != 0:
            raise BenchError("run %s: exit status %d: %s" % (cid, rc, _tail(out)))
        return secs

    def round_robin(self, n, kinds, what):
        """{kind: [seconds]} of n rounds after one warm-up round; kinds: [(name, fn, pooled)];
        after each pooled kind, its hits and the refill (in self.pool_stats[what][name])."""
        stats = self.pool_stats.setdefault(what, {})

        def new_sink():
            return {"hits": 0, "tries": 0, "wait_s": [], "refill_s": [], "kicked": 0}
        samples = {name: [] for name, _fn, _p in kinds}
        for i in range(n + 1):
            for name, fn, pooled in kinds:
                if pooled and self.pool_keys():  # (none before the first pooled create)
                    self.wait_refill()
                offset = self.log_offset()
                secs = fn()
                if pooled:  # (the warm-up's hit and refill are not counted)
                    sink = stats.setdefault(name, new_sink()) if i else new_sink()
                    self.after_pooled(offset, sink)
                if i:
                    samples[name].append(secs)
            log("%s %s: %s" % (what, "warm-up" if not i else "round %d/%d" % (i, n), "  ".join(
                "%s %.3fs" % (k, v[-1]) for k, v in samples.items() if v and i)))
        return samples

    def runs(self, n):
        kinds = [("run, pool", lambda: self.run_once(True), True),
                 ("run, no pool", lambda: self.run_once(False), False),
                 ("bare QEMU boot", self.bare_once, False)]
        return self.round_robin(n, kinds, "run")

    # -- 2. engines -------------------------------------------------------------
    def wrapper(self, d, pooled):
        """An sh wrapper named cc-oci-runtime in d that runs the program with the pool on/off."""
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "cc-oci-runtime")
        with open(path, "w") as f:
            f.write(WRAPPER % {"what": "on" if pooled else "off",
                               "size": self.pool_size if pooled else 0,
                               "dir": shlex.quote(self.pool_dir),
                               "python": shlex.quote(os.environ["CC_OCI_PYTHON"]),
                               "program": shlex.quote(self.program),
                               "glog": shlex.quote(self.glog)})
        os.chmod(path, 0o755)
        return path

    def engines(self, n, docker=True):
        """podman and docker run --rm true: this runtime with the pool, without, and runc."""
        E = ENG.engines  # tests/functional/engines.py
        runc = shutil.which("runc") or "/usr/sbin/runc"
        base = tempfile.mkdtemp(prefix="eng-", dir=self.tmp)
        on, off = self.wrapper(os.path.join(base, "on"), True), self.wrapper(os.path.join(base, "off"), False)
        rootfs = os.path.join(base, "rootfs")
        shutil.copytree(self.rootfs, rootfs, symlinks=True)
        out = {"versions": ENG.versions()}

        def timed(run):
            return lambda: ENG.timed(run)
        with E.Podman(os.path.join(base, "podman"), on) as pm:
            pm.import_image(rootfs, "bb")
            cmd = ("run", "--rm", "--network", "none", "bb", "true")
            kinds = [("podman + cc, pool", timed(lambda: pm.run("--runtime", on, *cmd)), True),
                     ("podman + cc, no pool", timed(lambda: pm.run("--runtime", off, *cmd)), False),
                     ("podman + runc", timed(lambda: pm.run("--runtime", runc, *cmd)), False)]
            out["podman"] = self.round_robin(n, kinds, "podman")
        if docker:
            with E.Docker(os.path.join(base, "docker"), on, extra_runtimes={"cc-nopool": off}) as dk:
                dk.import_image(rootfs, "bb")
                cmd = ("--network", "none", "bb", "true")
                kinds = [("docker + cc, pool",
                          timed(lambda: dk.run("run", "--rm", "--runtime", "cc-oci-runtime", *cmd)), True),
                         ("docker + cc, no pool",
                          timed(lambda: dk.run("run", "--rm", "--runtime", "cc-nopool", *cmd)), False),
                         ("docker + runc",
                          timed(lambda: dk.run("run", "--rm", "--runtime", "runc", *cmd)), False)]
                out["docker"] = self.round_robin(n, kinds, "docker")
        return out

    # -- 3. a burst of creates ----------------------------------------------------
    def burst(self, n, parallel, pooled):
        """n `sleep` containers created `parallel` at a time; (seconds, pooled creates)."""
        from concurrent.futures import ThreadPoolExecutor
        self.pool(pooled)
        if pooled:
            self.wait_refill(self.pool_size)
        ids = [self._id("burst-p-" if pooled else "burst-n-") for _ in range(n)]
        self.rt_ids.extend(ids)
        offset = self.log_offset()
        try:
            with ThreadPoolExecutor(max_workers=parallel) as ex:
                t0 = time.monotonic()
                list(ex.map(lambda c: self.create(c, self.sleep_bundle), ids))
                secs = time.monotonic() - t0
                creates = self.creates_since(offset)
                hits = sum(1 for _w, cid, p in creates if p and cid in ids)
                list(ex.map(lambda c: self.call(["delete", "--force", c], timeout=300,
                                                what="delete --force " + c), ids))
        finally:
            for cid in ids:
                if os.path.exists(os.path.join(self.rt_root, cid)):
                    quiet([self.program, "--root", self.rt_root, "delete", "--force", cid])
        if pooled:
            self.wait_refill(self.pool_size)
        return secs, hits

    def bursts(self, n, parallel, rounds):
        res = {"n": n, "parallel": parallel, "pool_size": self.pool_size, "rounds": rounds,
               "pool": {"s": [], "hits": []}, "no pool": {"s": [], "hits": []}}
        for i in range(rounds):
            for kind in ("pool", "no pool"):
                secs, hits = self.burst(n, parallel, kind == "pool")
                res[kind]["s"].append(round(secs, 3))
                res[kind]["hits"].append(hits)
                log("burst %d/%d, %s: %d creates in %.1fs, %d from the pool"
                    % (i + 1, rounds, kind, n, secs, hits))
        return res

    # -- 4. the first exec ------------------------------------------------------
    def exec_once(self, pooled):
        """Create + start a `sleep` container (not timed), then the first `exec true` (timed)."""
        self.pool(pooled)
        cid = self._id("exec-p" if pooled else "exec-n")
        self.rt_ids.append(cid)
        out = os.path.join(self.tmp, "out-%s.txt" % cid)
        try:
            offset = self.log_offset()
            self.create(cid, self.sleep_bundle, start=True)
            if pooled:  # the refill's own work would be timed with the exec
                self.wait_quiet()
                if not any(p for _w, c, p in self.creates_since(offset) if c == cid):
                    log("exec: %s did not get a VM from the pool" % cid)
            secs, rc = run_timed([self.program, "--root", self.rt_root, "exec", cid, "true"],
                                 out, self.timeout)
            if rc != 0:
                raise BenchError("exec %s true: exit status %d: %s" % (cid, rc, _tail(out)))
        finally:
            quiet([self.program, "--root", self.rt_root, "delete", "--force", cid])
        return secs

    def execs(self, n):
        kinds = [("first exec, pool", lambda: self.exec_once(True), True),
                 ("first exec, no pool", lambda: self.exec_once(False), False)]
        return self.round_robin(n, kinds, "exec")

    # -- 5. memory -----------------------------------------------------------------
    def qemu_of(self, cid):
        """QEMU's pid of a container, from its state.json (vm.qemu_pid)."""
        st = rt.read_json_quietly(os.path.join(self.rt_root, cid, "state.json")) or {}
        pid = (st.get("vm") or {}).get("qemu_pid")
        if not pid or not rt.process_alive(pid, (st.get("vm") or {}).get("qemu_start")):
            raise BenchError("%s: state.json names no live QEMU (%r)" % (cid, st.get("vm")))
        return pid, st["pid"], st["vm"].get("pool_dir")

    @staticmethod
    def proc_pss(pid):
        return {"pid": pid, "comm": B.comm(pid), "pss_kb": B.smaps_kb(pid),
                "rss_kb": B.smaps_kb(pid, "Rss")}

    def memory(self, settle):
        """PSS of the idle pool's VMs (keeper + QEMU each) with an idle container without the
        pool up, then of an idle container with a VM from the pool beside it (a pooled VM
        cannot stay ready while a container holds another: see the report's notes)."""
        ids = {True: self._id("mem-p"), False: self._id("mem-n")}
        self.rt_ids.extend(ids.values())
        res = {"settle_s": settle, "vm_memory": str(self.vm["memory"])}

        def container(pooled):
            qemu, monitor, pool_vm = self.qemu_of(ids[pooled])
            parts = {"monitor": self.proc_pss(monitor), "qemu": self.proc_pss(qemu)}
            c = {"parts": parts, "total_pss_kb": sum(p["pss_kb"] for p in parts.values())}
            if pool_vm:  # the keeper that holds the claimed VM (QEMU's parent)
                k = rt.read_json_quietly(os.path.join(pool_vm, "keeper.json")) or {}
                if rt.process_alive(k.get("pid"), k.get("start")):
                    c["keeper"] = self.proc_pss(k["pid"])
            return c
        try:
            self.pool(True)
            self.wait_refill(self.pool_size)
            self.pool(False)
            self.create(ids[False], self.sleep_bundle, start=True)
            time.sleep(settle)
            vms = []
            for key in self.pool_keys():
                for vmdir in self.ready_vms(key):
                    k = rt.read_json_quietly(os.path.join(vmdir, "keeper.json")) or {}
                    if not rt.process_alive(k.get("pid"), k.get("start")):
                        continue
                    kids = B.children(k["pid"])
                    if not kids:
                        raise BenchError("keeper %d has no child (no QEMU?)" % k["pid"])
                    parts = {"keeper": self.proc_pss(k["pid"])}
                    parts.update(("qemu" if i == 0 else "child %d" % i, self.proc_pss(p))
                                 for i, p in enumerate(kids))
                    vms.append({"key": key, "vm": os.path.basename(vmdir), "parts": parts,
                                "total_pss_kb": sum(p["pss_kb"] for p in parts.values())})
            if not vms:
                raise BenchError("memory: the pool holds no ready VM")
            res["pool vms"] = vms
            res["container, read with the pool vms"] = container(False)
            self.pool(True)
            offset = self.log_offset()
            self.create(ids[True], self.sleep_bundle, start=True)
            if not any(p for _w, c, p in self.creates_since(offset) if c == ids[True]):
                raise BenchError("memory: %s did not get a VM from the pool" % ids[True])
            self.wait_quiet()
            time.sleep(settle)
            res["pool container"], res["container"] = container(True), container(False)
        finally:
            for cid in ids.values():
                quiet([self.program, "--root", self.rt_root, "delete", "--force", cid])
        return res

    # -- clean-up ---------------------------------------------------------------
    def cleanup(self):
        """Delete the containers, kill the private pool's refills and keepers (pids from
        keeper.json), then Bench.cleanup (what still names the temporary directory); {pid:
        cmdline} of what had to be killed beyond the keepers."""
        for cid in self.rt_ids:
            if os.path.exists(os.path.join(self.rt_root, cid)):
                quiet([self.program, "--root", self.rt_root, "delete", "--force", cid])
        self.killed_keepers = []
        for _ in range(3):  # a refill may start one more keeper meanwhile
            keepers = self.keepers()
            refills = {p for p in B.procs_naming(self.pool_dir) if p not in keepers
                       and B.comm(p).startswith("python")}
            qemus = {c for k in keepers for c in B.children(k)}  # (PR_SET_PDEATHSIG ends them)
            for pid in sorted(refills) + sorted(keepers):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.killed_keepers += sorted(keepers)
            deadline = time.monotonic() + 5
            deadline += 5
            while time.monotonic() < deadline and any(rt.process_alive(p)
                                                      for p in set(keepers) | qemus):
                time.sleep(0.05)
            if not keepers and not refills:
                break
        left = super().cleanup()
        deadline = time.monotonic() + 5
        while True:  # QEMUs of killed keepers go by PR_SET_PDEATHSIG
            rest = {"processes naming or in the temporary directory": sorted(
                        set(B.procs_naming(self.tmp)) | set(B.procs_in(self.tmp))),
                    "state dirs": sorted(os.listdir(self.rt_root)) if os.path.isdir(self.rt_root) else []}
            if not any(rest.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.left = {k: v for k, v in rest.items() if v}
        return left


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def med(v):
    return statistics.median(v) if v else None


def goal_rows(res):
    """(figure, value, goal, met) of every figure."""
    rows = []
    t = res["run"]["times"]
    bare = t["bare QEMU boot"]["median"]
    for kind in ("run, pool", "run, no pool"):
        r = t[kind]["median"] / bare
        rows.append(("%s /bin/true / bare QEMU boot" % kind, "%.3fx" % r, "<= %.2fx" % GOAL_RUN,
                     r <= GOAL_RUN if kind == "run, pool" else None))
    for eng in ("podman", "docker"):
        e = res.get("engines", {}).get(eng)
        if not e:
            continue
        runc = e["times"]["%s + runc" % eng]["median"]
        for kind in ("pool", "no pool"):
            r = e["times"]["%s + cc, %s" % (eng, kind)]["median"] / runc
            rows.append(("%s run --rm true, %s / runc" % (eng, kind), "%.2fx" % r,
                         "<= %.1fx" % GOAL_ENGINE, r <= GOAL_ENGINE))
    b = res.get("burst")
    if b:
        p, n = med(b["pool"]["s"]), med(b["no pool"]["s"])
        rows.append(("burst of %d creates, pool / no pool" % b["n"], "%.2fx" % (p / n), "-", None))
    x = res.get("exec")
    if x:
        p, n = x["times"]["first exec, pool"]["median"], x["times"]["first exec, no pool"]["median"]
        rows.append(("first exec, pool / no pool", "%.2fx" % (p / n), "-", None))
    m = res.get("memory")
    if m:
        rows.append(("idle pooled VM (keeper + QEMU), mean PSS", "%.1f MiB" % (
            statistics.mean(v["total_pss_kb"] for v in m["pool vms"]) / MIB), "-", None))
        p, n = m["pool container"]["total_pss_kb"], m["container"]["total_pss_kb"]
        rows.append(("idle container, pool / no pool (monitor + QEMU)", "%.2fx" % (p / n), "-", None))
    rows.append(("nothing left (processes, state dirs)", "yes" if not res.get("left") else "NO",
                 "yes", not res.get("left")))
    return rows


def print_times(title, times, stats):
    print("%-34s %9s %9s %9s  %s" % (title, "median", "min", "max", "pool hits, refill"))
    for kind, s in times.items():
        st = stats.get(kind)
        extra = ""
        if st:
            extra = "%d/%d; waited %.2f s, refill %s%s" % (
                st["hits"], st["tries"], med(st["wait_s"]) or 0,
                "%.2f s" % med(st["refill_s"]) if st["refill_s"] else "n/a",
                "; %d refill(s) started by the bench" % st["kicked"] if st.get("kicked") else "")
        print("  %-32s %9.3f %9.3f %9.3f  %s" % (kind, s["median"], s["min"], s["max"], extra))


def print_table(res):
    env = res["env"]
    print("cc-oci-runtime VM pool benchmark: n=%d per kind (+1 warm-up), round robin; pool size %d"
          % (res["n"], env["pool_size"]))
    print("host: %d CPUs, load average %s; QEMU accel=%s memory=%s cpus=%s; pool keys %s"
          % (env["host_cpus"], env["loadavg"], env["accel"], env["memory"], env["vm_cpus"],
             ", ".join(env["pool_keys"]) or "none"))
    print("(pool hits: creates that got a VM from the pool / creates; waited: median wait after"
          " the measurement\n until the pool held a ready VM again; refill: from the taking"
          " create to the new VM's arrival)")
    print()
    print_times("run /bin/true, wall time (s)", res["run"]["times"], res["run"]["pool"])
    for eng in ("podman", "docker"):
        e = res.get("engines", {}).get(eng)
        if e:
            print()
            print_times("%s run --rm bb true (s)" % eng, e["times"], e["pool"])
    b = res.get("burst")
    if b:
        print()
        print("burst: %d creates, %d at a time (pool size %d), %d round(s)"
              % (b["n"], b["parallel"], b["pool_size"], b["rounds"]))
        for kind in ("pool", "no pool"):
            print("  %-32s %9.2f s  from the pool: %s" % (kind, med(b[kind]["s"]),
                                                         "/".join(map(str, b[kind]["hits"]))))
    x = res.get("exec")
    if x:
        print()
        print_times("first exec true (s)", x["times"], x["pool"])
    m = res.get("memory")
    if m:
        print()
        print("memory, host PSS (%.0f s after the last start; guest RAM %s):"
              % (m["settle_s"], m["vm_memory"]))
        c = m["container, read with the pool vms"]
        print("  (read with an idle container, no pool, up: %.1f MiB)" % (c["total_pss_kb"] / MIB))
        for v in m["pool vms"]:
            print("  ready pooled VM %-16s %s = %.1f MiB" % (v["vm"], " + ".join(
                "%s %d %.1f" % (k, p["pid"], p["pss_kb"] / MIB) for k, p in v["parts"].items()),
                v["total_pss_kb"] / MIB))
        for kind in ("pool container", "container"):
            c = m[kind]
            extra = ""
            if c.get("keeper"):
                extra = "  (+ its keeper %d %.1f MiB)" % (c["keeper"]["pid"],
                                                        c["keeper"]["pss_kb"] / MIB)
            print("  idle %-27s %s = %.1f MiB%s" % (
                "container from the pool" if kind == "pool container" else "container, no pool",
                " + ".join("%s %d %.1f" % (k, p["pid"], p["pss_kb"] / MIB)
                           for k, p in c["parts"].items()), c["total_pss_kb"] / MIB, extra))
    if res.get("left"):
        print()
        print("LEFT after clean-up: %s" % res["left"])
    print()
    print("summary (load average at the end: %s; keepers killed at the end: %d; refills the"
          " bench had to start: %d)" % (res.get("loadavg_end", "?"),
                                        len(res.get("keepers_killed", [])),
                                        res.get("refills_started_by_bench", 0)))
    B.print_goals(goal_rows(res))


def summarize(samples, stats):
    return {"times": {k: B.summary(v) for k, v in samples.items()}, "pool": stats}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=5, help="measured rounds of each kind (default 5)")
    ap.add_argument("--engines", type=int, default=0, metavar="N",
                    help="also podman/docker run --rm true, N rounds (default 0: skipped)")
    ap.add_argument("--no-docker", action="store_true", help="with --engines: podman only")
    ap.add_argument("--burst", type=int, default=10, metavar="N",
                    help="creates in the burst (default 10; 0: skipped)")
    ap.add_argument("--parallel", type=int, default=5, help="burst creates at once (default 5)")
    ap.add_argument("--burst-rounds", type=int, default=1, help="bursts of each kind (default 1)")
    ap.add_argument("--no-exec", action="store_true", help="skip the first exec")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory figures")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds between the last start and the memory reading (default 2)")
    ap.add_argument("--refill-timeout", type=float, default=60,
                    help="seconds to wait for the pool to hold a ready VM again (default 60)")
    ap.add_argument("--refill-grace", type=float, default=3,
                    help="seconds after which, with no refill begun and the pool short, the bench "
                         "starts one itself (default 3)")
    ap.add_argument("--boot-timeout", type=float, default=0,
                    help="timeout of each run/boot in seconds (default: vm boot_timeout + 30)")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    opts = ap.parse_args(argv)
    opts.memory_limit = ""  # (Bench.setup's option)
    if opts.n < 1:
        ap.error("-n must be at least 1")
    if os.geteuid() != 0:
        ap.error("must run as root (runc and the runtime's VM set-up need it)")

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)
    os.environ.setdefault("CC_OCI_PYTHON", "/usr/bin/python3")  # not a pyenv shim: see README
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    tmp = tempfile.mkdtemp(prefix="cc-bench-pool-")
    bench = PoolBench(tmp, opts)
    code, res, leftovers = 0, None, {}
    try:
        log("temporary directory %s, pool directory %s" % (tmp, bench.pool_dir))
        bench.setup()
        log("run /bin/true, pool and no pool, and the bare QEMU boot: %d rounds" % opts.n)
        res = {"n": opts.n, "run": summarize(bench.runs(opts.n), bench.pool_stats["run"])}
        if opts.engines:
            log("engines: podman%s, %d rounds" % ("" if opts.no_docker else " and docker",
                                                   opts.engines))
            try:
                eng = bench.engines(opts.engines, docker=not opts.no_docker)
            except (SystemExit, RuntimeError, OSError, subprocess.SubprocessError) as e:
                raise BenchError("engines: %s" % e)
            res["engines"] = {"versions": eng.pop("versions")}
            for name, samples in eng.items():
                res["engines"][name] = summarize(samples, bench.pool_stats[name])
        if opts.burst:
            log("burst: %d creates, %d at a time" % (opts.burst, opts.parallel))
            res["burst"] = bench.bursts(opts.burst, opts.parallel, opts.burst_rounds)
        if not opts.no_exec:
            log("first exec: %d rounds" % opts.n)
            res["exec"] = summarize(bench.execs(opts.n), bench.pool_stats["exec"])
        if not opts.no_memory:
            log("memory: the idle pool, a container from it and one without")
            res["memory"] = bench.memory(opts.settle)
        res["env"] = {"host_cpus": os.cpu_count(),
                      "loadavg": " ".join(open("/proc/loadavg").read().split()[:3]),
                      "accel": bench.vm["accel_used"], "memory": str(bench.vm["memory"]),
                      "vm_cpus": bench.vm["cpus"], "pool_size": bench.pool_size,
                      "pool_keys": bench.pool_keys(), "python": os.environ["CC_OCI_PYTHON"],
                      "bare_qemu_argv": bench.bare_argv}
        res["refills_started_by_bench"] = bench.kicks
        res["loadavg_end"] = " ".join(open("/proc/loadavg").read().split()[:3])
    except BenchError as e:
        log("FAILED: %s" % e)
        res, code = None, 1
    except KeyboardInterrupt:
        log("interrupted")
        res, code = None, 130
    finally:
        leftovers = B.clean_up(bench, tmp, opts.keep)
    if res is not None:
        res["keepers_killed"] = getattr(bench, "killed_keepers", [])
        res["left"] = getattr(bench, "left", {})
        res["goals"] = [{"figure": f, "value": v, "goal": g, "met": m}
                        for f, v, g, m in goal_rows(res)]
        if res["left"]:
            code = code or 1
    elif getattr(bench, "left", None):
        log("LEFT after clean-up: %s" % bench.left)
    B.report(res, leftovers, opts.json, print_table)
    return code


if __name__ == "__main__":
    sys.exit(main())
