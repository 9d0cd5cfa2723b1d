"""Networking: the container's network namespace wired into its VM (issue 6).

The runtime directly on a namespace the test builds (a veth pair: eth0 inside, its peer on
the host), then podman (netavark + aardvark-dns) and dockerd (docker0, iptables) with their
default networks, published ports, user networks resolved by name, and a teardown that
leaves no tap, qdisc or process behind.
"""
import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid

import pytest

import engines
from conftest import is_pool_keeper, qemu_names, RUNTIME, poll

NAME = "cc-oci-runtime"
PAGE = "hello from the VM\n"
HTTPD = ["httpd", "-f", "-p", "80", "-h", "/www"]
TIMEOUT = 120


def _message(stderr):
    """The last error's message: runc's logrus line on stderr (no --log) reduced to its msg."""
    import json as _json
    line = stderr.strip().splitlines()[-1]
    m = re.match(r'^time="[^"]*" level=\w+ msg=(".*")$', line)
    return _json.loads(m.group(1)) if m else line


def sh(cmd, check=True):
    """Run a host shell command; its stdout."""
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60)
    assert not check or r.returncode == 0, (cmd, r.stdout, r.stderr)
    return r.stdout


def http_get(url, timeout=10):
    """The body of a GET from the host, or None."""
    r = subprocess.run(["timeout", str(timeout), "busybox", "wget", "-qO-", url],
                       capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


def free_port():
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_taps():
    """cc-tap interfaces in the host's namespace (there must never be any)."""
    return [ln for ln in sh("ip -o link show").splitlines() if "cc-tap" in ln]


def _runtime_pids():
    """Runtime processes (CLI, monitors) and their children (QEMU)."""
    table = engines.proc_table()
    pids = {p for p, (_, argv, st) in table.items() if st != "Z" and RUNTIME in argv[:6]  # an exec'd monitor: argv[5]
            and not is_pool_keeper(argv)}  # (the host's pool outlives containers: test_pool.py)
    while True:
        more = {p for p, (pp, _, st) in table.items() if pp in pids and st != "Z"} - pids
        if not more:
            return pids
        pids |= more


def runtime_procs():
    """{pid: cmdline} of runtime and QEMU processes left once every container is removed (a
    removal may still be finishing, so wait a little first)."""
    poll(lambda: not _runtime_pids(), 15)
    return {p: " ".join(engines.proc_table().get(p, (0, []))[1]) for p in _runtime_pids()}


@pytest.fixture(scope="module")
def www_rootfs(tmp_path_factory):
    """busybox with /www/index.html for httpd."""
    root = engines.make_busybox_rootfs(tmp_path_factory.mktemp("www") / "rootfs")
    os.makedirs(os.path.join(root, "www"))
    with open(os.path.join(root, "www", "index.html"), "w") as f:
        f.write(PAGE)
    return root


class HostServer:
    """busybox httpd on the host at addr, serving PAGE."""

    def __init__(self, addr, directory):
        with open(os.path.join(directory, "index.html"), "w") as f:
            f.write(PAGE)
        self.port = free_port()
        self.proc = subprocess.Popen(["busybox", "httpd", "-f", "-p", "%s:%d" % (addr, self.port),
                                      "-h", directory])
        time.sleep(0.2)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


# ---------------------------------------------------------------------------
# the runtime on a namespace built by the test
# ---------------------------------------------------------------------------

@pytest.fixture
def netns():
    """A named netns with eth0 (10.231.0.2/24, fd00:231::2/64, default route) whose veth peer
    is on the host (10.231.0.1/24); removed afterwards."""
    name = "ccnet-" + uuid.uuid4().hex[:8]
    peer = "ccp" + name[6:]
    sh("ip netns add %s" % name)
    sh("ip link add %s type veth peer name eth0 netns %s" % (peer, name))
    sh("ip addr add 10.231.0.1/24 dev %s && ip link set %s up" % (peer, peer))
    sh("ip netns exec %s sh -c 'ip link set eth0 mtu 1400 up && ip addr add 10.231.0.2/24 dev eth0 && "
       "ip -6 addr add fd00:231::2/64 dev eth0 nodad && ip route add default via 10.231.0.1 && "
       "ip route add 10.232.0.0/16 via 10.231.0.1 metric 7'" % name)
    yield name
    sh("ip link del %s" % peer, check=False)
    sh("ip netns del %s" % name, check=False)


def ns_sh(ns, cmd):
    """A command's stdout inside netns ns."""
    return sh("ip netns exec %s %s" % (ns, cmd))


def netns_bundle(runtime, ns, args):
    """A bundle whose container joins /run/netns/ns."""
    b = runtime.bundle(args)
    path = os.path.join(b, "config.json")
    conf = json.load(open(path))
    conf["linux"]["namespaces"] = [n for n in conf["linux"]["namespaces"] if n["type"] != "network"]
    conf["linux"]["namespaces"].append({"type": "network", "path": "/run/netns/" + ns})
    with open(path, "w") as f:
        json.dump(conf, f)
    return b


def test_guest_gets_the_namespace_addresses_routes_mac_and_mtu(runtime, netns, www_rootfs):
    b = netns_bundle(runtime, netns, ["sh", "-c", "ip addr; ip route; ip -6 addr"])
    mac = ns_sh(netns, "cat /sys/class/net/eth0/address").strip()
    r = runtime("run", "--bundle", b, "net1")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "inet 10.231.0.2/24" in out and "fd00:231::2/64" in out, out
    assert "default via 10.231.0.1 dev eth0" in out and "10.232.0.0/16 via 10.231.0.1 dev eth0  metric 7" in out, out
    assert "link/ether " + mac in out and "mtu 1400" in out, out
    assert "lo: <LOOPBACK,UP" in out and "127.0.0.1/8" in out, out
    assert "eth1" not in out and "02:cc:00" not in out, out  # unused NIC slots are hidden
    # the monitor removed what it added when the workload ended
    assert "ingress" not in ns_sh(netns, "tc qdisc show dev eth0")
    assert "cc-tap" not in ns_sh(netns, "ip link")


def test_served_from_the_vm_and_cleaned_after_sigkill(runtime, netns, www_rootfs):
    b = netns_bundle(runtime, netns, HTTPD)
    conf = json.load(open(os.path.join(b, "config.json")))
    conf["root"]["path"] = www_rootfs
    json.dump(conf, open(os.path.join(b, "config.json"), "w"))
    runtime("create", "--bundle", b, "web1", check=True)
    assert "ingress" in ns_sh(netns, "tc qdisc show dev eth0")
    assert "mirred (Egress Redirect to device cc-tap0)" in ns_sh(netns, "tc -s filter show dev eth0 ingress")
    runtime("start", "web1", check=True)
    assert poll(lambda: http_get("http://10.231.0.2/", 3)) == PAGE
    assert not host_taps()
    os.kill(runtime.state("web1")["pid"], signal.SIGKILL)
    runtime.wait_status("web1", "stopped")
    runtime("delete", "web1", check=True)
    assert "ingress" not in ns_sh(netns, "tc qdisc show dev eth0")
    assert poll(lambda: "cc-tap" not in ns_sh(netns, "ip link"), 10)


def test_second_vm_in_one_namespace_is_refused(runtime, netns, state_root):
    runtime("create", "--bundle", netns_bundle(runtime, netns, ["sleep", "60"]), "pod1", check=True)
    r = runtime("create", "--bundle", netns_bundle(runtime, netns, ["true"]), "pod2")
    assert r.returncode != 0
    assert _message(r.stderr).endswith(
        "network: this network namespace already belongs to another VM container "
        "(a pod or --network container:ID); VMs cannot share one"), r.stderr
    assert sorted(os.listdir(state_root)) == ["pod1"]
    runtime("delete", "--force", "pod1", check=True)
    assert "ingress" not in ns_sh(netns, "tc qdisc show dev eth0")


def test_a_qdisc_that_cannot_be_added_fails_create_cleanly(runtime, netns, state_root):
    ns_sh(netns, "tc qdisc add dev eth0 ingress")
    r = runtime("create", "--bundle", netns_bundle(runtime, netns, ["true"]), "busy1")
    assert r.returncode != 0
    assert "network: cannot add an ingress qdisc to eth0: File exists" in r.stderr, r.stderr
    assert os.listdir(state_root) == []
    assert poll(lambda: "cc-tap" not in ns_sh(netns, "ip link"), 10)


def add_veth(ns, name, net, peer=None):
    """eth-like interface name in netns ns, up with 10.<net>.0.2/24, its veth peer on the host
    with 10.<net>.0.1/24; returns the peer's name (delete it to take the interface away)."""
    peer = peer or "ccq%d%s" % (net, ns[-4:])
    sh("ip link add %s type veth peer name %s netns %s" % (peer, name, ns))
    sh("ip addr add 10.%d.0.1/24 dev %s && ip link set %s up" % (net, peer, peer))
    ns_sh(ns, "sh -c 'ip addr add 10.%d.0.2/24 dev %s && ip link set %s up'" % (net, name, name))
    return peer


def www_bundle(runtime, ns, www_rootfs, **changes):
    """A bundle running httpd on www_rootfs in netns ns."""
    b = netns_bundle(runtime, ns, HTTPD)
    path = os.path.join(b, "config.json")
    conf = json.load(open(path))
    conf["root"]["path"] = www_rootfs
    conf.update(changes)
    json.dump(conf, open(path, "w"))
    return b


def guest_addrs(runtime, cid):
    """The IPv4 addresses by interface in the guest (`ip -o -4 addr` of an exec)."""
    out = runtime("exec", cid, "ip", "-o", "-4", "addr", check=True).stdout
    return sorted(tuple(line.split()[1:4:2]) for line in out.splitlines())


def test_an_interface_a_hook_adds_gets_a_nic(runtime, netns, www_rootfs):
    # docker moves its veths in from its prestart hook, while the VM is restored with one tap
    peer = "ccqh" + netns[-4:]
    hook = {"path": "/bin/sh", "args": ["sh", "-c", "ip link add %s type veth peer name eth1 netns %s && "
            "ip addr add 10.234.0.1/24 dev %s && ip link set %s up && ip netns exec %s sh -c "
            "'ip addr add 10.234.0.2/24 dev eth1 && ip link set eth1 up'" % (peer, netns, peer, peer, netns)]}
    try:
        b = www_bundle(runtime, netns, www_rootfs, hooks={"prestart": [hook]})
        r = runtime("create", "--bundle", b, "hook1")
        assert r.returncode == 0, r.stderr
        assert "mirred (Egress Redirect to device cc-tap1)" in ns_sh(netns, "tc filter show dev eth1 ingress")
        runtime("start", "hook1", check=True)
        assert poll(lambda: http_get("http://10.234.0.2/", 3)) == PAGE
        assert http_get("http://10.231.0.2/") == PAGE
        assert guest_addrs(runtime, "hook1") == [("eth0", "10.231.0.2/24"), ("eth1", "10.234.0.2/24"),
                                                 ("lo", "127.0.0.1/8")]
        runtime("delete", "--force", "hook1", check=True)
        assert poll(lambda: "cc-tap" not in ns_sh(netns, "ip link"), 10)
        assert "ingress" not in ns_sh(netns, "tc qdisc show")
    finally:
        sh("ip link del %s" % peer, check=False)


def test_interfaces_are_followed_while_the_container_runs(runtime, netns, www_rootfs):
    b = www_bundle(runtime, netns, www_rootfs)
    runtime("run", "-d", "--bundle", b, "late1", check=True)
    peers = []
    try:
        peers.append(add_veth(netns, "eth1", 235))
        assert poll(lambda: http_get("http://10.235.0.2/", 3)) == PAGE, open(os.path.join(
            runtime.root, "late1", "qemu.log")).read()
        assert poll(lambda: ("eth1", "10.235.0.2/24") in guest_addrs(runtime, "late1"))
        ns_sh(netns, "ip addr add 10.235.0.7/24 dev eth1")  # an address the engine adds later
        ns_sh(netns, "ip route add 10.99.0.0/16 via 10.235.0.1")
        assert poll(lambda: http_get("http://10.235.0.7/", 3)) == PAGE
        route = runtime("exec", "late1", "ip", "route", check=True).stdout
        assert "10.99.0.0/16 via 10.235.0.1 dev eth1" in route, route
        sh("ip link del %s" % peers.pop())  # the engine takes the interface away
        assert poll(lambda: "eth1" not in runtime("exec", "late1", "ip", "-o", "link", check=True).stdout)
        assert "cc-tap1" not in ns_sh(netns, "ip link"), "the tap given for it went"
        assert http_get("http://10.231.0.2/") == PAGE
        peers.append(add_veth(netns, "eth2", 236))  # the freed NIC is used again
        assert poll(lambda: http_get("http://10.236.0.2/", 3)) == PAGE
        assert ("eth2", "10.236.0.2/24") in guest_addrs(runtime, "late1")
    finally:
        for peer in peers:
            sh("ip link del %s" % peer, check=False)
    runtime("delete", "--force", "late1", check=True)
    assert poll(lambda: "cc-tap" not in ns_sh(netns, "ip link"), 10)
    assert "ingress" not in ns_sh(netns, "tc qdisc show")


def test_more_interfaces_than_nics(runtime, netns, www_rootfs, state_root, tmp_path):
    log = str(tmp_path / "log")
    peers = []
    try:
        peers = [add_veth(netns, "eth%d" % i, 236 + i) for i in range(1, rt_slots())]
        extra = "ccqx" + netns[-4:]
        hook = {"path": "/bin/sh", "args": ["sh", "-c", "ip link add %s type veth peer name eth9 netns %s && "
                "ip netns exec %s ip link set eth9 up" % (extra, netns, netns)]}
        r = runtime("create", "--bundle", www_bundle(runtime, netns, www_rootfs, hooks={"prestart": [hook]}), "many1")
        assert r.returncode != 0
        assert _message(r.stderr).endswith("network: 5 interfaces in the container's network namespace; a VM has 4"), \
            r.stderr
        assert os.listdir(state_root) == [] and "ingress" not in ns_sh(netns, "tc qdisc show")
        assert poll(lambda: "cc-tap" not in ns_sh(netns, "ip link"), 10)
        sh("ip link del %s" % extra)
        # four fit; a fifth added while it runs is refused in the log, the others keep working
        runtime("--log", log, "run", "-d", "--bundle", www_bundle(runtime, netns, www_rootfs), "many2", check=True)
        peers.append(add_veth(netns, "eth9", 245))
        assert poll(lambda: "no free NIC" in open(log).read(), 10)
        assert "network: eth9: not wired, the VM has no free NIC (it has 4)" in open(log).read()
        assert runtime.state("many2")["status"] == "running"
        assert "ingress" not in ns_sh(netns, "tc qdisc show dev eth9")
        assert http_get("http://10.239.0.2/") == PAGE
        sh("ip link del %s" % peers[0])  # a NIC comes free: the waiting interface takes it
        assert poll(lambda: http_get("http://10.245.0.2/", 3)) == PAGE
    finally:
        for peer in peers:
            sh("ip link del %s" % peer, check=False)
    runtime("delete", "--force", "many2", check=True)
    assert poll(lambda: "cc-tap" not in ns_sh(netns, "ip link"), 10)


def rt_slots():
    """The NIC slots of a VM (cc_oci_runtime.NET_SLOTS)."""
    import cc_oci_runtime
    return cc_oci_runtime.NET_SLOTS


def test_host_network_is_refused(runtime, state_root):
    b = runtime.bundle(["true"])
    conf = json.load(open(os.path.join(b, "config.json")))
    conf["linux"]["namespaces"] = [n for n in conf["linux"]["namespaces"] if n["type"] != "network"]
    json.dump(conf, open(os.path.join(b, "config.json"), "w"))
    r = runtime("run", "--bundle", b, "hostnet1")
    assert r.returncode != 0
    assert _message(r.stderr).endswith(
        "host networking is not supported: the container would share the host's network namespace "
        "(--network host, or no network namespace in config.json), and a VM cannot take the host's "
        "interfaces; use a network namespace (a bridge network, or --network none)"), r.stderr
    assert os.listdir(state_root) == []
    assert not host_taps()


# ---------------------------------------------------------------------------
# podman: netavark default network, aardvark-dns on a user network
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pmnet(www_rootfs, tmp_path_factory):
    """A private podman with the netavark backend, image bb imported."""
    p = engines.Podman(tmp_path_factory.mktemp("podnet"), RUNTIME, runtime_name=NAME, network=True)
    try:
        p.import_image(www_rootfs, "bb")
        yield p
        p.run("rm", "-af", "-t", "0", timeout=TIMEOUT)
        p.run("network", "rm", "-f", "ccnet", timeout=TIMEOUT)
        assert not runtime_procs(), "runtime processes left: %s" % runtime_procs()
        assert not host_taps()
    finally:
        p.cleanup()


def podman_ip(p, name, key="IPAddress"):
    """A container's address (or Gateway) on podman's default network."""
    return p.run("inspect", "-f", "{{.NetworkSettings.%s}}" % key, name).stdout.strip()


def test_podman_published_port_address_and_routes(pmnet):
    port = free_port()
    r = pmnet.run_rt("run", "-d", "--name", "web", "-p", "127.0.0.1:%d:80" % port, "bb", *HTTPD,
                     timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert poll(lambda: http_get("http://127.0.0.1:%d/" % port, 3)) == PAGE
    ip = podman_ip(pmnet, "web")
    assert ip and http_get("http://%s/" % ip) == PAGE
    out = pmnet.run_rt("exec", "web", "sh", "-c", "ip addr; ip route").stdout
    assert "inet %s/" % ip in out and "default via %s dev eth0" % podman_ip(pmnet, "web", "Gateway") in out, out
    assert "lo: <LOOPBACK,UP" in out, out
    sandbox = pmnet.run("inspect", "-f", "{{.NetworkSettings.SandboxKey}}", "web").stdout.strip()
    assert "ingress" in sh("nsenter --net=%s tc qdisc show dev eth0" % sandbox)
    assert pmnet.run("rm", "-f", "-t", "0", "web", timeout=TIMEOUT).returncode == 0
    assert not os.path.exists(sandbox)


def test_podman_container_reaches_the_host_at_the_gateway(pmnet, tmp_path):
    r = pmnet.run_rt("run", "-d", "--name", "client", "bb", "sleep", "600", timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    gw = podman_ip(pmnet, "client", "Gateway")
    srv = HostServer(gw, str(tmp_path))
    try:
        r = pmnet.run_rt("exec", "client", "sh", "-c", "timeout 10 wget -qO- http://%s:%d/" % (gw, srv.port))
        assert r.stdout == PAGE, r.stderr
    finally:
        srv.stop()
        pmnet.run("rm", "-f", "-t", "0", "client", timeout=TIMEOUT)


def test_podman_user_network_resolves_by_name(pmnet):
    assert pmnet.run("network", "create", "ccnet").returncode == 0
    r = pmnet.run_rt("run", "-d", "--network", "ccnet", "--name", "srv1", "bb", *HTTPD, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    r = pmnet.run_rt("run", "--rm", "--network", "ccnet", "bb", "sh", "-c",
                     "for i in 1 2 3 4 5; do timeout 10 wget -qO- http://srv1/ && exit 0; sleep 1; done; exit 1",
                     timeout=TIMEOUT)
    assert r.returncode == 0 and r.stdout == PAGE, (r.stdout, r.stderr)
    pmnet.run("rm", "-f", "-t", "0", "srv1", timeout=TIMEOUT)


def test_podman_pod_holds_one_vm_container(pmnet):
    port = free_port()
    assert pmnet.run("pod", "create", "--name", "pod1", "-p", "127.0.0.1:%d:80" % port).returncode == 0
    try:
        r = pmnet.run_rt("run", "-d", "--pod", "pod1", "--name", "inpod", "bb", *HTTPD, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr  # the infra container is runc's: its namespace is wired
        assert poll(lambda: http_get("http://127.0.0.1:%d/" % port, 3)) == PAGE
        r = pmnet.run_rt("run", "--rm", "--pod", "pod1", "bb", "true", timeout=TIMEOUT)
        assert r.returncode != 0 and "network: this network namespace already belongs to another VM " \
            "container (a pod or --network container:ID); VMs cannot share one" in r.stderr, r.stderr
    finally:
        assert pmnet.run("pod", "rm", "-f", "pod1", timeout=TIMEOUT).returncode == 0


def _qemu_names():
    """cc-<id> of each running QEMU's container (conftest.qemu_names: pooled VMs too)."""
    return qemu_names()


def test_podman_pod_with_a_vm_infra_is_one_vm_for_its_members(pmnet):
    """The pod's infra container under this runtime restores the pod's VM; its members run
    in that VM, talk over the pod's localhost, and the pod's published port reaches them."""
    port = free_port()
    r = pmnet.run_rt("pod", "create", "--name", "vmpod", "-p", "127.0.0.1:%d:80" % port)
    assert r.returncode == 0, r.stderr
    pod_id = r.stdout.strip()
    try:
        r = pmnet.run_rt("run", "-d", "--pod", "vmpod", "--name", "web", "bb", *HTTPD, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        infra = pmnet.run("pod", "inspect", "--format", "{{.InfraContainerID}}", "vmpod").stdout.strip()
        web = pmnet.run("inspect", "--format", "{{.Id}}", "web").stdout.strip()
        names = _qemu_names()
        assert "cc-" + infra[:32] in names and "cc-" + web[:32] not in names, (infra, names)
        r = pmnet.run_rt("run", "--rm", "--pod", "vmpod", "bb", "sh", "-c",
                         "for i in 1 2 3 4 5; do timeout 10 wget -qO- http://127.0.0.1/ && exit 0; "
                         "sleep 1; done; exit 1", timeout=TIMEOUT)
        assert r.returncode == 0 and r.stdout == PAGE, (r.stdout, r.stderr)
        assert poll(lambda: http_get("http://127.0.0.1:%d/" % port, 3)) == PAGE
        assert pmnet.run_rt("pod", "pause", "vmpod", timeout=TIMEOUT).returncode == 0
        status = pmnet.run("inspect", "--format", "{{.State.Status}}", "web", infra).stdout.split()
        assert status == ["paused", "paused"], status
        assert pmnet.run_rt("pod", "unpause", "vmpod", timeout=TIMEOUT).returncode == 0
        assert poll(lambda: http_get("http://127.0.0.1:%d/" % port, 3)) == PAGE
        r = pmnet.run_rt("pod", "stats", "--no-stream", "--format", "{{.Name}} {{.MemUsage}}", "vmpod")
        rows = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.strip())
        assert r.returncode == 0 and "web" in rows and rows["web"].split()[0] != "0B", r.stdout
        assert pmnet.run_rt("pod", "stop", "-t", "1", "vmpod", timeout=TIMEOUT).returncode == 0
        state = pmnet.run("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", "web").stdout.split()
        assert state[0] == "exited", state
    finally:
        assert pmnet.run_rt("pod", "rm", "-f", "vmpod", timeout=TIMEOUT).returncode == 0
    assert not [n for n in _qemu_names() if n == "cc-" + infra[:32]]
    assert not runtime_procs() and not host_taps()
    assert pod_id


def test_podman_network_none_has_only_lo_up(pmnet):
    r = pmnet.run_rt("run", "--rm", "--network", "none", "bb", "ip", "addr", timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert "lo: <LOOPBACK,UP" in r.stdout and "127.0.0.1/8" in r.stdout and "eth" not in r.stdout, r.stdout


def test_podman_network_host_is_refused(pmnet):
    r = pmnet.run_rt("run", "--rm", "--network", "host", "bb", "true", timeout=TIMEOUT)
    assert r.returncode != 0 and "host networking is not supported" in r.stderr, r.stderr
    assert not host_taps()


def podman_wget(p, cid, url, timeout=10):
    """The body of a GET from inside a podman container, or None."""
    r = p.run_rt("exec", cid, "sh", "-c", "timeout %d wget -qO- %s" % (timeout, url), timeout=timeout + 30)
    return r.stdout if r.returncode == 0 else None


def test_podman_two_networks_and_connect_disconnect(pmnet):
    for net in ("pna", "pnb"):
        assert pmnet.run("network", "create", net).returncode == 0
    try:
        for name, net in (("psa", "pna"), ("psb", "pnb")):
            r = pmnet.run_rt("run", "-d", "--network", net, "--name", name, "bb", *HTTPD, timeout=TIMEOUT)
            assert r.returncode == 0, r.stderr
        r = pmnet.run_rt("run", "-d", "--network", "pna,pnb", "--name", "both", "bb", "sleep", "600", timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        assert podman_wget(pmnet, "both", "http://psa/") == PAGE
        assert podman_wget(pmnet, "both", "http://psb/") == PAGE
        r = pmnet.run_rt("run", "-d", "--network", "pna", "--name", "pcli", "bb", "sleep", "600", timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        # podman's networks route to each other through the host: what shows the new network
        # is the guest's own address and route on it
        assert pmnet.run("network", "connect", "pnb", "pcli").returncode == 0
        ip = pmnet.run("inspect", "-f", "{{(index .NetworkSettings.Networks \"pnb\").IPAddress}}",
                       "pcli").stdout.strip()
        ip_b = pmnet.run("inspect", "-f", "{{(index .NetworkSettings.Networks \"pnb\").IPAddress}}",
                         "psb").stdout.strip()
        assert ip and ip_b
        addrs = lambda: pmnet.run_rt("exec", "pcli", "ip", "-o", "-4", "addr").stdout  # noqa: E731
        assert poll(lambda: " inet %s/" % ip in addrs()), addrs()
        assert "dev eth1" in pmnet.run_rt("exec", "pcli", "ip", "route", "get", ip_b).stdout
        assert poll(lambda: podman_wget(pmnet, "pcli", "http://psb/", 5)) == PAGE
        assert pmnet.run("network", "disconnect", "pnb", "pcli").returncode == 0
        assert poll(lambda: " inet %s/" % ip not in addrs()), addrs()
        out = pmnet.run_rt("exec", "pcli", "ip", "-o", "link").stdout
        assert "eth1" not in out and "eth0" in out, out
        assert podman_wget(pmnet, "pcli", "http://psa/") == PAGE
    finally:
        assert pmnet.run("rm", "-f", "-t", "0", "psa", "psb", "both", "pcli", timeout=TIMEOUT).returncode == 0
        for net in ("pna", "pnb"):
            pmnet.run("network", "rm", "-f", net, timeout=TIMEOUT)
    assert not runtime_procs(), "runtime processes left: %s" % runtime_procs()
    assert not host_taps()


# ---------------------------------------------------------------------------
# docker: docker0 with iptables, published ports, a user-defined bridge
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dknet(www_rootfs, tmp_path_factory):
    """A private dockerd with its default bridge and iptables, image bb imported."""
    d = engines.Docker(tmp_path_factory.mktemp("docknet"), RUNTIME, runtime_name=NAME, network=True)
    try:
        d.import_image(www_rootfs, "bb")
        yield d
        ids = d.run("ps", "-aq").stdout.split()
        if ids:
            assert d.run("rm", "-f", *ids, timeout=TIMEOUT).returncode == 0
        d.run("network", "rm", "ccnet", timeout=TIMEOUT)
        assert not runtime_procs(), "runtime processes left: %s" % runtime_procs()
        assert not host_taps()
        assert not [ln for ln in sh("ip -o link show").splitlines() if "veth" in ln and "master docker0" in ln]
    finally:
        d.stop()


def test_docker_published_port(dknet):
    port = free_port()
    r = dknet.run_rt("run", "-d", "--name", "web", "-p", "127.0.0.1:%d:80" % port, "bb", *HTTPD, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert poll(lambda: http_get("http://127.0.0.1:%d/" % port, 3)) == PAGE
    assert dknet.run("rm", "-f", "web", timeout=TIMEOUT).returncode == 0


def test_docker_container_reaches_the_host(dknet, tmp_path):
    gw = sh("ip -4 -o addr show docker0").split()[3].split("/")[0]
    srv = HostServer(gw, str(tmp_path))
    try:
        r = dknet.run_rt("run", "--rm", "bb", "sh", "-c", "timeout 10 wget -qO- http://%s:%d/" % (gw, srv.port),
                         timeout=TIMEOUT)
        assert r.returncode == 0 and r.stdout == PAGE, (r.stdout, r.stderr)
    finally:
        srv.stop()


def test_docker_user_network_by_name(dknet):
    assert dknet.run("network", "create", "ccnet").returncode == 0
    r = dknet.run_rt("run", "-d", "--network", "ccnet", "--name", "srv1", "bb", *HTTPD, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    r = dknet.run_rt("run", "--rm", "--network", "ccnet", "bb", "sh", "-c", "timeout 10 wget -qO- http://srv1/",
                     timeout=TIMEOUT)
    assert r.returncode == 0 and r.stdout == PAGE, (r.stdout, r.stderr)
    assert dknet.run("rm", "-f", "srv1", timeout=TIMEOUT).returncode == 0


def test_docker_network_of_another_vm_container_is_refused(dknet):
    r = dknet.run_rt("run", "-d", "--name", "owner", "bb", "sleep", "600", timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    r = dknet.run_rt("run", "--rm", "--network", "container:owner", "bb", "true", timeout=TIMEOUT)
    assert r.returncode != 0 and "network: this network namespace already belongs to another VM " \
        "container (a pod or --network container:ID); VMs cannot share one" in r.stderr, r.stderr
    assert dknet.run("rm", "-f", "owner", timeout=TIMEOUT).returncode == 0


def test_docker_network_host_is_refused(dknet):
    r = dknet.run_rt("run", "--rm", "--network", "host", "bb", "true", timeout=TIMEOUT)
    assert r.returncode != 0 and "host networking is not supported" in r.stderr, r.stderr
    assert not host_taps()


COMPOSE = """version: "2.4"
services:
  web:
    image: bb
    runtime: %(runtime)s
    command: ["httpd", "-f", "-p", "80", "-h", "/www"]
    networks: [front, back]
    ports: ["127.0.0.1:%(port)d:80"]
  edge:
    image: bb
    runtime: %(runtime)s
    command: ["sleep", "600"]
    networks: [front]
  client:
    image: bb
    runtime: %(runtime)s
    command: ["sleep", "600"]
    networks: [back]
networks:
  front: {}
  back: {}
"""


def compose(d, directory, project, *args):
    """docker-compose (Debian's 1.29) on the test's dockerd."""
    env = dict(d.env, DOCKER_HOST="unix://" + d.sock)
    return subprocess.run(["docker-compose", "-p", project, "-f", os.path.join(directory, "compose.yml")]
                          + list(args), capture_output=True, text=True, env=env, timeout=300)


def wget_in(d, cid, url, timeout=10):
    """The body of a GET from inside a container, or None."""
    r = d.run("exec", cid, "sh", "-c", "timeout %d wget -qO- %s" % (timeout, url), timeout=timeout + 30)
    return r.stdout if r.returncode == 0 else None


def compose_round(d, directory, runtime_name):
    """up -d of COMPOSE under one runtime: web reached from the host, from edge on front and
    from client on back, by name; then down, which must leave nothing."""
    port = free_port()
    with open(os.path.join(directory, "compose.yml"), "w") as f:
        f.write(COMPOSE % {"runtime": runtime_name, "port": port})
    project = "cc" + uuid.uuid4().hex[:6]
    r = compose(d, directory, project, "up", "-d")
    try:
        assert r.returncode == 0, (runtime_name, r.stderr)
        assert poll(lambda: http_get("http://127.0.0.1:%d/" % port, 3)) == PAGE, runtime_name
        assert wget_in(d, project + "_edge_1", "http://web/") == PAGE, runtime_name
        assert wget_in(d, project + "_client_1", "http://web/") == PAGE, runtime_name
        assert d.run("inspect", "-f", "{{.HostConfig.Runtime}}", project + "_web_1").stdout.strip() == runtime_name
        out = d.run("exec", project + "_web_1", "ip", "-o", "-4", "addr").stdout
        assert len([ln for ln in out.splitlines() if " eth" in ln]) == 2, out
    finally:
        r = compose(d, directory, project, "down")
    assert r.returncode == 0, r.stderr
    assert d.run("ps", "-aq").stdout.split() == []
    assert [n for n in d.run("network", "ls", "--format", "{{.Name}}").stdout.split()
            if n.startswith(project)] == []


def test_docker_compose_two_networks(dknet, tmp_path):
    compose_round(dknet, str(tmp_path), "runc")  # the reference: the same file under runc
    compose_round(dknet, str(tmp_path), NAME)
    assert not runtime_procs(), "runtime processes left: %s" % runtime_procs()
    assert not host_taps()


def test_docker_network_connect_and_disconnect(dknet):
    for net in ("neta", "netb"):
        assert dknet.run("network", "create", net).returncode == 0
    try:
        for name, net in (("srva", "neta"), ("srvb", "netb")):
            r = dknet.run_rt("run", "-d", "--network", net, "--name", name, "bb", *HTTPD, timeout=TIMEOUT)
            assert r.returncode == 0, r.stderr
        r = dknet.run_rt("run", "-d", "--network", "neta", "--name", "cli", "bb", "sleep", "600", timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        assert wget_in(dknet, "cli", "http://srva/") == PAGE
        assert dknet.run("network", "connect", "netb", "cli").returncode == 0
        assert poll(lambda: wget_in(dknet, "cli", "http://srvb/", 5)) == PAGE
        assert dknet.run("network", "disconnect", "netb", "cli").returncode == 0
        assert poll(lambda: wget_in(dknet, "cli", "http://srvb/", 3) is None)
        out = dknet.run("exec", "cli", "ip", "-o", "link").stdout
        assert "eth1" not in out and "eth0" in out, out
        assert wget_in(dknet, "cli", "http://srva/") == PAGE
    finally:
        assert dknet.run("rm", "-f", "srva", "srvb", "cli", timeout=TIMEOUT).returncode == 0
        for net in ("neta", "netb"):
            dknet.run("network", "rm", net, timeout=TIMEOUT)
    assert not runtime_procs(), "runtime processes left: %s" % runtime_procs()
    assert not host_taps()
