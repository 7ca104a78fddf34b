"""The fidelity harness's bookkeeping: what the report shows, which cells a re-run skips, how sparsity is read."""

import json

import pytest
import torch
from torch import nn

from bench.fidelity import report
from bench.fidelity.cells import cell_path, write_json
from bench.fidelity.measure import zero_fractions
from bench.fidelity.methods import method_names
from bench.fidelity.registry import Budget
from bench.fidelity.run import finished
from bench.fidelity.torch_prune import linear_path


def _cell(method, seed, top1, status="ok", model="resnet18", sparsity=0.9):
    cell = {
        "method": method,
        "model": model,
        "sparsity_target": sparsity,
        "seed": seed,
        "budget": {"epochs": 15, "pruning_epochs": 6, "patience": 4, "batch_size": 64},
        "dense_test_top1": 99.0,
        "status": status,
        "wall_seconds": 10.0,
    }
    if status == "ok":
        cell.update(
            {
                "test_top1": top1,
                "val_top1": top1,
                "sparsity": sparsity,
                "max_layer_sparsity": 0.97,
                "max_layer": "fc.weight",
                "layers_emptied": 0,
                "epochs": 15,
            }
        )
    else:
        cell["error"] = "MethodUnavailable: INC set-up failed\nmore"
    return cell


def test_table_shows_mean_std_failures_and_not_run(tmp_path):
    for cell in [_cell("dg2pf", 0, 98.0), _cell("dg2pf", 1, 99.0), _cell("inc-magnitude", 0, None, status="failed")]:
        write_json(cell_path(tmp_path, cell["model"], cell["method"], cell["sparsity_target"], cell["seed"]), cell)
    text = report.table(report.load_cells(tmp_path))
    assert "| resnet18 | 0.90 | dg2pf | 98.50 ± 0.71 | -0.50 | 2 |" in text
    assert "| resnet18 | 0.90 | inc-magnitude | failed: MethodUnavailable: INC set-up failed |" in text
    assert all(
        f"| resnet18 | 0.90 | {m} | not run |" in text for m in method_names() if m not in ("dg2pf", "inc-magnitude")
    )
    # a sparsity where the model has no cell: one line; a model with no cell at all: its dense row only
    assert "| resnet18 | 0.70 | every method | not run |" in text and "| resnet18 | 0.70 | dg2pf |" not in text
    assert "| **mobilenet_v2** | dense | — | not run |" in text and "| mobilenet_v2 | 0.95 |" not in text


def test_table_replaces_only_the_marked_block(tmp_path):
    md = tmp_path / "fidelity-history.md"
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
    assert {
        "dg2pf",
        "dg2pf-paper",
        "gmp-ao",
        "gmp-global",
        "gmp-global-kd",
        "oneshot-ft",
        "torch-prune-l1",
        "inc-magnitude",
    } <= set(grid)
    extra = set(method_names(grid_only=False)) - set(grid)
    from bench.fidelity.dg2pf_family import INVESTIGATIONS

    assert extra and extra == set(INVESTIGATIONS)  # investigations run only when named


def test_the_cub_ablations_are_single_changes_from_the_products_default():
    """``cub-*`` are read against ``dg2pf`` (the page pairs them): that holds while abl-cubic's spelled-out
    configuration is the default's, and each cub-* differs from it in one thing (two fields for a guard or a
    recovery rule)."""
    from bench.fidelity.dg2pf_family import CUBIC, INVESTIGATIONS, config_for
    from dg2pf_core import DG2PFConfig

    budget = Budget()
    assert config_for("abl-cubic", 0.95, 0, budget, CUBIC) == config_for("dg2pf", 0.95, 0, budget, {})
    default = config_for("dg2pf", 0.95, 0, budget, {}).to_dict()
    for name, (overrides, _) in INVESTIGATIONS.items():
        if name.startswith("cub-"):
            changed = {k for k, v in config_for(name, 0.95, 0, budget, overrides).to_dict().items() if default[k] != v}
            assert 1 <= len(changed) <= 2, (name, changed)
    assert DG2PFConfig(sparsity=0.9).schedule == "cubic"


# --- the channel grid (methods of kind "macs") ---------------------------------------------------


def _tiny_cell(method, macs_ratio, tmp_path, sparsity=0.0, budget=None):
    from bench.fidelity.data import DataSettings, Split
    from bench.fidelity.pretrain import build
    from bench.fidelity.registry import Cell

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 3, 12, 12, generator=g), torch.arange(96) % 10
    split = Split(x[:64], y[:64], x[64:80], y[64:80], x[80:], y[80:])

    class Dense:  # what a Cell needs of pretrain.Dense: a fresh copy of the same weights
        test_top1 = val_top1 = 10.0

        def __init__(self):
            torch.manual_seed(0)
            self.state = build("digits_cnn").state_dict()

        def build(self):
            model = build("digits_cnn")
            model.load_state_dict(self.state)
            return model

    return Cell(
        "digits_cnn",
        method,
        sparsity,
        0,
        budget or Budget(epochs=2, pruning_epochs=1, patience=1, batch_size=32),
        Dense(),
        split,
        DataSettings(augment_pad=0),
        tmp_path / "split.npz",
        1,
        macs_ratio,
    )


def test_the_torch_ao_peer_prunes_every_layer_exactly_to_the_cubic_level_at_each_update(tmp_path):
    """gmp-ao (Zhu & Gupta through torch.ao.pruning): every mask update prunes each layer to exactly
    round(level x its size), the levels follow CubicSL up to the target at the end of the pruning epochs,
    and the squashed result is a plain model at the target in every layer."""
    from bench.fidelity.gmp import cubic_level, train_peer
    from bench.fidelity.measure import zero_fractions

    budget = Budget(epochs=3, pruning_epochs=2, patience=3, batch_size=8)  # 8 steps per epoch: 16 pruning steps
    cell = _tiny_cell("gmp-ao", None, tmp_path, sparsity=0.9, budget=budget)
    outcome = train_peer(cell, "ao", distill=False, delta_t=4)
    levels = outcome.notes["levels"]
    assert [u["step"] for u in levels] == [4, 8, 12, 16]
    assert [u["level"] for u in levels] == pytest.approx([cubic_level(0.9, k, 4) for k in (1, 2, 3, 4)])
    assert levels[-1]["level"] == 0.9 and levels[0]["level"] < levels[1]["level"] < levels[2]["level"] < 0.9
    sizes = {
        f"{n}.weight": m.weight.numel()
        for n, m in cell.dense.build().named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }
    for update in levels:
        assert update["zeros"] == {name: round(update["level"] * n) for name, n in sizes.items()}
    _, layers = zero_fractions(outcome.model)
    assert layers == pytest.approx({name: round(0.9 * n) / n for name, n in sizes.items()})
    assert not any(hasattr(m, "parametrizations") for m in outcome.model.modules())  # squashed: a plain model


@pytest.mark.parametrize("kind", ["global", "oneshot"])
def test_the_global_peers_meet_the_target_over_all_weights_without_emptying_a_layer(kind, tmp_path):
    from bench.fidelity.gmp import train_peer
    from bench.fidelity.measure import zero_fractions

    budget = Budget(epochs=3, pruning_epochs=2, patience=3, batch_size=8)
    outcome = train_peer(
        _tiny_cell(f"gmp-{kind}", None, tmp_path, sparsity=0.95, budget=budget),
        kind,
        distill=kind == "global",
        delta_t=4,
    )
    total, layers = zero_fractions(outcome.model)
    n = sum(m.weight.numel() for m in outcome.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert round(total * n) == round(0.95 * n) and max(layers.values()) < 1.0
    assert outcome.notes["levels"][-1]["level"] == 0.95


@pytest.mark.parametrize("method", ["dg2pf-channel", "tp-magnitude"])
def test_channel_methods_remove_channels_down_to_the_macs_target(method, tmp_path):
    from bench.fidelity.methods import get_method
    from bench.fidelity.run import size_ratios

    cell = _tiny_cell(method, 0.5, tmp_path)
    outcome = get_method(method).fn(cell)
    sizes = size_ratios(cell, outcome.model)
    # physically smaller (not zeroed), at the target: DG2PF within a channel, Torch-Pruning at most one of its
    # steps under
    assert sizes["params_pruned"] < sizes["params_dense"]
    assert 0.45 <= sizes["macs_ratio"] <= 0.51
    assert outcome.model(cell.split.x_test).shape == (16, 10)


def test_channel_methods_are_their_own_grid_and_refuse_a_sparsity_cell(tmp_path):
    from bench.fidelity.methods import get_method
    from bench.fidelity.registry import MethodUnavailable

    assert method_names(kind="macs") == ["dg2pf-channel", "tp-magnitude"]
    assert not set(method_names(grid_only=False, kind="macs")) & set(method_names(grid_only=False))
    with pytest.raises(MethodUnavailable, match="--macs-ratios"):
        get_method("tp-magnitude").fn(_tiny_cell("tp-magnitude", None, tmp_path))


def test_channel_table_shows_seeds_sizes_and_the_difference_to_the_peer(tmp_path):
    from bench.fidelity.cells import macs_cell_path

    for method, seed, top1 in [
        ("dg2pf-channel", 0, 99.0),
        ("dg2pf-channel", 1, 98.0),
        ("tp-magnitude", 0, 98.5),
        ("tp-magnitude", 1, 98.5),
    ]:
        cell = _cell(method, seed, top1, model="digits_cnn", sparsity=0.0)
        cell.update(macs_ratio_target=0.5, macs_ratio=0.5, params_ratio=0.3)
        write_json(macs_cell_path(tmp_path, "digits_cnn", method, 0.5, seed), cell)
    write_json(cell_path(tmp_path, "digits_cnn", "dg2pf", 0.9, 0), _cell("dg2pf", 0, 97.0, model="digits_cnn"))
    cells = report.load_cells(tmp_path, "m*-seed*.json")
    assert len(cells) == 4 and len(report.load_cells(tmp_path)) == 1  # each table reads only its own cells
    text = report.channel_table(cells)
    assert "| digits_cnn | 0.50 | dg2pf-channel | 98.50 ± 0.71 | -0.50 | 2 | 99.00, 98.00 | 0.500 | 0.300 |" in text
    assert "- digits_cnn at MACs 0.50: +0.00 (seeds: +0.50, -0.50)" in text


def test_channel_table_has_its_own_markers(tmp_path):
    md = tmp_path / "fidelity-history.md"
    md.write_text(f"{report.START}\nsparsity\n{report.END}\n{report.CHANNEL_START}\nold\n{report.CHANNEL_END}\n")
    report.write_table(md, "channel", report.CHANNEL_START, report.CHANNEL_END)
    assert (
        md.read_text()
        == f"{report.START}\nsparsity\n{report.END}\n{report.CHANNEL_START}\nchannel\n{report.CHANNEL_END}\n"
    )


def _write_cells(results, cells):
    for cell in cells:
        write_json(cell_path(results, cell["model"], cell["method"], cell["sparsity_target"], cell["seed"]), cell)


def test_cells_of_another_dense_model_are_refused_before_new_cells_join_them(tmp_path):
    """A re-trained dense cache is another baseline: its cells must not mix with the old ones."""
    from bench.fidelity.pretrain import Dense
    from bench.fidelity.run import check_dense

    weights = tmp_path / "dense.safetensors"
    weights.write_bytes(b"the dense model now")
    dense = Dense("resnet18", weights, 98.5, 99.0, 1.0, 10, cached=True)
    results = tmp_path / "results"
    _write_cells(
        results,
        [
            {**_cell("dg2pf", 0, 90.0), "dense_sha256": dense.sha256},
            _cell("gmp-cubic", 0, 91.0),  # recorded before the digest: its dense top-1 (99.0) matches
            _cell("oneshot-ft", 0, None, status="failed"),
        ],
    )
    check_dense(results, dense)
    other = cell_path(results, "resnet18", "dg2pf", 0.9, 1)
    write_json(other, {**_cell("dg2pf", 1, 90.0), "dense_sha256": "0" * 64})
    with pytest.raises(SystemExit, match="another dense resnet18") as info:
        check_dense(results, dense)
    assert str(other) in str(info.value)
    other.unlink()
    write_json(other, {**_cell("dg2pf", 1, 90.0), "dense_test_top1": 98.77})  # an older cell of another baseline
    with pytest.raises(SystemExit, match="98.77% there, 99.00% now"):
        check_dense(results, dense)
    write_json(other, {**_cell("dg2pf", 1, 90.0), "dense_test_top1": None})  # nothing to compare: refused, not a crash
    with pytest.raises(SystemExit, match="None% there"):
        check_dense(results, dense)


def test_report_never_replaces_a_table_with_one_from_fewer_cells(tmp_path):
    """A fresh clone lacks the per-cell results behind a published table: re-aggregating there
    must leave the table (and its plot and raw results) as they are, unless told --force."""
    docs, full, empty = tmp_path / "docs", tmp_path / "full", tmp_path / "empty"
    docs.mkdir()
    start, end, png, raw = report.outputs("fashion-mnist", docs)
    (docs / "fidelity-history.md").write_text(f"intro\n{start}\nold\n{end}\n")
    _write_cells(full, [{**_cell("dg2pf", s, 90.0 + s, sparsity=0.95), "dataset": "fashion-mnist"} for s in range(3)])
    empty.mkdir()
    report.main(["--dataset", "fashion-mnist", "--results-dir", str(full), "--docs-dir", str(docs)])
    published = (docs / "fidelity-history.md").read_text()
    assert "from 3 cell(s)" in published and png.exists() and raw.exists()
    raw_before = raw.read_text()
    with pytest.raises(SystemExit, match="made from 3 cell"):
        report.main(["--dataset", "fashion-mnist", "--results-dir", str(empty), "--docs-dir", str(docs)])
    assert (docs / "fidelity-history.md").read_text() == published and raw.read_text() == raw_before
    # a mistyped results directory, a directory of the other dataset's cells, a damaged cell: refused, nothing written
    with pytest.raises(SystemExit, match="does not exist"):
        report.main(
            ["--dataset", "fashion-mnist", "--results-dir", str(tmp_path / "typo"), "--docs-dir", str(docs), "--force"]
        )
    with pytest.raises(SystemExit, match="another dataset"):
        report.main(["--dataset", "digits", "--results-dir", str(full), "--docs-dir", str(docs), "--force"])
    damaged = cell_path(full, "resnet18", "dg2pf", 0.95, 0)
    damaged.write_text(damaged.read_text()[:40])
    with pytest.raises(SystemExit, match="not a readable cell") as info:
        report.main(["--dataset", "fashion-mnist", "--results-dir", str(full), "--docs-dir", str(docs)])
    assert str(damaged) in str(info.value)
    assert (docs / "fidelity-history.md").read_text() == published and raw.read_text() == raw_before
    report.main(["--dataset", "fashion-mnist", "--results-dir", str(empty), "--docs-dir", str(docs), "--force"])
    assert "from 0 cell(s)" in (docs / "fidelity-history.md").read_text()


def test_published_cells_restore_into_a_fresh_results_dir_and_reproduce_the_table(tmp_path):
    """The raw results committed beside a table are enough to rebuild it on a fresh clone."""
    docs, results, fresh = tmp_path / "docs", tmp_path / "results", tmp_path / "fresh"
    cells = [
        {**_cell(m, s, 80.0 + s + (m == "dg2pf"), sparsity=0.95), "dataset": "fashion-mnist"}
        for m in ("dg2pf", "gmp-cubic")
        for s in range(2)
    ]
    _write_cells(results, cells)
    report.main(["--dataset", "fashion-mnist", "--results-dir", str(results), "--docs-dir", str(docs)])
    published = (docs / "fidelity-history.md").read_text()
    report.main(["--dataset", "fashion-mnist", "--results-dir", str(fresh), "--docs-dir", str(docs), "--restore"])
    assert sorted(p.relative_to(fresh) for p in fresh.rglob("*.json")) == sorted(
        p.relative_to(results) for p in results.rglob("*.json")
    )
    report.main(["--dataset", "fashion-mnist", "--results-dir", str(fresh), "--docs-dir", str(docs)])
    strip = lambda text: [line for line in text.splitlines() if not line.startswith("Generated ")]  # noqa: E731
    assert strip((docs / "fidelity-history.md").read_text()) == strip(published)
    # a cell already in the results dir is kept, not replaced by the published one
    kept = next(fresh.rglob("*.json"))
    kept.write_text(kept.read_text() + " ")
    mine = kept.read_text()
    report.main(["--dataset", "fashion-mnist", "--results-dir", str(fresh), "--docs-dir", str(docs), "--restore"])
    assert kept.read_text() == mine
    # raw results naming a path outside the results dir are refused before anything is written
    raw = report.outputs("fashion-mnist", docs)[3]
    raw.write_text(
        json.dumps({"cells": [{**cells[0], "file": "a/b/s0.95-seed0.json"}, {**cells[0], "file": "../../escape.json"}]})
    )
    with pytest.raises(SystemExit, match="not <model>/<method>/<cell>.json"):
        report.main(
            [
                "--dataset",
                "fashion-mnist",
                "--results-dir",
                str(tmp_path / "other"),
                "--docs-dir",
                str(docs),
                "--restore",
            ]
        )
    assert not (tmp_path / "escape.json").exists() and not (tmp_path / "other").exists()
    for bad, needle in (
        ([{**cells[0], "file": "a/b/notacell.json"}], "not <model>/<method>/<cell>.json"),
        ([{**cells[0], "file": "a/b/s0.95-seed0.json"}] * 2, "two cells name"),
    ):
        raw.write_text(json.dumps({"cells": bad}))
        with pytest.raises(SystemExit, match=needle):
            report.main(
                [
                    "--dataset",
                    "fashion-mnist",
                    "--results-dir",
                    str(tmp_path / "other"),
                    "--docs-dir",
                    str(docs),
                    "--restore",
                ]
            )
        assert not (tmp_path / "other").exists()


def test_report_into_a_fresh_docs_dir_and_refusing_one_without_markers(tmp_path):
    results, fresh, unmarked = tmp_path / "r", tmp_path / "fresh", tmp_path / "unmarked"
    _write_cells(results, [{**_cell("dg2pf", 0, 90.0, sparsity=0.95), "dataset": "fashion-mnist"}])
    report.main(["--dataset", "fashion-mnist", "--results-dir", str(results), "--docs-dir", str(fresh)])
    assert "from 1 cell(s)" in (fresh / "fidelity-history.md").read_text()
    unmarked.mkdir()
    (unmarked / "fidelity-history.md").write_text("no markers here\n")
    with pytest.raises(SystemExit, match="lacks the markers"):
        report.main(["--dataset", "fashion-mnist", "--results-dir", str(results), "--docs-dir", str(unmarked)])
    assert sorted(p.name for p in unmarked.iterdir()) == ["fidelity-history.md"]


def test_paired_comparison_is_per_seed_against_the_best_peer(tmp_path):
    _write_cells(
        tmp_path,
        [
            _cell("dg2pf", 0, 90.0),
            _cell("dg2pf", 1, 91.0),
            _cell("dg2pf", 2, 92.0),
            _cell("gmp-cubic", 0, 89.0),
            _cell("gmp-cubic", 1, 89.5),
            _cell("gmp-cubic", 2, 90.0),
            _cell("oneshot-ft", 0, 80.0),
            _cell("oneshot-ft", 1, 95.0),
        ],
    )
    (row,) = report.paired(report.load_cells(tmp_path))
    assert row["peer"] == "gmp-cubic" and row["diffs"] == [1.0, 1.5, 2.0] and row["wins"] == 3
    assert row["mean"] == pytest.approx(1.5) and row["spread"] == pytest.approx(1.0) and row["beyond_spread"]


def test_fashion_mnist_peers_get_the_tensors_a_users_job_gets(tmp_path, monkeypatch):
    """The harness's split for a seed (what the peers train and are scored on) is the one
    ``dg2pf_core.job.prepare`` builds for a user's job with that seed: same hold-out, same subset,
    same transforms, item for item (augmentation included, from the same RNG state)."""
    import safetensors.torch
    import torchvision
    from idx_files import write_dataset

    from bench.fidelity import data as fdata
    from dg2pf_core import DG2PFConfig
    from dg2pf_core import job as product

    write_dataset(tmp_path / "fm")
    monkeypatch.setattr(fdata, "FASHION_MNIST_DIR", str(tmp_path / "fm"))
    settings = fdata.DataSettings(
        image_size=28, augment_pad=0, dataset="fashion-mnist", job_val_fraction=0.2, train_subset=12
    )
    ckpt = tmp_path / "dense.safetensors"
    safetensors.torch.save_file(torchvision.models.shufflenet_v2_x0_5(num_classes=10).state_dict(), str(ckpt))
    for seed in (0, 3):
        ours = fdata.load_job_split(settings, seed)
        job = product.PruneJob(
            arch="torchvision/shufflenet_v2_x0_5",
            num_classes=10,
            checkpoint=str(ckpt),
            dataset=settings.spec(),
            config=DG2PFConfig(sparsity=0.5, seed=seed, device="cpu"),
            image_size=28,
            val_fraction=settings.job_val_fraction,
        )
        prepared = product.prepare(job, dry=False)
        theirs = fdata.train_subset(prepared.splits.train, settings.train_subset, seed)
        assert len(ours.splits.train) == len(theirs) == 12 and ours.splits.augment == prepared.splits.augment == "shift"
        for split_ours, split_theirs in (
            (ours.splits.train, theirs),
            (ours.splits.val, prepared.splits.val),
            (ours.splits.test, prepared.splits.test),
        ):
            for i in range(len(split_theirs)):
                torch.manual_seed(i)
                a = split_ours[i]
                torch.manual_seed(i)
                b = split_theirs[i]
                assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert (
        fdata.load_job_split(settings, 0).splits.train.indices != fdata.load_job_split(settings, 3).splits.train.indices
    )


def test_resume_refuses_a_cell_of_other_data_settings_naming_the_field(tmp_path):
    from dataclasses import asdict

    from bench.fidelity.data import settings_for_dataset

    cell = tmp_path / "cell.json"
    cell.write_text(
        json.dumps({**_cell("dg2pf", 0, 90.0), "data": asdict(settings_for_dataset("fashion-mnist", 8000))})
    )
    assert finished(cell, Budget(), settings_for_dataset("fashion-mnist", 8000))
    with pytest.raises(SystemExit, match="train_subset 8000 there, 4000 now"):
        finished(cell, Budget(), settings_for_dataset("fashion-mnist", 4000))


@pytest.mark.slow
def test_a_pool_worker_stops_when_its_run_is_killed(tmp_path):
    """SIGKILL (or SIGTERM) reaches the run's main process only; its cell workers must not go on."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "run.py"
    script.write_text(
        "import multiprocessing, os, time\n"
        "from bench.fidelity.run import _exit_with_parent\n"
        "def worker():\n"
        "    _exit_with_parent(os.getppid())\n"
        "if __name__ == '__main__':\n"
        "    child = multiprocessing.get_context('fork').Process(target=worker)\n"
        "    child.start()\n"
        "    print(child.pid, flush=True)\n"
        "    time.sleep(600)\n"
    )
    run = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(report.REPO),
        env={**os.environ, "PYTHONPATH": str(report.REPO)},
    )
    child = int(run.stdout.readline())
    os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        if open(f"/proc/{child}/stat").read().split()[2] == "Z":  # exited, waiting to be reaped by init
            return
        time.sleep(0.2)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the worker outlived its killed run by 30 s")


def test_latency_calibration_finds_the_smallest_knob_within_the_budget_where_latency_still_falls(monkeypatch):
    from bench.fidelity import latency
    from bench.fidelity.registry import MethodUnavailable

    # A pruner that narrows a layer with its knob, but past 0.6 leaves it whole (as Torch-Pruning does when a
    # width would round to 0): latency is 0.1 ms per output unit, MACs the units.
    def prune(knob):
        width = 100 if knob > 0.6 else 100 - int(100 * knob)
        return nn.Linear(4, width)

    monkeypatch.setattr(latency, "network_ms", lambda net, shape: 0.1 * net.out_features)
    monkeypatch.setattr(latency, "macs", lambda net, shape: net.out_features)
    knob, calibration = latency.calibrate(prune, (4,), 5.0)
    assert calibration["range"] == [0.0, 0.6]
    assert 0.5 <= knob <= 0.5 + 0.6 / 2**latency.ROUNDS + 1e-9  # the smallest within the budget, to the last step
    assert all((t["ms"] <= 5.0) == (t["knob"] >= 0.5) for t in calibration["trace"])
    with pytest.raises(MethodUnavailable, match="unreachable"):
        latency.calibrate(prune, (4,), 3.0)  # 40 units is the narrowest before the pruner stops


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dg2pf-latency", "dg2pf-channel-at-latency", "tp-uniform-at-latency"])
def test_latency_methods_prune_the_network_to_the_budget_they_were_given(method, tmp_path):
    import dataclasses

    from bench.fidelity.latency import dense_latency
    from bench.fidelity.methods import get_method
    from bench.fidelity.run import latency_record

    cell = _tiny_cell(method, None, tmp_path)
    cell.dense.arch, cell.dense.sha256 = "digits_cnn", "0" * 64
    dense_ms = dense_latency(tmp_path, cell.dense, cell.split.input_shape)
    assert dense_latency(tmp_path, cell.dense, cell.split.input_shape) == dense_ms  # kept: resumed cells agree
    cell = dataclasses.replace(cell, latency_budget_ms=0.6 * dense_ms)
    outcome = get_method(method).fn(cell)
    record = latency_record(cell, outcome.model)
    dense_params = sum(p.numel() for p in cell.dense.build().parameters())
    assert sum(p.numel() for p in outcome.model.parameters()) < dense_params  # channels removed, not zeroed
    # measured beside the dense network (timings are not asserted: the machine is shared)
    assert record["speedup"] == pytest.approx(record["dense_latency_ms"] / record["latency_ms"])
    assert outcome.model(cell.split.x_test).shape == (16, 10)
    if method != "dg2pf-latency":  # the peers' knob was measured within the budget before training
        calibration = outcome.notes["calibration"]
        chosen = [t for t in calibration["trace"] if t["ms"] <= cell.latency_budget_ms]
        assert chosen and calibration["trace"][0]["knob"] == calibration["range"][1]


def test_latency_grid_is_its_own_kind_and_refuses_a_cell_without_a_budget(tmp_path):
    from bench.fidelity.methods import get_method
    from bench.fidelity.registry import MethodUnavailable
    from bench.fidelity.run import parse_args

    assert method_names(kind="latency") == ["dg2pf-latency", "dg2pf-channel-at-latency", "tp-uniform-at-latency"]
    with pytest.raises(MethodUnavailable, match="--latency-shares"):
        get_method("tp-uniform-at-latency").fn(_tiny_cell("tp-uniform-at-latency", None, tmp_path))
    assert parse_args(["--latency-shares", "0.5"]).kind == "latency"
    with pytest.raises(SystemExit):
        parse_args(["--latency-shares", "0.5", "--macs-ratios", "0.5"])
    with pytest.raises(SystemExit):
        parse_args(["--latency-shares", "1.5"])
