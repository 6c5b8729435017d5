"""``p2pz generate``: the teacher's mass production of (input, edit) pairs into WebDataset shards.

Stages, in order (each in one place below):

1. settings   — YAML config merged with flags (:func:`resolve_settings`);
2. inputs     — folder, shards or synthetic prompts, listed without being read (``p2pz.data.pairs.inputs``);
3. plan       — every (input, edit) item gets a shard number, key and seed (``p2pz.data.pairs.shards``);
4. directions — each edit's direction is computed once (or loaded from a file) and reused;
5. editing    — this task's unfinished shards, inputs in teacher batches, each shard written to a
                temporary file and renamed when complete; a manifest line per shard.

Re-running the same command after a crash skips finished shards and redoes the rest, which gives
exactly the samples of an uninterrupted run; ``--task-index/--num-tasks`` (or a SLURM array) split
the shards over cluster tasks.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from p2pz.data.pairs import shards as sh
from p2pz.data.pairs.inputs import FolderInputs, InputSkipped, LoadedInput, ShardInputs, SyntheticInputs
from p2pz.teacher.edits import NAME_SEPARATOR, parse_edit
from p2pz.teacher.edits import Edit as EditName

from p2pz.utils.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = ["a photo of a {source}"]


# --------------------------------------------------------------------------------------------------
# 1. Settings: defaults < YAML config < flags


@dataclass
class Settings:
    """Every setting of a generate run; each is a YAML key (``samples_per_shard`` or
    ``samples-per-shard``) and a flag (``--samples-per-shard``)."""

    out: str | None = None
    model: str | None = None
    preset: str = "official"
    edit: list[str] = field(default_factory=list)  # "cat:dog"
    direction: list[str] = field(default_factory=list)  # EditDirection files
    inputs: str | None = None
    synthetic: bool = False
    prompt: list[str] = field(default_factory=list)
    num_synthetic: int = 64
    samples_per_shard: int = 256
    batch_size: int = 4
    seed: int = 0
    steps: int | None = None
    guidance_scale: float | None = None
    xa_guidance: float | None = None
    num_sentences: int | None = None
    captioner: str | None = None
    save_recon: bool = True
    save_latent: bool = False
    min_size: int = 64
    convert_modes: bool = False
    task_index: int | None = None
    num_tasks: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True


HELP = {
    "config": "YAML file whose keys are these flags' names (without --); flags given here win",
    "out": "output folder for pairs-%%06d.tar shards, dataset.json and the manifests",
    "model": "teacher Stable Diffusion: a diffusers folder or a hub id",
    "preset": "teacher preset (default: official, the paper's settings)",
    "edit": "an edit as SOURCE:TARGET words, e.g. cat:dog (repeatable)",
    "direction": "a saved edit direction file instead of words (repeatable)",
    "inputs": "folder of images (recursive), or existing WebDataset shards (folder, glob, brace pattern)",
    "synthetic": "no inputs: the teacher generates each input from a prompt with the source word",
    "prompt": "synthetic prompt template; {source} is replaced by the source word (repeatable; "
    "default 'a photo of a {source}')",
    "num_synthetic": "synthetic inputs per edit (default 64)",
    "samples_per_shard": "pairs per output shard; a crash redoes at most one shard per task (default 256)",
    "batch_size": "inputs per teacher call (default 4)",
    "seed": "global seed; each pair's seed is derived from it and the pair's identity (default 0)",
    "steps": "DDIM steps for inversion and editing (default: the preset's)",
    "guidance_scale": "classifier-free guidance of the edit (default: the preset's)",
    "xa_guidance": "cross-attention guidance weight (default: the preset's)",
    "num_sentences": "sentences per concept for the edit direction (default: the teacher's)",
    "captioner": "captioner for inputs without a caption (default: the teacher's)",
    "save_recon": "store the teacher's reconstruction as recon.png (default: yes)",
    "save_latent": "store the inverted latent as latent.npy (default: no)",
    "min_size": "skip images whose shorter side is below this many pixels (default 64)",
    "convert_modes": "convert CMYK, 16-bit and transparent images (alpha over white) instead of skipping",
    "task_index": "this task's index in a cluster split (default: SLURM_ARRAY_TASK_ID, else 0)",
    "num_tasks": "number of tasks in the split (default: SLURM_ARRAY_TASK_COUNT, else 1)",
    "device": "cpu, cuda, cuda:1 ... (default auto: cuda if available)",
    "dtype": "float32, float16 or bfloat16 (default auto: float16 on cuda, float32 on cpu)",
    "progress": "show a progress bar (default: yes)",
}

METAVARS = {
    "out": "DIR",
    "model": "PATH_OR_ID",
    "preset": "NAME",
    "edit": "SRC:TGT",
    "direction": "FILE",
    "inputs": "DIR_OR_SHARDS",
    "prompt": "TEXT",
    "captioner": "PATH_OR_ID",
    "device": "DEVICE",
    "dtype": "DTYPE",
    "task_index": "I",
    "num_tasks": "N",
}


def add_arguments(parser) -> None:
    """Add every setting as a flag; defaults are left unset so that a config file can supply them."""
    import argparse
    import dataclasses

    parser.add_argument("--config", metavar="YAML", help=HELP["config"])
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELP[f.name])
        elif kind.startswith("list"):
            parser.add_argument(
                flag, action="append", default=None, metavar=METAVARS[f.name], help=HELP[f.name]
            )
        else:
            convert = int if "int" in kind else float if "float" in kind else str
            metavar = METAVARS.get(f.name, "N" if convert is int else "X" if convert is float else "VALUE")
            parser.add_argument(flag, type=convert, default=None, metavar=metavar, help=HELP[f.name])


def resolve_settings(args, environ: dict[str, str] | None = None) -> Settings:
    """Merge the settings: dataclass defaults, then the YAML config, then flags given on the command line."""
    import dataclasses

    values: dict = {}
    if getattr(args, "config", None):
        values.update(_read_config(args.config))
    for f in dataclasses.fields(Settings):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    settings = Settings(**values)
    if settings.task_index is None or settings.num_tasks is None:
        env_split = sh.tasks_from_env(environ)
        if env_split is not None:
            settings.task_index = env_split[0] if settings.task_index is None else settings.task_index
            settings.num_tasks = env_split[1] if settings.num_tasks is None else settings.num_tasks
    settings.task_index = 0 if settings.task_index is None else settings.task_index
    settings.num_tasks = 1 if settings.num_tasks is None else settings.num_tasks
    _validate(settings)
    return settings


def _read_config(path: str) -> dict:
    import dataclasses

    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise UserError(f"cannot read config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise UserError(f"config {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config {path} must be a mapping of setting: value")
    types = {f.name: str(f.type) for f in dataclasses.fields(Settings)}
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name == "edits":  # plural is natural in YAML
            name = "edit"
        if name not in types:
            raise UserError(f"config {path}: unknown setting {key!r}; known: {', '.join(sorted(types))}")
        kind = types[name]
        if kind.startswith("list"):
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list):
                raise UserError(f"config {path}: {key} must be a list")
            value = [str(v) for v in value]
        elif kind == "bool" and not isinstance(value, bool):
            raise UserError(f"config {path}: {key} must be true or false")
        elif value is not None and "int" in kind and kind != "bool":
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserError(f"config {path}: {key} must be an integer")
        elif value is not None and "float" in kind:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise UserError(f"config {path}: {key} must be a number")
            value = float(value)
        elif value is not None and "str" in kind:
            value = str(value)
        values[name] = value
    return values


def _validate(s: Settings) -> None:
    if not s.out:
        raise UserError("give an output folder with --out (or 'out:' in the config)")
    if not s.model:
        raise UserError("give the teacher model with --model (a diffusers folder or hub id)")
    if not s.edit and not s.direction:
        raise UserError("give at least one edit, e.g. --edit cat:dog, or a --direction file")
    if s.synthetic == bool(s.inputs):
        raise UserError("give either --inputs DIR_OR_SHARDS or --synthetic (exactly one)")
    for name in ("samples_per_shard", "batch_size", "num_tasks"):
        if getattr(s, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= s.task_index < s.num_tasks:
        raise UserError(
            f"--task-index {s.task_index} is not in [0, {s.num_tasks}) (--num-tasks {s.num_tasks})"
        )
    if s.steps is not None and s.steps < 1:
        raise UserError("--steps must be at least 1")
    for spec in s.edit:
        parse_edit(spec)  # one-line error for a malformed edit


# --------------------------------------------------------------------------------------------------
# 2. Inputs


def open_inputs(s: Settings):
    if s.synthetic:
        return SyntheticInputs(s.prompt or DEFAULT_PROMPTS, s.num_synthetic)
    path = Path(s.inputs)
    if path.is_dir() and not any(path.glob("*.tar")):
        return FolderInputs(path, min_size=s.min_size, convert_modes=s.convert_modes)
    from p2pz.data.pairs.reader import list_shards

    if path.is_file() and path.suffix != ".tar":
        raise UserError(f"--inputs {s.inputs} is a file; give a folder of images or .tar shards")
    return ShardInputs(list_shards(s.inputs), min_size=s.min_size, convert_modes=s.convert_modes)


# --------------------------------------------------------------------------------------------------
# 3./4. Edits and their directions


@dataclass
class Edit:
    name: str  # "cat-to-dog"
    source: str
    target: str
    direction: object | None = None  # teacher.EditDirection, computed lazily, once
    direction_file: str | None = None


def resolve_edits(s: Settings) -> list[Edit]:
    edits = [Edit(e.name, e.source, e.target) for e in map(parse_edit, s.edit)]
    for path in s.direction:
        from p2pz.teacher import EditDirection

        try:
            direction = EditDirection.load(path)
        except FileNotFoundError:
            raise UserError(f"direction file {path} not found") from None
        source, target = _direction_words(direction, path)
        edits.append(Edit(EditName(source, target).name, source, target, direction, str(path)))
    names = [e.name for e in edits]
    if len(set(names)) != len(names):
        raise UserError(f"the same edit is given twice: {', '.join(n for n in names if names.count(n) > 1)}")
    return edits


def _direction_words(direction, path) -> tuple[str, str]:
    source, target = getattr(direction, "source", None), getattr(direction, "target", None)
    if not source or not target:
        stem = Path(path).stem
        source, _, target = stem.partition(NAME_SEPARATOR) if NAME_SEPARATOR in stem else (stem, "", "edited")
    return str(source), str(target)


def ensure_direction(teacher, edit: Edit, s: Settings):
    """The edit's direction, computed by the teacher the first time it is needed, then reused."""
    if edit.direction is None:
        kwargs = {} if s.num_sentences is None else {"num_sentences": s.num_sentences}
        edit.direction = teacher.direction(edit.source, edit.target, seed=s.seed, **kwargs)
    return edit.direction


# --------------------------------------------------------------------------------------------------
# 5. Editing


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def npy_bytes(tensor) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, tensor.detach().to("cpu").float().numpy(), allow_pickle=False)
    return buffer.getvalue()


def _jsonable(value):
    """Teacher settings/timings as plain JSON values (tensors, paths, dtypes become numbers or text)."""
    import json

    try:
        json.dumps(value)
        return value
    except TypeError:
        pass
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        try:
            return value.item()
        except Exception:
            pass
    return str(value)


@dataclass
class Job:
    """What every shard of this run shares."""

    settings: Settings
    teacher: object
    source: object  # FolderInputs | ShardInputs | SyntheticInputs
    edits: dict[str, Edit]
    out: Path
    edit_kwargs: dict
    manifest: sh.Manifest
    consecutive_failures: int = 0


def _load_items(
    job: Job, plan: sh.ShardPlan, skipped: list[dict]
) -> Iterator[tuple[sh.WorkItem, LoadedInput]]:
    """The shard's usable inputs, in plan order; unusable ones go to ``skipped`` with the reason."""
    edit = job.edits[plan.edit]
    for item in plan.items:
        try:
            if isinstance(job.source, SyntheticInputs):
                loaded = job.source.load_for(edit.source, item.input_id)
            else:
                loaded = job.source.load(item.input_id)
        except InputSkipped as why:
            skipped.append({"input": item.input_id, "edit": item.edit, "reason": str(why)})
            continue
        yield item, loaded


def _batches(iterable, size: int):
    batch = []
    for element in iterable:
        batch.append(element)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _run_teacher(job: Job, batch: list[tuple[sh.WorkItem, LoadedInput]], direction) -> list:
    seeds = [item.seed for item, _ in batch]
    directions = [direction] * len(batch)
    if isinstance(job.source, SyntheticInputs):
        return job.teacher.edit_synthetic(
            [loaded.prompt for _, loaded in batch], directions, seeds, **job.edit_kwargs
        )
    captions = [loaded.caption for _, loaded in batch]
    return job.teacher.edit(
        [loaded.image for _, loaded in batch],
        directions,
        captions=captions if any(c is not None for c in captions) else None,
        seeds=seeds,
        **job.edit_kwargs,
    )


MAX_CONSECUTIVE_FAILURES = 3


def _edit_batch(job: Job, batch, direction, skipped: list[dict]) -> list[tuple]:
    """Teacher results for a batch as (item, loaded, result) triples.

    If the teacher raises on a batch, its items are retried one by one so that one bad input costs
    only itself (reported as skipped). Several failures in a row mean the fault is not the inputs'
    (no memory, a broken model): then the error is raised and the job stops.
    """
    try:
        results = _run_teacher(job, batch, direction)
        job.consecutive_failures = 0
        return [(item, loaded, result) for (item, loaded), result in zip(batch, results)]
    except Exception as err:  # noqa: BLE001 - decided below whether it is one input's fault
        if len(batch) > 1:
            log.warning(
                "teacher failed on a batch (%s: %s); retrying its inputs one by one", type(err).__name__, err
            )
        batch_error = err
    triples = []
    for item, loaded in batch:
        try:
            if len(batch) == 1:
                raise batch_error  # already tried alone
            result = _run_teacher(job, [(item, loaded)], direction)[0]
        except Exception as err:  # noqa: BLE001
            job.consecutive_failures += 1
            if job.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                raise
            skipped.append(
                {
                    "input": item.input_id,
                    "edit": item.edit,
                    "reason": f"teacher error ({type(err).__name__}: {err})",
                }
            )
            continue
        job.consecutive_failures = 0
        triples.append((item, loaded, result))
    return triples


def make_sample(job: Job, plan: sh.ShardPlan, item: sh.WorkItem, loaded: LoadedInput, result) -> dict:
    s = job.settings
    edit = job.edits[item.edit]
    sample = {"__key__": item.key, "src.png": png_bytes(result.source), "edit.png": png_bytes(result.edited)}
    if s.save_recon and getattr(result, "reconstruction", None) is not None:
        sample["recon.png"] = png_bytes(result.reconstruction)
    if s.save_latent and getattr(result, "inverted_latent", None) is not None:
        sample["latent.npy"] = npy_bytes(result.inverted_latent)
    meta = {
        "key": item.key,
        "input": {"kind": job.source.kind, "id": item.input_id},
        "caption": result.caption,
        "edit": {
            "name": edit.name,
            "source": edit.source,
            "target": edit.target,
            **({"direction_file": edit.direction_file} if edit.direction_file else {}),
        },
        "seed": item.seed,
        "global_seed": s.seed,
        "teacher": {
            "model": s.model,
            "preset": s.preset,
            "fingerprint": job.teacher.fingerprint,
            "settings": _jsonable(job.teacher.settings),
            "overrides": {k: v for k, v in job.edit_kwargs.items() if k != "return_latents"},
        },
        "timings": _jsonable(dict(result.timings or {})),
        "shard": plan.index,
        "task": {"index": s.task_index, "count": s.num_tasks},
    }
    if loaded.prompt:
        meta["input"]["prompt"] = loaded.prompt
    sample["json"] = meta
    return sample


def produce_shard(job: Job, plan: sh.ShardPlan, progress) -> dict:
    """Edit one shard's inputs and write the shard; returns its manifest record."""
    edit = job.edits[plan.edit]
    direction = ensure_direction(job.teacher, edit, job.settings)
    skipped: list[dict] = []
    started = time.perf_counter()
    with sh.atomic_shard(job.out, plan.index) as shard:
        done_before = 0
        for batch in _batches(_load_items(job, plan, skipped), job.settings.batch_size):
            for item, loaded, result in _edit_batch(job, batch, direction, skipped):
                if not getattr(result, "finite", True):
                    skipped.append(
                        {
                            "input": item.input_id,
                            "edit": item.edit,
                            "reason": "teacher output not finite (NaN or inf)",
                        }
                    )
                    continue
                shard.write(make_sample(job, plan, item, loaded, result))
            progress.update(shard.count + len(skipped) - done_before)
            done_before = shard.count + len(skipped)
        progress.update(len(plan.items) - done_before)  # trailing skipped inputs
        seconds = time.perf_counter() - started
        record = {
            "event": "shard",
            "index": plan.index,
            "shard": plan.name,
            "edit": plan.edit,
            "items": len(plan.items),
            "samples": shard.count,
            "skipped": skipped,
            "seconds": round(seconds, 3),
            "pairs_per_hour": round(shard.count / seconds * 3600, 1) if seconds > 0 else None,
        }
        # Logged before the rename: a crash in between only repeats this record on the rerun.
        job.manifest.append(record)
    return record


def _pick_device(s: Settings):
    import torch

    device = s.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if s.dtype == "auto":
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    elif s.dtype in dtypes:
        dtype = dtypes[s.dtype]
    else:
        raise UserError(f"--dtype {s.dtype} is not one of auto, {', '.join(dtypes)}")
    return device, dtype


def load_teacher(s: Settings):
    from p2pz.teacher import Pix2PixZero

    device, dtype = _pick_device(s)
    kwargs = {"preset": s.preset, "device": device, "dtype": dtype}
    if s.captioner is not None:
        kwargs["captioner"] = s.captioner
    return Pix2PixZero.from_pretrained(s.model, **kwargs)


def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="pair",
        desc=desc,
        disable=not enabled,
        dynamic_ncols=True,
        smoothing=0.05,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} pairs [{elapsed}<{remaining}{postfix}]",
    )


class _PairsPerHour:
    """Keeps the progress bar's postfix at pairs/hour of this run (restarts excluded)."""

    def __init__(self, bar):
        self.bar, self.start, self.first = bar, time.perf_counter(), bar.n

    def update(self, n: int) -> None:
        if n <= 0:
            return
        self.bar.update(n)
        elapsed = time.perf_counter() - self.start
        rate = (self.bar.n - self.first) / elapsed * 3600 if elapsed > 0 else 0.0
        self.bar.set_postfix_str(f"{rate:,.0f} pairs/h", refresh=False)


def dataset_identity(s: Settings, source, edits: list[Edit], plans, teacher, edit_kwargs: dict) -> dict:
    """Everything that decides the samples' contents (stored as dataset.json, checked on every run).

    Paths are left out (a task may run from another directory); the work plan enters as a digest of
    its keys in shard order, the model as the teacher's fingerprint.
    """
    import hashlib

    keys = "\n".join(f"{p.index} {item.key}" for p in plans for item in p.items)
    return {
        "format": sh.DATASET_FORMAT,
        "inputs": {"kind": source.kind, **({"prompts": source.prompts} if s.synthetic else {})},
        "edits": [
            {"name": e.name, "source": e.source, "target": e.target}
            | ({"direction_sha256": _tensor_digest(e.direction)} if e.direction_file else {})
            for e in edits
        ],
        "num_shards": len(plans),
        "num_items": sum(len(p.items) for p in plans),
        "plan_sha256": hashlib.sha256(keys.encode()).hexdigest(),
        "samples_per_shard": s.samples_per_shard,
        "batch_size": s.batch_size,  # batch composition may change the teacher's numerics
        "seed": s.seed,
        "preset": s.preset,
        "fingerprint": teacher.fingerprint,
        # the model's path and the captioner's may differ between tasks' working directories
        "teacher_settings": {
            k: v for k, v in _jsonable(teacher.settings).items() if k not in ("model", "captioner")
        },
        "overrides": {k: v for k, v in edit_kwargs.items() if k != "return_latents"},
        "save_recon": s.save_recon,
        "save_latent": s.save_latent,
        "min_size": s.min_size,
        "convert_modes": s.convert_modes,
    }


def _tensor_digest(direction) -> str:
    import hashlib

    tensor = getattr(direction, "tensor", None)
    data = (
        tensor.detach().cpu().contiguous().numpy().tobytes()
        if tensor is not None
        else repr(direction).encode()
    )
    return hashlib.sha256(data).hexdigest()


def run(s: Settings, teacher=None) -> dict:
    """Run (or resume) this task's share of the job; returns the ``done`` manifest record.

    ``s`` should come from :func:`resolve_settings`; an unset task split means a single task.
    """
    if s.task_index is None or s.num_tasks is None:
        s = dataclasses.replace(s, task_index=s.task_index or 0, num_tasks=s.num_tasks or 1)
    _validate(s)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    source = open_inputs(s)
    edits = resolve_edits(s)
    plans = sh.plan_shards({e.name: source.ids(e.source) for e in edits}, s.samples_per_shard, s.seed)
    if not plans:
        raise UserError(f"no inputs found in {s.inputs}")
    teacher = teacher if teacher is not None else load_teacher(s)
    edit_kwargs = {
        k: v
        for k, v in {
            "num_steps": s.steps,
            "guidance_scale": s.guidance_scale,
            "xa_guidance": s.xa_guidance,
        }.items()
        if v is not None
    }
    if s.save_latent:
        edit_kwargs["return_latents"] = True

    sh.check_dataset_identity(out, dataset_identity(s, source, edits, plans, teacher, edit_kwargs))

    mine = sh.task_shards(plans, s.task_index, s.num_tasks)
    finished = sh.finished_shards(out)
    todo = [p for p in mine if p.index not in finished]
    stale = sh.remove_stale_temps(out, [p.index for p in todo])
    manifest = sh.Manifest(out, s.task_index, s.num_tasks)
    manifest.append(
        {
            "event": "start",
            "task_index": s.task_index,
            "num_tasks": s.num_tasks,
            "shards_owned": len(mine),
            "shards_finished_before": len(mine) - len(todo),
            "stale_temps_removed": stale,
            "model": s.model,
            "inputs": source.describe(),
            "pid": os.getpid(),
            "host": os.uname().nodename,
        }
    )
    log.info(
        "task %d/%d: %d of %d shards to do (%d finished), %d pairs in all",
        s.task_index,
        s.num_tasks,
        len(todo),
        len(mine),
        len(mine) - len(todo),
        sum(len(p.items) for p in mine),
    )

    job = Job(s, teacher, source, {e.name: e for e in edits}, out, edit_kwargs, manifest)
    total = sum(len(p.items) for p in mine)
    initial = total - sum(len(p.items) for p in todo)
    started = time.perf_counter()
    records = []
    with _progress(total, initial, s.progress, f"task {s.task_index}/{s.num_tasks}") as bar:
        progress = _PairsPerHour(bar)
        for plan in todo:
            records.append(produce_shard(job, plan, progress))
    seconds = time.perf_counter() - started
    samples = sum(r["samples"] for r in records)
    done = {
        "event": "done",
        "task_index": s.task_index,
        "num_tasks": s.num_tasks,
        "shards_written": len(records),
        "shards_owned": len(mine),
        "samples_written": samples,
        "skipped": sum(len(r["skipped"]) for r in records),
        "seconds": round(seconds, 3),
        "pairs_per_hour": round(samples / seconds * 3600, 1) if seconds > 0 and samples else None,
    }
    manifest.append(done)
    return done
