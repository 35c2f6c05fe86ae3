"""Measured GPU energy: joules of a workload from the GPU's cumulative energy counter (NVML).

NVML's counter (`nvmlDeviceGetTotalEnergyConsumption`: mJ since the driver loaded, Volta and
newer) moves in steps, about every 100 ms, so a window here
- starts and ends on a step: the meter polls the counter until its value changes, so the steps
  cost no accuracy at either end;
- lasts at least `min_window_s` (1 s, ten steps, by default): `measure(fn)` runs `fn` again and
  again until the window is that long, and says how many runs it held. `fn` must be
  steady-state work (warmed up) that returns only once the device has finished it.
Idle power is measured apart (`measure_idle`, with nothing running on the device), reported, and
subtracted to give the energy the work added above idle. A counter that goes back (a driver
reload resets it; a 64-bit mJ counter does not wrap) is an error, never a negative number.

`energy_meter(device)` gives a meter, or a string saying why there is none: no number is ever
made up. pynvml (the package nvidia-ml-py) is imported only when a meter is asked for.
"""
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

NVML_UPDATE_PERIOD_S = 0.1
MIN_UPDATES_PER_WINDOW = 10
STALLED_AFTER_UPDATES = 20     # a counter that does not move for this many periods is broken
_POLLS_PER_UPDATE = 50         # how finely a step's time is found


class EnergyCounterError(RuntimeError):
    """The energy counter cannot be trusted: it went back or stopped moving."""


class PerToken(NamedTuple):
    joules: float               # the runs' energy per token
    above_idle_joules: float    # what they added to the device's idle energy, per token


@dataclass(frozen=True)
class Window:
    """One measured window: `runs` runs of the work took `run_seconds` of its `seconds` (from a
    counter step to a counter step); the rest is the wait for the last step, the device idle."""
    joules: float
    seconds: float
    runs: int
    run_seconds: float
    idle_watts: float

    def per_token(self, tokens_per_run: float) -> PerToken:
        """Joules per token of the runs, total and above idle. The total leaves out the idle
        energy of the wait for the last step (not the runs'); above idle leaves out the idle
        energy of the whole window."""
        tokens = tokens_per_run * self.runs
        idle_wait = self.idle_watts * (self.seconds - self.run_seconds)
        above_idle = self.joules - self.idle_watts * self.seconds
        return PerToken((self.joules - idle_wait) / tokens, above_idle / tokens)


class EnergyMeter:
    """Energy of work on one GPU, from a cumulative energy counter.

    counter: has `millijoules()` (the running total, which never goes back) and
    `update_period_s` (how often that total moves); NvmlCounter is the real one.
    clock, sleep: seconds (tests pass fakes that drive a fake counter).
    min_window_s: the shortest window, at least MIN_UPDATES_PER_WINDOW counter updates.
    """

    def __init__(self, counter, *, clock=time.monotonic, sleep=time.sleep,
                 min_window_s: float = 1.0):
        shortest = MIN_UPDATES_PER_WINDOW * counter.update_period_s
        if not min_window_s >= shortest:
            raise ValueError(f"min_window_s={min_window_s} s is too short: the counter moves "
                             f"every {counter.update_period_s} s, so a window needs at least "
                             f"{MIN_UPDATES_PER_WINDOW} updates ({shortest:g} s)")
        self.counter, self.clock, self.sleep = counter, clock, sleep
        self.min_window_s = min_window_s
        self.idle_watts = None         # set by measure_idle
        self._last_mj = None

    def total_joules(self) -> float:
        """The counter, in joules (since the driver loaded, for NVML)."""
        return self._read() / 1000

    def measure_idle(self, seconds: float = None) -> float:
        """Idle power in watts over a window of `seconds` (default min_window_s) in which this
        process runs nothing on the device; kept for `measure` to subtract."""
        seconds = self.min_window_s if seconds is None else seconds
        if not seconds >= self.min_window_s:
            raise ValueError(f"an idle window of {seconds} s is shorter than min_window_s="
                             f"{self.min_window_s} s")
        joules, window_s = self._window(lambda: self.sleep(seconds))
        self.idle_watts = joules / window_s
        return self.idle_watts

    def measure(self, fn) -> Window:
        """Runs `fn()` until at least min_window_s has passed and measures the window."""
        if self.idle_watts is None:
            raise RuntimeError("measure idle power first: call measure_idle() while nothing "
                               "runs on the device")
        runs, run_seconds = 0, 0.0

        def work():
            nonlocal runs, run_seconds
            start = self.clock()
            while self.clock() - start < self.min_window_s:
                fn()
                runs += 1
            run_seconds = self.clock() - start

        joules, seconds = self._window(work)
        return Window(joules, seconds, runs, run_seconds, self.idle_watts)

    def _window(self, work) -> tuple:
        """(joules, seconds) from the counter step before `work()` to the first one after."""
        start_mj, start_t = self._next_step()
        work()
        end_mj, end_t = self._next_step()
        return (end_mj - start_mj) / 1000, end_t - start_t

    def _next_step(self) -> tuple:
        """(value, time) at the counter's next step, found by polling until the value moves."""
        period = self.counter.update_period_s
        before, start = self._read(), self.clock()
        while True:
            self.sleep(period / _POLLS_PER_UPDATE)
            value, now = self._read(), self.clock()
            if value != before:
                return value, now
            if now - start > STALLED_AFTER_UPDATES * period:
                raise EnergyCounterError(f"the energy counter did not move in {now - start:.1f} s "
                                         f"(it should every {period} s)")

    def _read(self) -> int:
        value = self.counter.millijoules()
        if self._last_mj is not None and value < self._last_mj:
            raise EnergyCounterError(f"the energy counter went back from {self._last_mj} to "
                                     f"{value} mJ (reset by a driver reload?): measure again")
        self._last_mj = value
        return value


class NvmlCounter:
    """NVML's total energy counter of one GPU, found by its UUID (CUDA and NVML may number the
    GPUs differently). Raises pynvml.NVMLError_NotSupported where the GPU has none."""
    update_period_s = NVML_UPDATE_PERIOD_S

    def __init__(self, uuid: str):
        import pynvml
        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        self.millijoules()

    def millijoules(self) -> int:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)


def energy_meter(device, **options):
    """An EnergyMeter for the GPU `device` (a torch device or its name), or a string saying why
    there is none. options: EnergyMeter's keywords."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"no CUDA GPU (the device is {device})"
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    index = torch.cuda.current_device() if device.index is None else device.index
    uuid = "GPU-" + str(torch.cuda.get_device_properties(index).uuid).removeprefix("GPU-")
    try:
        counter = NvmlCounter(uuid)
    except pynvml.NVMLError_NotSupported:
        return "this GPU has no energy counter (needs Volta or newer)"
    except pynvml.NVMLError as e:
        return f"NVML failed on {device} ({uuid}): {e}"
    return EnergyMeter(counter, **options)
