"""Generator adapter over a diffusers Stable Diffusion pipeline (SD 1.x, SD 2.x, SD-Turbo).

Two things diffusers' ``__call__`` cannot do for us, and which this adapter adds:

1. a learned token: a new placeholder token whose input embedding is a tensor we own (an
   ``nn.Parameter`` during inversion), injected by wrapping the text encoder's input-embedding module,
   so the vocabulary matrix and every other weight stay untouched;
2. gradients through the last ``grad_steps`` denoising steps, the VAE decoder and (outside) the
   classifier, with every earlier step run without autograd (DCT's gradient skipping).

The sampling loop mirrors ``StableDiffusionPipeline.__call__`` step by step (same noise, scheduler
calls, guidance and decoding), and a test checks that both give the same images.
SDXL would add a second tokenizer/encoder pair: ``encode`` is the one place that changes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import DctAuditError
from ..options import DEFAULT_GENERATOR  # noqa: F401  (the defaults live with the options)
from . import hub

# family -> (denoising steps, guidance scale); users override with --steps / --guidance
FAMILY_DEFAULTS = {
    "sd-turbo": (1, 0.0),
    "sd1": (30, 7.0),  # the DCT paper's settings
    "sd2": (30, 7.0),
    "sdxl-turbo": (1, 0.0),  # one step, no guidance, 512 px (its UNet's native size)
    "sdxl": (30, 7.0),  # the paper's multi-step settings, at 1024 px (its native size)
}
SDXL_FAMILIES = ("sdxl-turbo", "sdxl")


class TokenInjectingEmbedding(nn.Module):
    """Input embedding with extra token ids: ids < vocab go to the frozen matrix, the others to our vectors.

    The wrapped ``nn.Embedding`` is never modified; a learned vector enters the graph through
    ``torch.where`` so its gradient is exactly what flows back to the token's positions.
    """

    def __init__(self, base: nn.Embedding):
        super().__init__()
        self.base = base
        self.extra: dict[int, torch.Tensor] = {}

    @property
    def weight(self) -> torch.Tensor:  # some code paths read ``token_embedding.weight``
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = self.base.num_embeddings
        out = self.base(input_ids.clamp_max(n - 1))  # (B, L, D)
        unknown = input_ids >= n
        for token_id, vector in self.extra.items():
            hit = input_ids == token_id
            unknown = unknown & ~hit
            out = torch.where(hit.unsqueeze(-1), vector.to(out.dtype), out)
        if bool(unknown.any()):
            raise RuntimeError("a prompt uses an added token that has no vector; call set_token first")
        return out


@dataclass
class GeneratorSpec:
    """The generator as resolved; recorded in the manifest."""

    spec: str
    model_id: str
    family: str
    prediction_type: str
    scheduler: str
    resolution: int
    default_steps: int
    default_guidance: float
    dtype: str

    def to_dict(self) -> dict:
        return asdict(self)


def detect_family(model_id: str, pipe) -> str:
    """The family from the pipeline's own configuration, not its name (a local copy of SD-Turbo may live in
    any folder). Turbo models are distilled for one-step sampling with trailing timestep spacing and no
    classifier-free guidance; diffusers stores that in the scheduler config (``timestep_spacing:
    "trailing"``) of stabilityai/sd-turbo, where SD 1.x/2.x ship "leading". A folder may also say what it
    is in ``dct_audit_family.txt``."""
    marker = Path(model_id) / "dct_audit_family.txt"
    if marker.is_file():  # local folders may say what they are
        fam = marker.read_text().strip()
        if fam in FAMILY_DEFAULTS:
            return fam
    config = pipe.scheduler.config
    turbo = (
        config.get("timestep_spacing") == "trailing" and config.get("prediction_type", "epsilon") == "epsilon"
    )
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl-turbo" if turbo else "sdxl"
    if turbo:
        return "sd-turbo"
    width = pipe.text_encoder.config.hidden_size
    return "sd2" if width >= 1024 else "sd1"


class Generator:
    """A loaded Stable Diffusion pipeline with learned-token injection and a gradient-skipping sampler."""

    def __init__(self, pipe, spec: GeneratorSpec, device: torch.device):
        self.pipe = pipe
        self.spec = spec
        self.device = device
        self.tokenizer = pipe.tokenizer
        self.text_encoder = pipe.text_encoder
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.scheduler = pipe.scheduler
        for module in (self.text_encoder, self.unet, self.vae):
            module.requires_grad_(False).eval()
        base = self.text_encoder.get_input_embeddings()
        if not isinstance(base, TokenInjectingEmbedding):
            base = TokenInjectingEmbedding(base)
            self.text_encoder.set_input_embeddings(base)
        self.embedding: TokenInjectingEmbedding = base

    # -- tokens ------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def embedding_dim(self) -> int:
        return self.embedding.base.embedding_dim

    def add_token(self, placeholder: str) -> int:
        """Add ``placeholder`` to the tokenizer (once) and return its id."""
        if placeholder not in self.tokenizer.get_vocab():
            self.tokenizer.add_tokens([placeholder])
        ids = self.tokenizer(placeholder, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise DctAuditError(f"placeholder '{placeholder}' did not become a single token")
        return ids[0]

    def vocab_norm(self) -> float:
        """Mean norm of the vocabulary's rows (what ``--max-norm`` scales)."""
        return float(self.embedding.base.weight.detach().float().norm(dim=-1).mean())

    def word_vector(self, word: str) -> torch.Tensor:
        """The frozen input embedding of a one-token word (the learned token's initialisation)."""
        ids = self.tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise DctAuditError(
                f"--init-word '{word}' is {len(ids)} tokens for this tokenizer; choose a one-token word"
            )
        return self.embedding.base.weight[ids[0]].detach().float().clone()

    def set_token(self, placeholder: str, vector: torch.Tensor) -> None:
        """Make ``placeholder`` in prompts mean ``vector`` (a tensor or a trainable parameter)."""
        self.embedding.extra[self.add_token(placeholder)] = vector

    # -- text --------------------------------------------------------------------------------------

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder hidden states for ``prompts`` exactly as diffusers' ``encode_prompt`` makes them."""
        tok = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tok.attention_mask.to(self.device)
        hidden = self.text_encoder(tok.input_ids.to(self.device), attention_mask=mask)[0]  # (B, 77, D)
        return hidden.to(self.text_encoder.dtype)

    def use_cfg(self, guidance: float) -> bool:
        return guidance > 1.0 and self.unet.config.time_cond_proj_dim is None

    # -- sampling ----------------------------------------------------------------------------------

    def sample(
        self,
        prompts: list[str],
        seeds: list[int],
        steps: int | None = None,
        guidance: float | None = None,
        grad_steps: int = 0,
        uncond: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] for one prompt per seed.

        Steps before the last ``grad_steps`` run under ``torch.no_grad``; the last ones, the decoder and
        the prompt encoding keep their graph, so a loss on the images reaches the learned token.
        ``uncond`` is the empty-prompt embedding (1, 77, D), computed once by the caller when guiding.
        """
        # 1. Check inputs
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        steps = self.spec.default_steps if steps is None else steps
        guidance = self.spec.default_guidance if guidance is None else guidance
        grad_steps = max(0, min(grad_steps, steps))
        height = height or self.spec.resolution
        width = width or self.spec.resolution
        cfg = self.use_cfg(guidance)
        pipe = self.pipe

        # 2. Encode the prompts; the conditional branch is where the learned token lives
        with torch.set_grad_enabled(grad_steps > 0 and torch.is_grad_enabled()):
            cond = self.encode(prompts)
        embeds, unet_kwargs = self._conditioning(cond, cfg, uncond, len(prompts), height, width)

        # 3. Timesteps and initial noise, drawn per seed on the CPU as diffusers does
        self.scheduler.set_timesteps(steps, device=self.device)
        timesteps = self.scheduler.timesteps
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        latents = pipe.prepare_latents(
            len(prompts), self.unet.config.in_channels, height, width, embeds.dtype, self.device, generators
        )
        extra = pipe.prepare_extra_step_kwargs(generators, 0.0)
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            g = torch.tensor(guidance - 1).repeat(len(prompts))
            timestep_cond = pipe.get_guidance_scale_embedding(
                g, embedding_dim=self.unet.config.time_cond_proj_dim
            )
            timestep_cond = timestep_cond.to(device=self.device, dtype=latents.dtype)

        # 4. Denoising loop: no autograd except for the last grad_steps steps
        first_grad = len(timesteps) - grad_steps
        for i, t in enumerate(timesteps):
            with torch.set_grad_enabled(i >= first_grad and torch.is_grad_enabled()):
                model_in = torch.cat([latents] * 2) if cfg else latents
                model_in = self.scheduler.scale_model_input(model_in, t)
                noise = self.unet(
                    model_in,
                    t,
                    encoder_hidden_states=embeds,
                    timestep_cond=timestep_cond,
                    return_dict=False,
                    **unet_kwargs,
                )[0]
                if cfg:
                    uncond_pred, text_pred = noise.chunk(2)
                    noise = uncond_pred + guidance * (text_pred - uncond_pred)
                latents = self.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]

        # 5. Decode; clamp to [0, 1] in the forward pass only (a plain clamp would zero the gradient
        #    of every out-of-range pixel, the norm early in training)
        with torch.set_grad_enabled(grad_steps > 0 and torch.is_grad_enabled()):
            images = self._decode(latents, generators).float() / 2 + 0.5
            images = images + (images.clamp(0, 1) - images).detach()
        return images  # (B, 3, H, W)

    def _conditioning(
        self, cond, cfg: bool, uncond, n: int, height: int, width: int
    ) -> tuple[torch.Tensor, dict]:
        """The UNet's text conditioning ``(encoder_hidden_states, extra UNet kwargs)``: with guidance, the
        empty prompt's embedding (``uncond``, computed here when not given) before the prompts'."""
        if not cfg:
            return cond, {}
        if uncond is None:
            with torch.no_grad():
                uncond = self.encode([""])
        return torch.cat([uncond.expand(n, -1, -1), cond]), {}  # (2B, 77, D)

    def _decode(self, latents: torch.Tensor, generators) -> torch.Tensor:
        """Latents to images in [-1, 1] (B, 3, H, W), with the VAE's scaling factor."""
        return self.vae.decode(
            latents / self.vae.config.scaling_factor, return_dict=False, generator=generators
        )[0]

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()
        if hasattr(self.vae, "enable_gradient_checkpointing"):
            self.vae.enable_gradient_checkpointing()


def check_generator_spec(spec: str) -> str:
    """Validate a local generator folder cheaply (before anything is written); returns the spec to load."""
    if not spec or not spec.strip():
        raise DctAuditError("--generator is empty; give a hub id (stabilityai/sd-turbo) or a pipeline folder")
    if not hub.looks_like_path(spec):
        check_hub_generator(spec)
        return spec
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise DctAuditError(
            f"generator folder '{spec}' does not exist; pass a diffusers pipeline folder or a hub id"
        )
    if not (folder / "model_index.json").is_file():
        raise DctAuditError(f"generator folder '{spec}' is not a diffusers pipeline (no model_index.json)")
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DctAuditError(
            f"generator folder '{spec}': model_index.json is not valid JSON ({e}); re-download or re-save the pipeline"
        ) from None
    if not isinstance(index, dict):
        raise DctAuditError(f"generator folder '{spec}': model_index.json is not a JSON object")
    _check_pipeline_class(spec, index)
    for part, path in shared_components(folder).items():
        if not path.is_dir():
            raise DctAuditError(
                f"generator '{spec}' shares its {part} from '{path}', which does not exist; "
                f"restore that folder or edit {folder / SHARED_FILE}"
            )
    return str(folder)


SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
SDXL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def is_sdxl_index(index: dict) -> bool:
    return index.get("_class_name") == "StableDiffusionXLPipeline" or "text_encoder_2" in index


def _check_pipeline_class(spec: str, index: dict) -> None:
    """Refuse pipelines this adapter cannot drive, and SDXL indexes that lack a part (before anything loads)."""
    name = index.get("_class_name")
    if is_sdxl_index(index):
        missing = [p for p in SDXL_PARTS if not index.get(p) or index.get(p) == [None, None]]
        if missing:
            raise DctAuditError(
                f"generator '{spec}' is an SDXL pipeline whose model_index.json lists no {', '.join(missing)}; "
                "re-download or re-save the pipeline"
            )
        return
    if name is None or name in SUPPORTED_PIPELINES:
        return
    raise DctAuditError(
        f"generator '{spec}' is a {name}; dct-audit supports StableDiffusionPipeline (SD 1.x/2.x/Turbo) and "
        "StableDiffusionXLPipeline (SDXL, SDXL-Turbo), e.g. --generator stabilityai/sd-turbo"
    )


def _is_sdxl(spec: str) -> bool:
    """Whether a checked spec is an SDXL pipeline, from its model_index.json (local, or cached from the hub)."""
    try:
        path = (
            Path(spec) / "model_index.json"
            if hub.looks_like_path(spec)
            else Path(hub.hf_file(spec, "model_index.json", "generator", f"--generator {spec}"))
        )
        index = json.loads(path.read_text())
    except (DctAuditError, OSError, ValueError):
        return False
    return isinstance(index, dict) and is_sdxl_index(index)


def check_hub_generator(spec: str) -> None:
    """For a hub id: read its model_index.json (cached, or fetched unless offline) and refuse an unsupported
    pipeline before anything is written. Silent when the index cannot be had: loading will say why."""
    try:
        path = hub.hf_file(spec, "model_index.json", "generator", f"--generator {spec}")
        index = json.loads(Path(path).read_text())
    except (DctAuditError, OSError, ValueError):
        return
    if isinstance(index, dict):
        _check_pipeline_class(spec, index)


SHARED_FILE = "dct_audit_shared.json"  # components a local pipeline folder takes from a sibling folder
DEFAULTS_FILE = "dct_audit_defaults.json"  # the steps and guidance a local pipeline was measured with


def shared_components(folder: str | Path) -> dict[str, Path]:
    """Components a local pipeline folder takes from a sibling folder instead of storing a copy.

    ``dct_audit_shared.json`` maps a component name (``text_encoder``, ``tokenizer``) to a folder path
    relative to the pipeline folder. The planted-bias world uses it so that the generator's text encoder
    *is* the world CLIP's text tower, stored once.
    """
    folder = Path(folder)
    file = folder / SHARED_FILE
    if not file.is_file():
        return {}
    try:
        table = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise DctAuditError(
            f"{file} is not valid JSON ({e.msg} at line {e.lineno}); fix or delete it"
        ) from None
    allowed = {"text_encoder", "tokenizer"}
    if not isinstance(table, dict) or not set(table) <= allowed:
        raise DctAuditError(f"{file} must map some of {sorted(allowed)} to folders")
    return {part: (folder / rel).resolve() for part, rel in table.items()}


def _load_shared(folder: str, dtype: torch.dtype) -> dict:
    from transformers import CLIPTextModel, CLIPTokenizer

    parts = {}
    for part, path in shared_components(folder).items():
        if part == "text_encoder":
            parts[part] = CLIPTextModel.from_pretrained(path, dtype=dtype)
        else:
            parts[part] = CLIPTokenizer.from_pretrained(path)
    return parts


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``--dtype``: auto is bf16 on a CUDA device that supports it, fp16 on older GPUs (T4, V100), fp32 on CPU."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise DctAuditError(f"--dtype must be auto, bf16, fp16 or fp32, not {name!r}")
    if device.type != "cuda" and name != "fp32":
        raise DctAuditError(
            f"--dtype {name} needs a CUDA device; on {device.type} use --dtype fp32 (or auto)"
        )
    if name == "bf16" and not torch.cuda.is_bf16_supported():
        raise DctAuditError("--dtype bf16: this GPU does not support bfloat16; use --dtype fp16 or auto")
    return DTYPES[name]


def load_generator(
    spec: str = DEFAULT_GENERATOR,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    resolution: int | None = None,
    family: str | None = None,
) -> Generator:
    """Load a Stable Diffusion pipeline by hub id or local folder through diffusers' own loader."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    device = torch.device(device)
    if dtype is None:
        dtype = resolve_dtype("auto", device)
    if family is not None and family not in FAMILY_DEFAULTS:
        raise DctAuditError(f"--family must be one of {', '.join(FAMILY_DEFAULTS)}, not {family!r}")
    spec = check_generator_spec(spec)
    xl = _is_sdxl(spec)
    if family is not None and (family in SDXL_FAMILIES) != xl:
        raise DctAuditError(
            f"--family {family} does not fit generator '{spec}' ({'an' if xl else 'not an'} SDXL pipeline)"
        )
    if xl:
        from diffusers import StableDiffusionXLPipeline as pipeline_class
    else:
        pipeline_class = StableDiffusionPipeline
    with hub.missing_model_guard("generator", f"--generator {spec}"):
        shared = _load_shared(spec, dtype) if hub.looks_like_path(spec) else {}
        no_checker = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
        pipe = pipeline_class.from_pretrained(
            spec,
            dtype=dtype,
            **no_checker,
            **shared,
            **hub.hf_kwargs(spec),
        )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    family = family or detect_family(spec, pipe)
    steps, guidance = FAMILY_DEFAULTS[family]
    defaults_file = Path(spec) / DEFAULTS_FILE
    if defaults_file.is_file():  # a local pipeline may record the steps and guidance it was measured with
        recorded = json.loads(defaults_file.read_text())
        steps, guidance = int(recorded.get("steps", steps)), float(recorded.get("guidance", guidance))
    gspec = GeneratorSpec(
        spec=spec,
        model_id=spec,
        family=family,
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
        scheduler=type(pipe.scheduler).__name__,
        resolution=int(resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor),
        default_steps=steps,
        default_guidance=guidance,
        dtype=str(dtype).replace("torch.", ""),
    )
    if xl:
        from .sdxl import SDXLGenerator

        return SDXLGenerator(pipe, gspec, device)
    return Generator(pipe, gspec, device)
