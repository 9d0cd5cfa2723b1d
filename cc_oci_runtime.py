#!/usr/bin/env python3
# Copyright 2026 The cc-oci-runtime authors. Licensed under the Apache License 2.0.
"""cc-oci-runtime: an OCI runtime that runs every container inside its own QEMU VM.

One file, four roles (read top to bottom):
  CLI      one short-lived process per OCI command (create, start, kill, ...);
  monitor  one per container, forked by create: parent of QEMU, relays stdio and
           signals, exits with the workload's status (its pid is the --pid-file pid);
  QEMU     the VM, started from hypervisor.args (@TAG@ expansion) and vm.json;
  agent    this same file as PID 1 in the guest, from an initramfs built from the
           host's own Python and kernel modules; the rootfs arrives over virtio-9p,
           host and agent talk over a virtio-serial port, and the container's network
           namespace reaches the guest through virtio-net NICs on taps (see Network).

Sections: constants - utilities - logging - state - spec handlers - hypervisor -
guest image - agent protocol - network - monitor - agent - commands - main.
"""

import errno
import fcntl
import json
import os
import signal
import socket
import struct
import sys
import time

# ===========================================================================
# Constants and defaults
# ===========================================================================

__version__ = "0.2.0"
OCI_VERSION = "1.0.2"
PROG = "cc-oci-runtime"
DEFAULT_ROOT = "/run/cc-oci-runtime"
SCRIPT_DIR = os.path.dirname(os.path.realpath(__file__))
CONFIG_DIRS = ("/etc/cc-oci-runtime", "/usr/share/defaults/cc-oci-runtime", SCRIPT_DIR)
CACHE_DIR = os.environ.get("CC_OCI_CACHE_DIR", "/var/cache/cc-oci-runtime")
MAX_ID_LEN = 1024
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)
# Signals whose default action does not end a process (a created container survives them).
HARMLESS_SIGNALS = (signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH)
GUEST_MODULES = ("virtio_mmio", "virtio_pci", "virtio_console", "9pnet_virtio", "9p",
                 "virtio_net")
AGENT_PORT = "agent"
GUEST_MODULES_DIR = "/cc/modules"
ROOTFS_TAG = "rootfs"
DEFAULT_VM = {
    "path": "qemu-system-x86_64",
    "kernel": {"path": "", "parameters": ""},
    "image": "",
    "accel": "auto",
    "machine": "microvm",
    "memory": "256M",
    "cpus": 1,
    "boot_timeout": 60,
}
# The built-in hypervisor.args (the repository's copy is the same text): used when no
# hypervisor.args file is found, so that the runtime works as one copied file.
DEFAULT_HYPERVISOR_ARGS = """\
# QEMU arguments for one container's VM: one argument per line, # starts a comment.
# @TAG@ is replaced by the runtime (see README.md, "hypervisor.args tags"); a line that
# is only a list tag (@SHARES@) becomes several arguments. QEMU runs in the container's
# state directory, so the socket tags are short relative paths.
-name
@NAME@
-uuid
@UUID@
-machine
@MACHINE@
-accel
@ACCEL@
-cpu
@CPU@
-m
@MEMORY@
-smp
@CPUS@
-nodefaults
-no-user-config
-nographic
-no-reboot
-kernel
@KERNEL@
-initrd
@IMAGE@
-append
@KERNEL_PARAMS@
# QMP control socket (pause/resume, stats)
-qmp
unix:@COMMS_SOCKET@,server=on,wait=off
# guest kernel console, kept for debugging
-chardev
file,id=console,path=@CONSOLE_DEVICE@
-serial
chardev:console
# host <-> agent channel (QEMU connects to the monitor's socket)
-chardev
socket,id=agent,path=@AGENT_CTL_SOCKET@
-device
virtio-serial-@VIRTIO@
-device
virtserialport,chardev=agent,name=@AGENT_PORT@
# the rootfs and bind-mount sources over virtio-9p
@SHARES@
# one virtio-net NIC per slot, on a tap QEMU opens in the container's network namespace
@NETWORK@
# warm start: guest RAM in a file, restored from the saved template VM (empty on a cold boot)
@MEMORY_BACKEND@
@INCOMING@
"""
BASE_KERNEL_PARAMS = ("quiet panic=-1 reboot=k no_timer_check tsc=reliable i8042.noaux "
                      "i8042.nomux i8042.nopnp i8042.dumbkbd console=ttyS0 rdinit=/init")
# Mount flags (linux/mount.h) used by the agent and by option parsing.
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_SYNCHRONOUS = 1, 2, 4, 8, 16
MS_REMOUNT, MS_MANDLOCK, MS_DIRSYNC, MS_NOATIME, MS_NODIRATIME = 32, 64, 128, 1024, 2048
MS_BIND, MS_REC, MS_PRIVATE, MS_SLAVE, MS_SHARED = 4096, 16384, 1 << 18, 1 << 19, 1 << 20
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
MOUNT_OPTIONS = {  # option: (flag, set?)
    "ro": (MS_RDONLY, True), "rw": (MS_RDONLY, False),
    "nosuid": (MS_NOSUID, True), "suid": (MS_NOSUID, False),
    "nodev": (MS_NODEV, True), "dev": (MS_NODEV, False),
    "noexec": (MS_NOEXEC, True), "exec": (MS_NOEXEC, False),
    "sync": (MS_SYNCHRONOUS, True), "async": (MS_SYNCHRONOUS, False),
    "dirsync": (MS_DIRSYNC, True), "remount": (MS_REMOUNT, True),
    "mand": (MS_MANDLOCK, True), "nomand": (MS_MANDLOCK, False),
    "atime": (MS_NOATIME, False), "noatime": (MS_NOATIME, True),
    "diratime": (MS_NODIRATIME, False), "nodiratime": (MS_NODIRATIME, True),
    "bind": (MS_BIND, True), "rbind": (MS_BIND | MS_REC, True), "defaults": (0, False),
    "relatime": (MS_RELATIME, True), "norelatime": (MS_RELATIME, False),
    "strictatime": (MS_STRICTATIME, True), "nostrictatime": (MS_STRICTATIME, False),
}
PROPAGATION_OPTIONS = ("private", "rprivate", "shared", "rshared", "slave", "rslave",
                       "unbindable", "runbindable")
CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWNS = 0x40000000, 0x20000000, 0x00020000
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
TIOCGPTN, TIOCSPTLCK = 0x80045430, 0x40045431  # not in the termios module
TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454ca, 0x0002, 0x1000


# ===========================================================================
# Utilities
# ===========================================================================

class Error(Exception):
    """The one project exception: its message is what the user sees."""


def _now_rfc3339():
    """The current UTC time in RFC 3339 with nanoseconds, as runc writes it."""
    ns = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + ".%09dZ" % (ns % 10**9)


def write_atomic(path, data, mode=0o644):
    """Write data to path through a temp file, fsync and rename."""
    if isinstance(data, str):
        data = data.encode()
    tmp = "%s.tmp.%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write_all(fd, data):
    """Write every byte of data to fd."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def read_json(path, what):
    """Load a JSON file, naming `what` in the error when it is missing or invalid."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise Error("%s: %s: no such file or directory" % (what, path)) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Error("%s: %s: invalid JSON: %s" % (what, path, e)) from None
    except OSError as e:
        raise Error("%s: %s: %s" % (what, path, e.strerror)) from None


def proc_start_time(pid):
    """The start time of pid (clock ticks since boot), or None if it is gone or a zombie."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError, ValueError):
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def process_alive(pid, start_time=None):
    """Whether pid runs (not a zombie) and, if given, started at start_time."""
    if not pid:
        return False
    st = proc_start_time(pid)
    return st is not None and (start_time is None or st == start_time)


_LIBC = None


def _libc():
    """The C library through ctypes, loaded on first use."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _check_libc(ret, what):
    """Raise OSError with errno when a libc call returned -1."""
    if ret == -1:
        import ctypes
        e = ctypes.get_errno()
        raise OSError(e, "%s: %s" % (what, os.strerror(e)))
    return ret


def prctl(option, arg):
    """prctl(2) with one argument."""
    return _check_libc(_libc().prctl(option, arg, 0, 0, 0), "prctl")


def parse_signal(value):
    """A signal number from a name (KILL, SIGKILL, kill) or a number, as runc accepts."""
    text = str(value).strip()
    if text.isascii() and text.isdigit():
        num = int(text)
        if 0 < num < signal.NSIG:
            return num
    else:
        name = text.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        sig = getattr(signal.Signals, name, None) if name.isidentifier() else None
        if isinstance(sig, signal.Signals):
            return int(sig)
    raise Error("invalid signal: %s" % value)


def exit_status(wait_status):
    """A shell-style exit code from a waitpid status: the code, or 128+N for signal N."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def _qemu_escape(value):
    """Escape a value for a QEMU option list (commas double)."""
    return str(value).replace(",", ",,")


# ===========================================================================
# Logging
# ===========================================================================

class Log:
    """--log (text or json), --global-log (text) and --debug; syslog when a file fails."""

    def __init__(self):
        self.path, self.fmt, self.global_path = None, "text", None
        self.debug_enabled, self.container_id, self.stderr = False, None, False

    def configure(self, path=None, fmt="text", global_path=None, debug=False):
        """Set the destinations; the log file is created at once."""
        self.path, self.fmt, self.global_path, self.debug_enabled = path, fmt, global_path, debug
        for p in (path, global_path):
            if p:
                try:
                    os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
                except OSError:
                    pass

    def debug(self, msg, *args):
        """A line that only --debug records."""
        if self.debug_enabled:
            self._emit("debug", msg % args if args else msg)

    def info(self, msg, *args):
        """An event worth keeping."""
        self._emit("info", msg % args if args else msg)

    def warning(self, msg, *args):
        """Something odd that does not stop the command."""
        self._emit("warning", msg % args if args else msg)

    def error(self, msg):
        """The one error line of a failed command."""
        self._emit("error", msg)

    def format_line(self, level, msg, when=None):
        """One line of the --log file in the configured format."""
        when = when or _now_rfc3339()
        if self.fmt == "json":
            return json.dumps({"level": level, "msg": msg, "time": when}) + "\n"
        return "time=%s level=%s msg=%s\n" % (when, level, json.dumps(msg))

    def _emit(self, level, msg):
        """Write one event to the log, the global log and (debug) stderr."""
        when = _now_rfc3339()
        if self.path:
            self._append(self.path, self.format_line(level, msg, when), level, msg)
        if self.global_path:
            line = "%s %s[%d] %s %s: %s\n" % (when, PROG, os.getpid(), level,
                                             self.container_id or "-", msg)
            self._append(self.global_path, line, level, msg)
        if self.stderr and level == "debug":
            sys.stderr.write("%s: %s\n" % (PROG, msg))

    def _append(self, path, line, level, msg):
        """Append a line to path, falling back to syslog."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError:
            import syslog
            prio = {"debug": syslog.LOG_DEBUG, "info": syslog.LOG_INFO,
                    "warning": syslog.LOG_WARNING}.get(level, syslog.LOG_ERR)
            syslog.syslog(prio, "%s: %s" % (self.container_id or "-", msg))


LOG = Log()


# ===========================================================================
# State
# ===========================================================================

def validate_id(cid):
    """Reject container ids that could escape the state root or are unusable."""
    if not cid:
        raise Error("container id cannot be empty")
    if len(cid) > MAX_ID_LEN:
        raise Error("invalid container id: longer than %d characters" % MAX_ID_LEN)
    if "/" in cid or cid in (".", "..") or ".." in cid or cid.startswith("."):
        raise Error("invalid container id: %s" % cid)
    if any(c.isspace() or not c.isprintable() for c in cid):
        raise Error("invalid container id: %r" % cid)
    return cid


class State:
    """One container's directory under --root: state.json, sockets and the exit record."""

    def __init__(self, root, cid):
        self.root, self.id = root, validate_id(cid)
        self.dir = os.path.join(root, cid)
        self.data = {}
        self._lock_fd = None

    def path(self, name):
        """A file in the container's directory."""
        return os.path.join(self.dir, name)

    def exists(self):
        """Whether the container's state.json exists."""
        return os.path.exists(self.path("state.json"))

    def make(self):
        """Create the directory, failing when the id is taken; leaves it locked."""
        os.makedirs(self.root, mode=0o711, exist_ok=True)
        try:
            os.mkdir(self.dir, 0o700)
        except FileExistsError:
            raise Error("container with id exists: %s" % self.id) from None
        except OSError as e:
            raise Error("container %s: %s: %s" % (self.id, self.dir, e.strerror)) from None
        self.lock()

    def lock(self):
        """Take the container's exclusive lock (flock on its directory)."""
        if self._lock_fd is None:
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_fd = fd
        return self

    def unlock(self):
        """Release the lock."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def lock_fd(self):
        """The fd holding the lock (a forked child must close it)."""
        return self._lock_fd

    def load(self, must_exist=True):
        """Read state.json; a missing container is an error unless must_exist is False."""
        try:
            with open(self.path("state.json"), "rb") as f:
                self.data = json.loads(f.read())
        except FileNotFoundError:
            if must_exist:
                raise Error("container does not exist") from None
            self.data = {}
        except ValueError:
            raise Error("%s: corrupt state file" % self.path("state.json")) from None
        return self.data

    def save(self):
        """Write state.json atomically."""
        write_atomic(self.path("state.json"), json.dumps(self.data, indent=1))

    def exit_record(self):
        """The workload's exit record written by the monitor, or None."""
        try:
            with open(self.path("exit.json"), "rb") as f:
                return json.loads(f.read())
        except (OSError, ValueError):
            return None

    def status(self):
        """created, running, paused or stopped, derived from the live processes."""
        d = self.data
        if not d.get("pid"):
            return "creating"
        if d.get("creating"):
            return "creating" if process_alive(d["pid"], d.get("pid_start")) else "stopped"
        if self.exit_record() is not None:
            return "stopped"
        vm = d.get("vm", {})
        if not process_alive(d["pid"], d.get("pid_start")):
            return "stopped"
        if vm.get("qemu_pid") and not process_alive(vm["qemu_pid"], vm.get("qemu_start")):
            return "stopped"
        if d.get("paused"):
            return "paused"
        return "running" if d.get("started") else "created"

    def oci_state(self):
        """The runtime-spec state object (runc's fields)."""
        d = self.data
        status = self.status()
        return {"ociVersion": d.get("ociVersion", OCI_VERSION), "id": self.id,
                "pid": d.get("pid", 0) if status != "stopped" else 0, "status": status,
                "bundle": d.get("bundle", ""), "rootfs": d.get("rootfs", ""),
                "created": d.get("created", ""), "annotations": d.get("annotations", {}),
                "owner": ""}

    def remove(self):
        """Delete the container's directory and everything in it."""
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)
        self.unlock()


def list_states(root):
    """Every container under root, sorted by id."""
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        try:
            st = State(root, name)
        except Error:
            continue
        if st.exists():
            try:
                st.load(must_exist=False)
            except Error as e:
                LOG.warning(str(e))
                continue
            out.append(st)
    return out


# ===========================================================================
# Spec handlers: one per section of config.json
# ===========================================================================

def _need(cond, field, what):
    """Raise the one error naming field when cond is false."""
    if not cond:
        raise Error("%s: %s" % (field, what))


def _is_int(v):
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def _str_list(v, field, non_empty=False):
    """Check a list of strings."""
    ok = isinstance(v, list) and all(isinstance(x, str) for x in v) and (v or not non_empty)
    _need(ok, field, "must be a %slist of strings" % ("non-empty " if non_empty else ""))
    return list(v)


def _obj(v, field):
    """Check a JSON object."""
    _need(isinstance(v, dict), field, "must be an object")
    return v


def _spec_oci_version(conf, value):
    """ociVersion: a string, recorded in the state."""
    _need(isinstance(value, str) and value, "ociVersion", "must be a non-empty string")
    conf["ociVersion"] = value


def _spec_root(conf, value):
    """root: the rootfs directory (relative to the bundle) and readonly."""
    _obj(value, "root")
    path = value.get("path")
    _need(isinstance(path, str) and path, "root.path", "must be a non-empty string")
    _need(isinstance(value.get("readonly", False), bool), "root.readonly", "must be a boolean")
    full = os.path.normpath(os.path.join(conf["bundle"], path))
    _need(os.path.isdir(full), "root.path", "%s: no such directory" % full)
    conf["root"] = {"path": full, "readonly": value.get("readonly", False)}


def parse_process(p, field="process"):
    """Validate a process object (config.json or exec's process.json)."""
    _obj(p, field)
    args = p.get("args")
    _need(isinstance(args, list) and args and all(isinstance(a, str) for a in args),
          field + ".args", "must be a non-empty list of strings")
    env = _str_list(p.get("env", []), field + ".env")
    for e in env:
        _need("=" in e, field + ".env", "%r is not of the form NAME=VALUE" % e)
    cwd = p.get("cwd", "/")
    _need(isinstance(cwd, str) and cwd.startswith("/"), field + ".cwd",
          "must be an absolute path")
    terminal = p.get("terminal", False)
    _need(isinstance(terminal, bool), field + ".terminal", "must be a boolean")
    user = _obj(p.get("user", {}), field + ".user")
    for key in ("uid", "gid"):
        _need(_is_int(user.get(key, 0)) and user.get(key, 0) >= 0, "%s.user.%s" % (field, key),
              "must be a non-negative integer")
    gids = user.get("additionalGids", [])
    _need(isinstance(gids, list) and all(_is_int(g) and g >= 0 for g in gids),
          field + ".user.additionalGids", "must be a list of non-negative integers")
    umask = user.get("umask")
    _need(umask is None or (_is_int(umask) and 0 <= umask <= 0o777), field + ".user.umask",
          "must be an integer between 0 and 0777")
    rlimits = p.get("rlimits", [])
    _need(isinstance(rlimits, list), field + ".rlimits", "must be a list")
    for i, r in enumerate(rlimits):
        rf = "%s.rlimits[%d]" % (field, i)
        _obj(r, rf)
        _need(isinstance(r.get("type"), str) and r["type"].startswith("RLIMIT_") and
              hasattr(__import__("resource"), r["type"]), rf + ".type",
              "unknown rlimit %r" % r.get("type"))
        for k in ("soft", "hard"):
            _need(_is_int(r.get(k)) and r[k] >= 0, "%s.%s" % (rf, k), "must be a non-negative integer")
    size = p.get("consoleSize", {"height": 0, "width": 0})
    _obj(size, field + ".consoleSize")
    for k in ("height", "width"):
        _need(_is_int(size.get(k, 0)) and size.get(k, 0) >= 0, "%s.consoleSize.%s" % (field, k),
              "must be a non-negative integer")
    nnp = p.get("noNewPrivileges", False)
    _need(isinstance(nnp, bool), field + ".noNewPrivileges", "must be a boolean")
    for ignored in ("capabilities", "apparmorProfile", "selinuxLabel", "oomScoreAdj",
                    "scheduler", "ioPriority"):
        if ignored in p:
            LOG.debug("%s.%s: not applied inside the VM", field, ignored)
    return {"args": list(args), "env": env, "cwd": os.path.normpath(cwd), "terminal": terminal,
            "uid": user.get("uid", 0), "gid": user.get("gid", 0), "additionalGids": gids,
            "umask": umask, "rlimits": [{"type": r["type"], "soft": r["soft"], "hard": r["hard"]}
                                        for r in rlimits],
            "consoleSize": {"height": size.get("height", 0), "width": size.get("width", 0)},
            "noNewPrivileges": nnp}


def _spec_process(conf, value):
    """process: what to run at start."""
    conf["process"] = parse_process(value)


def _spec_mounts(conf, value):
    """mounts: filesystems for the guest; bind sources become 9p shares."""
    _need(isinstance(value, list), "mounts", "must be a list")
    mounts = []
    for i, m in enumerate(value):
        field = "mounts[%d]" % i
        _obj(m, field)
        dest = m.get("destination")
        _need(isinstance(dest, str) and dest.startswith("/"), field + ".destination",
              "must be an absolute path")
        mtype = m.get("type", "")
        _need(isinstance(mtype, str), field + ".type", "must be a string")
        source = m.get("source", "")
        _need(isinstance(source, str), field + ".source", "must be a string")
        options = _str_list(m.get("options", []), field + ".options")
        bind = mtype == "bind" or "bind" in options or "rbind" in options
        if bind:
            _need(source.startswith("/"), field + ".source", "must be an absolute path for a bind mount")
            _need(os.path.exists(source), field + ".source", "%s: no such file or directory" % source)
        mounts.append({"destination": os.path.normpath(dest), "type": "bind" if bind else mtype,
                       "source": source, "options": options})
    conf["mounts"] = mounts


def _spec_hostname(conf, value):
    """hostname: set inside the guest."""
    _need(isinstance(value, str), "hostname", "must be a string")
    conf["hostname"] = value


def _spec_hooks(conf, value):
    """hooks: host programs run at the lifecycle points (createContainer and startContainer
    would run inside the container, which is a VM without the host's programs: not run)."""
    _obj(value, "hooks")
    hooks = {}
    for name, entries in value.items():
        if name in ("createContainer", "startContainer") and entries:
            LOG.warning("hooks.%s: not run (they would run inside the VM)", name)
        _need(isinstance(entries, list), "hooks." + name, "must be a list")
        for i, h in enumerate(entries):
            field = "hooks.%s[%d]" % (name, i)
            _obj(h, field)
            _need(isinstance(h.get("path"), str) and h["path"].startswith("/"), field + ".path",
                  "must be an absolute path")
            _str_list(h.get("args", []), field + ".args")
            for e in _str_list(h.get("env", []), field + ".env"):
                _need("=" in e, field + ".env", "%r is not of the form NAME=VALUE" % e)
            timeout = h.get("timeout")
            _need(timeout is None or (_is_int(timeout) and timeout > 0), field + ".timeout",
                  "must be a positive integer")
        hooks[name] = entries
    conf["hooks"] = hooks


def _spec_annotations(conf, value):
    """annotations: string to string, kept in the state."""
    _obj(value, "annotations")
    for k, v in value.items():
        _need(isinstance(v, str), "annotations." + k, "must be a string")
    conf["annotations"] = value


def _spec_linux(conf, value):
    """linux: namespaces (network placement), masked/readonly paths and sysctls."""
    _obj(value, "linux")
    namespaces = value.get("namespaces", [])
    _need(isinstance(namespaces, list), "linux.namespaces", "must be a list")
    for i, ns in enumerate(namespaces):
        field = "linux.namespaces[%d]" % i
        _obj(ns, field)
        _need(ns.get("type") in ("pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time"),
              field + ".type", "unknown namespace type %r" % ns.get("type"))
        path = ns.get("path", "")
        _need(isinstance(path, str), field + ".path", "must be a string")
        if ns["type"] == "network":
            _need(not path or os.path.exists(path), field + ".path",
                  "%s: no such file or directory" % path)
            conf["netns"] = path or "new"
    conf["masked"] = _str_list(value.get("maskedPaths", []), "linux.maskedPaths")
    conf["readonly_paths"] = _str_list(value.get("readonlyPaths", []), "linux.readonlyPaths")
    sysctl = _obj(value.get("sysctl", {}), "linux.sysctl")
    for k, v in sysctl.items():
        _need(isinstance(v, str), "linux.sysctl." + k, "must be a string")
    conf["sysctl"] = sysctl
    for ignored in ("resources", "cgroupsPath", "seccomp", "devices", "uidMappings",
                    "gidMappings", "rootfsPropagation", "mountLabel"):
        if ignored in value:
            LOG.debug("linux.%s: handled by the VM boundary, not applied", ignored)


def _spec_vm(conf, value):
    """vm: overrides of vm.json for this container."""
    _obj(value, "vm")
    conf["vm"] = value


SPEC_HANDLERS = {
    "ociVersion": _spec_oci_version,
    "root": _spec_root,
    "process": _spec_process,
    "mounts": _spec_mounts,
    "hostname": _spec_hostname,
    "hooks": _spec_hooks,
    "annotations": _spec_annotations,
    "linux": _spec_linux,
    "vm": _spec_vm,
}


def load_spec(bundle, need_process=True):
    """Read and validate BUNDLE/config.json into the container's configuration."""
    bundle = os.path.abspath(bundle)
    if not os.path.isdir(bundle):
        raise Error("bundle %s: no such directory" % bundle)
    raw = read_json(os.path.join(bundle, "config.json"), "config.json")
    if not isinstance(raw, dict):
        raise Error("config.json: must be a JSON object")
    conf = {"bundle": bundle, "mounts": [], "hooks": {}, "annotations": {}, "hostname": None,
            "masked": [], "readonly_paths": [], "sysctl": {}, "netns": None, "vm": {}}
    for section in ("ociVersion", "root"):
        if section not in raw:
            raise Error("config.json: %s: missing" % section)
    if need_process and "process" not in raw:
        raise Error("config.json: process: missing")
    for section, value in raw.items():
        handler = SPEC_HANDLERS.get(section)
        if handler is None:
            LOG.debug("config.json: section %s ignored", section)
            continue
        try:
            handler(conf, value)
        except Error as e:
            raise Error("config.json: %s" % e) from None
    return conf


# ===========================================================================
# Hypervisor: vm.json, hypervisor.args, accelerator, kernel
# ===========================================================================

def find_config_file(name, bundle=None):
    """The first NAME in the bundle, /etc/cc-oci-runtime, /usr/share/defaults/..., beside us."""
    dirs = ((bundle,) if bundle else ()) + CONFIG_DIRS
    for d in dirs:
        path = os.path.join(d, name)
        if os.path.isfile(path):
            return path
    raise Error("%s not found in %s" % (name, ", ".join(dirs)))


def _find_optional(name, bundle=None):
    """find_config_file, or None when there is no such file (the built-in default applies)."""
    try:
        return find_config_file(name, bundle)
    except Error:
        return None


def _merge(base, over):
    """base updated recursively with over (dicts merge, other values replace)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_vm_config(bundle=None, overrides=None):
    """Defaults, then vm.json (found by lookup order), then config.json's vm object."""
    vm = dict(DEFAULT_VM)
    path = _find_optional("vm.json", bundle)
    if path:
        raw = read_json(path, "vm.json")
        if not isinstance(raw, dict) or not isinstance(raw.get("vm"), dict):
            raise Error("vm.json: %s: must hold an object \"vm\"" % path)
        vm = _merge(vm, raw["vm"])
    vm = _merge(vm, overrides or {})
    _need(isinstance(vm.get("kernel"), dict), "vm.kernel", "must be an object")
    for key in ("path", "image", "modules", "hypervisor_args"):
        _need(vm.get(key) is None or isinstance(vm[key], str), "vm." + key, "must be a string")
    for key in ("path", "parameters", "version"):
        _need(isinstance(vm["kernel"].get(key, ""), str), "vm.kernel." + key, "must be a string")
    _need(isinstance(vm.get("template", True), bool), "vm.template", "must be a boolean")
    if vm.get("hypervisor_args") and not os.path.isfile(vm["hypervisor_args"]):
        raise Error("vm.hypervisor_args: %s: no such file" % vm["hypervisor_args"])
    _need(vm.get("accel") in ("auto", "kvm", "tcg"), "vm.accel", "must be auto, kvm or tcg")
    _need(vm.get("machine") in ("microvm", "q35", "pc"), "vm.machine", "must be microvm, q35 or pc")
    _need(_is_int(vm.get("cpus")) and vm["cpus"] > 0, "vm.cpus", "must be a positive integer")
    _need(_is_int(vm.get("memory")) or (isinstance(vm.get("memory"), str) and
          __import__("re").fullmatch(r"[0-9]+[KMGT]?", vm["memory"].upper()) is not None),
          "vm.memory", "must be a size such as 256M")
    _need(isinstance(vm.get("boot_timeout"), (int, float)) and vm["boot_timeout"] > 0,
          "vm.boot_timeout", "must be a positive number of seconds")
    vm["vm_json"] = path
    return vm


def hw_virt_available(cpuinfo="/proc/cpuinfo", kvm="/dev/kvm"):
    """Whether the CPU has vmx/svm and /dev/kvm opens (a paravirtual KVM has neither flag)."""
    try:
        with open(cpuinfo) as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return False
    if "vmx" not in flags and "svm" not in flags:
        return False
    try:
        os.close(os.open(kvm, os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def choose_accel(requested, cpuinfo="/proc/cpuinfo", kvm="/dev/kvm"):
    """kvm or tcg: the requested one, or for auto KVM only when it really works."""
    if requested in ("kvm", "tcg"):
        return requested
    return "kvm" if hw_virt_available(cpuinfo, kvm) else "tcg"


def find_qemu(path):
    """The QEMU binary: an absolute path, or a name looked up in PATH."""
    import shutil
    found = path if os.path.isabs(path) and os.access(path, os.X_OK) else shutil.which(path)
    if not found:
        raise Error("QEMU not found: %s (install qemu-system-x86: apt-get install qemu-system-x86)"
                    % path)
    return found


def find_kernel(boot="/boot", modules_root="/lib/modules"):
    """The newest /boot/vmlinuz-* that has a matching /lib/modules directory."""
    try:
        names = os.listdir(boot)
    except OSError:
        names = []
    candidates = []
    for name in names:
        if name.startswith("vmlinuz-"):
            ver = name[len("vmlinuz-"):]
            if os.path.isdir(os.path.join(modules_root, ver)):
                candidates.append((_version_key(ver), os.path.join(boot, name), ver))
    if not candidates:
        raise Error("no kernel found: no %s/vmlinuz-* with a matching %s directory "
                    "(install one: apt-get install linux-image-amd64)" % (boot, modules_root))
    _, path, ver = max(candidates)
    return path, ver


def _version_key(ver):
    """A sort key for kernel versions (numbers compare as numbers)."""
    import re
    return [(1, int(p), "") if p.isdigit() else (0, 0, p) for p in re.split(r"[.\-+]", ver)]


def kernel_version_of(path):
    """The version a kernel file name carries (vmlinuz-6.1.0-1-amd64 -> 6.1.0-1-amd64)."""
    base = os.path.basename(path)
    for prefix in ("vmlinuz-", "vmlinux-", "bzImage-"):
        if base.startswith(prefix):
            return base[len(prefix):]
    return os.uname().release


def uncompressed_kernel(path, cache_dir=None):
    """The ELF vmlinux inside a bzImage, decompressed once into the cache (PVH boots it fast)."""
    cache_dir = cache_dir or CACHE_DIR
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"\x7fELF":
        return path
    stat = os.stat(path)
    out = os.path.join(cache_dir, "vmlinux-%s-%d-%d" % (os.path.basename(path), stat.st_size,
                                                         stat.st_mtime_ns))
    if os.path.exists(out):
        return out
    with open(path, "rb") as f:
        data = f.read()
    elf = _decompress_payload(data)
    if elf is None:
        LOG.debug("kernel %s: no xz/gzip payload found, booting it as is", path)
        return path
    os.makedirs(cache_dir, exist_ok=True)
    write_atomic(out, elf)
    return out


def _decompress_payload(data):
    """The first xz or gzip stream in data that decompresses to an ELF image, or None."""
    import lzma
    import zlib
    for magic, make in ((b"\xfd7zXZ\x00", lambda: lzma.LZMADecompressor()),
                        (b"\x1f\x8b\x08", lambda: zlib.decompressobj(31))):
        start = data.find(magic)
        while start != -1:
            try:
                out = make().decompress(data[start:])
                if out[:4] == b"\x7fELF":
                    return out
            except (lzma.LZMAError, zlib.error):
                pass
            start = data.find(magic, start + 1)
    return None


def tsc_khz(cpuinfo="/proc/cpuinfo"):
    """The host TSC frequency in kHz from /proc/cpuinfo (microvm under TCG needs it)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def kernel_params(vm, accel):
    """The guest kernel command line for this machine and accelerator."""
    params = [BASE_KERNEL_PARAMS]
    if vm["machine"] == "microvm":
        params.append("pci=off")
        khz = tsc_khz() if accel == "tcg" else None
        if khz:
            params.append("tsc_early_khz=%d" % khz)
    extra = vm["kernel"].get("parameters", "")
    if extra:
        params.append(extra)
    return " ".join(params)


def expand_args(text, tags, source="hypervisor.args"):
    """QEMU argv from hypervisor.args: one argument a line, # comments, @TAG@ expansion.

    A line that is exactly a tag whose value is a list expands into that many arguments."""
    import re
    argv = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@") and line.endswith("@") and isinstance(tags.get(line[1:-1]), list):
            argv.extend(str(a) for a in tags[line[1:-1]])
            continue

        def repl(m, lineno=lineno):
            value = tags.get(m.group(1))
            if value is None or isinstance(value, list):
                raise Error("%s:%d: unknown tag @%s@" % (source, lineno, m.group(1)))
            return str(value)
        argv.append(re.sub(r"@([A-Z0-9_]+)@", repl, line))
    return argv


def share_list(conf):
    """The 9p shares: the rootfs, then one per directory that bind mounts need."""
    shares = [(ROOTFS_TAG, conf["root"]["path"])]
    by_dir = {}
    for m in conf["mounts"]:
        if m["type"] != "bind":
            continue
        src = os.path.realpath(m["source"])
        if os.path.isdir(src):
            directory, sub = src, ""
        elif os.path.isfile(src):
            directory, sub = os.path.dirname(src), os.path.basename(src)
        else:
            LOG.debug("mount %s: source %s is not a file or directory, skipped",
                      m["destination"], src)
            m["skip"] = True
            continue
        if directory not in by_dir:
            by_dir[directory] = "share%d" % len(by_dir)
            shares.append((by_dir[directory], directory))
        m["share"], m["subpath"] = by_dir[directory], sub
    return shares


def share_args(shares, bus):
    """-fsdev/-device pairs exporting each share over virtio-9p."""
    argv = []
    for i, (tag, path) in enumerate(shares):
        argv += ["-fsdev", "local,id=fs%d,path=%s,security_model=none" % (i, _qemu_escape(path)),
                 "-device", "virtio-9p-%s,fsdev=fs%d,mount_tag=%s" % (bus, i, tag)]
    return argv


def qemu_command(cid, vm, conf, state_dir, image, template=None, vm_uuid=None):
    """The full QEMU argv for one container: a cold boot, or with template (a dict of ram,
    share, incoming and shares) the template's build or a restore from it."""
    import uuid
    accel = vm["accel_used"]
    machine = vm["machine"]
    bus = "device" if machine == "microvm" else "pci"
    shares = template["shares"] if template else share_list(conf)
    tags = {
        "NAME": "cc-" + cid[:32], "UUID": vm_uuid or str(uuid.uuid4()), "ACCEL": accel,
        "CPU": "host" if accel == "kvm" else "max",
        "MACHINE": "microvm,pit=on,pic=on,rtc=on" if machine == "microvm" else machine,
        "VIRTIO": bus, "MEMORY": vm["memory"], "CPUS": vm["cpus"],
        "KERNEL": vm["kernel_image"], "KERNEL_PARAMS": kernel_params(vm, accel),
        "IMAGE": image, "COMMS_SOCKET": "qmp.sock",
        "AGENT_CTL_SOCKET": "agent.sock", "CONSOLE_DEVICE": "console.log",
        "AGENT_PORT": AGENT_PORT, "SHARES": share_args(shares, bus), "NETWORK": net_args(bus),
        "MEMORY_BACKEND": [], "INCOMING": [],
    }
    if template:
        tags["MACHINE"] += ",memory-backend=mem"
        tags["MEMORY_BACKEND"] = ["-object", "memory-backend-file,id=mem,size=%s,mem-path=%s,share=%s"
                                  % (vm["memory"], _qemu_escape(template["ram"]),
                                     "on" if template["share"] else "off")]
        tags["INCOMING"] = ["-incoming", "defer"] if template["incoming"] else []
    return [vm["qemu"]] + expand_args(hypervisor_args_text(vm), tags,
                                      vm["hypervisor_args"] or "built-in hypervisor.args")


def hypervisor_args_text(vm):
    """The hypervisor.args in use: the file found, or the built-in default."""
    if not vm.get("hypervisor_args"):
        return DEFAULT_HYPERVISOR_ARGS
    with open(vm["hypervisor_args"]) as f:
        return f.read()


def resolve_vm(conf):
    """vm.json plus config.json's vm, with QEMU, kernel and accelerator resolved."""
    vm = load_vm_config(conf["bundle"], conf.get("vm"))
    vm["qemu"] = find_qemu(vm["path"])
    kpath = vm["kernel"].get("path") or ""
    if kpath:
        if not os.path.isfile(kpath):
            raise Error("vm.kernel.path: %s: no such file" % kpath)
        version = vm["kernel"].get("version") or kernel_version_of(kpath)
    else:
        kpath, version = find_kernel()
    vm["kernel_path"], vm["kernel_version"] = kpath, version
    vm["modules_dir"] = vm.get("modules") or os.path.join("/lib/modules", version)
    vm["accel_used"] = choose_accel(vm["accel"])
    vm["kernel_image"] = uncompressed_kernel(kpath)
    vm["hypervisor_args"] = vm.get("hypervisor_args") or _find_optional("hypervisor.args",
                                                                        conf["bundle"])
    return vm


# -- templates: a booted, idle VM saved once and restored for each container --------

UUID_ZERO = "00000000-0000-0000-0000-000000000000"
SHARE_SLOTS = 8  # bind-mount directories a restored VM can export (more: cold boot)


def template_shares(shares, empty_dir):
    """shares padded to the template's fixed 9p slots, or None when they do not fit."""
    if len(shares) > SHARE_SLOTS + 1:
        return None
    return list(shares) + [("share%d" % i, empty_dir) for i in range(len(shares) - 1, SHARE_SLOTS)]


def template_for(vm, image):
    """The directory of the saved template VM for this configuration, built on first use;
    None when templates are off or hypervisor.args has no @MEMORY_BACKEND@/@INCOMING@."""
    import hashlib
    text = hypervisor_args_text(vm)
    if not vm.get("template", True) or "@MEMORY_BACKEND@" not in text or "@INCOMING@" not in text:
        return None
    empty = os.path.join(CACHE_DIR, "empty")
    os.makedirs(empty, exist_ok=True)
    spec = {"ram": "RAM", "share": True, "incoming": False,
            "shares": template_shares([(ROOTFS_TAG, empty)], empty)}
    probe = qemu_command("template", vm, None, None, image, spec, vm_uuid=str(UUID_ZERO))
    # the saved VM keeps the TSC rate it booted with; cpu MHz drifting must not rebuild it
    probe = [__import__("re").sub(r"tsc_early_khz=[0-9]+", "tsc_early_khz", a) for a in probe]
    digest = hashlib.sha256(json.dumps(probe).encode())
    for path in (vm["qemu"], vm["kernel_image"], image):
        st = os.stat(path)
        digest.update(("%s|%d|%d" % (path, st.st_size, st.st_mtime_ns)).encode())
    final = os.path.join(CACHE_DIR, "template-" + digest.hexdigest()[:24])
    if os.path.exists(os.path.join(final, "state")):
        return final
    lock = os.open(final + ".lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(final, "state")):
            _build_template(vm, image, dict(spec), final)
    finally:
        os.close(lock)
    return final


def _build_template(vm, image, spec, final):
    """Boot the agent, stop the VM once it is ready and save it (RAM stays in a file)."""
    import shutil
    import subprocess
    tmp = "%s.tmp.%d" % (final, os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    LOG.info("building VM template %s", final)
    spec["ram"] = os.path.join(tmp, "ram")
    argv = qemu_command("template", vm, None, None, image, spec)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(tmp, "agent.sock"))
    listener.listen(1)
    listener.settimeout(0.1)
    deadline = time.monotonic() + float(vm["boot_timeout"])
    with open(os.path.join(tmp, "qemu.log"), "wb") as log:
        qemu = subprocess.Popen(argv, cwd=tmp, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                preexec_fn=_template_qemu_setup)
    try:
        while True:
            try:
                conn, _ = listener.accept()
                break
            except socket.timeout:
                if qemu.poll() is not None:
                    raise Error("the template VM exited: %s" % _tail(os.path.join(tmp, "qemu.log")))
                if time.monotonic() > deadline:
                    raise Error("the template VM did not connect to the agent socket")
        with conn:
            read_msg(conn.fileno(), FrameReader(), float(vm["boot_timeout"]))  # "ready"
            q = Qmp(tmp)
            q.call("stop")
            q.call("migrate-set-capabilities",
                   capabilities=[{"capability": "x-ignore-shared", "state": True}])
            q.call("migrate", uri="exec:cat > state.tmp")
            q.wait(lambda: q.call("query-migrate").get("status") in ("completed", "failed"))
            if q.call("query-migrate").get("status") != "completed":
                raise Error("saving the VM template failed")
            q.call("quit")
            q.close()
        try:
            qemu.wait(10)
        except subprocess.TimeoutExpired:
            raise Error("the template VM did not quit") from None
        os.rename(os.path.join(tmp, "state.tmp"), os.path.join(tmp, "state"))
        for name in ("agent.sock", "qmp.sock"):
            if os.path.exists(os.path.join(tmp, name)):
                os.unlink(os.path.join(tmp, name))
        os.rename(tmp, final)
        prune_cache("template-", final)
    except BaseException:
        qemu.kill()
        qemu.wait()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        listener.close()


def _template_qemu_setup():
    """In the template's QEMU before exec: die with the builder, and an empty network namespace
    of its own (its NIC taps never appear on the host)."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _check_libc(_libc().unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")


class Qmp:
    """A QMP session on a VM's control socket."""

    def __init__(self, directory, timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = connect_unix(directory, "qmp.sock", timeout)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise Error("QMP: cannot connect to the VM") from None
                time.sleep(0.01)
        self.file = self.sock.makefile("rwb")
        self.file.readline()  # greeting
        self.call("qmp_capabilities")

    def call(self, command, **arguments):
        """Run a command; its "return" value (an error reply raises)."""
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            line = self.file.readline()
            if not line:
                if command == "quit":
                    return {}
                raise Error("QMP: the VM closed the connection")
            reply = json.loads(line)
            if "error" in reply:
                raise Error("QMP %s: %s" % (command, reply["error"].get("desc")))
            if "return" in reply:
                return reply["return"]

    @staticmethod
    def wait(condition, timeout=30.0):
        """Poll condition until it holds."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise Error("QMP: timed out")
            time.sleep(0.005)

    def close(self):
        """End the session (the socket is free for the next client)."""
        self.file.close()
        self.sock.close()


# ===========================================================================
# Guest image: an initramfs built from the host's Python and kernel modules
# ===========================================================================

IMAGE_FORMAT = 5  # bump when the image layout changes
AGENT_IMPORTS = ("ctypes", "resource", "termios", "select", "json", "struct", "errno",
                 "fcntl", "socket", "signal", "time", "traceback")


class CpioWriter:
    """A cpio "newc" archive writer (what the kernel unpacks as an initramfs)."""

    def __init__(self, out):
        self.out, self.ino, self.names = out, 1, set()

    def _entry(self, name, mode, data=b"", mtime=0, rdev=(0, 0), nlink=1):
        """Write one header, name and data, each padded to 4 bytes."""
        name = name.strip("/") or "."
        if name in self.names:
            return
        self.names.add(name)
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, nlink, int(mtime), len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.out.write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self.out.write(data + b"\0" * (-len(data) % 4))

    def add_dir(self, name, mode=0o755):
        """A directory, with its parents."""
        self._parents(name)
        self._entry(name, 0o040000 | mode, nlink=2)

    def add_file(self, name, data, mode=0o644, mtime=0):
        """A regular file, with its parent directories."""
        self._parents(name)
        self._entry(name, 0o100000 | mode, data, mtime)

    def add_symlink(self, name, target):
        """A symbolic link."""
        self._parents(name)
        self._entry(name, 0o120777, target.encode())

    def add_device(self, name, char, major, minor, mode=0o600):
        """A character (or block) device node."""
        self._parents(name)
        self._entry(name, (0o020000 if char else 0o060000) | mode, rdev=(major, minor))

    def _parents(self, name):
        """Add the missing parent directories of name."""
        parts = name.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            path = "/".join(parts[:i])
            if path not in self.names:
                self._entry(path, 0o040755, nlink=2)

    def close(self):
        """Write the trailer."""
        self._entry("TRAILER!!!", 0)


def read_cpio(data):
    """Parse a newc archive into {name: (mode, data, (rdevmajor, rdevminor))} (for tests)."""
    out, pos = {}, 0
    while pos < len(data):
        if data[pos:pos + 6] != b"070701":
            raise Error("cpio: bad magic at offset %d" % pos)
        f = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name_start = pos + 110
        name = data[name_start:name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            break
        out[name] = (f[1], data[data_start:data_start + filesize], (f[9], f[10]))
        pos = data_start + filesize + (-filesize % 4)
    return out


def _python_manifest(python):
    """Files the agent needs from this interpreter: modules and mapped shared objects."""
    code = ("import sys,json,os,importlib.util as u,importlib.machinery as m\n"
            "l = m.SourceFileLoader('cc_oci_runtime', %r)\n"  # the script may have no .py name
            "r = u.module_from_spec(u.spec_from_loader(l.name, l))\nl.exec_module(r)\n"
            "for m in r.AGENT_IMPORTS: __import__(m)\n"
            "mods = sorted({getattr(m, '__file__', None) or '' for m in list(sys.modules.values())})\n"
            "maps = sorted({l.split(None, 5)[5].strip() for l in open('/proc/self/maps') "
            "if len(l.split(None, 5)) == 6 and l.split(None, 5)[5].startswith('/')})\n"
            "print(json.dumps({'modules': [m for m in mods if m], 'maps': maps, "
            "'stdlib': os.path.dirname(os.__file__), 'version': sys.version}))\n"
            % os.path.realpath(__file__))
    import subprocess
    try:
        out = subprocess.run([python, "-I", "-S", "-c", code], capture_output=True, check=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise Error("guest image: cannot inspect the interpreter %s: %s" % (python, e)) from None
    return json.loads(out)


def guest_modules(modules_dir, names=GUEST_MODULES):
    """The .ko files for names and their dependencies, in load order (modules.dep)."""
    deps, by_name = {}, {}
    try:
        with open(os.path.join(modules_dir, "modules.dep")) as f:
            for line in f:
                path, _, rest = line.partition(":")
                deps[path] = rest.split()
                by_name[_module_name(path)] = path
    except OSError:
        raise Error("kernel modules: %s/modules.dep not found (install the kernel's modules)"
                    % modules_dir) from None
    builtin = set()
    try:
        with open(os.path.join(modules_dir, "modules.builtin")) as f:
            builtin = {_module_name(ln.strip()) for ln in f}
    except OSError:
        pass
    order = []

    def visit(path):
        for dep in deps.get(path, []):
            visit(dep)
        if path not in order:
            order.append(path)
    for name in names:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key])
        elif key not in builtin:
            raise Error("kernel module %s not found in %s" % (name, modules_dir))
    return [os.path.join(modules_dir, p) for p in order]


def _module_name(path):
    """The module name of a .ko path (dashes as underscores)."""
    return os.path.basename(path).split(".ko")[0].replace("-", "_")


def _module_bytes(path):
    """A module's contents, decompressed when it is .ko.xz or .ko.gz."""
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        import lzma
        return lzma.decompress(data)
    if path.endswith(".gz"):
        import gzip
        return gzip.decompress(data)
    if path.endswith(".zst"):
        raise Error("kernel module %s: zstd-compressed modules are not supported" % path)
    return data


def elf_interpreter(path):
    """The PT_INTERP (dynamic loader) path of a 64-bit ELF executable, or None."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return None
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        for i in range(phnum):
            ptype, _flags, offset, _va, _pa, size = struct.unpack_from("<IIQQQQ", table, i * phentsize)
            if ptype == 3:  # PT_INTERP
                f.seek(offset)
                return f.read(size).rstrip(b"\0").decode()
    return None


def elf_load_only(data):
    """An ELF file cut after the last byte its program headers use (no debug info or section
    table: the dynamic loader needs neither), as `sstrip` does; other data is returned as is."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return data
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    end = phoff + phentsize * phnum
    for i in range(phnum):
        _t, _f, offset, _v, _p, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        end = max(end, offset + filesz)
    if end >= len(data):
        return data
    out = bytearray(data[:end])
    struct.pack_into("<Q", out, 40, 0)  # e_shoff
    struct.pack_into("<HH", out, 60, 0, 0)  # e_shnum, e_shstrndx
    return bytes(out)


def _add_library_links(w, path):
    """Add the symlinks beside a shared library that point at it (its soname links)."""
    if ".so" not in os.path.basename(path):
        return
    real = os.path.realpath(path)
    directory = os.path.dirname(path)
    stem = os.path.basename(path).split(".so")[0] + ".so"
    for entry in os.scandir(directory):
        if entry.name.startswith(stem) and entry.is_symlink() and \
                os.path.realpath(entry.path) == real:
            w.add_symlink(entry.path, os.readlink(entry.path))


def _pyc_bytes(source_path):
    """A sourceless .pyc for a module file (compiled here, unchecked)."""
    with open(source_path, "rb") as f:
        return _pyc_from_source(f.read(), source_path)


def _add_host_path(w, path, data=None, like=None):
    """Add a host file at its own path, recreating symlinked directories on the way.

    With data, the file's contents are data and its mode and mtime those of `like`."""
    parts = path.strip("/").split("/")
    cur = ""
    for i, part in enumerate(parts):
        cur += "/" + part
        if os.path.islink(cur):
            target = os.readlink(cur)
            w.add_symlink(cur, target)
            rest = "/".join(parts[i + 1:])
            resolved = os.path.normpath(os.path.join(os.path.dirname(cur), target))
            return _add_host_path(w, resolved + ("/" + rest if rest else ""), data, like)
    st = os.stat(like or cur)
    if data is None:
        with open(cur, "rb") as f:
            data = elf_load_only(f.read())
    w.add_file(cur, data, st.st_mode & 0o777, st.st_mtime)


def _image_inputs(python, modules_dir):
    """The interpreter's manifest (cached per interpreter and script) and the module list."""
    import hashlib
    with open(os.path.realpath(__file__), "rb") as f:
        script = f.read()
    st = os.stat(python)
    key = hashlib.sha256(script + ("%s|%d|%d" % (python, st.st_size, st.st_mtime_ns)).encode())
    manifest_path = os.path.join(CACHE_DIR, "manifest-%s.json" % key.hexdigest()[:20])
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = _python_manifest(python)
        os.makedirs(CACHE_DIR, exist_ok=True)
        write_atomic(manifest_path, json.dumps(manifest))
        prune_cache("manifest-", manifest_path)
    return script, manifest, guest_modules(modules_dir)


def guest_image(vm, python=None):
    """The initramfs for this host: built on first use, cached by its inputs, written atomically."""
    import hashlib
    python = os.path.realpath(python or sys.executable)
    script, manifest, modules = _image_inputs(python, vm["modules_dir"])
    digest = hashlib.sha256(script + b"%d" % IMAGE_FORMAT)
    files = [python] + manifest["maps"] + manifest["modules"] + modules + ["/etc/ld.so.cache"]
    for path in files:
        try:
            st = os.stat(path)
            digest.update(("%s|%d|%d\n" % (path, st.st_size, st.st_mtime_ns)).encode())
        except OSError:
            digest.update(("%s|missing\n" % path).encode())
    out = os.path.join(CACHE_DIR, "initrd-%s.cpio" % digest.hexdigest()[:24])
    if os.path.exists(out):
        return out
    LOG.info("building guest image %s", out)
    os.makedirs(CACHE_DIR, exist_ok=True)
    tmp = "%s.tmp.%d" % (out, os.getpid())
    try:
        with open(tmp, "wb") as f:
            _write_image(CpioWriter(f), python, manifest, modules, script)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    prune_cache("initrd-", out)
    return out


def prune_cache(prefix, keep, age=3600):
    """Remove cache entries named prefix* other than keep that were made over age seconds ago
    (a running VM keeps what it has mapped; a create that loses a race boots cold)."""
    import shutil
    now = time.time()
    for entry in os.scandir(CACHE_DIR):
        if entry.name.startswith(prefix) and entry.path != keep and \
                now - entry.stat(follow_symlinks=False).st_mtime > age:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass


def _write_image(w, python, manifest, modules, script):
    """The initramfs contents: interpreter, libraries, modules, agent, /init."""
    for d in ("dev", "proc", "sys", "run", "tmp", "mnt", GUEST_MODULES_DIR.strip("/")):
        w.add_dir(d)
    w.add_device("dev/console", True, 5, 1)
    w.add_device("dev/null", True, 1, 3, 0o666)
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            w.add_symlink(top, os.readlink(top))
    for path in [python, elf_interpreter(python)] + manifest["maps"]:
        if path and os.path.isfile(path):
            _add_host_path(w, path)
            _add_library_links(w, path)
    if os.path.exists("/etc/ld.so.cache"):
        _add_host_path(w, "/etc/ld.so.cache")
    stdlib = manifest["stdlib"]
    sources = set(manifest["modules"]) | {os.path.join(stdlib, "os.py")}
    for path in sorted(sources):
        if path.endswith(".py") and os.path.isfile(path):
            _add_host_path(w, path[:-3] + ".pyc", _pyc_bytes(path), path)
        elif os.path.isfile(path):
            _add_host_path(w, path)
    w.add_dir(os.path.join(stdlib, "lib-dynload"))
    for i, path in enumerate(modules):
        w.add_file("%s/%02d-%s.ko" % (GUEST_MODULES_DIR.strip("/"), i, _module_name(path)),
                   _module_bytes(path))
    w.add_file("cc_oci_runtime.pyc", _pyc_from_source(script, "/cc_oci_runtime.py"))
    init = ("#!%s -IS\nimport sys\nsys.path.insert(0, '/')\nimport cc_oci_runtime\n"
            "cc_oci_runtime.agent_main()\n" % python)
    w.add_file("init", init.encode(), 0o755)
    w.close()


def _pyc_from_source(source, name):
    """A sourceless .pyc for source bytes."""
    import importlib.util
    import marshal
    code = compile(source, name, "exec", dont_inherit=True)
    return importlib.util.MAGIC_NUMBER + struct.pack("<III", 0, 0, 0) + marshal.dumps(code)


# ===========================================================================
# Agent protocol: frames on the virtio-serial port and on the monitor's socket
# ===========================================================================
# A frame is (kind, stream, length) then length bytes. MSG frames carry one JSON
# object; DATA frames carry bytes of one stream, stream = process * 4 + fd, and an
# empty DATA frame is end-of-file. Process 0 is the container's own process.

FRAME = struct.Struct("!BII")
CLIENT_OPS = ("start", "exec", "signal", "resize", "ps")  # what the monitor's socket accepts
MSG, DATA = 1, 2
CHUNK = 65536


def send_msg(fd, obj):
    """Send one JSON message frame."""
    payload = json.dumps(obj).encode()
    _write_all(fd, FRAME.pack(MSG, 0, len(payload)) + payload)


def send_data(fd, stream, data):
    """Send one data frame (empty data means end-of-file)."""
    _write_all(fd, FRAME.pack(DATA, stream, len(data)) + bytes(data))


def stream_id(proc, fd):
    """The stream number of fd 0/1/2 of process proc."""
    return proc * 4 + fd


class FrameReader:
    """Reassembles frames from the bytes read off a socket or port."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        """Add bytes; return the complete frames as (kind, stream, payload)."""
        self.buf += data
        frames = []
        frame = self.pop()
        while frame is not None:
            frames.append(frame)
            frame = self.pop()
        return frames

    def pop(self):
        """Remove and return the first complete frame, or None; later frames stay buffered."""
        if len(self.buf) < FRAME.size:
            return None
        kind, stream, length = FRAME.unpack_from(self.buf)
        if len(self.buf) < FRAME.size + length:
            return None
        payload = bytes(self.buf[FRAME.size:FRAME.size + length])
        del self.buf[:FRAME.size + length]
        return kind, stream, json.loads(payload) if kind == MSG else payload


def read_msg(fd, reader, timeout):
    """Block until the next MSG frame on fd (data frames before it are dropped, frames after it
    stay in reader for the caller)."""
    import select
    deadline = time.monotonic() + timeout
    while True:
        frame = reader.pop()
        while frame is not None:
            if frame[0] == MSG:
                return frame[2]
            frame = reader.pop()
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise Error("timed out waiting for the container's monitor")
        data = os.read(fd, CHUNK)
        if not data:
            raise Error("the container's monitor closed the connection")
        reader.buf += data


def monitor_request(state, request, timeout=30, wait=True):
    """Send one request to a container's monitor and return its reply (errors raise).

    With wait=False the request is only queued (a paused VM answers when resumed)."""
    try:
        sock = connect_unix(state.dir, "ctl.sock", timeout)
    except OSError:
        raise Error("container not running") from None
    with sock:
        send_msg(sock.fileno(), request)
        if not wait:  # the monitor reads what was sent even after we close
            return {}
        reply = read_msg(sock.fileno(), FrameReader(), timeout)
    if reply.get("error"):
        raise Error(reply["error"])
    return reply


def connect_unix(directory, name, timeout=None):
    """Connect to the socket directory/name, even when the full path is too long for AF_UNIX."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    path = os.path.join(directory, name)
    dfd = None
    try:
        if len(path) >= 100:
            dfd = os.open(directory, os.O_PATH | os.O_CLOEXEC)
            path = "/proc/self/fd/%d/%s" % (dfd, name)
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    finally:
        if dfd is not None:
            os.close(dfd)
    sock.settimeout(None)
    return sock


def guest_config(cid, conf):
    """What the agent needs to set the container up (share_list has tagged the binds)."""
    return {"id": cid, "hostname": conf.get("hostname"), "process": conf["process"],
            "mounts": [m for m in conf["mounts"] if not m.get("skip")],
            "readonly": conf["root"]["readonly"], "masked": conf["masked"],
            "readonly_paths": conf["readonly_paths"], "sysctl": conf["sysctl"]}


# ===========================================================================
# Network: rtnetlink and tc messages, shared by the monitor (host) and the agent (guest)
# ===========================================================================
# The monitor lives in the container's network namespace. For each Ethernet interface the
# engine put there (veth, netavark/CNI interface) it redirects all traffic both ways
# between that interface and a tap that QEMU opened (tc ingress qdisc + u32 filter +
# mirred redirect, Kata's "tcfilter" model); the guest NIC on that tap takes the
# interface's MAC, MTU, addresses and routes, which the agent sets over rtnetlink.

NET_SLOTS = 4  # virtio-net NICs every VM (and the template) has; more interfaces: error
TAP_PREFIX = "cc-tap"
NLMSG = struct.Struct("=IHHII")      # nlmsghdr: len, type, flags, seq, pid
NLA = struct.Struct("=HH")           # rtattr: len, type
IFINFO = struct.Struct("=BxHiII")    # ifinfomsg: family, type, index, flags, change
IFADDR = struct.Struct("=BBBBi")     # ifaddrmsg: family, prefixlen, flags, scope, index
RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg: family, dst_len, src_len, tos, table, protocol,
#                                      scope, type, flags
TCMSG = struct.Struct("=BxxxiIII")   # tcmsg: family, ifindex, handle, parent, info
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_GETADDR = 16, 18, 20, 22
RTM_NEWROUTE, RTM_GETROUTE, RTM_NEWQDISC, RTM_DELQDISC, RTM_NEWTFILTER = 24, 26, 36, 37, 44
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP = 1, 2, 4, 0x300
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
NLA_F_NESTED = 0x8000
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_INFO_KIND = 1, 3, 4, 18, 1
IFLA_NET_NS_FD = 28
IFA_ADDRESS, IFA_LOCAL, IFA_F_NODAD = 1, 2, 0x02
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_PREFSRC, RTA_TABLE = 1, 4, 5, 6, 7, 15
IFF_UP, IFF_LOOPBACK, ARPHRD_ETHER = 1, 8, 1
RT_TABLE_MAIN, RTPROT_KERNEL, RTPROT_BOOT, RTN_UNICAST = 254, 2, 3, 1
TCA_KIND, TCA_OPTIONS, TCA_U32_SEL, TCA_U32_ACT = 1, 2, 5, 7
TCA_ACT_KIND, TCA_ACT_OPTIONS, TCA_MIRRED_PARMS = 1, 2, 2
TC_H_INGRESS, TC_INGRESS_HANDLE, TC_U32_TERMINAL = 0xFFFFFFF1, 0xFFFF0000, 1
TC_ACT_STOLEN, TCA_EGRESS_REDIR, ETH_P_ALL = 4, 1, 0x0003
# Interfaces that appear by themselves in every namespace when their module is loaded.
FALLBACK_LINK_KINDS = ("gretap", "erspan", "ip6gretap", "ip6erspan")
DOCKER_DNS = "127.0.0.11"  # docker's embedded resolver, listening inside the namespace


def nl_attr(kind, value):
    """One netlink attribute (padded to 4 bytes); value is bytes, str (NUL added), an int
    (u32) or a list of attributes (a nested one)."""
    if isinstance(value, list):
        value, kind = b"".join(value), kind | NLA_F_NESTED
    elif isinstance(value, str):
        value = value.encode() + b"\0"
    elif isinstance(value, int):
        value = struct.pack("=I", value)
    data = NLA.pack(NLA.size + len(value), kind) + value
    return data + b"\0" * (-len(data) % 4)


def nl_message(kind, flags, seq, header, attrs=()):
    """One netlink message: nlmsghdr, the fixed header, then the attributes."""
    body = header + b"".join(attrs)
    return NLMSG.pack(NLMSG.size + len(body), kind, flags, seq, 0) + body


def nl_parse_attrs(data, offset=0):
    """{type: bytes} of the attributes in data from offset (the nested flag dropped)."""
    attrs = {}
    while offset + NLA.size <= len(data):
        length, kind = NLA.unpack_from(data, offset)
        if length < NLA.size:
            break
        attrs[kind & 0x3FFF] = bytes(data[offset + NLA.size:offset + length])
        offset += (length + 3) & ~3
    return attrs


def nl_parse_messages(data):
    """[(type, flags, seq, payload)] of the netlink messages in one datagram."""
    out, offset = [], 0
    while offset + NLMSG.size <= len(data):
        length, kind, flags, seq, _pid = NLMSG.unpack_from(data, offset)
        if length < NLMSG.size or offset + length > len(data):
            break
        out.append((kind, flags, seq, bytes(data[offset + NLMSG.size:offset + length])))
        offset += (length + 3) & ~3
    return out


def nl_error_code(payload):
    """The errno of an NLMSG_ERROR payload (0 for an acknowledgement)."""
    return -struct.unpack_from("=i", payload)[0]


def _nl_str(raw):
    """A NUL-terminated attribute string."""
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _mac_text(raw):
    """aa:bb:cc:dd:ee:ff from 6 bytes."""
    return ":".join("%02x" % b for b in raw)


def _mac_bytes(text):
    """6 bytes from aa:bb:cc:dd:ee:ff."""
    return bytes(int(part, 16) for part in text.split(":"))


class Netlink:
    """A NETLINK_ROUTE socket in the calling thread's network namespace."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self):
        """Close the socket."""
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.close()

    def request(self, kind, flags, header, attrs=()):
        """Send one request; the payloads of a dump's answers, or [] when acknowledged.
        A kernel error raises OSError with its errno."""
        self.seq += 1
        self.sock.send(nl_message(kind, flags | NLM_F_REQUEST | NLM_F_ACK, self.seq, header, attrs))
        answers = []
        while True:
            for mkind, mflags, seq, payload in nl_parse_messages(self.sock.recv(1 << 16)):
                if seq != self.seq:
                    continue
                if mkind == NLMSG_ERROR:
                    code = nl_error_code(payload)
                    if code:
                        raise OSError(code, os.strerror(code))
                    return answers
                if mkind == NLMSG_DONE:
                    return answers
                answers.append((mkind, payload))
                if not mflags & NLM_F_MULTI and not flags & NLM_F_DUMP:
                    return answers

    # -- reading ----------------------------------------------------------
    def links(self):
        """[{index, name, type, flags, mtu, mac, kind}] of every interface."""
        out = []
        for _kind, payload in self.request(RTM_GETLINK, NLM_F_DUMP, IFINFO.pack(0, 0, 0, 0, 0)):
            out.append(parse_link(payload))
        return out

    def addresses(self):
        """[{index, family, address, prefix, scope}] of every address."""
        out = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for _kind, payload in self.request(RTM_GETADDR, NLM_F_DUMP,
                                               IFADDR.pack(family, 0, 0, 0, 0)):
                out.append(parse_address(payload))
        return [a for a in out if a]

    def routes(self):
        """[{family, dst, dst_len, gateway, oif, scope, priority, prefsrc, protocol}] of the
        main table's unicast routes."""
        out = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for _kind, payload in self.request(RTM_GETROUTE, NLM_F_DUMP,
                                               RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
                route = parse_route(payload)
                if route:
                    out.append(route)
        return out

    # -- changing ---------------------------------------------------------
    def set_link(self, index, up=None, mtu=None, mac=None, name=None, netns=None):
        """Change an interface in one request: into namespace fd netns, MAC, MTU, name, then
        up/down (the kernel applies them in that order)."""
        attrs = [nl_attr(IFLA_NET_NS_FD, netns)] if netns is not None else []
        if mtu:
            attrs.append(nl_attr(IFLA_MTU, int(mtu)))
        if mac:
            attrs.append(nl_attr(IFLA_ADDRESS, _mac_bytes(mac)))
        if name:
            attrs.append(nl_attr(IFLA_IFNAME, name))
        flags = change = 0
        if up is not None:
            flags, change = (IFF_UP if up else 0), IFF_UP
        self.request(RTM_NEWLINK, 0, IFINFO.pack(0, 0, index, flags, change), attrs)

    def move_link(self, index, netns_fd):
        """Move an interface into the network namespace netns_fd."""
        self.request(RTM_NEWLINK, 0, IFINFO.pack(0, 0, index, 0, 0), [nl_attr(IFLA_NET_NS_FD, netns_fd)])

    def add_address(self, index, addr):
        """Add one address ({family, address, prefix}) to an interface."""
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, *address_message(index, addr))

    def add_route(self, route, oif):
        """Add one route of the main table through interface oif."""
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, *route_message(route, oif))

    def add_ingress(self, index):
        """Add the ingress qdisc to an interface."""
        self.request(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL, *ingress_qdisc_message(index))

    def del_ingress(self, index):
        """Remove an interface's ingress qdisc (and its filters)."""
        self.request(RTM_DELQDISC, 0, *ingress_qdisc_message(index))

    def add_redirect(self, index, target):
        """Redirect every frame that arrives on index to the egress of target."""
        self.request(RTM_NEWTFILTER, NLM_F_CREATE | NLM_F_EXCL, *redirect_filter_message(index, target))


def parse_link(payload):
    """An RTM_NEWLINK payload as {index, name, type, flags, mtu, mac, kind}."""
    _family, ltype, index, flags, _change = IFINFO.unpack_from(payload)
    attrs = nl_parse_attrs(payload, IFINFO.size)
    info = nl_parse_attrs(attrs.get(IFLA_LINKINFO, b""))
    return {"index": index, "type": ltype, "flags": flags,
            "name": _nl_str(attrs.get(IFLA_IFNAME, b"")),
            "mtu": struct.unpack("=I", attrs[IFLA_MTU])[0] if IFLA_MTU in attrs else 0,
            "mac": _mac_text(attrs[IFLA_ADDRESS]) if len(attrs.get(IFLA_ADDRESS, b"")) == 6 else "",
            "kind": _nl_str(info.get(IFLA_INFO_KIND, b""))}


def parse_address(payload):
    """An RTM_NEWADDR payload as {index, family, address, prefix, scope}."""
    family, prefix, _flags, scope, index = IFADDR.unpack_from(payload)
    attrs = nl_parse_attrs(payload, IFADDR.size)
    raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
    if family not in (socket.AF_INET, socket.AF_INET6) or not raw:
        return None
    return {"index": index, "family": 4 if family == socket.AF_INET else 6,
            "address": socket.inet_ntop(family, raw), "prefix": prefix, "scope": scope}


def parse_route(payload):
    """An RTM_NEWROUTE payload as a dict; None unless a unicast route of the main table."""
    family, dst_len, _src, _tos, table, protocol, scope, rtype, _flags = RTMSG.unpack_from(payload)
    attrs = nl_parse_attrs(payload, RTMSG.size)
    if RTA_TABLE in attrs:
        table = struct.unpack("=I", attrs[RTA_TABLE])[0]
    if table != RT_TABLE_MAIN or rtype != RTN_UNICAST:
        return None

    def addr(kind):
        return socket.inet_ntop(family, attrs[kind]) if kind in attrs else None
    return {"family": 4 if family == socket.AF_INET else 6, "dst": addr(RTA_DST),
            "dst_len": dst_len, "gateway": addr(RTA_GATEWAY), "prefsrc": addr(RTA_PREFSRC),
            "oif": struct.unpack("=i", attrs[RTA_OIF])[0] if RTA_OIF in attrs else 0,
            "priority": struct.unpack("=I", attrs[RTA_PRIORITY])[0] if RTA_PRIORITY in attrs else 0,
            "scope": scope, "protocol": protocol}


def _family(version):
    """AF_INET or AF_INET6 for 4 or 6."""
    return socket.AF_INET if version == 4 else socket.AF_INET6


def address_message(index, addr):
    """(header, attrs) of RTM_NEWADDR for {family, address, prefix} (IPv6 without DAD: the
    engine's namespace already owns the address)."""
    family = _family(addr["family"])
    raw = socket.inet_pton(family, addr["address"])
    flags = IFA_F_NODAD if family == socket.AF_INET6 else 0
    attrs = [nl_attr(IFA_LOCAL, raw), nl_attr(IFA_ADDRESS, raw)] if family == socket.AF_INET \
        else [nl_attr(IFA_ADDRESS, raw)]
    return IFADDR.pack(family, addr["prefix"], flags, 0, index), attrs


def route_message(route, oif):
    """(header, attrs) of RTM_NEWROUTE for a route as parse_route gives it."""
    family = _family(route["family"])
    header = RTMSG.pack(family, route["dst_len"], 0, 0, RT_TABLE_MAIN, RTPROT_BOOT,
                        route["scope"], RTN_UNICAST, 0)
    attrs = [nl_attr(RTA_OIF, oif)]
    if route["dst_len"] and route.get("dst"):
        attrs.append(nl_attr(RTA_DST, socket.inet_pton(family, route["dst"])))
    if route.get("gateway"):
        attrs.append(nl_attr(RTA_GATEWAY, socket.inet_pton(family, route["gateway"])))
    if route.get("prefsrc"):
        attrs.append(nl_attr(RTA_PREFSRC, socket.inet_pton(family, route["prefsrc"])))
    if route.get("priority"):
        attrs.append(nl_attr(RTA_PRIORITY, route["priority"]))
    return header, attrs


def ingress_qdisc_message(index):
    """(header, attrs) of the ingress qdisc of an interface (`tc qdisc add dev X ingress`)."""
    return TCMSG.pack(0, index, TC_INGRESS_HANDLE, TC_H_INGRESS, 0), [nl_attr(TCA_KIND, "ingress")]


def redirect_filter_message(index, target):
    """(header, attrs) of `tc filter add dev X parent ffff: protocol all prio 1 u32 match u8 0 0
    action mirred egress redirect dev TARGET`."""
    selector = struct.pack("=BBBxHHhhI", TC_U32_TERMINAL, 0, 1, 0, 0, 0, 0, 0)
    selector += struct.pack("=IIii", 0, 0, 0, 0)  # one key that matches everything
    mirred = struct.pack("=IIiiiiI", 0, 0, TC_ACT_STOLEN, 0, 0, TCA_EGRESS_REDIR, target)
    action = [nl_attr(TCA_ACT_KIND, "mirred"),
              nl_attr(TCA_ACT_OPTIONS, [nl_attr(TCA_MIRRED_PARMS, mirred)])]
    options = [nl_attr(TCA_U32_SEL, selector), nl_attr(TCA_U32_ACT, [nl_attr(1, action)])]
    info = (1 << 16) | socket.htons(ETH_P_ALL)
    return (TCMSG.pack(0, index, 0, TC_INGRESS_HANDLE, info),
            [nl_attr(TCA_KIND, "u32"), nl_attr(TCA_OPTIONS, options)])


def tap_name(slot):
    """The host tap behind the guest's NIC number slot."""
    return "%s%d" % (TAP_PREFIX, slot)


def slot_mac(slot):
    """The MAC the template gives NIC number slot (the agent replaces it)."""
    return "02:cc:00:00:00:%02x" % slot


def net_args(bus):
    """-netdev/-device pairs of the VM's NIC slots: taps QEMU creates in its namespace."""
    argv = []
    for i in range(NET_SLOTS):
        argv += ["-netdev", "tap,id=net%d,ifname=%s,script=no,downscript=no,vhost=off" % (i, tap_name(i)),
                 "-device", "virtio-net-%s,netdev=net%d,mac=%s" % (bus, i, slot_mac(i))]
    return argv


def engine_links(links):
    """The interfaces of a namespace to give the VM: Ethernet, up, not lo, not ours."""
    return [ln for ln in links if ln["type"] == ARPHRD_ETHER and ln["flags"] & IFF_UP
            and not ln["flags"] & IFF_LOOPBACK and not ln["name"].startswith(TAP_PREFIX)
            and ln["kind"] not in FALLBACK_LINK_KINDS]


def network_plan(links, addresses, routes):
    """What the guest must configure: [{slot, name, mac, mtu, index, addresses}] and the routes
    (by interface name) of the engine's interfaces."""
    wired = engine_links(links)
    if len(wired) > NET_SLOTS:
        raise Error("network: %d interfaces in the container's network namespace; a VM has %d"
                    % (len(wired), NET_SLOTS))
    names = {ln["index"]: ln["name"] for ln in wired}
    ifaces = [{"slot": i, "name": ln["name"], "mac": ln["mac"], "mtu": ln["mtu"],
               "index": ln["index"],
               "addresses": [{"family": a["family"], "address": a["address"], "prefix": a["prefix"]}
                             for a in addresses if a["index"] == ln["index"]
                             and not (a["family"] == 6 and a["address"].startswith("fe80:"))]}
              for i, ln in enumerate(wired)]
    rts = [dict(r, dev=names[r["oif"]]) for r in routes
           if r["oif"] in names and r["protocol"] != RTPROT_KERNEL
           and not (r["family"] == 6 and (r["dst"] or "").startswith("fe80:"))]
    rts.sort(key=lambda r: r["gateway"] is not None)  # on-link routes before gateways
    return {"interfaces": ifaces, "routes": rts}


def docker_dns_listening(proc_udp="/proc/net/udp"):
    """True when something (docker's embedded resolver) listens on 127.0.0.11 in this namespace:
    the guest cannot reach it over the NIC, so the agent relays its queries."""
    want = "%08X" % struct.unpack("<I", socket.inet_aton(DOCKER_DNS))[0]
    try:
        with open(proc_udp) as f:
            return any(line.split()[1].split(":")[0] == want for line in list(f)[1:])
    except (OSError, IndexError):
        return False


def net_check(nl, tun="/dev/net/tun"):
    """Before QEMU opens its taps: refuse a host without tun, or a namespace whose interfaces
    another VM container already took (pods, --network container:ID)."""
    if not os.path.exists(tun):
        raise Error("network: %s: no such device (load the tun module)" % tun)
    if any(ln["name"].startswith(TAP_PREFIX) for ln in nl.links()):
        raise Error("network: this network namespace already belongs to another VM container "
                    "(a pod or --network container:ID); VMs cannot share one")


def net_wire(nl):
    """Redirect each engine interface to its tap both ways; returns the guest's plan."""
    links = nl.links()
    plan = network_plan(links, nl.addresses(), nl.routes())
    taps = {ln["name"]: ln["index"] for ln in links}
    done = []
    try:
        for iface in plan["interfaces"]:
            tap = taps.get(tap_name(iface["slot"]))
            if tap is None:
                raise Error("network: the VM has no NIC for %s (hypervisor.args needs @NETWORK@)"
                            % iface["name"])
            _sysctl_quiet("net/ipv6/conf/%s/disable_ipv6" % tap_name(iface["slot"]), "1")
            nl.set_link(tap, up=True, mtu=iface["mtu"])
            try:
                nl.add_ingress(iface["index"])
            except OSError as e:
                raise Error("network: cannot add an ingress qdisc to %s: %s"
                            % (iface["name"], e.strerror)) from None
            done.append(iface["index"])
            try:
                nl.add_ingress(tap)
                nl.add_redirect(iface["index"], tap)
                nl.add_redirect(tap, iface["index"])
            except OSError as e:
                raise Error("network: cannot redirect %s to the VM (tc u32/mirred): %s"
                            % (iface["name"], e.strerror)) from None
    except BaseException:
        net_unwire(nl, done)
        raise
    return plan


def net_unwire(nl, indexes):
    """Remove the ingress qdiscs (and so the redirects) the runtime added to these interfaces."""
    for index in indexes:
        try:
            nl.del_ingress(index)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                LOG.warning("network: removing the ingress qdisc of interface %d: %s", index, e)


def _sysctl_quiet(key, value):
    """Write a /proc/sys value, ignoring failure."""
    try:
        with open("/proc/sys/" + key, "w") as f:
            f.write(value)
    except OSError:
        pass


def net_unwire_in(netns, wired):
    """In a child process inside netns, remove the redirects of wired ([{index, name}]) when
    those interfaces still exist there; a gone namespace has nothing left to clean."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            enter_netns(netns)
            with Netlink() as nl:
                names = {ln["index"]: ln["name"] for ln in nl.links()}
                net_unwire(nl, [w["index"] for w in wired if names.get(w["index"]) == w["name"]])
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.waitpid(pid, 0)


def net_probe():
    """Check tun, the ingress qdisc and u32/mirred in a throw-away namespace; a description."""
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        msg = "ok"
        try:
            os.close(rfd)
            _check_libc(_libc().unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            try:
                tun = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                raise Error("/dev/net/tun: %s (load the tun module)" % e.strerror) from None
            fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", tap_name(0).encode(), IFF_TAP | IFF_NO_PI))
            with Netlink() as nl:
                index = {ln["name"]: ln["index"] for ln in nl.links()}[tap_name(0)]
                try:
                    nl.add_ingress(index)
                    nl.add_redirect(index, index)
                except OSError as e:
                    raise Error("tc ingress qdisc + u32/mirred: %s (modules sch_ingress, cls_u32, "
                                "act_mirred)" % e.strerror) from None
        except (Error, OSError) as e:
            msg = str(e)
        finally:
            _write_all(wfd, msg.encode())
            os._exit(0)
    os.close(wfd)
    os.waitpid(pid, 0)
    result = _read_pipe(rfd, 10).decode()
    if result != "ok":
        raise Error(result)
    return "tun, tc ingress qdisc, u32 filter and mirred redirect work (netlink, no tools needed)"


# ===========================================================================
# Monitor: one per container, parent of QEMU, relay of stdio and signals
# ===========================================================================

class Monitor:
    """Runs QEMU, boots the agent, relays stdio and signals, exits with the workload's status."""

    def __init__(self, state_dir, cid, gconf, argv, vm, netns, notify_fd, stdio=(0, 1, 2),
                 restore=None, terminal=None):
        self.dir, self.id, self.gconf, self.argv, self.vm = state_dir, cid, gconf, argv, vm
        self.restore = restore  # {"dir": template, "argv": QEMU restoring it}, or None
        self.netns, self.notify_fd = netns, notify_fd
        self.stdin, self.stdout, self.stderr = stdio
        self.qemu_pid, self.qemu_status, self.agent = None, None, None
        self.reader = FrameReader()
        self.clients, self.pending, self.procs = {}, {}, {}
        self.signals, self.next_id, self.next_proc = [], 1, 1
        self.exit_code, self.ctl, self.stdin_is_file = None, None, False
        self.terminal = terminal  # the host pty slave the engine holds the master of
        self.wired = []  # the engine's interfaces redirected to the VM's taps
        self.dns_queries = []  # [(socket, guest peer)] of DNS queries relayed to docker's resolver

    # -- start-up ----------------------------------------------------------
    def run(self):
        """The monitor's whole life; returns its exit code."""
        try:
            self._setup()
            self._boot()
        except (Error, OSError) as e:
            msg = str(e) if isinstance(e, Error) else "monitor: %s" % e
            LOG.debug("monitor: boot failed: %s", msg)
            self._notify({"error": msg})
            self._stop_qemu()
            return 1
        self._notify({"ok": True})
        return self._loop()

    def _setup(self):
        """New session, sub-reaper, the container's network namespace, signal wake-ups."""
        os.setsid()
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        if self.netns:  # before our own /proc hides /proc/<pid>/ns/net (--network container:ID)
            enter_netns(self.netns)
        if os.getpid() == 1:  # our own pid namespace: a /proc that shows just us and QEMU
            _check_libc(_libc().unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
            mount(None, "/", None, MS_REC | MS_PRIVATE)
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        os.chdir(self.dir)
        with Netlink() as nl:
            net_check(nl)
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_fd = rfd
        signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        for sig in FORWARDED_SIGNALS + (signal.SIGCHLD, signal.SIGWINCH):
            signal.signal(sig, lambda s, _f: self.signals.append(s))
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        if self.terminal is not None:  # the engine's pty: its resizes send us SIGWINCH
            import termios
            fcntl.ioctl(self.terminal, termios.TIOCSCTTY, 0)

    def _notify(self, obj):
        """Tell the creating CLI how the boot went (once)."""
        if self.notify_fd is not None:
            _notify_once(self.notify_fd, obj)
            self.notify_fd = None

    def _boot(self):
        """Start the VM (restored from the template, else booted), then prepare the container."""
        deadline = time.monotonic() + float(self.vm["boot_timeout"])
        if self.restore:
            try:
                self._start_vm(self.restore["argv"], deadline, self.restore["dir"])
            except (Error, OSError) as e:
                LOG.warning("restoring the VM template failed (%s); booting instead", e)
                self._stop_qemu()
                if self.agent is not None:
                    self.agent_sock.close()
                self.agent, self.qemu_pid, self.qemu_status = None, None, None
                self.restore = None
        if not self.restore:
            self._start_vm(self.argv, deadline)
        send_msg(self.agent, {"op": "create", "config": self.gconf, "time": time.time(),
                              "seed": os.urandom(32).hex()})
        self._wait_agent("created", deadline)
        self.ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ctl.bind("ctl.sock")
        self.ctl.listen(16)

    def _start_vm(self, argv, deadline, template=None):
        """Run QEMU and connect the agent: boot and wait for it, or restore the template."""
        for name in ("agent.sock", "qmp.sock"):
            if os.path.lexists(name):
                os.unlink(name)
        self.reader = FrameReader()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind("agent.sock")
        listener.listen(1)
        self.qemu_pid = self._spawn_qemu(argv)
        listener.settimeout(0.1)
        try:
            while self.agent is None:
                self._check_qemu_alive()
                if time.monotonic() > deadline:
                    raise Error("QEMU did not connect to the agent socket")
                try:
                    self.agent_sock, _ = listener.accept()
                    self.agent_sock.setblocking(True)
                    self.agent = self.agent_sock.fileno()
                except socket.timeout:
                    pass
        finally:
            listener.close()
        if template is None:
            self._wait_agent("ready", deadline)
            return
        import shlex
        q = Qmp(".")
        try:
            q.call("migrate-set-capabilities",
                   capabilities=[{"capability": "x-ignore-shared", "state": True}])
            q.call("migrate-incoming", uri="exec:cat " + shlex.quote(os.path.join(template, "state")))
            q.wait(lambda: q.call("query-status")["status"] != "inmigrate",
                   max(1.0, deadline - time.monotonic()))
            status = q.call("query-status")["status"]
            if status not in ("running", "paused", "postmigrate", "prelaunch"):
                raise Error("the restored VM is %s" % status)
            if status != "running":
                q.call("cont")
        finally:
            q.close()

    def _spawn_qemu(self, argv):
        """fork/exec QEMU with PR_SET_PDEATHSIG so that it never outlives the monitor."""
        log_fd = os.open("qemu.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        null_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        parent = os.getpid()
        LOG.debug("qemu: %s", " ".join(argv))
        pid = os.fork()
        if pid == 0:
            try:
                prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() != parent:
                    os._exit(1)
                os.dup2(null_fd, 0)
                os.dup2(log_fd, 1)
                os.dup2(log_fd, 2)
                for sig in FORWARDED_SIGNALS + (signal.SIGCHLD, signal.SIGPIPE):
                    signal.signal(sig, signal.SIG_DFL)
                os.execv(argv[0], argv)
            finally:
                os._exit(127)
        os.close(log_fd)
        os.close(null_fd)
        return pid

    def _check_qemu_alive(self):
        """Raise with QEMU's own words when it has exited during boot."""
        if self._reap_qemu():
            raise Error("the VM exited during boot (status %d): %s"
                        % (exit_status(self.qemu_status), _tail("qemu.log") or _tail("console.log")))

    def _reap_qemu(self):
        """Collect QEMU's status if it has exited; True when it has."""
        if self.qemu_status is None and self.qemu_pid:
            try:
                pid, status = os.waitpid(self.qemu_pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = self.qemu_pid, 0
            if pid:
                self.qemu_status = status
        while True:  # reap anything else reparented to us
            try:
                if os.waitpid(-1, os.WNOHANG)[0] <= 0:
                    break
            except ChildProcessError:
                break
        return self.qemu_status is not None

    def _wait_agent(self, op, deadline):
        """Read agent frames until message op arrives (an error message raises)."""
        import select
        while True:
            for kind, _stream, msg in self.reader.feed(b""):
                if kind == MSG and msg.get("op") == "error":
                    raise Error(msg["msg"])
                if kind == MSG and msg.get("op") == op:
                    return msg
            self._check_qemu_alive()
            if time.monotonic() > deadline:
                raise Error("timed out after %ss waiting for the VM to boot (see %s)"
                            % (self.vm["boot_timeout"], os.path.join(self.dir, "console.log")))
            if select.select([self.agent], [], [], 0.2)[0]:
                data = os.read(self.agent, CHUNK)
                if not data:
                    self._reap_qemu_wait(2)
                    self._check_qemu_alive()
                    raise Error("the VM closed the agent channel during boot")
                self.reader.buf += data

    # -- the relay loop ----------------------------------------------------
    def _loop(self):
        """Relay until the workload exits; return its status."""
        import selectors
        self.sel = sel = selectors.DefaultSelector()
        sel.register(self.agent, selectors.EVENT_READ, ("agent", None))
        sel.register(self.ctl.fileno(), selectors.EVENT_READ, ("ctl", None))
        sel.register(self.wake_fd, selectors.EVENT_READ, ("wake", None))
        while self.exit_code is None:
            for key, _ in sel.select(0 if self.stdin_is_file else 1.0):
                if self.exit_code is not None:
                    break
                getattr(self, "_on_" + key.data[0])(key)
            if self.stdin_is_file and self.exit_code is None:
                self._on_stdin(None)
            self._handle_signals()
        self._finish()
        return self.exit_code

    def _on_agent(self, _key):
        """Frames from the guest."""
        data = os.read(self.agent, CHUNK)
        if not data:
            self._reap_qemu_wait(2)
            status = self.qemu_status if self.qemu_status is not None else signal.SIGKILL
            LOG.warning("the VM went away before the workload reported its exit")
            self._record_exit(exit_status(status) if os.WIFSIGNALED(status) else 255)
            return
        for kind, stream, payload in self.reader.feed(data):
            if kind == MSG:
                self._on_agent_msg(payload)
            else:
                self._on_agent_data(stream, payload)

    def _on_agent_msg(self, msg):
        """A reply to a request, or an exit event."""
        if "id" in msg:
            client = self.pending.pop(msg.pop("id"), None)
            if client is not None:
                self._reply(client, msg)
            return
        if msg.get("op") == "dns":
            self._relay_dns(msg)
            return
        if msg.get("op") == "exit":
            proc = msg.get("proc", 0)
            if proc == 0:
                self._record_exit(msg["status"])
            else:
                client = self.procs.pop(proc, None)
                if client is not None:
                    self._reply(client, msg)

    def _on_agent_data(self, stream, payload):
        """Output of a guest process: ours to stdout/stderr, an exec's to its client."""
        proc, fd = divmod(stream, 4)
        if proc == 0:
            target = self.stdout if fd == 1 else self.stderr
            if payload and target is not None:
                try:
                    _write_all(target, payload)
                except OSError:
                    pass
        else:
            client = self.procs.get(proc)
            if client is not None:
                self._send_client(client, lambda c: send_data(c, stream, payload))

    def _on_ctl(self, _key):
        """A CLI or exec monitor connects."""
        import selectors
        sock, _ = self.ctl.accept()
        self.clients[sock.fileno()] = {"sock": sock, "reader": FrameReader()}
        self.sel.register(sock.fileno(), selectors.EVENT_READ, ("client", sock.fileno()))

    def _on_client(self, key):
        """A request (or exec stdin) from a connected client."""
        fd = key.data[1]
        client = self.clients.get(fd)
        try:
            data = os.read(fd, CHUNK)
        except OSError:
            data = b""
        if not data:
            self._drop_client(fd)
            return
        try:
            frames = client["reader"].feed(data)
        except ValueError:  # not our protocol
            self._drop_client(fd)
            return
        for kind, stream, payload in frames:
            if kind == DATA:
                proc = stream // 4
                if self.procs.get(proc) == fd:
                    self._to_agent(lambda a: send_data(a, stream, payload))
                continue
            self._on_client_msg(fd, payload)

    def _on_client_msg(self, fd, msg):
        """Forward a client's request to the agent, tagging it so that the reply comes back."""
        op = msg.get("op") if isinstance(msg, dict) else None
        if op == "network":
            self._on_network(fd)
            return
        if op not in CLIENT_OPS:
            self._reply(fd, {"error": "bad request: %r" % (op,)})
            return
        if op == "exec":
            msg["proc"] = self.next_proc
            self.procs[self.next_proc] = fd
            self.next_proc += 1
        msg["id"] = self.next_id
        self.pending[self.next_id] = fd
        self.next_id += 1
        self._to_agent(lambda a: send_msg(a, msg))
        if op == "start":  # after start: stdin that arrives earlier has nowhere to go
            self._watch_stdin()
            self.signals.append(signal.SIGWINCH)  # pass the initial terminal size

    def _to_agent(self, send):
        """Run send on the agent channel; a broken channel means the VM is gone."""
        try:
            send(self.agent)
        except OSError:
            self._reap_qemu_wait(2)
            if self.exit_code is None:
                status = self.qemu_status if self.qemu_status is not None else signal.SIGKILL
                self._record_exit(exit_status(status) if os.WIFSIGNALED(status) else 255)

    def _on_stdin(self, _key):
        """The container's stdin, passed on to the workload (empty = EOF)."""
        data = _read_or_eof(self.stdin)
        self._to_agent(lambda a: send_data(a, stream_id(0, 0), data))
        if not data:
            if self.stdin_is_file:
                self.stdin_is_file = False
            else:
                self.sel.unregister(self.stdin)

    def _on_wake(self, _key):
        """Drain the signal wake-up pipe (signals are handled after each round)."""
        _drain(self.wake_fd)

    def _watch_stdin(self):
        """Start relaying stdin once the workload starts."""
        import selectors
        if self.stdin is None:
            return
        try:
            self.sel.register(self.stdin, selectors.EVENT_READ, ("stdin", None))
        except PermissionError:  # a regular file or /dev/null: always readable, read each round
            self.stdin_is_file = True
        except (OSError, ValueError):  # closed
            self._to_agent(lambda a: send_data(a, stream_id(0, 0), b""))

    def _handle_signals(self):
        """Forward signals to the workload; notice QEMU's death."""
        while self.signals:
            sig = self.signals.pop(0)
            if sig == signal.SIGCHLD:
                self._reap_qemu()  # if QEMU is gone, the agent channel's EOF follows
                continue
            msg = {"op": "signal", "proc": 0, "sig": int(sig)}
            if sig == signal.SIGWINCH:
                msg = resize_message(self.stdin, 0)
            if msg:
                self._to_agent(lambda a: send_msg(a, msg))

    def _reply(self, fd, msg):
        """Send a JSON reply to a client."""
        self._send_client(fd, lambda c: send_msg(c, msg))

    def _send_client(self, fd, send):
        """Run send on a client's fd, dropping the client when it has gone."""
        if fd not in self.clients:
            return
        try:
            send(fd)
        except OSError:
            self._drop_client(fd)

    def _drop_client(self, fd):
        """Forget a disconnected client."""
        client = self.clients.pop(fd, None)
        if client is not None:
            self.sel.unregister(fd)
            client["sock"].close()
        for proc in [p for p, c in self.procs.items() if c == fd]:
            del self.procs[proc]

    # -- network -------------------------------------------------------------
    def _on_network(self, fd):
        """Redirect the namespace's interfaces to the VM's taps and have the agent configure the
        guest; create asks once the engine's hooks have run (docker adds its veth in one)."""
        started = time.monotonic()
        try:
            with Netlink() as nl:
                plan = net_wire(nl)
            LOG.debug("network: host side wired in %.1f ms", (time.monotonic() - started) * 1e3)
        except (Error, OSError) as e:
            self._reply(fd, {"error": str(e) if isinstance(e, Error) else "network: %s" % e})
            return
        self.wired = [{"index": i["index"], "name": i["name"]} for i in plan["interfaces"]]
        plan["dns_relay"] = bool(self.wired) and docker_dns_listening()
        write_atomic(os.path.join(self.dir, "net.json"),
                     json.dumps({"netns": self.netns, "interfaces": self.wired}))
        if not self.wired:  # the agent hides its unused first NIC meanwhile (before `start`)
            self._to_agent(lambda a: send_msg(a, {"op": "network", "plan": plan}))
            self._reply(fd, {"op": "ok"})
            return
        self.pending[self.next_id] = fd
        msg = {"op": "network", "plan": plan, "id": self.next_id}
        self.next_id += 1
        self._to_agent(lambda a: send_msg(a, msg))

    def _relay_dns(self, msg):
        """Ask docker's embedded resolver (127.0.0.11 in this namespace) a guest's query."""
        import selectors
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.sendto(bytes.fromhex(msg["query"]), (DOCKER_DNS, 53))
        except (OSError, ValueError, KeyError):
            sock.close()
            return
        self.dns_queries.append((sock, msg.get("peer")))
        self.sel.register(sock.fileno(), selectors.EVENT_READ, ("dns", sock))
        while len(self.dns_queries) > 32:  # unanswered ones
            self._close_dns(self.dns_queries[0][0])

    def _on_dns(self, key):
        """The resolver's answer: back to the guest."""
        sock = key.data[1]
        peer = next((p for s, p in self.dns_queries if s is sock), None)
        try:
            answer = sock.recv(65536)
        except OSError:
            answer = None
        self._close_dns(sock)
        if answer:
            self._to_agent(lambda a: send_msg(a, {"op": "dns_answer", "answer": answer.hex(), "peer": peer}))

    def _close_dns(self, sock):
        """Forget one relayed query."""
        self.dns_queries = [q for q in self.dns_queries if q[0] is not sock]
        self.sel.unregister(sock.fileno())
        sock.close()

    def _unwire(self):
        """Remove the redirects from the engine's interfaces (their namespace is the engine's)."""
        if self.wired:
            try:
                with Netlink() as nl:
                    net_unwire(nl, [w["index"] for w in self.wired])
                os.unlink(os.path.join(self.dir, "net.json"))  # delete has nothing left to do
            except OSError as e:
                LOG.warning("network: %s", e)
            self.wired = []

    # -- the end -----------------------------------------------------------
    def _record_exit(self, status):
        """Write the exit record that makes the container stopped."""
        self.exit_code = status
        write_atomic(os.path.join(self.dir, "exit.json"),
                     json.dumps({"status": status, "time": _now_rfc3339()}))

    def _finish(self):
        """Let the VM power off (or kill it) and close everything."""
        self._reap_qemu_wait(3)
        self._stop_qemu()
        self._unwire()
        for fd in list(self.clients):
            self._drop_client(fd)

    def _reap_qemu_wait(self, timeout):
        """Wait up to timeout seconds for QEMU to exit by itself."""
        deadline = time.monotonic() + timeout
        while not self._reap_qemu() and time.monotonic() < deadline:
            time.sleep(0.02)

    def _stop_qemu(self):
        """Kill QEMU if it still runs, and reap it."""
        if self.qemu_pid and not self._reap_qemu():
            try:
                os.kill(self.qemu_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._reap_qemu_wait(5)


def resize_message(tty_fd, proc):
    """A resize request carrying the size of tty_fd, or None when it is not a sized terminal."""
    import termios
    try:
        rows, cols = struct.unpack("HHHH", fcntl.ioctl(tty_fd, termios.TIOCGWINSZ, b"\0" * 8))[:2]
    except (OSError, TypeError):
        return None
    return {"op": "resize", "proc": proc, "rows": rows, "cols": cols} if rows and cols else None


class ExecMonitor:
    """One exec'd process: relays its stdio through the container's monitor, exits with its status."""

    def __init__(self, state_dir, process, stdio, notify_fd, terminal=None):
        self.dir, self.process, self.notify_fd, self.terminal = state_dir, process, notify_fd, terminal
        self.stdin, self.stdout, self.stderr = stdio
        self.signals, self.reader = [], FrameReader()

    def run(self):
        """Ask for the process, then relay until it exits; returns its status."""
        import selectors
        os.setsid()
        if self.terminal is not None:
            import termios
            fcntl.ioctl(self.terminal, termios.TIOCSCTTY, 0)
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        for sig in FORWARDED_SIGNALS + (signal.SIGWINCH,):
            signal.signal(sig, lambda s, _f: self.signals.append(s))
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        size = resize_message(self.terminal, 0) if self.terminal is not None else None
        if size and not (self.process.get("consoleSize") or {}).get("height"):
            # the engine sized the pty before we ask: the process starts with that size
            self.process["consoleSize"] = {"height": size["rows"], "width": size["cols"]}
        try:
            self.sock = connect_unix(self.dir, "ctl.sock", 10)
            send_msg(self.sock.fileno(), {"op": "exec", "process": self.process})
            reply = read_msg(self.sock.fileno(), self.reader, 60)
        except (Error, OSError) as e:
            reply = {"error": str(e) if isinstance(e, Error) else "container not running"}
        if reply.get("error"):
            _notify_once(self.notify_fd, {"error": reply["error"]})
            return 1
        _notify_once(self.notify_fd, {"ok": True})
        self.proc = reply["proc"]
        status = self._on_frames(b"")  # output (even the exit) that came in with the reply
        if status is not None:
            return status
        self.signals.append(signal.SIGWINCH)
        sel = selectors.DefaultSelector()
        sel.register(self.sock.fileno(), selectors.EVENT_READ, "sock")
        sel.register(rfd, selectors.EVENT_READ, "wake")
        if self.stdin is not None:
            try:
                sel.register(self.stdin, selectors.EVENT_READ, "stdin")
            except (OSError, ValueError):
                send_data(self.sock.fileno(), stream_id(self.proc, 0), b"")
        while True:
            for key, _ in sel.select(1.0):
                if key.data == "wake":
                    _drain(rfd)
                elif key.data == "stdin":
                    data = _read_or_eof(self.stdin)
                    send_data(self.sock.fileno(), stream_id(self.proc, 0), data)
                    if not data:
                        sel.unregister(self.stdin)
                else:
                    status = self._on_frames()
                    if status is not None:
                        return status
            self._forward_signals()

    def _on_frames(self, data=None):
        """Output and the exit message from the container's monitor; the status once it exits."""
        if data is None:
            data = _read_or_eof(self.sock.fileno())
            if not data:
                return 255  # the container's monitor is gone
        for kind, stream, payload in self.reader.feed(data):
            if kind == DATA and payload:
                target = self.stdout if stream % 4 == 1 else self.stderr
                if target is not None:
                    try:
                        _write_all(target, payload)
                    except OSError:
                        pass
            elif kind == MSG and payload.get("op") == "exit":
                return payload["status"]
        return None

    def _forward_signals(self):
        """Pass signals (and terminal resizes) on to the process."""
        while self.signals:
            sig = self.signals.pop(0)
            msg = resize_message(self.stdin, self.proc) if sig == signal.SIGWINCH else \
                {"op": "signal", "proc": self.proc, "sig": int(sig)}
            if msg:
                try:
                    send_msg(self.sock.fileno(), msg)
                except OSError:
                    pass


def _notify_once(fd, obj):
    """Write one JSON line to a notify pipe and close it."""
    try:
        _write_all(fd, (json.dumps(obj) + "\n").encode())
    except OSError:
        pass
    os.close(fd)


def _drain(fd):
    """Empty a non-blocking wake-up pipe."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _read_or_eof(fd):
    """Read what is there; an error counts as end-of-file."""
    try:
        return os.read(fd, CHUNK)
    except OSError:
        return b""


def _tail(path, lines=5):
    """The last lines of a small log file, on one line."""
    try:
        with open(path, "rb") as f:
            text = f.read()[-4096:].decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(ln.strip() for ln in text.strip().splitlines()[-lines:])


def enter_netns(netns):
    """Join the network namespace at path, or make a new one for "new"."""
    libc = _libc()
    if netns == "new":
        _check_libc(libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        return
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check_libc(libc.setns(fd, CLONE_NEWNET), "setns %s" % netns)
    finally:
        os.close(fd)


# ===========================================================================
# Agent: this file as PID 1 inside the guest
# ===========================================================================

GUEST_ROOT = "/run/cc/root"
GUEST_SHARES = "/run/cc/shares"
NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=262144"
DEFAULT_DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
                   ("urandom", 1, 9), ("tty", 5, 0))
DEFAULT_DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                     ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                     ("ptmx", "pts/ptmx"), ("core", "/proc/kcore"))


def mount(source, target, fstype, flags=0, data=""):
    """mount(2) through libc."""
    enc = (lambda s: s.encode() if s else None)
    _check_libc(_libc().mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
                "mount %s on %s" % (fstype or source, target))


def mount_options(options):
    """(flags, data string) from OCI mount options."""
    flags, data = 0, []
    for opt in options:
        if opt in MOUNT_OPTIONS:
            bit, on = MOUNT_OPTIONS[opt]
            flags = flags | bit if on else flags & ~bit
        elif opt not in PROPAGATION_OPTIONS:
            data.append(opt)
    return flags, ",".join(data)


def resolve_executable(args0, env, cwd="/"):
    """The path exec would run for args0 (PATH from env), or an Error saying why not."""
    if "/" in args0:
        path = os.path.join(cwd, args0)
        if not os.path.exists(path):
            raise Error('exec: "%s": stat %s: no such file or directory' % (args0, args0))
        if os.path.isdir(path) or not os.access(path, os.X_OK):
            raise Error('exec: "%s": permission denied' % args0)
        return args0
    search = next((e[5:] for e in env if e.startswith("PATH=")), DEFAULT_PATH)
    for d in search.split(":"):
        path = os.path.join(d or ".", args0)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise Error('exec: "%s": executable file not found in $PATH: no such file or directory'
                % args0)


def _power_off():
    """Power the VM off (PID 1 never returns)."""
    os.sync()
    try:
        _libc().reboot(0x4321FEDC)
    finally:
        os._exit(0)


def agent_main():
    """Entry point of PID 1 in the guest."""
    try:
        Agent().run()
    except BaseException:
        import traceback
        traceback.print_exc()
    _power_off()


class Agent:
    """Prepares the container in the guest on the host's command and runs its processes."""

    def __init__(self):
        self.port, self.reader, self.conf = None, FrameReader(), None
        self.procs, self.out_fds, self.in_fds = {}, {}, {}
        self.finished = False

    def run(self):
        """Boot chores, then serve the host until the container's process ends."""
        import select
        self._boot()
        self.poll = select.poll()
        self.poll.register(self.port, select.POLLIN)
        self.poll.register(self.wake_fd, select.POLLIN)
        send_msg(self.port, {"op": "ready"})
        while not self.finished:
            for fd, ev in self.poll.poll(1000):
                if fd == self.port:
                    self._on_port()
                elif fd == self.wake_fd:
                    self._on_sigchld()
                elif fd == self.dns_fd:
                    self._on_dns_query()
                else:
                    if ev & select.POLLOUT and fd in self.in_fds:
                        self._flush_stdin(self.in_fds[fd])
                    if ev & ~select.POLLOUT and fd in self.out_fds:
                        self._on_output(fd)
            self._report_exits()

    # -- boot --------------------------------------------------------------
    def _boot(self):
        """Mount /proc, /sys, /dev; load the modules; open the agent port."""
        for target, fstype in (("/proc", "proc"), ("/sys", "sysfs"), ("/dev", "devtmpfs")):
            try:
                mount(fstype, target, fstype, MS_NOSUID | MS_NOEXEC if fstype != "devtmpfs" else 0)
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
        for name in sorted(os.listdir(GUEST_MODULES_DIR)):
            fd = os.open(os.path.join(GUEST_MODULES_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc().syscall(313, fd, b"", 0) != 0:  # finit_module
                    import ctypes
                    if ctypes.get_errno() != errno.EEXIST:
                        print("agent: cannot load %s: %s" % (name, os.strerror(ctypes.get_errno())))
            finally:
                os.close(fd)
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_fd = rfd
        signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.net, self.dns, self.dns_fd = guest_net_boot(), None, None
        self.port = self._open_port()

    @staticmethod
    def _open_port(timeout=10.0):
        """The virtio-serial port named "agent" (its node may take a moment to appear)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                for dev in os.listdir("/sys/class/virtio-ports"):
                    with open("/sys/class/virtio-ports/%s/name" % dev) as f:
                        if f.read().strip() == AGENT_PORT:
                            return os.open("/dev/" + dev, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise OSError(errno.ENODEV, "virtio port %s not found" % AGENT_PORT)
            time.sleep(0.01)

    # -- host messages -----------------------------------------------------
    def _on_port(self):
        """Frames from the host."""
        data = os.read(self.port, CHUNK)
        if not data:
            time.sleep(0.05)  # no host connected yet
            return
        for kind, stream, payload in self.reader.feed(data):
            if kind == DATA:
                self._on_stdin(stream // 4, payload)
                continue
            reply = {"id": payload["id"]} if "id" in payload else {}
            handler = getattr(self, "_op_" + str(payload.get("op")), None)
            try:
                if handler is None:
                    raise Error("unknown request %r" % payload.get("op"))
                reply.update(handler(payload) or {"op": "ok"})
            except (Error, OSError, KeyError, TypeError, ValueError) as e:
                reply.update({"op": "error", "error": str(e), "msg": str(e)})
            send_msg(self.port, reply)

    def _op_create(self, msg):
        """Mount the container's rootfs and filesystems; check its process can run."""
        if msg.get("time"):  # a restored template VM has the template's clock and entropy
            time.clock_settime(time.CLOCK_REALTIME, msg["time"])
        if msg.get("seed"):
            with open("/dev/urandom", "wb") as f:
                f.write(bytes.fromhex(msg["seed"]))
        self.conf = c = msg["config"]
        if c.get("hostname"):
            socket.sethostname(c["hostname"])
        for key, value in c.get("sysctl", {}).items():
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)
        os.makedirs(GUEST_ROOT, exist_ok=True)
        mount(ROOTFS_TAG, GUEST_ROOT, "9p", 0, NINEP_OPTIONS)
        dests = {m["destination"] for m in c["mounts"]}
        if "/dev" not in dests:
            self._mount_one({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]})
        for m in c["mounts"]:
            self._mount_one(m)
        if "/dev/pts" not in dests:
            self._mount_one({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666",
                                         "mode=0620"]})
        if c.get("readonly"):
            mount(None, GUEST_ROOT, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        self.exe = self._check_process(c["process"])
        self.procs[0] = {"pid": None, "status": None, "process": c["process"], "open": 0}
        return {"op": "created"}

    def _mount_one(self, m):
        """One OCI mount under the container's root."""
        target = GUEST_ROOT + m["destination"]
        flags, data = mount_options(m.get("options", []))
        if m["type"] == "bind":
            share = os.path.join(GUEST_SHARES, m["share"])
            if not os.path.ismount(share):
                os.makedirs(share, exist_ok=True)
                mount(m["share"], share, "9p", 0, NINEP_OPTIONS)
            source = os.path.join(share, m["subpath"]) if m["subpath"] else share
            _make_mountpoint(target, os.path.isdir(source))
            mount(source, target, None, MS_BIND | (flags & MS_REC))
            if flags & ~(MS_BIND | MS_REC):
                mount(None, target, None, MS_BIND | MS_REMOUNT | (flags & ~MS_REC))
            return
        fstype = m["type"] or m.get("source")
        _make_mountpoint(target, True)
        if fstype == "proc":
            return  # mounted at start by the container's PID 1, in its own pid namespace
        try:
            mount(m.get("source") or fstype, target, fstype, flags, data)
        except OSError:
            if fstype != "cgroup":
                raise
            mount("cgroup2", target, "cgroup2", flags, "")
        if m["destination"] == "/dev" and fstype == "tmpfs":
            _populate_dev(target)

    def _check_process(self, process):
        """Resolve the executable and cwd inside the rootfs (in a chrooted child)."""
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                os.chroot(GUEST_ROOT)
                try:
                    os.chdir(process["cwd"])
                except OSError as e:
                    raise Error('chdir to cwd ("%s") set in config.json failed: %s'
                                % (process["cwd"], e.strerror.lower())) from None
                out = "ok:" + resolve_executable(process["args"][0], process["env"], process["cwd"])
            except (Error, OSError) as e:
                out = "error:" + str(e)
            os.write(w, out.encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            result = f.read().decode()
        os.waitpid(pid, 0)
        if not result.startswith("ok:"):
            raise Error(result.partition(":")[2] or "cannot check the process")
        return result[3:]

    def _op_start(self, msg):
        """Start the container's process."""
        proc = self.procs.get(0)
        if proc is None or proc["pid"] is not None or proc["status"] is not None:
            raise Error("cannot start a container that is not created")
        # Our next child is PID 1 of a new pid namespace, as runc's container process is.
        _check_libc(_libc().unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
        try:
            self._spawn(0, proc, self.exe)
        except (Error, OSError):
            proc["status"] = 127  # its pid namespace is spent: the container stops, as runc's does
            raise
        return {"op": "started", "pid": proc["pid"]}

    def _op_exec(self, msg):
        """Run another process in the container."""
        if self.procs.get(0, {}).get("status") is not None:
            raise Error("container not running")
        process = msg["process"]
        exe = self._check_process(process)
        proc = {"pid": None, "status": None, "process": process, "open": 0}
        self.procs[msg["proc"]] = proc
        try:
            self._spawn(msg["proc"], proc, exe)
        except (Error, OSError):
            del self.procs[msg["proc"]]
            raise
        return {"op": "started", "pid": proc["pid"], "proc": msg["proc"]}

    def _op_network(self, msg):
        """Give the guest's NICs the host interfaces' MAC, MTU, name, addresses and routes."""
        guest_network(msg["plan"], self.net)
        if msg["plan"].get("dns_relay"):
            self._start_dns_relay()
        return {"op": "ok"}

    def _start_dns_relay(self):
        """Answer on docker's resolver address (127.0.0.11:53, UDP) by relaying to the host."""
        import select
        self.dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.dns.bind((DOCKER_DNS, 53))
        self.dns.setblocking(False)
        self.dns_fd = self.dns.fileno()
        self.poll.register(self.dns_fd, select.POLLIN)

    def _on_dns_query(self):
        """A query to docker's resolver address: relayed to the monitor, which asks it."""
        try:
            data, peer = self.dns.recvfrom(4096)
        except OSError:
            return
        send_msg(self.port, {"op": "dns", "query": data.hex(), "peer": list(peer)})

    def _op_dns_answer(self, msg):
        """The resolver's answer to a relayed query, back to the asking process."""
        try:
            self.dns.sendto(bytes.fromhex(msg["answer"]), tuple(msg["peer"]))
        except OSError:
            pass
        return {"op": "none"}

    def _op_signal(self, msg):
        """Deliver a signal to one process, or to all of the container's (all=True)."""
        proc = self.procs.get(msg.get("proc", 0))
        sig = msg["sig"]
        if proc is None or proc["status"] is not None:
            raise Error("container not running")
        if proc["pid"] is None:  # created, never started
            if sig not in HARMLESS_SIGNALS:
                proc["status"] = 128 + sig
            return None
        try:
            os.kill(-1 if msg.get("all") else proc["pid"], sig)
        except ProcessLookupError:
            pass
        return None

    def _op_resize(self, msg):
        """A new terminal size for a process."""
        proc = self.procs.get(msg.get("proc", 0))
        if proc and proc.get("master") is not None:
            _set_winsize(proc["master"], msg["rows"], msg["cols"])
        return None

    def _op_ps(self, _msg):
        """The container's processes in the guest: [pid, command line] (not the agent)."""
        procs = []
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) > 1:
                try:
                    with open("/proc/%s/cmdline" % name, "rb") as f:
                        cmd = f.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if cmd:  # kernel threads have none
                    procs.append([_container_pid(name), cmd])
        return {"op": "ps", "processes": sorted(procs)}

    # -- processes ---------------------------------------------------------
    def _spawn(self, num, proc, exe):
        """fork/exec a process with pipes (or a pty) for its stdio."""
        p = proc["process"]
        if p.get("terminal"):
            master, slave = _open_container_pty()
            size = p.get("consoleSize") or {}
            if size.get("height") and size.get("width"):
                _set_winsize(master, size["height"], size["width"])
            child_fds, proc["stdin"], outs = (slave, slave, slave), master, {master: 1}
            proc["master"] = master
        else:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            child_fds, proc["stdin"], outs = (in_r, out_w, err_w), in_w, {out_r: 1, err_r: 2}
        err_r2, err_w2 = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            try:
                _exec_child(p, exe, child_fds, err_w2, self.conf if num == 0 else None)
            finally:
                os._exit(127)
        for fd in set(child_fds) | {err_w2}:
            os.close(fd)
        with os.fdopen(err_r2, "rb") as f:
            failure = f.read().decode(errors="replace")
        if failure:
            os.waitpid(pid, 0)
            for fd in set(outs) | {proc["stdin"]}:
                os.close(fd)
            raise Error(failure)
        import select
        proc["pid"], proc["inbuf"], proc["in_eof"] = pid, bytearray(), False
        os.set_blocking(proc["stdin"], False)  # stdin is buffered here, never blocking the agent
        for fd, which in outs.items():
            self.out_fds[fd] = (num, which)
            self.poll.register(fd, select.POLLIN)
            proc["open"] += 1

    def _on_stdin(self, num, data):
        """Host stdin for a process, buffered; empty data is end-of-file."""
        proc = self.procs.get(num)
        if proc is None or proc.get("stdin") is None:
            return
        if data:
            proc["inbuf"] += data
        else:
            proc["in_eof"] = True
        self._flush_stdin(num)

    def _flush_stdin(self, num):
        """Write what the process's stdin takes now; wait for POLLOUT for the rest; EOF last."""
        import select
        proc = self.procs[num]
        fd = proc.get("stdin")
        if fd is None:
            return
        try:
            while proc["inbuf"]:
                del proc["inbuf"][:os.write(fd, proc["inbuf"])]
        except BlockingIOError:
            pass
        except OSError:  # the reader has gone
            proc["inbuf"].clear()
        pending = bool(proc["inbuf"])
        is_master = fd == proc.get("master")
        if pending != (fd in self.in_fds):
            events = (select.POLLIN if is_master else 0) | (select.POLLOUT if pending else 0)
            if pending:
                self.in_fds[fd] = num
            else:
                del self.in_fds[fd]
            if events and (is_master or pending):
                self.poll.register(fd, events)  # (re-)registering changes the events
            elif not is_master:
                self.poll.unregister(fd)
        if not pending and proc["in_eof"]:
            self._close_stdin(proc)

    def _close_stdin(self, proc):
        """End a process's stdin: close the pipe, or ^D through the pty's line discipline."""
        fd = proc["stdin"]  # _flush_stdin has already stopped polling it
        try:
            if fd == proc.get("master"):
                os.write(fd, b"\x04")
            else:
                os.close(fd)
        except OSError:
            pass
        proc["stdin"] = None

    def _on_output(self, fd):
        """Output of a process, passed to the host; EOF closes the stream."""
        num, which = self.out_fds[fd]
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            return
        except OSError:  # EIO: the pty's other side is closed
            data = b""
        if data:
            send_data(self.port, stream_id(num, which), data)
            return
        self.poll.unregister(fd)
        del self.out_fds[fd]
        self.in_fds.pop(fd, None)
        os.close(fd)
        proc = self.procs[num]
        proc["open"] -= 1
        if proc.get("master") == fd:  # closed: never write to (or close) that fd number again
            proc["master"] = proc["stdin"] = None

    def _on_sigchld(self):
        """Reap every exited child; record the status of ours."""
        try:
            os.read(self.wake_fd, 4096)
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for num, proc in self.procs.items():
                if proc["pid"] == pid:
                    proc["status"] = exit_status(status)
                    if num == 0:
                        _kill_all()

    def _report_exits(self):
        """Send the exit of every process whose output is drained; end after process 0."""
        for num in sorted(self.procs, reverse=True):
            proc = self.procs[num]
            if proc["status"] is None or proc.get("reported") or proc["open"] > 0:
                continue
            if num == 0 and any(p["status"] is None for n, p in self.procs.items() if n):
                continue
            proc["reported"] = True
            if proc.get("stdin") is not None and proc.get("master") is None:
                proc["inbuf"].clear()
                if proc["stdin"] in self.in_fds:
                    self.poll.unregister(proc["stdin"])
                self.in_fds.pop(proc["stdin"], None)
                os.close(proc["stdin"])
                proc["stdin"] = None  # a late EOF from the host must not close it again
            send_msg(self.port, {"op": "exit", "proc": num, "status": proc["status"]})
            if num == 0:
                self.finished = True


def guest_net_boot():
    """Bring lo up (the kernel gives it 127.0.0.1 and ::1, as runc has it) and park the NIC slots
    but the first in a network namespace of their own, so that a container sees only the NICs it
    uses (the first, down, leaves at `network` when unused: moving a NIC costs tens of ms here).
    Returns {"home"/"park_fd": fds of our namespace and the parking one, "park": a netlink
    socket there, "slots": {MAC: link} of the parked NICs, "first": the first NIC or None}."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    first = None
    with Netlink() as nl:
        links = nl.links()
        for link in links:
            if link["flags"] & IFF_LOOPBACK:
                nl.set_link(link["index"], up=True)
        _check_libc(_libc().unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        park_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        park = Netlink()
        _check_libc(_libc().setns(home, CLONE_NEWNET), "setns")
        for link in links:
            if link["type"] == ARPHRD_ETHER and link["mac"] == slot_mac(0):
                first = link
            elif link["type"] == ARPHRD_ETHER:
                nl.move_link(link["index"], park_fd)
    return {"home": home, "park": park, "park_fd": park_fd, "first": first,
            "slots": {ln["mac"]: ln for ln in park.links()}}


def guest_network(plan, net):
    """Give each NIC the plan uses the MAC, MTU and name of the host interface it carries and
    bring it up (a parked one comes home in the same request); then the addresses and the
    routes. Without interfaces, the first NIC is parked too."""
    index_of, taken = {}, net.setdefault("home_names", {"lo"})
    first, net["first"] = net["first"], None
    with Netlink() as nl:
        for iface in plan["interfaces"]:
            mac = slot_mac(iface["slot"])
            if first is not None and first["mac"] == mac:
                link, first, sock, away = first, None, nl, None
            else:
                link, sock, away = net["slots"].pop(mac, None), net["park"], net["home"]
            if link is None:
                raise Error("network: the VM has no NIC number %d for %s" % (iface["slot"], iface["name"]))
            busy = taken | ({first["name"]} if first is not None else set())
            name = iface["name"] if iface["name"] not in busy and iface["name"] != link["name"] else None
            taken.add(name or link["name"])  # a name another NIC has: keep the kernel's
            index_of[iface["name"]] = link["index"]  # a NIC keeps its index coming home (it was free)
            try:
                sock.set_link(link["index"], up=True, mtu=iface["mtu"], mac=iface["mac"], name=name,
                              netns=away)
            except OSError as e:
                raise Error("network: %s: cannot set MAC %s and MTU %d in the VM: %s"
                            % (iface["name"], iface["mac"], iface["mtu"], e.strerror)) from None
        if first is not None:  # unused: out of the container's sight
            nl.move_link(first["index"], net["park_fd"])
        for iface in plan["interfaces"]:
            for addr in iface["addresses"]:
                _guest_net_step(nl.add_address, (index_of[iface["name"]], addr), "address %s/%d on %s"
                                % (addr["address"], addr["prefix"], iface["name"]))
        for route in plan["routes"]:
            _guest_net_step(nl.add_route, (route, index_of[route["dev"]]), "route %s/%d via %s dev %s" % (
                route["dst"] or "default", route["dst_len"], route["gateway"] or "-", route["dev"]))


def _guest_net_step(fn, args, what):
    """One netlink change in the guest; an existing entry is fine, another error is the user's."""
    try:
        fn(*args)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise Error("network: cannot set %s in the VM: %s" % (what, e.strerror)) from None


def _container_pid(pid):
    """The pid a guest process has in the container's pid namespace (NSpid's last field)."""
    try:
        with open("/proc/%s/status" % pid) as f:
            return int(next(ln for ln in f if ln.startswith("NSpid:")).split()[-1])
    except (OSError, StopIteration, ValueError):
        return int(pid)


def _kill_all():
    """SIGKILL every process but PID 1 (the container's process has ended)."""
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _open_container_pty():
    """A pty pair from the container's own devpts (so that `tty` inside names /dev/pts/N)."""
    master = os.open(GUEST_ROOT + "/dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
    num = struct.unpack("i", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))[0]
    slave = os.open(GUEST_ROOT + "/dev/pts/%d" % num, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    return master, slave


def _set_winsize(fd, rows, cols):
    """TIOCSWINSZ on a terminal."""
    import termios
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _make_mountpoint(target, directory):
    """Create a directory, or an empty file, to mount on."""
    if directory:
        os.makedirs(target, exist_ok=True)
    elif not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


def _populate_dev(dev):
    """The device nodes and links runc puts in a container's /dev."""
    import stat
    for name, major, minor in DEFAULT_DEVICES:
        path = os.path.join(dev, name)
        if not os.path.exists(path):
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(major, minor))
            os.chmod(path, 0o666)
    for name, target in DEFAULT_DEV_LINKS:
        if not os.path.lexists(os.path.join(dev, name)):
            os.symlink(target, os.path.join(dev, name))
    for name, mode in (("pts", 0o755), ("shm", 0o1777), ("mqueue", 0o755)):
        path = os.path.join(dev, name)
        if not os.path.exists(path):
            os.mkdir(path)
            os.chmod(path, mode)


def _exec_child(p, exe, fds, err_fd, init_conf=None):
    """In the forked child: become the container process and exec it (errors to err_fd).

    For the container's own process (init_conf given, PID 1 of its pid namespace) first
    mount /proc for that namespace and apply maskedPaths and readonlyPaths."""
    import resource  # before chroot: the container's root has no Python modules
    import termios
    try:
        if init_conf is not None:
            _pid1_mounts(init_conf)
        os.setsid()
        if p.get("terminal"):
            fcntl.ioctl(fds[0], termios.TIOCSCTTY, 0)
        for i, fd in enumerate(fds):
            os.dup2(fd, i, inheritable=True)
        os.chroot(GUEST_ROOT)
        os.chdir(p["cwd"])
        for sig in range(1, signal.NSIG):
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                try:
                    signal.signal(sig, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for r in p.get("rlimits", []):
            resource.setrlimit(getattr(resource, r["type"]), (r["soft"], r["hard"]))
        env = list(p["env"])
        if not any(e.startswith("HOME=") for e in env):
            env.append("HOME=" + _home_of(p["uid"]))
        os.setgroups(p.get("additionalGids") or [])
        os.setgid(p["gid"])
        os.setuid(p["uid"])
        os.umask(p["umask"] if p.get("umask") is not None else 0o022)
        if p.get("noNewPrivileges"):
            prctl(PR_SET_NO_NEW_PRIVS, 1)
        os.execve(exe, p["args"], dict(e.split("=", 1) for e in env))
    except OSError as e:
        msg = 'exec: "%s": %s' % (p["args"][0], e.strerror.lower() if e.strerror else e)
        os.write(err_fd, msg.encode())
    except Exception as e:  # a bug: still tell the host rather than exit silently
        os.write(err_fd, ('exec: "%s": %r' % (p["args"][0], e)).encode())


def _pid1_mounts(conf):
    """proc mounts of the new pid namespace, then maskedPaths and readonlyPaths over them."""
    for m in conf["mounts"]:
        if m["type"] == "proc":
            flags, data = mount_options(m.get("options", []))
            mount("proc", GUEST_ROOT + m["destination"], "proc", flags, data)
    for path in conf.get("masked", []):
        target = GUEST_ROOT + path
        if os.path.isdir(target):
            mount("tmpfs", target, "tmpfs", MS_RDONLY)
        elif os.path.exists(target):
            mount("/dev/null", target, None, MS_BIND)
    for path in conf.get("readonly_paths", []):
        target = GUEST_ROOT + path
        if os.path.exists(target):
            mount(target, target, None, MS_BIND | MS_REC)
            mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC)


def _home_of(uid, passwd="/etc/passwd"):
    """The home directory of uid in the container's /etc/passwd, or /."""
    try:
        with open(passwd) as f:
            for line in f:
                fields = line.split(":")
                if len(fields) > 5 and fields[2] == str(uid):
                    return fields[5]
    except OSError:
        pass
    return "/"


# ===========================================================================
# Commands
# ===========================================================================

def _open_state(args, lock=False):
    """The named container's state, loaded (and locked when asked)."""
    state = State(args.root, args.id)
    if not state.exists():
        raise Error("container does not exist")
    if lock:
        state.lock()
    state.load()
    return state


def run_hooks(hooks, name, state_obj, fatal=True):
    """Run the hooks of one kind with the state JSON on stdin, honouring timeouts."""
    import subprocess
    for hook in hooks.get(name, []):
        args = hook.get("args") or [hook["path"]]
        env = dict(e.split("=", 1) for e in hook.get("env", []))
        LOG.debug("%s hook: %s", name, " ".join(args))
        try:
            proc = subprocess.run(args, executable=hook["path"], input=json.dumps(state_obj).encode(),
                                  env=env, capture_output=True, timeout=hook.get("timeout"))
            if proc.returncode != 0:
                raise Error("%s hook %s failed: exit status %d: %s" % (
                    name, hook["path"], proc.returncode, proc.stderr.decode(errors="replace").strip()))
        except subprocess.TimeoutExpired:
            err = Error("%s hook %s timed out after %ss" % (name, hook["path"], hook["timeout"]))
        except OSError as e:
            err = Error("%s hook %s: %s" % (name, hook["path"], e.strerror))
        except Error as e:
            err = e
        else:
            continue
        if fatal:
            raise err
        LOG.warning(str(err))


def _read_pipe(fd, timeout):
    """Everything written to a pipe until EOF, or what came before timeout."""
    import select
    chunks, deadline = [], time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        data = os.read(fd, 4096)
        if not data:
            break
        chunks.append(data)
    os.close(fd)
    return b"".join(chunks)


def _kill_container(state, wait=5.0):
    """SIGKILL the monitor and QEMU of a container (if still theirs) and wait for them."""
    d = state.data
    vm = d.get("vm", {})
    targets = [(d.get("pid"), d.get("pid_start")), (vm.get("qemu_pid"), vm.get("qemu_start"))]
    for pid, start in targets:
        if process_alive(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + wait
    while any(process_alive(p, s) for p, s in targets) and time.monotonic() < deadline:
        _reap_children()
        time.sleep(0.01)


def _reap_children():
    """Reap our own exited children (the monitor of `run`)."""
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        pass


def create_container(args, console_socket=None, foreground=False):
    """Validate, boot the VM under a new monitor, run the create hooks; return (state, pid)."""
    state = State(args.root, args.id)
    conf = load_spec(args.bundle)
    terminal = conf["process"]["terminal"]
    if is_host_netns(conf.get("netns")):
        raise Error(HOST_NETWORK_ERROR)
    if terminal and not console_socket and not foreground:
        raise Error("process.terminal: --console-socket is required when terminal is true")
    vm = resolve_vm(conf)
    image = vm.get("image") or guest_image(vm)
    if not os.path.isfile(image):
        raise Error("vm.image: %s: no such file" % image)
    state.make()
    monitor_pid = None
    try:
        argv = qemu_command(args.id, vm, conf, state.dir, image)
        restore = _restore_plan(args.id, vm, conf, state, image)
        state.data = {"ociVersion": conf.get("ociVersion", OCI_VERSION), "id": args.id, "pid": 0,
                      "bundle": conf["bundle"], "rootfs": conf["root"]["path"],
                      "created": _now_rfc3339(), "annotations": conf["annotations"],
                      "hooks": conf["hooks"], "started": False, "paused": False,
                      "terminal": terminal, "process": conf["process"],
                      "vm": {"accel": vm["accel_used"], "kernel": vm["kernel_image"],
                             "image": image, "machine": vm["machine"], "memory": vm["memory"]}}
        state.save()
        stdio, host_tty = _container_stdio(terminal, console_socket, conf["process"])
        gconf = guest_config(args.id, conf)

        def monitor_main(notify_fd):
            state.unlock()
            return Monitor(state.dir, args.id, gconf, argv, vm, conf["netns"], notify_fd, stdio,
                           restore, host_tty).run()
        monitor_pid, rfd = _fork_monitor(monitor_main, keep_stdio=host_tty is None,
                                         own_pid_ns=True)
        if host_tty is not None and console_socket:
            os.close(host_tty)
        state.data.update(pid=monitor_pid, pid_start=proc_start_time(monitor_pid), creating=True)
        state.save()  # from here on, delete --force finds the monitor even if we die
        reply = _read_pipe(rfd, float(vm["boot_timeout"]) + 15)
        result = json.loads(reply) if reply.strip() else {"error": "the monitor died during boot"}
        if result.get("error"):
            raise Error(result["error"])
        state.data["creating"] = False
        qemu_pid = host_child_pid(monitor_pid)
        state.data["vm"].update(qemu_pid=qemu_pid, qemu_start=proc_start_time(qemu_pid or 0))
        state.save()
        for name in ("prestart", "createRuntime"):
            run_hooks(conf["hooks"], name, state.oci_state())
        started = time.monotonic()
        monitor_request(state, {"op": "network"}, timeout=float(vm["boot_timeout"]))
        LOG.debug("network wired in %.1f ms", (time.monotonic() - started) * 1e3)
        if getattr(args, "pid_file", None):
            write_atomic(os.path.abspath(args.pid_file), str(monitor_pid))
    except BaseException:
        if monitor_pid:
            unwire_network(state)
            _kill_container(state)
        state.remove()
        raise
    LOG.info("created %s (monitor %d, %s)", args.id, monitor_pid, vm["accel_used"])
    return state, monitor_pid


HOST_NETWORK_ERROR = (
    "host networking is not supported: the container would share the host's network "
    "namespace (--network host, or no network namespace in config.json), and a VM cannot "
    "take the host's interfaces; use a network namespace (a bridge network, or --network none)")


def is_host_netns(netns):
    """True for no network namespace, or a path to the host's (docker's --network host passes
    its bind mount of it): the namespace of the host's init or of this process."""
    if not netns:
        return True
    if netns == "new":
        return False
    try:
        target = os.stat(netns)
    except OSError:
        return False
    for own in ("/proc/1/ns/net", "/proc/self/ns/net"):
        try:
            st = os.stat(own)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            return True
    return False


def unwire_network(state):
    """Remove the redirects the monitor added to the engine's interfaces, also when it was
    killed: through its namespace while it lives, else the namespace's path (gone: nothing left)."""
    try:
        with open(state.path("net.json")) as f:
            net = json.load(f)
    except (OSError, ValueError):
        return
    if not net.get("interfaces"):
        return
    d = state.data
    if process_alive(d.get("pid"), d.get("pid_start")):
        netns = "/proc/%d/ns/net" % d["pid"]
    elif net.get("netns") not in (None, "new") and os.path.exists(net["netns"]):
        netns = net["netns"]
    else:
        return
    net_unwire_in(netns, net["interfaces"])


def _restore_plan(cid, vm, conf, state, image):
    """How to restore this container's VM from the template, or None to boot it."""
    try:
        template = template_for(vm, image)
    except (Error, OSError) as e:
        LOG.warning("VM template unavailable (%s); booting instead", e)
        return None
    shares = template_shares(share_list(conf), os.path.join(CACHE_DIR, "empty")) if template else None
    if not shares:
        return None
    spec = {"ram": os.path.join(template, "ram"), "share": False, "incoming": True, "shares": shares}
    return {"dir": template, "argv": qemu_command(cid, vm, conf, state.dir, image, spec)}


def _fork_monitor(monitor_main, keep_stdio=True, own_pid_ns=False):
    """Fork a monitor running monitor_main(notify_fd); returns its pid and the pipe it reports on.

    Without keep_stdio the monitor lets go of the caller's fds 0-2 (its container talks through
    a pty): an engine waits for EOF on the pipes it gave the runtime. With own_pid_ns it is
    PID 1 of a new pid namespace (forked by a child that exits at once, so it is orphaned to
    the caller's sub-reaper), and its first line on the pipe is its pid."""
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(rfd)
            if own_pid_ns:
                _check_libc(_libc().unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
                inner = os.fork()
                if inner:
                    _write_all(wfd, b"%d\n" % inner)
                    os._exit(0)
            if not keep_stdio:
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.close(null)
            code = monitor_main(wfd)
        except BaseException as e:
            LOG.debug("monitor: %r", e)
        finally:
            os._exit(code)
    os.close(wfd)
    if own_pid_ns:
        os.waitpid(pid, 0)
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(rfd, 1)
            if not chunk:
                raise Error("cannot start the container's monitor")
            line += chunk
        pid = int(line)
    return pid, rfd


def host_child_pid(pid):
    """The host pid of pid's only child (the monitor's QEMU, which it knows by its own pid
    namespace's numbering)."""
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return int(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        return None


def _container_stdio(terminal, console_socket, process):
    """The monitor's (stdin, stdout, stderr) and the host pty slave it owns, if any."""
    if not terminal:
        return (0, 1, 2), None
    if not console_socket:  # run in the foreground on the caller's own terminal
        return (0, 1, None), None
    import tty
    master, slave = os.openpty()
    tty.setraw(slave)
    size = process.get("consoleSize") or {}
    if size.get("height") and size.get("width"):
        _set_winsize(master, size["height"], size["width"])
    try:
        send_console(console_socket, master)
    finally:
        os.close(master)
    return (slave, slave, None), slave


def send_console(path, fd):
    """Hand the pty master to the engine: one SCM_RIGHTS message, never waiting for a reply."""
    try:
        sock = connect_unix(os.path.dirname(os.path.abspath(path)), os.path.basename(path), 10)
    except OSError as e:
        raise Error("console socket %s: %s" % (path, e.strerror or e)) from None
    with sock:
        sock.sendmsg([b"/dev/pts/console"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                              struct.pack("i", fd))])


def start_container(state):
    """Tell the monitor to start the workload; run poststart hooks."""
    status = state.status()
    if status == "stopped":
        raise Error("cannot start a container that has stopped")
    if status != "created":
        raise Error("cannot start an already %s container" % status)
    monitor_request(state, {"op": "start"})
    state.data["started"] = True
    state.save()
    run_hooks(state.data.get("hooks", {}), "poststart", state.oci_state(), fatal=False)
    LOG.info("started %s", state.id)


def delete_container(state, force):
    """Stop what remains of a container, run poststop hooks, remove its state."""
    status = state.status()
    if status in ("running", "paused") and not force:
        raise Error("cannot delete container %s that is not stopped: %s" % (state.id, status))
    unwire_network(state)
    _kill_container(state)
    final = state.oci_state()
    final["status"] = "stopped"
    run_hooks(state.data.get("hooks", {}), "poststop", final, fatal=False)
    state.remove()
    LOG.info("deleted %s", state.id)


def cmd_create(args):
    """create: boot the container's VM and leave its monitor waiting for start."""
    create_container(args, args.console_socket)


def cmd_start(args):
    """start: run the container's process."""
    start_container(_open_state(args, lock=True))


def cmd_run(args):
    """run: create + start, then wait and exit with the workload's status (unless -d)."""
    foreground = not args.detach
    if foreground:  # the monitor is orphaned by its parent: adopt it to wait for it
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    state, monitor_pid = create_container(args, args.console_socket, foreground=foreground)
    try:
        start_container(state)
    except Error:
        delete_container(state, force=True)
        raise
    if args.detach:
        return 0
    state.unlock()
    return _wait_foreground(state, monitor_pid)


def _wait_foreground(state, monitor_pid):
    """Wait for the monitor (signals forwarded), delete the container; the workload's status."""
    code = _wait_child(monitor_pid, state.data.get("terminal"))
    record = state.exit_record()
    if record is not None:
        code = record["status"]
    state.lock()
    delete_container(state, force=True)
    return code


def _forward(pid, sig):
    """Pass a signal on to the monitor."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _raw_terminal():
    """Put the caller's terminal in raw mode; return the function that restores it."""
    import termios
    import tty
    try:
        saved = termios.tcgetattr(0)
    except termios.error:
        return None
    tty.setraw(0)
    return lambda: termios.tcsetattr(0, termios.TCSADRAIN, saved)


def exec_process(args, state):
    """The process to exec: --process FILE, or the container's own with args and overrides."""
    if args.process:
        raw = read_json(args.process if args.process != "-" else "/dev/stdin", "process")
        process = parse_process(raw, "process")
    else:
        if not args.command_args:
            raise Error("exec: a command or --process is required")
        base = dict(state.data.get("process") or {"env": [], "cwd": "/", "uid": 0, "gid": 0})
        base.update(args=args.command_args, terminal=False, consoleSize={"height": 0, "width": 0})
        base["env"] = list(base.get("env", [])) + list(args.env or [])
        if args.cwd:
            base["cwd"] = args.cwd
        if args.user:
            uid, _, gid = args.user.partition(":")
            if not uid.isdigit() or (gid and not gid.isdigit()):
                raise Error("exec: --user must be uid[:gid] in numbers: %s" % args.user)
            base["uid"], base["gid"] = int(uid), int(gid or 0)
        raw = dict(base, user={"uid": base["uid"], "gid": base["gid"],
                               "additionalGids": base.get("additionalGids", []),
                               "umask": base.get("umask")})
        process = parse_process(raw, "process")
    if args.tty:
        process["terminal"] = True
    return process


def cmd_exec(args):
    """exec: run another process in the container's VM."""
    state = _open_state(args)
    status = state.status()
    if status != "running":
        raise Error("cannot exec in a %s container" % status)
    process = exec_process(args, state)
    if process["terminal"] and not args.console_socket and args.detach:
        raise Error("process.terminal: --console-socket is required with --detach")
    stdio, host_tty = _container_stdio(process["terminal"], args.console_socket, process)
    pid, rfd = _fork_monitor(lambda fd: ExecMonitor(state.dir, process, stdio, fd, host_tty).run(),
                             keep_stdio=host_tty is None)
    if host_tty is not None:
        os.close(host_tty)
    reply = _read_pipe(rfd, 90)
    result = json.loads(reply) if reply.strip() else {"error": "the exec monitor died"}
    if result.get("error"):
        if not reply.strip():
            _forward(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise Error(result["error"])
    if args.pid_file:
        write_atomic(os.path.abspath(args.pid_file), str(pid))
    LOG.info("exec in %s: %s (monitor %d)", state.id, process["args"][0], pid)
    if args.detach:
        return 0
    return _wait_child(pid, process["terminal"])


def _wait_child(pid, terminal):
    """Forward signals to a monitor we started until it exits; its exit status."""
    for sig in FORWARDED_SIGNALS + (signal.SIGWINCH,):
        signal.signal(sig, lambda s, _f: _forward(pid, s))
    restore = _raw_terminal() if terminal else None
    try:
        while True:
            try:
                return exit_status(os.waitpid(pid, 0)[1])
            except InterruptedError:
                continue
    finally:
        if restore:
            restore()


def qmp(state, command):
    """Run one QMP command on a container's VM."""
    try:
        q = Qmp(state.dir, timeout=5)
    except Error:
        raise Error("container not running") from None
    try:
        return q.call(command)
    finally:
        q.close()


def cmd_pause(args):
    """pause: stop the container's VM (QMP stop)."""
    state = _open_state(args, lock=True)
    status = state.status()
    if status != "running":
        raise Error("container not running" if status != "paused" else "container already paused")
    qmp(state, "stop")
    state.data["paused"] = True
    state.save()
    LOG.info("paused %s", state.id)


def cmd_resume(args):
    """resume: continue a paused container's VM (QMP cont)."""
    state = _open_state(args, lock=True)
    if state.status() != "paused":
        raise Error("container not paused")
    qmp(state, "cont")
    state.data["paused"] = False
    state.save()
    LOG.info("resumed %s", state.id)


def cmd_ps(args):
    """ps: the guest's processes (table), or the host pids of monitor and QEMU (json).

    Engines read the json pids as host processes (docker top runs the host's ps on them),
    and on the host a container is its monitor and its VM."""
    state = _open_state(args)
    if state.status() not in ("running", "created", "paused"):
        raise Error("container not running")
    if args.format == "json":
        print(json.dumps([state.data["pid"], state.data["vm"]["qemu_pid"]]))
        return
    if state.status() == "paused":
        raise Error("container is paused: its processes cannot be listed")
    print("%-7s %s" % ("PID", "CMD"))
    for pid, cmd in monitor_request(state, {"op": "ps"})["processes"]:
        print("%-7d %s" % (pid, cmd))


def vm_stats(state):
    """runc-style stats of the VM: QEMU's CPU time and memory as the host sees them."""
    vm = state.data.get("vm", {})
    pid = vm.get("qemu_pid")
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/%d/status" % pid) as f:
            rss = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS"))
    except (OSError, TypeError, StopIteration):
        raise Error("container not running") from None
    user, system = int(fields[11]) * 10**9 // ticks, int(fields[12]) * 10**9 // ticks
    return {"cpu": {"usage": {"total": user + system, "user": user, "kernel": system}},
            "memory": {"usage": {"usage": rss}, "limit": _size_bytes(state.data.get("vm", {}).get(
                "memory", DEFAULT_VM["memory"]))}}


def _size_bytes(size):
    """Bytes in a QEMU size such as 256M or 1G (plain numbers are MiB, as QEMU reads them)."""
    text = str(size).strip().upper()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text) << 20


def cmd_events(args):
    """events: JSON lines of the VM's CPU and memory figures (--stats: once)."""
    state = _open_state(args)
    interval = _seconds(args.interval)
    while True:
        if state.status() in ("stopped",):
            if args.stats:
                raise Error("container not running")
            return 0
        print(json.dumps({"type": "stats", "id": state.id, "data": vm_stats(state)}), flush=True)
        if args.stats:
            return 0
        time.sleep(interval)


def _seconds(text):
    """Seconds in a Go-style duration (5s, 500ms, 1m) or a plain number."""
    text = str(text).strip()
    for suffix, scale in (("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600)):
        if text.endswith(suffix) and text[:-len(suffix)].replace(".", "", 1).isdigit():
            return float(text[:-len(suffix)]) * scale
    try:
        return float(text)
    except ValueError:
        raise Error("invalid interval: %s" % text) from None


def cmd_update(args):
    """update: a VM's resources are fixed at boot; record the request and succeed."""
    state = _open_state(args)
    if args.resources:
        raw = read_json(args.resources if args.resources != "-" else "/dev/stdin", "resources")
        if not isinstance(raw, dict):
            raise Error("resources: must be a JSON object")
        LOG.info("update %s: resources %s not applied (the VM's size is fixed at boot)",
                 state.id, ", ".join(sorted(raw)) or "none")
    return 0


def cmd_state(args):
    """state: print the runtime-spec state JSON."""
    print(json.dumps(_open_state(args).oci_state(), indent=2))


def cmd_kill(args):
    """kill: send a signal to the container's process (or all of them)."""
    state = _open_state(args)
    sig = parse_signal(args.signal)
    status = state.status()
    if status in ("stopped", "creating"):
        raise Error("container not running")
    if status == "paused" and sig == signal.SIGKILL:
        _kill_container(state)  # a stopped VM cannot run the agent; the monitor dies of KILL
        return
    monitor_request(state, {"op": "signal", "proc": 0, "sig": sig, "all": args.all},
                    wait=status != "paused")
    LOG.info("sent signal %d to %s", sig, state.id)


def cmd_delete(args):
    """delete: remove a stopped container (--force: any container)."""
    state = State(args.root, args.id)
    if not state.exists():
        if args.force:
            return 0
        raise Error("container does not exist")
    state.lock()
    state.load()
    delete_container(state, args.force)


def cmd_list(args):
    """list: the containers under --root."""
    states = [s.oci_state() for s in list_states(args.root)]
    if args.quiet:
        for s in states:
            print(s["id"])
    elif args.format == "json":
        print(json.dumps(states))
    else:
        rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
        rows += [(s["id"], str(s["pid"]), s["status"], s["bundle"], s["created"], s["owner"] or "root")
                 for s in states]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        for r in rows:
            print("   ".join(c.ljust(w) for c, w in zip(r, widths)) + "   " + r[5])


def default_spec():
    """The config.json `spec` writes (runc's defaults: sh on a terminal, usual mounts)."""
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    return {
        "ociVersion": OCI_VERSION,
        "process": {"terminal": True, "user": {"uid": 0, "gid": 0}, "args": ["sh"],
                    "env": ["PATH=" + DEFAULT_PATH, "TERM=xterm"], "cwd": "/",
                    "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
                    "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
                    "noNewPrivileges": True},
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "runc",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {"resources": {"devices": [{"allow": False, "access": "rwm"}]},
                  "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
                  "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                                  "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                                  "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
                  "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                                    "/proc/sysrq-trigger"]},
    }


def cmd_spec(args):
    """spec: write a default config.json into the bundle."""
    path = os.path.join(args.bundle, "config.json")
    if os.path.exists(path):
        raise Error("File %s exists. Remove it first" % path)
    try:
        write_atomic(path, json.dumps(default_spec(), indent="\t") + "\n")
    except OSError as e:
        raise Error("%s: %s" % (path, e.strerror)) from None


def cmd_features(_args):
    """features: what this runtime supports (runtime-spec features document)."""
    print(json.dumps({
        "ociVersionMin": "1.0.0", "ociVersionMax": OCI_VERSION,
        "hooks": ["prestart", "createRuntime", "poststart", "poststop"],
        "mountOptions": sorted(list(MOUNT_OPTIONS) + list(PROPAGATION_OPTIONS)),
        "linux": {"namespaces": ["network"], "capabilities": [],
                  "cgroup": {"v1": False, "v2": False}, "seccomp": {"enabled": False},
                  "apparmor": {"enabled": False}, "selinux": {"enabled": False}},
        "annotations": {"io.github.cc-oci-runtime.vm": "qemu"},
    }, indent=2))


def version_text():
    """The --version text (runc's layout, which podman info and docker info show)."""
    return "%s version %s\nspec: %s\npython: %s\n" % (
        PROG, __version__, OCI_VERSION, sys.version.split()[0])


def cmd_version(_args):
    """version: print the version."""
    sys.stdout.write(version_text())


def check_host():
    """[(ok, what, detail or fix)] for each piece a container needs on this host."""
    results = []

    def item(what, fn):
        try:
            results.append((True, what, fn()))
        except Error as e:
            results.append((False, what, str(e)))
    vm = {}

    def qemu():
        vm.update(load_vm_config())
        vm["qemu"] = find_qemu(vm["path"])
        return vm["qemu"]

    def kernel():
        path = vm.get("kernel", {}).get("path") or find_kernel()[0]
        vm["kernel_path"], vm["kernel_version"] = path, kernel_version_of(path)
        vm["modules_dir"] = os.path.join("/lib/modules", vm["kernel_version"])
        return path

    def modules():
        return "%d modules from %s" % (len(guest_modules(vm["modules_dir"])), vm["modules_dir"])

    def accel():
        used = vm["accel_used"] = choose_accel(vm.get("accel", "auto"))
        if vm.get("accel") in ("kvm", "tcg"):
            return "%s (set in vm.json)" % used
        if used == "kvm":
            return "kvm (the CPU has vmx/svm and /dev/kvm opens)"
        if os.path.exists("/dev/kvm"):
            return ("tcg: /dev/kvm exists but the CPU shows no vmx/svm (a paravirtual KVM that "
                    "cannot boot stock kernels); software emulation is slower but works")
        return "tcg: no /dev/kvm (load kvm_intel/kvm_amd for hardware acceleration)"

    def image():
        vm["image_path"] = guest_image(vm)
        return vm["image_path"]

    def template():
        vm["kernel_image"] = uncompressed_kernel(vm["kernel_path"])
        vm["hypervisor_args"] = _find_optional("hypervisor.args")
        found = template_for(vm, vm["image_path"])
        return found or "off (cold boots: vm.json template=false or no @MEMORY_BACKEND@ tag)"
    item("python", lambda: "%s %s" % (sys.executable, sys.version.split()[0]))
    item("qemu", qemu)
    item("kernel", kernel)
    if vm.get("modules_dir"):
        item("kernel modules", modules)
        item("accelerator", accel)
        item("guest image", image)
        if results[-1][0] and results[1][0]:
            item("VM template", template)
    item("networking", net_probe)
    return results


def cmd_check(_args):
    """check: can this host run containers? Names the fix for each missing piece."""
    results = check_host()
    for ok, what, detail in results:
        print("%-4s %-15s %s" % ("ok" if ok else "FAIL", what, detail))
    if not all(ok for ok, _, _ in results):
        raise Error("this host cannot run containers yet: see the FAIL lines above")


# ===========================================================================
# Main: the command line
# ===========================================================================

def build_parser():
    """runc's command line: global options, then a sub-command."""
    import argparse
    p = argparse.ArgumentParser(prog=PROG, description="OCI runtime that runs each container "
                                "in its own QEMU virtual machine.")
    p.add_argument("--root", default=DEFAULT_ROOT, help="state directory (default %(default)s)")
    p.add_argument("--log", help="log file (created at start-up)")
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="log format")
    p.add_argument("--global-log", help="text log of every event, with the container id")
    p.add_argument("--debug", action="store_true", help="log more detail")
    p.add_argument("-v", "--version", action="store_true", help="print the version")
    p.add_argument("--systemd-cgroup", action="store_true", help="accepted and ignored")
    p.add_argument("--criu", help="accepted and ignored")
    p.add_argument("--rootless", help="accepted and ignored")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, fn, help_text, with_id=True):
        c = sub.add_parser(name, help=help_text, description=help_text)
        c.set_defaults(func=fn)
        if with_id:
            c.add_argument("id", metavar="CONTAINER_ID", help="the container's id")
        return c

    def creating(c):
        c.add_argument("-b", "--bundle", default=".", help="bundle directory (default: current)")
        c.add_argument("--pid-file", help="file to write the monitor's pid to")
        c.add_argument("--console-socket", help="AF_UNIX socket that receives the pty master")
        c.add_argument("--no-pivot", action="store_true", help="accepted (the VM has its own root)")
        c.add_argument("--no-new-keyring", action="store_true", help="accepted and ignored")
        c.add_argument("--preserve-fds", type=int, default=0,
                       help="fds above 2 to leave open (not passed into the VM)")
        return c

    creating(command("create", cmd_create, "create a container: boot its VM, do not start it"))
    command("start", cmd_start, "start a created container's process")
    run = creating(command("run", cmd_run, "create and start a container, then wait for it"))
    run.add_argument("-d", "--detach", action="store_true", help="do not wait for the container")
    command("state", cmd_state, "print a container's state as JSON")
    kill = command("kill", cmd_kill, "send a signal to a container's process")
    kill.add_argument("signal", nargs="?", default="TERM", help="name or number (default TERM)")
    kill.add_argument("-a", "--all", action="store_true", help="signal every process")
    delete = command("delete", cmd_delete, "delete a stopped container")
    delete.add_argument("-f", "--force", action="store_true", help="kill it first if it runs")
    lst = command("list", cmd_list, "list containers", with_id=False)
    lst.add_argument("-f", "--format", choices=("table", "json"), default="table")
    lst.add_argument("-q", "--quiet", action="store_true", help="only ids")
    spec = command("spec", cmd_spec, "write a default config.json", with_id=False)
    spec.add_argument("-b", "--bundle", default=".", help="where to write config.json")
    ex = command("exec", cmd_exec, "run another process in a running container")
    ex.add_argument("command_args", nargs=argparse.REMAINDER, metavar="COMMAND",
                    help="command and arguments (unless --process)")
    ex.add_argument("-p", "--process", help="process.json to run (- for stdin)")
    ex.add_argument("-t", "--tty", action="store_true", help="give the process a terminal")
    ex.add_argument("--console-socket", help="AF_UNIX socket that receives the pty master")
    ex.add_argument("-d", "--detach", action="store_true", help="do not wait for the process")
    ex.add_argument("--pid-file", help="file to write the exec monitor's pid to")
    ex.add_argument("-e", "--env", action="append", help="extra environment NAME=VALUE")
    ex.add_argument("--cwd", help="working directory")
    ex.add_argument("-u", "--user", help="uid[:gid]")
    for flag in ("--no-new-privs", "--ignore-paused", "--no-subreaper"):
        ex.add_argument(flag, action="store_true", help="accepted and ignored")
    for opt in ("--apparmor", "--process-label", "--cgroup", "--preserve-fds"):
        ex.add_argument(opt, help="accepted and ignored")
    ex.add_argument("-c", "--cap", action="append", help="accepted and ignored")
    command("pause", cmd_pause, "pause a container's VM")
    command("resume", cmd_resume, "resume a paused container's VM")
    ps = command("ps", cmd_ps, "list the container's processes (guest pids)")
    ps.add_argument("-f", "--format", choices=("table", "json"), default="table")
    ev = command("events", cmd_events, "print the VM's resource figures as JSON lines")
    ev.add_argument("--stats", action="store_true", help="print once and exit")
    ev.add_argument("--interval", default="5s", help="time between lines (default 5s)")
    up = command("update", cmd_update, "update resources (a VM's size is fixed: logged only)")
    up.add_argument("-r", "--resources", help="resources JSON file, - for stdin")
    for opt in ("--memory", "--cpu-shares", "--cpu-quota", "--cpu-period", "--cpuset-cpus",
                "--cpuset-mems", "--kernel-memory", "--memory-swap", "--memory-reservation",
                "--pids-limit", "--blkio-weight", "--cpu-rt-period", "--cpu-rt-runtime",
                "--l3-cache-schema", "--mem-bw-schema"):
        up.add_argument(opt, help="accepted and logged")
    command("features", cmd_features, "print the supported features as JSON", with_id=False)
    command("version", cmd_version, "print the version", with_id=False)
    command("check", cmd_check, "report whether this host can run containers", with_id=False)
    return p


def _close_inherited_fds(first):
    """Close the fds from first up that the engine let us inherit (containerd-shim-runc-v2 leaks
    its listening ttrpc socket as fd 3): the monitor and QEMU would hold them for the VM's life."""
    for name in os.listdir("/proc/self/fd"):
        if int(name) >= first:
            try:
                os.close(int(name))
            except OSError:
                pass


def main(argv=None):
    """Parse the command line, run one command, map errors to one line and exit 1."""
    if os.getpid() == 1 and argv is None:
        agent_main()
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None:
        _close_inherited_fds(3 + (getattr(args, "preserve_fds", 0) or 0))
    LOG.configure(args.log, args.log_format, args.global_log, args.debug)
    LOG.container_id = getattr(args, "id", None)
    for flag in ("systemd_cgroup", "criu", "rootless"):
        if getattr(args, flag):
            LOG.debug("--%s: ignored", flag.replace("_", "-"))
    if args.version:
        sys.stdout.write(version_text())
        return 0
    if not args.command:
        parser.print_help()
        return 1
    try:
        code = args.func(args)
        return code or 0
    except (Error, OSError) as e:
        msg = str(e)
        if isinstance(e, OSError) and e.filename:
            msg = "%s: %s" % (e.filename, (e.strerror or str(e)).lower())
        LOG.error(msg)
        sys.stderr.write("%s\n" % msg)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
