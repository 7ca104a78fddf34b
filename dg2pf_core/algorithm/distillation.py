"""Distillation losses: soft targets mixed with cross-entropy (DG2PF), and similarity-preserving
distillation of intermediate features (the over-parameterized fine-tuning)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dg2pf_core.algorithm.patterns import fullmatch


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 0.75,
    form: str = "standard",
) -> torch.Tensor:
    """Soft targets at temperature T mixed with cross-entropy, in one of two forms:

    - ``standard``: ``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, targets)``;
      the T^2 factor keeps the soft-target gradients on the scale of the hard-target ones (Hinton et
      al., 2015).
    - ``authors``: ``(alpha * KL + (1 - alpha) * CE) * T^2``, as the DG2PF authors' code computes it
      (cross-entropy scaled by T^2 too).

    KL is averaged over the batch (``batchmean``, the true KL per sample) in both.
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    ce = F.cross_entropy(student_logits.float(), targets)
    if form == "standard":
        return alpha * t * t * kl + (1.0 - alpha) * ce
    if form == "authors":
        return (alpha * kl + (1.0 - alpha) * ce) * t * t
    raise ValueError(f"kd_loss form must be 'standard' or 'authors', got {form!r}")


def similarity_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving distillation (Tung & Mori, 2019) for one block: with F the batch's
    features flattened to (b x d), G = row-normalised F F^T; returns ||G_s - G_t||_F^2 / b^2."""
    b = student_features.shape[0]
    s = student_features.float().reshape(b, -1)
    t = teacher_features.float().reshape(b, -1)
    g_s = F.normalize(s @ s.t(), p=2, dim=1)
    g_t = F.normalize(t @ t.t(), p=2, dim=1)
    return (g_s - g_t).pow(2).sum() / (b * b)


class FeatureTaps:
    """Forward hooks that keep the latest output of the named modules of a model."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        for name in names:
            module = model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._keep(name)))

    def _keep(self, name: str):
        def hook(_module, _inputs, output) -> None:
            self.outputs[name] = output

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.outputs.clear()


def similarity_blocks(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """The modules whose outputs similarity-preserving distillation compares: the names that fully
    match one of ``patterns``; without patterns, the top-level children that hold parameters, except
    the last (the classifier). Patterns are RE2 (dg2pf_core/algorithm/patterns.py): linear time."""
    if not patterns:
        return [n for n, m in model.named_children() if any(True for _ in m.parameters())][:-1]
    return [n for n, _ in model.named_modules() if n and any(fullmatch(p, n, "sp_blocks") for p in patterns)]
