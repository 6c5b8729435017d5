"""The shard layout of a generated dataset: work plan, task split, crash-safe writing, manifest.

A dataset is a folder of ``pairs-%06d.tar`` WebDataset shards plus ``dataset.json`` (what made it),
one ``manifest-TTTTT-of-NNNNN.jsonl`` per cluster task (what each task did) and
``directions/<edit>.safetensors``: each edit's direction, with the mean embeddings it came from (what
a student of many edits is conditioned on).

Why the plan is computed before any image is read: every (input, edit) work item gets its shard
number, sample key and seed from the *listing* of inputs alone, so

- a restart after ``kill -9`` redoes exactly the unfinished shards (a shard exists under its final
  name only once it is complete: it is written to a hidden temporary file and renamed when closed);
- a cluster split hands whole shards to tasks (shard ``i`` belongs to task ``i % num_tasks``), so the
  union over any number of tasks is the single-task dataset, shard for shard;
- per-sample seeds come from the global seed and the item's identity, never from batch position.

A shard holds work items of one edit only, so a per-edit student can pick its shards by edit.

Edits of the same inputs may **share** each input's inversion and reference pass: their shards
covering the same run of inputs form one *group* (item k of each is the same input, with one seed
per input instead of one per pair), made together and handed to the same task (groups go round
robin, ``group % num_tasks``). Unshared, every shard is a group of its own and the rules above hold
as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from p2pz.teacher.edits import slug

SHARD_PATTERN = "pairs-%06d.tar"
SHARD_GLOB = "pairs-[0-9][0-9][0-9][0-9][0-9][0-9]*.tar"
DATASET_FILE = "dataset.json"
DATASET_FORMAT = "p2pz-pairs-v1"
DIRECTIONS_DIR = "directions"
_SHARD_RE = re.compile(r"^pairs-(\d{6,})\.tar$")
_KEY_RE = re.compile(r"^([A-Za-z0-9_-]+)_[0-9a-f]{16}$")  # sample_key's: <edit slug>_<16 hex digits>


# --------------------------------------------------------------------------------------------------
# Names, keys, seeds


def shard_name(index: int) -> str:
    """File name of shard ``index`` (``pairs-000042.tar``)."""
    return SHARD_PATTERN % index


def shard_index(path: str | os.PathLike) -> int | None:
    """Shard number from a shard file name, or None if the name is not a shard's."""
    match = _SHARD_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def sample_key(edit: str, input_id: str) -> str:
    """The WebDataset key of one (input, edit) pair: stable, unique, and free of dots.

    WebDataset splits member names at the first dot of the basename, so a dot in a key would
    silently split one sample into two; the input id is therefore hashed.
    """
    digest = hashlib.sha1(f"{edit}\n{input_id}".encode()).hexdigest()[:16]
    return f"{slug(edit)}_{digest}"


def key_edit(key: str) -> str | None:
    """The edit name part of a sample key (``circle-to-square`` of ``circle-to-square_0f3a...``), None
    for a key that :func:`sample_key` did not make."""
    match = _KEY_RE.match(key)
    return match.group(1) if match else None


def direction_file(out_dir: str | os.PathLike, edit: str) -> Path:
    """Where a dataset keeps the direction of its edit ``edit`` (an edit's name)."""
    return Path(out_dir) / DIRECTIONS_DIR / f"{slug(edit)}.safetensors"


def derive_seed(global_seed: int, item_id: str) -> int:
    """Per-sample seed from the global seed and the work item's identity (31 bits)."""
    digest = hashlib.sha256(f"{int(global_seed)}\n{item_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------------
# The work plan


@dataclass(frozen=True)
class WorkItem:
    """One (input, edit) pair to produce."""

    edit: str  # edit name, e.g. "cat-to-dog"
    input_id: str  # the input's identity in its source (relative path, shard/key, synthetic-000001)
    key: str  # sample key in the output shard
    seed: int  # the teacher's seed for this pair


@dataclass(frozen=True)
class ShardPlan:
    """The work items that make up one output shard (all of one edit). Shards with the same
    ``group`` cover the same inputs for edits that share their inversion (see the module docstring);
    a shard of its own has ``group`` = ``-1``, i.e. its index."""

    index: int
    edit: str
    items: tuple[WorkItem, ...]
    group: int = -1

    @property
    def name(self) -> str:
        return shard_name(self.index)

    @property
    def group_id(self) -> int:
        return self.index if self.group < 0 else self.group


def shared_seed_id(share_key: str, input_id: str) -> str:
    """What a shared input's seed is derived from: its share class and id (not the edit)."""
    return f"shared:{share_key}\n{input_id}"


def plan_shards(
    inputs_per_edit: dict[str, Sequence[str]],
    samples_per_shard: int,
    global_seed: int,
    share: dict[str, str | None] | None = None,
) -> list[ShardPlan]:
    """Assign every (input, edit) work item to a shard number.

    ``inputs_per_edit`` maps edit names, in the user's order, to their input ids (sorted by the
    caller). Shards are numbered consecutively over edits; each edit's inputs are cut into runs of
    ``samples_per_shard``. ``share`` maps edit names to a share key: edits with the same key (and the
    same inputs) share each input's seed, and their j-th shards form one group (a key of one edit
    alone changes nothing). Depends on nothing but
    the arguments, so every task computes the same plan.
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be at least 1")
    share = share or {}
    members = [share.get(edit) for edit in inputs_per_edit]
    share = {edit: key if key and members.count(key) > 1 else None for edit, key in share.items()}
    plans: list[ShardPlan] = []
    for edit, input_ids in inputs_per_edit.items():
        key = share.get(edit)
        items = [
            WorkItem(
                edit,
                input_id,
                sample_key(edit, input_id),
                derive_seed(global_seed, shared_seed_id(key, input_id) if key else f"{edit}\n{input_id}"),
            )
            for input_id in input_ids
        ]
        for start in range(0, len(items), samples_per_shard):
            plans.append(ShardPlan(len(plans), edit, tuple(items[start : start + samples_per_shard])))
    keys = [item.key for plan in plans for item in plan.items]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate input ids in the plan: every input must appear once per edit")
    return _assign_groups(plans, inputs_per_edit, share)


def _assign_groups(
    plans: list[ShardPlan], inputs_per_edit: dict[str, Sequence[str]], share: dict[str, str | None]
) -> list[ShardPlan]:
    """Number the groups in order of their first shard; unshared shards are groups of their own."""
    members: dict[str, list[str]] = {}
    for edit, key in share.items():
        if key and edit in inputs_per_edit:
            members.setdefault(key, []).append(edit)
    for key, edits in members.items():
        if any(list(inputs_per_edit[e]) != list(inputs_per_edit[edits[0]]) for e in edits):
            raise ValueError(f"edits sharing {key!r} must have the same inputs")
    if all(len(edits) < 2 for edits in members.values()):
        return plans  # nothing shared: group = index, as before sharing existed
    group_of: dict[tuple, int] = {}
    chunk: dict[str, int] = {}
    grouped = []
    for plan in plans:
        key = share.get(plan.edit)
        j = chunk[plan.edit] = chunk.get(plan.edit, -1) + 1
        slot = (key, j) if key and len(members[key]) > 1 else ("", plan.index)
        group = group_of.setdefault(slot, len(group_of))
        grouped.append(dataclasses.replace(plan, group=group))
    return grouped


def shard_groups(plans: Sequence[ShardPlan]) -> list[list[ShardPlan]]:
    """The plans by group, in order of the groups' first shards."""
    groups: dict[int, list[ShardPlan]] = {}
    for plan in plans:
        groups.setdefault(plan.group_id, []).append(plan)
    return list(groups.values())


def task_shards(plans: Sequence[ShardPlan], task_index: int, num_tasks: int) -> list[ShardPlan]:
    """The shards one cluster task owns: shard ``i`` goes to task ``i % num_tasks`` (shared shards:
    their group's number decides, so a group's shards stay in one task).

    Round robin keeps the tasks' loads within one shard of each other, and a shard's contents do
    not depend on the number of tasks.
    """
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise ValueError(f"task index {task_index} is not in [0, {num_tasks})")
    return [plan for plan in plans if plan.group_id % num_tasks == task_index]


def tasks_from_env(environ: dict[str, str] | None = None) -> tuple[int, int] | None:
    """(task index, number of tasks) of a SLURM array job, or None outside one.

    ``SLURM_ARRAY_TASK_ID`` counts from ``SLURM_ARRAY_TASK_MIN`` (``--array=1-8`` starts at 1), so the
    index is made zero-based; arrays with gaps or steps (``--array=0,4,9``) are not supported.
    """
    env = os.environ if environ is None else environ
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return None
    task_id = int(env["SLURM_ARRAY_TASK_ID"])
    count = int(env["SLURM_ARRAY_TASK_COUNT"])
    first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
    return task_id - first, count


# --------------------------------------------------------------------------------------------------
# Crash-safe shard writing


def finished_shards(out_dir: str | os.PathLike) -> set[int]:
    """Numbers of the shards that exist under their final name (and are therefore complete)."""
    out = Path(out_dir)
    if not out.is_dir():
        return set()
    return {i for p in out.glob(SHARD_GLOB) if (i := shard_index(p)) is not None}


def _temp_prefix(index: int) -> str:
    return f".{shard_name(index)}."


def remove_stale_temps(out_dir: str | os.PathLike, indices: Sequence[int]) -> int:
    """Delete temporary files left by a killed run for the given shards; returns how many.

    Only the caller's own shards are touched, so tasks sharing a folder never delete each other's
    work in progress.
    """
    out = Path(out_dir)
    removed = 0
    for index in indices:
        for tmp in out.glob(_temp_prefix(index) + "*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


class AtomicShard:
    """A WebDataset shard written to a hidden temporary file and renamed into place when complete.

    webdataset's ``ShardWriter`` writes straight to the final name, so a crash leaves a truncated
    ``.tar`` that looks finished; here the final name appears only through ``os.replace`` after the
    tar is closed and synced.
    """

    def __init__(self, out_dir: str | os.PathLike, index: int):
        import webdataset as wds

        self.final = Path(out_dir) / shard_name(index)
        self.tmp = Path(out_dir) / f"{_temp_prefix(index)}{os.getpid()}.tmp"
        self.count = 0
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit()/abort()
        # TarWriter does not close a file object it was given: commit() closes it.
        self._tar = wds.TarWriter(self._file)

    def write(self, sample: dict) -> None:
        if "." in sample["__key__"]:
            raise ValueError(f"sample key {sample['__key__']!r} contains a dot")
        self._tar.write(sample)
        self._file.flush()  # the temporary file shows the progress of the shard
        self.count += 1

    def commit(self) -> Path:
        """Close the tar, flush it to disk and move it to its final name."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.final)
        _fsync_dir(self.final.parent)
        return self.final

    def abort(self) -> None:
        """Drop the unfinished shard (on an exception)."""
        with contextlib.suppress(Exception):
            self._tar.close()
        with contextlib.suppress(Exception):
            self._file.close()
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_shard(out_dir: str | os.PathLike, index: int) -> Iterator[AtomicShard]:
    """``with atomic_shard(out, 3) as shard: shard.write(...)`` — renamed into place on success only."""
    shard = AtomicShard(out_dir, index)
    try:
        yield shard
    except BaseException:
        shard.abort()
        raise
    shard.commit()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------------
# Dataset identity and the per-task manifest


def check_dataset_identity(out_dir: str | os.PathLike, identity: dict) -> None:
    """Write ``dataset.json`` on the first run; refuse to add to a folder made with other settings.

    Finished shards are skipped on a restart, so mixing two configurations in one folder would
    silently produce a dataset that neither command describes.
    """
    from p2pz.utils.atomic import atomic_path
    from p2pz.utils.errors import UserError

    path = Path(out_dir) / DATASET_FILE
    identity = json.loads(json.dumps(identity))  # normalise tuples etc. for comparison
    if path.exists():
        try:
            existing = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{path} is unreadable ({err}); remove it or use a new --out") from err
        if existing != identity:
            changed = sorted(k for k in set(existing) | set(identity) if existing.get(k) != identity.get(k))
            raise UserError(
                f"{out_dir} holds a dataset made with different settings ({', '.join(changed)} differ); "
                "re-run with the same settings to resume it, or pick a new --out"
            )
        return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")


def manifest_name(task_index: int, num_tasks: int) -> str:
    return f"manifest-{task_index:05d}-of-{num_tasks:05d}.jsonl"


class Manifest:
    """Append-only JSON-lines log of one task: a ``start`` record per run, a ``shard`` record per
    finished shard (written just before the shard is renamed into place), a ``done`` record at the end.

    After a crash between the record and the rename a shard may be listed twice; the last record of
    a shard wins (see :func:`read_manifests`), and the shard file's existence is the ground truth.
    """

    def __init__(self, out_dir: str | os.PathLike, task_index: int, num_tasks: int):
        self.path = Path(out_dir) / manifest_name(task_index, num_tasks)

    def append(self, record: dict) -> None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # end a line torn by a kill, so that this record stays readable
            os.write(fd, line)  # one write per line: a kill can tear at most the last line
            os.fsync(fd)
        finally:
            os.close(fd)


def read_manifests(out_dir: str | os.PathLike) -> list[dict]:
    """All records of all task manifests in a folder (unparseable torn lines are dropped)."""
    records = []
    for path in sorted(Path(out_dir).glob("manifest-*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
    return records


def latest_shard_records(records: Sequence[dict]) -> dict[int, dict]:
    """The last ``shard`` record per shard number."""
    latest: dict[int, dict] = {}
    for record in records:
        if record.get("event") == "shard" and isinstance(record.get("index"), int):
            latest[record["index"]] = record
    return latest
