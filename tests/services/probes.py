"""Small programs run inside lab namespaces: a TCP/UDP server that answers with its name, and a
client that opens many new connections and counts who answered. Started with `ip netns exec`, so
every byte is a real packet between namespaces."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SERVER = r'''
import socket, sys, threading
name, port = sys.argv[1], int(sys.argv[2])
def sock(family, kind, addr):
    s = socket.socket(family, kind); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port))
    return s
def tcp(family=socket.AF_INET, addr="0.0.0.0"):
    s = sock(family, socket.SOCK_STREAM, addr); s.listen(1024)
    while True:
        c, a = s.accept()
        try:
            c.sendall(f"{name} {a[0]}\n".encode())
        except OSError:
            pass
        c.close()
def udp(family=socket.AF_INET, addr="0.0.0.0"):
    u = sock(family, socket.SOCK_DGRAM, addr)
    while True:
        d, a = u.recvfrom(2048)
        u.sendto(f"{name} {a[0]}\n".encode(), a)
threading.Thread(target=udp, daemon=True).start()
if socket.has_ipv6:  # IPv6 beside IPv4 (a pod without an IPv6 address still binds ::)
    threading.Thread(target=udp, args=(socket.AF_INET6, "::"), daemon=True).start()
    threading.Thread(target=tcp, args=(socket.AF_INET6, "::"), daemon=True).start()
tcp()
'''

CLIENT = r'''
import json, socket, sys, time
ip, port, n, proto = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
interval = float(sys.argv[5]) if len(sys.argv) > 5 else 0
counts, failures, errors = {}, 0, []
def one(i):
    global failures
    try:
        if proto == "udp":
            s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
            s.sendto(b"hi", (ip, port)); data = s.recv(200)
        else:
            s = socket.create_connection((ip, port), timeout=3); s.settimeout(3)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(200)
                if not chunk:
                    break
                data += chunk
        s.close()
        who = data.decode().split()[0]
        counts[who] = counts.get(who, 0) + 1
    except OSError as e:
        failures += 1
        if len(errors) < 5:
            errors.append(f"{i}: {e}")
try:
    for i in range(n):
        one(i)
        if interval:
            time.sleep(interval)
except KeyboardInterrupt:
    pass  # the caller ends a traffic run with SIGINT; an interrupted attempt is not a failure
print(json.dumps({"counts": counts, "failures": failures, "errors": errors}))
'''


def start_server(ns: str, name: str, port: int) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, name, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def connect_many(ns: str, ip: str, port: int, n: int, proto: str = "tcp", interval: float = 0,
                 timeout: float = 300) -> dict:
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, ip, str(port), str(n), proto,
                        str(interval)], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"client failed: {r.stderr}")
    return json.loads(r.stdout)


def start_client(ns: str, ip: str, port: int, n: int, interval: float = 0) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, ip, str(port), str(n), "tcp",
                             str(interval)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.kill(p.pid, 15)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, 9)
            p.wait()
