"""Publishing an immunized extractor: safetensors weights with metadata in the header.

Only the extractor's weights leave the checkpoint (that is what a user releases). The header
carries ``method``, the λs, the RIR figures and the library version as strings.
Loading checks every tensor's name and shape against the target model first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

__all__ = [
    "load_checkpoint",
    "extractor_state",
    "export_extractor",
    "export_checkpoint",
    "load_exported",
]
#: Figures of ``immunization.json`` copied into the exported header.
REPORT_KEYS = ("rir", "ratio_harmful", "ratio_pretrain", "immunized", "data_fingerprint")

EXTRACTOR_PREFIX = "extractor."


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint safely (``weights_only=True``); clear error if missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (expected a Lightning .ckpt file).")
    return torch.load(path, map_location="cpu", weights_only=True)


def extractor_state(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The extractor's tensors of an ``ImmunizationModule`` state dict, prefix removed."""
    out = {
        k[len(EXTRACTOR_PREFIX) :]: v.detach().cpu().contiguous()
        for k, v in state_dict.items()
        if k.startswith(EXTRACTOR_PREFIX)
    }
    if not out:
        raise ValueError(
            "the checkpoint holds no 'extractor.*' weights: is it an ImmunizationModule checkpoint?"
        )
    return out


def export_extractor(
    state_dict: Mapping[str, torch.Tensor], out: str | Path, metadata: Mapping[str, Any]
) -> Path:
    """Write the extractor's weights to ``out`` (.safetensors) with ``metadata`` in the header.

    Non-string metadata values are stored as JSON.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"the exported file must end in .safetensors, got {out.name!r}.")
    from lightning_immunize import __version__

    header = {"library": "lightning_immunize", "library_version": __version__}
    header.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(extractor_state(state_dict), str(out), metadata=header)
    return out


def export_checkpoint(
    ckpt: str | Path, out: str | Path, report: str | Path | None = None
) -> tuple[Path, dict[str, Any]]:
    """Export a checkpoint's extractor with the checkpoint's method and λs and the RIR figures of
    ``report`` (default: the ``immunization.json`` of the checkpoint's run folder, if any).

    Returns:
        The written path and the metadata.

    Raises:
        FileNotFoundError: a missing checkpoint, or an explicit ``report`` that does not exist.
    """
    checkpoint = load_checkpoint(ckpt)
    metadata = dict(checkpoint.get("immunization", {}))
    report_path = Path(report) if report else Path(ckpt).parent.parent / "immunization.json"
    if report_path.is_file():
        figures = json.loads(report_path.read_text())
        metadata.update({k: figures[k] for k in REPORT_KEYS if k in figures})
    elif report:
        raise FileNotFoundError(f"report not found: {report_path}")
    return export_extractor(checkpoint["state_dict"], out, metadata), metadata


def load_exported(path: str | Path, extractor: nn.Module) -> dict[str, str]:
    """Load exported weights into ``extractor`` after checking names and shapes; returns the
    header metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported weights not found: {path}.")
    target = extractor.state_dict()
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    missing = sorted(set(target) - set(tensors))
    unexpected = sorted(set(tensors) - set(target))
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(target[k].shape)}"
        for k in sorted(set(target) & set(tensors))
        if tensors[k].shape != target[k].shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not fit {type(extractor).__name__}: missing {missing}, "
            f"unexpected {unexpected}, shape mismatches {wrong}."
        )
    extractor.load_state_dict(tensors)
    return metadata
