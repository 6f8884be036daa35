"""CIFAR sources -> lossless FFCV betons + manifest.json (see docs/design.md, `beton/`)."""
from .errors import UserError
from .manifest import FileCheck, build_manifest, read_manifest, verify, write_manifest
from .sources import Source, Split, find_source, read_source
from .writer import write_betons

__all__ = [
    "FileCheck",
    "Source",
    "Split",
    "UserError",
    "build_manifest",
    "find_source",
    "read_manifest",
    "read_source",
    "verify",
    "write_betons",
    "write_manifest",
]
