"""Checkpoints: plain data only (tensors, numbers, strings, lists, dicts), written atomically.

`torch.load(..., weights_only=True)` reads them, so a checkpoint can never run
code; a file that is not one (or was tampered with) is a one-line UserError.
"""
from __future__ import annotations

import contextlib
import io
import pickle
import re
import warnings
from pathlib import Path

import torch

from beton.atomic import atomic_write_bytes
from beton.errors import UserError

FORMAT = 1


def save(path: Path, state: dict) -> None:
    """Serialise in memory, then write atomically: a full or read-only disk is a UserError
    (torch.save's own file writer would raise a RuntimeError), and the previous file stays whole."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    try:
        atomic_write_bytes(path, buffer.getbuffer())
    except UserError as e:
        kept = f"the previous {path.name} is intact" if path.is_file() else "nothing was written"
        raise UserError(f"{e}; {kept}") from e


def load(path: Path, map_location="cpu") -> dict:
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols before refusing them
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():  # it names a callable to import: a pickle that could run code
            raise UserError(f"{path} holds more than weights and plain data (objects that could run code); "
                            f"refusing to load it: {_unsafe_part(e)}") from e
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt?): {_unsafe_part(e)}") from e
    except Exception as e:  # torch's safe unpickler raises assorted errors on damaged bytes
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a fastcifar checkpoint (format {FORMAT})")
    return state


def _unsafe_part(error: Exception) -> str:
    """What torch's refusal names (the unsafe global), without its advice to load the file unsafely."""
    text = " ".join(str(error).split())
    found = re.search(r"(Unsupported global: GLOBAL \S+|Trying to load unsupported GLOBAL \S+|"
                      r"Unsupported operand \d+|[^.]*not an allowed global[^.]*)", text)
    return found.group(0).strip() if found else "torch.load(weights_only=True) refused it"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


@contextlib.contextmanager
def rng_and_epoch_restored(loader):
    """Steps that leave no trace on the run (the LR range test, the budget's timing): the random state and
    `loader`'s epoch (which orders and augments its next iteration) are put back as they were, whatever happens."""
    rng, epoch = rng_state(), getattr(loader, "epoch", None)
    try:
        yield
    finally:
        set_rng_state(rng)
        if epoch is not None:
            loader.set_epoch(epoch)


def set_rng_state(state: dict) -> str | None:
    """Restore what `rng_state` saved; returns a line for the log saying what could not be (None: all was).

    A checkpoint holds one CUDA generator state per GPU visible when it was written. Resumed where
    fewer are visible (or none), the first ones are restored and the others dropped; where more are,
    the extra GPUs keep their own state. (`torch.cuda.set_rng_state_all` raised IndexError instead.)
    """
    torch.set_rng_state(state["torch"])
    saved = list(state.get("cuda") or [])
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index, generator in enumerate(saved[:visible]):
        torch.cuda.set_rng_state(generator, index)
    if len(saved) == visible:
        return None
    told = f"the checkpoint holds the CUDA random state of {len(saved)} GPU(s), {visible} are visible here: "
    if len(saved) > visible:
        return told + f"those of GPUs {visible}..{len(saved) - 1} were not restored"
    return told + f"GPUs {len(saved)}..{visible - 1} keep their own"
