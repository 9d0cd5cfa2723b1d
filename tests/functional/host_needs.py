"""What the test suite needs from the host, and the Debian package each comes from.

`make test` runs this first (and tests/functional/conftest.py at the start of a session), so a
machine that lacks something fails at once with one line naming it and its package, instead
of an engine's error deep inside a fixture. Every package named here is in the Makefile's
APT_PACKAGES (a unit test checks it), so `make deps` installs it.

    python3 tests/functional/host_needs.py     # prints what is missing; exit 1 if anything
"""
import glob
import os
import shutil
import sys

# (program name or absolute path/glob, Debian package)
NEEDS = [
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("/boot/vmlinuz-*", "linux-image-amd64"),
    ("/bin/busybox", "busybox-static"),
    ("runc", "runc"),
    ("criu", "criu"),  # checkpoint and restore: the guest image carries the host's criu
    ("podman", "podman"),
    ("conmon", "conmon"),
    ("/usr/lib/podman/netavark", "netavark"),
    ("/usr/lib/podman/aardvark-dns", "aardvark-dns"),
    ("catatonit", "catatonit"),
    ("/usr/bin/docker", "docker.io"),
    ("dockerd", "docker.io"),
    ("docker-compose", "docker-compose"),
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("containerd-shim-runc-v2", "containerd"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    ("/usr/lib/cni/host-local", "containernetworking-plugins"),
    ("/usr/lib/cni/loopback", "containernetworking-plugins"),
    ("/usr/lib/cni/portmap", "containernetworking-plugins"),
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("iptables", "iptables"),
    ("nsenter", "util-linux"),
    ("unshare", "util-linux"),
    ("script", "bsdutils"),
    ("hexdump", "bsdextrautils"),
    ("cpio", "cpio"),
    ("ps", "procps"),
]


def _present(what):
    """True when a program is on PATH (or the sbin dirs) or a path/glob exists."""
    if what.startswith("/"):
        return bool(glob.glob(what))
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    return shutil.which(what, path=path) is not None


def missing(needs=NEEDS):
    """The needs this host lacks, as (what, package) pairs."""
    return [(what, pkg) for what, pkg in needs if not _present(what)]


def report(lacking):
    """One line naming what is missing and the packages to install, or '' when nothing is."""
    if not lacking:
        return ""
    pkgs = sorted({pkg for _, pkg in lacking})
    return ("the tests need %s; install %s (make deps, or apt-get install -y %s)"
            % (", ".join("%s (%s)" % pair for pair in lacking),
               "it" if len(pkgs) == 1 else "them", " ".join(pkgs)))


def main():
    """Print what is missing, exit 1 when something is."""
    line = report(missing())
    if line:
        print("host_needs: " + line, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
