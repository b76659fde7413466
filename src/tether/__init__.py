"""Tether: a small container networking system.

Kept free of imports: the CNI plugin and the CLI must start fast.
"""

__version__ = "0.1.0"
