"""The steering loop: the consumer follows the breaker, and a crash stops the worker at once."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from tests.unit.fakes import Clock, until
from worker.breaker import CircuitBreaker
from worker.cli import app, run
from worker.exitcodes import EXIT_SOFTWARE
from worker.service import Service
from worker.settings import Settings
from worker.steering import Steering, SteeringCrashed


class FakeConsumer:
    """Records pause/resume calls; `resume` raises `fail` when set."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.calls: list[str] = []
        self.fail = fail
        self.consuming = False
        self.stopped = False

    async def pause(self) -> None:
        """Record a pause."""
        self.calls.append("pause")
        self.consuming = False

    async def resume(self, prefetch: int) -> None:
        """Record a resume with its prefetch, or raise."""
        self.calls.append(f"resume {prefetch}")
        if self.fail is not None:
            raise self.fail
        self.consuming = True


def breaker(clock: Clock) -> CircuitBreaker:
    """A breaker that opens after one failure for 5 s, on a hand clock."""
    return CircuitBreaker(1, 5.0, 60.0, clock)


async def test_follows_the_breaker_open_then_half_open_then_closed() -> None:
    """Closed: full prefetch; open: paused; half-open: prefetch 1; closed again: full."""
    clock = Clock()
    cb = breaker(clock)
    consumer = FakeConsumer()
    crashes: list[BaseException] = []
    steering = Steering(consumer, cb, 12, crashes.append)
    steering.start()
    await until(lambda: consumer.calls == ["resume 12"])
    cb.failure("503")
    steering.wake()
    await until(lambda: consumer.calls[-1] == "pause")
    clock.now += 5
    assert cb.try_probe()
    steering.wake()
    await until(lambda: consumer.calls[-1] == "resume 1")
    cb.success()
    steering.wake()
    await until(lambda: consumer.calls[-1] == "resume 12")
    await steering.stop()
    assert crashes == []


async def test_a_crash_is_logged_at_once_and_reported() -> None:
    """A raising loop logs `steering_crashed` (error, with the exception) and calls on_crash."""
    boom = RuntimeError("boom")
    crashes: list[BaseException] = []
    steering = Steering(FakeConsumer(fail=boom), breaker(Clock()), 12, crashes.append)
    with capture_logs() as logs:
        steering.start()
        await until(lambda: crashes == [boom])
        await steering.stop()
    [line] = [line for line in logs if line["event"] == "steering_crashed"]
    assert line["log_level"] == "error"
    assert line["exc_info"] is boom
    assert "boom" in line["error"]


async def test_stop_without_a_crash_reports_nothing() -> None:
    """Cancelling the loop at shutdown is not a crash."""
    crashes: list[BaseException] = []
    steering = Steering(FakeConsumer(), breaker(Clock()), 12, crashes.append)
    with capture_logs() as logs:
        steering.start()
        await steering.stop()
    assert crashes == []
    assert not [line for line in logs if line["event"] == "steering_crashed"]


async def test_a_steering_crash_stops_the_service_and_fails_its_exit() -> None:
    """The service turns unready, `wait()` returns, and leaving it raises `SteeringCrashed`."""
    service = Service(Settings(worker={"ops_port": -1}))
    boom = RuntimeError("boom")
    service._steering_crashed(boom)
    assert not service.ready
    await service.wait()  # returns: the crash asked the worker to stop
    with pytest.raises(SteeringCrashed) as caught:
        await service.__aexit__(None, None, None)
    assert caught.value.__cause__ is boom


def test_the_cli_exits_70_when_the_steering_crashed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run` ending in `SteeringCrashed` exits EX_SOFTWARE (70), naming the crash."""

    def crashed(*args: object) -> int:
        raise SteeringCrashed("the steering loop crashed: RuntimeError('boom')")

    monkeypatch.setattr(app, "configure_logging", lambda *args: None)
    monkeypatch.setattr(run, "cmd_run", crashed)
    assert app.main(["run"]) == EXIT_SOFTWARE == 70
    assert "boom" in capsys.readouterr().err
