"""lmexp.runtime in-process, with real signals sent to this process: preemption and Ctrl-C."""

from __future__ import annotations

import os
import signal

import pytest

from lmexp.runtime import Preemption

# Fast, in-process tests of the library: the unit lane (pytest -m unit).
pytestmark = pytest.mark.unit


@pytest.mark.parametrize("sig", Preemption.SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_stop_signal_is_a_flag_the_loop_polls_and_the_handlers_come_back(sig):
    before = signal.getsignal(sig)
    preemption = Preemption()
    with preemption.installed():
        assert not preemption.requested()
        os.kill(os.getpid(), sig)
        assert preemption.requested() and preemption.signum == sig
    assert signal.getsignal(sig) is before


def test_a_second_ctrl_c_raises_keyboard_interrupt_at_once():
    preemption = Preemption()
    with preemption.installed():
        os.kill(os.getpid(), signal.SIGINT)  # the first: checkpoint at the next batch
        assert preemption.requested()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second: now


def test_hand_over_runs_the_previous_handler_but_not_pythons_keyboard_interrupt():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        usr1 = Preemption()
        with usr1.installed():
            os.kill(os.getpid(), signal.SIGUSR1)
        usr1.hand_over()
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)
    ctrl_c = Preemption()
    with ctrl_c.installed():
        os.kill(os.getpid(), signal.SIGINT)
    assert ctrl_c.previous[signal.SIGINT] is signal.default_int_handler
    try:
        ctrl_c.hand_over()
    except KeyboardInterrupt:
        pytest.fail("hand_over ran Python's SIGINT handler, undoing the clean stop")
