"""Background work (an apply on its worker thread) steps aside at its checkpoints while foreground
work (a CNI or Docker request on the event loop) is in progress, within a budget."""

from __future__ import annotations

import threading
import time

from tether import yielding


def test_a_checkpoint_outside_background_work_never_waits() -> None:
    yielding.enter()
    try:
        t0 = time.monotonic()
        yielding.checkpoint()  # tests, the CLI: no budget, no wait
        assert time.monotonic() - t0 < 0.05
    finally:
        yielding.leave()


def test_background_work_waits_at_checkpoints_until_the_foreground_is_done() -> None:
    passed = threading.Event()

    def work() -> None:
        with yielding.background(budget=5.0):
            yielding.checkpoint()
            passed.set()

    yielding.enter()
    yielding.enter()  # two requests in progress
    t = threading.Thread(target=work)
    try:
        t.start()
        assert not passed.wait(0.2)
        yielding.leave()
        assert not passed.wait(0.1) and yielding.busy()  # one is still in progress
    finally:
        yielding.leave()
    assert passed.wait(2) and not yielding.busy()
    t.join(2)


def test_the_budget_bounds_the_pauses_of_one_background_section() -> None:
    waited: list[float] = []

    def work() -> None:
        with yielding.background(budget=0.15):
            for _ in range(5):
                t0 = time.monotonic()
                yielding.checkpoint()
                waited.append(time.monotonic() - t0)

    yielding.enter()
    try:
        t = threading.Thread(target=work)
        t.start()
        t.join(5)
    finally:
        yielding.leave()
    assert not t.is_alive()
    assert 0.1 < sum(waited) < 1.0 and waited[-1] < 0.05  # a storm of requests never starves an apply
