"""The Docker front end: libnetwork remote network and IPAM driver over a plugin socket."""
