"""The settings of a ``p2pz generate`` run: one dataclass, its validation and the cluster task split.

Every field is a flag and a YAML key: ``samples_per_shard`` is ``--samples-per-shard`` on the
command line and ``samples_per_shard:`` (or ``samples-per-shard:``) in a ``--config`` file. The
command's parser (``p2pz.cli.pairs``) is built from this class: the types below are what it checks,
the ``Args:`` of the docstring are the flags' help, a field's ``metavar`` metadata names its value.
Code that runs the job directly (the demo, the benchmarks, the tests) builds a ``Settings`` itself.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from p2pz.data.pairs import shards as sh
from p2pz.data.shapes.edits import check_edit_vocabulary
from p2pz.data.shapes.teacher_settings import xa_guidance_value
from p2pz.teacher.edits import parse_edit
from p2pz.utils import values
from p2pz.utils.devices import dtype_name
from p2pz.utils.errors import UserError


def _value(metavar: str, default=None, *, factory=None):
    """A field whose flag shows ``metavar`` as its value in ``--help``."""
    if factory is not None:
        return field(default_factory=factory, metadata={"metavar": metavar})
    return field(default=default, metadata={"metavar": metavar})


@dataclass
class Settings:
    """Every setting of a ``p2pz generate`` run (the flags' help is the list below).

    Args:
        out: output folder for the pairs-NNNNNN.tar shards, dataset.json and the manifests
        model: teacher Stable Diffusion: a diffusers folder or a hub id
        preset: the teacher's settings (default: official)
        edit: edits as SOURCE:TARGET words, e.g. --edit cat:dog cat:lion (the flag may be repeated; in YAML
            a list, 'edit' or 'edits')
        direction: saved edit direction files instead of words (one or more)
        inputs: folder of images (recursive), or existing WebDataset shards (folder, glob, brace pattern)
        synthetic: no inputs: the teacher generates each input from a prompt with the source word
        prompt: synthetic prompt templates; {source} is replaced by the source word (one or more;
            default 'a photo of a {source}')
        num_synthetic: synthetic inputs per edit
        samples_per_shard: pairs per output shard; a crash redoes at most one shard per task
        batch_size: inputs per teacher call (with edits sharing their inputs, every edit of each: the
            guided pass holds batch_size x edits pairs)
        share_inversion: edits of the same inputs share each input's inversion and reference pass
            (one seed per input); no: every pair on its own, as separate runs would make it
        seed: global seed; each pair's seed is derived from it and the pair's identity
        steps: DDIM steps for inversion and editing (default: the preset's)
        guidance_scale: classifier-free guidance of the edit (default: the preset's)
        xa_guidance: cross-attention guidance weight (default: the preset's), or 'auto': calibrated for
            the edit on its first inputs (p2pz calibrate), the choice written to calibration.json
        num_sentences: sentences per concept for the edit direction (default: the teacher's)
        captioner: captioner for inputs without a caption (default: the teacher's)
        save_recon: store the teacher's reconstruction as recon.png
        save_latent: store the inverted latent as latent.npy
        min_size: skip images whose shorter side is below this many pixels
        convert_modes: convert CMYK, 16-bit and transparent images (alpha over white) instead of skipping
        task_index: this task's index in a cluster split (default: SLURM_ARRAY_TASK_ID, else 0)
        num_tasks: number of tasks in the split (default: SLURM_ARRAY_TASK_COUNT, else 1)
        device: torch device: auto (cuda when present, else cpu), cpu, cuda or cuda:N
        dtype: precision of the teacher: auto, float32, float16 or bfloat16 (fp32, fp16, bf16 accepted;
            auto: float16 on cuda, float32 on cpu)
        progress: show a progress bar (--no-progress: none)
        score: score every pair into its json: world (the shapes world's oracle: success, iou,
            centre_shift_px, ...), paper (CLIP directional score, CLIP target probability, DINO structure
            distance, through --clip-model/--dino-model), none, or auto (world for shapes-world edits)
        keep_if: write only the pairs whose scores pass this rule, e.g. 'success and iou >= 0.8'
            (clauses NAME or NAME OP NUMBER joined by 'and'); the kept fraction goes to the manifest
        clip_model: CLIP for --score paper (default openai/clip-vit-base-patch32; an id or a folder)
        dino_model: DINO ViT for --score paper (default facebook/dino-vitb8; an id or a folder)
    """

    out: str | None = _value("DIR")
    model: str | None = _value("PATH_OR_ID")
    preset: str = _value("NAME", "official")
    edit: list[str] = _value("SRC:TGT", factory=list)
    direction: list[str] = _value("FILE", factory=list)
    inputs: str | None = _value("DIR_OR_SHARDS")
    synthetic: bool = False
    prompt: list[str] = _value("TEXT", factory=list)
    num_synthetic: int = _value("N", 64)
    samples_per_shard: int = _value("N", 256)
    batch_size: int = _value("N", 4)
    share_inversion: bool = True
    seed: int = _value("N", 0)
    steps: int | None = _value("N")
    guidance_scale: float | None = _value("X")
    xa_guidance: float | Literal["auto"] | None = _value("X")
    num_sentences: int | None = _value("N")
    captioner: str | None = _value("PATH_OR_ID")
    save_recon: bool = True
    save_latent: bool = False
    min_size: int = _value("PX", 64)
    convert_modes: bool = False
    task_index: int | None = _value("I")
    num_tasks: int | None = _value("N")
    device: str = _value("DEVICE", "auto")
    dtype: str = _value("DTYPE", "auto")
    progress: bool = True
    # pair scores and the keep rule (p2pz.data.pairs.filtering; the scorer is built by the command line)
    score: str = _value("KIND", "auto")
    keep_if: str | None = _value("RULE")
    clip_model: str | None = _value("PATH_OR_ID")
    dino_model: str | None = _value("PATH_OR_ID")


def with_task_split(s: Settings, environ: Mapping[str, str] | None = None) -> Settings:
    """``s`` with its task split complete: unset values come from a SLURM array job's environment
    (``SLURM_ARRAY_TASK_ID``/``_COUNT``), else a single task (index 0 of 1)."""
    task_index, num_tasks = s.task_index, s.num_tasks
    if task_index is None or num_tasks is None:
        from_env = sh.tasks_from_env(None if environ is None else dict(environ))
        if from_env is not None:
            task_index = from_env[0] if task_index is None else task_index
            num_tasks = from_env[1] if num_tasks is None else num_tasks
    return dataclasses.replace(
        s,
        task_index=0 if task_index is None else task_index,
        num_tasks=1 if num_tasks is None else num_tasks,
    )


def validate(s: Settings) -> None:
    """Raise a one-line :class:`UserError` for settings that cannot make a dataset."""
    if not s.out:
        raise UserError("give an output folder with --out (or 'out:' in the config)")
    if not s.model:
        raise UserError("give the teacher model with --model (a diffusers folder or hub id)")
    if not s.edit and not s.direction:
        raise UserError("give at least one edit, e.g. --edit cat:dog, or a --direction file")
    if s.synthetic == bool(s.inputs):
        raise UserError("give either --inputs DIR_OR_SHARDS or --synthetic (exactly one)")
    _validate_ranges(s)
    if not 0 <= s.task_index < s.num_tasks:
        raise UserError(
            f"--task-index {s.task_index} is not in [0, {s.num_tasks}) (--num-tasks {s.num_tasks})"
        )
    for spec in s.edit:  # one-line error for a malformed edit or a word a world model never learned
        check_edit_vocabulary(parse_edit(spec), s.model)
    _validate_selection(s)


# Each number's range, by the one definition of its kind (p2pz.utils.values); None stands for the default.
RANGES = {
    "num_synthetic": values.positive_int,
    "samples_per_shard": values.positive_int,
    "batch_size": values.positive_int,
    "seed": values.non_negative_int,
    "steps": values.positive_int,
    "guidance_scale": values.non_negative_float,
    "xa_guidance": xa_guidance_value,
    "num_sentences": values.positive_int,
    "min_size": values.non_negative_int,
    "task_index": values.non_negative_int,
    "num_tasks": values.positive_int,
}


def _validate_ranges(s: Settings) -> None:
    """Every number in its range, ``--device`` a device and ``--dtype`` a precision, as the other
    commands check their flags: one line, ``argument --batch-size: must be >= 1, got 0``."""
    checks = {**RANGES, "device": values.device_name, "dtype": lambda v: dtype_name(v, allow_auto=True)}
    for name, check in checks.items():
        value = getattr(s, name)
        if value is None:
            continue
        try:
            check(value)
        except argparse.ArgumentTypeError as err:
            raise UserError(f"argument --{name.replace('_', '-')}: {err}") from None


def _validate_selection(s: Settings) -> None:
    from p2pz.data.pairs.filtering import SCORER_KINDS, parse_keep_if

    if s.score not in SCORER_KINDS:
        raise UserError(f"--score {s.score!r} is not one of {', '.join(SCORER_KINDS)}")
    if s.keep_if is not None:
        parse_keep_if(s.keep_if)  # one-line error for a rule that does not parse
        if s.score == "none":
            raise UserError("--keep-if needs scores: drop --score none (or pick world or paper)")
