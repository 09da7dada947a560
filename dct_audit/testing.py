"""Tiny randomly initialised models of the real classes, built from configs and saved to folders.

The way diffusers' fast tests do it: no download, seconds on a CPU, and loaded back through the same
loaders as real weights. Used by the tests and by the CPU mode of the benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .clip_vocab import write_clip_tokenizer

SCHEDULER_KINDS = ("epsilon", "v", "turbo")


def make_tiny_pipeline(
    folder: str | Path, kind: str = "epsilon", sample_size: int = 16, seed: int = 0, prompt_gain: float = 4.0
) -> Path:
    """Save a tiny ``StableDiffusionPipeline`` (UNet, VAE, CLIP text encoder, real CLIP tokenizer).

    ``kind``: ``epsilon`` (SD 1.x-style, DDIM), ``v`` (SD 2.x-style v-prediction, DDIM with trailing
    spacing) or ``turbo`` (SD-Turbo-style Euler with trailing spacing, one step, no guidance).
    Images are ``2 * sample_size`` pixels wide (the VAE downsamples by 2). ``prompt_gain`` sharpens and
    strengthens the UNet's cross-attention so that, unlike a plain random init, the prompt visibly
    changes the image and a token's gradient is large enough to test.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if kind not in SCHEDULER_KINDS:
        raise ValueError(f"kind must be one of {SCHEDULER_KINDS}, not {kind!r}")
    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith(("attn2.to_q", "attn2.to_k")):
                module.weight.mul_(prompt_gain)
            elif name.endswith(("attn2.to_v", "attn2.to_out.0")):
                module.weight.mul_(2 * prompt_gain)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size * 2,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            layer_norm_eps=1e-5,
            vocab_size=49408,
            max_position_embeddings=77,
        )
    )
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tok"))
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    if kind == "epsilon":
        scheduler = DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    elif kind == "v":
        scheduler = DDIMScheduler(
            **common,
            clip_sample=False,
            set_alpha_to_one=False,
            prediction_type="v_prediction",
            timestep_spacing="trailing",
            steps_offset=1,
        )
    else:
        scheduler = EulerDiscreteScheduler(**common, timestep_spacing="trailing", steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    import shutil

    shutil.rmtree(folder / "_tok")
    if kind == "turbo":
        (folder / "dct_audit_family.txt").write_text("sd-turbo\n")
    return folder


def make_tiny_classifier(
    folder: str | Path, labels: list[str], seed: int = 0, size: int = 32, logit_scale: float = 30.0
) -> tuple[Path, Path]:
    """Save a tiny timm ResNet as TorchScript plus a labels file; returns ``(model_path, labels_path)``.

    ``logit_scale`` multiplies the random head so logits differ between images (a plain init gives
    near-uniform probabilities whatever the image).
    """
    import json

    import timm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=len(labels)).eval()
    with torch.no_grad():
        model.get_classifier().weight.mul_(logit_scale)
    scripted = torch.jit.script(model)
    path = folder / "classifier.pt"
    scripted.save(str(path))
    (folder / "classifier.pt.json").write_text(
        json.dumps({"input_size": [3, size, size], "crop_pct": 1.0, "interpolation": "bilinear"})
    )
    labels_path = folder / "labels.txt"
    labels_path.write_text("\n".join(labels) + "\n")
    return path, labels_path


def make_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny transformers ``CLIPModel`` + processor (real CLIP tokenizer) for ``--tagger hf:FOLDER``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from .clip_vocab import clip_tokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    small = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1}
    config = CLIPConfig(
        text_config={**small, "vocab_size": 49408},
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer()).save_pretrained(folder)
    return folder
