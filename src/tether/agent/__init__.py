"""The agent: one per host (`python -m tether.agent.main`).

Importing this package keeps two libraries' imports to what the agent uses, since an agent's
memory is mostly what it imported (issue 29: 120 MB at 10,000 endpoints; an empty agent was
73 MB): `import pyroute2` imports every part of pyroute2 (NDB, IPDB, ethtool, wireless, ...: 7 MB
the agent never uses), and `import httpx` imports its command-line client (rich, click, pygments:
5.6 MB). Both still work in full for any code that asks for them.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def _lazy_package(name: str) -> None:
    """Register package `name` without running its `__init__`: its submodules import alone
    (`from pyroute2.iproute import IPRoute`), and the first other attribute read (`pyroute2.NDB`)
    runs the `__init__` as `import pyroute2` would have."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not installed (or not a package): the import fails where it is used, as before
    module = importlib.util.module_from_spec(spec)

    def whole(attr: str) -> types.ModuleType:
        if attr.startswith("__"):
            raise AttributeError(attr)
        if importlib.util.find_spec(f"{name}.{attr}") is not None:
            return importlib.import_module(f"{name}.{attr}")
        del module.__getattr__  # type: ignore[attr-defined]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return getattr(module, attr)

    module.__getattr__ = whole  # type: ignore[attr-defined]
    sys.modules[name] = module


if "httpx" not in sys.modules:
    sys.modules.setdefault("httpx._main", None)  # type: ignore[assignment]  # httpx then has no `main` CLI
_lazy_package("pyroute2")
