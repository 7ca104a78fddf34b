"""Knowledge-distillation loss (soft targets mixed with cross-entropy)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 0.75,
) -> torch.Tensor:
    """``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, targets)``.

    KL is averaged over the batch (``batchmean``, the true KL per sample); the T^2 factor keeps the
    soft-target gradients on the same scale as the hard-target ones (Hinton et al., 2015).
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    ce = F.cross_entropy(student_logits.float(), targets)
    return alpha * t * t * kl + (1.0 - alpha) * ce
