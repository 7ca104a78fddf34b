"""The fidelity harness's bookkeeping: what the report shows, which cells a re-run skips, how sparsity is read."""

import json

import pytest
import torch
from torch import nn

from bench.fidelity import report
from bench.fidelity.measure import zero_fractions
from bench.fidelity.methods import Budget, method_names
from bench.fidelity.run import cell_path, finished, write_json
from bench.fidelity.torch_prune import linear_path


def _cell(method, seed, top1, status="ok", model="resnet18", sparsity=0.9):
    cell = {"method": method, "model": model, "sparsity_target": sparsity, "seed": seed, "budget": {"epochs": 15, "pruning_epochs": 6, "patience": 4, "batch_size": 64},
            "dense_test_top1": 99.0, "status": status, "wall_seconds": 10.0}
    if status == "ok":
        cell.update({"test_top1": top1, "val_top1": top1, "sparsity": sparsity, "max_layer_sparsity": 0.97,
                     "max_layer": "fc.weight", "layers_emptied": 0, "epochs": 15})
    else:
        cell["error"] = "MethodUnavailable: INC set-up failed\nmore"
    return cell


def test_table_shows_mean_std_failures_and_not_run(tmp_path):
    for cell in [_cell("dg2pf", 0, 98.0), _cell("dg2pf", 1, 99.0), _cell("inc-magnitude", 0, None, status="failed")]:
        write_json(cell_path(tmp_path, cell["model"], cell["method"], cell["sparsity_target"], cell["seed"]), cell)
    text = report.table(report.load_cells(tmp_path))
    assert "| resnet18 | 0.90 | dg2pf | 98.50 ± 0.71 | -0.50 | 2 |" in text
    assert "| resnet18 | 0.90 | inc-magnitude | failed: MethodUnavailable: INC set-up failed |" in text
    assert "| resnet18 | 0.70 | dg2pf | not run |" in text
    assert all(f"| mobilenet_v2 | 0.95 | {m} | not run |" in text for m in method_names())


def test_table_replaces_only_the_marked_block(tmp_path):
    md = tmp_path / "fidelity.md"
    md.write_text(f"intro\n{report.START}\nold\n{report.END}\noutro\n")
    report.write_table(md, "new table")
    assert md.read_text() == f"intro\n{report.START}\nnew table\n{report.END}\noutro\n"


def test_rerun_skips_ok_cells_retries_failed_and_refuses_another_budget(tmp_path):
    ok, bad = tmp_path / "ok.json", tmp_path / "bad.json"
    ok.write_text(json.dumps(_cell("dg2pf", 0, 98.0)))
    bad.write_text(json.dumps(_cell("dg2pf", 0, None, status="failed")))
    assert finished(ok, Budget()) and not finished(bad, Budget()) and not finished(tmp_path / "none.json", Budget())
    with pytest.raises(SystemExit, match="another --results-dir"):
        finished(ok, Budget(epochs=20))


def test_sparsity_is_the_zero_fraction_of_conv_and_linear_weights():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight.zero_()  # 18 of 18
        model[1].weight.zero_()  # BatchNorm: not counted
        model[3].weight.fill_(1.0)  # 0 of 16
    total, layers = zero_fractions(model)
    assert total == pytest.approx(18 / 34) and layers == {"0.weight": 1.0, "3.weight": 0.0}


def test_torch_prune_path_ends_exactly_at_the_target():
    assert linear_path(0.9, 3) == pytest.approx([0.3, 0.6, 0.9]) and linear_path(0.9, 3)[-1] == 0.9


def test_the_default_grid_has_every_method_the_comparison_needs_and_no_investigation():
    grid = method_names()
    assert {"dg2pf", "dg2pf-no-kd", "dg2pf-hard-masks", "dg2pf-feedback", "dg2pf-cubic", "dg2pf-overparam",
            "dg2pf-no-cap", "oneshot-ft", "gmp-cubic", "torch-prune-l1", "inc-magnitude"} <= set(grid)
    extra = set(method_names(grid_only=False)) - set(grid)
    assert extra and all(name.startswith(("dg2pf-cap", "dg2pf-floor", "dg2pf-bn-recal")) for name in extra)
