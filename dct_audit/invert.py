"""Inversion: learn one discriminative class token for one class (Schwartz et al., ICCV 2023).

Only one embedding vector is optimised. Each update generates images from fixed seeds with the token
in the prompt, keeps autograd only for the last ``grad_steps`` denoising steps, the decoder and the
classifier, and steps AdamW on the cross-entropy toward the target class (the paper's), or on minus the log of
the mean target probability (``objective="meanprob"``, ``class_loss``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .adapters.classifier import Classifier
from .adapters.generator import Generator
from .options import PAPER_TEMPLATES  # noqa: F401  (the defaults live with the options)

# Seed streams, disjoint by construction: evaluation grids use seed + 1000 + i (i < SEED_STREAM - 1000),
# validation seed + SEED_STREAM + j (j < SEED_STREAM), training seed + 2 * SEED_STREAM + k (k unbounded).
SEED_STREAM = 1_000_000


def val_seed_list(seed: int, n: int) -> list[int]:
    return [seed + SEED_STREAM + j for j in range(n)]


def train_seed(seed: int, k: int) -> int:
    return seed + 2 * SEED_STREAM + k


@dataclass
class InvertConfig:
    """Settings of the inversion loop (the CLI flags of the same names)."""

    steps: int | None = None  # denoising steps; None: the generator family's default
    guidance: float | None = None  # None: the family's default
    grad_steps: int = 1  # last denoising steps with gradient (exact for one-step models)
    batch: int = 2  # seeds per micro-batch
    grad_accum: int = 1  # micro-batches per update (the official code: batch 1, 5 accumulations)
    lr: float = 1e-3
    max_updates: int = 50
    stop_accuracy: float = 0.7
    # With validation seeds, stopping also needs the mean target probability on them to reach this (0: off).
    # Accuracy saturates once the class wins the argmax; the probability keeps rewarding a token that brings
    # in every cue the classifier uses, not only the first sufficient one.
    stop_prob: float = 0.0
    patience: int = 0  # stop when the best loss has not improved for this many updates (0: never)
    fresh_seeds: bool = (
        False  # new seeds at every update (the expected loss over noise) instead of fixed ones
    )
    init_word: str = "a"
    templates: tuple[str, ...] = PAPER_TEMPLATES
    seed: int = 0
    snapshot_every: int = 5
    jump_factor: float = 2.0  # a loss above jump_factor x best moves to fresh seeds
    # Decisions on like-for-like numbers: with val_seeds > 0 the kept token, the accuracy stop and patience
    # are decided on a fixed set of validation seeds (disjoint from training and evaluation seeds), scored
    # every eval_every updates; without, on each update's own training batch (noisy with fresh seeds).
    val_seeds: int = 0
    eval_every: int = 1
    # On patience, start again from the next of these words (fresh optimiser), keeping the best token so
    # far; stop when none is left (without patience, no restart happens). Escapes plateaus where the classifier gives the first start no signal.
    restart_words: tuple[str, ...] = ()
    # Keep the token's norm at most this many times the vocabulary's mean norm (0: no limit): a token far
    # outside the embedding distribution makes the text encoder's output meaningless.
    max_norm: float = 0.0
    # What decides the kept token and patience with validation seeds: "loss" (mean cross-entropy) or "prob"
    # (mean target probability; the "meanprob" objective on the validation images). Mean cross-entropy can fall
    # while every image moves away from the class. None: the one that matches ``objective``.
    select: str | None = None
    # Inversions of a class whose plain images the classifier rarely calls the class can sit on a plateau for
    # the whole budget with one stream of training seeds and escape it with another. An attempt that ends
    # without reaching the stop is followed by a fresh one (the init word again, new training seeds, the same
    # validation seeds), up to this many; the token kept is the best one over all attempts.
    attempts: int = 1
    # The training loss: "ce", the paper's mean cross-entropy toward the class, or "meanprob", minus the log of
    # the mean target probability over the batch, which weighs each image by its probability: the images
    # nearest the class lead, where cross-entropy pushes every image alike (also those that stay far).
    objective: str = "ce"

    @property
    def by_prob(self) -> bool:
        """Whether validation decides by the mean target probability (else by the mean cross-entropy)."""
        return self.select == "prob" or (self.select is None and self.objective == "meanprob")

    def check(self) -> None:
        if self.batch < 1 or self.grad_accum < 1:
            raise ValueError(f"batch ({self.batch}) and grad_accum ({self.grad_accum}) must be >= 1")
        if self.max_updates < 1:
            raise ValueError(f"max_updates must be >= 1, not {self.max_updates}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, not {self.patience}")
        if not 0.0 < self.stop_accuracy <= 1.0:
            raise ValueError(f"stop_accuracy must be in (0, 1], not {self.stop_accuracy}")
        if not 0.0 <= self.stop_prob < 1.0:
            raise ValueError(f"stop_prob must be in [0, 1), not {self.stop_prob}")
        if self.val_seeds < 0 or self.val_seeds >= SEED_STREAM:
            raise ValueError(f"val_seeds must be in [0, {SEED_STREAM}), not {self.val_seeds}")
        if not self.max_norm >= 0:
            raise ValueError(f"max_norm must be >= 0, not {self.max_norm}")
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, not {self.attempts}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, not {self.eval_every}")
        if self.objective not in ("ce", "meanprob"):
            raise ValueError(f"objective must be 'ce' or 'meanprob', not {self.objective!r}")
        if self.select not in (None, "loss", "prob"):
            raise ValueError(f"select must be 'loss' or 'prob', not {self.select!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, not {self.lr}")
        for t in self.templates:
            if t.count("{}") != 1:
                raise ValueError(f"prompt template {t!r} must contain '{{}}' exactly once")


@dataclass
class InversionResult:
    placeholder: str
    vector: torch.Tensor  # (D,) the best token, float32 on CPU
    init_vector: torch.Tensor  # (D,)
    best_update: int
    best_loss: float
    stop_reason: str  # "accuracy" | "patience" | "max_updates"
    restarts: int = 0  # restarts from another init word that were used
    attempts: int = 1  # attempts run (config.attempts at most)
    best_val_accuracy: float | None = None  # validation accuracy of the kept token (with val_seeds)
    history: list[dict] = field(default_factory=list)
    snapshots: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)  # (update, seed, (3, H, W))
    seconds: float = 0.0


def token_prompts(templates: tuple[str, ...], placeholder: str, class_name: str, n: int) -> list[str]:
    """Prompt j (for seed slot j) uses template j mod len(templates)."""
    subject = f"{placeholder} {class_name}" if placeholder else class_name
    return [templates[j % len(templates)].format(subject) for j in range(n)]


def _autocast(device: torch.device, dtype: torch.dtype = torch.float32):
    """Mixed precision at the generator's dtype on CUDA (bf16, or fp16 on GPUs without bf16); none on CPU."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def _val_score(
    generator, classifier, vector_prompts, seeds, target, config, guidance, uncond
) -> tuple[float, float, float]:
    """Mean cross-entropy, accuracy and mean target probability of the current token on the fixed
    validation seeds (no autograd)."""
    losses, hits, probs = [], [], []
    device = generator.device
    with torch.no_grad():
        for i in range(0, len(seeds), config.batch):
            sl = slice(i, i + config.batch)
            with _autocast(device, generator.dtype):
                images = generator.sample(
                    vector_prompts[sl], seeds[sl], config.steps, guidance, uncond=uncond
                )
                logits = classifier(images).float()  # (b, C)
            t = torch.full((len(logits),), target, device=logits.device, dtype=torch.long)
            losses += F.cross_entropy(logits, t, reduction="none").tolist()
            hits += (logits.argmax(-1) == target).tolist()
            probs += logits.softmax(-1)[:, target].tolist()
    return sum(losses) / len(losses), sum(hits) / len(hits), sum(probs) / len(probs)


def class_loss(logits: torch.Tensor, target: torch.Tensor, objective: str = "ce") -> torch.Tensor:
    """The training loss of one batch (``InvertConfig.objective``)."""
    if objective == "ce":
        return F.cross_entropy(logits, target)
    log_p = F.log_softmax(logits, -1).gather(1, target[:, None]).squeeze(1)  # (b,)
    return math.log(len(log_p)) - torch.logsumexp(log_p, 0)  # -log(mean p)


def invert_class(
    generator: Generator,
    classifier: Classifier,
    target: int,
    class_name: str,
    placeholder: str,
    config: InvertConfig,
    progress: Callable[[dict], None] | None = None,
) -> InversionResult:
    """Learn the token for ``target``; returns the best token (lowest validation loss, highest validation
    probability with ``by_prob``, or lowest training loss without validation seeds), not the last one, over up to
    ``config.attempts`` attempts."""
    # 1. Check inputs
    config.check()
    start = time.perf_counter()
    runs: list[tuple[InversionResult, float]] = []
    for attempt in range(config.attempts):
        update0 = sum(len(r.history) for r, _ in runs)
        runs.append(
            _attempt(
                generator, classifier, target, class_name, placeholder, config, progress, attempt, update0
            )
        )
        if runs[-1][0].stop_reason == "accuracy":
            break
    # the attempt that reached the stop, else the best judged score (the same validation seeds for all)
    best, _ = min(runs, key=lambda run: (run[0].stop_reason != "accuracy", run[1]))
    generator.set_token(placeholder, best.vector.to(device=generator.device))
    best.history = [row for r, _ in runs for row in r.history]
    best.restarts = sum(r.restarts for r, _ in runs)
    best.seconds, best.attempts = time.perf_counter() - start, len(runs)
    return best


ATTEMPT_SEEDS = 100_000  # attempt a draws its training seeds from offset a * ATTEMPT_SEEDS


def _attempt(
    generator: Generator,
    classifier: Classifier,
    target: int,
    class_name: str,
    placeholder: str,
    config: InvertConfig,
    progress: Callable[[dict], None] | None,
    attempt: int,
    update0: int,
) -> tuple[InversionResult, float]:
    """One attempt from the init word; update numbers start at ``update0``. Returns the result and its judged
    score (lower is better)."""
    device = generator.device
    start = time.perf_counter()

    # 2. The learned vector: initialised from a word, the only tensor with a gradient
    init = generator.word_vector(config.init_word)
    vector = nn.Parameter(init.clone().to(device))
    generator.set_token(placeholder, vector)
    optimizer = torch.optim.AdamW([vector], lr=config.lr, weight_decay=0.0)
    starts = list(config.restart_words)  # words still to restart from
    vocab_norm = generator.vocab_norm()

    # 3. The unconditional branch is fixed: compute it once for the class
    guidance = generator.spec.default_guidance if config.guidance is None else config.guidance
    uncond = None
    if generator.use_cfg(guidance):
        with torch.no_grad():
            uncond = generator.encode([""])  # (1, 77, D)

    per_update = config.batch * config.grad_accum
    prompts = token_prompts(config.templates, placeholder, class_name, per_update)
    val_seeds = val_seed_list(config.seed, config.val_seeds)
    val_prompts = token_prompts(config.templates, placeholder, class_name, len(val_seeds))
    seed_offset = attempt * ATTEMPT_SEEDS
    best_loss, best_update, last_improved = math.inf, 0, 0
    best_score = math.inf  # what decides: best_loss, or minus the mean target probability (select="prob")
    best_val_accuracy = None
    best_vector = init.clone()
    history: list[dict] = []
    snapshots: list[tuple[int, int, torch.Tensor]] = []
    stop_reason = "max_updates"
    restarts = 0
    target_t = torch.full((config.batch,), target, device=device, dtype=torch.long)
    measure = "probability" if config.by_prob and val_seeds else "loss"  # what patience waits on

    # 4. Updates
    for update in range(config.max_updates):
        t0 = time.perf_counter()
        seeds = [train_seed(config.seed, seed_offset + j) for j in range(per_update)]
        row = {
            "update": update0 + update,
            "seed_offset": seed_offset,
            "lr": optimizer.param_groups[0]["lr"],
            "event": f"attempt {attempt + 1}: from '{config.init_word}' with new seeds"
            if attempt and not update
            else "",
        }

        # 4a. Validation of the current token (the one the step below would change), on fixed seeds
        validated = bool(val_seeds) and (update % config.eval_every == 0)
        if validated:
            val_loss, val_acc, val_prob = _val_score(
                generator, classifier, val_prompts, val_seeds, target, config, guidance, uncond
            )
            row.update(val_loss=val_loss, val_accuracy=val_acc, val_prob=val_prob)

        # 4b. Training batch: loss and gradient
        optimizer.zero_grad(set_to_none=True)
        losses, probs, hits = [], [], []
        first_image = None
        for m in range(config.grad_accum):
            sl = slice(m * config.batch, (m + 1) * config.batch)
            with _autocast(device, generator.dtype):
                images = generator.sample(
                    prompts[sl],
                    seeds[sl],
                    config.steps,
                    guidance,
                    grad_steps=config.grad_steps,
                    uncond=uncond,
                )  # (b, 3, H, W)
                logits = classifier(images).float()  # (b, C)
            loss = class_loss(logits, target_t, config.objective)
            if torch.isfinite(loss):
                (loss / config.grad_accum).backward()
            losses.append(loss.item())
            with torch.no_grad():
                p = logits.softmax(-1)
                probs += p[:, target].tolist()
                hits += (logits.argmax(-1) == target).tolist()
            if first_image is None:
                first_image = images[0].detach().float().cpu()
        loss_value = sum(losses) / len(losses)
        accuracy = sum(hits) / len(hits)
        row.update(
            loss=loss_value, target_prob=sum(probs) / len(probs), accuracy=accuracy, grad_norm=float("nan")
        )
        if update % config.snapshot_every == 0:
            snapshots.append((update0 + update, seeds[0], first_image))

        # 5. Decisions, on validation numbers when there are any, else on this batch
        judged_loss, judged_acc = (
            (row["val_loss"], row["val_accuracy"]) if validated else (loss_value, accuracy)
        )
        judged = -row["val_prob"] if validated and config.by_prob else judged_loss
        decide = validated or not val_seeds
        if not math.isfinite(loss_value):
            vector.data.copy_(best_vector.to(device))
            for g in optimizer.param_groups:
                g["lr"] *= 0.5
            optimizer.state.clear()
            row["event"] = "non-finite loss: restored best token, halved lr"
        else:
            if decide and judged < best_score:
                best_score, best_loss = judged, judged_loss
                best_update, last_improved = update0 + update, update
                best_vector = vector.detach().float().cpu().clone()
                best_val_accuracy = judged_acc if validated else None
            reached = judged_acc >= config.stop_accuracy and (
                not validated or row["val_prob"] >= config.stop_prob
            )
            if decide and reached:
                stop_reason = "accuracy"
                # the accepted token is the one that passed
                best_score, best_loss, best_update = judged, judged_loss, update0 + update
                best_vector = vector.detach().float().cpu().clone()
                best_val_accuracy = judged_acc if validated else None
            elif decide and config.patience and update - last_improved >= config.patience and starts:
                word = starts.pop(0)
                vector.data.copy_(generator.word_vector(word).to(device))
                optimizer = torch.optim.AdamW([vector], lr=config.lr, weight_decay=0.0)
                restarts += 1
                last_improved = update
                seed_offset += per_update
                row["event"] = f"no better {measure} for {config.patience} updates: restart from '{word}'"
            elif decide and config.patience and update - last_improved >= config.patience:
                stop_reason = "patience"
                row["event"] = f"no better {measure} for {config.patience} updates: stopped"
            else:
                if config.fresh_seeds:
                    seed_offset += per_update
                elif not val_seeds and loss_value > config.jump_factor * best_loss:
                    seed_offset += per_update
                    row["event"] = "loss jumped: fresh seeds"
                grad = vector.grad
                if grad is not None and torch.isfinite(grad).all():
                    row["grad_norm"] = grad.norm().item()
                    optimizer.step()
                    if config.max_norm:
                        with torch.no_grad():
                            limit = config.max_norm * vocab_norm
                            norm = vector.norm()
                            if norm > limit:
                                vector.mul_(limit / norm)
                else:
                    row["event"] = "no usable gradient"
        row["seconds"] = time.perf_counter() - t0
        first = ("update", "loss", "target_prob", "accuracy", "seed_offset", "lr", "grad_norm", "event")
        row = {**{k: row[k] for k in first}, **{k: v for k, v in row.items() if k not in first}}
        history.append(row)
        if progress:
            progress(row)
        if stop_reason != "max_updates":  # stopped early: keep the last image in the evolution strip
            if update % config.snapshot_every != 0:
                snapshots.append((update0 + update, seeds[0], first_image))
            break

    # 6. The last step's token has not been judged yet: validate it too
    if stop_reason == "max_updates" and val_seeds and math.isfinite(history[-1]["loss"]):
        val_loss, val_acc, val_prob = _val_score(
            generator, classifier, val_prompts, val_seeds, target, config, guidance, uncond
        )
        history[-1].update(final_val_loss=val_loss, final_val_accuracy=val_acc, final_val_prob=val_prob)
        score = -val_prob if config.by_prob else val_loss
        if score < best_score:
            best_score, best_loss, best_update = score, val_loss, update0 + config.max_updates
            best_vector = vector.detach().float().cpu().clone()
            best_val_accuracy = val_acc

    # 7. Keep the best token, not the last one
    if not math.isfinite(best_loss):
        best_vector = init.clone()
    generator.set_token(placeholder, best_vector.to(device=device))
    result = InversionResult(
        placeholder=placeholder,
        vector=best_vector,
        init_vector=init,
        best_update=best_update,
        best_loss=best_loss,
        stop_reason=stop_reason,
        history=history,
        snapshots=snapshots,
        seconds=time.perf_counter() - start,
        restarts=restarts,
        best_val_accuracy=best_val_accuracy,
    )
    return result, best_score if math.isfinite(best_loss) else math.inf


def save_token(path, placeholder: str, vector: torch.Tensor) -> None:
    """Write ``{placeholder: vector}`` as safetensors: the format ``load_textual_inversion`` reads."""
    from safetensors.torch import save_file

    from .rundir import atomic_write

    tensors = {placeholder: vector.detach().float().cpu().contiguous()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": "pt", "dct_audit": "1"}))


def load_token(path) -> tuple[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if len(tensors) != 1:
        raise ValueError(f"{path} holds {len(tensors)} tensors; a dct-audit token file holds one")
    return next(iter(tensors.items()))
