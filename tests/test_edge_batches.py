"""Final batches of one image (`data.drop_last: false` with a split one image over a multiple of the batch) in
every split and every consumer: labels and dataset indices stay int64 tensors of N, whatever N (FFCV's bare
`Squeeze()` made them 0-d at N = 1: cross_entropy refused them, and on CUDA FFCV's `ToDevice` failed on its
own thread and the loop waited forever)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from .train_fixtures import tiny

B = 8  # batch of the loader tests


def _batch_sizes(loader) -> list[int]:
    sizes = []
    for images, labels, indices in loader.batches():
        assert labels.shape == indices.shape == (len(images),), (loader.split, images.shape, labels.shape)
        assert labels.dtype == indices.dtype == torch.int64
        sizes.append(len(images))
    return sizes


@pytest.mark.parametrize("augment_where", ["loader", "device"])
def test_every_split_ends_with_a_batch_of_one_with_1d_labels_and_indices(beton_dir, augment_where):
    from fastloader.config import DataConfig
    from fastloader.loaders import build_loader

    cfg = DataConfig(beton_dir=str(beton_dir), batch_size=B, subset=(2 * B + 1) + (B + 1), val_split=B + 1,
                     test_subset=B + 1, drop_last=False, workers=2, augment_where=augment_where,
                     augment=[{"random_crop": {"padding": 2}}, "flip"])
    splits = {"train": 2 * B + 1} if augment_where == "device" else {"train": 2 * B + 1, "val": B + 1, "test": B + 1}
    for split, count in splits.items():  # validation and test never augment: one path is enough for them
        sizes = _batch_sizes(build_loader(cfg, split))
        assert sizes[-1] == 1 and sum(sizes) == count, (split, sizes)


@pytest.mark.slow
def test_training_evaluation_tta_and_the_analysis_run_through_batches_of_one(beton_dir, tmp_path):
    """Train (17 images: 8 + 8 + 1), validation (9: 8 + 1) and test (251: 250 + 1, and the analysis's prediction
    pass reads CPU_BATCH = 250 at a time) each end with one image; TTA on the least confident half of a
    batch of one; Grad-CAM on one image."""
    from analysis.predictions import CPU_BATCH, Predictions
    from analysis.report import analyze
    from train.config import build_config
    from train.loop import fit
    from train.run import RunDir

    test_count = CPU_BATCH + 1
    raw = tiny(beton_dir, train__epochs=1, data__subset=17 + 9, data__val_split=9, data__batch_size=B,
               data__drop_last=False, data__test_subset=test_count, data__test_batch_size=CPU_BATCH)
    raw["scheduler"] = {"name": "none"}  # onecycle would need more than 3 steps
    raw["eval"] = {"tta": "flip_translate", "tta_fraction": 0.5}
    run = RunDir(tmp_path / "run")
    (metrics,) = fit(build_config(raw), run)
    assert np.isfinite(metrics["train_loss"]) and np.isfinite(metrics["val_loss"]) and np.isfinite(metrics["test_loss"])
    analyze(run.path, n=1, log=lambda line: None)
    preds = Predictions.load(run.path / "predictions.npz")
    assert preds.labels.shape == preds.indices.shape == (test_count,)
    assert sorted(preds.indices.tolist()) == list(range(test_count))


def test_the_lr_range_test_steps_through_a_batch_of_one(beton_dir):
    """The range test cycles the train loader: 5 steps over batches of 2, 2, 1, 2, 2."""
    from train.config import build_config
    from train.lr_find import lr_find

    raw = tiny(beton_dir, data__subset=5, data__batch_size=2, data__drop_last=False, data__test_subset=2)
    result = lr_find(build_config(raw), start=1e-4, end=1e-2, iters=5, progress=False)
    assert result["steps"] == 5 and all(np.isfinite(result["loss"]))
