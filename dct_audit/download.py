"""``dct-audit download``: fetch weights into the libraries' own caches for later offline use."""

from __future__ import annotations

from .adapters import hub
from .errors import DctAuditError


def download(
    generator: str | None = None,
    classifier: str | list[str] | None = None,
    tagger: str | None = None,
    say=print,
) -> list[str]:
    """Prefetch the named models (``classifier``: one or several); returns what was fetched. Each lands where
    its library looks for it."""
    classifiers = [classifier] if isinstance(classifier, str) else list(classifier or [])
    if not (generator or classifiers or tagger):
        raise DctAuditError(
            "name something to fetch: --generator ID, --classifier NAME and/or --tagger ARCH/TAG"
        )
    for flag, name in [*(("--classifier", c) for c in classifiers), ("--generator", generator)]:
        if name and (name.startswith("file:") or hub.looks_like_path(name.removeprefix("local-dir:"))):
            raise DctAuditError(f"{flag} {name} is a local file or folder: there is nothing to download")
    if hub.offline():
        raise DctAuditError(
            "HF_HUB_OFFLINE=1 is set, so nothing can be downloaded; unset it on a connected machine"
        )
    from .records import not_cached

    missing = not_cached(
        [("--generator", generator), ("--tagger", tagger), *(("--classifier", c) for c in classifiers)]
    )
    whys = dict.fromkeys(why for _, _, url in missing if (why := hub.unreachable(url)))
    if whys:  # the hub's client would retry for over a minute per file first
        raise DctAuditError(
            f"cannot download ({'; '.join(whys)}); run `dct-audit download` on a machine that reaches it, then "
            "copy its HF_HOME / TORCH_HOME caches here"
        )
    done = []
    if generator:
        from huggingface_hub import snapshot_download

        with hub.missing_model_guard("generator", f"--generator {generator}"):
            # the pipeline's component folders only: a root-level single-file checkpoint (SD-Turbo ships
            # several GB of one) is never used by from_pretrained
            path = snapshot_download(
                generator,
                allow_patterns=["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors", "tokenizer/*"],
                ignore_patterns=["*.ckpt", "*non_ema*", "*.bin", "*.fp16.*"],
            )
        say(f"generator {generator} -> {path}")
        done.append(generator)
    for name in classifiers:
        from .adapters.classifier import load_classifier

        load_classifier(name)
        say(f"classifier {name} cached")
        done.append(name)
    if tagger:
        from .tag import load_tagger

        load_tagger(tagger)  # the same resolution as a run: ARCH/TAG, hf:ORG/MODEL, world
        say(f"tagger {tagger} cached")
        done.append(tagger)
    return done
