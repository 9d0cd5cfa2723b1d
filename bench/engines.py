#!/usr/bin/env python3
"""Wall time of `podman run --rm IMG true` and `docker run --rm IMG true` with this runtime
next to runc, measured in the same go (round-robin), with private engine state.

    python3 bench/engines.py [-n N] [--no-docker]
"""
import argparse
import os
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


def report(title, times):
    """Print medians, ranges and the ratio against runc."""
    print(title)
    for kind, ts in times.items():
        print("  %-28s median %.3f s  (min %.3f, max %.3f)" % (kind, statistics.median(ts),
                                                                min(ts), max(ts)))
    names = list(times)
    print("  ratio %s / %s: %.1fx" % (names[0], names[1], statistics.median(times[names[0]]) /
                                      statistics.median(times[names[1]])))


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5, help="timed runs per kind (default 5)")
    ap.add_argument("--no-docker", action="store_true", help="podman only")
    args = ap.parse_args()
    runc = shutil.which("runc") or "/usr/sbin/runc"
    base = tempfile.mkdtemp(prefix="cc-bench-eng-", dir="/var/tmp")
    try:
        print("\n".join(versions()))
        rootfs = engines.make_busybox_rootfs(os.path.join(base, "rootfs"))
        with engines.Podman(os.path.join(base, "podman"), RUNTIME) as pm:
            pm.import_image(rootfs, "bb")
            times = measure({
                "podman + cc-oci-runtime": lambda: pm.run("--runtime", "cc-oci-runtime", "run",
                                                          "--rm", "--network", "none", "bb", "true"),
                "podman + runc": lambda: pm.run("--runtime", runc, "run", "--rm", "--network",
                                                "none", "bb", "true")}, args.n)
            report("podman run --rm bb true (n=%d)" % args.n, times)
        if not args.no_docker:
            with engines.Docker(os.path.join(base, "docker"), RUNTIME) as dk:
                dk.import_image(rootfs, "bb")
                times = measure({
                    "docker + cc-oci-runtime": lambda: dk.run("run", "--rm", "--runtime",
                                                              "cc-oci-runtime", "--network",
                                                              "none", "bb", "true"),
                    "docker + runc": lambda: dk.run("run", "--rm", "--runtime", "runc",
                                                    "--network", "none", "bb", "true")}, args.n)
                report("docker run --rm bb true (n=%d)" % args.n, times)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
