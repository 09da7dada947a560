"""Finding, checking and loading a text-to-image pipeline: hub ids and local folders, family, dtype.

``check_generator_spec`` validates a spec cheaply before anything is written; ``load_generator`` returns the
``Generator`` adapter (``adapters/generator.py``), or the SDXL one (``adapters/sdxl.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import DctAuditError
from ..options import DEFAULT_GENERATOR
from . import hub, registry
from .classifier import IN_MEMORY
from .generator import FAMILY_DEFAULTS, SDXL_FAMILIES, Generator, GeneratorSpec


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


def check_generator_spec(spec: str) -> str:
    """Validate a local generator folder cheaply (before anything is written); returns the spec to load."""
    if spec and registry.matches("generator", spec):
        return spec  # a plugin checks its own spec when it loads
    if not spec or not spec.strip():
        raise DctAuditError("--generator is empty; give a hub id (stabilityai/sd-turbo) or a pipeline folder")
    if spec.startswith(IN_MEMORY):
        raise DctAuditError(
            f"generator '{spec}' was passed in memory (a loaded pipeline), so it cannot be loaded from its name; "
            "pass the same pipeline again from Python: dct_audit.run(..., generator=pipe)"
        )
    if not hub.looks_like_path(spec):
        check_hub_generator(spec)
        return spec
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        state = "is a file, not a folder" if folder.exists() else "does not exist"
        raise DctAuditError(
            f"generator folder '{spec}' {state}; pass a diffusers pipeline folder or a hub id"
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
    """Load a Stable Diffusion pipeline by hub id or local folder through diffusers' own loader (or through
    a registered plugin: ``dct_audit.adapters.registry``)."""
    plugin = registry.find("generator", spec or "")
    if plugin is not None:
        return plugin(spec, torch.device(device), dtype)
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
    with hub.missing_model_guard("generator", f"--generator {spec}", source=spec):
        shared = _load_shared(spec, dtype) if hub.looks_like_path(spec) else {}
        no_checker = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
        pipe = pipeline_class.from_pretrained(
            spec,
            dtype=dtype,
            **no_checker,
            **shared,
            **hub.hf_kwargs(spec),
        )
    return adapt_pipeline(pipe.to(device), spec, device, dtype, resolution, family)


def adapt_pipeline(
    pipe, spec: str, device: torch.device, dtype: torch.dtype, resolution: int | None, family: str | None
) -> Generator:
    """The adapter around a loaded ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (on ``device``):
    its family (from its own config unless given), default steps and guidance, and its record ``spec``."""
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
    if getattr(pipe, "text_encoder_2", None) is not None:
        from .sdxl import SDXLGenerator

        return SDXLGenerator(pipe, gspec, device)
    return Generator(pipe, gspec, device)
