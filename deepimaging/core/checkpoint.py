"""One-file checkpoints: weights plus a JSON-able header, loaded without unpickling code.

File layout (a ``torch.save`` of a plain dict): ``{"format": FORMAT, "header": <JSON string>,
"state_dict": {name: tensor}, "extra_tensors": {name: tensor}}``.  Loading uses
``torch.load(weights_only=True)`` so a checkpoint can never execute code, and the header is
checked (format, method) before the weights are used.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from .. import __version__
from .errors import CheckpointError
from .imageio import atomic_output

FORMAT = "deepimaging-checkpoint-v1"
PathLike = Union[str, os.PathLike]


@dataclass
class Checkpoint:
    """What a checkpoint file holds: the header (JSON-able dict) and the weights."""

    header: Dict[str, Any]
    state_dict: Dict[str, torch.Tensor]
    extra_tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    training_state: Dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.header["method"]

    @property
    def config(self) -> Dict[str, Any]:
        return self.header.get("config", {})


def make_header(method: str, config: Mapping[str, Any], *, preprocessing: Optional[Mapping[str, Any]] = None,
                labels: Optional[Mapping[str, Any]] = None, metrics: Optional[Mapping[str, Any]] = None,
                **extra: Any) -> Dict[str, Any]:
    """Assemble the standard header; every value must be JSON-serialisable."""
    header = {"method": method, "config": dict(config), "preprocessing": dict(preprocessing or {}),
              "labels": dict(labels or {}), "metrics": dict(metrics or {}), "package_version": __version__}
    header.update(extra)
    return header


def save_checkpoint(path: PathLike, state_dict: Mapping[str, torch.Tensor], header: Mapping[str, Any],
                    extra_tensors: Optional[Mapping[str, torch.Tensor]] = None,
                    training_state: Optional[Mapping[str, Any]] = None) -> Path:
    """Write weights + header atomically to ``path`` (``.pt``).

    ``training_state`` (optimizer/scheduler/scaler state dicts, epoch counters) is what resuming
    needs; it must hold only tensors, numbers, strings and containers of them.
    """
    if "method" not in header:
        raise CheckpointError("a checkpoint header needs a 'method'")
    try:
        header_json = json.dumps(dict(header), sort_keys=True)
    except TypeError as exc:
        raise CheckpointError(f"checkpoint header is not JSON-serialisable: {exc}") from exc
    payload = {"format": FORMAT, "header": header_json,
               "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
               "extra_tensors": {k: v.detach().cpu() for k, v in (extra_tensors or {}).items()},
               "training_state": dict(training_state or {})}
    path = Path(path)
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)
    return path


def unreadable_reason(path: Path, exc: BaseException) -> str:
    """Why torch could not read ``path``, in our words (never torch's "weights_only=False" advice)."""
    text = str(exc)
    if "weights only" in text.lower() or "weights_only" in text:
        return ("not a file of tensors and plain data: another program's file, or not a PyTorch file at all; "
                "pickled Python objects are never loaded")
    if isinstance(exc, EOFError) or path.stat().st_size == 0:
        return "it is empty or ends too early"
    with path.open("rb") as handle:
        zipped = handle.read(4) == b"PK\x03\x04"
    return "it is a zip archive but not a complete PyTorch file" if zipped else "it is not a PyTorch file"


def load_checkpoint(path: PathLike, method: Optional[str] = None, map_location: Union[str, torch.device] = "cpu") -> Checkpoint:
    """Load and validate a checkpoint; ``method`` (if given) must match the header's method."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    failure = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's "Detected pickle protocol 4" on foreign pickles
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, garbage bytes, pickled objects refused by weights_only
        failure = unreadable_reason(path, exc)
    if failure is not None:
        # Raised outside the except block and without torch's text: torch's message advises
        # "weights_only=False", which would unpickle arbitrary code; no user should be told that.
        raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated, corrupt or not a deepimaging "
                              f"checkpoint ({failure})")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a deepimaging checkpoint (format tag missing)")
    try:
        header = json.loads(payload["header"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: checkpoint header is missing or corrupt") from exc
    if method is not None and header.get("method") != method:
        raise CheckpointError(
            f"{path} is a checkpoint of method {header.get('method')!r}, but a {method!r} checkpoint is needed")
    state = payload.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: checkpoint has no weights")
    return Checkpoint(header, state, dict(payload.get("extra_tensors") or {}), dict(payload.get("training_state") or {}))
