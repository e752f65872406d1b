"""Publishing an immunized extractor: safetensors weights with metadata in the header.

Only the extractor's weights leave the checkpoint (that is what a user releases). The header
carries ``method``, the λs, the RIR figures, the library version and whether the checkpoint is
the end of its fit (``steps``, ``partial``... see :func:`export_checkpoint`) as strings.
Loading checks every tensor's name and shape against the target model first.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lightning_immunize.run_folder import (
    CONFIG_NAME,
    REPORT_NAME,
    check_checkpoint_current,
    checkpoint_run,
)
from lightning_immunize.validation import unwritable_folder

__all__ = [
    "load_checkpoint",
    "extractor_state",
    "export_extractor",
    "export_checkpoint",
    "check_output_path",
    "load_exported",
]
#: Figures of ``immunization.json`` copied into the exported header.
REPORT_KEYS = ("rir", "ratio_harmful", "ratio_pretrain", "immunized", "data_fingerprint")

EXTRACTOR_PREFIX = "extractor."
#: Where a fit writes its checkpoints (named in the errors).
CHECKPOINT_LOCATION = "lightning_logs/version_N/checkpoints/"
#: Lightning's ``max_epochs`` when neither ``max_epochs`` nor ``max_steps`` nor ``max_time`` is set.
LIGHTNING_DEFAULT_MAX_EPOCHS = 1000


def _not_a_checkpoint(path: Path, found: str) -> ValueError:
    return ValueError(
        f"{path} is not a Lightning checkpoint ({found}); expected the .ckpt file a fit writes "
        f"under {CHECKPOINT_LOCATION}."
    )


def _describe_file(path: Path) -> str | None:
    """What ``path`` visibly is when it cannot be a torch checkpoint (``None``: it may be one)."""
    with path.open("rb") as f:
        head = f.read(4096)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):  # torch's zip format
        if not zipfile.is_zipfile(path):
            return "a truncated or corrupt zip archive: its central directory is missing"
        return None
    if len(head) > 8 and head[8:9] == b"{":
        size = int.from_bytes(head[:8], "little")
        try:
            names = [k for k in json.loads(head[8 : 8 + size]) if k != "__metadata__"]
        except ValueError:
            names = None
        if names is not None:
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            return f"a safetensors file of tensors [{shown}], e.g. an exported model"
    if head.startswith(b"\x80"):  # a pickle (torch's legacy format): torch.load decides
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not just a character cut at the end of the read
            return None
        text = head[: err.start].decode("utf-8")
    if "\x00" in text:
        return None
    first = text.strip().splitlines()[0][:60] if text.strip() else ""
    return f"a text file starting {first!r}"


def _load_error(err: Exception) -> str:
    """``torch.load``'s failure in one line (its own hints, to file an issue, left out)."""
    message = str(err)
    marker = "WeightsUnpickler error:"
    if marker in message:  # a weights_only refusal: the reason follows the marker
        reason = message.split(marker, 1)[1].strip().splitlines()[:1]
        message = f"refused by weights_only=True: {reason[0] if reason else '?'}"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    detail = f": {lines[0][:200]}" if lines else ""
    return f"torch.load failed with {type(err).__name__}{detail}"


def _describe_object(obj: object) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a torch.Tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        keys = [repr(k) for k in list(obj)[:8]]
        more = ", ..." if len(obj) > 8 else ""
        return f"a {type(obj).__name__} with keys [{', '.join(keys)}{more}] and no 'state_dict'"
    return f"a {type(obj).__name__}"


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load a Lightning checkpoint safely (``weights_only=True``); ``mmap=True`` maps the
    tensors instead of reading them (for a look at ``global_step`` and the loops' state).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a Lightning checkpoint (a text, safetensors, truncated or
            corrupt file, or a torch file without ``state_dict``); the message says what it is.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (expected a Lightning .ckpt file).")
    found = _describe_file(path)
    if found is not None:
        raise _not_a_checkpoint(path, found)
    try:
        with warnings.catch_warnings():  # torch's "please file an issue" hints
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - torch raises anything on a foreign file
        raise _not_a_checkpoint(path, _load_error(err)) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise _not_a_checkpoint(path, _describe_object(checkpoint))
    return checkpoint


def extractor_state(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The extractor's tensors of an ``ImmunizationModule`` state dict, prefix removed."""
    out = {
        k[len(EXTRACTOR_PREFIX) :]: v.detach().cpu().contiguous()
        for k, v in state_dict.items()
        if k.startswith(EXTRACTOR_PREFIX)
    }
    if not out:
        raise ValueError(
            f"the checkpoint holds no 'extractor.*' weights (first keys: {list(state_dict)[:5]}); "
            "expected an ImmunizationModule checkpoint."
        )
    return out


def _umask() -> int:
    """The process umask, read from ``/proc`` where possible (setting it to read it back
    leaves a moment in which other threads would create files with umask 0)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def _readable_mode(path: Path) -> None:
    """Give ``path`` the mode of a normally created file (``0o666 & ~umask``): safetensors
    creates its files ``0o600``."""
    os.chmod(path, 0o666 & ~_umask())


def check_output_path(out: str | Path) -> Path:
    """``out`` if an exported file can be written there, checked before any work.

    Raises:
        ValueError: ``out`` does not end in ``.safetensors``, is a folder, or its folder cannot
            be created or written (the message names the path).
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"the exported file must end in .safetensors, got {out.name!r}.")
    if out.is_dir():
        raise ValueError(f"cannot write {out}: it is a folder; expected a file path.")
    folder = unwritable_folder(out)
    if folder is not None:
        raise ValueError(f"cannot write {out}: {folder} is not a writable folder.")
    return out


def export_extractor(
    state_dict: Mapping[str, torch.Tensor], out: str | Path, metadata: Mapping[str, Any]
) -> Path:
    """Write the extractor's weights to ``out`` (.safetensors) with ``metadata`` in the header.

    Non-string metadata values are stored as JSON. The file gets the permissions of any new
    file (``0o666 & ~umask``, e.g. ``0o644``): it is made to be published.
    """
    out = check_output_path(out)
    from lightning_immunize import __version__

    header = {"library": "lightning_immunize", "library_version": __version__}
    header.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(extractor_state(state_dict), str(out), metadata=header)
    except OSError as err:
        raise ValueError(f"cannot write {out}: {err.strerror or err}.") from err
    _readable_mode(out)
    return out


def _epochs_done(checkpoint: Mapping[str, Any]) -> int | None:
    """Training epochs whose batches all ran, from the fit loop's state (``None``: absent).

    A checkpoint written at an epoch's end before Lightning counts the epoch as processed —
    after its last batch (``last.ckpt``) or at validation end — has all the epoch's batches
    done (``is_last_batch``).
    """
    try:
        fit_loop = checkpoint["loops"]["fit_loop"]
        epochs = fit_loop["epoch_progress"]["total"]
        batches = fit_loop["epoch_loop.batch_progress"]
        done = int(epochs["processed"])
        # Inside the last batch's end hooks, or between it and the epoch's count (Lightning
        # does not count a resumed epoch as started: the batches tell).
        inside_last = int(batches["current"]["processed"]) > int(batches["current"]["completed"])
        if batches["is_last_batch"] and (int(epochs["started"]) > done or inside_last):
            done += 1
    except (KeyError, TypeError, ValueError):
        return None
    return done


def _planned(config_path: Path) -> tuple[int | None, int | None]:
    """``(planned_steps, planned_epochs)`` of a fit's ``config.yaml`` (``None``: no limit, or
    no config). Lightning's rule: without ``max_epochs``, ``max_steps`` and ``max_time``,
    ``max_epochs`` is 1000; ``-1`` means no limit."""
    if not config_path.is_file():
        return None, None
    try:
        trainer = (yaml.safe_load(config_path.read_text()) or {}).get("trainer") or {}
    except (yaml.YAMLError, AttributeError):
        return None, None
    max_steps = trainer.get("max_steps")
    max_epochs = trainer.get("max_epochs")
    steps = int(max_steps) if isinstance(max_steps, int) and max_steps > 0 else None
    if max_epochs is None and steps is None and trainer.get("max_time") is None:
        max_epochs = LIGHTNING_DEFAULT_MAX_EPOCHS
    epochs = int(max_epochs) if isinstance(max_epochs, int) and max_epochs >= 0 else None
    return steps, epochs


def _run_progress(checkpoint: Mapping[str, Any], ckpt: Path) -> dict[str, Any]:
    """How far the fit of ``checkpoint`` (read from ``ckpt``) had got; the keys and the rule
    are those of :func:`export_checkpoint`."""
    run = checkpoint_run(ckpt)
    in_run = ckpt.parent.name == "checkpoints"  # RUN/checkpoints/x.ckpt, as a fit writes it
    steps = checkpoint.get("global_step")
    epochs = _epochs_done(checkpoint)
    planned_steps, planned_epochs = _planned(run / CONFIG_NAME) if in_run else (None, None)
    candidates = {
        "steps": steps,
        "epochs": epochs,
        "planned_steps": planned_steps,
        "planned_epochs": planned_epochs,
    }
    info: dict[str, Any] = {k: int(v) for k, v in candidates.items() if v is not None}
    report = run / REPORT_NAME
    no_report = f"no {report.name} in {run}: the fit did not reach its end"
    limits = [
        (done, plan, what)
        for done, plan, what in (
            (steps, planned_steps, "steps"),
            (epochs, planned_epochs, "epochs"),
        )
        if done is not None and plan is not None
    ]
    if limits:
        # Lightning stops at the first limit reached.
        info["partial"] = not any(done >= plan for done, plan, _ in limits)
        progress = ", ".join(f"{done} of {plan} planned {what}" for done, plan, what in limits)
        keys = " and ".join(f"trainer.max_{what}" for *_, what in limits)
        reason = f"{progress} ({keys} of {run / CONFIG_NAME})"
        if info["partial"] and not report.is_file():
            reason += f"; {no_report}"
    elif in_run and not report.is_file():
        info["partial"], reason = True, no_report
    else:
        info["partial"] = "unknown"
        where = f"{run / CONFIG_NAME}" if in_run else f"a run folder (RUN/checkpoints/{ckpt.name})"
        reason = (
            f"the planned length of the fit is unknown: no trainer.max_steps/max_epochs in {where}"
        )
    info["partial_reason"] = reason
    return info


def export_checkpoint(
    ckpt: str | Path, out: str | Path, report: str | Path | None = None
) -> tuple[Path, dict[str, Any]]:
    """Export a checkpoint's extractor with the checkpoint's method and λs, the RIR figures of
    ``report`` (default: the ``immunization.json`` of the checkpoint's run folder, if any) and
    how far its fit had got.

    Progress keys (the run folder is ``ckpt``'s grandparent, ``RUN/checkpoints/x.ckpt``):

    - ``steps``: the checkpoint's ``global_step``; ``epochs``: training epochs completed
      (from the fit loop's state, when present).
    - ``planned_steps`` / ``planned_epochs``: ``trainer.max_steps`` (when > 0) /
      ``trainer.max_epochs`` of ``RUN/config.yaml`` (written by ``lightning-immunize fit``),
      when set; nothing is guessed (e.g. steps per epoch depend on the data).
    - ``partial``: ``True`` when neither planned limit was reached (an interrupted fit, or an
      earlier checkpoint of a finished one: then the RIR figures of ``immunization.json`` are
      those of the fit's end, not of these weights), ``False`` when one was; without a plan,
      ``True`` if ``RUN/immunization.json`` (written at the end of every fit) is missing,
      else ``"unknown"``. ``partial_reason`` says which evidence decided.

    Returns:
        The written path and the metadata.

    Raises:
        FileNotFoundError: a missing checkpoint, or an explicit ``report`` that does not exist.
        ValueError: ``ckpt`` is not a Lightning checkpoint, or it is behind ``report`` (an
            earlier step than the fit the figures describe).
    """
    check_output_path(out)
    checkpoint = load_checkpoint(ckpt)
    metadata = dict(checkpoint.get("immunization", {}))
    report_path = Path(report) if report else checkpoint_run(ckpt) / REPORT_NAME
    check_checkpoint_current(ckpt, checkpoint.get("global_step"), report_path)
    if report_path.is_file():
        figures = json.loads(report_path.read_text())
        metadata.update({k: figures[k] for k in REPORT_KEYS if k in figures})
    elif report:
        raise FileNotFoundError(
            f"report not found: {report_path} (expected the immunization.json of a fit)."
        )
    metadata.update(_run_progress(checkpoint, Path(ckpt)))
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
