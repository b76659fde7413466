"""Nested containers inside a VM, as Kuryr's nested (macvlan) mode does it, for a CNI inside the VM.

Each container gets its own Endpoint (`owner.type = "nested"`, `parent` = the VM's port, same host
and network), so it has its own address from Tether IPAM, its own labels and namespace for
NetworkPolicy, and its own DNS name; the address (with the container's MAC) is added to the VM
port's allowed address pairs so the VM's port may carry it; then a macvlan child of the VM's
interface is plugged into the container's namespace.
"""

from __future__ import annotations

from tether.calc.names import random_neutron_mac
from tether.client import ApiError, TetherClient
from tether.dataplane.macvlan import plug_macvlan
from tether.model import AddressPair, Endpoint, Owner


def add_nested(client: TetherClient, *, vm_port_id: str, name: str, vm_netns: str, netns: str,
               namespace: str = "default", labels: dict[str, str] | None = None, ifname: str = "eth0") -> Endpoint:
    vm = client.get("Endpoint", vm_port_id)
    assert isinstance(vm, Endpoint)
    if vm.owner.type != "vm" or not vm.host:
        raise ValueError(f"port {vm_port_id} is not a VM port bound to a host; bind it first (binding:host_id)")
    mac = random_neutron_mac()
    ep = client.create_endpoint(Endpoint(
        name=name, network=vm.network, host=vm.host, namespace=namespace, labels=labels or {}, mac=mac,
        owner=Owner(type="nested", netns=netns, ifname=ifname, device_id=vm.id), parent=vm.id))
    try:
        pairs = [*vm.allowed_address_pairs, *(AddressPair(ip_address=ip, mac_address=mac) for ip in ep.ips)]
        client.request("PATCH", f"/api/v1/endpoints/{vm.id}",
                       json={"allowed_address_pairs": [p.model_dump() for p in pairs]})
        plug_macvlan(vm_netns=vm_netns, parent_if=vm.owner.ifname or "eth0", netns=netns, ifname=ifname,
                     ips=list(ep.ips), mac=mac)
    except Exception:
        remove_nested(client, ep.id)
        raise
    return ep


def remove_nested(client: TetherClient, ep_id: str) -> None:
    """Delete the nested endpoint and its address pairs (the macvlan goes with the container's netns)."""
    try:
        ep = client.get("Endpoint", ep_id)
    except ApiError as e:
        if e.status == 404:
            return
        raise
    assert isinstance(ep, Endpoint)
    if ep.parent:
        try:
            vm = client.get("Endpoint", ep.parent)
            assert isinstance(vm, Endpoint)
            pairs = [p for p in vm.allowed_address_pairs if p.ip_address not in ep.ips]
            client.request("PATCH", f"/api/v1/endpoints/{vm.id}",
                           json={"allowed_address_pairs": [p.model_dump() for p in pairs]})
        except ApiError as e:
            if e.status != 404:
                raise
    client.delete("Endpoint", ep.id)
