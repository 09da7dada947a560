"""``--batch auto``: the largest batch whose inversion update fits the GPU's free memory, by measurement.

One update at batch 1 (prompt encoding, the sampler's gradient steps, the decoder, the classifier, the
backward pass) is run with CUDA's peak-memory counter reset; its peak above what was allocated before is
the cost of one image. The batch is then ``free x headroom / cost``, capped. When not even batch 1 fits,
gradient checkpointing is switched on and the update measured again. On a CPU there is no device memory
to fit: ``auto`` means the CPU default (2), said so in one line.
"""

from __future__ import annotations

import torch

from .errors import DctAuditError

HEADROOM = 0.8  # of the free memory: allocator fragmentation and the grids' larger batches
MAX_AUTO_BATCH = 16
CPU_BATCH = 2


def choose_batch(
    free_bytes: int, per_image_bytes: int, headroom: float = HEADROOM, cap: int = MAX_AUTO_BATCH
) -> int:
    """How many images of ``per_image_bytes`` fit in ``headroom`` of ``free_bytes`` (0 when none)."""
    if per_image_bytes <= 0:
        return cap
    return max(0, min(cap, int(free_bytes * headroom // per_image_bytes)))


def measure_update_bytes(generator, classifier, target: int, class_name: str, opts) -> int:
    """Peak CUDA memory of one inversion update at batch 1, above what was allocated before it."""
    from .invert import PAPER_TEMPLATES, _autocast, token_prompts

    device = generator.device
    placeholder = "<dct-measure>"
    vector = torch.nn.Parameter(generator.word_vector(opts.init_word).to(device))
    generator.set_token(placeholder, vector)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with _autocast(device, generator.dtype):
        images = generator.sample(
            token_prompts(tuple(opts.templates or PAPER_TEMPLATES), placeholder, class_name, 1),
            [0],
            opts.steps,
            opts.guidance,
            grad_steps=opts.grad_steps,
        )
        loss = torch.nn.functional.cross_entropy(
            classifier(images).float(), torch.tensor([target], device=device)
        )
    loss.backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del images, loss, vector
    torch.cuda.empty_cache()
    return int(peak)


def auto_batch(
    generator, classifier, target: int, class_name: str, opts, say=print
) -> tuple[int, bool, dict]:
    """``(batch, gradient checkpointing on, record)`` for ``--batch auto`` (see the module docstring)."""
    device = generator.device
    if device.type != "cuda":
        say(f"--batch auto: no GPU memory to fit on {device.type}; using batch {CPU_BATCH}")
        return CPU_BATCH, False, {"device": device.type, "batch": CPU_BATCH}
    checkpointing = bool(opts.grad_checkpointing)
    for attempt in range(2):
        cost = measure_update_bytes(generator, classifier, target, class_name, opts)
        free, total = torch.cuda.mem_get_info(device)
        batch = choose_batch(free, cost)
        record = {
            "device": torch.cuda.get_device_name(device),
            "free_gb": round(free / 2**30, 2),
            "per_image_gb": round(cost / 2**30, 3),
            "gradient_checkpointing": checkpointing,
            "batch": batch,
        }
        if batch >= 1:
            say(
                f"--batch auto: {batch} (one image's update takes {cost / 2**30:.2f} GB of {free / 2**30:.1f} GB free)"
            )
            return batch, checkpointing, record
        if checkpointing or attempt:
            break
        generator.enable_gradient_checkpointing()
        checkpointing = True
    raise DctAuditError(
        f"--batch auto: one image's update needs {cost / 2**30:.1f} GB, more than the {free / 2**30:.1f} GB free even "
        "with gradient checkpointing; lower --resolution or use a larger GPU"
    )
