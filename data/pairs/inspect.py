"""``p2pz shards inspect DIR``: what a generated dataset holds, and a contact sheet of a few pairs.

Reads every shard's member list and ``json`` records (not the images, except for the contact sheet),
``dataset.json`` and the task manifests, and reports: shards finished out of planned, sample counts,
samples per edit, the teacher settings in use, inputs skipped and why, throughput, and anything
wrong (damaged shards, samples missing an image, temporary files of interrupted runs).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pz.data.pairs import sample as fmt
from p2pz.data.pairs import shards as sh
from p2pz.utils.errors import UserError

if TYPE_CHECKING:
    from PIL import Image

SHEET_NAME = "contact-sheet.png"
LABELS = {fmt.SRC: "input", fmt.EDIT: "edit", fmt.RECON: "reconstruction"}


def _read_shard(path: Path, want_images: int) -> dict[str, Any]:
    """Samples of one shard: keys, json records, completeness; the first images if asked."""
    samples: dict[str, dict] = {}
    images: list[dict] = []

    def wanted(member: str) -> bool:  # images only for the first ``want_images`` samples
        return member == fmt.META or (member in fmt.IMAGES and len(images) < want_images)

    error = None
    try:
        for raw in fmt.iter_shard(path, read=wanted):
            key = raw[fmt.KEY]
            entry = samples.setdefault(key, {"exts": set()})
            entry["exts"].update(m for m in raw if not m.startswith("__"))
            if raw.get(fmt.META) is not None:
                try:
                    entry["json"] = fmt.decode_meta(raw[fmt.META])
                except ValueError:
                    entry["json"] = None
            shown = {m: raw[m] for m in fmt.IMAGES if raw.get(m) is not None}
            if shown and len(images) < want_images:
                images.append({"key": key, **shown})
    except fmt.ShardError as err:
        error = err.reason
    complete = {k: v for k, v in samples.items() if set(fmt.REQUIRED) <= v["exts"]}
    return {
        "samples": samples,
        "complete": complete,
        "error": error,
        "images": [im for im in images if all(m in im for m in fmt.REQUIRED)],
    }


def summarise(folder: str | Path, sheet_pairs: int = 8) -> dict:
    """A JSON-able summary of the dataset in ``folder`` (plus raw images for the contact sheet)."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{folder} does not exist; give the --out folder of 'p2pz generate'")
    if not folder.is_dir():
        raise UserError(
            f"{folder} is a file, not a folder; give the folder that holds the shards ({folder.parent})"
        )
    shard_paths = sorted(folder.glob(sh.SHARD_GLOB))
    if not shard_paths:
        raise UserError(f"no pairs-NNNNNN.tar shards in {folder}; is it the --out folder of 'p2pz generate'?")
    identity = None
    if (folder / sh.DATASET_FILE).exists():
        try:
            identity = json.loads((folder / sh.DATASET_FILE).read_text())
        except ValueError:
            identity = None

    per_edit: collections.Counter = collections.Counter()
    settings: dict[str, dict] = {}
    settings_count: collections.Counter = collections.Counter()
    damaged, incomplete, sheet = [], 0, []
    total = 0
    shard_counts = {}
    for path in shard_paths:
        info = _read_shard(path, max(0, sheet_pairs - len(sheet)))
        if info["error"]:
            damaged.append({"shard": path.name, "error": info["error"]})
        incomplete += len(info["samples"]) - len(info["complete"])
        shard_counts[path.name] = len(info["complete"])
        total += len(info["complete"])
        for entry in info["complete"].values():
            meta = entry.get("json") or {}
            per_edit[(meta.get("edit") or {}).get("name", "?")] += 1
            teacher = meta.get("teacher") or {}
            config = {k: teacher.get(k) for k in ("model", "preset", "fingerprint", "settings", "overrides")}
            config_id = json.dumps(config, sort_keys=True)
            settings.setdefault(config_id, config)
            settings_count[config_id] += 1
        sheet.extend(info["images"])

    records = sh.read_manifests(folder)
    latest = sh.latest_shard_records(records)
    reasons: collections.Counter = collections.Counter()
    for index, record in latest.items():
        if sh.shard_name(index) in shard_counts:
            for skip in record.get("skipped", []):
                reasons[_reason_kind(skip.get("reason", ""))] += 1
    seconds = sum(r.get("seconds", 0) for r in latest.values())
    done_samples = sum(r.get("samples", 0) for r in latest.values())
    temps = sorted(p.name for p in folder.glob(".pairs-*.tmp"))
    planned = identity.get("num_shards") if identity else None
    return {
        "folder": str(folder),
        "shards": len(shard_paths),
        "shards_planned": planned,
        "complete": planned is not None and len(shard_paths) == planned and not damaged,
        "samples": total,
        "samples_per_shard": {"min": min(shard_counts.values()), "max": max(shard_counts.values())},
        "edits": dict(per_edit),
        "settings": [{"samples": settings_count[k], **settings[k]} for k in settings],
        "skipped": dict(reasons),
        "skipped_total": sum(reasons.values()),
        "pairs_per_hour": round(done_samples / seconds * 3600, 1) if seconds > 0 else None,
        "tasks": sorted(
            {(r.get("task_index"), r.get("num_tasks")) for r in records if r.get("event") == "start"}
        ),
        "damaged_shards": damaged,
        "incomplete_samples": incomplete,
        "temporary_files": temps,
        "_sheet": sheet,
    }


def _reason_kind(reason: str) -> str:
    """Group reasons by their leading words ("corrupt image (...)" -> "corrupt image")."""
    return reason.split(" (", 1)[0].strip() or "unknown"


def contact_sheet(pairs: list[dict], cell: int = 128) -> Image.Image:
    """A PNG-ready image: one row per pair, columns input | edit | reconstruction (if stored)."""
    from PIL import Image, ImageDraw

    columns = [m for m in fmt.IMAGES if m in fmt.REQUIRED or any(m in p for p in pairs)]
    label_h = 14
    sheet = Image.new("RGB", (cell * len(columns), label_h + cell * len(pairs)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(columns):
        draw.text((c * cell + 4, 1), LABELS[name], fill="black")
    for r, pair in enumerate(pairs):
        for c, name in enumerate(columns):
            if name in pair:
                image = fmt.decode_image(pair[name]).resize((cell, cell), Image.BICUBIC)
                sheet.paste(image, (c * cell, label_h + r * cell))
    return sheet


def format_summary(summary: dict) -> str:
    lines = [f"dataset {summary['folder']}"]
    planned = summary["shards_planned"]
    lines.append(
        f"  shards      {summary['shards']}"
        + (f" of {planned} planned" if planned is not None else "")
        + ("" if summary["complete"] else "  (INCOMPLETE)" if planned is not None else "")
    )
    spread = summary["samples_per_shard"]
    lines.append(f"  pairs       {summary['samples']}  ({spread['min']}-{spread['max']} per shard)")
    for name, count in sorted(summary["edits"].items()):
        lines.append(f"  edit        {name}: {count}")
    for config in summary["settings"]:
        lines.append(
            f"  teacher     {config['model']} preset={config['preset']} "
            f"fingerprint={config['fingerprint']} ({config['samples']} pairs)"
        )
        if config.get("overrides"):
            lines.append(f"              overrides {json.dumps(config['overrides'], sort_keys=True)}")
        lines.append(f"              settings {json.dumps(config['settings'], sort_keys=True)[:400]}")
    lines.append(
        f"  skipped     {summary['skipped_total']} inputs"
        + "".join(f"\n              {n} x {why}" for why, n in sorted(summary["skipped"].items()))
    )
    if summary["pairs_per_hour"] is not None:
        lines.append(f"  throughput  {summary['pairs_per_hour']:,.0f} pairs/hour per task")
    if summary["tasks"]:
        lines.append(f"  tasks       {', '.join(f'{i}/{n}' for i, n in summary['tasks'])}")
    for bad in summary["damaged_shards"]:
        lines.append(f"  DAMAGED     {bad['shard']}: {bad['error']}")
    if summary["incomplete_samples"]:
        lines.append(
            f"  WARNING     {summary['incomplete_samples']} samples lack {' or '.join(fmt.REQUIRED)}"
        )
    if summary["temporary_files"]:
        lines.append(
            f"  note        {len(summary['temporary_files'])} temporary files of interrupted runs "
            "(re-run the same generate command to finish and clean up)"
        )
    return "\n".join(lines)
