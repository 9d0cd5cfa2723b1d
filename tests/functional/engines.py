"""Drive real container engines (podman, dockerd + its containerd, ctr, and containerd's CRI
plugin as kubelet uses it) against any OCI runtime.

Stdlib only, Python 3.9+, must run as root. Every engine gets private state under the
directory the caller passes (e.g. pytest's tmp_path):

    rootfs = make_busybox_rootfs(tmp_path / "rootfs")
    with Podman(tmp_path / "podman", "/path/to/runtime") as p:
        p.import_image(rootfs, "bb")
        r = p.run_rt("run", "--rm", "--network", "none", "bb", "echo", "hi")   # adds --runtime
    with Docker(tmp_path / "docker", "/path/to/runtime") as d:
        d.import_image(rootfs, "bb")
        d.run_rt("run", "--rm", "--network", "none", "bb", "true")         # adds --runtime NAME
        d.ctr_run(rootfs, "c1", "echo", "hi")                              # ctr run --rootfs
    with Containerd(tmp_path / "ctd", runtimes={"NAME": "/path/to/runtime"}) as c:
        c.import_sandbox_image(rootfs)                                     # the pause image
        sid = c.cri.run_pod_sandbox(config, "NAME")                        # cri.CriClient

Storage: the kernel cannot use overlayfs (or any fs it does not support) as an overlay
upper dir: dockerd's overlay2 then dies with "failed to mount overlay: invalid argument"
/ "error initializing graphdriver: driver not supported" and podman silently switches to
fuse-overlayfs. `overlay_supported()` probes the directory with a real overlay mount and
both classes fall back to the `vfs` driver when it fails (ext4 and tmpfs work with overlay
here, kernel 6.18). Pass storage_driver= to force one.

Host footprint that cannot be avoided with these versions (podman 4.3, docker 20.10,
containerd 1.6): `podman import` writes /var/lib/containers/cache/blob-info-cache-v1.boltdb
(containers/image hardcodes it for root); dockerd creates /etc/docker/key.json and
/run/docker/plugins; containerd shims put sockets in /run/containerd/s. The netavark
network backend would create /run/containers/networks, so the cni backend is configured
with a private (empty) config dir: `--network none` needs no plugin at all, and it is
also the default network mode (netns = "none"), so forgetting it never touches host
networking. dockerd 20.10 starts its own containerd here (socket
EXEC_ROOT/containerd/containerd.sock, docker's namespace "moby"); if a system containerd
serves /run/containerd/containerd.sock it uses that one instead (per dockerd's source, not
tried here), and `Docker.ctr_sock` follows whichever exists.
ctr (containerd 1.6): `--rootfs` is a boolean flag, the first positional is then the rootfs
DIR (used in place, writable) and the second the id; no image config means no PATH, so
`echo` fails with 'exec: "echo": executable file not found in $PATH' unless --env PATH=...
is given (ctr_argv does). --runc-binary picks the runtime, --runc-root/--fifo-dir keep
its state out of /run/containerd.
Path lengths: podman's overlay driver refuses a runroot over 50 characters ("the specified
runroot is longer than 50 characters") and unix socket paths stop at 107 bytes, so with a
long workdir (pytest's tmp_path) the podman runroot / dockerd exec-root become short
/tmp/pmr-* / /tmp/dkx-* directories, removed again by cleanup() / stop().
"""
import contextlib
import ctypes
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import cri  # beside this file

BUSYBOX = "/bin/busybox"
DOCKER_CLI = "/usr/bin/docker"  # /usr/local/bin/docker may be an unrelated newer client
CTR_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_libc = ctypes.CDLL(None, use_errno=True)


def make_busybox_rootfs(d):
    """Create a minimal busybox-static root filesystem in d and return its path."""
    d = os.path.abspath(d)
    for sub in ("bin", "etc", "tmp", "proc", "sys", "dev", "root", "run", "var/tmp"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    os.chmod(os.path.join(d, "tmp"), 0o1777)
    shutil.copy2(BUSYBOX, os.path.join(d, "bin", "busybox"))
    names = subprocess.run([BUSYBOX, "--list"], check=True, capture_output=True, text=True).stdout.split()
    for n in names:
        link = os.path.join(d, "bin", n)
        if n != "busybox" and not os.path.lexists(link):
            os.symlink("busybox", link)
    files = {"etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
             "etc/group": "root:x:0:\nnogroup:x:65534:\n"}
    for rel, text in files.items():
        with open(os.path.join(d, rel), "w") as f:
            f.write(text)
    return d


def overlay_supported(d):
    """Return True if a kernel overlay mount with its upper dir inside d works."""
    os.makedirs(d, exist_ok=True)
    p = tempfile.mkdtemp(prefix=".ovl-probe-", dir=d)
    try:
        for s in ("l", "u", "w", "m"):
            os.mkdir(os.path.join(p, s))
        opts = "lowerdir={0}/l,upperdir={0}/u,workdir={0}/w".format(p)
        ok = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, p + "/m"],
                            capture_output=True).returncode == 0
        if ok:
            _libc.umount2((p + "/m").encode(), 2)
        return ok
    finally:
        shutil.rmtree(p, ignore_errors=True)


def mounts_under(path):
    """Mount points at or below path, most recent first (the unmount order)."""
    path = os.path.realpath(path)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if (mp == path or mp.startswith(path.rstrip("/") + "/")) and mp not in out:
                out.append(mp)
    return out[::-1]


def unmount_under(path):
    """Lazily unmount everything mounted at or below path."""
    for mp in mounts_under(path):
        _libc.umount2(mp.encode(), 2)  # MNT_DETACH; errors (already gone) are ignored


def remove_cgroups(*rel):
    """rmdir leftover (empty) cgroups /sys/fs/cgroup/[CONTROLLER/]REL, e.g. docker/<id> after a crash."""
    for r in rel:
        for d in glob.glob("/sys/fs/cgroup/*/" + r) + glob.glob("/sys/fs/cgroup/" + r):
            try:
                os.rmdir(d)
            except OSError:
                pass


def _ids(d):
    """Container ids = subdirectory names of d (empty if d is missing)."""
    return os.listdir(d) if os.path.isdir(d) else []


def proc_table():
    """Map pid -> (ppid, argv list, state) for every process."""
    res = {}
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % e) as f:
                st = f.read().rsplit(")", 1)[1].split()
            with open("/proc/%s/cmdline" % e, "rb") as f:
                argv = f.read().decode("utf-8", "replace").split("\0")
        except OSError:
            continue
        res[int(e)] = (int(st[1]), argv, st[0])
    return res


def _procs():
    """Map pid -> (ppid, cmdline string, state) for all live processes."""
    return {pid: (pp, " ".join(argv), st) for pid, (pp, argv, st) in proc_table().items()}


def find_procs(*markers):
    """Pids (plus descendants) whose cmdline has a marker path (not a prefix of a longer name); never us or our ancestors."""
    procs = _procs()
    mine, p = set(), os.getpid()
    while p > 0 and p not in mine:
        mine.add(p)
        p = procs.get(p, (0,))[0]
    pat = re.compile("|".join(re.escape(str(m)) + r"(?=[/\s=,:]|$)" for m in markers if m) or "(?!)")
    hits = {pid for pid, (_, cmd, st) in procs.items() if st != "Z" and pid not in mine and pat.search(cmd)}
    changed = True
    while changed:
        kids = {pid for pid, (pp, _, st) in procs.items() if pp in hits and st != "Z" and pid not in mine}
        changed = not kids <= hits
        hits |= kids
    return sorted(hits)


def terminate(proc, timeout):
    """SIGTERM a daemon we started, SIGKILL it after timeout seconds; reaped either way."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def shim_sockets(pids):
    """/run/containerd/s socket paths of the containerd-shim-runc-v2 processes among pids."""
    procs, out = _procs(), []
    for pid in pids:
        a = procs.get(pid, (0, "", ""))[1].split()
        if a and "containerd-shim" in a[0] and {"-address", "-namespace", "-id"} <= set(a):
            key = os.path.join(*(a[a.index(f) + 1] for f in ("-address", "-namespace", "-id")))
            out.append("/run/containerd/s/" + hashlib.sha256(key.encode()).hexdigest())
    return out


def kill_procs(*markers, timeout=5.0):
    """SIGKILL processes found by find_procs(*markers) and wait until they are gone or zombies."""
    pids = find_procs(*markers)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    end = time.monotonic() + timeout
    while pids and time.monotonic() < end:
        procs = _procs()
        pids = [p for p in pids if p in procs and procs[p][2] != "Z"]
        time.sleep(0.05)
    return pids


def _run(argv, env=None, **kw):
    """subprocess.run with text capture and a timeout unless the caller says otherwise."""
    if not {"stdout", "stderr", "capture_output"} & kw.keys():
        kw["capture_output"] = True
    if not {"text", "encoding", "universal_newlines"} & kw.keys():
        kw["text"] = True
    kw.setdefault("timeout", 120)
    return subprocess.run([str(a) for a in argv], env=env, **kw)


def _tar(rootfs, tarball):
    """Write rootfs as an uncompressed tar (numeric owners) and return the tar path."""
    subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tarball), "."], check=True)
    return str(tarball)


class Podman:
    """podman with private root/runroot/tmpdir/config and `runtime_path` registered as `runtime_name`."""

    def __init__(self, workdir, runtime_path, runtime_name="cc-oci-runtime", storage_driver=None,
                 network=False, runroot=None):
        """Write containers.conf and storage.conf under workdir; nothing is started.

        network=True: podman's default bridge network through netavark (+ aardvark-dns), with
        its network configs in workdir/networks; otherwise no network at all (see above).
        runroot: that run root instead of one under workdir (another podman's, once it is gone:
        two hosts with podman's default paths); it is removed at cleanup."""
        self.dir = os.path.abspath(workdir)
        os.makedirs(self.dir, exist_ok=True)
        self.runtime_path, self.runtime_name = os.path.abspath(runtime_path), runtime_name
        self.driver = storage_driver or ("overlay" if overlay_supported(self.dir) else "vfs")
        self.root, self.runroot, self.tmpdir = (os.path.join(self.dir, n) for n in ("root", "runroot", "tmp"))
        self.short_run = None
        if runroot:
            self.runroot = self.short_run = runroot
        elif len(self.runroot) > 50:  # c/storage overlay: "the specified runroot is longer than 50 characters"
            self.runroot = self.short_run = tempfile.mkdtemp(prefix="pmr-", dir="/tmp")
        conf, sconf = os.path.join(self.dir, "containers.conf"), os.path.join(self.dir, "storage.conf")
        names = sorted({runtime_name, os.path.basename(self.runtime_path)})  # podman 4.3 matches the registered name
        net = ('[network]\nnetwork_backend = "netavark"\nnetwork_config_dir = "%s/networks"\n\n' % self.dir
               if network else
               'netns = "none"\n\n[network]\nnetwork_backend = "cni"\ncni_plugin_dirs = ["/usr/lib/cni"]\n'
               'network_config_dir = "%s/net.d"\n\n' % self.dir)
        with open(conf, "w") as f:
            f.write('[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
                    + net +
                    '[engine]\nlock_type = "file"\nevents_logger = "file"\ncgroup_manager = "cgroupfs"\n'
                    'runtime_supports_json = [%s]\n\n'
                    '[engine.runtimes]\n"%s" = ["%s"]\n'
                    % (", ".join('"%s"' % n for n in names), runtime_name, self.runtime_path))
        with open(sconf, "w") as f:
            f.write('[storage]\ndriver = "%s"\ngraphroot = "%s"\nrunroot = "%s"\n'
                    % (self.driver, self.root, self.runroot))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINER_")}
        self.env.update(CONTAINERS_CONF=conf, CONTAINERS_STORAGE_CONF=sconf)
        self.base = ["podman", "--root", self.root, "--runroot", self.runroot, "--tmpdir", self.tmpdir,
                     "--cgroup-manager", "cgroupfs", "--events-backend", "file", "--storage-driver", self.driver]

    def argv(self, *args):
        """Full podman argv with the private global flags."""
        return self.base + [str(a) for a in args]

    def cmd(self, *args):
        """Full argv that also selects the runtime under test (global --runtime NAME)."""
        return self.argv("--runtime", self.runtime_name, *args)

    def run(self, *args, **kw):
        """Run podman with private state; returns CompletedProcess (text, captured, 120 s timeout by default)."""
        return _run(self.argv(*args), env=self.env, **kw)

    def run_rt(self, *args, **kw):
        """Like run() but with --runtime NAME."""
        return _run(self.cmd(*args), env=self.env, **kw)

    def import_image(self, rootfs_dir, name):
        """Import a rootfs directory as image localhost/NAME; returns the image id."""
        tarball = _tar(rootfs_dir, os.path.join(self.dir, "import.tar"))
        try:
            r = self.run("import", "--quiet", tarball, name)
        finally:
            os.unlink(tarball)
        if r.returncode:
            raise RuntimeError("podman import failed: " + r.stderr)
        return r.stdout.strip()

    def cleanup(self):
        """Remove all containers, kill leftover conmon/podman processes and unmount everything under workdir."""
        try:
            self.run("rm", "-af", "-t", "0", timeout=60)
        except subprocess.TimeoutExpired:
            pass
        kill_procs(self.dir, self.short_run)
        for d in (self.dir, self.short_run):
            if d:
                unmount_under(d)
        if self.short_run:
            shutil.rmtree(self.short_run, ignore_errors=True)
        remove_cgroups(*("libpod_parent/libpod-" + i for i in _ids(self.root + "/%s-containers" % self.driver)))

    close = cleanup

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()


class Docker:
    """A private dockerd (and the containerd it starts) with `runtime_path` added as `runtime_name`."""

    def __init__(self, workdir, runtime_path, runtime_name="cc-oci-runtime", storage_driver=None,
                 start_timeout=60, network=False, extra_runtimes=None, experimental=False):
        """Start dockerd in the background and wait until `docker info` answers.

        experimental=True: dockerd's experimental features (docker checkpoint).

        extra_runtimes: {name: path} of more runtimes to register (--add-runtime) beside it.

        network=True: docker's default bridge (docker0) with iptables and NAT, as on a usual
        host; stop() deletes docker0 again (dockerd leaves it and its iptables chains)."""
        self.dir = os.path.abspath(workdir)
        os.makedirs(self.dir, exist_ok=True)
        self.runtime_path, self.runtime_name = os.path.abspath(runtime_path), runtime_name
        self.driver = storage_driver or ("overlay2" if overlay_supported(self.dir) else "vfs")
        self.data_root = os.path.join(self.dir, "data")
        self.exec_root = os.path.join(self.dir, "exec")
        self.short_exec = None
        if len(self.exec_root) > 70:  # containerd.sock.ttrpc / libnetwork/<id>.sock must fit in 107 bytes
            self.exec_root = self.short_exec = tempfile.mkdtemp(prefix="dkx-", dir="/tmp")
        self.sock = os.path.join(self.exec_root, "docker.sock")
        self.ctr_sock = os.path.join(self.exec_root, "containerd", "containerd.sock")
        self.pidfile = os.path.join(self.dir, "dockerd.pid")
        self.log = os.path.join(self.dir, "dockerd.log")
        conf = os.path.join(self.dir, "daemon.json")  # keep /etc/docker/daemon.json out
        with open(conf, "w") as f:
            f.write('{"experimental": true}\n' if experimental else "{}\n")
        os.makedirs(os.path.join(self.dir, "client"), exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        self.env["DOCKER_CONFIG"] = os.path.join(self.dir, "client")
        self.base = [DOCKER_CLI, "-H", "unix://" + self.sock]
        self.dockerd_argv = [
            "dockerd", "--config-file", conf, "--data-root", self.data_root, "--exec-root", self.exec_root,
            "--pidfile", self.pidfile, "-H", "unix://" + self.sock] + ([] if network else [
            "--iptables=false", "--ip6tables=false", "--ip-masq=false", "--bridge=none"]) + [
            "--storage-driver", self.driver, "--shutdown-timeout", "2",
            "--add-runtime", "%s=%s" % (runtime_name, self.runtime_path)]
        for name, path in (extra_runtimes or {}).items():
            self.dockerd_argv += ["--add-runtime", "%s=%s" % (name, os.path.abspath(path))]
        self.network = network
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(self.dockerd_argv, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=lambda: _libc.prctl(1, signal.SIGTERM))  # PDEATHSIG
        end = time.monotonic() + start_timeout
        while True:
            if self.proc.poll() is not None or time.monotonic() > end:
                tail = open(self.log, errors="replace").read()[-3000:]
                self.stop()
                raise RuntimeError("dockerd did not start:\n" + tail)
            if os.path.exists(self.sock) and self.run("info", timeout=10).returncode == 0:
                break
            time.sleep(0.1)
        if not os.path.exists(self.ctr_sock):  # dockerd chose a system containerd
            self.ctr_sock = "/run/containerd/containerd.sock"

    def argv(self, *args):
        """Full /usr/bin/docker argv talking to the private daemon."""
        return self.base + [str(a) for a in args]

    def cmd(self, *args):
        """Full argv with `--runtime NAME` inserted after a leading run/create subcommand."""
        args = [str(a) for a in args]
        i = 2 if args[:1] == ["container"] else 1
        if args[i - 1:i] in (["run"], ["create"]):
            args[i:i] = ["--runtime", self.runtime_name]
        return self.argv(*args)

    def run(self, *args, **kw):
        """Run the docker client against the private daemon; returns CompletedProcess."""
        return _run(self.argv(*args), env=self.env, **kw)

    def run_rt(self, *args, **kw):
        """Like run() but `docker run/create` get --runtime NAME."""
        return _run(self.cmd(*args), env=self.env, **kw)

    def ctr(self, *args, **kw):
        """Run `ctr -a CONTAINERD_SOCK ARGS` against dockerd's containerd (default namespace unless -n)."""
        return _run(["ctr", "-a", self.ctr_sock] + list(args), env=self.env, **kw)

    def ctr_argv(self, rootfs, cid, *command, run_flags=()):
        """ctr argv for `run --rm --rootfs` with the runtime under test (PATH set: no image config)."""
        return (["ctr", "-a", self.ctr_sock, "run", "--rm", "--runc-binary", self.runtime_path,
                 "--runc-root", os.path.join(self.exec_root, "ctr-runc"),
                 "--fifo-dir", os.path.join(self.exec_root, "ctr-fifo"), "--env", CTR_PATH]
                + list(run_flags) + ["--rootfs", os.path.abspath(rootfs), cid] + list(command))

    def ctr_run(self, rootfs, cid, *command, run_flags=(), **kw):
        """Run a container straight from a rootfs directory with ctr; returns CompletedProcess."""
        return _run(self.ctr_argv(rootfs, cid, *command, run_flags=run_flags), env=self.env, **kw)

    def import_image(self, rootfs_dir, name):
        """Import a rootfs directory as image NAME:latest; returns the image id."""
        tarball = _tar(rootfs_dir, os.path.join(self.dir, "import.tar"))
        try:
            r = self.run("import", tarball, name)
        finally:
            os.unlink(tarball)
        if r.returncode:
            raise RuntimeError("docker import failed: " + r.stderr)
        return r.stdout.strip()

    def stop(self, timeout=20):
        """Remove containers, SIGTERM dockerd (SIGKILL after timeout), kill leftovers, unmount, tidy up."""
        if self.proc.poll() is None:
            try:
                ids = self.run("ps", "-aq", timeout=10).stdout.split()
                if ids:
                    self.run("rm", "-f", *ids, timeout=30)
            except subprocess.TimeoutExpired:
                pass
            terminate(self.proc, timeout)
        socks = shim_sockets(find_procs(self.exec_root, self.dir))  # a SIGKILLed shim leaves its socket file behind
        kill_procs(self.exec_root, self.dir)  # containerd, containerd-shim-runc-v2 and their children
        for sock in socks:
            with contextlib.suppress(OSError):
                os.unlink(sock)
        unmount_under(self.dir)
        remove_cgroups(*("docker/" + i for i in _ids(os.path.join(self.data_root, "containers"))))
        if self.short_exec:
            unmount_under(self.short_exec)
            shutil.rmtree(self.short_exec, ignore_errors=True)
        if self.network:
            _run(["ip", "link", "del", "docker0"])

    close = stop

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def make_image_tar(rootfs, tarball, name, cmd=("sleep", "infinity"), env=(CTR_PATH,)):
    """Write rootfs as a one-layer OCI image archive named name that `ctr images import` takes.

    The archive is an OCI image layout (oci-layout, index.json, blobs/sha256/...): an
    uncompressed layer, a config with cmd/env for this machine's architecture, and the
    manifest listed in index.json with io.containerd.image.name = name (ctr names the
    image by it). Returns the tarball path."""
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    work = tempfile.mkdtemp(prefix=".image-", dir=os.path.dirname(os.path.abspath(tarball)))
    try:
        blobs = os.path.join(work, "blobs", "sha256")
        os.makedirs(blobs)
        layer = _tar(rootfs, os.path.join(work, "layer.tar"))
        h = hashlib.sha256()
        with open(layer, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        layer_digest, layer_size = h.hexdigest(), os.path.getsize(layer)
        os.rename(layer, os.path.join(blobs, layer_digest))

        def blob(obj):
            data = json.dumps(obj, sort_keys=True).encode()
            digest = hashlib.sha256(data).hexdigest()
            with open(os.path.join(blobs, digest), "wb") as f:
                f.write(data)
            return {"digest": "sha256:" + digest, "size": len(data)}

        config = blob({"architecture": arch, "os": "linux",
                       "config": {"Env": list(env), "Cmd": list(cmd), "WorkingDir": "/"},
                       "rootfs": {"type": "layers", "diff_ids": ["sha256:" + layer_digest]},
                       "history": [{"created_by": "tests/functional/engines.py make_image_tar"}]})
        manifest = blob({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                         "config": dict(config, mediaType="application/vnd.oci.image.config.v1+json"),
                         "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                     "digest": "sha256:" + layer_digest, "size": layer_size}]})
        index = {"schemaVersion": 2, "manifests": [dict(
            manifest, mediaType="application/vnd.oci.image.manifest.v1+json",
            platform={"architecture": arch, "os": "linux"},
            annotations={"io.containerd.image.name": name,
                         "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]})]}
        with open(os.path.join(work, "index.json"), "w") as f:
            json.dump(index, f)
        with open(os.path.join(work, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
        subprocess.run(["tar", "-C", work, "-cf", os.path.abspath(tarball), "oci-layout", "index.json", "blobs"],
                       check=True)
        return str(tarball)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def remove_cgroup_tree(rel):
    """rmdir /sys/fs/cgroup/[CONTROLLER/]REL and the (empty) cgroups below it, deepest first."""
    for top in glob.glob("/sys/fs/cgroup/*/" + rel.strip("/")) + glob.glob("/sys/fs/cgroup/" + rel.strip("/")):
        for d, _, _ in sorted(os.walk(top), key=lambda t: -t[0].count("/")):
            try:
                os.rmdir(d)
            except OSError:
                pass


def _free_subnet(prefix="10.234."):
    """A PREFIX.N.0/24 that no address or route of the host uses (N random)."""
    used = _run(["ip", "-4", "-o", "addr"]).stdout + _run(["ip", "-4", "route", "show", "table", "all"]).stdout
    free = [n for n in range(256) if "%s%d." % (prefix, n) not in used]
    if not free:
        raise RuntimeError("no free %s*.0/24 subnet" % prefix)
    return "%s%d" % (prefix, free[int.from_bytes(os.urandom(2), "big") % len(free)])


class Containerd:
    """A private containerd whose CRI plugin has the handler runc and one per given runtime.

    Everything lives under workdir (root) and a short state dir (grpc socket, shim bundles,
    netns mounts, runc roots); nothing in /etc, /var/lib or /opt. Networking is CNI's bridge
    plugin on a private bridge `bridge` (cri-XXXXXX) that this class creates up front with
    the gateway address of a private /24 `subnet`, so the plugin never sets it up itself:
    isGateway stays false and with it the host's ip_forward; no ipMasq and no portmap, so
    no iptables rules. host-local keeps its leases in workdir. Use it with cri.CriClient:

        with Containerd(tmp_path / "ctd", runtimes={"ccrt": RUNTIME}) as c:
            c.import_image(rootfs, "localhost/bb:1")
            sid = c.cri.run_pod_sandbox(config, "runc")

    Pods should use linux.cgroup_parent below `cgroup_parent` (kubelet makes a pod cgroup
    per pod; containerd does not remove it): stop() removes that cgroup tree.
    Unavoidable host footprint (containerd 1.6): shim sockets in /run/containerd/s (removed
    by the shims, or by stop() after a SIGKILL) and libcni's result cache /var/lib/cni/results
    (its entries go at CNI DEL; the directory stays).
    """

    SANDBOX_IMAGE = "localhost/cri-pause:1"  # imported from busybox by import_image(); `sleep infinity`

    def __init__(self, workdir, runtimes=None, start_timeout=60, snapshotter=None):
        """Write the config and start containerd; wait until CRI answers with its network ready.

        runtimes: {handler name: runtime binary} added beside "runc" (the system runc)."""
        self.dir = os.path.abspath(workdir)
        os.makedirs(self.dir, exist_ok=True)
        self.root = os.path.join(self.dir, "root")
        self.state = os.path.join(self.dir, "state")
        self.short_state = None
        if len(self.state) > 40:  # grpc socket + ".ttrpc", shim bundles, netns paths
            self.state = self.short_state = tempfile.mkdtemp(prefix="ctd-", dir="/tmp")
        self.sock = os.path.join(self.state, "c.sock")
        self.log = os.path.join(self.dir, "containerd.log")
        token = os.urandom(3).hex()
        self.bridge = "cri-" + token
        self.cgroup_parent = "/cri-test-" + token
        self.snapshotter = snapshotter or ("overlayfs" if overlay_supported(self.dir) else "native")
        self.runtimes = {"runc": shutil.which("runc") or "/usr/sbin/runc"}
        self.runtimes.update({n: os.path.abspath(p) for n, p in (runtimes or {}).items()})
        self.cni_conf_dir = os.path.join(self.dir, "net.d")
        shutil.rmtree(self.cni_conf_dir, ignore_errors=True)  # a reused workdir's conf names another bridge
        os.makedirs(self.cni_conf_dir)
        self.proc = None
        net = _free_subnet()
        self.subnet, self.gateway = net + ".0/24", net + ".1"
        for argv in (["ip", "link", "add", self.bridge, "type", "bridge"],
                     ["ip", "addr", "add", self.gateway + "/24", "dev", self.bridge],
                     ["ip", "link", "set", self.bridge, "up"]):
            r = _run(argv)
            if r.returncode:
                self.stop()
                raise RuntimeError("%s: %s" % (" ".join(argv), r.stderr))
        with open(os.path.join(self.cni_conf_dir, "10-%s.conflist" % self.bridge), "w") as f:
            json.dump({"cniVersion": "0.4.0", "name": self.bridge, "plugins": [{
                "type": "bridge", "bridge": self.bridge, "isGateway": False, "ipMasq": False,
                "ipam": {"type": "host-local", "dataDir": os.path.join(self.dir, "cni-ipam"),
                         "ranges": [[{"subnet": self.subnet, "gateway": self.gateway}]],
                         "routes": [{"dst": "0.0.0.0/0"}]}}]}, f, indent=1)
        self.config = os.path.join(self.dir, "config.toml")
        with open(self.config, "w") as f:
            f.write(self._config_toml())
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(["containerd", "--config", self.config], stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=lambda: _libc.prctl(1, signal.SIGTERM))  # PDEATHSIG
        self.cri = cri.CriClient(self.sock, timeout=60)
        end = time.monotonic() + start_timeout
        while True:
            failed = self.proc.poll() is not None or time.monotonic() > end
            if os.path.exists(self.sock) and not failed:
                try:
                    if self.cri.status().get("NetworkReady", (False,))[0]:
                        break
                except OSError:
                    pass
                except cri.GrpcError as e:
                    failed = e.code == 12  # UNIMPLEMENTED: the CRI plugin failed to load
            if failed:
                tail = open(self.log, errors="replace").read()[-3000:]
                self.stop()
                raise RuntimeError("containerd did not start:\n" + tail)
            time.sleep(0.1)

    def _config_toml(self):
        cri_plugin = 'plugins."io.containerd.grpc.v1.cri"'
        lines = [
            "version = 2",
            'root = "%s"' % self.root,
            'state = "%s"' % self.state,
            # not needed by CRI with overlayfs/native; opt would create /opt/containerd
            "disabled_plugins = [%s]" % ", ".join('"io.containerd.%s"' % p for p in (
                "snapshotter.v1.aufs", "snapshotter.v1.btrfs", "snapshotter.v1.devmapper", "snapshotter.v1.zfs",
                "tracing.processor.v1.otlp", "internal.v1.tracing", "internal.v1.opt")),
            "", "[grpc]", 'address = "%s"' % self.sock,
            "", "[%s]" % cri_plugin,
            'sandbox_image = "%s"' % self.SANDBOX_IMAGE,
            "restrict_oom_score_adj = true",  # root here lacks CAP_SYS_RESOURCE (kubelet's -998)
            "netns_mounts_under_state_dir = true",
            "disable_apparmor = true",
            'stream_server_address = "127.0.0.1"',
            'stream_server_port = "0"',
            "", "[%s.cni]" % cri_plugin,
            'bin_dir = "/usr/lib/cni"', 'conf_dir = "%s"' % self.cni_conf_dir, "max_conf_num = 1",
            "", "[%s.containerd]" % cri_plugin,
            'default_runtime_name = "runc"', 'snapshotter = "%s"' % self.snapshotter]
        for name, path in self.runtimes.items():
            section = '%s.containerd.runtimes."%s"' % (cri_plugin, name)
            lines += ["", "[%s]" % section, 'runtime_type = "io.containerd.runc.v2"',
                      "", "[%s.options]" % section, 'BinaryName = "%s"' % path,
                      'Root = "%s"' % os.path.join(self.state, "runtime-" + name)]
        return "\n".join(lines) + "\n"

    def ctr(self, *args, **kw):
        """Run `ctr -a SOCK -n k8s.io ARGS` (CRI's namespace); returns CompletedProcess."""
        return _run(["ctr", "-a", self.sock, "-n", "k8s.io"] + list(args), **kw)

    def import_image(self, rootfs_dir, name, cmd=("sleep", "infinity")):
        """Import rootfs as image name (into CRI's namespace, unpacked for its snapshotter)."""
        tarball = make_image_tar(rootfs_dir, os.path.join(self.dir, "image.tar"), name, cmd)
        try:
            r = self.ctr("images", "import", "--snapshotter", self.snapshotter, tarball)
        finally:
            os.unlink(tarball)
        if r.returncode:
            raise RuntimeError("ctr images import failed: " + r.stderr)
        end = time.monotonic() + 30  # CRI learns of the image from containerd's events
        while self.cri.image_status(name) is None:
            if time.monotonic() > end:
                raise RuntimeError("CRI does not see image %s" % name)
            time.sleep(0.05)
        return name

    def import_sandbox_image(self, rootfs_dir):
        """Import rootfs as SANDBOX_IMAGE, the pause container (`sleep infinity`)."""
        return self.import_image(rootfs_dir, self.SANDBOX_IMAGE)

    def remove_pods(self, timeout=60):
        """StopPodSandbox + RemovePodSandbox of every sandbox (and so of every container)."""
        for sb in self.cri.list_pod_sandbox():
            self.cri.stop_pod_sandbox(sb["id"])
            self.cri.remove_pod_sandbox(sb["id"])

    def leftovers(self):
        """What a stopped containerd left on the host: processes, mounts, links, cgroups, shim sockets."""
        out = {}
        procs = find_procs(self.state, self.dir)
        if procs:
            out["processes"] = {p: _procs().get(p, (0, "?"))[1][:200] for p in procs}
        mounts = mounts_under(self.dir) + (mounts_under(self.state) if self.short_state else [])
        if mounts:
            out["mounts"] = mounts
        if os.path.exists("/sys/class/net/" + self.bridge):
            out["bridge"] = self.bridge
        veths = [n for n in os.listdir("/sys/class/net")
                 if os.path.realpath("/sys/class/net/%s/master" % n).endswith("/" + self.bridge)]
        if veths:
            out["bridge ports"] = veths
        cgroups = [d for d in glob.glob("/sys/fs/cgroup/*" + self.cgroup_parent)
                   + glob.glob("/sys/fs/cgroup" + self.cgroup_parent) if os.path.isdir(d)]
        if cgroups:
            out["cgroups"] = cgroups
        rules = [l for l in _run(["iptables-save"]).stdout.splitlines() if self.bridge in l or self.subnet in l]
        if rules:
            out["iptables"] = rules
        return out

    def stop(self, timeout=20):
        """Remove all pods, SIGTERM containerd (SIGKILL after timeout), kill leftovers, unmount, tidy up."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.remove_pods()
            except Exception:  # a wedged runtime: whatever is left is killed below
                pass
            self.cri.close()
            terminate(self.proc, timeout)
        socks = shim_sockets(find_procs(self.state, self.dir))  # a SIGKILLed shim leaves its socket file behind
        kill_procs(self.state, self.dir)  # shims, pause and workload processes
        for sock in socks:
            with contextlib.suppress(OSError):
                os.unlink(sock)
        unmount_under(self.dir)
        if self.short_state:
            unmount_under(self.short_state)
            shutil.rmtree(self.short_state, ignore_errors=True)
        _run(["ip", "link", "del", self.bridge])
        remove_cgroup_tree(self.cgroup_parent)

    close = stop

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def median_time(fn, n=5):
    """Median wall time in seconds of n calls of fn()."""
    times = []
    for _ in range(n):
        t = time.monotonic()
        fn()
        times.append(time.monotonic() - t)
    return statistics.median(times)


def _self_test(runtime, base):
    """Exercise podman, docker and ctr with `runtime` under directory base; print timings."""
    def check(r, want_rc=0, want_out=None):
        assert r.returncode == want_rc, (r.args, r.returncode, r.stdout, r.stderr)
        assert want_out is None or r.stdout.strip() == want_out, (r.args, r.stdout, r.stderr)

    rootfs = make_busybox_rootfs(os.path.join(base, "rootfs"))
    res = {}
    with Podman(os.path.join(base, "podman"), runtime) as p:
        print("podman storage driver:", p.driver)
        p.import_image(rootfs, "bb")
        check(p.run_rt("run", "--rm", "--network", "none", "bb", "echo", "hi"), 0, "hi")
        check(p.run_rt("run", "--rm", "--network", "none", "bb", "sh", "-c", "exit 42"), 42)
        check(p.run_rt("run", "--rm", "bb", "cat", "/proc/self/limits"))
        check(p.run_rt("run", "-d", "--name", "sleeper", "bb", "sleep", "1000"))  # left for cleanup()
        res["podman"] = median_time(lambda: check(p.run_rt("run", "--rm", "--network", "none", "bb", "true")))
    with Docker(os.path.join(base, "docker"), runtime) as d:
        print("docker storage driver:", d.driver, " containerd socket:", d.ctr_sock)
        d.import_image(rootfs, "bb")
        check(d.run("run", "--rm", "--network", "none", "--runtime", d.runtime_name, "bb", "echo", "hi"), 0, "hi")
        check(d.run_rt("run", "--rm", "--network", "none", "bb", "sh", "-c", "exit 42"), 42)
        check(d.run_rt("run", "-d", "--network", "none", "bb", "sleep", "1000"))  # left for stop()
        res["docker"] = median_time(lambda: check(d.run_rt("run", "--rm", "--network", "none", "bb", "true")))
        ctr_root = make_busybox_rootfs(os.path.join(base, "ctr-rootfs"))
        check(d.ctr_run(ctr_root, "c1", "echo", "hi"), 0, "hi")
        check(d.ctr_run(ctr_root, "c2", "sh", "-c", "exit 42"), 42)
        res["ctr"] = median_time(lambda: check(d.ctr_run(ctr_root, "c3", "true")))
        check(d.ctr("containers", "ls", "-q"), 0, "")
    left = find_procs(base) + find_procs(d.exec_root)
    assert not left, ("processes left behind", left)
    assert not mounts_under(base), ("mounts left behind", mounts_under(base))
    for k, v in res.items():
        print("%-7s run --rm bb true: median of 5 = %.3f s" % (k, v))
    return res


if __name__ == "__main__":
    rt = sys.argv[1] if len(sys.argv) > 1 else (shutil.which("runc") or "/usr/sbin/runc")
    top = tempfile.mkdtemp(prefix="engines-selftest-", dir=sys.argv[2] if len(sys.argv) > 2 else None)
    try:
        _self_test(rt, top)
        print("self-test OK (runtime %s)" % rt)
    finally:
        unmount_under(top)
        shutil.rmtree(top, ignore_errors=True)
