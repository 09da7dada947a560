"""Generator adapter over a diffusers Stable Diffusion pipeline (SD 1.x, SD 2.x, SD-Turbo).

Two things diffusers' ``__call__`` cannot do for us, and which this adapter adds:

1. a learned token: a new placeholder token whose input embedding is a tensor we own (an
   ``nn.Parameter`` during inversion), injected by wrapping the text encoder's input-embedding module,
   so the vocabulary matrix and every other weight stay untouched;
2. gradients through the last ``grad_steps`` denoising steps, the VAE decoder and (outside) the
   classifier, with every earlier step run without autograd (DCT's gradient skipping).

The sampling loop mirrors ``StableDiffusionPipeline.__call__`` step by step (same noise, scheduler
calls, guidance and decoding), and a test checks that both give the same images.
SDXL overrides ``encode``, ``_conditioning`` and ``_decode`` (``adapters/sdxl.py``). Finding, checking and
loading a pipeline (hub ids, local folders, dtypes) is ``adapters/generator_load.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import DctAuditError

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


class SampleMemo:
    """Images a generator made for prompts without a learned token, by (prompts, seeds, steps, guidance).

    A generator given in memory keeps one (``adapters.in_memory.wrap_generator``): the next audit with the
    same loaded generator (the demo's unbiased run, a notebook auditing a second classifier) reuses its
    baseline grids and counterfactual prompts instead of making them again. The key is the whole batch, so
    a reused batch is the one the sampler would make again: no number changes. Kept on the CPU, at most
    ``max_bytes``; the least recently used batch goes first.
    """

    def __init__(self, digest: str, max_bytes: int = 1 << 30):
        from collections import OrderedDict

        self.digest = digest  # the weights the images were made with (``in_memory.pipeline_hash``)
        self.max_bytes = max_bytes
        self.batches: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0

    def get(self, key: tuple) -> torch.Tensor | None:
        images = self.batches.get(key)
        if images is None:
            return None
        self.batches.move_to_end(key)
        self.hits += 1
        return images.clone()

    def put(self, key: tuple, images: torch.Tensor) -> None:
        images = images.detach().cpu().clone()
        size = images.numel() * images.element_size()
        if size > self.max_bytes or key in self.batches:
            return
        while self.bytes + size > self.max_bytes:
            _, old = self.batches.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self.batches[key] = images
        self.bytes += size


class Generator:
    """A loaded Stable Diffusion pipeline with learned-token injection and a gradient-skipping sampler."""

    memo: SampleMemo | None = None  # images of token-free prompts, for a generator given in memory

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

    def word_vector(self, word: str, flag: str = "--init-word") -> torch.Tensor:
        """The frozen input embedding of a one-token word (the learned token's initialisation)."""
        ids = self.tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise DctAuditError(
                f"{flag} '{word}' is {len(ids)} tokens for this tokenizer; choose a one-token word"
            )
        return self.embedding.base.weight[ids[0]].detach().float().clone()

    def has_added_token(self, prompts: list[str]) -> bool:
        """Whether any of ``prompts`` uses a token added to the vocabulary (a learned token)."""
        n = self.embedding.base.num_embeddings
        return any(i >= n for ids in self.tokenizer(prompts, add_special_tokens=False).input_ids for i in ids)

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
