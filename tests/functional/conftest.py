"""Fixtures for functional tests: the runtime CLI as a subprocess on busybox bundles, real VMs."""
import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
RUNTIME = os.path.join(REPO, "cc_oci_runtime.py")
if os.environ.get("CC_OCI_TEST_POOL") == "0":  # make test-functional-no-pool: the whole suite
    import json as _json  # with vm.pool 0, for every engine too: a copy beside a vm.json of its own
    _copy = tempfile.mkdtemp(prefix="cc-oci-nopool-")
    for _name in ("cc_oci_runtime.py", "hypervisor.args"):
        subprocess.run(["cp", "-p", os.path.join(REPO, _name), _copy], check=True)
    with open(os.path.join(REPO, "vm.json")) as _f:
        _vm = _json.load(_f)
    _vm["vm"]["pool"] = 0
    with open(os.path.join(_copy, "vm.json"), "w") as _f:
        _json.dump(_vm, _f)
    RUNTIME = os.path.join(_copy, "cc_oci_runtime.py")
    import atexit
    import shutil
    atexit.register(shutil.rmtree, _copy, True)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import engines  # noqa: E402
import host_needs  # noqa: E402
import cc_oci_runtime as rt  # noqa: E402


def pytest_sessionstart(session):
    """Stop at once, in one line, when the host lacks a program or path the suite uses."""
    line = host_needs.report(host_needs.missing())
    if line:
        pytest.exit(line, returncode=3)


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory):
    """One busybox rootfs shared by the session's bundles."""
    return str(engines.make_busybox_rootfs(tmp_path_factory.mktemp("bb") / "rootfs"))


@pytest.fixture(scope="session")
def state_root(tmp_path_factory):
    """The --root of every CLI call; must be empty when the session ends."""
    root = str(tmp_path_factory.mktemp("state"))
    yield root
    leftovers = os.listdir(root)
    qemus = [p for p in _processes() if root in _cwd(p)]
    assert not leftovers and not qemus, "left behind: %s %s" % (leftovers, qemus)


def _processes():
    """Pids of every process on the host."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cwd(pid):
    """A process's working directory, or ''."""
    try:
        return os.readlink("/proc/%d/cwd" % pid)
    except OSError:
        return ""


class Runtime:
    """Runs the runtime CLI with a private --root."""

    def __init__(self, root, tmp_path):
        self.root, self.tmp, self.ids = root, tmp_path, []

    def argv(self, *args):
        """The command line for one call."""
        return [sys.executable, RUNTIME, "--root", self.root] + [str(a) for a in args]

    def __call__(self, *args, input=None, timeout=120, check=False):
        """Run one command; returns CompletedProcess with text output.

        Output goes through files, not pipes: a created container's monitor keeps the
        stdout/stderr it was given, as it does for an engine, so a pipe would not end."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            p = subprocess.run(self.argv(*args), input=input, timeout=timeout, text=True,
                               stdout=out, stderr=err)
            out.seek(0)
            err.seek(0)
            r = subprocess.CompletedProcess(p.args, p.returncode, out.read().decode(),
                                            err.read().decode())
        if check and r.returncode != 0:
            raise AssertionError("%s failed (%d): %s" % (args, r.returncode, r.stderr))
        return r

    def bundle(self, args, **changes):
        """A bundle dir whose config.json runs args; changes update the process or top level."""
        d = self.tmp / ("bundle%d" % len(list(self.tmp.glob("bundle*"))))
        d.mkdir()
        conf = rt.default_spec()
        conf["root"] = {"path": ROOTFS[0], "readonly": False}
        conf["process"].update(terminal=False, args=args)
        for key, value in changes.items():
            if key in conf["process"] or key in ("user", "env", "cwd", "terminal"):
                conf["process"][key] = value
            else:
                conf[key] = value
        (d / "config.json").write_text(json.dumps(conf))
        return str(d)

    def state(self, cid):
        """The parsed `state` JSON."""
        r = self("state", cid, check=True)
        return json.loads(r.stdout)

    def wait_status(self, cid, status, timeout=30):
        """Poll state until it shows status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self("state", cid)
            if r.returncode == 0 and json.loads(r.stdout)["status"] == status:
                return
            time.sleep(0.2)
        raise AssertionError("%s never became %s" % (cid, status))


ROOTFS = [None]


def qemu_names():
    """cc-<id> of each running QEMU's container: its -name, or for a VM from the pool (named after
    itself) the container its directory names (the file "container", its state directory)."""
    names = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
            with open("/proc/%s/stat" % pid) as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        if not os.path.basename(argv[0]).startswith("qemu-system") or "-name" not in argv:
            continue
        name = argv[argv.index("-name") + 1]
        if name.startswith("cc-pool-"):
            try:
                with open(os.path.join(os.readlink("/proc/%s/cwd" % pid), "container")) as f:
                    name = "cc-" + os.path.basename(f.read().strip())[:32]
            except OSError:
                pass  # a VM still in the pool
        names.append(name)
    return names


def is_pool_keeper(argv):
    """Whether a command line is a pooled VM's keeper (or refill): the pool outlives containers."""
    return rt.MONITOR_ARG in argv and argv[argv.index(rt.MONITOR_ARG) + 2:][:1] == [rt.POOL_DIR]


def poll(fn, timeout=30, interval=0.3):
    """Call fn until it returns something truthy; return that (or the last value on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@pytest.fixture
def runtime(rootfs, state_root, tmp_path):
    """A Runtime; every container a test leaves is force-deleted afterwards."""
    ROOTFS[0] = rootfs
    r = Runtime(state_root, tmp_path)
    yield r
    for cid in os.listdir(state_root):
        r("delete", "--force", cid)
