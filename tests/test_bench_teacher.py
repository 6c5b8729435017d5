"""``p2pz bench``'s teacher / student ratio times the teacher as it made the student's pairs."""

from __future__ import annotations

import torch

from p2pz.student import bench


def _package_config(model: str, teacher: dict | None) -> dict:
    """A package's config.json as export writes it (only what the teacher comparison reads)."""
    data = {"edit": {"name": "cat-to-dog", "source": "cat", "target": "dog"}}
    if teacher is not None:
        data["teacher"] = teacher
    return {"resolution": 64, "teacher_model": model, "data": data}


def _spy_on_edits(monkeypatch) -> list[dict]:
    """Record the preset and settings of every real teacher edit (the edit itself still runs)."""
    from p2pz.teacher import Pix2PixZero

    calls: list[dict] = []
    real_edit = Pix2PixZero.edit

    def edit(self, *args, **kwargs):
        steps, xa, cfg = self._resolve(
            kwargs.get("num_steps"), kwargs.get("xa_guidance"), kwargs.get("guidance_scale"), synthetic=False
        )
        calls.append({"preset": self.preset.name, "steps": steps, "cfg": cfg, "xa": xa})
        return real_edit(self, *args, **kwargs)

    monkeypatch.setattr(Pix2PixZero, "edit", edit)
    return calls


def test_teacher_is_timed_with_the_settings_that_made_the_pairs(tiny_model_dir, monkeypatch):
    calls = _spy_on_edits(monkeypatch)
    teacher = {
        "model": str(tiny_model_dir),
        "preset": "joint",
        "overrides": {"num_steps": 2, "guidance_scale": 2.5, "xa_guidance": 7.0},
    }
    student = {"eager": {"1": {"p50_ms": 1.0}}}
    config = _package_config(str(tiny_model_dir), teacher)
    result = bench._teacher_comparison(config, student, None, None, 64, torch.device("cpu"), lambda _m: None)
    assert calls and all(c == {"preset": "joint", "steps": 2, "cfg": 2.5, "xa": 7.0} for c in calls)
    assert result["teacher_preset"] == "joint" and result["teacher_steps"] == 2
    assert result["teacher_guidance_scale"] == 2.5 and result["teacher_xa_guidance"] == 7.0
    assert result["teacher_over_student"] == result["teacher_ms"] / 1.0


def test_settings_not_overridden_are_the_presets(tiny_model_dir, monkeypatch):
    """Pairs made with a preset's own values; --teacher-steps still overrides the steps."""
    from p2pz.teacher.presets import get_preset

    calls = _spy_on_edits(monkeypatch)
    teacher = {"model": str(tiny_model_dir), "preset": "paper", "overrides": {"num_steps": 3}}
    config = _package_config(str(tiny_model_dir), teacher)
    result = bench._teacher_comparison(config, {}, None, 2, 64, torch.device("cpu"), lambda _m: None)
    paper = get_preset("paper")
    expected = {"preset": "paper", "steps": 2, "cfg": paper.guidance_scale, "xa": paper.xa_guidance(False)}
    assert calls and all(c == expected for c in calls)
    assert result["teacher_guidance_scale"] == paper.guidance_scale


def test_pairs_teacher_settings_from_the_package():
    assert bench.pairs_teacher_settings(_package_config("m", None)) == {}
    made = bench.pairs_teacher_settings(
        _package_config("m", {"preset": "joint", "overrides": {"num_steps": 20, "guidance_scale": 3.0}})
    )
    assert made == {"preset": "joint", "steps": 20, "guidance_scale": 3.0, "xa_guidance": None}
