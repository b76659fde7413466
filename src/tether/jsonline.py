"""One JSON request and one JSON answer, each a line, over a unix socket: how `tether flows` talks to
an agent's flow log and how the lab's prober is driven."""

from __future__ import annotations

import json
import socket
from typing import Any


def request(path: str, message: dict[str, Any], timeout: float, if_closed: Any = None) -> Any:
    """The answer; `if_closed` when the peer closes without one (None: that is an error)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall((json.dumps(message) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data and if_closed is not None:
        return if_closed
    return json.loads(data)


def query_flows(path: str, limit: int = 50, denied: bool = True) -> list[dict[str, Any]]:
    """Ask one agent's flows socket (`tether.agent.flowlog`) for its recent records (`tether flows`)."""
    return request(path, {"cmd": "flows", "limit": limit, "denied": denied}, 5, if_closed=[])
