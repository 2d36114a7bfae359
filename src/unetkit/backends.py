"""What runs the network inside `unetkit.predict`: PyTorch, onnxruntime, or the faster of the two.

A runner maps a batch of tiles (N, C, h, w) float32 to class probabilities (N, K, h', w'); the
tiling, test-time augmentation and stitching in `predict` are the same for every runner.

* "torch": the `UNet` itself (channels-last on CPU, inference mode).
* "onnxruntime": the network exported to ONNX (`unetkit.export.graphs`), run by onnxruntime on
  the CPU with as many threads as torch uses. The graph is exported once per set of weights and
  kept in the cache folder (`cache_dir()`), named by the weights' SHA-256.
* "auto": torch on a GPU, or when onnxruntime is not installed. On the CPU it times both on the
  job's own tiles (the outputs are used, so nothing is computed twice) and keeps the faster; the
  choice is remembered in ``cache_dir()/backends.json`` for this architecture, tile shape, batch
  size, thread count, CPU and library versions. Each backend gets one untimed warm-up call and
  `MEASURED_CALLS` timed ones, all on real tiles. A job too short to repay exporting the graph
  runs on torch without measuring, unless the graph is cached already; the seconds such jobs
  spend on torch are added up in backends.json, and the job that brings the sum (its own
  estimate included) to `MIN_MEASURED_SECONDS` measures. So one long job, or a series of short
  ones with the same model (a folder of images, an analysis rerun), ends up on the faster backend.

Example:
    >>> import torch
    >>> from unetkit import UNet
    >>> net = UNet(depth=3, base_channels=4)
    >>> with make_runner(net, "torch", torch.device("cpu"), (1, 44, 44), calls=1) as run:
    ...     run(torch.zeros(1, 1, 44, 44)).shape
    torch.Size([1, 2, 4, 4])
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .errors import InputError
from .io import atomic_write
from .network import UNet

BACKENDS = ("auto", "torch", "onnxruntime")
#: Seconds on torch (this job's estimate after its first call, plus earlier unmeasured jobs of the
#: same key) from which a job exports the graph and measures. Measuring costs the quick export
#: (0.1 s for a width-16 network, 1.2 s for the paper's width 64, on a 2-core AMD EPYC) and a few
#: calls on the slower backend; the outputs of every call are used.
MIN_MEASURED_SECONDS = 3.0
#: Timed calls per backend when measuring (after one untimed warm-up call each).
MEASURED_CALLS = 2
CHOICES_FILE = "backends.json"

Runner = Callable[[torch.Tensor], torch.Tensor]


def cache_dir() -> Path:
    """Where unetkit keeps exported graphs and backend choices: ``$UNETKIT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/unetkit``, else ``~/.cache/unetkit``."""
    if os.environ.get("UNETKIT_CACHE_DIR"):
        return Path(os.environ["UNETKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "unetkit"


def onnxruntime_available() -> bool:
    """Whether onnxruntime and the ONNX exporter's dependencies can be imported."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnxscript", "onnx"))


def check_backend(backend: str, device: torch.device | None = None) -> str:
    """Return `backend` if usable here, else raise InputError saying why and what to do."""
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    if backend == "onnxruntime":
        if not onnxruntime_available():
            raise InputError("backend 'onnxruntime' needs onnxruntime, onnx and onnxscript: pip install 'unetkit[export]'")
        if device is not None and device.type != "cpu":
            raise InputError(f"backend 'onnxruntime' runs on the CPU, but the device is {device}; use device 'cpu' or backend 'torch'")
    return backend


# -- runners ----------------------------------------------------------------------------------


class TorchRunner:
    """The network itself: softmax of its logits, in inference mode (channels-last on the CPU)."""

    name = "torch"

    def __init__(self, model: UNet, device: torch.device) -> None:
        self.model, self.device = model, device
        self.channels_last = device.type == "cpu"

    @contextlib.contextmanager
    def active(self) -> Iterator["TorchRunner"]:
        was_training = self.model.training
        self.model.eval()
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        try:
            with torch.inference_mode():
                yield self
        finally:
            if self.channels_last:
                self.model.to(memory_format=torch.contiguous_format)
            self.model.train(was_training)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.softmax(self.model(x), dim=1)


class OnnxRunner:
    """The network's ONNX graph (probabilities out) in an onnxruntime CPU session."""

    name = "onnxruntime"

    def __init__(self, model: UNet) -> None:
        self.session = _session(model)

    @contextlib.contextmanager
    def active(self) -> Iterator["OnnxRunner"]:
        yield self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from .export.graphs import INPUT_NAME

        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {INPUT_NAME: array})[0])


class AutoRunner:
    """Torch first; on a long enough CPU job, both backends timed on the job's tiles, then the faster."""

    name = "auto"

    def __init__(self, model: UNet, device: torch.device, key: str, calls: int) -> None:
        self.model, self.key, self.calls_left = model, key, int(calls)
        self.torch = TorchRunner(model, device)
        self.onnx: OnnxRunner | None = None
        self.chosen: Runner | None = None
        known = read_choices().get(key, {})
        self.remembered = known.get("backend")
        self.earlier_torch_seconds = float(known.get("unmeasured_torch_seconds", 0.0))
        self.torch_started: float | None = None
        self._torch_active = False
        self.times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
        self.first_seconds: float | None = None
        self._stack = contextlib.ExitStack()

    @property
    def choice(self) -> str | None:
        """The backend chosen for the rest of the job (None while undecided)."""
        return None if self.chosen is None else self.chosen.name

    @contextlib.contextmanager
    def active(self) -> Iterator["AutoRunner"]:
        with self._stack:  # torch's context (channels-last weights) is entered by its first call
            yield self
        if self.remembered is None and self.onnx is None and self.torch_started is not None:
            # a job that ran on torch without measuring: count its seconds towards the next one's decision
            spent = self.earlier_torch_seconds + time.perf_counter() - self.torch_started
            update_choice(self.key, {"unmeasured_torch_seconds": round(spent, 3)})

    def _run(self, runner: Runner, x: torch.Tensor) -> torch.Tensor:
        """`runner(x)`; torch's context is entered on its first call only, so a job that runs on
        onnxruntime leaves the network's weights as they are (their fingerprint stays valid)."""
        if runner is self.torch and not self._torch_active:
            self._stack.enter_context(self.torch.active())
            self._torch_active = True
        return runner(x)

    def _timed(self, runner: Runner, x: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        out = self._run(runner, x)
        self.times[runner.name].append(time.perf_counter() - started)
        return out

    def _worth_measuring(self, first_seconds: float) -> bool:
        """Enough calls left to time both, and either this job with the earlier unmeasured ones
        is long enough to repay exporting the graph, or the graph is cached."""
        if self.calls_left < 1 + 2 * MEASURED_CALLS:
            return False
        projected = self.earlier_torch_seconds + first_seconds * (self.calls_left + 1)
        return projected >= MIN_MEASURED_SECONDS or graph_path(self.model).is_file()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls_left -= 1
        if self.chosen is not None:
            return self._run(self.chosen, x)
        if self.onnx is None:
            if self.remembered == "torch":
                self.chosen = self.torch
                return self._run(self.chosen, x)
            if self.remembered == "onnxruntime" and graph_path(self.model).is_file():
                self.chosen = self.onnx = OnnxRunner(self.model)
                return self.chosen(x)
            if self.first_seconds is None:  # torch's first call: a warm-up that also sizes the job
                self.torch_started = started = time.perf_counter()
                out = self._run(self.torch, x)
                self.first_seconds = time.perf_counter() - started
                if not self._worth_measuring(self.first_seconds):
                    self.chosen = self.torch
                return out
            self.onnx = OnnxRunner(self.model)
            if self.remembered == "onnxruntime":
                self.chosen = self.onnx
            return self.onnx(x)  # onnxruntime's warm-up: the session plans its memory on the first run
        n_torch, n_onnx = len(self.times["torch"]), len(self.times["onnxruntime"])
        out = self._timed(self.torch if n_torch <= n_onnx else self.onnx, x)
        if min(len(self.times["torch"]), len(self.times["onnxruntime"])) >= MEASURED_CALLS:
            best = {name: min(t) for name, t in self.times.items()}
            self.chosen = self.onnx if best["onnxruntime"] < best["torch"] else self.torch
            remember_choice(self.key, self.chosen.name, best)
        return out


def make_runner(
    model: UNet, backend: str, device: torch.device, batch_shape: tuple[int, int, int], *, calls: int
):
    """The runner for `backend` ("auto", "torch", "onnxruntime"); use it as a context manager.

    `batch_shape` is (batch size, tile height, tile width) of the job and `calls` how many
    batches it will run (with test-time augmentation, 8 per batch of tiles): "auto" decides with them.
    """
    check_backend(backend, device)
    if backend == "onnxruntime":
        return OnnxRunner(model).active()
    if backend == "torch" or device.type != "cpu" or not onnxruntime_available():
        return TorchRunner(model, device).active()
    return AutoRunner(model, device, choice_key(model, batch_shape), calls).active()


# -- the exported graph, cached per set of weights --------------------------------------------

_FINGERPRINTS: "weakref.WeakKeyDictionary[UNet, tuple[tuple, str]]" = weakref.WeakKeyDictionary()
_SESSIONS: dict[tuple[str, int], Any] = {}


def weights_hash(model: UNet) -> str:
    """SHA-256 of the network's configuration and weights (remembered until the weights change)."""
    tensors = model.state_dict()
    versions = tuple((k, t._version, t.data_ptr()) for k, t in tensors.items())
    known = _FINGERPRINTS.get(model)
    if known is not None and known[0] == versions:
        return known[1]
    digest = hashlib.sha256(json.dumps(model.config, sort_keys=True).encode())
    for key, tensor in tensors.items():
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    _FINGERPRINTS[model] = (versions, digest.hexdigest())
    return digest.hexdigest()


def graph_path(model: UNet) -> Path:
    """Where the ONNX graph of `model`'s current weights is (or will be) cached."""
    return cache_dir() / "onnx" / f"{weights_hash(model)[:32]}.onnx"


def cached_graph(model: UNet) -> Path:
    """The cached ONNX graph of `model`, exported now (`quick_onnx_bytes`) if it is not cached yet."""
    from .export.graphs import quick_onnx_bytes

    path = graph_path(model)
    if not path.is_file():
        data = quick_onnx_bytes(model)
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), force=True)
    return path


def _session(model: UNet):
    from .export.graphs import onnx_session

    key = (weights_hash(model), torch.get_num_threads())
    if key not in _SESSIONS:
        _SESSIONS.clear()  # one network's session at a time: they hold a copy of the weights
        _SESSIONS[key] = onnx_session(cached_graph(model))
    return _SESSIONS[key]


# -- remembered choices -----------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def choice_key(model: UNet, batch_shape: tuple[int, int, int]) -> str:
    """What the speed of the backends depends on: architecture, batch and tile, threads, CPU, versions."""
    import importlib.metadata as metadata

    versions = {}
    for name in ("onnxruntime",):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    facts = {
        "model": model.config, "batch": list(batch_shape), "threads": torch.get_num_threads(),
        "cpu": cpu_name(), "torch": torch.__version__, **versions,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]


def read_choices() -> dict[str, dict[str, Any]]:
    """The remembered backend choices ({} when none or unreadable)."""
    try:
        data = json.loads((cache_dir() / CHOICES_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def remember_choice(key: str, backend: str, seconds: dict[str, float]) -> None:
    """Store the choice for `key` (best seconds per call of each backend alongside)."""
    update_choice(key, {"backend": backend, "seconds_per_call": {k: round(v, 4) for k, v in seconds.items()}}, replace=True)


def update_choice(key: str, values: dict[str, Any], replace: bool = False) -> None:
    """Merge `values` (or, with `replace`, put them) into the entry of `key` in backends.json."""
    choices = read_choices()
    entry = {} if replace or not isinstance(choices.get(key), dict) else choices[key]
    choices[key] = {**entry, **values, "date": time.strftime("%Y-%m-%d")}
    text = json.dumps(choices, indent=1, sort_keys=True)
    with contextlib.suppress(OSError):  # a read-only cache only costs a new measurement next time
        atomic_write(cache_dir() / CHOICES_FILE, lambda path: path.write_text(text), force=True)
