"""Equivalence with the Hugging Face ``transformers`` ViT, an independent implementation:
weights converted in either direction give the same outputs (fp32, tiny sizes), on disk
too (``save_pretrained`` directories, 4.x-style tensor names), at another resolution."""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vitray.training.hf_convert import (export_hf, hf_config, hf_to_state_dict, load_hf_model,  # noqa: E402
                                        load_hf_weights, state_dict_to_hf, to_hf_model, vit_config_from_hf)
from vitray.training.vit import ViTConfig, create_model, load_pretrained  # noqa: E402

ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; avoids OpenMP contention on a shared machine
    yield
    torch.set_num_threads(before)


def tiny_cfg(**kw) -> ViTConfig:
    kw = {"variant": "S/16", "depth": 2, "embed_dim": 48, "img_size": 32, "num_classes": 5, **kw}
    return ViTConfig(**kw)


def randomised(cfg: ViTConfig):
    """A model whose every tensor is random (no zero head, no unit norms), so that a
    swapped or transposed tensor in the conversion cannot go unnoticed."""
    torch.manual_seed(0)
    model = create_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def images(cfg: ViTConfig, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(1))


def test_ours_to_hf_classifier_same_logits():
    cfg = tiny_cfg(head="finetune")
    model = randomised(cfg)
    hf = to_hf_model(model)
    assert isinstance(hf, transformers.ViTForImageClassification)
    assert hf.config.layer_norm_eps == 1e-6 and hf.config.hidden_act == "gelu"
    x = images(cfg)
    with torch.no_grad():
        ours, theirs = model(x), hf(pixel_values=x).logits
    assert ours.abs().max() > 0.1  # a real signal, not zeros
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_ours_to_hf_pretrain_head_is_the_pooler():
    cfg = tiny_cfg()
    model = randomised(cfg)
    hf = to_hf_model(model)
    assert isinstance(hf, transformers.ViTModel) and hf.pooler is not None
    x = images(cfg)
    with torch.no_grad():
        tokens = model.forward_features(x)
        out = hf(pixel_values=x)
    torch.testing.assert_close(tokens, out.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), out.pooler_output, atol=ATOL, rtol=0)


@pytest.mark.parametrize("cls_name", ["ViTForImageClassification", "ViTModel"])
def test_hf_to_ours_same_outputs(cls_name):
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                                    intermediate_size=192, image_size=32, patch_size=16, num_labels=4,
                                    layer_norm_eps=1e-6, architectures=[cls_name])
    hf = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    cfg = vit_config_from_hf(config.to_dict())
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size) == (48, 2, 6, 16)
    model = create_model(cfg).eval()
    report = load_pretrained(model, load_hf_weights(hf.state_dict()))
    x = images(cfg)
    with torch.no_grad():
        if cls_name == "ViTForImageClassification":
            assert cfg.head == "finetune" and cfg.num_classes == 4 and report == ([], [], [])
            torch.testing.assert_close(model(x), hf(pixel_values=x).logits, atol=ATOL, rtol=0)
        else:
            # ViTModel has the pooler (our pre-logits layer) but no classifier
            assert cfg.head == "pretrain" and cfg.num_classes == 0 and report == ([], [], [])
            out = hf(pixel_values=x)
            tokens = model.forward_features(x)
            torch.testing.assert_close(tokens, out.last_hidden_state, atol=ATOL, rtol=0)
            torch.testing.assert_close(model(x), out.pooler_output, atol=ATOL, rtol=0)


def test_state_dict_round_trip_is_exact():
    model = randomised(tiny_cfg(head="finetune"))
    sd = model.state_dict()
    hf_sd = state_dict_to_hf(sd, prefix="vit.")
    assert "vit.layers.0.attention.q_proj.weight" in hf_sd and "classifier.weight" in hf_sd
    back = hf_to_state_dict(hf_sd)
    assert sorted(back) == sorted(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("head", ["finetune", "pretrain"])
def test_export_and_load_directory(tmp_path, head):
    cfg = tiny_cfg(head=head)
    model = randomised(cfg)
    directory = export_hf(model, str(tmp_path / "vit"))
    assert os.path.exists(os.path.join(directory, "model.safetensors"))
    assert os.path.exists(os.path.join(directory, "pretrain_head.safetensors")) == (head == "pretrain")
    # The saved file is what a public checkpoint looks like; HF loads it by itself.
    cls = transformers.ViTForImageClassification if head == "finetune" else transformers.ViTModel
    hf = cls.from_pretrained(directory).eval()
    x = images(cfg)
    loaded, report = load_hf_model(directory)
    assert loaded.cfg.head == head and loaded.cfg.num_classes == 5 and report == ([], [], [])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)  # nothing lost
        ref = hf(pixel_values=x)
        got = ref.logits if head == "finetune" else ref.pooler_output
        want = model(x) if head == "finetune" else model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(want, got, atol=ATOL, rtol=0)


def test_load_at_higher_resolution_for_finetuning(tmp_path):
    cfg = tiny_cfg()
    directory = export_hf(randomised(cfg), str(tmp_path / "vit"))
    model, report = load_hf_model(directory, img_size=64, head="finetune", num_classes=3)
    assert report.resampled == ["pos_embed"]
    assert sorted(report.skipped) == ["head.bias", "head.weight", "pre_logits.fc.bias", "pre_logits.fc.weight"]
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_unconvertible_inputs_fail_clearly():
    with pytest.raises(ValueError, match="unknown Hugging Face ViT tensors"):
        hf_to_state_dict({"encoder.layer.0.attention.attention.rotary.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="only"):
        hf_to_state_dict({"layers.0.attention.q_proj.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="class-token"):
        hf_config(tiny_cfg(class_token=False, global_pool="avg"))
    with pytest.raises(ValueError, match="hybrid"):
        hf_config(ViTConfig(variant="R26+S/16", img_size=32))


def test_config_json_defaults_are_hfs():
    # google/vit-base-patch16-224-style config.json; missing fields take HF's defaults
    cfg = vit_config_from_hf({"architectures": ["ViTForImageClassification"],
                              "id2label": {str(i): f"c{i}" for i in range(1000)}})
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.img_size) == (768, 12, 12, 16, 224)
    assert cfg.variant == "B/16" and cfg.head == "finetune" and cfg.num_classes == 1000
    assert cfg.layer_norm_eps == 1e-12  # HF's default, kept so that its weights behave as trained
    with pytest.raises(ValueError, match="hidden_act"):
        vit_config_from_hf({"hidden_act": "gelu_new"})
