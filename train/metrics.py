"""What an epoch measured: pass sums (summed over ranks), the metrics and timing lines, the run summary.

`metrics.jsonl` holds what the epoch learned, a pure function of config and seed, so reruns give
identical lines; `timing.jsonl` holds how long it took, kept apart because it varies.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import distributed


@dataclass
class Pass:
    """Loss and accuracy of one pass over a split."""

    loss: float
    correct: int
    count: int
    seconds: float

    @property
    def acc(self) -> float:
        return 100.0 * self.correct / max(self.count, 1)


@dataclass
class Progress:
    """Running sums of a training epoch; `batch` batches are done. A mid-epoch checkpoint stores them."""

    lr: float  # at the start of the epoch (its metrics line reports it)
    loss_sum: torch.Tensor
    correct: torch.Tensor
    count: int = 0
    batch: int = 0
    seconds: float = 0.0

    @classmethod
    def start(cls, lr: float, device: torch.device, saved: dict | None = None) -> "Progress":
        progress = cls(lr, torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long))
        if saved:
            progress.loss_sum.fill_(float(saved["loss_sum"]))  # float32 -> float -> float32: exact
            progress.correct.fill_(int(saved["correct"]))
            progress.count, progress.batch, progress.seconds = int(saved["count"]), int(saved["batch"]), float(saved["seconds"])
            progress.lr = float(saved["lr"])
        return progress

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One batch's sums, kept on the device (read back only for progress updates)."""
        self.loss_sum += loss.float() * len(labels)
        self.correct += (logits.argmax(1) == labels).sum()
        self.count += len(labels)
        self.batch += 1

    def state(self) -> dict:
        return {"lr": self.lr, "loss_sum": self.loss_sum.item(), "correct": int(self.correct.item()),
                "count": self.count, "batch": self.batch, "seconds": self.seconds}

    def _sums(self, device: torch.device) -> tuple[float, int, int]:
        """Loss sum, correct and count over all ranks."""
        loss_sum, correct, count = distributed.all_sum([self.loss_sum.item(), self.correct.item(), self.count], device)
        return loss_sum, int(correct), int(count)

    def global_state(self, device: torch.device, running: float = 0.0) -> dict:
        """state() with every rank's sums, for a mid-epoch checkpoint (rank 0 writes it; on resume rank 0
        starts from these sums, the others from zero). `running`: seconds of this epoch not yet added."""
        loss_sum, correct, count = self._sums(device)
        return {**self.state(), "loss_sum": loss_sum, "correct": correct, "count": count,
                "seconds": self.seconds + running}

    def summed(self, device: torch.device) -> Pass:
        """The pass over the whole epoch: sums over all ranks."""
        loss_sum, correct, count = self._sums(device)
        return Pass(loss_sum / max(count, 1), correct, count, self.seconds)


def monitored(test: Pass, val: Pass | None) -> dict:
    """The values a plateau schedule or the best-checkpoint choice may watch (unrounded)."""
    found = {"test_loss": test.loss, "test_acc": test.acc}
    if val is not None:
        found.update(val_loss=val.loss, val_acc=val.acc)
    return found


def metrics_line(epoch: int, lr: float, train: Pass, test: Pass, val: Pass | None = None,
                 tta: str | None = None) -> dict:
    """What the epoch learned: a pure function of config and seed, so reruns give identical lines.
    With a validation split, val_* columns follow the test ones; `tta` names the test-time augmentation
    the evaluation used, where it used one."""
    line = {"epoch": epoch, "lr": lr, "train_loss": round(train.loss, 6), "train_acc": round(train.acc, 4),
            "test_loss": round(test.loss, 6), "test_acc": round(test.acc, 4), "test_correct": test.correct,
            "test_count": test.count}
    if tta:
        line["tta"] = tta
    if val is not None:
        line.update(val_loss=round(val.loss, 6), val_acc=round(val.acc, 4), val_correct=val.correct,
                    val_count=val.count)
    return line


def timing_line(epoch: int, train: Pass, test: Pass, world: int, val: Pass | None = None) -> dict:
    """How long it took (timing.jsonl): kept apart from metrics.jsonl, which must not vary between reruns."""
    evaluation = test.seconds + (val.seconds if val else 0.0)
    return {"epoch": epoch, "seconds": round(train.seconds + evaluation, 3), "train_seconds": round(train.seconds, 3),
            "eval_seconds": round(evaluation, 3),
            "images_per_s": round(train.count / max(train.seconds, 1e-9), 1), "processes": world}


def summary_line(m: dict, t: dict, epochs: int) -> str:
    """One line per epoch, as the seeds' logs have it."""
    return (f"epoch {m['epoch']:>3}/{epochs}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.2f}%  |  "
            f"Test set{' (TTA ' + m['tta'] + ')' if m.get('tta') else ''}: Average loss: {m['test_loss']:.4f}, Accuracy: {m['test_correct']}/{m['test_count']} "
            f"({m['test_acc']:.2f}%)  |  " + (f"Val: loss {m['val_loss']:.4f}, acc {m['val_acc']:.2f}%  |  "
                                               if "val_acc" in m else "") +
            f"lr {m['lr']:.3e}  |  {t['seconds']:.1f} s ({t['images_per_s']:,.0f} img/s)")


def run_summary(cfg, params: int, history: list[dict], timing: list[dict]) -> dict:
    """What a results table needs of a run, without loading its checkpoint. The best epoch is the one
    `train.select_best_on` picks (the epoch of checkpoint_best.pt)."""
    key = f"{cfg.train.select_best_on}_acc"
    best = max(history, key=lambda m: m[key])  # the first of equals, as the checkpoint keeps it
    last = history[-1]
    summary = {"name": cfg.name, "model": cfg.model.name, "norm": cfg.model.norm, "scheduler": cfg.scheduler.name,
               "optimizer": cfg.optimizer.name, "params": params, "epochs": cfg.train.epochs,
               "epochs_done": last["epoch"], "complete": last["epoch"] >= cfg.train.loop_epochs,
               "train_acc": last["train_acc"], "test_acc": last["test_acc"], "best_test_acc": best["test_acc"],
               "best_epoch": best["epoch"], "seconds": round(sum(t["seconds"] for t in timing), 1)}
    if "val_acc" in last:
        summary.update(val_acc=last["val_acc"], best_val_acc=best["val_acc"])
    return summary
