"""layers.png stays readable for the networks users prune (50-200 layers): names shortened from the
front, every bar told apart, the figure as tall as the network. (A job's own plots and ``dg2pf plot``
are tested on a real run in test_cli.py, and on the 90% digits run in test_end_to_end.py.)"""

from __future__ import annotations

import json

import pytest
from tiny import metrics_document
from torch import nn

from dg2pf_contract.results import Metrics
from dg2pf_core.io.plots import NAME_LIMIT, PlotError, layers_figure, parse_metrics, short_name, write_plots
from dg2pf_core.io.plots import _labels as bar_labels
from dg2pf_core.models.registry import build_meta


def _weights(arch: str) -> list[str]:
    """The names layer_sparsity has for ``arch``: every Conv/Linear weight, in the network's order."""
    model = build_meta(arch, 1000)
    return [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("arch", ["torchvision/densenet121", "torchvision/vit_b_16", "torchvision/resnet50"])
def test_bar_labels_are_short_and_tell_every_layer_apart(arch):
    names = _weights(arch)
    labels = bar_labels(names)
    assert len(set(labels)) == len(names)  # no two bars with one label
    assert not any(label.endswith(".weight") for label in labels)
    # Short, a little longer (one step) only where that is what tells two layers apart.
    assert max(map(len, labels)) <= NAME_LIMIT + 8


def test_a_long_name_keeps_its_end_which_says_which_layer_it_is():
    assert short_name("layer4.1.conv2.weight") == "layer4.1.conv2"
    assert short_name("features.denseblock4.denselayer16.conv2.weight") == "…denseblock4.denselayer16.conv2"
    assert short_name("encoder.layers.encoder_layer_11.self_attention.out_proj.weight") == "…self_attention.out_proj"
    assert short_name("x" * 80) == "…" + "x" * (NAME_LIMIT - 1)


def test_the_layers_figure_grows_with_the_network_and_names_every_layer():
    names = _weights("torchvision/densenet121")  # 121 layers
    metrics = Metrics.model_validate(
        metrics_document(
            arch="torchvision/densenet121", target_sparsity=0.9, layer_cap=0.94, layer_sparsity={n: 0.9 for n in names}
        )
    )
    small = layers_figure(metrics.model_copy(update={"layer_sparsity": dict(list(metrics.layer_sparsity.items())[:4])}))
    big = layers_figure(metrics)
    assert small.get_size_inches()[1] == 3.0 and big.get_size_inches()[1] >= 0.17 * len(names)
    ticks = [t.get_text() for t in big.axes[0].get_yticklabels()]
    assert ticks == bar_labels(names) and ticks[0] == "features.conv0"  # the first layer on top


def test_what_is_not_a_runs_metrics_is_named(tmp_path):
    with pytest.raises(PlotError, match="no per-epoch history"):
        write_plots(Metrics.model_validate(metrics_document(history=[])), tmp_path)
    with pytest.raises(PlotError, match="no number for 1 layer"):  # NaN, written as null where a version let it through
        layers_figure(Metrics.model_validate(metrics_document(layer_sparsity={"conv.weight": float("nan")})))
    with pytest.raises(PlotError, match=r"layer_sparsity\.conv\.weight: input should be a valid number"):
        parse_metrics(json.dumps(metrics_document(layer_sparsity={"conv.weight": "90%"})), "metrics.json")
    with pytest.raises(PlotError, match="not valid JSON"):
        parse_metrics("{", "metrics.json")
    assert not list(tmp_path.iterdir())
