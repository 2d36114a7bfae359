"""Checkpoints that hold everything prediction needs: weights, network configuration,
normalisation and class names, plus the training state needed to resume exactly.

They are plain `torch.save` dictionaries of tensors and primitive values, written atomically
(temporary file + rename) and read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data.normalize import Normalization
from .errors import InputError
from .io import atomic_write
from .network import UNet

FORMAT = "unetkit-checkpoint"
VERSION = 1


@dataclass
class LoadedModel:
    """A model restored from a checkpoint, with what prediction needs to use it."""

    model: UNet
    normalization: Normalization
    class_names: list[str]
    train_config: dict[str, Any] = field(default_factory=dict)
    iteration: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    decision: dict[str, Any] = field(default_factory=dict)  # labels rule chosen on validation (see unetkit.decision)
    scale: dict[str, Any] = field(default_factory=dict)  # objects of the training masks: {"diameter": px, "pixel_size": um}


def save_checkpoint(
    path: str | os.PathLike,
    model: UNet,
    *,
    normalization: Normalization,
    class_names: list[str],
    train_config: dict[str, Any] | None = None,
    iteration: int = 0,
    state: dict[str, Any] | None = None,
    decision: dict[str, Any] | None = None,
    scale: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (always replaces `path`: checkpoints belong to the run).

    `state` holds the resumable training state (optimiser, RNG states, metrics); `decision` the
    rule that turns probabilities into labels (`unetkit.decision.DecisionRule.to_dict()`); `scale`
    the object scale of the training masks (`unetkit.train.training_scale`), which
    `unetkit.scale` rescales new images to.
    """
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": dict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "normalization": normalization.to_dict(),
        "class_names": list(class_names),
        "train_config": train_config or {},
        "iteration": int(iteration),
        "state": state or {},
        "decision": decision or {},
        "scale": scale or {},
    }

    def write(tmp: Path) -> None:
        try:
            torch.save(payload, tmp)
        except (OSError, RuntimeError) as exc:  # RuntimeError: torch's zip writer ("enforce fail at inline_container.cc")
            raise _WriteFailed(exc) from exc

    try:
        return atomic_write(path, write, force=True)  # removes the temporary file whatever fails
    except (_WriteFailed, OSError) as exc:
        raise _not_written(Path(path), exc.args[0] if isinstance(exc, _WriteFailed) else exc, int(iteration),
                           bool(train_config)) from None


class _WriteFailed(Exception):
    """torch.save failed; carries its error past `atomic_write` to `_not_written`."""


#: What a failed write's errno means, and what frees the way.
_WRITE_ERRORS = {
    28: ("the disk is full (errno 28)", "free disk space"),
    30: ("the file system is read-only (errno 30)", "make the folder writable"),
    27: ("the file is too large for this file system (errno 27)", "use a file system that allows larger files"),
    122: ("the disk quota is exceeded (errno 122)", "free space within your quota"),
}


def _not_written(path: Path, exc: OSError | RuntimeError, iteration: int, training: bool) -> InputError:
    """One line for a checkpoint that could not be written: the file, why, what was kept and the fix.

    Example:
        >>> str(_not_written(Path("run/last.pt"), OSError(28, "No space left on device"), 7, True))[:73]
        'run/last.pt: cannot write the checkpoint of iteration 7: the disk is full'
    """
    errno = getattr(exc, "errno", None)
    reason, fix = _WRITE_ERRORS.get(errno, (None, "check free disk space and permissions"))
    if reason is None:
        detail = " ".join(str(exc).split())
        reason = f"the write failed ({detail[:200]}{' ...' if len(detail) > 200 else ''})"
    kept = f"the previous {path.name} is unchanged" if path.is_file() else f"no {path.name} was written"
    then = f"then continue with `unetkit train --resume {path.parent}`" if training else "then save it again"
    return InputError(f"{path}: cannot write the checkpoint of iteration {iteration}: {reason}; {kept}. {fix[0].upper()}{fix[1:]}, {then}")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Restore a model saved by `save_checkpoint`.

    Example:
        >>> loaded = load_checkpoint("run/best.pt")  # doctest: +SKIP
        >>> probabilities = unetkit.predict(loaded.model, loaded.normalization(image))  # doctest: +SKIP
        >>> loaded = load_checkpoint("em-membranes")  # a packaged model (unetkit.pretrained)  # doctest: +SKIP
    """
    from .pretrained import resolve_checkpoint

    path = resolve_checkpoint(path)  # a packaged model's name ("em-membranes") stands for its weights file
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found; give the .pt file written by `unetkit train` (RUN/best.pt)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable or unsafe pickle
        raise InputError(f"{path}: not a unetkit checkpoint ({type(exc).__name__}); give RUN/best.pt or RUN/last.pt") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"{path}: not a unetkit checkpoint; give RUN/best.pt or RUN/last.pt written by `unetkit train`")
    if int(payload.get("version", 0)) > VERSION:
        raise InputError(f"{path}: written by a newer unetkit (format {payload['version']}); upgrade unetkit")
    try:
        _check_weights(payload["model_config"], payload["state_dict"])
        decision = dict(payload.get("decision") or {})
        if decision:
            from .decision import DecisionRule

            DecisionRule.from_dict(decision)  # a hand-edited rule fails here, not at prediction time
        model = UNet(**payload["model_config"])
        model.load_state_dict(payload["state_dict"])
        return LoadedModel(
            model=model,
            normalization=Normalization.from_dict(payload["normalization"]),
            class_names=list(payload["class_names"]),
            train_config=payload.get("train_config", {}),
            iteration=int(payload.get("iteration", 0)),
            state=payload.get("state", {}),
            decision=decision,
            scale=_scale(payload.get("scale")),
        )
    except KeyError as exc:
        problem = f"its entry {exc} is missing"
    except (TypeError, ValueError, RuntimeError, AttributeError) as exc:  # InputError is a ValueError
        detail = " ".join(str(exc).split())  # load_state_dict lists every mismatch on its own line
        problem = detail if len(detail) <= 300 else detail[:300] + " ..."
    raise InputError(
        f"{path}: damaged or incompatible unetkit checkpoint: {problem}; give another checkpoint or retrain"
    ) from None


def _scale(value: Any) -> dict[str, Any]:
    """The stored object scale, or {} (older checkpoints, or a diameter that is not a positive
    number); an "input_diameter" (`unetkit.finetune`) that is not a positive number is left out."""
    from .config import is_positive_number

    if not isinstance(value, dict) or not is_positive_number(value.get("diameter")):
        return {}
    scale = dict(value)
    if "input_diameter" in scale and not is_positive_number(scale["input_diameter"]):
        del scale["input_diameter"]
    return scale


def _check_weights(config: Any, state_dict: Any) -> None:
    """Raise ValueError unless `state_dict` is finite and of the network `config` describes.

    Checked before the network is built: an edited config (depth 30, width 4096) would otherwise
    allocate the network it describes, gigabytes, before `load_state_dict` found the mismatch.
    """
    if not isinstance(config, dict) or not isinstance(state_dict, dict):
        raise TypeError("model_config and state_dict must be dictionaries")
    levels = len({key.split(".")[1] for key in state_dict if key.startswith("down.")})
    first, head = state_dict.get("down.0.0.weight"), state_dict.get("head.weight")
    rank = 5 if config.get("dims", 2) == 3 else 4  # (out, in, [depth,] height, width)
    if first is None or head is None or first.ndim != rank or head.ndim != rank:
        raise ValueError("the weights are not those of a unetkit UNet (no down.0.0.weight or head.weight)")
    found = {"depth": levels, "base_channels": int(first.shape[0]), "in_channels": int(first.shape[1]),
             "n_classes": int(head.shape[0])}
    defaults = {"in_channels": 1, "n_classes": 2}
    for name, value in found.items():
        said = config.get(name, defaults.get(name))
        if said != value:
            raise ValueError(f"model_config says {name}={said!r} but the weights have {name}={value} "
                             f"(down.0.0.weight {tuple(first.shape)}, head.weight {tuple(head.shape)}, {levels} levels)")
    for key, tensor in state_dict.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"weight {key} holds NaN or infinite values (the training diverged or the file is damaged)")


def load_pretrained(name: str, map_location: str = "cpu"):
    """The `LoadedModel` of packaged model `name` (same as `load_checkpoint(name)`; `unetkit.pretrained` lists the names)."""
    from .pretrained import model_path

    return load_checkpoint(model_path(name, installed=True), map_location=map_location)


def pack_checkpoint(src_checkpoint: str | os.PathLike, name: str, dst: str | os.PathLike | None = None) -> Path:
    """Write a small copy of a checkpoint for shipping as model `name`, atomically; returns its path.

    Keeps what prediction needs (model_config, normalization, class_names, decision) and the
    record of how it was made (train_config, iteration); drops the optimiser, RNG and other
    training state; stores floating-point tensors as float16 (half the size; `load_checkpoint`
    copies them into float32 parameters). `dst` defaults to the model's place in the package
    (`model_path(name)`), replacing what is there.

    Raises InputError for an unknown name, an unreadable checkpoint, or weights that overflow float16.
    """
    from .pretrained import model_path

    packaged = model_path(name)  # InputError for an unknown name
    target = Path(dst) if dst is not None else packaged
    loaded = load_checkpoint(src_checkpoint)
    state_dict = {}
    for key, tensor in loaded.model.state_dict().items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            half = tensor.to(torch.float16)
            if not torch.isfinite(half).all():
                raise InputError(f"{src_checkpoint}: weight {key} does not fit in float16 (|value| > 65504); cannot pack it")
            tensor = half
        state_dict[key] = tensor.clone().contiguous()
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": dict(loaded.model.config),
        "state_dict": state_dict,
        "normalization": loaded.normalization.to_dict(),
        "class_names": list(loaded.class_names),
        "train_config": dict(loaded.train_config),
        "iteration": int(loaded.iteration),
        "state": {},
        "decision": dict(loaded.decision),
        "scale": dict(loaded.scale),
        "pretrained": {"name": name, "weights_dtype": "float16"},
    }
    return atomic_write(target, lambda tmp: torch.save(payload, tmp), force=True)
