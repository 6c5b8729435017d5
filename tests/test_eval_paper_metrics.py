"""The paper's metrics (CLIP-Acc, BG LPIPS, Structure Dist) on tiny random-weight stand-ins."""

import numpy as np
import pytest
import torch
from PIL import Image

from p2pz.data.eval import paper_metrics as pm
from p2pz.utils.errors import UserError

WORDS = ["a", "photo", "of", "red", "blue", "green"]


def _solid(rgb, size=32):
    return Image.new("RGB", (size, size), rgb)


def _pattern(seed, size=32):
    rng = np.random.default_rng(seed)
    # Smooth-ish structure: a few blocks, so a flip changes token similarities.
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.NEAREST)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny CLIP, briefly trained so that red images match "a photo of a red" and blue ones "... blue"."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from p2pz.data.shapes.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer(WORDS)
    vocab = len(tokenizer)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    colours = {"red": (220, 30, 30), "blue": (35, 60, 225), "green": (30, 170, 40)}
    images = [_solid(rgb) for rgb in colours.values()]
    batch = processor(
        text=[f"a photo of a {w}" for w in colours], images=images, return_tensors="pt", padding=True
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model(**batch, return_loss=True).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dino_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    folder = tmp_path_factory.mktemp("dino") / "tiny-dino"
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


def test_clip_acc_picks_the_matching_class(tiny_clip_dir):
    clip = pm.ClipAccuracy(tiny_clip_dir)
    reds = [_solid((220, 30, 30)), _solid((200, 40, 35))]
    assert clip(reds, source="blue", target="red")["clip_acc"] == 1.0
    assert clip(reds, source="red", target="blue")["clip_acc"] == 0.0
    mixed = [_solid((220, 30, 30)), _solid((35, 60, 225))]
    assert clip(mixed, source="blue", target="red")["clip_acc"] == 0.5


def test_structure_dist_zero_for_identical_and_positive_for_flipped(tiny_dino_dir):
    sd = pm.StructureDistance(tiny_dino_dir, size=32)
    images = [_pattern(1), _pattern(2)]
    same = sd(images, [im.copy() for im in images])
    assert same == pytest.approx([0.0, 0.0], abs=1e-10)
    flipped = sd(images, [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images])
    assert all(d > 1e-6 for d in flipped)
    sim = sd.self_similarity(images)
    tokens = (32 // 8) ** 2 + 1  # patches + CLS
    assert sim.shape == (2, tokens, tokens)
    assert torch.allclose(torch.diagonal(sim, dim1=1, dim2=2), torch.ones(2, tokens), atol=1e-5)


def test_structure_dist_reads_the_last_layers_keys(tiny_dino_dir):
    sd = pm.StructureDistance(tiny_dino_dir, size=32)
    layers = [m for n, m in sd.model.named_modules() if n.endswith(("k_proj", "attention.key"))]
    assert sd.key is layers[-1] and len(layers) == 2


def test_background_lpips_ignores_the_object_only():
    lp = pm.BackgroundLPIPS(backbone="random")
    base = np.asarray(_pattern(3, size=64)).copy()
    changed_inside = base.copy()
    changed_inside[16:48, 16:48] = 255 - changed_inside[16:48, 16:48]
    mask = np.zeros((64, 64), dtype=bool)
    mask[16:48, 16:48] = True
    inside, whole = lp([base, base], [changed_inside, changed_inside], [mask, None])
    assert inside == pytest.approx(0.0, abs=1e-6)
    assert whole > 1e-4
    changed_outside = base.copy()
    changed_outside[:8] = 0
    [outside] = lp([base], [changed_outside], [mask])
    assert outside > 1e-4


def test_background_lpips_needs_real_backbone_weights(tmp_path):
    with pytest.raises(UserError, match="lpips-backbone"):
        pm.BackgroundLPIPS(backbone=tmp_path / "missing.pth")


def test_missing_models_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="huggingface-cli download"):
        pm.StructureDistance("nobody/no-such-dino-model")
    with pytest.raises(UserError, match="does not exist"):
        pm.ClipAccuracy(str(tmp_path / "absent"))


def test_score_paper_metrics_reports_all_three(tiny_clip_dir, tiny_dino_dir):
    reds = [_solid((220, 30, 30), 64), _solid((210, 40, 30), 64)]
    blues = [_solid((35, 60, 225), 64), _solid((40, 50, 220), 64)]
    mask = np.zeros((64, 64), dtype=bool)
    mask[20:40, 20:40] = True
    report = pm.score_paper_metrics(
        reds,
        blues,
        "red",
        "blue",
        object_masks=[mask, None],
        clip=pm.ClipAccuracy(tiny_clip_dir),
        lpips=pm.BackgroundLPIPS(backbone="random"),
        structure=pm.StructureDistance(tiny_dino_dir, size=32),
    )
    assert report["clip_acc"] == 1.0
    assert report["bg_lpips_n"] == 1 and report["bg_lpips"] > 0
    assert report["structure_dist"] >= 0


def test_background_lpips_loads_a_torchvision_state_dict(tmp_path):
    import torchvision

    torch.manual_seed(1)
    alexnet = torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet.pth"
    torch.save(alexnet.state_dict(), path)
    lp = pm.BackgroundLPIPS(backbone=path)
    first_conv = lp.lpips.net.slice1[0].weight
    assert torch.equal(first_conv, alexnet.features[0].weight)
    assert torch.equal(lp.lpips.net.slice5._modules["10"].weight, alexnet.features[10].weight)


def test_eval_pairs_cli_uses_the_papers_metrics_for_real_pairs(tiny_clip_dir, tiny_dino_dir, tmp_path):
    import io
    import json

    import torchvision
    import webdataset as wds

    from p2pz.cli.main import main

    backbone = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), backbone)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    shards = tmp_path / "pairs"
    shards.mkdir()
    with wds.TarWriter(str(shards / "pairs-000000.tar")) as sink:
        for i in range(3):
            sample = {
                "__key__": f"k{i}",
                "json": {"caption": "a photo", "edit": {"source": "red", "target": "blue"}},
            }
            images = {"src.png": _solid((220, 30, 30), 64), "edit.png": _solid((35, 60, 225), 64)}
            images["mask.png"] = Image.fromarray(mask) if i < 2 else None
            for name, image in images.items():
                if image is not None:
                    buf = io.BytesIO()
                    image.save(buf, format="PNG")
                    sample[name] = buf.getvalue()
            sink.write(sample)
    out = tmp_path / "eval"
    rc = main(
        [
            "eval",
            "--pairs",
            str(shards),
            "--out",
            str(out),
            "--metrics",
            "paper",
            "--clip-model",
            str(tiny_clip_dir),
            "--dino-model",
            str(tiny_dino_dir),
            "--lpips-backbone",
            str(backbone),
        ]
    )
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())["metrics"]["red-to-blue"]
    assert m["metrics"] == "paper" and m["n"] == 3
    assert m["clip_acc"] == 1.0 and m["bg_lpips_n"] == 2 and m["structure_dist"] >= 0


def test_background_lpips_blacks_out_the_object_as_pnpinversion():
    """PnPInversion: [0, 1] images times the background mask, then LPIPS on ``2 * image - 1``: the
    object is black (-1), not grey (0), in both images."""
    lp = pm.BackgroundLPIPS(backbone="random")
    base = np.asarray(_pattern(4, size=64)).copy()
    edit = np.asarray(_pattern(5, size=64)).copy()
    mask = np.zeros((64, 64), dtype=bool)
    mask[8:40, 20:56] = True
    [got] = lp([base], [edit], [mask])

    def protocol(image: np.ndarray) -> torch.Tensor:  # the published formula, written out
        unit = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
        return (unit * torch.from_numpy(~mask).float()) * 2 - 1

    x, y = protocol(base), protocol(edit)
    assert float(x[:, 8:40, 20:56].max()) == -1.0  # the object is black in what LPIPS sees
    with torch.no_grad():
        expected = float(lp.lpips(x[None], y[None]).flatten()[0])
    assert got == pytest.approx(expected, rel=1e-5)
    grey = [t * torch.from_numpy(~mask).float() for t in (x, y)]  # the former grey (0) fill differs
    with torch.no_grad():
        assert float(lp.lpips(grey[0][None], grey[1][None]).flatten()[0]) != pytest.approx(got, rel=1e-3)


def test_structure_dist_resizes_like_the_reference_torchvision_resize(tiny_dino_dir):
    """DinoStructureLoss' ``transforms.Resize(224)``: the shorter side to the size, aspect kept,
    bilinear and antialiased (not bicubic to a square)."""
    from torchvision import transforms

    sd = pm.StructureDistance(tiny_dino_dir, size=32)
    normalize = transforms.Normalize(pm.IMAGENET_MEAN, pm.IMAGENET_STD)
    reference = transforms.Compose([transforms.Resize(32), transforms.ToTensor(), normalize])
    rng = np.random.default_rng(0)
    for width, height in [(48, 64), (100, 75), (96, 96)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        ours = sd.preprocess([image])[0]
        theirs = reference(image)
        assert ours.shape == theirs.shape and min(ours.shape[1:]) == 32
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # a non-square pair: tokens on the resized, non-square grid; an identical edit scores zero
    photo = _pattern(6, size=64).resize((64, 48), Image.Resampling.NEAREST)
    tokens = (32 // 8) * (42 // 8) + 1
    assert sd.self_similarity([photo]).shape == (1, tokens, tokens)
    assert sd([photo, _pattern(7)], [photo.copy(), _pattern(7)]) == pytest.approx([0.0, 0.0], abs=1e-10)


def test_lpips_missing_is_one_line_naming_the_extra(monkeypatch):
    """lpips is the [paper] extra (the demo does not need it): without it, one line says how to get it."""
    monkeypatch.setitem(__import__("sys").modules, "lpips", None)  # `import lpips` raises ImportError
    with pytest.raises(UserError, match=r"p2pz-distill\[paper\]"):
        pm.load_lpips("alex", None, flag="--lpips-backbone")
