import pytest
import torch
import torch.nn as nn
import torchvision

from dg2pf_core.errors import DG2PFError, UnknownArchitectureError
from dg2pf_core.models import build_model, get_arch, list_archs

OWN_ARCHS = ["cifar/resnet18", "cifar/resnet50", "cifar/vgg16_bn", "digits_cnn"]
TORCHVISION_ARCHS = [
    "torchvision/resnet18",
    "torchvision/mobilenet_v2",
    "torchvision/shufflenet_v2_x0_5",
]


@pytest.mark.parametrize("name", OWN_ARCHS + TORCHVISION_ARCHS)
def test_arch_builds_and_maps_inputs_to_logits(name):
    spec = get_arch(name)
    # torchvision nets default to 224 px; 32 px exercises the same code paths much faster.
    size = 32 if name.startswith("torchvision/") else spec.input_size
    model = build_model(name, num_classes=10).eval()
    with torch.no_grad():
        out = model(torch.randn(2, spec.in_channels, size, size))
    assert out.shape == (2, 10)


def test_list_archs_is_sorted_and_covers_own_and_torchvision_models():
    names = list_archs()
    assert names == sorted(names)
    assert set(OWN_ARCHS + TORCHVISION_ARCHS) <= set(names)
    for tv_name in torchvision.models.list_models(module=torchvision.models):
        assert f"torchvision/{tv_name}" in names
    # detection / segmentation models are not classifiers and are not offered
    assert "torchvision/fasterrcnn_resnet50_fpn" not in names


@pytest.mark.parametrize("name", ["cifar/resnet18", "cifar/resnet50"])
def test_cifar_resnets_keep_full_resolution_stem(name):
    model = build_model(name, num_classes=10)
    assert model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)
    assert model.conv1.padding == (1, 1)
    assert model.conv1.bias is None
    assert isinstance(model.maxpool, nn.Identity)


def test_cifar_resnet18_keys_match_torchvision_so_its_checkpoints_load():
    ours = build_model("cifar/resnet18", num_classes=10).state_dict()
    theirs = torchvision.models.resnet18(weights=None, num_classes=10).state_dict()
    assert list(ours) == list(theirs)
    # only the stem's shape differs
    differing = [k for k in ours if ours[k].shape != theirs[k].shape]
    assert differing == ["conv1.weight"]


def test_cifar_vgg16_bn_has_single_linear_classifier():
    model = build_model("cifar/vgg16_bn", num_classes=100)
    assert isinstance(model.classifier, nn.Linear)
    assert (model.classifier.in_features, model.classifier.out_features) == (512, 100)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13


def test_digits_cnn_classifier_is_last_layer_and_accepts_other_sizes():
    model = build_model("digits_cnn", num_classes=7).eval()
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert isinstance(layers[-1], nn.Linear) and layers[-1].out_features == 7
    with torch.no_grad():
        for size in (8, 16, 28):
            assert model(torch.randn(2, 1, size, size)).shape == (2, 7)


def test_builds_are_fresh_models():
    a = build_model("digits_cnn", num_classes=10)
    b = build_model("digits_cnn", num_classes=10)
    assert a is not b
    assert a.classifier.weight.data_ptr() != b.classifier.weight.data_ptr()


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [
        ("cifar/resnt18", "cifar/resnet18"),
        ("torchvision/resnet181", "torchvision/resnet18"),
        ("digit_cnn", "digits_cnn"),
    ],
)
def test_unknown_arch_suggests_close_name(typo, suggestion):
    with pytest.raises(UnknownArchitectureError) as info:
        get_arch(typo)
    msg = str(info.value)
    assert repr(typo) in msg
    assert f"did you mean: {suggestion}" in msg
    assert "dg2pf archs" in msg
    assert info.value.field == "arch"


def test_unknown_arch_without_close_match_still_points_to_list():
    with pytest.raises(UnknownArchitectureError, match="dg2pf archs"):
        build_model("zzzzzz", num_classes=10)


def test_torchvision_non_classifier_is_unknown():
    with pytest.raises(UnknownArchitectureError):
        get_arch("torchvision/fasterrcnn_resnet50_fpn")


@pytest.mark.parametrize("bad", [1, 0, -3])
def test_build_model_rejects_fewer_than_two_classes(bad):
    with pytest.raises(DG2PFError) as info:
        build_model("digits_cnn", num_classes=bad)
    assert info.value.field == "num_classes"
    assert str(bad) in str(info.value)
