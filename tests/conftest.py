"""Shared pytest set-up: fixtures live in tests/fixtures/<topic>.py, one module per topic."""

pytest_plugins = [
    "tests.fixtures.etcd",
    "tests.fixtures.server",
    "tests.fixtures.lab",
    "tests.fixtures.openstack",
    "tests.fixtures.netns",
    "tests.fixtures.kube",
]


# fixtures that make network namespaces (directly or through a lab): a test using one needs root
ROOT_FIXTURES = frozenset({"netns", "lab", "one_subnet_lab", "fresh_lab", "doc_lab", "kube"})


def pytest_collection_modifyitems(config, items) -> None:
    """Every test that needs root carries the `root` marker: lab tests, tests using a fixture that
    makes namespaces, and those marked `root` by hand (tests/meta/test_root_marker.py checks the
    last kind). The Kubernetes tests run last: on a fresh machine their kube-apiserver is still
    being built in the background (scripts/install-deps) while the rest of the suite runs."""
    import pytest

    for item in items:
        if item.get_closest_marker("lab") or ROOT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.root)
    items.sort(key=lambda item: "/tests/kube/" in str(item.path).replace("\\", "/"))
