"""Writing a run folder during training: the log, checkpoints, metrics, summary and TensorBoard.

Every rank calls these; rank 0 alone writes, through `distributed.on_main`, so a write that fails
there (a full disk) ends every rank with the same one-line error instead of a hang.
"""
from __future__ import annotations

from beton.errors import Interrupted

from . import checkpoint, distributed
from .metrics import Progress, run_summary, summary_line
from .models import count_parameters
from .run import RunDir
from .parts import RunParts
from .state import Training


class Recorder:
    """The run folder of one training process (writes on rank 0)."""

    def __init__(self, run: RunDir, parts: RunParts):
        self.run, self.parts = run, parts
        self.main = parts.world.main
        self.board = None

    def open(self, resume: bool) -> None:
        """Create the folder (after every check: a failed start leaves none behind) and TensorBoard."""
        distributed.on_main(lambda: self.run.create(self.parts.cfg.to_dict(), resume), self.parts.device)

    def rewrite_config(self) -> None:
        """config.yaml anew, after the run changed its config (train.budget's corrected plan)."""
        if self.main:
            self.run.write_config(self.parts.cfg.to_dict())

    def keep_config(self) -> None:
        """config.yaml as the continued run runs it, where its run settings changed (config.RUN_SETTINGS)."""
        if self.main and self.run.config() != self.parts.cfg.to_dict():
            self.run.write_config(self.parts.cfg.to_dict())

    def log(self, line: str, echo: bool = True) -> None:
        if self.main:
            self.run.log(line, echo)

    def load(self, training: Training) -> dict | None:
        """Load the last checkpoint into `training` (before anything is written: a bad one changes nothing);
        returns its mid-epoch progress, if any."""
        saved = training.load_state_dict(checkpoint.load(self.run.last), self.run.last)  # on the CPU: RNG stays there
        if saved and not self.main:  # rank 0's saved sums already hold every rank's share
            saved = {**saved, "loss_sum": 0.0, "correct": 0, "count": 0}
        return saved

    def resume(self, training: Training, saved: dict | None) -> None:
        """Continue the records of the run `load` read: metrics cut to the checkpoint, the log, TensorBoard."""
        if self.main:
            self._records(training)  # a crash may have left them behind the checkpoint
        where = f"batch {saved['batch']} of epoch {training.epoch + 1}" if saved else f"epoch {training.epoch}"
        self.log(f"resumed {self.run.path} after {where} (of {self.parts.cfg.train.epochs} epochs)")
        for line in training.notes:  # what the checkpoint held that this machine could not take (another GPU count)
            self.log(line)
        self._open_board(training.epoch)

    def begin(self, training: Training) -> None:
        parts, cfg = self.parts, self.parts.cfg
        world = parts.world
        self.log(f"run {cfg.name}: {cfg.model.name} ({cfg.model.norm} norm), {count_parameters(training.model):,} "
                 f"parameters, {cfg.optimizer.name} + {cfg.scheduler.name}, {cfg.train.epochs} epochs, batch "
                 f"{cfg.data.batch_size}{f' over {world.size} processes' if world.active else ''}, "
                 f"{parts.precision.name} on {parts.device}; "
                 f"{parts.train_loader.num_samples:,} train / {parts.test_loader.num_samples:,} test images")
        self._open_board(0)

    def epoch_end(self, training: Training, improved: bool) -> None:
        """The epoch training.history[-1] is done: best and last checkpoints, metrics, the summary line, TensorBoard."""
        metrics, times = training.history[-1], training.timing[-1]

        def write() -> None:
            state = training.state_dict(self.parts.cfg, metrics["epoch"])
            if improved:  # best before last: a crash between the two re-runs this epoch and rewrites both
                checkpoint.save(self.run.best, state)
            checkpoint.save(self.run.last, state)
            self._records(training)
            self.run.log(summary_line(metrics, times, self.parts.cfg.train.loop_epochs))
            for key in ("lr", "train_loss", "train_acc", "test_loss", "test_acc", "val_loss", "val_acc"):
                if key in metrics:
                    self.board.add_scalar(key, metrics[key], metrics["epoch"])
            self.board.add_scalar("images_per_s", times["images_per_s"], metrics["epoch"])
            self.board.flush()

        distributed.on_main(write, self.parts.device)

    def save_partial(self, training: Training, epochs_done: int, progress: Progress, running: float = 0.0) -> None:
        """A mid-epoch checkpoint: resume continues after `progress.batch` batches of the next epoch."""
        partial = progress.global_state(self.parts.device, running)

        def save() -> None:
            checkpoint.save(self.run.last, training.state_dict(self.parts.cfg, epochs_done, partial))

        distributed.on_main(save, self.parts.device)

    def interrupted(self, training: Training, epochs_done: int, progress: Progress | None) -> Interrupted:
        """Save a resumable checkpoint (mid-epoch; at an epoch's end it is saved already); the error to raise."""
        if progress is not None:
            self.save_partial(training, epochs_done, progress)
        after = f"batch {progress.batch} of epoch {epochs_done + 1}" if progress else f"epoch {epochs_done}"
        where, then = f"checkpoint saved after {after} in {self.run.path}", f"fastcifar train --resume {self.run.path}"
        self.log(f"interrupted: {where}; continue with: {then}", echo=False)  # the CLI prints it, on stderr
        return Interrupted(where, then)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()

    def _records(self, training: Training) -> None:
        """metrics.jsonl, timing.jsonl and summary.json from the history (the checkpoint's, on resume)."""
        self.run.write_metrics(training.history)
        self.run.write_timing(training.timing)
        if training.history:
            self.run.write_summary(run_summary(self.parts.cfg, count_parameters(training.model), training.history,
                                               training.timing))

    def _open_board(self, start_epoch: int) -> None:
        """TensorBoard events in run/tb; on resume, events past the checkpoint are dropped."""
        if not self.main:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.board = SummaryWriter(str(self.run.path / "tb"), purge_step=start_epoch + 1 if start_epoch else None)
