"""Pods through containerd's CRI plugin, driven as kubelet drives it (cri.py, engines.Containerd).

pod_lifecycle(ctd, handler, workdir) is the whole kubelet-like sequence for one runtime
handler; it asserts what any runtime must do and returns what it observed, so that the same
sequence runs under the VM runtime's handler and is compared with runc's: a pod is one VM
there. cri.py's own tests (no containerd) are in test_cri_client.py.
"""
import os
import re
import time
import urllib.request

import pytest

import cri
import engines
from conftest import RUNTIME, poll, qemu_names

# ---------------------------------------------------------------------------
# containerd's CRI plugin
# ---------------------------------------------------------------------------

IMAGE = "localhost/busybox:cri"
HTTP_PORT = 8080
# kubelet's CRI log format: RFC 3339 time, stream, F(ull) or P(artial) line, text
CRI_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)) "
                          r"(stdout|stderr) ([FP]) (.*)$")
HANDLERS = ["runc", "cc-oci-runtime"]


def pod_vms(ids):
    """The VMs of the containers ids, as cc-<id> (a VM of its own per container would show them
    all; conftest.qemu_names: a pooled VM by the container it serves)."""
    wanted = {"cc-" + i[:32] for i in ids}
    return sorted(n for n in qemu_names() if n in wanted)


@pytest.fixture(scope="module")
def ctd(rootfs, tmp_path_factory):
    """One private containerd for the module, the pause and busybox images imported.

    cc-oci-runtime is registered as a handler beside runc."""
    c = engines.Containerd(tmp_path_factory.mktemp("containerd"), runtimes={"cc-oci-runtime": RUNTIME})
    try:
        c.import_sandbox_image(rootfs)
        c.import_image(rootfs, IMAGE, cmd=("sh",))
        yield c
    finally:
        c.stop()
    left = c.leftovers()
    assert not left, "containerd left behind: %s" % left


def http_get(url, timeout=3):
    """Body of a GET (text), or None."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode()
    except OSError:
        return None


def read_cri_log(path):
    """[(time, stream, tag, text)] of a CRI log file; every line must have the CRI format."""
    out = []
    with open(path) as f:
        for line in f.read().splitlines():
            m = CRI_LOG_LINE.match(line)
            assert m, "not a CRI log line: %r" % line
            out.append(m.groups())
    return out


def pod_configs(ctd, handler, workdir):
    """The sandbox config and the two container configs kubelet would send for one pod."""
    uid = "uid-%s-%s" % (handler, os.urandom(4).hex())
    name, ns = "web-" + handler, "cri-test"
    log_dir = os.path.join(workdir, "pods", "%s_%s_%s" % (ns, name, uid))  # /var/log/pods/NS_NAME_UID
    os.makedirs(log_dir)
    hosts = os.path.join(workdir, "etc-hosts")  # kubelet's managed /etc/hosts
    with open(hosts, "w") as f:
        f.write("127.0.0.1\tlocalhost\n# Kubernetes-managed hosts file.\n")
    term_log = os.path.join(workdir, "termination-log")
    open(term_log, "w").close()
    ns_opts = {"network": "POD", "pid": "CONTAINER", "ipc": "POD"}
    sandbox = {
        "metadata": {"name": name, "uid": uid, "namespace": ns, "attempt": 0},
        "hostname": name, "log_directory": log_dir,
        "dns_config": {"servers": [ctd.gateway], "searches": ["cri-test.svc.cluster.local"], "options": ["ndots:5"]},
        "labels": {"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": ns, "io.kubernetes.pod.uid": uid},
        "annotations": {"kubernetes.io/config.source": "api"},
        "linux": {"cgroup_parent": "%s/pod%s" % (ctd.cgroup_parent, uid), "security_context": {
            "namespace_options": ns_opts, "seccomp": {"profile_type": "RuntimeDefault"}}},
    }

    def container(cname, script):
        return {
            "metadata": {"name": cname, "attempt": 0}, "image": {"image": IMAGE},
            "command": ["sh", "-c", script], "working_dir": "/",
            "envs": [{"key": "POD_NAME", "value": name}, {"key": "KUBERNETES_SERVICE_PORT", "value": "443"}],
            "mounts": [{"container_path": "/etc/hosts", "host_path": hosts},
                       {"container_path": "/dev/termination-log", "host_path": term_log}],
            "labels": {"io.kubernetes.container.name": cname, "io.kubernetes.pod.name": name,
                       "io.kubernetes.pod.namespace": ns, "io.kubernetes.pod.uid": uid},
            "annotations": {"io.kubernetes.container.restartCount": "0"},
            "log_path": "%s/0.log" % cname,
            "linux": {"resources": {"cpu_period": 100000, "cpu_shares": 2, "oom_score_adj": 1000},
                      "security_context": {"namespace_options": ns_opts, "run_as_user": {"value": 0},
                                           "seccomp": {"profile_type": "RuntimeDefault"}}},
        }

    # server: busybox httpd as pid 1 (no TERM handler: only SIGKILL stops it)
    server = container("server", "mkdir -p /www && hostname > /www/index.html && echo server ready && "
                       "echo to-stderr >&2 && exec httpd -f -p %d -h /www" % HTTP_PORT)
    # client: idles; TERM makes it say so and exit 3
    client = container("client", "trap 'echo client got TERM; exit 3' TERM; echo client ready; "
                       "while :; do sleep 0.2; done")
    return sandbox, server, client


def wait_state(c, cid, state, timeout=30):
    """Poll ContainerStatus until state; return the status."""
    st = poll(lambda: (lambda s: s if s["state"] == state else None)(c.container_status(cid)), timeout, 0.1)
    assert st, "%s never became %s: %s" % (cid, state, c.container_status(cid))
    return st


def pod_lifecycle(ctd, handler, workdir):
    """Run one pod (sandbox + server + client) under handler as kubelet does; return what was seen.

    Asserts the behaviour every runtime must have; the returned dict holds the observations a
    comparison with runc needs (hostnames, exec results, exit codes, log lines, timings)."""
    c = ctd.cri
    seen, t0 = {"handler": handler, "times": {}}, time.monotonic()

    def lap(what):
        seen["times"][what] = round(time.monotonic() - t0, 3)

    sandbox, server_cfg, client_cfg = pod_configs(ctd, handler, workdir)
    assert c.image_status(IMAGE) is not None  # kubelet's EnsureImageExists
    sid = seen["sandbox_id"] = c.run_pod_sandbox(sandbox, handler)
    lap("RunPodSandbox")
    try:
        st = c.pod_sandbox_status(sid)
        assert st["state"] == "SANDBOX_READY" and st["runtime_handler"] == handler, st
        assert st["metadata"]["uid"] == sandbox["metadata"]["uid"] and st["labels"] == sandbox["labels"]
        pod_ip = st["network"]["ip"]
        assert pod_ip.startswith(ctd.subnet.rsplit(".", 1)[0] + "."), (pod_ip, ctd.subnet)
        seen["sandbox_info"] = info = c.pod_sandbox_info(sid)["info"]
        assert info["runtimeHandler"] == handler and info["runtimeSpec"]["process"]["args"] == ["sleep", "infinity"]
        assert info["runtimeOptions"]["binary_name"] == ctd.runtimes[handler], info["runtimeOptions"]
        assert [p["id"] for p in c.list_pod_sandbox({"id": sid})] == [sid]

        ids = {}
        for cfg in (server_cfg, client_cfg):
            cid = c.create_container(sid, cfg, sandbox)
            assert c.container_status(cid)["state"] == "CONTAINER_CREATED"
            c.start_container(cid)
            ids[cfg["metadata"]["name"]] = cid
        lap("containers started")
        server, client = ids["server"], ids["client"]
        for name, cid in ids.items():
            st = wait_state(c, cid, "CONTAINER_RUNNING")
            assert st["metadata"]["name"] == name and st["image"]["image"] == IMAGE, st
        listed = c.list_containers({"pod_sandbox_id": sid})
        assert sorted(x["id"] for x in listed) == sorted(ids.values())
        seen["vms"] = pod_vms([sid] + list(ids.values()))  # runc: none; a VM runtime: the pod's one

        # one UTS and network namespace for the pod
        seen["hostname"] = {n: c.exec_sync(cid, ["hostname"], 10)[1].decode().strip() for n, cid in ids.items()}
        assert seen["hostname"] == {"server": sandbox["hostname"], "client": sandbox["hostname"]}
        # (no wget -T: busybox 1.35's wget segfaults with it; ExecSync's timeout bounds it instead)
        page = poll(lambda: (lambda r: r if r[0] == 0 else None)(
            c.exec_sync(client, ["wget", "-q", "-O", "-", "http://127.0.0.1:%d/" % HTTP_PORT], 10)), 20, 0.2)
        assert page and page[1].decode().strip() == sandbox["hostname"], page
        lap("client reached server")
        rc, out, _ = c.exec_sync(client, ["ip", "-4", "-o", "addr", "show", "eth0"], 10)
        assert rc == 0 and " %s/" % pod_ip in out.decode(), out
        assert http_get("http://%s:%d/" % (pod_ip, HTTP_PORT)).strip() == sandbox["hostname"]
        lap("host reached pod IP")

        # exec: exit codes, stdout and stderr apart, the container's environment and files
        seen["exec"] = {"sh": c.exec_sync(client, ["sh", "-c", "echo out; echo err >&2; exit 7"], 10)}
        assert seen["exec"]["sh"] == (7, b"out\n", b"err\n")
        assert c.exec_sync(client, ["true"], 10) == (0, b"", b"")
        rc, out, _ = c.exec_sync(client, ["sh", "-c", "echo $POD_NAME; cat /etc/hosts /etc/resolv.conf"], 10)
        assert rc == 0 and out.decode().startswith(sandbox["metadata"]["name"] + "\n"), out
        assert "Kubernetes-managed hosts file" in out.decode() and "nameserver %s" % ctd.gateway in out.decode()
        assert "search cri-test.svc.cluster.local" in out.decode()
        try:
            seen["exec"]["missing"] = c.exec_sync(client, ["/no/such/program"], 10)
        except cri.GrpcError as e:
            seen["exec"]["missing"] = (e.code_name, e.message)
        t = time.monotonic()
        try:
            seen["exec"]["timeout"] = c.exec_sync(client, ["sleep", "30"], 1)
        except cri.GrpcError as e:
            seen["exec"]["timeout"] = (e.code_name, e.message)
        assert time.monotonic() - t < 15, "ExecSync ignored its timeout"
        lap("exec")

        # resources and stats
        c.update_container_resources(client, {"cpu_shares": 512, "memory_limit_in_bytes": 64 << 20})
        res = c.container_status(client)["resources"]["linux"]
        assert (res["cpu_shares"], res["memory_limit_in_bytes"], res["oom_score_adj"]) == (512, 64 << 20, 1000), res
        rc, out, _ = c.exec_sync(client, ["cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                          "/sys/fs/cgroup/cpu/cpu.shares"], 10)
        seen["limits_inside"] = (rc, out.decode())  # cgroup v1 as runc sets it up; a VM has its own
        seen["stats"] = c.container_stats(client)
        assert seen["stats"]["attributes"]["id"] == client
        assert seen["stats"]["memory"]["working_set_bytes"]["value"] > 0, seen["stats"]

        # the CRI log files
        log_path = c.container_status(server)["log_path"]
        assert log_path == os.path.join(sandbox["log_directory"], "server", "0.log")
        lines = poll(lambda: (lambda ls: ls if ("stdout", "F", "server ready") in ls and
                              ("stderr", "F", "to-stderr") in ls else None)(
            [x[1:] for x in read_cri_log(log_path)]), 10, 0.1)
        assert lines, read_cri_log(log_path)
        seen["server_log"] = lines

        # StopContainer: the exit code in ContainerStatus
        c.stop_container(client, timeout=10)
        st = c.container_status(client)
        assert st["state"] == "CONTAINER_EXITED" and st["exit_code"] == 3, st
        assert st["finished_at"] >= st["started_at"] > 0 and st["reason"] == "Error", st
        client_log = [x[1:] for x in read_cri_log(c.container_status(client)["log_path"])]
        assert ("stdout", "F", "client ready") in client_log and ("stdout", "F", "client got TERM") in client_log
        t = time.monotonic()
        c.stop_container(server, timeout=1)  # httpd ignores TERM as pid 1: SIGKILL after 1 s
        seen["server_stop_s"] = round(time.monotonic() - t, 2)
        st = c.container_status(server)
        assert st["state"] == "CONTAINER_EXITED" and st["exit_code"] == 137, st
        seen["exit_codes"] = {"client": 3, "server": 137}
        lap("containers stopped")
        for cid in ids.values():
            c.remove_container(cid)
        assert c.list_containers({"pod_sandbox_id": sid}) == []
    finally:
        c.stop_pod_sandbox(sid)
        lap("StopPodSandbox")
        st = c.pod_sandbox_status(sid)
        c.remove_pod_sandbox(sid)
        lap("RemovePodSandbox")
    assert st["state"] == "SANDBOX_NOTREADY", st
    assert c.list_pod_sandbox() == [] and c.list_containers() == []
    with pytest.raises(cri.GrpcError) as e:
        c.pod_sandbox_status(sid)
    assert e.value.code_name == "NOT_FOUND"
    return seen


def pod_leftovers(ctd):
    """What a removed pod may not leave: shims and their processes, mounts, netns, veths, runtime state."""
    out = {}
    procs = engines.find_procs(ctd.state)
    if procs:
        out["processes"] = procs
    if engines.mounts_under(ctd.state):
        out["mounts"] = engines.mounts_under(ctd.state)
    netns = os.path.join(ctd.state, "io.containerd.grpc.v1.cri", "netns")
    if os.listdir(netns) if os.path.isdir(netns) else []:
        out["netns"] = os.listdir(netns)
    veths = [n for n in os.listdir("/sys/class/net")
             if os.path.realpath("/sys/class/net/%s/master" % n).endswith("/" + ctd.bridge)]
    if veths:
        out["veths"] = veths
    for name in ctd.runtimes:
        d = os.path.join(ctd.state, "runtime-" + name, "k8s.io")
        if os.path.isdir(d) and os.listdir(d):
            out["runtime state " + name] = os.listdir(d)
    tasks = os.path.join(ctd.state, "io.containerd.runtime.v2.task", "k8s.io")
    if os.path.isdir(tasks) and os.listdir(tasks):
        out["shim bundles"] = os.listdir(tasks)
    return out


def test_cri_version_and_status(ctd):
    v = ctd.cri.version()
    assert v["runtime_name"] == "containerd" and v["runtime_api_version"] == "v1", v
    assert ctd.cri.api == "v1"  # containerd 1.6 serves runtime.v1 (and v1alpha2)
    alpha = cri.CriClient(ctd.sock, timeout=10, api="v1alpha2")
    try:
        assert alpha.version()["runtime_api_version"] == "v1alpha2"
        # containerd 1.6 ignores ListImages' filter: both images come back
        assert sorted(t for i in alpha.list_images(IMAGE) for t in i["repo_tags"]) == [IMAGE, ctd.SANDBOX_IMAGE]
    finally:
        alpha.close()
    assert ctd.cri.status() == {"RuntimeReady": (True, "", ""), "NetworkReady": (True, "", "")}
    img = ctd.cri.image_status(ctd.SANDBOX_IMAGE)
    assert img["repo_tags"] == [ctd.SANDBOX_IMAGE] and img["size"] > 0, img
    assert ctd.cri.image_status("localhost/no-such-image:1") is None
    with pytest.raises(cri.GrpcError) as e:
        ctd.cri.container_status("no-such-container")
    assert e.value.code_name == "NOT_FOUND" and "no-such-container" in e.value.message


SEEN = {}  # handler: what pod_lifecycle saw, for the comparison with runc


@pytest.mark.parametrize("handler", HANDLERS)  # runc first: the reference
def test_cri_pod_lifecycle(ctd, handler, tmp_path):
    seen = SEEN[handler] = pod_lifecycle(ctd, handler, str(tmp_path))
    if handler == "runc":  # the baseline the VM runtime is compared with
        assert seen["limits_inside"] == (0, "67108864\n512\n"), seen["limits_inside"]
        assert seen["vms"] == []
    else:  # one VM for the whole pod: the sandbox's
        assert seen["vms"] == ["cc-" + seen["sandbox_id"][:32]], seen["vms"]
        ref = SEEN.get("runc") or pytest.fail("the runc reference did not run")
        assert seen["exit_codes"] == ref["exit_codes"]
        assert sorted(seen["server_log"]) == sorted(ref["server_log"])  # (two streams: any order)
        assert seen["exec"]["sh"] == ref["exec"]["sh"]
        assert seen["exec"]["timeout"] == ref["exec"]["timeout"]
        assert set(seen["hostname"].values()) == {"web-" + handler}
    assert seen["exec"]["missing"][0] == "UNKNOWN" and "no such file" in seen["exec"]["missing"][1]
    assert seen["exec"]["timeout"][0] == "DEADLINE_EXCEEDED", seen["exec"]["timeout"]
    poll(lambda: not pod_leftovers(ctd), 10, 0.2)  # shims exit soon after RemovePodSandbox
    assert not pod_leftovers(ctd), "the removed pod left %s" % pod_leftovers(ctd)
    print("%s: %s; exec of a missing program: %s; exec past its timeout: %s"
          % (handler, seen["times"], seen["exec"]["missing"], seen["exec"]["timeout"]))


@pytest.mark.parametrize("handler", HANDLERS)
def test_cri_two_pods_keep_their_localhost_and_vm_apart(ctd, handler, tmp_path):
    """Two pods, each a server on 127.0.0.1:HTTP_PORT answering its own hostname: each pod's
    client reaches its own; under the VM runtime each pod is a VM of its own."""
    pods, sids = [], []
    try:
        for n in range(2):
            sandbox, server_cfg, client_cfg = pod_configs(ctd, handler, str(tmp_path / str(n)))
            sandbox["hostname"] = "pod%d-%s" % (n, handler)
            sid = ctd.cri.run_pod_sandbox(sandbox, handler)
            sids.append(sid)
            ids = []
            for cfg in (server_cfg, client_cfg):
                ids.append(ctd.cri.create_container(sid, cfg, sandbox))
                ctd.cri.start_container(ids[-1])
            pods.append((sid, ids, sandbox["hostname"]))
        for sid, (server, client), hostname in pods:
            page = poll(lambda: (lambda r: r if r[0] == 0 else None)(ctd.cri.exec_sync(
                client, ["wget", "-q", "-O", "-", "http://127.0.0.1:%d/" % HTTP_PORT], 10)), 20, 0.2)
            assert page and page[1].decode().strip() == hostname, page
            vms = pod_vms([sid, server, client])
            assert vms == ([] if handler == "runc" else ["cc-" + sid[:32]]), vms
    finally:
        for sid in sids:
            ctd.cri.stop_pod_sandbox(sid)
            ctd.cri.remove_pod_sandbox(sid)
    poll(lambda: not pod_leftovers(ctd), 10, 0.2)
    assert not pod_leftovers(ctd), "the removed pods left %s" % pod_leftovers(ctd)


def test_cri_large_exec_output_through_a_small_window(ctd, tmp_path):
    """3 MB of ExecSync output through a 64 KiB HTTP/2 window: Go's server waits for our WINDOW_UPDATEs."""
    sandbox, _, client_cfg = pod_configs(ctd, "runc", str(tmp_path))
    small = cri.CriClient(ctd.sock, timeout=30, recv_window=65535)
    sid = ctd.cri.run_pod_sandbox(sandbox, "runc")
    try:
        cid = ctd.cri.create_container(sid, client_cfg, sandbox)
        ctd.cri.start_container(cid)
        rc, out, err = small.exec_sync(cid, ["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x; echo end >&2"], 20)
        assert (rc, len(out), set(out), err) == (0, 3000000, {ord("x")}, b"end\n")
    finally:
        small.close()
        ctd.cri.stop_pod_sandbox(sid)
        ctd.cri.remove_pod_sandbox(sid)
