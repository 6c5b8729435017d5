"""``p2pz generate``: the teacher's mass production of (input, edit) pairs into WebDataset shards.

Stages, in order (each in one place below):

1. settings   — :class:`~p2pz.data.pairs.settings.Settings` (the command line builds it from a YAML
                config and flags, ``p2pz.cli.pairs``);
2. inputs     — folder, shards or synthetic prompts, listed without being read (``p2pz.data.pairs.inputs``);
3. plan       — every (input, edit) item gets a shard number, key and seed (``p2pz.data.pairs.shards``);
4. directions — each edit's direction is computed once (or loaded from a file) and reused;
5. editing    — this task's unfinished shards, inputs in teacher batches, each shard written to a
                temporary file and renamed when complete; a manifest line per shard. The samples'
                format is ``p2pz.data.pairs.sample``. Edits of the same inputs (``--edit cat:dog
                --edit cat:lion``) share each input's inversion and reference pass: their shards over
                the same inputs are made together, one teacher call for all edits of a batch
                (``--no-share-inversion``: each pair on its own, as separate runs).

Re-running the same command after a crash skips finished shards and redoes the rest, which gives
exactly the samples of an uninterrupted run; ``--task-index/--num-tasks`` (or a SLURM array) split
the shards over cluster tasks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from p2pz.data.pairs import sample as fmt
from p2pz.data.pairs import shards as sh
from p2pz.data.pairs.filtering import PairScorer, PairSelection, Scores, parse_keep_if, selection_summary
from p2pz.data.pairs.inputs import FolderInputs, InputSkipped, LoadedInput, ShardInputs, SyntheticInputs
from p2pz.data.pairs.settings import Settings, validate, with_task_split
from p2pz.data.pairs.throughput import Throughput, evals_per_pair, evals_snapshot
from p2pz.teacher.edits import NAME_SEPARATOR, Edit, parse_edit
from p2pz.utils.errors import UserError

if TYPE_CHECKING:  # heavy modules, imported where they are used so that ``p2pz --help`` stays fast
    import torch
    from tqdm import tqdm

    from p2pz.teacher.directions import EditDirection
    from p2pz.teacher.pipeline import EditResult, Pix2PixZero

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = ["a photo of a {source}"]
MAX_CONSECUTIVE_FAILURES = 3

InputSource = FolderInputs | ShardInputs | SyntheticInputs
T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# 2. Inputs


def open_inputs(s: Settings) -> InputSource:
    if s.synthetic:
        return SyntheticInputs(s.prompt or DEFAULT_PROMPTS, s.num_synthetic)
    path = Path(s.inputs)
    if path.is_dir() and not any(path.glob("*.tar")):
        return FolderInputs(path, min_size=s.min_size, convert_modes=s.convert_modes)
    import glob

    from p2pz.data.pairs.reader import list_shards

    if not path.exists() and not glob.has_magic(s.inputs) and "{" not in s.inputs and "://" not in s.inputs:
        raise UserError(f"--inputs {s.inputs} does not exist; give a folder of images or .tar shards")
    if path.is_file() and path.suffix != ".tar":
        raise UserError(f"--inputs {s.inputs} is a file; give a folder of images or .tar shards")
    return ShardInputs(list_shards(s.inputs), min_size=s.min_size, convert_modes=s.convert_modes)


# --------------------------------------------------------------------------------------------------
# 3./4. Edits, their directions and the plan


@dataclass
class EditJob:
    """One edit of the run: its words (``edit``) and its direction, loaded from ``direction_file`` or
    computed by the teacher the first time it is needed, then reused for every shard."""

    edit: Edit
    direction: EditDirection | None = None
    direction_file: str | None = None

    @property
    def name(self) -> str:  # "cat-to-dog"
        return self.edit.name

    @property
    def source(self) -> str:
        return self.edit.source

    @property
    def target(self) -> str:
        return self.edit.target


def resolve_edits(s: Settings) -> list[EditJob]:
    edits = [EditJob(parse_edit(spec)) for spec in s.edit]
    for path in s.direction:
        from p2pz.teacher import EditDirection

        try:
            direction = EditDirection.load(path)
        except FileNotFoundError:
            raise UserError(f"direction file {path} not found") from None
        edits.append(EditJob(_direction_edit(direction, path), direction, str(path)))
    names = [e.name for e in edits]
    if len(set(names)) != len(names):
        raise UserError(f"the same edit is given twice: {', '.join(n for n in names if names.count(n) > 1)}")
    return edits


def _direction_edit(direction: EditDirection, path: str | os.PathLike) -> Edit:
    """The edit a direction file makes: its stored words, else the file name's (``cat-to-dog.pt``)."""
    source, target = getattr(direction, "source", None), getattr(direction, "target", None)
    if not source or not target:
        stem = Path(path).stem
        source, _, target = stem.partition(NAME_SEPARATOR) if NAME_SEPARATOR in stem else (stem, "", "edited")
    return Edit(str(source), str(target))


def ensure_direction(teacher: Pix2PixZero, edit: EditJob, s: Settings) -> EditDirection:
    """The edit's direction, computed by the teacher the first time it is needed, then reused."""
    if edit.direction is None:
        kwargs = {} if s.num_sentences is None else {"num_sentences": s.num_sentences}
        edit.direction = teacher.direction(edit.source, edit.target, seed=s.seed, **kwargs)
    return edit.direction


def keep_directions(out: Path, teacher: Pix2PixZero, edits: Sequence[EditJob], s: Settings) -> None:
    """``out/directions/<edit>.safetensors`` for every edit that has none yet (a dataset made before
    they were kept gets them on a rerun): the directions a student of many edits is conditioned on."""
    for edit in edits:
        path = sh.direction_file(out, edit.name)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            ensure_direction(teacher, edit, s).save(path)


def plan_work(s: Settings, source: InputSource, edits: Sequence[EditJob]) -> list[sh.ShardPlan]:
    """Every (input, edit) pair of the whole job, in shards (the same plan in every task)."""
    inputs = {e.name: source.ids(e.source) for e in edits}
    plans = sh.plan_shards(inputs, s.samples_per_shard, s.seed, share=share_keys(s, source, edits, inputs))
    if not plans:
        raise UserError(
            f"no inputs found in {s.inputs}; put images (PNG, JPEG, ...) or .tar shards of images there"
        )
    return plans


def share_keys(
    s: Settings, source: InputSource, edits: Sequence[EditJob], inputs: dict[str, Sequence[str]]
) -> dict[str, str | None]:
    """Which edits share each input's inversion and reference pass (``--share-inversion``): edits
    whose inputs are the same images (real inputs: all of them; synthetic ones: those with the same
    source word, whose prompts are the same), when there are at least two of them."""
    if not s.share_inversion:
        return {}
    keys: dict[str, str] = {}
    for e in edits:
        key = f"synthetic:{e.source}" if isinstance(source, SyntheticInputs) else "inputs"
        keys[e.name] = key
    counts = {k: sum(1 for e in edits if keys[e.name] == k) for k in set(keys.values())}
    return {name: key if counts[key] > 1 else None for name, key in keys.items()}


def shared_edits(plans: Sequence[sh.ShardPlan]) -> dict[str, list[str]]:
    """Edit name -> the edits it shares its inputs' inversions with (itself included), if any."""
    shared: dict[str, list[str]] = {}
    for group in sh.shard_groups(plans):
        names = list(dict.fromkeys(p.edit for p in group))
        if len(names) > 1:
            for name in names:
                shared[name] = names
    return shared


def teacher_overrides(s: Settings) -> dict[str, Any]:
    """Keyword arguments of every teacher call: the settings that replace the preset's."""
    overrides = {"num_steps": s.steps, "guidance_scale": s.guidance_scale, "xa_guidance": s.xa_guidance}
    kwargs: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    if s.save_latent:
        kwargs["return_latents"] = True
    return kwargs


# --------------------------------------------------------------------------------------------------
# 5. Editing


def _jsonable(value: Any) -> Any:
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


def _recorded_overrides(edit_kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in edit_kwargs.items() if k != "return_latents"}


@dataclass
class Job:
    """What every shard of this run shares."""

    settings: Settings
    teacher: Pix2PixZero
    source: InputSource
    edits: dict[str, EditJob]
    out: Path
    edit_kwargs: dict[str, Any]
    manifest: sh.Manifest
    consecutive_failures: int = 0
    shared: dict[str, list[str]] = field(default_factory=dict)  # see shared_edits()
    evals_per_pair: dict[str, Any] | None = None  # UNet evaluations per pair of this run
    selection: PairSelection | None = None  # scores each pair and keeps those --keep-if accepts


GroupItem = tuple[int, LoadedInput]  # item k of every shard of a group, and its input


def _load_items(
    job: Job, group: Sequence[sh.ShardPlan], skipped: dict[int, list[dict]]
) -> Iterator[GroupItem]:
    """The group's usable inputs (item k of its shards is the same input), in plan order; unusable
    ones go to every shard's ``skipped`` with the reason."""
    first = group[0]
    edit = job.edits[first.edit]
    for k, item in enumerate(first.items):
        try:
            if isinstance(job.source, SyntheticInputs):
                loaded = job.source.load_for(edit.source, item.input_id)
            else:
                loaded = job.source.load(item.input_id)
        except InputSkipped as why:
            for plan in group:
                skipped[plan.index].append({"input": item.input_id, "edit": plan.edit, "reason": str(why)})
            continue
        yield k, loaded


def _batches(iterable: Iterable[T], size: int) -> Iterator[list[T]]:
    batch = []
    for element in iterable:
        batch.append(element)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _run_teacher(
    job: Job, group: Sequence[sh.ShardPlan], batch: list[GroupItem], directions: Sequence[EditDirection]
) -> list[list[EditResult]]:
    """The teacher's results ``[edit][sample]`` for a batch of a group's inputs: every edit of the
    group from one inversion and one reference pass per input."""
    seeds = [group[0].items[k].seed for k, _ in batch]
    edits = [[d] * len(batch) for d in directions]
    if isinstance(job.source, SyntheticInputs):
        return job.teacher.edit_synthetic_shared(
            [loaded.prompt for _, loaded in batch], edits, seeds, **job.edit_kwargs
        )
    captions = [loaded.caption for _, loaded in batch]
    return job.teacher.edit_shared(
        [loaded.image for _, loaded in batch],
        edits,
        captions=captions if any(c is not None for c in captions) else None,
        seeds=seeds,
        **job.edit_kwargs,
    )


def _edit_batch(
    job: Job,
    group: Sequence[sh.ShardPlan],
    batch: list[GroupItem],
    directions: Sequence[EditDirection],
    skipped: dict[int, list[dict]],
) -> list[tuple[int, LoadedInput, list[EditResult]]]:
    """Teacher results for a batch as (k, loaded, results per edit of the group).

    If the teacher raises on a batch, its items are retried one by one so that one bad input costs
    only itself (reported as skipped). Several failures in a row mean the fault is not the inputs'
    (no memory, a broken model): then the error is raised and the job stops.
    """
    try:
        results = _run_teacher(job, group, batch, directions)
        job.consecutive_failures = 0
        return [(k, loaded, [per_edit[j] for per_edit in results]) for j, (k, loaded) in enumerate(batch)]
    except Exception as err:  # noqa: BLE001 - decided below whether it is one input's fault
        if len(batch) > 1:
            log.warning(
                "teacher failed on a batch (%s: %s); retrying its inputs one by one", type(err).__name__, err
            )
        batch_error = err
    triples = []
    for k, loaded in batch:
        try:
            if len(batch) == 1:
                raise batch_error  # already tried alone
            results = [per_edit[0] for per_edit in _run_teacher(job, group, [(k, loaded)], directions)]
        except Exception as err:  # noqa: BLE001
            job.consecutive_failures += 1
            if job.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                raise
            for plan in group:
                skipped[plan.index].append(
                    {
                        "input": plan.items[k].input_id,
                        "edit": plan.edit,
                        "reason": f"teacher error ({type(err).__name__}: {err})",
                    }
                )
            continue
        job.consecutive_failures = 0
        triples.append((k, loaded, results))
    return triples


def sample_meta(
    job: Job,
    plan: sh.ShardPlan,
    item: sh.WorkItem,
    loaded: LoadedInput,
    result: EditResult,
    scores: Scores | None = None,
) -> dict[str, Any]:
    """The ``json`` member of a pair: where it came from and everything that made it."""
    s = job.settings
    edit = job.edits[item.edit]
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
            "overrides": _recorded_overrides(job.edit_kwargs),
        },
        "timings": _jsonable(dict(result.timings or {})),
        "shard": plan.index,
        "task": {"index": s.task_index, "count": s.num_tasks},
    }
    if edit.name in job.shared:  # the inversion, reference pass and seed are the input's, shared
        meta["shared_inversion"] = {"edits": job.shared[edit.name]}
    if loaded.prompt:
        meta["input"]["prompt"] = loaded.prompt
    if scores is not None:
        meta["scores"] = scores
    return meta


def make_sample(
    job: Job,
    plan: sh.ShardPlan,
    item: sh.WorkItem,
    loaded: LoadedInput,
    result: EditResult,
    scores: Scores | None = None,
) -> dict[str, str | bytes]:
    s = job.settings
    reconstruction = getattr(result, "reconstruction", None) if s.save_recon else None
    latent = getattr(result, "inverted_latent", None) if s.save_latent else None
    return fmt.build_sample(
        item.key,
        result.source,
        result.edited,
        sample_meta(job, plan, item, loaded, result, scores),
        reconstruction=reconstruction,
        latent=latent,
    )


def write_result(
    job: Job,
    plan: sh.ShardPlan,
    shard: sh.AtomicShard,
    item: sh.WorkItem,
    loaded: LoadedInput,
    result: EditResult,
    skipped: list[dict],
) -> None:
    """One teacher result into its shard, or into ``skipped`` with the reason it is not kept."""
    if not getattr(result, "finite", True):
        skipped.append(
            {"input": item.input_id, "edit": item.edit, "reason": "teacher output not finite (NaN or inf)"}
        )
        return
    keep, scores = select_pair(job, item, result, skipped)
    if keep:
        shard.write(make_sample(job, plan, item, loaded, result, scores))


def produce_group(
    job: Job, group: Sequence[sh.ShardPlan], todo: set[int], progress: Throughput
) -> list[dict]:
    """Edit a group's inputs (one shard, or the shards of edits that share their inputs) and write
    its shards numbered in ``todo``; returns their manifest records.

    A group whose other shards are finished already is made whole again all the same (the same
    batches, so the same numbers as an uninterrupted run) and only its unfinished shards written.
    """
    directions = [ensure_direction(job.teacher, job.edits[p.edit], job.settings) for p in group]
    skipped: dict[int, list[dict]] = {p.index: [] for p in group}
    started, made = time.perf_counter(), 0
    evals_before = evals_snapshot(job.teacher)
    with contextlib.ExitStack() as stack:
        shards = {
            p.index: stack.enter_context(sh.atomic_shard(job.out, p.index)) for p in group if p.index in todo
        }

        def done() -> int:
            return sum(shards[i].count + len(skipped[i]) for i in shards)

        done_before = 0
        for batch in _batches(_load_items(job, group, skipped), job.settings.batch_size):
            for k, loaded, results in _edit_batch(job, group, batch, directions, skipped):
                made += len(results)
                progress.made(len(results))
                for plan, result in zip(group, results):
                    if plan.index in shards:
                        item = plan.items[k]
                        write_result(job, plan, shards[plan.index], item, loaded, result, skipped[plan.index])
            progress.update(done() - done_before)
            done_before = done()
        progress.update(sum(len(p.items) for p in group if p.index in shards) - done_before)  # trailing skips
        seconds = time.perf_counter() - started
        evals = evals_per_pair(job.teacher, evals_before, made)
        written = sum(shard.count for shard in shards.values())
        records = [
            _shard_record(plan, shards[plan.index], skipped[plan.index], group, seconds, written, evals)
            for plan in group
            if plan.index in shards
        ]
        for record in records:
            record.update(selection_summary(job.selection, [record]))
            # Logged before the renames: a crash in between only repeats this record on the rerun.
            job.manifest.append(record)
    return records


def _shard_record(
    plan: sh.ShardPlan,
    shard: sh.AtomicShard,
    skipped: list[dict],
    group: Sequence[sh.ShardPlan],
    seconds: float,
    group_written: int,
    evals: dict[str, Any] | None,
) -> dict[str, Any]:
    """A shard's manifest record. A shared group's shards were made together: each records its share
    of the group's time (by items, so that the shards' seconds add up to the group's),
    ``group_seconds``, the group's pairs/hour, and the group's shards (``group``)."""
    written = shard.count
    record = {
        "event": "shard",
        "index": plan.index,
        "shard": plan.name,
        "edit": plan.edit,
        "items": len(plan.items),
        "samples": written,
        "skipped": skipped,
        "seconds": round(seconds, 3),
        "pairs_per_hour": round(written / seconds * 3600, 1) if seconds > 0 else None,
    }
    if len(group) > 1:
        share = len(plan.items) / sum(len(p.items) for p in group)
        record["seconds"] = round(seconds * share, 3)
        record["pairs_per_hour"] = round(group_written / seconds * 3600, 1) if seconds > 0 else None
        record["group_seconds"] = round(seconds, 3)
        record["group"] = [p.index for p in group]
    if evals is not None:
        record["unet_evals_per_pair"] = evals
    return record


def select_pair(
    job: Job, item: sh.WorkItem, result: EditResult, skipped: list[dict]
) -> tuple[bool, Scores | None]:
    """The pair's scores (None without a scorer) and whether ``--keep-if`` keeps it; a pair it keeps out
    goes to ``skipped`` with its scores and the clauses it failed (``"rejected": true``)."""
    if job.selection is None:
        return True, None
    edit = job.edits[item.edit].edit
    [scores] = job.selection.score([result.source], [result.edited], edit)
    if job.selection.keeps(scores):
        return True, scores
    failed = " and ".join(job.selection.rule.failed(scores)) if job.selection.rule else ""
    skipped.append(
        {
            "input": item.input_id,
            "edit": item.edit,
            "reason": f"kept out by --keep-if (fails {failed})",
            "rejected": True,
            "scores": scores,
        }
    )
    return False, scores


# --------------------------------------------------------------------------------------------------
# The teacher, the progress bar and the dataset's identity


def _pick_device(s: Settings) -> tuple[str, torch.dtype]:
    from p2pz.utils.devices import resolve_device, resolve_dtype, torch_dtype

    device = resolve_device(s.device)
    return device, torch_dtype(resolve_dtype(s.dtype, device))


def load_teacher(s: Settings) -> Pix2PixZero:
    from p2pz.teacher import Pix2PixZero

    device, dtype = _pick_device(s)
    kwargs: dict[str, Any] = {"preset": s.preset, "device": device, "dtype": dtype}
    if s.captioner is not None:
        kwargs["captioner"] = s.captioner
    return Pix2PixZero.from_pretrained(s.model, **kwargs)


def _progress(total: int, initial: int, enabled: bool, desc: str) -> tqdm:
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


def dataset_identity(
    s: Settings,
    source: InputSource,
    edits: Sequence[EditJob],
    plans: Sequence[sh.ShardPlan],
    teacher: Pix2PixZero,
    edit_kwargs: dict[str, Any],
) -> dict[str, Any]:
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
        "overrides": _recorded_overrides(edit_kwargs),
        "save_recon": s.save_recon,
        "save_latent": s.save_latent,
        "min_size": s.min_size,
        "convert_modes": s.convert_modes,
    } | _sharing_identity(plans)


def _sharing_identity(plans: Sequence[sh.ShardPlan]) -> dict[str, Any]:
    """Shared inversions change seeds and batches: a dataset that shares records which edits do
    (nothing for one that does not, so that datasets made before sharing existed stay resumable)."""
    shared = shared_edits(plans)
    return {"shared_inversion": sorted({tuple(v) for v in shared.values()})} if shared else {}


def _tensor_digest(direction: EditDirection | None) -> str:
    import hashlib

    tensor = getattr(direction, "tensor", None)
    data = (
        tensor.detach().cpu().contiguous().numpy().tobytes()
        if tensor is not None
        else repr(direction).encode()
    )
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------------
# The run: this task's share of the plan


@dataclass
class TaskShare:
    """The shards this task owns, those of them still to write, and the temporaries it cleaned up."""

    owned: list[sh.ShardPlan]
    todo: list[sh.ShardPlan]
    stale_temps_removed: int

    @property
    def pairs(self) -> int:
        return sum(len(p.items) for p in self.owned)

    @property
    def pairs_done_before(self) -> int:
        return self.pairs - sum(len(p.items) for p in self.todo)


def claim_shards(s: Settings, plans: Sequence[sh.ShardPlan], out: Path) -> TaskShare:
    """This task's shards that are not finished yet; their temporaries from a killed run are removed."""
    owned = sh.task_shards(plans, s.task_index, s.num_tasks)
    finished = sh.finished_shards(out)
    todo = [p for p in owned if p.index not in finished]
    stale = sh.remove_stale_temps(out, [p.index for p in todo])
    return TaskShare(owned, todo, stale)


def _start_record(s: Settings, source: InputSource, share: TaskShare) -> dict[str, Any]:
    return {
        "event": "start",
        "task_index": s.task_index,
        "num_tasks": s.num_tasks,
        "shards_owned": len(share.owned),
        "shards_finished_before": len(share.owned) - len(share.todo),
        "stale_temps_removed": share.stale_temps_removed,
        "model": s.model,
        "inputs": source.describe(),
        "pid": os.getpid(),
        "host": os.uname().nodename,
    }


def _produce_shards(job: Job, share: TaskShare) -> tuple[list[dict[str, Any]], float]:
    """Write the unfinished shards under a progress bar; their manifest records and the seconds taken."""
    s = job.settings
    started = time.perf_counter()
    records = []
    desc = f"task {s.task_index}/{s.num_tasks}"
    todo = {p.index for p in share.todo}
    with _progress(share.pairs, share.pairs_done_before, s.progress, desc) as bar:
        progress = Throughput(bar, job.teacher)
        for group in sh.shard_groups(share.owned):
            if any(p.index in todo for p in group):
                records.extend(produce_group(job, group, todo, progress))
        job.evals_per_pair = progress.evals_per_pair()
    return records, time.perf_counter() - started


def pair_selection(s: Settings, scorer: PairScorer | None) -> PairSelection | None:
    """Scoring and ``--keep-if`` of this run, or None when pairs are neither scored nor filtered."""
    if s.keep_if and scorer is None:
        raise UserError(f"--keep-if {s.keep_if!r} needs scores, but no scorer was given (--score none?)")
    if scorer is None:
        return None
    return PairSelection(scorer, parse_keep_if(s.keep_if) if s.keep_if else None)


def _done_record(
    s: Settings, share: TaskShare, records: Sequence[dict], seconds: float, evals: dict[str, Any] | None
) -> dict[str, Any]:
    samples = sum(r["samples"] for r in records)
    done = {
        "event": "done",
        "task_index": s.task_index,
        "num_tasks": s.num_tasks,
        "shards_written": len(records),
        "shards_owned": len(share.owned),
        "samples_written": samples,
        "skipped": sum(len(r["skipped"]) for r in records),
        "seconds": round(seconds, 3),
        "pairs_per_hour": round(samples / seconds * 3600, 1) if seconds > 0 and samples else None,
    }
    if evals is not None:
        done["unet_evals_per_pair"] = evals
    return done


def run(s: Settings, teacher: Pix2PixZero | None = None, scorer: PairScorer | None = None) -> dict[str, Any]:
    """Run (or resume) this task's share of the job; returns the ``done`` manifest record.

    An unset task split means a single task (the command line fills it from SLURM first). ``scorer``
    scores every pair into its ``json`` (``"scores"``), and ``s.keep_if`` keeps only the pairs whose
    scores pass it (``p2pz.data.pairs.filtering``); the command line builds it from ``s.score``.
    """
    s = with_task_split(s, environ={})
    validate(s)
    out = Path(s.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the shards")
    source = open_inputs(s)  # every input is checked before anything is written
    edits = resolve_edits(s)
    plans = plan_work(s, source, edits)
    selection = pair_selection(s, scorer)  # an unknown score name stops here, before the teacher loads
    teacher = teacher if teacher is not None else load_teacher(s)
    edit_kwargs = teacher_overrides(s)
    out.mkdir(parents=True, exist_ok=True)
    identity = dataset_identity(s, source, edits, plans, teacher, edit_kwargs)
    if selection is not None:  # absent otherwise: datasets made before scoring stay resumable
        identity["pair_scores"] = selection.identity()
    sh.check_dataset_identity(out, identity)

    share = claim_shards(s, plans, out)
    manifest = sh.Manifest(out, s.task_index, s.num_tasks)
    manifest.append(_start_record(s, source, share))
    log.info(
        "task %d/%d: %d of %d shards to do (%d finished), %d pairs in all",
        s.task_index,
        s.num_tasks,
        len(share.todo),
        len(share.owned),
        len(share.owned) - len(share.todo),
        share.pairs,
    )
    if s.save_recon and teacher.preset.reference_maps == "inversion":
        log.info("preset %s runs no reference pass: its pairs carry no recon.png", teacher.preset.name)
    job = Job(s, teacher, source, {e.name: e for e in edits}, out, edit_kwargs, manifest, selection=selection)
    job.shared = shared_edits(plans)
    keep_directions(out, teacher, edits, s)
    records, seconds = _produce_shards(job, share)
    done = _done_record(s, share, records, seconds, job.evals_per_pair)
    done.update(selection_summary(selection, records))
    manifest.append(done)
    return done
