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


@contextlib.contextmanager
def missing_model_guard(what: str, flag: str, torch_hub: bool = False) -> Iterator[None]:
    """Turn "not cached and no network" into a :class:`DctAuditError` naming ``dct-audit download``."""
    try:
        yield
    except DctAuditError:
        raise
    except _network_errors() as e:
        where = "TORCH_HOME" if torch_hub else "HF_HOME"
        state = "HF_HUB_OFFLINE=1 is set" if offline() else "the download failed"
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise DctAuditError(
            f"{what} could not be loaded: it is not in the local cache ({where}) and {state} ({first}); "
            f"on a connected machine run `dct-audit download {flag}`, or pass a local folder"
        ) from None


def hf_config(model_id: str, what: str, flag: str):
    from transformers import AutoConfig

    if looks_like_path(model_id) and not Path(model_id).exists():
        raise DctAuditError(f"{what} folder '{model_id}' does not exist")
    with missing_model_guard(what, flag):
        return AutoConfig.from_pretrained(model_id, **hf_kwargs(model_id))


def hf_file(repo_id: str, filename: str, what: str, flag: str) -> str:
    from huggingface_hub import hf_hub_download

    with missing_model_guard(what, flag):
        return hf_hub_download(repo_id, filename, local_files_only=offline())
