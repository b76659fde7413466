"""The CNI front end: the agent's socket that the `tether-cni` plugin talks to."""
