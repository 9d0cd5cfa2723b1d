"""Unit tests for cc_oci_runtime.py that need no VM and never run QEMU.

Run with:  python3 -m pytest tests/test_runtime.py

Everything happens under pytest's tmp_path: the autouse fixture points CACHE_DIR and
CONFIG_DIRS at empty temp dirs and gives each test a fresh LOG, and every command-line
run passes --root (and CC_OCI_CACHE_DIR) in tmp_path, so /run/cc-oci-runtime,
/var/cache/cc-oci-runtime and /etc/cc-oci-runtime are never read or written.

Sections follow the module: arguments, spec handlers, hypervisor.args and QEMU argv,
vm.json, state, cpio, logging, signals, accelerator, other helpers, CLI commands.
"""

import contextlib
import datetime
import errno
import fcntl
import gzip
import io
import json
import lzma
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import cc_oci_runtime as rt  # noqa: E402

SCRIPT = os.path.join(REPO, "cc_oci_runtime.py")
HYPERVISOR_ARGS = os.path.join(REPO, "hypervisor.args")
RFC3339_NS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{9}Z$")


# ===========================================================================
# Fixtures and helpers
# ===========================================================================

@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No test sees the host's config or cache dirs, and each gets its own LOG."""
    cache = tmp_path / "_cache"
    monkeypatch.setattr(rt, "CACHE_DIR", str(cache))
    monkeypatch.setattr(rt, "CONFIG_DIRS", ())
    monkeypatch.setattr(rt, "LOG", rt.Log())
    return cache


def good_config():
    """A valid config.json touching every handler."""
    return {
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": True},
        "process": {"terminal": False, "user": {"uid": 1000, "gid": 100, "additionalGids": [5],
                                                 "umask": 0o22},
                    "args": ["sh", "-c", "echo hi"], "env": ["PATH=/bin", "A=b=c"],
                    "cwd": "/work/../tmp/",
                    "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 2048}],
                    "consoleSize": {"height": 24, "width": 80}, "noNewPrivileges": True,
                    "capabilities": {"bounding": []}},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/dev//shm/", "type": "tmpfs", "source": "shm",
                    "options": ["nosuid", "mode=1777"]}],
        "hostname": "box",
        "hooks": {"prestart": [{"path": "/bin/true", "args": ["true"], "env": ["X=1"],
                                "timeout": 5}]},
        "annotations": {"org.example.key": "value"},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}],
                  "maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"],
                  "sysctl": {"net.ipv4.ip_forward": "1"}, "resources": {}},
        "vm": {"cpus": 2},
    }


def make_bundle(tmp_path, config=None, name="bundle"):
    """A bundle dir with an empty rootfs and (unless config is False) a config.json."""
    bundle = tmp_path / name
    (bundle / "rootfs").mkdir(parents=True)
    if config is not False:
        write_json(bundle / "config.json", good_config() if config is None else config)
    return bundle


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def spec_error(tmp_path, config):
    """The rt.Error message load_spec gives for config."""
    bundle = make_bundle(tmp_path, config)
    with pytest.raises(rt.Error) as exc:
        rt.load_spec(str(bundle))
    return str(exc.value)


def parse(*argv):
    return rt.build_parser().parse_args(list(argv))


def parse_fails(capsys, *argv):
    """argparse's exit code and stderr for a bad command line."""
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    return exc.value.code, capsys.readouterr().err


def cli(tmp_path, *args, cwd=None):
    """Run the runtime's CLI as a separate process (cache dir in tmp_path)."""
    env = dict(os.environ, CC_OCI_CACHE_DIR=str(tmp_path / "_cache"))
    return subprocess.run([sys.executable, SCRIPT] + [str(a) for a in args], capture_output=True,
                          text=True, timeout=60, cwd=cwd or str(tmp_path), env=env)


LOGRUS_LINE = re.compile(r'^time="[^"]+" level=(\w+) msg=(.*)$')


def stderr_text(stderr):
    """stderr with runc's logrus lines (no --log) reduced to their messages, one a line."""
    out = []
    for line in stderr.splitlines():
        m = LOGRUS_LINE.match(line)
        msg = m.group(2) if m else line
        out.append(json.loads(msg) if m and msg.startswith('"') else msg)
    return "".join(line + "\n" for line in out)


def values_of(argv, flag):
    """Every argument that follows flag in argv."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def spawn_sleeper():
    """A live child process to stand in for a container's monitor."""
    return subprocess.Popen(["sleep", "60"])


# ===========================================================================
# 1. Argument parsing
# ===========================================================================

def test_global_defaults():
    a = parse("list")
    assert (a.root, a.log, a.log_format, a.global_log) == (rt.DEFAULT_ROOT, None, "text", None)
    assert (a.debug, a.systemd_cgroup, a.criu, a.rootless, a.version) == (False, False, None,
                                                                          None, False)


def test_global_options_before_command():
    a = parse("--root", "/r", "--log", "/l", "--log-format", "json", "--global-log", "/g",
              "--debug", "--systemd-cgroup", "--criu", "X", "--rootless", "true", "state", "c1")
    assert (a.root, a.log, a.log_format, a.global_log) == ("/r", "/l", "json", "/g")
    assert (a.debug, a.systemd_cgroup, a.criu, a.rootless) == (True, True, "X", "true")
    assert (a.command, a.id, a.func) == ("state", "c1", rt.cmd_state)


@pytest.mark.parametrize("argv", [["--log-format", "json"], ["--log-format=json"]])
def test_log_format_forms(argv):
    assert parse(*argv, "list").log_format == "json"


@pytest.mark.parametrize("argv, field, code", [
    (["--criu"], "--criu", 1),
    (["list", "--form", "json"], "--form", 1),  # no abbreviations: runc has none
    (["bogus-command"], "No help topic for 'bogus-command'", 3),
])
def test_bad_global_options(capsys, argv, field, code):
    got, err = parse_fails(capsys, *argv)
    assert got == code and field in err


@pytest.mark.parametrize("flag", ["-v", "--version"])
def test_version_flag(flag):
    assert parse(flag).version is True


@pytest.mark.parametrize("command, func", [("create", rt.cmd_create), ("run", rt.cmd_run)])
def test_create_and_run_options(command, func):
    a = parse(command, "-b", "/b", "--pid-file", "/p", "--console-socket", "/s", "--no-pivot",
              "--no-new-keyring", "--preserve-fds", "3", "c1")
    assert (a.func, a.id, a.bundle, a.pid_file, a.console_socket) == (func, "c1", "/b", "/p", "/s")
    assert (a.no_pivot, a.no_new_keyring, a.preserve_fds) == (True, True, 3)


@pytest.mark.parametrize("command", ["create", "run"])
def test_create_and_run_defaults(command):
    a = parse(command, "--bundle", "/long", "c1")
    assert (a.bundle, a.pid_file, a.console_socket) == ("/long", None, None)
    assert (a.no_pivot, a.no_new_keyring, a.preserve_fds) == (False, False, 0)
    assert parse(command, "c1").bundle == "."


@pytest.mark.parametrize("argv, field", [
    (["create"], "CONTAINER_ID"),
    (["create", "--preserve-fds", "many", "c1"], "--preserve-fds"),
    (["create", "-b"], "-b/--bundle"),
    (["run", "--detach=yes", "c1"], "--detach"),
])
def test_bad_create_options(capsys, argv, field):
    code, err = parse_fails(capsys, *argv)
    assert code == 1 and field in err


@pytest.mark.parametrize("argv, detach", [(["run", "c1"], False), (["run", "-d", "c1"], True),
                                          (["run", "--detach", "c1"], True)])
def test_run_detach(argv, detach):
    assert parse(*argv).detach is detach


ID_COMMANDS = [("start", "cmd_start"), ("state", "cmd_state"), ("pause", "cmd_pause"),
               ("resume", "cmd_resume")]


@pytest.mark.parametrize("command, func", [(c, getattr(rt, f, None)) for c, f in ID_COMMANDS])
def test_id_commands(capsys, command, func):
    a = parse(command, "c1")
    assert (a.func, a.id) == (func, "c1")
    code, err = parse_fails(capsys, command)
    assert code == 1 and "CONTAINER_ID" in err


@pytest.mark.parametrize("argv, sig, all_", [
    (["kill", "c1"], "TERM", False),
    (["kill", "c1", "KILL"], "KILL", False),
    (["kill", "c1", "9"], "9", False),
    (["kill", "-a", "c1"], "TERM", True),
    (["kill", "--all", "c1", "HUP"], "HUP", True),
    (["kill", "c1", "INT", "-a"], "INT", True),
])
def test_kill(argv, sig, all_):
    a = parse(*argv)
    assert (a.func, a.id, a.signal, a.all) == (rt.cmd_kill, "c1", sig, all_)


def test_kill_bad(capsys):
    code, err = parse_fails(capsys, "kill")
    assert code == 1 and "CONTAINER_ID" in err
    code, err = parse_fails(capsys, "kill", "c1", "9", "extra")
    assert code == 1 and "extra" in err


@pytest.mark.parametrize("argv, force", [(["delete", "c1"], False), (["delete", "-f", "c1"], True),
                                         (["delete", "--force", "c1"], True)])
def test_delete(argv, force):
    a = parse(*argv)
    assert (a.func, a.id, a.force) == (rt.cmd_delete, "c1", force)


@pytest.mark.parametrize("argv, fmt, quiet", [
    (["list"], "table", False), (["list", "-f", "json"], "json", False),
    (["list", "--format", "table"], "table", False), (["list", "-q"], "table", True),
    (["list", "--quiet", "-f", "json"], "json", True),
])
def test_list(argv, fmt, quiet):
    a = parse(*argv)
    assert (a.func, a.format, a.quiet) == (rt.cmd_list, fmt, quiet)


def test_list_and_ps_bad_format(tmp_path):
    for argv in (["list", "-f", "yaml"], ["ps", "-f", "yaml", "c1"]):
        r = cli(tmp_path, "--root", tmp_path, *argv)
        assert (r.returncode, r.stdout) == (1, "")
        assert r.stderr.endswith('level=error msg="invalid format option"\n'), r.stderr


def test_spec_bundle():
    assert parse("spec").bundle == "."
    a = parse("spec", "-b", "/b")
    assert (a.func, a.bundle) == (rt.cmd_spec, "/b")
    assert parse("spec", "--bundle", "/c").bundle == "/c"


@pytest.mark.parametrize("command, func", [("features", rt.cmd_features),
                                           ("version", rt.cmd_version), ("check", rt.cmd_check)])
def test_commands_without_id(capsys, command, func):
    assert parse(command).func is func
    code, err = parse_fails(capsys, command, "c1")
    assert code == 1 and "unrecognized arguments: c1" in err


def parser_commands():
    """Every sub-command the parser knows."""
    sub = [a for a in rt.build_parser()._actions if a.__class__.__name__ == "_SubParsersAction"]
    return [name for name, c in sub[0].choices.items() if c.prog.split()[-1] == name]


BASE_COMMANDS = ["create", "start", "run", "state", "kill", "delete", "list", "spec", "features",
                 "version", "check"]
HELP_COMMANDS = parser_commands()


def test_base_commands_exist():
    assert set(BASE_COMMANDS) <= set(HELP_COMMANDS)


@pytest.mark.parametrize("argv, expected", [
    (["exec", "c1", "ls", "-l", "--cwd", "/y"],
     dict(id="c1", command_args=["ls", "-l", "--cwd", "/y"], process=None, tty=False,
          detach=False, env=None, cwd=None, user=None, pid_file=None, console_socket=None)),
    (["exec", "-t", "-e", "A=1", "--env", "B=2", "--cwd", "/x", "-u", "1:2", "c1", "sh"],
     dict(id="c1", command_args=["sh"], tty=True, env=["A=1", "B=2"], cwd="/x", user="1:2")),
    (["exec", "-p", "/p.json", "-d", "--pid-file", "/pf", "--console-socket", "/s", "c1"],
     dict(command_args=[], process="/p.json", detach=True, pid_file="/pf", console_socket="/s")),
    (["exec", "--process=-", "--no-new-privs", "--cap", "CAP_KILL", "--preserve-fds", "1", "c1"],
     dict(process="-", no_new_privs=True, cap=["CAP_KILL"], preserve_fds=1)),
    (["exec", "-g", "5", "--additional-gids", "6", "--ignore-paused", "c1", "id"],
     dict(additional_gids=[5, 6], ignore_paused=True, command_args=["id"])),
    (["ps", "c1"], dict(id="c1", format="table", ps_args=[])),
    (["ps", "-f", "json", "c1"], dict(id="c1", format="json", ps_args=[])),
    (["ps", "c1", "-e", "-x"], dict(id="c1", format="table", ps_args=["-e", "-x"])),
    (["ps", "c1", "--format", "json"], dict(format="table", ps_args=["--format", "json"])),
    (["events", "c1"], dict(id="c1", stats=False, interval="5s")),
    (["events", "--stats", "--interval", "1s", "c1"], dict(stats=True, interval="1s")),
    (["update", "-r", "-", "--memory", "1G", "c1"], dict(id="c1", resources="-", memory="1G")),
    (["update", "c1"], dict(resources=None, pids_limit=None)),
])
def test_newer_commands(argv, expected):
    if argv[0] not in HELP_COMMANDS:
        pytest.skip("no %s command" % argv[0])
    a = parse(*argv)
    assert a.func is getattr(rt, "cmd_" + argv[0])
    assert {k: getattr(a, k) for k in expected} == expected


@pytest.mark.parametrize("argv, field", [
    (["exec"], "CONTAINER_ID"), (["exec", "-g", "x", "c1", "id"], "-g/--additional-gids"),
    (["exec", "--preserve-fds", "x", "c1", "id"], "--preserve-fds"),
    (["events"], "CONTAINER_ID"), (["update"], "CONTAINER_ID"),
])
def test_newer_commands_bad(capsys, argv, field):
    if argv[0] not in HELP_COMMANDS:
        pytest.skip("no %s command" % argv[0])
    code, err = parse_fails(capsys, *argv)
    assert code == 1 and field in err


@pytest.mark.parametrize("command", HELP_COMMANDS)
def test_help_of_each_command(tmp_path, command):
    r = cli(tmp_path, command, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: cc-oci-runtime %s " % command)


def test_help_of_the_program(tmp_path):
    r = cli(tmp_path, "--help")
    assert r.returncode == 0
    assert r.stdout.startswith("usage: cc-oci-runtime ")
    for command in HELP_COMMANDS:
        assert re.search(r"^\s+%s\s" % command, r.stdout, re.M), command


# ===========================================================================
# 2. Spec handlers (config.json)
# ===========================================================================

def test_good_config(tmp_path):
    bundle = make_bundle(tmp_path)
    conf = rt.load_spec(str(bundle))
    assert conf["bundle"] == str(bundle)
    assert conf["ociVersion"] == "1.0.2"
    assert conf["root"] == {"path": str(bundle / "rootfs"), "readonly": True}
    p = conf["process"]
    assert p["args"] == ["sh", "-c", "echo hi"] and p["env"] == ["PATH=/bin", "A=b=c"]
    assert (p["cwd"], p["terminal"], p["uid"], p["gid"]) == ("/tmp", False, 1000, 100)
    assert (p["additionalGids"], p["umask"], p["noNewPrivileges"]) == ([5], 0o22, True)
    assert p["rlimits"] == [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 2048}]
    assert p["consoleSize"] == {"height": 24, "width": 80}
    assert [m["destination"] for m in conf["mounts"]] == ["/proc", "/dev/shm"]
    assert conf["mounts"][1] == {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                                 "options": ["nosuid", "mode=1777"]}
    assert conf["hostname"] == "box"
    assert conf["hooks"]["prestart"][0]["path"] == "/bin/true"
    assert conf["annotations"] == {"org.example.key": "value"}
    assert conf["netns"] == "new"
    assert (conf["masked"], conf["readonly_paths"]) == (["/proc/kcore"], ["/proc/sys"])
    assert conf["sysctl"] == {"net.ipv4.ip_forward": "1"}
    assert conf["vm"] == {"cpus": 2}


def test_minimal_config_defaults(tmp_path):
    bundle = make_bundle(tmp_path, {"ociVersion": "1.0.0", "root": {"path": "rootfs"},
                                    "process": {"args": ["true"]}})
    conf = rt.load_spec(str(bundle))
    assert conf["root"]["readonly"] is False
    p = conf["process"]
    assert (p["env"], p["cwd"], p["terminal"], p["uid"], p["gid"]) == ([], "/", False, 0, 0)
    assert (p["umask"], p["rlimits"], p["noNewPrivileges"]) == (None, [], False)
    assert (conf["mounts"], conf["hooks"], conf["hostname"], conf["netns"]) == ([], {}, None, None)


BAD_SPECS = [
    # (section, value, exact error message after "config.json: ")
    ("ociVersion", 1, "ociVersion: must be a non-empty string"),
    ("ociVersion", "", "ociVersion: must be a non-empty string"),
    ("root", "rootfs", "root: must be an object"),
    ("root", {"path": ""}, "root.path: must be a non-empty string"),
    ("root", {"path": 5}, "root.path: must be a non-empty string"),
    ("root", {"path": "rootfs", "readonly": "yes"}, "root.readonly: must be a boolean"),
    ("process", ["sh"], "process: must be an object"),
    ("process", {"args": []}, "process.args: must be a non-empty list of strings"),
    ("process", {"args": "sh"}, "process.args: must be a non-empty list of strings"),
    ("process", {"args": ["sh", 1]}, "process.args: must be a non-empty list of strings"),
    ("process", {"args": ["sh"], "env": "A=1"}, "process.env: must be a list of strings"),
    ("process", {"args": ["sh"], "env": ["NOVALUE"]},
     "process.env: 'NOVALUE' is not of the form NAME=VALUE"),
    ("process", {"args": ["sh"], "cwd": "tmp"}, "process.cwd: must be an absolute path"),
    ("process", {"args": ["sh"], "terminal": "yes"}, "process.terminal: must be a boolean"),
    ("process", {"args": ["sh"], "user": "root"}, "process.user: must be an object"),
    ("process", {"args": ["sh"], "user": {"uid": -1}},
     "process.user.uid: must be a non-negative integer"),
    ("process", {"args": ["sh"], "user": {"uid": True}},
     "process.user.uid: must be a non-negative integer"),
    ("process", {"args": ["sh"], "user": {"gid": "0"}},
     "process.user.gid: must be a non-negative integer"),
    ("process", {"args": ["sh"], "user": {"additionalGids": [1, -2]}},
     "process.user.additionalGids: must be a list of non-negative integers"),
    ("process", {"args": ["sh"], "user": {"umask": 0o1000}},
     "process.user.umask: must be an integer between 0 and 0777"),
    ("process", {"args": ["sh"], "rlimits": {}}, "process.rlimits: must be a list"),
    ("process", {"args": ["sh"], "rlimits": ["x"]}, "process.rlimits[0]: must be an object"),
    ("process", {"args": ["sh"], "rlimits": [{"type": "RLIMIT_BOGUS", "soft": 1, "hard": 1}]},
     "process.rlimits[0].type: unknown rlimit 'RLIMIT_BOGUS'"),
    ("process", {"args": ["sh"], "rlimits": [{"type": "NOFILE", "soft": 1, "hard": 1}]},
     "process.rlimits[0].type: unknown rlimit 'NOFILE'"),
    ("process", {"args": ["sh"], "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1, "hard": 1},
                                             {"type": "RLIMIT_CORE", "soft": -1, "hard": 0}]},
     "process.rlimits[1].soft: must be a non-negative integer"),
    ("process", {"args": ["sh"], "consoleSize": {"height": -1}},
     "process.consoleSize.height: must be a non-negative integer"),
    ("process", {"args": ["sh"], "consoleSize": []}, "process.consoleSize: must be an object"),
    ("process", {"args": ["sh"], "noNewPrivileges": 1}, "process.noNewPrivileges: must be a boolean"),
    ("mounts", {}, "mounts: must be a list"),
    ("mounts", ["/proc"], "mounts[0]: must be an object"),
    ("mounts", [{"destination": "proc"}], "mounts[0].destination: must be an absolute path"),
    ("mounts", [{"destination": "/a"}, {"destination": "/b", "type": 5}],
     "mounts[1].type: must be a string"),
    ("mounts", [{"destination": "/a", "source": 5}], "mounts[0].source: must be a string"),
    ("mounts", [{"destination": "/a", "options": "ro"}], "mounts[0].options: must be a list of strings"),
    ("mounts", [{"destination": "/a", "type": "bind", "source": ""}],
     "mounts[0].source: must not be empty for a bind mount"),
    ("mounts", [{"destination": "/a", "type": "bind", "source": "/nonexistent/cc-test"}],
     "mounts[0].source: /nonexistent/cc-test: no such file or directory"),
    ("mounts", [{"destination": "/a", "type": "none", "source": "/nonexistent/x",
                 "options": ["rbind"]}], "mounts[0].source: /nonexistent/x: no such file or directory"),
    ("hostname", 5, "hostname: must be a string"),
    ("hooks", [], "hooks: must be an object"),
    ("hooks", {"prestart": {}}, "hooks.prestart: must be a list"),
    ("hooks", {"prestart": ["/bin/true"]}, "hooks.prestart[0]: must be an object"),
    ("hooks", {"poststop": [{"path": "true"}]}, "hooks.poststop[0].path: must be an absolute path"),
    ("hooks", {"poststop": [{"path": "/bin/true", "args": "true"}]},
     "hooks.poststop[0].args: must be a list of strings"),
    ("hooks", {"poststop": [{"path": "/bin/true", "env": [1]}]},
     "hooks.poststop[0].env: must be a list of strings"),
    ("hooks", {"prestart": [{"path": "/bin/true"}, {"path": "/bin/true", "timeout": 0}]},
     "hooks.prestart[1].timeout: must be a positive integer"),
    ("annotations", [], "annotations: must be an object"),
    ("annotations", {"a": 1}, "annotations.a: must be a string"),
    ("linux", [], "linux: must be an object"),
    ("linux", {"resources": []}, "linux.resources: must be an object"),
    ("linux", {"resources": {"memory": 5}}, "linux.resources.memory: must be an object"),
    ("linux", {"resources": {"memory": {"limit": "1g"}}},
     "linux.resources.memory.limit: must be an integer"),
    ("linux", {"resources": {"cpu": {"cpus": 3}}}, "linux.resources.cpu.cpus: must be a string"),
    ("linux", {"resources": {"pids": {"limit": True}}}, "linux.resources.pids.limit: must be an integer"),
    ("linux", {"cgroupsPath": 7}, "linux.cgroupsPath: must be a string"),
    ("linux", {"namespaces": {}}, "linux.namespaces: must be a list"),
    ("linux", {"namespaces": ["pid"]}, "linux.namespaces[0]: must be an object"),
    ("linux", {"namespaces": [{"type": "pid"}, {"type": "bogus"}]},
     "linux.namespaces[1].type: unknown namespace type 'bogus'"),
    ("linux", {"namespaces": [{"type": "pid", "path": 1}]}, "linux.namespaces[0].path: must be a string"),
    ("linux", {"namespaces": [{"type": "network", "path": "/nonexistent/ns"}]},
     "linux.namespaces[0].path: /nonexistent/ns: no such file or directory"),
    ("linux", {"maskedPaths": "/proc"}, "linux.maskedPaths: must be a list of strings"),
    ("linux", {"readonlyPaths": [1]}, "linux.readonlyPaths: must be a list of strings"),
    ("linux", {"sysctl": []}, "linux.sysctl: must be an object"),
    ("linux", {"sysctl": {"net.x": 1}}, "linux.sysctl.net.x: must be a string"),
    ("vm", "big", "vm: must be an object"),
    ("vm", [], "vm: must be an object"),
]


@pytest.mark.parametrize("section, value, message", BAD_SPECS,
                         ids=["%s-%d" % (c[0], i) for i, c in enumerate(BAD_SPECS)])
def test_bad_spec_values(tmp_path, section, value, message):
    config = good_config()
    config[section] = value
    assert spec_error(tmp_path, config) == "config.json: " + message


def test_bad_specs_cover_every_handler():
    assert {case[0] for case in BAD_SPECS} == set(rt.SPEC_HANDLERS)


def test_root_path_missing_dir(tmp_path):
    config = good_config()
    config["root"] = {"path": "nope"}
    msg = spec_error(tmp_path, config)
    assert msg == "config.json: root.path: %s: no such directory" % (tmp_path / "bundle" / "nope")


def test_absolute_root_path(tmp_path):
    rootfs = tmp_path / "elsewhere"
    rootfs.mkdir()
    config = good_config()
    config["root"] = {"path": str(rootfs)}
    assert rt.load_spec(str(make_bundle(tmp_path, config)))["root"]["path"] == str(rootfs)


def test_bind_mounts_accepted(tmp_path):
    src_dir = tmp_path / "data"
    src_dir.mkdir()
    (src_dir / "f").write_text("x")
    config = good_config()
    config["mounts"] = [{"destination": "/d", "type": "bind", "source": str(src_dir)},
                        {"destination": "/f", "type": "none", "source": str(src_dir / "f"),
                         "options": ["rbind", "ro"]}]
    mounts = rt.load_spec(str(make_bundle(tmp_path, config)))["mounts"]
    assert [m["type"] for m in mounts] == ["bind", "bind"]
    assert mounts[1]["options"] == ["rbind", "ro"]


@pytest.mark.parametrize("namespaces, expected", [
    ([], None), ([{"type": "pid"}, {"type": "mount"}], None), ([{"type": "network"}], "new"),
    ([{"type": "network", "path": "/proc/self/ns/net"}], "/proc/self/ns/net"),
])
def test_network_namespace(tmp_path, namespaces, expected):
    config = good_config()
    config["linux"] = {"namespaces": namespaces}
    netns = rt.load_spec(str(make_bundle(tmp_path, config)))["netns"]
    assert netns == expected


NS_FILES = {"cgroup": "cgroup", "ipc": "ipc", "mount": "mnt", "network": "net", "pid": "pid",
            "time": "time", "user": "user", "uts": "uts"}  # type -> its /proc/PID/ns name


def _namespaces_error(tmp_path, namespaces):
    """load_spec's error for a config with these linux.namespaces, or None."""
    config = good_config()
    config["linux"] = {"namespaces": namespaces}
    bundle = tmp_path / "bundle"
    if bundle.exists():
        write_json(bundle / "config.json", config)
    else:
        make_bundle(tmp_path, config)
    try:
        rt.load_spec(str(bundle))
    except rt.Error as e:
        return str(e)
    return None


@pytest.mark.parametrize("kind", sorted(NS_FILES))
def test_namespace_path_of_another_type_is_refused_naming_the_entry(tmp_path, kind):
    for other, name in NS_FILES.items():
        path = "/proc/self/ns/" + name
        msg = _namespaces_error(tmp_path, [{"type": "pid"}, {"type": "network"},
                                           {"type": kind, "path": path}])
        if other == kind:
            assert msg is None
        else:
            assert msg == "config.json: linux.namespaces[2]: %s is %s %s namespace, not %s" % (
                path, "an" if other == "ipc" else "a", other, kind)


def test_namespace_paths_of_the_right_type_are_kept_for_the_monitor(tmp_path):
    config = good_config()
    config["linux"] = {"namespaces": [{"type": "pid"}, {"type": "network"},
                                      {"type": "ipc", "path": "/proc/self/ns/ipc"},
                                      {"type": "uts", "path": "/proc/%d/ns/uts" % os.getpid()},
                                      {"type": "cgroup"}]}
    conf = rt.load_spec(str(make_bundle(tmp_path, config)))
    assert conf["namespaces"] == {"pid": "new", "network": "new", "ipc": "/proc/self/ns/ipc",
                                  "uts": "/proc/%d/ns/uts" % os.getpid(), "cgroup": "new"}


def test_namespace_path_that_is_no_namespace_is_refused_without_opening_it(tmp_path):
    (tmp_path / "regular").write_text("")
    os.mkfifo(str(tmp_path / "fifo"))  # opened, a FIFO would block the create
    cases = {str(tmp_path / "regular"): "%s is not a namespace file",
             str(tmp_path / "fifo"): "%s is not a namespace file",
             str(tmp_path): "%s is not a namespace file",
             "/dev/null": "%s is not a namespace file",
             str(tmp_path / "gone"): "%s: no such file or directory",
             "proc/self/ns/ipc": "must be an absolute path"}
    for path, what in cases.items():
        msg = _namespaces_error(tmp_path, [{"type": "network"}, {"type": "ipc", "path": path}])
        what = what % path if "%" in what else what
        assert msg == "config.json: linux.namespaces[1].path: " + what


def test_namespace_path_bind_mounted_elsewhere_is_recognised(tmp_path):
    holder = tmp_path / "uts"
    holder.write_text("")

    def probe():
        rt.mount("/proc/self/ns/uts", str(holder), None, rt.MS_BIND)  # as ip netns add binds one
        given = [{"type": "network"}, {"type": "uts", "path": str(holder)}]
        wrong = [{"type": "network"}, {"type": "ipc", "path": str(holder)}]
        return json.dumps([rt.namespace_type(str(holder)), _namespaces_error(tmp_path, given),
                           _namespaces_error(tmp_path, wrong)])

    assert json.loads(_in_mount_ns(probe)) == [
        "uts", None, "config.json: linux.namespaces[1]: %s is a uts namespace, not ipc" % holder]


def test_namespace_type_without_ns_get_nstype_accepts_nsfs_files_only(tmp_path, monkeypatch):
    def old_kernel(_fd, _request, *_args):
        raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")
    monkeypatch.setattr(rt.fcntl, "ioctl", old_kernel)
    (tmp_path / "regular").write_text("")
    assert rt.namespace_type("/proc/self/ns/ipc") == ""  # of unknown type: setns will check it
    assert rt.namespace_type(str(tmp_path / "regular")) is None


def test_create_refuses_a_wrong_namespace_path_before_anything_is_made(tmp_path):
    config = good_config()
    config["linux"]["namespaces"] = [{"type": "pid"}, {"type": "network"},
                                     {"type": "cgroup", "path": "/proc/self/ns/ipc"}]
    config["vm"] = {"path": "/nonexistent/qemu"}  # a create that went on would stop there, no VM
    bundle = make_bundle(tmp_path, config)
    root = tmp_path / "root"
    r = cli(tmp_path, "--root", root, "create", "--bundle", bundle, "c1")
    assert r.returncode == 1
    assert stderr_text(r.stderr) == ("config.json: linux.namespaces[2]: /proc/self/ns/ipc is an "
                                     "ipc namespace, not cgroup\n")
    assert not root.exists() or os.listdir(root) == []


@pytest.mark.parametrize("section", ["ociVersion", "root", "process"])
def test_missing_required_section(tmp_path, section):
    config = good_config()
    del config[section]
    assert spec_error(tmp_path, config) == "config.json: %s: missing" % section


def test_process_optional_when_not_needed(tmp_path):
    config = good_config()
    del config["process"]
    conf = rt.load_spec(str(make_bundle(tmp_path, config)), need_process=False)
    assert "process" not in conf


def test_unknown_sections_ignored(tmp_path):
    config = good_config()
    config.update({"solaris": {"anything": 1}, "windows": [], "x-custom": None})
    conf = rt.load_spec(str(make_bundle(tmp_path, config)))
    assert "solaris" not in conf and "x-custom" not in conf
    assert conf["hostname"] == "box"


def test_missing_bundle(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(rt.Error, match="^bundle %s: no such directory$" % re.escape(str(missing))):
        rt.load_spec(str(missing))


def test_bundle_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(rt.Error, match="no such directory"):
        rt.load_spec(str(f))


def test_missing_config_json(tmp_path):
    bundle = make_bundle(tmp_path, False)
    with pytest.raises(rt.Error) as exc:
        rt.load_spec(str(bundle))
    assert str(exc.value) == "config.json: %s: no such file or directory" % (bundle / "config.json")


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe{}", b'{"a": 1} trailing'])
def test_invalid_json(tmp_path, content):
    bundle = make_bundle(tmp_path, False)
    (bundle / "config.json").write_bytes(content)
    with pytest.raises(rt.Error) as exc:
        rt.load_spec(str(bundle))
    assert str(exc.value).startswith("config.json: %s: invalid JSON: " % (bundle / "config.json"))


@pytest.mark.parametrize("value", [[], "string", 3, None])
def test_non_object_json(tmp_path, value):
    bundle = make_bundle(tmp_path, False)
    write_json(bundle / "config.json", value)
    with pytest.raises(rt.Error, match="^config.json: must be a JSON object$"):
        rt.load_spec(str(bundle))


def test_parse_process_exec_style():
    p = rt.parse_process({"args": ["ls", "-l"], "cwd": "/a/b/../c/", "env": ["K=V"],
                          "terminal": True, "user": {"uid": 5}}, field="process.json")
    assert p == {"args": ["ls", "-l"], "env": ["K=V"], "cwd": "/a/c", "terminal": True,
                 "uid": 5, "gid": 0, "additionalGids": [], "umask": None, "rlimits": [],
                 "consoleSize": {"height": 0, "width": 0}, "noNewPrivileges": False,
                 "capabilities": None, "oomScoreAdj": None}


@pytest.mark.parametrize("process, message", [
    ({"args": []}, "process.json.args: must be a non-empty list of strings"),
    ({"args": ["ls"], "cwd": "."}, "process.json.cwd: must be an absolute path"),
    ({"args": ["ls"], "env": ["X"]}, "process.json.env: 'X' is not of the form NAME=VALUE"),
    ("ls", "process.json: must be an object"),
])
def test_parse_process_exec_style_errors(process, message):
    with pytest.raises(rt.Error) as exc:
        rt.parse_process(process, field="process.json")
    assert str(exc.value) == message


# ===========================================================================
# 3. hypervisor.args expansion and the QEMU command line
# ===========================================================================

def test_expand_args_tags_comments_and_lists():
    text = ("# a comment\n\n-name\n@NAME@\n  -m  \npath=@DIR@,size=@SIZE@\n"
            "@LIST@\n@EMPTY@\nuser@example.com\n")
    argv = rt.expand_args(text, {"NAME": "vm1", "DIR": "/d", "SIZE": 5, "LIST": ["-a", 1, "b c"],
                                 "EMPTY": []})
    assert argv == ["-name", "vm1", "-m", "path=/d,size=5", "-a", "1", "b c", "user@example.com"]


def test_expand_args_unknown_tag_names_line():
    text = "# comment\n\n-x\n@NOPE@\n"
    with pytest.raises(rt.Error) as exc:
        rt.expand_args(text, {}, "my.args")
    assert str(exc.value) == "my.args:4: unknown tag @NOPE@"


def test_expand_args_list_tag_inside_a_line():
    with pytest.raises(rt.Error, match=r"^hypervisor.args:1: unknown tag @L@$"):
        rt.expand_args("x=@L@", {"L": ["a"]})


def test_expand_args_none_value_is_unknown():
    with pytest.raises(rt.Error, match="unknown tag @A@"):
        rt.expand_args("@A@", {"A": None})


def test_real_hypervisor_args_tags():
    with open(HYPERVISOR_ARGS) as f:
        lines = [ln for ln in f if not ln.strip().startswith("#")]
    tags = set(re.findall(r"@([A-Z0-9_]+)@", "".join(lines)))
    assert {"NAME", "UUID", "MACHINE", "ACCEL", "CPU", "MEMORY", "CPUS", "KERNEL", "IMAGE",
            "KERNEL_PARAMS", "COMMS_SOCKET", "CONSOLE_DEVICE", "AGENT_CTL_SOCKET", "VIRTIO",
            "AGENT_PORT", "SHARES"} <= tags
    # (test_qemu_command_* check that qemu_command expands every one of them)


def fake_vm(tmp_path, **over):
    """The keys qemu_command reads from a resolve_vm result."""
    vm = {"qemu": "/usr/bin/qemu-fake", "accel_used": "kvm", "machine": "microvm",
          "memory": "512M", "cpus": 2, "kernel_image": str(tmp_path / "vmlinux"),
          "kernel": {"path": "", "parameters": "foo=bar"}, "hypervisor_args": HYPERVISOR_ARGS}
    vm.update(over)
    return vm


@pytest.fixture
def share_bundle(tmp_path):
    """A bundle whose config binds two files of one dir, one dir, and has a proc mount."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("a")
    (data / "b.txt").write_text("b")
    shared = tmp_path / "shared"
    shared.mkdir()
    config = good_config()
    config["mounts"] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/etc/a.txt", "type": "bind", "source": str(data / "a.txt")},
        {"destination": "/srv", "type": "none", "source": str(shared), "options": ["rbind"]},
        {"destination": "/etc/b.txt", "type": "bind", "source": str(data / "b.txt")},
    ]
    return make_bundle(tmp_path, config), data, shared


def test_qemu_command_microvm_kvm(tmp_path, share_bundle):
    bundle, data, shared = share_bundle
    conf = rt.load_spec(str(bundle))
    vm = fake_vm(tmp_path)
    argv = rt.qemu_command("c" * 40, vm, conf, str(tmp_path / "state"), "/images/initrd.cpio")
    assert argv[0] == "/usr/bin/qemu-fake"
    assert values_of(argv, "-accel") == ["kvm"]
    assert values_of(argv, "-cpu") == ["host"]
    assert values_of(argv, "-machine") == ["microvm,pit=on,pic=on,rtc=on"]
    assert values_of(argv, "-m") == ["512M"] and values_of(argv, "-smp") == ["2"]
    assert values_of(argv, "-name") == ["cc-" + "c" * 32]
    uuid.UUID(values_of(argv, "-uuid")[0])
    assert values_of(argv, "-kernel") == [str(tmp_path / "vmlinux")]
    assert values_of(argv, "-initrd") == ["/images/initrd.cpio"]
    append = values_of(argv, "-append")
    assert len(append) == 1
    assert append[0] == rt.BASE_KERNEL_PARAMS + " pci=off foo=bar"
    assert not any("@" in a for a in argv), "unexpanded tag"
    assert "virtio-serial-device" in values_of(argv, "-device")
    assert "virtserialport,chardev=agent,name=agent" in values_of(argv, "-device")
    files = tmp_path / "state" / rt.FILES_DIR / "rw"
    assert values_of(argv, "-fsdev") == [
        "local,id=fs0,path=%s,security_model=none,readonly=on" % (bundle / "rootfs"),
        "local,id=fs1,path=%s,security_model=none,multidevs=remap" % files,
        "local,id=fs2,path=%s,security_model=none" % shared,
        "local,id=fs3,path=%s,security_model=none,multidevs=remap" % (files.parent / "pod"),
    ]
    assert not any(str(data) in a for a in argv), "a file's parent directory is exported"
    devices_9p = [d for d in values_of(argv, "-device") if d.startswith("virtio-9p")]
    assert devices_9p == ["virtio-9p-device,fsdev=fs0,mount_tag=rootfs",
                          "virtio-9p-device,fsdev=fs1,mount_tag=share0",
                          "virtio-9p-device,fsdev=fs2,mount_tag=share1",
                          "virtio-9p-device,fsdev=fs3,mount_tag=share2"]


def test_qemu_command_q35_tcg(tmp_path, share_bundle, monkeypatch):
    monkeypatch.setattr(rt, "tsc_khz", lambda cpuinfo="/proc/cpuinfo": 2500000)
    conf = rt.load_spec(str(share_bundle[0]))
    argv = rt.qemu_command("c1", fake_vm(tmp_path, accel_used="tcg", machine="q35",
                                         kernel={"parameters": ""}), conf, "/s", "/i")
    assert values_of(argv, "-accel") == ["tcg"] and values_of(argv, "-cpu") == ["max"]
    assert values_of(argv, "-machine") == ["q35"]
    assert values_of(argv, "-append") == [rt.BASE_KERNEL_PARAMS]
    assert "virtio-serial-pci" in values_of(argv, "-device")
    assert "virtio-9p-pci,fsdev=fs0,mount_tag=rootfs" in values_of(argv, "-device")


def test_accel_option_caps_tcg_translation_cache(tmp_path):
    assert rt.accel_option({"accel_used": "tcg", "tcg_tb_size": 16}) == "tcg,tb-size=16"
    assert rt.accel_option({"accel_used": "tcg", "tcg_tb_size": 0}) == "tcg"
    assert rt.accel_option({"accel_used": "kvm", "tcg_tb_size": 16}) == "kvm"
    argv = rt.qemu_command("c1", fake_vm(tmp_path, accel_used="tcg", tcg_tb_size=24),
                           rt.load_spec(str(make_bundle(tmp_path, good_config()))), "/s", "/i")
    assert values_of(argv, "-accel") == ["tcg,tb-size=24"]


def test_kernel_params_microvm_tcg_sets_tsc(monkeypatch):
    monkeypatch.setattr(rt, "tsc_khz", lambda cpuinfo="/proc/cpuinfo": 2500000)
    vm = {"machine": "microvm", "kernel": {"parameters": "x=1"}}
    assert rt.kernel_params(vm, "tcg") == rt.BASE_KERNEL_PARAMS + " pci=off tsc_early_khz=2500000 x=1"
    assert rt.kernel_params(vm, "kvm") == rt.BASE_KERNEL_PARAMS + " pci=off x=1"


def test_container_config_reaches_the_init_in_pieces_as_one_message():
    """The agent hands the container's first process its config as one protocol message."""
    a, b = socket.socketpair()
    with a, b:
        frame = rt.FRAME.pack(rt.MSG, 0, 0)  # the header's size
        payload = rt.json_dumps({"id": "x" * 200000}).encode()
        data = rt.FRAME.pack(rt.MSG, 0, len(payload)) + payload
        a.sendall(data[:len(frame) - 1])
        a.sendall(data[len(frame) - 1:])
        assert rt.read_msg(b.fileno(), rt.FrameReader(), 30) == {"id": "x" * 200000}
        a.close()
        with pytest.raises(rt.Error):  # end of file: no config (the VM is going away)
            rt.read_msg(b.fileno(), rt.FrameReader(), 30)


def test_tsc_khz(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu MHz\t\t: 2995.123\nflags\t: fpu\n")
    assert rt.tsc_khz(str(cpuinfo)) == 2995123
    cpuinfo.write_text("processor\t: 0\n")
    assert rt.tsc_khz(str(cpuinfo)) is None
    assert rt.tsc_khz(str(tmp_path / "missing")) is None


def test_share_list_stages_files_not_their_directory(share_bundle, tmp_path):
    bundle, data, shared = share_bundle
    conf = rt.load_spec(str(bundle))
    shares = rt.share_list(conf, "/st")
    assert shares == [("rootfs", str(bundle / "rootfs"), True),
                      ("share0", "/st/files/rw", False), ("share1", str(shared), False),
                      ("share2", "/st/files/pod", False)]  # the pod export, on a spare slot
    assert conf["pod_tag"] == "share2"
    proc, a, srv, b = conf["mounts"]
    assert "share" not in proc
    assert (a["share"], a["subpath"]) == ("share0", "0")
    assert (b["share"], b["subpath"]) == ("share0", "1")
    assert (srv["share"], srv["subpath"]) == ("share1", "")
    assert conf["staged"] == [(str(data / "a.txt"), "/st/files/rw/0", False),
                              (str(data / "b.txt"), "/st/files/rw/1", False)]


def test_share_list_exports_read_only_mounts_read_only(share_bundle):
    bundle, data, shared = share_bundle
    config = json.loads((bundle / "config.json").read_text())
    config["root"]["readonly"] = True
    config["mounts"] = [
        {"destination": "/a", "type": "bind", "source": str(data / "a.txt"), "options": ["ro"]},
        {"destination": "/b", "type": "bind", "source": str(data / "b.txt"), "options": ["rw"]},
        {"destination": "/s1", "type": "bind", "source": str(shared), "options": ["rbind", "ro"]},
        {"destination": "/s2", "type": "bind", "source": str(shared), "options": ["ro", "rw"]},
        {"destination": "/s3", "type": "bind", "source": str(shared), "options": ["ro"]},
    ]
    (bundle / "config.json").write_text(json.dumps(config))
    conf = rt.load_spec(str(bundle))
    assert rt.share_list(conf, "/st") == [
        ("rootfs", str(bundle / "rootfs"), True), ("share0", "/st/files/ro", True),
        ("share1", "/st/files/rw", False), ("share2", str(shared), True),
        ("share3", str(shared), False)]
    assert [m["share"] for m in conf["mounts"]] == ["share0", "share1", "share2", "share3", "share2"]
    assert conf["staged"] == [(str(data / "a.txt"), "/st/files/ro/0", True),
                              (str(data / "b.txt"), "/st/files/rw/1", False)]


def test_bind_source_relative_to_the_bundle(tmp_path):
    config = good_config()
    config["mounts"] = [{"destination": "/b", "type": "bind", "source": "."}]
    bundle = make_bundle(tmp_path, config)
    assert rt.load_spec(str(bundle))["mounts"][0]["source"] == str(bundle)


def test_share_list_skips_special_files(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    conf = {"root": {"path": "/r", "readonly": False},
            "mounts": [{"destination": "/p", "type": "bind", "source": str(fifo), "options": []}]}
    assert rt.share_list(conf, "/st") == [("rootfs", "/r", False), ("share0", "/st/files/pod", False)]
    assert conf["mounts"][0]["skip"] is True and conf["staged"] == []
    assert rt.guest_config("c1", dict(conf, hostname=None, process={}, masked=[],
                                      readonly_paths=[], sysctl={}))["mounts"] == []


def test_share_args_escape_commas_and_mark_read_only():
    argv = rt.share_args([("rootfs", "/a,b/root", True), ("share0", "/x,,y", False)], "pci")
    assert argv == ["-fsdev", "local,id=fs0,path=/a,,b/root,security_model=none,readonly=on",
                    "-device", "virtio-9p-pci,fsdev=fs0,mount_tag=rootfs",
                    "-fsdev", "local,id=fs1,path=/x,,,,y,security_model=none",
                    "-device", "virtio-9p-pci,fsdev=fs1,mount_tag=share0"]


def test_resolve_in_root_keeps_symlinks_inside(tmp_path):
    root = tmp_path / "root"
    (root / "var" / "cache").mkdir(parents=True)
    os.symlink("/var/cache", root / "abs")
    os.symlink("../../../../etc", root / "var" / "up")
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
    r = str(root)
    assert rt.resolve_in_root(r, "/abs") == r + "/var/cache"
    assert rt.resolve_in_root(r, "/abs/new/x") == r + "/var/cache/new/x"
    assert rt.resolve_in_root(r, "/var/up/passwd") == r + "/etc/passwd"
    assert rt.resolve_in_root(r, "/../../x/./y/..") == r + "/x"
    assert rt.resolve_in_root(r, "/") == r
    with pytest.raises(rt.Error, match="too many levels of symbolic links"):
        rt.resolve_in_root(r, "/loop1/x")


def test_make_mountpoints_in_a_read_only_rootfs(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    os.symlink("/etc", root / "link")
    f = tmp_path / "hosts"
    f.write_text("x")
    mounts = [{"destination": "/proc", "type": "proc", "source": "proc"},
              {"destination": "/link/hosts", "type": "bind", "source": str(f)},
              {"destination": "/data/sub", "type": "bind", "source": str(tmp_path)},
              {"destination": "/dev/shm", "type": "tmpfs", "source": "shm"},
              {"destination": "/proc/sys/x", "type": "bind", "source": str(tmp_path)}]
    rt.make_mountpoints(str(root), mounts)
    assert os.path.isfile(root / "etc" / "hosts") and not os.path.exists(tmp_path / "etc")
    assert os.path.isdir(root / "data" / "sub") and os.path.isdir(root / "dev")
    assert not os.path.exists(root / "dev" / "shm"), "made inside the /dev tmpfs, not the rootfs"
    assert not os.path.exists(root / "proc" / "sys")
    os.chmod(root, 0o555)
    (root / "etc").chmod(0o555)
    rt.make_mountpoints(str(root), mounts)  # all there already: nothing to write
    shutil.rmtree(root / "data")
    (root / "data").write_text("a file where a directory must go")
    with pytest.raises(rt.Error, match="^root.readonly: mount point /data/sub: Not a directory$"):
        rt.make_mountpoints(str(root), mounts)


def _in_mount_ns(fn):
    """Run fn() in a child with a private mount namespace; its return value (a str) or error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            rt._check_libc(rt._libc().unshare(rt.CLONE_NEWNS), "unshare")
            rt.mount(None, "/", None, rt.MS_REC | rt.MS_PRIVATE)
            out = fn()
        except BaseException as e:
            out = "error: %s" % e
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return out


def test_stage_files_exports_only_the_given_files_read_only_where_asked(tmp_path):
    src = tmp_path / "engine"
    src.mkdir()
    (src / "hosts").write_text("hosts\n")
    (src / "secret").write_text("secret\n")
    (src / "init").write_text("init\n")
    state = tmp_path / "state"
    state.mkdir()
    files = str(state / rt.FILES_DIR)
    staged = [(str(src / "hosts"), files + "/rw/0", False), (str(src / "init"), files + "/ro/1", True)]

    def probe():
        rt.stage_files(str(state), staged)
        listing = {d: sorted(os.listdir(os.path.join(files, d))) for d in ("rw", "ro", "empty")}
        with open(files + "/rw/0", "a") as f:
            f.write("appended\n")
        results = []
        for path in (files + "/ro/1", files + "/rw/new", files + "/empty/new"):
            try:
                open(path, "w").close()
                results.append("written")
            except OSError as e:
                results.append(e.strerror)
        return json.dumps([listing, results])

    listing, results = json.loads(_in_mount_ns(probe))
    assert listing == {"rw": ["0"], "ro": ["1"], "empty": []}
    assert results == ["Read-only file system"] * 3
    assert (src / "hosts").read_text() == "hosts\nappended\n"
    assert os.listdir(files) == [], "the staging tmpfs lives in the monitor's namespace only"


def test_stage_files_names_a_source_that_cannot_be_bound(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    gone = str(tmp_path / "gone")
    out = _in_mount_ns(lambda: rt.stage_files(str(state), [(gone, str(state / "files/rw/0"), False)]) or "")
    assert out == "error: mounts: cannot export %s: No such file or directory" % gone


def test_qemu_command_escapes_commas_in_share_paths(tmp_path):
    bundle = make_bundle(tmp_path, name="bun,dle")
    argv = rt.qemu_command("c1", fake_vm(tmp_path), rt.load_spec(str(bundle)), "/s", "/i")
    escaped = str(bundle / "rootfs").replace(",", ",,")
    assert values_of(argv, "-fsdev")[0] == \
        "local,id=fs0,path=%s,security_model=none,readonly=on" % escaped


def test_qemu_command_passes_kernel_and_initrd_paths_verbatim(tmp_path):
    bundle = make_bundle(tmp_path)
    vm = fake_vm(tmp_path, kernel_image="/k,1/vmlinux")
    argv = rt.qemu_command("c1", vm, rt.load_spec(str(bundle)), "/s", "/img,2/initrd.cpio")
    assert values_of(argv, "-kernel") == ["/k,1/vmlinux"]
    assert values_of(argv, "-initrd") == ["/img,2/initrd.cpio"]


def test_hypervisor_args_from_the_bundle(tmp_path, monkeypatch):
    monkeypatch.setattr(rt, "CONFIG_DIRS", (REPO,))
    bundle = make_bundle(tmp_path)
    assert rt.find_config_file("hypervisor.args", str(bundle)) == HYPERVISOR_ARGS
    (bundle / "hypervisor.args").write_text("# mine\n-accel\n@ACCEL@\n@SHARES@\n")
    path = rt.find_config_file("hypervisor.args", str(bundle))
    assert path == str(bundle / "hypervisor.args")
    argv = rt.qemu_command("c1", fake_vm(tmp_path, hypervisor_args=path),
                           rt.load_spec(str(bundle)), "/s", "/i")
    assert argv == ["/usr/bin/qemu-fake", "-accel", "kvm", "-fsdev",
                    "local,id=fs0,path=%s,security_model=none,readonly=on" % (bundle / "rootfs"),
                    "-device", "virtio-9p-device,fsdev=fs0,mount_tag=rootfs",
                    "-fsdev", "local,id=fs1,path=/s/files/pod,security_model=none,multidevs=remap",
                    "-device", "virtio-9p-device,fsdev=fs1,mount_tag=share0"]


def test_hypervisor_args_error_names_file_and_line(tmp_path):
    args = tmp_path / "hv.args"
    args.write_text("-m\n@MEMORY@\n@TYPO@\n")
    with pytest.raises(rt.Error) as exc:
        rt.qemu_command("c1", fake_vm(tmp_path, hypervisor_args=str(args)),
                        rt.load_spec(str(make_bundle(tmp_path))), "/s", "/i")
    assert str(exc.value) == "%s:3: unknown tag @TYPO@" % args


# -- VM templates (warm start): argv and cache, without building one ----------

needs_template = pytest.mark.skipif(not hasattr(rt, "template_for"), reason="no VM templates")


@needs_template
@pytest.mark.parametrize("share, incoming", [(True, False), (False, True)])
def test_qemu_command_template(tmp_path, share, incoming):
    bundle = make_bundle(tmp_path)
    shares = rt.template_shares([("rootfs", str(bundle / "rootfs"), False)], "/empty")
    spec = {"ram": "/cache/tmpl,1/ram", "share": share, "incoming": incoming, "shares": shares}
    argv = rt.qemu_command("c1", fake_vm(tmp_path), None, None, "/i", spec, vm_uuid=rt.UUID_ZERO)
    assert values_of(argv, "-machine") == ["microvm,pit=on,pic=on,rtc=on,memory-backend=mem"]
    assert values_of(argv, "-object") == [
        "memory-backend-file,id=mem,size=512M,mem-path=/cache/tmpl,,1/ram,share=%s"
        % ("on" if share else "off")]
    assert values_of(argv, "-incoming") == (["defer"] if incoming else [])
    assert values_of(argv, "-uuid") == [rt.UUID_ZERO]
    assert len(values_of(argv, "-fsdev")) == rt.SHARE_SLOT_CLASSES[0] + 1
    assert all(f.endswith(",readonly=on") for f in values_of(argv, "-fsdev")[1:])
    assert not any("@" in a for a in argv)


@needs_template
def test_qemu_command_cold_boot_has_no_template_args(tmp_path):
    argv = rt.qemu_command("c1", fake_vm(tmp_path), rt.load_spec(str(make_bundle(tmp_path))),
                           "/s", "/i")
    assert "-object" not in argv and "-incoming" not in argv


@needs_template
def test_template_shares():
    small, slots = rt.SHARE_SLOT_CLASSES
    padded = rt.template_shares([("rootfs", "/r", False), ("share0", "/a", False)], "/e")
    assert padded == [("rootfs", "/r", False), ("share0", "/a", False)] + [
        ("share%d" % i, "/e", True) for i in range(1, small)], "the smaller template holds them"
    five = [("rootfs", "/r", False)] + [("share%d" % i, "/d%d" % i, False) for i in range(small + 1)]
    assert len(rt.template_shares(five, "/e")) == slots + 1, "one more: the larger template"
    full = [("rootfs", "/r", False)] + [("share%d" % i, "/d%d" % i, False) for i in range(slots)]
    assert rt.template_shares(full, "/e") == full
    assert rt.template_shares(full + [("share%d" % slots, "/x", False)], "/e") is None
    assert rt.template_shares(five, "/e", small) is None
    assert [rt.share_slots_for([None] * n) for n in (1, 5, 6, 9, 10)] == [4, 4, 8, 8, None]


@pytest.fixture
def template_inputs(tmp_path):
    """Fake qemu, kernel and image files and a vm dict for template_for."""
    for name in ("qemu", "vmlinux", "initrd"):
        (tmp_path / name).write_bytes(b"x")
    vm = fake_vm(tmp_path, qemu=str(tmp_path / "qemu"), kernel_image=str(tmp_path / "vmlinux"))
    return vm, str(tmp_path / "initrd")


@needs_template
def test_template_for_off(tmp_path, template_inputs, monkeypatch):
    vm, image = template_inputs
    monkeypatch.setattr(rt, "_build_template", lambda *a: pytest.fail("built"))
    assert rt.template_for(dict(vm, template=False), image) is None
    plain = tmp_path / "plain.args"
    plain.write_text("-accel\n@ACCEL@\n@SHARES@\n")
    assert rt.template_for(dict(vm, hypervisor_args=str(plain)), image) is None


@needs_template
def test_template_for_builds_once_per_input(tmp_path, template_inputs, monkeypatch, isolated):
    vm, image = template_inputs
    builds = []

    def fake_build(vm_, image_, spec, final):
        builds.append(final)
        os.makedirs(final)
        open(os.path.join(final, "state"), "w").close()
    monkeypatch.setattr(rt, "_build_template", fake_build)
    first = rt.template_for(vm, image)
    assert os.path.dirname(first) == str(isolated)
    assert os.path.basename(first).startswith("template-")
    assert rt.template_for(vm, image) == first and builds == [first]
    os.utime(image, ns=(1, 1))  # a new image is a new template
    second = rt.template_for(vm, image)
    assert second != first and builds == [first, second]
    assert rt.template_for(dict(vm, memory="1G"), image) not in (first, second)


@pytest.mark.skipif(not hasattr(rt, "prune_cache"), reason="no prune_cache")
def test_prune_cache(isolated):
    isolated.mkdir()
    old, new = time.time() - 7200, time.time()
    for name, when, is_dir in (("initrd-old.cpio", old, False), ("initrd-keep.cpio", old, False),
                               ("initrd-new.cpio", new, False), ("template-old", old, True),
                               ("manifest-old.json", old, False)):
        path = isolated / name
        path.mkdir() if is_dir else path.write_text("x")
        os.utime(path, (when, when))
    rt.prune_cache("initrd-", str(isolated / "initrd-keep.cpio"))
    rt.prune_cache("template-", None)
    assert sorted(os.listdir(isolated)) == ["initrd-keep.cpio", "initrd-new.cpio",
                                            "manifest-old.json"]


# ===========================================================================
# 4. vm.json lookup and validation
# ===========================================================================

@pytest.fixture
def config_dirs(tmp_path, monkeypatch):
    """Two config dirs, in lookup order, and a bundle."""
    dirs = [tmp_path / "etc", tmp_path / "share"]
    for d in dirs:
        d.mkdir()
    monkeypatch.setattr(rt, "CONFIG_DIRS", tuple(str(d) for d in dirs))
    return dirs, make_bundle(tmp_path)


def vm_json(directory, **vm):
    return write_json(directory / "vm.json", {"vm": vm})


def test_find_config_file_order(config_dirs):
    (etc, share), bundle = config_dirs
    vm_json(share)
    assert rt.find_config_file("vm.json", str(bundle)) == str(share / "vm.json")
    vm_json(etc)
    assert rt.find_config_file("vm.json", str(bundle)) == str(etc / "vm.json")
    vm_json(bundle)
    assert rt.find_config_file("vm.json", str(bundle)) == str(bundle / "vm.json")
    assert rt.find_config_file("vm.json") == str(etc / "vm.json")


def test_find_config_file_missing(config_dirs):
    (etc, share), bundle = config_dirs
    (etc / "vm.json").mkdir()  # a directory is not a config file
    with pytest.raises(rt.Error) as exc:
        rt.find_config_file("vm.json", str(bundle))
    assert str(exc.value) == "vm.json not found in %s, %s, %s" % (bundle, etc, share)


def test_load_vm_config_defaults(config_dirs):
    vm = rt.load_vm_config(str(config_dirs[1]))
    assert vm["vm_json"] is None
    assert {k: vm[k] for k in rt.DEFAULT_VM} == rt.DEFAULT_VM


def test_load_vm_config_layers(config_dirs):
    (etc, share), bundle = config_dirs
    vm_json(share, cpus=2, memory="1G", kernel={"parameters": "a=1"})
    vm = rt.load_vm_config(str(bundle))
    assert (vm["cpus"], vm["memory"], vm["vm_json"]) == (2, "1G", str(share / "vm.json"))
    assert vm["kernel"] == {"path": "", "parameters": "a=1"}
    vm_json(etc, cpus=3)
    assert rt.load_vm_config(str(bundle))["cpus"] == 3
    vm_json(bundle, cpus=4, accel="tcg")
    vm = rt.load_vm_config(str(bundle))
    assert (vm["cpus"], vm["accel"], vm["memory"]) == (4, "tcg", "256M")
    vm = rt.load_vm_config(str(bundle), {"cpus": 5, "kernel": {"path": "/k"}})
    assert (vm["cpus"], vm["accel"]) == (5, "tcg")
    assert vm["kernel"] == {"path": "/k", "parameters": ""}
    assert rt.DEFAULT_VM["kernel"] == {"path": "", "parameters": ""}, "defaults mutated"


def test_config_json_vm_wins_over_vm_json(config_dirs):
    (etc, _), _ = config_dirs
    vm_json(etc, machine="q35", cpus=2)
    config = good_config()
    config["vm"] = {"machine": "pc"}
    bundle = make_bundle(config_dirs[1].parent, config, name="b2")
    conf = rt.load_spec(str(bundle))
    vm = rt.load_vm_config(conf["bundle"], conf["vm"])
    assert (vm["machine"], vm["cpus"]) == ("pc", 2)


def test_repo_vm_json_loads(monkeypatch):
    monkeypatch.setattr(rt, "CONFIG_DIRS", (REPO,))
    vm = rt.load_vm_config()
    assert vm["vm_json"] == os.path.join(REPO, "vm.json")
    assert (vm["accel"], vm["machine"], vm["cpus"]) == ("auto", "microvm", 1)


@pytest.mark.parametrize("over, message", [
    ({"accel": "xen"}, "vm.accel: must be auto, kvm or tcg"),
    ({"accel": None}, "vm.accel: must be auto, kvm or tcg"),
    ({"machine": "virt"}, "vm.machine: must be microvm, q35 or pc"),
    ({"cpus": 0}, "vm.cpus: must be a positive integer"),
    ({"cpus": "2"}, "vm.cpus: must be a positive integer"),
    ({"cpus": True}, "vm.cpus: must be a positive integer"),
    ({"cpus": 1.5}, "vm.cpus: must be a positive integer"),
    ({"kernel": "/vmlinuz"}, "vm.kernel: must be an object"),
    ({"memory": ["1G"]}, "vm.memory: must be a size such as 256M"),
    ({"boot_timeout": 0}, "vm.boot_timeout: must be a positive number of seconds"),
    ({"boot_timeout": "60"}, "vm.boot_timeout: must be a positive number of seconds"),
    ({"tcg_tb_size": -1}, "vm.tcg_tb_size: must be a number of MiB (0: QEMU's default)"),
    ({"tcg_tb_size": "16"}, "vm.tcg_tb_size: must be a number of MiB (0: QEMU's default)"),
])
def test_bad_vm_values(config_dirs, over, message):
    (etc, _), bundle = config_dirs
    with pytest.raises(rt.Error) as exc:
        rt.load_vm_config(str(bundle), over)
    assert str(exc.value) == message
    vm_json(etc, **over)  # the same value from vm.json
    with pytest.raises(rt.Error) as exc:
        rt.load_vm_config(str(bundle))
    assert str(exc.value) == message


@pytest.mark.parametrize("content, fragment", [
    ('{"cpus": 1}', 'must hold an object "vm"'),
    ('{"vm": 3}', 'must hold an object "vm"'),
    ("[]", 'must hold an object "vm"'),
    ("{oops", "invalid JSON"),
])
def test_bad_vm_json_file(config_dirs, content, fragment):
    (etc, _), bundle = config_dirs
    (etc / "vm.json").write_text(content)
    with pytest.raises(rt.Error) as exc:
        rt.load_vm_config(str(bundle))
    assert str(exc.value).startswith("vm.json: %s: " % (etc / "vm.json"))
    assert fragment in str(exc.value)


# ===========================================================================
# 5. State
# ===========================================================================

@pytest.mark.parametrize("cid", ["abc", "a-b_c.1", "A" * rt.MAX_ID_LEN, "x.y", "ü"])
def test_validate_id_good(cid):
    assert rt.validate_id(cid) == cid


@pytest.mark.parametrize("cid, message", [
    ("", "container id cannot be empty"),
    ("a/b", "invalid container id: a/b"),
    ("/", "invalid container id: /"),
    ("..", "invalid container id: .."),
    (".", "invalid container id: ."),
    ("a..b", "invalid container id: a..b"),
    (".hidden", "invalid container id: .hidden"),
    ("x" * (rt.MAX_ID_LEN + 1), "invalid container id: longer than 1024 characters"),
    ("a b", "invalid container id: 'a b'"),
    ("a\tb", "invalid container id: 'a\\tb'"),
    ("a\nb", "invalid container id: 'a\\nb'"),
    ("a\x00b", "invalid container id: 'a\\x00b'"),
])
def test_validate_id_bad(cid, message):
    with pytest.raises(rt.Error) as exc:
        rt.validate_id(cid)
    assert str(exc.value) == message
    with pytest.raises(rt.Error):
        rt.State("/nonexistent", cid)


def test_state_make_save_load(tmp_path):
    root = tmp_path / "root"
    st = rt.State(str(root), "c1")
    assert not st.exists()
    st.make()
    assert stat.S_IMODE(os.stat(st.dir).st_mode) == 0o700
    assert st.lock_fd() is not None
    st.data = {"id": "c1", "n": 1}
    st.save()
    assert st.exists()
    assert rt.State(str(root), "c1").load() == {"id": "c1", "n": 1}
    assert os.listdir(st.dir) == ["state.json"]
    st.unlock()
    assert st.lock_fd() is None


def test_state_duplicate_id(tmp_path):
    rt.State(str(tmp_path), "c1").make()
    with pytest.raises(rt.Error, match="^container with id exists: c1$"):
        rt.State(str(tmp_path), "c1").make()


def test_state_make_overlong_name_is_an_error(tmp_path):
    with pytest.raises(rt.Error):
        rt.State(str(tmp_path), "a" * 300).make()


def test_state_load_errors(tmp_path):
    st = rt.State(str(tmp_path), "c1")
    with pytest.raises(rt.Error, match="^container does not exist$"):
        st.load()
    assert st.load(must_exist=False) == {}
    os.mkdir(st.dir)
    with open(st.path("state.json"), "w") as f:
        f.write("{half")
    with pytest.raises(rt.Error) as exc:
        st.load()
    assert str(exc.value) == "%s: corrupt state file" % st.path("state.json")


def test_state_lock_is_exclusive(tmp_path):
    st = rt.State(str(tmp_path), "c1")
    st.make()
    fd = os.open(st.dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st.unlock()
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_state_remove(tmp_path):
    st = rt.State(str(tmp_path), "c1")
    st.make()
    st.data = {"pid": 1}
    st.save()
    st.remove()
    assert not os.path.exists(st.dir) and st.lock_fd() is None


def me():
    return {"pid": os.getpid(), "pid_start": rt.proc_start_time(os.getpid())}


def dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("data, exit_json, status", [
    ({}, False, "creating"),
    ({"pid": 0}, False, "creating"),
    ("ME", False, "created"),
    ("ME+started", False, "running"),
    ("ME+paused", False, "paused"),
    ("ME", True, "stopped"),
    ("ME+wrongstart", False, "stopped"),
    ("DEAD", False, "stopped"),
    ("ME+deadqemu", False, "stopped"),
    ("ME+liveqemu", False, "running"),
    ("ME+creating", False, "creating"),
    ("DEAD+creating", False, "stopped"),
])
def test_state_status(tmp_path, data, exit_json, status):
    if isinstance(data, str):
        kind = data
        data = {"pid": dead_pid()} if kind.startswith("DEAD") else me()
        data["started"] = kind.endswith(("started", "paused", "qemu"))
        data["paused"] = kind.endswith("paused")
        data["creating"] = kind.endswith("creating")
        if kind.endswith("wrongstart"):
            data["pid_start"] += 1
        if kind.endswith("deadqemu"):
            data["vm"] = {"qemu_pid": dead_pid(), "qemu_start": 1}
        if kind.endswith("liveqemu"):
            data["vm"] = {"qemu_pid": os.getpid(), "qemu_start": data["pid_start"]}
    st = rt.State(str(tmp_path), "c1")
    st.make()
    st.data = data
    st.save()
    if exit_json:
        rt.write_atomic(st.path("exit.json"), json.dumps({"status": 0}))
    assert st.status() == status
    oci = st.oci_state()
    assert oci["status"] == status and oci["id"] == "c1"
    assert oci["pid"] == (0 if status == "stopped" else data.get("pid", 0))


def test_oci_state_fields(tmp_path):
    st = rt.State(str(tmp_path), "c1")
    st.data = dict(me(), bundle="/b", rootfs="/b/rootfs", created="2026-01-01T00:00:00Z",
                   annotations={"k": "v"}, started=True)
    assert st.oci_state() == {"ociVersion": rt.OCI_VERSION, "id": "c1", "pid": os.getpid(),
                              "status": "running", "bundle": "/b", "rootfs": "/b/rootfs",
                              "created": "2026-01-01T00:00:00Z", "annotations": {"k": "v"},
                              "owner": ""}


def test_proc_start_time_and_process_alive():
    start = rt.proc_start_time(os.getpid())
    assert isinstance(start, int) and start > 0
    assert rt.process_alive(os.getpid()) and rt.process_alive(os.getpid(), start)
    assert not rt.process_alive(os.getpid(), start + 1)
    assert not rt.process_alive(0) and not rt.process_alive(None)
    assert rt.proc_start_time(dead_pid()) is None


def test_proc_start_time_of_zombie_is_none():
    p = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open("/proc/%d/stat" % p.pid) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.01)
    assert rt.proc_start_time(p.pid) is None
    p.wait()


def test_wait_exit_returns_once_the_process_has_exited():
    p = subprocess.Popen(["sleep", "0.3"])
    try:
        target = (p.pid, rt.proc_start_time(p.pid))
        rt._wait_exit(target, time.monotonic() + 30)
        assert not rt.process_alive(*target)  # a zombie now: exited, not yet reaped
    finally:
        p.kill()
        p.wait()


def test_kill_container_kills_and_waits_for_monitor_and_qemu(tmp_path):
    monitor, qemu = subprocess.Popen(["sleep", "60"]), subprocess.Popen(["sleep", "60"])
    try:
        st = rt.State(str(tmp_path), "c1")
        st.data = {"pid": monitor.pid, "pid_start": rt.proc_start_time(monitor.pid),
                   "vm": {"qemu_pid": qemu.pid, "qemu_start": rt.proc_start_time(qemu.pid)}}
        rt._kill_container(st, wait=30)
        assert not rt.process_alive(monitor.pid) and not rt.process_alive(qemu.pid)
    finally:
        for p in (monitor, qemu):  # (run's monitor is its child: _kill_container reaps)
            p.kill()
            p.wait()


def test_kill_container_when_the_process_exits_between_two_looks(tmp_path, monkeypatch):
    """Alive for the kill and the loop's first look, gone at the next: no StopIteration."""
    monitor = subprocess.Popen(["sleep", "60"])
    try:
        looks = []
        monkeypatch.setattr(rt, "process_alive", lambda pid, start=None: bool(
            pid == monitor.pid and looks.append(pid) is None and len(looks) <= 2))
        st = rt.State(str(tmp_path), "c1")
        st.data = {"pid": monitor.pid, "pid_start": 1, "vm": {}}
        rt._kill_container(st, wait=5)
        assert monitor.wait(timeout=10) == -signal.SIGKILL
    finally:
        monitor.kill()
        monitor.wait()


def test_list_states(tmp_path):
    root = tmp_path / "root"
    assert rt.list_states(str(root)) == []
    for cid in ("b", "a"):
        st = rt.State(str(root), cid)
        st.make()
        st.data = {"id": cid}
        st.save()
    (root / "no-state").mkdir()
    (root / ".hidden").mkdir()
    (root / "stray-file").write_text("")
    assert [s.id for s in rt.list_states(str(root))] == ["a", "b"]


def test_write_atomic(tmp_path):
    path = tmp_path / "f.json"
    rt.write_atomic(str(path), "first")
    rt.write_atomic(str(path), b"second", mode=0o600)
    assert path.read_bytes() == b"second"
    assert os.listdir(tmp_path) == ["f.json"]
    rt.write_atomic(str(tmp_path / "g"), "x", mode=0o600)
    assert stat.S_IMODE(os.stat(tmp_path / "g").st_mode) == 0o600


def test_write_atomic_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError):
        rt.write_atomic(str(tmp_path / "nodir" / "f"), "x")


def test_write_atomic_failure_leaves_no_temp_file(tmp_path):
    (tmp_path / "target").mkdir()
    with pytest.raises(OSError):
        rt.write_atomic(str(tmp_path / "target"), "x")
    assert sorted(os.listdir(tmp_path)) == ["target"]


def test_concurrent_locked_increments(tmp_path):
    root, workers, rounds = str(tmp_path / "root"), 4, 50
    st = rt.State(root, "c1")
    st.make()
    st.data = {"n": 0}
    st.save()
    st.unlock()
    pids = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            code = 1
            try:
                for _ in range(rounds):
                    s = rt.State(root, "c1").lock()
                    s.load()
                    n = s.data["n"]
                    time.sleep(0)  # invite a race if the lock did not exclude
                    s.data["n"] = n + 1
                    s.save()
                    s.unlock()
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    statuses = [os.waitpid(pid, 0)[1] for pid in pids]
    assert statuses == [0] * workers
    assert rt.State(root, "c1").load()["n"] == workers * rounds
    assert os.listdir(os.path.join(root, "c1")) == ["state.json"]


# ===========================================================================
# 6. cpio writer
# ===========================================================================

def build_archive(with_devices=True):
    import io
    buf = io.BytesIO()
    w = rt.CpioWriter(buf)
    for n in range(8):
        w.add_file("files/size%d" % n, bytes(range(65, 65 + n)), 0o640, mtime=1234567890)
    w.add_dir("usr/lib/deep", 0o750)
    w.add_file("/abs/leading/slash", b"xyz")
    w.add_symlink("bin/sh", "../usr/bin/busybox")
    w.add_file("files/size1", b"duplicate ignored")
    if with_devices:
        w.add_device("dev/console", True, 5, 1)
        w.add_device("dev/sda", False, 8, 0, 0o660)
    w.add_file("init", b"#!/bin/sh\n", 0o755)
    w.close()
    return buf.getvalue()


def test_cpio_round_trip():
    data = build_archive()
    assert len(data) % 4 == 0
    entries = rt.read_cpio(data)
    for n in range(8):
        mode, body, rdev = entries["files/size%d" % n]
        assert (mode, body, rdev) == (0o100640, bytes(range(65, 65 + n)), (0, 0))
    for d in ("files", "usr", "usr/lib", "abs", "abs/leading", "bin", "dev"):
        assert entries[d][0] == 0o040755, d
    assert entries["usr/lib/deep"][0] == 0o040750
    assert entries["abs/leading/slash"][1] == b"xyz"
    assert entries["bin/sh"][:2] == (0o120777, b"../usr/bin/busybox")
    assert entries["dev/console"] == (0o020600, b"", (5, 1))
    assert entries["dev/sda"] == (0o060660, b"", (8, 0))
    assert entries["init"][:2] == (0o100755, b"#!/bin/sh\n")
    assert "TRAILER!!!" not in entries and not any(k.startswith("/") for k in entries)


def test_cpio_parents_come_first_and_inodes_are_unique():
    data = build_archive()
    names, inodes, pos = [], [], 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        name = data[pos + 110: pos + 110 + fields[11] - 1].decode()
        if name == "TRAILER!!!":
            break
        names.append(name)
        inodes.append(fields[0])
        start = pos + 110 + fields[11] + (-(110 + fields[11]) % 4)
        pos = start + fields[6] + (-fields[6] % 4)
    assert len(set(inodes)) == len(inodes)
    assert len(set(names)) == len(names)
    for i, name in enumerate(names):
        parent = os.path.dirname(name)
        assert not parent or parent in names[:i], name


def test_read_cpio_bad_magic():
    with pytest.raises(rt.Error, match="^cpio: bad magic at offset 0$"):
        rt.read_cpio(b"070707" + b"0" * 104)
    data = build_archive()
    second = data.index(b"070701", 6)
    with pytest.raises(rt.Error, match="^cpio: bad magic at offset %d$" % second):
        rt.read_cpio(data[:second] + b"XXXXXX" + data[second + 6:])


@pytest.mark.skipif(not shutil.which("cpio"), reason="no cpio binary")
def test_cpio_binary_reads_archive(tmp_path):
    data = build_archive(with_devices=False)
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=data, capture_output=True, check=True)
    assert set(listing.stdout.decode().split()) == set(rt.read_cpio(data))
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=data, cwd=out,
                   check=True, capture_output=True)
    assert (out / "files" / "size5").read_bytes() == b"ABCDE"
    assert (out / "files" / "size1").read_bytes() == b"A"
    assert os.readlink(out / "bin" / "sh") == "../usr/bin/busybox"
    assert stat.S_IMODE(os.stat(out / "init").st_mode) == 0o755
    assert os.stat(out / "files" / "size3").st_mtime == 1234567890


# ===========================================================================
# 7. Logging
# ===========================================================================

def log_lines(path):
    with open(path) as f:
        return f.read().splitlines()


def check_time(value):
    assert RFC3339_NS.match(value), value
    when = datetime.datetime.strptime(value[:19], "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=datetime.timezone.utc)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()) < 60


def check_log_time(value):
    """A log line's time as runc's logrus writes it: RFC 3339 in seconds, with its zone."""
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d)$", value), value
    when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert abs((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()) < 60


def test_configure_creates_files(tmp_path):
    log = rt.Log()
    log.configure(str(tmp_path / "log"), "json", str(tmp_path / "global"))
    assert (tmp_path / "log").read_text() == "" and (tmp_path / "global").read_text() == ""


def test_text_format(tmp_path):
    log = rt.Log()
    log.configure(str(tmp_path / "log"))
    log.info("hello %s", "world")
    log.warning('quote " and\nnewline')
    lines = log_lines(tmp_path / "log")
    assert len(lines) == 2
    m = re.match(r'^time="(\S+)" level=info msg="hello world"$', lines[0])
    assert m, lines[0]
    check_log_time(m.group(1))
    assert lines[1].endswith('level=warning msg="quote \\" and\\nnewline"')


def test_json_format(tmp_path):
    log = rt.Log()
    log.configure(str(tmp_path / "log"), "json")
    log.info("one")
    log.warning("two")
    log.error('three "quoted"\nline')
    records = [json.loads(ln) for ln in log_lines(tmp_path / "log")]
    assert [(r["level"], r["msg"]) for r in records] == [
        ("info", "one"), ("warning", "two"), ("error", 'three "quoted"\nline')]
    for r in records:
        assert set(r) == {"level", "msg", "time"}
        check_log_time(r["time"])
    assert log_lines(tmp_path / "log")[0] == '{"level":"info","msg":"one","time":"%s"}' % (
        records[0]["time"])  # compact, keys in logrus's order


def test_now_rfc3339():
    check_time(rt._now_rfc3339())


@pytest.mark.parametrize("debug, expected", [(False, ["info"]), (True, ["debug", "info"])])
def test_debug_lines_only_with_debug(tmp_path, debug, expected):
    log = rt.Log()
    log.configure(str(tmp_path / "log"), "json", str(tmp_path / "global"), debug=debug)
    log.debug("detail %d", 1)
    log.info("event")
    assert [json.loads(ln)["level"] for ln in log_lines(tmp_path / "log")] == expected
    assert len(log_lines(tmp_path / "global")) == len(expected)


def test_global_log_has_container_id(tmp_path):
    log = rt.Log()
    log.configure(None, "text", str(tmp_path / "global"))
    log.info("without id")
    log.container_id = "c1"
    log.error("boom")
    first, second = log_lines(tmp_path / "global")
    pid = os.getpid()
    assert re.match(r"^\S+ cc-oci-runtime\[%d\] info -: without id$" % pid, first), first
    assert re.match(r"^\S+ cc-oci-runtime\[%d\] error c1: boom$" % pid, second), second
    check_time(second.split()[0])


@pytest.mark.parametrize("where", ["missing-dir", "directory"])
def test_unwritable_log_falls_back_to_syslog(tmp_path, monkeypatch, where):
    import syslog
    calls = []
    monkeypatch.setattr(syslog, "syslog", lambda *a: calls.append(a))
    path = tmp_path / "nodir" / "log" if where == "missing-dir" else tmp_path
    log = rt.Log()
    log.configure(str(path), "json", str(path))
    log.container_id = "c1"
    log.info("hello")
    log.error("bad")
    assert calls == [(syslog.LOG_INFO, "c1: hello")] * 2 + [(syslog.LOG_ERR, "c1: bad")] * 2


def test_no_log_configured_writes_nothing(tmp_path, monkeypatch, capsys):
    import syslog
    monkeypatch.setattr(syslog, "syslog", lambda *a: pytest.fail("syslog used"))
    log = rt.Log()
    log.configure()
    log.info("x")
    log.error("y")
    assert capsys.readouterr() == ("", "")


# ===========================================================================
# 8. Signals and exit statuses
# ===========================================================================

@pytest.mark.parametrize("value, expected", [
    ("KILL", 9), ("SIGKILL", 9), ("kill", 9), ("sigkill", 9), ("9", 9), (9, 9), (" 9 ", 9),
    ("TERM", 15), ("SIGTERM", 15), ("HUP", 1), ("usr1", int(signal.SIGUSR1)), ("1", 1),
    ("64", 64), ("WINCH", int(signal.SIGWINCH)), ("0", 0), (0, 0),
])
def test_parse_signal_good(value, expected):
    assert rt.parse_signal(value) == expected


@pytest.mark.parametrize("value", ["", "BOGUS", "SIGBOGUS", "SIG", "9x", "KILL9", "SIG KILL", "1.5",
                                   "SIG_DFL", "__class__", "²", 'a"b'])
def test_parse_signal_unknown_name(value):
    with pytest.raises(rt.Error) as exc:
        rt.parse_signal(value)
    assert str(exc.value) == "unknown signal %s" % json.dumps(value, ensure_ascii=False)


@pytest.mark.parametrize("value", ["65", 65, "-9", "99"])
def test_parse_signal_number_without_signal(value):
    """runc passes any number to kill(2), which fails with EINVAL."""
    with pytest.raises(rt.Error) as exc:
        rt.parse_signal(value)
    assert str(exc.value) == "unable to signal init: invalid argument"


@pytest.mark.parametrize("wait_status, code", [(0, 0), (3 << 8, 3), (255 << 8, 255), (9, 137),
                                               (15, 143), (2, 130)])
def test_exit_status(wait_status, code):
    assert rt.exit_status(wait_status) == code


def test_exit_status_of_real_children():
    p = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(7)"])
    assert rt.exit_status(os.waitpid(p.pid, 0)[1]) == 7
    p.returncode = 7  # reaped above
    p = subprocess.Popen(["sleep", "30"])
    os.kill(p.pid, signal.SIGKILL)
    assert rt.exit_status(os.waitpid(p.pid, 0)[1]) == 137
    p.returncode = -9  # reaped above


# ===========================================================================
# 9. Accelerator choice
# ===========================================================================

@pytest.fixture
def accel_files(tmp_path):
    def make(flags):
        cpuinfo = tmp_path / ("cpuinfo-" + flags.replace(" ", "_"))
        cpuinfo.write_text("processor\t: 0\nvendor_id\t: Test\nflags\t\t: %s\n\n"
                           "processor\t: 1\nflags\t\t: %s\n" % (flags, flags))
        return str(cpuinfo)
    kvm = tmp_path / "kvm"
    kvm.write_text("")
    return make, str(kvm), str(tmp_path / "no-kvm"), str(tmp_path)


@pytest.mark.parametrize("flags, kvm_kind, expected", [
    ("fpu vme vmx sse", "ok", "kvm"),
    ("fpu svm sse", "ok", "kvm"),
    ("fpu vmx sse", "missing", "tcg"),
    ("fpu vmx sse", "directory", "tcg"),
    ("fpu sse hypervisor", "ok", "tcg"),
    ("fpu vmxx svmm", "ok", "tcg"),
])
def test_choose_accel_auto(accel_files, flags, kvm_kind, expected):
    make, kvm_ok, kvm_missing, kvm_dir = accel_files
    kvm = {"ok": kvm_ok, "missing": kvm_missing, "directory": kvm_dir}[kvm_kind]
    assert rt.choose_accel("auto", cpuinfo=make(flags), kvm=kvm) == expected
    assert rt.hw_virt_available(make(flags), kvm) is (expected == "kvm")


def test_choose_accel_without_cpuinfo(accel_files, tmp_path):
    _, kvm_ok, _, _ = accel_files
    assert rt.choose_accel("auto", cpuinfo=str(tmp_path / "none"), kvm=kvm_ok) == "tcg"
    empty = tmp_path / "empty"
    empty.write_text("processor\t: 0\n")
    assert rt.choose_accel("auto", cpuinfo=str(empty), kvm=kvm_ok) == "tcg"


@pytest.mark.parametrize("requested", ["kvm", "tcg"])
def test_choose_accel_explicit(accel_files, requested):
    make, kvm_ok, kvm_missing, _ = accel_files
    assert rt.choose_accel(requested, cpuinfo=make("fpu"), kvm=kvm_missing) == requested
    assert rt.choose_accel(requested, cpuinfo=make("vmx"), kvm=kvm_ok) == requested


# ===========================================================================
# 10. Other helpers
# ===========================================================================

# -- mount options ----------------------------------------------------------

@pytest.mark.parametrize("options, flags, data", [
    ([], 0, ""),
    (["ro"], rt.MS_RDONLY, ""),
    (["ro", "rw"], 0, ""),
    (["nosuid", "nodev", "noexec", "mode=755", "size=65536k"],
     rt.MS_NOSUID | rt.MS_NODEV | rt.MS_NOEXEC, "mode=755,size=65536k"),
    (["rbind", "rprivate", "ro"], rt.MS_BIND | rt.MS_REC | rt.MS_RDONLY, ""),
    (["bind", "shared", "slave", "unbindable"], rt.MS_BIND, ""),
    (["noatime", "atime", "strictatime"], rt.MS_STRICTATIME, ""),
    (["nosuid", "suid", "relatime", "norelatime", "sync"], rt.MS_SYNCHRONOUS, ""),
    (["newinstance", "ptmxmode=0666", "gid=5"], 0, "newinstance,ptmxmode=0666,gid=5"),
])
def test_mount_options(options, flags, data):
    assert rt.mount_options(options) == (flags, data)


def test_mount_option_defaults_is_not_fs_data():
    assert rt.mount_options(["defaults", "mode=755"]) == (0, "mode=755")


# -- executable lookup ------------------------------------------------------

@pytest.fixture
def exe_tree(tmp_path):
    bin1, bin2, cwd = tmp_path / "bin1", tmp_path / "bin2", tmp_path / "work"
    for d in (bin1, bin2, cwd, bin1 / "adir"):
        d.mkdir()
    for path, mode in ((bin1 / "tool", 0o644), (bin2 / "tool", 0o755), (bin1 / "only1", 0o755),
                       (cwd / "local", 0o755), (cwd / "noexec", 0o644)):
        path.write_text("#!/bin/sh\n")
        path.chmod(mode)
    return {"bin1": str(bin1), "bin2": str(bin2), "cwd": str(cwd),
            "env": ["A=1", "PATH=%s:%s" % (bin1, bin2)]}


def test_resolve_executable_in_path(exe_tree):
    t = exe_tree
    assert rt.resolve_executable("tool", t["env"]) == os.path.join(t["bin2"], "tool")
    assert rt.resolve_executable("only1", t["env"]) == os.path.join(t["bin1"], "only1")


def test_resolve_executable_default_path(exe_tree, monkeypatch):
    monkeypatch.setattr(rt, "DEFAULT_PATH", exe_tree["bin2"])
    assert rt.resolve_executable("tool", ["A=1"]) == os.path.join(exe_tree["bin2"], "tool")


def test_resolve_executable_with_slash(exe_tree):
    t = exe_tree
    absolute = os.path.join(t["cwd"], "local")
    assert rt.resolve_executable(absolute, t["env"]) == absolute
    assert rt.resolve_executable("./local", t["env"], t["cwd"]) == "./local"


@pytest.mark.parametrize("name, cwd, message", [
    ("nope", "/", 'exec: "nope": executable file not found in $PATH: no such file or directory'),
    ("adir", "/", 'exec: "adir": executable file not found in $PATH: no such file or directory'),
    ("./missing", "CWD", 'exec: "./missing": stat ./missing: no such file or directory'),
    ("/nonexistent/x", "/", 'exec: "/nonexistent/x": stat /nonexistent/x: no such file or directory'),
    ("./noexec", "CWD", 'exec: "./noexec": permission denied'),
    ("BIN1/adir", "/", 'exec: "BIN1/adir": permission denied'),
])
def test_resolve_executable_errors(exe_tree, name, cwd, message):
    name = name.replace("BIN1", exe_tree["bin1"])
    message = message.replace("BIN1", exe_tree["bin1"])
    with pytest.raises(rt.Error) as exc:
        rt.resolve_executable(name, exe_tree["env"], exe_tree["cwd"] if cwd == "CWD" else cwd)
    assert str(exc.value) == message


# -- kernel lookup ----------------------------------------------------------

def kernel_tree(tmp_path, boot_versions, module_versions):
    boot, mods = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    mods.mkdir()
    for v in boot_versions:
        (boot / ("vmlinuz-" + v)).write_bytes(b"kernel")
        (boot / ("config-" + v)).write_text("")
    for v in module_versions:
        (mods / v).mkdir()
    return str(boot), str(mods)


def test_find_kernel_newest_with_modules(tmp_path):
    boot, mods = kernel_tree(tmp_path, ["5.10.0-1-amd64", "6.9.0-1-amd64", "6.10.0-1-amd64",
                                        "7.0.0-1-amd64"],
                             ["5.10.0-1-amd64", "6.9.0-1-amd64", "6.10.0-1-amd64"])
    assert rt.find_kernel(boot, mods) == (os.path.join(boot, "vmlinuz-6.10.0-1-amd64"),
                                          "6.10.0-1-amd64")


def test_find_kernel_none(tmp_path):
    boot, mods = kernel_tree(tmp_path, ["6.1.0-1-amd64"], ["6.2.0-1-amd64"])
    with pytest.raises(rt.Error, match="^no kernel found: no %s/vmlinuz-\\* with a matching %s "
                       % (re.escape(boot), re.escape(mods))):
        rt.find_kernel(boot, mods)
    with pytest.raises(rt.Error, match="no kernel found"):
        rt.find_kernel(str(tmp_path / "no-boot"), mods)


def test_find_kernel_mixed_version_shapes(tmp_path):
    boot, mods = kernel_tree(tmp_path, ["5.10.0-custom", "5.10.0-1-amd64"],
                             ["5.10.0-custom", "5.10.0-1-amd64"])
    path, version = rt.find_kernel(boot, mods)
    assert version in ("5.10.0-custom", "5.10.0-1-amd64")


@pytest.mark.parametrize("path, version", [
    ("/boot/vmlinuz-6.1.0-13-amd64", "6.1.0-13-amd64"), ("/x/vmlinux-6.2", "6.2"),
    ("/x/bzImage-6.3-rc1", "6.3-rc1"), ("/x/kernel", os.uname().release),
])
def test_kernel_version_of(path, version):
    assert rt.kernel_version_of(path) == version


# -- kernel modules ---------------------------------------------------------

MODULES_DEP = """\
kernel/drivers/virtio/virtio_mmio.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz kernel/drivers/virtio/virtio.ko.xz
kernel/drivers/virtio/virtio.ko.xz:
kernel/drivers/virtio/virtio_ring.ko.xz: kernel/drivers/virtio/virtio.ko.xz
kernel/drivers/char/virtio_console.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz kernel/drivers/virtio/virtio.ko.xz
kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz kernel/drivers/virtio/virtio.ko.xz
kernel/net/9p/9pnet.ko.xz:
kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz kernel/fs/fscache/fscache.ko.xz
kernel/fs/fscache/fscache.ko.xz: kernel/fs/netfs/netfs.ko.xz
kernel/fs/netfs/netfs.ko.xz:
kernel/drivers/unrelated/other-mod.ko.xz:
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz
kernel/net/core/failover.ko.xz:
"""


def test_guest_modules_order(tmp_path):
    (tmp_path / "modules.dep").write_text(MODULES_DEP)
    (tmp_path / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    paths = rt.guest_modules(str(tmp_path))
    rel = [os.path.relpath(p, tmp_path) for p in paths]
    names = [rt._module_name(p) for p in rel]
    assert sorted(names) == sorted(["virtio", "virtio_ring", "virtio_mmio", "virtio_console",
                                    "9pnet", "9pnet_virtio", "netfs", "fscache", "9p",
                                    "failover", "net_failover", "virtio_net"])
    assert len(set(rel)) == len(rel)
    deps = {}
    for line in MODULES_DEP.splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    for i, path in enumerate(rel):
        for dep in deps[path]:
            assert dep in rel[:i], "%s before %s" % (dep, path)
    assert names[-1] == "virtio_net"


def test_guest_modules_other_names_and_dashes(tmp_path):
    (tmp_path / "modules.dep").write_text(MODULES_DEP)
    paths = rt.guest_modules(str(tmp_path), ["other_mod", "9p"])
    assert rt._module_name(paths[0]) == "other_mod"


def test_guest_modules_missing(tmp_path):
    (tmp_path / "modules.dep").write_text(MODULES_DEP)
    with pytest.raises(rt.Error) as exc:
        rt.guest_modules(str(tmp_path))  # virtio_pci: neither in modules.dep nor built in
    assert str(exc.value) == "kernel module virtio_pci not found in %s" % tmp_path
    with pytest.raises(rt.Error) as exc:
        rt.guest_modules(str(tmp_path / "nowhere"))
    assert str(exc.value) == ("kernel modules: %s/modules.dep not found (install the kernel's "
                              "modules)" % (tmp_path / "nowhere"))


def test_cached_guest_modules_is_keyed_by_modules_dep(tmp_path, monkeypatch):
    mods, cache = tmp_path / "mods", tmp_path / "cache"
    mods.mkdir()
    monkeypatch.setattr(rt, "CACHE_DIR", str(cache))
    (mods / "modules.dep").write_text(MODULES_DEP)
    (mods / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    first = rt._cached_guest_modules(str(mods))
    assert first == rt.guest_modules(str(mods))
    entries = [e for e in os.listdir(cache) if e.startswith("modules-")]
    assert len(entries) == 1
    with open(cache / entries[0]) as f:
        assert json.load(f) == first  # served from here while modules.dep is unchanged
    (mods / "modules.dep").write_text(MODULES_DEP.replace("virtio_net.ko.xz:",
                                                          "virtio_net.ko.xz: extra.ko")
                                      + "extra.ko:\n")
    second = rt._cached_guest_modules(str(mods))  # a new modules.dep: parsed again
    assert str(mods / "extra.ko") in second and second == rt.guest_modules(str(mods))
    for entry in os.listdir(cache):
        with open(cache / entry, "w") as f:
            f.write("{not json")
    assert rt._cached_guest_modules(str(mods)) == second  # a bad entry is rebuilt


def test_cached_guest_modules_without_a_writable_cache(tmp_path, monkeypatch):
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "modules.dep").write_text(MODULES_DEP)
    (mods / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(rt, "CACHE_DIR", str(tmp_path / "file" / "cache"))  # cannot exist
    assert rt._cached_guest_modules(str(mods)) == rt.guest_modules(str(mods))


def test_sha256_and_uuid4_as_the_standard_library_makes_them():
    import hashlib
    assert rt.sha256(b"cc-oci").hexdigest() == hashlib.sha256(b"cc-oci").hexdigest()
    ids = {rt.uuid4() for _ in range(100)}
    assert len(ids) == 100
    for u in ids:
        assert str(uuid.UUID(u)) == u and uuid.UUID(u).version == 4 and uuid.UUID(u).variant == uuid.RFC_4122


def test_module_bytes(tmp_path):
    payload = b"\x7fELF module"
    (tmp_path / "a.ko").write_bytes(payload)
    (tmp_path / "b.ko.xz").write_bytes(lzma.compress(payload))
    (tmp_path / "c.ko.gz").write_bytes(gzip.compress(payload))
    (tmp_path / "d.ko.zst").write_bytes(b"zstd")
    for name in ("a.ko", "b.ko.xz", "c.ko.gz"):
        assert rt._module_bytes(str(tmp_path / name)) == payload
    with pytest.raises(rt.Error, match="zstd-compressed modules are not supported"):
        rt._module_bytes(str(tmp_path / "d.ko.zst"))


# -- kernel decompression ---------------------------------------------------

FAKE_ELF = b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 40


@pytest.mark.parametrize("compress", [lambda d: lzma.compress(d), lambda d: gzip.compress(d)],
                         ids=["xz", "gzip"])
def test_decompress_payload(compress):
    decoy = lzma.compress(b"not an elf") + gzip.compress(b"not an elf either")
    image = (b"MZ" + b"\x00" * 500 + b"\xfd7zXZ\x00garbage" + b"\x1f\x8b\x08junk" + decoy +
             compress(FAKE_ELF) + b"\x00" * 64)
    assert rt._decompress_payload(image) == FAKE_ELF


def test_decompress_payload_none():
    assert rt._decompress_payload(b"MZ" + b"\x00" * 1000) is None
    assert rt._decompress_payload(b"\xfd7zXZ\x00 broken stream") is None
    assert rt._decompress_payload(gzip.compress(b"plain text")) is None


def test_uncompressed_kernel_cache(tmp_path, monkeypatch):
    cache = tmp_path / "kcache"
    bz = tmp_path / "vmlinuz-9.9.9"
    bz.write_bytes(b"MZ" + b"\x00" * 100 + lzma.compress(FAKE_ELF))
    out = rt.uncompressed_kernel(str(bz), str(cache))
    assert os.path.dirname(out) == str(cache)
    assert os.path.basename(out).startswith("vmlinux-vmlinuz-9.9.9-")
    with open(out, "rb") as f:
        assert f.read() == FAKE_ELF
    monkeypatch.setattr(rt, "_decompress_payload", lambda data: pytest.fail("not cached"))
    assert rt.uncompressed_kernel(str(bz), str(cache)) == out
    assert os.listdir(cache) == [os.path.basename(out)]


def test_uncompressed_kernel_elf_or_unknown(tmp_path):
    cache = tmp_path / "kcache"
    elf = tmp_path / "vmlinux"
    elf.write_bytes(FAKE_ELF)
    assert rt.uncompressed_kernel(str(elf), str(cache)) == str(elf)
    other = tmp_path / "vmlinuz-raw"
    other.write_bytes(b"MZ" + b"\x00" * 100)
    assert rt.uncompressed_kernel(str(other), str(cache)) == str(other)
    assert not cache.exists()


# -- ELF interpreter --------------------------------------------------------

def test_elf_interpreter_of_python():
    interp = rt.elf_interpreter(os.path.realpath(sys.executable))
    if interp is None:
        pytest.skip("statically linked python")
    assert interp.startswith("/") and os.path.exists(interp)
    assert "ld" in os.path.basename(interp)


def test_elf_interpreter_not_elf(tmp_path):
    (tmp_path / "script").write_text("#!/bin/sh\n")
    assert rt.elf_interpreter(str(tmp_path / "script")) is None
    (tmp_path / "elf32").write_bytes(b"\x7fELF\x01" + b"\x00" * 59)
    assert rt.elf_interpreter(str(tmp_path / "elf32")) is None


# -- agent protocol ---------------------------------------------------------

def test_frames_over_a_pipe():
    r, w = os.pipe()
    try:
        rt.send_msg(w, {"op": "create", "n": [1, 2]})
        rt.send_data(w, rt.stream_id(1, 2), b"\x00bytes\xff")
        rt.send_data(w, rt.stream_id(0, 0), b"")
        rt.send_msg(w, {"op": "exit", "status": 3})
        os.close(w)
        w = None
        raw = b""
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            raw += chunk
    finally:
        os.close(r)
        if w is not None:
            os.close(w)
    expected = [(rt.MSG, 0, {"op": "create", "n": [1, 2]}), (rt.DATA, 6, b"\x00bytes\xff"),
                (rt.DATA, 0, b""), (rt.MSG, 0, {"op": "exit", "status": 3})]
    assert rt.FrameReader().feed(raw) == expected
    reader, frames = rt.FrameReader(), []
    for i in range(len(raw)):  # one byte at a time
        frames += reader.feed(raw[i:i + 1])
    assert frames == expected and reader.buf == bytearray()


def test_frame_reader_large_payload_in_chunks():
    payload = os.urandom(200000)
    raw = rt.FRAME.pack(rt.DATA, 5, len(payload)) + payload + rt.FRAME.pack(rt.MSG, 0, 2) + b"{}"
    reader, frames = rt.FrameReader(), []
    for i in range(0, len(raw), 7001):
        frames += reader.feed(raw[i:i + 7001])
    assert frames == [(rt.DATA, 5, payload), (rt.MSG, 0, {})]


def test_stream_id():
    assert [rt.stream_id(p, fd) for p, fd in ((0, 0), (0, 2), (1, 1), (3, 2))] == [0, 2, 5, 14]


def test_read_msg_skips_data_and_times_out():
    r, w = os.pipe()
    try:
        rt.send_data(w, 1, b"out")
        rt.send_msg(w, {"ok": True})
        assert rt.read_msg(r, rt.FrameReader(), 5) == {"ok": True}
        with pytest.raises(rt.Error, match="^timed out waiting for the container's monitor$"):
            rt.read_msg(r, rt.FrameReader(), 0.05)
        os.close(w)
        w = None
        with pytest.raises(rt.Error, match="closed the connection"):
            rt.read_msg(r, rt.FrameReader(), 5)
    finally:
        os.close(r)
        if w is not None:
            os.close(w)


def test_monitor_request_without_monitor(tmp_path):
    st = rt.State(str(tmp_path), "c1")
    st.make()
    with pytest.raises(rt.Error, match="^container not running$"):
        rt.monitor_request(st, {"op": "start"})


def _bare_monitor(agent_fd, client_fd):
    """A Monitor with just what its request relay uses (no VM, no QEMU)."""
    m = object.__new__(rt.Monitor)
    m.pending, m.procs, m.next_id, m.next_proc, m.signals = {}, {}, 1, 1, []
    m.agent, m.exit_code, m.stdin, m.stdout, m.stderr = agent_fd, None, None, None, None
    m.clients = {client_fd: {"reader": rt.FrameReader()}}
    return m


def test_monitor_answers_start_once_sent_and_a_later_failure_is_the_workload_stderr():
    agent, guest = socket.socketpair()
    client, cli = socket.socketpair()
    err_r, err_w = os.pipe()
    try:
        m = _bare_monitor(agent.fileno(), client.fileno())
        m.stderr = err_w
        m._on_client_msg(client.fileno(), {"op": "start"})
        assert rt.read_msg(cli.fileno(), rt.FrameReader(), 5) == {"op": "started"}
        assert rt.read_msg(guest.fileno(), rt.FrameReader(), 5) == {"op": "start", "id": 1}
        assert m.signals == [signal.SIGWINCH]  # the terminal size follows the start
        m._on_agent_msg({"id": 1, "error": "cannot open the container's pty"})
        m._on_client_msg(client.fileno(), {"op": "ps"})  # other requests still wait for the agent
        assert rt.read_msg(guest.fileno(), rt.FrameReader(), 5) == {"op": "ps", "id": 2}
        m._on_agent_msg({"id": 2, "procs": []})
        assert rt.read_msg(cli.fileno(), rt.FrameReader(), 5) == {"procs": []}
        os.close(err_w)
        err_w = None
        assert os.read(err_r, 200) == b"cannot open the container's pty\n"
    finally:
        for s in (agent, guest, client, cli):
            s.close()
        os.close(err_r)
        if err_w is not None:
            os.close(err_w)


def test_monitor_start_of_a_gone_vm_is_an_error():
    agent, guest = socket.socketpair()
    client, cli = socket.socketpair()
    try:
        m = _bare_monitor(agent.fileno(), client.fileno())
        m.exit_code = 137
        m._on_client_msg(client.fileno(), {"op": "start"})
        assert rt.read_msg(cli.fileno(), rt.FrameReader(), 5) == {"error": "container not running"}
        assert m.signals == []
    finally:
        for s in (agent, guest, client, cli):
            s.close()


def test_read_line_leaves_the_rest_in_the_pipe_and_stops_at_eof_or_deadline():
    r, w = os.pipe()
    try:
        os.write(w, b"namespaces\n{\"ok\": true}\n")
        assert rt._read_line(r, time.monotonic() + 5) == b"namespaces"
        assert rt._read_line(r, time.monotonic() + 5) == b'{"ok": true}'
        assert rt._read_line(r, time.monotonic() + 0.05) == b""  # nothing more yet: deadline
        os.write(w, b"partial")
        os.close(w)
        w = None
        assert rt._read_line(r, time.monotonic() + 5) == b"partial"  # then EOF
    finally:
        os.close(r)
        if w is not None:
            os.close(w)


NS_LINKS = ("cgroup", "ipc", "uts", "net", "mnt", "pid", "user")


def _ns_links(pid="self"):
    """{name: readlink of /proc/PID/ns/name} for NS_LINKS."""
    return {n: os.readlink("/proc/%s/ns/%s" % (pid, n)) for n in NS_LINKS}


def _monitor_setup_in_child(tmp_path, namespaces, hostname):
    """Run Monitor._setup (network "new", no QEMU) in a forked child; its namespaces, hostname
    and cgroup as it sees them."""
    m = rt.Monitor(str(tmp_path), "c1", {}, [], {}, "new", None, namespaces=namespaces,
                   hostname=hostname)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            m._setup()
            with open("/proc/self/cgroup") as f:
                out = json.dumps([_ns_links(), socket.gethostname(), f.read()])
        except BaseException as e:
            out = json.dumps("error: %s" % e)
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = json.loads(f.read())
    os.waitpid(pid, 0)
    return out


def _namespace_holder(flags, hostname):
    """A child in new namespaces (flags) with hostname set; (pid, fd to close to end it)."""
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        rt._check_libc(rt._libc().unshare(flags), "unshare")
        socket.sethostname(hostname)
        os.write(ready_w, b"x")
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    os.read(ready_r, 1)
    os.close(ready_r)
    os.close(ready_w)
    return pid, w


def test_monitor_makes_the_configs_new_cgroup_ipc_uts_namespaces_and_sets_the_hostname(tmp_path):
    host, host_name = _ns_links(), socket.gethostname()
    links, name, cgroup = _monitor_setup_in_child(
        tmp_path, {"cgroup": "new", "ipc": "new", "uts": "new"}, "cc-monitor-test")
    assert {n for n in NS_LINKS if links[n] != host[n]} == {"cgroup", "ipc", "uts", "net", "mnt"}
    assert (name, socket.gethostname()) == ("cc-monitor-test", host_name)
    assert all(line.endswith(":/") for line in cgroup.split())  # its cgroup is the new root


def test_monitor_without_those_namespaces_stays_in_the_hosts(tmp_path):
    host, host_name = _ns_links(), socket.gethostname()
    links, name, _cgroup = _monitor_setup_in_child(tmp_path, {}, None)
    assert {n for n in NS_LINKS if links[n] != host[n]} == {"net", "mnt"}
    assert name == host_name


def test_monitor_joins_the_namespaces_given_by_path_and_sets_the_hostname_there(tmp_path):
    pid, end = _namespace_holder(rt.CLONE_NEWIPC | rt.CLONE_NEWUTS | rt.CLONE_NEWCGROUP, "holder")
    try:
        theirs = _ns_links(pid)
        links, name, _cgroup = _monitor_setup_in_child(
            tmp_path, {k: "/proc/%d/ns/%s" % (pid, k) for k in ("cgroup", "ipc", "uts")}, "joined")
        assert {n: links[n] for n in ("cgroup", "ipc", "uts")} == {
            n: theirs[n] for n in ("cgroup", "ipc", "uts")}
        assert name == "joined"  # as runc, which sets the hostname in a joined uts namespace too
    finally:
        os.close(end)
        os.waitpid(pid, 0)


def test_join_namespaces_opens_every_path_first_and_setns_checks_the_type():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            flags = rt.join_namespaces({"ipc": "new", "uts": "/proc/self/ns/uts"})
            try:
                rt.join_namespaces({"ipc": "/proc/self/ns/uts"})
                out = [flags, "joined"]
            except OSError as e:
                out = [flags, e.errno, str(e)]
        except BaseException as e:
            out = ["error: %s" % e]
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = json.loads(f.read())
    os.waitpid(pid, 0)
    assert out == [rt.CLONE_NEWIPC, errno.EINVAL,
                   "[Errno 22] setns /proc/self/ns/uts (ipc): Invalid argument"]


def test_exec_monitor_runs_a_fresh_interpreter_that_reports_on_the_notify_pipe(tmp_path):
    r, w = os.pipe2(os.O_CLOEXEC)
    params = {"state_dir": str(tmp_path), "cid": "c1", "gconf": {}, "argv": ["/nonexistent"],
              "vm": {"boot_timeout": 5}, "netns": None, "notify_fd": w, "stdio": [0, 1, 2],
              "restore": None, "terminal": None, "staged": [], "cgroups": [],
              "namespaces": {"ipc": "new", "uts": "new"}, "hostname": "cc-exec-monitor"}
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            sys.argv[0] = rt.__file__  # as when the file is the running program
            rt._exec_monitor(params, [w])
        finally:
            os._exit(99)  # _exec_monitor returned: no exec
    os.close(w)
    with os.fdopen(r, "rb") as f:
        ready, report = f.read().split(b"\n", 1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 1
    assert ready == rt.NAMESPACES_READY  # set up: create runs its hooks while the VM boots
    assert json.loads(report)["error"].startswith("the VM exited during boot (status 127)")


def test_exec_monitor_that_cannot_exec_leaves_the_fds_as_they_were(monkeypatch):
    r, w = os.pipe2(os.O_CLOEXEC)
    before = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(rt.sys, "argv", [rt.__file__])
    monkeypatch.setattr(rt.os, "execv", lambda *a: (_ for _ in ()).throw(OSError(8, "exec format")))
    try:
        assert rt._exec_monitor({"state_dir": "/x", "cid": "c", "notify_fd": w}, [w]) is None
        assert not os.get_inheritable(w)  # or QEMU would hold the create's notify pipe open
        assert set(os.listdir("/proc/self/fd")) == before  # the memfd closed
    finally:
        os.close(r)
        os.close(w)


def test_exec_monitor_only_replaces_the_running_program():
    assert rt.os.path.realpath(sys.argv[0]) != rt.os.path.realpath(rt.__file__)  # pytest's
    assert rt._exec_monitor({"state_dir": "/x", "cid": "c"}, []) is None  # returns, no exec


# -- hooks ------------------------------------------------------------------

def test_run_hooks(tmp_path):
    out = tmp_path / "hook-out"
    hook = tmp_path / "hook.sh"
    hook.write_text('#!/bin/sh\n{ cat; echo; echo "$X $# $1"; } > "%s"\n' % out)
    hook.chmod(0o755)
    rt.run_hooks({"prestart": [{"path": str(hook), "args": ["name0", "arg1"], "env": ["X=y"]}]},
                 "prestart", {"id": "c1"})
    state_line, args_line = out.read_text().splitlines()
    assert json.loads(state_line) == {"id": "c1"}
    assert args_line == "y 1 arg1"  # args[0] is argv[0], not an argument


def test_run_hooks_failures(tmp_path):
    fail = tmp_path / "fail.sh"
    fail.write_text("#!/bin/sh\necho oops >&2\nexit 3\n")
    fail.chmod(0o755)
    with pytest.raises(rt.Error) as exc:
        rt.run_hooks({"prestart": [{"path": str(fail)}]}, "prestart", {})
    assert str(exc.value) == "prestart hook %s failed: exit status 3: oops" % fail
    with pytest.raises(rt.Error, match="timed out after 1s"):
        rt.run_hooks({"poststop": [{"path": "/bin/sleep", "args": ["sleep", "5"], "timeout": 1}]},
                     "poststop", {})
    rt.run_hooks({"poststart": [{"path": str(fail)}]}, "poststart", {}, fatal=False)


def test_hook_env_without_equals_is_rejected(tmp_path):
    config = good_config()
    config["hooks"] = {"poststart": [{"path": "/bin/true", "env": ["NOEQUALS"]}]}
    msg = spec_error(tmp_path, config)
    assert msg == "config.json: hooks.poststart[0].env: 'NOEQUALS' is not of the form NAME=VALUE"


# -- exec, terminal sizes, sizes and durations (newer commands) --------------

def needs(name):
    return pytest.mark.skipif(not hasattr(rt, name), reason="no rt.%s" % name)


def exec_args(**over):
    import argparse
    base = dict(process=None, command_args=["ls", "-l"], env=None, cwd=None, user=None, tty=False,
                additional_gids=None)
    base.update(over)
    return argparse.Namespace(**base)


@pytest.fixture
def exec_state(tmp_path):
    st = rt.State(str(tmp_path), "c1")
    st.data = {"process": rt.parse_process(good_config()["process"])}
    return st


@needs("exec_process")
def test_exec_process_from_the_container_process(exec_state):
    p = rt.exec_process(exec_args(env=["X=1"], cwd="/srv", user="5:6"), exec_state)
    assert p["args"] == ["ls", "-l"] and p["env"] == ["PATH=/bin", "A=b=c", "X=1"]
    assert (p["cwd"], p["uid"], p["gid"], p["terminal"]) == ("/srv", 5, 6, False)
    assert p["rlimits"] == [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 2048}]
    p = rt.exec_process(exec_args(tty=True, user="7", additional_gids=[8, 9]), exec_state)
    gid = exec_state.data["process"]["gid"]  # runc keeps the process's gid without uid:gid
    assert (p["cwd"], p["uid"], p["gid"], p["terminal"]) == ("/tmp", 7, gid, True)
    assert p["additionalGids"] == exec_state.data["process"]["additionalGids"] + [8, 9]


@needs("exec_process")
def test_exec_process_file(exec_state, tmp_path):
    f = write_json(tmp_path / "process.json", {"args": ["cat"], "cwd": "/"})
    p = rt.exec_process(exec_args(process=str(f), command_args=[]), exec_state)
    assert (p["args"], p["env"], p["uid"]) == (["cat"], [], 0)


@needs("exec_process")
@pytest.mark.parametrize("over, message", [
    (dict(command_args=[]), "process args cannot be empty"),
    (dict(user="root"),
     'parsing root as int for uid failed: strconv.Atoi: parsing "root": invalid syntax'),
    (dict(user="1:x"),
     'parsing x as int for gid failed: strconv.Atoi: parsing "x": invalid syntax'),
    (dict(additional_gids=[-1]), "additional-gids must be a positive number -1"),
    (dict(env=["BAD"]), "process.env: 'BAD' is not of the form NAME=VALUE"),
    (dict(cwd="rel"), "process.cwd: must be an absolute path"),
    (dict(process="/nonexistent/process.json"),
     "process: /nonexistent/process.json: no such file or directory"),
    (dict(process="FILE:[]"), "process: must be an object"),
    (dict(process='FILE:{"args": []}'), "process.args: must be a non-empty list of strings"),
])
def test_exec_process_errors(exec_state, tmp_path, over, message):
    if str(over.get("process", "")).startswith("FILE:"):
        f = tmp_path / "p.json"
        f.write_text(over["process"][5:])
        over["process"] = str(f)
    with pytest.raises(rt.Error) as exc:
        rt.exec_process(exec_args(**over), exec_state)
    assert str(exc.value) == message


@needs("resize_message")
def test_resize_message():
    import termios
    master, slave = os.openpty()
    r, w = os.pipe()
    try:
        assert rt.resize_message(slave, 3) is None  # 0x0: not a sized terminal
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        assert rt.resize_message(slave, 3) == {"op": "resize", "proc": 3, "rows": 24, "cols": 80}
        assert rt.resize_message(r, 0) is None
        assert rt.resize_message(None, 0) is None
    finally:
        for fd in (master, slave, r, w):
            os.close(fd)


@needs("_size_bytes")
@pytest.mark.parametrize("size, expected", [("256M", 256 << 20), ("1G", 1 << 30), ("1g", 1 << 30),
                                            ("1.5G", 3 << 29), ("2048K", 2 << 20), (512, 512 << 20),
                                            ("64", 64 << 20), ("1T", 1 << 40)])
def test_size_bytes(size, expected):
    assert rt._size_bytes(size) == expected


@needs("_seconds")
@pytest.mark.parametrize("text, expected", [("5s", 5), ("500ms", 0.5), ("1m", 60), ("2h", 7200),
                                            ("1.5s", 1.5), ("3", 3), (" 0.25 ", 0.25)])
def test_seconds(text, expected):
    assert rt._seconds(text) == expected


@needs("_seconds")
@pytest.mark.parametrize("text", ["soon", "5x", "s", "1.2.3s"])
def test_seconds_bad(text):
    with pytest.raises(rt.Error, match="^invalid interval: %s$" % re.escape(text)):
        rt._seconds(text)


@needs("elf_load_only")
def test_elf_load_only_keeps_a_runnable_program(tmp_path):
    true = os.path.realpath(shutil.which("true") or "/bin/true")
    with open(true, "rb") as f:
        data = f.read()
    if data[:5] != b"\x7fELF\x02":
        pytest.skip("true is not a 64-bit ELF file")
    cut = rt.elf_load_only(data)
    assert len(cut) < len(data) and data.startswith(cut[:40])
    assert cut[60:64] == b"\0\0\0\0"  # no section table
    exe = tmp_path / "true"
    exe.write_bytes(cut)
    exe.chmod(0o755)
    assert subprocess.run([str(exe)]).returncode == 0
    assert rt.elf_load_only(cut) == cut  # nothing more to cut


@needs("elf_load_only")
def test_elf_load_only_other_data():
    for data in (b"#!/bin/sh\n", b"\x7fELF\x01\x01" + b"\0" * 58,  # 32-bit
                 b"\x7fELF\x02\x02" + b"\0" * 58):  # big-endian
        assert rt.elf_load_only(data) == data


# -- default spec -----------------------------------------------------------

def test_default_spec_loads(tmp_path):
    bundle = make_bundle(tmp_path, rt.default_spec())
    conf = rt.load_spec(str(bundle))
    assert conf["process"]["args"] == ["sh"] and conf["process"]["terminal"] is True
    assert conf["root"] == {"path": str(bundle / "rootfs"), "readonly": True}
    assert conf["hostname"] == "runc" and conf["netns"] == "new"
    assert [m["destination"] for m in conf["mounts"]] == ["/proc", "/dev", "/dev/pts", "/dev/shm",
                                                          "/dev/mqueue", "/sys"]
    assert "/proc/kcore" in conf["masked"] and "/proc/sys" in conf["readonly_paths"]


def test_default_spec_needs_rootfs(tmp_path):
    bundle = tmp_path / "b"
    bundle.mkdir()
    write_json(bundle / "config.json", rt.default_spec())
    with pytest.raises(rt.Error, match="^config.json: root.path: .*/b/rootfs: no such directory$"):
        rt.load_spec(str(bundle))


# ===========================================================================
# 10b. runc-compatible output: Go's JSON, logrus lines, tabwriter, procps tables
# ===========================================================================

RUNC = shutil.which("runc")
HOST_PS = shutil.which("ps")


@pytest.mark.parametrize("obj, compact, indented", [
    ({"a": [1, 2], "b": None}, '{"a":[1,2],"b":null}',
     '{\n  "a": [\n    1,\n    2\n  ],\n  "b": null\n}'),
    (["<x> & é \u2028"], '["\\u003cx\\u003e \\u0026 é \\u2028"]', None),
    ([], "[]", "[]"),
])
def test_go_json(obj, compact, indented):
    assert rt.go_json(obj) == compact
    if indented is not None:
        assert rt.go_json(obj, indent=2) == indented


@pytest.mark.parametrize("text, value", [
    ("simple-msg_1.2/x@y^z+", "simple-msg_1.2/x@y^z+"), ("", ""), ("two words", '"two words"'),
    ('say "hi"\n\t\x01', '"say \\"hi\\"\\n\\t\\x01"'), ("é", '"é"'),
    ("2026-01-02T03:04:05Z", '"2026-01-02T03:04:05Z"'),
])
def test_logfmt_value_quotes_as_logrus(text, value):
    assert rt._logfmt_value(text) == value


def test_log_lines_are_logrus_lines():
    log = rt.Log()
    log.configure(None, "text")
    assert log.format_line("error", "container does not exist", "2026-01-02T03:04:05Z") == \
        'time="2026-01-02T03:04:05Z" level=error msg="container does not exist"\n'
    log.configure(None, "json")
    assert log.format_line("debug", "a<b", "T") == \
        '{"level":"debug","msg":"a\\u003cb","time":"T"}\n'


@pytest.mark.parametrize("debug, levels", [(False, ["error"]), (True, ["debug", "info", "warning",
                                                                         "error"])])
def test_stderr_without_log_file(capsys, debug, levels):
    log = rt.Log()
    log.configure(None, "text", debug=debug)
    log.stderr = True
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    lines = capsys.readouterr().err.splitlines()
    assert [re.match(r'^time="\S+" level=(\w+) msg=\w$', ln).group(1) for ln in lines] == levels


@pytest.mark.parametrize("value, expected", [
    ("2026-01-02T03:04:05.000000000Z", "2026-01-02T03:04:05Z"),
    ("2026-01-02T03:04:05.120000000Z", "2026-01-02T03:04:05.12Z"),
    ("2026-01-02T03:04:05.123456789Z", "2026-01-02T03:04:05.123456789Z"),
    ("", ""),
])
def test_go_time(value, expected):
    assert rt._go_time(value) == expected


def test_oci_state_omits_empty_annotations(tmp_path):
    st = rt.State(str(tmp_path), "c1")
    st.data = {"pid": 0, "annotations": {}, "created": "2026-01-02T03:04:05.500000000Z"}
    out = st.oci_state()
    assert list(out) == ["ociVersion", "id", "pid", "status", "bundle", "rootfs", "created",
                         "owner"]
    assert out["created"] == "2026-01-02T03:04:05.5Z"
    st.data["annotations"] = {"k": "v"}
    assert list(st.oci_state())[7:] == ["annotations", "owner"]


def test_tabwriter_reproduces_runc_list(tmp_path):
    rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"),
            ("a-very-long-container-id", "7", "running", "/b", "2026-01-02T03:04:05Z", "root")]
    text = rt.tabwriter(rows)
    assert [ln.split() for ln in text.splitlines()] == [list(r) for r in rows]
    assert text.splitlines()[1].index("7") == len("a-very-long-container-id") + 3
    assert text.splitlines()[0].index("STATUS") == 24 + 3 + 12  # PID's column: minwidth 12
    if RUNC:  # runc's own header for an empty root
        out = subprocess.run([RUNC, "--root", str(tmp_path), "list"], capture_output=True,
                             text=True).stdout
        assert rt.tabwriter([tuple(out.split())]) == out


PS_OPTIONS = [[], ["-ef"], ["-e"], ["-x"], ["ax"], ["aux"], ["-F"], ["-efx"], ["a"],
              ["-o", "pid,comm,stat"], ["-o", "pid=PID,args=Command"], ["o", "pid,ppid,user"],
              ["--format", "pid,etime,time,nlwp,pgid,sid,ni,vsz,rss,sz,tty,tname,uid,gid,group"],
              ["-opid,ruser,euser,s,pcpu,pmem,c"]]


@pytest.mark.skipif(HOST_PS is None, reason="no ps on the host")
@pytest.mark.parametrize("opts", PS_OPTIONS, ids=[" ".join(o) or "none" for o in PS_OPTIONS])
def test_ps_header_is_procps(opts):
    """The emulated header is the host ps's (procps-ng), which runc prints."""
    columns, _ = rt.ps_columns(opts)
    ours = rt.ps_table(columns, [], time.time(), 1)
    theirs = subprocess.run([HOST_PS] + (opts or ["-ef"]) + ["-p", "1"], capture_output=True,
                            text=True, env={"PATH": os.environ["PATH"]}).stdout
    assert ours == theirs.splitlines(True)[0]


STABLE = "pid,ppid,uid,user,gid,group,comm,tname,stat,nlwp,pgid,sid,ni,stime,time,args"


@pytest.mark.skipif(HOST_PS is None, reason="no ps on the host")
def test_ps_row_matches_procps_on_a_real_process():
    """guest_processes() and the table, run on the host: a sleeper's row is ps's own."""
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        time.sleep(0.2)
        (proc,) = [p for p in rt.guest_processes() if p["pid"] == sleeper.pid]
        assert proc["args"] == "sleep 60" and proc["comm"] == "sleep" and proc["nlwp"] == 1
        columns, _ = rt.ps_columns(["-o", STABLE])
        ours = rt.ps_table(columns, [proc], time.time(), 1)
        theirs = subprocess.run([HOST_PS, "-o", STABLE, "-p", str(sleeper.pid)],
                                capture_output=True, text=True).stdout
        assert ours == theirs
    finally:
        sleeper.kill()
        sleeper.wait()


def test_status_fields_reads_just_the_keys_asked_for():
    text = "Name:\tsleep\nUid:\t0\t1\t2\t3\nGid:\t5\t5\t5\t5\nNSpid:\t40\t1\nVmRSS:\t4 kB"
    assert rt._status_fields(text, ("Uid", "NSpid", "Gid", "Cpus")) == {
        "Uid": ["0", "1", "2", "3"], "NSpid": ["40", "1"], "Gid": ["5", "5", "5", "5"]}
    assert rt._status_fields(text, ("VmRSS",)) == {"VmRSS": ["4", "kB"]}, "the last line too"
    with open("/proc/self/status") as f:
        assert rt._status_fields(f.read(), ("Uid",))["Uid"][0] == str(os.getuid())


def test_guest_processes_of_process_trees():
    """With roots, the trees under them (a grandchild included) and nothing else."""
    child = subprocess.Popen(["sh", "-c", "sleep 60 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            procs = rt.guest_processes([child.pid])
            if len(procs) == 2 and procs[1]["args"] == "sleep 60":  # (not sh's fork before exec)
                break
            time.sleep(0.05)
        assert [p["args"] for p in procs] == ["sh -c sleep 60 & wait", "sleep 60"]
        assert procs[1]["ppid"] == child.pid
        assert rt.guest_processes([]) == []
        env = {p["pid"]: p["env"] for p in rt.guest_processes([child.pid], env=True)}
        assert "PATH=" in env[child.pid]
        assert {p["env"] for p in rt.guest_processes([child.pid], env=False)} == {""}
        assert rt.guest_processes([2 ** 22 + 1]) == [], "a gone process is skipped"
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()


@pytest.mark.parametrize("opts, message", [
    (["-o", "comm"], "couldn't find PID field in ps output"),
    (["-o", "pid="], "couldn't find PID field in ps output"),
    (["--no-headers"], "couldn't find PID field in ps output"),
    (["-o", "pid,bogus"], 'ps: unknown user-defined format specifier "bogus"'),
    (["-L"], "ps: unsupported option -L (%s)" % rt.PS_EMULATED),
    (["--forest"], "ps: unsupported option --forest (%s)" % rt.PS_EMULATED),
    (["-o"], "ps: -o needs a format"),
])
def test_ps_columns_errors(opts, message):
    with pytest.raises(rt.Error) as exc:
        rt.ps_columns(opts)
    assert str(exc.value) == message


def test_ps_environment_with_bsd_e():
    assert rt.ps_columns(["-e", "-x"])[1] is True and rt.ps_columns(["-ex"])[1] is True
    assert rt.ps_columns(["-e"])[1] is False and rt.ps_columns(["x"])[1] is False
    proc = {"pid": 1, "args": "sleep 9", "env": "A=1", "tty": 0, "cpu": 0, "state": "S"}
    columns, env = rt.ps_columns(["-e", "-x"])
    assert rt.ps_table(columns, [proc], 0, 1, env).splitlines()[1].endswith(" sleep 9 A=1")


@pytest.mark.parametrize("dev, name", [
    (0, "?"), ((136 << 8) | 3, "pts/3"), ((4 << 8) | 64, "ttyS0"), ((4 << 8) | 1, "tty1"),
    ((5 << 8) | 1, "console"), ((137 << 8) | 2, "pts/258"), ((229 << 8) | 0, "hvc0")])
def test_tty_name(dev, name):
    assert rt._tty_name(dev) == name


@pytest.mark.parametrize("seconds, hours, text", [(0, True, "00:00:00"), (61, True, "00:01:01"),
                                                  (90061, True, "1-01:01:01"), (59, False, "00:59"),
                                                  (3601, False, "01:00:01"), (-5, False, "00:00")])
def test_ps_duration(seconds, hours, text):
    assert rt._ps_duration(seconds, hours) == text


def test_preloaded_process_file_from_an_fd():
    """exec -p /dev/fd/N reads the file before the inherited fds are closed."""
    import argparse
    r, w = os.pipe()
    os.write(w, b'{"args": ["true"]}')
    os.close(w)
    args = argparse.Namespace(process="/dev/fd/%d" % r)
    rt._preload_fd_files(args)
    os.close(r)
    assert rt._arg_json(args, "process") == {"args": ["true"]}


RUNC_FLAG_LINE = re.compile(r"^ {3}(-{1,2}[\w-]+(?: value)?(?:, -{1,2}[\w-]+(?: value)?)*)(?: {2,}|$)")
RUNC_COMMANDS = ["create", "run", "start", "state", "kill", "delete", "list", "ps", "exec", "pause",
                 "resume", "events", "update", "spec", "features", "checkpoint", "restore"]
NOT_YET_HERE = set()


def runc_flags(*command):
    """[(flag, takes a value)] from `runc [COMMAND] --help`, and whether it lists options."""
    out = subprocess.run([RUNC] + list(command) + ["--help"], capture_output=True,
                         text=True).stdout
    flags = []
    for line in out.splitlines():
        m = RUNC_FLAG_LINE.match(line)
        if m:
            for item in m.group(1).split(", "):
                name, _, value = item.partition(" ")
                flags.append((name, bool(value)))
    return flags, "OPTIONS:" in out


@pytest.mark.skipif(RUNC is None, reason="runc is not installed")
@pytest.mark.parametrize("command", [None] + RUNC_COMMANDS)
def test_every_runc_flag_is_accepted(command):
    """Each flag `runc [COMMAND] --help` lists is an option here, taking a value as runc's."""
    parser = rt.build_parser()
    if command is not None:
        sub = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"][0]
        parser = sub.choices[command]
    flags, listed = runc_flags(*([command] if command else []))
    assert bool(flags) == listed, "runc %s --help: options not read" % command
    missing, wrong = set(), []
    for flag, takes_value in flags:
        action = parser._option_string_actions.get(flag)
        if action is None:
            missing.add((command, flag))
        elif flag not in ("-h", "--help") and (action.nargs != 0) != takes_value:
            wrong.append(flag)
    assert missing <= NOT_YET_HERE and not wrong, (missing, wrong)


@pytest.mark.parametrize("argv, code", [(["state"], 1), (["exec", "-g", "x", "c1", "id"], 1),
                                         (["bogus"], 3)])
def test_usage_errors_reach_the_log_file(tmp_path, argv, code):
    """As runc's: one JSON error line in --log (engines read it), the exit code runc gives."""
    log = tmp_path / "log.json"
    r = cli(tmp_path, "--root", tmp_path, "--log", log, "--log-format=json", *argv)
    assert r.returncode == code and r.stdout == ""
    (line,) = log_lines(log)
    record = json.loads(line)
    assert list(record) == ["level", "msg", "time"] and record["level"] == "error"
    assert record["msg"] in r.stderr
    if RUNC:
        runc_log = tmp_path / "runc.json"
        rr = subprocess.run([RUNC, "--root", str(tmp_path / "runc"), "--log", str(runc_log),
                             "--log-format=json"] + argv, capture_output=True, text=True)
        assert rr.returncode == code
        assert list(json.loads(runc_log.read_text())) == list(record)


@pytest.mark.parametrize("argv, expected", [
    (["-root", "/x", "list", "-format", "json"], ["--root", "/x", "list", "--format", "json"]),
    (["list", "-q=true"], ["list", "-q"]), (["list", "--quiet=false"], ["list"]),
    (["run", "-detach=1", "-b", "/b", "c1"], ["run", "--detach", "-b", "/b", "c1"]),
    (["run", "--detach=yes", "c1"], ["run", "--detach=yes", "c1"]),
    (["-log-format=json", "exec", "-e", "A=1", "-user", "1", "c1", "sh", "-root", "-c"],
     ["--log-format=json", "exec", "-e", "A=1", "--user", "1", "c1", "sh", "-root", "-c"]),
    (["ps", "c1", "-ef", "-format"], ["ps", "c1", "-ef", "-format"]),
    (["kill", "c1", "-9"], ["kill", "c1", "-9"]), (["--", "-root"], ["--", "-root"]),
])
def test_go_style_argv(argv, expected):
    assert rt.go_style_argv(argv, rt.build_parser()) == expected


# urfave/cli 1.22 moves a command's flags before its other args, each with the arg after it
# (a boolean's too) unless that is a flag or the flag has =: what runc 1.1.5 did with each
# (checked on containers named c0 and 9): `kill c0 -a 9` said `unknown signal "c0"`,
# `kill c0 -a -9` `flag provided but not defined: -9`, `kill c0 -- 9` signalled c0
@pytest.mark.parametrize("argv, expected", [
    (["kill", "c0", "-a", "9"], ["kill", "-a", "9", "c0"]),
    (["kill", "c0", "9", "-a"], ["kill", "-a", "c0", "9"]),
    (["kill", "c0", "-a", "-9"], ["kill", "-a", "-9", "c0"]),
    (["kill", "c0", "-all=true", "9"], ["kill", "--all", "c0", "9"]),
    (["kill", "c0", "--", "9"], ["kill", "--", "c0", "9"]),
    (["kill", "c0", "-a", "--", "9"], ["kill", "-a", "--", "c0", "9"]),
    (["kill", "--", "c0", "-a"], ["kill", "--", "c0", "-a"]),
    (["--root", "/r", "delete", "c0", "-f", "c1"], ["--root", "/r", "delete", "-f", "c1", "c0"]),
    (["create", "c0", "-b", "/b", "--pid-file=/p"], ["create", "-b", "/b", "--pid-file=/p", "c0"]),
    (["state", "c0", "--root", "x"], ["state", "c0", "--root", "x"]),
    (["ps", "c0", "-f", "json"], ["ps", "c0", "-f", "json"]),
    (["exec", "c0", "-t", "sh"], ["exec", "c0", "-t", "sh"]),
])
def test_go_style_argv_orders_a_commands_flags_as_urfave_cli(argv, expected):
    parser = rt.build_parser(rt.command_in(argv))
    assert rt.go_style_argv(argv, parser) == expected


def test_kill_with_a_flag_between_id_and_signal_is_runcs_on_every_python(tmp_path, capsys):
    argv = ["--root", str(tmp_path), "kill", "c0", "-a", "9"]
    assert rt.fast_args(argv) is None
    parsed = _parsed(argv)
    assert (parsed["id"], parsed["signal"], parsed["all"]) == ("9", "c0", True)
    assert rt.main(argv) == 1
    assert "container does not exist" in capsys.readouterr().err


@pytest.mark.skipif(RUNC is None, reason="runc is not installed")
@pytest.mark.parametrize("argv", [["-root", "R", "list", "-format", "json"],
                                  ["--root=R", "list", "-q=true"], ["-root", "R", "list", "-quiet=0"],
                                  ["-debug", "--root", "R", "list", "-f", "json"],
                                  ["--root", "R", "list", "--quiet=maybe"]])
def test_go_style_flags_as_runc(tmp_path, argv):
    """runc's urfave/cli takes -name and --bool=true: the same calls give the same results."""
    argv = [a.replace("R", str(tmp_path)) for a in argv]
    ours = cli(tmp_path, *argv)
    theirs = subprocess.run([RUNC] + argv, capture_output=True, text=True)
    assert ours.returncode == theirs.returncode
    if theirs.returncode == 0:  # (runc prints its usage on stdout after a usage error)
        assert ours.stdout == theirs.stdout


@pytest.mark.skipif(RUNC is None, reason="runc is not installed")
def test_every_runc_command_exists():
    out = subprocess.run([RUNC, "--help"], capture_output=True, text=True).stdout
    listed = re.findall(r"^ {3}([a-z]+)(?:, ([a-z]+))? {2,}", out.split("COMMANDS:")[1], re.M)
    names = {n for pair in listed for n in pair if n}
    assert names and names <= set(HELP_COMMANDS) | {"h"}
    assert set(RUNC_COMMANDS) <= names


# ===========================================================================
# 11. CLI commands that need no VM (separate processes, --root in tmp_path)
# ===========================================================================

def fake_container(root, cid, **data):
    """A state directory as create leaves it, without any VM."""
    st = rt.State(str(root), cid)
    st.make()
    st.data = dict({"id": cid, "bundle": "/bundles/" + cid, "rootfs": "/bundles/%s/rootfs" % cid,
                    "created": "2026-01-02T03:04:05.000000000Z", "annotations": {},
                    "hooks": {}, "started": False, "paused": False}, **data)
    st.save()
    st.unlock()
    return st


def test_cli_spec(tmp_path):
    bundle = tmp_path / "b"
    bundle.mkdir()
    r = cli(tmp_path, "--root", tmp_path / "root", "spec", "-b", bundle)
    assert (r.returncode, r.stdout, stderr_text(r.stderr)) == (0, "", "")
    text = (bundle / "config.json").read_text()
    assert json.loads(text) == rt.runc_spec() and text == json.dumps(rt.runc_spec(), indent="\t")
    r = cli(tmp_path, "--root", tmp_path / "root", "spec", "--bundle", bundle)
    assert r.returncode == 1
    assert stderr_text(r.stderr) == "File config.json exists. Remove it first\n"


def test_runc_spec_is_default_spec_with_runc_extras():
    spec, base = rt.runc_spec(), rt.default_spec()
    assert spec["process"]["capabilities"]["ambient"] == base["process"]["capabilities"]["bounding"]
    assert spec["mounts"][:-1] == base["mounts"] and spec["mounts"][-1]["type"] == "cgroup"


def test_runc_spec_rootless():
    spec = rt.runc_spec(rootless=True)
    linux = spec["linux"]
    assert list(linux)[:3] == ["uidMappings", "gidMappings", "namespaces"]
    assert "resources" not in linux
    assert linux["uidMappings"] == [{"containerID": 0, "hostID": os.geteuid(), "size": 1}]
    assert [ns["type"] for ns in linux["namespaces"]] == ["pid", "ipc", "uts", "mount", "user"]
    sys_mount = next(m for m in spec["mounts"] if m["destination"] == "/sys")
    assert sys_mount == {"destination": "/sys", "type": "none", "source": "/sys",
                         "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}
    assert not any(o.startswith(("gid=", "uid=")) for m in spec["mounts"]
                   for o in m.get("options", []))


def test_cli_spec_in_current_dir(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    r = cli(tmp_path, "--root", tmp_path / "root", "spec", cwd=str(work))
    assert r.returncode == 0 and (work / "config.json").exists()
    assert not (tmp_path / "root").exists()


def test_cli_spec_missing_bundle(tmp_path):
    r = cli(tmp_path, "--root", tmp_path / "root", "spec", "-b", tmp_path / "nope")
    assert r.returncode == 1
    assert stderr_text(r.stderr) == "chdir %s: no such file or directory\n" % (tmp_path / "nope")


def test_cli_features(tmp_path):
    r = cli(tmp_path, "--root", tmp_path / "root", "features")
    assert r.returncode == 0
    f = json.loads(r.stdout)
    assert (f["ociVersionMin"], f["ociVersionMax"]) == ("1.0.0", rt.OCI_VERSION)
    assert "prestart" in f["hooks"] and "poststop" in f["hooks"]
    assert f["mountOptions"] == sorted(f["mountOptions"])
    assert {"ro", "rbind", "rprivate", "nosuid"} <= set(f["mountOptions"])
    assert f["linux"]["namespaces"] == ["network", "user"]
    assert {"createContainer", "startContainer"} <= set(f["hooks"])
    assert "CAP_SYS_ADMIN" in f["linux"]["capabilities"] and f["linux"]["seccomp"]["enabled"]


@pytest.mark.parametrize("argv", [["version"], ["--version"], ["-v"]])
def test_cli_version(tmp_path, argv):
    r = cli(tmp_path, "--root", tmp_path / "root", *argv)
    assert r.returncode == 0
    assert r.stdout == rt.version_text()
    assert r.stdout.splitlines()[:2] == ["cc-oci-runtime version %s" % rt.__version__,
                                         "spec: %s" % rt.OCI_VERSION]


@pytest.mark.parametrize("argv", [[], ["help"], ["h"]])
def test_cli_no_command_and_help(tmp_path, argv):
    r = cli(tmp_path, "--root", tmp_path / "root", *argv)
    assert r.returncode == 0 and r.stdout.startswith("usage: cc-oci-runtime [-h]")


def test_cli_help_of_a_command(tmp_path):
    r = cli(tmp_path, "help", "exec")
    assert r.returncode == 0 and r.stdout.startswith("usage: cc-oci-runtime exec ")
    r = cli(tmp_path, "help", "bogus")
    assert (r.returncode, r.stdout, r.stderr) == (3, "", "No help topic for 'bogus'\n")


@pytest.mark.parametrize("argv, out", [
    (["list"], "ID          PID         STATUS      BUNDLE      CREATED     OWNER\n"),
    (["list", "-f", "json"], "null\n"),  # runc encodes its empty (nil) list
    (["list", "-q"], ""),
])
def test_cli_list_empty(tmp_path, argv, out):
    for root in (tmp_path / "missing-root", tmp_path):
        r = cli(tmp_path, "--root", root, *argv)
        assert (r.returncode, r.stdout, stderr_text(r.stderr)) == (0, out, "")


def test_cli_list_and_state_of_fake_containers(tmp_path):
    root = tmp_path / "root"
    fake_container(root, "alive", **me())
    fake_container(root, "gone", pid=dead_pid(), pid_start=1)
    r = cli(tmp_path, "--root", root, "list", "-f", "json")
    assert r.returncode == 0, r.stderr
    listed = {s["id"]: s for s in json.loads(r.stdout)}
    assert (listed["alive"]["status"], listed["alive"]["pid"]) == ("created", os.getpid())
    assert (listed["gone"]["status"], listed["gone"]["pid"]) == ("stopped", 0)
    r = cli(tmp_path, "--root", root, "list", "-q")
    assert r.stdout == "alive\ngone\n"
    r = cli(tmp_path, "--root", root, "list")
    header, first, second = r.stdout.splitlines()
    assert header.split() == ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"]
    assert first.split() == ["alive", str(os.getpid()), "created", "/bundles/alive",
                             "2026-01-02T03:04:05Z", "root"]  # Go's time: no trailing zeros
    assert first.index("created") == header.index("STATUS")
    r = cli(tmp_path, "--root", root, "state", "alive")
    assert r.returncode == 0
    state = json.loads(r.stdout)
    assert (state["id"], state["status"], state["pid"], state["bundle"]) == (
        "alive", "created", os.getpid(), "/bundles/alive")


@pytest.mark.parametrize("argv", [["state", "ghost"], ["kill", "ghost"], ["kill", "ghost", "KILL"],
                                  ["delete", "ghost"], ["start", "ghost"]])
def test_cli_unknown_container(tmp_path, argv):
    r = cli(tmp_path, "--root", tmp_path / "root", *argv)
    assert (r.returncode, r.stdout, stderr_text(r.stderr)) == (1, "", "container does not exist\n")


@pytest.mark.parametrize("flag", ["-f", "--force"])
def test_cli_delete_force_unknown(tmp_path, flag):
    r = cli(tmp_path, "--root", tmp_path / "root", "delete", flag, "ghost")
    assert (r.returncode, r.stdout, stderr_text(r.stderr)) == (0, "", "")


def test_cli_invalid_id(tmp_path):
    r = cli(tmp_path, "--root", tmp_path / "root", "state", "../etc")
    assert (r.returncode, stderr_text(r.stderr)) == (1, "invalid container id: ../etc\n")


def test_cli_kill_bad_signal_and_stopped(tmp_path):
    root = tmp_path / "root"
    fake_container(root, "alive", **me())
    fake_container(root, "gone", pid=dead_pid(), pid_start=1)
    r = cli(tmp_path, "--root", root, "kill", "alive", "NOPE")
    assert (r.returncode, stderr_text(r.stderr)) == (1, 'unknown signal "NOPE"\n')
    r = cli(tmp_path, "--root", root, "kill", "alive", "0")  # liveness: the monitor is alive
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    r = cli(tmp_path, "--root", root, "kill", "gone", "0")
    assert (r.returncode, stderr_text(r.stderr)) == (1, "container not running\n")
    r = cli(tmp_path, "--root", root, "kill", "gone", "KILL")
    assert (r.returncode, stderr_text(r.stderr)) == (1, "container not running\n")
    r = cli(tmp_path, "--root", root, "kill", "alive", "KILL")  # no monitor socket
    assert (r.returncode, stderr_text(r.stderr)) == (1, "container not running\n")


def test_cli_delete_running_needs_force(tmp_path):
    root = tmp_path / "root"
    sleeper = spawn_sleeper()
    try:
        fake_container(root, "c1", pid=sleeper.pid, pid_start=rt.proc_start_time(sleeper.pid),
                       started=True)
        r = cli(tmp_path, "--root", root, "delete", "c1")
        assert (r.returncode, stderr_text(r.stderr)) == (
            1, "cannot delete container c1 that is not stopped: running\n")
        assert sleeper.poll() is None and (root / "c1").exists()
        r = cli(tmp_path, "--root", root, "delete", "--force", "c1")
        assert (r.returncode, stderr_text(r.stderr)) == (0, "")
        assert sleeper.wait(timeout=10) == -signal.SIGKILL
        assert not (root / "c1").exists()
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_cli_delete_stopped_kills_leftovers(tmp_path):
    root = tmp_path / "root"
    sleeper = spawn_sleeper()
    try:
        st = fake_container(root, "c1", pid=sleeper.pid, pid_start=rt.proc_start_time(sleeper.pid),
                            started=True)
        rt.write_atomic(st.path("exit.json"), json.dumps({"status": 0}))
        r = cli(tmp_path, "--root", root, "delete", "c1")
        assert (r.returncode, stderr_text(r.stderr)) == (0, "")
        assert sleeper.wait(timeout=10) == -signal.SIGKILL
        assert os.listdir(root) == []
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


NEWER_ID_COMMANDS = [["exec", "ghost", "ls"], ["pause", "ghost"], ["resume", "ghost"],
                     ["ps", "ghost"], ["events", "--stats", "ghost"], ["update", "ghost"]]


@pytest.mark.parametrize("argv", NEWER_ID_COMMANDS, ids=[a[0] for a in NEWER_ID_COMMANDS])
def test_cli_newer_commands_unknown_container(tmp_path, argv):
    if argv[0] not in HELP_COMMANDS:
        pytest.skip("no %s command" % argv[0])
    r = cli(tmp_path, "--root", tmp_path / "root", *argv)
    prefix, code = ("exec failed: ", 255) if argv[0] == "exec" else ("", 1)  # as runc
    assert (r.returncode, r.stdout, stderr_text(r.stderr)) == (
        code, "", prefix + "container does not exist\n")


@pytest.mark.parametrize("argv, message", [
    (["exec", "alive", "ls"], "exec failed: container not running"),  # created: no monitor here
    (["exec", "gone", "ls"], "exec failed: cannot exec in a stopped container"),
    (["exec", "frozen", "ls"],
     "exec failed: cannot exec in a paused container (use --ignore-paused to override)"),
    (["pause", "alive"], "container not running"),
    (["resume", "alive"], "container not paused"),
    (["events", "--stats", "gone"], "container with id gone is not running"),
    (["update", "-r", "RESOURCES", "alive"], "resources: must be a JSON object"),
])
def test_cli_newer_commands_on_fake_containers(tmp_path, argv, message):
    if argv[0] not in HELP_COMMANDS:
        pytest.skip("no %s command" % argv[0])
    root = tmp_path / "root"
    fake_container(root, "alive", **me())
    fake_container(root, "gone", pid=dead_pid(), pid_start=1)
    fake_container(root, "frozen", started=True, paused=True, **me())
    write_json(tmp_path / "res.json", [1])
    argv = [str(tmp_path / "res.json") if a == "RESOURCES" else a for a in argv]
    r = cli(tmp_path, "--root", root, *argv)
    code = 255 if argv[0] == "exec" else 1
    assert (r.returncode, stderr_text(r.stderr)) == (code, message + "\n")


def test_cli_ps_of_a_stopped_container(tmp_path):
    """runc lists no process (the header alone; json null) and succeeds."""
    root = tmp_path / "root"
    fake_container(root, "gone", pid=dead_pid(), pid_start=1)
    r = cli(tmp_path, "--root", root, "ps", "gone")
    assert (r.returncode, r.stdout) == (0, "UID        PID  PPID  C STIME TTY          TIME CMD\n")
    r = cli(tmp_path, "--root", root, "ps", "--format", "json", "gone")
    assert (r.returncode, r.stdout) == (0, "null\n")
    r = cli(tmp_path, "--root", root, "ps", "gone", "-o", "comm")
    assert (r.returncode, stderr_text(r.stderr)) == (1, "couldn't find PID field in ps output\n")


def test_cli_update_and_events_without_vm(tmp_path):
    if not {"update", "events"} <= set(HELP_COMMANDS):
        pytest.skip("no update/events command")
    root = tmp_path / "root"
    fake_container(root, "gone", pid=dead_pid(), pid_start=1)
    write_json(tmp_path / "res.json", {"memory": {"limit": 1}})
    r = cli(tmp_path, "--root", root, "update", "-r", tmp_path / "res.json", "gone")
    assert (r.returncode, r.stdout, stderr_text(r.stderr)) == (1, "", "container not running\n")  # as runc
    r = cli(tmp_path, "--root", root, "events", "gone")  # runc's message
    assert (r.returncode, r.stdout, stderr_text(r.stderr)) == (
        1, "", "container with id gone is not running\n")


def test_cli_kill_paused_with_sigkill_kills_the_monitor(tmp_path):
    root = tmp_path / "root"
    sleeper = spawn_sleeper()
    try:
        fake_container(root, "c1", pid=sleeper.pid, pid_start=rt.proc_start_time(sleeper.pid),
                       started=True, paused=True)
        r = cli(tmp_path, "--root", root, "kill", "c1", "TERM")  # no monitor to queue it
        assert (r.returncode, stderr_text(r.stderr)) == (1, "container not running\n")
        assert sleeper.poll() is None
        r = cli(tmp_path, "--root", root, "kill", "c1", "KILL")
        assert (r.returncode, stderr_text(r.stderr)) == (0, "")
        assert sleeper.wait(timeout=10) == -signal.SIGKILL
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_cli_create_with_broken_config(tmp_path):
    config = good_config()
    config["process"]["args"] = []
    bundle = make_bundle(tmp_path, config)
    root, log = tmp_path / "root", tmp_path / "log.json"
    root.mkdir()
    r = cli(tmp_path, "--root", root, "--log", log, "--log-format", "json", "create",
            "--bundle", bundle, "c1")
    message = "config.json: process.args: must be a non-empty list of strings"
    assert (r.returncode, r.stdout, stderr_text(r.stderr)) == (1, "", message + "\n")
    assert os.listdir(root) == []
    lines = log_lines(log)
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert (record["level"], record["msg"]) == ("error", message)
    check_log_time(record["time"])


def test_cli_create_missing_bundle_text_log(tmp_path):
    root, log, glog = tmp_path / "root", tmp_path / "log.txt", tmp_path / "global.txt"
    r = cli(tmp_path, "--root", root, "--log", log, "--global-log", glog, "create", "-b",
            tmp_path / "nope", "c9")
    message = "bundle %s: no such directory" % (tmp_path / "nope")
    assert (r.returncode, stderr_text(r.stderr)) == (1, message + "\n")
    assert not root.exists()
    (line,) = log_lines(log)
    assert line.endswith("level=error msg=%s" % json.dumps(message))
    (gline,) = log_lines(glog)
    assert gline.endswith(" error c9: " + message)


def test_builtin_hypervisor_args_match_the_repository_copy():
    with open(os.path.join(REPO, "hypervisor.args")) as f:
        assert rt.DEFAULT_HYPERVISOR_ARGS == f.read()


def test_hypervisor_args_text_falls_back_to_the_builtin(tmp_path):
    assert rt.hypervisor_args_text({"hypervisor_args": None}) == rt.DEFAULT_HYPERVISOR_ARGS
    custom = tmp_path / "hypervisor.args"
    custom.write_text("-name\n@NAME@\n")
    assert rt.hypervisor_args_text({"hypervisor_args": str(custom)}) == "-name\n@NAME@\n"


# -- resources: sizing, host cgroups, guest cgroup limits, update, stats (no VM) ------------

MIB = 1 << 20


def test_parse_resources_keeps_the_oci_shape_and_drops_nulls():
    raw = {"memory": {"limit": 5, "swap": None}, "cpu": {"cpus": "0-1"}, "devices": [{"allow": False}]}
    assert rt.parse_resources(raw, "r") == {"memory": {"limit": 5}, "cpu": {"cpus": "0-1"},
                                            "devices": [{"allow": False}]}


def test_load_spec_reads_resources_and_cgroups_path(tmp_path):
    config = good_config()
    config["linux"]["resources"] = {"memory": {"limit": 64 * MIB}}
    config["linux"]["cgroupsPath"] = "/x/y"
    conf = rt.load_spec(str(make_bundle(tmp_path, config)))
    assert conf["resources"]["memory"] == {"limit": 64 * MIB} and conf["cgroups_path"] == "/x/y"


@pytest.mark.parametrize("cpus, count", [("0", 1), ("0-3", 4), ("1,3-5", 4), (" 2 , 7", 2)])
def test_cpuset_count(cpus, count):
    assert rt.cpuset_count(cpus) == count


@pytest.mark.parametrize("cpus", ["", "a", "3-1", "1-x"])
def test_cpuset_count_rejects(cpus):
    with pytest.raises(rt.Error, match="invalid cpuset"):
        rt.cpuset_count(cpus)


def test_size_vm(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    base = {"memory": "256M", "cpus": 1}
    assert rt.size_vm(dict(base), {}) == base
    assert rt.size_vm(dict(base), {"memory": {"limit": -1}}) == base
    assert rt.size_vm(dict(base), {"memory": {"limit": 1024 * MIB}})["memory"] == "1184M"
    assert rt.size_vm(dict(base), {"memory": {"limit": 96 * MIB}})["memory"] == "256M"
    assert rt.size_vm(dict(base), {"memory": {"limit": 2048 * MIB}})["memory"] == "2240M"
    assert rt.size_vm(dict(base), {"cpu": {"quota": 150000, "period": 100000}})["cpus"] == 2
    assert rt.size_vm(dict(base), {"cpu": {"quota": 50000}})["cpus"] == 1
    assert rt.size_vm(dict(base), {"cpu": {"cpus": "0-2"}})["cpus"] == 3
    assert rt.size_vm(dict(base), {"cpu": {"quota": 900000, "period": 100000}})["cpus"] == 4


@pytest.mark.parametrize("limit_mib", [1, 96, 100, 256, 1000, 1024, 2048, 4000])
def test_memory_room_holds_what_size_vm_sized_for(limit_mib):
    vm = rt.size_vm({"memory": "256M", "cpus": 1}, {"memory": {"limit": limit_mib * MIB}})
    assert rt.memory_room(vm["memory"]) >= limit_mib * MIB
    bigger = rt.size_vm({"memory": "256M"}, {"memory": {"limit": rt.memory_room(vm["memory"]) + 64 * MIB}})
    assert rt._size_bytes(bigger["memory"]) > rt._size_bytes(vm["memory"])


MOUNTINFO_V1 = """\
25 24 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate
27 25 0:24 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
28 25 0:25 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
29 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
30 25 0:27 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset,clone_children
"""
MOUNTINFO_V2 = "26 25 0:23 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_cgroup_hierarchies(tmp_path):
    (tmp_path / "v1").write_text(MOUNTINFO_V1)
    (tmp_path / "v2").write_text(MOUNTINFO_V2)
    assert rt.cgroup_hierarchies(str(tmp_path / "v1")) == [
        ("/sys/fs/cgroup/systemd", 1, frozenset({"name=systemd"})),
        ("/sys/fs/cgroup/cpu,cpuacct", 1, frozenset({"cpu", "cpuacct"})),
        ("/sys/fs/cgroup/memory", 1, frozenset({"memory"})),
        ("/sys/fs/cgroup/cpuset", 1, frozenset({"cpuset"}))]
    assert rt.cgroup_hierarchies(str(tmp_path / "v2")) == [("/sys/fs/cgroup", 2, frozenset())]


def test_own_cgroup(tmp_path):
    (tmp_path / "cg").write_text("4:memory:/a/b\n3:cpu,cpuacct:/c\n0::/u\n")
    assert rt._own_cgroup(1, {"memory"}, str(tmp_path / "cg")) == "/a/b"
    assert rt._own_cgroup(1, {"cpuacct", "cpu"}, str(tmp_path / "cg")) == "/c"
    assert rt._own_cgroup(2, set(), str(tmp_path / "cg")) == "/u"
    assert rt._own_cgroup(1, {"pids"}, str(tmp_path / "cg")) == "/"


@pytest.mark.parametrize("path, unit", [
    ("machine.slice:libpod:abc", "/machine.slice/libpod-abc.scope"),
    ("system-foo-bar.slice:docker:x", "/system.slice/system-foo.slice/system-foo-bar.slice/docker-x.scope"),
    ("-.slice:p:n", "/p-n.scope"),
    (":runc:id1", "/system.slice/runc-id1.scope"),
    ("user.slice::my.slice", "/user.slice/my.slice"),
    ("", "/system.slice/runc-cid.scope"),
])
def test_systemd_unit_path(path, unit):
    assert rt._systemd_unit_path(path, "cid") == unit


@pytest.mark.parametrize("path, message", [("a:b", "expected"), ("nota:b:c", "is not a slice")])
def test_systemd_unit_path_rejects(path, message):
    with pytest.raises(rt.Error, match=message):
        rt._systemd_unit_path(path, "cid")


def test_host_cgroup_dirs(monkeypatch):
    monkeypatch.setattr(rt, "cgroup_hierarchies", lambda: [("/cg/memory", 1, frozenset({"memory"}))])
    monkeypatch.setattr(rt, "_own_cgroup", lambda v, c: "/mine")
    assert rt.host_cgroup_dirs("/docker/x", "x") == [("/cg/memory/docker/x", 1, frozenset({"memory"}))]
    assert rt.host_cgroup_dirs("rel/x", "x")[0][0] == "/cg/memory/mine/rel/x"
    assert rt.host_cgroup_dirs("", "cid")[0][0] == "/cg/memory/mine/cid"
    assert rt.host_cgroup_dirs("machine.slice:libpod:x", "x", True)[0][0] == \
        "/cg/memory/machine.slice/libpod-x.scope"
    with pytest.raises(rt.Error, match="must not contain"):
        rt.host_cgroup_dirs("/a/../../etc", "x")


def test_host_cgroup_limits():
    res = {"memory": {"limit": 100 * MIB}, "cpu": {"quota": 50000, "period": 100000, "shares": 512,
                                                    "cpus": "1", "mems": "0"}, "blockIO": {"weight": 300}}
    every = frozenset({"memory", "cpu", "cpuset", "blkio"})
    assert rt.host_cgroup_limits(1, every, "256M", res) == {
        "memory.limit_in_bytes": (256 + rt.HOST_OVERHEAD_MIB) * MIB, "cpu.cfs_period_us": 100000,
        "cpu.cfs_quota_us": 50000, "cpu.shares": 512, "cpuset.cpus": "1", "cpuset.mems": "0",
        "blkio.weight": 300}
    assert rt.host_cgroup_limits(1, frozenset({"pids"}), "256M", res) == {}
    assert rt.host_cgroup_limits(2, frozenset(), "256M", res) == {
        "memory.max": (256 + rt.HOST_OVERHEAD_MIB) * MIB, "cpu.max": "50000 100000",
        "cpu.weight": rt.cpu_weight(512), "cpuset.cpus": "1", "cpuset.mems": "0"}
    assert rt.host_cgroup_limits(2, frozenset(), "256M", {}) == {}  # no memory limit asked: none


@pytest.mark.parametrize("shares, weight", [(2, 1), (1024, 39), (262144, 10000), (1, 1)])
def test_cpu_weight_as_runc(shares, weight):
    assert rt.cpu_weight(shares) == weight


def test_guest_cgroup_limits():
    assert rt.guest_cgroup_limits({}) == {}
    assert rt.guest_cgroup_limits({
        "memory": {"limit": 64 * MIB, "reservation": 32 * MIB, "swap": 128 * MIB},
        "cpu": {"quota": 50000, "period": 20000, "shares": 1024},
        "pids": {"limit": 40}, "blockIO": {"weight": 500}}) == {
        "memory.max": 64 * MIB, "memory.low": 32 * MIB, "memory.swap.max": 64 * MIB,
        "cpu.max": "50000 20000", "cpu.weight": 39, "pids.max": 40, "io.weight": "default 4950"}
    assert rt.guest_cgroup_limits({"memory": {"limit": -1, "swap": -1}, "cpu": {"quota": -1},
                                   "pids": {"limit": -1}}) == {
        "memory.max": "max", "memory.swap.max": "max", "cpu.max": "max 100000", "pids.max": "max"}
    assert rt.guest_cgroup_limits({"memory": {"limit": 0}, "cpu": {"shares": 0}}) == {}


def test_merge_resources_keeps_what_an_update_leaves_at_zero():
    old = {"memory": {"limit": 100}, "cpu": {"quota": 5, "period": 10, "cpus": "0"}}
    new = {"memory": {"limit": 200, "swap": 0}, "cpu": {"quota": 0, "period": 20, "cpus": ""},
           "pids": {"limit": 7}}
    assert rt.merge_resources(old, new) == {"memory": {"limit": 200}, "pids": {"limit": 7},
                                            "cpu": {"quota": 5, "period": 20, "cpus": "0"}}
    assert old == {"memory": {"limit": 100}, "cpu": {"quota": 5, "period": 10, "cpus": "0"}}


@pytest.mark.parametrize("text, value", [("1048576", MIB), ("100m", 100 * MIB), ("1g", 1 << 30),
                                         ("512k", 512 << 10), ("-1", -1), ("2MB", 2 * MIB),
                                         ("1.5g", 3 << 29)])
def test_ram_bytes(text, value):
    assert rt._ram_bytes(text) == value


def test_ram_bytes_rejects():
    with pytest.raises(rt.Error, match="invalid memory value: lots"):
        rt._ram_bytes("lots")


def test_update_resources_from_flags_and_file(tmp_path):
    parser = rt.build_parser()
    args = parser.parse_args(["update", "--memory", "64m", "--cpu-quota", "5000", "--cpu-share", "512",
                              "--cpuset-cpus", "0", "--pids-limit", "9", "--blkio-weight", "300", "c"])
    assert rt.update_resources(args) == {"memory": {"limit": 64 * MIB},
                                         "cpu": {"quota": 5000, "shares": 512, "cpus": "0"},
                                         "pids": {"limit": 9}, "blockIO": {"weight": 300}}
    with pytest.raises(rt.Error, match="invalid value for --pids-limit: many"):
        rt.update_resources(parser.parse_args(["update", "--pids-limit", "many", "c"]))
    write_json(tmp_path / "r.json", {"memory": {"limit": 5}})
    args = parser.parse_args(["update", "-r", str(tmp_path / "r.json"), "--memory", "1g", "c"])
    assert rt.update_resources(args) == {"memory": {"limit": 5}}  # a file wins, as in runc


def test_runc_stats_from_guest_cgroup_files():
    raw = {"memory.current": "1048576\n", "memory.max": "max\n", "memory.peak": "2097152\n",
           "memory.stat": "anon 100\nfile 200\n", "memory.events": "max 3\noom_kill 1\n",
           "cpu.stat": "usage_usec 10\nuser_usec 6\nsystem_usec 4\nnr_periods 2\n"
                       "nr_throttled 1\nthrottled_usec 5\n",
           "pids.current": "3\n", "pids.max": "max\n"}
    stats = rt.runc_stats(raw)
    assert stats["cpu"] == {"usage": {"total": 10000, "kernel": 4000, "user": 6000},
                            "throttling": {"periods": 2, "throttled_periods": 1, "throttled_time": 5000}}
    assert stats["memory"]["usage"] == {"limit": 2 ** 64 - 1, "usage": MIB, "max": 2 * MIB, "failcnt": 3}
    assert stats["memory"]["cache"] == 200 and stats["memory"]["raw"] == {"anon": 100, "file": 200}
    assert stats["pids"] == {"current": 3, "limit": 0}
    assert rt.runc_stats({"pids.max": "40\n"})["pids"]["limit"] == 40


@pytest.fixture
def host_cgroup(tmp_path):
    """A real cgroup path on this host, removed afterwards (as root, cgroupfs)."""
    path = "/cc-oci-unit/%d" % os.getpid()
    dirs = rt.host_cgroup_dirs(path, "x")
    yield dirs
    for d, _, _ in dirs:
        for p in (d, os.path.dirname(d)):
            if os.path.isdir(p):
                try:
                    os.rmdir(p)
                except OSError:
                    pass


def test_host_cgroup_create_join_and_remove(host_cgroup):
    res = {"memory": {"limit": 64 * MIB}, "cpu": {"quota": 50000, "period": 100000}}
    made = rt.create_host_cgroup(host_cgroup, "256M", res)
    assert made == [d for d, _, _ in host_cgroup] and all(os.path.isdir(d) for d in made)
    mem = next(d for d, v, c in host_cgroup if v == 2 or "memory" in c)
    name = "memory.limit_in_bytes" if os.path.exists(mem + "/memory.limit_in_bytes") else "memory.max"
    with open(os.path.join(mem, name)) as f:
        assert int(f.read()) == (256 + rt.HOST_OVERHEAD_MIB) * MIB
    child = subprocess.Popen([sys.executable, "-c", "import sys, cc_oci_runtime as rt; "
                              "rt.join_host_cgroup(sys.argv[1:]); sys.stdin.read()"] + made,
                             stdin=subprocess.PIPE, cwd=REPO)
    try:
        assert poll_until(lambda: str(child.pid) in open(os.path.join(mem, "cgroup.procs")).read())
        rt.update_host_cgroup(host_cgroup, "512M", res)
        with open(os.path.join(mem, name)) as f:
            assert int(f.read()) == (512 + rt.HOST_OVERHEAD_MIB) * MIB
    finally:
        child.stdin.close()
        child.wait()
    rt.remove_host_cgroup(made)
    assert not any(os.path.exists(d) for d in made)


def poll_until(fn, timeout=10):
    """fn() until truthy or timeout."""
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ---------------------------------------------------------------------------
# Process restrictions: capabilities, seccomp BPF compiler, devices, id maps (issue 9)
# ---------------------------------------------------------------------------

FIXTURES = "/work/shared/fixtures/engine-configs"
EPERM_RET = 0x00050000 | 1


def test_capability_numbers_match_the_kernel():
    assert rt.cap_numbers(["CAP_CHOWN", "CAP_SYS_ADMIN", "CAP_CHECKPOINT_RESTORE"]) == [0, 21, 40]
    with open("/proc/sys/kernel/cap_last_cap") as f:
        assert len(rt.CAPABILITIES) - 1 <= int(f.read())


def test_parse_capabilities_skips_unknown_names():
    caps = rt.parse_capabilities({"bounding": ["CAP_KILL", "CAP_CHOWN", "CAP_NOPE"],
                                  "ambient": ["CAP_KILL"]}, "process.capabilities")
    assert caps == {"bounding": ["CAP_CHOWN", "CAP_KILL"], "effective": [], "inheritable": [],
                    "permitted": [], "ambient": ["CAP_KILL"]}
    with pytest.raises(rt.Error, match=r"^process.capabilities.effective: must be a list"):
        rt.parse_capabilities({"effective": "CAP_KILL"}, "process.capabilities")


def test_parse_process_capabilities_and_oom_score():
    p = rt.parse_process({"args": ["a"], "oomScoreAdj": -5,
                          "capabilities": {"effective": ["CAP_KILL"]}})
    assert p["oomScoreAdj"] == -5 and p["capabilities"]["effective"] == ["CAP_KILL"]
    assert rt.parse_process(dict(p, user={}))["capabilities"] == p["capabilities"]  # re-parse
    with pytest.raises(rt.Error, match="^process.oomScoreAdj: must be an integer between"):
        rt.parse_process({"args": ["a"], "oomScoreAdj": 1001})


def test_exec_cap_adds_like_runc():
    p = {"capabilities": {k: [] for k in rt.CAP_SETS}}
    rt.add_exec_capability(p, "net_admin")
    assert p["capabilities"]["effective"] == ["CAP_NET_ADMIN"]
    assert p["capabilities"]["ambient"] == [] and p["capabilities"]["inheritable"] == []
    p["capabilities"]["inheritable"] = ["CAP_KILL"]
    rt.add_exec_capability(p, "CAP_SYS_TIME")
    assert p["capabilities"]["ambient"] == ["CAP_SYS_TIME"]
    with pytest.raises(rt.Error, match="^exec --cap: unknown capability"):
        rt.add_exec_capability(p, "CAP_NOPE")


def test_syscall_table_matches_the_headers():
    import re
    table = rt.syscall_numbers()
    with open("/usr/include/x86_64-linux-gnu/asm/unistd_64.h") as f:
        for m in re.finditer(r"#define __NR_(\w+) (\d+)", f.read()):
            assert table.get(m.group(1)) == int(m.group(2)), m.group(1)


def _decode(prog):
    """struct sock_filter tuples of a compiled program."""
    return [struct.unpack("HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]


def _run_bpf(prog, nr, args=(), arch=rt.AUDIT_ARCH_X86_64):
    """A classic-BPF interpreter over struct seccomp_data: the value the filter returns."""
    data = struct.pack("iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    a, pc, code = 0, 0, _decode(prog)
    while True:
        op, jt, jf, k = code[pc]
        pc += 1
        if op == rt.BPF_LD_W_ABS:
            a = struct.unpack_from("I", data, k)[0]
        elif op == rt.BPF_ALU_AND_K:
            a &= k
        elif op == rt.BPF_JA:
            pc += k
        elif op in (rt.BPF_JEQ, rt.BPF_JGT, rt.BPF_JGE):
            hit = {rt.BPF_JEQ: a == k, rt.BPF_JGT: a > k, rt.BPF_JGE: a >= k}[op]
            pc += jt if hit else jf
        elif op == rt.BPF_RET_K:
            return k
        else:
            raise AssertionError("unknown opcode %#x" % op)


def _profile(*rules, default="SCMP_ACT_ALLOW", **extra):
    return dict({"defaultAction": default, "syscalls": list(rules)}, **extra)


NR = rt.syscall_numbers()


@pytest.mark.parametrize("action, errno_ret, expected", [
    ("SCMP_ACT_ERRNO", None, 0x00050001), ("SCMP_ACT_ERRNO", 38, 0x00050026),
    ("SCMP_ACT_KILL", None, 0), ("SCMP_ACT_KILL_THREAD", None, 0),
    ("SCMP_ACT_KILL_PROCESS", None, 0x80000000), ("SCMP_ACT_TRAP", None, 0x00030000),
    ("SCMP_ACT_TRACE", 7, 0x7FF00007), ("SCMP_ACT_LOG", None, 0x7FFC0000),
])
def test_seccomp_each_action(action, errno_ret, expected):
    rule = {"names": ["mkdir"], "action": action}
    if errno_ret is not None:
        rule["errnoRet"] = errno_ret
    prog, _ = rt.compile_seccomp(_profile(rule))
    assert _run_bpf(prog, NR["mkdir"]) == expected
    assert _run_bpf(prog, NR["read"]) == 0x7FFF0000


@pytest.mark.parametrize("op, value, two, passes, fails", [
    ("SCMP_CMP_EQ", 5, 0, [5], [4, 6, 5 | 1 << 32]),
    ("SCMP_CMP_NE", 5, 0, [4, 5 | 1 << 32], [5]),
    ("SCMP_CMP_GT", 1 << 32, 0, [(1 << 32) + 1, 1 << 40], [1 << 32, 7]),
    ("SCMP_CMP_GE", 1 << 32, 0, [1 << 32, 1 << 33], [(1 << 32) - 1]),
    ("SCMP_CMP_LT", (1 << 32) + 3, 0, [3, 1 << 32, (1 << 32) + 2], [(1 << 32) + 3, 1 << 33]),
    ("SCMP_CMP_LE", 7, 0, [0, 7], [8, 1 << 32]),
    ("SCMP_CMP_MASKED_EQ", 0xFF00000000F0, 0x0100000000A0, [0x0100000000A5, 0x0100000100AF],
     [0x0100000000B0, 0x0200000000A0]),
])
def test_seccomp_argument_comparisons(op, value, two, passes, fails):
    rule = {"names": ["ioctl"], "action": "SCMP_ACT_ERRNO", "args": [
        {"index": 1, "value": value, "valueTwo": two, "op": op}]}
    prog, _ = rt.compile_seccomp(_profile(rule))
    for arg in passes:
        assert _run_bpf(prog, NR["ioctl"], (0, arg)) == EPERM_RET, hex(arg)
    for arg in fails:
        assert _run_bpf(prog, NR["ioctl"], (0, arg)) == 0x7FFF0000, hex(arg)


def test_seccomp_conditions_and_or_like_runc():
    both = {"names": ["ioctl"], "action": "SCMP_ACT_ERRNO", "args": [
        {"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}, {"index": 1, "value": 2, "op": "SCMP_CMP_EQ"}]}
    prog, _ = rt.compile_seccomp(_profile(both))
    assert _run_bpf(prog, NR["ioctl"], (1, 2)) == EPERM_RET
    assert _run_bpf(prog, NR["ioctl"], (1, 3)) == 0x7FFF0000
    same_arg = {"names": ["ioctl"], "action": "SCMP_ACT_ERRNO", "args": [
        {"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}, {"index": 0, "value": 2, "op": "SCMP_CMP_EQ"}]}
    prog, _ = rt.compile_seccomp(_profile(same_arg))
    assert _run_bpf(prog, NR["ioctl"], (2,)) == EPERM_RET  # one rule per condition: ORed
    assert _run_bpf(prog, NR["ioctl"], (3,)) == 0x7FFF0000


def test_seccomp_arch_x32_unknown_and_new_syscalls():
    prog, flags = rt.compile_seccomp(_profile(
        {"names": ["read", "no_such_call"], "action": "SCMP_ACT_ALLOW"},
        default="SCMP_ACT_ERRNO", flags=["SECCOMP_FILTER_FLAG_LOG"]))
    assert flags == 2
    assert _run_bpf(prog, NR["read"]) == 0x7FFF0000
    assert _run_bpf(prog, NR["write"]) == EPERM_RET
    assert _run_bpf(prog, NR["read"], arch=0x40000003) == 0x80000000  # i386: bad arch
    assert _run_bpf(prog, NR["read"] | rt.X32_SYSCALL_BIT) == 0x80000000
    assert _run_bpf(prog, 1000) == 0x00050000 | errno.ENOSYS  # newer than the table


@pytest.mark.parametrize("fixture", ["docker-bridge-config.json", "podman-config.json"])
def test_seccomp_engine_profiles_compile_small(fixture):
    with open(os.path.join(FIXTURES, fixture)) as f:
        profile = json.load(f)["linux"]["seccomp"]
    prog, _ = rt.compile_seccomp(profile)
    assert len(prog) // 8 < rt.BPF_MAX_INSNS
    assert _run_bpf(prog, NR["write"]) == 0x7FFF0000
    assert _run_bpf(prog, NR["kexec_load"]) & 0xFFFF0000 == 0x00050000
    if "docker" in fixture:
        assert _run_bpf(prog, NR["clone3"]) == 0x00050000 | errno.ENOSYS
        assert _run_bpf(prog, NR["personality"], (8,)) == 0x7FFF0000
        assert _run_bpf(prog, NR["personality"], (9,)) & 0xFFFF0000 == 0x00050000


def test_seccomp_every_syscall_fits():
    names = list(rt.syscall_numbers())
    rules = [{"names": [n], "action": "SCMP_ACT_ERRNO", "errnoRet": i % 100,
              "args": [{"index": 0, "value": i, "op": "SCMP_CMP_NE"}]} for i, n in enumerate(names)]
    prog, _ = rt.compile_seccomp(_profile(*rules))
    for i, n in enumerate(names):
        assert _run_bpf(prog, NR[n], (i + 1,)) == 0x00050000 | i % 100
        assert _run_bpf(prog, NR[n], (i,)) == 0x7FFF0000


@pytest.mark.parametrize("profile, message", [
    ({"defaultAction": "SCMP_ACT_NOPE"}, r"linux.seccomp.defaultAction: unknown or unsupported"),
    ({"defaultAction": "SCMP_ACT_NOTIFY"}, r"linux.seccomp.defaultAction: unknown or unsupp"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": -1}, r"linux.seccomp.defaultErrnoRet"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["NOPE"]}, r"linux.seccomp.flags: unknown"),
    (_profile({"names": [], "action": "SCMP_ACT_KILL"}), r"syscalls\[0\].names: must be a non-empty"),
    (_profile({"names": ["read"], "action": "SCMP_ACT_KILL", "args": [{"index": 6, "op": "SCMP_CMP_EQ"}]}),
     r"syscalls\[0\].args\[0\].index: must be between 0 and 5"),
    (_profile({"names": ["read"], "action": "SCMP_ACT_KILL", "args": [{"index": 0, "op": "EQ"}]}),
     r"syscalls\[0\].args\[0\].op: unknown operator"),
    (_profile({"names": ["read"], "action": "SCMP_ACT_KILL",
               "args": [{"index": 0, "op": "SCMP_CMP_EQ", "value": -1}]}),
     r"args\[0\].value: must be an unsigned 64-bit integer"),
])
def test_seccomp_malformed_profiles(profile, message):
    with pytest.raises(rt.Error, match=message):
        rt.compile_seccomp(profile)


def test_malformed_seccomp_fails_load_spec(tmp_path):
    conf = good_config()
    conf.setdefault("linux", {})["seccomp"] = {"defaultAction": "SCMP_ACT_BOGUS"}
    bundle = make_bundle(tmp_path, conf)
    with pytest.raises(rt.Error, match="^config.json: linux.seccomp.defaultAction: unknown"):
        rt.load_spec(str(bundle))


def _in_child(fn):
    """Run fn in a forked child; (its result text, wait status)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            res = fn()
        except OSError as e:
            res = "errno %d" % e.errno
        except BaseException as e:  # noqa: B902
            res = repr(e)
        os.write(w, str(res).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    return out, os.waitpid(pid, 0)[1]


def _with_filter(profile, fn):
    """fn's result under the compiled profile, installed for real in a child."""
    prog, flags = rt.compile_seccomp(profile)

    def child():
        rt.prctl(rt.PR_SET_NO_NEW_PRIVS, 1)
        rt.install_seccomp({"bpf": prog.hex(), "flags": flags})
        return fn()
    return _in_child(child)


def test_seccomp_filter_really_denies_on_the_host(tmp_path):
    profile = _profile({"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 71},
                       {"names": ["getppid"], "action": "SCMP_ACT_KILL_PROCESS"},
                       {"names": ["fchmodat", "chmod"], "action": "SCMP_ACT_ERRNO",
                        "args": [{"index": 1, "value": 0o700, "op": "SCMP_CMP_EQ"}]})
    assert _with_filter(profile, lambda: os.mkdir(str(tmp_path / "d"))) == ("errno 71", 0)
    f = tmp_path / "f"
    f.write_text("")
    assert _with_filter(profile, lambda: rt._libc().syscall(NR["chmod"], str(f).encode(), 0o755)) \
        == ("0", 0)
    out, status = _with_filter(profile, lambda: rt._libc().syscall(NR["chmod"], str(f).encode(),
                                                                   0o700))
    assert out == "-1" and status == 0
    assert _with_filter(profile, os.getppid)[1] == signal.SIGSYS  # killed
    with open(os.path.join(FIXTURES, "docker-bridge-config.json")) as fh:
        docker = json.load(fh)["linux"]["seccomp"]
    assert _with_filter(docker, lambda: subprocess.run(["sh", "-c", "echo ok"], capture_output=True,
                                                       text=True).stdout) == ("ok\n", 0)


def test_finalize_process_sets_capabilities_on_the_host():
    caps = {"bounding": ["CAP_KILL", "CAP_NET_RAW"], "effective": ["CAP_KILL"],
            "permitted": ["CAP_KILL", "CAP_NET_RAW"], "inheritable": ["CAP_NET_RAW"],
            "ambient": ["CAP_NET_RAW"]}
    p = {"uid": 1000, "gid": 1000, "additionalGids": [], "umask": None, "capabilities": caps,
         "noNewPrivileges": True, "env": []}

    def child():
        rt._prepare_exec(p)  # the bounding set
        rt.finalize_process(p)
        with open("/proc/self/status") as f:
            return "".join(ln for ln in f if ln.startswith(("Cap", "NoNew", "Uid")))
    out, status = _in_child(child)
    assert status == 0
    assert "CapInh:\t0000000000002000" in out and "CapPrm:\t0000000000002020" in out
    assert "CapEff:\t0000000000000020" in out and "CapBnd:\t0000000000002020" in out
    assert "CapAmb:\t0000000000002000" in out and "NoNewPrivs:\t1" in out
    assert "Uid:\t1000\t1000\t1000\t1000" in out


def test_prepare_exec_resets_signals_sets_rlimits_and_home():
    p = {"uid": 0, "env": ["PATH=/bin"], "capabilities": None,
         "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 77, "hard": 88}]}

    def child():
        import resource
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
        env = rt._prepare_exec(p)
        with open("/proc/self/status") as f:
            status = dict(ln.split(":", 1) for ln in f.read().splitlines())
        standard = (1 << 31) - 1  # glibc keeps its own real-time signals 32 and 33 as they are
        return repr((env, resource.getrlimit(resource.RLIMIT_NOFILE),
                     signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL,
                     int(status["SigIgn"], 16) & standard, int(status["SigBlk"], 16) & standard,
                     status["CapBnd"].strip()))
    out, status = _in_child(child)
    assert status == 0
    assert out == repr((["PATH=/bin", "HOME=/root"], (77, 88), True, 0, 0, "0" * 16))


def test_linux_devices_handler():
    devs = rt._linux_devices([{"path": "/dev/x/../fuse", "type": "c", "major": 10, "minor": 229}])
    assert devs == [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229,
                     "fileMode": 0o666, "uid": 0, "gid": 0}]
    for bad, message in (([{"path": "dev/x", "type": "c"}], r"\[0\].path: must be an absolute"),
                         ([{"path": "/dev/x", "type": "z"}], r"\[0\].type: must be c, b, u or p"),
                         ([{"path": "/dev/x", "type": "c", "fileMode": 0o10000}], "fileMode"),
                         ([{"path": "/dev/x", "type": "c", "uid": -1}], r"\[0\].uid")):
        with pytest.raises(rt.Error, match=message):
            rt._linux_devices(bad)


def test_make_devices(tmp_path):
    rt.make_devices(str(tmp_path), [{"path": "/a/b/null2", "type": "c", "major": 1, "minor": 3,
                                     "fileMode": 0o640, "uid": 7, "gid": 8},
                                    {"path": "/fifo", "type": "p", "major": 0, "minor": 0,
                                     "fileMode": 0o600, "uid": 0, "gid": 0}])
    st = os.stat(tmp_path / "a/b/null2")
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 7, 8)
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo").st_mode)


def test_device_rules_handler():
    assert rt._linux_device_rules(None) is None
    rules = rt._linux_device_rules([{"allow": False, "access": "rwm"},
                                    {"allow": True, "type": "c", "major": 136, "access": "rw"},
                                    {"allow": True, "type": "b", "major": 7, "minor": 1}])
    assert rules == [(False, "a"), (True, "c 136:* rw"), (True, "b 7:1 rwm")]
    with pytest.raises(rt.Error, match=r"^linux.resources.devices\[0\].allow: must be a boolean"):
        rt._linux_device_rules([{"access": "rwm"}])
    with pytest.raises(rt.Error, match=r"\[0\].access: must be letters of rwm"):
        rt._linux_device_rules([{"allow": True, "access": "x"}])


def test_id_mappings_handler():
    maps = rt._linux_id_mappings({"uidMappings": [{"containerID": 0, "hostID": 1000, "size": 10}],
                                  "gidMappings": [{"containerID": 0, "hostID": 2000, "size": 1}]})
    assert maps == {"uidMappings": "0 1000 10\n", "gidMappings": "0 2000 1\n"}
    with pytest.raises(rt.Error, match="^linux.gidMappings: must be a non-empty list"):
        rt._linux_id_mappings({"uidMappings": [{"containerID": 0, "hostID": 1, "size": 1}]})


def test_guest_config_carries_the_restrictions(tmp_path):
    conf = good_config()
    conf["linux"] = {"seccomp": _profile({"names": ["read"], "action": "SCMP_ACT_KILL"}),
                     "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}],
                     "resources": {"devices": [{"allow": False, "access": "rwm"}]},
                     "namespaces": [{"type": "user"}],
                     "uidMappings": [{"containerID": 0, "hostID": 0, "size": 5}],
                     "gidMappings": [{"containerID": 0, "hostID": 0, "size": 5}]}
    conf["hooks"] = {"startContainer": [{"path": "/bin/true"}], "prestart": [{"path": "/bin/true"}]}
    spec = rt.load_spec(str(make_bundle(tmp_path, conf)))
    g = rt.guest_config("c1", spec)
    assert g["seccomp"]["bpf"] and g["devices"][0]["path"] == "/dev/fuse"
    assert g["device_rules"] == [(False, "a")]
    assert g["id_mappings"]["uidMappings"] == "0 0 5\n"
    assert list(g["hooks"]) == ["startContainer"] and g["state"]["id"] == "c1"


def test_container_hooks_run_with_state_and_fail(tmp_path):
    out = tmp_path / "out"
    ok = {"path": "/bin/sh", "args": ["sh", "-c", "cat > %s" % out]}
    assert _in_child(lambda: rt.run_container_hooks({"startContainer": [ok]}, "startContainer",
                                                    {"id": "c"})) == ("None", 0)
    assert out.read_text() == '{"id":"c"}'
    bad = {"path": "/bin/sh", "args": ["sh", "-c", "echo oops >&2; exit 3"]}
    with pytest.raises(rt.Error, match="^createContainer hook /bin/sh failed: exit status 3: oops$"):
        rt.run_container_hooks({"createContainer": [bad]}, "createContainer", {})
    slow = {"path": "/bin/sleep", "args": ["sleep", "5"], "timeout": 1}
    with pytest.raises(rt.Error, match="timed out after 1s"):
        rt.run_container_hooks({"startContainer": [slow]}, "startContainer", {})


# -- the CLI's start-up: compiled code cached by content, only the given command's parser ----

def _run_copy(script, cache, *args):
    """Run a copy of the runtime as a program (its shell header), with its own cache dir."""
    env = dict(os.environ, CC_OCI_CACHE_DIR=str(cache), CC_OCI_PYTHON=sys.executable)
    return subprocess.run([str(script)] + list(args), capture_output=True, text=True, env=env,
                          timeout=60)


@pytest.fixture
def script_copy(tmp_path):
    """An executable copy of cc_oci_runtime.py."""
    copy = tmp_path / "cc-oci-runtime"
    shutil.copy(SCRIPT, copy)
    copy.chmod(0o755)
    return copy


def test_program_runs_cached_code_keyed_by_content(script_copy, tmp_path):
    cache = tmp_path / "cache"
    first = _run_copy(script_copy, cache, "--version")
    assert first.returncode == 0 and first.stdout.startswith("cc-oci-runtime version " + rt.__version__)
    entries = os.listdir(cache / "code")
    assert len(entries) == 1
    assert _run_copy(script_copy, cache, "--version").stdout == first.stdout
    text = script_copy.read_text().replace('__version__ = "%s"' % rt.__version__, '__version__ = "9.9.9"')
    script_copy.write_text(text)
    changed = _run_copy(script_copy, cache, "--version")
    assert changed.stdout.startswith("cc-oci-runtime version 9.9.9"), "stale code served"
    assert len(os.listdir(cache / "code")) == 2


def test_program_runs_without_a_usable_cache(script_copy, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = _run_copy(script_copy, blocker / "cache", "--version")  # the cache cannot be made
    assert r.returncode == 0 and rt.__version__ in r.stdout, r.stderr
    cache = tmp_path / "cache"
    _run_copy(script_copy, cache, "--version")
    (entry,) = os.listdir(cache / "code")
    (cache / "code" / entry).write_bytes(b"not marshal data")  # corrupt, or written by a crash
    r = _run_copy(script_copy, cache, "--version")
    assert r.returncode == 0 and rt.__version__ in r.stdout, r.stderr


def test_concurrent_first_runs_share_one_good_cache_entry(script_copy, tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, CC_OCI_CACHE_DIR=str(cache), CC_OCI_PYTHON=sys.executable)
    procs = [subprocess.Popen([str(script_copy), "--version"], stdout=subprocess.PIPE, env=env, text=True)
             for _ in range(8)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs) and len(set(outs)) == 1
    entries = os.listdir(cache / "code")
    assert len(entries) == 1, entries  # no temporary file left behind
    import marshal
    code = marshal.loads((cache / "code" / entries[0]).read_bytes())
    assert code.co_filename == str(script_copy)


@pytest.mark.parametrize("argv", [
    ["state", "c1"], ["--root", "/r", "state", "c1"], ["-root", "/r", "--debug", "kill", "c1", "KILL"],
    ["kill", "--all", "c1", "0"], ["delete", "-f", "c1"], ["list", "-q"], ["list", "--format", "json"],
    ["ps", "c1", "-e", "-x"], ["ps", "--format", "json", "c1"], ["start", "c1"],
    ["--log", "/l", "--log-format", "json", "create", "-b", "/b", "--pid-file", "/p", "c1"],
    ["exec", "-t", "-e", "A=1", "c1", "sh", "-c", "x"], ["update", "--memory", "1g", "c1"],
    ["events", "--stats", "c1"], ["pause", "c1"], ["spec", "--rootless"], ["features"],
])
def test_parser_of_one_command_parses_as_the_whole_parser(argv):
    assert rt.command_in(argv) in argv
    whole = rt.build_parser().parse_args(rt.go_style_argv(argv, rt.build_parser()))
    part_parser = rt.build_parser(rt.command_in(argv))
    part = part_parser.parse_args(rt.go_style_argv(argv, part_parser))
    assert vars(part) == vars(whole)


# the short commands' argv forms, each parsed by fast_args and by the parser (ids, signals,
# Go-style -flag and -flag=value, values glued with =, errors, help, options out of place)
FAST_PREFIXES = [
    [], ["--root", "/r"], ["-root=/r"], ["--root=-x"], ["--root", "-x"], ["--root", ""],
    ["--log", "/l", "--log-format", "json"], ["-log-format=json"], ["--log-format", "xml"],
    ["--debug"], ["--debug=true"], ["--debug=false"], ["--debug=maybe"], ["-debug"],
    ["--systemd-cgroup"], ["--criu", "x"], ["--global-log=/g", "--rootless", "true"], ["-v"],
    ["-h"], ["--help"], ["--ro", "x"], ["--root"], ["---root", "x"], ["--root", "/a", "-root", "/b"],
]
FAST_COMMAND_LINES = [
    ["state", "c0"], ["state"], ["state", "c0", "c1"], ["state", "-h"], ["state", "c0", "--root", "x"],
    ["state", "--", "c0"], ["state", "-"], ["state", ""], ["start", "c0"], ["start", "--help"],
    ["kill", "c0"], ["kill", "c0", "9"], ["kill", "c0", "KILL", "-a"], ["kill", "-a", "c0", "9"],
    ["kill", "c0", "-a", "9"], ["kill", "c0", "-9"], ["kill", "--all=true", "c0"],
    ["kill", "-all", "c0", "0"], ["kill", "-a=false", "c0"], ["kill", "--a", "c0"],
    ["kill", "c0", "1", "2"], ["kill"], ["delete", "c0"], ["delete", "-f", "c0"],
    ["delete", "--force", "c0"], ["delete", "c0", "-force=true"], ["delete", "-f=0", "c0"],
    ["delete", "-fx", "c0"], ["list"], ["list", "-q"], ["list", "-f", "json"], ["list", "--format=json"],
    ["list", "-format", "json", "-quiet"], ["list", "-fjson"], ["list", "-f=json"], ["list", "-f"],
    ["list", "x"], ["list", "--format", "-q"], ["ps", "c0"], ["ps", "-f", "json", "c0"],
    ["ps", "--format", "json", "c0"], ["ps", "c0", "-ef"], ["ps", "c0", "aux"], ["ps", "c0", "--", "x"],
    ["ps", "--format=table", "c0"], ["ps"], ["exec", "c0", "ls"], ["create", "c0"], ["help"], [],
    ["stat", "c0"],
]


def _parsed(argv):
    """vars() of the parser's namespace for argv, or the exit code of its usage error."""
    parser = rt.build_parser(rt.command_in(argv))
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return vars(parser.parse_args(rt.go_style_argv(argv, parser)))
    except SystemExit as e:
        return e.code


def test_fast_args_parse_as_the_parser_or_leave_it_the_command_line():
    fast = 0
    for prefix in FAST_PREFIXES:
        for line in FAST_COMMAND_LINES:
            argv = prefix + line
            args = rt.fast_args(argv)
            if args is not None:
                fast += 1
                assert vars(args) == _parsed(argv), argv
    assert fast > 300
    for argv in (["state", "c0"], ["--root", "/r", "--log", "/l", "--log-format", "json", "kill", "c0", "9"],
                 ["list", "-q"], ["list", "--format", "json"], ["ps", "--format", "json", "c0"],
                 ["delete", "-f", "c0"], ["start", "c0"], ["-root=/r", "--systemd-cgroup", "kill", "c0"]):
        assert rt.fast_args(argv) is not None, argv
    for argv in (["state", "-h"], ["--help"], ["kill", "c0", "-a", "9"], ["list", "x"], ["ps", "c0", "-ef"]):
        assert rt.fast_args(argv) is None, argv


def test_fast_args_gives_ps_a_list_of_its_own():
    first, second = rt.fast_args(["ps", "c0"]), rt.fast_args(["ps", "c0"])
    assert first.ps_args == [] and first.ps_args is not second.ps_args


@pytest.mark.parametrize("argv", [["state", "c0", "x"], ["kill", "c0", "1", "2"], ["--help"],
                                  ["list", "--format"], ["state", "--help"]])
def test_main_runs_the_parser_for_what_fast_args_leaves(argv, capsys):
    try:
        code = rt.main(argv)
    except SystemExit as e:  # --help
        code = e.code
    out, err = capsys.readouterr()
    assert code == _parsed(argv)
    assert (out + err).startswith("usage: cc-oci-runtime")


def _modules_after(tmp_path, *args):
    """The heavy modules (json, re, argparse, socket, signal, enum, shutil) a run of the program
    imports, and its exit code, from a child process."""
    code = ("import sys; sys.argv = ['cc-oci-runtime'] + %r; sys.path.insert(0, %r)\n"
            "import cc_oci_runtime as rt\nrc = rt.main()\n"
            "print('\\n', sorted(m for m in ('json', 're', 'argparse', 'socket', 'signal', 'enum', "
            "'shutil', 'locale', 'gettext') if m in sys.modules), rc)" % (list(args), REPO))
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60)
    return r.stdout.strip().splitlines()[-1].strip()


def test_short_commands_import_no_heavy_module(tmp_path):
    root = str(tmp_path / "root")
    assert _modules_after(tmp_path, "--root", root, "list") == "[] 0"
    assert _modules_after(tmp_path, "--root", root, "list", "--format", "json") == "[] 0"
    assert _modules_after(tmp_path, "--root", root, "state", "c0") == "[] 1"
    assert _modules_after(tmp_path, "--root", root, "kill", "c0", "KILL") == "[] 1"
    assert _modules_after(tmp_path, "--root", root, "delete", "-f", "c0") == "[] 0"
    assert _modules_after(tmp_path, "--root", root, "ps", "c0") == "[] 1"
    assert "argparse" in _modules_after(tmp_path, "--root", root, "state")  # a usage error
    os.makedirs(os.path.join(root, "gone", "files", "empty"))  # a container whose processes ended
    with open(os.path.join(root, "gone", "state.json"), "w") as f:
        json.dump({"pid": 2 ** 22 + 1, "pid_start": 1, "started": True, "bundle": "/b"}, f)
    assert _modules_after(tmp_path, "--root", root, "state", "gone") == "[] 0"
    assert _modules_after(tmp_path, "--root", root, "start", "gone") == "[] 1"
    assert _modules_after(tmp_path, "--root", root, "kill", "gone", "0") == "[] 1"
    assert _modules_after(tmp_path, "--root", root, "delete", "gone") == "[] 0"
    assert not os.path.exists(os.path.join(root, "gone"))


def _exit_now_in_child(code, close_stdout=False):
    """(status, what reached stdout) of a child that writes buffered output and exit_now(code)s."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.dup2(w, 1)
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)))
        sys.stdout.write("buffered line\n")
        if close_stdout:
            os.close(1)
        rt.exit_now(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), out


def test_exit_now_flushes_stdout_and_keeps_the_status():
    assert _exit_now_in_child(3) == (3, b"buffered line\n")
    assert _exit_now_in_child(0) == (0, b"buffered line\n")
    assert _exit_now_in_child(0, close_stdout=True) == (120, b"")  # as Python's own exit
    assert _exit_now_in_child(1, close_stdout=True) == (1, b"")


def test_remove_tree_removes_a_tree_and_follows_no_symlink(tmp_path):
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "keep").write_text("x")
    top = tmp_path / "top"
    (top / "a" / "b" / "c").mkdir(parents=True)
    (top / "a" / "b" / "c" / "f").write_text("x")
    (top / "file").write_text("x")
    os.mkfifo(top / "a" / "fifo")
    os.symlink(outside, top / "a" / "to-dir")
    os.symlink(outside / "sub" / "keep", top / "to-file")
    os.symlink(tmp_path / "nowhere", top / "dangling")
    (top / "a" / "ro").mkdir()
    (top / "a" / "ro" / "f").write_text("x")
    os.chmod(top / "a" / "ro", 0o500)  # root removes it anyway; others leave it, as rmtree
    rt.remove_tree(str(top))
    if os.geteuid() == 0:
        assert not top.exists()
    assert (outside / "sub" / "keep").read_text() == "x"
    rt.remove_tree(str(tmp_path / "missing"))  # no error, as rmtree(ignore_errors=True)
    os.symlink(outside, tmp_path / "link")
    rt.remove_tree(str(tmp_path / "link"))  # a symlink itself: left alone, as rmtree
    assert (tmp_path / "link").is_symlink() and (outside / "sub" / "keep").exists()


JSON_SAMPLES = [
    {"a": 1, "b": [1, 2, {"c": None, "d": True, "e": False}], "f": "\u00e9<>&\u2028\x01\"\\",
     "g": 1.5, "h": [], "i": {}, "j": (1, "x")},
    [], {}, "x", "", 1, -7, 2**70, 1.0, -0.0, 1e300, 3.14159, None, True, [[[]]], {"k": [{}]},
    {"a": {"b": {"c": [1, [2, [3]]]}}}, "\ud800", "\U0001f600",
    {1: 2}, {1: 2, None: 3, 1.5: 4, True: 5}, float("nan"), [float("inf")], {"x": b"y"},
    {"e": signal.SIGTERM}, [object()],
]
JSON_SAMPLES.append([JSON_SAMPLES])  # circular: json's ValueError


@pytest.mark.parametrize("kwargs", [{}, {"indent": 1}, {"indent": 2}, {"indent": 0},
                                    {"ensure_ascii": False}, {"separators": (",", ":")},
                                    {"ensure_ascii": False, "indent": 2, "separators": (",", ": ")}])
def test_json_dumps_writes_what_json_writes(kwargs):
    for obj in JSON_SAMPLES:
        try:
            expect = json.dumps(obj, **kwargs)
        except (TypeError, ValueError) as e:
            with pytest.raises(type(e), match=re.escape(str(e))):
                rt.json_dumps(obj, **kwargs)
        else:
            assert rt.json_dumps(obj, **kwargs) == expect, obj


def test_go_json_of_a_state_is_json_s():
    state = {"ociVersion": "1.0.2", "id": "c<1>", "pid": 4242, "status": "running",
             "bundle": "/b\u00e9", "rootfs": "/r", "created": "2026-01-01T00:00:00.5Z",
             "annotations": {"a&b": "x"}, "owner": ""}
    expect = json.dumps(state, ensure_ascii=False, indent=2, separators=(",", ": "))
    expect = expect.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    assert rt.go_json(state, indent=2) == expect
    assert rt.go_json([state]) == json.dumps([state], ensure_ascii=False, separators=(",", ":")) \
        .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@pytest.mark.parametrize("text", [
    '{"a": 1}', ' [1,2] ', '\n{"a":"\\u00e9"}\n', '1', '"x"', 'NaN', '[Infinity, -Infinity]',
    '{"a":1}x', '', ' ', '{"a":', '\ufeff{}', b'{"a": "\xc3\xa9"}', b'\xef\xbb\xbf{"a":1}',
    '{"a":1}'.encode("utf-16"), '[1]'.encode("utf-16-le"), '[1]'.encode("utf-32-be"), b'\xff',
    '1.5e3', '-0', '{"a":1,"a":2}', '[1,]', '\t[]\r', bytearray(b'[true]'), '"\x01"', 7,
])
def test_json_loads_reads_what_json_reads(text):
    try:
        expect = ("ok", json.loads(text))
    except (TypeError, ValueError) as e:
        with pytest.raises(type(e), match=re.escape(str(e))):
            rt.json_loads(text)
    else:
        assert repr(("ok", rt.json_loads(text))) == repr(expect)


def test_parse_signal_knows_the_names_signal_knows():
    for sig in signal.Signals:
        for name in (sig.name, sig.name[3:], sig.name.lower(), sig.name[3:].lower()):
            assert rt.parse_signal(name) == int(sig), name
    for alias in ("IOT", "CLD", "POLL"):
        if hasattr(signal, "SIG" + alias):
            assert rt.parse_signal(alias) == int(getattr(signal, "SIG" + alias))
    for bad in ("SIG_DFL", "_DFL", "DFL", "SIG_IGN", "NSIG", "SIG", "", "foo", "sig-kill",
                "Signals", "SIGDFL"):
        with pytest.raises(rt.Error, match="^unknown signal "):
            rt.parse_signal(bad)


def test_parser_of_no_known_command_is_the_whole_parser(capsys):
    assert rt.command_in(["--root", "/r"]) is None
    assert rt.command_in(["--log", "x", "-v"]) is None
    full = rt.build_parser().format_help()
    assert rt.build_parser("no-such-command").format_help() == full
    assert rt.build_parser("help").format_help() == full
    assert "checkpoint" in full and "update" in full


# ---------------------------------------------------------------------------
# Network: rtnetlink/tc messages, the plan, and the wiring in throw-away namespaces
# ---------------------------------------------------------------------------

def in_new_netns(fn):
    """fn()'s (JSON) result, run in a forked child inside a fresh network namespace."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            rt._check_libc(rt._libc().unshare(rt.CLONE_NEWNET), "unshare")
            result = ["ok", fn()]
        except BaseException:
            import traceback
            result = ["error", traceback.format_exc()]
        os.write(w, json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    status, value = json.loads(data)
    if status != "ok":
        pytest.fail(value)
    return value


def make_tap(name, mac=None):
    """A tap in the current namespace (kept while the returned fd is open), with mac if given."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, rt.TUNSETIFF, struct.pack("16sH", name.encode(), rt.IFF_TAP | rt.IFF_NO_PI))
    if mac:
        with rt.Netlink() as nl:
            index = {ln["name"]: ln["index"] for ln in nl.links()}[name]
            nl.set_link(index, mac=mac)
    return fd


def test_nl_attr_encodings():
    assert rt.nl_attr(3, "eth0") == struct.pack("=HH", 9, 3) + b"eth0\0" + b"\0\0\0"
    assert rt.nl_attr(4, 1500) == struct.pack("=HHI", 8, 4, 1500)
    assert rt.nl_attr(1, b"\x01\x02") == struct.pack("=HH", 6, 1) + b"\x01\x02\0\0"
    nested = rt.nl_attr(18, [rt.nl_attr(1, "veth")])
    assert struct.unpack_from("=HH", nested) == (len(nested), 18 | rt.NLA_F_NESTED)
    assert rt.nl_parse_attrs(nested) == {18: rt.nl_attr(1, "veth")}


def test_nl_message_round_trip():
    header = rt.IFINFO.pack(0, 0, 7, 0, 0)
    msg = rt.nl_message(rt.RTM_GETLINK, rt.NLM_F_DUMP, 42, header, [rt.nl_attr(3, "lo")])
    assert struct.unpack_from("=IHHII", msg) == (len(msg), rt.RTM_GETLINK, rt.NLM_F_DUMP, 42, 0)
    two = msg + rt.nl_message(rt.NLMSG_DONE, 0, 42, b"\0\0\0\0")
    parsed = rt.nl_parse_messages(two)
    assert [(k, s) for k, _f, s, _p in parsed] == [(rt.RTM_GETLINK, 42), (rt.NLMSG_DONE, 42)]
    assert rt.nl_parse_attrs(parsed[0][3], rt.IFINFO.size) == {3: b"lo\0"}
    assert rt.nl_parse_messages(two[:-3]) == parsed[:1]  # a truncated message is dropped


def test_nl_error_code():
    assert rt.nl_error_code(struct.pack("=i", -errno.EEXIST) + b"\0" * 16) == errno.EEXIST
    assert rt.nl_error_code(struct.pack("=i", 0)) == 0


def test_parse_link():
    payload = rt.IFINFO.pack(0, 1, 5, rt.IFF_UP, 0) + b"".join([
        rt.nl_attr(rt.IFLA_IFNAME, "eth0"), rt.nl_attr(rt.IFLA_MTU, 1400),
        rt.nl_attr(rt.IFLA_ADDRESS, bytes.fromhex("0242ac110002")),
        rt.nl_attr(rt.IFLA_LINKINFO, [rt.nl_attr(rt.IFLA_INFO_KIND, "veth")])])
    assert rt.parse_link(payload) == {"index": 5, "type": 1, "flags": rt.IFF_UP, "name": "eth0",
                                      "mtu": 1400, "mac": "02:42:ac:11:00:02", "kind": "veth"}


def test_parse_address_v4_v6_and_others():
    v4 = rt.IFADDR.pack(socket.AF_INET, 16, 0, 0, 3) + rt.nl_attr(rt.IFA_ADDRESS, bytes([10, 88, 0, 9])) \
        + rt.nl_attr(rt.IFA_LOCAL, bytes([10, 88, 0, 2]))
    assert rt.parse_address(v4) == {"index": 3, "family": 4, "address": "10.88.0.2", "prefix": 16, "scope": 0}
    v6 = rt.IFADDR.pack(socket.AF_INET6, 64, 0, 0, 3) + rt.nl_attr(
        rt.IFA_ADDRESS, socket.inet_pton(socket.AF_INET6, "fd00::2"))
    assert rt.parse_address(v6)["address"] == "fd00::2" and rt.parse_address(v6)["family"] == 6
    assert rt.parse_address(rt.IFADDR.pack(socket.AF_PACKET, 0, 0, 0, 3)) is None


def test_route_message_parses_back():
    route = {"family": 4, "dst": "10.232.0.0", "dst_len": 16, "gateway": "10.231.0.1",
             "prefsrc": "10.231.0.2", "priority": 7, "scope": 0}
    header, attrs = rt.route_message(route, 9)
    parsed = rt.parse_route(header + b"".join(attrs))
    assert parsed == dict(route, oif=9, protocol=rt.RTPROT_BOOT)
    default = {"family": 6, "dst": None, "dst_len": 0, "gateway": "fe80::1", "scope": 0}
    header, attrs = rt.route_message(default, 2)
    assert rt.parse_route(header + b"".join(attrs))["gateway"] == "fe80::1"
    assert rt.RTA_DST not in rt.nl_parse_attrs(b"".join(attrs))


def test_parse_route_skips_other_tables_and_types():
    local = rt.RTMSG.pack(socket.AF_INET, 32, 0, 0, 255, 2, 254, 2, 0)  # table local, RTN_LOCAL
    assert rt.parse_route(local) is None
    main_by_attr = rt.RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 3, 0, rt.RTN_UNICAST, 0) + \
        rt.nl_attr(rt.RTA_TABLE, rt.RT_TABLE_MAIN)
    assert rt.parse_route(main_by_attr)["dst_len"] == 0
    other = rt.RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 3, 0, rt.RTN_UNICAST, 0) + rt.nl_attr(rt.RTA_TABLE, 100)
    assert rt.parse_route(other) is None


def test_address_message_flags():
    header, attrs = rt.address_message(4, {"family": 4, "address": "10.0.0.2", "prefix": 24})
    assert rt.IFADDR.unpack(header) == (socket.AF_INET, 24, 0, 0, 4)
    assert set(rt.nl_parse_attrs(b"".join(attrs))) == {rt.IFA_LOCAL, rt.IFA_ADDRESS}
    header, attrs = rt.address_message(4, {"family": 6, "address": "fd00::2", "prefix": 64})
    assert rt.IFADDR.unpack(header) == (socket.AF_INET6, 64, rt.IFA_F_NODAD, 0, 4)


def test_tc_messages_match_tc():
    header, attrs = rt.ingress_qdisc_message(3)
    assert rt.TCMSG.unpack(header) == (0, 3, 0xFFFF0000, 0xFFFFFFF1, 0)
    assert attrs == [rt.nl_attr(rt.TCA_KIND, "ingress")]
    header, attrs = rt.redirect_filter_message(3, 8)
    family, index, handle, parent, info = rt.TCMSG.unpack(header)
    assert (index, parent, info >> 16, socket.ntohs(info & 0xFFFF)) == (3, 0xFFFF0000, 1, rt.ETH_P_ALL)
    top = rt.nl_parse_attrs(b"".join(attrs))
    assert top[rt.TCA_KIND] == b"u32\0"
    options = rt.nl_parse_attrs(top[rt.TCA_OPTIONS])
    flags, _shift, nkeys = struct.unpack_from("=BBB", options[rt.TCA_U32_SEL])
    assert (flags, nkeys, len(options[rt.TCA_U32_SEL])) == (rt.TC_U32_TERMINAL, 1, 32)
    action = rt.nl_parse_attrs(rt.nl_parse_attrs(options[rt.TCA_U32_ACT])[1])
    assert action[rt.TCA_ACT_KIND] == b"mirred\0"
    parms = rt.nl_parse_attrs(action[rt.TCA_ACT_OPTIONS])[rt.TCA_MIRRED_PARMS]
    assert struct.unpack("=IIiiiiI", parms) == (0, 0, rt.TC_ACT_STOLEN, 0, 0, rt.TCA_EGRESS_REDIR, 8)


def link(index, name, flags=rt.IFF_UP, ltype=rt.ARPHRD_ETHER, kind="", mac="02:00:00:00:00:01", mtu=1500):
    """A parse_link result."""
    return {"index": index, "name": name, "flags": flags, "type": ltype, "kind": kind, "mac": mac, "mtu": mtu}


def test_engine_links_keeps_only_the_engines_ethernet_interfaces():
    links = [link(1, "lo", rt.IFF_UP | rt.IFF_LOOPBACK, 772), link(2, "eth0"), link(3, "tunl0", 0, 768),
             link(4, "gretap0", rt.IFF_UP, kind="gretap"), link(5, "cc-tap0"), link(6, "eth1", 0),
             link(7, "net1")]
    assert [ln["name"] for ln in rt.engine_links(links)] == ["eth0", "net1"]


def test_network_plan():
    links = [link(1, "lo", rt.IFF_UP | rt.IFF_LOOPBACK, 772), link(2, "eth0", mac="02:42:ac:11:00:02", mtu=1450)]
    addresses = [{"index": 2, "family": 4, "address": "172.17.0.2", "prefix": 16, "scope": 0},
                 {"index": 2, "family": 6, "address": "fe80::42:acff:fe11:2", "prefix": 64, "scope": 253},
                 {"index": 2, "family": 6, "address": "fd00::2", "prefix": 64, "scope": 0},
                 {"index": 1, "family": 4, "address": "127.0.0.1", "prefix": 8, "scope": 254}]
    base = {"dst": None, "dst_len": 0, "gateway": None, "prefsrc": None, "priority": 0, "scope": 0}
    routes = [dict(base, family=4, gateway="172.17.0.1", oif=2, protocol=3),
              dict(base, family=4, dst="172.17.0.0", dst_len=16, oif=2, protocol=2, scope=253),
              dict(base, family=4, dst="10.1.0.0", dst_len=16, oif=2, protocol=3, scope=253),
              dict(base, family=6, dst="fe80::", dst_len=64, oif=2, protocol=3),
              dict(base, family=4, dst="127.0.0.0", dst_len=8, oif=1, protocol=3)]
    plan = rt.network_plan(links, addresses, routes)
    assert plan["interfaces"] == [{"slot": 0, "name": "eth0", "mac": "02:42:ac:11:00:02", "mtu": 1450, "index": 2,
                                   "addresses": [{"family": 4, "address": "172.17.0.2", "prefix": 16},
                                                 {"family": 6, "address": "fd00::2", "prefix": 64}]}]
    assert [(r["dst"], r["gateway"], r["dev"], r["slot"]) for r in plan["routes"]] == [
        ("10.1.0.0", None, "eth0", 0), (None, "172.17.0.1", "eth0", 0)]
    assert plan["refused"] == []
    many = [link(i, "eth%d" % i) for i in range(2, 3 + rt.NET_SLOTS)]
    with pytest.raises(rt.Error, match="^network: 5 interfaces in the container's network namespace; a VM has 4$"):
        rt.network_plan(many, [], [])


def test_net_args_and_qemu_command_have_the_nic_slots(tmp_path, share_bundle):
    argv = rt.net_args("device")
    assert values_of(argv, "-netdev") == [
        "tap,id=net%d,ifname=cc-tap%d,script=no,downscript=no,vhost=off%s"
        % (i, i, ",vnet_hdr=off" if i else "") for i in range(rt.NET_SLOTS)]
    assert values_of(argv, "-device")[1] == "virtio-net-device,netdev=net1,mac=02:cc:00:00:00:01"
    conf = rt.load_spec(str(share_bundle[0]))
    full = rt.qemu_command("c1", fake_vm(tmp_path), conf, "/s", "/i")
    assert values_of(full, "-netdev") == values_of(argv, "-netdev")
    assert "virtio-net-pci,netdev=net0,mac=02:cc:00:00:00:00" in values_of(
        rt.qemu_command("c1", fake_vm(tmp_path, machine="q35"), conf, "/s", "/i"), "-device")


def test_only_taps_backs_the_other_nic_slots_by_an_empty_hub():
    argv = rt.net_args("device")
    one = rt.only_taps(argv, 1)
    assert values_of(one, "-netdev") == [
        "tap,id=net0,ifname=cc-tap0,script=no,downscript=no,vhost=off",
        "hubport,id=net1,hubid=1", "hubport,id=net2,hubid=2", "hubport,id=net3,hubid=3"]
    assert values_of(one, "-device") == values_of(argv, "-device"), "the VM's devices stay"
    assert rt.only_taps(argv, rt.NET_SLOTS) == argv
    custom = ["-netdev", "tap,id=net1,ifname=mine,script=no"]
    assert rt.only_taps(custom, 1) == custom, "a hypervisor.args of one's own is left alone"


def test_docker_dns_listening(tmp_path):
    udp = tmp_path / "udp"
    head = "  sl  local_address rem_address   st tx_queue rx_queue\n"
    udp.write_text(head + "   0: 0B00007F:A2F1 00000000:0000 07 00000000:00000000\n")
    assert rt.docker_dns_listening(str(udp))
    udp.write_text(head + "   0: 0100007F:0035 00000000:0000 07 00000000:00000000\n")
    assert not rt.docker_dns_listening(str(udp))
    assert not rt.docker_dns_listening(str(tmp_path / "missing"))


def test_is_host_netns(tmp_path):
    assert rt.is_host_netns(None) and rt.is_host_netns("")
    assert not rt.is_host_netns("new")
    assert rt.is_host_netns("/proc/self/ns/net")
    other = tmp_path / "ns"
    other.write_text("")
    assert not rt.is_host_netns(str(other))


def test_netlink_changes_a_namespace_and_reports_errors():
    def body():
        with rt.Netlink() as nl:
            fd = make_tap("cc-x", "02:aa:00:00:00:01")
            index = {ln["name"]: ln["index"] for ln in nl.links()}["cc-x"]
            nl.set_link(index, up=True, mtu=1400)
            nl.add_address(index, {"family": 4, "address": "10.5.0.2", "prefix": 24})
            nl.add_address(index, {"family": 6, "address": "fd00:5::2", "prefix": 64})
            nl.add_route({"family": 4, "dst": None, "dst_len": 0, "gateway": "10.5.0.1", "scope": 0}, index)
            try:
                nl.add_address(index, {"family": 4, "address": "10.5.0.2", "prefix": 24})
                dup = 0
            except OSError as e:
                dup = e.errno
            me = [ln for ln in nl.links() if ln["index"] == index][0]
            addrs = sorted(a["address"] for a in nl.addresses() if a["index"] == index)
            routes = [(r["gateway"], r["oif"]) for r in nl.routes() if r["gateway"]]
            os.close(fd)
            return me, addrs, routes, dup, index
    me, addrs, routes, dup, index = in_new_netns(body)
    assert (me["mac"], me["mtu"], bool(me["flags"] & rt.IFF_UP)) == ("02:aa:00:00:00:01", 1400, True)
    assert addrs[:2] == ["10.5.0.2", "fd00:5::2"]
    assert routes == [["10.5.0.1", index]] and dup == errno.EEXIST


def test_net_wire_redirects_both_ways_and_unwire_removes_it():
    def body():
        subprocess.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"], check=True)
        with rt.Netlink() as nl:
            idx = {ln["name"]: ln["index"] for ln in nl.links()}
            nl.set_link(idx["eth0"], up=True, mtu=1300)
            nl.add_address(idx["eth0"], {"family": 4, "address": "10.6.0.2", "prefix": 24})
            nl.add_route({"family": 4, "dst": None, "dst_len": 0, "gateway": "10.6.0.1", "scope": 0}, idx["eth0"])
            fds = [make_tap(rt.tap_name(i)) for i in range(rt.NET_SLOTS)]
            try:
                rt.net_check(nl)
                refused = ""
            except rt.Error as e:
                refused = str(e)
            plan = rt.network_plan(nl.links(), nl.addresses(), nl.routes())
            tap = rt.wire_interface(nl, plan["interfaces"][0])
            shown = subprocess.run("tc filter show dev eth0 ingress; tc filter show dev cc-tap0 ingress; "
                                   "ip -o link show cc-tap0", shell=True, capture_output=True, text=True).stdout
            rt.unwire_interface(nl, plan["interfaces"][0], tap)
            rt.unwire_interface(nl, plan["interfaces"][0], tap)  # twice is fine
            after = subprocess.run("tc qdisc show dev eth0; tc qdisc show dev cc-tap0; ip -o link show cc-tap0",
                                   shell=True, capture_output=True, text=True).stdout
            for fd in fds:
                os.close(fd)
        return plan, shown, after, refused
    plan, shown, after, refused = in_new_netns(body)
    assert refused.startswith("network: this network namespace already belongs to another VM container")
    assert [(i["name"], i["mtu"], i["addresses"]) for i in plan["interfaces"]] == [
        ("eth0", 1300, [{"family": 4, "address": "10.6.0.2", "prefix": 24}])]
    assert [r["gateway"] for r in plan["routes"]] == ["10.6.0.1"]
    assert "mirred (Egress Redirect to device cc-tap0)" in shown and "(Egress Redirect to device eth0)" in shown
    assert "mtu 1300" in shown and "UP" in shown
    assert "ingress" not in after and ",UP" not in after, after  # the tap stays QEMU's, down


def test_net_wire_fails_cleanly():
    def body():
        subprocess.run(["ip", "link", "add", "eth0", "up", "type", "veth", "peer", "name", "peer0"], check=True)
        with rt.Netlink() as nl:
            out = []
            iface = rt.network_plan(nl.links(), [], [])["interfaces"][0]
            try:
                rt.wire_interface(nl, iface)  # no taps: hypervisor.args without @NETWORK@
            except rt.Error as e:
                out.append(str(e))
            fds = [make_tap(rt.tap_name(i)) for i in range(rt.NET_SLOTS)]
            subprocess.run(["tc", "qdisc", "add", "dev", "cc-tap0", "ingress"], check=True)
            try:
                rt.wire_interface(nl, iface)
            except rt.Error as e:
                out.append(str(e))
            out.append(subprocess.run(["tc", "qdisc", "show", "dev", "eth0"], capture_output=True, text=True).stdout)
            for fd in fds:
                os.close(fd)
        return out
    no_nic, busy, qdiscs = in_new_netns(body)
    assert no_nic == "network: the VM has no NIC for eth0 (hypervisor.args needs @NETWORK@)"
    assert busy == "network: cannot redirect eth0 to the VM (tc u32/mirred): File exists"
    assert "ingress" not in qdiscs  # rolled back


def guest_plan(slot, name="eth0", mac="02:42:ac:11:00:05", addresses=None, routes=True):
    """A plan for one NIC (172.17.0.5/16, default route via 172.17.0.1)."""
    addresses = addresses or [{"family": 4, "address": "172.17.0.5", "prefix": 16}]
    return {"interfaces": [{"slot": slot, "name": name, "mac": mac, "mtu": 1400, "index": 9,
                            "addresses": addresses}],
            "routes": [{"family": 4, "dst": None, "dst_len": 0, "gateway": "172.17.0.1", "prefsrc": None,
                        "priority": 0, "scope": 0, "protocol": 3, "oif": 9, "dev": name, "slot": slot}]
            if routes else []}


def run_guest_network(plans):
    """In a fresh namespace with two taps as NIC slots 0 and 1: guest_net_boot, then guest_network
    for each plan; the home links before and after, addresses, gateways, parked MACs, errors."""
    def body():
        fds = [make_tap("t%d" % i, rt.slot_mac(i)) for i in range(2)]
        net = rt.guest_net_boot()
        with rt.Netlink() as nl:
            before = sorted(ln["name"] for ln in nl.links())
        errors = []
        for plan in plans:
            try:
                rt.guest_network(plan, net)
                errors.append("")
            except rt.Error as e:
                errors.append(str(e))
        with rt.Netlink() as nl:
            links = {ln["name"]: ln for ln in nl.links()}
            addrs = sorted(a["address"] for a in nl.addresses() if a["family"] == 4)
            routes = [r["gateway"] for r in nl.routes() if r["gateway"]]
        parked = sorted(ln["mac"] for ln in net["park"].links() if ln["type"] == rt.ARPHRD_ETHER)
        for fd in fds:
            os.close(fd)
        return before, links, addrs, routes, parked, errors
    return in_new_netns(body)


def test_guest_network_configures_the_first_nic_in_place():
    before, links, addrs, routes, parked, errors = run_guest_network([guest_plan(0)])
    assert before == ["lo", "t0"] and errors == [""]
    assert sorted(links) == ["eth0", "lo"] and links["lo"]["flags"] & rt.IFF_UP
    eth0 = links["eth0"]
    assert (eth0["mac"], eth0["mtu"], bool(eth0["flags"] & rt.IFF_UP)) == ("02:42:ac:11:00:05", 1400, True)
    assert addrs == ["127.0.0.1", "172.17.0.5"] and routes == ["172.17.0.1"]
    assert parked == [rt.slot_mac(1)]


def test_guest_network_brings_a_parked_nic_home_and_hides_the_unused_first():
    before, links, addrs, routes, parked, errors = run_guest_network([guest_plan(1)])
    assert errors == [""] and sorted(links) == ["eth0", "lo"]
    assert links["eth0"]["mac"] == "02:42:ac:11:00:05" and links["eth0"]["flags"] & rt.IFF_UP
    assert routes == ["172.17.0.1"] and parked == [rt.slot_mac(0)]


def test_guest_network_without_interfaces_leaves_only_lo():
    before, links, addrs, routes, parked, errors = run_guest_network([{"interfaces": [], "routes": []}])
    assert errors == [""] and sorted(links) == ["lo"] and addrs == ["127.0.0.1"]
    assert parked == [rt.slot_mac(0), rt.slot_mac(1)]


def test_guest_network_errors():
    bad = guest_plan(1, "eth1", addresses=[{"family": 4, "address": "172.17.0.6", "prefix": 33}], routes=False)
    *_, errors = run_guest_network([guest_plan(3), bad])
    assert errors == ["network: the VM has no NIC number 3 for eth0",
                      "network: cannot set address 172.17.0.6/33 on eth1 in the VM: Invalid argument"]


def test_guest_network_keeps_the_kernel_name_when_the_name_is_taken():
    _before, links, *_ = run_guest_network([guest_plan(0, "lo", routes=False)])
    assert links["t0"]["mac"] == "02:42:ac:11:00:05" and links["t0"]["flags"] & rt.IFF_UP


def test_guest_network_follows_later_plans():
    eth1 = {"slot": 1, "name": "eth1", "mac": "02:42:ac:12:00:05", "mtu": 1500, "index": 11,
            "addresses": [{"family": 4, "address": "172.18.0.5", "prefix": 16}]}
    via = {"family": 4, "dst": "10.9.0.0", "dst_len": 16, "gateway": "172.18.0.1", "prefsrc": None,
           "priority": 0, "scope": 0, "protocol": 3, "oif": 11, "dev": "eth1", "slot": 1}
    first = guest_plan(0)
    both = guest_plan(0, addresses=[{"family": 4, "address": "172.17.0.6", "prefix": 16}])
    both["interfaces"].append(eth1)
    both["routes"].insert(0, via)
    moved = json.loads(json.dumps(both))
    moved["interfaces"][1].update(mac="02:42:ac:12:00:07", mtu=1300)
    moved["routes"] = moved["routes"][1:]  # the engine removed its route

    def body():
        fds = [make_tap("t%d" % i, rt.slot_mac(i)) for i in range(2)]
        net = rt.guest_net_boot()
        seen = []
        for plan in (first, both, both, moved, first):
            rt.guest_network(plan, net)
            with rt.Netlink() as nl:
                links = {ln["name"]: [ln["mac"], ln["mtu"], bool(ln["flags"] & rt.IFF_UP)]
                         for ln in nl.links() if ln["name"] != "lo"}
                addrs = sorted(a["address"] for a in nl.addresses() if a["family"] == 4 and a["index"] != 1)
                routes = sorted("%s/%d via %s" % (r["dst"], r["dst_len"], r["gateway"]) for r in nl.routes()
                                if r["gateway"])
            parked = sorted(ln["mac"] for ln in net["park"].links() if ln["type"] == rt.ARPHRD_ETHER)
            seen.append([links, addrs, routes, parked])
        for fd in fds:
            os.close(fd)
        return seen
    one, two, again, moved_, back = in_new_netns(body)
    assert one == [{"eth0": ["02:42:ac:11:00:05", 1400, True]}, ["172.17.0.5"], ["None/0 via 172.17.0.1"],
                   [rt.slot_mac(1)]]
    assert two == [{"eth0": ["02:42:ac:11:00:05", 1400, True], "eth1": ["02:42:ac:12:00:05", 1500, True]},
                   ["172.17.0.6", "172.18.0.5"], ["10.9.0.0/16 via 172.18.0.1", "None/0 via 172.17.0.1"], []]
    assert again == two, "the same plan again changes nothing"
    assert moved_[0]["eth1"] == ["02:42:ac:12:00:07", 1300, True]
    assert moved_[2] == ["None/0 via 172.17.0.1"]
    assert back == [{"eth0": ["02:42:ac:11:00:05", 1400, True]}, ["172.17.0.5"], ["None/0 via 172.17.0.1"],
                    [rt.slot_mac(1)]], "the NIC of the interface taken away is parked again, as it was"


def test_nic_slot_qmp_commands_and_hub_slots():
    assert rt.give_tap_commands(2, 17) == [
        ("getfd", {"fdname": "tap2", "pass_fd": 17}),
        ("netdev_add", {"type": "tap", "id": "tap2", "fd": "tap2", "vhost": False}),
        ("netdev_add", {"type": "hubport", "id": "port2", "hubid": 2, "netdev": "tap2"})]
    assert rt.take_tap_commands(2) == [("netdev_del", {"id": "port2"}), ("netdev_del", {"id": "tap2"})]
    argv = rt.net_args("device")
    assert rt.hub_slots(argv) == set()
    assert rt.hub_slots(rt.only_taps(argv, 1)) == {1, 2, 3}
    assert rt.hub_slots(rt.only_taps(argv, 3)) == {3}


def test_assign_slots_keeps_the_wired_ones_and_fills_the_lowest_free():
    links = [link(i, "eth%d" % i) for i in (2, 5, 7, 8, 9, 10)]
    slots, left = rt.assign_slots(links, {5: 0, 8: 2})
    assert slots == {5: 0, 8: 2, 2: 1, 7: 3} and [ln["name"] for ln in left] == ["eth9", "eth10"]
    plan = rt.network_plan(links, [], [], {5: 0, 8: 2})
    assert [(i["name"], i["slot"]) for i in plan["interfaces"]] == [("eth2", 1), ("eth5", 0), ("eth7", 3), ("eth8", 2)]
    assert plan["refused"] == [{"index": 9, "name": "eth9"}, {"index": 10, "name": "eth10"}]


def _nl_link_event(kind, index, name):
    """An RTM_NEWLINK/RTM_DELLINK datagram for interface name."""
    return rt.nl_message(kind, 0, 0, rt.IFINFO.pack(0, rt.ARPHRD_ETHER, index, 0, 0),
                         [rt.nl_attr(rt.IFLA_IFNAME, name)])


def test_net_event_matters_ignores_our_own_taps():
    assert rt.net_event_matters(_nl_link_event(rt.RTM_NEWLINK, 4, "eth1"))
    assert rt.net_event_matters(_nl_link_event(rt.RTM_DELLINK, 4, "eth1"))
    assert not rt.net_event_matters(_nl_link_event(rt.RTM_NEWLINK, 5, "cc-tap1"))
    assert rt.net_event_matters(_nl_link_event(rt.RTM_NEWLINK, 5, "cc-tap1") + _nl_link_event(rt.RTM_NEWLINK, 4, "x"))
    header, attrs = rt.address_message(4, {"family": 4, "address": "10.0.0.2", "prefix": 24})
    assert rt.net_event_matters(rt.nl_message(rt.RTM_DELADDR, 0, 0, header, attrs))
    header, attrs = rt.route_message({"family": 4, "dst": None, "dst_len": 0, "gateway": "10.0.0.1", "scope": 0}, 4)
    assert rt.net_event_matters(rt.nl_message(rt.RTM_NEWROUTE, 0, 0, header, attrs))
    header, attrs = rt.ingress_qdisc_message(4)
    assert not rt.net_event_matters(rt.nl_message(rt.RTM_NEWQDISC, 0, 0, header, attrs))
    assert not rt.net_event_matters(b"")
    header, attrs = rt.address_message(6, {"family": 6, "address": "fe80::1", "prefix": 64})
    assert rt.net_event_matters(rt.nl_message(rt.RTM_NEWADDR, 0, 0, header, attrs))
    assert not rt.net_event_matters(rt.nl_message(rt.RTM_NEWADDR, 0, 0, header, attrs), {6}), "a tap's own"
    header, attrs = rt.route_message({"family": 6, "dst": "fe80::", "dst_len": 64, "scope": 0}, 6)
    assert not rt.net_event_matters(rt.nl_message(rt.RTM_NEWROUTE, 0, 0, header, attrs), {6})


class FakeQemu:
    """The QMP a monitor sends for its NIC slots, carried out without a VM: a tap fd getfd'ed is
    kept (a copy, as QEMU's), netdev_add takes it by name, netdev_del closes it."""

    def __init__(self):
        self.fds, self.calls, self.given = {}, [], {}

    def qmp(self, commands, strict=True):
        for command, arguments in commands:
            if command == "getfd":
                self.given[arguments["fdname"]] = os.dup(arguments["pass_fd"])
                continue
            self.calls.append("%s %s" % (command, arguments["id"]))
            if command == "netdev_add" and arguments["type"] == "tap":
                self.fds[arguments["id"]] = self.given.pop(arguments["fd"])
            elif command == "netdev_del" and arguments["id"] in self.fds:
                os.close(self.fds.pop(arguments["id"]))


def _agent_plans(sock):
    """The network plans a monitor sent the agent since the last call (the socket's other end)."""
    data = b""
    while True:
        try:
            data += sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
    return [" ".join("%s:%d:%s" % (i["name"], i["slot"], ",".join(a["address"] for a in i["addresses"]))
                     for i in m["plan"]["interfaces"])
            for kind, _stream, m in rt.FrameReader().feed(data) if kind == rt.MSG and m.get("op") == "network"]


def test_monitor_follows_the_namespace_without_a_vm(tmp_path):
    def body():
        qemu, logged = FakeQemu(), []
        rt.LOG.error = logged.append
        m = rt.Monitor(str(tmp_path), "c1", {}, rt.only_taps(rt.net_args("device"), 1), {}, None, None)
        m.hubs, m.nic_taps = rt.hub_slots(m.argv), {0: "start"}
        m._qmp = qemu.qmp
        agent, guest = socket.socketpair()
        m.agent = agent.fileno()
        tap0 = make_tap(rt.tap_name(0))
        sh = lambda cmd: subprocess.run(cmd, shell=True, check=True, capture_output=True)  # noqa: E731
        tc = lambda dev: subprocess.run("tc filter show dev %s ingress" % dev, shell=True,  # noqa: E731
                                        capture_output=True, text=True).stdout
        links = lambda: sorted(ln["name"] for ln in rt.Netlink().links())  # noqa: E731
        out = {}
        sh("ip link add eth0 up type bridge")  # Ethernet, as the engine's veths (no dummy module here)
        sh("ip addr add 10.7.0.2/24 dev eth0")
        m._sync_network(client=99)  # create
        out["create"] = [_agent_plans(guest), dict(m.pending), "cc-tap0" in tc("eth0")]
        m.net_events = rt.Netlink(rt.NET_EVENT_GROUPS)
        m._on_netlink(None)
        sh("ip link add eth1 type bridge && ip addr add 10.8.0.2/24 dev eth1 && ip link set eth1 up")
        m._on_netlink(None)
        out["event"] = m.net_due is not None
        m._sync_network()
        out["connect"] = [_agent_plans(guest), qemu.calls[:], "cc-tap1" in tc("eth1"), "eth1" in tc("cc-tap1"),
                          json.load(open(tmp_path / "net.json"))["interfaces"]]
        m._sync_network()
        out["again"] = _agent_plans(guest)
        sh("ip addr add 10.8.0.9/24 dev eth1")
        m._sync_network()
        out["address"] = _agent_plans(guest)
        m._on_netlink(None)
        m.net_due = None
        own = make_tap(rt.tap_name(3))  # our own tap's events are not the engine's
        rt._sysctl_quiet("net/ipv6/conf/%s/disable_ipv6" % rt.tap_name(3), "1")  # as wire_interface does
        sh("ip link set %s up && ip link set cc-tap1 down && ip link set cc-tap1 up" % rt.tap_name(3))
        os.close(own)
        m._on_netlink(None)
        out["own events"] = m.net_due
        sh("ip link del eth1")
        m._sync_network()
        out["disconnect"] = [_agent_plans(guest), qemu.calls[2:], "cc-tap1" in links()]
        sh(" && ".join("ip link add eth%d up type bridge" % i for i in range(2, 6)))
        m._sync_network()
        m._sync_network()
        out["too many"] = [_agent_plans(guest), logged[:], tc("eth5")]
        sh("ip link set eth0 down")
        m._sync_network()
        out["down"] = [_agent_plans(guest), tc("eth0"), tc("cc-tap0"),
                       "UP" in subprocess.run("ip -o link show cc-tap0", shell=True, capture_output=True,
                                              text=True).stdout.split(">")[0]]
        m._unwire()
        out["end"] = [tc("eth2") + tc("eth5"), os.path.exists(tmp_path / "net.json")]
        for fd in list(qemu.fds.values()) + [tap0]:
            os.close(fd)
        return out
    out = in_new_netns(body)
    assert out["create"] == [["eth0:0:10.7.0.2"], {"1": 99}, True], "create's client gets the agent's answer"
    assert out["event"], "a new interface schedules a sync"
    plans, calls, redirected, back, net_json = out["connect"]
    assert plans == ["eth0:0:10.7.0.2 eth1:1:10.8.0.2"]
    assert calls == ["netdev_add tap1", "netdev_add port1"] and redirected and back
    assert [i["name"] for i in net_json] == ["eth0", "eth1"]
    assert out["again"] == [], "nothing changed: nothing sent"
    assert out["address"] == ["eth0:0:10.7.0.2 eth1:1:10.8.0.2,10.8.0.9"]
    assert out["own events"] is None
    plans, calls, tap_left = out["disconnect"]
    assert plans == ["eth0:0:10.7.0.2"]
    assert calls == ["netdev_del port1", "netdev_del tap1"] and not tap_left
    plans, logged, eth5 = out["too many"]
    assert plans == ["eth0:0:10.7.0.2 eth2:1: eth3:2: eth4:3:"]
    assert logged == ["network: eth5: not wired, the VM has no free NIC (it has 4)"], "logged once"
    assert eth5 == "", "nothing half-wired"
    plans, eth0, tap0, tap_up = out["down"]
    assert plans == ["eth2:1: eth3:2: eth4:3: eth5:0:"], "the freed NIC goes to the one waiting"
    assert eth0 == "" and "Redirect to device eth5" in tap0 and tap_up, "the first tap, QEMU's, serves eth5"
    assert out["end"] == ["", False]


def test_unwire_network_through_a_namespace_path(tmp_path):
    ns = "ccunit%d" % os.getpid()
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run("ip netns exec %s sh -c 'ip link add eth0 up type veth peer name p0 && "
                       "tc qdisc add dev eth0 ingress'" % ns, shell=True, check=True)
        index = int(subprocess.run(["ip", "netns", "exec", ns, "cat", "/sys/class/net/eth0/ifindex"],
                                   capture_output=True, text=True).stdout)
        state = rt.State(str(tmp_path), "c1")
        state.make()
        state.data = {"pid": 0}
        rt.unwire_network(state)  # no net.json: nothing to do
        rt.write_atomic(state.path("net.json"), json.dumps(
            {"netns": "/run/netns/" + ns, "interfaces": [{"index": index, "name": "other"}]}))
        rt.unwire_network(state)  # the index now names another interface: left alone
        show = ["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", "eth0"]
        assert "ingress" in subprocess.run(show, capture_output=True, text=True).stdout
        rt.write_atomic(state.path("net.json"), json.dumps(
            {"netns": "/run/netns/" + ns, "interfaces": [{"index": index, "name": "eth0"}]}))
        rt.unwire_network(state)
        assert "ingress" not in subprocess.run(show, capture_output=True, text=True).stdout
    finally:
        subprocess.run(["ip", "netns", "del", ns])


def test_net_check_needs_tun(tmp_path):
    with rt.Netlink() as nl:
        rt.net_check(nl)  # the host's namespace has no cc-tap
        with pytest.raises(rt.Error, match="^network: %s/tun: no such device \\(load the tun module\\)$" % tmp_path):
            rt.net_check(nl, str(tmp_path / "tun"))


def test_net_probe_reports_the_host_pieces():
    assert rt.net_probe().startswith("tun, tc ingress qdisc, u32 filter and mirred redirect work")


def test_mount_options_leave_runtime_options_out_of_the_data():
    assert rt.mount_options(["nosuid", "tmpcopyup", "size=1m", "rprivate"]) == (rt.MS_NOSUID, "size=1m")


def test_copy_tree_keeps_files_links_modes_and_owners(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("data")
    (src / "sub" / "f").chmod(0o640)
    os.chown(src / "sub" / "f", 1234, 5678)
    os.symlink("sub/f", src / "link")
    os.mkfifo(src / "fifo")
    dst.mkdir()
    rt._copy_tree(str(src), str(dst))
    assert (dst / "sub" / "f").read_text() == "data"
    st = os.stat(dst / "sub" / "f")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1234, 5678)
    assert os.readlink(dst / "link") == "sub/f"
    assert not os.path.exists(dst / "fifo")


def test_tail_of_qemu_log_leaves_out_the_unused_nic_hub_warnings(tmp_path):
    log = tmp_path / "qemu.log"
    log.write_text("qemu: warning: hub 3 is not connected to host network\n"
                   "qemu: -kernel: no such file\nqemu: warning: hub 1 is not connected to host network\n")
    assert rt._tail(str(log)) == "qemu: -kernel: no such file"
    assert rt._tail(str(tmp_path / "missing")) == ""


# ===========================================================================
# 12. The test suite's own host needs (tests/functional/host_needs.py)
# ===========================================================================

sys.path.insert(0, os.path.join(REPO, "tests", "functional"))
import host_needs  # noqa: E402


def _makefile_packages():
    """The Makefile's APT_PACKAGES, the list `make deps` installs."""
    text = open(os.path.join(REPO, "Makefile")).read()
    m = re.search(r"^APT_PACKAGES\s*:?=((?:.*\\\n)*.*)$", text, re.M)
    return set(m.group(1).replace("\\\n", " ").split())


def test_make_deps_installs_every_package_the_suite_needs():
    needed = {pkg for _, pkg in host_needs.NEEDS}
    assert needed - _makefile_packages() == set()


def test_host_needs_names_what_is_missing_and_its_package(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    prog = tmp_path / "bin" / "have-it"
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    needs = [("have-it", "pkg-a"), ("no-such-program-cc", "pkg-b"),
             (str(tmp_path / "no-dir" / "plugin"), "pkg-c"), (str(tmp_path / "bin" / "*"), "pkg-d")]
    lacking = host_needs.missing(needs)
    assert lacking == [("no-such-program-cc", "pkg-b"), (str(tmp_path / "no-dir" / "plugin"), "pkg-c")]
    line = host_needs.report(lacking)
    assert "\n" not in line and "no-such-program-cc (pkg-b)" in line
    assert line.endswith("apt-get install -y pkg-b pkg-c)")
    assert host_needs.report([]) == ""


def test_host_needs_exits_1_with_one_line_when_something_is_missing(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))  # nothing on PATH: every program is missing
    r = subprocess.run([sys.executable, os.path.join(REPO, "tests", "functional", "host_needs.py")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and "podman (podman)" in r.stderr


def test_a_terminal_stdin_the_monitor_polls_cannot_block_its_read():
    """The hang of a foreground `run` on a terminal: poll finds the caller's tty readable (an
    EOF, ^D, pending in canonical mode), `run` then makes the terminal raw, which drops it."""
    import termios
    import tty
    master, slave = os.openpty()
    try:
        fd = rt._nonblocking_tty(slave)
        assert fd != slave and not os.get_blocking(fd) and os.get_blocking(slave)
        os.write(master, termios.tcgetattr(slave)[6][termios.VEOF])
        assert select_readable(fd)
        tty.setraw(slave)
        assert rt._read_or_eof(fd) is None  # a blocking read of slave would wait forever here
        os.write(master, b"x")
        assert rt._read_or_eof(fd) == b"x"
        os.close(fd)
    finally:
        os.close(master)
        os.close(slave)


def select_readable(fd):
    """True when poll says fd is readable now."""
    import select
    return bool(select.select([fd], [], [], 1)[0])


def test_a_stdin_that_is_no_terminal_is_passed_as_it_is(tmp_path):
    r, w = os.pipe()
    assert rt._nonblocking_tty(r) == r
    os.close(r)
    os.close(w)


# ===========================================================================
# 13. Pods: classification and bookkeeping (no VM)
# ===========================================================================

CRI_TYPE, CRI_SANDBOX = "io.kubernetes.cri.container-type", "io.kubernetes.cri.sandbox-id"
CRIO_TYPE, CRIO_SANDBOX = "io.kubernetes.cri-o.ContainerType", "io.kubernetes.cri-o.SandboxID"


@pytest.mark.parametrize("annotations, role", [
    ({}, (None, None, False)),
    ({"other": "x"}, (None, None, False)),
    ({CRI_TYPE: "sandbox", CRI_SANDBOX: "c1"}, ("sandbox", "c1", True)),
    ({CRI_TYPE: "sandbox"}, ("sandbox", "c1", True)),
    ({CRI_TYPE: "container", CRI_SANDBOX: "sb"}, ("member", "sb", True)),
    ({CRIO_TYPE: "container", CRIO_SANDBOX: "infra"}, ("member", "infra", False)),  # podman 4.3
    ({CRIO_TYPE: "sandbox", CRIO_SANDBOX: "c1"}, ("sandbox", "c1", False)),
])
def test_pod_role_from_the_managers_annotations(annotations, role):
    assert rt.pod_role("c1", annotations) == role


@pytest.mark.parametrize("annotations, message", [
    ({CRI_TYPE: "sidecar", CRI_SANDBOX: "sb"},
     "annotations: io.kubernetes.cri.container-type: unknown container type 'sidecar' (sandbox or container)"),
    ({CRI_TYPE: "container"}, "annotations: io.kubernetes.cri.sandbox-id: a pod member needs its sandbox's id"),
    ({CRI_TYPE: "sandbox", CRI_SANDBOX: "other"},
     "annotations: io.kubernetes.cri.sandbox-id: other names another sandbox than this one (c1)"),
])
def test_pod_role_errors(annotations, message):
    with pytest.raises(rt.Error) as e:
        rt.pod_role("c1", annotations)
    assert str(e.value) == message


def test_pod_vm_size_from_containerds_sandbox_annotations():
    vm = {"memory": "256M", "cpus": 1}
    rt.pod_vm_size(vm, {"io.kubernetes.cri.sandbox-memory": str(512 << 20),
                        "io.kubernetes.cri.sandbox-cpu-quota": "150000",
                        "io.kubernetes.cri.sandbox-cpu-period": "100000"})
    assert vm["memory"] == rt.size_vm({"memory": "1M", "cpus": 1}, {"memory": {"limit": 512 << 20}})["memory"]
    assert vm["cpus"] == min(2, os.cpu_count())
    untouched = {"memory": "256M", "cpus": 1}
    assert rt.pod_vm_size(dict(untouched), {"io.kubernetes.cri.sandbox-memory": "0"}) == untouched
    assert rt.pod_vm_size(dict(untouched), {}) == untouched


def test_pod_slots_are_claimed_once_and_given_back(tmp_path):
    sb = str(tmp_path / "sb")
    os.mkdir(sb)
    assert [rt.claim_pod_slot(sb, "m%d" % i) for i in range(3)] == [0, 1, 2]
    assert (tmp_path / "sb" / "members" / "1").read_text() == "m1"
    rt.release_pod_slot(sb, 1)
    assert rt.claim_pod_slot(sb, "m3") == 1
    for i in range(3, rt.POD_SLOTS):
        rt.claim_pod_slot(sb, "x%d" % i)
    with pytest.raises(rt.Error) as e:
        rt.claim_pod_slot(sb, "late")
    assert str(e.value) == "pod: sandbox sb: all %d member slots are in use" % rt.POD_SLOTS
    rt.release_pod_slot(str(tmp_path / "gone"), 0)  # a sandbox already deleted: nothing to do
    rt.release_pod_slot(sb, None)


def test_member_trees_name_the_rootfs_and_each_bind_source(tmp_path):
    vol, f = tmp_path / "vol", tmp_path / "hosts"
    vol.mkdir()
    f.write_text("127.0.0.1 localhost\n")
    conf = {"root": {"path": "/r", "readonly": True}, "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": []},
        {"destination": "/v", "type": "bind", "source": str(vol), "options": ["rbind", "ro"]},
        {"destination": "/etc/hosts", "type": "bind", "source": str(f), "options": ["bind"]},
        {"destination": "/x", "type": "bind", "source": str(tmp_path / "missing"), "options": []}]}
    assert rt.member_trees(conf, 3) == [("rootfs", "/r", True, True, False),
                                        ("b1", str(vol), True, True, True),
                                        ("b2", str(f), False, False, False)]
    assert [m.get("pod_path") for m in conf["mounts"]] == [None, "3/b1", "3/b2", None]
    assert conf["mounts"][3]["skip"] is True


def _sandbox_state(root, cid, **data):
    """A state dir under root with state.json holding data."""
    s = rt.State(str(root), cid)
    s.make()
    s.data = data
    s.save()
    s.unlock()
    return s


def test_find_sandbox_for_a_member(tmp_path):
    assert rt.find_sandbox(str(tmp_path), "nosuch", strict=False) is None  # podman, runc infra
    with pytest.raises(rt.Error) as e:
        rt.find_sandbox(str(tmp_path), "nosuch", strict=True)
    assert str(e.value).startswith("pod: sandbox nosuch: no such container of this runtime")
    me = os.getpid()
    _sandbox_state(tmp_path, "sb", pid=me, pid_start=rt.proc_start_time(me), started=True,
                   vm={}, pod={"tag": "share0"})
    assert rt.find_sandbox(str(tmp_path), "sb", strict=True).data["pod"] == {"tag": "share0"}
    _sandbox_state(tmp_path, "full", pid=me, pid_start=rt.proc_start_time(me), vm={}, pod=None)
    with pytest.raises(rt.Error) as e:
        rt.find_sandbox(str(tmp_path), "full", strict=False)
    assert "its VM has no 9p slot left for members" in str(e.value)
    _sandbox_state(tmp_path, "dead", pid=me, pid_start=1, vm={}, pod={"tag": "share0"})
    with pytest.raises(rt.Error) as e:
        rt.find_sandbox(str(tmp_path), "dead", strict=False)
    assert str(e.value) == "pod: the pod's sandbox dead is stopped"
    _sandbox_state(tmp_path, "m1", pid=me, pid_start=rt.proc_start_time(me), vm={},
                   sandbox={"id": "sb", "dir": "x", "slot": 0})
    with pytest.raises(rt.Error) as e:
        rt.find_sandbox(str(tmp_path), "m1", strict=False)
    assert str(e.value) == "pod: m1 is a member of pod sb, not a sandbox"


def test_a_members_requests_go_to_its_sandboxs_monitor_naming_it(tmp_path):
    sb_dir = tmp_path / "sb"
    sb_dir.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sb_dir / "ctl.sock"))
    listener.listen(1)
    state = rt.State(str(tmp_path), "m1")
    state.data = {"sandbox": {"id": "sb", "dir": str(sb_dir), "slot": 4}, "proc": 9}
    got = []

    def serve():
        conn, _ = listener.accept()
        got.append(rt.read_msg(conn.fileno(), rt.FrameReader(), 5))
        rt.send_msg(conn.fileno(), {"op": "ok"})
        conn.close()
    import threading
    t = threading.Thread(target=serve)
    t.start()
    assert rt.monitor_request(state, {"op": "signal", "proc": 0, "sig": 15, "all": False}) == {"op": "ok"}
    t.join()
    listener.close()
    assert got == [{"op": "signal", "proc": 9, "sig": 15, "all": False, "member": 4}]


def test_a_member_stops_with_its_pods_vm(tmp_path):
    me = os.getpid()
    state = rt.State(str(tmp_path), "m1")
    state.data = {"pid": me, "pid_start": rt.proc_start_time(me), "started": True, "vm": {},
                  "sandbox": {"qemu_pid": me, "qemu_start": rt.proc_start_time(me)}}
    assert state.status() == "running"
    state.data["sandbox"]["qemu_start"] = 1  # that QEMU is gone (another process has its pid)
    assert state.status() == "stopped"


def test_signal_cgroup_reaches_every_process_listed(tmp_path):
    child = subprocess.Popen(["sleep", "30"])
    (tmp_path / "cgroup.procs").write_text("%d\n999999\n" % child.pid)  # (a gone pid is skipped)
    rt.signal_cgroup(str(tmp_path), signal.SIGTERM)
    assert child.wait(5) == -signal.SIGTERM
    (tmp_path / "cgroup.kill").write_text("")
    rt.signal_cgroup(str(tmp_path), signal.SIGKILL)  # cgroup v2's cgroup.kill, when there is one
    assert (tmp_path / "cgroup.kill").read_text() == "1"
    rt.signal_cgroup(str(tmp_path / "gone"), signal.SIGTERM)


def test_agent_requests_find_their_container():
    agent = rt.Agent()
    agent.conf = {"id": "sb"}
    agent.members[2] = {"proc": 7, "conf": {"id": "m"}, "cgroup": "/sys/fs/cgroup/member-7"}
    assert agent._container_of({"op": "ps"}) == (0, {"id": "sb"}, rt.CONTAINER_CGROUP)
    assert agent._container_of({"op": "ps", "member": 2}) == (7, {"id": "m"}, "/sys/fs/cgroup/member-7")
    with pytest.raises(rt.Error) as e:
        agent._container_of({"op": "ps", "member": 3})
    assert str(e.value) == "container not running"


# ===========================================================================
# 14. Checkpoint and restore: what the guest image carries (no VM)
# ===========================================================================

def test_elf_libraries_lists_what_the_loader_loads():
    sh = os.path.realpath(shutil.which("sh"))
    libs = rt._elf_libraries(sh)
    assert any(os.path.basename(p).startswith("libc.so") for p in libs), libs
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in libs)
    assert rt._elf_libraries(SCRIPT) == []  # not an ELF file


def test_criu_files_none_without_criu(tmp_path, monkeypatch):
    monkeypatch.setattr(rt, "TOOL_PATH", str(tmp_path))
    assert rt.criu_files(str(tmp_path)) is None
    with pytest.raises(rt.Error, match="no criu on the host"):
        rt.criu_version()


def test_criu_files_are_tools_libraries_and_modules(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    sh = os.path.realpath(shutil.which("sh"))
    for name in rt.CRIU_TOOLS:
        shutil.copy(sh, bindir / name)
    mods = tmp_path / "mods"
    (mods / "kernel").mkdir(parents=True)
    dep = ""
    for name in rt.CRIU_MODULES:
        (mods / "kernel" / (name + ".ko")).write_bytes(b"\x7fELF" + name.encode())
        dep += "kernel/%s.ko:\n" % name
    (mods / "modules.dep").write_text(dep)
    monkeypatch.setattr(rt, "TOOL_PATH", str(bindir))
    found = rt.criu_files(str(mods))
    assert found["tools"] == [str(bindir / n) for n in rt.CRIU_TOOLS]
    assert any("libc.so" in p for p in found["libraries"])
    assert [os.path.basename(p) for p in found["modules"]] == [n + ".ko" for n in rt.CRIU_MODULES]
    assert rt.criu_files(str(mods)) == found  # (from the cache)
    buf = io.BytesIO()
    w = rt.CpioWriter(buf)
    rt._add_criu(w, found)
    w.close()
    entries = rt.read_cpio(buf.getvalue())
    assert (str(bindir / "criu").lstrip("/")) in entries
    names = sorted(n for n in entries if n.startswith(rt.GUEST_CRIU_MODULES.strip("/") + "/"))
    assert names == ["%s/%02d-%s.ko" % (rt.GUEST_CRIU_MODULES.strip("/"), i, n)
                     for i, n in enumerate(rt.CRIU_MODULES)]


def test_run_tool_gives_status_and_output():
    assert rt._run_tool(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"]) == (3, "out\nerr\n")
    status, out = rt._run_tool(["/nonexistent/tool"])
    assert status == 127 and "No such file" in out


def test_check_reports_checkpoint_without_failing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rt, "check_host", lambda: [(True, "qemu", "q"), (False, "checkpoint", "no criu")])
    rt.cmd_check(None)
    assert "off  checkpoint      no criu" in capsys.readouterr().out
    monkeypatch.setattr(rt, "check_host", lambda: [(False, "qemu", "q")])
    with pytest.raises(rt.Error):
        rt.cmd_check(None)


def test_criu_dump_args_make_binds_external_and_freeze_the_cgroup():
    conf = {"mounts": [{"destination": "/data", "type": "bind"},
                       {"destination": "/tmp", "type": "tmpfs"}]}
    args = rt.criu_dump_args(conf, 42, "/i", "/w", {"leave_running": True, "file_locks": True})
    assert args[:3] == ["dump", "--tree", "42"]
    assert args[args.index("--images-dir") + 1] == "/i" and args[args.index("--work-dir") + 1] == "/w"
    assert args[args.index("--freeze-cgroup") + 1] == rt.CONTAINER_CGROUP
    assert [args[i + 1] for i, a in enumerate(args) if a == "--external"] == ["mnt[/data]:/data"]
    assert "--leave-running" in args and "--file-locks" in args and "--tcp-established" not in args
    tty = rt.criu_dump_args(conf, 42, "/i", "/w", {"tty": "tty[8800:1e]"})
    assert [tty[i + 1] for i, a in enumerate(tty) if a == "--external"][-1] == "tty[8800:1e]"
    pre = rt.criu_dump_args(conf, 42, "/i", "/w", {"pre_dump": True, "tcp_established": True})
    assert pre[0] == "pre-dump" and "--track-mem" in pre
    assert pre[pre.index("--network-lock") + 1] == "nftables"
    child = rt.criu_dump_args(conf, 42, "/i", "/w", {"parent": "../pre"})
    assert child[child.index("--prev-images-dir") + 1] == "../pre" and "--track-mem" in child


def test_image_dirs_default_as_runc(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = rt._Args({"image_path": None, "work_path": None})
    assert rt._image_dirs(args) == (str(tmp_path / "checkpoint"),) * 2
    args = rt._Args({"image_path": "img", "work_path": "/w"})
    assert rt._image_dirs(args) == (str(tmp_path / "img"), "/w")


def test_criu_log_errors_keeps_the_last_error_lines(tmp_path):
    log = tmp_path / "dump.log"
    log.write_text("(0.1) info\n(0.2) Error (a): one\n(0.3) Error (b): two\nok\n")
    assert rt.criu_log_errors(str(log)) == "(0.2) Error (a): one; (0.3) Error (b): two"
    assert rt.criu_log_errors(str(log), lines=1) == "(0.3) Error (b): two"
    assert rt.criu_log_errors(str(tmp_path / "none")) == ""


@pytest.mark.parametrize("data, error", [
    ({}, "Container cannot be checkpointed in creating state"),
    ({"pid": "ME", "started": False}, "Container cannot be checkpointed in created state"),
    ({"pid": "ME", "started": True, "sandbox": {"id": "s"}}, "in a pod's VM"),
    ({"pid": "ME", "started": True, "paused": rt.PAUSED_FROZEN}, "frozen in a pod"),
])
def test_checkpointable_refuses_as_runc(tmp_path, data, error):
    state = rt.State(str(tmp_path), "c")
    me = os.getpid()
    state.data = dict(data, pid=me, pid_start=rt.proc_start_time(me)) if data else {}
    with pytest.raises(rt.Error, match=re.escape(error)):
        rt._checkpointable(state)
    state.data = {"pid": me, "pid_start": rt.proc_start_time(me), "started": True}
    rt._checkpointable(state)  # running: fine


def test_criu_restore_args_map_binds_and_stdio():
    args = rt.criu_restore_args("/i", "/w", "/run/p", {"/data": "/run/cc/shares/share0"},
                                [("pipe:[5]", 9), ("/dev/null", 10), ("tty[88:1]", 11)],
                                {"leave_running": True, "tcp_established": True})
    assert args[0] == "restore" and args[args.index("--root") + 1] == rt.GUEST_ROOT
    assert "--restore-detached" in args and "--restore-sibling" in args
    assert args[args.index("--pidfile") + 1] == "/run/p"
    assert [args[i + 1] for i, a in enumerate(args) if a == "--external"] == \
        ["mnt[/data]:/run/cc/shares/share0"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--inherit-fd"] == \
        ["fd[9]:pipe:[5]", "fd[11]:tty[88:1]"]
    assert "--tcp-established" in args and "--leave-running" not in args


def test_restorable_wants_descriptors_and_a_free_id(tmp_path):
    args = rt._Args({"root": str(tmp_path / "root"), "id": "r1"})
    with pytest.raises(rt.Error, match="^open %s: no such file or directory$"
                       % re.escape(str(tmp_path / "descriptors.json"))):
        rt._restorable(args, str(tmp_path))
    (tmp_path / "descriptors.json").write_text("[]")
    rt._restorable(args, str(tmp_path))
    state = rt.State(args.root, "r1")
    state.make()
    state.data = {"id": "r1"}
    state.save()
    with pytest.raises(rt.Error, match="^container with given ID already exists$"):
        rt._restorable(args, str(tmp_path))


def test_run_tool_passes_fds_at_their_numbers():
    r, w = os.pipe()
    try:
        write = "import os; os.write(%d, b'through\\n')"
        assert rt._run_tool([sys.executable, "-c", write % w], fds=(w,)) == (0, "")
        os.close(w)
        w = None
        assert os.read(r, 100) == b"through\n"
        assert rt._run_tool([sys.executable, "-c", write % r])[0] != 0  # not passed
    finally:
        os.close(r)
        if w is not None:
            os.close(w)


def test_restore_mountpoints_as_runc_makes_them(tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "srcdir").mkdir()
    (tmp_path / "srcfile").write_text("x")
    monkeypatch.setattr(rt, "GUEST_ROOT", str(root))
    mounts = [{"destination": "/dev", "type": "tmpfs"},
              {"destination": "/dev/shm", "type": "bind"},  # inside the tmpfs: not made
              {"destination": "/run/.containerenv", "type": "bind"},
              {"destination": "/data", "type": "bind"}]
    rt.restore_mountpoints(mounts, {"/dev/shm": str(tmp_path / "srcdir"),
                                    "/run/.containerenv": str(tmp_path / "srcfile"),
                                    "/data": str(tmp_path / "srcdir")})
    assert (root / "dev").is_dir() and not (root / "dev" / "shm").exists()
    assert (root / "run" / ".containerenv").is_file() and (root / "data").is_dir()


def test_image_exports_name_the_image_work_and_parent_dirs(tmp_path):
    img, work, pre = str(tmp_path / "final"), str(tmp_path / "w"), str(tmp_path / "pre")
    assert rt.image_exports(img, img) == ([("images", img)], {"images": "images", "work": "images"})
    assert rt.image_exports(img, work) == ([("images", img), ("work", work)],
                                           {"images": "images", "work": "work"})
    os.mkdir(pre)
    dirs, names = rt.image_exports(img, work, "../pre")
    assert dirs == [("final", img), ("pre", pre), ("work", work)]
    assert names == {"images": "final", "parent": "pre", "work": "work"}
    for bad in ("../../pre", "/abs/pre", "sub/pre", "../final"):
        with pytest.raises(rt.Error, match="must name a sibling"):
            rt.image_exports(img, img, bad)
    with pytest.raises(rt.Error, match="no such directory"):
        rt.image_exports(img, img, "../gone")
    os.mkdir(img)
    assert rt._restore_parent(img) is None
    os.symlink("../pre", os.path.join(img, "parent"))
    assert rt._restore_parent(img) == "../pre"


def test_restorable_spec_refuses_a_user_namespace():
    rt._restorable_spec({"process": {"terminal": True}, "id_mappings": None})
    with pytest.raises(rt.Error, match="with a user namespace"):
        rt._restorable_spec({"process": {"terminal": False}, "id_mappings": {"uid": [[0, 1, 1]]}})


def test_read_note_of_an_image(tmp_path):
    assert rt._read_note(str(tmp_path)) == {}
    (tmp_path / rt.CHECKPOINT_NOTE).write_text('{"tty": "tty[1:2]"}')
    assert rt._read_note(str(tmp_path)) == {"tty": "tty[1:2]"}


def test_monitor_relays_stdin_once_a_restore_is_answered():
    agent, guest = socket.socketpair()
    client, cli = socket.socketpair()
    try:
        m = _bare_monitor(agent.fileno(), client.fileno())
        watched = []
        m._watch_stdin = lambda: watched.append(True)
        m._on_client_msg(client.fileno(), {"op": "restore", "images": "0/images"})
        assert rt.read_msg(guest.fileno(), rt.FrameReader(), 5) == \
            {"op": "restore", "images": "0/images", "id": 1}
        assert watched == []
        m._on_agent_msg({"id": 1, "op": "restored", "pid": 80})
        assert rt.read_msg(cli.fileno(), rt.FrameReader(), 5) == {"op": "restored", "pid": 80}
        assert watched == [True]
    finally:
        for s in (agent, guest, client, cli):
            s.close()


# ===========================================================================
# 15. The VM pool: sizes, keys, claims, garbage, the warm-up bundle (no VM)
# ===========================================================================

def test_pool_size_from_vm_json_and_the_environment(monkeypatch):
    vm = {"pool": 2, "accel_used": "tcg", "template": True}
    monkeypatch.delenv("CC_OCI_POOL", raising=False)
    assert rt.pool_size(vm) == 2
    assert rt.pool_size(dict(vm, template=False)) == 0, "no template, nothing to restore from"
    monkeypatch.setenv("CC_OCI_POOL", "0")
    assert rt.pool_size(vm) == 0
    monkeypatch.setenv("CC_OCI_POOL", "3")
    assert rt.pool_size(vm) == 3
    monkeypatch.setenv("CC_OCI_POOL", "x")
    assert rt.pool_size(vm) == 2, "not a number: vm.pool"


def test_vm_pool_settings_are_checked(tmp_path):
    (tmp_path / "vm.json").write_text('{"vm": {"pool": -1}}')
    with pytest.raises(rt.Error, match="vm.pool: must be a number of VMs"):
        rt.load_vm_config(str(tmp_path))
    (tmp_path / "vm.json").write_text('{"vm": {"pool_idle": 0}}')
    with pytest.raises(rt.Error, match="vm.pool_idle: must be a positive number"):
        rt.load_vm_config(str(tmp_path))
    assert rt.load_vm_config(None)["pool"] >= 0


def test_pool_key_differs_by_size_and_template():
    vm = {"memory": "256M", "cpus": 1, "accel_used": "tcg", "tcg_tb_size": 32}
    key = rt.pool_key(vm, "/c/template-a")
    assert key == rt.pool_key(dict(vm), "/c/template-a")
    assert len({key, rt.pool_key(dict(vm, memory="512M"), "/c/template-a"),
                rt.pool_key(dict(vm, cpus=2), "/c/template-a"),
                rt.pool_key(vm, "/c/template-b")}) == 4


def test_pool_shares_export_nothing_but_the_pod_export():
    shares = rt.pool_shares("/p/vm")
    assert shares[0] == (rt.ROOTFS_TAG, "/p/vm/files/empty", True)
    assert shares[1] == (rt.POOL_POD_TAG, "/p/vm/files/pod", False)
    assert all(path == "/p/vm/files/empty" and ro for _tag, path, ro in shares[2:])
    assert len(shares) == rt.SHARE_SLOT_CLASSES[0] + 1, "the small template's slots"


def _fake_keeper(vmdir, received):
    """A keeper's socket in vmdir that hands over two fds (a pipe's ends) once, in a thread."""
    import threading
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(vmdir, "keeper.sock"))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        received.append(conn.recv(16))
        r, w = os.pipe()
        socket.send_fds(conn, [b'{"qemu_pid": 42, "qemu_start": 7}'], [r, w])
        os.close(r)
        os.close(w)
        received.append(conn.recv(16))  # b"" once every holder has let go
        conn.close()
        listener.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_pool_take_claims_by_renaming_and_gets_the_keepers_fds(tmp_path, monkeypatch):
    monkeypatch.setattr(rt, "POOL_DIR", str(tmp_path))
    assert rt.pool_take("k1") is None, "no pool yet"
    (tmp_path / "k1" / "dead").mkdir(parents=True)  # a keeper gone: no socket
    (tmp_path / "k1" / "live").mkdir()
    received = []
    t = _fake_keeper(str(tmp_path / "k1" / "live"), received)
    taken = rt.pool_take("k1")
    assert taken["dir"] == str(tmp_path / "used" / "live")
    assert (taken["qemu_pid"], taken["qemu_start"]) == (42, 7) and received == [b"claim"]
    assert not (tmp_path / "k1" / "dead").exists() and not (tmp_path / "used" / "dead").exists(), \
        "a VM whose keeper is gone is removed"
    assert os.listdir(tmp_path / "k1") == [], "taken out of the pool"
    assert rt.pool_take("k1") is None, "one VM, one create"
    rt.release_pooled(taken)
    t.join(5)
    assert received == [b"claim", b""], "released: the keeper sees the end of the claim"


def test_collect_pool_garbage_keeps_live_keepers_only(tmp_path, monkeypatch):
    monkeypatch.setattr(rt, "POOL_DIR", str(tmp_path))
    me = {"pid": os.getpid(), "start": rt.proc_start_time(os.getpid())}
    for where, keeper in (("k1/live", me), ("used/dead", dict(me, start=1)), ("warming/new", None),
                          ("warming/old", None), ("k1/badjson", "x")):
        (tmp_path / where).mkdir(parents=True)
        if keeper is not None:
            (tmp_path / where / "keeper.json").write_text(json.dumps(keeper) if keeper != "x" else "{")
    os.utime(tmp_path / "warming" / "old", (1, 1))
    os.utime(tmp_path / "k1" / "badjson", (1, 1))
    rt.collect_pool_garbage()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("*/*")) == \
        ["k1/live", "warming/new"], "a keeper starting (no keeper.json yet) is given a minute"
    assert rt.pool_status() == ({"k1": 1}, 0)


def test_warmup_bundle_runs_the_hosts_programs_chrooted(tmp_path, monkeypatch):
    monkeypatch.setattr(rt, "CACHE_DIR", str(tmp_path))
    bundle = rt.warmup_bundle()
    assert rt.warmup_bundle() == bundle, "built once"
    conf = rt.load_spec(bundle)
    assert conf["process"]["args"] == ["/bin/sleep", "60"] and conf["root"]["readonly"]
    root = os.path.join(bundle, "rootfs")
    for d in ("proc", "sys", "dev"):
        assert os.path.isdir(os.path.join(root, d)), "mount points of a read-only rootfs"
    pid = os.fork()
    if pid == 0:
        try:
            os.chroot(root)
            os.execv("/bin/true", ["true"])
        finally:
            os._exit(9)
    assert os.waitpid(pid, 0)[1] == 0, "true runs with only the bundle's files"


def test_claim_pod_slot_leaves_a_pooled_sandboxs_own_slot(tmp_path):
    assert rt.claim_pod_slot(str(tmp_path), "m1", pooled=True) == rt.POOL_SLOT + 1
    assert rt.claim_pod_slot(str(tmp_path), "m2") == rt.POOL_SLOT


def test_vm_files_of_a_pooled_vm_are_in_qemus_namespace():
    assert rt.vm_files({"pid": 5, "vm": {}}, "/s/c1") == (5, "/s/c1/files")
    assert rt.vm_files({"pid": 5, "vm": {"pool_dir": "/p/used/v", "qemu_pid": 9}}, "/s/c1") == \
        (9, "/p/used/v/files")


def test_agent_reset_refuses_without_an_ended_warm_up():
    agent = rt.Agent()
    with pytest.raises(rt.Error, match="no warm-up container has ended"):
        agent._op_reset({})
    agent.conf, agent.procs = {"warmup": True}, {0: {"status": None}}
    with pytest.raises(rt.Error, match="no warm-up container has ended"):
        agent._op_reset({})
    agent.conf = {"warmup": False}
    agent.procs[0]["status"] = 0
    with pytest.raises(rt.Error, match="no warm-up container has ended"):
        agent._op_reset({})


def test_the_claimed_vms_holder_ends_qemu_when_the_claim_ends(tmp_path):
    vmdir = tmp_path / "used" / "v1"
    (vmdir / rt.FILES_DIR).mkdir(parents=True)
    (vmdir / "qemu.log").write_text("")
    ours, theirs = socket.socketpair()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder: the parent of a stand-in for QEMU, then exec'd as the keeper is
        try:
            os.close(r)
            qemu = os.fork()
            if qemu == 0:
                ours.close()
                theirs.close()
                time.sleep(60)
                os._exit(0)
            os.write(w, b"%d" % qemu)
            os.set_inheritable(theirs.fileno(), True)
            os.execv(sys.executable, [sys.executable, "-S", "-I", "-c", rt.KEEPER_HOLD,
                                      str(theirs.fileno()), str(qemu), str(vmdir), rt.FILES_DIR])
        finally:
            os._exit(9)
    os.close(w)
    theirs.close()
    qemu = int(os.read(r, 32))
    os.close(r)
    time.sleep(0.5)
    assert rt.process_alive(qemu) and vmdir.exists(), "held while the claim is open"
    ours.close()
    assert os.waitpid(pid, 0)[1] == 0
    assert not rt.process_alive(qemu) and not vmdir.exists(), "QEMU killed, its directory gone"


def test_qmp_passes_a_tap_fd_with_getfd_and_names_it_in_netdev_add(tmp_path):
    import threading
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "qmp.sock"))
    listener.listen(1)
    seen = []

    def qemu():
        conn, _ = listener.accept()
        conn.sendall(b'{"QMP": {}}\n')
        buf = b""
        while len(seen) < 4:
            data, fds, _flags, _addr = socket.recv_fds(conn, 4096, 1)
            if not data:
                break
            buf += data
            for fd in fds:
                seen.append(("fd", os.readlink("/proc/self/fd/%d" % fd)))
                os.close(fd)
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                seen.append((msg["execute"], msg.get("arguments")))
                conn.sendall(b'{"return": {}}\n')
        conn.close()
    t = threading.Thread(target=qemu, daemon=True)
    t.start()
    r, w = os.pipe()
    q = rt.Qmp(str(tmp_path))
    for command, arguments in rt.give_tap_commands(1, r)[:2]:
        q.call(command, **arguments)
    q.close()
    t.join(5)
    os.close(r)
    os.close(w)
    assert seen[0] == ("qmp_capabilities", None)
    assert seen[1][0] == "fd" and seen[1][1].startswith("pipe:"), "getfd came with the fd"
    assert seen[2] == ("getfd", {"fdname": "tap1"})
    assert seen[3] == ("netdev_add", {"type": "tap", "id": "tap1", "fd": "tap1", "vhost": False})
