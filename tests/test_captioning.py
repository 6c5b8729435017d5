"""Captioning: BLIP in the official and diffusers styles, plugin captioners, clear errors."""

from __future__ import annotations

import json
import sys
import types

import pytest
from PIL import Image

from p2pz.teacher.captioning import DEFAULT_CAPTIONER, Captioner, load_captioner
from p2pz.utils.errors import UserError


def _images():
    gray = Image.linear_gradient("L").resize((40, 24))
    rgba = Image.new("RGBA", (30, 70), (10, 200, 30, 128))
    noise = Image.effect_noise((64, 64), 80).convert("RGB")
    return [gray, rgba, noise]


@pytest.fixture(scope="module")
def blip(tiny_model_dir):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    folder = tiny_model_dir / "captioner"
    return BlipForConditionalGeneration.from_pretrained(folder).eval(), BlipProcessor.from_pretrained(folder)


def _reference(blip, image, prompt, **generate):
    model, proc = blip
    inputs = proc(images=[image.convert("RGB")], text=[prompt], return_tensors="pt")
    return model.generate(**inputs, **generate)[0]


def test_official_style_matches_lavis_settings(tiny_model_dir, blip):
    captioner = load_captioner(tiny_model_dir, preset="official")
    assert isinstance(captioner, Captioner)
    images = _images()
    captions = captioner(images)
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    for image, caption in zip(images, captions):
        ids = _reference(blip, image, "a picture of", num_beams=3, max_length=30, min_length=10)
        assert 10 <= len(ids) <= 30  # LAVIS lengths count the prompt tokens
        full = blip[1].decode(ids, skip_special_tokens=True)
        assert full.startswith("a picture of ")
        assert caption == full[len("a picture of ") :].strip()  # prompt stripped, as the official code


def test_diffusers_style_keeps_prompt(tiny_model_dir, blip):
    captioner = load_captioner(tiny_model_dir / "captioner", preset="diffusers")
    image = _images()[2]
    (caption,) = captioner([image])
    assert caption.startswith("a photography of")
    ids = _reference(blip, image, "a photography of", max_new_tokens=128)
    assert caption == " ".join(blip[1].decode(ids, skip_special_tokens=True).split())


def test_batch_equals_singles(tiny_model_dir):
    captioner = load_captioner(tiny_model_dir)
    images = _images()[1:]
    batch = captioner(images)
    assert batch == [captioner([im])[0] for im in images]
    assert len(set(batch)) > 1  # the tiny captioner looks at the image
    assert captioner([]) == []


PLUGIN = '''
class EchoCaptioner:
    """Names the size of each image; remembers how it was loaded."""

    def __init__(self, folder, style, device, word):
        self.folder, self.style, self.device, self.word = folder, style, device, word

    @classmethod
    def from_pretrained(cls, folder, style="official", device="cpu"):
        import json, pathlib
        word = json.loads((pathlib.Path(folder) / "captioner.json").read_text())["word"]
        return cls(folder, style, device, word)

    def __call__(self, images):
        return [f"a {self.word} of {im.width}x{im.height}" for im in images]
'''


def _install_plugin(monkeypatch, name: str) -> None:
    module = types.ModuleType(name)
    exec(PLUGIN, module.__dict__)
    monkeypatch.setitem(sys.modules, name, module)


def test_plugin_captioner_from_folder_config(tmp_path, monkeypatch):
    _install_plugin(monkeypatch, "p2pz._echo_captioner")  # a captioner class of the p2pz namespace
    folder = tmp_path / "cap"
    folder.mkdir()
    (folder / "captioner.json").write_text(
        json.dumps({"class": "p2pz._echo_captioner:EchoCaptioner", "word": "shape"})
    )
    captioner = load_captioner(folder, preset="diffusers", device="cpu")
    assert captioner([Image.new("RGB", (8, 16))]) == ["a shape of 8x16"]
    assert (captioner.style, str(captioner.folder)) == ("diffusers", str(folder))
    # A model folder whose captioner/ subfolder holds the plugin works too.
    model = tmp_path / "model"
    model.mkdir()
    folder.rename(model / "captioner")
    assert load_captioner(model)([Image.new("RGB", (3, 5))]) == ["a shape of 3x5"]


def test_bad_captioners(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        load_captioner(tmp_path / "missing")
    with pytest.raises(UserError, match="not a captioner folder"):
        load_captioner(tmp_path)
    with pytest.raises(UserError, match="huggingface-cli download Salesforce/blip-image-captioning-base"):
        load_captioner(DEFAULT_CAPTIONER)  # offline and not cached
    with pytest.raises(UserError, match="unknown caption preset"):
        load_captioner(tmp_path, preset="fancy")
    (tmp_path / "captioner.json").write_text(json.dumps({"class": "p2pz.no_such_module_xyz:Thing"}))
    with pytest.raises(UserError, match="cannot be imported"):
        load_captioner(tmp_path)


def test_a_model_folder_cannot_make_us_import_other_code(tmp_path, monkeypatch):
    """captioner.json comes with a model folder from anyone: only p2pz's own classes may be named."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "planted_captioner.py").write_text("raise SystemExit('planted code ran')\n" + PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    for named in ("planted_captioner:EchoCaptioner", "os:system"):
        (tmp_path / "captioner.json").write_text(json.dumps({"class": named}))
        with pytest.raises(UserError, match="must name a class of the p2pz"):
            load_captioner(tmp_path)
    assert "planted_captioner" not in sys.modules
    (tmp_path / "captioner.json").write_text("{not json")
    with pytest.raises(UserError, match="bad captioner config"):
        load_captioner(tmp_path)
