"""BiomassLoss: regression, Huber for Dead, focal, constraint, dead-aware and auxiliary terms."""
import math

import pytest
import torch
import torch.nn.functional as F

from biomass5head.constants import AUX_HEADS, DEAD, GREEN, IGNORE_INDEX, TOTAL
from biomass5head.model.targets import TargetTransform
from biomass5head.train.losses import BiomassLoss, aux_cross_entropy, focal_weights

N_CLASSES = {"state": 4, "month": 10, "species": 8}


def _consistent_grams(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    green, dead, clover = (torch.rand(n, generator=g, dtype=torch.float64) * s for s in (40.0, 20.0, 10.0))
    return torch.stack([green, dead, clover, green + clover, green + dead + clover], dim=1)


def _transform(log_target=True):
    return TargetTransform.fit(_consistent_grams(64, seed=1).numpy(), log_target)


def _aux(batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = {h: torch.randn(batch, k, generator=g, requires_grad=True) for h, k in N_CLASSES.items()}
    labels = {h: torch.randint(0, k, (batch,), generator=g) for h, k in N_CLASSES.items()}
    return logits, labels


@pytest.mark.parametrize("log_target", [False, True])
def test_zero_when_pred_equals_target(log_target):
    tf = _transform(log_target)
    target = tf.encode(_consistent_grams()).float()
    loss, terms = BiomassLoss(tf, use_focal=True, use_dead_aware=True)(target.clone(), target)
    assert float(terms["regression"]) == pytest.approx(0.0, abs=1e-12)
    assert float(terms["constraint"]) == pytest.approx(0.0, abs=1e-9)
    # The tie of dead-aware still compares Dead with Total - GDM, which holds here up to float32 rounding.
    assert float(terms["dead_aware"]) == pytest.approx(0.0, abs=1e-8)
    assert float(loss) == pytest.approx(0.0, abs=1e-8)
    assert set(terms) == {"regression", "constraint", "dead_aware", "total"}


def test_terms_sum_to_total_and_are_detached():
    tf = _transform()
    target = tf.encode(_consistent_grams()).float()
    pred = (target + 0.3 * torch.randn_like(target)).clamp(min=0).requires_grad_()
    logits, labels = _aux()
    crit = BiomassLoss(tf, use_dead_aware=True, aux_weights={"state": 5.0, "month": 3.0, "species": 2.0})
    loss, terms = crit(pred, target, logits, labels)
    parts = sum(float(v) for k, v in terms.items() if k != "total")
    assert parts == pytest.approx(float(loss.detach()), rel=1e-6)
    assert float(terms["total"]) == pytest.approx(float(loss.detach()))
    assert all(not (isinstance(v, torch.Tensor) and v.requires_grad) for v in terms.values())


def test_huber_vs_mse_for_dead():
    tf = TargetTransform([1.0] * 5, False)
    target = torch.zeros(1, 5)
    big, small = target.clone(), target.clone()
    big[0, DEAD], small[0, DEAD] = 5.0, 0.5
    w = (0.0, 1.0, 0.0, 0.0, 0.0)  # Dead only
    huber = BiomassLoss(tf, target_weights=w, constraint_weight=0.0)
    mse = BiomassLoss(tf, target_weights=w, constraint_weight=0.0, huber_for_dead=False)
    # Large error: 2 * huber(5, delta=1) = 2 * 5 - 1 = 9, MSE 25.
    assert float(huber(big, target)[1]["regression"]) == pytest.approx(9.0)
    assert float(mse(big, target)[1]["regression"]) == pytest.approx(25.0)
    # Small error: both equal the squared error.
    assert float(huber(small, target)[1]["regression"]) == pytest.approx(0.25)
    assert float(mse(small, target)[1]["regression"]) == pytest.approx(0.25)


def test_regression_weighted_mean_of_per_target_losses():
    tf = TargetTransform([1.0] * 5, False)
    target = torch.zeros(2, 5)
    pred = torch.tensor([[1.0, 0.0, 0.0, 0.0, 2.0], [1.0, 0.0, 0.0, 0.0, 2.0]])
    w = (0.1, 0.1, 0.1, 0.2, 0.5)
    _, terms = BiomassLoss(tf, target_weights=w, constraint_weight=0.0)(pred, target)
    assert float(terms["regression"]) == pytest.approx((0.1 * 1.0 + 0.5 * 4.0) / 1.0)
    # Scaling all weights leaves the loss unchanged (normalised by the sum of weights).
    _, terms2 = BiomassLoss(tf, target_weights=[x * 3 for x in w], constraint_weight=0.0)(pred, target)
    assert float(terms2["regression"]) == pytest.approx(float(terms["regression"]))


def test_target_weights_change_which_target_dominates():
    tf = TargetTransform([1.0] * 5, False)
    target = torch.zeros(4, 5)
    pred = torch.zeros(4, 5, requires_grad=True)
    with torch.no_grad():
        pred[:, GREEN], pred[:, TOTAL] = 1.0, 1.0
    for weights, winner in (((0.8, 0.05, 0.05, 0.05, 0.05), GREEN), ((0.05, 0.05, 0.05, 0.05, 0.8), TOTAL)):
        pred.grad = None
        loss, _ = BiomassLoss(tf, target_weights=weights, constraint_weight=0.0)(pred, target)
        loss.backward()
        per_target = pred.grad.abs().sum(dim=0)
        assert int(per_target.argmax()) == winner


def test_constraint_zero_when_consistent_positive_when_violated():
    tf = _transform()
    grams = _consistent_grams()
    crit = BiomassLoss(tf, constraint_weight=1.0)
    _, terms = crit(tf.encode(grams).float(), tf.encode(grams).float())
    assert float(terms["constraint"]) == pytest.approx(0.0, abs=1e-9)
    bad = grams.clone()
    bad[:, TOTAL] += 10.0  # Total 10 g above GDM + Dead
    _, terms = crit(tf.encode(bad).float(), tf.encode(grams).float())
    # r1 = 0, r2 = 10 / gram_scale: mean over both residuals = (10 / gram_scale)^2 / 2.
    expected = (10.0 / tf.gram_scale) ** 2 / 2
    assert float(terms["constraint"]) == pytest.approx(expected, rel=1e-3)
    # constraint_weight scales it linearly
    _, terms_half = BiomassLoss(tf, constraint_weight=0.5)(tf.encode(bad).float(), tf.encode(grams).float())
    assert float(terms_half["constraint"]) == pytest.approx(expected / 2, rel=1e-3)


@pytest.mark.parametrize("options", [{}, {"use_focal": True}, {"use_dead_aware": True}, {"huber_for_dead": False},
                                     {"use_focal": True, "use_dead_aware": True, "huber_for_dead": False}])
def test_gradients_flow_and_are_finite(options):
    tf = _transform()
    target = tf.encode(_consistent_grams()).float()
    raw = torch.randn(8, 5, requires_grad=True)
    pred = F.softplus(raw)
    logits, labels = _aux()
    crit = BiomassLoss(tf, aux_weights={"state": 1.0, "month": 1.0, "species": 1.0}, **options)
    loss, _ = crit(pred, target, logits, labels)
    loss.backward()
    assert torch.isfinite(raw.grad).all() and float(raw.grad.abs().sum()) > 0
    for h in AUX_HEADS:
        assert torch.isfinite(logits[h].grad).all() and float(logits[h].grad.abs().sum()) > 0


def test_constraint_gradient_flows_through_decode():
    tf = _transform()
    target = tf.encode(_consistent_grams()).float()
    pred = target.clone()
    pred[:, TOTAL] += 0.5
    pred.requires_grad_()
    crit = BiomassLoss(tf, target_weights=(1.0, 0, 0, 0, 0), constraint_weight=1.0)
    loss, terms = crit(pred, target)
    assert float(terms["regression"]) == 0.0  # only the constraint depends on Total here
    loss.backward()
    assert float(pred.grad[:, TOTAL].abs().sum()) > 0


def test_focal_weights_formula_and_mean_one():
    err = torch.tensor([[0.1], [0.1], [0.1], [3.0]])
    w = focal_weights(err)
    assert float(w.mean()) == pytest.approx(1.0)
    assert float(w[3, 0]) == pytest.approx(3.0 / 0.825, rel=1e-4)
    assert torch.equal(focal_weights(torch.zeros(3, 2)), torch.ones(3, 2))


def test_focal_weights_larger_errors_more():
    tf = TargetTransform([1.0] * 5, False)
    target = torch.zeros(4, 5)
    pred = torch.full((4, 5), 0.1)
    pred[3] = 3.0
    losses, shares = {}, {}
    for focal in (False, True):
        p = pred.clone().requires_grad_()
        loss, _ = BiomassLoss(tf, constraint_weight=0.0, huber_for_dead=False, use_focal=focal)(p, target)
        loss.backward()
        losses[focal] = float(loss.detach())
        shares[focal] = float(p.grad[3, GREEN] / p.grad[0, GREEN])  # pull of the large error vs a small one
    # Plain: mean e^2 = (3 * 0.01 + 9) / 4; focal (gamma 1): sum |e|^3 / sum |e| = (3 * 0.001 + 27) / 3.3.
    assert losses[False] == pytest.approx((0.03 + 9.0) / 4, rel=1e-5)
    assert losses[True] == pytest.approx((0.003 + 27.0) / 3.3, rel=1e-4)
    assert shares[True] > shares[False]


def test_dead_aware_present_finite_and_replaces_dead_regression():
    tf = _transform()
    grams = _consistent_grams()
    target = tf.encode(grams).float()
    pred = target.clone()
    pred[:, DEAD] *= 1.5
    w = (0.0, 1.0, 0.0, 0.0, 0.0)
    _, plain = BiomassLoss(tf, target_weights=w, constraint_weight=0.0)(pred, target)
    _, aware = BiomassLoss(tf, target_weights=w, constraint_weight=0.0, use_dead_aware=True)(pred, target)
    assert float(plain["dead_aware"]) == 0.0 and float(plain["regression"]) > 0
    assert float(aware["regression"]) == 0.0  # Dead's term moved to dead_aware
    assert math.isfinite(float(aware["dead_aware"])) and float(aware["dead_aware"]) > 0


def test_dead_aware_tie_does_not_push_total_or_gdm():
    tf = _transform()
    target = tf.encode(_consistent_grams()).float()
    pred = target.clone()
    pred[:, DEAD] *= 2.0
    pred.requires_grad_()
    crit = BiomassLoss(tf, target_weights=(0, 1.0, 0, 0, 0), constraint_weight=0.0, use_dead_aware=True)
    loss, _ = crit(pred, target)
    loss.backward()
    assert float(pred.grad[:, DEAD].abs().sum()) > 0
    assert float(pred.grad[:, [GREEN, 2, 3, TOTAL]].abs().sum()) == 0.0


def test_aux_cross_entropy_matches_by_hand():
    tf = _transform()
    target = tf.encode(_consistent_grams()).float()
    logits, labels = _aux()
    labels["month"][:3] = IGNORE_INDEX
    weights = {"state": 5.0, "month": 3.0, "species": 2.0}
    _, terms = BiomassLoss(tf, aux_weights=weights)(target, target, logits, labels)
    for h in AUX_HEADS:
        keep = labels[h] != IGNORE_INDEX
        by_hand = weights[h] * F.cross_entropy(logits[h][keep], labels[h][keep])
        assert float(terms[f"aux_{h}"]) == pytest.approx(float(by_hand.detach()), rel=1e-6)


def test_all_ignored_labels_give_zero_not_nan():
    logits = torch.randn(4, 10, requires_grad=True)
    labels = torch.full((4,), IGNORE_INDEX)
    assert float(F.cross_entropy(logits.detach(), labels, ignore_index=IGNORE_INDEX)) != 0.0  # NaN without the guard
    ce = aux_cross_entropy(logits, labels)
    assert float(ce.detach()) == 0.0
    ce.backward()  # still attached to the graph
    tf = _transform()
    target = tf.encode(_consistent_grams(4)).float()
    aux_logits, aux_labels = _aux(4)
    aux_labels["state"][:] = IGNORE_INDEX
    loss, terms = BiomassLoss(tf, aux_weights={"state": 5.0, "month": 1.0, "species": 1.0})(
        target, target, aux_logits, aux_labels)
    assert float(terms["aux_state"]) == 0.0 and math.isfinite(float(terms["total"]))


def test_aux_on_without_aux_inputs_is_an_error():
    tf = _transform()
    target = tf.encode(_consistent_grams()).float()
    crit = BiomassLoss(tf, aux_weights={"state": 1.0, "month": 1.0, "species": 1.0})
    with pytest.raises(ValueError, match="aux"):
        crit(target, target)


@pytest.mark.parametrize("options", [{}, {"use_focal": True, "use_dead_aware": True}])
def test_nan_in_pred_gives_non_finite_total(options):
    tf = _transform()
    target = tf.encode(_consistent_grams()).float()
    pred = target.clone()
    pred[2, GREEN] = float("nan")
    loss, terms = BiomassLoss(tf, **options)(pred, target)
    assert not math.isfinite(float(loss)) and not math.isfinite(float(terms["total"]))


def test_rejects_bad_arguments():
    tf = _transform()
    with pytest.raises(ValueError):
        BiomassLoss(tf, target_weights=(0.2,) * 4)
    with pytest.raises(ValueError):
        BiomassLoss(tf, target_weights=(0.0,) * 5)
    with pytest.raises(ValueError):
        BiomassLoss(tf, aux_weights={"state": 1.0})
    with pytest.raises(ValueError):
        BiomassLoss(tf)(torch.zeros(2, 5), torch.zeros(2, 4))


def test_bfloat16_pred_is_computed_in_float32():
    tf = _transform()
    target = tf.encode(_consistent_grams()).float()
    loss, _ = BiomassLoss(tf)(target.bfloat16(), target)
    assert loss.dtype == torch.float32 and math.isfinite(float(loss))


def test_dead_aware_loss_against_its_formula_on_three_rows():
    """Worked by hand: share * (mean huber2(log1p(Dead) - log1p(true Dead)) + 0.5 * mean huber2(log1p(Dead) -
    log1p(max(0, Total - GDM)))) with huber2(e) = e^2 for |e| <= 1 and 2|e| - 1 beyond; share = 0.2 / 1.0."""
    tf = TargetTransform(torch.ones(5).numpy(), log_target=False)
    pred = torch.tensor([[10.0, 4.0, 1.0, 11.0, 15.0],     # implied Dead 15 - 11 = 4: the tie is 0
                         [5.0, 0.0, 0.0, 5.0, 20.0],       # implied 15: log1p gap 2.77 > 1, linear part
                         [2.0, 3.0, 1.0, 3.0, 2.0]])       # Total < GDM: implied max(0, -1) = 0
    true = torch.tensor([[10.0, 4.0, 1.0, 11.0, 15.0], [5.0, 2.0, 0.0, 5.0, 7.0], [2.0, 0.0, 1.0, 3.0, 3.0]])
    crit = BiomassLoss(tf, use_dead_aware=True)

    def huber2(e):
        return e * e if abs(e) <= 1 else 2 * abs(e) - 1

    fit = [huber2(math.log1p(p) - math.log1p(t)) for p, t in ((4, 4), (0, 2), (3, 0))]
    tie = [huber2(math.log1p(p) - math.log1p(i)) for p, i in ((4, 4), (0, 15), (3, 0))]
    expected = 0.2 * (sum(fit) / 3 + 0.5 * sum(tie) / 3)
    assert float(crit.dead_aware_loss(pred, true)) == pytest.approx(expected, rel=1e-6)
