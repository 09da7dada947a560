"""Tiny randomly initialised models of the real classes, built from configs and saved to folders.

The way diffusers' fast tests do it: no download, seconds on a CPU, and loaded back through the same
loaders as real weights. Used by the tests and by the CPU mode of the benchmarks.
"""

from __future__ import annotations

import csv
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import torch

from . import rundir
from .clip_vocab import write_clip_tokenizer

SCHEDULER_KINDS = ("epsilon", "v", "turbo")


# the tiny text towers' shared config (Stable Diffusion's token ids and vocabulary, 32 wide) and SD's betas
TINY_TEXT = dict(
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    layer_norm_eps=1e-5,
    vocab_size=49408,
    max_position_embeddings=77,
)
# the tiny UNets' two levels (8x8 latents: no attention at the finest level, cross-attention at the coarser)
TINY_UNET = dict(
    block_out_channels=(8, 16),
    layers_per_block=1,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _save_tiny(pipe, folder: Path) -> None:
    """Save a tiny pipeline and drop the temporary tokenizer folder it was built from."""
    import shutil

    pipe.save_pretrained(folder)
    shutil.rmtree(folder / "_tok")


def _tiny_vae(sample_size: int):
    """A tiny ``AutoencoderKL`` (downsamples by 2, 4 latent channels)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size * 2,
    )


def _sharpen_cross_attention(unet, gain: float) -> None:
    """Scale the UNet's cross-attention so that, unlike a plain random init, the prompt visibly changes the
    image and a token's gradient is large enough to test."""
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith(("attn2.to_q", "attn2.to_k")):
                module.weight.mul_(gain)
            elif name.endswith(("attn2.to_v", "attn2.to_out.0")):
                module.weight.mul_(2 * gain)


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
        **TINY_UNET,
        sample_size=sample_size,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    _sharpen_cross_attention(unet, prompt_gain)
    torch.manual_seed(seed)
    vae = _tiny_vae(sample_size)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT, num_hidden_layers=2))
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tok"))
    common = SD_BETAS
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
    _save_tiny(pipe, folder)
    if kind == "turbo":
        (folder / "dct_audit_family.txt").write_text("sd-turbo\n")
    return folder


def make_tiny_sdxl_pipeline(
    folder: str | Path, kind: str = "turbo", sample_size: int = 16, seed: int = 0
) -> Path:
    """Save a tiny ``StableDiffusionXLPipeline``: two CLIP text encoders (32 + 32 wide, the second with a
    projection) sharing the real CLIP tokenizer, a UNet with SDXL's text-time conditioning, a VAE.

    ``kind``: ``turbo`` (Euler, trailing spacing: detected as SDXL-Turbo) or ``base`` (Euler, leading).
    The text configs use ``eos_token_id`` 49407, so transformers pools at the end of the text as our
    encoder does (legacy configs with ``eos_token_id`` 2 pool at ``argmax(input_ids)``).
    """
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **TINY_UNET,
        sample_size=sample_size,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids x 8, plus the pooled text (32)
        cross_attention_dim=64,  # 32 + 32: both encoders' hidden states, concatenated
        norm_num_groups=4,
    )
    _sharpen_cross_attention(unet, 4.0)  # a prompt that visibly changes the image
    torch.manual_seed(seed)
    vae = _tiny_vae(sample_size)
    config = dict(TINY_TEXT, num_hidden_layers=3, projection_dim=32)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tok"))
    spacing = "trailing" if kind == "turbo" else "leading"
    scheduler = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing=spacing, steps_offset=1)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    _save_tiny(pipe, folder)
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


# ----------------------------------------------------------------------------------------------------
# Run folders for report tests: a real tiny run, and copies of it changed the way a test needs
# ----------------------------------------------------------------------------------------------------


def build_tiny_run(tmp_path_factory, pipelines, classifier, clip) -> Path:
    """A real two-class run (classes 0 and 2) on tiny models; built once a session, later calls resume."""
    import dct_audit

    model, labels = classifier
    root = tmp_path_factory.getbasetemp() / "report-runs"
    dct_audit.run(
        f"file:{model}",
        "0,2",
        labels=labels,
        generator=pipelines["turbo"],
        tagger=f"hf:{clip}",
        explain_images=2,
        out=str(root),
        name="tiny",
        max_updates=2,
        n_images=2,
        contexts=("a photo of {}", "{} in the snow"),
        snapshot_every=1,
        lr=0.2,
        confirm_seeds=2,  # every attribute is still checked, on fewer seeds
        gen_batch=64,  # tiny images: few generator calls (at the default 4 the time goes to Python calls)
        quiet=True,
    )
    return root / "tiny"


def with_unfinished(run: Path, dest: Path) -> Path:
    """A copy of ``run`` plus class 1 interrupted (folder without DONE) and class 3 never started."""
    shutil.copytree(run, dest)
    half = dest / "classes" / "0001-spiny-lobster"
    shutil.copytree(dest / "classes" / "0000-american-lobster", half)
    (half / rundir.MARKER).unlink()
    (half / rundir.CLASS_SUMMARY).unlink()
    manifest = rundir.read_json(dest / rundir.MANIFEST)
    manifest["classes"] += [
        {"index": 1, "name": "spiny lobster", "placeholder": "<dct-1>"},
        {"index": 3, "name": "plate", "placeholder": "<dct-3>"},
    ]
    rundir.write_json(dest / rundir.MANIFEST, manifest)
    return dest


def add_analysis(run: Path, attributes=(("plate", "food"), ("person", "people"), ("snow", "scene"))) -> None:
    """Write ``enrichment.csv``, ``findings.json`` and each class's ``tags.csv`` as the analysis would."""
    manifest = rundir.read_json(run / rundir.MANIFEST)
    rows, findings = [], []
    for c in manifest["classes"]:
        folder = run / "classes" / f"{c['index']:04d}-{rundir.slugify(c['name'])}"
        if not (folder / rundir.MARKER).exists():
            continue
        for k, (attr, group) in enumerate(attributes):
            diff = 0.6 - 0.3 * k
            rows.append(
                {
                    "class_index": c["index"],
                    "attribute": attr,
                    "group": group,
                    "token_rate": 0.2 + diff,
                    "baseline_rate": 0.2,
                    "diff": diff,
                    "ci_low": diff - 0.2,
                    "ci_high": diff + 0.2,
                    "p_value": 0.001 * (k + 1),
                    "q_value": 0.002 * (k + 1),
                    "flagged": diff >= 0.25,
                }
            )
        overlay = folder.relative_to(run) / rundir.ATTRIBUTION_DIR / "token_0.png"
        if not (run / overlay).is_file():
            overlay = folder.relative_to(run) / rundir.IMAGES_DIR / "token" / "c0_s1000.png"
        findings.append(
            {
                "class_index": c["index"],
                "attribute": attributes[0][0],
                "effect": 0.6,
                "ci": [0.4, 0.8],
                "q": 0.002,
                "counterfactual": {
                    "with_prob": 0.8,
                    "without_prob": 0.4,
                    "diff": 0.4,
                    "ci_low": 0.3,
                    "ci_high": 0.5,
                },
                "attribution_outside_object": 0.35,
                "overlays": [overlay.as_posix()],
            }
        )
        tags = [
            [
                r["file"],
                r["variant"],
                r["context_index"],
                r["seed"],
                *(0.9 - 0.6 * (i % 2) for i in range(len(attributes))),
            ]
            for r in read_csv(folder / rundir.SCORES)
        ]
        header = ["file", "variant", "context_index", "seed", *(a for a, _ in attributes)]
        write_csv(folder / rundir.TAGS, header, tags)
        rundir.RunDir(run).mark_done(c["index"], c["name"])  # tags.csv is written before the marker in a run
    write_csv(run / rundir.ENRICHMENT, list(rows[0]), [list(r.values()) for r in rows])
    rundir.write_json(run / rundir.FINDINGS, findings)


def synthetic_run(source: Path, dest: Path, classes: list[tuple[int, str]]) -> Path:
    """A run of ``classes`` whose folders are hard-linked copies of ``source``'s first class."""
    manifest = rundir.read_json(source / rundir.MANIFEST)
    template = source / "classes" / "0000-american-lobster"
    summary = rundir.read_json(template / rundir.CLASS_SUMMARY)
    manifest["classes"], manifest["class_runs"] = [], {}
    for index, name in classes:
        folder = dest / "classes" / f"{index:04d}-{rundir.slugify(name)}"
        shutil.copytree(template, folder, copy_function=os.link)
        # rewritten files are replaced (new inode), never written through the hard link
        acc = (index % 97) / 96
        rundir.write_json(
            folder / rundir.CLASS_SUMMARY, {**summary, "index": index, "name": name, "token_accuracy": acc}
        )
        rundir.RunDir(dest).mark_done(index, name)
        manifest["classes"].append({"index": index, "name": name, "placeholder": f"<dct-{index}>"})
    rundir.write_json(dest / rundir.MANIFEST, manifest)
    return dest


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, header: list, rows: list) -> None:
    def write(p):
        with open(p, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)

    rundir.atomic_write(path, write)


class Page(HTMLParser):
    """Tags (with attributes) and text chunks of an HTML page, as a browser's parser would see them."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.texts: list[str] = []
        self.headings: list[str] = []  # text of each <h2>
        self._in_h2 = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_h2 = tag == "h2"

    def handle_endtag(self, tag):
        self._in_h2 = False

    def handle_data(self, data):
        self.texts.append(data)
        if self._in_h2:
            self.headings.append(data.strip())

    def urls(self) -> list[str]:
        return [a[k] for tag, a in self.tags for k in ("href", "src") if a.get(k)]


def parse(path: Path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


def hostile_run(tiny_run: Path, dest: Path, text: str) -> Path:
    """One class named ``text``, with ``text`` also as label, context, prompt, attribute and group."""
    run = synthetic_run(tiny_run, dest, [(7, text)])
    folder = next((run / "classes").iterdir())
    scores = read_csv(folder / rundir.SCORES)
    for r in scores:
        r.update(prompt=f"{r['prompt']} {text}", context=text, pred_name=text, class_name=text)
    write_csv(folder / rundir.SCORES, list(scores[0]), [list(r.values()) for r in scores])
    manifest = rundir.read_json(run / rundir.MANIFEST)
    manifest["settings"]["contexts"] = [text]
    rundir.write_json(run / rundir.MANIFEST, manifest)
    add_analysis(run, attributes=((text, text), ("plate", "food")))
    return run
