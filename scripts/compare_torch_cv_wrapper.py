"""Run seed A's own code (gkdivya/torch_cv_wrapper, a checkout given by path) on the comparison recipe.

The peer's code is never copied here: this script imports it from --repo (a checkout at commit aaa852d),
in its own virtualenv (albumentations 1.x, torchsummary; set up below), and drives its
`TriggerEngine.run_experiment` with seed A's EVA config (Adam 1e-3, weight decay 1e-4, batch 256,
ReduceLROnPlateau on test accuracy, ResNet18 with LayerNorm, gradient clipping by value 0.1), on the
first --subset training images and the full test split, once per seed. It prints one JSON line per
run: seed, final test accuracy (%), wall seconds (training + the per-epoch test passes); the measured
runs are in docs/results.md.
One compatibility shim: torch >= 2.7 no longer accepts ReduceLROnPlateau(verbose=...), so the name its
main.py calls is replaced by a subclass that drops that keyword (it only printed LR cuts).

Its virtualenv (outside the repo): albumentations 1.0.3 (its CoarseDropout arguments are 1.x's), torchsummary
and scikit-image of its own; torch, torchvision, numpy and OpenCV from fastcifar's .venv through a .pth file
placed after its own site-packages, so both sides run the same torch build:

    python3 -m venv /tmp/tcw-venv
    /tmp/tcw-venv/bin/pip install --no-deps albumentations==1.0.3 torchsummary
    /tmp/tcw-venv/bin/pip install scikit-image
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/tcw-venv/lib/python3.11/site-packages/zz_fastcifar.pth
    git clone https://github.com/gkdivya/torch_cv_wrapper /tmp/tcw && git -C /tmp/tcw checkout aaa852d
    /tmp/tcw-venv/bin/python scripts/compare_torch_cv_wrapper.py --repo /tmp/tcw \
        --cifar ../shared/data/cifar-10-batches-py --epochs 2 --subset 5000 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, required=True, help="torch_cv_wrapper checkout (commit aaa852d)")
    ap.add_argument("--cifar", type=Path, required=True, help="cifar-10-batches-py folder")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--subset", type=int, default=5000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tcw-run-"))
    (work / "torch_cv_wrapper").symlink_to(args.repo.resolve())  # the package name its imports use
    (work / "data").mkdir()
    (work / "data" / "cifar-10-batches-py").symlink_to(args.cifar.resolve())
    os.chdir(work)  # its loaders read ./data
    sys.path.insert(0, str(work))

    import numpy as np
    import torch
    from torch.utils.data import DataLoader, Subset

    from torch_cv_wrapper import main as tcw_main
    from torch_cv_wrapper.model.resnet import ResNet18

    class ReduceLROnPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
        """torch >= 2.7 removed `verbose` (it only printed LR cuts), which the 2021 code passes: drop it."""

        def __init__(self, *a, verbose=None, **kw):
            super().__init__(*a, **kw)

    tcw_main.ReduceLROnPlateau = ReduceLROnPlateau  # the name its main.py calls; nothing else changes

    config = {  # gkdivya/EVA 8_AdvancedTrainingConcepts/config.yaml with the final model's choices
        "model": "Resnet18", "model_params": {"experiment_name": "compare", "model_dir": "./model/", "seed": 1,
                                              "dropout": 0.05},
        "data_augmentation": {"type": "CIFAR10Albumentation"},
        "data_loader": {"type": "Cifar10DataLoader",
                        "classes": ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
                        "args": {"batch_size": 256, "num_workers": 2, "pin_memory": True}},
        "criterion": "CrossEntropyLoss", "optimizer": {"type": "optim.Adam", "args": {"lr": 0.001}},
        "lr_scheduler": "ReduceLROnPlateau",
        "training_params": {"epochs": args.epochs, "l1_factor": 0, "l2_factor": 0.0001},
    }
    for seed in args.seeds:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        engine = tcw_main.TriggerEngine(config)
        train_loader, test_loader = engine.dataloader()
        loader_args = config["data_loader"]["args"]
        train_loader = DataLoader(Subset(train_loader.dataset, range(args.subset)), batch_size=loader_args["batch_size"],
                                  shuffle=True, num_workers=loader_args["num_workers"],
                                  pin_memory=loader_args["pin_memory"])
        model = ResNet18("LN")
        start = time.perf_counter()
        _, _, test_accuracy, _ = engine.run_experiment(model, train_loader, test_loader)
        seconds = time.perf_counter() - start
        print(json.dumps({"seed": seed, "test_acc": round(test_accuracy[-1], 2), "seconds": round(seconds, 1),
                          "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
