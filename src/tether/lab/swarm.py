"""Docker Swarm over Tether: the managed plugin Swarm needs, and a swarm of the lab's dockerds.

Why a managed plugin: Swarm refuses a plugin found by its socket in /run/docker/plugins ("legacy
plugin tether of type NetworkDriver is not supported in swarm mode"); it takes only plugins that
dockerd runs itself (`docker plugin create NAME DIR`, a config.json and a rootfs). Tether's driver
stays in the agent: the plugin's rootfs holds only `socat`, which forwards the plugin socket to the
agent's Swarm socket (`$TETHER_DOCKER_SWARM_SOCKET`, default /run/tether/docker-swarm/tether.sock),
whose directory the plugin bind-mounts (`docker plugin set tether-swarm agent.source=DIR`). The
plugin runs in the host's network namespace, as the driver must (it creates the veths there).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PLUGIN = "tether-swarm"
DRIVER = "tether-swarm:latest"  # the name Swarm's allocator knows the plugin's driver by
SOCAT = "/usr/bin/socat"
AGENT_DIR = "/run/tether/docker-swarm"
DATA_PATH_PORT = 4790  # Swarm's VXLAN port, away from Tether's 4789 (see lab_swarm)


def plugin_config(agent_dir: str = AGENT_DIR) -> dict:
    """The managed plugin's config.json: a network driver (Swarm allocates the addresses itself, so
    no IPAM), host networking, and the agent's socket directory mounted at /agent."""
    return {
        "description": "Tether network driver for Docker Swarm (forwards to the host's tether agent)",
        "documentation": "Tether docs/RUNTIMES.md, Docker Swarm",
        "entrypoint": ["/bin/socat", "UNIX-LISTEN:/run/docker/plugins/tether.sock,fork,unlink-early",
                       "UNIX-CONNECT:/agent/tether.sock"],
        "interface": {"types": ["docker.networkdriver/1.0"], "socket": "tether.sock"},
        "network": {"type": "host"},
        "mounts": [{"name": "agent", "description": "the directory of the agent's Swarm socket",
                    "source": agent_dir, "destination": "/agent", "type": "bind", "options": ["rbind", "rw"],
                    "settable": ["source"]}],
    }


def build_plugin(dest: str | Path, agent_dir: str = AGENT_DIR) -> Path:
    """The plugin directory `docker plugin create` takes: config.json and a rootfs with socat and the
    shared libraries it loads (copied from this machine, as `ldd` lists them)."""
    dest = Path(dest)
    if not os.path.exists(SOCAT):
        raise RuntimeError(f"{SOCAT} is missing (Debian's socat; scripts/install-deps installs it)")
    rootfs = dest / "rootfs"
    for d in ("bin", "agent", "run/docker/plugins", "tmp"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(SOCAT, rootfs / "bin" / "socat")
    ldd = subprocess.run(["ldd", SOCAT], capture_output=True, text=True, check=True).stdout
    for lib in re.findall(r"(/\S+\.so[.\d]*)", ldd):
        target = rootfs / lib.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(lib, target)  # follows the symlink: the file under the name the loader asks for
    (dest / "config.json").write_text(json.dumps(plugin_config(agent_dir), indent=1))
    return dest


def install_plugin(d, plugin_dir: str | Path, agent_dir: str) -> None:
    """Create, point at this host's agent, and enable the plugin in dockerd `d` (a tether.lab.dockerd.Dockerd)."""
    if PLUGIN not in d.docker("plugin", "ls", "--format", "{{.Name}}").stdout.replace(":latest", "").split():
        d.docker("plugin", "create", PLUGIN, str(plugin_dir))
    d.docker("plugin", "set", PLUGIN, f"agent.source={agent_dir}", check=False)  # refused while enabled
    d.docker("plugin", "enable", PLUGIN, check=False)  # already enabled: fine
    enabled = d.docker("plugin", "inspect", "-f", "{{.Enabled}}", PLUGIN).stdout.strip()
    if enabled != "true":
        raise RuntimeError(f"the {PLUGIN} plugin is not enabled in dockerd {d.host_url}")


def lab_swarm(lab, dockerds: list, progress=print) -> None:
    """`tether lab up --swarm`: the plugin in every host's dockerd, `docker swarm init` on the first
    (the manager, advertising its underlay address), `docker swarm join` on the others."""
    plugin_dir = build_plugin(Path(lab.dir) / "swarm-plugin")
    hosts = [h.name for h in lab.state.hosts]
    for host, d in zip(hosts, dockerds, strict=True):
        install_plugin(d, plugin_dir, lab.docker_swarm_dir(host))
    manager = lab.host(hosts[0])
    first = dockerds[0]
    if first.docker("info", "-f", "{{.Swarm.LocalNodeState}}").stdout.strip() != "active":
        # Swarm's own overlays (its ingress network) take VXLAN id 4096 from 4096 up, Tether's id, in the
        # host's namespace: on the default UDP port 4789 the second of the two gets EEXIST from the kernel
        first.docker("swarm", "init", "--advertise-addr", manager.ip, "--data-path-port", str(DATA_PATH_PORT))
    token = first.docker("swarm", "join-token", "-q", "worker").stdout.strip()
    for host, d in zip(hosts[1:], dockerds[1:], strict=True):
        if d.docker("info", "-f", "{{.Swarm.LocalNodeState}}").stdout.strip() != "active":
            d.docker("swarm", "join", "--advertise-addr", lab.host(host).ip, "--token", token,
                     f"{manager.ip}:2377")
    progress(f"swarm: manager {hosts[0]}, workers {', '.join(hosts[1:]) or 'none'}; network driver {DRIVER}")


def main(argv: list[str] | None = None) -> int:
    """`python3 -m tether.lab.swarm build DIR [--agent-dir D]`: the plugin directory for a real host."""
    import argparse

    ap = argparse.ArgumentParser(prog="python3 -m tether.lab.swarm",
                                 description="Build the tether-swarm managed plugin (then: docker plugin create "
                                             "tether-swarm DIR && docker plugin enable tether-swarm).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write config.json and a rootfs with socat into DIR")
    b.add_argument("dir")
    b.add_argument("--agent-dir", default=AGENT_DIR,
                   help="directory of the agent's Swarm socket (TETHER_DOCKER_SWARM_SOCKET's directory)")
    args = ap.parse_args(argv)
    try:
        out = build_plugin(args.dir, args.agent_dir)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"plugin in {out}: docker plugin create {PLUGIN} {out} && docker plugin enable {PLUGIN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
