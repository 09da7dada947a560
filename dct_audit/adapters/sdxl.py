"""SDXL and SDXL-Turbo: the generator adapter over ``StableDiffusionXLPipeline``.

The learned token is one vector of 768 + 1280 values: the first part enters ``text_encoder`` (CLIP ViT-L),
the rest ``text_encoder_2`` (OpenCLIP ViT-bigG), each through a ``TokenInjectingEmbedding`` (neither
vocabulary is edited). Prompts are encoded as diffusers' ``encode_prompt`` does (penultimate hidden states
of both encoders, concatenated; the pooled embedding of ``text_encoder_2``), except for one thing: the
pooled embedding is taken at the first end-of-text token. Configs with the legacy ``eos_token_id: 2`` pool
at ``argmax(input_ids)``, which is the placeholder's id once a token is added (ids above the vocabulary);
without a placeholder both give the same vector. The sampler adds ``add_time_ids`` and the pooled
embeddings (``added_cond_kwargs``), uses zeroed negative embeddings where the pipeline's config says so
(``force_zeros_for_empty_prompt``, SDXL and SDXL-Turbo), and upcasts a float16 VAE whose config asks for it.
For the ecosystem the token is also saved as ``{"clip_l": (1, 768), "clip_g": (1, 1280)}`` (``save_sdxl_token``),
the file ``load_textual_inversion`` loads once per encoder.
"""

from __future__ import annotations

import torch

from ..errors import DctAuditError
from .generator import Generator, TokenInjectingEmbedding


class SDXLGenerator(Generator):
    """A loaded ``StableDiffusionXLPipeline`` with learned-token injection and the gradient-skipping sampler."""

    def __init__(self, pipe, spec, device: torch.device):
        self.pipe = pipe
        self.spec = spec
        self.device = device
        self.tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
        self.text_encoders = [pipe.text_encoder, pipe.text_encoder_2]
        self.tokenizer = pipe.tokenizer
        self.text_encoder = pipe.text_encoder
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.scheduler = pipe.scheduler
        for module in (*self.text_encoders, self.unet, self.vae):
            module.requires_grad_(False).eval()
        if self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            self.vae.to(
                torch.float32
            )  # the SDXL VAE overflows in float16 (diffusers upcasts it the same way)
        self.embeddings: list[TokenInjectingEmbedding] = []
        for te in self.text_encoders:
            base = te.get_input_embeddings()
            if not isinstance(base, TokenInjectingEmbedding):
                base = TokenInjectingEmbedding(base)
                te.set_input_embeddings(base)
            self.embeddings.append(base)
        self.embedding = self.embeddings[0]
        self.dims = [e.base.embedding_dim for e in self.embeddings]

    # -- tokens ------------------------------------------------------------------------------------

    @property
    def embedding_dim(self) -> int:
        return sum(self.dims)

    def vocab_norm(self) -> float:
        """Mean norm of the vocabulary's rows, both encoders' parts together (what ``--max-norm`` scales)."""
        a, b = (e.base.weight.detach().float() for e in self.embeddings)
        n = min(len(a), len(b))
        return float((a[:n].pow(2).sum(-1) + b[:n].pow(2).sum(-1)).sqrt().mean())

    def _ids(self, placeholder: str) -> list[int]:
        ids = []
        for tok in self.tokenizers:
            if placeholder not in tok.get_vocab():
                tok.add_tokens([placeholder])
            got = tok(placeholder, add_special_tokens=False).input_ids
            if len(got) != 1:
                raise DctAuditError(f"placeholder '{placeholder}' did not become a single token")
            ids.append(got[0])
        return ids

    def add_token(self, placeholder: str) -> int:
        return self._ids(placeholder)[0]

    def word_vector(self, word: str, flag: str = "--init-word") -> torch.Tensor:
        parts = []
        for tok, emb in zip(self.tokenizers, self.embeddings, strict=True):
            ids = tok(word, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise DctAuditError(
                    f"{flag} '{word}' is {len(ids)} tokens for this tokenizer; choose a one-token word"
                )
            parts.append(emb.base.weight[ids[0]].detach().float())
        return torch.cat(parts).clone()

    def set_token(self, placeholder: str, vector: torch.Tensor) -> None:
        if vector.shape[-1] != self.embedding_dim:
            raise DctAuditError(
                f"a token for this SDXL pipeline has {self.embedding_dim} values ({' + '.join(map(str, self.dims))}), "
                f"not {vector.shape[-1]}"
            )
        start = 0
        for token_id, emb, dim in zip(self._ids(placeholder), self.embeddings, self.dims, strict=True):
            emb.extra[token_id] = vector[start : start + dim]
            start += dim

    # -- text --------------------------------------------------------------------------------------

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden (B, 77, 768 + 1280), pooled (B, 1280))`` as diffusers' SDXL ``encode_prompt`` (see the
        module docstring for the pooling)."""
        hidden, pooled = [], None
        for k, (tok, te) in enumerate(zip(self.tokenizers, self.text_encoders, strict=True)):
            ids = tok(
                prompts,
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            out = te(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if k == len(self.text_encoders) - 1:
                last = out.last_hidden_state  # (B, 77, D), after the final layer norm
                eos = (ids == tok.eos_token_id).int().argmax(-1)  # the first end-of-text token
                pooled = last[torch.arange(len(prompts), device=last.device), eos]
                if hasattr(te, "text_projection"):
                    pooled = te.text_projection(pooled)
        dtype = self.text_encoders[-1].dtype
        return torch.cat(hidden, dim=-1).to(dtype), pooled.to(dtype)

    def _uncond(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pipe.config.get("force_zeros_for_empty_prompt", False):
            hidden, pooled = self.encode([""])
            return torch.zeros_like(hidden), torch.zeros_like(pooled)
        return self.encode([""])

    # -- sampling: Generator.sample, with SDXL's conditioning and decoding --------------------------------

    def _conditioning(
        self, cond, cfg: bool, uncond, n: int, height: int, width: int
    ) -> tuple[torch.Tensor, dict]:
        """Hidden states, plus the pooled embeddings and ``add_time_ids`` as ``added_cond_kwargs``. With
        guidance the negative branch is zeros where the pipeline zeroes the empty prompt (SDXL and
        SDXL-Turbo), else the empty prompt's encoding (``uncond``, computed here when not given)."""
        hidden, pooled = cond
        if cfg:
            if uncond is None or self.pipe.config.get("force_zeros_for_empty_prompt", False):
                with torch.no_grad():
                    uncond = self._uncond()
            u_hidden, u_pooled = uncond
            hidden = torch.cat([u_hidden.expand(n, -1, -1), hidden])
            pooled = torch.cat([u_pooled.expand(n, -1), pooled])
        projection = self.text_encoders[-1].config.projection_dim
        time_ids = self.pipe._get_add_time_ids(
            (height, width),
            (0, 0),
            (height, width),
            dtype=hidden.dtype,
            text_encoder_projection_dim=projection,
        ).to(self.device)
        added = {"text_embeds": pooled, "time_ids": time_ids.repeat(hidden.shape[0], 1)}
        return hidden, {"added_cond_kwargs": added}

    def _decode(self, latents: torch.Tensor, generators) -> torch.Tensor:
        """The VAE's own scaling, and its latent statistics where it has them (as the SDXL pipeline)."""
        cfg_vae = self.vae.config
        z = latents.to(self.vae.dtype)
        mean, std = getattr(cfg_vae, "latents_mean", None), getattr(cfg_vae, "latents_std", None)
        if mean is not None and std is not None:
            m = torch.tensor(mean).view(1, -1, 1, 1).to(z)
            s = torch.tensor(std).view(1, -1, 1, 1).to(z)
            z = z * s / cfg_vae.scaling_factor + m
        else:
            z = z / cfg_vae.scaling_factor
        return self.vae.decode(z, return_dict=False)[0]

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()
        if hasattr(self.vae, "enable_gradient_checkpointing"):
            self.vae.enable_gradient_checkpointing()


def save_sdxl_token(path, vector: torch.Tensor, dims: list[int]) -> None:
    """Write ``{"clip_l": (1, 768), "clip_g": (1, 1280)}``: the SDXL textual-inversion file, which
    ``pipe.load_textual_inversion(state["clip_g"], token=..., text_encoder=pipe.text_encoder_2,
    tokenizer=pipe.tokenizer_2)`` (and ``clip_l`` with the first encoder) loads."""
    from safetensors.torch import save_file

    from ..rundir import atomic_write

    v = vector.detach().float().cpu()
    tensors = {
        "clip_l": v[: dims[0]].reshape(1, -1).contiguous(),
        "clip_g": v[dims[0] :].reshape(1, -1).contiguous(),
    }
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": "pt", "dct_audit": "1"}))
