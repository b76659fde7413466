"""Checks that need more than one object's schema: references and Kubernetes policy rules."""

from __future__ import annotations

from tether.model import Namespace, NetworkPolicy
from tether.server.objects import ApiError, Objects


async def require_namespace(o: Objects, ns: str) -> None:
    if await o.get(Namespace, ns) is None:
        raise ApiError(400, f"namespace {ns!r} does not exist; create it first "
                            f"(`tether apply -f` a Namespace manifest named {ns!r})")


def check_policy(pol: NetworkPolicy) -> None:
    """Reject a NetworkPolicy spec the Kubernetes API server would reject, with its wording."""
    from tether.k8s_validation import PolicyInvalid
    from tether.k8s_validation import check_policy as k8s_check

    try:
        k8s_check(pol.name, pol.spec)
    except PolicyInvalid as e:
        raise ApiError(422, str(e)) from None
