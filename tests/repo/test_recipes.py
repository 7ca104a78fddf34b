"""recipes/ and docs/recipes.md: every recipe is a valid job that follows the paper, and the page
that lists them (with the paper's figures) says what the files say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dg2pf_contract.job import JobSpec
from dg2pf_contract.options import PRESET_FIELDS, PRESETS
from dg2pf_core.algorithm.config import DG2PFConfig
from dg2pf_core.algorithm.masks import select_prunable
from dg2pf_core.data import dataset_names, parse_spec
from dg2pf_core.models import build_model, get_arch

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.json"))
DOC = ROOT / "docs" / "recipes.md"
NAME = re.compile(r"(?P<dataset>cifar10|imagenet)-(?P<model>[a-z0-9]+)-(?P<percent>\d{2})\.json")
CLASSES = {"cifar10": 10, "imagenet": 1000}
DATASET_SPEC = {"cifar10": "cifar10", "imagenet": "imagefolder"}
DATASET_LABEL = {"cifar10": "CIFAR-10", "imagenet": "ImageNet"}


def _doc_table() -> dict[str, dict[str, str]]:
    """The recipes table of docs/recipes.md: recipe file name -> {column header: cell}."""
    lines = DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| recipe |"))
    headers = [h.strip() for h in lines[start].strip("|").split("|")]
    rows: dict[str, dict[str, str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = dict(zip(headers, (c.strip() for c in line.strip("|").split("|")), strict=True))
        link = re.fullmatch(r"\[(?P<name>[^\]]+)\]\(\.\./recipes/(?P=name)\)", cells["recipe"])
        assert link, f"recipe cell {cells['recipe']!r} is not a link to ../recipes/<file>"
        rows[link["name"]] = cells
    return rows


TABLE = _doc_table()


def test_there_are_recipes_for_every_setting_the_paper_reports():
    assert {p.name for p in RECIPES} == {
        "cifar10-resnet18-95.json",
        "cifar10-vgg16-95.json",
        "cifar10-resnet50-95.json",
        "imagenet-resnet18-90.json",
        "imagenet-resnet50-90.json",
        "imagenet-mobilenetv2-70.json",
    }


def test_docs_table_lists_exactly_the_recipe_files():
    assert sorted(TABLE) == [p.name for p in RECIPES]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_a_valid_job_spec_for_a_registered_arch_and_dataset(path):
    spec = JobSpec.model_validate_json(path.read_text())
    DG2PFConfig.from_spec(spec)  # a consistent DG2PFConfig
    name = NAME.fullmatch(path.name)
    assert name, f"{path.name}: expected <cifar10|imagenet>-<model>-<percent>.json"
    assert spec.sparsity == pytest.approx(int(name["percent"]) / 100)
    assert spec.name == path.stem

    arch = get_arch(spec.model.arch)
    assert arch.in_channels == 3
    assert spec.model.num_classes == CLASSES[name["dataset"]]
    dataset, data_path = parse_spec(spec.dataset.spec)
    assert dataset in dataset_names()
    assert dataset == DATASET_SPEC[name["dataset"]]

    # The placeholder convention docs/recipes.md describes: absolute paths under /data/dg2pf/, so the
    # service reads the checkpoint as a path (not an upload id) and checks it against its roots.
    assert data_path is not None and data_path.startswith("/data/dg2pf/")
    assert spec.model.checkpoint.startswith("/data/dg2pf/checkpoints/")
    assert spec.model.checkpoint.endswith("-dense.safetensors")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_follows_the_papers_settings_on_a_gpu(path):
    spec = JobSpec.model_validate_json(path.read_text())
    assert spec.schedule.preset == "paper"
    c = DG2PFConfig.from_spec(spec)  # the preset's values: the recipe leaves every one of them to it
    assert {k: getattr(c, k) for k in PRESET_FIELDS} == PRESETS["paper"]
    assert (c.schedule, c.recovery, c.scope, c.keep_classifier_dense) == ("linear", "feedback", "global", False)
    assert (c.lr, c.weight_decay, c.kd_loss, c.kd_temperature, c.kd_alpha, c.grad_clip, c.patience) == (
        1e-5,
        0.0,
        "authors",
        4.0,
        0.75,
        0.5,
        4,
    )
    assert c.finetune == "sgd"
    assert spec.teacher is None  # self-distillation from the unpruned input
    assert c.amp in ("bf16", "fp16")
    assert spec.resources.use_gpu


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_docs_row_matches_the_recipe(path):
    spec = JobSpec.model_validate_json(path.read_text())
    row = TABLE[path.name]
    assert row["arch"] == f"`{spec.model.arch}`"
    assert row["dataset"] == DATASET_LABEL[NAME.fullmatch(path.name)["dataset"]]
    assert row["sparsity"] == f"{round(spec.sparsity * 100)}%"
    assert row["epochs (pruning / max)"] == f"{spec.schedule.pruning_epochs} / {spec.schedule.max_epochs}"
    workers = spec.resources.num_workers
    assert row["resources"] == (f"{workers} GPU" if workers == 1 else f"{workers} GPUs")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_docs_nonzero_params_are_what_the_recipe_leaves(path):
    spec = JobSpec.model_validate_json(path.read_text())
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_model(spec.model.arch, spec.model.num_classes)
    prunable = sum(p.numel() for p in select_prunable(model, DG2PFConfig.from_spec(spec).selection()).params.values())
    total = sum(p.numel() for p in model.parameters())
    assert TABLE[path.name]["nonzero params, this arch"] == f"{total - round(spec.sparsity * prunable):,}"


@pytest.mark.parametrize("recipe", sorted(TABLE))
def test_docs_paper_difference_is_pruned_minus_baseline(recipe):
    # A typo in a copied figure shows up here: the paper's three columns must agree with each other.
    row = TABLE[recipe]
    baseline, pruned = float(row["paper baseline top-1"]), float(row["paper DG2PF top-1"])
    difference = row["paper difference"]
    assert re.fullmatch(r"[+-]\d+\.\d\d", difference)
    assert float(difference) == pytest.approx(pruned - baseline, abs=1e-9)


def test_docs_say_the_figures_are_the_papers_not_measured_here():
    text = DOC.read_text()
    assert "None of them was measured" in text
