"""Loss functions against values worked out by hand with math (not with torch)."""

import math

import pytest
import torch

from budgetlab.train import losses
from budgetlab.train.losses import IGNORE


def logsig(x):
    return -math.log1p(math.exp(-x))


def sig(x):
    return 1 / (1 + math.exp(-x))


def log_softmax_at(row, k):
    return row[k] - math.log(sum(math.exp(v) for v in row))


LOGITS = [[[0.0, 1.0, 2.0], [1.0, 0.0, -1.0], [0.5, 0.5, 3.0], [2.0, 2.0, 2.0]]]


def test_sft_loss_scores_response_tokens_only():
    logits = torch.tensor(LOGITS)
    labels = torch.tensor([[IGNORE, IGNORE, 0, 2]])  # prompt = first two tokens
    # position t predicts labels[t+1]: positions 1 and 2 are scored
    want = -(log_softmax_at(LOGITS[0][1], 0) + log_softmax_at(LOGITS[0][2], 2)) / 2
    assert losses.sft_loss(logits, labels).item() == pytest.approx(want, abs=1e-6)
    total, n = losses.sft_loss_sum(logits, labels)
    assert n == 2 and total.item() == pytest.approx(2 * want, abs=1e-6)


def test_sequence_logps_rows_and_packed_segments_agree():
    logits = torch.tensor(LOGITS)
    labels = torch.tensor([[IGNORE, 1, IGNORE, 0]])
    # two sequences packed in one row: tokens 0-1 (seq 0) and 2-3 (seq 1)
    seg = torch.tensor([[0, 0, 1, 1]])
    got = losses.sequence_logps(logits, labels, seg, 2)
    assert got[0].item() == pytest.approx(log_softmax_at(LOGITS[0][0], 1), abs=1e-6)
    assert got[1].item() == pytest.approx(log_softmax_at(LOGITS[0][2], 0), abs=1e-6)
    whole = losses.sequence_logps(logits, labels)
    assert whole.item() == pytest.approx(got.sum().item(), abs=1e-6)


def test_dpo_sigmoid_loss_and_rewards():
    pc, pr, rc, rr = [-3.0, -5.0], [-4.0, -2.0], [-3.5, -4.0], [-3.0, -3.0]
    beta = 0.5
    loss, cr, rj = losses.dpo_loss(*map(torch.tensor, (pc, pr, rc, rr)), beta=beta)
    for i in range(2):
        z = (pc[i] - pr[i]) - (rc[i] - rr[i])
        assert loss[i].item() == pytest.approx(-logsig(beta * z), abs=1e-6)
        assert cr[i].item() == pytest.approx(beta * (pc[i] - rc[i]), abs=1e-6)
        assert rj[i].item() == pytest.approx(beta * (pr[i] - rr[i]), abs=1e-6)


def test_dpo_label_smoothing():
    eps, beta, z = 0.1, 0.2, 1.5  # z = policy margin - reference margin
    loss, _, _ = losses.dpo_loss(torch.tensor([z]), torch.tensor([0.0]), torch.tensor([0.0]),
                                 torch.tensor([0.0]), beta=beta, label_smoothing=eps)
    want = -(1 - eps) * logsig(beta * z) - eps * logsig(-beta * z)
    assert loss.item() == pytest.approx(want, abs=1e-6)


def test_dpo_equal_policy_and_reference_is_log2():
    x = torch.tensor([-7.0, -1.0])
    loss, _, _ = losses.dpo_loss(x, x + 1, x, x + 1, beta=0.1)
    assert torch.allclose(loss, torch.full((2,), math.log(2)), atol=1e-6)


def test_kto_kl_is_clamped_mean_and_detached():
    p = torch.tensor([-2.0, -1.0, -4.0], requires_grad=True)
    r = torch.tensor([-2.5, -2.0, -3.0])
    kl = losses.kto_kl(p, r)
    assert kl.item() == pytest.approx(((0.5 + 1.0 - 1.0) / 3), abs=1e-6)
    assert not kl.requires_grad
    assert losses.kto_kl(r, p.detach()).item() == 0.0  # negative mean clamps to 0


def test_kto_loss_desirable_and_undesirable():
    # Hand-picked so that every sigmoid is a fraction: beta * (logratio - kl) = +-ln 3 or 0,
    # and sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4, sigmoid(0) = 1/2 (Ethayarajh et al. 2024:
    # desirable w_d * (1 - s(beta (r - z))), undesirable w_u * (1 - s(beta (z - r)))).
    kl, beta, wd, wu = 0.2, 0.5, 1.0, 1.33
    ln3 = math.log(3)
    logratio = [kl + 2 * ln3, kl + 2 * ln3, kl, kl - 2 * ln3]
    ref = [-2.5, -2.0, -1.5, -4.0]
    pol = [r + x for r, x in zip(ref, logratio)]
    good = [True, False, True, False]
    want = [wd * (1 - 3 / 4), wu * (1 - 1 / 4), wd * (1 - 1 / 2), wu * (1 - 3 / 4)]
    loss, rewards = losses.kto_loss(torch.tensor(pol, dtype=torch.float64),
                                    torch.tensor(ref, dtype=torch.float64), torch.tensor(good),
                                    torch.tensor(kl), beta, wd, wu)
    assert loss.tolist() == pytest.approx(want, abs=1e-9)
    assert rewards.tolist() == pytest.approx([ln3 + 0.1, ln3 + 0.1, 0.1, 0.1 - ln3], abs=1e-9)
