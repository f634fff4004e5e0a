"""Loss functions: small pure functions on tensors (DESIGN section 8).

Each returns a *sum* over its examples together with per-example statistics; the loop divides
by the size of the whole optimizer step (tokens for SFT, examples for DPO/KTO), so that the
gradient is the same however the step is split into micro-batches and processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # label of a token that is not scored (prompt, padding)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each next token: logits [B, T, V], labels [B, T] -> [B, T-1].

    Position t predicts labels[t + 1]; ignored positions get 0. Only scored positions go
    through the fp32 log-softmax (prompt and padding rows of a large vocabulary are skipped).
    """
    logits = logits[:, :-1, :]
    targets = labels[:, 1:]
    mask = targets != IGNORE
    out = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)
    # fp32: bf16 log-probs of long responses lose several digits
    picked = torch.log_softmax(logits[mask].float(), dim=-1)
    out = out.masked_scatter(mask, picked.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1))
    return out


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor,
                   segment_ids: torch.Tensor | None = None, num_segments: int | None = None):
    """Summed response log-probability per sequence.

    Without segment_ids: one sequence per row -> [B]. With segment_ids [B, T] (packed rows,
    the id of the sequence each label belongs to, -1 for none) -> [num_segments].
    """
    per_token = token_logps(logits, labels)
    if segment_ids is None:
        return per_token.sum(-1)
    seg = segment_ids[:, 1:]
    keep = seg >= 0
    out = per_token.new_zeros(num_segments)
    return out.index_add(0, seg[keep], per_token[keep])


def sft_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed NLL over response tokens and their number (prompt and padding are IGNORE)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    scored = logits[:, :-1, :][mask].float()  # only response positions reach the softmax
    total = F.cross_entropy(scored, targets[mask], reduction="sum")
    return total, int(mask.sum())


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL per response token."""
    total, count = sft_loss_sum(logits, labels)
    return total / max(count, 1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, label_smoothing: float = 0.0):
    """Sigmoid DPO loss per pair (Rafailov et al. 2023), with conservative label smoothing.

    Inputs are summed response log-probs [N]. Returns (losses, chosen_rewards, rejected_rewards),
    rewards = beta * (policy - reference) log-ratios, detached.
    """
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
              - F.logsigmoid(-beta * logits) * label_smoothing)
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def kto_kl(policy_kl: torch.Tensor, ref_kl: torch.Tensor) -> torch.Tensor:
    """The KTO reference point: mean log-ratio on mismatched (prompt, completion) pairs,
    clamped at 0 and detached (Ethayarajh et al. 2024)."""
    return (policy_kl - ref_kl).mean().clamp(min=0).detach()


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor,
             kl: torch.Tensor | float, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO loss per example.

    policy, ref: summed completion log-probs [N]; desirable: bool [N]; kl: the detached reference
    point (a scalar shared by the whole optimizer step). Returns (losses, rewards).
    """
    logratio = policy - ref
    kl = torch.as_tensor(kl, dtype=logratio.dtype, device=logratio.device)
    good = desirable_weight * (1 - torch.sigmoid(beta * (logratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratio)))
    losses = torch.where(desirable, good, bad)
    return losses, beta * logratio.detach()
