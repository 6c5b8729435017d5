"""The pix2pix-zero teacher on the tiny model: diffusers parity, batches, inversion, guidance."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from p2pz.teacher.directions import compute_direction
from p2pz.teacher.editing import cross_attention_loss, edit_with_guidance, make_scheduler
from p2pz.teacher.images import pil_to_tensor
from p2pz.teacher.inversion import auto_corr_loss, draw_shifts, invert
from p2pz.teacher.pipeline import Pix2PixZero
from p2pz.teacher.presets import DIFFUSERS, OFFICIAL
from p2pz.utils.errors import UserError

STEPS = 5  # enough to exercise every stage; the default run must stay fast on a 2-core CI box


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine: intra-op threads only add contention.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def official(tiny_model_dir):
    return Pix2PixZero.from_pretrained(tiny_model_dir, preset="official", captioner=False)


@pytest.fixture(scope="module")
def cat2dog(official):
    return compute_direction(
        official.tokenizer,
        official.text_encoder,
        ["a photo of a cat", "a cat on a sofa", "a small cat"],
        ["a photo of a dog", "a dog on a sofa", "a small dog"],
        source="cat",
        target="dog",
    )


def picture(seed: int, size: int = 64) -> Image.Image:
    """A smooth random picture (gradients plus a blob), so the VAE latents have structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy = rng.uniform(0.3, 0.7, 2)
    blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.02)
    base = rng.uniform(0, 1, 3)
    img = base + 0.5 * np.stack([xx, yy, blob], -1) * rng.uniform(-1, 1, 3)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


# -------------------------------------------------------------------------------------------------
# Parity with diffusers' StableDiffusionPix2PixZeroPipeline


def _diffusers_pipeline(model_dir):
    from diffusers import DDIMInverseScheduler, DDIMScheduler
    from diffusers.pipelines.deprecated.stable_diffusion_variants.pipeline_stable_diffusion_pix2pix_zero import (  # noqa: E501
        StableDiffusionPix2PixZeroPipeline,
    )

    # Its own copy of the weights: the pipeline swaps the UNet's attention processors for its own.
    pipe = StableDiffusionPix2PixZeroPipeline.from_pretrained(
        model_dir,
        safety_checker=None,
        feature_extractor=None,
        caption_generator=None,
        caption_processor=None,
        inverse_scheduler=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.inverse_scheduler = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_diffusers_preset_matches_diffusers_pipeline(tiny_model_dir, cat2dog):
    ours = Pix2PixZero.from_pretrained(tiny_model_dir, preset="diffusers", captioner=False)
    pipe = _diffusers_pipeline(tiny_model_dir)
    image, caption, seed = picture(0), "a cat sitting on a couch", 3

    [res] = ours.edit(
        [image], [cat2dog], captions=[caption], seeds=[seed], num_steps=STEPS, return_latents=True
    )

    def run_diffusers(seed):
        generator = torch.Generator().manual_seed(seed)
        inv = pipe.invert(caption, image=image, num_inference_steps=STEPS, generator=generator).latents
        edited = pipe(
            caption,
            source_embeds=cat2dog.source_embedding[None],
            target_embeds=cat2dog.target_embedding[None],
            num_inference_steps=STEPS,
            latents=inv,
            negative_prompt=caption,  # the docs' real-image recipe, as the preset
            generator=generator,
            output_type="np",
        ).images[0]
        return inv[0], edited

    inv, theirs = run_diffusers(seed)
    ours_image = ours.decode_latents(res.edited_latent[None])[0]
    assert torch.allclose(res.inverted_latent, inv, atol=1e-4), (res.inverted_latent - inv).abs().max()
    assert np.abs(ours_image - theirs).max() < 1e-4
    assert np.abs(np.asarray(res.edited, np.int16) - np.round(theirs * 255).astype(np.int16)).max() <= 1

    # The comparison has teeth: another seed (VAE sample and roll shifts) changes the result,
    # and the edit does something.
    _, other = run_diffusers(seed + 1)
    assert np.abs(other - theirs).max() > 1e-3
    assert np.abs(np.asarray(res.edited, np.float32) - np.asarray(res.reconstruction, np.float32)).max() > 2


# -------------------------------------------------------------------------------------------------
# Batches


def test_batch_equals_single_runs(official, cat2dog):
    images = [picture(1), picture(2), picture(3)]
    captions = ["a cat on a sofa", "a cat in the grass", "two cats"]
    dog2cat = dataclasses.replace(cat2dog, tensor=-cat2dog.tensor, source="dog", target="cat")
    directions = [cat2dog, dog2cat, cat2dog]
    seeds = [0, 1, 2]
    batch = official.edit(images, directions, captions, seeds, num_steps=STEPS, return_latents=True)
    for i in range(3):
        [single] = official.edit(
            [images[i]], [directions[i]], [captions[i]], [seeds[i]], num_steps=STEPS, return_latents=True
        )
        # Float sums in another order (batched GEMMs pick other kernels) differ by ~1e-7; the
        # random UNet's inversion amplifies that to ~1e-4 (measured up to 7e-4 on edited latents of
        # size ~1-4 on an AMD EPYC). Mixed-up samples would differ by O(1).
        assert torch.allclose(batch[i].inverted_latent, single.inverted_latent, rtol=1e-3, atol=1e-3)
        assert torch.allclose(batch[i].edited_latent, single.edited_latent, rtol=1e-3, atol=2e-3), i
        diff = np.abs(np.asarray(batch[i].edited, np.int16) - np.asarray(single.edited, np.int16))
        assert diff.max() <= 2
        assert batch[i].caption == captions[i] and batch[i].seed == seeds[i] and batch[i].finite
    # Distinct inputs give distinct results (the batch is not one sample repeated).
    assert not torch.allclose(batch[0].edited_latent, batch[2].edited_latent, atol=1e-2)


def test_synthetic_mode_is_seeded(official, cat2dog):
    a = official.edit_synthetic(
        ["a cat", "a cat"], [cat2dog], seeds=[5, 6], num_steps=STEPS, return_latents=True
    )
    [b] = official.edit_synthetic(["a cat"], [cat2dog], seeds=[6], num_steps=STEPS, return_latents=True)
    assert torch.allclose(a[1].edited_latent, b.edited_latent, atol=1e-4)
    assert not torch.allclose(a[0].inverted_latent, a[1].inverted_latent)
    assert a[0].source is a[0].reconstruction and a[0].source.size == (64, 64)
    assert np.asarray(a[0].edited).std() > 0


# -------------------------------------------------------------------------------------------------
# Inversion


def _latents_and_caption(teacher, seed=0):
    latents = teacher.encode_images([picture(seed)], [torch.Generator().manual_seed(seed)])
    return latents, teacher.encode_text(["a cat on a sofa"])


@pytest.mark.parametrize("preset", [OFFICIAL, DIFFUSERS], ids=lambda p: p.name)
def test_inversion_then_reconstruction_returns_to_the_input(tiny_model_dir, preset):
    """DDIM inversion followed by DDIM sampling (no edit) comes back to the image latents.

    A random UNet is no denoiser: its noise prediction jumps with the latent, which no DDIM
    inversion survives. With its output layer scaled down it varies slowly, as a trained model's
    does, which is what DDIM inversion assumes; then a mismatch between the inverse step and the
    sampling step (timesteps, alphas, direction) shows as a large error. The regulariser is off:
    it reshapes the noise on purpose (tested below).
    """
    teacher = Pix2PixZero.from_pretrained(tiny_model_dir, preset=preset, captioner=False)
    with torch.no_grad():
        teacher.unet.conv_out.weight.mul_(0.05)
        teacher.unet.conv_out.bias.mul_(0.05)
    plain = dataclasses.replace(preset, lambda_ac=0.0, lambda_kl=0.0)
    latents, cond = _latents_and_caption(teacher)
    steps = 50
    x_T = invert(teacher.unet, teacher.scheduler_config, latents, cond, plain, [torch.Generator()], steps)
    sched = make_scheduler(teacher.scheduler_config, steps, "cpu")
    x = x_T
    with torch.no_grad():
        for t in sched.timesteps:  # the reference pass of a real-image edit: negative = caption
            x = sched.step(teacher.unet(x, t, encoder_hidden_states=cond).sample, t, x).prev_sample
    rel = float((x - latents).norm() / latents.norm())
    assert rel < 0.1
    # Without the inversion (sampling from noise of the right scale) it lands elsewhere.
    x = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(0)) * x_T.std()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(teacher.unet(x, t, encoder_hidden_states=cond).sample, t, x).prev_sample
    assert float((x - latents).norm() / latents.norm()) > 5 * rel


def normalized_autocorrelation(x: torch.Tensor) -> float:
    """Mean squared correlation coefficient of each channel with its rolls by 1..H/2 (both axes)."""
    x = x - x.mean((-2, -1), keepdim=True)
    var = x.pow(2).mean((-2, -1))
    values = []
    for d in range(1, x.shape[-1] // 2):
        for dim in (-2, -1):
            values.append(((x * x.roll(d, dim)).mean((-2, -1)) / var).pow(2).mean())
    return float(torch.stack(values).mean())


def test_regularisation_lowers_autocorrelation_of_inverted_noise(official):
    latents, cond = _latents_and_caption(official)
    plain = dataclasses.replace(OFFICIAL, lambda_ac=0.0, lambda_kl=0.0)
    args = (official.unet, official.scheduler_config, latents, cond)
    x_reg = invert(*args, OFFICIAL, [torch.Generator().manual_seed(0)], 10)
    x_plain = invert(*args, plain, [torch.Generator().manual_seed(0)], 10)
    assert normalized_autocorrelation(x_reg) < 0.5 * normalized_autocorrelation(x_plain)
    # ... and the pix2pix-zero loss itself, on a fixed draw of shifts.
    shifts = draw_shifts(torch.Generator().manual_seed(1), 4, x_reg.shape[-1], 1)
    unit = lambda x: x / x.std()  # the loss scales with the variance; compare shapes only
    assert auto_corr_loss(unit(x_reg[0]), shifts) < auto_corr_loss(unit(x_plain[0]), shifts)
    # KL regulariser: the regularised noise is closer to unit variance.
    assert abs(float(x_reg.var()) - 1) < abs(float(x_plain.var()) - 1)


# -------------------------------------------------------------------------------------------------
# Cross-attention guidance


def test_guidance_step_lowers_cross_attention_loss(official, cat2dog):
    """One xa-guidance step moves the latent so its maps get closer to the reference maps."""
    latents, cond = _latents_and_caption(official)
    x_T = invert(
        official.unet, official.scheduler_config, latents, cond, OFFICIAL, [torch.Generator()], STEPS
    )
    t = make_scheduler(official.scheduler_config, STEPS, "cpu").timesteps[1]
    ref_embeds = torch.cat([cond, cond])
    edit_embeds = torch.cat([cond, cond + cat2dog.tensor[None]])
    x_ref = torch.cat([x_T, x_T])
    x = x_ref + 0.3 * torch.randn(x_ref.shape, generator=torch.Generator().manual_seed(0))

    def loss_at(x):
        return cross_attention_loss(official.unet, official.maps, x, t, x_ref, ref_embeds, edit_embeds, 1)

    # The gradient the edit pass uses (same processors, same loss).
    official.maps.clear()
    with torch.no_grad(), official.maps.recording(0):
        official.unet(x_ref, t, encoder_hidden_states=ref_embeds)
    x_in = x.clone().requires_grad_(True)
    with official.maps.guiding(0, num_samples=1):
        official.unet(x_in, t, encoder_hidden_states=edit_embeds)
        (grad,) = torch.autograd.grad(official.maps.loss, x_in)
    step = 0.05 / grad.abs().max()  # a small step along the gradient, whatever its scale
    before = loss_at(x)
    assert loss_at(x - step * grad) < before < loss_at(x + step * grad)


def test_guidance_changes_the_edit(official, cat2dog):
    image = picture(4)
    kwargs = dict(captions=["a cat"], seeds=[0], num_steps=STEPS, return_latents=True)
    [free] = official.edit([image], [cat2dog], xa_guidance=0.0, **kwargs)
    [guided] = official.edit([image], [cat2dog], xa_guidance=50.0, **kwargs)
    assert torch.equal(free.inverted_latent, guided.inverted_latent)
    assert not torch.allclose(free.edited_latent, guided.edited_latent, atol=1e-5)


@pytest.fixture(scope="module")
def paper(tiny_model_dir):
    return Pix2PixZero.from_pretrained(tiny_model_dir, preset="paper", captioner=False)


def test_paper_guidance_compares_the_edit_branch_with_the_reference_caption_branch(paper, cat2dog):
    """guided_branch="edit": the loss is M(x, c + Δc) against the *conditional* rows of the
    reference maps (recorded for the CFG pair [neg, c]), and a step against its gradient lowers it."""
    latents, cond = _latents_and_caption(paper)
    x_T = invert(paper.unet, paper.scheduler_config, latents, cond, OFFICIAL, [torch.Generator()], STEPS)
    t = make_scheduler(paper.scheduler_config, STEPS, "cpu").timesteps[1]
    uncond = paper.encode_text([""])
    edit_cond = cond + cat2dog.tensor[None]
    x = x_T + 0.3 * torch.randn(x_T.shape, generator=torch.Generator().manual_seed(0))

    def sliced_loss(x: torch.Tensor) -> torch.Tensor:
        paper.maps.clear()
        with torch.no_grad(), paper.maps.recording(0):
            paper.unet(torch.cat([x_T, x_T]), t, encoder_hidden_states=torch.cat([uncond, cond]))
        with paper.maps.guiding(0, num_samples=1, reference_rows="last_half"):
            paper.unet(x, t, encoder_hidden_states=edit_cond)
            return paper.maps.loss

    # The conditional rows, and not the negative ones, are what it compares against; normalised by
    # the 2 x heads rows of the recorded CFG pair (the official scale), where a pass recorded with the
    # caption alone has heads rows per sample.
    cond_only = cross_attention_loss(paper.unet, paper.maps, x, t, x_T, cond, edit_cond, 1)
    uncond_only = cross_attention_loss(paper.unet, paper.maps, x, t, x_T, uncond, edit_cond, 1)
    with torch.no_grad():
        assert float(sliced_loss(x)) == pytest.approx(cond_only / 2, rel=1e-5)
    assert abs(cond_only - uncond_only) > 1e-3 * cond_only  # the two halves do differ

    x_in = x.clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(sliced_loss(x_in), x_in)
    step = 0.05 / grad.abs().max()
    with torch.no_grad():
        losses = [float(sliced_loss(x + sign * step * grad)) for sign in (-1, 0, 1)]
    assert losses[0] < losses[1] < losses[2]


@pytest.mark.parametrize("batch", [1, 2])
def test_paper_and_official_losses_have_one_scale_on_the_same_maps(batch):
    """The paper preset's loss is the conditional half of the official one at the same scale: on
    maps whose negative branch matches the reference, both losses, and their gradients with respect
    to the edit branch's maps, are equal (the paper preset's step at a given λ is the official one)."""
    from p2pz.teacher.attention import CrossAttentionMaps

    heads, hw, tokens = 4, 6, 5
    g = torch.Generator().manual_seed(batch)
    rows = batch * heads  # rows of one CFG branch, batch-major as head_to_batch_dim lays them out
    reference = torch.rand(2 * rows, hw, tokens, generator=g).softmax(-1)  # [negative; conditional]
    edit_maps = torch.rand(rows, hw, tokens, generator=g).softmax(-1)

    def guided_loss(probs: torch.Tensor, reference_rows: str) -> torch.Tensor:
        maps = CrossAttentionMaps()
        with maps.recording(0):
            maps.observe("layer", reference)
        with maps.guiding(0, num_samples=batch, reference_rows=reference_rows):
            maps.observe("layer", probs)
        return maps.loss

    edit_official = edit_maps.clone().requires_grad_(True)
    official = guided_loss(torch.cat([reference[:rows], edit_official]), "all")  # official: both branches
    edit_paper = edit_maps.clone().requires_grad_(True)
    paper = guided_loss(edit_paper, "last_half")  # paper: the edit branch against the conditional rows
    expected = (edit_maps - reference[rows:]).pow(2).sum() / (2 * heads)  # official: mean over 2 x heads
    torch.testing.assert_close(official.detach(), expected)
    torch.testing.assert_close(paper.detach(), official.detach())
    (g_official,) = torch.autograd.grad(official, edit_official)
    (g_paper,) = torch.autograd.grad(paper, edit_paper)
    torch.testing.assert_close(g_paper, g_official)


def test_paper_preset_edits_differ_from_official_and_batch_like_single_runs(official, paper, cat2dog):
    images, captions, seeds = [picture(5), picture(6)], ["a cat", "a cat on a bed"], [3, 4]
    kwargs = dict(num_steps=STEPS, xa_guidance=50.0, return_latents=True)
    batch = paper.edit(images, [cat2dog, cat2dog], captions, seeds, **kwargs)
    singles = [paper.edit([images[i]], [cat2dog], [captions[i]], [seeds[i]], **kwargs)[0] for i in range(2)]
    for i, single in enumerate(singles):
        assert torch.allclose(batch[i].edited_latent, single.edited_latent, rtol=1e-3, atol=2e-3), i
    [theirs] = official.edit(images[:1], [cat2dog], captions[:1], seeds[:1], **kwargs)
    assert torch.equal(theirs.inverted_latent, singles[0].inverted_latent)  # same inversion ...
    assert not torch.allclose(theirs.edited_latent, singles[0].edited_latent, atol=1e-2)  # ... other step
    assert paper.settings["preset"]["guided_branch"] == "edit"
    assert official.settings["preset"]["guided_branch"] == "negative"


def test_joint_guidance_steps_the_shared_latent_by_both_branches_gradients(official, cat2dog):
    """guided_branch="joint": one edit step is x <- x - λ dL/dx with L the official loss of the pair
    [x, x] under [neg, c + Δc], i.e. the sum of the per-half gradients the official step applies
    separately; both CFG branches then denoise that one latent."""
    unet, maps, config = official.unet, official.maps, official.scheduler_config
    latents, cond = _latents_and_caption(official)
    x_T = invert(unet, config, latents, cond, OFFICIAL, [torch.Generator()], STEPS)
    uncond, direction = official.encode_text([""]), cat2dog.tensor[None]
    edit_embeds = torch.cat([uncond, cond + direction])
    scale, xa = 3.0, 50.0
    sched = make_scheduler(config, 1, "cpu")
    [t] = sched.timesteps

    def pair_loss(x_pair: torch.Tensor) -> torch.Tensor:
        maps.clear()
        with torch.no_grad(), maps.recording(0):
            unet(torch.cat([x_T, x_T]), t, encoder_hidden_states=torch.cat([uncond, cond]))
        with maps.guiding(0, num_samples=1):
            unet(x_pair, t, encoder_hidden_states=edit_embeds)
            return maps.loss

    x_pair = torch.cat([x_T, x_T]).requires_grad_(True)
    (per_half,) = torch.autograd.grad(pair_loss(x_pair), x_pair)
    x_in = x_T - xa * (per_half[:1] + per_half[1:])
    with torch.no_grad():
        eps_neg, eps_edit = unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=edit_embeds).sample.chunk(
            2
        )
    expected = sched.step(eps_neg + scale * (eps_edit - eps_neg), t, x_in).prev_sample

    def steps(branch: str, count: int = 1) -> torch.Tensor:
        out = edit_with_guidance(
            unet, maps, config, x_T, uncond, cond, direction, count, scale, xa, guided_branch=branch
        )
        return out.edited

    joint = steps("joint")
    assert torch.allclose(joint, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(joint, steps("negative"), atol=1e-3)
    # From x_T the negative branch's maps equal their reference (same latent, same embedding), so its
    # gradient is zero and the joint step is the edit branch's alone: the paper preset ("edit") takes
    # the same step only because both divide by the 2 x heads rows of the CFG pair (one loss scale).
    assert torch.allclose(joint, steps("edit"), rtol=1e-4, atol=1e-5)
    # From the second step on the negative half pulls too: two steps tell the three branches apart.
    joint = steps("joint", 2)
    for other in ("negative", "edit"):
        assert not torch.allclose(joint, steps(other, 2), atol=1e-3), other


@pytest.fixture(scope="module")
def joint(tiny_model_dir):
    return Pix2PixZero.from_pretrained(tiny_model_dir, preset="joint", captioner=False)


def test_joint_preset_batches_like_single_runs(joint, cat2dog):
    images, captions, seeds = [picture(5), picture(6)], ["a cat", "a cat on a bed"], [3, 4]
    kwargs = dict(num_steps=STEPS, xa_guidance=50.0, return_latents=True)
    batch = joint.edit(images, [cat2dog, cat2dog], captions, seeds, **kwargs)
    for i in range(2):
        [single] = joint.edit([images[i]], [cat2dog], [captions[i]], [seeds[i]], **kwargs)
        assert torch.allclose(batch[i].edited_latent, single.edited_latent, rtol=1e-3, atol=2e-3), i
    assert joint.settings["preset"]["guided_branch"] == "joint"


def test_shared_vae_noise_makes_the_encoding_a_function_of_the_image(official, joint):
    """``joint`` draws the posterior's noise once for all images; ``official`` per image and seed."""
    image = picture(7)
    seeded = [torch.Generator().manual_seed(s) for s in (1, 2)]
    a, b = (joint.encode_images([image], [g]) for g in seeded)
    assert torch.equal(a, b), "joint: the encoding depends on the seed"
    c, d = (official.encode_images([image], [torch.Generator().manual_seed(s)]) for s in (1, 2))
    assert not torch.equal(c, d), "official: the posterior's noise should follow the seed"
    # ... and the shared draw is a posterior sample, not its mean
    mean = joint.vae.encode(pil_to_tensor([image])).latent_dist.mean * joint.vae.config.scaling_factor
    assert not torch.allclose(a, mean.float())
    assert joint.settings["preset"]["vae_posterior"] == "shared"


# -------------------------------------------------------------------------------------------------
# API surface


def test_settings_and_fingerprint(official, tiny_model_dir):
    import json

    settings = official.settings
    json.dumps(settings)
    assert settings["preset"]["name"] == "official"
    assert settings["preset"]["guidance_scale"] == 5.0 and settings["preset"]["xa_guidance_real"] == 0.1
    assert settings["preset"]["lambda_ac"] == settings["preset"]["lambda_kl"] == 20.0
    assert settings["resolution"] == 64 and settings["guided_layers"] == len(official.guided_layers)
    again = Pix2PixZero.from_pretrained(tiny_model_dir, preset="diffusers", captioner=False)
    assert len(official.fingerprint) == 64 and again.fingerprint == official.fingerprint


def test_only_cross_attention_is_hooked(official):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from p2pz.teacher.attention import CrossAttentionCaptureProcessor

    procs = official.unet.attn_processors
    assert all(isinstance(p, CrossAttentionCaptureProcessor) for n, p in procs.items() if "attn2" in n)
    assert all(isinstance(p, AttnProcessor2_0) for n, p in procs.items() if "attn1" in n)
    assert not any(p.requires_grad for p in official.unet.parameters())


def test_direction_is_cached(official):
    d = official.direction("cat", "dog", num_sentences=20)
    assert official.direction("cat", "dog", num_sentences=20) is d
    assert d.tensor.shape == (77, official.text_encoder.config.hidden_size) and d.norm > 0


def test_bad_arguments(official, cat2dog):
    with pytest.raises(UserError, match="captions"):
        official.edit([picture(0), picture(1)], [cat2dog], captions=["a", "b", "c"])
    with pytest.raises(UserError, match="captioner"):
        official.edit([picture(0)], [cat2dog])  # captioner=False and no caption
    with pytest.raises(UserError, match="preset"):
        Pix2PixZero.from_pretrained("/nonexistent", preset="nope")
    with pytest.raises(UserError, match="does not exist"):
        Pix2PixZero.from_pretrained("/nonexistent/model")
    for value in (float("nan"), float("inf")):  # a NaN scale edited into noise, and exit 0
        with pytest.raises(UserError, match="guidance_scale must be a finite number"):
            official.edit([picture(0)], [cat2dog], captions=["a cat"], guidance_scale=value)
        with pytest.raises(UserError, match="xa_guidance must be a finite number"):
            official.edit([picture(0)], [cat2dog], captions=["a cat"], xa_guidance=value)


def test_captions_come_from_the_bundled_captioner(tiny_model_dir, cat2dog):
    teacher = Pix2PixZero.from_pretrained(tiny_model_dir, preset="official")  # captioner=None
    assert teacher.settings["captioner"] == str(tiny_model_dir / "captioner")
    captions = teacher.caption([picture(0), picture(1)])
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    [res] = teacher.edit([picture(0)], [cat2dog], seeds=[0], num_steps=2)
    assert res.caption == captions[0]
