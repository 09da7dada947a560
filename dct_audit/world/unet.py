"""The world generator's architecture: its UNet, its noise schedule, and the frozen text tower it reads.

Why each choice (v-prediction, zero terminal SNR, cross-attention at 8x8 and 4x4, the pooled prompt in the
time embedding) is in ``world/diffusion.py``'s docstring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from dct_audit.world.paths import CLIP as CLIP_FOLDER


@dataclass
class UNetConfig:
    """UNet architecture: one level per entry of ``block_out_channels`` (16x16, 8x8, 4x4 for three)."""

    block_out_channels: tuple[int, ...] = (32, 64, 96)  # 2.9M parameters, 214 MFLOP per forward
    cross_attention: tuple[bool, ...] = (False, True, True)  # per level, from the finest
    layers_per_block: int = 1
    heads: int = 4
    norm_num_groups: int = 16
    text_time_embedding: bool = True  # add the attention-pooled prompt to the time embedding


def build_unet(
    config: UNetConfig, cross_attention_dim: int, sample_size: int = 16, channels: int = 4, seed: int = 0
) -> UNet2DConditionModel:
    """A freshly initialised ``UNet2DConditionModel`` (initialisation seeded)."""
    c = config
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in c.cross_attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(c.cross_attention)),
        block_out_channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=c.heads,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=c.norm_num_groups,
        addition_embed_type="text" if c.text_time_embedding else None,
        addition_embed_type_num_heads=c.heads,
    )


def build_scheduler() -> DDIMScheduler:
    """The sampling scheduler saved with the pipeline; training noises with the same ``alphas_cumprod``.

    Cosine betas (made for small images) rescaled to zero terminal SNR, v-prediction, DDIM with trailing
    spacing so that sampling starts from pure noise at t = 999 and ends on a clean sample.
    """
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,  # unused by trailing spacing; 1 keeps StableDiffusionPipeline from warning
    )


def load_text_encoder(clip_folder: str | Path = CLIP_FOLDER) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """The world CLIP's tokenizer and text tower (float32, frozen, eval mode)."""
    clip_folder = Path(clip_folder)
    tokenizer = CLIPTokenizer.from_pretrained(clip_folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(clip_folder / "text_encoder", dtype=torch.float32)
    return tokenizer, text_encoder.requires_grad_(False).eval()


@torch.no_grad()
def encode_prompts(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: Sequence[str]
) -> torch.Tensor:
    """Last hidden states (B, L, D), padded to ``model_max_length`` exactly as the pipeline encodes."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids)[0]
