"""``dct-audit download``: fetch weights into the libraries' own caches for later offline use."""

from __future__ import annotations

from .adapters import hub
from .errors import DctAuditError


def download(
    generator: str | None = None, classifier: str | None = None, tagger: str | None = None, say=print
) -> list[str]:
    """Prefetch the named models; returns what was fetched. Each lands where its library looks for it."""
    if hub.offline():
        raise DctAuditError(
            "HF_HUB_OFFLINE=1 is set, so nothing can be downloaded; unset it on a connected machine"
        )
    if not (generator or classifier or tagger):
        raise DctAuditError(
            "name something to fetch: --generator ID, --classifier NAME and/or --tagger ARCH/TAG"
        )
    done = []
    if generator:
        from huggingface_hub import snapshot_download

        with hub.missing_model_guard("generator", f"--generator {generator}"):
            path = snapshot_download(
                generator,
                allow_patterns=["*.json", "*.txt", "*.safetensors", "tokenizer/*"],
                ignore_patterns=["*.ckpt", "*non_ema*", "*.bin", "*.fp16.*"],
            )
        say(f"generator {generator} -> {path}")
        done.append(generator)
    if classifier:
        from .adapters.classifier import load_classifier

        load_classifier(classifier)
        say(f"classifier {classifier} cached")
        done.append(classifier)
    if tagger:
        import open_clip

        arch, _, tag = tagger.partition("/")
        with hub.missing_model_guard("tagger", f"--tagger {tagger}"):
            open_clip.create_model(arch, pretrained=tag or None)
        say(f"tagger {tagger} cached")
        done.append(tagger)
    return done
