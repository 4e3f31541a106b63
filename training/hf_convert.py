"""Weights to and from the Hugging Face ``transformers`` ViT layout.

Two independent implementations giving the same outputs is our check that the model
is the paper's ViT; the same mapping lets users bring public ViT weights from local
files and export theirs. Name mapping (ours <- HF ``ViTModel``; ``ViTForImageClassification``
prefixes the backbone with ``vit.``):

    cls_token, pos_embed      <- embeddings.cls_token, embeddings.position_embeddings
    patch_embed.proj          <- embeddings.patch_embeddings.projection
    blocks.i.norm1 / norm2    <- layers.i.layernorm_before / layernorm_after
    blocks.i.attn.qkv         <- cat(layers.i.attention.{q,k,v}_proj)   (rows: q, then k, then v)
    blocks.i.attn.proj        <- layers.i.attention.o_proj
    blocks.i.mlp.fc1 / fc2    <- layers.i.mlp.fc1 / fc2
    norm                      <- layernorm
    pre_logits.fc             <- pooler.dense        (the paper's tanh pre-logits layer)
    head                      <- classifier          (ViTForImageClassification)

transformers 5.x uses the names on the right; checkpoints saved by 4.x (most of the
Hub) use ``encoder.layer.i.attention.attention.query`` / ``attention.output.dense`` /
``intermediate.dense`` / ``output.dense``; both are read. Reading weights needs only
safetensors (or ``torch.load(weights_only=True)`` for ``.bin``): no pickled objects.
``transformers`` is imported lazily, only to build HF configs/models (tests, export).
"""

from __future__ import annotations

import json
import os
import re
from typing import Mapping

import torch

from vitray.training.vit import (PATCH_SIZES, VARIANTS, LoadReport, ViTConfig, VisionTransformer,
                                 create_model, load_pretrained)

# HF 4.x checkpoint names -> HF 5.x names (after the "vit." prefix is removed).
_LEGACY = [
    (re.compile(r"^encoder\.layer\.(\d+)\."), r"layers.\1."),
    (re.compile(r"\.attention\.attention\.query\."), ".attention.q_proj."),
    (re.compile(r"\.attention\.attention\.key\."), ".attention.k_proj."),
    (re.compile(r"\.attention\.attention\.value\."), ".attention.v_proj."),
    (re.compile(r"\.attention\.output\.dense\."), ".attention.o_proj."),
    (re.compile(r"\.intermediate\.dense\."), ".mlp.fc1."),
    (re.compile(r"^(layers\.\d+)\.output\.dense\."), r"\1.mlp.fc2."),
]
_SIMPLE = {  # HF 5.x name -> ours, for the non-layer tensors
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "pooler.dense.weight": "pre_logits.fc.weight",
    "pooler.dense.bias": "pre_logits.fc.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
_LAYER = {  # per-layer HF 5.x suffix -> ours
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_QKV = ("q_proj", "k_proj", "v_proj")
PRETRAIN_HEAD_FILE = "pretrain_head.safetensors"
"""Our pretraining classifier (``head.*``), which HF's ViTModel has no slot for."""
# Tensors of HF heads we do not have (masked-image-modelling); reported, not loaded.
_IGNORED = re.compile(r"^(embeddings\.mask_token|decoder\.)")


def hf_to_state_dict(hf_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ViTModel / ViTForImageClassification state dict (4.x or 5.x names) -> ours.

    Raises ``ValueError`` naming any tensor it does not know (ignoring only the
    masked-image-modelling mask token and decoder).
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in hf_sd.items():
        name = key[4:] if key.startswith("vit.") else key
        for pattern, repl in _LEGACY:
            name = pattern.sub(repl, name)
        if name in _SIMPLE:
            out[_SIMPLE[name]] = value
            continue
        m = re.match(r"^layers\.(\d+)\.(.+)\.(weight|bias)$", name)
        if m is not None:
            i, mod, kind = m.groups()
            if mod.startswith("attention.") and mod.split(".", 1)[1] in _QKV:
                qkv.setdefault(f"blocks.{i}.attn.qkv.{kind}", {})[mod.split(".", 1)[1]] = value
                continue
            if mod in _LAYER:
                out[f"blocks.{i}.{_LAYER[mod]}.{kind}"] = value
                continue
        if not _IGNORED.match(name):
            unknown.append(key)
    if unknown:
        raise ValueError(f"unknown Hugging Face ViT tensors: {unknown}")
    for key, parts in qkv.items():
        if set(parts) != set(_QKV):
            raise ValueError(f"{key}: checkpoint has only {sorted(parts)} of q/k/v")
        out[key] = torch.cat([parts[p] for p in _QKV], dim=0)  # (3D, D) or (3D,)
    return out


def state_dict_to_hf(sd: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Our state dict -> HF 5.x names (``prefix="vit."`` for ViTForImageClassification's backbone).

    ``head.*`` becomes ``classifier.*`` (never prefixed). Only plain patch-embedding ViTs
    with a class token map onto HF's model; other tensors raise ``ValueError``.
    """
    simple = {v: k for k, v in _SIMPLE.items()}
    layer = {v: k for k, v in _LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in simple:
            out[(prefix if not key.startswith("head.") else "") + simple[key]] = value
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m is None:
            raise ValueError(f"{key} has no Hugging Face ViT counterpart")
        i, mod, kind = m.groups()
        if mod == "attn.qkv":
            for part, chunk in zip(_QKV, value.chunk(3, dim=0)):
                out[f"{prefix}layers.{i}.attention.{part}.{kind}"] = chunk
        elif mod in layer:
            out[f"{prefix}layers.{i}.{layer[mod]}.{kind}"] = value
        else:
            raise ValueError(f"{key} has no Hugging Face ViT counterpart")
    return out


def _check_hf_compatible(cfg: ViTConfig) -> None:
    if cfg.hybrid is not None or not cfg.class_token or cfg.global_pool != "token":
        raise ValueError("the Hugging Face ViT layout covers plain-patch ViTs with class-token "
                         f"pooling; {cfg.variant} has hybrid={cfg.hybrid}, class_token="
                         f"{cfg.class_token}, global_pool={cfg.global_pool!r}")


def hf_config(cfg: ViTConfig):
    """A ``transformers.ViTConfig`` describing the same network as ``cfg``.

    The pooler (dense + tanh on the class token) is the pretraining head's hidden layer,
    so ``pooler_output_size`` = ``representation_size``. ``layer_norm_eps`` is ours
    (1e-6, the paper's), not HF's default 1e-12; ``hidden_act="gelu"`` is the exact GELU.
    """
    import transformers

    _check_hf_compatible(cfg)
    return transformers.ViTConfig(
        hidden_size=cfg.embed_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.mlp_dim,
        hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attn_dropout,
        layer_norm_eps=cfg.layer_norm_eps,
        image_size=cfg.img_size,
        patch_size=cfg.patch_size,
        num_channels=cfg.in_chans,
        qkv_bias=cfg.qkv_bias,
        num_labels=max(cfg.num_classes, 1),
        pooler_output_size=cfg.pre_logits_dim if cfg.head == "pretrain" else cfg.embed_dim,
        pooler_act="tanh",
    )


# transformers.ViTConfig defaults, for config.json files that leave a field out.
_HF_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3,
                    qkv_bias=True, pooler_act="tanh", pooler_output_size=None)


def vit_config_from_hf(hf: Mapping | object, **overrides) -> ViTConfig:
    """Our :class:`ViTConfig` from an HF ViT config (object or ``config.json`` dict).

    The head defaults to "finetune" for ``ViTForImageClassification`` checkpoints and to
    "pretrain" otherwise (its pooler is the pre-logits layer); ``overrides`` win.
    """
    def get(key: str):
        value = hf.get(key) if isinstance(hf, Mapping) else getattr(hf, key, None)
        return _HF_DEFAULTS.get(key) if value is None else value

    def side(key: str) -> int:
        value = get(key)
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ValueError(f"{key} {value}: only square images and patches are supported")
            value = value[0]
        return int(value)

    for key, ours in (("hidden_act", "gelu"), ("pooler_act", "tanh")):
        if get(key) != ours:
            raise ValueError(f"{key} {get(key)!r} differs from this ViT's {ours!r}")
    embed_dim, patch = get("hidden_size"), side("patch_size")
    # The variant names the table entry of the same width; the explicit sizes are what count.
    size = next((name for name, dims in VARIANTS.items() if dims[0] == embed_dim), "B")
    is_classifier = any("ImageClassification" in a for a in (get("architectures") or []))
    num_classes = 0
    if is_classifier:
        num_classes = len(get("id2label") or {}) or int(get("num_labels") or 0)
    fields = dict(
        variant=f"{size}/{patch if patch in PATCH_SIZES else 16}", img_size=side("image_size"),
        patch_size=patch, embed_dim=embed_dim, depth=get("num_hidden_layers"),
        num_heads=get("num_attention_heads"), in_chans=get("num_channels"),
        mlp_ratio=get("intermediate_size") / embed_dim, qkv_bias=get("qkv_bias"),
        layer_norm_eps=get("layer_norm_eps"), num_classes=num_classes,
        head="finetune" if is_classifier else "pretrain",
    )
    if not is_classifier and get("pooler_output_size") not in (None, embed_dim):
        fields["representation_size"] = get("pooler_output_size")
    fields.update(overrides)
    return ViTConfig(**fields)


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                return _read_weights(os.path.join(path, name))
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            return {k: v for name in files for k, v in load_file(os.path.join(path, name)).items()}
        raise FileNotFoundError(f"{path}: no model.safetensors, sharded index or pytorch_model.bin")
    if path.endswith(".safetensors"):
        return load_file(path)
    # weights_only: tensors and plain containers, never arbitrary pickled objects.
    return torch.load(path, map_location="cpu", weights_only=True)


def load_hf_weights(path_or_state_dict: str | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ViT weights -> our state dict (pass it to :func:`load_pretrained`).

    Accepts a directory written by ``save_pretrained`` (``model.safetensors``, a sharded
    safetensors index, or ``pytorch_model.bin`` read with ``weights_only``), a single
    ``.safetensors`` / ``.bin`` file, or an in-memory HF state dict. A directory from
    :func:`export_hf` also gives back the pretraining head's classifier.
    """
    if not isinstance(path_or_state_dict, (str, os.PathLike)):
        return hf_to_state_dict(path_or_state_dict)
    path = os.fspath(path_or_state_dict)
    sd = hf_to_state_dict(_read_weights(path))
    head = os.path.join(path, PRETRAIN_HEAD_FILE)
    if os.path.isdir(path) and os.path.exists(head):  # written by export_hf, our names
        from safetensors.torch import load_file

        sd.update(load_file(head))
    return sd


def load_hf_model(path: str, **overrides) -> tuple[VisionTransformer, LoadReport]:
    """Build our model from an HF ViT directory (``config.json`` + weights) and load it.

    ``overrides`` change the config (e.g. ``img_size=384`` resamples the position
    embeddings; ``head="finetune", num_classes=10`` starts a new classifier).
    """
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    sd = load_hf_weights(path)
    if "head.weight" in sd and "pre_logits.fc.weight" in sd:  # export_hf's pretraining head
        overrides = {"num_classes": sd["head.weight"].shape[0], **overrides}
    model = create_model(vit_config_from_hf(hf, **overrides))
    return model, load_pretrained(model, sd)


def to_hf_model(model: VisionTransformer):
    """An HF model holding ``model``'s weights: ``ViTForImageClassification`` for the
    fine-tuning head, ``ViTModel`` (with pooler = pre-logits layer) for the pretraining
    head. HF has no place for the pretraining head's classifier: see :func:`export_hf`."""
    import transformers

    cfg = model.cfg
    config = hf_config(cfg)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if cfg.head == "finetune" and cfg.num_classes > 0:
        config.architectures = ["ViTForImageClassification"]
        hf = transformers.ViTForImageClassification(config)
        hf_sd = state_dict_to_hf(sd, prefix="vit.")
    else:
        config.architectures = ["ViTModel"]
        hf = transformers.ViTModel(config, add_pooling_layer=cfg.head == "pretrain")
        hf_sd = state_dict_to_hf({k: v for k, v in sd.items() if not k.startswith("head.")})
    hf.load_state_dict(hf_sd, strict=True)  # every tensor placed, none left over
    return hf.eval()


def export_hf(model: VisionTransformer, directory: str) -> str:
    """Write ``model`` as an HF ViT directory (``save_pretrained``: config.json + model.safetensors).

    A pretraining-head model exports as ``ViTModel`` with its pooler; its classifier,
    which HF ViTModel has no slot for, goes to ``pretrain_head.safetensors`` next to it
    (our names), so nothing is dropped. Returns ``directory``.
    """
    from safetensors.torch import save_file

    hf = to_hf_model(model)
    hf.save_pretrained(directory)  # safetensors
    if model.cfg.head == "pretrain" and model.cfg.num_classes > 0:
        head = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k.startswith("head.")}
        save_file(head, os.path.join(directory, PRETRAIN_HEAD_FILE))
    return directory
