"""Seconds per update, per class and peak memory of the inversion: our loop vs the official settings.

(a) ours: SD-Turbo-style one-step sampling, batch 4 on GPU (2 on CPU), gradient through the one step.
(b) official: 30 DDIM steps at guidance 7, batch 1 with 5-step gradient accumulation, gradient through
    the last step (the settings of the DCT paper's code).

On CUDA the models have the real architectures (SD-Turbo / SD 2.1-base UNet, VAE and OpenCLIP-H text
encoder configs at 512 px, a timm ResNet-50) with random weights: timing does not depend on the values.
On CPU the tiny test models stand in, so the table shows the loop's overheads, not real speed.
Random weights never reach the stop accuracy, so "per class" uses the update budget (--max-updates).

    python benchmarks/bench_invert.py [--updates 5] [--max-updates 50] [--grad-checkpointing] [--channels-last]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from dct_audit.adapters.classifier import Classifier, ClassifierSpec, LabelSet, Preprocess
from dct_audit.adapters.generator import Generator, GeneratorSpec
from dct_audit.generate import generate, plan_jobs
from dct_audit.invert import InvertConfig, invert_class


def real_pipeline(kind: str, device, dtype):
    """SD-Turbo (kind='turbo') or SD 2.1-base (kind='official') architecture with random weights."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from dct_audit.clip_vocab import clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=23,
            hidden_act="gelu",
            projection_dim=512,
            vocab_size=49408,
            max_position_embeddings=77,
        )
    )
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    if kind == "turbo":
        scheduler = EulerDiscreteScheduler(**common, timestep_spacing="trailing", steps_offset=1)
    else:
        scheduler = DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(device, dtype)


def tiny_pipeline(kind: str, device, dtype):
    from diffusers import StableDiffusionPipeline

    from dct_audit.testing import make_tiny_pipeline

    folder = make_tiny_pipeline(tempfile.mkdtemp(), "turbo" if kind == "turbo" else "epsilon")
    return StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False
    ).to(device, dtype)


def sdxl_turbo_pipeline(device, dtype, real: bool):
    """SDXL-Turbo: the real architecture (UNet 2.6 B, CLIP ViT-L + OpenCLIP bigG, 512 px) with random weights
    on CUDA; the tiny test pipeline on CPU."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dct_audit.clip_vocab import clip_tokenizer
    from dct_audit.testing import make_tiny_sdxl_pipeline

    if not real:
        return StableDiffusionXLPipeline.from_pretrained(
            make_tiny_sdxl_pipeline(tempfile.mkdtemp(), "turbo")
        ).to(device, dtype)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
        scaling_factor=0.13025,
    )
    clip_l = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        )
    )
    clip_g = CLIPTextModelWithProjection(
        CLIPTextConfig(
            hidden_size=1280,
            intermediate_size=5120,
            num_attention_heads=20,
            num_hidden_layers=32,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=1280,
        )
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        timestep_spacing="trailing",
        steps_offset=1,
    )
    tok = clip_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=clip_l,
        text_encoder_2=clip_g,
        tokenizer=tok,
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )
    return pipe.to(device, dtype)


def classifier(device, real: bool) -> Classifier:
    import timm
    from timm.data import resolve_data_config

    name = "resnet50" if real else "resnet10t"
    model = timm.create_model(name, pretrained=False, num_classes=1000)
    pre = Preprocess.from_timm(resolve_data_config({}, model=model))
    labels = LabelSet.imagenet()
    return Classifier(model, pre, labels, ClassifierSpec(name, "timm", name)).to(device)


def generator(kind: str, device, real: bool, channels_last: bool) -> Generator:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if kind == "sdxl-turbo":
        from dct_audit.adapters.sdxl import SDXLGenerator

        pipe = sdxl_turbo_pipeline(device, dtype, real)
        pipe.set_progress_bar_config(disable=True)
        res = pipe.unet.config.sample_size * pipe.vae_scale_factor
        spec = GeneratorSpec(
            "bench", "bench", "sdxl-turbo", "epsilon", "EulerDiscreteScheduler", res, 1, 0.0, str(dtype)
        )
        return SDXLGenerator(pipe, spec, device)
    pipe = (real_pipeline if real else tiny_pipeline)(kind, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    steps, guidance = (1, 0.0) if kind == "turbo" else (30, 7.0)
    res = pipe.unet.config.sample_size * pipe.vae_scale_factor
    spec = GeneratorSpec(
        "bench",
        "bench",
        "sd-turbo" if kind == "turbo" else "sd2",
        pipe.scheduler.config.prediction_type,
        type(pipe.scheduler).__name__,
        res,
        steps,
        guidance,
        str(dtype),
    )
    return Generator(pipe, spec, device)


def measure(kind: str, args, device, real: bool) -> dict:
    gen = generator(kind, device, real, args.channels_last)
    if args.grad_checkpointing:
        gen.enable_gradient_checkpointing()
    clf = classifier(device, real)
    if kind in ("turbo", "sdxl-turbo"):
        config = InvertConfig(batch=args.batch or (4 if device.type == "cuda" else 2), grad_accum=1)
    else:
        config = InvertConfig(steps=30, guidance=7.0, batch=1, grad_accum=5)
    config.max_updates, config.stop_accuracy, config.snapshot_every = args.updates + 1, 1.0, 10**6
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    grads = []
    vec_holder = {}

    def on_update(row):
        grads.append(row["grad_norm"])

    result = invert_class(gen, clf, 122, "American lobster", "<bench>", config, progress=on_update)
    vec_holder["v"] = result.vector
    per_update = [h["seconds"] for h in result.history[1:]]  # the first update warms up kernels
    # the class's image grids at the run defaults: 16 seeds x 3 contexts x 2 variants
    jobs = plan_jobs(
        "<bench>", "American lobster", ("a photo of {}", "a statue of {}", "{} in the snow"), list(range(16))
    )
    t0 = time.perf_counter()
    for _chunk, images in generate(gen, jobs[: args.grid_images], max(config.batch, 4), None, None):
        with torch.no_grad():
            clf(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    grid_s = (time.perf_counter() - t0) * len(jobs) / max(1, min(len(jobs), args.grid_images))
    sec = statistics.median(per_update)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    nonzero = all(g == g and g > 0 for g in grads)  # NaN-free and strictly positive
    return {
        "loop": {"turbo": "ours (one step)", "sdxl-turbo": "ours, SDXL-Turbo (one step)"}.get(
            kind, "official (30 steps, 1x5 accum)"
        ),
        "batch": f"{config.batch}x{config.grad_accum}",
        "s/update": sec,
        "updates/class": args.max_updates,
        "grid s": grid_s,
        "s/class": sec * args.max_updates + grid_s,
        "peak GB": peak,
        "token grad > 0": nonzero,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--updates", type=int, default=5, help="timed updates per loop (after one warm-up)")
    p.add_argument(
        "--max-updates", type=int, default=50, help="update budget per class for the per-class column"
    )
    p.add_argument("--batch", type=int, help="our loop's batch (default 4 on GPU, 2 on CPU)")
    p.add_argument(
        "--grid-images", type=int, default=16, help="grid images actually generated (extrapolated to 96)"
    )
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--only", choices=["ours", "official"])
    p.add_argument("--sdxl", action="store_true", help="add the SDXL-Turbo row (our loop)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    real = device.type == "cuda"
    kinds = [k for k in ("turbo", "official") if args.only is None or (k == "turbo") == (args.only == "ours")]
    rows = [measure(k, args, device, real) for k in kinds]
    if args.sdxl:
        rows.append(measure("sdxl-turbo", args, device, real))
    name = torch.cuda.get_device_name(device) if real else "CPU, tiny models"
    print(
        f"\ndevice: {name}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
        f"grad checkpointing {args.grad_checkpointing}; channels_last {args.channels_last}\n"
    )
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    if len(rows) >= 2 and kinds == ["turbo", "official"]:
        print(
            f"\nper update: ours is {rows[1]['s/update'] / rows[0]['s/update']:.1f}x faster; "
            f"per class: {rows[1]['s/class'] / rows[0]['s/class']:.1f}x faster"
        )


if __name__ == "__main__":
    main()
