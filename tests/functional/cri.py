"""A minimal CRI client (Kubernetes' container runtime interface) for containerd's unix socket.

Stdlib only. CRI is gRPC: protobuf messages in HTTP/2 DATA frames. This module has the
three layers, each small and only as complete as a client needs:

- protobuf: encode()/decode() between dicts and bytes, driven by SCHEMA (field numbers of
  the CRI api.proto; unknown fields are skipped when decoding, unknown keys rejected when
  encoding). Decoded messages carry proto3 defaults for absent scalars ("" / 0 / False /
  [] / {}; an enum's zero name), absent sub-messages are left out. Enums are names.
- HPACK (RFC 7541): requests are sent as literal fields without Huffman coding; responses
  are decoded in full (static and dynamic tables, size updates, Huffman strings), since
  Go's HTTP/2 server indexes and Huffman-codes what it sends.
- HTTP/2 + gRPC: Connection does one unary call at a time on one connection (preface,
  SETTINGS and their ACKs, PING ACKs, WINDOW_UPDATEs for what it received and waits for
  the peer's window when it sends, GOAWAY, RST_STREAM); a non-zero grpc-status raises
  GrpcError. Every socket operation has a timeout, and a call that times out closes the
  connection (the next call reconnects) rather than leave a half-read stream behind.

    c = CriClient("/path/containerd.sock")
    c.version()          # {"version": "0.1.0", "runtime_name": "containerd", ...}
    sid = c.run_pod_sandbox({"metadata": {"name": "p", "uid": "u1", "namespace": "default"}}, "runc")
    cid = c.create_container(sid, {"metadata": {"name": "c"}, "image": {"image": "busybox"},
                                   "command": ["sleep", "1000"]}, sandbox_config)
    c.start_container(cid)
    rc, out, err = c.exec_sync(cid, ["echo", "hi"], timeout=10)

CriClient uses runtime.v1 when the server has it (containerd 1.6 serves both runtime.v1 and
runtime.v1alpha2; the messages used here have the same field numbers in both).
"""
import json
import socket
import struct
import threading
import time
import urllib.parse

# ---------------------------------------------------------------------------
# protobuf
# ---------------------------------------------------------------------------

# Field lists "name:number:type", type one of s (string), b (bytes), i32 / i64 (signed
# varint), u32 / u64, bool, f64 (double), map (map<string, string>), E.Enum, or a message
# name; a leading * makes the field repeated.
_SCHEMA_SRC = {
    "VersionRequest": "version:1:s",
    "VersionResponse": "version:1:s runtime_name:2:s runtime_version:3:s runtime_api_version:4:s",
    "StatusRequest": "verbose:1:bool",
    "StatusResponse": "status:1:RuntimeStatus info:2:map",
    "RuntimeStatus": "conditions:1:*RuntimeCondition",
    "RuntimeCondition": "type:1:s status:2:bool reason:3:s message:4:s",
    # pod sandboxes
    "PodSandboxMetadata": "name:1:s uid:2:s namespace:3:s attempt:4:u32",
    "DNSConfig": "servers:1:*s searches:2:*s options:3:*s",
    "PortMapping": "protocol:1:E.Protocol container_port:2:i32 host_port:3:i32 host_ip:4:s",
    "PodSandboxConfig": "metadata:1:PodSandboxMetadata hostname:2:s log_directory:3:s dns_config:4:DNSConfig "
                        "port_mappings:5:*PortMapping labels:6:map annotations:7:map linux:8:LinuxPodSandboxConfig",
    "LinuxPodSandboxConfig": "cgroup_parent:1:s security_context:2:LinuxSandboxSecurityContext sysctls:3:map "
                             "overhead:4:LinuxContainerResources resources:5:LinuxContainerResources",
    "LinuxSandboxSecurityContext": "namespace_options:1:NamespaceOption selinux_options:2:SELinuxOption "
                                   "run_as_user:3:Int64Value readonly_rootfs:4:bool supplemental_groups:5:*i64 "
                                   "privileged:6:bool seccomp_profile_path:7:s run_as_group:8:Int64Value "
                                   "seccomp:9:SecurityProfile apparmor:10:SecurityProfile",
    "NamespaceOption": "network:1:E.NamespaceMode pid:2:E.NamespaceMode ipc:3:E.NamespaceMode target_id:4:s",
    "SELinuxOption": "user:1:s role:2:s type:3:s level:4:s",
    "Int64Value": "value:1:i64",
    "UInt64Value": "value:1:u64",
    "SecurityProfile": "profile_type:1:E.ProfileType localhost_ref:2:s",
    "LinuxContainerResources": "cpu_period:1:i64 cpu_quota:2:i64 cpu_shares:3:i64 memory_limit_in_bytes:4:i64 "
                               "oom_score_adj:5:i64 cpuset_cpus:6:s cpuset_mems:7:s "
                               "hugepage_limits:8:*HugepageLimit unified:9:map memory_swap_limit_in_bytes:10:i64",
    "HugepageLimit": "page_size:1:s limit:2:u64",
    "RunPodSandboxRequest": "config:1:PodSandboxConfig runtime_handler:2:s",
    "RunPodSandboxResponse": "pod_sandbox_id:1:s",
    "StopPodSandboxRequest": "pod_sandbox_id:1:s",
    "StopPodSandboxResponse": "",
    "RemovePodSandboxRequest": "pod_sandbox_id:1:s",
    "RemovePodSandboxResponse": "",
    "PodSandboxStatusRequest": "pod_sandbox_id:1:s verbose:2:bool",
    "PodSandboxStatusResponse": "status:1:PodSandboxStatus info:2:map",
    "PodSandboxStatus": "id:1:s metadata:2:PodSandboxMetadata state:3:E.PodSandboxState created_at:4:i64 "
                        "network:5:PodSandboxNetworkStatus linux:6:LinuxPodSandboxStatus labels:7:map "
                        "annotations:8:map runtime_handler:9:s",
    "PodSandboxNetworkStatus": "ip:1:s additional_ips:2:*PodIP",
    "PodIP": "ip:1:s",
    "LinuxPodSandboxStatus": "namespaces:1:Namespace",
    "Namespace": "options:2:NamespaceOption",
    "ListPodSandboxRequest": "filter:1:PodSandboxFilter",
    "PodSandboxFilter": "id:1:s state:2:PodSandboxStateValue label_selector:3:map",
    "PodSandboxStateValue": "state:1:E.PodSandboxState",
    "ListPodSandboxResponse": "items:1:*PodSandbox",
    "PodSandbox": "id:1:s metadata:2:PodSandboxMetadata state:3:E.PodSandboxState created_at:4:i64 "
                  "labels:5:map annotations:6:map runtime_handler:7:s",
    # containers
    "ContainerMetadata": "name:1:s attempt:2:u32",
    "ImageSpec": "image:1:s annotations:2:map",
    "KeyValue": "key:1:s value:2:s",
    "Mount": "container_path:1:s host_path:2:s readonly:3:bool selinux_relabel:4:bool "
             "propagation:5:E.MountPropagation",
    "Device": "container_path:1:s host_path:2:s permissions:3:s",
    "ContainerConfig": "metadata:1:ContainerMetadata image:2:ImageSpec command:3:*s args:4:*s working_dir:5:s "
                       "envs:6:*KeyValue mounts:7:*Mount devices:8:*Device labels:9:map annotations:10:map "
                       "log_path:11:s stdin:12:bool stdin_once:13:bool tty:14:bool linux:15:LinuxContainerConfig",
    "LinuxContainerConfig": "resources:1:LinuxContainerResources security_context:2:LinuxContainerSecurityContext",
    "LinuxContainerSecurityContext": "capabilities:1:Capability privileged:2:bool namespace_options:3:NamespaceOption "
                                     "selinux_options:4:SELinuxOption run_as_user:5:Int64Value run_as_username:6:s "
                                     "readonly_rootfs:7:bool supplemental_groups:8:*i64 apparmor_profile:9:s "
                                     "seccomp_profile_path:10:s no_new_privs:11:bool run_as_group:12:Int64Value "
                                     "masked_paths:13:*s readonly_paths:14:*s seccomp:15:SecurityProfile "
                                     "apparmor:16:SecurityProfile",
    "Capability": "add_capabilities:1:*s drop_capabilities:2:*s add_ambient_capabilities:3:*s",
    "CreateContainerRequest": "pod_sandbox_id:1:s config:2:ContainerConfig sandbox_config:3:PodSandboxConfig",
    "CreateContainerResponse": "container_id:1:s",
    "StartContainerRequest": "container_id:1:s",
    "StartContainerResponse": "",
    "StopContainerRequest": "container_id:1:s timeout:2:i64",
    "StopContainerResponse": "",
    "RemoveContainerRequest": "container_id:1:s",
    "RemoveContainerResponse": "",
    "ContainerStatusRequest": "container_id:1:s verbose:2:bool",
    "ContainerStatusResponse": "status:1:ContainerStatus info:2:map",
    "ContainerStatus": "id:1:s metadata:2:ContainerMetadata state:3:E.ContainerState created_at:4:i64 "
                       "started_at:5:i64 finished_at:6:i64 exit_code:7:i32 image:8:ImageSpec image_ref:9:s "
                       "reason:10:s message:11:s labels:12:map annotations:13:map mounts:14:*Mount log_path:15:s "
                       "resources:16:ContainerResources",
    "ContainerResources": "linux:1:LinuxContainerResources",
    "ExecSyncRequest": "container_id:1:s cmd:2:*s timeout:3:i64",
    "ExecSyncResponse": "stdout:1:b stderr:2:b exit_code:3:i32",
    "UpdateContainerResourcesRequest": "container_id:1:s linux:2:LinuxContainerResources annotations:4:map",
    "UpdateContainerResourcesResponse": "",
    "ListContainersRequest": "filter:1:ContainerFilter",
    "ContainerFilter": "id:1:s state:2:ContainerStateValue pod_sandbox_id:3:s label_selector:4:map",
    "ContainerStateValue": "state:1:E.ContainerState",
    "ListContainersResponse": "containers:1:*Container",
    "Container": "id:1:s pod_sandbox_id:2:s metadata:3:ContainerMetadata image:4:ImageSpec image_ref:5:s "
                 "state:6:E.ContainerState created_at:7:i64 labels:8:map annotations:9:map",
    "ContainerStatsRequest": "container_id:1:s",
    "ContainerStatsResponse": "stats:1:ContainerStats",
    "ContainerStats": "attributes:1:ContainerAttributes cpu:2:CpuUsage memory:3:MemoryUsage "
                      "writable_layer:4:FilesystemUsage",
    "ContainerAttributes": "id:1:s metadata:2:ContainerMetadata labels:3:map annotations:4:map",
    "CpuUsage": "timestamp:1:i64 usage_core_nano_seconds:2:UInt64Value usage_nano_cores:3:UInt64Value",
    "MemoryUsage": "timestamp:1:i64 working_set_bytes:2:UInt64Value available_bytes:3:UInt64Value "
                   "usage_bytes:4:UInt64Value rss_bytes:5:UInt64Value page_faults:6:UInt64Value "
                   "major_page_faults:7:UInt64Value",
    "FilesystemUsage": "timestamp:1:i64 fs_id:2:FilesystemIdentifier used_bytes:3:UInt64Value "
                       "inodes_used:4:UInt64Value",
    "FilesystemIdentifier": "mountpoint:1:s",
    # images
    "ListImagesRequest": "filter:1:ImageFilter",
    "ImageFilter": "image:1:ImageSpec",
    "ListImagesResponse": "images:1:*Image",
    "Image": "id:1:s repo_tags:2:*s repo_digests:3:*s size:4:u64 uid:5:Int64Value username:6:s spec:7:ImageSpec "
             "pinned:8:bool",
    "ImageStatusRequest": "image:1:ImageSpec verbose:2:bool",
    "ImageStatusResponse": "image:1:Image info:2:map",
}

ENUMS = {
    "Protocol": ["TCP", "UDP", "SCTP"],
    "NamespaceMode": ["POD", "CONTAINER", "NODE", "TARGET"],
    "ProfileType": ["RuntimeDefault", "Unconfined", "Localhost"],
    "PodSandboxState": ["SANDBOX_READY", "SANDBOX_NOTREADY"],
    "ContainerState": ["CONTAINER_CREATED", "CONTAINER_RUNNING", "CONTAINER_EXITED", "CONTAINER_UNKNOWN"],
    "MountPropagation": ["PROPAGATION_PRIVATE", "PROPAGATION_HOST_TO_CONTAINER", "PROPAGATION_BIDIRECTIONAL"],
}

_SCALARS = {"s", "b", "i32", "i64", "u32", "u64", "bool", "f64"}


class Field:
    """One field of a message: name, number, type (see _SCHEMA_SRC) and whether repeated."""

    __slots__ = ("name", "num", "type", "repeated")

    def __init__(self, name, num, typ, repeated):
        self.name, self.num, self.type, self.repeated = name, num, typ, repeated

    def default(self):
        """The proto3 default value of an absent field (None for a sub-message)."""
        if self.repeated:
            return []
        if self.type == "map":
            return {}
        if self.type.startswith("E."):
            return ENUMS[self.type[2:]][0]
        return {"s": "", "b": b"", "bool": False, "f64": 0.0}.get(self.type, 0 if self.type in _SCALARS else None)


def _parse_schema(src):
    """{message: {field name: Field}} and {message: {number: Field}} from the compact source."""
    by_name, by_num = {}, {}
    for msg, text in src.items():
        by_name[msg], by_num[msg] = {}, {}
        for spec in text.split():
            name, num, typ = spec.split(":")
            f = Field(name, int(num), typ.lstrip("*"), typ.startswith("*"))
            if not (f.type in _SCALARS or f.type == "map" or f.type.startswith("E.") or f.type in src):
                raise ValueError("%s.%s: unknown type %s" % (msg, name, f.type))
            by_name[msg][name] = by_num[msg][f.num] = f
    return by_name, by_num


SCHEMA, _BY_NUM = _parse_schema(_SCHEMA_SRC)


def encode_varint(n):
    """Base-128 varint of n; negative numbers as 64-bit two's complement (10 bytes)."""
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def decode_varint(data, pos):
    """(value, new pos) of the varint at data[pos]; unsigned, at most 64 bits."""
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result & ((1 << 64) - 1), pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint too long")


def _key(num, wire):
    return encode_varint(num << 3 | wire)


def _len_delimited(num, payload):
    return _key(num, 2) + encode_varint(len(payload)) + payload


def _scalar_bytes(typ, v):
    """Wire bytes (without key) of one scalar value and its wire type."""
    if typ == "s":
        return encode_varint(len(v.encode())) + v.encode(), 2
    if typ == "b":
        return encode_varint(len(v)) + bytes(v), 2
    if typ == "f64":
        return struct.pack("<d", v), 1
    if typ == "bool":
        return encode_varint(1 if v else 0), 0
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError("%s field needs an int, not %r" % (typ, v))
    if typ in ("u32", "u64") and v < 0:
        raise ValueError("negative value %d for %s" % (v, typ))
    return encode_varint(v), 0


def _enum_number(typ, v):
    names = ENUMS[typ[2:]]
    if isinstance(v, str):
        if v not in names:
            raise ValueError("%s has no value %r" % (typ[2:], v))
        return names.index(v)
    return int(v)


def encode(msg, obj):
    """Serialize dict obj as protobuf message type msg (fields in number order)."""
    fields = SCHEMA[msg]
    unknown = set(obj) - set(fields)
    if unknown:
        raise KeyError("%s has no field(s) %s" % (msg, ", ".join(sorted(unknown))))
    out = bytearray()
    for f in sorted((fields[k] for k in obj), key=lambda f: f.num):
        v = obj[f.name]
        if v is None:
            continue
        if f.type == "map":
            for k in sorted(v):
                entry = _len_delimited(1, str(k).encode()) + _len_delimited(2, str(v[k]).encode())
                out += _len_delimited(f.num, entry)
            continue
        values = v if f.repeated else [v]
        if f.repeated and isinstance(v, (str, bytes, dict)):
            raise TypeError("%s.%s is repeated: give a list" % (msg, f.name))
        if f.type in SCHEMA:
            for item in values:
                out += _len_delimited(f.num, encode(f.type, item))
            continue
        if f.type.startswith("E."):
            values = [_enum_number(f.type, x) for x in values]
            typ = "i32"
        else:
            typ = f.type
        if f.repeated and typ not in ("s", "b"):  # proto3 packs repeated numbers
            if values:
                out += _len_delimited(f.num, b"".join(_scalar_bytes(typ, x)[0] for x in values))
            continue
        for item in values:
            data, wire = _scalar_bytes(typ, item)
            out += _key(f.num, wire) + data
    return bytes(out)


def _signed(v):
    """A 64-bit varint as a signed number (negative int32s are sign-extended on the wire too)."""
    return v - (1 << 64) if v >= 1 << 63 else v


def _convert(typ, wire, raw):
    """Python value of one decoded scalar (raw: int for wire 0/1/5, bytes for wire 2)."""
    if typ == "s":
        return raw.decode("utf-8", "surrogateescape")
    if typ == "b":
        return bytes(raw)
    if typ == "f64":
        return struct.unpack("<d", raw)[0] if isinstance(raw, (bytes, bytearray)) else raw
    if typ == "bool":
        return bool(raw)
    if typ.startswith("E."):
        n = _signed(raw)
        names = ENUMS[typ[2:]]
        return names[n] if 0 <= n < len(names) else n
    if typ in ("i32", "i64"):
        return _signed(raw)
    if typ == "u32":
        return raw & 0xFFFFFFFF
    return raw


def _fields(data):
    """Yield (number, wire type, value) of every field in a serialized message."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = decode_varint(data, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, pos = decode_varint(data, pos)
        elif wire == 1:
            v, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = decode_varint(data, pos)
            v, pos = data[pos:pos + n], pos + n
        elif wire == 5:
            v, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError("unsupported wire type %d (field %d)" % (wire, num))
        if pos > end:
            raise ValueError("truncated field %d" % num)
        yield num, wire, v


def decode(msg, data):
    """Parse protobuf bytes as message type msg into a dict (unknown fields are skipped)."""
    by_num = _BY_NUM[msg]
    out = {}
    for f in by_num.values():
        d = f.default()
        if d is not None:
            out[f.name] = d
    for num, wire, v in _fields(bytes(data)):
        f = by_num.get(num)
        if f is None:
            continue
        if f.type == "map":
            entry = {1: "", 2: ""}
            for n, w, x in _fields(v):
                if w == 2:
                    entry[n] = x.decode("utf-8", "surrogateescape")
            out[f.name][entry[1]] = entry[2]
        elif f.type in SCHEMA:
            item = decode(f.type, v)
            if f.repeated:
                out[f.name].append(item)
            else:
                out[f.name] = item
        elif f.repeated and wire == 2 and f.type not in ("s", "b"):  # packed numbers
            pos = 0
            while pos < len(v):
                if f.type == "f64":
                    raw, pos = v[pos:pos + 8], pos + 8
                else:
                    raw, pos = decode_varint(v, pos)
                out[f.name].append(_convert(f.type, 0, raw))
        else:
            value = _convert(f.type, wire, v)
            if f.repeated:
                out[f.name].append(value)
            else:
                out[f.name] = value
    return out


# ---------------------------------------------------------------------------
# HPACK (RFC 7541)
# ---------------------------------------------------------------------------

STATIC_TABLE = [(n, v) for n, v in (
    (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"), (":path", "/index.html"),
    (":scheme", "http"), (":scheme", "https"), (":status", "200"), (":status", "204"), (":status", "206"),
    (":status", "304"), (":status", "400"), (":status", "404"), (":status", "500"), ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""), ("accept", ""),
    ("access-control-allow-origin", ""), ("age", ""), ("allow", ""), ("authorization", ""),
    ("cache-control", ""), ("content-disposition", ""), ("content-encoding", ""), ("content-language", ""),
    ("content-length", ""), ("content-location", ""), ("content-range", ""), ("content-type", ""),
    ("cookie", ""), ("date", ""), ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""), ("host", ""),
    ("if-match", ""), ("if-modified-since", ""), ("if-none-match", ""), ("if-range", ""),
    ("if-unmodified-since", ""), ("last-modified", ""), ("link", ""), ("location", ""), ("max-forwards", ""),
    ("proxy-authenticate", ""), ("proxy-authorization", ""), ("range", ""), ("referer", ""), ("refresh", ""),
    ("retry-after", ""), ("server", ""), ("set-cookie", ""), ("strict-transport-security", ""),
    ("transfer-encoding", ""), ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""))]

# RFC 7541 Appendix B: the code length of symbols 0..255 and EOS (256), one letter each
# ("A" = 5 bits ... "Z" = 30 bits). The code is canonical (codes of one length are
# consecutive, in symbol order, and each length starts where the shorter ones ended), so
# the codes follow from the lengths; the unit tests check codes the RFC lists.
_HUFFMAN_LENGTHS = (
    "ISXXXXXXXTZXXZXXXXXXXXZXXXXXXXXXBFFHIBDGFFDGDBBBAAABBBBBBBCDKBHFIBCCCCCCCCCCCCCCCCCCCCCCDCDIOIJB"
    "KABABABBBACCBBBABCBAABCCCCCKGJIXPRPPRRRSRSSSSSTSTTRSTSSSSQRSRSSTRQPRRSSQSRRTQRSSQQRQSRSSPRRRSRRS"
    "VVPORSRUVVVWWVTUOQVWWVWTQQVVXWWWPTPQRQQSRRUUTTVSVWVVWWWWWXWWWWWVZ")


def _huffman_codes():
    """[(code, length)] for symbols 0..256, built canonically from _HUFFMAN_LENGTHS."""
    lengths = [ord(c) - ord("A") + 5 for c in _HUFFMAN_LENGTHS]
    assert len(lengths) == 257
    codes, code, prev = [None] * 257, -1, 0
    for sym in sorted(range(257), key=lambda s: (lengths[s], s)):
        code = (code + 1) << (lengths[sym] - prev)
        prev = lengths[sym]
        codes[sym] = (code, prev)
    return codes


HUFFMAN_CODES = _huffman_codes()
_HUFFMAN_DECODE = {(length, code): sym for sym, (code, length) in enumerate(HUFFMAN_CODES)}


class HpackError(Exception):
    """A malformed header block (a COMPRESSION_ERROR for the connection)."""


def huffman_encode(data):
    """Huffman-code bytes (padding with the EOS prefix, all ones)."""
    acc = nbits = 0
    out = bytearray()
    for b in data:
        code, length = HUFFMAN_CODES[b]
        acc, nbits = acc << length | code, nbits + length
        while nbits >= 8:
            nbits -= 8
            out.append(acc >> nbits & 0xFF)
        acc &= (1 << nbits) - 1
    if nbits:
        out.append((acc << (8 - nbits) | (1 << (8 - nbits)) - 1) & 0xFF)
    return bytes(out)


def huffman_decode(data):
    """Decode a Huffman-coded string (RFC 7541 5.2): padding of at most 7 one bits, no EOS."""
    out = bytearray()
    code = nbits = 0
    for byte in data:
        for i in range(7, -1, -1):
            code = code << 1 | (byte >> i & 1)
            nbits += 1
            sym = _HUFFMAN_DECODE.get((nbits, code))
            if sym is not None:
                if sym == 256:
                    raise HpackError("EOS symbol in a Huffman string")
                out.append(sym)
                code = nbits = 0
            elif nbits > 30:
                raise HpackError("invalid Huffman code")
    if nbits > 7 or code != (1 << nbits) - 1:
        raise HpackError("invalid Huffman padding")
    return bytes(out)


def encode_int(value, prefix_bits, first=0):
    """HPACK integer with an N-bit prefix; `first` holds the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_int(data, pos, prefix_bits):
    """(value, new pos) of the HPACK integer at data[pos] with an N-bit prefix."""
    if pos >= len(data):
        raise HpackError("truncated integer")
    limit = (1 << prefix_bits) - 1
    value = data[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        if pos >= len(data):
            raise HpackError("truncated integer")
        b = data[pos]
        pos += 1
        value += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos
        if shift > 28:
            raise HpackError("integer too large")


def encode_headers(headers):
    """A header block of literal fields without indexing, new names, no Huffman (RFC 7541 6.2.2)."""
    out = bytearray()
    for name, value in headers:
        n, v = name.encode(), value.encode()
        out += b"\x00" + encode_int(len(n), 7) + n + encode_int(len(v), 7) + v
    return bytes(out)


class HpackDecoder:
    """Decodes the header blocks of one connection, keeping its dynamic table."""

    def __init__(self, max_table_size=4096):
        self.max_allowed = max_table_size  # what we announced in SETTINGS_HEADER_TABLE_SIZE
        self.max_size = max_table_size
        self.table = []  # newest first: [(name, value)]
        self.size = 0

    @staticmethod
    def _entry_size(name, value):
        return len(name.encode()) + len(value.encode()) + 32

    def _evict(self):
        while self.size > self.max_size:
            name, value = self.table.pop()
            self.size -= self._entry_size(name, value)

    def add(self, name, value):
        """Insert an entry (RFC 7541 4.4: one larger than the table just empties it)."""
        self.table.insert(0, (name, value))
        self.size += self._entry_size(name, value)
        self._evict()

    def lookup(self, index):
        """(name, value) at a 1-based index over the static then the dynamic table."""
        if index <= 0:
            raise HpackError("index 0")
        if index <= len(STATIC_TABLE):
            return STATIC_TABLE[index - 1]
        i = index - len(STATIC_TABLE) - 1
        if i >= len(self.table):
            raise HpackError("index %d beyond the dynamic table (%d entries)" % (index, len(self.table)))
        return self.table[i]

    def _string(self, data, pos):
        if pos >= len(data):
            raise HpackError("truncated string")
        huffman = data[pos] & 0x80
        n, pos = decode_int(data, pos, 7)
        if pos + n > len(data):
            raise HpackError("truncated string")
        raw = bytes(data[pos:pos + n])
        raw = huffman_decode(raw) if huffman else raw
        return raw.decode("utf-8", "surrogateescape"), pos + n

    def decode(self, data):
        """[(name, value)] of one complete header block."""
        headers, pos, fields_seen = [], 0, False
        while pos < len(data):
            b = data[pos]
            if b & 0x80:  # indexed field
                index, pos = decode_int(data, pos, 7)
                headers.append(self.lookup(index))
            elif b & 0x20 and not b & 0x40:  # 001xxxxx: dynamic table size update
                if fields_seen:
                    raise HpackError("table size update after a header field")
                size, pos = decode_int(data, pos, 5)
                if size > self.max_allowed:
                    raise HpackError("table size %d above the announced %d" % (size, self.max_allowed))
                self.max_size = size
                self._evict()
                continue
            else:
                # 01xxxxxx: literal with incremental indexing (6-bit index); 0000xxxx without
                # indexing, 0001xxxx never indexed (4-bit index)
                indexing = bool(b & 0x40)
                index, pos = decode_int(data, pos, 6 if indexing else 4)
                if index:
                    name = self.lookup(index)[0]
                else:
                    name, pos = self._string(data, pos)
                value, pos = self._string(data, pos)
                headers.append((name, value))
                if indexing:
                    self.add(name, value)
            fields_seen = True
        return headers


# ---------------------------------------------------------------------------
# HTTP/2 + gRPC
# ---------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE = 1, 2, 4, 5
RECV_WINDOW = 1 << 24  # our per-stream window; the connection's is raised to the same at start
MAX_MESSAGE = 64 << 20

GRPC_CODES = ["OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
              "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
              "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"]


class GrpcError(Exception):
    """A call that ended with a non-zero grpc-status (or a reset stream): .code, .code_name, .message."""

    def __init__(self, code, message, method=""):
        self.code, self.message, self.method = code, message, method
        self.code_name = GRPC_CODES[code] if 0 <= code < len(GRPC_CODES) else str(code)
        super().__init__("%s: %s: %s" % (method, self.code_name, message))


class Http2Error(ConnectionError):
    """A protocol error, GOAWAY or a closed connection; the connection is unusable afterwards."""


def frame(ftype, flags, stream, payload=b""):
    """One HTTP/2 frame."""
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload


def grpc_timeout(seconds):
    """A grpc-timeout header value (at most 8 digits and a unit)."""
    ms = max(1, int(seconds * 1000))
    return "%dm" % ms if ms < 10 ** 8 else "%dS" % min(int(seconds), 10 ** 8 - 1)


class Connection:
    """One HTTP/2 connection to a gRPC server on a unix socket, one unary call at a time."""

    def __init__(self, path, timeout=30.0, recv_window=RECV_WINDOW):
        """Connect and send the preface and our SETTINGS (no push, a recv_window for every stream
        and the connection)."""
        self.path, self.timeout, self.recv_window = path, timeout, recv_window
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.buf = bytearray()
        self.hpack = HpackDecoder()
        self.next_stream = 1
        self.peer_max_frame = 16384
        self.peer_initial_window = 65535
        self.send_window = 65535  # the connection's
        self.stream_send_window = {}
        self.goaway = None  # (last stream id, error code, debug text)
        self.closed = False
        self.deadline = None
        self.unacked = {0: 0}  # DATA bytes received and not yet given back, per stream (0: connection)
        settings = struct.pack(">HI", S_ENABLE_PUSH, 0) + struct.pack(">HI", S_INITIAL_WINDOW_SIZE, recv_window)
        grow = frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", recv_window - 65535)) if recv_window > 65535 else b""
        self._send(PREFACE + frame(SETTINGS, 0, 0, settings) + grow)  # grow: the connection's window too

    def close(self):
        """Close the socket (no GOAWAY: the server treats a closed connection the same)."""
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    def _remaining(self):
        if self.deadline is None:
            return self.timeout
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("deadline exceeded")
        return min(left, self.timeout)

    def _send(self, data):
        self.sock.settimeout(self._remaining())
        self.sock.sendall(data)

    def _recv_exact(self, n):
        while len(self.buf) < n:
            self.sock.settimeout(self._remaining())
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise Http2Error("connection closed by the server" + (
                    " after GOAWAY %s" % (self.goaway,) if self.goaway else ""))
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_frame(self):
        """(type, flags, stream id, payload) of the next frame."""
        head = self._recv_exact(9)
        length = int.from_bytes(head[:3], "big")
        if length > 16384:  # the SETTINGS_MAX_FRAME_SIZE we announce (the default)
            raise Http2Error("frame of %d bytes" % length)
        return head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, self._recv_exact(length)

    @staticmethod
    def _unpad(flags, payload):
        if flags & PADDED:
            pad = payload[0] if payload else 0
            if pad >= len(payload):
                raise Http2Error("bad padding")
            return payload[1:len(payload) - pad]
        return payload

    def _settings(self, flags, payload):
        if flags & ACK:
            return
        for i in range(0, len(payload) - len(payload) % 6, 6):
            ident, value = struct.unpack(">HI", payload[i:i + 6])
            if ident == S_INITIAL_WINDOW_SIZE:
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for sid in self.stream_send_window:
                    self.stream_send_window[sid] += delta
            elif ident == S_MAX_FRAME_SIZE:
                self.peer_max_frame = value
        self._send(frame(SETTINGS, ACK, 0))

    def _header_block(self, ftype, flags, payload):
        """The complete header block starting with this HEADERS frame (reads CONTINUATIONs)."""
        payload = self._unpad(flags, payload) if ftype == HEADERS else payload
        if ftype == HEADERS and flags & PRIORITY_FLAG:
            payload = payload[5:]
        block = bytearray(payload)
        while not flags & END_HEADERS:
            ctype, flags, _, more = self.read_frame()
            if ctype != CONTINUATION:
                raise Http2Error("frame type %d inside a header block" % ctype)
            block += more
        return self.hpack.decode(bytes(block))

    def handle_frame(self, f, stream_id, on_stream):
        """Deal with connection-level frames; hand frames of stream_id to on_stream(type, flags, payload)."""
        ftype, flags, sid, payload = f
        if ftype == SETTINGS:
            self._settings(flags, payload)
        elif ftype == PING:
            if not flags & ACK:
                self._send(frame(PING, ACK, 0, payload))
        elif ftype == GOAWAY:
            last, code = struct.unpack(">II", payload[:8])
            self.goaway = (last & 0x7FFFFFFF, code, payload[8:].decode("utf-8", "replace"))
            if stream_id > self.goaway[0]:
                raise Http2Error("GOAWAY (last stream %d, error %d): %s" % self.goaway)
        elif ftype == WINDOW_UPDATE:
            inc = struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF
            if sid == 0:
                self.send_window += inc
            elif sid in self.stream_send_window:
                self.stream_send_window[sid] += inc
        elif ftype in (HEADERS, PUSH_PROMISE):
            if ftype == PUSH_PROMISE:
                raise Http2Error("PUSH_PROMISE although push is disabled")
            headers = self._header_block(ftype, flags, payload)  # decoded in any case: the table is shared
            if sid == stream_id:
                on_stream(HEADERS, flags, headers)
        elif ftype == DATA:
            data = self._unpad(flags, payload)
            self._give_back(sid if sid == stream_id and not flags & END_STREAM else None, len(payload))
            if sid == stream_id:
                on_stream(DATA, flags, data)
        elif ftype == RST_STREAM:
            if sid == stream_id:
                on_stream(RST_STREAM, flags, struct.unpack(">I", payload[:4])[0])
        # PRIORITY, CONTINUATION out of place and unknown types are ignored

    def _give_back(self, sid, n):
        """Count n received DATA bytes; WINDOW_UPDATE the connection (and stream sid, unless None)
        once half a window is used up (one update per DATA frame would flood the socket)."""
        updates = b""
        for s in (0, sid):
            if s is None:
                continue
            self.unacked[s] = self.unacked.get(s, 0) + n
            if self.unacked[s] >= self.recv_window // 2:
                updates += frame(WINDOW_UPDATE, 0, s, struct.pack(">I", self.unacked[s]))
                self.unacked[s] = 0
        if updates:
            self._send(updates)

    def _send_data(self, sid, data):
        """DATA frames of data (END_STREAM on the last) within the peer's windows and frame size."""
        pos = 0
        while True:
            chunk = min(len(data) - pos, self.peer_max_frame)
            if chunk and min(self.send_window, self.stream_send_window[sid]) <= 0:
                self.handle_frame(self.read_frame(), sid, self._early)
                continue
            chunk = min(chunk, self.send_window, self.stream_send_window[sid])
            last = pos + chunk >= len(data)
            self._send(frame(DATA, END_STREAM if last else 0, sid, data[pos:pos + chunk]))
            self.send_window -= chunk
            self.stream_send_window[sid] -= chunk
            pos += chunk
            if last:
                return

    def _early(self, ftype, flags, payload):
        """A response frame that arrived while we were still sending (kept for call())."""
        self._pending.append((ftype, flags, payload))

    def call(self, path, message, timeout=None, metadata=()):
        """Unary gRPC call of path ("/pkg.Service/Method") with serialized message; the response bytes."""
        if self.closed:
            raise Http2Error("connection closed")
        if self.goaway is not None:
            raise Http2Error("GOAWAY received: %s" % (self.goaway,))
        timeout = self.timeout if timeout is None else timeout
        self.deadline = time.monotonic() + timeout
        sid = self.next_stream
        self.next_stream += 2
        self.stream_send_window[sid] = self.peer_initial_window
        self._pending = []
        try:
            headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "localhost"),
                       ("content-type", "application/grpc"), ("te", "trailers"),
                       ("user-agent", "cc-oci-runtime-tests/cri.py"), ("grpc-timeout", grpc_timeout(timeout))]
            headers += list(metadata)
            block = encode_headers(headers)
            if len(block) > self.peer_max_frame:
                raise ValueError("request headers larger than one frame")
            self._send(frame(HEADERS, END_HEADERS, sid, block))
            self._send_data(sid, b"\x00" + struct.pack(">I", len(message)) + message)
            return self._response(sid, path)
        except (OSError, Http2Error, HpackError, ValueError):
            self.close()
            raise
        finally:
            self.stream_send_window.pop(sid, None)
            self.unacked.pop(sid, None)
            self.deadline = None

    def _response(self, sid, path):
        state = {"headers": None, "trailers": None, "data": bytearray(), "done": False, "reset": None}

        def on_stream(ftype, flags, payload):
            if ftype == HEADERS:
                if state["headers"] is None:
                    state["headers"] = dict(payload)
                    if flags & END_STREAM:  # trailers-only response
                        state["trailers"] = dict(payload)
                else:
                    state["trailers"] = dict(payload)
            elif ftype == DATA:
                state["data"] += payload
                if len(state["data"]) > MAX_MESSAGE + 5:
                    raise Http2Error("response over %d bytes" % MAX_MESSAGE)
            elif ftype == RST_STREAM:
                state["reset"] = payload
            if flags & END_STREAM or ftype == RST_STREAM:
                state["done"] = True

        for early in self._pending:
            on_stream(*early)
        while not state["done"]:
            self.handle_frame(self.read_frame(), sid, on_stream)
        if state["reset"] is not None:
            raise GrpcError(13 if state["reset"] != 8 else 1, "stream reset by the server (HTTP/2 error %d)"
                            % state["reset"], path)
        headers, trailers = state["headers"] or {}, state["trailers"] or {}
        if headers.get(":status", "200") != "200":
            raise GrpcError(2, "HTTP status %s" % headers.get(":status"), path)
        if "grpc-status" not in trailers:
            raise GrpcError(13, "response without grpc-status", path)
        code = int(trailers["grpc-status"])
        if code:
            raise GrpcError(code, urllib.parse.unquote(trailers.get("grpc-message", "")), path)
        data = bytes(state["data"])
        if len(data) < 5:
            raise GrpcError(13, "response without a message", path)
        if data[0]:
            raise GrpcError(13, "compressed response (none was offered)", path)
        n = struct.unpack(">I", data[1:5])[0]
        if len(data) != 5 + n:
            raise GrpcError(13, "response of %d bytes announced %d" % (len(data) - 5, n), path)
        return data[5:]


# ---------------------------------------------------------------------------
# CRI
# ---------------------------------------------------------------------------

class CriClient:
    """Friendly calls of CRI's RuntimeService and ImageService; dicts in, dicts out.

    Thread-safe (one call at a time on one connection, reconnecting after an error)."""

    def __init__(self, sock_path, timeout=60.0, api=None, recv_window=RECV_WINDOW):
        """api: "v1" or "v1alpha2"; by default v1 unless the server answers UNIMPLEMENTED.
        timeout: of each call (ExecSync and StopContainer add theirs). recv_window: see Connection."""
        self.sock_path, self.timeout, self.recv_window = str(sock_path), timeout, recv_window
        self.conn = None
        self.lock = threading.Lock()
        self.api = api

    def close(self):
        """Close the connection (a later call opens a new one)."""
        with self.lock:
            if self.conn:
                self.conn.close()
                self.conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call_raw(self, path, req_type, req, resp_type, timeout):
        with self.lock:
            if self.conn is None or self.conn.closed or self.conn.goaway is not None:
                if self.conn:
                    self.conn.close()
                self.conn = Connection(self.sock_path, min(self.timeout, timeout), self.recv_window)
            self.conn.timeout = timeout
            return decode(resp_type, self.conn.call(path, encode(req_type, req), timeout))

    def call(self, service, method, req, timeout=None):
        """Call runtime.<api>.<service>/<method> with dict req; the response dict."""
        timeout = self.timeout if timeout is None else timeout
        if self.api is None:
            try:
                self._call_raw("/runtime.v1.RuntimeService/Version", "VersionRequest", {"version": "v1"},
                               "VersionResponse", min(timeout, 30))
                self.api = "v1"
            except GrpcError as e:
                if e.code != 12:
                    raise
                self.api = "v1alpha2"
        return self._call_raw("/runtime.%s.%s/%s" % (self.api, service, method), method + "Request", req,
                              method + "Response", timeout)

    def _rt(self, method, req, timeout=None):
        return self.call("RuntimeService", method, req, timeout)

    # --- runtime
    def version(self):
        """VersionResponse: version, runtime_name, runtime_version, runtime_api_version."""
        return self._rt("Version", {"version": self.api or "v1"})

    def status(self):
        """RuntimeStatus conditions as {type: (status, reason, message)} (RuntimeReady, NetworkReady)."""
        st = self._rt("Status", {}).get("status", {})
        return {c["type"]: (c["status"], c["reason"], c["message"]) for c in st.get("conditions", [])}

    # --- pod sandboxes
    def run_pod_sandbox(self, config, runtime_handler=""):
        """RunPodSandbox; the new sandbox's id."""
        return self._rt("RunPodSandbox", {"config": config, "runtime_handler": runtime_handler})["pod_sandbox_id"]

    def pod_sandbox_status(self, sandbox_id):
        """PodSandboxStatus: id, metadata, state, created_at, network {ip}, linux, labels, ..."""
        return self._rt("PodSandboxStatus", {"pod_sandbox_id": sandbox_id})["status"]

    def pod_sandbox_info(self, sandbox_id):
        """The verbose info of PodSandboxStatus, JSON values parsed (containerd: pid, runtimeSpec, ...)."""
        return _parse_info(self._rt("PodSandboxStatus", {"pod_sandbox_id": sandbox_id, "verbose": True})["info"])

    def stop_pod_sandbox(self, sandbox_id):
        """StopPodSandbox: kill its containers and tear down its network."""
        self._rt("StopPodSandbox", {"pod_sandbox_id": sandbox_id})

    def remove_pod_sandbox(self, sandbox_id):
        """RemovePodSandbox (and its containers)."""
        self._rt("RemovePodSandbox", {"pod_sandbox_id": sandbox_id})

    def list_pod_sandbox(self, filter=None):
        """PodSandbox dicts, optionally filtered ({"id":..., "state": {"state": ...}, "label_selector": {}})."""
        return self._rt("ListPodSandbox", {"filter": filter} if filter else {})["items"]

    # --- containers
    def create_container(self, sandbox_id, config, sandbox_config):
        """CreateContainer in a sandbox (kubelet passes the sandbox's config again); the container id."""
        return self._rt("CreateContainer", {"pod_sandbox_id": sandbox_id, "config": config,
                                            "sandbox_config": sandbox_config})["container_id"]

    def start_container(self, container_id):
        """StartContainer."""
        self._rt("StartContainer", {"container_id": container_id})

    def container_status(self, container_id):
        """ContainerStatus: id, state, exit_code, reason, log_path, started_at, finished_at, ..."""
        return self._rt("ContainerStatus", {"container_id": container_id})["status"]

    def container_info(self, container_id):
        """The verbose info of ContainerStatus, JSON values parsed."""
        return _parse_info(self._rt("ContainerStatus", {"container_id": container_id, "verbose": True})["info"])

    def stop_container(self, container_id, timeout=0):
        """StopContainer: SIGTERM (the image's stop signal), SIGKILL after timeout seconds."""
        self._rt("StopContainer", {"container_id": container_id, "timeout": int(timeout)},
                 timeout=self.timeout + timeout)

    def remove_container(self, container_id):
        """RemoveContainer."""
        self._rt("RemoveContainer", {"container_id": container_id})

    def exec_sync(self, container_id, cmd, timeout=0):
        """ExecSync: (exit_code, stdout bytes, stderr bytes); timeout 0 = none (kubelet's probes set one)."""
        r = self._rt("ExecSync", {"container_id": container_id, "cmd": list(cmd), "timeout": int(timeout)},
                     timeout=self.timeout + timeout)
        return r["exit_code"], r["stdout"], r["stderr"]

    def update_container_resources(self, container_id, linux=None, annotations=None):
        """UpdateContainerResources with LinuxContainerResources linux (cpu_shares, memory_limit_in_bytes, ...)."""
        req = {"container_id": container_id}
        if linux is not None:
            req["linux"] = linux
        if annotations is not None:
            req["annotations"] = annotations
        self._rt("UpdateContainerResources", req)

    def list_containers(self, filter=None):
        """Container dicts, optionally filtered ({"pod_sandbox_id":..., "state": {"state": ...}, ...})."""
        return self._rt("ListContainers", {"filter": filter} if filter else {})["containers"]

    def container_stats(self, container_id):
        """ContainerStats: attributes, cpu, memory, writable_layer."""
        return self._rt("ContainerStats", {"container_id": container_id})["stats"]

    # --- images
    def list_images(self, image=None):
        """Image dicts (id, repo_tags, repo_digests, size, ...), optionally only those matching image."""
        return self.call("ImageService", "ListImages", {"filter": {"image": {"image": image}}} if image else {})[
            "images"]

    def image_status(self, image):
        """The Image dict of an image reference, or None if the runtime does not have it."""
        return self.call("ImageService", "ImageStatus", {"image": {"image": image}}).get("image")


def _parse_info(info):
    """Verbose info values are JSON text in containerd; parse those that are."""
    out = {}
    for k, v in info.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out
