"""train/engine.py: the auxiliary accuracies a training epoch reports, counted by hand, and the LR schedule."""
from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from biomass5head.constants import IGNORE_INDEX
from biomass5head.train.engine import _accuracies, _count_correct, cosine_with_warmup


def test_aux_accuracies_count_only_labelled_rows():
    out = {"state": torch.tensor([[2.0, 1.0, 0, 0], [0, 3.0, 0, 0], [0, 0, 0, 1.0], [1.0, 0, 0, 0]]),
           "month": torch.zeros(4, 10).index_fill_(1, torch.tensor([4]), 1.0)}  # always class 4
    labels = {"state": torch.tensor([0, 0, 3, IGNORE_INDEX]), "month": torch.tensor([4, 4, 1, 4])}
    sums = defaultdict(float)
    _count_correct(out, labels, sums)
    _count_correct(out, labels, sums)  # a second batch: the counts add up
    acc = _accuracies(sums)
    assert acc == {"acc_state": pytest.approx(2 / 3), "acc_month": pytest.approx(3 / 4)}  # species: no head, no key
    assert (sums["n_state"], sums["correct_state"]) == (6, 4)


def test_cosine_with_warmup_is_linear_then_cosine_down_to_one_percent():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, warmup_steps=4, total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.01 + 0.99 * 0.5)  # halfway down
    assert lrs[13] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + torch.cos(torch.tensor(0.9 * torch.pi)).item()))
