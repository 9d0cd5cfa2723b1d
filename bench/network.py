#!/usr/bin/env python3
"""Network speed through podman's default bridge (netavark) with this runtime next to runc,
measured in the same run with private engine state:

  - HTTP round trip: 200 GETs through a published port (127.0.0.1:PORT -> busybox httpd
    serving from a tmpfs in the container), a new connection each, median and p99;
  - bulk TCP, 200 MB each way: host -> container into `nc -l > /dev/null`, container ->
    host as HTTP GETs of a 40 MB file on that tmpfs (httpd uses sendfile; busybox nc's small
    copy loop would measure the guest CPU under TCG, not the network);
  - start cost of a network: `podman run --rm IMG true` with the default network against
    --network none (medians), for both runtimes, and the runtime alone: `create`+`delete`
    on a namespace with a veth against an empty one.

    python3 bench/network.py [--requests N] [--megabytes M] [--starts N]
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "functional"))
import engines  # noqa: E402

RUNTIME = os.path.abspath(os.path.join(HERE, "..", "cc_oci_runtime.py"))
RUNTIMES = {"cc": "cc-oci-runtime", "runc": "runc"}
BIG_MB = 40  # the file the container serves
# Served from a tmpfs the container mounts itself (CAP_SYS_ADMIN): podman's /dev/shm is a bind
# of a host directory, which reaches a VM over 9p, and --tmpfs passes options the runtime's
# mount code refuses; files on 9p would add 9p round trips to every request.
SERVE = ("mkdir -p /srv && mount -t tmpfs -o size=64m tmpfs /srv && cp /www/index.html /srv/ && "
         "dd if=/dev/zero of=/srv/big bs=1048576 count=%d 2>/dev/null && exec httpd -f -p 80 -h /srv"
         % BIG_MB)


def free_port():
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(r):
    """A CompletedProcess that must have succeeded; its stdout."""
    if r.returncode != 0:
        raise SystemExit("failed: %s\n%s" % (" ".join(r.args), r.stderr))
    return r.stdout.strip()


def http_rtt(port, n):
    """Seconds of n GET round trips (a new connection each) to 127.0.0.1:port."""
    request = b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"
    times = []
    deadline = time.monotonic() + 60
    while True:  # wait until the server answers
        try:
            with socket.create_connection(("127.0.0.1", port), 2) as s:
                s.sendall(request)
                if s.recv(100).startswith(b"HTTP/"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("no answer on port %d" % port)
        time.sleep(0.2)
    for _ in range(n):
        t = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), 10) as s:
            s.sendall(request)
            while s.recv(65536):
                pass
        times.append(time.perf_counter() - t)
    return times


def to_container(addr, port, megabytes):
    """MB/s of megabytes sent to a `nc -l` in the container (until it closes)."""
    chunk = b"\0" * (1 << 20)
    deadline = time.monotonic() + 30
    while True:
        try:
            s = socket.create_connection((addr, port), 5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with s:
        t = time.perf_counter()
        for _ in range(megabytes):
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(120)
        while s.recv(65536):
            pass
        return megabytes / (time.perf_counter() - t)


def from_container(addr, megabytes):
    """MB/s of megabytes fetched from the container's httpd (BIG_MB at a time)."""
    request = b"GET /big HTTP/1.0\r\n\r\n"
    got, t = 0, time.perf_counter()
    for _ in range(max(1, megabytes // BIG_MB)):
        with socket.create_connection((addr, 80), 30) as s:
            s.sendall(request)
            while True:
                data = s.recv(1 << 20)
                if not data:
                    break
                got += len(data)
    elapsed = time.perf_counter() - t
    if got < max(1, megabytes // BIG_MB) * (BIG_MB << 20):
        raise SystemExit("received %d bytes only" % got)
    return got / (1 << 20) / elapsed


def start_times(p, n):
    """{(runtime, mode): median seconds} of `run --rm bb true` with the default network and
    with --network none, all four taken in turn (one warm-up round)."""
    times = {(rt, mode): [] for rt in RUNTIMES for mode in ("bridge", "none")}
    for i in range(n + 1):
        for rt, mode in times:
            t = time.monotonic()
            check(p.run("--runtime", RUNTIMES[rt], "run", "--rm", "--network", mode, "bb", "true"))
            if i:
                times[(rt, mode)].append(time.monotonic() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_runtime(p, rt, args):
    """Every figure for one runtime."""
    port = free_port()
    web = check(p.run("--runtime", rt, "run", "-d", "--cap-add", "SYS_ADMIN", "-p",
                      "127.0.0.1:%d:80" % port, "bb", "sh", "-c", SERVE))
    sink = check(p.run("--runtime", rt, "run", "-d", "bb", "sh", "-c",
                       "while :; do nc -l -p 5001 > /dev/null; done"))
    try:
        rtt = sorted(http_rtt(port, args.requests))
        addr = check(p.run("inspect", "-f", "{{.NetworkSettings.IPAddress}}", sink))
        web_addr = check(p.run("inspect", "-f", "{{.NetworkSettings.IPAddress}}", web))
        res = {"rtt_median": statistics.median(rtt), "rtt_p99": rtt[int(len(rtt) * 0.99) - 1],
               "to_container": to_container(addr, 5001, args.megabytes),
               "from_container": from_container(web_addr, args.megabytes)}
    finally:
        p.run("rm", "-f", "-t", "0", web, sink, timeout=120)
    return res


def runtime_network_cost(top, n):
    """Median seconds of the runtime's own `create` + `delete` of a container in a namespace
    with a veth (eth0, an address, a default route) and in an empty one; a VM only."""
    sys.path.insert(0, os.path.join(HERE, ".."))
    import cc_oci_runtime as rt
    ns = "ccbench%d" % os.getpid()
    def run(*argv):  # no pipes: a created container's monitor keeps the stdio it was given
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run("ip", "netns", "add", ns)
    try:
        run("ip", "netns", "exec", ns, "sh", "-c", "ip link add eth0 type veth peer name p0 && "
            "ip link set eth0 up && ip addr add 10.77.0.2/24 dev eth0 && ip route add default via 10.77.0.1")
        root = os.path.join(top, "state")
        rootfs = os.path.join(top, "rootfs")
        bundles = {}
        for mode, path in (("veth", "/run/netns/" + ns), ("empty", None)):
            bundle = bundles[mode] = os.path.join(top, "bundle-" + mode)
            os.makedirs(bundle)
            conf = rt.default_spec()
            conf["root"] = {"path": rootfs, "readonly": False}
            conf["process"].update(terminal=False, args=["true"])
            conf["linux"]["namespaces"] = [x for x in conf["linux"]["namespaces"] if x["type"] != "network"]
            conf["linux"]["namespaces"].append({"type": "network", "path": path} if path else {"type": "network"})
            with open(os.path.join(bundle, "config.json"), "w") as f:
                json.dump(conf, f)
        times = {mode: [] for mode in bundles}
        cli = [sys.executable, RUNTIME, "--root", root]
        for i in range(n + 1):  # the two taken in turn
            for mode, bundle in bundles.items():
                t = time.monotonic()
                run(*cli, "create", "--bundle", bundle, "bench-" + mode)
                if i:
                    times[mode].append(time.monotonic() - t)
                run(*cli, "delete", "--force", "bench-" + mode)
        return {mode: statistics.median(v) for mode, v in times.items()}
    finally:
        run("ip", "netns", "del", ns)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--megabytes", type=int, default=200)
    ap.add_argument("--starts", type=int, default=7)
    args = ap.parse_args()
    top = tempfile.mkdtemp(prefix="bench-net-")
    try:
        rootfs = engines.make_busybox_rootfs(os.path.join(top, "rootfs"))
        os.makedirs(os.path.join(rootfs, "www"))
        with open(os.path.join(rootfs, "www", "index.html"), "w") as f:
            f.write("hello\n")
        with engines.Podman(os.path.join(top, "podman"), RUNTIME, network=True) as p:
            p.import_image(rootfs, "bb")
            res = {k: bench_runtime(p, name, args) for k, name in RUNTIMES.items()}
            for (rt, mode), median in start_times(p, args.starts).items():
                res[rt]["start_" + mode] = median
        own = runtime_network_cost(top, args.starts * 3)
    finally:
        engines.unmount_under(top)
        shutil.rmtree(top, ignore_errors=True)
    cc, runc = res["cc"], res["runc"]
    print("%-34s %12s %12s %8s" % ("podman, default network (netavark)", "cc-oci", "runc", "cc/runc"))
    rows = [("HTTP round trip, median (ms)", "rtt_median", 1e3),
            ("HTTP round trip, p99 (ms)", "rtt_p99", 1e3),
            ("bulk host -> container (MB/s)", "to_container", 1),
            ("bulk container -> host (MB/s)", "from_container", 1),
            ("run --rm true, network (s)", "start_bridge", 1),
            ("run --rm true, --network none (s)", "start_none", 1)]
    for label, key, scale in rows:
        print("%-34s %12.2f %12.2f %8.2f" % (label, cc[key] * scale, runc[key] * scale, cc[key] / runc[key]))
    for name, r in (("cc-oci", cc), ("runc", runc)):
        print("%s: a network adds %.0f ms to run --rm true" % (name, (r["start_bridge"] - r["start_none"]) * 1e3))
    print("cc-oci alone, create (boot + wiring) on a namespace with a veth %.0f ms, on an empty one "
          "%.0f ms: the network costs %.0f ms" % (own["veth"] * 1e3, own["empty"] * 1e3,
                                                   (own["veth"] - own["empty"]) * 1e3))
    print("(%d requests, %d MB each way)" % (args.requests, args.megabytes))


if __name__ == "__main__":
    main()
