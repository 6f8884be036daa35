"""The augmentation specs' old import path: each op is now a module of `fastloader.augs`.

Re-exports the registry, the packer and every registered spec class, so code
written against `fastloader.augmentations` keeps working.
"""
from __future__ import annotations

from .augs import *  # noqa: F401,F403
from .augs import __all__  # noqa: F401
