"""The experiment config: one YAML file per experiment, validated into typed sections.

Every key has a default (an empty file is a valid experiment); unknown keys
and ill-typed values are one-line UserErrors naming the key. `--set a.b=v`
overrides apply to the raw mapping before validation, so they are checked too.

The names optimizer.name and scheduler.name take are checked against the registries themselves
(`train.optim.optimizers`, `train.optim.schedules`), which load without torch, so each name is written
once, where it is defined, and a config's mistakes are still reported before torch loads. Model names
are checked where the model is built (`train.models.create_model`): that registry needs torch, and
`timm:<name>` asks timm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import yaml

from beton.errors import UserError
from fastloader.config import DataConfig, parse, to_dict


@dataclass
class ModelConfig:
    name: str = "resnet18"  # a name in train.models.MODELS, or timm:<any timm model>
    norm: Literal["batch", "layer", "group", "instance"] = "batch"
    num_classes: Optional[int] = None  # default: the dataset's
    pretrained: bool = False  # timm only; needs the weights in the local cache
    adapt_stem: bool = False  # timm only: 3x3 stride-1 stem, no max-pool, for 32x32 inputs
    sync_bn: bool = False  # distributed: BatchNorm -> SyncBatchNorm
    strides: Optional[list] = None  # resnet18/34: stride of each of the 4 layers (default [1, 2, 2, 2])
    options: dict = field(default_factory=dict)  # the model function's own keywords, by name (airnet: widths, ...)


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # a name in train.optim.optimizers.optimizer_names()
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    no_decay_norm_bias: bool = False  # no weight decay on norm weights and biases
    # name roles: one optimizer per parameter role (ROLES), e.g.
    # {filters: {name: muon, lr: 0.24}, head: {name: sgd, lr: 0.5, momentum: 0.85, nesterov: true}}
    roles: dict = field(default_factory=dict)

    def __post_init__(self):
        from .optim.optimizers import optimizer_names

        _known(self.name, optimizer_names(), "optimizer.name", "optimizer")
        if self.name == "roles" and not self.roles:
            raise UserError("optimizer.name roles needs optimizer.roles: {role: {name: muon | sgd, lr: ...}}")
        if self.lr <= 0:
            raise UserError(f"optimizer.lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.momentum < 0:
            raise UserError("optimizer.weight_decay and optimizer.momentum must be non-negative")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise UserError(f"optimizer.betas must be two numbers in [0, 1), got {self.betas!r}")


# The LR range test's suggestions (train.lr_find computes each; `scheduler.max_lr_rule` picks one): here, so that
# configs check the name without importing torch.
LR_SUGGESTIONS = ("steepest", "valley", "minimum", "min/10")

# Parameter roles (train.optim.roles splits a model by them; a module's `param_role` hook names one of these):
# here, so that configs check role names without importing torch.
ROLES = ("filters", "norm_biases", "whitening_bias", "head", "other")


def _known(name, known, key: str, kind: str) -> None:
    """A one-line UserError unless `name` is one of the `known` names a registry defines."""
    if name not in known:
        raise UserError(f"{key}: unknown {kind} {name!r}; known: {', '.join(known)}")


@dataclass
class SchedulerConfig:
    name: str = "onecycle"  # a name in train.optim.schedules.SCHEDULERS
    # onecycle (stepped per batch)
    max_lr: Union[float, Literal["find"], None] = None  # default: optimizer.lr; "find": LR range test first
    # with max_lr: find, the range test's suggestion it takes (LR_SUGGESTIONS); kept in a run's config.yaml
    # beside the number it found
    max_lr_rule: str = "valley"
    # the first (and, with final_div_factor 1, the last) LR; sets div_factor = max_lr / start_lr.
    # "find": from the same range test as max_lr (the LR where the loss starts its longest descent)
    start_lr: Union[float, Literal["find"], None] = None
    peak_epoch: Optional[float] = None  # epoch of the peak; overrides pct_start
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    three_phase: bool = False
    anneal_strategy: Literal["cos", "linear"] = "cos"
    cycle_momentum: bool = True  # momentum (or Adam's beta1) cycles inversely to the LR, 0.95 -> 0.85 -> 0.95
    # step (per epoch)
    step_size: int = 10
    gamma: float = 0.1
    # plateau (per epoch, on `monitor`; mode defaults from it: max for accuracies, min for losses)
    monitor: Literal["test_loss", "test_acc", "val_loss", "val_acc"] = "test_loss"
    mode: Optional[Literal["min", "max"]] = None
    factor: float = 0.1
    patience: int = 3
    min_lr: float = 0.0
    threshold: float = 1e-4
    # cosine (per batch over the whole run)
    eta_min: float = 0.0
    # linear (per batch): from 0 up to each group's LR over warmup_epochs, then linearly down to end_factor x LR
    warmup_epochs: float = 0.0
    end_factor: float = 0.0
    # linear, optimizer roles: roles whose LR falls to end_factor over fewer epochs than the run, e.g.
    # {whitening_bias: 3} (airbench: the whitening bias's LR reaches 0 with its 3 trained epochs)
    role_epochs: dict = field(default_factory=dict)

    def __post_init__(self):
        from .optim.schedules import SCHEDULERS

        _known(self.name, list(SCHEDULERS), "scheduler.name", "scheduler")
        if not 0 < self.pct_start < 1:
            raise UserError(f"scheduler.pct_start must be in (0, 1), got {self.pct_start}")
        if self.peak_epoch is not None and self.peak_epoch <= 0:
            raise UserError(f"scheduler.peak_epoch must be positive, got {self.peak_epoch}")
        if self.step_size < 1 or self.patience < 0:
            raise UserError("scheduler.step_size must be at least 1 and scheduler.patience non-negative")
        if not 0 < self.factor < 1:
            raise UserError(f"scheduler.factor must be in (0, 1), got {self.factor}")
        if isinstance(self.max_lr, float) and self.max_lr <= 0:
            raise UserError(f"scheduler.max_lr must be positive or 'find', got {self.max_lr}")
        if isinstance(self.start_lr, float) and self.start_lr <= 0:
            raise UserError(f"scheduler.start_lr must be positive or 'find', got {self.start_lr}")
        _known(self.max_lr_rule, LR_SUGGESTIONS, "scheduler.max_lr_rule", "range-test suggestion")
        if self.mode is None:
            self.mode = "max" if self.monitor.endswith("_acc") else "min"
        if self.warmup_epochs < 0 or not 0 <= self.end_factor <= 1:
            raise UserError("scheduler.warmup_epochs must be non-negative and scheduler.end_factor in [0, 1]")
        if not isinstance(self.role_epochs, dict):
            raise UserError(f"scheduler.role_epochs must be a mapping {{role: epochs}}, got {self.role_epochs!r}")
        for role, e in self.role_epochs.items():
            if role not in ROLES:
                raise UserError(f"scheduler.role_epochs: unknown role {role!r}; known: {', '.join(ROLES)}")
            if isinstance(e, bool) or not isinstance(e, (int, float)) or e <= 0:
                raise UserError(f"scheduler.role_epochs.{role} must be a positive number of epochs, got {e!r}")
        if self.role_epochs and self.name != "linear":
            raise UserError(f"scheduler.role_epochs is for the linear schedule, not {self.name!r}")


@dataclass
class BudgetPlan:
    """What `train.budget` became, written by the run into its config.yaml (train.budget_plan) beside the epochs
    it fixed: never set by hand. A resumed run reads it to build the same schedule; the report shows it."""

    seconds: float = 0.0  # the budget (every key has a default, as in every section; these are checked below)
    max_epochs: Union[int, float] = 1  # the config's train.epochs: no plan goes past it
    epochs: Union[int, float] = 1  # the epochs the budget probe planned (whole, or all of max_epochs)
    train_seconds: float = 0.0  # the probe's estimate of one epoch's training
    eval_seconds: float = 0.0  # ... and of one epoch's evaluation
    last_extra_seconds: float = 0.0  # ... and of what the last evaluation adds (eval.tta_last_only)
    spent_seconds: float = 0.0  # start-up before training, the probe included
    # the plan corrected once, after this many epochs (train.epochs is then the corrected number): the schedule
    # follows the planned one up to there, then runs the rest of its course over the new number of epochs
    corrected_at_epoch: Optional[int] = None
    corrected_epoch_seconds: Optional[float] = None  # what that epoch took, training and evaluation

    def __post_init__(self):
        if self.seconds <= 0 or not 0 < self.epochs <= self.max_epochs:
            raise UserError(f"train.budget_plan: needs seconds > 0 and 0 < epochs <= max_epochs, got "
                            f"{self.seconds}, {self.epochs}, {self.max_epochs}")
        if self.corrected_at_epoch is not None and not 1 <= self.corrected_at_epoch < self.epochs:
            raise UserError(f"train.budget_plan.corrected_at_epoch must be in [1, {self.epochs}) (the planned "
                            f"epochs), got {self.corrected_at_epoch}")

    def epoch_seconds(self) -> float:
        """Seconds of one epoch as planned now: the corrected plan's, or else the probe's."""
        if self.corrected_epoch_seconds is not None:
            return self.corrected_epoch_seconds
        return self.train_seconds + self.eval_seconds


@dataclass
class TrainConfig:
    # a fraction trains the last epoch's first part: 7.6 is 7 epochs and the first 60% of the 8th (steps_in)
    epochs: Union[int, float] = 24
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    channels_last: bool = True
    # CPU: malloc keeps the memory a step frees for the next step instead of unmapping it (hardware.reuse_freed_memory)
    reuse_memory: bool = True
    label_smoothing: float = 0.0
    grad_clip: Optional[float] = None  # max gradient norm
    grad_clip_value: Optional[float] = None  # max absolute gradient element (torch's clip_grad_value_), before grad_clip
    compile: bool = False  # torch.compile the model
    seed: int = 0
    dist_timeout: float = 600.0  # torchrun: seconds a collective waits for a silent rank before the job ends
    checkpoint_every: int = 0  # also checkpoint every N batches (0: at epoch ends): a crash then loses < N batches
    # wall time for training + evaluation, e.g. 10m, 90s, 1h: the run times its first steps and trains as many
    # epochs as fit (at most `epochs`); config.yaml then holds that number and budget null, so resume and reruns
    # need no timing
    budget: Union[str, float, None] = None
    budget_plan: Optional[BudgetPlan] = None  # what a budget became (the run writes it; docs/training.md)
    select_best_on: Literal["test", "val"] = "test"  # the split whose accuracy picks checkpoint_best.pt
    ema_decay: Optional[float] = None  # evaluate (and checkpoint_best) an exponential moving average of the weights
    ema_every: int = 1  # optimizer steps between EMA updates
    # airnet: stop training the whitening conv's bias after N epochs; default: scheduler.role_epochs.whitening_bias,
    # the epochs over which its LR falls (ExperimentConfig)
    whitening_bias_epochs: Optional[int] = None
    # deterministic algorithms (torch, cuDNN, cuBLAS), so identical reruns hold on GPUs too, at a cost
    # (hardware.set_deterministic; docs/distributed.md)
    deterministic: bool = False

    def budget_seconds(self) -> Optional[float]:
        return None if self.budget is None else parse_duration(self.budget, "train.budget")

    @property
    def loop_epochs(self) -> int:
        """The epochs the loop runs, the last one partial where `epochs` has a fraction."""
        return math.ceil(self.epochs)

    def epoch_batches(self, epoch: int, steps_per_epoch: int) -> int:
        """Batches epoch `epoch` (from 0) trains: every batch of the loader but in a fractional last epoch."""
        return min(steps_per_epoch, steps_in(self.epochs, steps_per_epoch) - epoch * steps_per_epoch)

    def __post_init__(self):
        self.budget_seconds()
        if self.budget_plan is not None and self.budget is not None:
            raise UserError("train.budget_plan is what a run's budget became (its config.yaml); a config with "
                            "train.budget leaves it out")
        if self.budget_plan is not None and self.budget_plan.corrected_at_epoch is not None \
                and self.epochs <= self.budget_plan.corrected_at_epoch:
            raise UserError(f"train.epochs ({self.epochs}) must exceed train.budget_plan.corrected_at_epoch "
                            f"({self.budget_plan.corrected_at_epoch})")
        if self.checkpoint_every < 0:
            raise UserError(f"train.checkpoint_every must be 0 (epoch ends only) or a number of batches, "
                            f"got {self.checkpoint_every}")
        if self.dist_timeout <= 0:
            raise UserError(f"train.dist_timeout must be positive seconds, got {self.dist_timeout}")
        if isinstance(self.epochs, float) and self.epochs.is_integer():
            self.epochs = int(self.epochs)
        if not self.epochs > 0:
            raise UserError(f"train.epochs must be positive, got {self.epochs}")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise UserError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_every < 1:
            raise UserError(f"train.ema_every must be at least 1, got {self.ema_every}")
        for name in ("grad_clip", "grad_clip_value"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"train.{name} must be positive, got {getattr(self, name)}")


def steps_in(epochs: Union[int, float], steps_per_epoch: int) -> int:
    """Optimizer steps of `epochs` epochs (a fraction rounded up to a whole batch, at least one): the length every
    schedule and the loop agree on."""
    return max(1, math.ceil(round(epochs * steps_per_epoch, 6)))


_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text, where: str) -> float:
    """'10m', '90s', '1h30m' or a number of seconds -> seconds (positive)."""
    import re

    value = str(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        seconds = float(value)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smh])", value)
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([smh])", "", value).strip():
            raise UserError(f"{where}: expected a duration like 10m, 90s or 1h30m, got {text!r}")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise UserError(f"{where} must be positive, got {text!r}")
    return seconds


@dataclass
class EvalConfig:
    """How the per-epoch evaluation, the final line and the analysis compute their logits."""

    tta: Literal["none", "flip", "flip_translate"] = "none"  # test-time augmentation
    tta_fraction: float = 1.0  # apply TTA only to this fraction of each batch: its least confident images
    tta_shift: int = 1  # flip_translate: pixels of each diagonal translation (reflect padding)
    tta_last_only: bool = False  # per-epoch evaluations without TTA, the last epoch's (and the analysis) with it

    def __post_init__(self):
        if not 0 < self.tta_fraction <= 1:
            raise UserError(f"eval.tta_fraction must be in (0, 1], got {self.tta_fraction}")
        if self.tta_shift < 1:
            raise UserError(f"eval.tta_shift must be at least 1, got {self.tta_shift}")


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        """Checks across sections."""
        split = self.data.val_split
        if self.scheduler.monitor.startswith("val_") and not split:
            raise UserError(f"scheduler.monitor {self.scheduler.monitor} needs a validation split: set data.val_split")
        if self.train.select_best_on == "val" and not split:
            raise UserError("train.select_best_on val needs a validation split: set data.val_split")
        if self.scheduler.start_lr is not None and self.scheduler.name != "onecycle":
            raise UserError(f"scheduler.start_lr applies to onecycle, not {self.scheduler.name}")
        if self.train.whitening_bias_epochs is None and "whitening_bias" in self.scheduler.role_epochs:
            # the whitening bias stops training once its LR has fallen (airbench: 3 epochs), so one key says both;
            # frozen from the first epoch that starts after its LR reached the end
            self.train.whitening_bias_epochs = math.ceil(self.scheduler.role_epochs["whitening_bias"])

    def to_dict(self) -> dict:
        return to_dict(self)


MAX_DEPTH = 64  # configs nest three deep; PyYAML's loader recurses once per level


class TooDeep(yaml.YAMLError):
    problem, problem_mark = "nested too deeply", None


def safe_load(text: str):
    """yaml.safe_load, refusing text nested deeper than MAX_DEPTH first: PyYAML's loader would recurse
    until the stack runs out, and a RecursionError deep in the stack can misfire elsewhere (finalizers,
    hooks). The depth is measured on the event stream, which PyYAML's parser yields without recursing."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise TooDeep("nested too deeply")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
    return yaml.safe_load(text)


def _set(raw: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML) to the raw mapping."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set expects key=value, got {assignment!r}")
    try:
        value = safe_load(text)
    except TooDeep:
        raise UserError(f"--set {key.strip()}: value nested too deeply") from None
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def load_raw(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config not found: {path}")
    try:
        raw = safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config {path}: {e}") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    return raw


# How a run runs, not what it trains: the batches, the steps and so the results do not depend on them (the loader's
# order and augmentations are drawn from (seed, epoch, index), torch's threads are the cores', whatever the workers),
# so a run continued by `train --resume --set ...` or by a sweep may change them.
RUN_SETTINGS = (("train", "checkpoint_every"), ("train", "dist_timeout"), ("data", "workers"),
                ("data", "batches_ahead"), ("data", "os_cache"))


def with_run_settings(saved: ExperimentConfig, wanted: ExperimentConfig) -> ExperimentConfig:
    """`saved` (a run's config.yaml) with `wanted`'s RUN_SETTINGS."""
    raw = saved.to_dict()
    for section, key in RUN_SETTINGS:
        raw[section][key] = getattr(getattr(wanted, section), key)
    return build_config(raw)


def run_settings_overrides(overrides: list[str], where: str) -> list[str]:
    """`--set` assignments that may change a run being continued: RUN_SETTINGS only (one line naming them else)."""
    allowed = {f"{section}.{key}" for section, key in RUN_SETTINGS}
    for assignment in overrides:
        key = assignment.partition("=")[0].strip()
        if key not in allowed:
            raise UserError(f"{where} continues a run with its saved config; --set may change only how it runs "
                            f"({', '.join(sorted(allowed))}), not {key}")
    return list(overrides)


def build_config(raw: dict, overrides: list[str] = (), where: str = "config") -> ExperimentConfig:
    raw = yaml.safe_load(yaml.safe_dump(raw))  # a deep copy of plain data
    for assignment in overrides:
        _set(raw, assignment)
    return parse(ExperimentConfig, raw, where)


def load_config(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """Read, override and validate an experiment YAML file."""
    return build_config(load_raw(path), overrides, where=Path(path).name)
