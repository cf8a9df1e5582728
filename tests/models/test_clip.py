"""KoPE CLIP: open_clip configs with a KoPE ViT vision tower, open_clip's text tower and tokenizer."""

import subprocess
import sys

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from pipeline.models.clip import create_kope_clip, kope_clip_config_names, register_open_clip_configs

TINY = "ViT-KoPE-Ti-16-64"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_kope_clip(TINY)


def test_configs_are_registered_with_open_clip():
    names = register_open_clip_configs()
    assert names == kope_clip_config_names() == ["ViT-KoPE-B-16", "ViT-KoPE-Demo-8-64", "ViT-KoPE-S-16",
                                                 "ViT-KoPE-Ti-16-64"]
    assert register_open_clip_configs() == names  # idempotent
    assert set(names) <= set(open_clip.list_models())
    cfg = open_clip.get_model_config("ViT-KoPE-B-16")
    assert cfg["vision_cfg"]["timm_model_name"] == "vit_kope_base_patch16_clip_224"


@pytest.mark.parametrize(
    "name, embed_dim, width, image_size, text",
    [
        ("ViT-KoPE-B-16", 512, 768, 224, dict(width=512, layers=12, heads=8, context_length=77)),
        ("ViT-KoPE-S-16", 384, 384, 224, dict(width=384, layers=12, heads=6, context_length=77)),
        (TINY, 128, 192, 64, dict(width=128, layers=2, heads=2, context_length=32)),
        ("ViT-KoPE-Demo-8-64", 64, 64, 64, dict(width=64, layers=2, heads=2, context_length=16)),
    ],
)
def test_each_config_builds_offline_and_encodes(name, embed_dim, width, image_size, text):
    model, _, preprocess_val, tokenizer = create_kope_clip(name)
    model.eval()
    trunk = model.visual.trunk
    assert type(trunk).__name__ == "KopeVisionTransformer" and trunk.kope and trunk.coupling is not None
    assert trunk.embed_dim == width and trunk.num_classes == 0 and trunk.global_pool == "token"
    assert not trunk.coupling.gamma_raw.requires_grad  # γ is a fixed buffer for CLIP
    assert "coupling.gamma_raw" not in dict(trunk.named_parameters())
    assert model.transformer.width == text["width"] and len(model.transformer.resblocks) == text["layers"]
    assert model.transformer.resblocks[0].attn.num_heads == text["heads"]
    assert model.context_length == text["context_length"]

    image = preprocess_val(_pil_image(size=image_size + 37))[None]
    assert image.shape == (1, 3, image_size, image_size)
    tokens = tokenizer(["a photo of a cat", "two handwritten digits"])
    assert tokens.shape == (2, text["context_length"])
    with torch.no_grad():
        image_features = model.encode_image(image, normalize=True)
        text_features = model.encode_text(tokens, normalize=True)
    assert image_features.shape == (1, embed_dim) and text_features.shape == (2, embed_dim)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(1))
    assert torch.isfinite(text_features).all()


def test_vision_tower_sizes_match_the_paper():
    register_open_clip_configs()
    for name, millions in (("vit_kope_base_patch16_clip_224", 87.1), ("vit_kope_small_patch16_clip_224", 22.0),
                           ("vit_kope_base_patch16_timm_clip_224", 87.1)):
        with torch.device("meta"):
            trunk = timm.create_model(name)
        assert round(sum(p.numel() for p in trunk.parameters()) / 1e6, 1) == millions, name


def layer_norm_eps(model: torch.nn.Module) -> set[float]:
    return {module.eps for module in model.modules() if isinstance(module, torch.nn.LayerNorm)}


@pytest.mark.parametrize("config", ["ViT-KoPE-B-16", "ViT-KoPE-S-16", TINY, "ViT-KoPE-Demo-8-64"])
def test_every_config_uses_the_authors_tower_scaffold(config):
    """open_clip's ViT around the KoPE blocks: ln_pre after the embeddings, eps 1e-5, no patch bias."""
    register_open_clip_configs()
    with torch.device("meta"):
        trunk = timm.create_model(open_clip.get_model_config(config)["vision_cfg"]["timm_model_name"])
    names = dict(trunk.named_parameters())
    assert {"norm_pre.weight", "norm_pre.bias"} <= names.keys() and "patch_embed.proj.bias" not in names
    assert layer_norm_eps(trunk) == {1e-5}


def test_timm_style_towers_keep_the_timm_scaffold_under_their_own_names():
    for stem in ("vit_kope_tiny_patch16_{}_64", "vit_kope_demo_patch8_{}_64", "vit_kope_small_patch16_{}_224",
                 "vit_kope_base_patch16_{}_224"):
        with torch.device("meta"):
            authors, ours = timm.create_model(stem.format("clip")), timm.create_model(stem.format("timm_clip"))
        names = dict(ours.named_parameters())
        assert "norm_pre.weight" not in names and "patch_embed.proj.bias" in names
        assert layer_norm_eps(ours) == {1e-6} and layer_norm_eps(authors) == {1e-5}
        assert (authors.embed_dim, len(authors.blocks)) == (ours.embed_dim, len(ours.blocks))
        assert ours.pretrained_cfg["input_size"] == authors.pretrained_cfg["input_size"]


def test_norm_eps_is_a_constructor_option_and_refuses_a_second_norm():
    with torch.device("meta"):
        model = timm.create_model("vit_kope_tiny_patch16_224", norm_eps=1e-4, coupling="vo_proj")
    assert layer_norm_eps(model) == {1e-4}  # the per-block coupling norms too
    with pytest.raises(ValueError, match="norm_eps or norm_layer"):
        timm.create_model("vit_kope_tiny_patch16_224", norm_eps=1e-4, norm_layer="layernorm")


def test_tower_names_build_in_timm():
    trunk = timm.create_model("vit_kope_tiny_patch16_clip_64").eval()
    assert trunk.pretrained_cfg["input_size"] == (3, 64, 64)
    assert trunk.pretrained_cfg["architecture"] == "vit_kope_tiny_patch16_clip_64"
    with torch.no_grad():
        assert trunk(torch.randn(2, 3, 64, 64)).shape == (2, 192)
    torch.testing.assert_close(trunk.coupling.gamma, torch.tensor(0.05))


def test_tokenizer_round_trip(tiny):
    tokenizer = tiny[3]
    tokens = tokenizer(["a photo of the digit seven"])[0]
    sot, eot = tokenizer.encoder["<start_of_text>"], tokenizer.encoder["<end_of_text>"]
    assert tokens[0] == sot and eot in tokens.tolist()
    body = tokens[1 : tokens.tolist().index(eot)].tolist()
    assert tokenizer.decode(body).strip() == "a photo of the digit seven"


def test_state_dict_reloads_exactly(tiny, tmp_path):
    model = tiny[0].eval()
    path = tmp_path / "kope_clip.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    fresh = open_clip.create_model(TINY, pretrained=str(path)).eval()
    reference = model.state_dict()
    loaded = fresh.state_dict()
    assert loaded.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(loaded[key], value), key
    image, tokens = torch.randn(2, 3, 64, 64), tiny[3](["one", "two"])
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode_image(image), model.encode_image(image), atol=0, rtol=0)
        torch.testing.assert_close(fresh.encode_text(tokens), model.encode_text(tokens), atol=0, rtol=0)
    # A freshly initialised model differs, so the equality above is the checkpoint's doing.
    other = open_clip.create_model(TINY).eval()
    with torch.no_grad():
        assert not torch.allclose(other.encode_image(image), model.encode_image(image))


def _pil_image(size: int):
    from PIL import Image

    return Image.fromarray(torch.randint(0, 256, (size, size + 5, 3), dtype=torch.uint8).numpy())


def _digit_pairs(n: int = 8):
    """Real 8×8 handwritten digits as 64×64 RGB images with captions naming them."""
    words = "zero one two three four five six seven eight nine".split()
    digits = load_digits()
    images = torch.tensor(digits.images[:n], dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=64, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    return (images - 0.5) / 0.5, [f"a handwritten {words[t]}" for t in digits.target[:n]]


@pytest.mark.slow
def test_contrastive_training_reaches_the_kope_coupling():
    torch.manual_seed(0)
    model, _, _, tokenizer = create_kope_clip(TINY)
    images, captions = _digit_pairs()
    tokens = tokenizer(captions)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, betas=(0.9, 0.98))
    losses = []
    for step in range(25):  # the pre-norm tower needs about 20 steps to pass 0.25x on these 8 pairs
        image_features, text_features, logit_scale = model(images, tokens)
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            trunk = model.visual.trunk
            for param in (trunk.coupling.qk.weight, trunk.coupling.q_scale, trunk.blocks[0].attn.phase_mix):
                assert param.grad is not None and param.grad.abs().sum() > 0
            assert model.transformer.resblocks[0].attn.in_proj_weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses


def test_unknown_config_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown open_clip model config 'ViT-KoPE-X-99'.*ViT-KoPE-B-16"):
        create_kope_clip("ViT-KoPE-X-99")


def test_importing_the_tower_module_does_not_import_open_clip():
    code = "import sys, pipeline.models.clip; print('open_clip' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
