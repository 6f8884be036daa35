"""What users run today, set up as they would write it, for `fastcifar bench loader`.

Each baseline does the same work as the fastcifar train pipeline (crop with
padding 4, horizontal flip, rotation up to 5 degrees, one 16x16 erase,
normalise, float tensor) on the same images and cores, and yields batches of
512; `ffcv_builtin` is FFCV's own ops (translate, flip, cutout; no rotation,
uint8 out), as FFCV's CIFAR example uses them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

BATCH = 512


class _ArrayDataset(torch.utils.data.Dataset):
    """uint8 HWC images and labels held in memory, like torchvision's CIFAR10."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), int(self.labels[i])


def _to_pil(img):
    from PIL import Image

    return Image.fromarray(img)


class _Erase:
    """A size x size square of zeros at a random place wholly inside the image (Cutout)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        y = int(torch.randint(0, h - self.size + 1, ()))
        x = int(torch.randint(0, w - self.size + 1, ()))
        img[..., y:y + self.size, x:x + self.size] = 0
        return img


class _Albumentations:
    """Calls an albumentations pipeline the way a Dataset does (picklable, for worker processes)."""

    def __init__(self, augment):
        self.augment = augment

    def __call__(self, img):
        return self.augment(image=img)["image"]


def _data_loader(dataset, workers: int) -> torch.utils.data.DataLoader:
    # forkserver: numba's and FFCV's threads already run in this process, and fork would copy their locks
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers,
                                       drop_last=True, persistent_workers=workers > 0,
                                       multiprocessing_context="forkserver" if workers > 0 else None)


def torchvision_loader(images, labels, mean, std, workers: int):
    """torchvision's transforms on PIL images: the tutorial pipeline."""
    from torchvision import transforms as T

    transform = T.Compose([
        _to_pil,
        T.RandomCrop(32, padding=4),
        T.RandomHorizontalFlip(),
        T.RandomRotation(5),
        T.ToTensor(),
        T.Normalize([m / 255 for m in mean], [s / 255 for s in std]),
        _Erase(16),
    ])
    return _data_loader(_ArrayDataset(images, labels, transform), workers)


def albumentations_loader(images, labels, mean, std, workers: int):
    """albumentations on numpy images, the seeds' library."""
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    augment = A.Compose([
        A.PadIfNeeded(40, 40, border_mode=0, fill=0),
        A.RandomCrop(32, 32),
        A.HorizontalFlip(),
        A.Rotate(limit=5, border_mode=0, fill=0, p=1.0),
        A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(16, 16), hole_width_range=(16, 16), fill=0, p=1.0),
        A.Normalize(mean=[m / 255 for m in mean], std=[s / 255 for s in std]),
        ToTensorV2(),
    ])
    return _data_loader(_ArrayDataset(images, labels, _Albumentations(augment)), workers)


def ffcv_builtin_loader(beton: Path, workers: int):
    """FFCV's own CIFAR pipeline: flip, translate, cutout, uint8 channels_last tensors."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Cutout, RandomHorizontalFlip, RandomTranslate, Squeeze, ToTensor, ToTorchImage

    pipelines = {
        "image": [SimpleRGBImageDecoder(), RandomHorizontalFlip(), RandomTranslate(padding=4), Cutout(16),
                  ToTensor(), ToTorchImage(channels_last=True, convert_back_int16=False)],
        "label": [IntDecoder(), ToTensor(), Squeeze(1)],  # labels of N, even N = 1 (loaders.int_column)
        "index": None,
    }
    return Loader(str(beton), batch_size=BATCH, num_workers=workers, order=OrderOption.RANDOM,
                  pipelines=pipelines, drop_last=True, seed=0)
