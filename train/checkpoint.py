"""Checkpoints: plain data only (tensors, numbers, strings, lists, dicts), written atomically.

`torch.load(..., weights_only=True)` reads them, so a checkpoint can never run
code; a file that is not one (or was tampered with) is a one-line UserError.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from beton.atomic import atomic_write_bytes
from beton.errors import UserError

FORMAT = 1
LAST, BEST = "checkpoint_last.pt", "checkpoint_best.pt"


def save(path: Path, state: dict) -> None:
    """Serialise in memory, then write atomically: a full or read-only disk is a UserError
    (torch.save's own file writer would raise a RuntimeError), and the previous file stays whole."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    try:
        atomic_write_bytes(path, buffer.getbuffer())
    except UserError as e:
        raise UserError(f"{e}; the previous {path.name} is intact") from e


def load(path: Path, map_location="cpu") -> dict:
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path} holds more than weights and plain data; refusing to load it "
                        f"(torch.load weights_only): {str(e).splitlines()[0]}") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a fastcifar checkpoint (format {FORMAT})")
    return state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
