"""Where weights come from: the libraries' own caches, the hub, ``HF_HUB_OFFLINE``, and one clear error.

Every loader wraps its library call in :func:`missing_model_guard`, so a model that is not cached on
an offline machine becomes one line that names ``dct-audit download`` instead of a stack of retries.
Before any model loads, :func:`require_downloadable` names, in one line and in seconds, every model that
is not cached and cannot be fetched now: the hub's client retries an unreachable host for over a minute
per file, and a run would name only the first model it failed on.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import DctAuditError


def offline() -> bool:
    """True when the user asked the Hugging Face libraries not to touch the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


def hf_kwargs(model_id: str) -> dict:
    """Extra ``from_pretrained`` arguments: local folders and offline mode never reach the network."""
    if Path(model_id).exists() or offline() or unreachable():
        return {"local_files_only": True}  # a cached model loads without the client's minute of retries
    return {}


def hub_url() -> str:
    """The hub's address (``HF_ENDPOINT`` where set), as the Hugging Face libraries use it."""
    from huggingface_hub import constants

    return constants.ENDPOINT


_PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def probe(host: str, port: int, timeout: float = 5.0) -> str | None:
    """Why nothing answers at ``host:port`` within ``timeout`` seconds (``unknown host``, ``connection
    refused``, ``no answer in 5 s``), or None when something does. The name lookup counts against the
    timeout too (a thread: ``getaddrinfo`` itself has none)."""
    result: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(
                "unknown host" if isinstance(e, socket.gaierror) else (e.strerror or type(e).__name__).lower()
            )

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"no answer in {timeout:g} s"


@functools.cache
def _unreachable_host(host: str, port: int) -> str | None:
    return probe(host, port)


def unreachable(url: str | None = None) -> str | None:
    """Why models cannot be downloaded from ``url`` (default: the hub) now: ``HF_HUB_OFFLINE=1 is set`` (for
    the hub), or what the host's probe found; None when it answers, or when a proxy is set (only the
    libraries know how to go through it). Each host is probed once per process."""
    url = url or hub_url()
    if offline() and url == hub_url():
        return "HF_HUB_OFFLINE=1 is set"
    if any(os.environ.get(v) for v in _PROXIES):
        return None
    parts = urlsplit(url)
    if not parts.hostname:
        return None
    why = _unreachable_host(parts.hostname, parts.port or (80 if parts.scheme == "http" else 443))
    return f"{parts.hostname}: {why}" if why else None


def require_downloadable(missing: list[tuple[str, str, str]]) -> None:
    """``missing``: ``(flag, spec, url it downloads from)`` of each model about to load that is not in its local
    cache. Raises one line naming them all and the ``dct-audit download`` command that fetches them, when they
    cannot be downloaded now; otherwise they download as they load."""
    blocked = [(flag, spec, why) for flag, spec, url in missing if (why := unreachable(url))]
    if not blocked:
        return
    whys = "; ".join(dict.fromkeys(why for _, _, why in blocked))
    names = ", ".join(f"{flag} {spec}" for flag, spec, _ in blocked)
    fetch = " ".join(
        f"{'--classifier' if flag == '--holdout-classifier' else flag} {spec}" for flag, spec, _ in blocked
    )
    raise DctAuditError(
        f"not in the local cache, and cannot be downloaded now ({whys}): {names}; on a connected machine run "
        f"`dct-audit download {fetch}` (with the same HF_HOME / TORCH_HOME), or pass local folders"
    )


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
    """The first line of an error, cut at a word (with "...") past 160 characters."""
    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return line if len(line) <= 160 else line[:160].rsplit(" ", 1)[0] + " ..."


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
            why = None if torch_hub else unreachable()  # torchvision's host is another one
            state = (
                f"it cannot be downloaded now ({why})" if why else f"the download failed ({_first_line(e)})"
            )
            raise DctAuditError(
                f"{what} could not be loaded: it is not in the local cache ({where}) and {state}; "
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
        return hf_hub_download(repo_id, filename, local_files_only=offline() or unreachable() is not None)


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
