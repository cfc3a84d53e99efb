"""Fault drills on worker processes under load: SIGKILL, SIGSTOP and SIGCONT, and restarts, on every transport.

The workers are real processes of ``tests/apps/drill_worker.py`` on an SQLite registry in the test's
folder; the load comes from this process (see ``_harness``). Each drill prints its figures.
"""

from __future__ import annotations

import signal

import pytest

from ._harness import MakeDrill, Wiring

pytestmark = pytest.mark.timeout(90)

FREEZE = 3.0
"""Seconds a worker stays stopped: longer than the call deadline and the heartbeat TTL."""

DRAIN_TIMEOUT = 10.0
"""Seconds a worker that got SIGTERM may take to finish its calls and exit."""


async def test_worker_killed(make_drill: MakeDrill, wiring: Wiring) -> None:
    # The default RetryPolicy, without an attempt timeout: the attempts in flight to the killed worker
    # end when the next call finds it unreachable, and the idempotent ones move to the other worker.
    drill = make_drill("worker killed (SIGKILL)", wiring, attempt_timeout=None)
    a, _ = await drill.start_workers(2)
    await drill.warm_up()

    # A supervisor starts the crashed worker again at once, with the same id and endpoint.
    await drill.wait_busy(a)
    drill.fault()
    a.signal(signal.SIGKILL)
    await a.wait_exit(10)
    a.launch()
    drill.fault_over()
    restarted = a.served_by
    await drill.wait_recovered(lambda served: served == restarted)
    await drill.run_on(0.5)
    await drill.load.stop()

    figures = drill.figures()
    drill.report(figures)
    drill.check(figures)


async def test_worker_frozen_and_resumed(make_drill: MakeDrill, wiring: Wiring) -> None:
    drill = make_drill("worker frozen (SIGSTOP), then resumed", wiring)
    a, _ = await drill.start_workers(2)
    await drill.warm_up()

    await drill.wait_busy(a)
    drill.fault()
    a.signal(signal.SIGSTOP)
    await drill.run_on(FREEZE)
    a.signal(signal.SIGCONT)
    drill.fault_over()
    resumed = a.served_by
    await drill.wait_recovered(lambda served: served == resumed)
    await drill.run_on(0.5)
    await drill.load.stop()

    figures = drill.figures()
    drill.report(figures)
    drill.check(figures)


async def test_only_instance_frozen(make_drill: MakeDrill, wiring: Wiring) -> None:
    # The TTL outlasts the freeze, so the instance stays listed and every call goes to it. Calls work
    # for 0.2 s, so that a call still runs when the stop lands, even if this process is slow to send it.
    drill = make_drill(
        "only instance frozen", wiring, deadline=0.5, heartbeat_interval=1.0, heartbeat_ttl=5.0, work=0.2
    )
    [a] = await drill.start_workers(1)
    await drill.warm_up()

    await drill.wait_busy(a)
    began = drill.fault()
    a.signal(signal.SIGSTOP)
    await drill.run_on(2.0)
    a.signal(signal.SIGCONT)
    drill.fault_over()
    recovered = await drill.wait_recovered()
    await drill.run_on(0.5)
    await drill.load.stop()

    figures = drill.figures(available_from=recovered)
    drill.report(figures)
    drill.check(figures, available_from=recovered)
    # Every call that reached the stopped instance, in flight when it stopped or sent later, failed
    # with a deadline error. The caller takes the instance out of routing after a few of those, but
    # it is the only one, so calls still go to it and one is served as soon as it resumes.
    failed = [r for r in drill.load.records if r.outcome != "ok"]
    in_flight = [r for r in failed if r.started < began]
    assert in_flight, drill.diagnosis()
    assert {r.outcome for r in failed} == {"DeadlineExceededError"}, drill.diagnosis()
    assert all(r.started >= began - drill.deadline for r in failed), drill.diagnosis()
    assert all(r.finished - r.started <= drill.deadline + 0.25 for r in failed), drill.diagnosis()


async def test_worker_restarted(make_drill: MakeDrill, wiring: Wiring) -> None:
    drill = make_drill("rolling restart (SIGTERM)", wiring)
    await drill.start_workers(2)
    await drill.warm_up()

    for worker in drill.workers:
        await drill.wait_busy(worker)
        drill.fault()
        worker.signal(signal.SIGTERM)
        assert await worker.wait_exit(DRAIN_TIMEOUT) == 0, worker.log_tail()
        worker.launch()
        drill.fault_over()
        restarted = worker.served_by
        await drill.wait_recovered(lambda served, restarted=restarted: served == restarted)
    await drill.run_on(0.5)
    await drill.load.stop()

    figures = drill.figures()
    drill.report(figures)
    drill.check(figures)
    assert figures.failed == {}, drill.diagnosis()
