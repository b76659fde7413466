"""Shared pytest set-up: fixtures live in tests/fixtures/<topic>.py, one module per topic."""

pytest_plugins = [
    "tests.fixtures.etcd",
    "tests.fixtures.server",
    "tests.fixtures.lab",
    "tests.fixtures.openstack",
    "tests.fixtures.netns",
    "tests.fixtures.kube",
]


def pytest_collection_modifyitems(config, items) -> None:
    """The Kubernetes tests run last: on a fresh machine their kube-apiserver is still being built in
    the background (scripts/install-deps) while the rest of the suite runs."""
    items.sort(key=lambda item: "/tests/kube/" in str(item.path).replace("\\", "/"))
