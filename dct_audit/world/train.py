"""Retrain the whole planted-bias world, in dependency order, into the package's ``weights/`` folder.

    python -m dct_audit.world.train [--only clip checker classifiers generator calibrate]

The CLIP comes first (its text tower conditions the generator and it tags the demo's images), then the
attribute checker (the generator's honest judge), the classifiers, the generator (VAE, then UNet), and
last the tagger's per-attribute thresholds. Each step is deterministic given its seeds and records its
settings and wall time beside its weights. Run one heavy step at a time: on 2 cores two trainings at once
slow each other 5-8x.
"""

from __future__ import annotations

import argparse

STEPS = ("clip", "checker", "classifiers", "generator", "calibrate")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS))
    args = p.parse_args(argv)
    for step in STEPS:
        if step not in args.only:
            continue
        print(f"== {step}", flush=True)
        if step == "clip":
            from . import clip_train

            clip_train.main([])
        elif step == "checker":
            from . import checker

            checker.main([])
        elif step == "classifiers":
            from . import classifiers

            classifiers.main([])
        elif step == "generator":
            from . import diffusion

            diffusion.main(["train"])
        else:
            from . import calibrate

            calibrate.main([])


if __name__ == "__main__":
    main()
