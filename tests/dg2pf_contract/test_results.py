"""metrics.json through its type: what a run writes reads back as ``Metrics`` with nothing left untyped, a
written file keeps the names readers of the previous release look for, and older files still load."""

from __future__ import annotations

import json
import math

import pytest
from tiny import metrics_document

from dg2pf_contract.artifacts import Artifacts
from dg2pf_contract.results import EpochRecord, Metrics, MetricsError, ModelInfo


def _unknown_keys(m: Metrics) -> dict:
    """Keys of the document the type does not declare, at every level a run writes."""
    found = dict(m.model_extra or {})
    found.update({f"history[{i}].{k}": v for i, r in enumerate(m.history) for k, v in (r.model_extra or {}).items()})
    for name in ("onnx", "latency"):
        section = getattr(m, name)
        if section is not None:
            found.update({f"{name}.{k}": v for k, v in (section.model_extra or {}).items()})
    return found


@pytest.mark.slow
def test_a_real_runs_metrics_json_is_typed_entirely(finished_job):
    out, _ = finished_job
    written = json.loads(Artifacts(out).metrics.read_text())
    m = Metrics.read(Artifacts(out).metrics)
    assert _unknown_keys(m) == {}  # every key the run wrote is a field of the type
    assert m.arch == "digits_cnn" and m.granularity == "unstructured" and m.world_size == 1
    assert m.history[0].phase == "baseline" and all(isinstance(r, EpochRecord) for r in m.history)
    assert m.onnx is not None and m.onnx.written and m.latency is not None and m.latency.backends
    assert 0 < m.macs_sparse < m.macs_dense
    assert m.to_document() == written  # what is read is what was written, key for key


@pytest.mark.slow
def test_macs_are_written_under_their_former_flops_names_too(finished_job):
    out, _ = finished_job
    written = json.loads(Artifacts(out).metrics.read_text())
    assert (written["flops_dense"], written["flops_sparse"]) == (written["macs_dense"], written["macs_sparse"])
    assert written["flops_unit"] == "multiply-accumulates of Conv/Linear layers per sample"


def test_a_document_round_trips(tmp_path):
    m = Metrics.model_validate(metrics_document())
    m.write(tmp_path / Artifacts.METRICS)
    again = Metrics.read(tmp_path / Artifacts.METRICS)
    assert again == m and again.to_document() == m.to_document()
    assert again.history[1].recovered_per_ranking == [3]


def test_an_older_file_with_only_flops_names_reads_and_is_written_with_both(tmp_path):
    old = metrics_document(flops_dense=20_000, flops_sparse=9_000, flops_unit="multiply-accumulates")
    del old["macs_dense"], old["macs_sparse"]
    m = Metrics.model_validate(old)
    assert (m.macs_dense, m.macs_sparse) == (20_000, 9_000)
    m.write(tmp_path / Artifacts.METRICS)
    written = json.loads((tmp_path / Artifacts.METRICS).read_text())
    assert written["macs_sparse"] == written["flops_sparse"] == 9_000 and written["flops_dense"] == 20_000


def test_what_a_version_wrote_and_this_one_does_not_know_is_read_and_kept(tmp_path):
    fields = {"future_section": {"a": 1}, "augment": "shift"}
    document = metrics_document(**fields)
    document["history"][0]["future_per_epoch"] = 7
    m = Metrics.model_validate(document)
    m.write(tmp_path / Artifacts.METRICS)
    written = json.loads((tmp_path / Artifacts.METRICS).read_text())
    assert written["future_section"] == {"a": 1} and written["history"][0]["future_per_epoch"] == 7


def test_the_first_releases_document_still_loads():
    """What a run of the first release wrote: no granularity, preset, ONNX or latency, and the MACs as flops_*."""
    first = {
        k: v
        for k, v in metrics_document().items()
        if k not in ("granularity", "max_layer_sparsity", "layer_cap", "warnings", "macs_dense", "macs_sparse")
    }
    first.update(flops_dense=100, flops_sparse=50, flops_unit="multiply-accumulates of Conv/Linear layers per sample")
    first["history"] = [
        {k: v for k, v in r.items() if k not in ("restarts", "recovered", "rankings", "recovered_per_ranking")}
        for r in first["history"]
    ]
    m = Metrics.model_validate(first)
    assert m.granularity == "unstructured" and m.onnx is None and m.latency is None and m.warnings == []
    assert "granularity" not in m.to_document()  # left out as it was: nothing the run did not write is made up


def test_non_finite_numbers_are_written_as_null(tmp_path):
    m = Metrics.model_validate(metrics_document(test_top1=math.nan))
    m.write(tmp_path / Artifacts.METRICS)
    assert json.loads((tmp_path / Artifacts.METRICS).read_text())["test_top1"] is None


def test_what_is_not_a_runs_metrics_json_is_named_with_what_is_wrong(tmp_path):
    with pytest.raises(MetricsError, match=r"^run/metrics.json is not valid JSON"):
        Metrics.parse('{"arch": ', "run/metrics.json")
    with pytest.raises(MetricsError, match="holds a JSON list, not an object"):
        Metrics.parse("[]", "x")
    with pytest.raises(MetricsError, match=r"it has no num_classes, dataset, image_size and \d+ more"):
        Metrics.parse(json.dumps({"arch": "digits_cnn", "test_top1": 97.2}), "x")
    damaged = metrics_document(layer_sparsity={"conv.weight": "ninety"})
    with pytest.raises(MetricsError, match=r"layer_sparsity\.conv\.weight: input should be a valid number"):
        Metrics.parse(json.dumps(damaged), "x")


@pytest.mark.slow
def test_a_model_folder_of_either_kind_says_what_serving_needs(finished_job, digits_example):
    """A pruning run's output and a pre-trained example both hold the model's arch, classes and data."""
    out, _ = finished_job
    for folder in (out, digits_example):
        info = ModelInfo.read(Artifacts(folder).metrics)
        assert (info.arch, info.num_classes, info.dataset) == ("digits_cnn", 10, "digits")
    assert ModelInfo.read(Artifacts(out).metrics).onnx.written
