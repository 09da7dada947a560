"""The DCT loop: it learns, it touches nothing but its vector, it keeps the best token, it survives NaN."""

import dataclasses
import math

import pytest
import torch
from diffusers import StableDiffusionPipeline

from dct_audit.adapters.classifier import load_classifier
from dct_audit.adapters.generator_load import load_generator
from dct_audit.invert import InvertConfig, invert_class, load_token, save_token

TARGET, NAME = 2, "horizontal bar"  # the tiny random classifier starts far from this class (p = 0.08)


@pytest.fixture()
def models(tiny_pipelines, tiny_classifier):
    return load_generator(tiny_pipelines["turbo"]), load_classifier(
        f"file:{tiny_classifier[0]}", tiny_classifier[1]
    )


def _snapshot(*modules):
    return {f"{i}.{n}": p.detach().clone() for i, m in enumerate(modules) for n, p in m.named_parameters()}


def test_inversion_raises_target_probability_and_touches_only_its_vector(models):
    gen, clf = models
    before = _snapshot(gen.unet, gen.vae, gen.text_encoder, clf.model)
    result = invert_class(
        gen, clf, TARGET, NAME, "<dct-1>", InvertConfig(lr=0.2, max_updates=12, stop_accuracy=1.0)
    )
    hist = result.history
    assert len(hist) == 12 and result.stop_reason == "max_updates"
    assert result.best_loss < hist[0]["loss"] - 0.03
    assert max(h["target_prob"] for h in hist) > 1.03 * hist[0]["target_prob"]
    assert not torch.equal(result.vector, result.init_vector)
    after = _snapshot(gen.unet, gen.vae, gen.text_encoder, clf.model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise unchanged
    modules = (gen.unet, gen.vae, gen.text_encoder, clf.model)
    assert all(p.grad is None and not p.requires_grad for m in modules for p in m.parameters())


def test_best_token_is_kept_not_the_last(models):
    gen, clf = models
    config = InvertConfig(lr=0.2, max_updates=8, stop_accuracy=1.0)
    result = invert_class(gen, clf, TARGET, NAME, "<dct-1>", config)
    assert result.best_loss == min(h["loss"] for h in result.history)
    # re-evaluating the kept token on the update's seeds reproduces the recorded best loss
    from dct_audit.invert import token_prompts, train_seed

    row = result.history[result.best_update]
    seeds = [train_seed(config.seed, row["seed_offset"] + j) for j in range(config.batch)]
    with torch.no_grad():
        images = gen.sample(token_prompts(config.templates, "<dct-1>", NAME, config.batch), seeds)
        loss = torch.nn.functional.cross_entropy(clf(images), torch.full((config.batch,), TARGET)).item()
    assert math.isclose(loss, result.best_loss, rel_tol=1e-4)


def test_stops_at_target_accuracy(models):
    gen, clf = models
    result = invert_class(gen, clf, 3, "plate", "<dct-3>", InvertConfig(max_updates=10, stop_accuracy=0.5))
    # the random classifier already calls these images class 3: the loop stops on the first update
    assert result.stop_reason == "accuracy" and len(result.history) == 1


def test_patience_stops_a_class_whose_loss_no_longer_improves(models):
    gen, clf = models
    # a learning rate this small leaves the images, hence the loss, unchanged: no update is ever better
    config = InvertConfig(max_updates=10, stop_accuracy=1.0, lr=1e-12, patience=3)
    result = invert_class(gen, clf, TARGET, NAME, "<dct-1>", config)
    assert result.stop_reason == "patience" and len(result.history) == 4  # updates 0..3
    assert result.best_update == 0 and "stopped" in result.history[-1]["event"]
    assert torch.equal(result.vector, result.init_vector)


def test_fresh_seeds_draw_new_images_at_every_update(models):
    gen, clf = models
    fixed = InvertConfig(max_updates=3, stop_accuracy=1.0, lr=1e-12, jump_factor=1e9)
    fresh = InvertConfig(max_updates=3, stop_accuracy=1.0, lr=1e-12, fresh_seeds=True)
    a = invert_class(gen, clf, TARGET, NAME, "<dct-1>", fixed)
    b = invert_class(gen, clf, TARGET, NAME, "<dct-1>", fresh)
    per_update = fresh.batch * fresh.grad_accum
    assert [r["seed_offset"] for r in a.history] == [0, 0, 0]
    assert [r["seed_offset"] for r in b.history] == [0, per_update, 2 * per_update]
    assert len({round(r["loss"], 6) for r in b.history}) == 3  # other images, other losses
    assert a.history[0]["loss"] == b.history[0]["loss"]  # the same first batch


def test_non_finite_loss_restores_best_and_lowers_lr(models, monkeypatch):
    gen, clf = models
    calls = {"n": 0}
    forward = clf.forward

    def flaky(images):
        calls["n"] += 1
        out = forward(images)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(clf, "forward", flaky)
    result = invert_class(
        gen, clf, TARGET, NAME, "<dct-1>", InvertConfig(lr=0.2, max_updates=5, stop_accuracy=1.0)
    )
    bad = result.history[2]
    assert not math.isfinite(bad["loss"]) and "restored" in bad["event"]
    assert result.history[3]["lr"] == pytest.approx(0.1)
    assert math.isfinite(result.best_loss) and len(result.history) == 5


def test_token_file_round_trip_through_diffusers(models, tiny_pipelines, tmp_path):
    """A plain diffusers pipeline with load_textual_inversion reproduces the audit's images."""
    gen, clf = models
    result = invert_class(
        gen, clf, TARGET, NAME, "<dct-1>", InvertConfig(lr=0.2, max_updates=3, stop_accuracy=1.0)
    )
    path = tmp_path / "token.safetensors"
    save_token(path, "<dct-1>", result.vector)
    name, vec = load_token(path)
    assert name == "<dct-1>" and torch.equal(vec, result.vector)
    with torch.no_grad():
        ours = gen.sample(["a photo of <dct-1> horizontal bar"], [1234])
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_pipelines["turbo"], safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(path), token="<dct-1>")
    theirs = pipe(
        "a photo of <dct-1> horizontal bar",
        num_inference_steps=1,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(1234),
        output_type="pt",
    ).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert not torch.equal(result.vector, result.init_vector)


def test_with_validation_seeds_the_kept_token_is_judged_on_fixed_images(models):
    """The kept token is the one with the lowest loss on the fixed validation seeds, not on a lucky batch."""
    from dct_audit.invert import _val_score, token_prompts, val_seed_list

    gen, clf = models
    config = InvertConfig(
        lr=0.2, max_updates=6, stop_accuracy=1.0, fresh_seeds=True, val_seeds=4, eval_every=2
    )
    result = invert_class(gen, clf, TARGET, NAME, "<dct-1>", config)
    judged = [h["val_loss"] for h in result.history if "val_loss" in h] + [
        result.history[-1]["final_val_loss"]
    ]
    assert len(judged) == 4 and result.best_loss == min(judged)  # updates 0, 2, 4 and the final token
    assert all(("val_loss" in h) == (h["update"] % 2 == 0) for h in result.history)
    # the kept token, scored again on the same validation seeds, gives the recorded loss
    gen.set_token("<dct-1>", result.vector)
    seeds = val_seed_list(config.seed, 4)
    loss, _, prob = _val_score(
        gen, clf, token_prompts(config.templates, "<dct-1>", NAME, 4), seeds, TARGET, config, 0.0, None
    )
    assert math.isclose(loss, result.best_loss, rel_tol=1e-4)
    assert result.best_val_accuracy is not None and 0 < prob < 1
    assert all("val_prob" in h for h in result.history if "val_loss" in h)


def test_patience_restarts_from_the_next_word_then_stops(models):
    gen, clf = models
    # a learning rate this small never improves the validation loss: patience runs out twice
    config = InvertConfig(
        max_updates=20, stop_accuracy=1.0, lr=1e-12, patience=2, val_seeds=2, restart_words=("the",)
    )
    result = invert_class(gen, clf, TARGET, NAME, "<dct-1>", config)
    events = [h["event"] for h in result.history if h["event"]]
    assert events[0] == "no better loss for 2 updates: restart from 'the'" and "stopped" in events[-1]
    assert result.restarts == 1 and result.stop_reason == "patience"
    # no step moved the vector: the kept token is the first word's or the restart word's, whichever
    # validated best
    assert torch.equal(result.vector, result.init_vector) or torch.equal(
        result.vector, gen.word_vector("the")
    )


def test_select_prob_keeps_the_token_of_highest_validation_probability(models, monkeypatch):
    """Mean cross-entropy can fall while the images move away from the class (seen on the truth benchmark:
    validation loss 3.9 -> 2.9 while accuracy fell 0.06 -> 0); select="prob" keeps the most probable token."""
    import dct_audit.invert as inv

    gen, clf = models
    scripted = iter([(3.0, 0.25, 0.30), (2.5, 0.0, 0.10), (2.0, 0.0, 0.05), (1.9, 0.0, 0.04)])
    monkeypatch.setattr(inv, "_val_score", lambda *a: next(scripted))
    config = dict(lr=0.2, max_updates=6, stop_accuracy=1.0, val_seeds=4, eval_every=2)
    by_prob = invert_class(gen, clf, TARGET, NAME, "<dct-1>", InvertConfig(**config, select="prob"))
    assert (by_prob.best_update, by_prob.best_loss, by_prob.best_val_accuracy) == (0, 3.0, 0.25)
    assert torch.equal(by_prob.vector, by_prob.init_vector)
    scripted = iter([(3.0, 0.25, 0.30), (2.5, 0.0, 0.10), (2.0, 0.0, 0.05), (1.9, 0.0, 0.04)])
    by_loss = invert_class(gen, clf, TARGET, NAME, "<dct-2>", InvertConfig(**config))
    assert (by_loss.best_update, by_loss.best_loss) == (6, 1.9)  # the default: the final token's lower loss
    with pytest.raises(ValueError, match="select"):
        InvertConfig(select="accuracy").check()


def test_an_attempt_that_ends_without_the_stop_is_followed_by_a_fresh_one(models):
    """attempts=2: a second attempt from the init word on new training seeds, update numbers continuing, and
    the kept token the best over both on the same validation seeds; an attempt that reaches the stop ends it."""
    from dct_audit.invert import ATTEMPT_SEEDS

    gen, clf = models
    config = InvertConfig(lr=0.2, max_updates=3, stop_accuracy=1.0, val_seeds=2, eval_every=1, attempts=2)
    result = invert_class(gen, clf, TARGET, NAME, "<dct-1>", config)
    hist = result.history
    assert result.attempts == 2 and [h["update"] for h in hist] == list(range(6))
    assert (
        hist[3]["event"] == "attempt 2: from 'a' with new seeds" and hist[3]["seed_offset"] == ATTEMPT_SEEDS
    )
    judged = [h["val_loss"] for h in hist] + [hist[2]["final_val_loss"], hist[5]["final_val_loss"]]
    assert result.best_loss == min(judged)
    one = invert_class(gen, clf, TARGET, NAME, "<dct-2>", dataclasses.replace(config, attempts=1))
    assert one.attempts == 1 and [h["loss"] for h in one.history] == [h["loss"] for h in hist[:3]]
    assert result.best_loss <= one.best_loss  # a second attempt never keeps a worse token


def test_an_attempt_that_reaches_the_stop_is_the_last(models, monkeypatch):
    import dct_audit.invert as inv

    gen, clf = models
    monkeypatch.setattr(inv, "_val_score", lambda *a: (1.0, 1.0, 0.99))  # every validation passes
    config = InvertConfig(max_updates=5, stop_accuracy=0.5, val_seeds=2, attempts=3)
    result = invert_class(gen, clf, TARGET, NAME, "<dct-1>", config)
    assert (result.attempts, result.stop_reason, len(result.history)) == (1, "accuracy", 1)
    with pytest.raises(ValueError, match="attempts"):
        InvertConfig(attempts=0).check()


def test_meanprob_objective_is_minus_log_mean_probability_and_weighs_images_by_it():
    from dct_audit.invert import class_loss

    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-1.0, 4.0, 0.0]], requires_grad=True)
    target = torch.zeros(3, dtype=torch.long)
    p = logits.softmax(-1)[:, 0]
    loss = class_loss(logits, target, "meanprob")
    assert loss.item() == pytest.approx(-math.log(p.mean().item()), rel=1e-6)
    assert class_loss(logits, target, "ce").item() == pytest.approx(-p.log().mean().item(), rel=1e-6)
    loss.backward()
    # d loss / d logit_target = -(1 - p_i) p_i / sum p: the image farthest from the class (last, p = 0.007)
    # barely counts, where cross-entropy (-(1 - p_i) / n) would weigh it most
    g = -logits.grad[:, 0]
    assert g.min() > 0 and g[2] < 0.1 * min(g[0], g[1])
    ce_logits = logits.detach().clone().requires_grad_(True)
    class_loss(ce_logits, target, "ce").backward()
    assert (-ce_logits.grad[:, 0]).argmax() == 2  # cross-entropy steps hardest on the farthest image
    with pytest.raises(ValueError, match="objective"):
        InvertConfig(objective="hinge").check()
    # validation decides by the matching measure unless told otherwise
    assert (InvertConfig().by_prob, InvertConfig(objective="meanprob").by_prob) == (False, True)
    assert not InvertConfig(objective="meanprob", select="loss").by_prob


def test_inversion_with_the_meanprob_objective_raises_target_probability(models):
    gen, clf = models
    config = InvertConfig(lr=0.2, max_updates=8, stop_accuracy=1.0, objective="meanprob")
    result = invert_class(gen, clf, TARGET, NAME, "<dct-1>", config)
    hist = result.history
    assert result.best_loss < hist[0]["loss"] - 0.03
    assert max(h["target_prob"] for h in hist[1:]) > hist[0]["target_prob"]
