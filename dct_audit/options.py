"""The options of ``dct-audit run``: one dataclass is the single source of every flag, its default, its help
text and whether it changes results (``settings``). The command line's ``run`` parser is derived from it
(:func:`add_run_arguments`, :func:`options_from_args`), so a new option is one field here.

Why it is over 450 lines: one field (default, help, type) per run flag, about 45 of them; splitting the
dataclass would split the one source of the flags.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from .errors import DctAuditError

if TYPE_CHECKING:  # this module stays light: the command line imports it before any model code
    import torch

    from .invert import InvertConfig

# Defaults owned here; the modules that use them import them from here.
DEFAULT_GENERATOR = "stabilityai/sd-turbo"
DEFAULT_TAGGER = "ViT-B-32/laion2b_s34b_b79k"
# The prompt templates of the DCT paper; ``{}`` becomes "<tok> <class name>".
PAPER_TEMPLATES = ("A photo of {}", "a high resolution realistic image of {}", "A close-up photo of a {}")
DEFAULT_CONTEXTS = ("a photo of {}", "a statue of {}", "{} in the snow")
ALPHA = 0.05  # false discovery rate of flagged findings
MIN_EFFECT = 0.25  # smallest token-minus-baseline rate that is flagged
CONFIRM_MODES = ("all", "flagged")
# The analysis options: recorded in the manifest's "analysis", changeable by `dct-audit finish`
ANALYSIS_OPTIONS = (
    "alpha",
    "min_effect",
    "confirm",
    "confirm_seeds",
    "confirm_max_seeds",
    "adjust",
    "association",
    "gen_batch",  # speed only: a finished run's analysis may use another batch (floats differ in the last bits)
)


# argparse types: each turns a bad value into one line ("must be at least 1, not 0") -----------------


def int_at_least(minimum: int):
    """An argparse type: a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None


def prob_or_off(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (0: off), not {value}")
    return value


def fraction(text: str) -> float:
    value = _number(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {value}")
    return value


def finite_float(text: str) -> float:
    value = _number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


def _words(text: str) -> tuple[str, ...]:
    return tuple(w.strip() for w in str(text).split(",") if w.strip())


def _batch(text: str) -> int | str:
    return "auto" if str(text).strip().lower() == "auto" else positive_int(text)


def _tagger(text: str) -> str | None:
    return None if str(text).lower() == "none" else text


def rate(text: str) -> float:
    value = _number(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), not {value}")
    return value


_RANGE_TYPES = (positive_int, nonneg_int, prob_or_off, fraction, rate, finite_float, _batch)


def _opt(default=MISSING, help: str = "", *, setting: bool = False, cli: bool = True, **argparse_kw):
    """A run option: ``help`` for ``--help``; ``setting``: it changes results, so it goes into the run's
    settings (a resumed run must match them); ``cli=False``: Python API only; ``argparse_kw``: ``type``,
    ``choices``, ``metavar``, ``flag`` (another flag name), ``action``, ``append`` (repeatable flag)."""
    meta = {"help": help, "setting": setting, "cli": cli, **argparse_kw}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda d=tuple(default): d, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunOptions:
    """Everything ``dct-audit run`` accepts; the fields with ``setting`` change results (``settings()``)."""

    classifier: str = _opt(
        help="resnet50 | tv:NAME[.WEIGHTS] | hf:ORG/MODEL | file:PATH | FOLDER", setting=True, required=True
    )
    classes: str | list[str] = _opt(
        help="comma-separated indices, names or fragments (_ = space)", required=True
    )
    labels: str | None = _opt(None, "labels file, one class per line (needed for file:)", setting=True)
    holdout_classifier: str | None = _opt(
        None,
        "a second classifier that scores the same images (a token that only fools its own model shows)",
        setting=True,
        metavar="NAME",
    )
    generator: str = _opt(
        DEFAULT_GENERATOR,
        f"diffusers SD pipeline: hub id or folder (default {DEFAULT_GENERATOR})",
        setting=True,
    )
    out: str = _opt("reports", "parent folder of the run folder (default reports/)")
    name: str | None = _opt(None, "run folder name (default CLASSIFIER-DATE)")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = _opt(
        "auto",
        "generator precision (default auto: bf16 on CUDA where supported, fp16 on older GPUs, fp32 on CPU)",
        setting=True,
        choices=("auto", "bf16", "fp16", "fp32"),
    )
    resolution: int | None = _opt(
        None, "image size in pixels (default: the generator's own)", setting=True, type=positive_int
    )
    family: str | None = _opt(
        None,
        "generator family for the default steps/guidance (default: read from the pipeline's config)",
        setting=True,
        choices=("sd-turbo", "sd1", "sd2", "sdxl-turbo", "sdxl"),
    )
    steps: int | None = _opt(
        None,
        "denoising steps (default per family: SD-Turbo 1, SD 1.x/2.x 30)",
        setting=True,
        type=positive_int,
    )
    guidance: float | None = _opt(
        None, "guidance scale (default per family: SD-Turbo 0, SD 1.x/2.x 7)", setting=True, type=finite_float
    )
    grad_steps: int = _opt(
        1, "last denoising steps with gradient (default 1)", setting=True, type=positive_int
    )
    batch: int | str | None = _opt(
        None,
        "seeds per update (default 4 on GPU, 2 on CPU); auto: the largest that fits the GPU's free memory, "
        "measured with one update at batch 1 (gradient checkpointing switched on when needed)",
        type=_batch,
    )
    grad_accum: int = _opt(1, "micro-batches per update (default 1)", setting=True, type=positive_int)
    lr: float = _opt(1e-3, "AdamW learning rate (default 1e-3)", setting=True, type=finite_float)
    max_updates: int = _opt(50, "most updates per class (default 50)", setting=True, type=positive_int)
    stop_accuracy: float = _opt(0.7, "stop at this batch accuracy (default 0.7)", setting=True, type=fraction)
    stop_prob: float = _opt(
        0.0,
        "with validation seeds, also require their mean target probability to reach this before stopping "
        "(default 0: off; the demo uses 0.9)",
        setting=True,
        type=prob_or_off,
    )
    # Decisions on like-for-like numbers (measured on random planted worlds, README "Truth benchmark"):
    # fresh seeds every update, a fixed validation set decides the kept token, the stop and patience.
    patience: int = _opt(
        20,
        "restart (see --restart-words) or stop a class when its best validation loss has not improved for "
        "this many updates (default 20; 0: off)",
        setting=True,
        type=nonneg_int,
    )
    fresh_seeds: bool = _opt(
        True,
        "the paper's fixed inversion seeds instead of fresh seeds at every update (default: fresh)",
        setting=True,
        flag="--fixed-seeds",
        hidden_opposite="--fresh-seeds",
    )
    val_seeds: int = _opt(
        8,
        "fixed validation seeds that decide the kept token, the accuracy stop and patience "
        "(default 8; 0: decide on each update's own batch)",
        setting=True,
        type=nonneg_int,
    )
    eval_every: int = _opt(2, "updates between validations (default 2)", setting=True, type=positive_int)
    restart_words: tuple[str, ...] = _opt(
        ("the",),
        "when patience runs out, restart from these words in turn, keeping the best token "
        "(default 'the'; '' for none)",
        setting=True,
        type=_words,
        metavar="W1,W2",
    )
    attempts: int = _opt(
        1,
        "a class whose inversion ends without reaching the stop is learned again from the init word with new "
        "training seeds, up to this many attempts; the best token over all is kept (default 1)",
        setting=True,
        type=positive_int,
    )
    objective: str = _opt(
        "ce",
        "the inversion's loss: 'ce', the paper's cross-entropy toward the class, or 'meanprob', minus the log of "
        "the mean target probability, which lets the images nearest the class lead (the kept token then decided "
        "by the validation probability); default ce",
        setting=True,
        choices=("ce", "meanprob"),
    )
    max_norm: float = _opt(
        2.0,
        "keep the token's norm at most this many times the vocabulary's mean norm (default 2; 0: no limit)",
        setting=True,
        type=finite_float,
    )
    init_word: str = _opt("a", "one-token word the token starts from (default 'a')", setting=True)
    templates: tuple[str, ...] = _opt(
        PAPER_TEMPLATES,
        "inversion prompt with {} for '<tok> class' (repeatable; default: the paper's three)",
        setting=True,
        flag="--template",
        append=True,
        metavar="TEXT",
    )
    contexts: tuple[str, ...] = _opt(
        DEFAULT_CONTEXTS,
        "generation context with {} for the subject (repeatable; default: photo, statue, snow)",
        setting=True,
        flag="--context",
        append=True,
        metavar="TEXT",
    )
    n_images: int = _opt(16, "seeds per context and variant (default 16)", setting=True, type=positive_int)
    seed: int = _opt(0, "first inversion seed; grids use seed+1000... (default 0)", setting=True, type=int)
    snapshot_every: int = _opt(5, "evolution snapshot period in updates", setting=True, type=positive_int)
    grad_checkpointing: bool = _opt(False, "trade compute for memory in the UNet/VAE")
    tagger: str | None = _opt(
        DEFAULT_TAGGER,
        f"CLIP for attribute tags: open_clip ARCH/TAG, hf:ORG/MODEL, world[:PATH] or none (default {DEFAULT_TAGGER})",
        type=_tagger,
    )
    attributes: str | None = _opt(
        None, 'attribute vocabulary JSON (replaces the shipped one; "mode": "extend" adds)', metavar="FILE"
    )
    alpha: float = _opt(ALPHA, f"false discovery rate of findings (default {ALPHA})", type=rate)
    min_effect: float = _opt(
        MIN_EFFECT,
        f"smallest token-minus-baseline attribute rate to flag (default {MIN_EFFECT})",
        type=fraction,
    )
    explain_images: int = _opt(
        4, "token images per class with captum attributions (default 4)", type=nonneg_int
    )
    gen_batch: int | None = _opt(
        None,
        "images per generator call without gradient: grids and counterfactual prompts (default: the "
        "inversion batch, at least 4); larger is faster on CPU for small images",
        type=positive_int,
    )
    # Counterfactual check: "all" tests every (non-absence) vocabulary attribute of every class with the plain
    # class prompt, so a bias the token did not bring in is still found; "flagged" only the token's flagged
    # attributes (cheaper: the README's truth benchmark measures what it misses).
    confirm: str = _opt(
        "all",
        "counterfactual check of every vocabulary attribute of each class (all: also finds biases the token "
        "did not bring in) or only of the token's flagged ones (cheaper); default all",
        choices=CONFIRM_MODES,
    )
    confirm_seeds: int = _opt(
        8, "seeds per counterfactual prompt, paired across prompts (default 8)", type=int
    )
    confirm_max_seeds: int = _opt(
        0,
        "check again on four times the seeds every attribute the first --confirm-seeds leave open (confirmed, "
        "or an interval reaching 0.10), and so on up to this many (8, 32, 128); only their prompts get the "
        "new seeds (default 0: off)",
        type=int,
    )
    # Measured on twenty-two fresh truth-benchmark seeds (README "Truth benchmark"): with 8 seeds, then 32 for the
    # open attributes (--confirm-max-seeds 32) it confirmed 200 of 218 relied-on planted biases, where the
    # default (8 seeds, unadjusted) confirmed 168 (with the association stage: 1 and 0 unplanted); at 8 seeds alone it
    # is no better (seeds 53, 59: one more plant, one more unplanted). `dct-audit demo --thorough` turns both
    # on; off here because the real vocabulary's check is already 1,536 images per class at 8 seeds. A third
    # stage (--confirm-max-seeds 128) found 4 more of 62 plants and 17 more unplanted attributes: not the default.
    adjust: bool = _opt(
        False,
        "adjust each counterfactual change for the other attributes the generator drew with the prompt "
        "(a least-squares fit over the class's check images); use with --confirm-max-seeds 32",
    )
    # The association stage (association.py): what the check would confirm is drawn with five other classes,
    # and confirmed only when it pulls them toward the class. Measured on the truth benchmark's runs (README
    # "The association stage"): every planted bias the check confirmed passed it, and most unplanted ones failed.
    association: bool = _opt(
        True,
        "skip the association stage: confirm what the class's own images show without drawing other classes "
        "with the attribute (default: drawn)",
        flag="--no-association",
        hidden_opposite="--association",
    )
    discover: bool = _opt(
        False, "after the analysis, open-vocabulary discovery over a concept list (see dct-audit discover)"
    )
    concepts: str | None = _opt(
        None,
        "with --discover: concept list, one per line (concept<TAB>definition); default WordNet",
        metavar="FILE",
    )
    discover_with: str = _opt(
        "{} with {}",
        "with --discover: counterfactual prompt, the class then the concept (default '{} with {}')",
    )
    shard: str | None = _opt(
        None,
        "audit only the K-th of N disjoint class subsets into the run folder (job arrays); then "
        "`dct-audit finish RUN_DIR` analyses all classes",
        metavar="K/N",
    )
    ray: str | None = _opt(
        None,
        "run each class as a Ray task on the cluster at ADDRESS (auto, ray://HOST:10001), or on a local one "
        "without ADDRESS; the run folder must be on a filesystem every worker shares",
        nargs="?",
        const="local",
        metavar="ADDRESS",
    )
    ray_retries: int = _opt(
        2, "with --ray: retries of a class whose worker died (default 2)", type=nonneg_int
    )
    ray_cpus: int | None = _opt(
        None, "with --ray and no ADDRESS: CPUs of the local cluster (default all)", type=positive_int
    )
    ray_task_cpus: int = _opt(
        1, "with --ray: CPUs (and torch threads) per class task (default 1)", type=positive_int
    )
    overwrite: bool = _opt(False, "replace a run folder made with other settings")
    quiet: bool = _opt(False, "no progress bars")
    report: bool = _opt(True, "render the HTML report at the end", cli=False)

    def resolved_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(self.device)
        except RuntimeError:
            raise DctAuditError(
                f"--device '{self.device}' is not a torch device; use auto, cpu or cuda"
            ) from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise DctAuditError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
        return dev

    def check(self) -> None:
        """Reject bad values before any model loads (one line each, with the fix). Every field with a checking
        argparse type or choices is checked by them, so the Python API refuses what the command line does."""
        for f in fields(self):
            check_option(f.name, getattr(self, f.name))
        if self.shard is not None:
            parse_shard(self.shard)
            if self.overwrite:
                raise DctAuditError(
                    "--overwrite cannot be combined with --shard (one shard would delete the others' classes); "
                    "clear the run folder first, then start the shards"
                )
        if self.confirm_seeds < 2:
            raise DctAuditError(
                f"--confirm-seeds must be at least 2 (a paired interval needs two), not {self.confirm_seeds}"
            )
        if self.confirm_max_seeds and self.confirm_max_seeds <= self.confirm_seeds:
            raise DctAuditError(
                f"--confirm-max-seeds must be 0 (off) or more than --confirm-seeds ({self.confirm_seeds}), "
                f"not {self.confirm_max_seeds}"
            )
        if not (self.lr > 0 and self.lr < float("inf")):
            raise DctAuditError(f"--lr must be > 0, not {self.lr}")
        if not 0 <= self.max_norm < float("inf"):
            raise DctAuditError(f"--max-norm must be 0 (no limit) or a positive factor, not {self.max_norm}")
        if self.resolution is not None and (self.resolution < 64 or self.resolution % 8):
            raise DctAuditError(
                f"--resolution must be a multiple of 8 and at least 64, not {self.resolution}"
            )
        if self.name is not None and (Path(self.name).name != self.name or self.name in ("", ".", "..")):
            raise DctAuditError(
                f"--name {self.name!r} must be a plain folder name (no '/' or '..'); use --out for the parent folder"
            )
        if self.adjust and not self.tagger:
            raise DctAuditError(
                "--adjust needs a tagger (it fits on the check images' tags); drop --tagger none"
            )
        if self.adjust and self.confirm != "all":
            raise DctAuditError(
                "--adjust needs --confirm all (it fits on the check images of every attribute); drop --confirm flagged"
            )
        if self.discover:  # discovery's inputs, before the audit it would otherwise follow
            if not self.tagger:
                raise DctAuditError("--discover needs a tagger (its image features); drop --tagger none")
            if self.n_images < 4:
                raise DctAuditError(
                    "--discover needs at least 4 seeds per class (2 to rank, 2 to test); use --n-images 4 or more"
                )
            if self.discover_with.count("{}") != 2:
                raise DctAuditError(
                    f"--discover-with {self.discover_with!r} needs two {{}}: the class, then the concept"
                )
            if self.concepts is not None:
                from .discover import read_concepts

                read_concepts(self.concepts)
        for ctx in self.contexts:
            if ctx.count("{}") != 1:
                raise DctAuditError(
                    f"context {ctx!r} must contain '{{}}' exactly once (where the class goes)"
                )
        try:
            self.invert_config(2).check()
        except ValueError as e:
            raise DctAuditError(str(e)) from None

    def invert_config(self, batch: int) -> InvertConfig:
        """The inversion's settings: every field ``InvertConfig`` shares with the options, and ``batch``."""
        from .invert import InvertConfig

        shared = ({f.name for f in fields(InvertConfig)} & {f.name for f in fields(self)}) - {"batch"}
        values = {k: getattr(self, k) for k in shared}
        values.update(templates=tuple(self.templates), restart_words=tuple(self.restart_words))
        return InvertConfig(**values, batch=batch)

    def default_batch(self, device) -> int | str:
        """``--batch``, ``"auto"`` (resolved once the models are loaded), or 4 on a GPU and 2 on a CPU."""
        if self.batch is not None:
            return self.batch
        return 4 if device.type == "cuda" else 2

    # Settings added after runs were first recorded, with the value those older runs used without naming it:
    # resuming such a run at that value is not a change of settings.
    ADDED_SETTINGS: ClassVar[dict] = {"attempts": 1, "objective": "ce"}

    def settings(self, batch: int | str) -> dict:
        """The options that change results (a resumed run must match them), as JSON values."""
        s = {
            f.name: list(getattr(self, f.name))
            if isinstance(getattr(self, f.name), tuple)
            else getattr(self, f.name)
            for f in fields(self)
            if f.metadata.get("setting")
        }
        s["batch"] = batch
        return s


def check_option(name: str, value) -> None:
    """A ``RunOptions`` field's value checked by its flag's argparse type and choices (one line naming the
    flag): what ``RunOptions.check`` runs on every field, and other commands' Python API on the options
    they share with ``run`` (``--alpha``, ``--min-effect``)."""
    meta = next(f.metadata for f in fields(RunOptions) if f.name == name)
    if value is None or isinstance(value, bool) or not meta.get("cli"):
        return
    flag = meta.get("flag") or "--" + name.replace("_", "-")
    if "choices" in meta and value not in meta["choices"]:
        raise DctAuditError(f"{flag} must be one of {', '.join(meta['choices'])}, not {value!r}")
    if meta.get("type") in _RANGE_TYPES:
        try:
            meta["type"](str(value))
        except argparse.ArgumentTypeError as e:
            raise DctAuditError(f"{flag}: {e}") from None


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with 1 <= K <= N."""
    try:
        k, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise DctAuditError(f"--shard must look like K/N (e.g. 2/8), not {text!r}") from None
    if not 1 <= k <= n:
        raise DctAuditError(f"--shard {text}: K must be between 1 and N")
    return k, n


def shard_classes(targets: list, shard: str | None) -> list:
    """The K-th of N disjoint subsets of ``targets`` (by label index, round robin); all without a shard."""
    if not shard:
        return list(targets)
    k, n = parse_shard(shard)
    ordered = sorted(targets, key=lambda c: c.index)
    return ordered[k - 1 :: n]


# the command line -------------------------------------------------------------------------------------


def add_run_arguments(
    parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None, override: str | None = None
) -> None:
    """One flag per ``RunOptions`` field (``cli=False`` ones excepted), with its default and help.

    ``only``: just these fields (another command's flags that mean what they mean for ``run``). ``override``:
    the flags default to None (not given) and their help is this text: ``dct-audit finish`` changes a
    finished run's analysis options only where they are given, a boolean both ways (``--adjust/--no-adjust``).
    """
    for f in fields(RunOptions):
        meta = dict(f.metadata)
        if not meta.pop("cli") or (only is not None and f.name not in only):
            continue
        meta.pop("setting")
        flag = meta.pop("flag", None) or "--" + f.name.replace("_", "-")
        hidden = meta.pop("hidden_opposite", None)
        own_help = meta.pop("help")
        kw = {"dest": f.name, "help": own_help if override is None else override}
        default = (
            f.default
            if f.default is not MISSING
            else f.default_factory()
            if f.default_factory is not MISSING
            else None
        )
        if meta.pop("append", False):
            kw.update(
                action="append", default=None
            )  # None: the field's default (argparse would append to it)
        elif isinstance(default, bool):
            action = argparse.BooleanOptionalAction if override is not None else None
            if action and hidden:  # both ways, named by the field's true side: --fresh-seeds/--no-fresh-seeds
                flag = hidden
            kw.update(action=action or ("store_false" if default else "store_true"), default=default)
        elif meta.get("required"):
            pass
        else:
            kw["default"] = ",".join(default) if isinstance(default, tuple) else default
        if override is not None:
            kw["default"] = None
            meta.pop("required", None)
        kw.update(meta)
        parser.add_argument(flag, **kw)
        if hidden and override is None:  # the flag that restates the default, accepted and not listed
            parser.add_argument(hidden, dest=f.name, action="store_true", help=argparse.SUPPRESS)


def options_from_args(args: argparse.Namespace) -> RunOptions:
    """``RunOptions`` from a namespace parsed by a parser with :func:`add_run_arguments`."""
    values = {}
    for f in fields(RunOptions):
        if not f.metadata.get("cli"):
            continue
        value = getattr(args, f.name)
        if f.metadata.get("append"):
            if value is None:
                continue
            value = tuple(value)
        values[f.name] = value
    return RunOptions(**values)
