"""minipeft.course.timing: warm-up, turns, the fastest run, and waiting for the GPU."""
from types import SimpleNamespace

import pytest
import torch

from minipeft.course import timing


class FakeClock:
    """A clock that only moves when a contestant runs: each run takes the next of its durations
    (in seconds)."""

    def __init__(self, durations: dict[str, list[float]]):
        self.now = 0.0
        self.durations = {name: list(d) for name, d in durations.items()}
        self.order: list[str] = []

    def perf_counter(self) -> float:
        return self.now

    def run(self, name: str) -> None:
        self.order.append(name)
        self.now += self.durations[name].pop(0)


@pytest.fixture
def clock(monkeypatch):
    def install(durations: dict[str, list[float]]) -> FakeClock:
        fake = FakeClock(durations)
        monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=fake.perf_counter))
        return fake
    return install


def test_a_warm_up_run_each_then_the_contestants_take_turns(clock):
    fake = clock({"a": [9.0, 0.001, 0.001], "b": [9.0, 0.002, 0.002]})
    timing.fastest_ms({"a": "a", "b": "b"}, fake.run, repeats=2)
    assert fake.order == ["a", "b", "a", "b", "a", "b"]


def test_the_fastest_run_is_kept_and_the_warm_up_is_not_timed(clock):
    fake = clock({"slow start": [5.0, 0.050, 0.010, 0.030], "steady": [5.0, 0.020, 0.020, 0.020]})
    ms = timing.fastest_ms({"slow start": "slow start", "steady": "steady"}, fake.run, repeats=3)
    assert ms.to_dict() == pytest.approx({"slow start": 10.0, "steady": 20.0})
    assert list(ms.index) == ["slow start", "steady"]


def test_each_timed_run_waits_for_the_gpu_before_and_after(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: events.append("wait"))
    timing.fastest_ms({"model": None}, lambda _: events.append("run"), repeats=2)
    assert events == ["run"] + ["wait", "run", "wait"] * 2


def test_no_waiting_when_cuda_was_never_used(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: pytest.fail("waited"))
    timing.fastest_ms({"model": None}, lambda _: None, repeats=1)


@pytest.mark.parametrize("contestants, repeats, message", [
    ({}, 10, "nothing to time"),
    ({"model": None}, 0, "repeats=0"),
])
def test_bad_arguments_are_refused_before_anything_runs(contestants, repeats, message):
    ran = []
    with pytest.raises(ValueError, match=message):
        timing.fastest_ms(contestants, ran.append, repeats=repeats)
    assert ran == []


def test_times_real_models():
    torch.manual_seed(0)
    models = {"small": torch.nn.Linear(8, 8), "large": torch.nn.Linear(512, 512)}
    x = {"small": torch.randn(4, 8), "large": torch.randn(4, 512)}
    ms = timing.fastest_ms(models, lambda m: m(x["small" if m.in_features == 8 else "large"]),
                           repeats=3)
    assert set(ms.index) == {"small", "large"} and (ms > 0).all() and ms.name == "ms"


def test_interleaved_times_gives_every_timed_call_in_seconds_after_its_warm_up_calls(clock):
    fake = clock({"a": [9.0, 9.0, 0.5, 0.25], "b": [9.0, 9.0, 0.125, 1.0]})
    times = timing.interleaved_times({"a": lambda: fake.run("a"), "b": lambda: fake.run("b")},
                                     repeats=2, warmup=2)
    assert fake.order == ["a", "a", "b", "b", "a", "b", "a", "b"]
    assert times == {"a": [0.5, 0.25], "b": [0.125, 1.0]}
