"""Tests for lightning_immunize.models (CPU, pretrained=False only)."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from lightning_immunize.models import (
    LinearExtractor,
    LinearHead,
    TimmBackbone,
    bce_head,
    cross_entropy_head,
    linear_head,
)

VIT_KW = dict(img_size=32, patch_size=8, depth=3)

# ----------------------------------------------------------------------------- extractor


def test_identity_init_is_identity() -> None:
    f = LinearExtractor(5, init="identity")
    assert f.out_features == 5
    assert torch.equal(f.theta, torch.eye(5))
    x = torch.randn(4, 5)
    assert torch.equal(f(x), x)


def test_identity_init_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    LinearExtractor(6, init="identity")
    LinearExtractor(6, 3, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_random_init_seed_reproducible() -> None:
    a = LinearExtractor(10, 4, seed=1)
    b = LinearExtractor(10, 4, seed=1)
    c = LinearExtractor(10, 4, seed=2)
    assert torch.equal(a.theta, b.theta)
    assert not torch.equal(a.theta, c.theta)
    bound = 1 / math.sqrt(10)  # nn.Linear default: U(-1/sqrt(D), 1/sqrt(D))
    assert a.theta.abs().max() <= bound


def test_theta_shape_and_view() -> None:
    f = LinearExtractor(7, 3, seed=0)
    assert f.linear.weight.shape == (3, 7)
    assert f.linear.bias is None
    assert f.theta.shape == (7, 3)
    assert torch.equal(f.theta, f.linear.weight.T)
    x = torch.randn(2, 7)
    torch.testing.assert_close(f(x), x @ f.theta)
    # theta is a view: gradients flow to the weight
    (x @ f.theta).sum().backward()
    assert f.linear.weight.grad is not None


def test_forward_flattens_batch() -> None:
    f = LinearExtractor(12, 4, seed=0)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(f(x), f(x.reshape(2, 12)))


def test_bad_init_raises() -> None:
    with pytest.raises(ValueError, match="orthogonal") as info:
        LinearExtractor(4, init="orthogonal")
    assert "identity" in str(info.value) and "random" in str(info.value)
    with pytest.raises(ValueError, match="out_features"):
        LinearExtractor(4, 3, init="identity")


def test_bad_width_raises() -> None:
    f = LinearExtractor(8, 2, seed=0)
    with pytest.raises(ValueError, match=r"(?s)9.*8"):
        f(torch.randn(3, 9))


# ----------------------------------------------------------------------------- heads


def test_regression_head() -> None:
    head = linear_head(4)
    assert head.task == "regression" and head.metric_name == "mse"
    z = torch.randn(5, 4)
    out = head(z)
    assert out.shape == (5,)
    target = torch.randn(5)
    torch.testing.assert_close(head.loss(out, target), ((out - target) ** 2).mean())
    # (B, 1) targets are accepted
    torch.testing.assert_close(head.loss(out, target[:, None]), head.loss(out, target))
    assert head.metric(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0])).item() == 2.0
    with pytest.raises(ValueError):
        head.loss(out, target, label_smoothing=0.1)
    multi = linear_head(4, out=3)
    assert multi(z).shape == (5, 3)


def test_binary_head() -> None:
    head = bce_head(3)
    assert head.task == "binary" and head.metric_name == "accuracy"
    out = head(torch.randn(6, 3))
    assert out.shape == (6,)
    target = torch.tensor([0, 1, 0, 1, 1, 0])
    expected = nn.functional.binary_cross_entropy_with_logits(out, target.float())
    torch.testing.assert_close(head.loss(out, target), expected)
    assert head.loss(out, target, label_smoothing=0.2) != head.loss(out, target)
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    acc = head.metric(logits, torch.tensor([1, 0, 0, 1]))
    assert acc.dtype.is_floating_point and acc.item() == pytest.approx(0.5)


def test_multiclass_head() -> None:
    head = cross_entropy_head(4, 3)
    assert head.metric_name == "accuracy"
    out = head(torch.randn(8, 4))
    assert out.shape == (8, 3)
    target = torch.randint(0, 3, (8,))
    ce = head.loss(out, target)
    torch.testing.assert_close(ce, nn.functional.cross_entropy(out, target))
    smoothed = head.loss(out, target, label_smoothing=0.1)
    torch.testing.assert_close(
        smoothed, nn.functional.cross_entropy(out, target, label_smoothing=0.1)
    )
    assert not torch.isclose(ce, smoothed)
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [3.0, 0.0, 0.0]])
    assert head.metric(logits, torch.tensor([0, 1, 0, 2])).item() == pytest.approx(0.5)


def test_head_errors() -> None:
    with pytest.raises(ValueError, match="ordinal"):
        LinearHead(4, 2, "ordinal")
    with pytest.raises(ValueError, match="num_outputs"):
        LinearHead(4, 1, "multiclass")
    head = cross_entropy_head(4, 3)
    with pytest.raises(ValueError, match=r"(?s)5.*4"):
        head(torch.randn(2, 5))


# ----------------------------------------------------------------------------- timm


def test_resnet18_features_shape() -> None:
    bb = TimmBackbone("resnet18", in_chans=1)
    assert bb.num_features == 512
    out = bb(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 512)


def test_vit_features_shape() -> None:
    bb = TimmBackbone("vit_tiny_patch16_224", **VIT_KW)
    out = bb(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, bb.num_features) == (2, 192)


def test_resnet_last2_trainable() -> None:
    bb = TimmBackbone("resnet18", in_chans=1, trainable="last:2")
    names = bb.trainable_parameter_names()
    assert names
    assert all(n.startswith(("layer3.", "layer4.")) for n in names)
    all_l34 = [n for n, _ in bb.model.named_parameters() if n.startswith(("layer3.", "layer4."))]
    assert sorted(names) == sorted(all_l34)
    assert not any(n.startswith(("conv1", "bn1", "layer1", "layer2")) for n in names)


def test_frozen_batchnorm_stays_in_eval() -> None:
    bb = TimmBackbone("resnet18", in_chans=1, trainable=["layer3", "layer4"])
    bb.train()
    assert not bb.model.bn1.training and not bb.model.layer1.training
    assert bb.model.layer4.training and bb.training
    frozen_stats = bb.model.layer1[0].bn1.running_mean.clone()
    live_stats = bb.model.layer4[0].bn1.running_mean.clone()
    bb(torch.randn(4, 1, 28, 28))
    assert torch.equal(bb.model.layer1[0].bn1.running_mean, frozen_stats)
    assert not torch.equal(bb.model.layer4[0].bn1.running_mean, live_stats)
    bb.eval()
    assert not bb.model.layer4.training


def test_vit_last1_trainable() -> None:
    bb = TimmBackbone("vit_tiny_patch16_224", trainable="last:1", **VIT_KW)
    names = bb.trainable_parameter_names()
    assert any(n.startswith("blocks.2.") for n in names)
    assert any(n.startswith("norm.") for n in names)
    assert all(n.startswith(("blocks.2.", "norm.")) for n in names)
    frozen = bb.frozen_parameter_names()
    assert "cls_token" in frozen and "pos_embed" in frozen
    assert any(n.startswith("blocks.1.") for n in frozen)


def test_make_head_reproduces_logits(tmp_path) -> None:
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=10).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        expected = ref(x)
    path = tmp_path / "ref.pt"
    torch.save(ref.state_dict(), path)

    bb = TimmBackbone("resnet18", in_chans=1, num_classes=10, checkpoint_path=str(path)).eval()
    head = bb.make_head()
    assert isinstance(head, LinearHead) and head.task == "multiclass"
    with torch.no_grad():
        torch.testing.assert_close(head(bb(x)), expected)
    # make_head returns an independent copy
    assert head.linear.weight.data_ptr() != bb.make_head().linear.weight.data_ptr()


def test_vit_make_head_same_seed() -> None:
    torch.manual_seed(3)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_KW).eval()
    torch.manual_seed(3)
    bb = TimmBackbone("vit_tiny_patch16_224", **VIT_KW).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bb.make_head()(bb(x)), ref(x))


def test_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    bb = TimmBackbone("resnet18", in_chans=1, num_classes=4)
    with torch.no_grad():
        bb.model.layer4[0].conv1.weight.mul_(2.0)
    path = tmp_path / "bb.ckpt"
    # wrapped as {"state_dict": ...}, keys prefixed "model.", classifier already removed
    torch.save({"state_dict": bb.state_dict()}, path)
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="classifier"):
        other = TimmBackbone("resnet18", in_chans=1, num_classes=4, checkpoint_path=path)
    for (n1, p1), (n2, p2) in zip(bb.state_dict().items(), other.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1
    bb.eval()
    other.eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), other(x))


def test_missing_checkpoint_raises(tmp_path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        TimmBackbone("resnet18", checkpoint_path=str(missing))


def test_unknown_prefix_raises() -> None:
    with pytest.raises(ValueError, match="layer9") as info:
        TimmBackbone("resnet18", in_chans=1, trainable=["layer4", "layer9"])
    message = str(info.value)
    assert "layer9" in message and "layer1" in message and "conv1" in message
    assert "'layer4'" not in message.split("available")[0]  # only the bad prefix is reported
    with pytest.raises(ValueError, match="last:9"):
        TimmBackbone("resnet18", in_chans=1, trainable="last:9")


def test_make_head_without_classifier_raises() -> None:
    bb = TimmBackbone("resnet18", in_chans=1, num_classes=0)
    assert bb(torch.randn(2, 1, 28, 28)).shape == (2, 512)
    with pytest.raises(ValueError, match="classifier"):
        bb.make_head()
