"""The pre-trained examples: the digits one stops once validation stops improving, keeping the weights
a full run would keep (the learning rate follows the same cosine either way)."""

from __future__ import annotations

import json

import pytest
import torch

from dg2pf_core.job.example import EXAMPLES, pretrain


def test_the_digits_example_stopped_early_on_its_best_epoch(digits_example):
    m = json.loads((digits_example / "metrics.json").read_text())
    patience = EXAMPLES["digits"].patience
    assert m["max_epochs"] == EXAMPLES["digits"].epochs and m["best_epoch"] <= m["epochs"]
    assert m["epochs"] == m["max_epochs"] or m["epochs"] - m["best_epoch"] == patience
    assert m["val_top1"] >= 95 and m["test_top1"] >= 95


@pytest.mark.slow
def test_stopping_early_keeps_the_weights_of_the_full_run_when_no_later_epoch_is_better():
    kw = dict(epochs=10, lr=2e-3, batch_size=64, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise equal runs need the same thread count
    try:
        early, m_early = pretrain("digits_cnn", 10, "digits", patience=2, **kw)
        full, m_full = pretrain("digits_cnn", 10, "digits", **kw)
    finally:
        torch.set_num_threads(threads)
    assert m_full.epochs == 10 and m_early.epochs == min(10, m_early.best_epoch + 2)
    if m_full.best_epoch == m_early.best_epoch:
        a, b = early.state_dict(), full.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:  # a later epoch was better: the full run found it, the early one had stopped before
        assert m_full.best_epoch > m_early.epochs and m_full.val_top1 > m_early.val_top1
