"""DINO head: shapes for CLS and patch tokens, the normalised bottleneck, the weight-normed last layer."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.models.heads import DINOHead, WeightNormLinear


def test_cls_and_patch_token_shapes():
    head = DINOHead(in_dim=32, out_dim=50, hidden_dim=64, bottleneck_dim=16)
    assert head(torch.randn(4, 32)).shape == (4, 50)
    # iBOT: the same head on patch tokens.
    assert head(torch.randn(4, 9, 32)).shape == (4, 9, 50)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 64), (64, 64), (64, 16)]
    assert sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2


def test_defaults_follow_dino():
    head = DINOHead(in_dim=8, out_dim=10)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [2048, 2048, 256]
    assert isinstance(head.last_layer, WeightNormLinear) and not head.last_layer.weight_g.requires_grad


def test_bottleneck_is_unit_norm_and_patch_tokens_match_cls_path():
    head = DINOHead(in_dim=32, out_dim=0, hidden_dim=64, bottleneck_dim=16, use_bn=True).eval()
    tokens = 100 * torch.randn(3, 5, 32)
    out = head(tokens)  # no prototypes: the normalised bottleneck itself (coding-rate losses)
    assert out.shape == (3, 5, 16)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, 5))
    torch.testing.assert_close(head(tokens[:, 2]), out[:, 2])


def test_weight_norm_matches_torch_reference():
    layer = WeightNormLinear(16, 8, freeze_norm=False)
    with torch.no_grad():
        layer.weight_g.uniform_(0.5, 2.0)
    reference = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(16, 8, bias=False))
    with torch.no_grad():
        reference.parametrizations.weight.original0.copy_(layer.weight_g)
        reference.parametrizations.weight.original1.copy_(layer.weight_v)
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), reference(x))
    assert set(layer.state_dict()) == {"weight_g", "weight_v"}


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_last_layer_norm_frozen_or_learnt(norm_last_layer):
    torch.manual_seed(0)
    head = DINOHead(in_dim=16, out_dim=12, hidden_dim=32, bottleneck_dim=8, norm_last_layer=norm_last_layer)
    g_before = head.last_layer.weight_g.detach().clone()
    v_before = head.last_layer.weight_v.detach().clone()
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    x, target = torch.randn(6, 16), torch.randint(0, 12, (6,))
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(head(x) / 0.1, target).backward()
        optimizer.step()
    assert not torch.equal(head.last_layer.weight_v, v_before)
    row_norms = head.last_layer.weight.norm(dim=1).detach()
    if norm_last_layer:
        assert torch.equal(head.last_layer.weight_g, g_before)
        torch.testing.assert_close(row_norms, torch.ones(12))
    else:
        assert not torch.equal(head.last_layer.weight_g, g_before)
        assert not torch.allclose(row_norms, torch.ones(12))


def test_plain_last_layer_option():
    head = DINOHead(in_dim=16, out_dim=12, hidden_dim=32, bottleneck_dim=8, weight_norm_last_layer=False)
    assert isinstance(head.last_layer, torch.nn.Linear) and head.last_layer.bias is None


def test_gradients_reach_every_trainable_parameter():
    head = DINOHead(in_dim=16, out_dim=12, hidden_dim=32, bottleneck_dim=8, nlayers=3, use_bn=True)
    x = torch.randn(4, 7, 16, requires_grad=True)
    F.log_softmax(head(x), dim=-1)[..., 0].sum().backward()
    for name, param in head.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    assert x.grad.abs().sum() > 0


def test_single_layer_head_and_bad_depth():
    head = DINOHead(in_dim=16, out_dim=4, bottleneck_dim=8, nlayers=1)
    assert [type(m) for m in head.mlp] == [torch.nn.Linear]
    assert head(torch.randn(2, 16)).shape == (2, 4)
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(in_dim=16, nlayers=0)
