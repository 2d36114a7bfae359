"""A network as a self-contained graph file: ONNX (dynamic batch and spatial axes) or TorchScript.

The files `export_onnx` and `export_torchscript` write take a float32 batch (N, C, H, W) of
normalised images of ANY size and return class probabilities of the same size (N, n_classes, H, W);
for a 3D U-Net the batch is of volumes (N, C, Z, Y, X), each axis mirrored with its own geometry
(`AnyVolume`), and the result equals `unetkit.volume.predict_volume` with one covering tile:
inside the graph the input is mirror-padded to the one tile that `unetkit.predict` would use for
the whole image (`covering_size`, mirrored as `unetkit.tiling.extract_region` mirrors) and the
result is cropped, so it equals `predict(model, image, tta=False, norm_statistics="training",
tile_size=covering_size(...))`. The softmax is part of the graph, so a consumer needs nothing from
unetkit. Each file is checked before it is written: its outputs must equal the network's within
`TOLERANCE` at a size other than the one it was traced at, so a graph that froze a size or a
data-dependent branch during tracing is refused instead of written.

`onnx_program(model)` and `quick_onnx_bytes` (the onnxruntime backend's graph) keep the raw network:
legal sizes only, output smaller by twice the border for padding "valid".

Example:
    >>> from unetkit import UNet
    >>> export_onnx(UNet(depth=3, base_channels=4), "unet.onnx")  # doctest: +SKIP
    PosixPath('unet.onnx')
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..geometry import Geometry, VolumeGeometry
from ..io import atomic_write
from ..network import UNet
from .architecture import mirror_indices, padded_size, run_any_size

#: Largest absolute difference allowed between an exported graph's probabilities and the network's.
TOLERANCE = 1e-4
#: ONNX opset written by `export_onnx`.
OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "output"


class Probabilities(nn.Module):
    """`softmax(model(x), dim=1)`: the network with its class probabilities as output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)


def any_size_layout(geometry: Geometry) -> tuple[int, int, int, int]:
    """(before, base, step, keep) of the any-size graph: mirror `before` pixels above and left of
    the image, pad to a size `base + k * step`, keep the output from `keep` on (see
    `architecture.run_any_size`). These are the input offset, smallest tile and crop of a one-tile
    `tiling.plan_tiles`.

    Example:
        >>> any_size_layout(Geometry(depth=3)), any_size_layout(Geometry(depth=3, padding="same"))
        ((20, 44, 4, 0), (20, 4, 4, 20))
    """
    from ..tiling import same_margin

    if geometry.padding == "valid":
        return geometry.border, geometry.min_size, geometry.step, 0
    margin = same_margin(geometry)
    return margin, geometry.min_size, geometry.step, margin


def covering_size(geometry: Geometry, size: int) -> int:
    """The legal tile size whose one tile covers `size` pixels: what the any-size graphs pad to.

    Example:
        >>> covering_size(Geometry(depth=3), 100), covering_size(Geometry(depth=3, padding="same"), 100)
        (140, 140)
    """
    before, base, step, _ = any_size_layout(geometry)
    return int(padded_size(int(size), before, base, step))


class AnySize(Probabilities):
    """`Probabilities` for an input of any size, with an output of the same size: the input is
    mirror-padded to `covering_size` and the result cropped (see `any_size_layout`)."""

    def __init__(self, model: nn.Module, geometry: Geometry) -> None:
        super().__init__(model)
        self.layout = any_size_layout(geometry)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_any_size(super().forward, x, *self.layout)


def run_any_volume(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   layouts: Sequence[tuple[int, int, int, int]]) -> torch.Tensor:
    """`run_any_size` for volumes: each of the last three axes (z, y, x) mirror-padded and cropped
    with its own (before, base, step, keep) layout.

    Example:
        >>> run_any_volume(lambda v: v, torch.rand(1, 1, 3, 5, 6), [(1, 4, 1, 1), (2, 8, 2, 2), (2, 8, 2, 2)]).shape
        torch.Size([1, 1, 3, 5, 6])
    """
    sizes = [x.shape[axis] for axis in (-3, -2, -1)]
    for axis, size, (before, base, step, _) in zip((-3, -2, -1), sizes, layouts):
        x = x.index_select(axis, mirror_indices(-before, padded_size(size, before, base, step), size))
    y = forward(x)
    kz, ky, kx = (layout[3] for layout in layouts)
    return y[..., kz : kz + sizes[0], ky : ky + sizes[1], kx : kx + sizes[2]]


class AnyVolume(Probabilities):
    """`AnySize` for a 3D U-Net: a volume (N, C, Z, Y, X) of any size in, probabilities of the same
    size out; each axis is padded to its own covering size (`any_size_layout` of the axis)."""

    def __init__(self, model: nn.Module, geometry: VolumeGeometry) -> None:
        super().__init__(model)
        self.layouts = tuple(any_size_layout(axis) for axis in geometry.axes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_any_volume(super().forward, x, self.layouts)


def example_sizes(model: UNet) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Two different small legal sizes, (h, w) or for a 3D U-Net (z, y, x): one to trace at, one
    to check the graph at."""
    g = model.geometry
    if isinstance(g, VolumeGeometry):
        (sz, sy, sx), first = g.step, tuple(m + s for m, s in zip(g.min_shape, g.step))
        return (first[0], first[1], first[2] + sx), (first[0] + sz, first[1] + 2 * sy, first[2])
    first = g.min_size + g.step
    return (first, first + g.step), (first + 2 * g.step, first)


def _inference_copy(model: UNet, any_size: bool = False) -> Probabilities:
    if not isinstance(model, UNet):
        raise TypeError(f"model must be a unetkit.UNet, got {type(model).__name__}")
    net = copy.deepcopy(model).cpu().float().eval()
    if not any_size:
        return Probabilities(net)
    return AnyVolume(net, model.geometry) if isinstance(model.geometry, VolumeGeometry) else AnySize(net, model.geometry)


def _dynamic_names(model: UNet) -> dict[int, str]:
    """The dynamic axes of a graph's input: batch and every spatial axis."""
    spatial = ("depth", "height", "width") if isinstance(model.geometry, VolumeGeometry) else ("height", "width")
    return {0: "batch", **{2 + i: name for i, name in enumerate(spatial)}}


def _example(model: UNet, size: tuple[int, int], batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, model.in_channels, *size, generator=generator)


@contextlib.contextmanager
def _layer_watch(module: nn.Module) -> Iterator[list[str]]:
    """Record, while tracing, the layers entered and not yet left (innermost last).

    When tracing fails inside a layer, the list names it: hooks run in Python during both
    `torch.jit.trace` and non-strict `torch.export`.
    """
    names = {m: name for name, m in module.named_modules()}
    stack: list[str] = []
    handles = []

    def enter(m: nn.Module, _args) -> None:  # noqa: ANN001
        stack.append(names.get(m, type(m).__name__))

    def leave(m: nn.Module, _args, _out) -> None:  # noqa: ANN001
        if stack:
            stack.pop()

    for m in module.modules():
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _describe_layer(module: nn.Module, path: str) -> str:
    name = path.removeprefix("model.") or "the network"
    try:
        layer = module.get_submodule(path) if path else module
    except AttributeError:
        return name
    return f"{name} ({type(layer).__name__})"


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).strip().splitlines()[:1]) or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + " ..."


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress lines, deprecation notes and graph dumps on failure."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "torch._export", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _trace(wrapped: Probabilities, trace: Callable[[], object], what: str) -> object:
    """Run `trace()`; a failure becomes an InputError naming the layer it happened in."""
    with _layer_watch(wrapped) as stack:
        try:
            return trace()
        except Exception as exc:  # noqa: BLE001 - any tracer failure is reported with its layer
            where = f"in layer {_describe_layer(wrapped, stack[-1])}" if stack else "outside any layer"
            raise InputError(
                f"cannot export to {what}: tracing failed {where}: {_first_line(exc)}; "
                "that layer needs code the tracer can follow (no data-dependent Python branches, NumPy or .item())"
            ) from None


def _first_mismatching_layer(wrapped: Probabilities, a: torch.Tensor, b: torch.Tensor) -> str | None:
    """The first leaf layer whose own TorchScript trace (on its input from `a`) differs on `b`."""
    records: dict[str, list[torch.Tensor]] = {}
    handles = []
    leaves = [(n, m) for n, m in wrapped.named_modules() if not list(m.children())]
    for name, m in leaves:
        handles.append(m.register_forward_hook(lambda mod, args, out, name=name: records.setdefault(name, []).append(args[0])))
    try:
        with torch.no_grad():
            wrapped(a)
            wrapped(b)
    finally:
        for h in handles:
            h.remove()
    for name, m in leaves:
        inputs = records.get(name, [])
        if len(inputs) < 2:
            continue
        try:
            with _quiet(), torch.no_grad():
                traced = torch.jit.trace(m, inputs[0], check_trace=False)
                if not torch.allclose(traced(inputs[1]), m(inputs[1]), atol=TOLERANCE, rtol=0):
                    return name
        except Exception:  # noqa: BLE001 - a layer that cannot be traced alone is the culprit too
            return name
    return None


def check_graph(model: UNet, run: Callable[[np.ndarray], np.ndarray], what: str, wrapped: Probabilities | None = None) -> float:
    """Largest difference between `run` (a graph) and `wrapped` (default: the network) at a size
    not traced at (legal; for an `AnySize` graph, illegal); raises InputError above `TOLERANCE`."""
    wrapped = wrapped or _inference_copy(model)
    trace_size, check_size = example_sizes(model)
    if isinstance(wrapped, (AnySize, AnyVolume)):
        check_size = (*(size + 1 for size in check_size[:-1]), check_size[-1] + 3)
    x = _example(model, check_size, batch=2, seed=1)
    with torch.no_grad():
        expected = wrapped(x).numpy()
    try:
        got = np.asarray(run(x.numpy()))
    except Exception as exc:  # noqa: BLE001 - the graph fixed a size or cannot run
        got, problem = None, _first_line(exc)
    else:
        problem = None if got.shape == expected.shape else f"output shape {got.shape}, expected {expected.shape}"
    difference = float(np.abs(got - expected).max()) if problem is None else float("inf")
    if difference <= TOLERANCE:
        return difference
    problem = problem or f"outputs differ by {difference:.3g} (allowed {TOLERANCE:g})"
    layer = _first_mismatching_layer(wrapped, _example(model, trace_size), x)
    where = f" in layer {_describe_layer(wrapped, layer)}" if layer else ""
    raise InputError(
        f"cannot export to {what}: the traced graph does not reproduce the network at input size {check_size}{where}: "
        f"{problem}; that layer depends on the input size or values in Python code the tracer cannot follow"
    )


def export_torchscript(model: UNet, path: str | os.PathLike, *, force: bool = False, any_size: bool = True) -> Path:
    """Write `model` (with softmax) as a traced TorchScript file.

    Load it with `torch.jit.load(path)`; it maps (N, C, H, W) float32 to probabilities of the same
    size, for any H and W (`AnySize`; volumes (N, C, Z, Y, X) for a 3D U-Net, `AnyVolume`); with
    `any_size=False`, the raw network (legal sizes only).
    Raises InputError if tracing fails (naming the layer) or the graph does not reproduce the
    network within `TOLERANCE`; FileExistsError if `path` exists and not `force`.

    Example:
        >>> export_torchscript(UNet(depth=3, base_channels=4), "unet.pt")  # doctest: +SKIP
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path}: already exists; use --force to overwrite it")
    wrapped = _inference_copy(model, any_size)
    trace_size, _ = example_sizes(model)
    with _quiet(), torch.no_grad():
        traced = _trace(wrapped, lambda: torch.jit.trace(wrapped, _example(model, trace_size), check_trace=False), "TorchScript")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return traced(torch.from_numpy(x)).numpy()

    check_graph(model, run, "TorchScript", wrapped)
    return atomic_write(path, lambda tmp: torch.jit.save(traced, str(tmp)), force=force)


def onnx_program(model: UNet, any_size: bool = False):
    """The ONNX `ModelProto` of `model` with softmax, dynamic in batch and every spatial axis, and the
    wrapped copy of the network it was traced from. With `any_size`, the graph takes any size and
    returns the same size (`AnySize`); without, legal sizes only.

    Needs onnx and onnxscript (``pip install unetkit[export]``).
    """
    _require("onnxscript", "ONNX export")
    wrapped = _inference_copy(model, any_size)
    trace_size, _ = example_sizes(model)
    x = _example(model, trace_size, batch=2)  # a batch of 1 would be fixed at 1
    names = _dynamic_names(model)
    dims = {axis: torch.export.Dim.DYNAMIC for axis in names}
    with _quiet(), torch.no_grad():
        exported = _trace(
            wrapped, lambda: torch.export.export(wrapped, (x,), dynamic_shapes={"x": dims}, strict=False), "ONNX"
        )
        try:
            program = torch.onnx.export(
                exported, (x,), dynamo=True, external_data=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False,
            )
        except Exception as exc:  # noqa: BLE001 - an operator without an ONNX translation
            raise InputError(f"cannot export to ONNX: {_first_line(exc)}") from None
    proto = program.model_proto
    for axis, dim in enumerate(proto.graph.input[0].type.tensor_type.shape.dim):
        if axis in names:
            dim.dim_param = names[axis]
    return proto, wrapped


def quick_onnx_bytes(model: UNet) -> bytes:
    """ONNX bytes of `model` with softmax for onnxruntime's own use, made fast.

    torch's TorchScript-based exporter writes the graph much faster than the `torch.export` route
    of `onnx_program` (0.11 s against 8.9 s at width 16, 1.1 s against 6.3 s at width 64; see
    benchmarks/results/backend_speed.json), which decides whether the "auto" backend can repay an
    export within one job. Where that exporter is missing or fails, this falls back to
    `onnx_program`. Dynamic in batch, height and width.
    """
    wrapped = _inference_copy(model)
    try:
        return traced_onnx_bytes(wrapped, model)
    except Exception:  # noqa: BLE001 - the older exporter is optional; the standard one follows
        return onnx_program(model)[0].SerializeToString()


def traced_onnx_bytes(module: nn.Module, model: UNet, extra_inputs: Sequence[torch.Tensor] = (),
                      extra_names: Sequence[str] = ()) -> bytes:
    """ONNX bytes of `module` (which computes `model`'s probabilities) from torch's TorchScript-based
    exporter, traced on an example batch of `model`'s input followed by `extra_inputs` (named
    `extra_names`); dynamic in batch, height and width. Raises what the exporter raises."""
    trace_size, _ = example_sizes(model)
    buffer = io.BytesIO()
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            module, (_example(model, trace_size, batch=2), *extra_inputs), buffer, dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME, *extra_names], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: _dynamic_names(model)},
        )
    return buffer.getvalue()


#: Operators whose inputs and weights the int8 graph quantises: the convolutions and up-convolutions
#: hold nearly all of a U-Net's arithmetic; batch norm (fed statistics), pooling and softmax stay float.
QUANTIZED_OPS = ("Conv", "ConvTranspose")


def quantized_onnx_bytes(graph: str | os.PathLike, feeds: Sequence[dict[str, np.ndarray]]) -> bytes:
    """An int8 copy of the float ONNX file `graph`: static quantisation in QDQ form with int8
    per-channel weights and uint8 activations whose ranges (min/max) are calibrated on `feeds`
    (each a dict of the graph's inputs: tiles, and fed batch-norm statistics where the graph has them).

    Example:
        >>> data = quantized_onnx_bytes("unet.onnx", [{"input": tiles}])  # doctest: +SKIP
    """
    _require("onnxruntime", "int8 quantisation")
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    if not feeds:
        raise InputError("int8 quantisation needs calibration tiles; give at least one representative image")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self):  # noqa: ANN201 - onnxruntime's interface
            return next(self.items, None)

    # The quantiser reports through the root logger (configuring it when it has no handler): a
    # handler of our own for the call keeps its advice out of the user's output and their logging as it is.
    root, silent = logging.getLogger(), logging.NullHandler()
    level = root.level
    root.addHandler(silent)
    root.setLevel(logging.CRITICAL)
    try:
        with tempfile.TemporaryDirectory() as folder, _quiet():
            target = Path(folder) / "int8.onnx"
            quantize_static(str(graph), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=list(QUANTIZED_OPS))
            return target.read_bytes()
    finally:
        root.removeHandler(silent)
        root.setLevel(level)


def export_onnx(model: UNet, path: str | os.PathLike, *, force: bool = False, check: bool = True,
                any_size: bool = True) -> Path:
    """Write `model` (with softmax) as one self-contained ONNX file (opset `OPSET`).

    The input "input" is (batch, C, height, width), or (batch, C, depth, height, width) for a 3D
    U-Net, with the batch and spatial sizes dynamic: any size
    (`AnySize`), or with `any_size=False` legal sizes only; the output "output" holds the class
    probabilities, as large as the input (with `any_size`). With `check`, onnxruntime (when installed)
    verifies the file against the network within `TOLERANCE` first.
    Raises InputError if tracing fails (naming the layer) or the check fails; FileExistsError if
    `path` exists and not `force`.

    Example:
        >>> export_onnx(UNet(depth=3, base_channels=4), "unet.onnx")  # doctest: +SKIP
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path}: already exists; use --force to overwrite it")
    proto, wrapped = onnx_program(model, any_size)
    data = proto.SerializeToString()
    if check and _available("onnxruntime"):
        session = onnx_session(data, threads=1)
        check_graph(model, lambda x: session.run(None, {INPUT_NAME: x})[0], "ONNX", wrapped)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), force=force)


def onnx_session(model: bytes | str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session for an ONNX file or its bytes, using `threads` threads
    (default: as many as torch uses)."""
    ort = _require("onnxruntime", "the onnxruntime backend")
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle threads sleep instead of spinning: spinning workers would steal the cores from torch
    # between calls (the "auto" backend alternates the two while it measures).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _require(name: str, what: str):
    """Import `name`, or raise InputError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise InputError(f"{what} needs the Python package {name}: pip install 'unetkit[export]'") from None
