"""A student package scored against its teacher on pairs it never trained on (``p2pz eval --student``).

The pairs are the teacher's (input, edit) shards of any edit: by default the package's held-out shards
(the training run's validation split, recorded in its checkpoint and carried into ``config.json``),
or any shards given. The student edits each input; :func:`p2pz.data.eval.image_fidelity.score_edits`
compares student, teacher and input (PSNR, SSIM, LPIPS when a backbone is at hand). Pairs of the
shapes world are scored by the world's oracle too (teacher and student, against the scene read from
the input).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HELD_OUT = "held-out"  # --pairs held-out: the package's own held-out shards
GRID_ROWS = 4


def held_out_shards(config: dict[str, Any], name: str | os.PathLike) -> list[str]:
    """The shards the package's training held out (``config.json``'s ``data.split.val_shards``)."""
    from p2pz.utils.errors import UserError

    shards = ((config.get("data") or {}).get("split") or {}).get("val_shards") or []
    if not shards:
        raise UserError(
            f"{name} records no held-out shards (trained on one shard, or exported by an older p2pz); "
            "give the pairs to score: --pairs SHARDS"
        )
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise UserError(
            f"the held-out shard {missing[0]} of {name} is not here; give the pairs: --pairs SHARDS"
        )
    return list(shards)


def read_pairs(urls: list[str], limit: int | None) -> Iterator[tuple[str, Any, Any, dict[str, Any]]]:
    """(key, input, teacher's edit, metadata) of complete, decodable samples; damaged ones logged."""
    from p2pz.data.pairs import sample as fmt

    count = 0
    for url in urls:
        samples = fmt.iter_shard(url, read=lambda member: member not in (fmt.RECON, fmt.LATENT))
        try:
            for raw in samples:
                if not fmt.is_complete(raw):
                    continue
                try:
                    pair = fmt.decode_sample(raw)
                except Exception as err:  # noqa: BLE001 - image decoders raise many types
                    log.warning("%s:%s: corrupt pair (%s); skipped", url, raw[fmt.KEY], type(err).__name__)
                    continue
                yield Path(pair.key).name, pair.source, pair.edited, pair.meta
                count += 1
                if limit is not None and count >= limit:
                    return
        except fmt.ShardError as err:
            log.warning("skipping the rest of an unreadable shard: %s", err)


def _oracle_scores(edit_spec: str, inputs: list, teacher: list, student: list) -> dict[str, Any] | None:
    """The world's oracle on teacher and student edits, when the pairs are the shapes world's."""
    from p2pz.data.eval.world_metrics import aggregate, scene_from_image, score_world_edit
    from p2pz.data.shapes.edits import is_world_edit, parse_world_edit
    from p2pz.utils.errors import UserError

    source, target = edit_spec.split(":")
    if not is_world_edit(source, target):
        return None
    edit = parse_world_edit(edit_spec)
    scores: dict[str, list] = {"teacher": [], "student": []}
    for x, t, s in zip(inputs, teacher, student):
        try:
            scene, masks = scene_from_image(x)
            for who, image in (("teacher", t), ("student", s)):
                scores[who].append(score_world_edit(scene, image, edit, input_image=x, input_masks=masks))
        except (ValueError, UserError):
            continue  # not a readable world scene
    if not scores["student"]:
        return None
    return {who: {k: v for k, v in aggregate(s).items() if k != "per_image"} for who, s in scores.items()}


def evaluate_package(
    package: str | os.PathLike,
    pairs: str | None = None,
    *,
    limit: int | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    lpips_net: str = "alex",
    lpips_backbone: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Score a package (folder or repo id) on ``pairs`` (shards; None or ``held-out``: its held-out
    shards). Returns the JSON-ready report (``metrics.json``) and, under ``grid``, image rows
    (input, teacher, student) for a figure."""
    from p2pz.data.eval.image_fidelity import optional_lpips, score_edits
    from p2pz.data.pairs.reader import list_shards
    from p2pz.student.export import apply_to_images
    from p2pz.student.package import load_package
    from p2pz.teacher.images import prepare_image
    from p2pz.utils.errors import UserError

    loaded = load_package(package, device=device)
    res = loaded.resolution
    urls = held_out_shards(loaded.config, package) if pairs in (None, HELD_OUT) else list_shards(pairs)
    keys, inputs, teacher, edits = [], [], [], set()
    for key, src, edited, meta in read_pairs(urls, limit):
        keys.append(key)
        inputs.append(prepare_image(src, res))  # what the student sees, and the teacher at its size
        teacher.append(prepare_image(edited, res))
        edit = meta.get("edit") or {}
        edits.add(f"{edit.get('source')}:{edit.get('target')}")
    if not inputs:
        raise UserError(f"no readable pairs in {pairs or 'the held-out shards'}; check the shards")
    student = apply_to_images(loaded.student, res, inputs, batch_size=batch_size, device=device)
    lpips, lpips_note = optional_lpips(lpips_net, lpips_backbone, device)
    scores = score_edits(inputs, teacher, student, lpips=lpips)
    per_image = scores.pop("per_image")
    report: dict[str, Any] = {
        "kind": "student-pairs",
        "package": str(package),
        "pairs": "held-out" if pairs in (None, HELD_OUT) else str(pairs),
        "pairs_source": "held-out shards" if pairs in (None, HELD_OUT) else "given shards",
        "shards": [Path(u).name for u in urls],
        "edits": sorted(edits),
        **scores,
        "lpips_net": lpips_net if lpips is not None else None,
    }
    if lpips_note:
        report["lpips_note"] = lpips_note
    if len(edits) == 1:
        oracle = _oracle_scores(next(iter(edits)), inputs, teacher, student)
        if oracle:
            report["oracle"] = oracle
    report["per_image"] = [{"key": k, **p} for k, p in zip(keys, per_image)]
    report["grid"] = list(zip(inputs, teacher, student))
    return report


def grid_image(rows: list[tuple[Any, Any, Any]], limit: int = GRID_ROWS) -> Any:
    """Rows of (input | teacher | student) as one PIL image, 2 px white between tiles."""
    from PIL import Image

    rows = rows[:limit]
    size = rows[0][0].size[0]
    pad = 2
    grid = Image.new("RGB", (3 * size + 2 * pad, len(rows) * size + (len(rows) - 1) * pad), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((size, size)), (c * (size + pad), r * (size + pad)))
    return grid


def card_summary(report: dict[str, Any]) -> dict[str, Any]:
    """What ``config.json`` (``eval``) and the card keep of a report: the means, not the images."""
    return {k: v for k, v in report.items() if k not in ("per_image", "grid")}
