"""Learning only from the teacher's successes: scores on every pair, and a rule that keeps the good ones.

Every pair can be scored when it is made (``p2pz generate``) by a :class:`PairScorer`: the shapes
world's oracle (success, IoU, centre shift, ...) or the paper's metrics for real images (CLIP
directional score, CLIP's target probability, DINO structure distance). The scores go into the
sample's ``json`` under ``"scores"``. A *keep rule* then decides which pairs a student learns from,
either at production time (``p2pz generate --keep-if RULE``: rejected pairs are never written) or
afterwards (``p2pz shards filter SRC DST --keep-if RULE``, :func:`filter_shards`).

The rule language is deliberately tiny, and parsed here (nothing a user types is evaluated as
Python): clauses joined by ``and``, each either ``NAME OP NUMBER`` (``OP``: ``>= > <= < == !=``;
``true``/``false`` stand for 1/0) or a bare ``NAME`` (true when the score is true or non-zero), e.g.
``success and iou >= 0.8`` or ``clip_direction > 0.2 and structure_dist <= 0.05``. A score that is
missing or null in a pair fails its clause (a pair the oracle could not read is not kept).

Scorers live where the layers allow: this layer (``p2pz.data.pairs``) only defines what a scorer is;
the world's and the paper's scorers are in ``p2pz.data.eval.pair_scores`` and are handed down by the
command line (or the demo, the benchmarks, a test).
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from p2pz.utils.errors import UserError

if TYPE_CHECKING:
    from PIL import Image

    from p2pz.teacher.edits import Edit

SCORES = "scores"  # the key of a sample's json under which its scores are stored
SCORER_KINDS = ("auto", "world", "paper", "none")  # p2pz generate --score
FILTER_FILE = "filter.json"  # what `p2pz shards filter` did, in its output folder
ScoreValue = bool | int | float | None
Scores = dict[str, ScoreValue]


# --------------------------------------------------------------------------------------------------
# Scorers


class PairScorer(Protocol):
    """Scores (input, edited) pairs of one edit; built above this layer and handed to the generator.

    ``name`` identifies the scorer in ``dataset.json`` and the manifests; ``names`` are the scores it
    gives every pair (what a keep rule may use).
    """

    name: str
    names: tuple[str, ...]

    def __call__(
        self, sources: Sequence[Image.Image], edited: Sequence[Image.Image], edit: Edit
    ) -> list[Scores]:
        """One dict of scores per pair, in order."""
        ...


# --------------------------------------------------------------------------------------------------
# The rule language

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_CLAUSE = re.compile(rf"^\s*(?P<name>{_NAME})\s*(?:(?P<op>>=|<=|==|!=|>|<)\s*(?P<value>\S+))?\s*$")
_AND = re.compile(r"\s+and\s+", flags=re.IGNORECASE)
_WORDS = {"true": 1.0, "false": 0.0}


@dataclass(frozen=True)
class Clause:
    """``name op value``; a bare name is ``name != 0`` (true, or a non-zero number)."""

    name: str
    op: str = "!="
    value: float = 0.0
    bare: bool = False

    def holds(self, scores: Mapping[str, Any]) -> bool:
        value = scores.get(self.name)
        if value is None or isinstance(value, str):
            return False
        number = float(value)
        return not math.isnan(number) and _OPS[self.op](number, self.value)

    def __str__(self) -> str:
        return self.name if self.bare else f"{self.name} {self.op} {self.value:g}"


@dataclass(frozen=True)
class KeepRule:
    """A parsed ``--keep-if`` rule: all clauses must hold for a pair to be kept."""

    text: str
    clauses: tuple[Clause, ...]

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(c.name for c in self.clauses))

    def keeps(self, scores: Mapping[str, Any]) -> bool:
        return all(c.holds(scores) for c in self.clauses)

    def failed(self, scores: Mapping[str, Any]) -> list[str]:
        """The clauses a pair fails, as text (for the manifest's reasons)."""
        return [str(c) for c in self.clauses if not c.holds(scores)]

    def check_names(self, known: Collection[str], where: str) -> None:
        """A one-line error naming every score of the rule that ``where`` does not give."""
        unknown = [n for n in self.names if n not in known]
        if unknown:
            raise UserError(
                f"--keep-if {self.text!r}: unknown score {', '.join(map(repr, unknown))}; "
                f"{where} gives {', '.join(sorted(known)) or 'no scores'}"
            )

    def __str__(self) -> str:
        return " and ".join(map(str, self.clauses))


def parse_keep_if(text: str) -> KeepRule:
    """Parse a keep rule (see the module docstring); a one-line UserError says what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise UserError("--keep-if is empty; give clauses like 'success and iou >= 0.8'")
    clauses = []
    for part in _AND.split(text.strip()):
        match = _CLAUSE.match(part)
        if not match or not part.strip():
            raise UserError(
                f"--keep-if {text!r}: cannot read {part.strip()!r}; write NAME, or NAME OP NUMBER with OP "
                "one of >= > <= < == !=, joined by 'and' (e.g. 'success and iou >= 0.8')"
            )
        name, op, value = match.group("name"), match.group("op"), match.group("value")
        if name.lower() in ("and", "or", "not") or (op is None and name.lower() in _WORDS):
            raise UserError(f"--keep-if {text!r}: {name!r} is not a score name (only 'and' joins clauses)")
        if op is None:
            clauses.append(Clause(name, bare=True))
            continue
        clauses.append(Clause(name, op, _number(value, text)))
    return KeepRule(text.strip(), tuple(clauses))


def _number(value: str, text: str) -> float:
    if value.lower() in _WORDS:
        return _WORDS[value.lower()]
    if not re.fullmatch(_NUMBER, value):
        raise UserError(f"--keep-if {text!r}: {value!r} is not a number (nor true/false)")
    return float(value)


# --------------------------------------------------------------------------------------------------
# Scoring and selecting at production time (``p2pz generate``)


class PairSelection:
    """What ``p2pz generate`` does with each batch of teacher results: score it, then keep or reject.

    ``rule`` None keeps every pair (they are still scored). Counts are kept for the manifests.
    """

    def __init__(self, scorer: PairScorer, rule: KeepRule | None = None):
        if rule is not None:
            rule.check_names(scorer.names, f"the {scorer.name} scorer")
        self.scorer, self.rule = scorer, rule

    def score(
        self, sources: Sequence[Image.Image], edited: Sequence[Image.Image], edit: Edit
    ) -> list[Scores]:
        if not sources:
            return []
        scores = self.scorer(list(sources), list(edited), edit)
        if len(scores) != len(sources):
            raise RuntimeError(
                f"the {self.scorer.name} scorer gave {len(scores)} results for {len(sources)} pairs"
            )
        return [_jsonable_scores(s) for s in scores]

    def keeps(self, scores: Mapping[str, Any]) -> bool:
        return self.rule is None or self.rule.keeps(scores)

    def identity(self) -> dict[str, Any]:
        """What enters ``dataset.json``: a resumed run must score and select the same way."""
        return {"scorer": self.scorer.name, "keep_if": str(self.rule) if self.rule else None}


def _jsonable_scores(scores: Mapping[str, Any]) -> Scores:
    """Scores as JSON values: numbers rounded to 6 digits, NaN as null, numpy scalars as Python ones."""
    out: Scores = {}
    for name, value in scores.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, float):
            value = None if math.isnan(value) or math.isinf(value) else round(value, 6)
        out[str(name)] = value
    return out


def kept_fraction(kept: int, total: int) -> float | None:
    return round(kept / total, 6) if total else None


def selection_summary(
    selection: PairSelection | None, records: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """What a manifest record (a shard's, or a run's ``done`` over its shard records) says about scoring
    and ``--keep-if``: the scorer, the rule, pairs kept out and the kept fraction of the pairs made
    (pairs the teacher could not make are not counted). Empty without a selection."""
    if selection is None:
        return {}
    kept = sum(int(r.get("samples", 0)) for r in records)
    rejected = sum(1 for r in records for skip in r.get("skipped", []) if skip.get("rejected"))
    summary = {
        **selection.identity(),
        "rejected": rejected,
        "kept_fraction": kept_fraction(kept, kept + rejected),
    }
    if len(records) != 1 or records[0].get("event") != "shard":  # a run's total: skipped = not made
        summary["skipped"] = sum(
            1 for r in records for skip in r.get("skipped", []) if not skip.get("rejected")
        )
    return summary


# --------------------------------------------------------------------------------------------------
# Filtering finished shards (``p2pz shards filter``)


def filter_shards(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    keep_if: str,
    *,
    scorer: PairScorer | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Copy the pairs of ``src_dir``'s shards that ``keep_if`` keeps into new shards in ``dst_dir``.

    Shards keep their numbers (an empty one is not written); ``dataset.json`` is copied, and
    ``filter.json`` records the rule, the counts per shard and the kept fraction (the returned dict).
    Nothing half-written: ``dst_dir`` is built beside itself under a temporary name and renamed into
    place at the end, and it must not exist yet. Every pair must carry scores (``p2pz generate``
    writes them), or ``scorer`` scores the pairs that carry none (pairs made before scoring existed;
    their copies then carry the scores); an unknown score name is a one-line error naming the scores
    the pairs have.
    """
    from p2pz.data.pairs import shards as sh
    from p2pz.utils.atomic import atomic_path

    rule = parse_keep_if(keep_if)
    src, dst = Path(src_dir), Path(dst_dir)
    shard_paths = _source_shards(src)
    if dst.exists():
        raise UserError(f"{dst} already exists; give a new folder for the filtered shards")
    if dst.resolve() == src.resolve():
        raise UserError("the filtered shards need their own folder: DST must differ from SRC")
    report: dict[str, Any] = {
        "event": "filter",
        "source": str(src),
        "keep_if": str(rule),
        "pairs_in": 0,
        "pairs_kept": 0,
        "kept_fraction": None,
        "failed_clauses": {},
        "shards": [],
    }
    failed: Counter = Counter()
    with atomic_path(dst) as tmp:
        tmp.mkdir(parents=True)
        for path in _progress(shard_paths, progress):
            index = sh.shard_index(path)
            total, kept = _filter_one_shard(path, tmp, index, rule, failed, scorer)
            report["shards"].append({"shard": path.name, "pairs_in": total, "pairs_kept": kept})
            report["pairs_in"] += total
            report["pairs_kept"] += kept
        report["kept_fraction"] = kept_fraction(report["pairs_kept"], report["pairs_in"])
        report["failed_clauses"] = dict(failed)
        if (src / sh.DATASET_FILE).is_file():
            shutil.copyfile(src / sh.DATASET_FILE, tmp / sh.DATASET_FILE)
        (tmp / FILTER_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _source_shards(src: Path) -> list[Path]:
    from p2pz.data.pairs import shards as sh

    if not src.is_dir():
        raise UserError(f"{src} is not a folder of shards; give the --out folder of 'p2pz generate'")
    paths = sorted(p for p in src.glob(sh.SHARD_GLOB) if sh.shard_index(p) is not None)
    if not paths:
        raise UserError(f"no pairs-NNNNNN.tar shards in {src}; give the --out folder of 'p2pz generate'")
    return paths


def _filter_one_shard(
    path: Path, out: Path, index: int, rule: KeepRule, failed: Counter, scorer: PairScorer | None
) -> tuple[int, int]:
    """Copy one shard's kept pairs (all their members, byte for byte); (pairs read, pairs kept)."""
    from p2pz.data.pairs import sample as fmt
    from p2pz.data.pairs import shards as sh

    total = 0
    shard = sh.AtomicShard(out, index)
    try:
        for sample in fmt.iter_shard(path):
            if not fmt.is_complete(sample):
                continue  # a torn pair is no pair (the reader skips it too)
            total += 1
            scores = _sample_scores(sample, path, rule, scorer)
            if rule.keeps(scores):
                shard.write({k: v for k, v in sample.items() if k != fmt.URL})
            else:
                failed.update(rule.failed(scores))
    except BaseException:
        shard.abort()
        raise
    if shard.count:
        shard.commit()
    else:
        shard.abort()  # no pair kept: no empty shard for the reader to trip on
    return total, shard.count


def _sample_scores(
    sample: dict[str, Any], path: Path, rule: KeepRule, scorer: PairScorer | None
) -> Mapping[str, Any]:
    """The pair's stored scores, or ``scorer``'s (then written into the sample's json as well)."""
    from p2pz.data.pairs import sample as fmt

    try:
        meta = fmt.decode_meta(sample.get(fmt.META))
    except ValueError as err:
        raise UserError(f"{path.name}: pair {sample[fmt.KEY]!r} has unreadable metadata ({err})") from None
    scores = meta.get(SCORES)
    if not isinstance(scores, dict) and scorer is not None:
        scores = _score_stored_pair(sample, meta, path, scorer)
        sample[fmt.META] = fmt.encode_meta(meta | {SCORES: scores})
    if not isinstance(scores, dict):
        raise UserError(
            f"{path.name}: pair {sample[fmt.KEY]!r} carries no scores; make the pairs with "
            "'p2pz generate --score world|paper' (the shapes world is scored by default)"
        )
    rule.check_names(scores, f"pair {sample[fmt.KEY]!r} of {path.name}")
    return scores


def _score_stored_pair(
    sample: Mapping[str, Any], meta: Mapping[str, Any], path: Path, scorer: PairScorer
) -> Scores:
    from p2pz.data.pairs import sample as fmt
    from p2pz.teacher.edits import Edit

    edit = meta.get("edit") or {}
    if not edit.get("source") or not edit.get("target"):
        raise UserError(f"{path.name}: pair {sample[fmt.KEY]!r} does not say its edit; it cannot be scored")
    pair = fmt.decode_sample(sample)
    [scores] = PairSelection(scorer).score([pair.source], [pair.edited], Edit(edit["source"], edit["target"]))
    return scores


def _progress(items: list[Path], enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, unit="shard", desc="filter", dynamic_ncols=True)
