"""Where the CLI finds its server, token and CA: flags, then environment, then config file, then the
local server's defaults (its unix socket, its token file, its ca.crt), so a local setup needs no
configuration. The config file (YAML) takes `server` (one URL or `a,b,c`), `token` or `token_file`,
and `ca_file` (the cluster CA that HTTPS servers are verified against)."""

from __future__ import annotations

import os
from dataclasses import dataclass

CONFIG_PATH = os.path.expanduser("~/.config/tether/config.yaml")
LOCAL_SOCKET = "/run/tether/server.sock"
LOCAL_TCP = "http://127.0.0.1:7443"
LOCAL_TOKEN = "/var/lib/tether/token"
LOCAL_CA = "/var/lib/tether/ca.crt"
ca_file_flag: str | None = None  # the global `tether --ca-file` option


@dataclass
class Settings:
    server: str
    token: str | None
    ca_file: str | None = None


def read_config(path: str = CONFIG_PATH) -> dict:
    if not os.path.exists(path):
        return {}
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    return data if isinstance(data, dict) else {}


def resolve(server: str | None, token: str | None, config_path: str = CONFIG_PATH) -> Settings:
    cfg = read_config(config_path)
    server = server or os.environ.get("TETHER_SERVER") or cfg.get("server")
    if isinstance(server, list):  # `server: [https://a:7443, https://b:7443]` in the config file
        server = ",".join(str(s) for s in server)
    token = token or os.environ.get("TETHER_TOKEN") or cfg.get("token")
    if not server:
        server = f"unix://{LOCAL_SOCKET}" if os.path.exists(LOCAL_SOCKET) else LOCAL_TCP
    if not token:
        token_file = cfg.get("token_file") or os.environ.get("TETHER_TOKEN_FILE") or LOCAL_TOKEN
        try:
            with open(token_file) as f:
                token = f.read().strip() or None
        except OSError:
            token = None
    ca_file = ca_file_flag or os.environ.get("TETHER_CA_FILE") or cfg.get("ca_file")
    if not ca_file and "https://" in server and os.path.exists(LOCAL_CA):
        ca_file = LOCAL_CA
    return Settings(server, token, ca_file)
