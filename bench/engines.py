#!/usr/bin/env python3
"""Wall time of `podman run --rm IMG true` and `docker run --rm IMG true` with this runtime
next to runc, measured in the same go (round-robin), with private engine state; then a
timeline of one more run of each through a tracing wrapper of the runtime.

The wrapper (a small sh script registered as one more runtime, never used for the timed
runs) appends one line per runtime invocation (start, end, exit status, argv) and runs
the runtime with --debug --global-log FILE, so the monitor's "timeline:" debug lines
(VM restored/booted, container created in the guest) land there too, with the calling
process's pid. The timeline shows each invocation's start offset from the engine command's
start and its duration, the monitor's timeline lines, and the engine's own time (the
wall time outside every runtime invocation).

The runtime runs as engines run it: as a program (its #!/bin/sh header runs
${CC_OCI_PYTHON:-python3}); CC_OCI_PYTHON is set to /usr/bin/python3 unless set already,
as the CLI figures of bench.py do (python3 on PATH may be a slow pyenv shim).

    python3 bench/engines.py [-n N] [--no-docker] [--no-trace] [--json]
"""
import argparse
import calendar
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "functional"))
import engines  # noqa: E402

RUNTIME = os.path.abspath(os.path.join(HERE, "..", "cc_oci_runtime.py"))
GOAL = 2.5  # issue 8: engine run --rm with this runtime / with runc
# runc's global options that take a value (the runtime's GLOBAL_VALUE_OPTIONS)
VALUE_OPTIONS = {"--root", "--log", "--log-format", "--global-log", "--criu", "--rootless"}

TRACER = """#!/bin/sh
# cc-oci-runtime, traced for bench/engines.py: --debug and a global log, and one line per
# invocation in the calls file: start end exit-status pid argv (start/end: epoch seconds).
s=$(date +%%s.%%N)
%(runtime)s --debug --global-log %(glog)s "$@"
rc=$?
e=$(date +%%s.%%N)
echo "$s $e $rc $$ $*" >> %(calls)s
exit $rc
"""


def make_tracer(d):
    """A tracing wrapper of the runtime in d (named cc-oci-runtime, as podman matches its
    runtime_supports_json by name); (path, calls file, global log)."""
    os.makedirs(d, exist_ok=True)
    path, calls, glog = (os.path.join(d, n) for n in ("cc-oci-runtime", "calls.txt", "global.log"))
    with open(path, "w") as f:
        f.write(TRACER % {"runtime": shlex.quote(RUNTIME), "glog": shlex.quote(glog),
                          "calls": shlex.quote(calls)})
    os.chmod(path, 0o755)
    return path, calls, glog


def timed(run):
    """Seconds one call of run() takes; it must succeed."""
    t = time.monotonic()
    r = run()
    elapsed = time.monotonic() - t
    if r.returncode != 0:
        raise SystemExit("failed: %s %s" % (r.args, r.stderr))
    return elapsed


def measure(kinds, n):
    """{kind: [seconds]} after one warm-up each, the kinds taken in turn."""
    times = {k: [] for k in kinds}
    for i in range(n + 1):
        for kind, run in kinds.items():
            t = timed(run)
            if i:
                times[kind].append(t)
    return times


def _epoch(rfc3339):
    """Seconds since the epoch of an RFC 3339 UTC time with a fraction (the global log's)."""
    head, _, frac = rfc3339.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(head, "%Y-%m-%dT%H:%M:%S")) + float("0." + (frac or "0"))


def _command(argv):
    """(sub-command, its last argument) of a runtime argv (after the global options)."""
    args = argv.split()
    while args and args[0].startswith("-"):
        name, eq, _ = args.pop(0).partition("=")
        if not eq and "--" + name.lstrip("-") in VALUE_OPTIONS and args:
            args.pop(0)
    if not args:
        return "?", ""
    return args[0], (args[-1] if len(args) > 1 else "")


def trace(run, calls, glog):
    """Run run() once (it must succeed); its timeline from the tracer's files."""
    for p in (calls, glog):
        if os.path.exists(p):
            os.unlink(p)
    t0 = time.time()
    r = run()
    t1 = time.time()
    if r.returncode != 0:
        raise SystemExit("failed: %s %s" % (r.args, r.stderr))
    events = []
    spans = []
    if os.path.exists(calls):
        with open(calls) as f:
            for line in f:
                parts = line.rstrip("\n").split(" ", 4)
                if len(parts) < 5:
                    continue
                s, e, rc = float(parts[0]), float(parts[1]), int(parts[2])
                cmd, last = _command(parts[4])
                spans.append((s, e))
                events.append({"start_ms": round((s - t0) * 1000, 1),
                               "duration_ms": round((e - s) * 1000, 1), "rc": rc,
                               "call": "%s %s" % (cmd, last[:12]) if last else cmd})
    if os.path.exists(glog):
        pat = re.compile(r"^(\S+) \S+\[(\d+)\] (\w+) (\S+): (timeline: .*)$")
        with open(glog, errors="replace") as f:
            for line in f:
                m = pat.match(line.rstrip("\n"))
                if m:
                    events.append({"start_ms": round((_epoch(m.group(1)) - t0) * 1000, 1),
                                   "log": "%s: %s" % ("monitor" if m.group(2) == "1"  # own pid ns
                                                      else "pid " + m.group(2), m.group(5))})
    events.sort(key=lambda ev: ev["start_ms"])
    covered, end = 0.0, t0  # the union of the invocations, inside [t0, t1]
    for s, e in sorted(spans):
        s, e = max(s, end, t0), min(e, t1)
        if e > s:
            covered += e - s
            end = e
    wall = t1 - t0
    return {"wall_ms": round(wall * 1000, 1), "runtime_ms": round(covered * 1000, 1),
            "engine_own_ms": round((wall - covered) * 1000, 1), "calls": len(spans),
            "events": events}


def print_timeline(title, tl):
    print("timeline of one %s: wall %.0f ms = %d runtime invocations %.0f ms + engine's own %.0f ms"
          % (title, tl["wall_ms"], tl["calls"], tl["runtime_ms"], tl["engine_own_ms"]))
    print("  %8s %8s %4s  %s" % ("start ms", "dur ms", "rc",
                                 "runtime invocation / its --debug timeline line (at its end)"))
    for ev in tl["events"]:
        if "call" in ev:
            print("  %8.0f %8.0f %4d  %s" % (ev["start_ms"], ev["duration_ms"], ev["rc"], ev["call"]))
        else:
            print("  %8.0f %8s %4s    %s" % (ev["start_ms"], "", "", ev["log"]))


def report(title, times):
    """Print medians, ranges and the ratio against runc."""
    print(title)
    for kind, ts in times.items():
        print("  %-28s median %.3f s  (min %.3f, max %.3f)" % (kind, statistics.median(ts),
                                                                min(ts), max(ts)))
    names = list(times)
    print("  ratio %s / %s: %.2fx (goal <= %.1fx)"
          % (names[0], names[1], statistics.median(times[names[0]]) /
             statistics.median(times[names[1]]), GOAL))


def versions():
    """One line per engine component."""
    out = []
    for argv in (["podman", "--version"], ["dockerd", "--version"], ["containerd", "--version"],
                 ["runc", "--version"], [sys.executable, RUNTIME, "--version"]):
        try:
            out.append(subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()[0])
        except (OSError, IndexError):
            out.append("%s: not installed" % argv[0])
    return out


def _summary(ts):
    return {"median": round(statistics.median(ts), 4), "min": round(min(ts), 4),
            "max": round(max(ts), 4), "samples": [round(t, 4) for t in ts]}


def _engine_figures(engine, ours, theirs, traced, n, echo, calls, glog):
    """One engine's `run --rm bb true` with this runtime (ours) and with runc (theirs), taken
    round robin: their times, the ratio of the medians and, given traced (a traced run), the
    timeline of one run."""
    mine, runc_kind = "%s + cc-oci-runtime" % engine, "%s + runc" % engine
    times = measure({mine: ours, runc_kind: theirs}, n)
    res = {"times": {k: _summary(v) for k, v in times.items()}}
    res["ratio"] = round(res["times"][mine]["median"] / res["times"][runc_kind]["median"], 3)
    if echo:
        report("%s run --rm bb true (n=%d)" % (engine, n), times)
    if traced:
        res["timeline"] = trace(traced, calls, glog)
        if echo:
            print_timeline("`%s run --rm bb true`" % engine, res["timeline"])
    return res


def run_all(n, docker=True, do_trace=True, echo=True):
    """Measure both engines (n timed runs per kind, round-robin) and trace one run of each.

    Returns {"podman": {...}, "docker": {...}}, each with "times" ({kind: summary}),
    "ratio" (this runtime / runc, medians) and "timeline"; prints as it goes when echo."""
    os.environ.setdefault("CC_OCI_PYTHON", "/usr/bin/python3")
    runc = shutil.which("runc") or "/usr/sbin/runc"
    base = tempfile.mkdtemp(prefix="cc-bench-eng-", dir="/var/tmp")
    out = {"python": os.environ["CC_OCI_PYTHON"], "versions": versions()}
    out_print = print if echo else (lambda *a, **k: None)
    try:
        out_print("\n".join(out["versions"]))
        out_print("the runtime runs with CC_OCI_PYTHON=%s" % out["python"])
        rootfs = engines.make_busybox_rootfs(os.path.join(base, "rootfs"))
        tracer, calls, glog = make_tracer(os.path.join(base, "traced"))
        with engines.Podman(os.path.join(base, "podman"), RUNTIME) as pm:
            pm.import_image(rootfs, "bb")
            cmd = ("run", "--rm", "--network", "none", "bb", "true")
            out["podman"] = _engine_figures(
                "podman", lambda: pm.run("--runtime", "cc-oci-runtime", *cmd),
                lambda: pm.run("--runtime", runc, *cmd),
                do_trace and (lambda: pm.run("--runtime", tracer, *cmd)), n, echo, calls, glog)
        if docker:
            with engines.Docker(os.path.join(base, "docker"), RUNTIME,
                                extra_runtimes={"cc-traced": tracer}) as dk:
                dk.import_image(rootfs, "bb")
                cmd = ("--network", "none", "bb", "true")
                out["docker"] = _engine_figures(
                    "docker", lambda: dk.run("run", "--rm", "--runtime", "cc-oci-runtime", *cmd),
                    lambda: dk.run("run", "--rm", "--runtime", "runc", *cmd),
                    do_trace and (lambda: dk.run("run", "--rm", "--runtime", "cc-traced", *cmd)),
                    n, echo, calls, glog)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out


def goals(res):
    """(figure, value, goal, met) rows of the engine targets."""
    rows = []
    for eng in ("podman", "docker"):
        if eng in res:
            rows.append(("%s run --rm true: runtime / runc" % eng, "%.2fx" % res[eng]["ratio"],
                         "<= %.1fx" % GOAL, res[eng]["ratio"] <= GOAL))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5, help="timed runs per kind (default 5)")
    ap.add_argument("--no-docker", action="store_true", help="podman only")
    ap.add_argument("--no-trace", action="store_true", help="no timeline")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON at the end")
    args = ap.parse_args()
    res = run_all(args.n, docker=not args.no_docker, do_trace=not args.no_trace,
                  echo=not args.json)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print()
        for fig, val, goal, met in goals(res):
            print("%-40s %8s  goal %-8s %s" % (fig, val, goal, "met" if met else "NOT met"))


if __name__ == "__main__":
    main()
