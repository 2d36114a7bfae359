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

Batch-norm statistics other than the trained ones (`unetkit.adapt.BatchNormStatistics`, e.g. each
image's own) are taken by every runner: torch runs a copy of the network holding them;
onnxruntime runs a second cached graph of the same weights whose batch-norm means and variances
are graph inputs, fed with each call, so a new image needs neither an export nor a session
(`fed_graph_path`). Fed statistics cost nothing per call against a graph with them built in
(17 ms either way at depth 5, width 16, a 252-pixel tile, one thread), while building them in
would cost a session per image (0.15 s there). The plain graph, with batch norm folded into the
convolutions, stays the one for the trained statistics. A cached graph that cannot be read (a truncated file) is exported again.

Precision (`unetkit.precision`): "bf16" runs the torch network under autocast (bfloat16 on the
CPU; float16 or bfloat16 on a GPU) with the softmax in float32; "int8" runs a statically quantised
copy of the ONNX graph (`int8_graph_path`, cached beside the float graph, calibrated once on tiles
of representative images); fed batch-norm statistics have their own int8 graph too. A tuple of
precisions lets `make_runner` take the fastest of them, measured once per model, tile, threads and
CPU and remembered in backends.json like the backend choice.

A job split into parts (the blocks of a large image on one Dask worker) can keep its runner:
`make_runner(..., keep=True)` returns the runner of the previous part with the same model, tile,
statistics and thread, so "auto" measures once over the whole job, not per part.

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
import threading
import time
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np
import torch
from torch import nn

from .adapt import BatchNormStatistics, batch_norm_layers, with_statistics
from .errors import InputError
from .io import atomic_write
from .network import UNet

BACKENDS = ("auto", "torch", "onnxruntime")
PRECISIONS = ("auto", "fp32", "bf16", "int8")
#: Calibration of an int8 graph: this many images, this many tiles each, tiles of about this side.
CALIBRATION_IMAGES = 4
CALIBRATION_TILES_PER_IMAGE = 2
CALIBRATION_TILE = 252
#: Seconds on torch (this job's estimate after its first call, plus earlier unmeasured jobs of the
#: same key) from which a job exports the graph and measures. Measuring costs the quick export
#: (0.1 s for a width-16 network, 1.2 s for the paper's width 64, on a 2-core AMD EPYC) and a few
#: calls on the slower backend; the outputs of every call are used.
MIN_MEASURED_SECONDS = 3.0
#: Timed calls per backend when measuring (after one untimed warm-up call each).
MEASURED_CALLS = 2
CHOICES_FILE = "backends.json"
#: Runners kept for the next part of a job (`make_runner(..., keep=True)`), most recent first out.
KEPT_RUNNERS = 4

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

    def __init__(self, model: UNet, device: torch.device, statistics: BatchNormStatistics | None = None,
                 precision: str = "fp32") -> None:
        self.model = model if statistics is None else with_statistics(model, statistics)
        self.device = device
        self.channels_last = device.type == "cpu"
        self.autocast = None if precision != "bf16" else autocast_dtype(device)

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
        if self.autocast is None:
            return torch.softmax(self.model(x), dim=1)
        with torch.autocast(self.device.type, dtype=self.autocast):
            logits = self.model(x)
        return torch.softmax(logits.float(), dim=1)  # the softmax and what `predict` adds up stay float32


def autocast_dtype(device: torch.device) -> torch.dtype:
    """The reduced-precision dtype "bf16" runs in on `device`: bfloat16 on the CPU and on GPUs
    that support it, float16 on other GPUs."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


class OnnxRunner:
    """The network's ONNX graph (probabilities out) in an onnxruntime CPU session; with
    `statistics`, the graph whose batch-norm statistics are inputs, fed with them."""

    name = "onnxruntime"

    def __init__(self, model: UNet, statistics: BatchNormStatistics | None = None, *, int8: bool = False,
                 calibration: Calibration | None = None) -> None:
        fed = statistics is not None
        self.session = _session(model, fed=fed, int8=int8, calibration=calibration)
        self.feeds = statistics_feeds(statistics) if fed else {}

    @contextlib.contextmanager
    def active(self) -> Iterator["OnnxRunner"]:
        yield self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from .export.graphs import INPUT_NAME

        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {INPUT_NAME: array, **self.feeds})[0])


class AutoRunner:
    """Torch first; on a long enough CPU job, both backends timed on the job's tiles, then the faster."""

    name = "auto"

    def __init__(
        self, model: UNet, device: torch.device, key: str, calls: int, statistics: BatchNormStatistics | None = None
    ) -> None:
        self.model, self.key, self.calls_left, self.statistics = model, key, int(calls), statistics
        self.torch = TorchRunner(model, device, statistics)
        self.onnx: OnnxRunner | None = None
        self.chosen: Runner | None = None
        known = read_choices().get(key, {})
        self.remembered = known.get("backend")
        self.earlier_torch_seconds = float(known.get("unmeasured_torch_seconds", 0.0))
        self.torch_started: float | None = None
        self._torch_active = False
        self.times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
        self.first_seconds: float | None = None
        self.torch_seconds = 0.0  # spent in `active` since torch's first call, while unmeasured
        self._stack = contextlib.ExitStack()

    @property
    def choice(self) -> str | None:
        """The backend chosen for the rest of the job (None while undecided)."""
        return None if self.chosen is None else self.chosen.name

    @contextlib.contextmanager
    def active(self) -> Iterator["AutoRunner"]:
        entered = time.perf_counter()
        try:
            with self._stack:  # torch's context (channels-last weights) is entered by its first call
                yield self
        finally:
            self._torch_active = False  # a kept runner enters torch's context again in the next part
        if self.remembered is None and self.onnx is None and self.torch_started is not None:
            # a job that ran on torch without measuring: count its seconds towards the next one's decision
            self.torch_seconds += time.perf_counter() - max(entered, self.torch_started)
            spent = self.earlier_torch_seconds + self.torch_seconds
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
        return projected >= MIN_MEASURED_SECONDS or self._graph_path().is_file()

    def _graph_path(self) -> Path:
        return graph_path(self.model) if self.statistics is None else fed_graph_path(self.model)

    def _onnx(self) -> OnnxRunner:
        return OnnxRunner(self.model, self.statistics)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls_left -= 1
        if self.chosen is not None:
            return self._run(self.chosen, x)
        if self.onnx is None:
            if self.remembered == "torch":
                self.chosen = self.torch
                return self._run(self.chosen, x)
            if self.remembered == "onnxruntime" and self._graph_path().is_file():
                self.chosen = self.onnx = self._onnx()
                return self.chosen(x)
            if self.first_seconds is None:  # torch's first call: a warm-up that also sizes the job
                self.torch_started = started = time.perf_counter()
                out = self._run(self.torch, x)
                self.first_seconds = time.perf_counter() - started
                if not self._worth_measuring(self.first_seconds):
                    self.chosen = self.torch
                return out
            self.onnx = self._onnx()
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
    model: UNet,
    backend: str,
    device: torch.device,
    batch_shape: tuple[int, int, int],
    *,
    calls: int,
    statistics: BatchNormStatistics | None = None,
    keep: bool = False,
    precision: str | tuple[str, ...] = "fp32",
    calibration: Calibration | None = None,
):
    """The runner for `backend` ("auto", "torch", "onnxruntime"); use it as a context manager.

    `batch_shape` is (batch size, tile height, tile width) of the job and `calls` how many
    batches it will run (with test-time augmentation, 8 per batch of tiles): "auto" decides with them.
    `statistics`: batch-norm statistics to use instead of the model's (None: the model's).
    `keep`: reuse the runner of an earlier call with the same model, backend, batch shape,
    statistics, device and thread (one part of a job split in parts; `calls` is then the whole job's).
    `precision`: "fp32", "bf16" (torch under autocast), "int8" (the quantised graph on onnxruntime;
    `calibration` gives the images to calibrate it on when it is not cached yet), or a tuple of
    them: the fastest, measured once for this model, tile, threads and CPU (`fastest`).
    """

    check_backend(backend, device)
    if statistics is not None and not batch_norm_layers(model):
        statistics = None
    if not isinstance(precision, str):
        precision = fastest(model, tuple(precision), device, batch_shape, statistics=statistics, calibration=calibration)
    if not keep:
        return _new_runner(model, backend, device, batch_shape, calls, statistics, precision, calibration).active()
    key = (
        backend, weights_hash(model), None if statistics is None else statistics.fingerprint, tuple(batch_shape),
        str(device), threading.get_ident(), torch.get_num_threads(), precision,
    )
    with _KEPT_LOCK:
        runner = _KEPT.pop(key, None)
        if runner is None:
            runner = _new_runner(model, backend, device, batch_shape, calls, statistics, precision, calibration)
        _KEPT[key] = runner
        while len(_KEPT) > KEPT_RUNNERS:
            _KEPT.popitem(last=False)
    return runner.active()


def _new_runner(model: UNet, backend: str, device: torch.device, batch_shape: tuple[int, int, int], calls: int,
                statistics: BatchNormStatistics | None, precision: str = "fp32", calibration: Calibration | None = None):

    check_runnable(precision, backend, device)
    if precision == "int8":
        return OnnxRunner(model, statistics, int8=True, calibration=calibration)
    if precision == "bf16":
        return TorchRunner(model, device, statistics, precision)
    if backend == "onnxruntime":
        return OnnxRunner(model, statistics)
    if backend == "torch" or device.type != "cpu" or not onnxruntime_available():
        return TorchRunner(model, device, statistics)
    return AutoRunner(model, device, choice_key(model, batch_shape, statistics), calls, statistics)


_KEPT: "OrderedDict[tuple, TorchRunner | OnnxRunner | AutoRunner]" = OrderedDict()
_KEPT_LOCK = threading.Lock()


# -- the exported graph, cached per set of weights --------------------------------------------

_FINGERPRINTS: "weakref.WeakKeyDictionary[UNet, tuple[tuple, str]]" = weakref.WeakKeyDictionary()
_SESSIONS: dict[tuple[str, int, bool], Any] = {}


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


def fed_graph_path(model: UNet) -> Path:
    """Where the graph of `model` whose batch-norm statistics are inputs is (or will be) cached."""
    return cache_dir() / "onnx" / f"{weights_hash(model)[:32]}-fed-statistics.onnx"


def cached_graph(model: UNet, fed: bool = False) -> Path:
    """The cached ONNX graph of `model` (with `fed`, the one taking batch-norm statistics as
    inputs), exported now if it is not cached yet."""
    from .export.graphs import quick_onnx_bytes

    path = fed_graph_path(model) if fed else graph_path(model)
    if not path.is_file():
        data = fed_statistics_onnx_bytes(model) if fed else quick_onnx_bytes(model)
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), force=True)
    return path


def int8_graph_path(model: UNet, fed: bool = False) -> Path:
    """Where the int8 graph of `model`'s current weights (with `fed`, of its fed-statistics graph)
    is (or will be) cached: beside the float graph, named by the same weights hash."""
    float_graph = fed_graph_path(model) if fed else graph_path(model)
    return float_graph.with_name(float_graph.stem + "-int8.onnx")


#: Images to calibrate an int8 graph on (normalised, (H, W) or (C, H, W)), or a function giving them
#: (called only when the graph is not cached yet).
Calibration = Union[Sequence[np.ndarray], Callable[[], Sequence[np.ndarray]]]


def cached_int8_graph(model: UNet, fed: bool = False, calibration: Calibration | None = None) -> Path:
    """The cached int8 graph of `model`, quantised now (calibrated on `calibration`) if not cached yet."""
    from .export.graphs import quantized_onnx_bytes

    path = int8_graph_path(model, fed)
    if not path.is_file():
        images = calibration() if callable(calibration) else calibration
        if not images:
            raise InputError("int8 needs calibration images to quantise the network once: predict with a packaged model "
                             "or a run's best.pt (its data.json names them), or give calibration images; else use precision fp32")
        source = cached_graph(model, fed)
        data = quantized_onnx_bytes(source, calibration_feeds(model, images, fed=fed))
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), force=True)
    return path


def _session(model: UNet, fed: bool = False, int8: bool = False, calibration: Calibration | None = None):
    from .export.graphs import onnx_session

    digest = weights_hash(model)
    key = (digest, torch.get_num_threads(), fed, int8)
    make = (lambda: cached_int8_graph(model, fed, calibration)) if int8 else (lambda: cached_graph(model, fed))
    if key not in _SESSIONS:
        for other in [k for k in _SESSIONS if k[0] != digest]:
            del _SESSIONS[other]  # one network's sessions at a time: they hold a copy of the weights
        path = make()
        try:
            _SESSIONS[key] = onnx_session(path)
        except Exception:  # noqa: BLE001 - a damaged cache file (truncated, overwritten): build it again
            path.unlink(missing_ok=True)
            _SESSIONS[key] = onnx_session(make())
    return _SESSIONS[key]


# -- batch-norm statistics as graph inputs ----------------------------------------------------


def statistics_input_names(count: int) -> list[str]:
    """Names of the fed graph's statistics inputs: mean and variance of each batch-norm layer."""
    return [f"bn{i}_{what}" for i in range(count) for what in ("mean", "var")]


def statistics_feeds(statistics: BatchNormStatistics) -> dict[str, np.ndarray]:
    """The fed graph's statistics inputs for `statistics`."""
    arrays = [a for pair in zip(statistics.means, statistics.variances) for a in pair]
    return dict(zip(statistics_input_names(len(statistics)), arrays))


class _FedNorm(nn.Module):
    """Batch norm in eval mode whose mean and variance are set by `_FedStatistics` for each call."""

    def __init__(self, layer: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = layer.weight, layer.bias, float(layer.eps)
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(x, self.mean, self.var, self.weight, self.bias, False, 0.0, self.eps)


class _FedStatistics(nn.Module):
    """softmax(model(x)) with each batch-norm layer's statistics taken from the inputs after x."""

    def __init__(self, model: UNet) -> None:
        super().__init__()
        import copy

        self.model = copy.deepcopy(model).cpu().float().eval()
        for module in list(self.model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    setattr(module, name, _FedNorm(child))
        self.norms = [m for m in self.model.modules() if isinstance(m, _FedNorm)]

    def forward(self, x: torch.Tensor, *statistics: torch.Tensor) -> torch.Tensor:
        for norm, mean, var in zip(self.norms, statistics[0::2], statistics[1::2]):
            norm.mean, norm.var = mean, var
        return torch.softmax(self.model(x), dim=1)


def fed_statistics_onnx_bytes(model: UNet) -> bytes:
    """ONNX bytes of `model` with softmax whose batch-norm means and variances are inputs
    (`statistics_input_names`) after the image, for onnxruntime's own use. Dynamic in batch,
    height and width."""
    from .export.graphs import traced_onnx_bytes

    layers = batch_norm_layers(model)
    stats = [t.detach().cpu().float().clone() for layer in layers for t in (layer.running_mean, layer.running_var)]
    try:
        return traced_onnx_bytes(_FedStatistics(model), model, stats, statistics_input_names(len(stats) // 2))
    except Exception as exc:  # noqa: BLE001 - torch without the TorchScript-based exporter
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"cannot export the graph with batch-norm statistics as inputs ({first}); use backend 'torch'"
        ) from None


# -- remembered choices -----------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def choice_key(model: UNet, batch_shape: tuple[int, int, int], statistics: BatchNormStatistics | None = None,
               precisions: tuple[str, ...] | None = None) -> str:
    """What the speed of the backends depends on: architecture, batch and tile, threads, CPU,
    versions, and whether batch-norm statistics are fed (another graph); with `precisions`, the key
    of the choice among those precisions (`fastest`)."""
    import importlib.metadata as metadata

    versions = {}
    for name in ("onnxruntime",):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    facts = {
        "model": model.config, "batch": list(batch_shape), "threads": torch.get_num_threads(),
        "cpu": cpu_name(), "torch": torch.__version__, **versions,
    }
    if statistics is not None:
        facts["statistics"] = "fed"
    if precisions is not None:
        facts["precisions"] = sorted(precisions)
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


# -- precisions: what the machine runs --------------------------------------------------------


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this machine's CPU as /proc/cpuinfo lists them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


#: CPU flags of instructions that compute in bf16; without them oneDNN emulates bf16 with AVX-512
#: (slower than fp32: 163 vs 274-314 GFLOP/s matmul on an Intel Xeon without them).
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def bf16_native(device: str = "cpu") -> bool:
    """Whether `device` computes bf16 natively: a CPU with AVX512-BF16 or AMX-BF16 instructions (and
    oneDNN built to use them), or a GPU. A CPU whose flags cannot be read counts as without."""
    kind = str(device).split(":")[0]
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind != "cpu" or not BF16_FLAGS & cpu_flags():
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def int8_available() -> bool:
    """Whether onnxruntime (with its quantisation tools) and the ONNX exporter can be imported."""
    import importlib.util

    return onnxruntime_available() and importlib.util.find_spec("onnxruntime.quantization") is not None


def check_name(precision: str) -> str:
    """Return `precision` if it is one of `PRECISIONS`, else raise InputError (needs no torch)."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be auto, fp32, bf16 or int8 (got {precision!r})")
    return precision


def check_runnable(precision: str, backend: str, device) -> str:
    """Return `precision` ("fp32", "bf16" or "int8") if it can run with `backend` on `device`, else
    raise InputError naming the fix."""
    check_name(precision)
    kind = str(device).split(":")[0]
    if precision == "bf16":
        if backend == "onnxruntime":
            raise InputError("precision bf16 runs on torch; use backend torch or auto, or precision fp32")
        if not bf16_native(str(device)):
            where = "this CPU has neither AVX512-BF16 nor AMX" if kind == "cpu" else f"device {device} has no bf16 autocast here"
            raise InputError(f"precision bf16 needs native bf16 and {where}; use precision fp32")
    if precision == "int8":
        if not int8_available():
            raise InputError("precision int8 needs onnxruntime, onnx and onnxscript: pip install 'unetkit[export]', or use precision fp32")
        if kind != "cpu":
            raise InputError(f"precision int8 runs on the CPU, but the device is {device}; use device cpu or precision fp32")
        if backend == "torch":
            raise InputError("precision int8 runs on onnxruntime; use backend onnxruntime or auto, or precision fp32")
    if precision == "auto":
        raise InputError("precision auto is resolved before running; give fp32, bf16 or int8")
    return precision


# -- precisions: the fastest, measured once ---------------------------------------------------


def measure_seconds(model, precision: str, device, batch_shape: tuple[int, int, int], *, statistics=None,
                    calibration=None) -> float:
    """Best seconds per call of `precision` on a batch of `batch_shape` random tiles (one untimed
    warm-up call, then `MEASURED_CALLS` timed ones); fp32 takes the faster of torch and
    onnxruntime, as the "auto" backend would. Speed does not depend on the pixel values."""
    if precision == "fp32":
        names = ["torch"] + (["onnxruntime"] if device.type == "cpu" and onnxruntime_available() else [])
    else:
        names = ["torch" if precision == "bf16" else "onnxruntime"]
    batch = torch.from_numpy(np.random.default_rng(0).random((batch_shape[0], model.in_channels, *batch_shape[1:]),
                                                             dtype=np.float32))
    best = float("inf")
    for name in names:
        runner = _new_runner(model, name, device, batch_shape, 1, statistics, precision, calibration)
        with runner.active() as run:
            run(batch)
            for _ in range(MEASURED_CALLS):
                started = time.perf_counter()
                run(batch)
                best = min(best, time.perf_counter() - started)
    return best


def fastest(model, candidates: tuple[str, ...], device, batch_shape: tuple[int, int, int], *, statistics=None,
            calibration=None) -> str:
    """The fastest of `candidates` for `model` on batches of `batch_shape`: remembered in the backend
    choices (`unetkit.read_choices`) per model, tile, threads and CPU, else measured now
    (`measure_seconds`) and remembered."""
    if len(candidates) == 1:
        return candidates[0]
    key = choice_key(model, batch_shape, statistics, precisions=candidates)
    known = read_choices().get(key, {})
    if known.get("precision") in candidates:
        return known["precision"]
    seconds = {p: measure_seconds(model, p, device, batch_shape, statistics=statistics, calibration=calibration)
               for p in candidates}
    chosen = min(candidates, key=lambda p: seconds[p])
    update_choice(key, {"precision": chosen, "seconds_per_call": {p: round(s, 4) for p, s in seconds.items()}},
                           replace=True)
    return chosen


# -- precisions: int8 calibration -------------------------------------------------------------


def calibration_feeds(model, images: Sequence[np.ndarray], *, fed: bool = False) -> list[dict[str, np.ndarray]]:
    """Calibration inputs of an int8 graph: `CALIBRATION_TILES_PER_IMAGE` tiles of side about
    `CALIBRATION_TILE` from each of the first `CALIBRATION_IMAGES` normalised `images`, at seeded
    positions; with `fed`, each image's own batch-norm statistics beside its tiles."""
    from .adapt import gather_statistics
    from .export.graphs import INPUT_NAME
    from .tiling import extract_region, with_channel_axis

    geometry = model.geometry
    sizes = geometry.legal_sizes(CALIBRATION_TILE)
    tile = sizes[-1] if sizes else geometry.min_size
    rng = np.random.default_rng(0)
    feeds = []
    for image in list(images)[:CALIBRATION_IMAGES]:
        image = np.asarray(image, dtype=np.float32)
        image = with_channel_axis(image) if image.ndim == 2 else image
        height, width = image.shape[-2:]
        tiles = [extract_region(image, int(rng.integers(0, max(height - tile, 0) + 1)),
                                int(rng.integers(0, max(width - tile, 0) + 1)), tile, tile)
                 for _ in range(CALIBRATION_TILES_PER_IMAGE)]
        feed = {INPUT_NAME: np.ascontiguousarray(np.stack(tiles), dtype=np.float32)}
        if fed:
            feed.update(statistics_feeds(gather_statistics(model, image, (tile, tile))))
        feeds.append(feed)
    return feeds
