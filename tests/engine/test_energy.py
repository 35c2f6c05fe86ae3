"""The energy meter against a fake GPU at the NVML boundary: a counter that moves in 100 ms
steps on a fake clock. Windows start and end on steps and run the work until they are long
enough; idle power is measured and subtracted; J/token; a counter that goes back or stops is an
error. The NVML adapter against a fake pynvml module, and `energy_meter` says why it has no
meter (no CUDA GPU, no nvidia-ml-py, no energy counter) instead of making a number up."""
import sys
import types

import pytest
import torch

from anee_fast.engine import energy
from anee_fast.engine.energy import EnergyCounterError, EnergyMeter

IDLE_W, BUSY_W = 60.0, 300.0


class FakeGPU:
    """A GPU drawing IDLE_W (BUSY_W while `work` runs) whose counter, in whole mJ, moves only
    every `update_period_s`; `clock` and `sleep` are its time."""
    update_period_s = 0.1

    def __init__(self):
        self.now, self.joules, self.steps, self.mj = 0.0, 0.0, 0, 0

    def millijoules(self) -> int:
        return self.mj

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self._run(seconds, IDLE_W)

    def work(self, seconds: float) -> None:
        self._run(seconds, BUSY_W)

    def _run(self, seconds, watts):
        end = self.now + seconds
        while (self.steps + 1) * self.update_period_s <= end:
            step = (self.steps + 1) * self.update_period_s
            self.joules += watts * (step - self.now)
            self.now, self.steps = step, self.steps + 1
            self.mj = round(self.joules * 1000)
        self.joules += watts * (end - self.now)
        self.now = end


def _meter(gpu, **options):
    return EnergyMeter(gpu, clock=gpu.clock, sleep=gpu.sleep, **options)


def test_idle_power_is_measured_on_counter_steps():
    gpu = FakeGPU()
    gpu.sleep(0.037)                      # start between two steps
    assert _meter(gpu).measure_idle() == pytest.approx(IDLE_W, rel=1e-3)


def test_a_short_workload_is_run_until_the_window_is_long_enough():
    gpu = FakeGPU()
    meter = _meter(gpu)
    meter.measure_idle()
    window = meter.measure(lambda: gpu.work(0.03))        # 30 ms: a third of a counter step
    assert window.runs == 34 and window.run_seconds == pytest.approx(1.02)
    # The window runs from a counter step to a counter step (found within a poll, 2 ms).
    assert window.seconds >= window.run_seconds
    assert window.seconds == pytest.approx(round(window.seconds / 0.1) * 0.1, abs=0.0025)
    per_token = window.per_token(4)                          # 4 tokens a run
    assert per_token.joules == pytest.approx(BUSY_W * 0.03 / 4, rel=0.01)
    assert per_token.above_idle_joules == pytest.approx((BUSY_W - IDLE_W) * 0.03 / 4, rel=0.01)


def test_a_workload_longer_than_the_window_runs_once():
    gpu = FakeGPU()
    meter = _meter(gpu)
    meter.measure_idle()
    window = meter.measure(lambda: gpu.work(1.55))
    assert window.runs == 1
    assert window.per_token(1).joules == pytest.approx(BUSY_W * 1.55, rel=0.01)


def test_a_window_shorter_than_ten_counter_updates_is_refused():
    gpu = FakeGPU()
    with pytest.raises(ValueError, match="too short: the counter moves every 0.1 s"):
        _meter(gpu, min_window_s=0.5)
    meter = _meter(gpu, min_window_s=2.0)
    with pytest.raises(ValueError, match="shorter than min_window_s"):
        meter.measure_idle(1.0)


def test_work_is_measured_only_after_idle_power():
    gpu = FakeGPU()
    with pytest.raises(RuntimeError, match="measure_idle"):
        _meter(gpu).measure(lambda: gpu.work(0.01))


def test_a_counter_that_goes_back_is_an_error():
    gpu = FakeGPU()
    meter = _meter(gpu)
    meter.measure_idle()

    def driver_reload():
        gpu.work(0.5)
        gpu.joules = gpu.mj = 0

    with pytest.raises(EnergyCounterError, match="went back"):
        meter.measure(driver_reload)


def test_a_counter_that_stops_is_an_error():
    gpu = FakeGPU()
    gpu.millijoules = lambda: 1234
    with pytest.raises(EnergyCounterError, match="did not move"):
        _meter(gpu).measure_idle()


def test_no_meter_without_a_cuda_gpu():
    assert energy.energy_meter("cpu").startswith("no CUDA GPU")
    if not torch.cuda.is_available():
        assert energy.energy_meter("cuda").startswith("no CUDA GPU")


def _fake_pynvml(energy_mj, calls):
    """A pynvml module whose counter reads `energy_mj()`, recording every call."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = type("NVMLError", (Exception,), {})
    nvml.NVMLError_NotSupported = type("NVMLError_NotSupported", (nvml.NVMLError,), {})
    nvml.nvmlInit = lambda: calls.append("init")

    def handle(uuid):
        calls.append(uuid)
        return "handle"

    def total_energy(h):
        assert h == "handle"
        return energy_mj()

    nvml.nvmlDeviceGetHandleByUUID = handle
    nvml.nvmlDeviceGetTotalEnergyConsumption = total_energy
    return nvml


@pytest.fixture
def cuda_gpu(monkeypatch):
    """A machine with CUDA device 1 of UUID GPU-1234-abcd, as torch sees it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: types.SimpleNamespace(uuid="1234-abcd" if index == 1
                                                            else "wrong-device"))


def test_the_nvml_meter_reads_the_counter_of_the_gpu_asked_for(cuda_gpu, monkeypatch):
    calls, readings = [], iter([5_000, 5_000, 7_500])
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(lambda: next(readings), calls))
    meter = energy.energy_meter("cuda:1")
    assert isinstance(meter, EnergyMeter)
    assert calls == ["init", "GPU-1234-abcd"]
    assert meter.counter.update_period_s == 0.1
    assert meter.total_joules() == 5.0 and meter.total_joules() == 7.5


def test_a_gpu_without_an_energy_counter_says_so(cuda_gpu, monkeypatch):
    def not_supported():
        raise nvml.NVMLError_NotSupported()

    nvml = _fake_pynvml(not_supported, [])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert energy.energy_meter("cuda:1") == \
        "this GPU has no energy counter (needs Volta or newer)"


def test_an_nvml_failure_is_reported_not_raised(cuda_gpu, monkeypatch):
    nvml = _fake_pynvml(lambda: 0, [])

    def no_driver():
        raise nvml.NVMLError("Driver Not Loaded")

    nvml.nvmlInit = no_driver
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert energy.energy_meter("cuda:1") == \
        "NVML failed on cuda:1 (GPU-1234-abcd): Driver Not Loaded"


def test_no_meter_without_nvidia_ml_py(cuda_gpu, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)        # import pynvml raises ImportError
    assert energy.energy_meter("cuda:1") == \
        "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
