#!/bin/sh
# Run as a program, this file starts as a shell script: the next line has Python run the
# bootstrap between the #~~ marks, which runs this file's code compiled once and kept in the
# cache directory, keyed by the file's content. To Python both are strings, and
# `python3 cc_oci_runtime.py` compiles the file as usual.
''''exec "${CC_OCI_PYTHON:-python3}" -S -c 'exec(open(__import__("sys").argv[1]).read(4096).split("#~~\n")[1])' "$0" "$@" # '''
'''#~~
import marshal, os, sys, time
path = sys.argv.pop(1)
sys.argv[0], sys.path[0] = path, os.path.dirname(os.path.realpath(path))
with open(path, "rb") as f:
    source = f.read()
code = None
try:
    import _blake2 as h
    key = h.blake2b(source, digest_size=16)
    key.update(sys.version.encode())
    key = key.hexdigest()
    cache = os.path.join(os.environ.get("CC_OCI_CACHE_DIR") or "/var/cache/cc-oci-runtime", "code")
    with open(os.path.join(cache, key), "rb") as f:
        code = marshal.loads(f.read())
except Exception:
    pass
if code is None:
    code = compile(source, path, "exec")
    try:
        os.makedirs(cache, exist_ok=True)
        for old in os.scandir(cache):
            if time.time() - old.stat().st_mtime > 86400:
                os.unlink(old.path)
        with open(os.path.join(cache, "%s.%d" % (key, os.getpid())), "wb") as f:
            f.write(marshal.dumps(code))
        os.rename(f.name, os.path.join(cache, key))
    except Exception:
        pass
__file__ = path
for name in ("f", "h", "key", "cache", "old", "source", "marshal", "path", "name"):
    globals().pop(name, None)
exec(code)
#~~
'''
# Copyright 2026 The cc-oci-runtime authors. Licensed under the Apache License 2.0.
"""cc-oci-runtime: an OCI runtime that runs every container inside its own QEMU VM.

One file, four roles (read top to bottom):
  CLI      one short-lived process per OCI command (create, start, kill, ...);
  monitor  one per container, forked by create (then a fresh interpreter, exec'd with
           its arguments in a memfd): parent of QEMU, relays stdio and
           signals, exits with the workload's status (its pid is the --pid-file pid);
  QEMU     the VM, started from hypervisor.args (@TAG@ expansion) and vm.json;
  agent    this same file as PID 1 in the guest, from an initramfs built from the
           host's own Python and kernel modules; the rootfs arrives over virtio-9p,
           host and agent talk over a virtio-serial port, and the container's network
           namespace reaches the guest through virtio-net NICs on taps (see Network).
A pod is one VM: its sandbox restores it, its other containers (members) run in it.
A keeper (one per pooled VM, started by a refill detached from the engine) restores a VM,
warms it with a throw-away container and hands it to a create (see "The VM pool").

Sections, in order:
  constants - utilities - logging - state - spec handlers - process restrictions
  hypervisor (vm.json, hypervisor.args, templates) - host cgroups
  pods, host side (which containers share a VM; how a member's rootfs and binds reach it)
  guest image - agent protocol - network (rtnetlink and tc)
  monitor: the VM's lifecycle - the relay of stdio, signals and requests - the
           container's network, followed while it runs - exec and pod member processes
  the VM pool: warmed VMs, each kept by a keeper, handed to create (the refill, the
           warm-up, the claim and handover)
  agent:   boot, the host's requests and the processes - a container's set-up (rootfs,
           mounts, devices, root) - the process (hooks, capabilities, seccomp) and the
           guest's cgroups - checkpoint and restore (criu in the guest, both sides) -
           the guest's network - pod members (a member's container in the pod's VM, its
           rootfs from the pod export) - a pooled VM's warm-up container, undone (reset)
  commands: create, start, run, delete - a pod member's create and delete - exec,
           pause, resume, ps - events, update, state, kill, list, spec, check
  main (the command line)
"""

import _signal as signal  # the C module: `signal` imports enum (~4 ms a call) for Signals alone
import errno
import fcntl
import os
import struct
import sys
import time


class _LazyModule:
    """A module imported when first used: socket imports enum and selectors (~4 ms), which
    the short CLI commands do not need (connect_unix uses _socket)."""

    def __init__(self, name):
        self.__name = name

    def __getattr__(self, attr):
        module = __import__(self.__name)
        globals()[self.__name] = module
        return getattr(module, attr)


socket = _LazyModule("socket")

# ===========================================================================
# Constants and defaults
# ===========================================================================

STARTED = time.monotonic()  # for the --debug timeline
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
    "pool": 1,
    "pool_idle": 900,
    "tcg_tb_size": 32,
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
MS_MOVE = 8192
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
RUNTIME_MOUNT_OPTIONS = ("tmpcopyup", "notmpcopyup")  # done by the runtime, not by mount(2)
PROPAGATION_OPTIONS = ("private", "rprivate", "shared", "rshared", "slave", "rslave",
                       "unbindable", "runbindable")
CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWNS = 0x40000000, 0x20000000, 0x00020000
CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWTIME = 0x10000000, 0x00000080
NAMESPACE_FLAGS = {"cgroup": CLONE_NEWCGROUP, "ipc": CLONE_NEWIPC, "mount": CLONE_NEWNS,
                   "network": CLONE_NEWNET, "pid": CLONE_NEWPID, "time": CLONE_NEWTIME,
                   "user": CLONE_NEWUSER, "uts": CLONE_NEWUTS}  # linux.namespaces[].type
NS_GET_NSTYPE = 0xb703  # ioctl _IO(0xb7, 3) on a namespace file: its CLONE_NEW* flag (4.11+)
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
PR_SET_THP_DISABLE = 41
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


def _go_time(rfc3339):
    """An RFC 3339 time as Go's time.Time marshals it: trailing zeros of the fraction dropped."""
    head, dot, frac = rfc3339.partition(".")
    if not dot or not frac.endswith("Z"):
        return rfc3339
    digits = frac[:-1].rstrip("0")
    return head + ("." + digits if digits else "") + "Z"


def _log_time():
    """The time of a log line as runc's logrus writes it: RFC 3339 in seconds, local time."""
    now = time.localtime()
    off = now.tm_gmtoff or 0
    zone = "Z" if off == 0 else "%s%02d:%02d" % ("+" if off > 0 else "-", abs(off) // 3600,
                                                 abs(off) % 3600 // 60)
    return time.strftime("%Y-%m-%dT%H:%M:%S", now) + zone


def _logfmt_value(text):
    """A logrus text-format value: bare when it is made of safe characters, else Go-quoted."""
    if all(c.isascii() and (c.isalnum() or c in "-._/@^+") for c in text):
        return text
    return go_quote(text)


def go_quote(text):
    """A string quoted as Go's %q does (JSON-like escapes, \\x for other control bytes)."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c in "\a\b\f\n\r\t\v":
            out.append("\\" + "abfnrtv"["\a\b\f\n\r\t\v".index(c)])
        elif ord(c) < 0x20 or ord(c) == 0x7f:
            out.append("\\x%02x" % ord(c))
        elif not c.isprintable() and ord(c) > 0x7f:
            out.append("\\u%04x" % ord(c) if ord(c) < 0x10000 else "\\U%08x" % ord(c))
        else:
            out.append(c)
    return '"%s"' % "".join(out)


class _NotPlain(Exception):
    """An object json_dumps leaves to the json module."""


def json_dumps(obj, ensure_ascii=True, indent=None, separators=None):
    """json.dumps without importing json (its decoder imports re, ~7 ms a CLI call), byte for
    byte: compact, through the C encoder json.dumps itself uses; indented, for plain data
    (dicts with str keys, lists, tuples, str, int, finite float, bool, None) as json's Python
    encoder lays it out. Anything else is left to json.dumps."""
    try:
        import _json
        quote = _json.encode_basestring_ascii if ensure_ascii else _json.encode_basestring
        item_sep, key_sep = separators or ((", " if indent is None else ","), ": ")
        if indent is None:  # json.JSONEncoder.iterencode's call, its defaults
            return "".join(_json.make_encoder({}, _not_plain, quote, None, key_sep, item_sep,
                                              False, False, True)(obj, 0))
        out = []
        _json_encode(obj, out, quote, item_sep, key_sep,
                     " " * indent, "\n")
        return "".join(out)
    except (ImportError, TypeError, _NotPlain, RecursionError):
        import json
        return json.dumps(obj, ensure_ascii=ensure_ascii, indent=indent, separators=separators)


def _not_plain(_obj):
    """The C encoder's default(): what it cannot encode goes to json.dumps."""
    raise _NotPlain()


def _json_encode(obj, out, quote, item_sep, key_sep, indent, newline):
    """Append obj's JSON to out as json's encoder lays it out (indent: None or spaces)."""
    kind = type(obj)
    if kind is str:
        out.append(quote(obj))
    elif obj is None or obj is True or obj is False:
        out.append("null" if obj is None else "true" if obj else "false")
    elif kind is int:
        out.append(int.__repr__(obj))
    elif kind is float and obj - obj == 0:  # NaN and the infinities are json's
        out.append(float.__repr__(obj))
    elif kind is dict or kind is list or kind is tuple:
        if not obj:
            out.append("{}" if kind is dict else "[]")
            return
        inner = newline if indent is None else newline + indent
        out.append("{" if kind is dict else "[")
        if indent is not None:
            out.append(inner)
        first = True
        for item in obj:
            if not first:
                out.append(item_sep if indent is None else item_sep + inner)
            first = False
            if kind is dict:
                if type(item) is not str:
                    raise _NotPlain()
                out.append(quote(item) + key_sep)
                item = obj[item]
            _json_encode(item, out, quote, item_sep, key_sep, indent, inner)
        if indent is not None:
            out.append(newline)
        out.append("}" if kind is dict else "]")
    else:
        raise _NotPlain()


_JSON_SCANNER = []


def json_loads(data):
    """json.loads without importing json: the _json C scanner json itself uses, on the text
    json would read (UTF-8 bytes or str); what it does not take whole (other encodings, bad
    JSON) goes to json.loads for the same result or error."""
    try:
        if not _JSON_SCANNER:
            import _json
            _JSON_SCANNER.append(_json.make_scanner(_JsonContext()))
        text = data.decode("utf-8", "surrogatepass") if isinstance(data, (bytes, bytearray)) else data
        obj, end = _JSON_SCANNER[0](text, len(text) - len(text.lstrip(" \t\n\r")))
        if not text[end:].strip(" \t\n\r"):
            return obj
    except Exception:  # noqa: BLE001 - json.loads raises json's own error below
        pass
    import json
    return json.loads(data)


class _JsonContext:
    """The settings json.JSONDecoder() gives its C scanner (the defaults of json.loads)."""
    strict, object_hook, object_pairs_hook = True, None, None
    parse_float, parse_int = float, int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"),
                      "NaN": float("nan")}.__getitem__


def go_json(obj, indent=None):
    """JSON as Go's encoding/json writes it: compact (or indented), UTF-8, <>& escaped."""
    text = json_dumps(obj, ensure_ascii=False, indent=indent,
                      separators=(",", ": ") if indent is not None else (",", ":"))
    for c, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                   ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(c, esc)
    return text


def sha256(data=b""):
    """hashlib.sha256 without importing hashlib, which loads OpenSSL (~5 ms of every create)."""
    try:
        from _sha256 import sha256 as new  # the C module behind hashlib's fallback (to 3.11)
    except ImportError:
        from hashlib import sha256 as new
    return new(data)


def uuid4():
    """A random (version 4) UUID string, without importing uuid (~4 ms)."""
    b = bytearray(os.urandom(16))
    b[6], b[8] = b[6] & 0x0F | 0x40, b[8] & 0x3F | 0x80
    h = b.hex()
    return "%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


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
            return json_loads(f.read())
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
    """A signal number from a name (KILL, SIGKILL, kill) or a number, as runc accepts.

    0 is the liveness check; a number the kernel has no signal for fails as runc's kill(2)."""
    text = str(value).strip()
    body = text[1:] if text[:1] == "-" else text
    if body.isascii() and body.isdigit():
        num = int(text)
        if 0 <= num < signal.NSIG:
            return num
        raise Error("unable to signal init: invalid argument")
    name = text.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    # signal.Signals's members are _signal's SIG* names, less the SIG_* handler constants
    sig = getattr(signal, name, None) if name.isidentifier() and name[3:4] != "_" else None
    if type(sig) is int:
        return sig
    raise Error("unknown signal %s" % go_quote(str(value)))


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

    def settings(self):
        """What configure and the CLI set, for a process that carries on our log (restore)."""
        return [self.path, self.fmt, self.global_path, self.debug_enabled, self.container_id,
                self.stderr]

    def restore(self, settings):
        """Take over the settings of another process's log."""
        (self.path, self.fmt, self.global_path, self.debug_enabled, self.container_id,
         self.stderr) = settings

    def debug(self, msg, *args):
        """A line that only --debug records."""
        if self.debug_enabled:
            self._emit("debug", msg % args if args else msg)

    def timeline(self, step):
        """A --debug line saying when step was reached, in ms since this process's code began
        (a forked monitor counts from its create's start)."""
        if self.debug_enabled:
            self._emit("debug", "timeline: %s at %.1f ms" % (step, (time.monotonic() - STARTED) * 1e3))

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
        """One line of the --log file in the configured format (runc's logrus text or JSON)."""
        when = when or _log_time()
        if self.fmt == "json":
            return go_json({"level": level, "msg": msg, "time": when}) + "\n"
        return "time=%s level=%s msg=%s\n" % (_logfmt_value(when), level, _logfmt_value(msg))

    def _emit(self, level, msg):
        """Write one event to the log, the global log, or stderr when there is no --log.

        Without --log runc's logrus writes to stderr; here only errors go there, and every
        level with --debug (a create's stderr is the container's: keep it clean)."""
        when = _log_time()
        if self.path:
            self._append(self.path, self.format_line(level, msg, when), level, msg)
        elif self.stderr and (level == "error" or self.debug_enabled):
            sys.stderr.write(self.format_line(level, msg, when))
            sys.stderr.flush()
        if self.global_path:
            line = "%s %s[%d] %s %s: %s\n" % (_now_rfc3339(), PROG, os.getpid(), level,
                                             self.container_id or "-", msg)
            self._append(self.global_path, line, level, msg)

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
                self.data = json_loads(f.read())
        except FileNotFoundError:
            if must_exist:
                raise Error("container does not exist") from None
            self.data = {}
        except ValueError:
            raise Error("%s: corrupt state file" % self.path("state.json")) from None
        return self.data

    def save(self):
        """Write state.json atomically."""
        write_atomic(self.path("state.json"), json_dumps(self.data, indent=1))

    def exit_record(self):
        """The workload's exit record written by the monitor, or None."""
        try:
            with open(self.path("exit.json"), "rb") as f:
                return json_loads(f.read())
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
        sandbox = d.get("sandbox") or {}  # a pod member: its pod's VM
        if sandbox.get("qemu_pid") and not process_alive(sandbox["qemu_pid"], sandbox.get("qemu_start")):
            return "stopped"
        if d.get("paused"):
            return "paused"
        return "running" if d.get("started") else "created"

    def oci_state(self):
        """The runtime-spec state object (runc's fields)."""
        d = self.data
        status = self.status()
        out = {"ociVersion": d.get("ociVersion", OCI_VERSION), "id": self.id,
               "pid": d.get("pid", 0) if status != "stopped" else 0, "status": status,
               "bundle": d.get("bundle", ""), "rootfs": d.get("rootfs", ""),
               "created": _go_time(d.get("created", "")), "annotations": d.get("annotations"),
               "owner": ""}
        if not out["annotations"]:  # omitted when empty, as runc does
            del out["annotations"]
        return out

    def remove(self):
        """Delete the container's directory and everything in it."""
        remove_tree(self.dir)
        self.unlock()


def remove_tree(path):
    """shutil.rmtree(path, ignore_errors=True) without shutil (it imports bz2, lzma and fnmatch:
    ~2.5 ms of a delete): relative to directory fds, symlinks removed, never followed."""
    try:
        for _, dirs, files, dfd in os.fwalk(path, topdown=False):
            for name in files:
                _ignore_oserror(os.unlink, name, dir_fd=dfd)
            for name in dirs:  # fwalk lists a symlink to a directory here, and does not enter it
                try:
                    os.rmdir(name, dir_fd=dfd)
                except NotADirectoryError:
                    _ignore_oserror(os.unlink, name, dir_fd=dfd)
                except OSError:
                    pass
        os.rmdir(path)
    except OSError:
        pass


def _ignore_oserror(fn, *args, **kwargs):
    """fn(*args, **kwargs), an OSError ignored."""
    try:
        fn(*args, **kwargs)
    except OSError:
        pass


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
    caps = p.get("capabilities")
    caps = None if caps is None else parse_capabilities(caps, field + ".capabilities")
    oom = p.get("oomScoreAdj")
    _need(oom is None or (_is_int(oom) and -1000 <= oom <= 1000), field + ".oomScoreAdj",
          "must be an integer between -1000 and 1000")
    for ignored in ("apparmorProfile", "selinuxLabel", "scheduler", "ioPriority"):
        if ignored in p:
            LOG.debug("%s.%s: not applied inside the VM", field, ignored)
    return {"args": list(args), "env": env, "cwd": os.path.normpath(cwd), "terminal": terminal,
            "uid": user.get("uid", 0), "gid": user.get("gid", 0), "additionalGids": gids,
            "umask": umask, "rlimits": [{"type": r["type"], "soft": r["soft"], "hard": r["hard"]}
                                        for r in rlimits],
            "consoleSize": {"height": size.get("height", 0), "width": size.get("width", 0)},
            "noNewPrivileges": nnp, "capabilities": caps, "oomScoreAdj": oom}


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
        if bind:  # a relative source is relative to the bundle, as runc has it
            _need(source, field + ".source", "must not be empty for a bind mount")
            source = os.path.normpath(os.path.join(conf["bundle"], source))
            _need(os.path.exists(source), field + ".source", "%s: no such file or directory" % source)
        mounts.append({"destination": os.path.normpath(dest), "type": "bind" if bind else mtype,
                       "source": source, "options": options})
    conf["mounts"] = mounts


def _spec_hostname(conf, value):
    """hostname: set inside the guest."""
    _need(isinstance(value, str), "hostname", "must be a string")
    conf["hostname"] = value


def _spec_hooks(conf, value):
    """hooks: host programs run at the lifecycle points; createContainer and startContainer
    are programs inside the container, run by the agent in the guest."""
    _obj(value, "hooks")
    hooks = {}
    for name, entries in value.items():
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


def namespace_type(path):
    """The type ("ipc", "network", ...) of the namespace file at path, "" for one of a kernel
    without NS_GET_NSTYPE, None for any other file; OSError when path cannot be looked at."""
    st = os.stat(path)
    if st.st_mode & 0o170000 != 0o100000:  # a namespace file is regular; never open a FIFO
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        flag = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:  # not nsfs (ENOTTY), or a kernel before 4.11: nsfs has one device
        return "" if st.st_dev == os.stat("/proc/self/ns/net").st_dev else None
    finally:
        os.close(fd)
    return next((name for name, f in NAMESPACE_FLAGS.items() if f == flag), None)


def _check_namespace_path(kind, path, field):
    """linux.namespaces[i].path: an absolute path to a namespace of the entry's type."""
    _need(path.startswith("/"), field + ".path", "must be an absolute path")
    try:
        found = namespace_type(path)
    except OSError as e:
        raise Error("%s.path: %s: %s" % (field, path, (e.strerror or str(e)).lower())) from None
    _need(found is not None, field + ".path", "%s is not a namespace file" % path)
    _need(found in ("", kind), field, "%s is %s %s namespace, not %s"
          % (path, "an" if found == "ipc" else "a", found, kind))


def _spec_linux(conf, value):
    """linux: namespaces (each path checked; the network's placement), masked/readonly paths
    and sysctls."""
    _obj(value, "linux")
    namespaces = value.get("namespaces", [])
    _need(isinstance(namespaces, list), "linux.namespaces", "must be a list")
    for i, ns in enumerate(namespaces):
        field = "linux.namespaces[%d]" % i
        _obj(ns, field)
        _need(ns.get("type") in NAMESPACE_FLAGS, field + ".type",
              "unknown namespace type %r" % ns.get("type"))
        path = ns.get("path", "")
        _need(isinstance(path, str), field + ".path", "must be a string")
        if path:
            _check_namespace_path(ns["type"], path, field)
        conf["namespaces"][ns["type"]] = path or "new"
    conf["netns"] = conf["namespaces"].get("network")
    pid = conf["namespaces"].get("pid")
    conf["pid_ns_path"] = pid if pid not in (None, "new") else ""  # a pod member: its sandbox's
    conf["masked"] = _str_list(value.get("maskedPaths", []), "linux.maskedPaths")
    conf["readonly_paths"] = _str_list(value.get("readonlyPaths", []), "linux.readonlyPaths")
    sysctl = _obj(value.get("sysctl", {}), "linux.sysctl")
    for k, v in sysctl.items():
        _need(isinstance(v, str), "linux.sysctl." + k, "must be a string")
    conf["sysctl"] = sysctl
    resources = value.get("resources")
    conf["resources"] = parse_resources({} if resources is None else resources, "linux.resources")
    cgroups_path = value.get("cgroupsPath", "")
    _need(isinstance(cgroups_path, str), "linux.cgroupsPath", "must be a string")
    conf["cgroups_path"] = cgroups_path
    if value.get("seccomp") is not None:
        prog, flags = compile_seccomp(value["seccomp"])
        conf["seccomp"] = {"bpf": prog.hex(), "flags": flags}
    conf["devices"] = _linux_devices(value.get("devices") or [])
    conf["device_rules"] = _linux_device_rules(conf["resources"].get("devices"))
    userns = any(ns["type"] == "user" and not ns.get("path") for ns in namespaces)
    conf["id_mappings"] = _linux_id_mappings(value) if userns else None
    for ignored in ("rootfsPropagation", "mountLabel"):
        if ignored in value:
            LOG.debug("linux.%s: handled by the VM boundary, not applied", ignored)


# linux.resources fields this runtime applies: section -> {field: integer or string}
RESOURCE_FIELDS = {
    "memory": {"limit": int, "reservation": int, "swap": int, "kernel": int, "kernelTCP": int,
               "swappiness": int, "disableOOMKiller": bool},
    "cpu": {"shares": int, "quota": int, "period": int, "realtimeRuntime": int,
            "realtimePeriod": int, "cpus": str, "mems": str, "idle": int},
    "pids": {"limit": int},
    "blockIO": {"weight": int, "leafWeight": int},
}


def parse_resources(value, field):
    """linux.resources (or update's JSON): checked types, in the OCI shape."""
    _obj(value, field)
    out = {}
    for section, raw in value.items():
        if section not in RESOURCE_FIELDS:
            if section not in ("devices", "hugepageLimits", "network", "rdma", "unified"):
                LOG.debug("%s.%s: unknown, ignored", field, section)
            out[section] = raw
            continue
        _obj(raw, "%s.%s" % (field, section))
        for key, v in raw.items():
            kind = RESOURCE_FIELDS[section].get(key)
            if kind is None or v is None:
                continue
            ok = isinstance(v, bool) if kind is bool else (isinstance(v, str) if kind is str
                                                              else _is_int(v))
            _need(ok, "%s.%s.%s" % (field, section, key), "must be %s" % {
                int: "an integer", str: "a string", bool: "a boolean"}[kind])
        out[section] = {k: v for k, v in raw.items() if v is not None}
    return out


def _limit(resources, section, key):
    """A positive integer resource value, or None for unset, 0 or -1 (unlimited)."""
    v = resources.get(section, {}).get(key)
    return v if _is_int(v) and v > 0 else None


def _linux_devices(value):
    """linux.devices: device nodes to create in the container's /dev."""
    _need(isinstance(value, list), "linux.devices", "must be a list")
    devices = []
    for i, d in enumerate(value):
        field = "linux.devices[%d]" % i
        _obj(d, field)
        path = d.get("path")
        _need(isinstance(path, str) and path.startswith("/"), field + ".path",
              "must be an absolute path")
        _need(d.get("type") in ("c", "b", "u", "p"), field + ".type", "must be c, b, u or p")
        for key in ("major", "minor", "uid", "gid"):
            _need(_is_int(d.get(key, 0)) and d.get(key, 0) >= 0, field + "." + key,
                  "must be a non-negative integer")
        mode = d.get("fileMode", 0o666)
        _need(_is_int(mode) and 0 <= mode <= 0o7777, field + ".fileMode",
              "must be a permission mode")
        devices.append({"path": os.path.normpath(path), "type": d["type"],
                        "major": d.get("major", 0), "minor": d.get("minor", 0),
                        "fileMode": mode, "uid": d.get("uid", 0), "gid": d.get("gid", 0)})
    return devices


def _linux_device_rules(value):
    """linux.resources.devices: the device cgroup's allow/deny list, as cgroup v1 rule lines
    ((allow?, "c 1:3 rwm")); None when absent."""
    if value is None:
        return None
    _need(isinstance(value, list), "linux.resources.devices", "must be a list")
    rules = []
    for i, r in enumerate(value):
        field = "linux.resources.devices[%d]" % i
        _obj(r, field)
        _need(isinstance(r.get("allow"), bool), field + ".allow", "must be a boolean")
        kind = r.get("type") or "a"
        _need(kind in ("a", "c", "b"), field + ".type", "must be a, c or b")
        access = r.get("access") or "rwm"
        _need(isinstance(access, str) and set(access) <= set("rwm"), field + ".access",
              "must be letters of rwm")
        nums = []
        for key in ("major", "minor"):
            v = r.get(key, -1)
            _need(v is None or _is_int(v) and v >= -1, field + "." + key, "must be an integer")
            nums.append("*" if v is None or v < 0 else str(v))
        rules.append((r["allow"], "a" if kind == "a" else "%s %s:%s %s" % (kind, nums[0], nums[1],
                                                                           access)))
    return rules


def _linux_id_mappings(value):
    """linux.uidMappings and gidMappings for a new user namespace: /proc/PID/uid_map text."""
    maps = {}
    for key in ("uidMappings", "gidMappings"):
        entries = value.get(key) or []
        _need(isinstance(entries, list) and entries, "linux." + key,
              "must be a non-empty list with a user namespace")
        lines = []
        for i, m in enumerate(entries):
            field = "linux.%s[%d]" % (key, i)
            _obj(m, field)
            for k in ("containerID", "hostID", "size"):
                _need(_is_int(m.get(k)) and m[k] >= 0, field + "." + k,
                      "must be a non-negative integer")
            lines.append("%d %d %d\n" % (m["containerID"], m["hostID"], m["size"]))
        maps[key] = "".join(lines)
    return maps


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
            "masked": [], "readonly_paths": [], "sysctl": {}, "netns": None, "namespaces": {},
            "vm": {}, "resources": {}, "cgroups_path": "",
            "seccomp": None, "devices": [], "device_rules": None, "id_mappings": None}
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
# Process restrictions: capabilities and the seccomp BPF compiler (host side)
# ===========================================================================
# linux.seccomp is compiled on the host, where a malformed profile fails create before
# anything exists, into a classic BPF program that the agent installs just before exec.

CAPABILITIES = (
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP "
    "LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER "
    "SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE "
    "SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP "
    "MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF "
    "CHECKPOINT_RESTORE").split()  # capability number = index
CAP_SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")
# x86_64 syscall numbers (asm/unistd_64.h of Linux 6.12): (first number, names in order).
SYSCALLS_X86_64 = ((0, """\
read write open close stat fstat lstat poll lseek mmap mprotect munmap brk rt_sigaction
rt_sigprocmask rt_sigreturn ioctl pread64 pwrite64 readv writev access pipe select
sched_yield mremap msync mincore madvise shmget shmat shmctl dup dup2 pause nanosleep
getitimer alarm setitimer getpid sendfile socket connect accept sendto recvfrom sendmsg
recvmsg shutdown bind listen getsockname getpeername socketpair setsockopt getsockopt
clone fork vfork execve exit wait4 kill uname semget semop semctl shmdt msgget msgsnd
msgrcv msgctl fcntl flock fsync fdatasync truncate ftruncate getdents getcwd chdir
fchdir rename mkdir rmdir creat link unlink symlink readlink chmod fchmod chown fchown
lchown umask gettimeofday getrlimit getrusage sysinfo times ptrace getuid syslog getgid
setuid setgid geteuid getegid setpgid getppid getpgrp setsid setreuid setregid getgroups
setgroups setresuid getresuid setresgid getresgid getpgid setfsuid setfsgid getsid
capget capset rt_sigpending rt_sigtimedwait rt_sigqueueinfo rt_sigsuspend sigaltstack
utime mknod uselib personality ustat statfs fstatfs sysfs getpriority setpriority
sched_setparam sched_getparam sched_setscheduler sched_getscheduler
sched_get_priority_max sched_get_priority_min sched_rr_get_interval mlock munlock
mlockall munlockall vhangup modify_ldt pivot_root _sysctl prctl arch_prctl adjtimex
setrlimit chroot sync acct settimeofday mount umount2 swapon swapoff reboot sethostname
setdomainname iopl ioperm create_module init_module delete_module get_kernel_syms
query_module quotactl nfsservctl getpmsg putpmsg afs_syscall tuxcall security gettid
readahead setxattr lsetxattr fsetxattr getxattr lgetxattr fgetxattr listxattr llistxattr
flistxattr removexattr lremovexattr fremovexattr tkill time futex sched_setaffinity
sched_getaffinity set_thread_area io_setup io_destroy io_getevents io_submit io_cancel
get_thread_area lookup_dcookie epoll_create epoll_ctl_old epoll_wait_old
remap_file_pages getdents64 set_tid_address restart_syscall semtimedop fadvise64
timer_create timer_settime timer_gettime timer_getoverrun timer_delete clock_settime
clock_gettime clock_getres clock_nanosleep exit_group epoll_wait epoll_ctl tgkill utimes
vserver mbind set_mempolicy get_mempolicy mq_open mq_unlink mq_timedsend mq_timedreceive
mq_notify mq_getsetattr kexec_load waitid add_key request_key keyctl ioprio_set
ioprio_get inotify_init inotify_add_watch inotify_rm_watch migrate_pages openat mkdirat
mknodat fchownat futimesat newfstatat unlinkat renameat linkat symlinkat readlinkat
fchmodat faccessat pselect6 ppoll unshare set_robust_list get_robust_list splice tee
sync_file_range vmsplice move_pages utimensat epoll_pwait signalfd timerfd_create
eventfd fallocate timerfd_settime timerfd_gettime accept4 signalfd4 eventfd2
epoll_create1 dup3 pipe2 inotify_init1 preadv pwritev rt_tgsigqueueinfo perf_event_open
recvmmsg fanotify_init fanotify_mark prlimit64 name_to_handle_at open_by_handle_at
clock_adjtime syncfs sendmmsg setns getcpu process_vm_readv process_vm_writev kcmp
finit_module sched_setattr sched_getattr renameat2 seccomp getrandom memfd_create
kexec_file_load bpf execveat userfaultfd membarrier mlock2 copy_file_range preadv2
pwritev2 pkey_mprotect pkey_alloc pkey_free statx io_pgetevents rseq uretprobe"""),
                   (424, """\
pidfd_send_signal io_uring_setup io_uring_enter io_uring_register open_tree move_mount
fsopen fsconfig fsmount fspick pidfd_open clone3 close_range openat2 pidfd_getfd
faccessat2 process_madvise epoll_pwait2 mount_setattr quotactl_fd
landlock_create_ruleset landlock_add_rule landlock_restrict_self memfd_secret
process_mrelease futex_waitv set_mempolicy_home_node cachestat fchmodat2
map_shadow_stack futex_wake futex_wait futex_requeue statmount listmount
lsm_get_self_attr lsm_set_self_attr lsm_list_modules mseal"""))
AUDIT_ARCH_X86_64, X32_SYSCALL_BIT = 0xC000003E, 0x40000000
SECCOMP_ACTIONS = {  # OCI action: SECCOMP_RET_* (ERRNO and TRACE carry errnoRet)
    "SCMP_ACT_KILL": 0x00000000, "SCMP_ACT_KILL_THREAD": 0x00000000,
    "SCMP_ACT_KILL_PROCESS": 0x80000000, "SCMP_ACT_TRAP": 0x00030000,
    "SCMP_ACT_ERRNO": 0x00050000, "SCMP_ACT_TRACE": 0x7FF00000,
    "SCMP_ACT_LOG": 0x7FFC0000, "SCMP_ACT_ALLOW": 0x7FFF0000,
}
SECCOMP_FLAGS = {"SECCOMP_FILTER_FLAG_TSYNC": 1, "SECCOMP_FILTER_FLAG_LOG": 2,
                 "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 4}
SECCOMP_OPS = ("SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE",
               "SCMP_CMP_GT", "SCMP_CMP_MASKED_EQ")
BPF_MAX_INSNS = 4096
# Classic BPF opcodes (linux/bpf_common.h).
BPF_LD_W_ABS, BPF_ALU_AND_K, BPF_JA = 0x20, 0x54, 0x05
BPF_JEQ, BPF_JGT, BPF_JGE, BPF_RET_K = 0x15, 0x25, 0x35, 0x06
_SYSCALL_NUMBERS = None


def syscall_numbers():
    """x86_64 syscall name -> number, from SYSCALLS_X86_64."""
    global _SYSCALL_NUMBERS
    if _SYSCALL_NUMBERS is None:
        _SYSCALL_NUMBERS = {}
        for first, names in SYSCALLS_X86_64:
            for i, name in enumerate(names.split()):
                _SYSCALL_NUMBERS[name] = first + i
    return _SYSCALL_NUMBERS


def parse_capabilities(value, field):
    """process.capabilities: the five sets of CAP_ names (unknown names are skipped with a
    warning, as runc does)."""
    _obj(value, field)
    caps = {}
    for kind in CAP_SETS:
        names = _str_list(value.get(kind) or [], "%s.%s" % (field, kind))
        caps[kind] = sorted({n for n in names if n.startswith("CAP_") and n[4:] in CAPABILITIES},
                            key=lambda n: CAPABILITIES.index(n[4:]))
        unknown = [n for n in names if not (n.startswith("CAP_") and n[4:] in CAPABILITIES)]
        if unknown:
            LOG.warning("%s.%s: unknown capabilities ignored: %s", field, kind, ", ".join(unknown))
    return caps


def cap_numbers(names):
    """The capability numbers of CAP_ names."""
    return [CAPABILITIES.index(n[4:]) for n in names]


def add_exec_capability(process, name):
    """exec --cap NAME: add a capability to the process's sets (runc's rule: ambient too only
    when the process has inheritable capabilities)."""
    _need(name.upper().replace("CAP_", "", 1) in CAPABILITIES, "exec --cap",
          "unknown capability %r" % name)
    name = "CAP_" + name.upper().replace("CAP_", "", 1)
    caps = process.get("capabilities") or {k: [] for k in CAP_SETS}
    kinds = ["bounding", "effective", "permitted"] + (["ambient"] if caps["inheritable"] else [])
    for kind in kinds:
        if name not in caps[kind]:
            caps[kind] = caps[kind] + [name]
    process["capabilities"] = caps


def _seccomp_action(name, errno_ret, field, errno_field):
    """The SECCOMP_RET_* value of an OCI action."""
    _need(name in SECCOMP_ACTIONS, field, "unknown or unsupported action %r" % (name,))
    _need(errno_ret is None or (_is_int(errno_ret) and 0 <= errno_ret <= 0xFFFF),
          errno_field, "must be an integer between 0 and 65535")
    ret = SECCOMP_ACTIONS[name]
    if name in ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"):
        ret |= errno.EPERM if errno_ret is None else errno_ret
    return ret


def _seccomp_arg(arg, field):
    """One args comparison: (index, op, value, valueTwo)."""
    _obj(arg, field)
    index, op = arg.get("index"), arg.get("op")
    _need(_is_int(index) and 0 <= index <= 5, field + ".index", "must be between 0 and 5")
    _need(op in SECCOMP_OPS, field + ".op", "unknown operator %r" % (op,))
    for key in ("value", "valueTwo"):
        v = arg.get(key, 0)
        _need(_is_int(v) and 0 <= v < 1 << 64, field + "." + key,
              "must be an unsigned 64-bit integer")
    return index, op, arg.get("value", 0), arg.get("valueTwo", 0)


def seccomp_rules(profile, field="linux.seccomp"):
    """Validate linux.seccomp: (default action, {nr: [(conditions, action)]}, flags), where
    a rule without conditions ends its syscall's list. Unknown syscall names are skipped."""
    _obj(profile, field)
    default = _seccomp_action(profile.get("defaultAction"), profile.get("defaultErrnoRet"),
                              field + ".defaultAction", field + ".defaultErrnoRet")
    for arch in _str_list(profile.get("architectures") or [], field + ".architectures"):
        _need(arch.startswith("SCMP_ARCH_"), field + ".architectures", "unknown %r" % arch)
    flags = 0
    for flag in _str_list(profile.get("flags") or [], field + ".flags"):
        _need(flag in SECCOMP_FLAGS, field + ".flags", "unknown flag %r" % flag)
        flags |= SECCOMP_FLAGS[flag]
    _need(not profile.get("listenerPath"), field + ".listenerPath",
          "seccomp notification is not supported")
    syscalls = profile.get("syscalls") or []
    _need(isinstance(syscalls, list), field + ".syscalls", "must be a list")
    numbers, rules = syscall_numbers(), {}
    for i, rule in enumerate(syscalls):
        rf = "%s.syscalls[%d]" % (field, i)
        _obj(rule, rf)
        names = _str_list(rule.get("names"), rf + ".names", non_empty=True)
        action = _seccomp_action(rule.get("action"), rule.get("errnoRet"), rf + ".action",
                                 rf + ".errnoRet")
        args = rule.get("args") or []
        _need(isinstance(args, list), rf + ".args", "must be a list")
        conds = [_seccomp_arg(a, "%s.args[%d]" % (rf, j)) for j, a in enumerate(args)]
        if action == default:
            continue  # libseccomp refuses a rule that repeats the default; runc skips it
        # As runc: comparisons on distinct arguments are ANDed in one rule; several on the
        # same argument become one rule each (ORed).
        indexes = [c[0] for c in conds]
        groups = [[c] for c in conds] if len(set(indexes)) < len(indexes) else [conds]
        for name in names:
            if name not in numbers:
                LOG.debug("%s: unknown syscall %s skipped", rf, name)
                continue
            todo = rules.setdefault(numbers[name], [])
            if todo and not todo[-1][0]:
                continue  # an unconditional rule already decides this syscall
            todo.extend((g, action) for g in groups)
    return default, rules, flags


class _Bpf:
    """A classic BPF program under construction, with labels for long jumps."""

    def __init__(self):
        self.code, self.labels, self.fixups = [], {}, []

    def op(self, code, k=0, jt=0, jf=0):
        """Append one instruction."""
        self.code.append([code, jt, jf, k & 0xFFFFFFFF])

    def label(self, name):
        """Mark the next instruction as name."""
        self.labels[name] = len(self.code)

    def goto(self, name):
        """An unconditional jump to a label (32-bit offset)."""
        self.fixups.append((len(self.code), name))
        self.op(BPF_JA)

    def jump_if(self, cond, k, name, true=True):
        """Jump to name when (A cond k) is true (or false with true=False)."""
        self.op(cond, k, 0, 1) if true else self.op(cond, k, 1, 0)
        self.goto(name)

    def ret(self, value):
        """Return value."""
        self.op(BPF_RET_K, value)

    def assemble(self):
        """The program as bytes of struct sock_filter."""
        for pc, name in self.fixups:
            self.code[pc][3] = self.labels[name] - pc - 1
        return b"".join(struct.pack("HBBI", *ins) for ins in self.code)


def _bpf_condition(b, cond, fail):
    """Code that jumps to fail unless one 64-bit argument comparison holds."""
    index, op, value, two = cond
    lo_off, hi_off = 16 + 8 * index, 20 + 8 * index
    vhi, vlo = value >> 32, value & 0xFFFFFFFF
    ok = "ok%d" % len(b.code)
    b.op(BPF_LD_W_ABS, hi_off)
    if op == "SCMP_CMP_MASKED_EQ":
        b.op(BPF_ALU_AND_K, vhi)
        b.jump_if(BPF_JEQ, two >> 32, fail, true=False)
        b.op(BPF_LD_W_ABS, lo_off)
        b.op(BPF_ALU_AND_K, vlo)
        b.jump_if(BPF_JEQ, two & 0xFFFFFFFF, fail, true=False)
        return
    if op == "SCMP_CMP_EQ":
        b.jump_if(BPF_JEQ, vhi, fail, true=False)
    elif op == "SCMP_CMP_NE":
        b.jump_if(BPF_JEQ, vhi, ok, true=False)
    elif op in ("SCMP_CMP_GT", "SCMP_CMP_GE"):
        b.jump_if(BPF_JGT, vhi, ok)
        b.jump_if(BPF_JEQ, vhi, fail, true=False)
    else:  # LT, LE
        b.jump_if(BPF_JGE, vhi, ok, true=False)
        b.jump_if(BPF_JEQ, vhi, fail, true=False)
    b.op(BPF_LD_W_ABS, lo_off)
    low = {"SCMP_CMP_EQ": (BPF_JEQ, False), "SCMP_CMP_NE": (BPF_JEQ, True),
           "SCMP_CMP_GT": (BPF_JGT, False), "SCMP_CMP_GE": (BPF_JGE, False),
           "SCMP_CMP_LT": (BPF_JGE, True), "SCMP_CMP_LE": (BPF_JGT, True)}[op]
    b.jump_if(low[0], vlo, fail, true=low[1])
    b.label(ok)


def _bpf_search(b, numbers, targets):
    """A binary search over sorted syscall numbers (A holds the number); each found number
    jumps to its target label, others to "default"."""
    if len(numbers) <= 8:
        for nr in numbers:
            b.jump_if(BPF_JEQ, nr, targets[nr])
        b.goto("default")
        return
    mid = len(numbers) // 2
    upper = "ge%d_%d" % (numbers[mid], len(b.code))
    b.jump_if(BPF_JGE, numbers[mid], upper)
    _bpf_search(b, numbers[:mid], targets)
    b.label(upper)
    _bpf_search(b, numbers[mid:], targets)


def compile_seccomp(profile, field="linux.seccomp"):
    """linux.seccomp -> (BPF program bytes, seccomp(2) flags); raises Error when malformed."""
    default, rules, flags = seccomp_rules(profile, field)
    b = _Bpf()
    b.op(BPF_LD_W_ABS, 4)  # seccomp_data.arch
    b.jump_if(BPF_JEQ, AUDIT_ARCH_X86_64, "badarch", true=False)
    b.op(BPF_LD_W_ABS, 0)  # seccomp_data.nr
    b.jump_if(BPF_JGE, X32_SYSCALL_BIT, "badarch")
    if default not in (SECCOMP_ACTIONS["SCMP_ACT_ALLOW"], SECCOMP_ACTIONS["SCMP_ACT_LOG"]):
        # As runc: syscalls newer than the table fail with ENOSYS (so libc falls back).
        b.jump_if(BPF_JGT, max(syscall_numbers().values()), "enosys")
    targets = {nr: "nr%d" % nr for nr in rules}
    _bpf_search(b, sorted(rules), targets)
    for nr in sorted(rules):
        b.label(targets[nr])
        for i, (conds, action) in enumerate(rules[nr]):
            fail = "nr%d_%d" % (nr, i)
            for cond in conds:
                _bpf_condition(b, cond, fail)
            b.ret(action)
            b.label(fail)
            if conds and i == len(rules[nr]) - 1:
                b.ret(default)
    b.label("default")
    b.ret(default)
    b.label("enosys")
    b.ret(SECCOMP_ACTIONS["SCMP_ACT_ERRNO"] | errno.ENOSYS)
    b.label("badarch")
    b.ret(SECCOMP_ACTIONS["SCMP_ACT_KILL_PROCESS"])
    _need(len(b.code) <= BPF_MAX_INSNS, field, "compiles to %d BPF instructions, more than "
          "the kernel's %d" % (len(b.code), BPF_MAX_INSNS))
    return b.assemble(), flags


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
    _need(_is_int(vm.get("tcg_tb_size")) and vm["tcg_tb_size"] >= 0, "vm.tcg_tb_size",
          "must be a number of MiB (0: QEMU's default)")
    _need(_is_int(vm.get("pool")) and vm["pool"] >= 0, "vm.pool",
          "must be a number of VMs (0: no pool)")
    _need(isinstance(vm.get("pool_idle"), (int, float)) and vm["pool_idle"] > 0, "vm.pool_idle",
          "must be a positive number of seconds")
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


FILES_DIR = "files"  # in the state dir: the monitor's staging tmpfs (see stage_files)


def _read_only(options):
    """Whether OCI mount options leave a mount read-only (the last ro/rw wins)."""
    return bool(mount_options(options)[0] & MS_RDONLY)


def share_list(conf, state_dir):
    """The 9p exports [(tag, host path, read-only)]: the rootfs, each bind-mounted directory
    (once per mode), and for bind-mounted files one staging directory per mode that holds
    only those files. Tags each bind mount with its share and subpath; conf["staged"] lists
    (source file, staged path, read-only) for the monitor to bind (see stage_files)."""
    shares = [(ROOTFS_TAG, conf["root"]["path"], bool(conf["root"]["readonly"]))]
    files = os.path.join(state_dir or ".", FILES_DIR)
    by_key, staged = {}, []
    for m in conf["mounts"]:
        if m["type"] != "bind":
            continue
        src, ro = os.path.realpath(m["source"]), _read_only(m["options"])
        if os.path.isdir(src):
            path, sub = src, ""
        elif os.path.isfile(src):
            path, sub = os.path.join(files, "ro" if ro else "rw"), str(len(staged))
            staged.append((src, os.path.join(path, sub), ro))
        else:
            LOG.debug("mount %s: source %s is not a file or directory, skipped",
                      m["destination"], src)
            m["skip"] = True
            continue
        if (path, ro) not in by_key:
            by_key[path, ro] = "share%d" % (len(shares) - 1)
            shares.append((by_key[path, ro], path, ro))
        m["share"], m["subpath"] = by_key[path, ro], sub
    conf["staged"] = staged
    conf["pod_tag"] = None
    if len(shares) - 1 < (share_slots_for(shares) or 0):  # a spare slot: members can join
        conf["pod_tag"] = "share%d" % (len(shares) - 1)
        shares.append((conf["pod_tag"], os.path.join(files, POD_DIR), False))
    return shares


def share_args(shares, bus):
    """-fsdev/-device pairs exporting each share over virtio-9p; QEMU itself refuses writes
    to a read-only one, whatever the guest kernel does."""
    argv = []
    for i, (tag, path, ro) in enumerate(shares):
        fsdev = "local,id=fs%d,path=%s,security_model=none" % (i, _qemu_escape(path))
        if ro:
            fsdev += ",readonly=on"
        if os.path.basename(os.path.dirname(path)) == FILES_DIR:  # files of several devices
            fsdev += ",multidevs=remap"
        argv += ["-fsdev", fsdev, "-device", "virtio-9p-%s,fsdev=fs%d,mount_tag=%s" % (bus, i, tag)]
    return argv


def stage_files(state_dir, staged):
    """In the monitor's private mount namespace: a small tmpfs at FILES_DIR holding an empty
    read-only directory (what a restored VM's spare 9p slots export), the pod export's empty
    member slots, and each bind-mounted file bound onto a file of its own; then the tmpfs
    itself is made read-only, so the VM can write the files it was given and nothing else."""
    files = os.path.join(state_dir, FILES_DIR)
    os.makedirs(files, exist_ok=True)
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    mount("tmpfs", files, "tmpfs", flags, "mode=0755,size=64k,nr_inodes=%d"
          % (len(staged) + POD_SLOTS + 9))
    for sub in ("ro", "rw", "empty", POD_DIR):
        os.mkdir(os.path.join(files, sub), 0o555)
    for slot in range(POD_SLOTS):  # where members' files are mounted (see export_member)
        os.mkdir(os.path.join(files, POD_DIR, str(slot)), 0o555)
    for src, dst, ro in staged:
        os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o444))
        try:
            mount(src, dst, None, MS_BIND)
            if ro:
                mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        except OSError as e:
            raise Error("mounts: cannot export %s: %s" % (src, os.strerror(e.errno))) from None
    mount(None, files, None, MS_REMOUNT | MS_RDONLY | flags)


def make_mountpoints(rootfs, mounts):
    """Create the mount points a read-only rootfs lacks, as runc does before it makes the
    root read-only (the VM cannot: QEMU exports that rootfs read-only). Symlinks resolve
    inside the rootfs: the work is done by a child chrooted there."""
    points, covered = [("/dev", True)], ["/dev"]  # the agent always mounts a /dev tmpfs
    for m in mounts:
        dest = m["destination"]
        if not any(dest == c or dest.startswith(c.rstrip("/") + "/") for c in covered):
            src = os.path.realpath(m["source"]) if m["type"] == "bind" else ""
            points.append((dest, not (src and os.path.isfile(src))))
        if m["type"] != "bind":
            covered.append(dest)

    def make():
        """In the chrooted child."""
        os.chroot(rootfs)
        for dest, directory in points:
            try:
                _make_mountpoint(dest, directory)
            except OSError as e:
                raise Error("mount point %s: %s" % (e.filename or "", e.strerror or e)) from None
    failure = _in_child(make)
    if failure:
        raise Error("root.readonly: " + failure)


def _in_child(work):
    """Run work() in a forked child (to chroot or enter a namespace without changing us); the
    text of the Error or OSError it raised, or "" when it succeeded."""
    r, w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:
        os.close(r)
        try:
            work()
        except (Error, OSError) as e:
            os.write(w, str(e).encode(errors="replace") or b"failed")
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        failure = f.read().decode(errors="replace")
    os.waitpid(child, 0)
    return failure


def qemu_command(cid, vm, conf, state_dir, image, template=None, vm_uuid=None):
    """The full QEMU argv for one container: a cold boot, or with template (a dict of ram,
    share, incoming and shares) the template's build or a restore from it."""
    accel = vm["accel_used"]
    machine = vm["machine"]
    bus = "device" if machine == "microvm" else "pci"
    shares = template["shares"] if template else share_list(conf, state_dir)
    tags = {
        "NAME": "cc-" + cid[:32], "UUID": vm_uuid or uuid4(), "ACCEL": accel_option(vm),
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


def accel_option(vm):
    """-accel's value: kvm, or tcg with its translation cache capped at vm.tcg_tb_size MiB
    (QEMU 7.2's default cap is 1 GiB of host memory; a container's create and start use about
    25 MiB, and a cap below that slows them down by a third or more)."""
    accel = vm["accel_used"]
    if accel == "tcg" and vm.get("tcg_tb_size"):
        return "tcg,tb-size=%d" % vm["tcg_tb_size"]
    return accel


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


# -- the VM's size from linux.resources ------------------------------------------------

GUEST_OVERHEAD_MIB = 128  # guest memory beyond the container's limit: kernel, initramfs, agent
HOST_OVERHEAD_MIB = 256  # host memory beyond the guest's: QEMU itself, TCG's code cache, monitor


def cpuset_count(cpus):
    """How many CPUs a cpuset list such as "0-2,5" names."""
    count = 0
    for part in cpus.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise Error("linux.resources.cpu.cpus: invalid cpuset %r" % cpus)
        count += int(hi) - int(lo) + 1 if hi else 1
    return count


def size_vm(vm, resources):
    """Set the VM's memory and vCPUs from linux.resources: the memory limit plus the guest's
    overhead (GUEST_OVERHEAD_MIB and 1/32 of the limit, rounded up to 32 MiB) else vm.memory;
    ceil(quota/period), else the cpuset's size, else vm.cpus; at most the host's CPUs."""
    limit = _limit(resources, "memory", "limit")
    if limit:
        mib = -(-limit // (1 << 20))
        vm["memory"] = "%dM" % (-(-(mib + GUEST_OVERHEAD_MIB + mib // 32) // 32) * 32)
    quota = _limit(resources, "cpu", "quota")
    period = _limit(resources, "cpu", "period") or 100000
    cpuset = resources.get("cpu", {}).get("cpus")
    cpus = -(-quota // period) if quota else cpuset_count(cpuset) if cpuset else None
    if cpus:
        vm["cpus"] = max(1, min(cpus, os.cpu_count() or 1))
    return vm


def memory_room(vm_memory):
    """The largest memory limit a VM of vm_memory has room for (size_vm's inverse)."""
    mib = _size_bytes(vm_memory) >> 20
    return max(0, (mib - GUEST_OVERHEAD_MIB) * 32 // 33) << 20


# -- templates: a booted, idle VM saved once and restored for each container --------

UUID_ZERO = "00000000-0000-0000-0000-000000000000"
# A template VM has the rootfs and a fixed number of bind-mount 9p slots: 4, or 8 for a
# container with more (a template of each, built on first use; more than 8: cold boot).
# Every 9p device costs QEMU about 1.1 MiB, so most containers use the smaller one.
SHARE_SLOT_CLASSES = (4, 8)
SHARE_SLOTS = SHARE_SLOT_CLASSES[-1]


def share_slots_for(shares):
    """The template's bind-mount slots for shares (rootfs first), or None beyond the largest."""
    return next((n for n in SHARE_SLOT_CLASSES if len(shares) - 1 <= n), None)


def template_shares(shares, empty_dir, slots=None):
    """shares padded to a template's fixed 9p slots (read-only exports of empty_dir): slots,
    or the fewest that hold them; None when they do not fit."""
    slots = slots or share_slots_for(shares)
    if slots is None or len(shares) > slots + 1:
        return None
    return list(shares) + [("share%d" % i, empty_dir, True)
                           for i in range(len(shares) - 1, slots)]


def template_for(vm, image, slots=SHARE_SLOT_CLASSES[0]):
    """The directory of the saved template VM for this configuration (and number of
    bind-mount slots), built on first use; None when templates are off or hypervisor.args
    has no @MEMORY_BACKEND@/@INCOMING@."""
    text = hypervisor_args_text(vm)
    if not vm.get("template", True) or "@MEMORY_BACKEND@" not in text or "@INCOMING@" not in text:
        return None
    empty = os.path.join(CACHE_DIR, "empty")
    os.makedirs(empty, exist_ok=True)
    spec = {"ram": "RAM", "share": True, "incoming": False,
            "shares": template_shares([(ROOTFS_TAG, empty, True)], empty, slots)}
    probe = qemu_command("template", vm, None, None, image, spec, vm_uuid=str(UUID_ZERO))
    # the saved VM keeps the TSC rate it booted with; cpu MHz drifting must not rebuild it
    probe = [__import__("re").sub(r"tsc_early_khz=[0-9]+", "tsc_early_khz", a) for a in probe]
    digest = sha256(json_dumps(probe).encode())
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

    def __init__(self, directory, timeout=10.0, io_timeout=None):
        """Connect within timeout seconds; io_timeout bounds each read too (the socket serves one
        client at a time: the monitor must not wait on another's session for ever)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(fileno=connect_unix(directory, "qmp.sock", timeout).detach())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise Error("QMP: cannot connect to the VM") from None
                time.sleep(0.01)
        self.sock.settimeout(io_timeout)
        self.file = self.sock.makefile("rwb")
        try:
            self.file.readline()  # greeting
        except OSError:
            self.close()
            raise Error("QMP: the VM did not answer") from None
        self.call("qmp_capabilities")

    def call(self, command, pass_fd=None, **arguments):
        """Run a command (with the fd pass_fd passed along, as getfd takes one); its "return"
        value (an error reply raises)."""
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        if pass_fd is None:
            self.file.write(json_dumps(msg).encode() + b"\n")
            self.file.flush()
        else:
            socket.send_fds(self.sock, [json_dumps(msg).encode() + b"\n"], [pass_fd])
        while True:
            try:
                line = self.file.readline()
            except OSError:
                raise Error("QMP %s: the VM did not answer" % command) from None
            if not line:
                if command == "quit":
                    return {}
                raise Error("QMP: the VM closed the connection")
            reply = json_loads(line)
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
# Host cgroups: the monitor and QEMU in linux.cgroupsPath, capped to the VM's size
# ===========================================================================

CGROUP_V1_FLAGS = ("rw", "ro", "xattr", "noprefix", "clone_children", "cpuset_v2_mode",
                   "favordynmods", "nsdelegate", "memory_localevents", "memory_recursiveprot")


def cgroup_hierarchies(mountinfo="/proc/self/mountinfo"):
    """[(mount point, version, controllers)] of the host's cgroup filesystems: the v1
    hierarchies (named ones included), or the v2 one when no v1 controller is mounted."""
    v1, v2 = [], []
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            rest = fields[fields.index("-") + 1:]
            if rest[0] == "cgroup":
                names = [o for o in rest[2].split(",") if o.startswith("name=") or "=" not in o
                         and o not in CGROUP_V1_FLAGS]
                if fields[4] not in [m for m, _, _ in v1]:
                    v1.append((fields[4], 1, frozenset(names)))
            elif rest[0] == "cgroup2":
                v2.append((fields[4], 2, frozenset()))
    return v1 or v2[:1]


def _own_cgroup(version, controllers, proc_cgroup="/proc/self/cgroup"):
    """This process's cgroup in a hierarchy (relative paths in cgroupsPath start there)."""
    with open(proc_cgroup) as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            if (version == 2 and names == "") or (version == 1 and names and
                                                  set(names.split(",")) == set(controllers)):
                return path
    return "/"


def _systemd_unit_path(cgroups_path, cid):
    """The cgroupfs path of a systemd "slice:prefix:name" cgroupsPath (runc's expansion)."""
    parts = cgroups_path.split(":") if cgroups_path else ["", "runc", cid]
    if len(parts) != 3:
        raise Error("linux.cgroupsPath: %r: expected \"slice:prefix:name\" with --systemd-cgroup"
                    % cgroups_path)
    slice_name, prefix, name = parts
    slices, path = (slice_name or "system.slice"), []
    if slices != "-.slice":
        if not slices.endswith(".slice"):
            raise Error("linux.cgroupsPath: %r: %s is not a slice" % (cgroups_path, slices))
        words = slices[:-len(".slice")].split("-")
        path = ["-".join(words[:i + 1]) + ".slice" for i in range(len(words))]
    unit = name if name.endswith(".slice") else (prefix + "-" + name if prefix else name) + ".scope"
    return "/" + "/".join(path + [unit])


def host_cgroup_dirs(cgroups_path, cid, systemd=False):
    """The directories of the container's host cgroup, one per hierarchy (cgroupfs paths,
    relative ones from the caller's own cgroup; or systemd's slice:prefix:name)."""
    path = _systemd_unit_path(cgroups_path, cid) if systemd else (cgroups_path or cid)
    if ".." in path.split("/"):
        raise Error("linux.cgroupsPath: %r: must not contain .." % cgroups_path)
    dirs = []
    for mount_point, version, controllers in cgroup_hierarchies():
        full = path if path.startswith("/") else os.path.join(_own_cgroup(version, controllers), path)
        dirs.append((os.path.normpath(mount_point + "/" + full.lstrip("/")), version, controllers))
    return dirs


def host_cgroup_limits(version, controllers, vm_memory, resources):
    """{file: value} capping a container's host cgroup: memory = the VM plus QEMU's overhead
    (only when the container has a memory limit), CPU quota/shares and cpuset as asked."""
    out = {}
    cpu = resources.get("cpu", {})
    memory = (_size_bytes(vm_memory) + (HOST_OVERHEAD_MIB << 20)
              if _limit(resources, "memory", "limit") else None)
    quota, period = _limit(resources, "cpu", "quota"), _limit(resources, "cpu", "period")
    if version == 1:
        if memory and "memory" in controllers:
            out["memory.limit_in_bytes"] = memory
        if "cpu" in controllers:
            if period:
                out["cpu.cfs_period_us"] = period
            if quota:
                out["cpu.cfs_quota_us"] = quota
            if _limit(resources, "cpu", "shares"):
                out["cpu.shares"] = cpu["shares"]
        if "cpuset" in controllers:
            for key in ("cpus", "mems"):
                if cpu.get(key):
                    out["cpuset." + key] = cpu[key]
        if "blkio" in controllers and _limit(resources, "blockIO", "weight"):
            out["blkio.weight"] = resources["blockIO"]["weight"]
        return out
    if memory:
        out["memory.max"] = memory
    if quota or period:
        out["cpu.max"] = "%s %d" % (quota or "max", period or 100000)
    if _limit(resources, "cpu", "shares"):
        out["cpu.weight"] = cpu_weight(cpu["shares"])
    for key in ("cpus", "mems"):
        if cpu.get(key):
            out["cpuset." + key] = cpu[key]
    return out


def cpu_weight(shares):
    """cgroup v2 cpu.weight of v1 cpu.shares (runc's conversion)."""
    return 1 + ((max(2, min(shares, 262144)) - 2) * 9999) // 262142


def create_host_cgroup(dirs, vm_memory, resources):
    """Make the container's host cgroup and set its limits; returns the leaf directories."""
    made = []
    try:
        for path, version, controllers in dirs:
            _make_cgroup_dir(path, version, controllers)
            made.append(path)
            _write_cgroup(path, host_cgroup_limits(version, controllers, vm_memory, resources))
    except OSError as e:
        remove_host_cgroup(made)
        raise Error("cgroup %s: %s" % (e.filename or dirs[0][0], e.strerror or e)) from None
    return made


def _make_cgroup_dir(path, version, controllers):
    """mkdir -p in a cgroup hierarchy: a v1 cpuset level inherits its parent's CPUs and
    memory nodes; a v2 level's parent delegates the controllers we use."""
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        _make_cgroup_dir(parent, version, controllers)
    if version == 2:
        with open(os.path.join(parent, "cgroup.controllers")) as f:
            have = set(f.read().split()) & {"cpu", "cpuset", "memory", "io", "pids"}
        if have:
            try:
                _write_cgroup(parent, {"cgroup.subtree_control": " ".join("+" + c for c in sorted(have))})
            except OSError:
                pass  # the root's own processes keep it from delegating: limits stay unset
    os.makedirs(path, exist_ok=True)
    if version == 1 and "cpuset" in controllers:
        for key in ("cpuset.cpus", "cpuset.mems"):
            with open(os.path.join(path, key)) as f:
                if f.read().strip():
                    continue
            with open(os.path.join(parent, key)) as f:
                _write_cgroup(path, {key: f.read().strip()})


def _write_cgroup(path, values):
    """Write each {file: value} of a cgroup directory."""
    for name, value in values.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(str(value))


def join_host_cgroup(dirs):
    """Move the calling process into the cgroup (its children, QEMU, follow)."""
    for path in dirs:
        _write_cgroup(path, {"cgroup.procs": 0})


def remove_host_cgroup(dirs, timeout=3.0):
    """rmdir the container's cgroup directories once their processes have gone."""
    deadline = time.monotonic() + timeout
    for path in dirs:
        while True:
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    LOG.warning("cgroup %s: cannot remove: %s", path, e.strerror)
                    break
                time.sleep(0.02)


def update_host_cgroup(dirs, vm_memory, resources):
    """Apply changed limits to the host cgroup (the VM's size bounds memory anyway)."""
    for path, version, controllers in dirs:
        if os.path.isdir(path):
            _write_cgroup(path, host_cgroup_limits(version, controllers, vm_memory, resources))


# ===========================================================================
# Pods (host side): which containers share a VM, and how a member's files reach it
# ===========================================================================
# A pod is one VM. Its sandbox container (Kubernetes' pause, podman's infra) restores the VM
# as any container does; every other container of the pod, a member, runs in that VM. The
# managers say which is which in annotations (Kata 1.x's rule). Every VM exports one more
# directory on a spare 9p slot, <state>/files/pod: slot directories on the monitor's
# read-only tmpfs. A member's create clones its rootfs and bind sources (open_tree) in the
# host's mount namespace, enters the sandbox monitor's (QEMU's), assembles them there on a
# tmpfs of the member's own (read-only binds remounted read-only), makes that tmpfs
# read-only and moves it onto a free slot. QEMU's 9p server resolves every lookup beneath
# the export, so the VM sees the member's files from then on, in their modes, and nothing
# of them once delete has unmounted the slot.

POD_TYPE_KEYS = (("io.kubernetes.cri.container-type", "io.kubernetes.cri.sandbox-id"),
                 ("io.kubernetes.cri-o.ContainerType", "io.kubernetes.cri-o.SandboxID"))
POD_SIZE_KEYS = {"memory": "io.kubernetes.cri.sandbox-memory",
                 "quota": "io.kubernetes.cri.sandbox-cpu-quota",
                 "period": "io.kubernetes.cri.sandbox-cpu-period"}
POD_DIR = "pod"  # in FILES_DIR: the pod export, with a directory per member slot
PAUSED_VM, PAUSED_FROZEN = "vm", "frozen"  # how a paused container is (state's "paused")
POD_SLOTS = 32
SYS_OPEN_TREE, SYS_MOVE_MOUNT = 428, 429  # x86_64
OPEN_TREE_CLONE, AT_RECURSIVE, AT_EMPTY_PATH, AT_FDCWD = 1, 0x8000, 0x1000, -100
MOVE_MOUNT_F_EMPTY_PATH = 4


def pod_role(cid, annotations):
    """(role, sandbox id, strict) from the manager's annotations: role "sandbox", "member" or
    None (a container of its own); strict for containerd's, whose member must find its VM."""
    for i, (type_key, id_key) in enumerate(POD_TYPE_KEYS):
        kind = annotations.get(type_key)
        if kind is None:
            continue
        sandbox_id = annotations.get(id_key) or ""
        if kind == "sandbox":
            if sandbox_id and sandbox_id != cid:
                raise Error("annotations: %s: %s names another sandbox than this one (%s)"
                            % (id_key, sandbox_id, cid))
            return "sandbox", cid, i == 0
        if kind == "container":
            if not sandbox_id:
                raise Error("annotations: %s: a pod member needs its sandbox's id" % id_key)
            return "member", sandbox_id, i == 0
        raise Error("annotations: %s: unknown container type %r (sandbox or container)"
                    % (type_key, kind))
    return None, None, False


def pod_vm_size(vm, annotations):
    """A sandbox's VM sized for its pod: containerd's totals of the pod's limits, if given."""
    resources = {"memory": {}, "cpu": {}}
    for key, name in POD_SIZE_KEYS.items():
        text = annotations.get(name, "")
        if text.lstrip("-").isdigit() and int(text) > 0:
            resources["memory" if key == "memory" else "cpu"][
                "limit" if key == "memory" else key] = int(text)
    if resources["memory"] or resources["cpu"].get("quota"):
        size_vm(vm, resources)
    return vm


def find_sandbox(root, sandbox_id, strict):
    """The state (loaded) of the running VM container a member joins, or None when there is
    none and the member gets a VM of its own (podman's pod with a runc infra); strict: none is
    an error. A stopped sandbox, a member named as sandbox or a VM without room are errors."""
    try:
        state = State(root, sandbox_id)
    except Error:
        raise Error("annotations: the sandbox id %r is not a container id" % sandbox_id) from None
    if not state.exists():
        if strict:
            raise Error("pod: sandbox %s: no such container of this runtime (a pod's sandbox "
                        "must run under the same runtime and --root)" % sandbox_id)
        return None
    state.load()
    if state.data.get("sandbox"):
        raise Error("pod: %s is a member of pod %s, not a sandbox"
                    % (sandbox_id, state.data["sandbox"]["id"]))
    status = state.status()
    if status == "paused" and state.data.get("paused") != PAUSED_FROZEN:
        raise Error("pod: the pod's sandbox %s is paused (its VM is stopped)" % sandbox_id)
    if status not in ("created", "running", "paused"):
        raise Error("pod: the pod's sandbox %s is %s" % (sandbox_id, status))
    if not state.data.get("pod"):
        raise Error("pod: sandbox %s: its VM has no 9p slot left for members (it has %d "
                    "bind-mount sources)" % (sandbox_id, SHARE_SLOTS))
    return state


def has_members(sandbox_dir):
    """Whether a container's VM has pod members (claimed slots)."""
    try:
        return bool(os.listdir(os.path.join(sandbox_dir, "members")))
    except OSError:
        return False


def claim_pod_slot(sandbox_dir, member_id, pooled=False):
    """A free member slot of a sandbox's pod export: the file members/<slot> of its state
    directory, made exclusively (two creates never get one slot), naming the member (a VM from
    the pool has the sandbox's own files in POOL_SLOT)."""
    claims = os.path.join(sandbox_dir, "members")
    os.makedirs(claims, exist_ok=True)
    for slot in range(POD_SLOTS):
        if pooled and slot == POOL_SLOT:
            continue
        try:
            fd = os.open(os.path.join(claims, str(slot)), os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        try:
            _write_all(fd, member_id.encode())
        finally:
            os.close(fd)
        return slot
    raise Error("pod: sandbox %s: all %d member slots are in use"
                % (os.path.basename(sandbox_dir), POD_SLOTS))


def release_pod_slot(sandbox_dir, slot):
    """Give a member's slot back (nothing to do once the sandbox is gone)."""
    try:
        os.unlink(os.path.join(sandbox_dir, "members", str(slot)))
    except (OSError, TypeError):
        pass


def member_trees(conf, slot):
    """What of a member's config the VM needs, as [(name, host path, is a directory, read-only,
    recursive)] (rootfs, then b<i> for bind mount i); tags each bind mount with its pod_path."""
    trees = [("rootfs", conf["root"]["path"], True, bool(conf["root"]["readonly"]), False)]
    for i, m in enumerate(conf["mounts"]):
        if m["type"] != "bind":
            continue
        src = os.path.realpath(m["source"])
        if not (os.path.isdir(src) or os.path.isfile(src)):
            LOG.debug("mount %s: source %s is not a file or directory, skipped", m["destination"], src)
            m["skip"] = True
            continue
        name = "b%d" % i
        trees.append((name, src, os.path.isdir(src), _read_only(m["options"]),
                      "rbind" in m["options"]))
        m["pod_path"] = "%d/%s" % (slot, name)
    return trees


def _open_tree(path, recursive):
    """A detached copy of the mount at path (open_tree OPEN_TREE_CLONE): a bind that another
    mount namespace can take with move_mount."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    fd = _libc().syscall(SYS_OPEN_TREE, AT_FDCWD, path.encode(), flags)
    if fd < 0:
        import ctypes
        raise Error("mounts: cannot export %s: %s" % (path, os.strerror(ctypes.get_errno())))
    return fd


def _in_mount_ns(pid, work):
    """Run work() in a child that has entered the mount namespace of process pid; its error
    (an Error's or OSError's text) is raised here."""

    def entered():
        """In the child: enter the namespace, then work."""
        fd = os.open("/proc/%d/ns/mnt" % pid, os.O_RDONLY | os.O_CLOEXEC)
        _check_libc(_libc().setns(fd, CLONE_NEWNS), "setns(mnt)")
        work()
    failure = _in_child(entered)
    if failure:
        raise Error(failure)


def vm_files(data, state_dir):
    """(the pid whose mount namespace is QEMU's, the VM's files directory there) of a container:
    its monitor's and its state directory's, or a pooled VM's QEMU and its directory."""
    vm = data.get("vm") or {}
    if vm.get("pool_dir"):
        return vm["qemu_pid"], os.path.join(vm["pool_dir"], FILES_DIR)
    return data["pid"], os.path.join(state_dir, FILES_DIR)


def export_member(sandbox, stage, slot, trees):
    """Give the sandbox's VM a member's files: clones of trees assembled at stage (an empty
    directory of the member's) in the sandbox monitor's mount namespace, then moved onto the
    pod export's slot directory."""
    fds = []
    try:
        for name, path, is_dir, ro, recursive in trees:
            fds.append((name, _open_tree(path, recursive), is_dir, ro))
        owner, files = vm_files(sandbox.data, sandbox.dir)
        target = os.path.join(files, POD_DIR, str(slot))
        _in_mount_ns(owner, lambda: _assemble_member(stage, target, fds))
    finally:
        for _name, fd, _is_dir, _ro in fds:
            os.close(fd)


def _assemble_member(stage, target, fds):
    """(In the sandbox monitor's mount namespace.) A tmpfs at stage holding each cloned tree at
    its name, read-only ones remounted so; the tmpfs then read-only and moved onto target."""
    flags = MS_NOSUID | MS_NODEV
    mount("tmpfs", stage, "tmpfs", flags, "mode=0755,size=64k,nr_inodes=%d" % (len(fds) + 8))
    try:
        for name, fd, is_dir, ro in fds:
            path = os.path.join(stage, name)
            if is_dir:
                os.mkdir(path, 0o755)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
            _check_libc(_libc().syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, path.encode(),
                                        MOVE_MOUNT_F_EMPTY_PATH), "move_mount %s" % name)
            if ro:
                mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        mount(None, stage, None, MS_REMOUNT | MS_RDONLY | flags)
        mount(stage, target, None, MS_MOVE)
    except BaseException:
        umount(stage)
        raise


def unexport_member(sandbox_data, sandbox_dir, slot):
    """Take a member's files away from the VM (its slot unmounted in the sandbox monitor's
    namespace); nothing to do once that monitor is gone (its namespace went with it)."""
    vm = sandbox_data.get("vm") or {}
    owner, files = vm_files(sandbox_data, sandbox_dir)
    alive = process_alive(vm.get("qemu_pid"), vm.get("qemu_start")) if vm.get("pool_dir") else \
        process_alive(sandbox_data.get("pid"), sandbox_data.get("pid_start"))
    if slot is None or not alive:
        return
    target = os.path.join(files, POD_DIR, str(slot))

    def detach():
        """Unmount the slot's tree, if it is still there."""
        if os.path.ismount(target):
            umount(target)
    try:
        _in_mount_ns(owner, detach)
    except Error as e:
        LOG.warning("pod: unexporting %s: %s", target, e)


# ===========================================================================
# Guest image: an initramfs built from the host's Python and kernel modules
# ===========================================================================

IMAGE_FORMAT = 6  # bump when the image layout changes
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
    return json_loads(out)


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
    with open(os.path.realpath(__file__), "rb") as f:
        script = f.read()
    st = os.stat(python)
    key = sha256(script + ("%s|%d|%d" % (python, st.st_size, st.st_mtime_ns)).encode())
    manifest_path = os.path.join(CACHE_DIR, "manifest-%s.json" % key.hexdigest()[:20])
    try:
        with open(manifest_path) as f:
            manifest = json_loads(f.read())
    except (OSError, ValueError):
        manifest = _python_manifest(python)
        os.makedirs(CACHE_DIR, exist_ok=True)
        write_atomic(manifest_path, json_dumps(manifest))
        prune_cache("manifest-", manifest_path)
    return script, manifest, _cached_guest_modules(modules_dir)


def _cached_guest_modules(modules_dir):
    """guest_modules, kept in the cache directory by the size and mtime of modules.dep and
    modules.builtin (parsing modules.dep is some 10 ms of every create); the modules' own
    files are in the image's key."""
    key = sha256(("%s|%s" % (modules_dir, ",".join(GUEST_MODULES))).encode())
    for name in ("modules.dep", "modules.builtin"):
        try:
            st = os.stat(os.path.join(modules_dir, name))
            key.update(b"|%d|%d" % (st.st_size, st.st_mtime_ns))
        except OSError:
            key.update(b"|missing")
    return _json_cached("modules", key, lambda: guest_modules(modules_dir))


def _json_cached(prefix, key, compute):
    """compute()'s JSON, kept in the cache directory as PREFIX-KEY.json (key: a digest of
    its inputs) and read back while the key holds; a missing, corrupt or unwritable cache
    only costs the computation."""
    path = os.path.join(CACHE_DIR, "%s-%s.json" % (prefix, key.hexdigest()[:20]))
    try:
        with open(path) as f:
            return json_loads(f.read())
    except (OSError, ValueError):
        pass
    value = compute()
    try:
        os.makedirs(CACHE_DIR, exist_ok=True)
        write_atomic(path, json_dumps(value))
        prune_cache(prefix + "-", path)
    except OSError:
        pass
    return value


def guest_image(vm, python=None):
    """The initramfs for this host: built on first use, cached by its inputs, written atomically."""
    python = os.path.realpath(python or sys.executable)
    script, manifest, modules = _image_inputs(python, vm["modules_dir"])
    digest = sha256(script + b"%d" % IMAGE_FORMAT)
    files = [python] + manifest["maps"] + manifest["modules"] + modules + ["/etc/ld.so.cache"]
    criu = criu_files(vm["modules_dir"])  # (see "Checkpoint and restore")
    files += sum(criu.values(), []) if criu else []
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
            _write_image(CpioWriter(f), python, manifest, modules, script, criu)
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


def _write_image(w, python, manifest, modules, script, criu=None):
    """The initramfs contents: interpreter, libraries, modules, agent, /init (and criu's
    files when the host has criu)."""
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
    if criu:
        _add_criu(w, criu)
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
CLIENT_OPS = ("start", "exec", "signal", "resize", "ps", "stats", "update",  # the monitor's socket
              "create_member", "freeze", "criu_check", "checkpoint", "restore")
MSG, DATA = 1, 2
CHUNK = 65536


def send_msg(fd, obj):
    """Send one JSON message frame."""
    payload = json_dumps(obj).encode()
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
        return kind, stream, json_loads(payload) if kind == MSG else payload


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

    With wait=False the request is only queued (a paused VM answers when resumed). A pod
    member's requests go to its sandbox's monitor, naming the member (and its first process)."""
    directory, sandbox = state.dir, state.data.get("sandbox")
    if sandbox:
        directory = sandbox["dir"]
        request = dict(request, member=sandbox["slot"])
        if request.get("proc", 0) == 0 and request.get("op") in ("signal", "start", "resize"):
            request["proc"] = state.data.get("proc")
    try:
        sock = connect_unix(directory, "ctl.sock", timeout)
    except OSError:
        raise Error("container not running") from None
    try:
        send_msg(sock.fileno(), request)
        if not wait:  # the monitor reads what was sent even after we close
            return {}
        reply = read_msg(sock.fileno(), FrameReader(), timeout)
    finally:
        sock.close()
    if reply.get("error"):
        raise Error(reply["error"])
    return reply


def connect_unix(directory, name, timeout=None):
    """Connect to the socket directory/name, even when the full path is too long for AF_UNIX.

    The socket is a bare _socket.socket (no socket module on the CLI's path): no `with`, no
    makefile; socket.socket(fileno=sock.detach()) makes it a full one."""
    import _socket
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
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
            "readonly_paths": conf["readonly_paths"], "sysctl": conf["sysctl"],
            "resources": conf.get("resources", {}),
            "seccomp": conf.get("seccomp"), "devices": conf.get("devices", []),
            "device_rules": conf.get("device_rules"), "id_mappings": conf.get("id_mappings"),
            "hooks": {k: v for k, v in conf.get("hooks", {}).items()
                      if k in ("createContainer", "startContainer")},
            "state": {"ociVersion": conf.get("ociVersion", OCI_VERSION), "id": cid,
                      "bundle": conf.get("bundle"), "annotations": conf.get("annotations", {})}}


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
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 16, 17, 18, 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWQDISC, RTM_DELQDISC, RTM_NEWTFILTER = 36, 37, 44
# the multicast groups the monitor follows the namespace by: links, addresses, routes
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x1, 0x10, 0x40
RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE = 0x100, 0x400
NET_EVENT_GROUPS = (RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR
                    | RTMGRP_IPV6_ROUTE)
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

    def __init__(self, groups=0):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        self.sock.bind((0, groups))  # groups: the multicast events to receive (NET_EVENT_GROUPS)
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

    def del_address(self, index, addr):
        """Remove one address ({family, address, prefix}) from an interface."""
        self.request(RTM_DELADDR, 0, *address_message(index, addr))

    def del_route(self, route, oif):
        """Remove one route of the main table through interface oif."""
        self.request(RTM_DELROUTE, 0, *route_message(route, oif))

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


def net_event_matters(data, taps=()):
    """True when a datagram of namespace events holds a change the VM may have to follow: a link,
    address or route message not about the runtime's own taps (by name, or index in taps)."""
    for kind, _flags, _seq, payload in nl_parse_messages(data):
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            ln = parse_link(payload)
            index = -1 if ln["name"].startswith(TAP_PREFIX) else ln["index"]
        elif kind in (RTM_NEWADDR, RTM_DELADDR):
            index = IFADDR.unpack_from(payload)[4]
        elif kind in (RTM_NEWROUTE, RTM_DELROUTE):
            oif = nl_parse_attrs(payload, RTMSG.size).get(RTA_OIF)
            index = struct.unpack("=i", oif)[0] if oif else 0
        else:
            continue
        if index != -1 and index not in taps:
            return True
    return False


def tap_name(slot):
    """The host tap behind the guest's NIC number slot."""
    return "%s%d" % (TAP_PREFIX, slot)


def slot_mac(slot):
    """The MAC the template gives NIC number slot (the agent replaces it)."""
    return "02:cc:00:00:00:%02x" % slot


def net_args(bus):
    """-netdev/-device pairs of the VM's NIC slots: taps QEMU creates in its namespace. The
    taps after the first go without virtio-net headers (offloads), as the hub only_taps may
    put in their place does: the saved VM requires the same either way."""
    argv = []
    for i in range(NET_SLOTS):
        argv += ["-netdev", "tap,id=net%d,ifname=%s,script=no,downscript=no,vhost=off%s"
                 % (i, tap_name(i), ",vnet_hdr=off" if i else ""),
                 "-device", "virtio-net-%s,netdev=net%d,mac=%s" % (bus, i, slot_mac(i))]
    return argv


def only_taps(argv, count):
    """argv with the NIC slots from count on backed by an empty QEMU hub instead of a tap: each
    tap costs its namespace a device to unregister (some 25 ms) when QEMU exits, and a slot's
    backend is not part of the VM's saved state, so a template restores with either."""
    out = list(argv)
    for i, arg in enumerate(out):
        for slot in range(count, NET_SLOTS):
            if arg.startswith("tap,id=net%d,ifname=%s," % (slot, tap_name(slot))):
                out[i] = "hubport,id=net%d,hubid=%d" % (slot, slot)
    return out


def engine_links(links):
    """The interfaces of a namespace to give the VM: Ethernet, up, not lo, not ours."""
    return [ln for ln in links if ln["type"] == ARPHRD_ETHER and ln["flags"] & IFF_UP
            and not ln["flags"] & IFF_LOOPBACK and not ln["name"].startswith(TAP_PREFIX)
            and ln["kind"] not in FALLBACK_LINK_KINDS]


def hub_slots(argv):
    """The NIC slots that only_taps backed by an empty hub: give_tap can give them a tap while
    QEMU runs (a hypervisor.args of one's own has none)."""
    return {slot for slot in range(NET_SLOTS) if "hubport,id=net%d,hubid=%d" % (slot, slot) in argv}


def give_tap_commands(slot, fd):
    """The QMP commands that give hub-backed NIC slot the tap fd (open_tap's) while QEMU runs:
    the fd, a tap netdev on it, then a port of the slot's hub on that. The slot's backend is not
    part of the VM's saved state, so a warm start stays warm; the tap is in the namespace it was
    opened in, whichever QEMU's is (a pooled VM's is empty)."""
    return [("getfd", {"fdname": "tap%d" % slot, "pass_fd": fd}),
            ("netdev_add", {"type": "tap", "id": "tap%d" % slot, "fd": "tap%d" % slot,
                            "vhost": False}),
            ("netdev_add", {"type": "hubport", "id": "port%d" % slot, "hubid": slot,
                            "netdev": "tap%d" % slot})]


def open_tap(name):
    """A new tap device in our network namespace, its fd (without virtio-net headers, as a
    hub has none): it lives while the fd (QEMU's copy once given) is open."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise Error("/dev/net/tun: %s (load the tun module)" % e.strerror) from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError as e:
        os.close(fd)
        raise Error("network: cannot make the tap %s: %s" % (name, e.strerror)) from None
    return fd


def take_tap_commands(slot):
    """The QMP commands that take back the tap give_tap_commands gave (QEMU closes it: it vanishes
    from the namespace, its qdisc with it); the slot is a bare hub again."""
    return [("netdev_del", {"id": "port%d" % slot}), ("netdev_del", {"id": "tap%d" % slot})]


def assign_slots(links, assigned):
    """{index: slot} of links: an interface in assigned ({index: slot}) keeps its slot, a new one
    takes the lowest free one; and the links left without a slot (more than NET_SLOTS)."""
    slots = {ln["index"]: assigned[ln["index"]] for ln in links if ln["index"] in assigned}
    free = [slot for slot in range(NET_SLOTS) if slot not in slots.values()]
    left = []
    for ln in links:
        if ln["index"] in slots:
            continue
        if free:
            slots[ln["index"]] = free.pop(0)
        else:
            left.append(ln)
    return slots, left


def network_plan(links, addresses, routes, assigned=None):
    """What the guest must configure: [{slot, name, mac, mtu, index, addresses}] and the routes
    (by interface name and slot) of the engine's interfaces. assigned ({index: slot}) are the
    interfaces wired already; without it (create) more interfaces than slots raise, with it the
    ones without a slot are listed in "refused" ([{index, name}])."""
    wired = engine_links(links)
    slots, left = assign_slots(wired, assigned or {})
    if left and assigned is None:
        raise Error("network: %d interfaces in the container's network namespace; a VM has %d"
                    % (len(wired), NET_SLOTS))
    wired = [ln for ln in wired if ln["index"] in slots]
    names = {ln["index"]: ln["name"] for ln in wired}
    ifaces = [{"slot": slots[ln["index"]], "name": ln["name"], "mac": ln["mac"], "mtu": ln["mtu"],
               "index": ln["index"],
               "addresses": [{"family": a["family"], "address": a["address"], "prefix": a["prefix"]}
                             for a in addresses if a["index"] == ln["index"]
                             and not (a["family"] == 6 and a["address"].startswith("fe80:"))]}
              for ln in wired]
    rts = [dict(r, dev=names[r["oif"]], slot=slots[r["oif"]]) for r in routes
           if r["oif"] in names and r["protocol"] != RTPROT_KERNEL
           and not (r["family"] == 6 and (r["dst"] or "").startswith("fe80:"))]
    rts.sort(key=lambda r: r["gateway"] is not None)  # on-link routes before gateways
    return {"interfaces": ifaces, "routes": rts,
            "refused": [{"index": ln["index"], "name": ln["name"]} for ln in left]}


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


def wire_interface(nl, iface):
    """Redirect every frame both ways between an engine interface ({slot, name, index, mtu}) and
    the tap of its NIC slot, brought up; on failure nothing of it is left."""
    tap = next((ln["index"] for ln in nl.links() if ln["name"] == tap_name(iface["slot"])), None)
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
    try:
        nl.add_ingress(tap)
        nl.add_redirect(iface["index"], tap)
        nl.add_redirect(tap, iface["index"])
    except OSError as e:
        net_unwire(nl, [iface["index"]])
        raise Error("network: cannot redirect %s to the VM (tc u32/mirred): %s"
                    % (iface["name"], e.strerror)) from None
    return tap


def unwire_interface(nl, iface, tap=None):
    """Undo wire_interface: the redirects of the interface (when it is still there) and of the tap
    (index; when QEMU keeps it), which goes down."""
    names = {ln["index"]: ln["name"] for ln in nl.links()}
    net_unwire(nl, [i for i in (iface["index"], tap) if i and i in names])
    if tap in names:
        try:
            nl.set_link(tap, up=False)
        except OSError:
            pass


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
# Monitor: one per container, QEMU's parent; the VM's lifecycle
# ===========================================================================
# The monitor is the container's --pid-file pid. Its roles are three classes put together as
# Monitor at the end of the network section: the VM's lifecycle (here), the relay of stdio,
# signals and requests, and the container's network. Exec and pod member processes, which
# talk to it, follow.

_WORKLOAD = "workload"  # a pending request whose answer goes to the workload's stderr
NAMESPACES_READY = b"namespaces"  # the monitor's first line to create: it is in them, QEMU starts
MONITOR_NAMESPACES = ("cgroup", "ipc", "uts")  # the monitor's as the config has them (_setup)


def join_namespaces(namespaces):
    """Join each namespace {type: path} gives a path for (every one opened before the first is
    joined, as a joined one may change what a path means); returns the CLONE_NEW* flags of
    the types given as "new"."""
    fds, new = [], 0
    try:
        for kind, path in namespaces.items():
            if path == "new":
                new |= NAMESPACE_FLAGS[kind]
            else:
                fds.append((kind, path, os.open(path, os.O_RDONLY | os.O_CLOEXEC)))
        for kind, path, fd in fds:  # setns checks the type too: EINVAL for another's
            _check_libc(_libc().setns(fd, NAMESPACE_FLAGS[kind]), "setns %s (%s)" % (path, kind))
    finally:
        for _kind, _path, fd in fds:
            os.close(fd)
    return new


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


class _VMProcess:
    """QEMU as this process's child (the monitor's, a pooled VM's keeper's): started and
    connected to the agent, booted or restored from the template, reaped, stopped. A pooled
    VM's QEMU is not the monitor's child: qemu_pidfd is then how it is watched and killed."""

    qemu_pidfd = None  # a pooled VM's QEMU (see "The VM pool")
    pooled = None  # the monitor's fds of a VM from the pool: {"agent", "pidfd", "keeper"}
    qemu_netns = None  # "new": QEMU in an empty network namespace (a pooled VM's)

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
                prctl(PR_SET_THP_DISABLE, 1)  # huge pages would round TCG's buffers up
                if os.getppid() != parent:
                    os._exit(1)
                if self.qemu_netns == "new":  # its taps come as fds from the container's
                    _check_libc(_libc().unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
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
        if self.qemu_status is None and self.qemu_pidfd is not None:  # the keeper's child
            import select
            if select.select([self.qemu_pidfd], [], [], 0)[0]:
                self.qemu_status = signal.SIGKILL  # (its status is the keeper's to collect)
        elif self.qemu_status is None and self.qemu_pid:
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

    def _release_pooled_vm(self):
        """Close the claim connection of a VM from the pool: its keeper kills QEMU."""
        if self.pooled and self.pooled["keeper"] is not None:
            os.close(self.pooled["keeper"])
            self.pooled["keeper"] = None

    def _reap_qemu_wait(self, timeout):
        """Wait up to timeout seconds for QEMU to exit by itself."""
        deadline = time.monotonic() + timeout
        while not self._reap_qemu() and time.monotonic() < deadline:
            time.sleep(0.02)

    def _stop_qemu(self):
        """Kill QEMU if it still runs, and reap it."""
        if self.qemu_pidfd is not None and not self._reap_qemu():
            self._release_pooled_vm()  # (no signal reaches it from our pid namespace)
            self._reap_qemu_wait(5)
        elif self.qemu_pid and not self._reap_qemu():
            try:
                os.kill(self.qemu_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._reap_qemu_wait(5)


class _MonitorVM(_VMProcess):
    """The monitor's life: namespaces, QEMU started (restored or booted) and reaped, the agent
    connected, the exit recorded."""

    def __init__(self, state_dir, cid, gconf, argv, vm, netns, notify_fd, stdio=(0, 1, 2),
                 restore=None, terminal=None, staged=(), cgroups=(), namespaces=None,
                 hostname=None, pooled=None):
        self.dir, self.id, self.gconf, self.argv, self.vm = state_dir, cid, gconf, argv, vm
        self.pooled = pooled  # fds of a VM from the pool: {"agent", "pidfd", "keeper"}
        self.namespaces = namespaces or {}  # cgroup, ipc, uts of the config: a path or "new"
        self.hostname = hostname  # set in our uts namespace when the config gives it one
        self.cgroups = cgroups  # the host cgroup directories QEMU and we belong in
        self.staged = staged  # bind-mounted files to export: (source, staged path, read-only)
        self.restore = restore  # {"dir": template, "argv": QEMU restoring it}, or None
        self.netns, self.notify_fd = netns, notify_fd
        self.stdin, self.stdout, self.stderr = stdio
        self.qemu_pid, self.qemu_status, self.agent = None, None, None
        self.reader = FrameReader()
        self.clients, self.pending, self.procs = {}, {}, {}
        self.signals, self.next_id, self.next_proc = [], 1, 1
        self.exit_code, self.ctl, self.stdin_is_file = None, None, False
        self.terminal = terminal  # the host pty slave the engine holds the master of
        self.wired = []  # [{index, name, slot, tap}] of the engine's interfaces wired to the VM
        self.nic_taps, self.hubs = {}, set()  # {slot: "start" or "hot"} with a tap; hub slots
        self.net_events, self.net_due, self.net_sent = None, None, None  # following the namespace
        self.net_failed, self.net_warned = set(), set()  # interfaces not wired (logged once)
        self.members = {}  # pod members' host processes: {client fd: slot}
        self.dns_queries = []  # [(socket, guest peer)] of DNS queries relayed to docker's resolver

    def run(self):
        """The monitor's whole life; returns its exit code."""
        try:
            LOG.timeline("monitor: begins")
            self._setup()
            LOG.timeline("monitor: namespaces, cgroup and staged files set up")
            if self.notify_fd is not None:  # create runs its hooks meanwhile
                _write_all(self.notify_fd, NAMESPACES_READY + b"\n")
            self._boot()
        except (Error, OSError) as e:
            msg = str(e) if isinstance(e, Error) else "monitor: %s" % e
            LOG.debug("monitor: boot failed: %s", msg)
            self._notify({"error": msg})
            self._stop_qemu()
            return 1
        self._notify({"ok": True})
        LOG.timeline("monitor: the container is created")
        _release_memory()
        return self._loop()

    def _setup(self):
        """New session, sub-reaper, the container's namespaces, signal wake-ups."""
        os.setsid()
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        join_host_cgroup(self.cgroups)  # first: a new cgroup namespace has this cgroup as root
        if self.netns:  # before our own /proc hides /proc/<pid>/ns/net (--network container:ID)
            enter_netns(self.netns)
        new = join_namespaces(self.namespaces)  # QEMU inherits them all
        _check_libc(_libc().unshare(CLONE_NEWNS | new), "unshare(mount%s)" % "".join(
            ", " + k for k, v in self.namespaces.items() if v == "new"))
        if self.hostname:  # as runc sets it, in the container's (new or joined) uts namespace
            socket.sethostname(self.hostname)
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        # a /proc of our pid namespace: our own shows just us and QEMU, a joined one its processes
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        stage_files(self.dir, self.staged)
        os.chdir(self.dir)
        with Netlink() as nl:
            net_check(nl)
            # a tap per interface there is now (podman's), or one for docker's, added by its hook
            taps = max(1, len(engine_links(nl.links())))
        if self.pooled:  # its first NIC's tap comes here, the others are bare hubs (_give_tap)
            taps = 1
            self._move_pooled_tap()
        self.argv = only_taps(self.argv, taps)
        if self.restore:
            self.restore["argv"] = only_taps(self.restore["argv"], taps)
        self.hubs = hub_slots(self.argv)  # the slots _give_tap gives a tap when one needs it
        self.nic_taps = {slot: "start" for slot in range(NET_SLOTS) if slot not in self.hubs}
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
        begun = time.monotonic()
        deadline = begun + float(self.vm["boot_timeout"])
        if self.pooled:
            self._take_pooled_vm()
        else:
            self._restore_or_boot(deadline)
        started = time.monotonic()
        LOG.timeline("monitor: VM %s in %.0f ms" % (
            "from the pool" if self.pooled else "restored" if self.restore else "booted",
            (started - begun) * 1000))
        send_msg(self.agent, {"op": "create", "config": self.gconf, "time": time.time(),
                              "seed": os.urandom(32).hex()})
        self._wait_agent("created", deadline)
        LOG.timeline("monitor: the agent created the container in %.0f ms"
                     % ((time.monotonic() - started) * 1000))
        self.ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ctl.bind("ctl.sock")
        self.ctl.listen(16)

    def _move_pooled_tap(self):
        """Move the first NIC's tap, which a pooled QEMU made in its own empty network namespace
        (the saved VM's first NIC has virtio-net headers, a hub has none), into ours."""
        own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check_libc(_libc().setns(self.pooled["pidfd"], CLONE_NEWNET), "setns(QEMU's network)")
            try:
                with Netlink() as nl:
                    index = {ln["name"]: ln["index"] for ln in nl.links()}.get(tap_name(0))
                    if index is None:
                        raise Error("the pooled VM has no tap %s" % tap_name(0))
                    nl.move_link(index, own)
            finally:
                _check_libc(_libc().setns(own, CLONE_NEWNET), "setns(network)")
        finally:
            os.close(own)

    def _take_pooled_vm(self):
        """A VM from the pool, handed over by create: the agent's connection, QEMU's pidfd, and
        the claim connection that keeps QEMU alive while we hold it (see "The VM pool")."""
        self.agent_sock = socket.socket(fileno=self.pooled["agent"])
        self.agent_sock.setblocking(True)
        self.agent = self.agent_sock.fileno()
        self.qemu_pidfd = self.pooled["pidfd"]

    def _restore_or_boot(self, deadline):
        """Start QEMU: restored from the template, else (or when that fails) booted."""
        if self.restore:
            try:
                self._start_vm(self.restore["argv"], deadline, self.restore["dir"])
            except (Error, OSError) as e:
                LOG.warning("restoring the VM template failed (%s%s); booting instead", e,
                            "; QEMU: " + _tail("qemu.log") if _tail("qemu.log") else "")
                self._stop_qemu()
                if self.agent is not None:
                    self.agent_sock.close()
                self.agent, self.qemu_pid, self.qemu_status = None, None, None
                self.restore = None
        if not self.restore:
            self._start_vm(self.argv, deadline)

    def _record_exit(self, status):
        """Write the exit record that makes the container stopped."""
        LOG.timeline("monitor: the workload exited")
        self.exit_code = status
        write_atomic(os.path.join(self.dir, "exit.json"),
                     json_dumps({"status": status, "time": _now_rfc3339()}))

    def _finish(self):
        """Stop the VM and close everything: the agent syncs before it reports the workload's
        exit, so nothing is lost by not waiting for the guest to power off."""
        self._stop_qemu()
        LOG.timeline("monitor: QEMU has exited")
        self._unwire()
        for fd in list(self.clients):
            self._drop_client(fd)

def _release_memory():
    """Hand back to the host what the boot freed (its arguments' JSON, the agent's replies;
    the create's heap too in a monitor that could not exec): it lives as long as its container."""
    import gc
    gc.collect()
    try:
        _libc().malloc_trim(0)
    except (AttributeError, OSError):
        pass


def _tail(path, lines=5):
    """The last lines of a small log file, on one line."""
    try:
        with open(path, "rb") as f:
            text = f.read()[-4096:].decode(errors="replace")
    except OSError:
        return ""
    kept = [ln.strip() for ln in text.strip().splitlines() if not ln.endswith(HUB_WARNING)]
    return " | ".join(kept[-lines:])


HUB_WARNING = "is not connected to host network"  # QEMU on an unused NIC slot's hub (only_taps)


# ===========================================================================
# Monitor: the relay of stdio, signals and requests
# ===========================================================================

class _MonitorRelay:
    """The monitor's relay loop: frames from the agent, requests from clients (CLI, exec and
    member processes), stdin and signals."""

    def _loop(self):
        """Relay until the workload exits; return its status."""
        import selectors
        self.sel = sel = selectors.DefaultSelector()
        sel.register(self.agent, selectors.EVENT_READ, ("agent", None))
        sel.register(self.ctl.fileno(), selectors.EVENT_READ, ("ctl", None))
        sel.register(self.wake_fd, selectors.EVENT_READ, ("wake", None))
        while self.exit_code is None:
            for key, _ in sel.select(self._select_timeout()):
                if self.exit_code is not None:
                    break
                getattr(self, "_on_" + key.data[0])(key)
            if self.stdin_is_file and self.exit_code is None:
                self._on_stdin(None)
            self._handle_signals()
            if self.net_due is not None and time.monotonic() >= self.net_due and self.exit_code is None:
                self.net_due = None
                self._follow_network()
        self._finish()
        return self.exit_code

    def _select_timeout(self):
        """How long one round of the loop may wait: less when namespace events are settling."""
        timeout = 0 if self.stdin_is_file else 1.0
        if self.net_due is not None:
            timeout = min(timeout, max(0.0, self.net_due - time.monotonic()))
        return timeout

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
            if msg.get("op") == "restored":  # the workload runs: relay stdin from now on
                self._watch_stdin()
            if client is _WORKLOAD:
                self._workload_error(msg.get("error"))
            elif client is _NETWORK:
                if msg.get("error"):
                    LOG.error("network: the VM did not follow the namespace: %s" % msg["error"])
            elif client is not None:
                self._reply(client, msg)
            return
        if msg.get("op") == "oom" and msg.get("member") is not None:  # to the member's process
            owner = next((fd for fd, slot in self.members.items() if slot == msg["member"]), None)
            if owner is not None:
                self._send_client(owner, lambda c: send_msg(c, msg))
            return
        if msg.get("op") == "oom":  # `events` reports it
            write_atomic(os.path.join(self.dir, "oom"), str(msg.get("count", 1)))
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

    def _workload_error(self, error):
        """A start the agent failed after we answered it: the workload's stderr says why."""
        target = self.stderr if self.stderr is not None else self.stdout
        if error and target is not None:
            try:
                _write_all(target, ("%s\n" % error).encode())
            except OSError:
                pass

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
        if op in ("exec", "create_member"):
            msg["proc"] = self.next_proc
            self.procs[self.next_proc] = fd
            self.next_proc += 1
        if op == "create_member":  # its host process: when it goes, the member goes
            self.members[fd] = msg["member"]
        member_start = op == "start" and msg.get("member") is not None
        msg["id"] = self.next_id
        self.pending[self.next_id] = _WORKLOAD if op == "start" and not member_start else fd
        self.next_id += 1
        self._to_agent(lambda a: send_msg(a, msg))
        if member_start:  # its host process relays stdin from now on
            owner = self.procs.get(msg.get("proc"))
            if owner is not None:
                self._send_client(owner, lambda c: send_msg(c, {"op": "started"}))
        elif op == "start":
            self._started(fd)

    def _started(self, fd):
        """Answer start once it is on its way, as runc's start returns once the process is
        released (what the agent fails at from here on is the workload's stderr); relay stdin
        and the terminal size from now on (the channel keeps later requests behind it)."""
        if self.exit_code is not None:
            self._reply(fd, {"error": "container not running"})
            return
        self._reply(fd, {"op": "started"})
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
        if data is None:
            return
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
        slot = self.members.pop(fd, None)
        if slot is not None and self.exit_code is None:  # a member's host process has gone
            self._to_agent(lambda a: send_msg(a, {"op": "remove_member", "member": slot}))


def resize_message(tty_fd, proc):
    """A resize request carrying the size of tty_fd, or None when it is not a sized terminal."""
    import termios
    try:
        rows, cols = struct.unpack("HHHH", fcntl.ioctl(tty_fd, termios.TIOCGWINSZ, b"\0" * 8))[:2]
    except (OSError, TypeError):
        return None
    return {"op": "resize", "proc": proc, "rows": rows, "cols": cols} if rows and cols else None


def _drain(fd):
    """Empty a non-blocking wake-up pipe."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _read_or_eof(fd):
    """Read what is there; an error counts as end-of-file, None is nothing to read after all."""
    try:
        return os.read(fd, CHUNK)
    except BlockingIOError:
        return None
    except OSError:
        return b""


# ===========================================================================
# Monitor: the container's network, wired at create and followed while it runs
# ===========================================================================

_NETWORK = "network"  # a pending plan sent after create: an error in the answer is logged
NET_SETTLE = 0.1  # seconds without namespace events before the monitor follows them


class _MonitorNetwork:
    """The container's network: its interfaces wired to NIC slots, followed while it runs,
    docker's resolver relayed."""

    def _on_network(self, fd):
        """Wire the namespace's interfaces to the VM and have the agent configure the guest; create
        asks once the engine's hooks have run (docker adds its veths in one). From then on the
        monitor follows the namespace's link, address and route events."""
        import selectors
        started = time.monotonic()
        if self.net_events is None:  # before the first dump: no change is missed
            self.net_events = Netlink(NET_EVENT_GROUPS)
            self.sel.register(self.net_events.sock.fileno(), selectors.EVENT_READ, ("netlink", None))
        try:
            self._sync_network(fd)
        except (Error, OSError) as e:
            self._reply(fd, {"error": str(e) if isinstance(e, Error) else "network: %s" % e})
            return
        LOG.debug("network: wired in %.1f ms", (time.monotonic() - started) * 1e3)

    def _on_netlink(self, _key):
        """Link, address or route events in the namespace: followed once they settle."""
        changed = False
        while True:
            try:
                data = self.net_events.sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: events were lost; a sync dumps everything anyway
                changed = True
                break
            changed = changed or net_event_matters(data, {w["tap"] for w in self.wired})
        if changed:
            self.net_due = time.monotonic() + NET_SETTLE

    def _follow_network(self):
        """A sync after create: whatever fails is logged, the container runs on."""
        try:
            self._sync_network()
        except (Error, OSError) as e:
            LOG.error(str(e) if isinstance(e, Error) else "network: %s" % e)

    def _sync_network(self, client=None):
        """Bring the VM's NICs in line with the namespace: unwire the interfaces gone (or down),
        wire the new ones to free NIC slots (giving a slot its tap first), and send the agent
        the plan when it changed. At create (client: the CLI's fd, answered when the guest is
        configured) an error raises with nothing of it left; later an interface that cannot be
        wired is logged and left out."""
        with Netlink() as nl:
            links = nl.links()
            present = {ln["index"] for ln in links}
            self.net_failed &= present
            self.net_warned &= present
            assigned = None if client is not None else {w["index"]: w["slot"] for w in self.wired}
            plan = network_plan([ln for ln in links if ln["index"] not in self.net_failed],
                                nl.addresses(), nl.routes(), assigned)
            want = {iface["index"] for iface in plan["interfaces"]}
            before = [(w["index"], w["slot"]) for w in self.wired]
            for w in [w for w in self.wired if w["index"] not in want]:
                self._unwire_one(nl, w)
            for iface in plan["interfaces"]:
                if iface["index"] not in {w["index"] for w in self.wired}:
                    self._wire_new(nl, iface, client is not None)
        for left in plan.pop("refused"):
            if left["index"] not in self.net_warned:
                self.net_warned.add(left["index"])
                LOG.error("network: %s: not wired, the VM has no free NIC (it has %d)"
                          % (left["name"], NET_SLOTS))
        if [(w["index"], w["slot"]) for w in self.wired] != before:
            write_atomic(os.path.join(self.dir, "net.json"), json_dumps(
                {"netns": self.netns, "interfaces": [{"index": w["index"], "name": w["name"]}
                                                     for w in self.wired]}))
        self._send_plan(plan, client)

    def _wire_new(self, nl, iface, create):
        """Wire one new interface (its slot given a tap when it has none); at create a failure
        unwires everything and raises, later it is logged and the interface left alone."""
        given = False
        try:
            given = self._give_tap(iface["slot"], iface["name"])
            tap = wire_interface(nl, iface)
        except (Error, OSError) as e:
            if given:
                self._take_tap(iface["slot"])
            if create:
                for w in list(self.wired):
                    self._unwire_one(nl, w)
                raise
            self.net_failed.add(iface["index"])
            LOG.error(str(e) if isinstance(e, Error) else "network: %s: %s" % (iface["name"], e))
            return
        self.wired.append({"index": iface["index"], "name": iface["name"], "slot": iface["slot"],
                           "tap": tap})
        if not create:
            LOG.info("network: %s wired to the VM's NIC %d", iface["name"], iface["slot"])

    def _unwire_one(self, nl, w):
        """Unwire one interface: its redirects go, and its slot's tap (one we gave, else it goes
        down and stays QEMU's until the VM ends)."""
        self.wired.remove(w)
        hot = self.nic_taps.get(w["slot"]) == "hot"
        unwire_interface(nl, w, None if hot else w["tap"])
        if hot:
            self._take_tap(w["slot"])
        LOG.info("network: %s unwired from the VM's NIC %d", w["name"], w["slot"])

    def _send_plan(self, plan, client):
        """Send the guest the plan of the wired interfaces (create's always, later ones when they
        changed); create's client is answered with the agent's reply."""
        wired = {w["index"] for w in self.wired}
        plan["interfaces"] = [i for i in plan["interfaces"] if i["index"] in wired]
        plan["routes"] = [r for r in plan["routes"] if r["oif"] in wired]
        plan["dns_relay"] = bool(wired) and docker_dns_listening()
        if client is None and plan == self.net_sent:
            return
        self.net_sent = plan
        if client is not None and not wired:  # the agent hides its unused first NIC meanwhile
            self._to_agent(lambda a: send_msg(a, {"op": "network", "plan": plan}))
            self._reply(client, {"op": "ok"})
            return
        self.pending[self.next_id] = client if client is not None else _NETWORK
        msg = {"op": "network", "plan": plan, "id": self.next_id}
        self.next_id += 1
        self._to_agent(lambda a: send_msg(a, msg))

    def _give_tap(self, slot, name):
        """Give NIC slot a tap now (QMP), when it is backed by a bare hub; True when we did."""
        if slot in self.nic_taps or slot not in self.hubs:
            return False  # a tap since QEMU started, or no such NIC (wire_interface says so)
        fd = open_tap(tap_name(slot))
        try:
            self._qmp(give_tap_commands(slot, fd))
        except Error as e:
            self._qmp(take_tap_commands(slot), strict=False)
            raise Error("network: cannot give the VM's NIC %d a tap for %s: %s" % (slot, name, e)) from None
        finally:
            os.close(fd)
        self.nic_taps[slot] = "hot"
        return True

    def _take_tap(self, slot):
        """Take away the tap _give_tap gave NIC slot (QMP): QEMU closes it, it vanishes."""
        if self.nic_taps.get(slot) == "hot":
            del self.nic_taps[slot]
            try:
                self._qmp(take_tap_commands(slot), strict=False)
            except Error as e:
                LOG.warning("network: taking the tap of NIC %d back: %s", slot, e)

    def _qmp(self, commands, strict=True):
        """Run QMP commands on the VM in one session (strict: the first error raises)."""
        q = Qmp(".", timeout=5.0, io_timeout=5.0)
        try:
            for command, arguments in commands:
                try:
                    q.call(command, **arguments)  # (getfd's "pass_fd": the fd it takes)
                except Error:
                    if strict:
                        raise
        finally:
            q.close()

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
        if self.net_events is not None:
            self.net_events.close()
            self.net_events, self.net_due = None, None
        if self.wired:
            try:
                with Netlink() as nl:
                    net_unwire(nl, [w["index"] for w in self.wired])
                os.unlink(os.path.join(self.dir, "net.json"))  # delete has nothing left to do
            except OSError as e:
                LOG.warning("network: %s", e)
            self.wired = []


class Monitor(_MonitorVM, _MonitorRelay, _MonitorNetwork):
    """Runs QEMU, boots the agent, relays stdio and signals, exits with the workload's status."""


# ===========================================================================
# Monitor: exec and pod member processes (each one's --pid-file pid)
# ===========================================================================

class ExecMonitor:
    """One exec'd process: relays its stdio through the container's monitor, exits with its status."""

    def __init__(self, state_dir, process, stdio, notify_fd, terminal=None, member=None):
        self.dir, self.process, self.notify_fd, self.terminal = state_dir, process, notify_fd, terminal
        self.stdin, self.stdout, self.stderr = stdio
        self.signals, self.reader = [], FrameReader()
        self.member = member  # the pod member slot an exec is for (self.dir: its sandbox's)
        self.stdin_now = True  # relay stdin from the start (a pod member's: once started)
        self.proc = None  # the process's number, once the container's monitor has made it

    def _request(self):
        """The request that makes the process."""
        msg = {"op": "exec", "process": self.process}
        if self.member is not None:
            msg["member"] = self.member
        return msg

    def run(self):
        """Ask for the process, then relay until it exits; returns its status."""
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
            send_msg(self.sock.fileno(), self._request())
            reply = read_msg(self.sock.fileno(), self.reader, 60)
        except (Error, OSError) as e:
            reply = {"error": str(e) if isinstance(e, Error) else "container not running"}
        if reply.get("error"):
            _notify_once(self.notify_fd, {"error": reply["error"]})
            return 1
        _notify_once(self.notify_fd, {"ok": True, "proc": reply["proc"]})
        self.proc = reply["proc"]
        return self._relay(rfd)

    def _relay(self, rfd):
        """Relay stdio and signals until the process exits; its status."""
        import selectors
        self.sel = sel = selectors.DefaultSelector()
        status = self._on_frames(b"")  # output (even the exit) that came in with the reply
        if status is not None:
            return status
        self.signals.append(signal.SIGWINCH)
        sel.register(self.sock.fileno(), selectors.EVENT_READ, "sock")
        sel.register(rfd, selectors.EVENT_READ, "wake")
        if self.stdin_now:
            self._watch_stdin()
        while True:
            for key, _ in sel.select(1.0):
                if key.data == "wake":
                    _drain(rfd)
                elif key.data == "stdin":
                    data = _read_or_eof(self.stdin)
                    if data is None:
                        continue
                    send_data(self.sock.fileno(), stream_id(self.proc, 0), data)
                    if not data:
                        sel.unregister(self.stdin)
                else:
                    status = self._on_frames()
                    if status is not None:
                        return status
            self._forward_signals()

    def _watch_stdin(self):
        """Relay stdin to the process from now on."""
        import selectors
        if self.stdin is None:
            return
        try:
            self.sel.register(self.stdin, selectors.EVENT_READ, "stdin")
        except (OSError, ValueError):
            send_data(self.sock.fileno(), stream_id(self.proc, 0), b"")

    def _gone(self):
        """The status when the container's monitor has gone without the process's exit."""
        return 255

    def _on_frames(self, data=None):
        """Output and the exit message from the container's monitor; the status once it exits."""
        if data is None:
            data = _read_or_eof(self.sock.fileno())
            if not data:
                return self._gone()  # the container's monitor is gone
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
            elif kind == MSG and payload.get("op") == "started" and not self.stdin_now:
                self.stdin_now = True
                self._watch_stdin()
            elif kind == MSG and payload.get("op") == "oom":
                self._on_oom(payload.get("count", 1))
        return None

    def _on_oom(self, count):
        """An OOM kill in the container's cgroup (only a pod member's process hears of it)."""

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


class MemberMonitor(ExecMonitor):
    """A pod member's host process, its --pid-file pid (conmon and containerd-shim reap it): has
    the sandbox's monitor create the member in the pod's VM, relays its stdio once started and
    signals sent to it, writes its exit record and exits with its status (137 when the VM goes)."""

    def __init__(self, state_dir, cid, sandbox_dir, slot, config, stdio, notify_fd, terminal=None,
                 cgroups=()):
        ExecMonitor.__init__(self, sandbox_dir, config["process"], stdio, notify_fd, terminal, slot)
        self.member_dir, self.config, self.cgroups = state_dir, config, cgroups
        self.stdin_now = False

    def _request(self):
        """Create the member in the sandbox's VM."""
        return {"op": "create_member", "member": self.member, "config": self.config}

    def run(self):
        """Join the member's host cgroup, then live as the member's process; its status."""
        join_host_cgroup(self.cgroups)
        status = ExecMonitor.run(self)
        if self.proc is not None:  # it was created: now it has stopped
            write_atomic(os.path.join(self.member_dir, "exit.json"),
                         json_dumps({"status": status, "time": _now_rfc3339()}))
        return status

    def _gone(self):
        """The pod's VM has gone: the member was killed with it."""
        return 128 + signal.SIGKILL

    def _on_oom(self, count):
        """Record the member's OOM kills where `events` reads them."""
        write_atomic(os.path.join(self.member_dir, "oom"), str(count))


def _notify_once(fd, obj):
    """Write one JSON line to a notify pipe and close it."""
    try:
        _write_all(fd, (json_dumps(obj) + "\n").encode())
    except OSError:
        pass
    os.close(fd)


# ===========================================================================
# The VM pool: warmed VMs, each kept by a keeper process, handed to create
# ===========================================================================
# A keeper (one process per pooled VM, started by a refill that create spawns detached from the
# engine: a session of its own, the host's namespaces, the pool's cgroup, none of the engine's
# fds) restores a VM from the template in a mount namespace of its own, with QEMU in an empty
# network namespace, every NIC slot on a bare hub and the pod export on a spare 9p slot. It runs
# a throw-away container in it (create, exec, start, kill: the agent's and the guest kernel's
# code translated once), has the agent undo it (reset) and waits. create takes a VM by renaming
# its directory out of the pool (of two creates one gets it) and receives the agent's
# connection and a pidfd of QEMU from its keeper; QEMU moves into the container's host cgroup,
# the container's files are moved beneath the pod export in QEMU's mount namespace (as a pod
# member's are), and the monitor gives the VM taps of the container's namespace as fds over
# QMP. The keeper stays QEMU's parent: when the last holder of the claim connection is gone
# (create, then the monitor), QEMU is killed and the VM's directory removed.

POOL_DIR = os.environ.get("CC_OCI_POOL_DIR", "/run/cc-oci-runtime-pool")
POOL_SLOT = 0  # the pod export slot of a pooled VM's container (its pod members take others)
POOL_CGROUP = "cc-oci-pool"  # in every host cgroup hierarchy: the keepers and their QEMUs
POOL_CHECK = 1.0  # seconds between a keeper's looks at its QEMU and at the pool's inputs
WARMUP_ID = "cc-oci-pool-warmup"
WARMUP_PROGRAMS = ("/bin/sleep", "/bin/true")  # the host's own, with their loader and libc


def pool_size(vm):
    """How many idle VMs of this configuration to keep ready: vm.pool, or $CC_OCI_POOL (for a
    whole host, whatever the bundles say); 0 (and no template) is no pool."""
    size = os.environ.get("CC_OCI_POOL", "")
    size = int(size) if size.isdigit() else vm.get("pool", 0)
    return size if vm.get("accel_used") and vm.get("template", True) else 0


def pool_key(vm, template):
    """The pool of VMs of this size restored from this template by this runtime file (the
    template's name digests QEMU, the kernel, the image and hypervisor.args)."""
    digest = sha256(json_dumps([os.path.basename(template), str(vm["memory"]), vm["cpus"],
                                vm["accel_used"], vm.get("tcg_tb_size")]).encode())
    st = os.stat(os.path.realpath(__file__))
    digest.update(b"%d|%d" % (st.st_size, st.st_mtime_ns))
    return digest.hexdigest()[:20]


def pool_inputs(vm, image, template):
    """What a pooled VM was made from, as (path, size, mtime) stats: when one changes (or
    goes), its keeper ends it."""
    sig = []
    for path in (vm["qemu"], vm["kernel_image"], image, os.path.join(template, "state"),
                 os.path.realpath(__file__)):
        try:
            st = os.stat(path)
            sig.append([path, st.st_size, st.st_mtime_ns])
        except OSError:
            sig.append([path, None, None])
    return sig


def pool_take(key):
    """A ready VM of pool key, claimed (None when there is none): its directory renamed out of
    the pool, then its keeper's handover: {"dir", "keeper" (the claim connection: QEMU lives
    while it is open), "agent" (fd), "pidfd", "qemu_pid", "qemu_start"}."""
    ready = os.path.join(POOL_DIR, key)
    try:
        names = sorted(os.listdir(ready))
    except OSError:
        return None
    used = os.path.join(POOL_DIR, "used")
    os.makedirs(used, exist_ok=True)
    for name in names:
        vmdir = os.path.join(used, name)
        try:
            os.rename(os.path.join(ready, name), vmdir)
        except OSError:
            continue  # another create took it
        try:
            return _claim(vmdir)
        except (Error, OSError) as e:
            LOG.debug("pool: %s: %s", vmdir, e)
            _remove_tree(vmdir)  # its keeper is gone (or going): so is its QEMU
    return None


def _claim(vmdir):
    """The keeper's handover of the VM in vmdir (see pool_take)."""
    sock = socket.socket(fileno=connect_unix(vmdir, "keeper.sock", 2.0).detach())
    try:
        sock.settimeout(10.0)
        sock.sendall(b"claim")
        msg, fds, _flags, _addr = socket.recv_fds(sock, 4096, 2)
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise Error("the keeper did not hand the VM over")
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    info = json_loads(msg.decode())
    return {"dir": vmdir, "keeper": sock, "agent": fds[0], "pidfd": fds[1],
            "qemu_pid": info["qemu_pid"], "qemu_start": info["qemu_start"]}


def release_pooled(taken):
    """Let go of a claimed VM that will not be used: its keeper kills QEMU and removes it."""
    for fd in (taken["agent"], taken["pidfd"]):
        os.close(fd)
    taken["keeper"].close()


def give_pooled_vm(taken, cgroups, conf):
    """Make a claimed VM the container's: QEMU in its host cgroups (its memory charged there
    too), the container's rootfs and bind sources beneath the pod export's POOL_SLOT in QEMU's
    mount namespace; returns the guest config's changes (where its files are)."""
    pid = taken["qemu_pid"]
    for path in cgroups:
        try:  # (kernels since 6.? refuse: what the pool's VM touched stays the pool's charge)
            _write_cgroup(path, {"memory.move_charge_at_immigrate": 3})
        except OSError:
            pass
        _write_cgroup(path, {"cgroup.procs": pid})
    mounts = [dict(m) for m in conf["mounts"]]
    trees = member_trees(dict(conf, mounts=mounts), POOL_SLOT)
    fds = []
    try:
        for name, path, is_dir, ro, recursive in trees:
            fds.append((name, _open_tree(path, recursive), is_dir, ro))
        stage, target = (os.path.join(taken["dir"], d) for d in ("stage", _pool_slot_dir()))
        _in_mount_ns(pid, lambda: _assemble_member(stage, target, fds))
    finally:
        for _name, fd, _is_dir, _ro in fds:
            os.close(fd)
    return {"root_pod": "%d/rootfs" % POOL_SLOT, "pod_tag": POOL_POD_TAG,
            "mounts": [m for m in mounts if not m.get("skip")]}


def _pool_slot_dir():
    """Where the container's files go in a pooled VM's directory (its pod export's slot)."""
    return os.path.join(FILES_DIR, POD_DIR, str(POOL_SLOT))


POOL_POD_TAG = "share0"  # a pooled VM's pod export: the template's first bind-mount slot


def pool_shares(vmdir):
    """A pooled VM's 9p exports: an empty rootfs and bind-mount slots, but the first of them,
    the pod export (all of its container's files arrive there)."""
    files = os.path.join(vmdir, FILES_DIR)
    shares = template_shares([(ROOTFS_TAG, os.path.join(files, "empty"), True)],
                             os.path.join(files, "empty"), SHARE_SLOT_CLASSES[0])
    shares[1] = (POOL_POD_TAG, os.path.join(files, POD_DIR), False)
    return shares


def refill_pool(vm, image):
    """Top the pool of this configuration up in the background (see _spawn_refill); nothing
    when vm.pool is 0."""
    want = pool_size(vm)
    try:
        template = want and template_for(vm, image)
    except (Error, OSError):
        return
    if not template:
        return
    params = {"state_dir": POOL_DIR, "cid": pool_key(vm, template), "vm": vm, "image": image,
              "template": template, "want": want}
    reaper = _waiting_reaper()
    if reaper:  # it would wait for the refill and its VMs' keepers before it exits itself
        LOG.debug("pool: not refilled under %s (pid %d), which waits for what it adopts", *reaper)
        return
    try:
        _spawn_refill(params)
    except OSError as e:
        LOG.warning("pool: cannot start a refill: %s", e)


WAITING_REAPERS = ("conmon",)  # sub-reapers that outlive their container for what they adopted


def _waiting_reaper():
    """(name, pid) of an ancestor that is a sub-reaper waiting for every process it adopts
    (podman's conmon), or None: an orphaned refill would keep it from exiting."""
    pid = os.getppid()
    while pid > 1:
        try:
            with open("/proc/%d/stat" % pid) as f:
                stat = f.read()
        except OSError:
            return None
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        if name in WAITING_REAPERS:
            return name, pid
        pid = int(stat[stat.rindex(")") + 2:].split()[1])
    return None


def _spawn_refill(params, mnt_fd=None):
    """Run _run_refill in a grandchild in a session of its own, in PID 1's namespaces and the
    pool's cgroup, with none of our fds (an engine waits for EOF on the pipes it gave us). The
    kernel gives an orphan to the nearest sub-reaper: under conmon or containerd-shim it is theirs
    until they exit (they reap it, and wait for nothing of it), then PID 1's."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            if mnt_fd is not None:  # a keeper's: back to the mount namespace it came from
                _check_libc(_libc().setns(mnt_fd, CLONE_NEWNS), "setns(mnt)")
            _join_host_ns(("pid",))  # (for children: the refill is forked next)
            if os.fork() == 0:
                _join_host_ns(("cgroup", "ipc", "uts", "net", "mnt"))
                _join_pool_cgroup()
                LOG.path, LOG.fmt, LOG.container_id = os.path.join(POOL_DIR, "pool.log"), "text", "pool"
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                _close_inherited_fds(3)
                kept = {k: v for k, v in os.environ.items() if k == "PATH" or k.startswith("CC_OCI_")}
                os.environ.clear()  # nothing of the engine's environment
                os.environ.update(kept)
                _exec_monitor(params, [], kind="pool")
                _run_refill(params)  # where exec is impossible: in this copy
        except BaseException as e:
            LOG.debug("pool: refill: %r", e)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _join_host_ns(kinds):
    """setns into PID 1's namespaces of these kinds (those we are not in already; ours when PID
    1's cannot be read, as under a sandbox's init: an engine runs us in the host's anyway)."""
    for kind in kinds:
        own, host = "/proc/self/ns/" + kind, "/proc/1/ns/" + kind
        try:
            if os.stat(own).st_ino == os.stat(host).st_ino:
                continue
        except PermissionError:
            continue
        fd = os.open(host, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check_libc(_libc().setns(fd, 0), "setns %s" % host)
        finally:
            os.close(fd)


def _join_pool_cgroup():
    """Move this process into POOL_CGROUP of every host cgroup hierarchy."""
    for mount_point, _version, _controllers in cgroup_hierarchies():
        path = os.path.join(mount_point, POOL_CGROUP)
        try:
            os.makedirs(path, exist_ok=True)
            if os.path.exists(os.path.join(path, "cpuset.cpus")):
                for key in ("cpuset.cpus", "cpuset.mems"):
                    with open(os.path.join(path, key)) as f:
                        if not f.read().strip():
                            with open(os.path.join(mount_point, key)) as parent:
                                _write_cgroup(path, {key: parent.read().strip()})
            _write_cgroup(path, {"cgroup.procs": 0})
        except OSError as e:
            LOG.debug("pool: cgroup %s: %s", path, e)


def _run_refill(p):
    """The refill: one at a time per pool (a lock), the dead keepers' directories removed,
    then keepers started one after another until the pool holds p["want"] VMs."""
    os.makedirs(POOL_DIR, exist_ok=True)
    lock = os.open(os.path.join(POOL_DIR, p["cid"] + ".lock"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC,
                   0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another refill of this pool runs
    collect_pool_garbage()
    ready = os.path.join(POOL_DIR, p["cid"])
    for _ in range(p["want"]):
        try:
            if len(os.listdir(ready)) >= p["want"]:
                break
        except FileNotFoundError:
            pass
        if not _start_keeper(p, lock):
            break
    return 0


def _start_keeper(p, lock):
    """Fork a keeper (without the refill's lock) and wait until its VM is ready (True) or it
    failed (logged)."""
    name = uuid4().replace("-", "")[:16]
    vmdir = os.path.join(POOL_DIR, "warming", name)
    os.makedirs(vmdir)
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(rfd)
            os.close(lock)  # (a flock is the open file's: the next refill must get it)
            code = PoolKeeper(p["cid"], name, vmdir, p["vm"], p["image"], p["template"], wfd,
                              p["want"]).run()
        except BaseException as e:
            LOG.debug("pool: keeper: %r", e)
        finally:
            os._exit(code)
    os.close(wfd)
    reply = _read_pipe(rfd, float(p["vm"]["boot_timeout"]) * 2)
    if reply.strip() != b"ready":
        LOG.warning("pool: a VM for the pool failed: %s",
                    reply.decode(errors="replace").strip() or "its keeper died")
        return False
    return True


def collect_pool_garbage():
    """Remove the directories of pooled VMs whose keeper is gone (killed, or the host rebooted
    under a persistent POOL_DIR): nothing runs in them any more."""
    try:
        groups = os.listdir(POOL_DIR)
    except FileNotFoundError:
        return
    for group in groups:
        top = os.path.join(POOL_DIR, group)
        if not os.path.isdir(top):
            continue
        for name in os.listdir(top):
            vmdir = os.path.join(top, name)
            keeper = read_json_quietly(os.path.join(vmdir, "keeper.json"))
            if keeper is None and time.time() - _mtime(vmdir) < 60:
                continue  # a keeper starting
            if not keeper or not process_alive(keeper.get("pid"), keeper.get("start")):
                _remove_tree(vmdir)


def read_json_quietly(path):
    """The JSON in a file, or None when it is missing or not JSON."""
    try:
        with open(path) as f:
            return json_loads(f.read())
    except (OSError, ValueError):
        return None


def _mtime(path):
    """A path's mtime (0 when it is gone)."""
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0


def _remove_tree(path):
    """rm -rf, quietly."""
    import shutil
    shutil.rmtree(path, ignore_errors=True)


def pool_status():
    """{pool key: number of ready VMs}, and the claimed VMs whose keeper lives (for check)."""
    ready, used = {}, 0
    try:
        groups = os.listdir(POOL_DIR)
    except FileNotFoundError:
        return ready, used
    for group in groups:
        top = os.path.join(POOL_DIR, group)
        if group in ("warming", "used") or not os.path.isdir(top):
            continue
        ready[group] = len(os.listdir(top))
    try:
        used = len(os.listdir(os.path.join(POOL_DIR, "used")))
    except FileNotFoundError:
        pass
    return ready, used


def warmup_bundle():
    """The bundle of a pooled VM's throw-away container, built once in the cache: the default
    spec running the host's own sleep (exec: true), with their dynamic loader and libraries."""
    programs = [os.path.realpath(p) for p in WARMUP_PROGRAMS]
    files = set(programs)
    for prog in programs:
        files.update(filter(None, [elf_interpreter(prog)] + _elf_libraries(prog)))
    digest = sha256(b"warmup1")
    for path in sorted(files):
        st = os.stat(path)
        digest.update(("%s|%d|%d" % (path, st.st_size, st.st_mtime_ns)).encode())
    final = os.path.join(CACHE_DIR, "warmup-" + digest.hexdigest()[:16])
    if os.path.exists(os.path.join(final, "config.json")):
        return final
    tmp = "%s.tmp.%d" % (final, os.getpid())
    _remove_tree(tmp)
    rootfs = os.path.join(tmp, "rootfs")
    for path in sorted(files):
        _copy_host_file(path, rootfs)
    for d in ("proc", "sys", "dev", "tmp", "bin"):
        os.makedirs(os.path.join(rootfs, d), exist_ok=True)
    for prog, real in zip(WARMUP_PROGRAMS, programs):
        if not os.path.lexists(rootfs + prog):
            os.symlink(real, rootfs + prog)
    spec = default_spec()
    spec["process"].update(terminal=False, args=["/bin/sleep", "60"])
    spec["hostname"] = WARMUP_ID
    with open(os.path.join(tmp, "config.json"), "w") as f:
        f.write(json_dumps(spec))
    try:
        os.rename(tmp, final)
    except OSError:
        _remove_tree(tmp)  # another process built it meanwhile
    prune_cache("warmup-", final)
    return final


def _copy_host_file(path, root):
    """Copy a host file to the same path under root, and each symlink on the way."""
    import shutil
    target = root + path
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy2(path, target)
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        cur = "/" + "/".join(parts[:i])
        if os.path.islink(cur) and not os.path.lexists(root + cur):
            os.symlink(os.readlink(cur), root + cur)


class PoolKeeper(_VMProcess):
    """One pooled VM's keeper, QEMU's parent from its restore to its end: restores and warms
    the VM, waits for a claim, hands it over, and ends it when its holder is gone."""

    def __init__(self, key, name, vmdir, vm, image, template, report_fd, want=1):
        self.key, self.name, self.dir, self.vm = key, name, vmdir, vm
        self.image, self.template, self.report_fd, self.want = image, template, report_fd, want
        self.host_mnt = None  # the mount namespace we left for QEMU's (a refill's)
        self.reader, self.agent, self.agent_sock = FrameReader(), None, None
        self.qemu_pid, self.qemu_status, self.qemu_netns = None, None, "new"
        self.inputs = pool_inputs(vm, image, template)

    def run(self):
        """The keeper's whole life; its exit ends QEMU (PR_SET_PDEATHSIG)."""
        os.chdir(self.dir)
        write_atomic("keeper.json", json_dumps({"pid": os.getpid(), "key": self.key,
                                                "start": proc_start_time(os.getpid())}))
        try:
            os.nice(10)  # a refill gives way to the containers being created meanwhile
            self._prepare()
            argv = only_taps(qemu_command("pool-" + self.name, self.vm, None, ".", self.image, {
                "ram": os.path.join(self.template, "ram"), "share": False, "incoming": True,
                "shares": pool_shares(self.dir)}), 1)  # (the monitor moves the tap to its own)
            deadline = time.monotonic() + float(self.vm["boot_timeout"])
            self._start_vm(argv, deadline, self.template)
            self._warm_up(deadline)
            _renice_process(self.qemu_pid, 0)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind("keeper.sock")
            listener.listen(4)
            ready = os.path.join(POOL_DIR, self.key)
            os.makedirs(ready, exist_ok=True)
            os.rename(self.dir, os.path.join(ready, self.name))
            self.dir = os.path.join(ready, self.name)
        except (Error, OSError) as e:
            _write_all(self.report_fd, str(e).encode(errors="replace"))
            self._end()
            return 1
        _write_all(self.report_fd, b"ready")
        os.close(self.report_fd)
        return self._serve(listener)

    def _prepare(self):
        """A mount namespace of our own (QEMU's) with the VM's files tmpfs: an empty directory
        for the unused exports, the pod export's empty slots (see stage_files)."""
        self.host_mnt = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        _check_libc(_libc().unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        os.mkdir("stage", 0o700)
        stage_files(self.dir, ())

    def _warm_up(self, deadline):
        """The throw-away container: created with its files from the pod export, an exec, its
        start, its kill; then the agent's reset, and its files taken away again."""
        conf = load_spec(warmup_bundle())
        trees = member_trees(conf, POOL_SLOT)
        fds = [(name, _open_tree(path, rec), is_dir, ro) for name, path, is_dir, ro, rec in trees]
        target = os.path.join(self.dir, _pool_slot_dir())
        try:
            _assemble_member(os.path.join(self.dir, "stage"), target, fds)
        finally:
            for _name, fd, _is_dir, _ro in fds:
                os.close(fd)
        gconf = dict(guest_config(WARMUP_ID, conf), root_pod="%d/rootfs" % POOL_SLOT,
                     pod_tag=POOL_POD_TAG, warmup=True)
        send_msg(self.agent, {"op": "create", "config": gconf, "time": time.time(),
                              "seed": os.urandom(32).hex()})
        self._wait_agent("created", deadline)
        exec_process = dict(conf["process"], args=["/bin/true"])
        for msg, answer in (({"op": "start", "id": 1}, "started"),
                            ({"op": "exec", "proc": 1, "process": exec_process, "id": 2}, "exit"),
                            ({"op": "signal", "sig": signal.SIGKILL, "id": 3}, "exit"),
                            ({"op": "reset", "id": 4}, "reset")):
            send_msg(self.agent, msg)
            self._wait_agent(answer, deadline)
        umount(target)

    def _serve(self, listener):
        """Wait for a claim; end the VM when QEMU exits, its inputs change, its directory goes
        or it has waited vm.pool_idle seconds."""
        import select
        idle_until = time.monotonic() + float(self.vm.get("pool_idle", 900))
        while True:
            if select.select([listener], [], [], POOL_CHECK)[0]:
                conn, _ = listener.accept()
                if self._hand_over(conn, listener):
                    self._refill()
                    return self._held(conn)
                continue
            if self._reap_qemu() or time.monotonic() > idle_until or not os.path.isdir(self.dir) \
                    or pool_inputs(self.vm, self.image, self.template) != self.inputs:
                self._end()
                return 0

    def _refill(self):
        """Start the refill of our pool as our VM leaves it: we are outside every engine's
        process tree (a create under conmon cannot start one: see refill_pool)."""
        try:
            _spawn_refill({"state_dir": POOL_DIR, "cid": self.key, "vm": self.vm, "image": self.image,
                           "template": self.template, "want": self.want}, self.host_mnt)
        except OSError as e:
            LOG.warning("pool: cannot start a refill: %s", e)

    def _hand_over(self, conn, listener):
        """A claim: send the agent's connection and a pidfd of QEMU (True once sent). Only a
        VM whose directory its claimant has moved out of the pool is handed over."""
        self.dir = os.path.join(POOL_DIR, "used", self.name)
        try:
            conn.settimeout(5.0)
            if conn.recv(16) != b"claim" or not os.path.isdir(self.dir):
                raise OSError(errno.EPERM, "not a claim of a VM out of the pool")
            pidfd = os.pidfd_open(self.qemu_pid)
            try:
                info = {"qemu_pid": self.qemu_pid, "qemu_start": proc_start_time(self.qemu_pid)}
                socket.send_fds(conn, [json_dumps(info).encode()], [self.agent, pidfd])
            finally:
                os.close(pidfd)
        except OSError as e:
            LOG.debug("pool: %s: %s", self.name, e)
            conn.close()
            self.dir = os.path.join(POOL_DIR, self.key, self.name)
            return False
        self.agent_sock.close()
        self.agent = None
        listener.close()
        return True

    def _held(self, conn):
        """The VM is a container's: become a small interpreter (QEMU's parent still, ~4 MiB
        instead of ~7) that waits until every holder of the claim connection is gone or QEMU
        exits, then kills QEMU and removes the VM's directory."""
        conn.settimeout(None)
        os.set_inheritable(conn.fileno(), True)
        argv = [sys.executable, "-S", "-I", "-c", KEEPER_HOLD, str(conn.fileno()),
                str(self.qemu_pid), self.dir, FILES_DIR]
        try:
            os.execv(sys.executable, argv)
        except OSError as e:
            LOG.debug("pool: %s: holding in this process: %s", self.name, e)
        import select
        while not self._reap_qemu():
            if select.select([conn], [], [], POOL_CHECK)[0] and not conn.recv(64):
                break
        conn.close()
        self._end()
        return 0

    def _end(self):
        """Kill QEMU, then remove the VM's directory (its files tmpfs goes with our namespace)."""
        self._stop_qemu()
        if self.agent_sock is not None:
            self.agent_sock.close()
        try:
            umount(os.path.join(self.dir, FILES_DIR))
        except (Error, OSError):
            pass
        _remove_tree(self.dir)


KEEPER_HOLD = """
import os, select, signal, sys
claim, qemu, vmdir, files = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
pidfd = os.pidfd_open(qemu)
while True:
    ready = select.select([claim, pidfd], [], [])[0]
    try:
        if pidfd in ready or not os.read(claim, 64):
            break
    except OSError:
        break
try:
    os.kill(qemu, signal.SIGKILL)
except ProcessLookupError:
    pass
os.waitpid(qemu, 0)
import ctypes, shutil
ctypes.CDLL(None).umount2(os.path.join(vmdir, files).encode(), 2)
shutil.rmtree(vmdir, ignore_errors=True)
"""  # a claimed VM's keeper, exec'd: it only ties QEMU's life to the claim connection


def _renice_process(pid, value):
    """Set the nice value of every thread of a process (QEMU's vCPU threads included)."""
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), value)
        except OSError:
            pass


# ===========================================================================
# Agent: this file as PID 1 in the guest; boot, the host's requests and the processes
# ===========================================================================
# The agent's roles are four classes put together as Agent at the end of the pod members'
# section: its life and the host's requests (here), a container's set-up, the guest's
# network, and pod members.

GUEST_RUN = "/run/cc"  # a tmpfs of the agent's: the container's root and the 9p shares
GUEST_ROOT = GUEST_RUN + "/root"
GUEST_SHARES = GUEST_RUN + "/shares"
GUEST_POD = GUEST_SHARES + "/pod"  # the pod export: a member's rootfs and binds at <slot>/
MNT_DETACH = 2
SYS_PIVOT_ROOT = 155  # x86_64
GUEST_CGROUP = "/sys/fs/cgroup"  # cgroup v2 in the guest
CONTAINER_CGROUP = GUEST_CGROUP + "/container"  # the container's processes and limits
NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=262144"


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


class _AgentCore:
    """The agent's life in the guest: boot, the host's requests on the virtio-serial port, and
    the processes it runs for them (stdio, signals, exits)."""

    def __init__(self):
        self.port, self.reader, self.conf = None, FrameReader(), None
        self.procs, self.out_fds, self.in_fds = {}, {}, {}
        self.finished = False
        self.oom_kills, self.oom_checked = 0, 0.0
        self.members = {}  # pod members in this VM: {slot: {"proc", "conf", "cgroup"}}
        self.gone_cgroups = []  # removed members' cgroups, rmdir'ed once their processes are gone

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
            self._check_oom(force=any(p["status"] is not None and not p.get("reported")
                                      for p in self.procs.values()))
            self._report_exits()
            if self.gone_cgroups:
                self._remove_gone_cgroups()

    def _boot(self):
        """Mount /proc, /sys, /dev; load the modules; open the agent port."""
        for target, fstype in (("/proc", "proc"), ("/sys", "sysfs"), ("/dev", "devtmpfs")):
            try:
                mount(fstype, target, fstype, MS_NOSUID | MS_NOEXEC if fstype != "devtmpfs" else 0)
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
        with open("/proc/sys/vm/overcommit_memory", "w") as f:
            f.write("1")  # as on a big host: the cgroup limit, not the VM's size, refuses memory
        os.makedirs(GUEST_RUN, exist_ok=True)  # a mount, so that the container can pivot_root
        mount("tmpfs", GUEST_RUN, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700")
        mount(None, GUEST_RUN, None, MS_SHARED)  # the rootfs mounted at create reaches the init
        os.makedirs(GUEST_ROOT)
        _boot_guest_cgroup()  # in the template: tens of ms a container saves under TCG
        _boot_device_cgroup()
        _last_cap()  # read once, in the template
        import ctypes, resource, select, termios  # noqa: F401,E401 (the same: ~40 ms a fork)
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
        self.boot_hostname = socket.gethostname()  # what a pooled VM's reset sets again
        self.init_pid, self.init_sock = self._fork_init()

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

    def _op_start(self, msg):
        """Start the container's process (the sandbox's, or a pod member's)."""
        num, _conf, cgroup = self._container_of(msg)
        proc = self.procs.get(num)
        if proc is None or proc["started"] or proc["status"] is not None:
            raise Error("cannot start a container that is not created")
        proc["started"] = True
        sock = proc.pop("init")
        try:
            child_fds, outs = self._stdio(proc, "/proc/%d/root" % proc["pid"])
            try:  # the process is released, as runc's start does: what fails from here on
                socket.send_fds(sock, [b"s"], list(child_fds))  # is its stderr and exit 1
            finally:
                for fd in set(child_fds):
                    os.close(fd)
        except (Error, OSError):
            proc["status"] = 127  # its pid namespace is spent: the container stops, as runc's does
            if num:
                signal_cgroup(cgroup, signal.SIGKILL)
            else:
                _kill_all()
            raise
        finally:
            sock.close()
        self._watch(num, proc, proc["pid"], outs)
        return {"op": "started", "pid": proc["pid"]}

    def _op_exec(self, msg):
        """Run another process in the container (the sandbox or a pod member)."""
        first, conf, _cgroup = self._container_of(msg)
        if self.procs.get(first, {}).get("status") is not None:
            raise Error("container not running")
        process = msg["process"]
        exe = self._check_process(process, "/proc/%d/root" % self.procs[first]["pid"])
        proc = {"pid": None, "status": None, "process": process, "open": 0,
                "member": msg.get("member")}
        self.procs[msg["proc"]] = proc
        try:
            self._spawn(msg["proc"], proc, exe, self.procs[first]["pid"], conf)
        except (Error, OSError):
            del self.procs[msg["proc"]]
            raise
        return {"op": "started", "pid": proc["pid"], "proc": msg["proc"]}

    def _op_signal(self, msg):
        """Deliver a signal to one process, or to all of the container's (all=True)."""
        first, _conf, cgroup = self._container_of(msg)
        proc = self.procs.get(msg.get("proc", first))
        sig = msg["sig"]
        if proc is None or proc["status"] is not None:
            raise Error("container not running")
        if not proc.get("started", True):  # created, never started
            if sig not in HARMLESS_SIGNALS:
                proc["status"] = 128 + sig
                os.kill(proc["pid"], signal.SIGKILL)
            return None
        if msg.get("all") and first:
            signal_cgroup(cgroup, sig)
            return None
        try:
            os.kill(-1 if msg.get("all") else proc["pid"], sig)
        except ProcessLookupError:
            pass
        return None

    def _op_stats(self, msg):
        """The container cgroup's figures (memory, CPU, pids) for `events`."""
        return {"op": "stats", "cgroup": guest_cgroup_stats(self._container_of(msg)[2])}

    def _op_update(self, msg):
        """New limits for the container's cgroup."""
        _apply_guest_limits(msg["resources"], self._container_of(msg)[2])
        return None

    def _op_freeze(self, msg):
        """Pause (frozen=True) or resume a pod member's processes: its cgroup's freezer."""
        with open(self._container_of(msg)[2] + "/cgroup.freeze", "w") as f:
            f.write("1" if msg.get("frozen") else "0")
        return None

    def _check_oom(self, force=False):
        """Tell the host when the container's cgroup has had another OOM kill."""
        now = time.monotonic()
        if not force and now - self.oom_checked < 0.25:
            return
        self.oom_checked = now
        count = _cgroup_counter("memory.events", "oom_kill")
        if count > self.oom_kills:
            self.oom_kills = count
            send_msg(self.port, {"op": "oom", "count": count})
        for slot, member in self.members.items():  # each pod member's own cgroup
            count = _cgroup_counter("memory.events", "oom_kill", member["cgroup"])
            if count > member.get("oom_kills", 0):
                member["oom_kills"] = count
                send_msg(self.port, {"op": "oom", "count": count, "member": slot})

    def _op_resize(self, msg):
        """A new terminal size for a process."""
        proc = self.procs.get(msg.get("proc", 0))
        if proc and proc.get("master") is not None:
            _set_winsize(proc["master"], msg["rows"], msg["cols"])
        return None

    def _op_ps(self, msg):
        """The container's processes in the guest (not the agent), for the host's ps table:
        the trees of its first process and of the exec'd ones (orphans go to the first);
        their environments only when the table shows them."""
        slot = msg.get("member")
        roots = [p["pid"] for p in self.procs.values() if p.get("pid") and p["status"] is None
                 and p.get("member") == slot]
        return {"op": "ps", "processes": guest_processes(roots, env=msg.get("env", True)),
                "mem_total": _mem_total_kb()}

    def _spawn(self, num, proc, exe, pid1, conf):
        """fork/exec a process with pipes (or a pty) for its stdio, in the pid namespace of
        the container whose first process is pid1."""
        p = proc["process"]
        child_fds, outs = self._stdio(proc, "/proc/%d/root" % pid1)
        err_r2, err_w2 = os.pipe2(os.O_CLOEXEC)
        pid = _fork_in_pid_ns(pid1, self.procs[0]["pid"])
        if pid == 0:
            try:
                _exec_child(p, exe, child_fds, err_w2, None, pid1, conf)
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
        self._watch(num, proc, pid, outs)

    def _stdio(self, proc, root):
        """A process's stdio: pipes, or a pty from the container's devpts under root; returns
        the child's three fds and {our fd: 1 or 2} to read its output from."""
        p = proc["process"]
        if p.get("terminal"):
            master, slave = _open_container_pty(root)
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
        return child_fds, outs

    def _watch(self, num, proc, pid, outs):
        """Record a started process and poll its output."""
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
                    if proc["status"] is None:  # (a container killed before start has one)
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
            if num == 0 and not self.conf.get("warmup"):  # what the guest wrote reaches the
                os.sync()  # host first: the VM may go at once (a warm-up's VM stays, see reset)
                self.finished = True
            send_msg(self.port, {"op": "exit", "proc": num, "status": proc["status"]})


def _kill_all():
    """SIGKILL every process but PID 1 (the container's process has ended)."""
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _open_container_pty(root):
    """A pty pair from the container's own devpts (so that `tty` inside names /dev/pts/N);
    root: the container's root seen from the agent (/proc/PID/root)."""
    master = os.open(root + "/dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
    num = struct.unpack("i", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))[0]
    slave = os.open(root + "/dev/pts/%d" % num, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    return master, slave


def _set_winsize(fd, rows, cols):
    """TIOCSWINSZ on a terminal."""
    import termios
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def guest_processes(roots=None, env=True):
    """The processes of the trees under roots (pids), or every process but PID 1 and kernel
    threads, in the container's pid numbers: [{pid, ppid, uid, ruid, gid, comm, args, state,
    tty, cpu (s), start (epoch s), vsz, rss (KiB), nlwp, pgid, sid, nice, env}], by pid (env
    empty unless asked for)."""
    ticks, page_kb, btime, _ = _guest_constants()
    raw = {}
    names = _process_trees(roots) if roots is not None else (
        n for n in os.listdir("/proc") if n.isdigit() and n != "1")
    for name in names:
        try:
            with open("/proc/%s/cmdline" % name, "rb") as f:
                args = f.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
            if not args:  # a kernel thread (or a zombie): not listed, its files not read
                continue
            with open("/proc/%s/stat" % name, "rb") as f:
                head, _, tail = f.read().decode(errors="replace").rpartition(")")
            with open("/proc/%s/status" % name) as f:
                status = _status_fields(f.read(), ("Uid", "Gid", "NSpid"))
            status["env"] = ""
            if env:
                with open("/proc/%s/environ" % name, "rb") as f:
                    status["env"] = f.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        raw[int(name)] = (args, head.partition("(")[2], tail.split(), status)
    nspid = {pid: int(st.get("NSpid", [pid])[-1]) for pid, (_, _, _, st) in raw.items()}
    out = []
    for pid, (args, comm, f, st) in raw.items():
        out.append({"pid": nspid[pid], "ppid": nspid.get(int(f[1]), 0), "uid": int(st["Uid"][1]),
                    "ruid": int(st["Uid"][0]), "gid": int(st["Gid"][1]), "comm": comm,
                    "args": args, "state": f[0], "tty": int(f[4]),
                    "cpu": (int(f[11]) + int(f[12])) / ticks, "start": btime + int(f[19]) / ticks,
                    "vsz": int(f[20]) // 1024, "rss": int(f[21]) * page_kb, "nlwp": int(f[17]),
                    "pgid": nspid.get(int(f[2]), 0), "sid": nspid.get(int(f[3]), 0),
                    "nice": int(f[16]), "env": st["env"]})
    return sorted(out, key=lambda p: p["pid"])


def _status_fields(text, keys):
    """{key: its values} of those keys of a /proc/PID/status text (the rest left unparsed: ps
    runs under TCG, where parsing the 50-odd other lines costs about a millisecond)."""
    out = {}
    for key in keys:
        at = text.find("\n%s:" % key)
        if at >= 0:
            end = text.find("\n", at + 1)
            out[key] = text[at + len(key) + 2:end if end >= 0 else None].split()
    return out


def _process_trees(roots):
    """The pids (as /proc names) of roots and all their descendants: a walk of the children
    lists, rather than a read of every process (the kernel's threads) under TCG."""
    seen, todo = [], [str(r) for r in roots]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        try:
            for task in os.listdir("/proc/%s/task" % pid):
                with open("/proc/%s/task/%s/children" % (pid, task)) as f:
                    todo += f.read().split()
        except OSError:  # gone meanwhile
            continue
    return seen


def _mem_total_kb():
    """The guest's MemTotal in KiB (for %MEM)."""
    return _guest_constants()[3]


_CONSTANTS = []


def _guest_constants():
    """(clock ticks a second, page KiB, boot time, MemTotal KiB), read once: at the first ps,
    after create has set the clock (the boot time moves with it; not read at boot)."""
    if not _CONSTANTS:
        with open("/proc/stat") as f:
            btime = next(int(ln.split()[1]) for ln in f if ln.startswith("btime"))
        with open("/proc/meminfo") as f:
            mem = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal:")))
        _CONSTANTS.append((os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE") // 1024, btime, mem))
    return _CONSTANTS[0]


# ===========================================================================
# Agent: a container's set-up (its rootfs, mounts, devices and root)
# ===========================================================================

DEFAULT_DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
                   ("urandom", 1, 9), ("tty", 5, 0))


DEFAULT_DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                     ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                     ("ptmx", "pts/ptmx"), ("core", "/proc/kcore"))


class _AgentContainers:
    """A container's set-up: its first process (forked at boot, in the template), then at create
    its mounts, devices, paths and root."""

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
        _apply_guest_limits(c.get("resources", {}))  # on the cgroup made at boot
        if c.get("root_pod"):  # a pooled VM's container: every file from the pod export
            _mount_pod_export(c["pod_tag"])
            mount(os.path.join(GUEST_POD, c["root_pod"]), GUEST_ROOT, None, MS_BIND)
        else:
            mount(ROOTFS_TAG, GUEST_ROOT, "9p", 0, NINEP_OPTIONS)
        c["cgroup"] = setup_device_cgroup(c["id"], c.get("device_rules"))
        if c.get("restore"):
            return self._await_restore(c)
        pid, sock = self._create_init(c)
        self.procs[0] = {"pid": pid, "status": None, "process": c["process"], "open": 0,
                         "init": sock, "started": False}
        return {"op": "created"}

    def _fork_init(self):
        """At boot (so in the template): fork the container's first process, PID 1 of a new
        pid namespace as runc's init is, in a mount namespace, cgroup and cgroup namespace of
        its own; it waits for the container's config (see _container_init)."""
        own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        try:  # (after a pooled VM's reset: unshare refuses while the last one is for children)
            _check_libc(_libc().setns(own, CLONE_NEWPID), "setns(pid)")
        finally:
            os.close(own)
        _check_libc(_libc().unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            parent.close()
            try:
                self._container_init(child)
            finally:
                os._exit(127)
        child.close()
        return pid, parent

    def _create_init(self, c, init=None):
        """Hand the container's config to its first process (the one forked at boot, or init:
        a pod member's (pid, socket)) and wait until it has created the container (mounts in
        order, proc of its pid namespace included, hooks); returns its pid and the socket it
        waits for start on."""
        pid, parent = init or (self.init_pid, self.init_sock)
        try:
            send_msg(parent.fileno(), c)
            reply = parent.recv(65536)
            if reply == b"maps":  # in its user namespace: the maps are written from outside
                write_id_mappings(pid, c["id_mappings"])
                parent.sendall(b"ok")
                reply = parent.recv(65536)
            if reply != b"created":
                raise Error(reply.decode(errors="replace") or "the container process died")
        except BaseException:
            parent.close()
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        return pid, parent

    def _container_init(self, sock):
        """In the container's first process: its namespaces and cgroup, then (given the
        config on sock) mounts in order, devices, masked and read-only paths, device
        cgroup, pivot_root, user namespace, createContainer hooks, the check of the
        process; then wait for start (stdio fds on sock) and exec."""
        signal.set_wakeup_fd(-1)  # the agent's wake-up pipe is the agent's
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        try:
            _check_libc(_libc().unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
            mount(None, "/", None, MS_REC | MS_SLAVE)  # until the agent has mounted the rootfs
            _enter_container_cgroup(None)  # before the mounts: a cgroup mount shows its own
            try:  # an agent protocol message, however long after boot the create comes
                c = read_msg(sock.fileno(), FrameReader(), 1e9)
            except Error:  # the VM is going away
                return
            mount(None, "/", None, MS_REC | MS_PRIVATE)
        except (Error, OSError) as e:
            sock.sendall(str(e).encode())
            return
        self._set_up_container(sock, c)

    def _set_up_container(self, sock, c):
        """In the container's first process, its rootfs at GUEST_ROOT in its own mount
        namespace: the mounts, paths, user namespace and hooks; then wait for start and exec."""
        try:
            self._mount_all(c)
            _masked_and_readonly(c)
            _set_oom_score(c["process"].get("oomScoreAdj"))
            join_device_cgroup(c.get("cgroup"))
            if c.get("id_mappings"):  # (unshare(CLONE_NEWUSER) refuses a chrooted caller)
                _switch_root()
            else:
                _pivot_into_container()
            if c.get("id_mappings"):
                _check_libc(_libc().unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare(CLONE_NEWUSER)")
                sock.sendall(b"maps")
                sock.recv(16)
            state = dict(c.get("state") or {}, status="creating", pid=os.getpid())
            run_container_hooks(c.get("hooks", {}), "createContainer", state)
            p = c["process"]
            try:
                os.chdir(p["cwd"])
            except OSError as e:
                raise Error('chdir to cwd ("%s") set in config.json failed: %s'
                            % (p["cwd"], e.strerror.lower())) from None
            exe = resolve_executable(p["args"][0], p["env"], p["cwd"])
            env = _prepare_exec(p)  # what needs no stdio is done before start, as runc does
        except (Error, OSError) as e:
            sock.sendall(str(e).encode())
            return
        sock.sendall(b"created")
        _msg, fds, _flags, _addr = socket.recv_fds(sock, 16, 3)
        if len(fds) != 3:
            return  # the container was deleted or killed before start
        state["status"] = "created"
        _exec_child(p, exe, fds, sock.fileno(), init_conf=c, hook_state=state, env=env)
        os._exit(1)  # as runc's init when it cannot become the process after start

    def _mount_all(self, c):
        """The container's mounts under its root in the order given, with runc's /dev
        (populated, then linux.devices) and /dev/pts when not given."""
        self.dev_ro = 0
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
        make_devices(GUEST_ROOT, c.get("devices", []))
        if self.dev_ro:  # a read-only /dev becomes so once everything is mounted, as in runc
            mount(None, GUEST_ROOT + "/dev", None, MS_REMOUNT | self.dev_ro)
        if c.get("readonly"):
            mount(None, GUEST_ROOT, None, MS_REMOUNT | MS_BIND | MS_RDONLY)

    def _mount_one(self, m):
        """One OCI mount under the container's root."""
        target = resolve_in_root(GUEST_ROOT, m["destination"])
        flags, data = mount_options(m.get("options", []))
        if m["type"] == "bind" and m.get("pod_path"):  # a pod member's, on the pod export
            source = os.path.join(GUEST_POD, m["pod_path"])
        elif m["type"] == "bind":
            share = os.path.join(GUEST_SHARES, m["share"])
            if not os.path.ismount(share):
                os.makedirs(share, exist_ok=True)
                mount(m["share"], share, "9p", 0, NINEP_OPTIONS)
            source = os.path.join(share, m["subpath"]) if m["subpath"] else share
        if m["type"] == "bind":
            _make_mountpoint(target, os.path.isdir(source))
            mount(source, target, None, MS_BIND | (flags & MS_REC))
            if flags & ~(MS_BIND | MS_REC):
                mount(None, target, None, MS_BIND | MS_REMOUNT | (flags & ~MS_REC))
            _set_propagation(target, m.get("options", []))
            return
        fstype = m["type"] or m.get("source")
        _make_mountpoint(target, True)
        dev = m["destination"] == "/dev" and fstype == "tmpfs"
        if dev and flags & MS_RDONLY:
            self.dev_ro, flags = flags, flags & ~MS_RDONLY
        if fstype in ("cgroup", "cgroup2"):  # the guest has cgroup v2 (the container's own)
            fstype, data = "cgroup2", ""
        if fstype == "tmpfs" and "tmpcopyup" in m.get("options", []) and os.listdir(target):
            _mount_tmpfs_copyup(m.get("source") or fstype, target, flags, data)
        else:
            mount(m.get("source") or fstype, target, fstype, flags, data)
        if dev:
            _populate_dev(target)
        _set_propagation(target, m.get("options", []))

    def _check_process(self, process, root=GUEST_ROOT):
        """Resolve the executable and cwd inside the rootfs (in a chrooted child)."""
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                os.chroot(root)
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
        elif opt not in PROPAGATION_OPTIONS and opt not in RUNTIME_MOUNT_OPTIONS:
            data.append(opt)
    return flags, ",".join(data)


def resolve_in_root(root, path, max_links=40):
    """root + path with every symlink in path resolved inside root, never above it (what
    runc's securejoin does for mount destinations)."""
    todo = [p for p in path.split("/") if p not in ("", ".")]
    done, links = [], 0
    while todo:
        name = todo.pop(0)
        if name == "..":
            done = done[:-1]
            continue
        try:
            target = os.readlink(os.path.join(root, *done, name))
        except OSError:  # not a symlink, or not there (yet)
            done.append(name)
            continue
        links += 1
        if links > max_links:
            raise Error("%s: too many levels of symbolic links" % path)
        if target.startswith("/"):
            done = []
        todo = [p for p in target.split("/") if p not in ("", ".")] + todo
    return os.path.join(root, *done) if done else root


def umount(target, flags=MNT_DETACH):
    """umount2(2) through libc."""
    _check_libc(_libc().umount2(target.encode(), flags), "umount %s" % target)


def resolve_executable(args0, env, cwd="/"):
    """The path exec would run for args0 (PATH from env), or an Error saying why not."""
    if "/" in args0:
        mode = _mode_of(os.path.join(cwd, args0))
        if mode is None:
            raise Error('exec: "%s": stat %s: no such file or directory' % (args0, args0))
        if not _root_can_exec(mode):
            raise Error('exec: "%s": permission denied' % args0)
        return args0
    search = next((e[5:] for e in env if e.startswith("PATH=")), DEFAULT_PATH)
    for d in search.split(":"):
        path = os.path.join(d or ".", args0)
        if _root_can_exec(_mode_of(path)):
            return path
    raise Error('exec: "%s": executable file not found in $PATH: no such file or directory'
                % args0)


def _mode_of(path):
    """st_mode of path (symlinks followed), or None when there is nothing there: one stat,
    which over 9p in a TCG guest is worth saving (every lookup is a round trip to QEMU)."""
    try:
        return os.stat(path).st_mode
    except OSError:
        return None


def _root_can_exec(mode):
    """What access(X_OK) says to root: a regular file with an execute bit."""
    import stat
    return mode is not None and stat.S_ISREG(mode) and bool(mode & 0o111)


def _mount_tmpfs_copyup(source, target, flags, data):
    """A tmpfs that starts with what its mount point held (runc's tmpcopyup, e.g. podman's
    --tmpfs): mounted aside, filled, then moved over the mount point."""
    aside = os.path.join(GUEST_RUN, "copyup")
    os.makedirs(aside, exist_ok=True)
    mount(source, aside, "tmpfs", flags, data)
    _copy_tree(target, aside)
    mount(aside, target, None, MS_MOVE)


def _copy_tree(src, dst):
    """Copy src's contents into dst: files, directories and symlinks with modes and owners."""
    import stat
    for entry in os.scandir(src):
        st = entry.stat(follow_symlinks=False)
        to = os.path.join(dst, entry.name)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(entry.path), to)
        elif stat.S_ISDIR(st.st_mode):
            os.mkdir(to)
            _copy_tree(entry.path, to)
        elif stat.S_ISREG(st.st_mode):
            with open(entry.path, "rb") as f, open(to, "wb") as out:
                while True:
                    chunk = f.read(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
        else:
            continue  # device nodes, fifos and sockets are not copied up
        os.chown(to, st.st_uid, st.st_gid, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(to, stat.S_IMODE(st.st_mode))


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


def _pivot_into_container():
    """In the container's mount namespace, make the rootfs its root (pivot_root): the
    agent's /proc, /sys, /dev and 9p shares are detached from it, out of the workload's reach."""
    for path in ("/proc", "/sys", "/dev"):
        umount(path)
    os.chdir(GUEST_RUN)  # pivot_root cannot leave the initramfs: start from the tmpfs above,
    mount(GUEST_RUN, "/", None, MS_MOVE)  # moved onto "/", so that the rootfs ends up there
    os.chroot(".")  # (criu dumps only a task whose root is its mount namespace's "/")
    os.chdir(GUEST_ROOT[len(GUEST_RUN):])
    _check_libc(_libc().syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    umount(".")  # the old root (the tmpfs with the shares), now stacked on "/"
    os.chdir("/")


def _switch_root():
    """Make the rootfs the root of the container's mount namespace, as switch_root does: the
    rootfs moved over the initramfs (which stays beneath, unreachable), the agent's mounts
    detached; the process is then not chrooted, as a new user namespace requires."""
    new_root = "/newroot"
    os.makedirs(new_root, exist_ok=True)
    mount(GUEST_ROOT, new_root, None, MS_MOVE)
    for path in (GUEST_RUN, "/proc", "/sys", "/dev"):
        umount(path)
    os.chdir(new_root)
    mount(".", "/", None, MS_MOVE)
    os.chroot(".")
    os.chdir("/")


def _join_container_root(pid1, userns=False):
    """Enter the user namespace (when it has one), mount namespace and root of the
    container's process (as nsenter -U -m -r)."""
    if userns:
        user = os.open("/proc/%d/ns/user" % pid1, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check_libc(_libc().setns(user, CLONE_NEWUSER), "setns(user)")
        finally:
            os.close(user)
    root = os.open("/proc/%d/root" % pid1, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    ns = os.open("/proc/%d/ns/mnt" % pid1, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check_libc(_libc().setns(ns, CLONE_NEWNS), "setns(mnt)")
        os.fchdir(root)
        os.chroot(".")
    finally:
        os.close(root)
        os.close(ns)


def _masked_and_readonly(conf):
    """readonlyPaths then maskedPaths (runc's order), over the container's mounts (proc
    included); files are masked with the container's own /dev/null."""
    for path in conf.get("readonly_paths", []):
        target = resolve_in_root(GUEST_ROOT, path)
        if os.path.exists(target):
            mount(target, target, None, MS_BIND | MS_REC)
            mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC)
    null = resolve_in_root(GUEST_ROOT, "/dev/null")
    for path in conf.get("masked", []):
        target = resolve_in_root(GUEST_ROOT, path)
        if os.path.isdir(target):
            mount("tmpfs", target, "tmpfs", MS_RDONLY)
        elif os.path.exists(target):
            mount(null if os.path.exists(null) else "/dev/null", target, None, MS_BIND)


# -- process set-up: devices, device cgroup, user namespace, hooks, capabilities, seccomp --


MS_UNBINDABLE = 1 << 17
PROPAGATION_FLAGS = {"private": MS_PRIVATE, "shared": MS_SHARED, "slave": MS_SLAVE,
                     "unbindable": MS_UNBINDABLE}


def _set_propagation(target, options):
    """The propagation options of a mount (shared, rslave, ...), applied after it."""
    for opt in options:
        if opt in PROPAGATION_OPTIONS:
            flag = PROPAGATION_FLAGS[opt[1:] if opt.startswith("r") else opt]
            mount(None, target, None, flag | (MS_REC if opt.startswith("r") else 0))


def make_devices(root, devices):
    """linux.devices: nodes with their type, numbers, mode and owner (an existing one is
    kept, as runc does)."""
    import stat
    kinds = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}
    for d in devices:
        target = resolve_in_root(root, d["path"])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.mknod(target, kinds[d["type"]] | d["fileMode"], os.makedev(d["major"], d["minor"]))
        except FileExistsError:
            continue
        os.chmod(target, d["fileMode"])
        os.chown(target, d["uid"], d["gid"])


DEVICE_CGROUP = GUEST_RUN + "/devices"  # the cgroup v1 devices hierarchy, the agent's only


# runc's rules added after linux.resources.devices (libcontainer/specconv AllowedDevices).
RUNC_ALLOWED_DEVICES = ("c *:* m", "b *:* m", "c 1:3 rwm", "c 1:8 rwm", "c 1:7 rwm", "c 5:0 rwm",
                        "c 1:5 rwm", "c 1:9 rwm", "c 136:* rwm", "c 5:2 rwm", "c 10:200 rwm")


def setup_device_cgroup(cid, rules):
    """linux.resources.devices as a cgroup v1 devices group in the guest (rules in order,
    then runc's default ones); returns its directory, or None without rules."""
    if rules is None:
        return None
    path = os.path.join(DEVICE_CGROUP, "container")
    os.makedirs(path, exist_ok=True)
    for allow, rule in list(rules) + [(True, r) for r in RUNC_ALLOWED_DEVICES]:
        try:
            with open(os.path.join(path, "devices.allow" if allow else "devices.deny"), "w") as f:
                f.write(rule)
        except OSError as e:
            raise Error("linux.resources.devices: %s: %s" % (rule, e.strerror)) from None
    return path


def _boot_device_cgroup():
    """At boot: the cgroup v1 devices hierarchy that linux.resources.devices rules go in."""
    os.makedirs(DEVICE_CGROUP)
    try:
        mount("cgroup", DEVICE_CGROUP, "cgroup", MS_NOSUID | MS_NODEV | MS_NOEXEC, "devices")
    except OSError as e:  # setup_device_cgroup reports it if a container has rules
        print("agent: no devices cgroup: %s" % e)


def join_device_cgroup(path):
    """Move the calling process into the container's device cgroup (if it has one)."""
    if path:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write("0")


def write_id_mappings(pid, maps):
    """linux.uidMappings/gidMappings of a process's new user namespace."""
    for key, name in (("uidMappings", "uid_map"), ("gidMappings", "gid_map")):
        try:
            with open("/proc/%d/%s" % (pid, name), "w") as f:
                f.write(maps[key])
        except OSError as e:
            raise Error("linux.%s: %s" % (key, e.strerror)) from None


# ===========================================================================
# Agent: the process (hooks, capabilities, seccomp, user) and the guest's cgroups
# ===========================================================================

PR_SET_KEEPCAPS, PR_CAPBSET_DROP, PR_CAP_AMBIENT = 8, 24, 47
PR_CAP_AMBIENT_RAISE, PR_CAP_AMBIENT_CLEAR_ALL = 2, 4
SYS_CAPSET, SYS_SECCOMP = 126, 317
LINUX_CAPABILITY_VERSION_3 = 0x20080522
SECCOMP_SET_MODE_FILTER = 1


def _exec_child(p, exe, fds, err_fd, init_conf=None, pid1=None, conf=None, hook_state=None,
                env=None):
    """In the forked child: become the container process and exec it (errors to err_fd; for
    the container's own process, which start no longer waits for, to its stderr as runc's
    init writes them: the caller then exits 1).

    The container's own process (init_conf given) is already in its mount namespace and
    root, and prepared (env: _prepare_exec's) (Agent._container_init); another process joins
    the device cgroup, then the user namespace, mount namespace and root of the container's
    process (pid1: its pid here). conf: the container's configuration (seccomp), for another
    process."""
    import resource  # noqa: F401 (before chroot: the container's root has no Python modules)
    import termios
    try:
        conf = init_conf or conf or {}
        if init_conf is None:
            if p.get("capabilities") is None:  # as runc: the container's, for an exec
                p = dict(p, capabilities=conf.get("process", {}).get("capabilities"))
            oom = p.get("oomScoreAdj")
            _set_oom_score(conf.get("process", {}).get("oomScoreAdj") if oom is None else oom)
            join_device_cgroup(conf.get("cgroup"))
            _enter_container_cgroup(pid1, conf.get("guest_cgroup") or CONTAINER_CGROUP)
        os.setsid()
        if p.get("terminal"):
            fcntl.ioctl(fds[0], termios.TIOCSCTTY, 0)
        for i, fd in enumerate(fds):
            os.dup2(fd, i, inheritable=True)
        if init_conf is None and pid1:
            _join_container_root(pid1, bool(conf.get("id_mappings")))
        os.chdir(p["cwd"])
        if env is None:
            env = _prepare_exec(p)
        finalize_process(p, conf.get("seccomp"))
        if hook_state is not None:
            run_container_hooks(conf.get("hooks", {}), "startContainer", hook_state)
        os.execve(exe, p["args"], dict(e.split("=", 1) for e in env))
    except Exception as e:  # noqa: BLE001 (a bug too: tell rather than exit silently)
        if isinstance(e, OSError):  # in runc's words: its init's after start, its exec's else
            why = e.strerror.lower() if e.strerror else e
            msg = ("exec %s: %s" % (exe, why) if init_conf is not None
                   else 'exec: "%s": %s' % (p["args"][0], why))
        else:
            msg = str(e) if isinstance(e, Error) else 'exec: "%s": %r' % (p["args"][0], e)
        if init_conf is not None:
            _write_failure(fds, msg)
        else:
            os.write(err_fd, msg.encode())


def _write_failure(fds, msg):
    """The container process's last words, on its stderr (fd 2 once its stdio is in place)."""
    for fd in (2, fds[2]):
        try:
            os.write(fd, (msg + "\n").encode())
            return
        except OSError:
            continue


def _prepare_exec(p):
    """The part of becoming the process that needs neither its stdio nor its user: signals
    back to their defaults (exec resets handled ones; ignored ones it keeps), no signal
    blocked, rlimits, the capability bounding set; returns its environment (HOME added)."""
    import resource
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP) and signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for r in p.get("rlimits", []):
        resource.setrlimit(getattr(resource, r["type"]), (r["soft"], r["hard"]))
    env = list(p["env"])
    if not any(e.startswith("HOME=") for e in env):
        env.append("HOME=" + _home_of(p["uid"]))
    caps = p.get("capabilities") or {k: [] for k in CAP_SETS}
    bounding = set(cap_numbers(caps["bounding"]))
    drop = _libc().prctl  # called directly: ~40 calls, each costly through _prctl under TCG
    for cap in range(_last_cap() + 1):
        if cap not in bounding and drop(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            _check_libc(-1, "prctl(PR_CAPBSET_DROP, %d)" % cap)
    return env


def _last_cap(path="/proc/sys/kernel/cap_last_cap"):
    """The kernel's highest capability number (kept once read: the agent reads it at boot)."""
    if not _LAST_CAP:
        try:
            with open(path) as f:
                _LAST_CAP.append(int(f.read()))
        except (OSError, ValueError):
            _LAST_CAP.append(63)
    return _LAST_CAP[0]


_LAST_CAP = []


def run_container_hooks(hooks, name, state):
    """Run createContainer/startContainer hooks (programs of the container) with the state
    on stdin; a failure or a timeout raises."""
    for hook in hooks.get(name, []):
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                for i, fd in enumerate((in_r, out_w, out_w)):
                    os.dup2(fd, i)
                os.execve(hook["path"], hook.get("args") or [hook["path"]],
                          dict(e.split("=", 1) for e in hook.get("env", [])))
            except OSError as e:
                os.write(2, ("exec %s: %s" % (hook["path"], e.strerror)).encode())
            finally:
                os._exit(127)
        os.close(in_r)
        os.close(out_w)
        try:
            os.write(in_w, json_dumps(state, separators=(",", ":")).encode())
        except OSError:
            pass
        os.close(in_w)
        output, status = _wait_hook(pid, out_r, hook.get("timeout"))
        if status is None:
            raise Error("%s hook %s timed out after %ss" % (name, hook["path"], hook["timeout"]))
        if status != 0:
            raise Error("%s hook %s failed: exit status %d: %s" % (
                name, hook["path"], status, output.decode(errors="replace").strip()))


def _wait_hook(pid, out_fd, timeout):
    """(output, exit status) of a hook; status None (and the hook killed) after timeout."""
    deadline = time.monotonic() + timeout if timeout else None
    output = bytearray()
    os.set_blocking(out_fd, False)
    while True:
        try:
            output += os.read(out_fd, 4096)[:4096 - len(output)]
        except BlockingIOError:
            pass
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            os.close(out_fd)
            return bytes(output), exit_status(status)
        if deadline and time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(out_fd)
            return bytes(output), None
        time.sleep(0.005)


def _set_oom_score(value):
    """process.oomScoreAdj of the calling process."""
    if value is not None:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))


def _prctl(option, *args):
    """prctl(2) with up to four unsigned long arguments."""
    import ctypes
    args = [ctypes.c_ulong(a) for a in args] + [ctypes.c_ulong(0)] * (4 - len(args))
    return _check_libc(_libc().prctl(option, *args), "prctl(%d)" % option)


def _cap_mask(names):
    """A 64-bit capability mask from CAP_ names."""
    return sum(1 << n for n in cap_numbers(names))


def _capset(effective, permitted, inheritable):
    """capset(2) of the calling thread (version 3: two 32-bit halves per set)."""
    import ctypes
    header = ctypes.create_string_buffer(struct.pack("Ii", LINUX_CAPABILITY_VERSION_3, 0))
    data = ctypes.create_string_buffer(b"".join(
        struct.pack("III", e >> shift & 0xFFFFFFFF, p >> shift & 0xFFFFFFFF, i >> shift & 0xFFFFFFFF)
        for e, p, i, shift in ((effective, permitted, inheritable, 0),
                               (effective, permitted, inheritable, 32))))
    _check_libc(_libc().syscall(SYS_CAPSET, header, data), "capset")


def _fix_stdio_owner(uid):
    """runc's fixStdioPermissions: stdio (a pty, pipes) owned by the process's user, group
    kept, unless it is /dev/null."""
    try:
        null = os.stat("/dev/null").st_rdev
    except OSError:
        null = None
    for fd in (0, 1, 2):
        st = os.fstat(fd)
        if st.st_uid == uid or (null is not None and st.st_rdev == null):
            continue
        try:
            os.fchown(fd, uid, st.st_gid)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EPERM, errno.EROFS):
                raise


def install_seccomp(seccomp):
    """Install a compiled linux.seccomp filter (compile_seccomp) on the calling process."""
    import ctypes
    prog = bytes.fromhex(seccomp["bpf"])
    code = ctypes.create_string_buffer(prog, len(prog))
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxQ", len(prog) // 8,
                                                    ctypes.addressof(code)))
    _check_libc(_libc().syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER,
                                ctypes.c_ulong(seccomp.get("flags", 0)), fprog), "seccomp")


def finalize_process(p, seccomp=None):
    """User, groups, capabilities, umask, noNewPrivileges and seccomp, in runc's order
    (finalizeNamespace; the bounding set is already dropped, by _prepare_exec): keep caps
    across setuid, the user, capset, ambient; seccomp before the drop without
    noNewPrivileges, last with it."""
    caps = p.get("capabilities") or {k: [] for k in CAP_SETS}
    nnp = p.get("noNewPrivileges")
    if nnp:
        prctl(PR_SET_NO_NEW_PRIVS, 1)
    if seccomp and not nnp:
        install_seccomp(seccomp)
    _prctl(PR_SET_KEEPCAPS, 1)
    _fix_stdio_owner(p["uid"])
    os.setgroups(p.get("additionalGids") or [])
    os.setgid(p["gid"])
    os.setuid(p["uid"])
    _prctl(PR_SET_KEEPCAPS, 0)
    _capset(_cap_mask(caps["effective"]), _cap_mask(caps["permitted"]),
            _cap_mask(caps["inheritable"]))
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    for cap in cap_numbers(caps["ambient"]):
        try:  # not permitted and inheritable: runc ignores the failure, and so do we
            _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)
        except OSError:
            pass
    os.umask(p["umask"] if p.get("umask") is not None else 0o022)
    if seccomp and nnp:
        install_seccomp(seccomp)


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


GUEST_CONTROLLERS = ("cpu", "io", "memory", "pids")  # what the limits use (cpuset slows moves)


def guest_cgroup_limits(resources):
    """{file: value} of the container's cgroup v2 from linux.resources, converted as runc
    converts v1 values (0 leaves a value as it is, -1 is unlimited)."""
    out, mem, cpu = {}, resources.get("memory", {}), resources.get("cpu", {})

    def value(v):
        return "max" if v is not None and v < 0 else v
    if mem.get("limit"):
        out["memory.max"] = value(mem["limit"])
    if mem.get("reservation"):
        out["memory.low"] = max(0, mem["reservation"])
    if mem.get("swap"):
        swap, limit = mem["swap"], mem.get("limit") or 0
        out["memory.swap.max"] = "max" if swap < 0 else max(0, swap - limit) if limit > 0 else swap
    if cpu.get("quota") or cpu.get("period"):
        quota = cpu.get("quota") or -1
        out["cpu.max"] = "%s %d" % (value(quota), cpu.get("period") or 100000)
    if cpu.get("shares"):
        out["cpu.weight"] = cpu_weight(cpu["shares"])
    if resources.get("pids", {}).get("limit"):
        out["pids.max"] = value(resources["pids"]["limit"])
    weight = resources.get("blockIO", {}).get("weight")
    if weight:
        out["io.weight"] = "default %d" % (1 + (max(10, min(weight, 1000)) - 10) * 9999 // 990)
    return out


def _boot_guest_cgroup():
    """At boot: cgroup2 on /sys/fs/cgroup, delegating the controllers the limits use to the
    container's cgroup (made empty; create fills in its limits)."""
    mount("cgroup2", GUEST_CGROUP, "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    with open(GUEST_CGROUP + "/cgroup.controllers") as f:
        controllers = [c for c in f.read().split() if c in GUEST_CONTROLLERS]
    with open(GUEST_CGROUP + "/cgroup.subtree_control", "w") as f:
        f.write(" ".join("+" + c for c in controllers))
    os.mkdir(CONTAINER_CGROUP)


def _apply_guest_limits(resources, cgroup=CONTAINER_CGROUP):
    """Write the container cgroup's limits (a file the guest kernel lacks is skipped)."""
    for name, value in guest_cgroup_limits(resources).items():
        path = os.path.join(cgroup, name)
        if not os.path.exists(path):
            print("agent: %s: not in this kernel, not applied" % name)
            continue
        try:
            with open(path, "w") as f:
                f.write(str(value))
        except OSError as e:
            raise Error("linux.resources: cannot set %s to %s: %s"
                        % (name, value, e.strerror)) from None


def _cgroup_counter(name, key, cgroup=CONTAINER_CGROUP):
    """One counter of a flat-keyed file of the container's cgroup (0 when absent)."""
    try:
        with open(os.path.join(cgroup, name)) as f:
            for line in f:
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
    except (OSError, ValueError):
        pass
    return 0


def guest_cgroup_stats(cgroup=CONTAINER_CGROUP):
    """The container cgroup's raw figures: {file: text} of the files `events` reads."""
    out = {}
    for name in ("memory.current", "memory.max", "memory.peak", "memory.stat", "memory.events",
                 "memory.swap.current", "memory.swap.max", "cpu.stat", "cpu.max",
                 "pids.current", "pids.max"):
        try:
            with open(os.path.join(cgroup, name)) as f:
                out[name] = f.read()
        except OSError:
            pass
    return out


def _enter_container_cgroup(pid1, cgroup=CONTAINER_CGROUP):
    """Join the container's cgroup, and its cgroup namespace (pid1's, or a new one)."""
    if not os.path.isdir(cgroup):
        return
    with open(cgroup + "/cgroup.procs", "w") as f:
        f.write("0")
    if not pid1:
        _check_libc(_libc().unshare(CLONE_NEWCGROUP), "unshare(CLONE_NEWCGROUP)")
        return
    ns = os.open("/proc/%d/ns/cgroup" % pid1, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check_libc(_libc().setns(ns, CLONE_NEWCGROUP), "setns(cgroup)")
    finally:
        os.close(ns)


# ===========================================================================
# Checkpoint and restore: CRIU in the guest on the container's process tree
# ===========================================================================
# QEMU 7.2 refuses to migrate or snapshot a VM while a 9p export is mounted, so a container is
# checkpointed as runc does it on a host: CRIU dumps the container's process tree, here from
# inside the VM (the guest runs the host's own kernel, which the host's criu was built for;
# the guest image carries criu, its libraries, the tar, gzip and sh it runs to dump a tmpfs,
# and the modules it needs: socket diag, nf_tables). The image directory reaches the running VM
# as a pod member's files do: cloned on the host and moved onto a slot of the pod export.

CRIU_TOOLS = ("criu", "tar", "gzip", "sh")  # criu dumps a tmpfs with `tar --gzip` (sh -c gzip)
# (libcrc32c, which nf_tables needs, asks the crypto API for crc32c: no module loader in the guest)
CRIU_MODULES = ("unix_diag", "inet_diag", "tcp_diag", "udp_diag", "netlink_diag", "crc32c_generic",
                "nf_tables")
GUEST_CRIU_MODULES = "/cc/criu-modules"  # loaded by the agent at the first checkpoint or restore
OPTIONAL_CHECKS = ("checkpoint", "VM pool")  # check's items a host can do without
TOOL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class _AgentCheckpoint:
    """checkpoint and restore in the agent: criu dumps the container's process tree into the
    image directory on the pod export, or restores it into a new VM's container."""

    def _op_criu_check(self, _msg):
        """criu check in the guest: whether this kernel and image can checkpoint."""
        status, out = guest_criu(["check"])
        return {"op": "criu_check", "status": status, "output": out}

    def _op_checkpoint(self, msg):
        """Dump the container's process tree with criu into the image directory the host put
        on the pod export, with runc's descriptors.json (its stdio); without leave_running
        (or pre_dump) criu kills the processes and the container ends."""
        proc = self.procs.get(0)
        if proc is None or proc["status"] is not None or not proc["started"]:
            raise Error("container not running")
        images = guest_export_path(msg["pod_tag"], msg["images"])
        work = guest_export_path(msg["pod_tag"], msg["work"])
        stdio = []
        for fd in (0, 1, 2):
            try:
                stdio.append(os.readlink("/proc/%d/fd/%d" % (proc["pid"], fd)))
            except OSError:
                stdio.append("/dev/null")
        with open(os.path.join(images, "descriptors.json"), "w") as f:
            f.write(json_dumps(stdio))
        tty = None
        if stdio[0].startswith("/dev/pts/"):  # its terminal: the slave of a pty of ours
            st = os.stat("/proc/%d/fd/0" % proc["pid"])
            tty = "tty[%x:%x]" % (st.st_rdev, st.st_dev)
        with open(os.path.join(images, CHECKPOINT_NOTE), "w") as f:
            f.write(json_dumps({"tty": tty}))
        status, out = guest_criu(criu_dump_args(self.conf, proc["pid"], images, work,
                                                dict(msg, tty=tty)))
        if status != 0:
            raise Error("criu failed: %s" % (criu_log_errors(os.path.join(work, "dump.log"))
                                             or out.strip() or "exit status %d" % status))
        return {"op": "checkpointed"}

    def _await_restore(self, c):
        """(create of a container to restore) The first process forked at boot is not wanted:
        criu makes the container's namespaces and processes (_op_restore)."""
        os.kill(self.init_pid, signal.SIGKILL)
        os.waitpid(self.init_pid, 0)
        self.init_sock.close()
        self.procs[0] = {"pid": None, "status": None, "process": c["process"], "open": 0,
                         "started": False, "restoring": True}
        return {"op": "created"}

    def _op_restore(self, msg):
        """criu restore of the container from the image directory on the pod export: its
        mount namespace on the rootfs, the bind mounts from this VM's shares, its stdio new
        pipes of ours (descriptors.json names the old ones), in the container's cgroups."""
        proc = self.procs.get(0)
        if proc is None or not proc.get("restoring"):
            raise Error("restore: the container is not waiting for a restore")
        images = guest_export_path(msg["pod_tag"], msg["images"])
        work = guest_export_path(msg["pod_tag"], msg["work"])
        with open(os.path.join(images, "descriptors.json")) as f:
            stdio = json_loads(f.read())
        binds = {m["destination"]: self._bind_source(m) for m in self.conf["mounts"]
                 if m["type"] == "bind"}
        restore_mountpoints(self.conf["mounts"], binds)
        tty = _read_note(images).get("tty")
        if tty:
            child_fds, outs = self._restore_tty(proc)
            inherit = [(tty, child_fds[0])]
        else:
            child_fds, outs = self._stdio(proc, GUEST_ROOT)
            inherit = list(zip(stdio, child_fds))
        pidfile = os.path.join(GUEST_RUN, "restored.pid")
        args = criu_restore_args(images, work, pidfile, binds, inherit, msg)
        cgroups = [CONTAINER_CGROUP] + ([self.conf["cgroup"]] if self.conf.get("cgroup") else [])
        try:
            status, out = guest_criu(args, fds=child_fds, cgroups=cgroups, own_root=True)
        finally:
            for fd in set(child_fds):
                os.close(fd)
        if status != 0:
            for fd in set(outs) | {proc["stdin"]}:
                os.close(fd)
            raise Error("criu failed: %s" % (criu_log_errors(os.path.join(work, "restore.log"))
                                             or out.strip() or "exit status %d" % status))
        with open(pidfile) as f:
            pid = int(f.read().strip())
        ns = os.open("/proc/%d/ns/pid" % pid, os.O_RDONLY | os.O_CLOEXEC)
        try:  # the agent's children (exec) go into the restored container's pid namespace
            _check_libc(_libc().setns(ns, CLONE_NEWPID), "setns(pid)")
        finally:
            os.close(ns)
        proc.update(started=True, restoring=False)
        self._watch(0, proc, pid, outs)
        return {"op": "restored", "pid": pid}

    @staticmethod
    def _restore_tty(proc):
        """A new pty for a restored container's terminal, from the agent's devpts (the
        container's own comes back with criu): the master is ours, as at start."""
        _criu_ready()
        master, slave = os.openpty()
        size = proc["process"].get("consoleSize") or {}
        if size.get("height") and size.get("width"):
            _set_winsize(master, size["height"], size["width"])
        proc["stdin"] = proc["master"] = master
        return (slave, slave, slave), {master: 1}

    def _bind_source(self, m):
        """Where a bind mount's source is in the guest: its 9p share, mounted here."""
        share = os.path.join(GUEST_SHARES, m["share"])
        if not os.path.ismount(share):
            os.makedirs(share, exist_ok=True)
            mount(m["share"], share, "9p", 0, NINEP_OPTIONS)
        return os.path.join(share, m["subpath"]) if m["subpath"] else share


def find_tool(name):
    """A host program's path in TOOL_PATH, or None."""
    for d in TOOL_PATH.split(":"):
        path = os.path.join(d, name)
        if _root_can_exec(_mode_of(path)):
            return path
    return None


def criu_files(modules_dir):
    """What the guest image carries for checkpoint and restore, {"tools", "libraries",
    "modules"}, or None when the host has no criu; cached by the tools' size and mtime."""
    tools = [find_tool(name) for name in CRIU_TOOLS]
    if None in tools:
        return None
    key = sha256(("%s|%s" % (modules_dir, ",".join(CRIU_MODULES))).encode())
    for path in tools:
        st = os.stat(path)
        key.update(("|%s|%d|%d" % (path, st.st_size, st.st_mtime_ns)).encode())
    return _json_cached("criu", key, lambda: {
        "tools": tools, "libraries": sorted({lib for p in tools for lib in _elf_libraries(p)}),
        "modules": guest_modules(modules_dir, CRIU_MODULES)})


def _elf_libraries(path):
    """The shared libraries an executable loads, as its dynamic loader lists them (ldd)."""
    loader = elf_interpreter(path)
    if not loader:
        return []
    out = _run_tool([loader, "--list", path])[1]
    libs = []
    for line in out.splitlines():
        target = line.partition("=>")[2] if "=>" in line else line
        target = target.strip().partition(" (")[0]
        if target.startswith("/") and os.path.isfile(target):
            libs.append(target)
    return libs


def _add_criu(w, criu):
    """Put criu's files in the guest image, at their host paths (modules in their own dir)."""
    for path in criu["tools"] + criu["libraries"]:
        _add_host_path(w, path)
        _add_library_links(w, path)
    for i, path in enumerate(criu["modules"]):
        w.add_file("%s/%02d-%s.ko" % (GUEST_CRIU_MODULES.strip("/"), i, _module_name(path)),
                   _module_bytes(path))


def _run_tool(argv, cwd=None, env=None, fds=(), setup=None):
    """(exit status, stdout and stderr) of a program, without subprocess (the guest image has
    not got it); fds are passed at their own numbers; setup() runs in the child first. The
    output goes to a memfd: nothing the program leaves can hold it open."""
    out = os.memfd_create("tool-output", os.MFD_CLOEXEC)
    try:
        pid = os.fork()
        if pid == 0:
            try:
                for target, fd in enumerate((os.open(os.devnull, os.O_RDONLY), out, out)):
                    os.dup2(fd, target)
                for fd in fds:
                    os.set_inheritable(fd, True)
                if setup:
                    setup()
                if cwd:
                    os.chdir(cwd)
                os.execve(argv[0], argv, env if env is not None else os.environ)
            except (Error, OSError) as e:
                os.write(2, ("%s: %s\n" % (argv[0], getattr(e, "strerror", None) or e)).encode())
            finally:
                os._exit(127)
        _pid, status = os.waitpid(pid, 0)
        os.lseek(out, 0, os.SEEK_SET)
        chunks = []
        while True:
            data = os.read(out, CHUNK)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(out)
    return exit_status(status), b"".join(chunks).decode(errors="replace")


def criu_version():
    """The host's criu version ("3.17.1"), or an Error naming what is missing."""
    criu = find_tool("criu")
    if criu is None:
        raise Error("no criu on the host (apt-get install criu): checkpoint and restore fail")
    missing = [name for name in CRIU_TOOLS if find_tool(name) is None]
    if missing:
        raise Error("criu needs %s on the host" % ", ".join(missing))
    out = _run_tool([criu, "--version"])[1]
    return out.split("Version:")[-1].split()[0] if "Version:" in out else out.strip()


# -- in the guest: criu run by the agent -------------------------------------

def _criu_ready():
    """Once: load the modules criu needs (EEXIST is fine) and give the agent a devpts (criu
    opens /dev/ptmx, which needs a /dev/pts beside it)."""
    if getattr(_criu_ready, "done", False):
        return
    import ctypes
    for name in sorted(os.listdir(GUEST_CRIU_MODULES)):
        fd = os.open(os.path.join(GUEST_CRIU_MODULES, name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc().syscall(313, fd, b"", 0) != 0 and ctypes.get_errno() != errno.EEXIST:
                raise Error("checkpoint: cannot load %s: %s"
                            % (name, os.strerror(ctypes.get_errno())))
        finally:
            os.close(fd)
    if not os.path.ismount("/dev/pts"):
        os.makedirs("/dev/pts", exist_ok=True)
        mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666")
    _criu_ready.done = True


def guest_criu(args, cwd=None, fds=(), cgroups=(), own_root=False):
    """(status, output) of criu in the guest, forked into the VM's own pid namespace (the
    agent's children are the container's) with the tools' PATH, in cgroups (what it
    restores stays there); own_root: in a mount namespace whose root can be pivoted away
    from (criu restore's --root)."""
    criu = find_tool("criu")
    if criu is None or not os.path.isdir(GUEST_CRIU_MODULES):
        raise Error("checkpoint: the guest image has no criu (install criu on the host)")
    _criu_ready()
    back = os.open("/proc/self/ns/pid_for_children", os.O_RDONLY | os.O_CLOEXEC)
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check_libc(_libc().setns(own, CLONE_NEWPID), "setns(pid)")
        try:
            return _run_tool([criu] + args, cwd, {"PATH": TOOL_PATH, "HOME": "/"}, fds,
                             lambda: _criu_setup(cgroups, own_root))
        finally:
            _libc().setns(back, CLONE_NEWPID)
    finally:
        os.close(back)
        os.close(own)


def guest_export_path(tag, path):
    """A path on the pod export in the guest (which is mounted on first use)."""
    if not os.path.ismount(GUEST_POD):
        os.makedirs(GUEST_POD, exist_ok=True)
        mount(tag, GUEST_POD, "9p", 0, NINEP_OPTIONS)
    return os.path.join(GUEST_POD, path)


def criu_dump_args(conf, pid, images, work, opts):
    """criu's arguments to dump (or pre-dump) the container whose first process is pid:
    runc's, with the bind mounts external (the restore maps them to the new VM's shares), the
    cgroups left to the agent, the container's cgroup frozen during the dump."""
    args = ["pre-dump" if opts.get("pre_dump") else "dump", "--tree", str(pid),
            "--images-dir", images, "--work-dir", work, "--log-file", "dump.log", "-v4",
            "--manage-cgroups=ignore", "--freeze-cgroup", CONTAINER_CGROUP]
    for m in conf["mounts"]:
        if m["type"] == "bind":
            args += ["--external", "mnt[%s]:%s" % (m["destination"], m["destination"])]
    if opts.get("tty"):  # the terminal's master is the agent's: criu restores the slave given
        args += ["--external", opts["tty"]]
    if opts.get("pre_dump") or opts.get("parent"):
        args.append("--track-mem")
    if opts.get("parent"):
        args += ["--prev-images-dir", opts["parent"]]
    return args + _criu_flags(opts)


def _criu_flags(opts):
    """criu's flags for runc's boolean options."""
    flags = {"leave_running": "--leave-running", "tcp_established": "--tcp-established",
             "ext_unix_sk": "--ext-unix-sk", "shell_job": "--shell-job",
             "file_locks": "--file-locks"}
    out = [flag for key, flag in flags.items() if opts.get(key)]
    if opts.get("tcp_established"):  # the guest has nftables, not the iptables binary
        out += ["--network-lock", "nftables"]
    return out


def restore_mountpoints(mounts, binds):
    """The mount points criu restore mounts on that the rootfs lacks (a new rootfs: another
    container's, podman's restore --import), as runc makes them; not those inside a mount
    that is not a bind (a tmpfs comes back with its contents)."""
    covered = []
    for m in mounts:
        dest = m["destination"]
        if any(dest == c or dest.startswith(c.rstrip("/") + "/") for c in covered):
            continue
        source = binds.get(dest)
        _make_mountpoint(resolve_in_root(GUEST_ROOT, dest), source is None or os.path.isdir(source))
        if m["type"] != "bind":
            covered.append(dest)


def _criu_setup(cgroups, own_root):
    """(In criu's process, before exec.) Join cgroups: the first, then a cgroup namespace of
    our own rooted there (what criu restores has it, as the container's first process had:
    see _container_init), then the others; with own_root, a mount namespace whose root is a
    bind of the initramfs onto itself: pivot_root refuses to move the initramfs itself (it
    has no parent mount), and criu restore pivots into the container's rootfs."""
    for i, cgroup in enumerate(cgroups):
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write("0")
        if i == 0:
            _check_libc(_libc().unshare(CLONE_NEWCGROUP), "unshare(CLONE_NEWCGROUP)")
    if own_root:
        _check_libc(_libc().unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        mount("/", "/mnt", None, MS_BIND | MS_REC)
        os.chdir("/mnt")
        mount("/mnt", "/", None, MS_MOVE)
        os.chroot(".")
        os.chdir("/")


def criu_restore_args(images, work, pidfile, binds, stdio, opts):
    """criu's arguments to restore a container (the root task a child of the agent, detached):
    the rootfs at GUEST_ROOT, each bind mount's destination mapped to its source in this VM
    (binds), each dumped stdio pipe to the new one criu inherits (stdio: [(name in
    descriptors.json, fd)])."""
    args = ["restore", "--images-dir", images, "--work-dir", work, "--log-file", "restore.log",
            "-v4", "--root", GUEST_ROOT, "--restore-detached", "--restore-sibling",
            "--manage-cgroups=ignore", "--pidfile", pidfile]
    for dest, source in sorted(binds.items()):
        args += ["--external", "mnt[%s]:%s" % (dest, source)]
    for name, fd in stdio:
        if name.startswith(("pipe:", "tty[")):
            args += ["--inherit-fd", "fd[%d]:%s" % (fd, name)]
    return args + _criu_flags(dict(opts, leave_running=False))


CHECKPOINT_NOTE = "cc-oci-runtime.json"  # in the image: what restore needs besides criu's files


def _read_note(images):
    """The runtime's note in an image directory ({} for an image without one)."""
    try:
        with open(os.path.join(images, CHECKPOINT_NOTE)) as f:
            return json_loads(f.read())
    except (OSError, ValueError):
        return {}


def criu_log_errors(path, lines=4):
    """The last error lines of a criu log (what says why it failed), or ''."""
    try:
        with open(path, errors="replace") as f:
            errors = [ln.strip() for ln in f if "Error" in ln]
    except OSError:
        return ""
    return "; ".join(errors[-lines:])


# -- on the host: the checkpoint and restore commands ------------------------

CHECKPOINT_STAGE = "checkpoint-stage"  # in the state dir: where the export is assembled
CRIU_TIMEOUT = 600  # seconds a dump or restore may take (TCG on a busy host is slow)


def _image_dirs(args):
    """(image directory, work directory) of a checkpoint or restore, absolute: runc's
    defaults (./checkpoint; the work directory is the image directory)."""
    images = os.path.abspath(args.image_path or "checkpoint")
    return images, os.path.abspath(args.work_path) if args.work_path else images


def export_images(state, dirs):
    """Give a running VM host directories [(name, path)]: cloned onto a free slot of its pod
    export (as a member's files are); returns the slot (the VM sees <slot>/<name>)."""
    if not (state.data.get("pod") or {}).get("tag"):
        raise Error("checkpoint: the VM has no 9p slot left for the image directory (the "
                    "container has %d bind-mount sources)" % SHARE_SLOTS)
    slot = claim_pod_slot(state.dir, "checkpoint", bool(state.data["vm"].get("pool_dir")))
    stage = os.path.join(state.dir, CHECKPOINT_STAGE)
    try:
        os.makedirs(stage, exist_ok=True)
        export_member(state, stage, slot, [(name, path, True, False, False)
                                           for name, path in dirs])
    except BaseException:
        release_pod_slot(state.dir, slot)
        raise
    finally:
        _ignore_oserror(os.rmdir, stage)
    return slot


def unexport_images(state, slot):
    """Take the directories export_images gave a VM away again."""
    unexport_member(state.data, state.dir, slot)
    release_pod_slot(state.dir, slot)


def image_exports(images, work, parent=None):
    """What to export for a dump or restore, [(name, host dir)], and the names of the image and
    work directories in it. A parent image (--parent-path, relative to the image directory,
    as criu's --prev-images-dir) must be a sibling (../NAME): it is exported beside the image
    directory under the same names, so that criu's "parent" link reads on the host as well."""
    if not parent:
        dirs = [("images", images)] + ([("work", work)] if work != images else [])
        return dirs, {"images": "images", "work": "work" if work != images else "images"}
    full = os.path.normpath(os.path.join(images, parent))
    names = {"images": os.path.basename(images), "parent": os.path.basename(full)}
    if os.path.dirname(full) != os.path.dirname(images) or names["parent"] == names["images"] \
            or os.path.isabs(parent):
        raise Error("checkpoint: --parent-path must name a sibling of the image directory "
                    "(../NAME), not %s" % parent)
    if not os.path.isdir(full):
        raise Error("checkpoint: --parent-path %s: no such directory" % full)
    dirs = [(names["images"], images), (names["parent"], full)]
    names["work"] = names["images"]
    if work != images:
        names["work"] = next(n for n in ("work", "work-dir", "criu-work") if n not in names.values())
        dirs.append((names["work"], work))
    return dirs, names


def _restore_parent(images):
    """The parent image a pre-dumped image names (criu's "parent" link), or None."""
    try:
        return os.readlink(os.path.join(images, "parent"))
    except OSError:
        return None


def checkpoint_options(args):
    """The agent's checkpoint/restore options from runc's flags."""
    return {key: bool(getattr(args, key, False)) for key in
            ("leave_running", "tcp_established", "ext_unix_sk", "shell_job", "file_locks",
             "pre_dump")}


def _checkpointable(state):
    """Raise runc's error (or ours) when the container cannot be checkpointed now."""
    status = state.status()
    if status in ("created", "stopped", "creating"):
        raise Error("Container cannot be checkpointed in %s state" % status)
    if state.data.get("sandbox") or has_members(state.dir):
        raise Error("checkpoint: a container in a pod's VM cannot be checkpointed")
    if state.data.get("paused") == PAUSED_FROZEN:
        raise Error("checkpoint: a container frozen in a pod cannot be checkpointed")


def cmd_checkpoint(args):
    """checkpoint: CRIU in the VM dumps the container's processes into --image-path; the
    container then goes (its VM with it), unless --leave-running or --pre-dump."""
    state = _open_state(args, lock=True)
    _checkpointable(state)
    images, work = _image_dirs(args)
    for path in {images, work}:
        os.makedirs(path, 0o700, exist_ok=True)
    began = time.monotonic()
    paused = state.data.get("paused") == PAUSED_VM
    if paused:  # the agent must run; criu freezes the container's cgroup first thing
        qmp(state, "cont")
    slot, dumped = None, False
    try:
        dirs, names = image_exports(images, work, args.parent_path)
        slot = export_images(state, dirs)
        msg = dict(checkpoint_options(args), op="checkpoint", pod_tag=state.data["pod"]["tag"],
                   images="%d/%s" % (slot, names["images"]), work="%d/%s" % (slot, names["work"]),
                   parent=args.parent_path)
        try:
            monitor_request(state, msg, timeout=CRIU_TIMEOUT)
        except Error as e:
            raise Error("%s (log file: %s)" % (e, os.path.join(work, "dump.log"))) from None
        dumped = True
    finally:
        if slot is not None:
            unexport_images(state, slot)
        still_there = not dumped or args.leave_running or args.pre_dump
        if paused and still_there and state.status() != "stopped":
            qmp(state, "stop")
    LOG.info("checkpointed %s into %s in %.1f s", state.id, images, time.monotonic() - began)
    if not (args.leave_running or args.pre_dump):
        _wait_gone(state, time.monotonic() + 10)  # the last output reaches the engine first
        delete_container(state, force=True)  # as runc destroys a checkpointed container


def _wait_gone(state, deadline):
    """Wait until the container's monitor has exited (or deadline, time.monotonic())."""
    target = (state.data.get("pid"), state.data.get("pid_start"))
    while process_alive(*target) and time.monotonic() < deadline:
        _wait_exit(target, deadline)


def _restorable(args, images):
    """Raise runc's error when there is nothing to restore or the id is taken."""
    if not os.path.isfile(os.path.join(images, "descriptors.json")):
        raise Error("open %s: no such file or directory" % os.path.join(images, "descriptors.json"))
    if State(args.root, args.id).exists():
        raise Error("container with given ID already exists")


def cmd_restore(args):
    """restore: a new VM as create makes one (the bundle's rootfs and mounts), then CRIU in
    it restores the processes from --image-path; running when restore returns (with -d;
    without, restore waits for the container as run does)."""
    images, work = _image_dirs(args)
    _restorable(args, images)
    args.bundle = args.bundle or "."
    _restorable_spec(load_spec(args.bundle))
    os.makedirs(work, 0o700, exist_ok=True)  # (as runc: criu writes restore.log there)
    foreground = not args.detach
    if foreground:  # as run: adopt the monitor to wait for it
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    began = time.monotonic()
    state, monitor_pid = create_container(args, args.console_socket, foreground=foreground,
                                          restoring=True)
    try:
        _restore_into(state, args, images, work)
    except BaseException:
        delete_container(state, force=True)
        if getattr(args, "pid_file", None):  # create wrote it: it names a monitor now gone
            _ignore_oserror(os.unlink, os.path.abspath(args.pid_file))
        raise
    LOG.info("restored %s from %s in %.1f s", state.id, images, time.monotonic() - began)
    if args.detach:
        return 0
    state.unlock()
    return _wait_foreground(state, monitor_pid)


def _restorable_spec(conf):
    """Raise when the bundle's container is one restore cannot make."""
    if conf.get("id_mappings"):  # (runc's own userns test chmods the images to get by)
        raise Error("restore: a container with a user namespace cannot be restored (criu, in "
                    "it, cannot read the root-owned image directory)")


def _restore_into(state, args, images, work):
    """Give the created VM the image directory and have its agent run criu restore."""
    dirs, names = image_exports(images, work, _restore_parent(images))
    slot = export_images(state, dirs)
    try:
        msg = dict(checkpoint_options(args), op="restore", pod_tag=state.data["pod"]["tag"],
                   images="%d/%s" % (slot, names["images"]), work="%d/%s" % (slot, names["work"]))
        try:
            monitor_request(state, msg, timeout=CRIU_TIMEOUT)
        except Error as e:
            raise Error("%s (log file: %s)" % (e, os.path.join(work, "restore.log"))) from None
    finally:
        unexport_images(state, slot)
    state.data["started"] = True
    state.save()


# ===========================================================================
# Agent: the guest's network
# ===========================================================================

class _AgentNetwork:
    """The guest's network on the host's plan, and docker's resolver relayed."""

    def _op_network(self, msg):
        """Give the guest's NICs the host interfaces' MAC, MTU, name, addresses and routes (at
        create, and whenever the host's namespace changed)."""
        guest_network(msg["plan"], self.net)
        if msg["plan"].get("dns_relay") and self.dns is None:
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
    """Bring the guest's NICs in line with the host's plan (the whole of it, each time): a NIC the
    plan no longer has goes down and back to the parking namespace (its addresses and routes
    with it); one it adds comes home with the MAC, MTU and name of the host interface it carries
    (in one request); then the addresses and routes follow the plan. At the first plan an unused
    first NIC is parked too."""
    homed = net.setdefault("homed", {})  # {slot: {index, name, mac, mtu, addresses}} at home
    applied = net.setdefault("routes", [])  # the plan's routes the guest has
    want = {iface["slot"]: iface for iface in plan["interfaces"]}
    keys = {_route_key(r) for r in plan["routes"]}
    first, net["first"] = net["first"], None
    with Netlink() as nl:
        for route in [r for r in applied if _route_key(r) not in keys]:
            applied.remove(route)
            if route["slot"] in homed:
                _guest_net_undo(nl.del_route, (route, homed[route["slot"]]["index"]))
        for slot in [slot for slot in homed if slot not in want]:
            _guest_park(nl, net, slot)
        for slot, iface in want.items():
            if slot not in homed:
                first = _guest_home(nl, net, iface, first)
            _guest_set_link(nl, homed[slot], iface)
        if first is not None:  # unused: out of the container's sight
            nl.move_link(first["index"], net["park_fd"])
            net["slots"][first["mac"]] = first
        removed = [_guest_addresses(nl, homed[slot], iface) for slot, iface in want.items()]
        if any(removed):  # removing an address takes routes (and secondaries) with it
            _guest_forget_gone(nl, net)
            for slot, iface in want.items():
                _guest_addresses(nl, homed[slot], iface)
        done = {_route_key(r) for r in applied}
        for route in plan["routes"]:
            if _route_key(route) not in done and route["slot"] in homed:
                _guest_net_step(nl.add_route, (route, homed[route["slot"]]["index"]),
                                "route %s/%d via %s dev %s" % (route["dst"] or "default",
                                route["dst_len"], route["gateway"] or "-", route["dev"]))
                applied.append(route)


def _route_key(route):
    """What makes a route of the plan the same route: its slot and what the guest is given."""
    return tuple(route.get(k) for k in ("slot", "family", "dst", "dst_len", "gateway", "prefsrc",
                                        "priority", "scope"))


def _guest_home(nl, net, iface, first):
    """Bring the NIC of iface's slot home (the first NIC is home already) with the interface's
    MAC, MTU and name, up; returns the first NIC unless it was the one."""
    mac, taken = slot_mac(iface["slot"]), net.setdefault("home_names", {"lo"})
    if first is not None and first["mac"] == mac:
        link, first, sock, away = first, None, nl, None
    else:
        link, sock, away = net["slots"].pop(mac, None), net["park"], net["home"]
    if link is None:
        raise Error("network: the VM has no NIC number %d for %s" % (iface["slot"], iface["name"]))
    busy = taken | ({first["name"]} if first is not None else set())
    name = iface["name"] if iface["name"] not in busy and iface["name"] != link["name"] else None
    try:
        sock.set_link(link["index"], up=True, mtu=iface["mtu"], mac=iface["mac"], name=name,
                      netns=away)
    except OSError as e:
        if away is not None:
            net["slots"][mac] = link
        raise Error("network: %s: cannot set MAC %s and MTU %d in the VM: %s"
                    % (iface["name"], iface["mac"], iface["mtu"], e.strerror)) from None
    taken.add(name or link["name"])  # a name another NIC has: keep the kernel's
    # a NIC keeps its index coming home (it was free)
    net["homed"][iface["slot"]] = {"index": link["index"], "name": name or link["name"],
                                   "mac": iface["mac"], "mtu": iface["mtu"], "addresses": []}
    return first


def _guest_set_link(nl, link, iface):
    """A NIC at home follows its host interface's MAC and MTU when they changed."""
    if (link["mac"], link["mtu"]) != (iface["mac"], iface["mtu"]):
        try:
            nl.set_link(link["index"], mtu=iface["mtu"], mac=iface["mac"])
        except OSError as e:
            raise Error("network: %s: cannot set MAC %s and MTU %d in the VM: %s"
                        % (iface["name"], iface["mac"], iface["mtu"], e.strerror)) from None
        link.update(mac=iface["mac"], mtu=iface["mtu"])


def _guest_addresses(nl, link, iface):
    """A NIC at home gets the addresses the plan gives its interface and loses the others; True
    when it lost one."""
    gone = [a for a in link["addresses"] if a not in iface["addresses"]]
    for addr in gone:
        link["addresses"].remove(addr)
        _guest_net_undo(nl.del_address, (link["index"], addr))
    for addr in iface["addresses"]:
        if addr not in link["addresses"]:
            _guest_net_step(nl.add_address, (link["index"], addr), "address %s/%d on %s"
                            % (addr["address"], addr["prefix"], iface["name"]))
            link["addresses"].append(addr)
    return bool(gone)


def _guest_forget_gone(nl, net):
    """Forget the addresses and routes the kernel removed by itself (an address's removal takes
    its secondaries and the routes through its subnet along), so that they are added again."""
    index_of = {slot: link["index"] for slot, link in net["homed"].items()}
    addrs = {(a["index"], a["family"], a["address"], a["prefix"]) for a in nl.addresses()}
    for slot, link in net["homed"].items():
        link["addresses"] = [a for a in link["addresses"]
                             if (link["index"], a["family"], a["address"], a["prefix"]) in addrs]
    routes = {(r["oif"], r["family"], r["dst"] if r["dst_len"] else None, r["dst_len"], r["gateway"])
              for r in nl.routes()}
    net["routes"][:] = [r for r in net["routes"] if (index_of.get(r["slot"]), r["family"],
                        r["dst"] if r["dst_len"] else None, r["dst_len"], r["gateway"]) in routes]


def _guest_park(nl, net, slot):
    """A NIC whose interface the host took away: down, its slot's MAC back, and into the
    parking namespace (its addresses and routes go with the move) under a name of its own."""
    link = net["homed"].pop(slot)
    net.setdefault("home_names", {"lo"}).discard(link["name"])
    name = "park%d" % slot  # the parking namespace may hold the kernel's eth names
    nl.set_link(link["index"], up=False, mac=slot_mac(slot), name=name, netns=net["park_fd"])
    net["slots"][slot_mac(slot)] = {"index": link["index"], "name": name, "mac": slot_mac(slot)}


def _guest_net_undo(fn, args):
    """Remove a route or an address from the guest; one gone already (with its address or NIC)
    is fine."""
    try:
        fn(*args)
    except OSError:
        pass


def _guest_net_step(fn, args, what):
    """One netlink change in the guest; an existing entry is fine, another error is the user's."""
    try:
        fn(*args)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise Error("network: cannot set %s in the VM: %s" % (what, e.strerror)) from None


# ===========================================================================
# Agent: pod members (more containers in the pod's VM)
# ===========================================================================

class _AgentPods:
    """Pod members: more containers in this VM, each with its own rootfs from the pod export,
    mount and pid namespaces and cgroup."""

    def _op_create_member(self, msg):
        """Create a pod member's container: its rootfs and binds from the pod export, a cgroup
        of its own, its own pid namespace (or the sandbox's, when its config names one); the
        guest's network, IPC and UTS namespaces are the pod's. It then waits for start."""
        c, num, slot = msg["config"], msg["proc"], msg["member"]
        if self.procs.get(0, {}).get("status") is not None or self.conf is None:
            raise Error("pod: the sandbox is not running")
        _mount_pod_export(c["pod_tag"])
        cgroup = "%s/member-%d" % (GUEST_CGROUP, num)
        os.mkdir(cgroup)
        try:
            _apply_guest_limits(c.get("resources", {}), cgroup)
            c["cgroup"] = setup_device_cgroup(c["id"], c.get("device_rules"))
            c["guest_cgroup"] = cgroup
            init = self._fork_member_init(slot, cgroup, c.get("share_pid"))
            pid, sock = self._create_init(c, init)
        except BaseException:
            _rmdir_quietly(cgroup)
            raise
        self.procs[num] = {"pid": pid, "status": None, "process": c["process"], "open": 0,
                           "init": sock, "started": False, "member": slot}
        self.members[slot] = {"proc": num, "conf": c, "cgroup": cgroup}
        return {"op": "created", "pid": pid, "proc": num}

    def _fork_member_init(self, slot, cgroup, share_pid):
        """Fork a member's first process in a new pid namespace (or the sandbox's): in a mount
        namespace of its own with the member's rootfs at GUEST_ROOT, in its cgroup; it then
        sets the container up as the sandbox's does (_set_up_container)."""
        sandbox_ns = os.open("/proc/%d/ns/pid" % self.procs[0]["pid"], os.O_RDONLY | os.O_CLOEXEC)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if not share_pid:  # (a new one is made from our own; later children: the sandbox's)
                own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _check_libc(_libc().setns(own, CLONE_NEWPID), "setns(pid)")
                finally:
                    os.close(own)
                _check_libc(_libc().unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
            pid = os.fork()
            if pid == 0:
                parent.close()
                try:
                    self._member_init(child, slot, cgroup)
                finally:
                    os._exit(127)
        finally:
            _check_libc(_libc().setns(sandbox_ns, CLONE_NEWPID), "setns(pid)")
            os.close(sandbox_ns)
            child.close()
        return pid, parent

    def _member_init(self, sock, slot, cgroup):
        """In a member's first process: namespaces, cgroup and rootfs, then the config."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        try:
            _check_libc(_libc().unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
            mount(None, "/", None, MS_REC | MS_PRIVATE)
            _enter_container_cgroup(None, cgroup)
            c = read_msg(sock.fileno(), FrameReader(), 60)
            mount(os.path.join(GUEST_POD, str(slot), "rootfs"), GUEST_ROOT, None, MS_BIND)
        except (Error, OSError) as e:
            sock.sendall(str(e).encode())
            return
        self._set_up_container(sock, c)

    def _container_of(self, msg):
        """(first process number, config, guest cgroup) of the container a request is for:
        the sandbox's, or the pod member msg["member"] names."""
        slot = msg.get("member")
        if slot is None:
            return 0, self.conf, CONTAINER_CGROUP
        member = self.members.get(slot)
        if member is None:
            raise Error("container not running")
        return member["proc"], member["conf"], member["cgroup"]

    def _op_remove_member(self, msg):
        """A deleted (or gone) member: kill its processes; its cgroup goes once they are reaped."""
        member = self.members.pop(msg["member"], None)
        if member is None:
            return None
        signal_cgroup(member["cgroup"], signal.SIGKILL)
        init = self.procs.get(member["proc"])
        if init is not None and init.get("init") is not None:  # never started
            init.pop("init").close()
        if init is not None and init["status"] is None and not init["started"]:
            init["status"] = 137
        self.gone_cgroups.append(member["cgroup"])
        return None

    def _remove_gone_cgroups(self):
        """rmdir the cgroups of removed members once their processes are gone."""
        for cgroup in list(self.gone_cgroups):
            try:
                os.rmdir(cgroup)
            except FileNotFoundError:
                pass
            except OSError:
                continue
            self.gone_cgroups.remove(cgroup)


def _mount_pod_export(tag):
    """The pod export at GUEST_POD (mounted once; a pooled VM's container and members use it)."""
    if not os.path.ismount(GUEST_POD):
        os.makedirs(GUEST_POD, exist_ok=True)
        mount(tag, GUEST_POD, "9p", 0, NINEP_OPTIONS)


def _fork_in_pid_ns(pid1, sandbox_pid1):
    """fork() into the pid namespace of pid1 (a pod member's first process), then make our own
    children the sandbox's again; a plain fork for the sandbox's (ours already)."""
    if pid1 == sandbox_pid1:
        return os.fork()
    target = os.open("/proc/%d/ns/pid" % pid1, os.O_RDONLY | os.O_CLOEXEC)
    home = os.open("/proc/%d/ns/pid" % sandbox_pid1, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check_libc(_libc().setns(target, CLONE_NEWPID), "setns(pid)")
        pid = -1
        try:
            pid = os.fork()
        finally:
            if pid != 0:
                _check_libc(_libc().setns(home, CLONE_NEWPID), "setns(pid)")
        return pid
    finally:
        os.close(target)
        os.close(home)


def _rmdir_quietly(path):
    """rmdir that ignores failure."""
    try:
        os.rmdir(path)
    except OSError:
        pass


def signal_cgroup(cgroup, sig):
    """Send sig to every process of a guest cgroup (a pod member's kill --all)."""
    if sig == signal.SIGKILL and os.path.exists(cgroup + "/cgroup.kill"):
        with open(cgroup + "/cgroup.kill", "w") as f:
            f.write("1")
        return
    try:
        with open(cgroup + "/cgroup.procs") as f:
            pids = [int(line) for line in f if line.strip()]
    except OSError:
        return
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


# ===========================================================================
# Agent: a pooled VM's warm-up container, undone (see "The VM pool")
# ===========================================================================

class _AgentPool:
    """A pooled VM first runs a throw-away container (config "warmup": its exit does not end
    the agent), so that the guest code a container's set-up runs is translated once; reset
    then leaves nothing of it and forks a new first process, as the template has one."""

    def _op_reset(self, _msg):
        """Undo the warm-up container: its processes, mounts, device cgroup and hostname; the
        agent then waits for a create as a VM restored from the template does."""
        if not (self.conf or {}).get("warmup") or self.procs.get(0, {}).get("status") is None:
            raise Error("reset: no warm-up container has ended")
        _kill_all()
        while True:  # every process of the warm-up gone before its mounts go
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
        polled = set(self.out_fds) | set(self.in_fds)
        for fd in polled:
            try:
                self.poll.unregister(fd)
            except KeyError:
                pass
        for fd in polled | {p.get(k) for p in self.procs.values() for k in ("stdin", "master")}:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.out_fds.clear()
        self.in_fds.clear()
        for target in (GUEST_ROOT, GUEST_POD):
            if os.path.ismount(target):
                umount(target)
        _rmdir_quietly(os.path.join(DEVICE_CGROUP, "container"))
        socket.sethostname(self.boot_hostname)
        self.procs, self.conf, self.members = {}, None, {}
        self.oom_kills = _cgroup_counter("memory.events", "oom_kill")
        self.init_pid, self.init_sock = self._fork_init()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")  # no page of the warm-up's files left in the guest
        return {"op": "reset"}


class Agent(_AgentCore, _AgentContainers, _AgentCheckpoint, _AgentNetwork, _AgentPods, _AgentPool):
    """Prepares the container in the guest on the host's command and runs its processes."""


# ===========================================================================
# Commands: create, start, run and delete (a container and its monitor)
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
    if not hooks.get(name):
        return  # no subprocess import (~8 ms of a start or delete)
    import subprocess
    for hook in hooks[name]:
        args = hook.get("args") or [hook["path"]]
        env = dict(e.split("=", 1) for e in hook.get("env", []))
        LOG.debug("%s hook: %s", name, " ".join(args))
        try:
            proc = subprocess.run(args, executable=hook["path"], input=json_dumps(state_obj).encode(),
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


def _read_ready(fd, deadline, size):
    """os.read(fd, size) once fd is readable; b"" at EOF or the deadline (time.monotonic())."""
    import select
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([fd], [], [], left)[0]:
        return b""
    return os.read(fd, size)


def _read_pipe(fd, timeout):
    """Everything written to a pipe until EOF, or what came before timeout; closes fd."""
    chunks, deadline = [], time.monotonic() + timeout
    data = _read_ready(fd, deadline, 4096)
    while data:
        chunks.append(data)
        data = _read_ready(fd, deadline, 4096)
    os.close(fd)
    return b"".join(chunks)


def _read_line(fd, deadline):
    """One line from a pipe, newline dropped, read a byte at a time so that the rest stays in
    the pipe; what came before EOF or the deadline (time.monotonic()) otherwise."""
    line = b""
    while not line.endswith(b"\n"):
        byte = _read_ready(fd, deadline, 1)
        if not byte:
            break
        line += byte
    return line.rstrip(b"\n")


def _create_hooks(hooks, state):
    """runc's create-time hooks (prestart, createRuntime) on the container's state."""
    for name in ("prestart", "createRuntime"):
        run_hooks(hooks, name, state.oci_state())
    LOG.timeline("create: hooks run")


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
    while time.monotonic() < deadline:
        alive = [t for t in targets if process_alive(*t)]  # one look: it may exit meanwhile
        if not alive:
            return
        _reap_children()
        _wait_exit(alive[0], min(deadline, time.monotonic() + 0.5))


def _wait_exit(target, deadline):
    """Sleep until the process target (pid, start time) exits or deadline: a pidfd wakes us the
    moment it does (a 10 ms poll made delete 10-20 ms slower half the time)."""
    pid, start = target
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        time.sleep(0.01)
        return
    try:
        if process_alive(pid, start):  # the pidfd is of the process we checked, not a new one
            import select
            poll = select.poll()
            poll.register(fd, select.POLLIN)
            poll.poll(max(0.0, deadline - time.monotonic()) * 1000)
    finally:
        os.close(fd)


def _reap_children():
    """Reap our own exited children (the monitor of `run`)."""
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        pass


def create_container(args, console_socket=None, foreground=False, restoring=False):
    """Validate, boot the VM under a new monitor, run the create hooks; return (state, pid).
    A pod member goes into its sandbox's VM instead (create_member). restoring: the agent
    mounts the rootfs and waits for a restore (see "Checkpoint and restore")."""
    state = State(args.root, args.id)
    conf = load_spec(args.bundle)
    terminal = conf["process"]["terminal"]
    if is_host_netns(conf.get("netns")):
        raise Error(HOST_NETWORK_ERROR)
    if terminal and not console_socket and not foreground:
        raise Error("process.terminal: --console-socket is required when terminal is true")
    role, sandbox_id, strict = pod_role(args.id, conf["annotations"])
    if role == "member" and restoring:
        raise Error("restore: a pod member cannot be restored")
    if role == "member":
        sandbox = find_sandbox(args.root, sandbox_id, strict)
        if sandbox is not None:
            return create_member(args, conf, sandbox, console_socket)
    LOG.timeline("create: spec loaded")
    vm = size_vm(resolve_vm(conf), conf["resources"])
    if role == "sandbox":
        pod_vm_size(vm, conf["annotations"])
    cgroup_dirs = host_cgroup_dirs(conf["cgroups_path"], args.id, getattr(args, "systemd_cgroup", False))
    image = vm.get("image") or guest_image(vm)
    if not os.path.isfile(image):
        raise Error("vm.image: %s: no such file" % image)
    if conf["root"]["readonly"]:
        make_mountpoints(conf["root"]["path"], conf["mounts"])
    state.make()
    LOG.timeline("create: VM resolved, state made")
    monitor_pid, cgroups, pooled = None, [], None
    try:
        cgroups = create_host_cgroup(cgroup_dirs, vm["memory"], conf["resources"])
        argv = qemu_command(args.id, vm, conf, state.dir, image)
        restore = _restore_plan(args.id, vm, conf, state, image)
        if not restoring:
            pooled = _pooled_vm(vm, image, conf, cgroups)
        state.data = {"ociVersion": conf.get("ociVersion", OCI_VERSION), "id": args.id, "pid": 0,
                      "bundle": conf["bundle"], "rootfs": conf["root"]["path"],
                      "created": _now_rfc3339(), "annotations": conf["annotations"],
                      "hooks": conf["hooks"], "started": False, "paused": False,
                      "terminal": terminal, "process": conf["process"],
                      "vm": {"accel": vm["accel_used"], "kernel": vm["kernel_image"],
                             "image": image, "machine": vm["machine"], "memory": vm["memory"],
                             "cpus": vm["cpus"]},
                      "resources": conf["resources"],
                      "cgroups": [[d, v, sorted(c)] for d, v, c in cgroup_dirs],
                      "pod": {"tag": conf["pod_tag"]} if conf.get("pod_tag") else None}
        gconf = dict(guest_config(args.id, conf), restore=restoring)
        pool_fds = None
        if pooled:
            gconf.update(pooled["gconf"])
            state.data["pod"] = {"tag": POOL_POD_TAG}
            state.data["vm"].update(pool_dir=pooled["dir"], qemu_pid=pooled["qemu_pid"],
                                    qemu_start=pooled["qemu_start"])
            for name in ("qmp.sock", "console.log"):
                os.symlink(os.path.join(pooled["dir"], name), state.path(name))
            write_atomic(os.path.join(pooled["dir"], "container"), state.dir)  # whose it is
            pool_fds = {"agent": pooled["agent"], "pidfd": pooled["pidfd"],
                        "keeper": pooled["keeper"].fileno()}
        state.save()
        stdio, host_tty = _container_stdio(terminal, console_socket, conf["process"])
        namespaces = {k: v for k, v in conf["namespaces"].items() if k in MONITOR_NAMESPACES}

        def monitor_main(notify_fd):
            state.unlock()
            params = {"state_dir": state.dir, "cid": args.id, "gconf": gconf, "argv": argv,
                      "vm": vm, "netns": conf["netns"], "notify_fd": notify_fd,
                      "stdio": stdio, "restore": restore, "terminal": host_tty,
                      "staged": conf["staged"], "cgroups": cgroups, "namespaces": namespaces,
                      "hostname": conf["hostname"] if "uts" in namespaces else None,
                      "pooled": pool_fds}
            _exec_monitor(params, [fd for fd in stdio + (notify_fd, host_tty) if fd is not None]
                          + list((pool_fds or {}).values()))
            return Monitor(**params).run()  # where exec is impossible: this copy of create
        monitor_pid, rfd = _fork_monitor(monitor_main, keep_stdio=host_tty is None,
                                         pid_ns=conf["namespaces"].get("pid", "new"))
        if host_tty is not None and console_socket:
            os.close(host_tty)
        state.data.update(pid=monitor_pid, pid_start=proc_start_time(monitor_pid), creating=True)
        state.save()  # from here on, delete --force finds the monitor even if we die
        LOG.timeline("create: monitor forked")
        deadline = time.monotonic() + float(vm["boot_timeout"]) + 15
        first = _read_line(rfd, deadline)  # NAMESPACES_READY, else the start of its error
        if first == NAMESPACES_READY:  # the hooks meet the runtime environment as the VM boots
            _create_hooks(conf["hooks"], state)
            first = b""
        reply = first + _read_pipe(rfd, max(0.0, deadline - time.monotonic()))
        LOG.timeline("create: the monitor reports the container created")
        result = json_loads(reply) if reply.strip() else {"error": "the monitor died during boot"}
        if result.get("error"):
            raise Error(result["error"])
        state.data["creating"] = False
        if not pooled:
            qemu_pid = host_child_pid(monitor_pid)
            state.data["vm"].update(qemu_pid=qemu_pid, qemu_start=proc_start_time(qemu_pid or 0))
        state.save()
        monitor_request(state, {"op": "network"}, timeout=float(vm["boot_timeout"]))
        LOG.timeline("create: network wired")
        if getattr(args, "pid_file", None):
            write_atomic(os.path.abspath(args.pid_file), str(monitor_pid))
    except BaseException:
        if monitor_pid:
            unwire_network(state)
            _kill_container(state)
        if pooled:
            release_pooled(pooled)
        remove_host_cgroup(cgroups)
        state.remove()
        raise
    if pooled:
        release_pooled(pooled)  # (our copies: the monitor holds the VM now)
    LOG.info("created %s (monitor %d, %s%s)", args.id, monitor_pid, vm["accel_used"],
             ", a VM from the pool" if pooled else "")
    if not restoring and not pooled:  # (a VM taken: its keeper refills the pool)
        refill_pool(vm, image)
    return state, monitor_pid


def _pooled_vm(vm, image, conf, cgroups):
    """A warmed VM from the pool, made this container's (see give_pooled_vm); None when the pool
    is off or empty or the handover failed: the VM is then restored as without a pool."""
    if not pool_size(vm):
        return None
    try:
        template = template_for(vm, image)
    except (Error, OSError):
        return None
    taken = None
    try:
        taken = template and pool_take(pool_key(vm, template))
        if taken:
            taken["gconf"] = give_pooled_vm(taken, cgroups, conf)
            LOG.timeline("create: a VM from the pool")
    except (Error, OSError) as e:
        LOG.warning("pool: handing a VM over failed (%s); restoring one instead", e)
        if taken:
            release_pooled(taken)
        taken = None
    return taken or None


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
            net = json_loads(f.read())
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
    shares = template_shares(share_list(conf, state.dir), os.path.join(state.dir, FILES_DIR, "empty"))
    if not shares:
        return None
    try:
        template = template_for(vm, image, len(shares) - 1)
    except (Error, OSError) as e:
        LOG.warning("VM template unavailable (%s); booting instead", e)
        return None
    if not template:
        return None
    try:
        os.utime(template)  # in use: prune_cache spares templates used within the hour
    except OSError:
        pass
    spec = {"ram": os.path.join(template, "ram"), "share": False, "incoming": True, "shares": shares}
    return {"dir": template, "argv": qemu_command(cid, vm, conf, state.dir, image, spec)}


def _fork_monitor(monitor_main, keep_stdio=True, pid_ns=None):
    """Fork a monitor running monitor_main(notify_fd); returns its pid and the pipe it reports on.

    Without keep_stdio the monitor lets go of the caller's fds 0-2 (its container talks through
    a pty): an engine waits for EOF on the pipes it gave the runtime. With pid_ns "new" it is
    PID 1 of a new pid namespace, with a path in that one (forked by a child that exits at
    once, so it is orphaned to the caller's sub-reaper), and its first line on the pipe is its
    pid (or that child's error)."""
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(rfd)
            if pid_ns:
                try:
                    if join_namespaces({"pid": pid_ns}):  # "new"
                        _check_libc(_libc().unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
                except OSError as e:
                    _write_all(wfd, b"monitor: %s\n" % str(e).encode())
                    raise
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
    if pid_ns:
        os.waitpid(pid, 0)  # (its child wrote the line before it exited)
        line = _read_line(rfd, time.monotonic() + 10)
        if not line.isdigit():
            raise Error(line.decode(errors="replace") or "cannot start the container's monitor")
        pid = int(line)
    return pid, rfd


MONITOR_ARG = "--cc-oci-monitor"  # argv[1] of an exec'd monitor: FD STATE_DIR ID (see main)
BOOTSTRAP = 'exec(open(__import__("sys").argv[1]).read(4096).split("#~~\\n")[1])'  # line 6's


def _exec_monitor(params, fds, kind="container"):
    """Become a fresh interpreter that runs only the monitor, which reads params (Monitor's
    arguments) from a memfd: a forked create's heap would stay with the container for its
    whole life (~4 MiB). fds are kept open across the exec, and then made what they were.
    Returns when this file is not the running program or exec fails."""
    script = os.path.realpath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not sys.executable or script != os.path.realpath(__file__):
        return
    kept = [[inherited, os.get_inheritable(inherited)] for inherited in set(fds)]
    fd = None
    try:
        fd = os.memfd_create("cc-oci-monitor", 0)
        _write_all(fd, json_dumps({"monitor": params, "started": STARTED, "log": LOG.settings(),
                                   "fds": kept, "kind": kind}).encode())
        os.lseek(fd, 0, os.SEEK_SET)
        for inherited, _was in kept:
            os.set_inheritable(inherited, True)
        os.execv(sys.executable, [sys.executable, "-S", "-E", "-c", BOOTSTRAP, script, MONITOR_ARG,
                                  str(fd), params["state_dir"], params["cid"]])
    except (OSError, TypeError, ValueError) as e:
        LOG.debug("monitor: running in the create's process: %s", e)
        _restore_inheritance(kept)  # QEMU must not hold the notify pipe
        if fd is not None:
            os.close(fd)


def _restore_inheritance(kept):
    """Make the fds _exec_monitor kept open across its exec ([fd, inheritable]) what they were."""
    for inherited, was in kept:
        os.set_inheritable(inherited, was)


def _run_exec_monitor(fd):
    """An exec'd monitor (_exec_monitor): its arguments, the log settings, then its whole life."""
    global STARTED
    try:
        with os.fdopen(fd, "rb") as f:
            p = json_loads(f.read().decode())
        _restore_inheritance(p["fds"])  # QEMU must not hold the notify pipe
        STARTED = p["started"]
        LOG.restore(p["log"])
        if p.get("kind") == "pool":
            return _run_refill(p["monitor"])
        monitor = MemberMonitor if p.get("kind") == "member" else Monitor
        return monitor(**p["monitor"]).run()
    except BaseException as e:
        LOG.debug("monitor: %r", e)
        return 1


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
        return (_nonblocking_tty(0), 1, None), None
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


def _nonblocking_tty(fd):
    """fd, or when it is a terminal a new open file description of it that is non-blocking for
    the monitor alone: a poll that finds it readable can be followed by a read that would block
    (an EOF pending in canonical mode is dropped when the caller's terminal is made raw in
    between), and O_NONBLOCK on fd itself would reach the caller's shell, which shares it."""
    if not os.isatty(fd):
        return fd
    try:
        return os.open("/proc/self/fd/%d" % fd, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return fd


def send_console(path, fd):
    """Hand the pty master to the engine: one SCM_RIGHTS message, never waiting for a reply."""
    try:
        sock = connect_unix(os.path.dirname(os.path.abspath(path)), os.path.basename(path), 10)
    except OSError as e:
        raise Error("console socket %s: %s" % (path, e.strerror or e)) from None
    try:
        sock.sendmsg([b"/dev/pts/console"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                              struct.pack("i", fd))])
    finally:
        sock.close()


def start_container(state):
    """Tell the monitor to start the workload; run poststart hooks."""
    status = state.status()
    if status == "stopped":
        raise Error("cannot start a container that has stopped")
    if status == "paused":
        raise Error("cannot start a container in the paused state")
    if status != "created":
        raise Error("cannot start an already %s container" % status)
    monitor_request(state, {"op": "start"})
    LOG.timeline("start: the workload runs")
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
    sandbox = state.data.get("sandbox")
    if sandbox:  # a pod member: its files leave the pod's VM
        _unexport_member_of(state.root, sandbox)
    remove_host_cgroup([c[0] for c in state.data.get("cgroups", [])])
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
    return _wait_foreground(state, monitor_pid, keep=args.keep)


def _wait_foreground(state, monitor_pid, keep=False):
    """Wait for the monitor (signals forwarded), delete the container (unless keep: it stays
    stopped, as runc run --keep leaves it); the workload's status."""
    code = _wait_child(monitor_pid, state.data.get("terminal"))
    LOG.timeline("run: the monitor has exited")
    record = state.exit_record()
    if record is not None:
        code = record["status"]
    state.lock()
    if keep:
        _kill_container(state)
        state.unlock()
    else:
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


# ===========================================================================
# Commands: a pod member's create and delete (its files into the sandbox's VM)
# ===========================================================================

def create_member(args, conf, sandbox, console_socket=None):
    """create of a pod member: its files exported to the sandbox's VM (see "Pods (host side)"),
    then its host process (the --pid-file pid), which has the sandbox's monitor create the
    member in that VM; the create hooks; return (state, pid)."""
    state = State(args.root, args.id)
    terminal = conf["process"]["terminal"]
    cgroup_dirs = host_cgroup_dirs(conf["cgroups_path"], args.id, getattr(args, "systemd_cgroup", False))
    sdata = sandbox.data
    room = memory_room(sdata["vm"]["memory"])
    limit = _limit(conf["resources"], "memory", "limit")
    if limit and limit > room:
        raise Error("linux.resources.memory.limit: %d MiB does not fit the pod's VM: it has %s, "
                    "room for a limit of %d MiB" % (-(-limit >> 20), sdata["vm"]["memory"], room >> 20))
    state.make()
    slot, monitor_pid, cgroups, exported = None, None, [], False
    try:
        slot = claim_pod_slot(sandbox.dir, args.id, bool(sdata["vm"].get("pool_dir")))
        trees = member_trees(conf, slot)
        stage = state.path("stage")
        os.mkdir(stage)
        export_member(sandbox, stage, slot, trees)
        exported = True
        os.rmdir(stage)  # (what was mounted there is in the sandbox monitor's namespace)
        LOG.timeline("create: the member's files are in the pod's VM")
        cgroups = create_host_cgroup(cgroup_dirs, sdata["vm"]["memory"], {})
        gconf = guest_config(args.id, conf)
        gconf.update(pod_tag=sdata["pod"]["tag"], share_pid=bool(conf.get("pid_ns_path")))
        vm = sdata.get("vm", {})
        state.data = {"ociVersion": conf.get("ociVersion", OCI_VERSION), "id": args.id, "pid": 0,
                      "bundle": conf["bundle"], "rootfs": conf["root"]["path"],
                      "created": _now_rfc3339(), "annotations": conf["annotations"],
                      "hooks": conf["hooks"], "started": False, "paused": False,
                      "terminal": terminal, "process": conf["process"],
                      "vm": {"memory": vm.get("memory"), "cpus": vm.get("cpus")},
                      "sandbox": {"id": sandbox.id, "dir": sandbox.dir, "slot": slot,
                                  "qemu_pid": vm.get("qemu_pid"), "qemu_start": vm.get("qemu_start")},
                      "resources": conf["resources"],
                      "cgroups": [[d, v, sorted(c)] for d, v, c in cgroup_dirs]}
        state.save()
        stdio, host_tty = _container_stdio(terminal, console_socket, conf["process"])

        def member_main(notify_fd):
            state.unlock()
            params = {"state_dir": state.dir, "cid": args.id, "sandbox_dir": sandbox.dir, "slot": slot,
                      "config": gconf, "stdio": stdio, "notify_fd": notify_fd,
                      "terminal": host_tty, "cgroups": cgroups}
            _exec_monitor(params, [fd for fd in stdio + (notify_fd, host_tty) if fd is not None],
                          kind="member")
            return MemberMonitor(**params).run()
        monitor_pid, rfd = _fork_monitor(member_main, keep_stdio=host_tty is None)
        if host_tty is not None:
            os.close(host_tty)
        state.data.update(pid=monitor_pid, pid_start=proc_start_time(monitor_pid), creating=True)
        state.save()  # from here on, delete --force finds the member's process even if we die
        reply = _read_pipe(rfd, 90)
        result = json_loads(reply) if reply.strip() else {"error": "the member's process died"}
        if result.get("error"):
            raise Error(result["error"])
        state.data["proc"] = result["proc"]
        state.save()
        _create_hooks(conf["hooks"], state)
        state.data["creating"] = False
        state.save()
        if getattr(args, "pid_file", None):
            write_atomic(os.path.abspath(args.pid_file), str(monitor_pid))
    except BaseException:
        if monitor_pid:
            _kill_container(state)
        if exported:
            unexport_member(sdata, sandbox.dir, slot)
        release_pod_slot(sandbox.dir, slot)
        remove_host_cgroup(cgroups)
        state.remove()
        raise
    LOG.info("created %s in pod %s (process %d, slot %d)", args.id, sandbox.id, monitor_pid, slot)
    return state, monitor_pid


def _unexport_member_of(root, sandbox):
    """Unmount a deleted member's files from its sandbox's VM and free its slot."""
    sandbox_state = State(root, sandbox["id"])
    if sandbox_state.exists() and sandbox_state.load(must_exist=False):
        unexport_member(sandbox_state.data, sandbox["dir"], sandbox["slot"])
    release_pod_slot(sandbox["dir"], sandbox["slot"])


# ===========================================================================
# Commands: exec, pause, resume and ps
# ===========================================================================

def _arg_json(args, name):
    """The JSON of a file option (- for stdin; a /dev/fd/N file read before fds were closed)."""
    data = getattr(args, name + "_data", None)
    if data is None:
        path = getattr(args, name)
        return read_json(path if path != "-" else "/dev/stdin", name)
    try:
        return json_loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise Error("%s: %s: invalid JSON: %s" % (name, getattr(args, name), e)) from None


def _go_atoi(text, what):
    """An integer as Go's strconv.Atoi reads it, with runc's message when it is not one."""
    body = text[1:] if text[:1] in "+-" else text
    if not (body.isascii() and body.isdigit()):
        raise Error('parsing %s as int for %s failed: strconv.Atoi: parsing %s: invalid syntax'
                    % (text, what, go_quote(text)))
    return int(text)


def _exec_user(user, gid):
    """(uid, gid) from exec's --user uid[:gid]; the process's gid stays without :gid (runc)."""
    uid_text, sep, gid_text = user.partition(":")
    if sep:
        gid = _go_atoi(gid_text, "gid")
    return _go_atoi(uid_text, "uid"), gid


def exec_process(args, state):
    """The process to exec: --process FILE, or the container's own with args and overrides."""
    if args.process:
        raw = _arg_json(args, "process")
        process = parse_process(raw, "process")
    else:
        if not args.command_args:
            raise Error("process args cannot be empty")
        base = dict(state.data.get("process") or {"env": [], "cwd": "/", "uid": 0, "gid": 0})
        base.update(args=args.command_args, terminal=False, consoleSize={"height": 0, "width": 0})
        base["env"] = list(base.get("env", [])) + list(args.env or [])
        if args.cwd:
            base["cwd"] = args.cwd
        if args.user:
            base["uid"], base["gid"] = _exec_user(args.user, base.get("gid", 0))
        gids = list(base.get("additionalGids", []))
        for gid in args.additional_gids or []:
            if gid < 0:
                raise Error("additional-gids must be a positive number %d" % gid)
            gids.append(gid)
        raw = dict(base, user={"uid": base["uid"], "gid": base["gid"], "additionalGids": gids,
                               "umask": base.get("umask")})
        process = parse_process(raw, "process")
    if args.tty:
        process["terminal"] = True
    for cap in getattr(args, "cap", None) or []:
        add_exec_capability(process, cap)
    if getattr(args, "no_new_privs", False):
        process["noNewPrivileges"] = True
    return process


def cmd_exec(args):
    """exec: run another process in the container's VM."""
    state = _open_state(args)
    status = state.status()
    if status == "paused" and not args.ignore_paused:
        raise Error("cannot exec in a paused container (use --ignore-paused to override)")
    if status not in ("created", "running", "paused"):
        raise Error("cannot exec in a %s container" % status)
    process = exec_process(args, state)
    if process["terminal"] and not args.console_socket and args.detach:
        raise Error("process.terminal: --console-socket is required with --detach")
    stdio, host_tty = _container_stdio(process["terminal"], args.console_socket, process)
    sandbox = state.data.get("sandbox")  # a pod member's processes run in its sandbox's VM
    ctl_dir, member = (sandbox["dir"], sandbox["slot"]) if sandbox else (state.dir, None)
    pid, rfd = _fork_monitor(lambda fd: ExecMonitor(ctl_dir, process, stdio, fd, host_tty,
                                                    member).run(),
                             keep_stdio=host_tty is None)
    if host_tty is not None:
        os.close(host_tty)
    reply = _read_pipe(rfd, 90)
    result = json_loads(reply) if reply.strip() else {"error": "the exec monitor died"}
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
    """pause: stop the container's VM (QMP stop); a created one too, as runc freezes it. In a
    pod (a member, or a sandbox that has members) the container's processes are frozen in the
    VM (its guest cgroup's freezer), and the rest of the pod runs on."""
    state = _open_state(args, lock=True)
    if state.status() not in ("created", "running"):
        raise Error("container not running")
    how = PAUSED_FROZEN if state.data.get("sandbox") or has_members(state.dir) else PAUSED_VM
    if how == PAUSED_FROZEN:
        monitor_request(state, {"op": "freeze", "frozen": True})
    else:
        qmp(state, "stop")
    state.data["paused"] = how
    state.save()
    LOG.info("paused %s", state.id)


def cmd_resume(args):
    """resume: continue a paused container's VM (QMP cont)."""
    state = _open_state(args, lock=True)
    if state.status() != "paused":
        raise Error("container not paused")
    if state.data["paused"] == PAUSED_FROZEN:
        monitor_request(state, {"op": "freeze", "frozen": False})
    else:
        qmp(state, "cont")
    state.data["paused"] = False
    state.save()
    LOG.info("resumed %s", state.id)


def cmd_ps(args):
    """ps: the guest's processes as a ps table (ps options emulated), or the host pids of the
    monitor and QEMU (json).

    Engines read the json pids as host processes (docker top runs the host's ps on them),
    and on the host a container is its monitor and its VM."""
    if args.format not in ("table", "json"):
        raise Error("invalid format option")
    state = _open_state(args)
    status = state.status()
    if args.format == "json":
        pids = [state.data["pid"], state.data["vm"].get("qemu_pid")] if status != "stopped" else []
        # (a pod member's: its host process; the pod's QEMU is its sandbox's)
        print(go_json([p for p in pids if p] or None))
        return
    columns, env = ps_columns(args.ps_args)
    if status == "stopped":
        procs, mem_total = [], 1
    elif status == "paused":
        raise Error("container is paused: its processes cannot be listed")
    else:
        reply = monitor_request(state, {"op": "ps", "env": env})
        procs, mem_total = reply["processes"], reply.get("mem_total") or 1
    sys.stdout.write(ps_table(columns, procs, time.time(), mem_total, env))


# name: (header, width, right-aligned?, value(process, context)); widths are procps-ng's
PS_COLUMNS = {
    "pid": ("PID", 5, True, lambda p, c: p["pid"]),
    "ppid": ("PPID", 5, True, lambda p, c: p["ppid"]),
    "uid": ("UID", 5, True, lambda p, c: p["uid"]),
    "uid_hack": ("UID", 8, False, lambda p, c: _ps_user(p["uid"], numeric_if_long=True)),
    "user": ("USER", 8, False, lambda p, c: _ps_user(p["uid"])),
    "euser": ("EUSER", 8, False, lambda p, c: _ps_user(p["uid"])),
    "ruser": ("RUSER", 8, False, lambda p, c: _ps_user(p.get("ruid", p["uid"]))),
    "gid": ("GID", 5, True, lambda p, c: p["gid"]),
    "group": ("GROUP", 8, False, lambda p, c: _ps_group(p["gid"])),
    "comm": ("COMMAND", 15, False, lambda p, c: p["comm"]),
    "ucmd": ("CMD", 15, False, lambda p, c: p["comm"]),
    "args": ("COMMAND", 27, False, lambda p, c: _ps_args(p, c)),
    "cmd": ("CMD", 27, False, lambda p, c: p["args"]),
    "c": ("C", 2, True, lambda p, c: min(99, int(_ps_share(p, c)))),
    "pcpu": ("%CPU", 4, True, lambda p, c: "%.1f" % _ps_share(p, c)),
    "pmem": ("%MEM", 4, True, lambda p, c: "%.1f" % (p.get("rss", 0) * 100.0 / c["mem"])),
    "stime": ("STIME", 5, True, lambda p, c: _ps_stime(p["start"], c["now"])),
    "start_time": ("START", 5, True, lambda p, c: _ps_stime(p["start"], c["now"])),
    "start": ("STARTED", 8, True, lambda p, c: _ps_started(p["start"], c["now"])),
    "bsdstart": ("START", 5, True, lambda p, c: _ps_started(p["start"], c["now"], bsd=True)),
    "tname": ("TTY", 8, False, lambda p, c: _tty_name(p.get("tty", 0))),
    "tty": ("TT", 8, False, lambda p, c: _tty_name(p.get("tty", 0))),
    "time": ("TIME", 8, True, lambda p, c: _ps_duration(p.get("cpu", 0), hours=True)),
    "bsdtime": ("TIME", 6, True, lambda p, c: "%3d:%02d" % divmod(int(p.get("cpu", 0)), 60)),
    "etime": ("ELAPSED", 11, True, lambda p, c: _ps_duration(c["now"] - p["start"])),
    "stat": ("STAT", 4, False, lambda p, c: _ps_stat(p)),
    "s": ("S", 1, False, lambda p, c: p.get("state", "?")),
    "rss": ("RSS", 5, True, lambda p, c: p.get("rss", 0)),
    "vsz": ("VSZ", 6, True, lambda p, c: p.get("vsz", 0)),
    "sz": ("SZ", 5, True, lambda p, c: p.get("vsz", 0) // 4),
    "nlwp": ("NLWP", 4, True, lambda p, c: p.get("nlwp", 1)),
    "pgid": ("PGID", 5, True, lambda p, c: p.get("pgid", 0)),
    "sid": ("SID", 5, True, lambda p, c: p.get("sid", 0)),
    "ni": ("NI", 3, True, lambda p, c: p.get("nice", 0)),
    "psr": ("PSR", 3, True, lambda p, c: 0),
}


PS_ALIASES = {"euid": "uid", "uname": "user", "egid": "gid", "egroup": "group",
              "ucomm": "comm", "command": "args", "%cpu": "pcpu", "%mem": "pmem",
              "tt": "tty", "cputime": "time", "state": "s", "rssize": "rss", "rsz": "rss",
              "vsize": "vsz", "thcount": "nlwp", "pgrp": "pgid", "sess": "sid", "session": "sid",
              "nice": "ni"}


PS_FORMATS = {"default": "pid,tname,time,ucmd",
              "f": "uid_hack,pid,ppid,c,stime,tname,time,cmd",
              "F": "uid_hack,pid,ppid,c,sz,rss,psr,stime,tname,time,cmd",
              "u": "user,pid,pcpu,pmem,vsz,rss,tname,stat,bsdstart,bsdtime,args",
              "bsd": "pid,tname,stat,bsdtime,args"}


PS_SELECTION = set("eAadgNrxTw")  # process selection and width: every container process is listed
PS_EMULATED = "emulated: -e -A -a -x -f -F -o FORMAT, BSD a x u"


def ps_columns(argv):
    """The columns ([(key, title)]) for the ps options in argv, and whether the command
    lines carry the environment.

    runc runs the host's ps with these and keeps the container's lines; the guest has no ps,
    so the common options are emulated: selection (-e -A -a -x ax ...) lists every process,
    formats -f -F u, -o/o/--format FORMAT (with =HEADER). As with runc, the header must
    have a PID column (--no-headers or pid= fail: runc finds the pids through it)."""
    style, custom, header, env = _ps_options(list(argv) or ["-ef"])
    specs = custom or [PS_FORMATS[style]]
    columns = []
    for spec in specs:
        for item in _ps_format_items(spec):
            name, eq, title = item.partition("=")
            key = PS_ALIASES.get(name.lower(), name.lower())
            if key not in PS_COLUMNS:
                raise Error("ps: unknown user-defined format specifier %s" % go_quote(name))
            columns.append((key, title if eq else PS_COLUMNS[key][0]))
    if not header or "PID" not in [title for _, title in columns]:
        raise Error("couldn't find PID field in ps output")  # runc finds it in the header
    return columns, env


def _ps_options(args):
    """(format style, custom formats, header?) from ps options, as procps-ng picks them:
    -o wins, then BSD u, then BSD a/x (even -x), then -f/-F."""
    styles, custom, header, dashed = set(), [], True, set()
    while args:
        arg = args.pop(0)
        if arg in ("--no-headers", "--no-heading"):
            header = False
        elif arg.startswith("--format") or arg in ("-o", "o"):
            if arg.startswith("--format="):
                custom.append(arg.split("=", 1)[1])
            elif not args:
                raise Error("ps: %s needs a format" % arg)
            else:
                custom.append(args.pop(0))
        elif arg.startswith("-") and not arg.startswith("--") and len(arg) > 1:
            for i, ch in enumerate(arg[1:], 1):
                if ch == "o":
                    custom.append(arg[i + 1:] or (args.pop(0) if args else ""))
                    break
                if ch not in PS_SELECTION | set("fF"):
                    raise Error("ps: unsupported option -%s (%s)" % (ch, PS_EMULATED))
                styles.add("bsd" if ch == "x" else ch)
                dashed.add(ch)
        elif arg and not arg.startswith("-") and set(arg) <= PS_SELECTION | {"u"}:
            styles.add("u" if "u" in arg else "bsd")
        else:
            raise Error("ps: unsupported option %s (%s)" % (arg, PS_EMULATED))
    style = next((s for s in ("u", "bsd", "F", "f") if s in styles), "default")
    return style, custom, header, {"e", "x"} <= dashed  # -e beside -x is BSD e: environment


def _ps_format_items(spec):
    """The items of a ps format: comma separated (or space separated before any =HEADER)."""
    items = []
    for part in spec.split(","):
        name, eq, title = part.partition("=")
        words = name.split()
        items += words[:-1] + [words[-1] + eq + title] if words else []
    return items


def ps_table(columns, procs, now, mem_total, env=False):
    """The ps table text: procps-ng's column widths and alignment, the last column unpadded
    (env: each command line followed by its environment)."""
    ctx = {"now": now, "mem": mem_total, "env": env}
    rows = [[title for _, title in columns]]
    rows += [[str(PS_COLUMNS[key][3](p, ctx)) for key, _ in columns] for p in procs]
    lines = []
    for row in rows:
        cells = []
        for i, (cell, (key, _)) in enumerate(zip(row, columns)):
            _, width, right, _ = PS_COLUMNS[key]
            last = i == len(columns) - 1
            if not last and key in ("args", "cmd", "comm", "ucmd"):
                cell = cell[:width]
            cells.append(cell.rjust(width) if right else cell if last else cell.ljust(width))
        lines.append(" ".join(cells).rstrip() + "\n")
    return "".join(lines)


def _ps_args(p, ctx):
    """The command line, and its environment after it when asked (BSD e)."""
    return p["args"] + (" " + p["env"] if ctx.get("env") and p.get("env") else "")


def _ps_user(uid, numeric_if_long=False):
    """The host's name for uid as ps prints it (runc runs the host's ps): 8 characters at most."""
    import pwd
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
    if len(name) > 8:
        return str(uid) if numeric_if_long else name[:7] + "+"
    return name


def _ps_group(gid):
    """The host's name for gid, as ps prints it."""
    import grp
    try:
        name = grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
    return name if len(name) <= 8 else name[:7] + "+"


def _ps_share(p, ctx):
    """Percent of one CPU the process used since it started (ps's C and %CPU)."""
    elapsed = ctx["now"] - p["start"]
    return p.get("cpu", 0) * 100.0 / elapsed if elapsed > 0 else 0.0


def _ps_stime(start, now):
    """ps's STIME: HH:MM today, MonDD this year, else the year (local time)."""
    t, n = time.localtime(start), time.localtime(now)
    fmt = "%H:%M" if (t.tm_year, t.tm_yday) == (n.tm_year, n.tm_yday) else \
        "%b%d" if t.tm_year == n.tm_year else "%Y"
    return time.strftime(fmt, t)


def _ps_started(start, now, bsd=False):
    """ps's STARTED (HH:MM:SS) or BSD START (HH:MM) within a day, else MonDD or the year."""
    ago = now - start
    if ago < 24 * 3600:
        return time.strftime("%H:%M" if bsd else "%H:%M:%S", time.localtime(start))
    return time.strftime("%b%d" if ago < 365 * 24 * 3600 else "%Y", time.localtime(start))


def _ps_duration(seconds, hours=False):
    """[DD-]HH:MM:SS (hours=True, ps's TIME) or [[DD-]HH:]MM:SS (ELAPSED)."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    text = "%02d:%02d" % (m, sec)
    if hours or h or days:
        text = "%02d:%s" % (h, text)
    return ("%d-" % days if days else "") + text


def _ps_stat(p):
    """ps's STAT: the state letter, then < or N (nice), s (session leader), l (threads)."""
    out = p.get("state", "?")
    out += "<" if p.get("nice", 0) < 0 else "N" if p.get("nice", 0) > 0 else ""
    out += "s" if p.get("sid") == p["pid"] else ""
    return out + ("l" if p.get("nlwp", 1) > 1 else "")


def _tty_name(dev):
    """The terminal name of a tty_nr device number (pts/N, ttySN, ttyN, console), or ?."""
    major, minor = (dev >> 8) & 0xfff, (dev & 0xff) | ((dev >> 12) & 0xfff00)
    if 136 <= major <= 143:
        return "pts/%d" % ((major - 136) * 256 + minor)
    if major == 4:
        return "tty%d" % minor if minor < 64 else "ttyS%d" % (minor - 64)
    if (major, minor) == (5, 1):
        return "console"
    if major == 229:
        return "hvc%d" % minor
    return "?"


# ===========================================================================
# Commands: events, update, state, kill, list, spec, features, version, check
# ===========================================================================

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


def runc_stats(raw):
    """runc's stats object (types.Stats) from the guest cgroup's raw files."""
    def flat(name):
        return {k: int(v) for k, _, v in (ln.partition(" ") for ln in raw.get(name, "").splitlines())
                if v.strip().lstrip("-").isdigit()}

    def number(name):
        text = raw.get(name, "").strip()
        return 2 ** 64 - 1 if text == "max" else int(text) if text.isdigit() else 0
    cpu, mem, events = flat("cpu.stat"), flat("memory.stat"), flat("memory.events")
    return {
        "cpu": {"usage": {"total": cpu.get("usage_usec", 0) * 1000,
                          "kernel": cpu.get("system_usec", 0) * 1000,
                          "user": cpu.get("user_usec", 0) * 1000},
                "throttling": {"periods": cpu.get("nr_periods", 0),
                               "throttled_periods": cpu.get("nr_throttled", 0),
                               "throttled_time": cpu.get("throttled_usec", 0) * 1000}},
        "memory": {"cache": mem.get("file", 0),
                   "usage": {"limit": number("memory.max"), "usage": number("memory.current"),
                             "max": number("memory.peak"), "failcnt": events.get("max", 0)},
                   "swap": {"limit": number("memory.swap.max"),
                            "usage": number("memory.swap.current")},
                   "raw": mem},
        "pids": {"current": number("pids.current"),
                 "limit": 0 if raw.get("pids.max", "").strip() == "max" else number("pids.max")},
    }


def container_stats(state):
    """The container's figures from its guest cgroup; QEMU's as the host sees them when the
    agent cannot answer (a paused VM)."""
    if state.data.get("paused") in (False, None, PAUSED_FROZEN):  # the agent can answer
        try:
            return runc_stats(monitor_request(state, {"op": "stats"}, timeout=5)["cgroup"])
        except (Error, OSError, KeyError):
            if state.status() == "stopped":
                raise Error("container not running") from None
    return vm_stats(state)


def _oom_count(state):
    """How many OOM kills the container's cgroup has had (the monitor records them)."""
    try:
        with open(state.path("oom")) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def cmd_events(args):
    """events: JSON lines: the container's figures every interval and each OOM kill as it
    happens (--stats: the figures once)."""
    state = _open_state(args)
    interval = _seconds(args.interval)
    if interval <= 0:
        raise Error("duration interval must be greater than 0")
    if state.status() == "stopped":
        raise Error("container with id %s is not running" % state.id)
    if args.stats:
        print(go_json({"type": "stats", "id": state.id, "data": container_stats(state)}),
              flush=True)
        return 0
    ooms, due = 0, 0.0
    while True:
        count = _oom_count(state)
        if count > ooms:
            for _ in range(count - ooms):
                print(go_json({"type": "oom", "id": state.id}), flush=True)
            ooms = count
        if not state.load(must_exist=False) or state.status() == "stopped":
            return 0
        if time.monotonic() >= due:
            try:
                print(go_json({"type": "stats", "id": state.id,
                               "data": container_stats(state)}), flush=True)
            except Error:
                return 0
            due = time.monotonic() + interval
        time.sleep(min(0.2, interval))


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


# update's flags: option -> (section, field, parse, help), runc's names and meanings
UPDATE_FLAGS = {
    "--memory": ("memory", "limit", "bytes", "memory limit (in bytes, or 100m, 1g)"),
    "--memory-reservation": ("memory", "reservation", "bytes", "memory reservation (soft limit)"),
    "--memory-swap": ("memory", "swap", "bytes", "memory + swap; -1 for unlimited swap"),
    "--cpu-period": ("cpu", "period", int, "CPU CFS period (usecs)"),
    "--cpu-quota": ("cpu", "quota", int, "CPU CFS quota (usecs per period)"),
    "--cpu-share": ("cpu", "shares", int, "CPU shares (relative weight)"),
    "--cpu-rt-period": ("cpu", "realtimePeriod", int, "realtime period (not applied in a VM)"),
    "--cpu-rt-runtime": ("cpu", "realtimeRuntime", int, "realtime runtime (not applied in a VM)"),
    "--cpuset-cpus": ("cpu", "cpus", str, "host CPUs the VM may run on"),
    "--cpuset-mems": ("cpu", "mems", str, "host memory nodes the VM may use"),
    "--pids-limit": ("pids", "limit", int, "maximum number of pids in the container"),
    "--blkio-weight": ("blockIO", "weight", int, "block I/O weight, 10 to 1000"),
    "--l3-cache-schema": (None, None, str, "Intel RDT L3 schema (not applied in a VM)"),
    "--mem-bw-schema": (None, None, str, "Intel RDT MBA schema (not applied in a VM)"),
}


def _ram_bytes(text):
    """Bytes in a memory value as runc reads it: 1048576, 512k, 100m, 1g; -1 is unlimited."""
    import re
    m = re.fullmatch(r"\s*(-?[0-9.]+)\s*([kmgtp]?)i?b?\s*", str(text), re.I)
    if not m:
        raise Error("invalid memory value: %s" % text)
    scale = 1 << (10 * "kmgtp".find(m.group(2).lower()) + 10) if m.group(2) else 1
    return int(float(m.group(1)) * scale)


def update_resources(args):
    """The resources an update asks for: the JSON of -r (file or -), else the flags."""
    if args.resources:
        raw = _arg_json(args, "resources")
        if not isinstance(raw, dict):
            raise Error("resources: must be a JSON object")
        return parse_resources(raw, "resources")
    out = {}
    for opt, (section, field, kind, _) in UPDATE_FLAGS.items():
        value = getattr(args, opt[2:].replace("-", "_"))
        if value is None or section is None:
            continue
        try:
            value = _ram_bytes(value) if kind == "bytes" else kind(value)
        except ValueError:
            raise Error("invalid value for %s: %s" % (opt, value)) from None
        out.setdefault(section, {})[field] = value
    if args.cpu_shares is not None:  # an older spelling
        out.setdefault("cpu", {})["shares"] = int(args.cpu_shares)
    return out


def merge_resources(old, new):
    """old with the fields new sets (0 or "" leaves a field as it was, as runc's update does)."""
    merged = json_loads(json_dumps(old))
    for section, fields in new.items():
        if isinstance(fields, dict):
            for key, value in fields.items():
                if value not in (0, "", None):
                    merged.setdefault(section, {})[key] = value
        else:
            merged[section] = fields
    return merged


def cmd_update(args):
    """update: change the container's limits in its VM (its cgroup there) and on the host."""
    state = _open_state(args, lock=True)
    if state.status() not in ("created", "running"):
        raise Error("container not running")  # runc's words
    resources = merge_resources(state.data.get("resources", {}), update_resources(args))
    vm_memory = state.data["vm"]["memory"]
    limit = _limit(resources, "memory", "limit")
    if limit and limit > memory_room(vm_memory):
        raise Error("memory limit %d MiB does not fit the container's VM: it has %s, room for a "
                    "limit of %d MiB (a VM's size is set when it is created)"
                    % (-(-limit >> 20), vm_memory, memory_room(vm_memory) >> 20))
    monitor_request(state, {"op": "update", "resources": resources})
    dirs = [(d, v, frozenset(c)) for d, v, c in state.data.get("cgroups", [])]
    try:
        update_host_cgroup(dirs, vm_memory, resources)
    except OSError as e:
        raise Error("cgroup %s: %s" % (e.filename, e.strerror)) from None
    state.data["resources"] = resources
    state.save()
    return 0


def cmd_state(args):
    """state: print the runtime-spec state JSON."""
    sys.stdout.write(go_json(_open_state(args).oci_state(), indent=2))  # runc: no newline


def cmd_kill(args):
    """kill: send a signal to the container's process (or all of them)."""
    state = _open_state(args)
    sig = parse_signal(args.signal)
    status = state.status()
    if status == "stopped" and args.all:  # runc: nothing left to signal is no error with --all
        return
    if status in ("stopped", "creating"):
        raise Error("container not running")
    if sig == 0:  # the liveness check: the status came from the live monitor and QEMU
        return
    frozen = state.data.get("paused") == PAUSED_FROZEN  # the VM runs: the agent answers
    if status == "paused" and sig == signal.SIGKILL and not frozen:
        _kill_container(state)  # a stopped VM cannot run the agent; the monitor dies of KILL
        return
    monitor_request(state, {"op": "signal", "proc": 0, "sig": sig, "all": args.all},
                    wait=status != "paused" or frozen)
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
    if args.format not in ("table", "json"):
        raise Error("invalid format option")
    states = []
    for st in list_states(args.root):
        s = st.oci_state()
        s["owner"] = _owner_of(st.dir)
        states.append(s)
    if args.quiet:
        for s in states:
            print(s["id"])
    elif args.format == "json":
        print(go_json(states or None))
    else:
        rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
        rows += [(s["id"], str(s["pid"]), s["status"], s["bundle"], s["created"], s["owner"])
                 for s in states]
        sys.stdout.write(tabwriter(rows))


def _owner_of(path):
    """The user name owning path (runc's list OWNER), or #uid when it has none."""
    import pwd
    uid = os.stat(path).st_uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "#%d" % uid


def tabwriter(rows, minwidth=12, padding=3):
    """Rows laid out as Go's text/tabwriter does for runc (cells padded, the last one not)."""
    widths = [max(minwidth, max(len(r[i]) for r in rows) + padding)
              for i in range(len(rows[0]) - 1)]
    return "".join("".join(c.ljust(w) for c, w in zip(r, widths)) + r[-1] + "\n" for r in rows)


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


def runc_spec(rootless=False):
    """The config.json runc spec writes: default_spec plus ambient caps and /sys/fs/cgroup
    (--rootless: runc's rootless conversion)."""
    spec = default_spec()
    caps = spec["process"]["capabilities"]
    caps["ambient"] = list(caps["bounding"])
    spec["mounts"].append({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                           "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]})
    if rootless:
        _to_rootless(spec)
    return spec


def _to_rootless(spec):
    """runc's specconv.ToRootless: a user namespace mapping the caller, /sys bound, no ids."""
    linux = spec["linux"]
    namespaces = [ns for ns in linux["namespaces"] if ns["type"] not in ("network", "user")]
    mapping = lambda host: [{"containerID": 0, "hostID": host, "size": 1}]  # noqa: E731
    rest = {k: v for k, v in linux.items() if k not in ("resources", "namespaces")}
    linux.clear()
    linux.update(uidMappings=mapping(os.geteuid()), gidMappings=mapping(os.getegid()),
                 namespaces=namespaces + [{"type": "user"}], **rest)
    mounts = []
    for m in spec["mounts"]:
        if os.path.normpath(m["destination"]) == "/sys":
            m = {"destination": "/sys", "type": "none", "source": "/sys",
                 "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}
        elif "options" in m:
            m = dict(m, options=[o for o in m["options"] if not o.startswith(("gid=", "uid="))])
        mounts.append(m)
    spec["mounts"] = mounts


def cmd_spec(args):
    """spec: write runc's default config.json into the bundle (tab-indented, no newline)."""
    if not os.path.isdir(args.bundle):
        raise Error("chdir %s: no such file or directory" % args.bundle)
    path = os.path.join(args.bundle, "config.json")
    if os.path.exists(path):
        raise Error("File config.json exists. Remove it first")
    try:
        write_atomic(path, go_json(runc_spec(args.rootless), indent="\t"))
    except OSError as e:
        raise Error("%s: %s" % (path, e.strerror)) from None


def cmd_features(_args):
    """features: what this runtime supports (runtime-spec features document)."""
    print(go_json({
        "ociVersionMin": "1.0.0", "ociVersionMax": OCI_VERSION,
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer", "poststart",
                  "poststop"],
        "mountOptions": sorted(list(MOUNT_OPTIONS) + list(PROPAGATION_OPTIONS)),
        "linux": {"namespaces": ["network", "user"],
                  "capabilities": ["CAP_" + c for c in CAPABILITIES],
                  "cgroup": {"v1": False, "v2": False},
                  "seccomp": {"enabled": True, "actions": sorted(SECCOMP_ACTIONS),
                              "operators": list(SECCOMP_OPS),
                              "archs": ["SCMP_ARCH_X86_64"]},
                  "apparmor": {"enabled": False}, "selinux": {"enabled": False}},
        "annotations": {"io.github.cc-oci-runtime.vm": "qemu"},
    }, indent=4))


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
    item("checkpoint", lambda: "criu %s (carried in the guest image)" % criu_version())
    item("VM pool", lambda: _pool_line(vm))
    return results


def _pool_line(vm):
    """check's line on the pool: its size, the warmed VMs ready and those in use."""
    size = pool_size(dict(vm, accel_used=vm.get("accel_used") or "?"))
    if not size:
        raise Error("off (vm.pool is 0)")
    ready, used = pool_status()
    return "%d ready, %d in use, up to %d per size and template (vm.pool) in %s" % (
        sum(ready.values()), used, size, POOL_DIR)


def cmd_check(_args):
    """check: can this host run containers? Names the fix for each missing piece."""
    results = check_host()
    for ok, what, detail in results:
        print("%-4s %-15s %s" % ("ok" if ok else "off" if what in OPTIONAL_CHECKS else "FAIL",
                                 what, detail))
    if not all(ok for ok, what, _ in results if what not in OPTIONAL_CHECKS):
        raise Error("this host cannot run containers yet: see the FAIL lines above")


# ===========================================================================
# Main: the command line
# ===========================================================================

def _parser_class():
    """argparse.ArgumentParser whose errors exit as runc's do (1; 3 for an unknown command)."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            """Usage and the error on stderr; exit 1, or 3 for an unknown command as runc."""
            self.print_usage(sys.stderr)
            if message.startswith("argument COMMAND: invalid choice: "):
                name = message.split(": ", 2)[2].split(" (choose", 1)[0].strip("'")
                message, code = "No help topic for '%s'" % name, 3
                sys.stderr.write(message + "\n")
            else:
                code = 1
                sys.stderr.write("%s: error: %s\n" % (self.prog, message))
            raise UsageExit(code, message)
    return Parser


class UsageExit(SystemExit):
    """A bad command line (argparse's exit), carrying its message for the --log file."""

    def __init__(self, code, message):
        super().__init__(code)
        self.message = message


def _log_usage_error(argv, message):
    """Write a usage error to the --log file the command line names (an engine reads it)."""
    opts = _global_options(argv)[0]
    if opts.get("--log"):
        LOG.configure(opts["--log"], "json" if opts.get("--log-format") == "json" else "text")
        LOG.error(message)


GLOBAL_VALUE_OPTIONS = ("--root", "--log", "--log-format", "--global-log", "--criu", "--rootless")


class _Unbuilt:
    """Stands for the parser of a command not on the command line (see build_parser)."""

    def __getattr__(self, _name):
        return lambda *_args, **_kw: self


def _global_options(argv):
    """({--name: value} of the global options argv starts with, in any flag form, and the
    sub-command that follows them, or None)."""
    opts, args = {}, list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("-"):
            return opts, arg
        name, eq, value = arg.partition("=")
        name = "--" + name.lstrip("-")  # -root as --root
        if not eq and name in GLOBAL_VALUE_OPTIONS:
            value = args.pop(0) if args else None
        opts[name] = value
    return opts, None


def command_in(argv):
    """The sub-command argv names after the global options, or None."""
    return _global_options(argv)[1]


def build_parser(only=None):
    """runc 1.1's command line: global options, then a sub-command (every runc flag accepted).

    With only (a command's name) the other commands' parsers are left unbuilt: a CLI call
    pays for its own command only; the whole parser is built when only names none."""
    import argparse
    if only in ("help", "h"):
        only = None
    built = []
    p = _parser_class()(prog=PROG, allow_abbrev=False,
                        description="OCI runtime that runs each container in its own QEMU "
                                    "virtual machine.")
    p.add_argument("--root", default=DEFAULT_ROOT, help="state directory (default %(default)s)")
    p.add_argument("--log", help="log file (created at start-up; default: errors on stderr)")
    p.add_argument("--log-format", default="text", help="log format: text (default) or json")
    p.add_argument("--global-log", help="text log of every event, with the container id")
    p.add_argument("--debug", action="store_true", help="log more detail")
    p.add_argument("-v", "--version", action="store_true", help="print the version")
    p.add_argument("--systemd-cgroup", action="store_true",
                   help="cgroupsPath is systemd's slice:prefix:name (mapped to cgroupfs)")
    p.add_argument("--criu", help="accepted and ignored")
    p.add_argument("--rootless", help="accepted and ignored")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_parser_class())

    def command(name, fn, help_text, with_id=True, aliases=()):
        if only and only != name and only not in aliases:
            return _Unbuilt()
        built.append(name)
        c = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False,
                           aliases=list(aliases))
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
    run.add_argument("--keep", action="store_true",
                     help="do not delete the container after it exits")
    run.add_argument("--no-subreaper", action="store_true", help="accepted and ignored")
    command("state", cmd_state, "print a container's state as JSON")
    kill = command("kill", cmd_kill, "send a signal to a container's process")
    kill.add_argument("signal", nargs="?", default="TERM", help="name or number (default TERM)")
    kill.add_argument("-a", "--all", action="store_true", help="signal every process")
    delete = command("delete", cmd_delete, "delete a stopped container")
    delete.add_argument("-f", "--force", action="store_true", help="kill it first if it runs")
    lst = command("list", cmd_list, "list containers", with_id=False)
    lst.add_argument("-f", "--format", default="table", help="table (default) or json")
    lst.add_argument("-q", "--quiet", action="store_true", help="only ids")
    spec = command("spec", cmd_spec, "write a default config.json", with_id=False)
    spec.add_argument("-b", "--bundle", default=".", help="where to write config.json")
    spec.add_argument("--rootless", action="store_true", help="a config for a rootless container")
    ex = command("exec", cmd_exec, "run another process in a created or running container")
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
    ex.add_argument("-g", "--additional-gids", action="append", type=int,
                    help="an additional gid (repeat for more)")
    ex.add_argument("--preserve-fds", type=int, default=0,
                    help="fds above 2 to leave open (not passed into the VM)")
    ex.add_argument("--no-new-privs", action="store_true", help="set no_new_privs for the process")
    ex.add_argument("--ignore-paused", action="store_true",
                    help="on a paused container, wait for resume instead of failing")
    ex.add_argument("--no-subreaper", action="store_true", help="accepted and ignored")
    for opt in ("--apparmor", "--process-label", "--cgroup"):
        ex.add_argument(opt, help="accepted and ignored")
    ex.add_argument("-c", "--cap", action="append",
                    help="add a capability to the process's bounding, effective, permitted "
                         "and inheritable sets")
    command("pause", cmd_pause, "pause a container's VM")
    command("resume", cmd_resume, "resume a paused container's VM")
    ps = command("ps", cmd_ps, "list the container's processes (guest pids)")
    ps.add_argument("-f", "--format", default="table", help="table (default) or json")
    ps.add_argument("ps_args", nargs=argparse.REMAINDER, metavar="PS_OPTION",
                    help="ps options (emulated: -e -f -F -l -o FORMAT u aux ...)")
    ev = command("events", cmd_events, "print the VM's resource figures as JSON lines")
    ev.add_argument("--stats", action="store_true", help="print once and exit")
    ev.add_argument("--interval", default="5s", help="time between lines (default 5s)")
    up = command("update", cmd_update, "update resource limits, in the VM and on the host")
    up.add_argument("-r", "--resources", help="resources JSON file, - for stdin")
    for opt, (_, _, _, text) in UPDATE_FLAGS.items():
        up.add_argument(opt, help=text)
    for opt in ("--cpu-shares", "--kernel-memory", "--kernel-memory-tcp"):
        up.add_argument(opt, help=argparse.SUPPRESS)
    command("features", cmd_features, "print the supported features as JSON", with_id=False)
    for name, fn in (("checkpoint", cmd_checkpoint), ("restore", cmd_restore)):
        c = command(name, fn, "%s a container (CRIU in its VM; see README.md, \"Checkpoint "
                              "and restore\")" % name)
        for flag in ("--leave-running", "--tcp-established", "--ext-unix-sk", "--shell-job",
                     "--lazy-pages", "--file-locks", "--pre-dump", "--auto-dedup",
                     "--no-subreaper", "--no-pivot"):
            c.add_argument(flag, action="store_true", help="accepted")
        c.add_argument("-d", "--detach", action="store_true",
                       help="(restore) do not wait for the restored container")
        for opt in ("--image-path", "--work-path", "--parent-path", "--status-fd", "--page-server",
                    "--manage-cgroups-mode", "--empty-ns", "--console-socket", "--pid-file",
                    "--lsm-profile", "--lsm-mount-context"):
            c.add_argument(opt, help="accepted")
        c.add_argument("-b", "--bundle", help="accepted")
    hlp = command("help", None, "show the commands, or one command's help", with_id=False,
                  aliases=("h",))
    hlp.add_argument("topic", nargs="?", metavar="COMMAND", help="the command to explain")
    hlp.set_defaults(func=lambda args: _help(p, sub, args.topic))
    command("version", cmd_version, "print the version", with_id=False)
    command("check", cmd_check, "report whether this host can run containers", with_id=False)
    return p if built or not only else build_parser()


GO_TRUE = ("1", "t", "T", "true", "TRUE", "True")
GO_FALSE = ("0", "f", "F", "false", "FALSE", "False")


def _flag_name(arg):
    """The name urfave/cli's argIsFlag looks up for arg: --x=1 -> x, -x -> x, ---x -> x."""
    if arg[:2] == "--":
        arg = arg[2:]
    if arg[:1] == "-":
        arg = arg[1:]
    return arg.partition("=")[0]


def _urfave_order(args, command):
    """A command's args as urfave/cli 1.22's reorderArgs gives them to Go's flag package: its
    flags first, each with the next arg unless that is a flag or the flag has =value (a
    boolean's too: `kill c0 -a 9` is `kill -a 9 c0`), then the others, -- and what follows."""
    names = {_flag_name(o) for o in command._option_string_actions}
    flags, others, value_next = [], [], False
    for i, arg in enumerate(args):
        is_flag = arg[:1] == "-" and arg not in ("-", "--") and _flag_name(arg) in names
        if value_next and not is_flag:
            flags.append(arg)
            value_next = False
        elif arg == "--":
            return flags + ["--"] + others + args[i + 1:]
        elif is_flag:
            flags.append(arg)
            value_next = "=" not in arg
        else:
            others.append(arg)
    return flags + others


def go_style_argv(argv, parser):
    """argv with Go's flag forms made argparse's: -name for --name, and --flag=true/false for a
    boolean (runc's urfave/cli takes both); a command's flags moved before its other args, as
    urfave/cli does. Options of exec and ps after the id are left alone (runc's are too)."""
    out, current, args = [], parser, list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            return out + [arg] + args
        name, eq, value = arg.partition("=")
        one_dash = name[:1] == "-" and name[1:2] not in ("-", "") and len(name) > 2
        long = "-" + name if one_dash else name
        action = current._option_string_actions.get(long) if long[:1] == "-" else None
        if action is None:
            out.append(arg)
            if arg.startswith("-"):
                continue
            if current is parser:  # the command
                current = _subcommand(parser, arg) or parser
                if current is not parser and arg not in ("exec", "ps"):
                    args = _urfave_order(args, current)
            elif current.prog.split()[-1] in ("exec", "ps"):
                return out + args  # the id: the process's (or ps's) own arguments follow
            continue
        if action.nargs == 0 and eq:  # a boolean given a value
            if value in GO_TRUE:
                out.append(long)
            elif value not in GO_FALSE:
                out.append(arg)
            continue
        out.append(long + eq + value)
        if action.nargs != 0 and not eq and args:
            out.append(args.pop(0))
    return out


# fast_args: the short commands an engine runs most, as build_parser declares them:
# name: (function, {flag: dest}, {value option: dest}, positionals, defaults). A one-letter
# option is -x only; a longer one -name or --name (Go's flag forms, as go_style_argv).
FAST_GLOBALS = ({"debug": "debug", "systemd-cgroup": "systemd_cgroup"},
                {"root": "root", "log": "log", "log-format": "log_format",
                 "global-log": "global_log", "criu": "criu", "rootless": "rootless"},
                {"root": DEFAULT_ROOT, "log": None, "log_format": "text", "global_log": None,
                 "debug": False, "version": False, "systemd_cgroup": False, "criu": None,
                 "rootless": None})
FAST_COMMANDS = {
    "state": (cmd_state, {}, {}, ("id",), {}),
    "start": (cmd_start, {}, {}, ("id",), {}),
    "kill": (cmd_kill, {"a": "all", "all": "all"}, {}, ("id", "signal"),
             {"signal": "TERM", "all": False}),
    "delete": (cmd_delete, {"f": "force", "force": "force"}, {}, ("id",), {"force": False}),
    "list": (cmd_list, {"q": "quiet", "quiet": "quiet"}, {"f": "format", "format": "format"}, (),
             {"format": "table", "quiet": False}),
    "ps": (cmd_ps, {}, {"f": "format", "format": "format"}, ("id",),
           {"format": "table", "ps_args": ()}),
}


class _Args:
    """A parsed command line with the attributes argparse's Namespace would have."""

    def __init__(self, values):
        self.__dict__.update(values)


def fast_args(argv):
    """What build_parser().parse_args(go_style_argv(argv)) gives for a plain call of state,
    start, kill, delete, list or ps, without argparse (it imports re, gettext and locale: ~8 ms
    a call); None for anything else (help, errors, rarer forms): main then runs the parser."""
    flags, values, initial = FAST_GLOBALS
    args, rest, spec, positionals, flag_after = dict(initial), list(argv), None, [], False
    while rest:
        arg = rest.pop(0)
        if arg[:1] != "-":
            if spec is None:  # the command
                spec = FAST_COMMANDS.get(arg)
                if spec is None:
                    return None
                args.update(spec[4], command=arg, func=spec[0])
                flags, values = spec[1], spec[2]
            elif flag_after or len(positionals) == len(spec[3]):
                return None  # moved before the others (_urfave_order), or one too many
            else:
                positionals.append(arg)
            continue
        if positionals:
            if args["command"] == "ps":
                return None  # ps's own options follow the id
            flag_after = True
        name, eq, value = arg.partition("=")
        key = name[2:] if name[:2] == "--" else name[1:]
        if not key or len(key) == 1 and name[:2] == "--":
            return None  # -, --, --x
        if key in flags:
            if not eq or value in GO_TRUE:
                args[flags[key]] = True
            elif value not in GO_FALSE:
                return None
        elif key in values:
            if not eq:
                if not rest or rest[0][:1] == "-":
                    return None
                value = rest.pop(0)
            args[values[key]] = value
        else:
            return None
    if spec is None or len(positionals) < len([d for d in spec[3] if d not in spec[4]]):
        return None
    args.update(zip(spec[3], positionals))
    if "ps_args" in args:
        args["ps_args"] = []  # a list of its own, as argparse's
    return _Args(args)


def _subcommand(parser, name):
    """The sub-command parser for name, or None."""
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return action.choices.get(name)
    return None


def _help(parser, sub, topic):
    """help [COMMAND]: the program's or one command's help on stdout, as `runc help`."""
    if topic is None:
        parser.print_help()
        return 0
    if topic not in sub.choices:
        sys.stderr.write("No help topic for '%s'\n" % topic)
        return 3
    sub.choices[topic].print_help()
    return 0


def _preload_fd_files(args):
    """Read a --process or --resources file given as /dev/fd/N (`-p <(...)`) before the fds
    are closed; exec and update then read the content, not the path."""
    for name in ("process", "resources"):
        path = getattr(args, name, None)
        if path and path.startswith(("/dev/fd/", "/proc/self/fd/")):
            try:
                with open(path, "rb") as f:
                    setattr(args, name + "_data", f.read())
            except OSError:
                pass  # the command reports the missing file


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
    if argv is None and sys.argv[1:2] == [MONITOR_ARG]:  # before the agent's test: a monitor
        return _run_exec_monitor(int(sys.argv[2]))     # can be PID 1 of its pid namespace
    if os.getpid() == 1 and argv is None:
        agent_main()
    argv_given = argv
    argv = sys.argv[1:] if argv is None else argv
    args = fast_args(argv)
    if args is None:
        parser = build_parser(command_in(argv))
        argv = go_style_argv(argv, parser)
        try:
            args = parser.parse_args(argv)
        except UsageExit as e:
            _log_usage_error(argv, e.message)
            return e.code
    if argv_given is None:
        _preload_fd_files(args)
        _close_inherited_fds(3 + (getattr(args, "preserve_fds", 0) or 0))
    if args.log_format not in ("text", "json"):
        args.log_format, bad = "text", args.log_format
        LOG.configure(None, "text")
        LOG.stderr = True
        LOG.error("invalid log-format: %s" % bad)
        return 1
    LOG.configure(args.log, args.log_format, args.global_log, args.debug)
    LOG.stderr = not args.log
    LOG.container_id = getattr(args, "id", None)
    for flag in ("criu", "rootless"):
        if getattr(args, flag):
            LOG.debug("--%s: ignored", flag.replace("_", "-"))
    if args.version:
        sys.stdout.write(version_text())
        return 0
    if not args.command:
        parser.print_help()
        return 0
    try:
        LOG.timeline("%s: parsed" % args.command)
        code = args.func(args)
        LOG.timeline("%s: done" % args.command)
        return code or 0
    except (Error, OSError) as e:
        msg = str(e)
        if isinstance(e, OSError) and e.filename:
            msg = "%s: %s" % (e.filename, (e.strerror or str(e)).lower())
        if args.command == "exec":
            msg = "exec failed: " + msg
        LOG.error(msg)
        if args.log:  # runc: the error goes to the log, and its text alone to stderr
            sys.stderr.write("%s\n" % msg)
        return 255 if args.command == "exec" else 1
    except KeyboardInterrupt:
        return 130


def exit_now(code):
    """Exit with code without tearing the interpreter down (some 4 ms for a file this size,
    on every command): flush what the teardown would have flushed, then _exit. A stdout the
    reader closed makes it 120, as Python's own exit does."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 120
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
