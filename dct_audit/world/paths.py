"""Where the planted-bias world's files live: the one place that names them (no torch import here).

``weights/`` holds one folder per trained model; ``attributes.json`` is the world's tagging vocabulary.
"""

from __future__ import annotations

from pathlib import Path

WORLD = Path(__file__).parent
WEIGHTS = WORLD / "weights"
CLIP = WEIGHTS / "clip"  # world CLIP: the demo's tagger, and the generator's text tower
CHECKER = WEIGHTS / "checker"  # independent attribute checker (judges generated images in tests)
CLASSIFIERS = WEIGHTS / "classifiers"  # biased/, unbiased/, unbiased_seed1/
GENERATOR = WEIGHTS / "generator"  # diffusers StableDiffusionPipeline folder (VAE inside)
ATTRIBUTES_FILE = WORLD / "attributes.json"

# files whose presence says the shipped world is installed (what ``dct-audit demo`` needs)
NEEDED = {
    "generator": GENERATOR / "model_index.json",
    "biased classifier": CLASSIFIERS / "biased" / "config.json",
    "unbiased classifier": CLASSIFIERS / "unbiased" / "config.json",
    "tagger": CLIP / "config.json",
}
