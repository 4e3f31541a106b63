"""The ViT model: variants, shapes and gradients, config errors, position-embedding
resampling, checkpoint loading, FLOPs, determinism, torch.compile and bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitray.config import ConfigError, from_dict, to_dict
from vitray.training.posembed import resample_pos_embed
from vitray.training.vit import (PATCH_SIZES, VARIANTS, ViTConfig, VisionTransformer, create_model,
                                 load_pretrained, model_flops_per_image)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared, oversubscribed
    # machine OpenMP barriers make them up to ~100x slower; restore for other modules.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(variant: str, **kw) -> ViTConfig:
    """The variant with its own head count and patch size, but one narrow block and a 2x2 grid."""
    probe = ViTConfig(variant=variant)
    kw.setdefault("embed_dim", 8 * probe.num_heads)
    kw.setdefault("img_size", 2 * probe.patch_size)
    if probe.hybrid is not None:
        kw.setdefault("hybrid_layers", (1,) * len(probe.hybrid_layers))
        kw.setdefault("hybrid_width", 8)
    kw.setdefault("depth", 1)
    kw.setdefault("num_classes", 7)
    return ViTConfig(variant=variant, **kw)


def loss_touching_everything(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the logits plus a term on the pre-logits: the zero-initialised
    classifier passes no gradient back at step 0, the second term reaches the backbone."""
    tokens = model.forward_features(x)
    logits = model.forward_head(tokens)
    rep = model.forward_head(tokens, pre_logits=True)
    return F.cross_entropy(logits, torch.arange(x.shape[0]) % 7) + rep.square().mean()


def assert_all_grads_after_a_step(model: VisionTransformer, x: torch.Tensor) -> None:
    """Every parameter gets a finite, nonzero gradient. Zero-initialised weights (the
    classifier, the last GroupNorm of each hybrid bottleneck) block gradients by design
    at step 0, so the check runs on the second backward, after one SGD step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_touching_everything(model, x).backward()
    opt.step()
    opt.zero_grad()
    loss_touching_everything(model, x).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"


@pytest.mark.parametrize("size", list(VARIANTS))
def test_variant_table_resolves_sizes(size):
    for patch in PATCH_SIZES:
        cfg = ViTConfig(variant=f"{size}/{patch}")
        assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == VARIANTS[size]
        assert cfg.patch_size == patch and cfg.mlp_dim == 4 * cfg.embed_dim
    # explicit fields override the table (the tiny-config idiom used everywhere in tests)
    cfg = ViTConfig(variant=f"{size}/16", depth=2, img_size=32)
    assert cfg.depth == 2 and cfg.embed_dim == VARIANTS[size][0] and cfg.num_patches == 4


@pytest.mark.parametrize("variant,params", [
    # timm's counts for vit_{tiny,small,base,large}_patch16_224 / vit_huge_patch14_224
    ("Ti/16", 5_717_416), ("S/16", 22_050_664), ("B/16", 86_567_656),
    ("L/16", 304_326_632), ("H/14", 632_045_800),
])
def test_full_size_parameter_counts(variant, params):
    with torch.device("meta"):
        model = create_model(ViTConfig(variant=variant, head="finetune", num_classes=1000))
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("variant", [f"{s}/{p}" for s in VARIANTS for p in PATCH_SIZES])
def test_every_variant_shapes_and_gradients(variant):
    torch.manual_seed(0)
    cfg = tiny(variant)
    model = create_model(cfg)
    x = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 1 + 4, cfg.embed_dim)
    assert model.forward_head(tokens, pre_logits=True).shape == (2, cfg.embed_dim)
    assert model(x).shape == (2, 7)
    assert_all_grads_after_a_step(model, x)


@pytest.mark.parametrize("variant,kw,tokens", [
    # avg pooling with a class token: not pooled, but it still attends, so it still learns
    ("S/16", dict(global_pool="avg"), 5),
    ("S/16", dict(class_token=False, global_pool="avg"), 4),
    ("S/16", dict(head="finetune"), 5),
    ("S/16", dict(representation_size=24), 5),
    ("S/16", dict(dropout=0.1, attn_dropout=0.1, drop_path_rate=0.1), 5),
    ("R26+S/16", dict(), 5),
    ("R50+B/32", dict(head="finetune", class_token=False, global_pool="avg"), 4),
])
def test_pooling_heads_and_hybrid(variant, kw, tokens):
    torch.manual_seed(0)
    cfg = tiny(variant, **kw)
    model = create_model(cfg)
    x = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    assert model.forward_features(x).shape == (2, tokens, cfg.embed_dim)
    rep = model.forward_head(model.forward_features(x), pre_logits=True)
    assert rep.shape == (2, cfg.pre_logits_dim)
    if cfg.head == "pretrain":
        assert rep.abs().max() <= 1.0  # tanh hidden layer of the paper's MLP head
    assert model(x).shape == (2, 7)
    assert_all_grads_after_a_step(model, x)


def test_hybrid_feeds_resnet_feature_map_with_patch_size_1():
    cfg = ViTConfig(variant="R50+B/16")
    assert cfg.hybrid == "R50" and cfg.hybrid_layers == (3, 4, 9)  # stage 4 folded into 3
    assert ViTConfig(variant="R50+B/32").hybrid_layers == (3, 4, 6, 3)
    model = create_model(tiny("R50+B/16"))
    assert model.patch_embed.proj.kernel_size == (1, 1)
    assert model.patch_embed.backbone.reduction == 16
    assert model.patch_embed.backbone(torch.randn(1, 3, 32, 32)).shape[-2:] == (2, 2)


def test_heads_initialise_like_the_paper():
    model = create_model(tiny("B/16", head="finetune"))
    assert not model.head.weight.any() and not model.head.bias.any()
    model = create_model(tiny("B/16"))
    assert isinstance(model.pre_logits.act, torch.nn.Tanh) and model.pre_logits.fc.weight.std() > 0
    logits = model(torch.randn(3, 3, 32, 32))
    assert torch.equal(logits, torch.zeros_like(logits))  # zero classifier: loss starts at log(C)


@pytest.mark.parametrize("kw,field", [
    (dict(variant="B/16", img_size=100), "patch_size"),
    (dict(variant="B/16", num_heads=5), "num_heads"),
    (dict(variant="B/16", embed_dim=100), "num_heads"),
    (dict(variant="X/16"), "variant"),
    (dict(variant="B/15"), "variant"),
    (dict(variant="B16"), "variant"),
    (dict(variant="R99+B/16"), "variant"),
    (dict(variant="R50+B/14"), "variant"),
    (dict(variant="R50+B/16", hybrid="R26"), "hybrid"),
    (dict(variant="R50+B/16", patch_size=8, img_size=32), "patch_size"),
    (dict(variant="R50+B/16", hybrid_layers=(1, 1)), "hybrid_layers"),
    (dict(variant="B/16", hybrid_layers=(1, 1, 1)), "hybrid_layers"),
    (dict(global_pool="max"), "global_pool"),
    (dict(class_token=False), "global_pool"),
    (dict(head="linear"), "head"),
    (dict(depth=0), "depth"),
    (dict(num_classes=-1), "num_classes"),
    (dict(dropout=1.0), "dropout"),
    (dict(representation_size=0), "representation_size"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ConfigError) as exc:
        ViTConfig(**kw)
    assert exc.value.field == field
    assert str(exc.value).startswith(field + ":")


def test_config_round_trips_through_dict():
    cfg = ViTConfig(variant="R26+S/32", img_size=64, head="finetune", num_classes=10)
    again = from_dict(ViTConfig, to_dict(cfg))
    assert again == cfg
    with pytest.raises(ConfigError) as exc:
        from_dict(ViTConfig, {"variant": "B/16", "widht": 3})
    assert exc.value.field == "widht"


def test_resample_pos_embed_keeps_class_token_and_constants():
    D = 6
    cls = torch.randn(1, 1, D)
    const = torch.full((1, 4 * 4, D), 0.25)
    out = resample_pos_embed(torch.cat([cls, const], 1), (6, 6), num_prefix_tokens=1)
    assert out.shape == (1, 1 + 36, D)
    assert torch.equal(out[:, :1], cls)
    torch.testing.assert_close(out[:, 1:], torch.full((1, 36, D), 0.25))  # bicubic keeps constants
    # a smooth ramp stays monotonic along its axis after upsampling
    ramp = torch.linspace(-1, 1, 4).view(1, 4, 1, 1).expand(1, 4, 4, D).reshape(1, 16, D)
    up = resample_pos_embed(ramp, (8, 8), num_prefix_tokens=0).reshape(8, 8, D)[:, 3, 0]
    assert (up[1:] > up[:-1]).all()
    same = torch.cat([cls, const], 1)
    assert resample_pos_embed(same, (4, 4)) is same


def test_load_pretrained_resamples_for_higher_resolution():
    torch.manual_seed(0)
    low = create_model(tiny("S/16", img_size=32))
    high = create_model(tiny("S/16", img_size=64))
    report = load_pretrained(high, low.state_dict())
    assert report.resampled == ["pos_embed"] and not report.skipped and not report.missing
    assert high.pos_embed.shape == (1, 1 + 16, high.cfg.embed_dim)
    assert torch.equal(high.pos_embed[:, 0], low.pos_embed[:, 0])  # class token kept
    expected = resample_pos_embed(low.pos_embed.detach(), (4, 4))
    assert torch.equal(high.pos_embed.detach(), expected)
    assert torch.equal(high.blocks[0].mlp.fc1.weight, low.blocks[0].mlp.fc1.weight)
    assert high(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(ValueError, match="expected 64x64"):
        high(torch.randn(1, 3, 32, 32))


def test_load_pretrained_pretrain_to_finetune_reports_head():
    torch.manual_seed(0)
    pre = create_model(tiny("S/16"))
    ft = create_model(tiny("S/16", head="finetune", num_classes=3, class_token=False, global_pool="avg"))
    report = load_pretrained(ft, pre.state_dict())
    assert sorted(report.skipped) == ["cls_token", "head.bias", "head.weight",
                                      "pre_logits.fc.bias", "pre_logits.fc.weight"]
    assert sorted(report.missing) == ["head.bias", "head.weight"]
    assert torch.equal(ft.pos_embed, pre.pos_embed[:, 1:])  # class token's position dropped
    assert not ft.head.weight.any()  # new classifier stays zero-initialised
    with pytest.raises(ValueError, match="missing"):
        load_pretrained(create_model(tiny("S/16", depth=2)), pre.state_dict())


@pytest.mark.parametrize("variant", ["S/16", "R26+S/16"])
def test_model_flops_match_flop_counter(variant):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = tiny(variant, depth=2)
    model = create_model(cfg)
    # The math SDPA backend runs attention as counted matmuls (the CPU flash op is not counted).
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(torch.randn(1, 3, cfg.img_size, cfg.img_size))
    assert model_flops_per_image(cfg, training=False) == counter.get_total_flops()
    assert model_flops_per_image(cfg) == 3 * counter.get_total_flops()
    # B/16 at 224: ~17.6 GMACs forward, as usually quoted
    assert 35e9 < model_flops_per_image(ViTConfig(variant="B/16"), training=False) < 35.3e9


def _grads_after_step(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    cfg = tiny("S/16", depth=2, dropout=0.1, attn_dropout=0.1, drop_path_rate=0.2)
    model = create_model(cfg).train()
    x = torch.randn(4, 3, cfg.img_size, cfg.img_size)
    loss_touching_everything(model, x).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_same_seed_gives_bit_identical_grads_on_cpu():
    a, b = _grads_after_step(0), _grads_after_step(0)
    assert all(torch.equal(a[n], b[n]) for n in a)
    c = _grads_after_step(1)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_compiles_without_graph_breaks():
    import torch._dynamo

    torch._dynamo.reset()
    cfg = tiny("S/16", depth=2)
    model = create_model(cfg)
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, cfg.img_size, cfg.img_size))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    cfg = tiny("S/16", depth=2, head="finetune")
    model = create_model(cfg)
    x = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    ref = model.forward_features(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = model.forward_features(x)
        logits = model.forward_head(tokens)
    assert logits.dtype == torch.bfloat16  # matmuls in bf16 (LayerNorm outputs stay fp32)
    torch.testing.assert_close(tokens.float(), ref, atol=0.1, rtol=0.05)
    (logits.float().square().mean() + tokens.float().square().mean()).backward()
    assert model.patch_embed.proj.weight.grad.dtype == torch.float32
    assert torch.isfinite(model.patch_embed.proj.weight.grad).all()
