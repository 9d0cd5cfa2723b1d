"""cri.py without containerd: protobuf codec, HPACK and Huffman (RFC 7541 Appendix C), and
HTTP/2 + gRPC framing against a fake server on a unix socket."""
import os
import socket
import struct
import threading
import time

import pytest

import cri

# ---------------------------------------------------------------------------
# protobuf
# ---------------------------------------------------------------------------


def test_protobuf_scalars_match_the_reference_encoding():
    assert cri.encode_varint(150) == b"\x96\x01" and cri.decode_varint(b"\x96\x01", 0) == (150, 2)
    assert cri.encode("VersionRequest", {"version": "testing"}) == b"\x0a\x07testing"
    assert cri.encode("StopContainerRequest", {"container_id": "c", "timeout": 150}) == b"\x0a\x01c\x10\x96\x01"
    minus_one = cri.encode("ExecSyncResponse", {"exit_code": -1})
    assert minus_one == b"\x18" + b"\xff" * 9 + b"\x01"  # int32 -1: sign-extended to 10 bytes
    assert cri.decode("ExecSyncResponse", minus_one) == {"stdout": b"", "stderr": b"", "exit_code": -1}
    assert cri.encode("ContainerStatus", {"state": "CONTAINER_EXITED"}) == b"\x18\x02"


def test_protobuf_round_trip_nested_repeated_maps_enums():
    config = {"metadata": {"name": "p", "uid": "u-1", "namespace": "ns", "attempt": 3},
              "hostname": "h", "labels": {"a": "1", "b": ""}, "annotations": {"x/y": "z"},
              "dns_config": {"servers": ["1.2.3.4", "5.6.7.8"], "searches": [], "options": ["ndots:5"]},
              "port_mappings": [{"protocol": "UDP", "container_port": 53, "host_port": 0, "host_ip": ""}],
              "linux": {"cgroup_parent": "/kubepods", "sysctls": {},
                        "security_context": {"namespace_options": {"network": "NODE", "pid": "CONTAINER"},
                                             "supplemental_groups": [1, 2, 300000], "privileged": True,
                                             "seccomp": {"profile_type": "RuntimeDefault"},
                                             "run_as_user": {"value": -5}}}}
    data = cri.encode("PodSandboxConfig", config)
    back = cri.decode("PodSandboxConfig", data)
    assert back["metadata"] == config["metadata"] and back["labels"] == config["labels"]
    assert back["dns_config"]["servers"] == ["1.2.3.4", "5.6.7.8"] and back["dns_config"]["options"] == ["ndots:5"]
    assert back["port_mappings"] == config["port_mappings"]
    sc = back["linux"]["security_context"]
    assert sc["namespace_options"] == {"network": "NODE", "pid": "CONTAINER", "ipc": "POD", "target_id": ""}
    assert sc["supplemental_groups"] == [1, 2, 300000] and sc["privileged"] is True
    assert sc["run_as_user"] == {"value": -5} and sc["seccomp"]["profile_type"] == "RuntimeDefault"
    assert "windows" not in back and "overhead" not in back["linux"]  # absent messages stay absent
    # packed (what Go sends) and unpacked repeated numbers both decode
    packed = b"\x2a\x03\x01\x02\x03"
    unpacked = b"\x28\x01\x28\x02\x28\x03"
    assert cri.decode("LinuxSandboxSecurityContext", packed)["supplemental_groups"] == [1, 2, 3]
    assert cri.decode("LinuxSandboxSecurityContext", unpacked)["supplemental_groups"] == [1, 2, 3]


def test_protobuf_skips_unknown_fields_and_rejects_unknown_keys():
    data = (b"\x0a\x02id" + b"\xa8\x1f\x07" + b"\xb2\x1f\x03abc" + b"\xbd\x1f\x01\x02\x03\x04"
            + b"\xb9\x1f" + b"\x00" * 8 + b"\x38\x2a")  # fields 501-503 of every wire type, then exit_code
    st = cri.decode("ContainerStatus", data)
    assert st["id"] == "id" and st["exit_code"] == 42 and st["state"] == "CONTAINER_CREATED"
    with pytest.raises(KeyError):
        cri.encode("ContainerConfig", {"comand": ["x"]})
    with pytest.raises(TypeError):
        cri.encode("ContainerConfig", {"command": "sh -c x"})
    with pytest.raises(ValueError):
        cri.encode("PortMapping", {"protocol": "TCPX"})


# ---------------------------------------------------------------------------
# HPACK (RFC 7541 Appendix C) and Huffman
# ---------------------------------------------------------------------------

REQ = [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com")]
REQ2 = REQ + [("cache-control", "no-cache")]
REQ3 = [(":method", "GET"), (":scheme", "https"), (":path", "/index.html"), (":authority", "www.example.com"),
        ("custom-key", "custom-value")]
RESP1 = [(":status", "302"), ("cache-control", "private"), ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
         ("location", "https://www.example.com")]
RESP2 = [(":status", "307")] + RESP1[1:]
RESP3 = [(":status", "200"), ("cache-control", "private"), ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
         ("location", "https://www.example.com"), ("content-encoding", "gzip"),
         ("set-cookie", "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1")]

RFC7541_C = {  # appendix: (table size, [(wire hex, headers, dynamic table size after)])
    "C.3 requests": (4096, [
        ("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d", REQ, 57),
        ("8286 84be 5808 6e6f 2d63 6163 6865", REQ2, 110),
        ("8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65", REQ3, 164)]),
    "C.4 requests, Huffman": (4096, [
        ("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff", REQ, 57),
        ("8286 84be 5886 a8eb 1064 9cbf", REQ2, 110),
        ("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf", REQ3, 164)]),
    "C.5 responses, evictions": (256, [
        ("4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a"
         "3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d", RESP1, 222),
        ("4803 3330 37c1 c0bf", RESP2, 222),
        ("88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d 54c0 5a04"
         "677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 5541 5851 5745 4f49"
         "553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e 3d31", RESP3, 215)]),
    "C.6 responses, Huffman, evictions": (256, [
        ("4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e"
         "919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3", RESP1, 222),
        ("4883 640e ffc1 c0bf", RESP2, 222),
        ("88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad 94e7"
         "821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed"
         "4ee5 b106 3d50 07", RESP3, 215)]),
}


@pytest.mark.parametrize("appendix", sorted(RFC7541_C))
def test_hpack_decodes_rfc7541_examples(appendix):
    size, blocks = RFC7541_C[appendix]
    dec = cri.HpackDecoder(size)
    for wire, headers, table_size in blocks:
        assert dec.decode(bytes.fromhex(wire.replace(" ", ""))) == headers
        assert dec.size == table_size
    if size == 256:  # C.5.3 / C.6.3: what the third response left in the table
        assert dec.table == [RESP3[5], RESP3[4], RESP3[2]]


def test_huffman_codes_and_strings():
    # codes as listed in RFC 7541 Appendix B
    assert cri.HUFFMAN_CODES[ord("0")] == (0x0, 5) and cri.HUFFMAN_CODES[ord(" ")] == (0x14, 6)
    assert cri.HUFFMAN_CODES[0] == (0x1ff8, 13) and cri.HUFFMAN_CODES[ord("~")] == (0x1ffd, 13)
    assert cri.HUFFMAN_CODES[255] == (0x3ffffee, 26) and cri.HUFFMAN_CODES[256] == (0x3fffffff, 30)
    assert cri.huffman_encode(b"www.example.com") == bytes.fromhex("f1e3c2e5f23a6ba0ab90f4ff")
    assert cri.huffman_decode(bytes.fromhex("f1e3c2e5f23a6ba0ab90f4ff")) == b"www.example.com"
    for data in (bytes(range(256)), b"", b"grpc-status", os.urandom(300)):
        assert cri.huffman_decode(cri.huffman_encode(data)) == data
    for bad in (b"\xff\xff\xff\xff",  # EOS
                b"\x1f\xff",  # "a" and 11 bits of padding
                b"\x00"):  # padding of zeros
        with pytest.raises(cri.HpackError):
            cri.huffman_decode(bad)


def test_hpack_integers_size_updates_and_errors():
    assert cri.encode_int(10, 5) == b"\x0a" and cri.encode_int(1337, 5) == b"\x1f\x9a\x0a"  # RFC 7541 C.1
    assert cri.decode_int(b"\x1f\x9a\x0a", 0, 5) == (1337, 3)
    dec = cri.HpackDecoder()
    dec.decode(bytes.fromhex("4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf".replace(" ", "")))
    assert dec.lookup(62) == ("custom-key", "custom-value")
    assert dec.decode(b"\x20") == []  # size 0 empties the table ...
    assert dec.table == [] and dec.size == 0 and dec.max_size == 0
    with pytest.raises(cri.HpackError):
        dec.decode(b"\xbe")  # ... so index 62 is gone
    with pytest.raises(cri.HpackError):
        dec.decode(b"\x82\x20")  # size update after a field
    with pytest.raises(cri.HpackError):
        cri.HpackDecoder(4096).decode(b"\x3f\xe2\x1f")  # 4096 + 1 is above what we announced
    plain = cri.encode_headers([("grpc-timeout", "5S"), (":path", "/a/b")])
    assert cri.HpackDecoder().decode(plain) == [("grpc-timeout", "5S"), (":path", "/a/b")]


# ---------------------------------------------------------------------------
# HTTP/2 + gRPC against a fake server
# ---------------------------------------------------------------------------

def _fake_server(path, responses, log):
    """Serve one connection on unix socket path: each request gets the next of responses.

    A response is (grpc status, message, payload bytes); the server sends SETTINGS and a PING
    first, Huffman-coded and indexed headers, the payload in 1000-byte DATA frames, and
    checks that the client acknowledged and replenished what it should (into log)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def lit_indexed(name, value):  # literal with incremental indexing, new name, Huffman
        n, v = cri.huffman_encode(name.encode()), cri.huffman_encode(value.encode())
        return b"\x40" + cri.encode_int(len(n), 7, 0x80) + n + cri.encode_int(len(v), 7, 0x80) + v

    def serve():
        conn, _ = srv.accept()
        conn.settimeout(10)
        buf = bytearray()

        def read_frame():
            while len(buf) < 9 or len(buf) < 9 + int.from_bytes(buf[:3], "big"):
                chunk = conn.recv(65536)
                if not chunk:
                    return None
                buf.extend(chunk)
            n = int.from_bytes(buf[:3], "big")
            f = (buf[3], buf[4], int.from_bytes(buf[5:9], "big"), bytes(buf[9:9 + n]))
            del buf[:9 + n]
            return f

        with conn:
            while len(buf) < len(cri.PREFACE):
                buf.extend(conn.recv(65536))
            assert bytes(buf[:len(cri.PREFACE)]) == cri.PREFACE
            del buf[:len(cri.PREFACE)]
            conn.sendall(cri.frame(cri.SETTINGS, 0, 0, struct.pack(">HI", cri.S_MAX_FRAME_SIZE, 16384))
                         + cri.frame(cri.PING, 0, 0, b"12345678"))
            dec = cri.HpackDecoder()
            first = True
            for status, message, payload in responses:
                req_headers, req_data = None, bytearray()
                while True:
                    f = read_frame()
                    if f is None:
                        return
                    ftype, flags, sid, data = f
                    log.append((ftype, flags, sid, data))
                    if ftype == cri.HEADERS:
                        req_headers = dict(dec.decode(data))
                    elif ftype == cri.DATA:
                        req_data += data
                        if flags & cri.END_STREAM:
                            break
                log.append(("request", req_headers, bytes(req_data)))
                head = (lit_indexed(":status", "200") + lit_indexed("content-type", "application/grpc")
                        if first else b"\xbf\xbe")  # the second time from the dynamic table
                first = False
                conn.sendall(cri.frame(cri.HEADERS, cri.END_HEADERS, sid, head))
                body = b"\x00" + struct.pack(">I", len(payload)) + payload if status == 0 else b""
                for i in range(0, len(body), 1000):
                    conn.sendall(cri.frame(cri.DATA, 0, sid, body[i:i + 1000]))
                trailers = lit_indexed("grpc-status", str(status)) + lit_indexed("grpc-message", message)
                conn.sendall(cri.frame(cri.HEADERS, cri.END_HEADERS | cri.END_STREAM, sid, trailers))
            conn.sendall(cri.frame(cri.GOAWAY, 0, 0, struct.pack(">II", 0, 0) + b"bye"))
            while read_frame() is not None:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


def test_grpc_over_http2_against_a_fake_server(tmp_path):
    path = str(tmp_path / "s")
    big = cri.encode("ExecSyncResponse", {"stdout": b"x" * 200000, "exit_code": 3})
    log = []
    srv, t = _fake_server(path, [(0, "", big), (5, "not found: pod %22p%22", b""),
                                 (0, "", cri.encode("VersionResponse", {"version": "0.1.0"}))], log)
    try:
        conn = cri.Connection(path, timeout=10, recv_window=65535)
        resp = cri.decode("ExecSyncResponse", conn.call("/runtime.v1.RuntimeService/ExecSync",
                                                        cri.encode("ExecSyncRequest", {"cmd": ["true"]})))
        assert resp["exit_code"] == 3 and resp["stdout"] == b"x" * 200000
        with pytest.raises(cri.GrpcError) as e:
            conn.call("/runtime.v1.RuntimeService/PodSandboxStatus", b"")
        assert e.value.code == 5 and e.value.code_name == "NOT_FOUND" and e.value.message == 'not found: pod "p"'
        assert cri.decode("VersionResponse", conn.call("/x.Y/Version", b""))["version"] == "0.1.0"
        with pytest.raises(cri.Http2Error):  # after GOAWAY
            conn.call("/x.Y/Version", b"")
        conn.close()
    finally:
        srv.close()
        t.join(10)
    requests = [e for e in log if e[0] == "request"]
    assert [r[1][":path"] for r in requests] == ["/runtime.v1.RuntimeService/ExecSync",
                                                 "/runtime.v1.RuntimeService/PodSandboxStatus", "/x.Y/Version"]
    assert requests[0][1]["content-type"] == "application/grpc" and requests[0][1]["te"] == "trailers"
    assert requests[0][2] == b"\x00\x00\x00\x00\x06\x12\x04true"
    frames = [e for e in log if e[0] != "request"]
    assert (cri.SETTINGS, cri.ACK, 0, b"") in frames
    assert (cri.PING, cri.ACK, 0, b"12345678") in frames
    conn_updates = sum(struct.unpack(">I", d)[0] for ty, _, sid, d in frames if ty == cri.WINDOW_UPDATE and sid == 0)
    # what the client received, given back in steps of half its 64 KiB window
    assert len(big) + 5 - 65535 // 2 <= conn_updates <= len(big) + 5


def test_a_call_that_times_out_closes_the_connection(tmp_path):
    path = str(tmp_path / "s")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    try:
        conn = cri.Connection(path, timeout=5)
        t = time.monotonic()
        with pytest.raises(OSError):  # socket.timeout: the server never answers
            conn.call("/x.Y/Z", b"", timeout=0.3)
        assert time.monotonic() - t < 3 and conn.closed
    finally:
        srv.close()
