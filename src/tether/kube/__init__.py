"""Kubernetes integration: `tether kube` mirrors a cluster into Tether (see docs/KUBERNETES.md)."""
