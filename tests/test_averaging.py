"""Weight averaging (train.optim.averaging): EMA and Lookahead against the hand-computed averages."""
from __future__ import annotations

import io

import torch
from torch import nn

from train.optim.averaging import EMA, Lookahead


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.register_buffer("running", torch.zeros(2))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def test_ema_equals_the_hand_computed_average():
    model = _Tiny()
    ema = EMA(model, decay=0.5, every=2)
    values = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]  # the model's weights before steps 1..6
    for step, v in enumerate(values, start=1):
        with torch.no_grad():
            model.w.fill_(v), model.running.fill_(-v), model.count.fill_(step)
        ema.update(step)
    expected = ((0 * 0.5 + 2 * 0.5) * 0.5 + 8 * 0.5) * 0.5 + 32 * 0.5  # steps 2, 4, 6 only
    assert ema.updates == 3 and torch.allclose(ema.average["w"], torch.full((2,), expected))
    assert torch.allclose(ema.average["running"], torch.full((2,), -expected)) and ema.average["count"] == 6
    with ema.averaged() as averaged:
        assert torch.allclose(averaged.w, torch.full((2,), expected))
    assert torch.equal(model.w, torch.full((2,), 32.0))  # its own weights are back
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    other = EMA(_Tiny(), decay=0.9)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert other.decay == 0.5 and torch.equal(other.average["w"], ema.average["w"])


def test_lookahead_resets_the_model_to_the_average():
    model = _Tiny()
    lookahead = Lookahead(model, decay=0.75)
    with torch.no_grad():
        model.w.fill_(4.0)
    lookahead.update(1)
    assert torch.equal(model.w, torch.full((2,), 1.0)) and torch.equal(lookahead.average["w"], model.w)
