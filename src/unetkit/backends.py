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
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from .adapt import BatchNormStatistics, batch_norm_layers, with_statistics
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

    def __init__(self, model: UNet, device: torch.device, statistics: BatchNormStatistics | None = None) -> None:
        self.model = model if statistics is None else with_statistics(model, statistics)
        self.device = device
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
    """The network's ONNX graph (probabilities out) in an onnxruntime CPU session; with
    `statistics`, the graph whose batch-norm statistics are inputs, fed with them."""

    name = "onnxruntime"

    def __init__(self, model: UNet, statistics: BatchNormStatistics | None = None) -> None:
        if statistics is None:
            self.session, self.feeds = _session(model, fed=False), {}
        else:
            self.session, self.feeds = _session(model, fed=True), statistics_feeds(statistics)

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
):
    """The runner for `backend` ("auto", "torch", "onnxruntime"); use it as a context manager.

    `batch_shape` is (batch size, tile height, tile width) of the job and `calls` how many
    batches it will run (with test-time augmentation, 8 per batch of tiles): "auto" decides with them.
    `statistics`: batch-norm statistics to use instead of the model's (None: the model's).
    `keep`: reuse the runner of an earlier call with the same model, backend, batch shape,
    statistics, device and thread (one part of a job split in parts; `calls` is then the whole job's).
    """
    check_backend(backend, device)
    if statistics is not None and not batch_norm_layers(model):
        statistics = None
    if not keep:
        return _new_runner(model, backend, device, batch_shape, calls, statistics).active()
    key = (
        backend, weights_hash(model), None if statistics is None else statistics.fingerprint, tuple(batch_shape),
        str(device), threading.get_ident(), torch.get_num_threads(),
    )
    with _KEPT_LOCK:
        runner = _KEPT.pop(key, None)
        if runner is None:
            runner = _new_runner(model, backend, device, batch_shape, calls, statistics)
        _KEPT[key] = runner
        while len(_KEPT) > KEPT_RUNNERS:
            _KEPT.popitem(last=False)
    return runner.active()


def _new_runner(model: UNet, backend: str, device: torch.device, batch_shape: tuple[int, int, int], calls: int,
                statistics: BatchNormStatistics | None):
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


def _session(model: UNet, fed: bool = False):
    from .export.graphs import onnx_session

    digest = weights_hash(model)
    key = (digest, torch.get_num_threads(), fed)
    if key not in _SESSIONS:
        for other in [k for k in _SESSIONS if k[0] != digest]:
            del _SESSIONS[other]  # one network's sessions at a time: they hold a copy of the weights
        path = cached_graph(model, fed)
        try:
            _SESSIONS[key] = onnx_session(path)
        except Exception:  # noqa: BLE001 - a damaged cache file (truncated, overwritten): export it again
            path.unlink(missing_ok=True)
            _SESSIONS[key] = onnx_session(cached_graph(model, fed))
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


def choice_key(model: UNet, batch_shape: tuple[int, int, int], statistics: BatchNormStatistics | None = None) -> str:
    """What the speed of the backends depends on: architecture, batch and tile, threads, CPU,
    versions, and whether batch-norm statistics are fed (another graph)."""
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
