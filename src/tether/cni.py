"""tether-cni: the CNI plugin executable. It forwards the request to the agent on this host.

Start-up is most of a CNI call's cost, so this file imports only `sys`, `posix` (both already
loaded when Python starts) and `_socket` (even `os` costs 1.4 ms here), and is installed to run
as `python3 -I -S` under the base interpreter, not a virtualenv's (2-3 ms slower to start). It
passes the CNI_* environment and stdin to the agent's unix socket as raw bytes and prints what the
agent answers; the agent parses and validates.

Framing (docs/ARCHITECTURE.md): request = u32 length + "KEY=VALUE\\0..." environment, u32 length +
stdin; reply = u32 exit code + stdout bytes until the agent closes the connection.
"""

import _socket
import posix
import sys

DEFAULT_SOCKET = "/run/tether/cni.sock"
VERSIONS = b'["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]'


def _string_after(data, key):
    """The JSON string value of `key` in `data`, found without a JSON parser (None if absent)."""
    i = data.find(b'"' + key + b'"')
    if i < 0:
        return None
    i = data.find(b":", i + len(key) + 2)
    if i < 0:
        return None
    j = i + 1
    while j < len(data) and data[j] in b" \t\r\n":
        j += 1
    if j >= len(data) or data[j] != 34:  # '"'
        return None
    k = data.find(b'"', j + 1)
    return data[j + 1:k] if k > 0 else None


def _quote(s):
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def _error(version, code, msg):
    return f'{{"cniVersion": "{version}", "code": {code}, "msg": "{_quote(msg)}"}}'.encode()


def _recv_all(sock):
    chunks = []
    while True:
        b = sock.recv(65536)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def run(environ, stdin):
    """Return (exit code, stdout bytes) for one CNI invocation."""
    version = (_string_after(stdin, b"cniVersion") or b"1.1.0").decode("ascii", "replace")
    if not version or version.strip("0123456789.") or len(version) > 16:
        version = "1.1.0"  # not a CNI version (a quote or backslash in it would break our JSON): the latest
    command = environ.get("CNI_COMMAND", "")
    if command == "VERSION":
        return 0, b'{"cniVersion": "%s", "supportedVersions": %s}' % (version.encode(), VERSIONS)
    path = environ.get("TETHER_CNI_SOCKET")
    if not path:
        found = _string_after(stdin, b"agent_socket")
        path = found.decode() if found else DEFAULT_SOCKET
    env = b"".join((f"{k}={v}\0").encode("utf-8", "surrogateescape")  # the runtime's bytes, as they came
                   for k, v in environ.items() if k.startswith(("CNI_", "TETHER_")))
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(120)
    try:
        try:
            sock.connect(path)
        except OSError as e:
            # STATUS answers "plugin not available" (50); other commands can succeed later (11)
            return 1, _error(version, 50 if command == "STATUS" else 11,
                             "try again later: the Tether agent on this host is not running "
                             f"(socket {path}: {e.strerror or e}); start it with `tether agent`")
        try:
            sock.sendall(len(env).to_bytes(4, "big") + env + len(stdin).to_bytes(4, "big") + stdin)
            sock.shutdown(_socket.SHUT_WR)
            reply = _recv_all(sock)
        except OSError as e:
            return 1, _error(version, 11, f"try again later: lost the connection to the Tether agent ({e})")
    finally:
        sock.close()
    if len(reply) < 4:
        return 1, _error(version, 11, "try again later: the Tether agent closed the connection without an answer")
    return int.from_bytes(reply[:4], "big"), reply[4:]


def main():
    stdin = sys.stdin.buffer.read() if not sys.stdin.isatty() else b""
    environ = {k.decode(): v.decode("utf-8", "surrogateescape") for k, v in posix.environ.items()
               if k.startswith((b"CNI_", b"TETHER_"))}
    code, out = run(environ, stdin)
    if out:
        sys.stdout.buffer.write(out)
        sys.stdout.buffer.flush()
    sys.exit(code)


def plugin_interpreter():
    """The interpreter the installed plugin runs with: the one below this (virtualenv's) Python, or
    Debian's own python3 (statically linked, the fastest to start) when it is the same version."""
    import os

    base = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    system = "/usr/bin/python3"
    same = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    if os.access(system, os.X_OK) and os.path.realpath(system).endswith(same):
        return system
    return base


def install(bin_dir, name="tether"):
    """Copy this file to `<bin_dir>/<name>` as a `python3 -I -S` script; runtimes exec it by type name."""
    import os

    target = os.path.join(bin_dir, name)
    os.makedirs(bin_dir, exist_ok=True)
    with open(__file__, "rb") as f:
        body = f.read()
    if body.startswith(b"#!"):
        body = body.split(b"\n", 1)[1]
    tmp = target + ".tmp"
    with open(tmp, "wb") as f:
        f.write(b"#!" + plugin_interpreter().encode() + b" -IS\n" + body)  # one shebang argument
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
    return target


if __name__ == "__main__":
    main()
