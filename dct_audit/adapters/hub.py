"""Where weights come from: the libraries' own caches, the hub, ``HF_HUB_OFFLINE``, and one clear error.

Every loader wraps its library call in :func:`missing_model_guard`, so a model that is not cached on
an offline machine becomes one line that names ``dct-audit download`` instead of a stack of retries.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import DctAuditError


def offline() -> bool:
    """True when the user asked the Hugging Face libraries not to touch the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


def hf_kwargs(model_id: str) -> dict:
    """Extra ``from_pretrained`` arguments: local folders and offline mode never reach the network."""
    if Path(model_id).exists() or offline():
        return {"local_files_only": True}
    return {}


def _network_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    try:
        from huggingface_hub import errors as hf_errors

        errs += [hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError]
        if hasattr(hf_errors, "OfflineModeIsEnabled"):
            errs.append(hf_errors.OfflineModeIsEnabled)
    except ImportError:  # pragma: no cover
        pass
    try:
        import httpx

        errs.append(httpx.HTTPError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__


@contextlib.contextmanager
def missing_model_guard(
    what: str, flag: str, torch_hub: bool = False, source: str | None = None
) -> Iterator[None]:
    """Turn a model that cannot be loaded into one :class:`DctAuditError` naming the fix.

    ``source``: the folder or hub id being loaded. A local folder that fails to load (no weights, a
    corrupt file, not a model of this kind) says so; a hub model that is not cached and cannot be
    downloaded names ``dct-audit download``; a cached one that fails to load names its broken cache.
    """
    local = source.removeprefix("local-dir:") if source else None
    try:
        yield
    except DctAuditError:
        raise
    except Exception as e:
        if local is not None and Path(local).expanduser().exists():
            raise DctAuditError(
                f"{what} '{local}' could not be loaded ({_first_line(e)}); it must be a complete model "
                f"folder of the kind {flag.split()[0]} expects (config and weights, as save_pretrained writes it)"
            ) from None
        where = "TORCH_HOME" if torch_hub else "HF_HOME"
        if isinstance(e, _network_errors()):
            state = "HF_HUB_OFFLINE=1 is set" if offline() else "the download failed"
            raise DctAuditError(
                f"{what} could not be loaded: it is not in the local cache ({where}) and {state} ({_first_line(e)}); "
                f"on a connected machine run `dct-audit download {flag}`, or pass a local folder"
            ) from None
        if _is_broken_file(e):
            raise DctAuditError(
                f"{what} could not be loaded: its cached files are broken ({_first_line(e)}); delete its entry "
                f"in {where} and run `dct-audit download {flag}` again"
            ) from None
        raise


def _is_broken_file(e: BaseException) -> bool:
    """A truncated or corrupt weights file: what a half-finished download leaves."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover
        SafetensorError = ()  # noqa: N806
    import pickle

    return isinstance(e, (SafetensorError, pickle.UnpicklingError, EOFError))


def hf_config(model_id: str, what: str, flag: str):
    from transformers import AutoConfig

    if looks_like_path(model_id) and not Path(model_id).exists():
        raise DctAuditError(f"{what} folder '{model_id}' does not exist")
    with missing_model_guard(what, flag, source=model_id):
        return AutoConfig.from_pretrained(model_id, **hf_kwargs(model_id))


def hf_file(repo_id: str, filename: str, what: str, flag: str) -> str:
    from huggingface_hub import hf_hub_download

    with missing_model_guard(what, flag):
        return hf_hub_download(repo_id, filename, local_files_only=offline())


# the files a model repo has, by what loads it: the first one in the local cache tells its revision
REVISION_FILES = {
    "generator": ("model_index.json",),
    "transformers": ("config.json",),
    "timm": ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "config.json"),
    "open_clip": ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
}


def cached_revision(repo_id: str, files: tuple[str, ...]) -> str | None:
    """The commit of ``repo_id`` that the local Hugging Face cache holds (what ``from_pretrained`` loads when
    it resolves ``main``), read from the cache without touching the network; None when it is not cached."""
    from huggingface_hub import try_to_load_from_cache

    for filename in files:
        try:
            path = try_to_load_from_cache(repo_id, filename)
        except Exception:  # a repo id the hub would not accept (a local path, a torchvision name): none
            return None
        if isinstance(path, str):
            parts = Path(path).parts
            if "snapshots" in parts[:-1]:
                return parts[parts.index("snapshots") + 1]
    return None
