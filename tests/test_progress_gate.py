"""Progress waits until a turn has run `gateway.progress_after_s`: a fast answer is one plain
reply (no stream, card, typing or edit), a slow one shows what the agent said so far at that
moment, and nothing is shown once the turn is over. (On a real gateway with Feishu's cards:
tests/test_feishu_card.py.)"""
import time

import gevent
import gevent.event

from hermes_green.progress import ProgressGate


class Shown:
    def __init__(self) -> None:
        self.texts: list[tuple[float, str]] = []
        self.event = gevent.event.Event()

    def __call__(self, text_so_far: str) -> None:
        self.texts.append((time.monotonic(), text_so_far))
        self.event.set()


def spawn(fn):
    return gevent.spawn(fn)


def test_text_reported_early_is_shown_once_the_turn_has_run_after_s_then_updates_pass():
    shown = Shown()
    started = time.monotonic()
    gate = ProgressGate(shown, 0.2, spawn=spawn)
    gate("thinking")
    gate("thinking about")  # the newest text is the one shown when the time comes
    assert shown.texts == []
    assert shown.event.wait(10)
    [(at, first)] = shown.texts
    assert first == "thinking about" and at - started >= 0.2
    gate("thinking about tides")  # past the wait: straight through
    assert [t for _, t in shown.texts] == ["thinking about", "thinking about tides"]
    gate.close()
    gate("after the end")
    assert len(shown.texts) == 2


def test_a_turn_over_before_after_s_shows_nothing():
    shown = Shown()
    gate = ProgressGate(shown, 0.05, spawn=spawn)
    gate("almost done")
    gate.close()
    # the timer would have fired by now; a negative check needs a bounded window
    assert not shown.event.wait(0.3)
    assert shown.texts == []


def test_zero_shows_every_update_at_once():
    shown = Shown()
    gate = ProgressGate(shown, 0, spawn=spawn)
    gate("a")
    gate("ab")
    assert [t for _, t in shown.texts] == ["a", "ab"]


def test_an_adapter_failing_to_show_progress_does_not_reach_the_turn():
    def broken(_text):
        raise ConnectionError("gone")
    gate = ProgressGate(broken, 0, spawn=spawn)
    gate("a")  # logged at DEBUG, not raised
