"""The every-layer objectives (``ours_kfac``, ``erasure``) and the taps they look through.

- taps: a layer's input or output is recorded during the module's own forward, the hooks go
  away (also after an error), names resolve as ``TimmBackbone(trainable=...)``'s do and a
  wrong one is refused with the children one may use;
- ``ours_kfac``: its matrix is the correlation of the layer's input (so rescaling a channel
  changes nothing), its loss and gradient are those of a direct formula (autograd), λ = 0 is
  the task loss exactly, the gradient reaches the trainable layers below a tapped one only;
- ``erasure``: the held-out R² of a ridge probe against a direct (primal) formula, 1 for a
  linear read-out and about 0 for labels independent of the features, λ = 0 is the task
  loss exactly, its gradient is autograd's of the direct formula;
- bad arguments named (a few Trainer steps of each: ``test_objectives_attacker_aware.py``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from support.helpers import image_batch, tiny_timm_module
from torch import nn

from lightning_immunize.conditioning import feature_r_max, feature_r_min
from lightning_immunize.models import TimmBackbone
from lightning_immunize.objectives import (
    BlockErasureObjective,
    LayerwiseConditionNumberObjective,
)
from lightning_immunize.objectives.erasure import held_out_r2, label_matrix, pooled
from lightning_immunize.objectives.layerwise import (
    activation_rows,
    correlation_rows,
    input_width,
)
from lightning_immunize.objectives.taps import (
    layer_root,
    recording,
    resolve_layers,
    tapped_layers,
    trainable_layers,
)

F64 = torch.float64


def grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


# -- taps ---------------------------------------------------------------------------------------


def test_recording_sees_inputs_and_outputs_and_removes_its_hooks():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with recording(resolve_layers(net, ["2"]), "input") as seen:
        out = net(x)
    assert torch.equal(seen["2"], torch.relu(net[0](x)))
    with recording(resolve_layers(net, ["2"]), "output") as seen:
        net(x)
    assert torch.equal(seen["2"], out)
    assert not net[2]._forward_hooks
    with pytest.raises(RuntimeError, match="boom"):
        with recording(resolve_layers(net, ["0", "2"])):
            raise RuntimeError("boom")
    assert not net[0]._forward_hooks and not net[2]._forward_hooks


def test_layer_names_are_those_of_trainable_and_a_wrong_one_is_named():
    backbone = TimmBackbone("test_resnet", in_chans=1, num_classes=5, seed=0, trainable=["layer4"])
    assert list(resolve_layers(backbone, ["layer4.0.conv1"])) == ["layer4.0.conv1"]
    names = trainable_layers(backbone)
    assert names and all(n.startswith("layer4") for n in names)
    assert tapped_layers(backbone, ["head"]) == {}
    with pytest.raises(ValueError, match=r"layer 'layer9' is not a sub-module.*'layer4'"):
        resolve_layers(backbone, ["layer9"])
    with pytest.raises(ValueError, match="named twice"):
        resolve_layers(backbone, ["layer4", "layer4"])
    with pytest.raises(ValueError, match="unknown tap point 'middle'"):
        with recording({}, "middle"):
            pass


# -- ours_kfac ----------------------------------------------------------------------------------


def test_correlation_rows_give_the_correlation_matrix_whatever_each_channel_scale():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=gen) @ torch.randn(4, 4, generator=gen)
    A = x.double().T @ x.double() / 50
    d = torch.diag(A).rsqrt()
    expected = d[:, None] * A * d[None, :]
    r = correlation_rows(x, eps=0.0)
    torch.testing.assert_close(r.T @ r, expected)
    scaled = correlation_rows(x * torch.tensor([1e-3, 1.0, 10.0, 1e3]), eps=0.0)
    torch.testing.assert_close(scaled.T @ scaled, expected)
    assert r.dtype == F64


def test_conv_inputs_give_one_row_per_position():
    a = torch.arange(2 * 3 * 2 * 2.0).reshape(2, 3, 2, 2)
    rows = activation_rows(a, channels_first=True)
    assert rows.shape == (8, 3)
    assert torch.equal(rows[1], a[0, :, 0, 1])
    assert activation_rows(torch.zeros(2, 5, 3), channels_first=False).shape == (10, 3)


def direct_kfac_loss(module, batch, layers, lam_p, lam_h, weights=None):
    """The loss written out: task loss + Σ_l w_l (λ_P R_min + λ_H R_max) / Σ w_l, the rows of
    each layer's input taken with plain hooks."""
    weights = weights or {}
    total = sum(weights.get(n, 1.0) for n in layers)
    root = module.extractor.model
    loss, reg = None, 0.0
    for side, kind, lam in (("pretrain", feature_r_min, lam_p), ("harmful", feature_r_max, lam_h)):
        seen = {}
        hooks = [
            root.get_submodule(n).register_forward_hook(
                lambda m, a, o, n=n, seen=seen: seen.__setitem__(n, a[0])
            )
            for n in layers
            if n != "head"
        ]
        z = module.features(batch[side][0], side=side)
        for h in hooks:
            h.remove()
        seen["head"] = z
        if side == "pretrain":
            loss = module.task_loss(z, batch["pretrain"][1])
        for n in layers:
            a = seen[n]
            rows = a.movedim(1, -1).reshape(-1, a.shape[1]) if a.ndim == 4 else a
            x = rows.double()
            second = (x * x).mean(0)
            corr_rows = x / torch.sqrt((second + 1e-6 * second.mean()) * x.shape[0])
            reg = reg + lam * weights.get(n, 1.0) / total * kind(corr_rows)
    return loss + reg


@pytest.mark.parametrize("weights", [None, {"layer4.0.conv1": 3.0, "head": 0.0}])
def test_ours_kfac_gradient_is_that_of_the_direct_formula(weights):
    layers = ["layer4.0.conv1", "layer4.0.conv2", "head"]
    objective = LayerwiseConditionNumberObjective(
        lambda_pretrain=0.5,
        lambda_harmful=2.0,
        layers=layers,
        layer_weights=weights,
        batchnorm="batch",
    )
    module = tiny_timm_module(objective, trainable=["layer3", "layer4"])
    reference = copy.deepcopy(module)
    batch = image_batch(b=12)
    out = objective.backward(module, batch)
    direct = direct_kfac_loss(reference, batch, layers, 0.5, 2.0, weights)
    direct.backward()
    got, want = grads(module), grads(reference)
    assert got.keys() == want.keys() and any(k.startswith("extractor.model.layer3") for k in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)
    sides = (("r_min", "pretrain"), ("r_max", "harmful"))
    assert set(out.terms) == {f"{k} of layer {n} on {s}" for n in layers for k, s in sides}
    assert all(torch.isfinite(torch.as_tensor(v)) for v in out.logs.values())


def test_ours_kfac_running_batchnorm_uses_the_running_statistics_for_d_h():
    objective = LayerwiseConditionNumberObjective(layers=["head"], batchnorm="running")
    module = tiny_timm_module(objective, trainable=None)
    batch = image_batch(b=12)
    out = objective.backward(module, batch)
    with torch.no_grad():
        module.extractor.eval()
        z = module.features(batch["harmful"][0], side="harmful")
        module.extractor.train()
    expected = feature_r_max(correlation_rows(z))
    assert float(out.terms["r_max of layer head on harmful"]) == pytest.approx(float(expected))


def test_ours_kfac_with_lambda_zero_is_the_task_loss_exactly():
    objective = LayerwiseConditionNumberObjective(lambda_pretrain=0.0, lambda_harmful=0.0)
    module = tiny_timm_module(objective, trainable=["layer4"])
    reference = copy.deepcopy(module)
    batch = image_batch(b=12)
    objective.backward(module, batch)
    z = reference.features(batch["pretrain"][0])
    reference.task_loss(z, batch["pretrain"][1]).backward()
    got, want = grads(module), grads(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_ours_kfac_default_layers_are_the_trainable_ones_and_the_head():
    objective = LayerwiseConditionNumberObjective(lambda_harmful=1.0)
    module = tiny_timm_module(objective, trainable=["layer4"])
    names = objective.resolved_layers(module)
    assert names[-1] == "head" and names[:-1] == trainable_layers(module.extractor)
    objective.backward(module, image_batch(b=12))
    frozen = [n for n, p in module.extractor.named_parameters() if not p.requires_grad]
    assert frozen and all(dict(module.extractor.named_parameters())[n].grad is None for n in frozen)


def test_ours_kfac_leaves_out_a_one_channel_stem_and_refuses_it_by_name():
    # a grayscale stem's input correlation is 1×1: κ = 1 whatever the weights, and R_max of
    # it sat at 1/floor (1e12), drowning the logged r_max of every other layer
    objective = LayerwiseConditionNumberObjective(lambda_harmful=1.0)
    module = tiny_timm_module(objective, trainable=None)
    layers = dict(layer_root(module.extractor).named_modules())
    stem = [n for n in trainable_layers(module.extractor) if input_width(layers[n]) == 1]
    assert stem == ["conv1.0"]
    names = objective.resolved_layers(module)
    assert "conv1.0" not in names and len(names) == len(trainable_layers(module.extractor))
    out = objective.backward(module, image_batch(b=12))
    assert 0 < float(out.logs["r_max"]) < 1e6
    with pytest.raises(ValueError, match="layer 'conv1.0' has one input channel"):
        LayerwiseConditionNumberObjective(layers=["conv1.0", "head"]).resolved_layers(module)


def test_ours_kfac_refuses_bad_arguments_by_name():
    with pytest.raises(ValueError, match="lambda_harmful must be a finite number ≥ 0, got -1"):
        LayerwiseConditionNumberObjective(lambda_harmful=-1)
    with pytest.raises(TypeError, match="layer_weights must be a mapping"):
        LayerwiseConditionNumberObjective(layer_weights=[1.0])
    with pytest.raises(ValueError, match=r"layer_weights\['head'\] must be a finite number"):
        LayerwiseConditionNumberObjective(layer_weights={"head": float("nan")})
    with pytest.raises(ValueError, match=r"layers is empty .* expected layers=\[...\]"):
        tiny_timm_module(LayerwiseConditionNumberObjective(layers=[]))
    with pytest.raises(ValueError, match="eps must be"):
        LayerwiseConditionNumberObjective(eps=-1.0)
    with pytest.raises(ValueError, match="layer 'layer9' is not a sub-module"):
        tiny_timm_module(LayerwiseConditionNumberObjective(layers=["layer9"]), trainable=None)
    with pytest.raises(ValueError, match="layer_weights names 'layer1', which are not"):
        tiny_timm_module(
            LayerwiseConditionNumberObjective(layers=["head"], layer_weights={"layer1": 1})
        )


# -- erasure ------------------------------------------------------------------------------------


def direct_r2(h, y, ridge):
    """Held-out R² in the primal form, both directions, written out."""
    h, y = h.double(), y.double()
    half = h.shape[0] // 2
    scores = []
    for fit, new in ((slice(0, half), slice(half, None)), (slice(half, None), slice(0, half))):
        H, Y = h[fit] - h[fit].mean(0), y[fit] - y[fit].mean(0)
        lam = ridge * (H * H).sum() / H.shape[1]
        W = torch.linalg.solve(H.T @ H + lam * torch.eye(H.shape[1], dtype=F64), H.T @ Y)
        pred = (h[new] - h[fit].mean(0)) @ W + y[fit].mean(0)
        spread = ((y[new] - y[new].mean(0)) ** 2).sum()
        scores.append(1 - ((y[new] - pred) ** 2).sum() / spread)
    return torch.stack(scores).mean()


@pytest.mark.parametrize("channels", [3, 40])  # primal (rows ≥ channels) and dual route
def test_held_out_r2_matches_the_primal_formula(channels):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(20, channels, generator=gen)
    y = label_matrix(torch.randint(0, 3, (20,), generator=gen))
    torch.testing.assert_close(held_out_r2(h, y, 0.3), direct_r2(h, y, 0.3))


def test_held_out_r2_is_one_for_a_linear_read_out_and_about_zero_for_noise():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (200,), generator=gen)
    y = label_matrix(labels)
    h = torch.cat([y * 5.0, torch.randn(200, 6, generator=gen) * 0.01], dim=1)
    assert float(held_out_r2(h, y, ridge=1e-6)) > 0.99
    noise = torch.randn(200, 6, generator=gen)
    assert abs(float(held_out_r2(noise, y, ridge=0.1))) < 0.1
    assert float(held_out_r2(h * 1e4, y, 1e-6)) == pytest.approx(float(held_out_r2(h, y, 1e-6)))


def test_label_matrix_and_pooling():
    assert label_matrix(torch.tensor([2.0, 3.0])).shape == (2, 1)
    assert pooled(torch.ones(2, 3, 4, 4)).shape == (2, 3)
    assert pooled(torch.ones(2, 5, 3)).shape == (2, 3)


def test_erasure_gradient_is_that_of_the_direct_formula():
    blocks = ["layer3", "layer4", "head"]
    objective = BlockErasureObjective(
        lambda_harmful=3.0, blocks=blocks, ridge=0.2, batchnorm="batch"
    )
    module = tiny_timm_module(objective, trainable=None)
    reference = copy.deepcopy(module)
    batch = image_batch(b=16)
    out = objective.backward(module, batch)
    root = reference.extractor.model
    z_p = reference.features(batch["pretrain"][0])
    loss = reference.task_loss(z_p, batch["pretrain"][1])
    seen = {}
    hooks = [
        root.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o))
        for n in blocks[:2]
    ]
    seen["head"] = reference.features(batch["harmful"][0], side="harmful")
    for h in hooks:
        h.remove()
    y = label_matrix(batch["harmful"][1])
    r2 = [direct_r2(seen[n].mean(dim=(2, 3)) if seen[n].ndim == 4 else seen[n], y, 0.2)
          for n in blocks]  # fmt: skip
    (loss + 3.0 * sum(r.clamp(min=0) for r in r2) / 3).backward()
    got, want = grads(module), grads(reference)
    assert got.keys() == want.keys()
    assert any(k.startswith("extractor.model.conv1") for k in got)  # every block reached
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)
    for n, r in zip(blocks, r2, strict=True):
        term = out.terms[f"held-out R² of block {n} on harmful"]
        assert float(term) == pytest.approx(float(r.detach()))


def test_erasure_sees_d_h_with_its_own_and_with_the_running_batchnorm_statistics():
    objective = BlockErasureObjective(lambda_harmful=1.0, blocks=["head"])
    module = tiny_timm_module(objective, trainable=None)
    batch = image_batch(b=16)
    reference = copy.deepcopy(module)
    with torch.no_grad():
        reference.features(batch["pretrain"][0])  # the D_P forward moves BatchNorm's statistics
    out = objective.backward(module, batch)
    bn = module.extractor.model.bn1
    assert torch.equal(bn.running_mean, reference.extractor.model.bn1.running_mean)  # D_H: not
    assert module.training and bn.training  # modes restored
    y = label_matrix(batch["harmful"][1])
    with torch.no_grad():
        batch_z = module.features(batch["harmful"][0], side="harmful")
        module.extractor.eval()
        running_z = module.features(batch["harmful"][0], side="harmful")
        module.extractor.train()
    for mode, z in (("batch", batch_z), ("running", running_z)):
        got = out.terms[f"held-out R² of block head on harmful ({mode} BatchNorm)"]
        assert float(got) == pytest.approx(float(held_out_r2(z, y, 0.1)), rel=1e-5)
    assert set(out.logs) >= {"r2_head_batch", "r2_head_running", "erasure"}
    with pytest.raises(ValueError, match="unknown batchnorm mode 'train'"):
        BlockErasureObjective(batchnorm=["train"])
    with pytest.raises(ValueError, match="names a mode twice"):
        BlockErasureObjective(batchnorm=["batch", "batch"])


def test_erasure_with_lambda_zero_is_the_task_loss_exactly_and_default_blocks():
    objective = BlockErasureObjective(lambda_harmful=0.0)
    module = tiny_timm_module(objective, trainable=["layer3", "layer4"])
    assert objective.resolved_layers(module) == ["layer3", "layer4", "head"]
    reference = copy.deepcopy(module)
    batch = image_batch(b=12)
    objective.backward(module, batch)
    reference.task_loss(reference.features(batch["pretrain"][0]), batch["pretrain"][1]).backward()
    got, want = grads(module), grads(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_erasure_refuses_bad_arguments_by_name():
    with pytest.raises(ValueError, match="ridge must be a number > 0, got 0"):
        BlockErasureObjective(ridge=0)
    with pytest.raises(ValueError, match="lambda_harmful must be a finite number ≥ 0"):
        BlockErasureObjective(lambda_harmful=float("inf"))
    with pytest.raises(ValueError, match="layer 'stage2' is not a sub-module"):
        tiny_timm_module(BlockErasureObjective(blocks=["stage2"]), trainable=None)
    with pytest.raises(ValueError, match="block_weights names 'layer1', which are not"):
        tiny_timm_module(BlockErasureObjective(blocks=["layer4"], block_weights={"layer1": 2.0}))
