"""--interval-heads K: quantile bins per target from the training fold (a bin of its own for 0 where a target is
zero-inflated, tied edges merged), one linear classifier per target, and the cross-entropy they add to the loss."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from biomass5head.constants import CLOVER, DEAD, GDM, GREEN, TOTAL
from biomass5head.model.intervals import IntervalBins, interval_accuracy, split_log_probs
from biomass5head.model.targets import TargetTransform
from biomass5head.train.losses import BiomassLoss

# Shares of exact zeros per target in the competition's 357 training rows (trainfold.csv).
REAL_ZERO_SHARE = {GREEN: 18 / 357, DEAD: 40 / 357, CLOVER: 135 / 357, GDM: 0.0, TOTAL: 0.0}


def _targets(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.gamma(2.0, 10.0, size=(n, 5))
    y[: int(0.4 * n), CLOVER] = 0.0  # zero-inflated like Clover
    y[:, DEAD] = np.where(np.arange(n) % 2 == 0, 5.0, y[:, DEAD])  # half the values tied at 5 g
    return y


def test_zero_inflated_targets_get_a_zero_bin_and_the_rest_quantiles():
    y = _targets()
    bins = IntervalBins.fit(y, 7)
    clover, total = bins.targets[CLOVER], bins.targets[TOTAL]
    assert clover.zero_bin and clover.n_bins == 7  # zero + 6 quantile bins of the positive values
    assert not total.zero_bin and total.n_bins == 7
    labels = bins.labels(torch.as_tensor(y)).numpy()
    assert (labels[y[:, CLOVER] == 0, CLOVER] == 0).all() and (labels[y[:, CLOVER] > 0, CLOVER] >= 1).all()
    counts = np.bincount(labels[:, TOTAL], minlength=7)
    assert counts.min() >= 50 and counts.max() <= 65  # quantile bins: about 400 / 7 each
    positive = np.bincount(labels[y[:, CLOVER] > 0, CLOVER], minlength=7)[1:]
    assert positive.min() >= 35 and positive.max() <= 45  # 240 positive values in 6 bins


def test_tied_edges_merge_so_a_target_can_have_fewer_bins():
    y = _targets()
    dead = IntervalBins.fit(y, 7).targets[DEAD]
    assert not dead.zero_bin
    assert dead.n_bins < 7  # half the values are 5 g: several quantiles fall on 5 and merge into one edge
    assert len(set(dead.edges)) == len(dead.edges) and list(dead.edges) == sorted(dead.edges)
    labels = IntervalBins.fit(y, 7).labels(torch.as_tensor(y))[:, DEAD].numpy()
    assert set(np.unique(labels)) == set(range(dead.n_bins))  # no empty bin


def test_a_value_on_an_edge_belongs_to_the_bin_above():
    bins = IntervalBins.fit(np.tile(np.arange(1.0, 11.0)[:, None], (1, 5)), 2)
    (edge,) = bins.targets[GREEN].edges
    labels = bins.labels(torch.tensor([[edge - 1e-3] * 5, [edge] * 5, [1e6] * 5, [-1.0] * 5]))
    assert labels[:, GREEN].tolist() == [0, 1, 1, 0]


def test_bins_for_the_zero_shares_of_the_real_table():
    rng = np.random.default_rng(1)
    y = rng.gamma(2.0, 15.0, size=(357, 5))
    for j, share in REAL_ZERO_SHARE.items():
        y[rng.permutation(357)[: round(share * 357)], j] = 0.0
    bins = IntervalBins.fit(y, 7)  # zero bin from 1/14 = 7.1% zeros
    assert bins.targets[CLOVER].zero_bin and bins.targets[DEAD].zero_bin  # 38% and 11% zeros
    assert not bins.targets[GREEN].zero_bin  # 5%: under half a bin's share
    assert not bins.targets[TOTAL].zero_bin and not bins.targets[GDM].zero_bin
    assert bins.sizes == (7, 7, 7, 7, 7)
    assert IntervalBins.fit(y, 10).targets[GREEN].zero_bin  # 1/20 = 5%: Green's zeros now fill half a bin


def test_no_bin_is_empty_even_with_few_values_per_bin():
    y = np.random.default_rng(2).gamma(2.0, 10.0, size=(8, 5)).astype(np.float32)
    bins = IntervalBins.fit(y, 20)
    labels = bins.labels(torch.as_tensor(y))
    for j, n in enumerate(bins.sizes):
        assert n <= 8 and set(labels[:, j].tolist()) == set(range(n))  # every bin holds a training value
    # Training values are float32 in batches: each one lands in the bin its own edge opens.
    assert (labels[:, TOTAL].sort().values == torch.arange(8)).all()


def test_round_trip_through_plain_data():
    bins = IntervalBins.fit(_targets(), 5)
    again = IntervalBins.from_dict(bins.to_dict())
    assert again == bins
    with pytest.raises(ValueError, match="malformed interval bins"):
        IntervalBins.from_dict({"k": 5, "targets": {}})
    with pytest.raises(ValueError, match="between 2 and 50"):
        IntervalBins.fit(_targets(), 1)


def test_the_loss_adds_weighted_mean_cross_entropy():
    y = torch.as_tensor(_targets(16), dtype=torch.float32)
    bins = IntervalBins.fit(y.numpy(), 4)
    transform = TargetTransform.fit(y.numpy())
    torch.manual_seed(0)
    log_probs = torch.cat([torch.randn(16, n).log_softmax(1) for n in bins.sizes], 1)
    labels = bins.labels(y)
    pred = transform.encode(y)
    plain = BiomassLoss(transform)
    with_heads = BiomassLoss(transform, interval_bins=bins, interval_weight=0.3)
    base, _ = plain(pred, pred)
    total, terms = with_heads(pred, pred, interval_log_probs=log_probs, interval_labels=labels)
    by_hand = np.mean([torch.nn.functional.cross_entropy(b, labels[:, j]).item()
                       for j, b in enumerate(split_log_probs(log_probs, bins.sizes))])
    assert terms["interval"].item() == pytest.approx(0.3 * by_hand, rel=1e-5)
    assert total.item() == pytest.approx(base.item() + 0.3 * by_hand, rel=1e-5)
    with pytest.raises(ValueError, match="interval heads are on"):
        with_heads(pred, pred)


def test_a_mixed_image_counts_both_photos_bins_by_their_share():
    y = torch.as_tensor(_targets(8), dtype=torch.float32)
    bins = IntervalBins.fit(y.numpy(), 4)
    loss_fn = BiomassLoss(TargetTransform.fit(y.numpy()), interval_bins=bins, interval_weight=1.0)
    torch.manual_seed(0)
    log_probs = torch.cat([torch.randn(8, n).log_softmax(1) for n in bins.sizes], 1)
    a, b = bins.labels(y), bins.labels(y.flip(0))
    lam = torch.linspace(0, 1, 8)
    mixed = loss_fn.interval_loss(log_probs, (a, b, lam))
    blocks = split_log_probs(log_probs, bins.sizes)
    by_hand = np.mean([(lam * -blk.gather(1, a[:, [j]])[:, 0] + (1 - lam) * -blk.gather(1, b[:, [j]])[:, 0]).mean()
                       for j, blk in enumerate(blocks)])
    assert mixed.item() == pytest.approx(float(by_hand), rel=1e-5)
    assert loss_fn.interval_loss(log_probs, (a, b, torch.ones(8))).item() == pytest.approx(
        loss_fn.interval_loss(log_probs, a).item(), rel=1e-6)  # lam = 1: the photo's own bins only


def test_training_the_heads_learns_the_bins_and_weight_zero_leaves_them_untouched():
    """The effect: with W > 0 the interval heads learn to classify (accuracy far above chance on features that
    carry the targets); with W = 0 they get no gradient."""
    from biomass5head.model.backbone import create_backbone
    from biomass5head.model.five_head import FiveHeadModel

    torch.manual_seed(0)
    n, d = 256, 64
    feats = torch.randn(n, 2, 1, d)
    y = torch.nn.functional.softplus(feats[:, 0, 0, :5] * 3) * 10  # each target from its own feature
    bins = IntervalBins.fit(y.numpy(), 4)
    transform = TargetTransform.fit(y.numpy())
    accs = {}
    for weight in (1.0, 0.0):
        torch.manual_seed(1)
        model = FiveHeadModel(create_backbone("test_vit", 32, pretrained=False), dropout=0.0,
                              interval_sizes=bins.sizes)
        loss_fn = BiomassLoss(transform, interval_bins=bins, interval_weight=weight)
        start = [p.detach().clone() for p in model.interval_heads.parameters()]
        opt = torch.optim.Adam(model.head_parameters(), lr=3e-3)
        for _ in range(150):
            out = model.forward_features(feats[:, 0], feats[:, 1])
            loss, _ = loss_fn(out["reg"], transform.encode(y), interval_log_probs=out["interval"],
                              interval_labels=bins.labels(y))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            probs = model.forward_features(feats[:, 0], feats[:, 1])["interval"].exp().numpy()
        accs[weight] = interval_accuracy(bins, probs, y.numpy())["acc_interval"]
        moved = any(not torch.equal(a, b) for a, b in zip(start, model.interval_heads.parameters(), strict=True))
        assert moved == (weight > 0)
    assert accs[1.0] > 0.75 and accs[0.0] < 0.45  # 4 bins: chance is about 0.25
