"""Where the CLI finds its server and token: flags, then environment, then config file, then the
local server's defaults (its unix socket and its token file), so a local setup needs no configuration."""

from __future__ import annotations

import os
from dataclasses import dataclass

CONFIG_PATH = os.path.expanduser("~/.config/tether/config.yaml")
LOCAL_SOCKET = "/run/tether/server.sock"
LOCAL_TCP = "http://127.0.0.1:7443"
LOCAL_TOKEN = "/var/lib/tether/token"


@dataclass
class Settings:
    server: str
    token: str | None


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
    return Settings(server, token)
