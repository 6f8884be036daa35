"""Field names of a fastcifar beton, shared by the writer and the loaders.

`index` stores each sample's position in its split, so every batch knows
which dataset samples it holds: augmentation draws are keyed on it, and
analysis reports test-set indices without trusting the traversal order.
"""
IMAGE = "image"
LABEL = "label"
INDEX = "index"
SPLITS = ("train", "test")
MANIFEST = "manifest.json"


def beton_name(split: str) -> str:
    return f"{split}.beton"
