import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from beton.errors import UserError
from train.config import OptimizerConfig, SchedulerConfig
from train.models import create_model
from train.optim import OPTIMIZERS, SCHEDULERS, build_optimizer, build_schedule

EPOCHS, STEPS, LR = 4, 5, 0.1
LOSSES = [1.0, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]  # improves once, then flat


def _optimizer(lr: float = LR, momentum: float = 0.9) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr, momentum=momentum)


def _run(schedule, optimizer, epochs=EPOCHS, steps=STEPS, first_epoch=0) -> list[float]:
    """Drive a Schedule as the training loop does; the LR each optimizer step used."""
    lrs = []
    for epoch in range(first_epoch, epochs):
        for _ in range(steps):
            lrs.append(schedule.lr)
            optimizer.step()
            schedule.after_batch()
        schedule.after_epoch({"test_loss": LOSSES[min(epoch, len(LOSSES) - 1)]})
    return lrs


def _reference(make, per_batch: bool, metric: bool = False) -> list[float]:
    """The same torch scheduler stepped by hand."""
    optimizer = _optimizer()
    scheduler = make(optimizer)
    lrs = []
    for epoch in range(EPOCHS):
        for _ in range(STEPS):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if per_batch:
                scheduler.step()
        if not per_batch:
            scheduler.step(LOSSES[epoch]) if metric else scheduler.step()
    return lrs


def _trace(cfg: SchedulerConfig) -> list[float]:
    optimizer = _optimizer()
    return _run(build_schedule(optimizer, cfg, EPOCHS, STEPS, LR), optimizer)


CASES = {
    "onecycle": (SchedulerConfig(name="onecycle", peak_epoch=1, div_factor=10, final_div_factor=1,
                                 anneal_strategy="linear"),
                 lambda o: lr_scheduler.OneCycleLR(o, max_lr=LR, total_steps=EPOCHS * STEPS, pct_start=0.25,
                                                   div_factor=10, final_div_factor=1, anneal_strategy="linear"),
                 True, False),
    "step": (SchedulerConfig(name="step", step_size=2, gamma=0.5),
             lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=0.5), False, False),
    "plateau": (SchedulerConfig(name="plateau", patience=1, factor=0.5),
                lambda o: lr_scheduler.ReduceLROnPlateau(o, mode="min", factor=0.5, patience=1), False, True),
    "cosine": (SchedulerConfig(name="cosine", eta_min=0.001),
               lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=EPOCHS * STEPS, eta_min=0.001), True, False),
    # warm-up over one epoch (STEPS steps: (s + 1) / (STEPS + 1)), then linear from 1 to 0.1 at the last step
    "linear": (SchedulerConfig(name="linear", warmup_epochs=1, end_factor=0.1),
               lambda o: lr_scheduler.LambdaLR(o, lambda s: (s + 1) / (STEPS + 1) if s < STEPS else
                                               1 - 0.9 * (s - STEPS) / (EPOCHS * STEPS - STEPS)), True, False),
}


def test_every_scheduler_has_a_case():
    assert set(SCHEDULERS) == set(CASES) | {"none"}


@pytest.mark.parametrize("name", list(CASES))
def test_trace_matches_torch(name):
    cfg, make, per_batch, metric = CASES[name]
    assert _trace(cfg) == _reference(make, per_batch, metric)


def test_none_is_constant():
    assert _trace(SchedulerConfig(name="none")) == [LR] * (EPOCHS * STEPS)


def test_onecycle_peaks_at_peak_epoch():
    lrs = _trace(SchedulerConfig(name="onecycle", peak_epoch=1))
    assert max(lrs) == pytest.approx(LR)
    assert lrs.index(max(lrs)) == STEPS - 1  # the last batch of epoch 1; epoch 2 starts on the way down


def test_onecycle_seed_recipe_peak_and_no_annihilation():
    epochs, steps = 24, 7
    optimizer = _optimizer()
    cfg = SchedulerConfig(name="onecycle", peak_epoch=5, div_factor=10, final_div_factor=1)
    lrs = _run(build_schedule(optimizer, cfg, epochs, steps, LR), optimizer, epochs=epochs, steps=steps)
    assert abs(lrs.index(max(lrs)) - 5 * steps) <= 1
    assert max(lrs) == pytest.approx(LR)
    assert min(lrs) == pytest.approx(LR / 10) and lrs[-1] == pytest.approx(LR / 10, rel=1e-3)


def test_onecycle_max_lr_overrides_base_lr_and_find_must_be_resolved():
    optimizer = _optimizer()
    lrs = _run(build_schedule(optimizer, SchedulerConfig(max_lr=0.4, pct_start=0.5), EPOCHS, STEPS, LR), optimizer)
    assert max(lrs) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="find"):
        build_schedule(_optimizer(), SchedulerConfig(max_lr="find"), EPOCHS, STEPS, LR)


def test_onecycle_user_errors():
    with pytest.raises(UserError, match="peak_epoch"):
        build_schedule(_optimizer(), SchedulerConfig(peak_epoch=EPOCHS), EPOCHS, STEPS, LR)
    with pytest.raises(UserError, match="cycle_momentum"):
        build_schedule(_optimizer(momentum=0.0), SchedulerConfig(), EPOCHS, STEPS, LR)
    optimizer = _optimizer(momentum=0.0)
    build_schedule(optimizer, SchedulerConfig(cycle_momentum=False), EPOCHS, STEPS, LR)
    assert optimizer.param_groups[0]["momentum"] == 0.0


def test_plateau_cuts_after_patience_flat_epochs():
    patience = 2
    optimizer = _optimizer()
    schedule = build_schedule(optimizer, SchedulerConfig(name="plateau", patience=patience, factor=0.1),
                              10, STEPS, LR)
    after = []
    for _ in range(patience + 3):
        schedule.after_epoch({"test_loss": 1.0})  # the first sets the best; the next `patience` are tolerated
        after.append(schedule.lr)
    assert after[:patience + 1] == [LR] * (patience + 1)
    assert after[patience + 1] == pytest.approx(LR * 0.1)


def test_step_cuts_at_step_size():
    optimizer = _optimizer()
    schedule = build_schedule(optimizer, SchedulerConfig(name="step", step_size=3, gamma=0.1), 8, STEPS, LR)
    per_epoch = _run(schedule, optimizer, epochs=7)[::STEPS]
    assert per_epoch == pytest.approx([LR] * 3 + [LR * 0.1] * 3 + [LR * 0.01])


@pytest.mark.parametrize("name", [*CASES, "none"])
def test_state_dict_round_trip_continues_the_trace(tmp_path, name):
    cfg = CASES[name][0] if name in CASES else SchedulerConfig(name="none")
    full = _trace(cfg)
    optimizer = _optimizer()
    schedule = build_schedule(optimizer, cfg, EPOCHS, STEPS, LR)
    first = _run(schedule, optimizer, epochs=2)
    torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}, tmp_path / "last.pt")

    state = torch.load(tmp_path / "last.pt", weights_only=True)
    optimizer = _optimizer()
    schedule = build_schedule(optimizer, cfg, EPOCHS, STEPS, LR)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    assert first + _run(schedule, optimizer, first_epoch=2) == full


def test_state_of_another_schedule_is_refused():
    state = build_schedule(_optimizer(), SchedulerConfig(name="step"), EPOCHS, STEPS, LR).state_dict()
    with pytest.raises(UserError, match="StepLR"):
        build_schedule(_optimizer(), SchedulerConfig(name="cosine"), EPOCHS, STEPS, LR).load_state_dict(state)


def test_per_batch_flags():
    flags = {name: build_schedule(_optimizer(), SchedulerConfig(name=name), EPOCHS, STEPS, LR).per_batch
             for name in SCHEDULERS}
    assert flags == {"onecycle": True, "cosine": True, "linear": True, "step": False, "plateau": False, "none": False}


# ---------------------------------------------------------------- optimizers


def _small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, bias=False), nn.GroupNorm(2, 4),
                         nn.Flatten(), nn.LayerNorm(4 * 28 * 28), nn.Linear(4 * 28 * 28, 10))


def test_no_decay_norm_bias_groups():
    model = _small_net()
    optimizer = build_optimizer(model, OptimizerConfig(no_decay_norm_bias=True, weight_decay=5e-4))
    decay, no_decay = optimizer.param_groups
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert ids(decay) == {id(model[0].weight), id(model[2].weight), id(model[6].weight)}
    norm_and_bias = [model[0].bias, model[6].bias] + [p for i in (1, 3, 5) for p in model[i].parameters()]
    assert ids(no_decay) == {id(p) for p in norm_and_bias}


def test_no_decay_on_a_resnet_covers_every_parameter_once():
    model = create_model("resnet18", norm="layer")
    decay, no_decay = build_optimizer(model, OptimizerConfig(no_decay_norm_bias=True)).param_groups
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert all(p.dim() == 1 for p in no_decay["params"]) and all(p.dim() > 1 for p in decay["params"])


def test_default_is_one_group_with_decay():
    (group,) = build_optimizer(_small_net(), OptimizerConfig()).param_groups
    assert group["weight_decay"] == 5e-4 and group["lr"] == 0.05


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW)])
def test_optimizers_take_their_settings(name, cls):
    cfg = OptimizerConfig(name=name, lr=0.01, weight_decay=0.1, betas=[0.8, 0.99], eps=1e-6, nesterov=True)
    optimizer = build_optimizer(_small_net(), cfg)
    assert type(optimizer) is cls and set(OPTIMIZERS) == {"sgd", "adam", "adamw"}
    defaults = optimizer.defaults
    assert defaults["lr"] == 0.01 and defaults["weight_decay"] == 0.1
    if name == "sgd":
        assert defaults["momentum"] == 0.9 and defaults["nesterov"] is True
    else:
        assert defaults["betas"] == (0.8, 0.99) and defaults["eps"] == 1e-6


def test_nesterov_without_momentum_is_a_user_error():
    with pytest.raises(UserError, match="nesterov"):
        build_optimizer(_small_net(), OptimizerConfig(nesterov=True, momentum=0.0))


def test_onecycle_cycles_adam_beta1():
    optimizer = build_optimizer(_small_net(), OptimizerConfig(name="adam"))
    schedule = build_schedule(optimizer, SchedulerConfig(), EPOCHS, STEPS, 0.01)
    optimizer.step()
    schedule.after_batch()
    assert optimizer.param_groups[0]["betas"][0] != 0.9
