"""Shared pytest set-up: fixtures live in tests/fixtures/<topic>.py, one module per topic."""

pytest_plugins = [
    "tests.fixtures.etcd",
    "tests.fixtures.server",
    "tests.fixtures.lab",
    "tests.fixtures.openstack",
    "tests.fixtures.netns",
    "tests.fixtures.kube",
]
