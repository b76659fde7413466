"""Path health checks a bounded number of peers per round, in turn (`agent.peers.next_batch`):
checking every peer every round made the cluster's ping processes grow with hosts squared."""

from __future__ import annotations

from tether.agent.peers import next_batch


def test_a_small_cluster_checks_every_peer_each_round() -> None:
    assert next_batch(["h3", "h2"], None, size=4) == ["h2", "h3"]
    assert next_batch(["h3", "h2"], "h3", size=4) == ["h2", "h3"]


def test_rounds_cover_every_peer_in_turn_with_at_most_size_each() -> None:
    peers = [f"h{i:03d}" for i in range(100)]
    seen: list[str] = []
    last = None
    for _ in range(7):  # ceil(100 / 16) rounds
        batch = next_batch(peers, last, size=16)
        assert len(batch) == 16
        seen += batch
        last = batch[-1]
    assert set(seen) == set(peers)


def test_the_turn_goes_on_when_the_last_peer_checked_has_left() -> None:
    peers = ["a", "b", "d", "e"]
    assert next_batch(peers, "c", size=2) == ["d", "e"]  # "c" left: the next after it
    assert next_batch(peers, "e", size=2) == ["a", "b"]  # wraps around
