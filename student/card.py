"""The package's model card: ``README.md`` with the Hub's YAML front matter, body from a jinja2 template.

The front matter (``huggingface_hub.ModelCardData``): license, ``library_name: p2pz``,
``pipeline_tag: image-to-image``, tags, and ``base_model`` when the teacher is a Hub model. The body
says the edit, the teacher's settings, the pairs (count and manifest digest), the training steps, the
held-out metrics (``config["eval"]``, from ``p2pz export --eval``), the latency table (``config["bench"]``)
and the image grid (``grid.png``: input | teacher | student) when the package holds them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

GRID = "grid.png"
TAGS = ["p2pz", "pix2pix-zero", "image-to-image", "distillation", "comodgan"]

TEMPLATE = """
# {{ title }}

A single-pass student of a [pix2pix-zero](https://arxiv.org/abs/2302.03027) edit: **{{ edit_text }}**.
It was distilled from the teacher's (input, edit) pairs into a CoModGAN-style generator that edits a
{{ resolution }} px image in one forward pass.

```python
from p2pz import Student

student = Student.from_pretrained("{{ repo_hint }}")  # a folder or a Hub repo id
{% if first_edit %}y = student(x, edit=student.edit_vector("{{ first_edit }}"))  # one of its edits
{% else %}y = student(x)  # x: [N, 3, {{ resolution }}, {{ resolution }}] in [-1, 1]
{% endif %}```

or `p2pz apply {{ repo_hint }} photos/ --out edited/{{ " --edit " ~ first_edit if first_edit else "" }}`.

## Teacher

| setting | value |
|---|---|
{% for key, value in teacher_rows %}| {{ key }} | {{ value }} |
{% endfor %}
## Training data and training

| | |
|---|---|
| pairs (held-out shards included) | {{ num_pairs }} in {{ num_shards }} shard(s) |
| manifest digest (sha256) | `{{ digest }}` |
| held-out shards (never trained on) | {{ held_out }} |
| training steps | {{ steps }} |
| student | `{{ preset }}` generator, {{ resolution }} px |

## Held-out metrics
{% if eval %}
Scored by `p2pz eval --student` on {{ eval.n }} held-out pairs ({{ eval.pairs_source }}); PSNR and SSIM on
8-bit images, LPIPS{{ " (" ~ eval.lpips_net ~ ")" if eval.lpips_net else "" }} lower is closer.

| | PSNR (dB) | SSIM | LPIPS |
|---|---|---|---|
{% for row in eval_rows %}| {{ row.name }} | {{ row.psnr }} | {{ row.ssim }} | {{ row.lpips }} |
{% endfor %}{% if oracle_rows %}
The shapes world's oracle on the same pairs:

| | {% for k in oracle_keys %}{{ k }} | {% endfor %}
|---|{% for k in oracle_keys %}---|{% endfor %}
{% for name, cells in oracle_rows %}| {{ name }} | {% for c in cells %}{{ c }} | {% endfor %}
{% endfor %}{% endif %}{% else %}
Not measured: export with `p2pz export --eval` (or run `p2pz eval --student`).
{% endif %}
{% if grid %}![input | teacher | student](grid.png)

Held-out pairs, one per row: input | teacher | student.
{% endif %}
## Latency
{% if bench_rows %}
Measured by `p2pz bench` on {{ bench.device }} (p50 ms per call):

| backend | {% for b in bench_batches %}batch {{ b }} | {% endfor %}
|---|{% for b in bench_batches %}---|{% endfor %}
{% for name, cells in bench_rows %}| {{ name }} | {% for c in cells %}{{ c }} | {% endfor %}
{% endfor %}{% if bench.teacher_ms %}
The teacher's edit: {{ "%.0f" | format(bench.teacher_ms) }} ms.
{% endif %}{% else %}
Not measured here: `p2pz bench {{ repo_hint }}`.
{% endif %}
## Limits

The student learned one edit from one teacher's pairs: it is as good as those pairs, at
{{ resolution }} px, and does nothing useful on other edits. Files: `model.safetensors` (weights),
`config.json` (architecture and provenance){% for f in extra_files %}, `{{ f }}`{% endfor %}.
"""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def hub_model_id(model: Any) -> str | None:
    """``model`` when it names a Hub repo (``user/name``, not a local folder), else None."""
    if not isinstance(model, str) or os.path.exists(model):
        return None
    parts = model.split("/")
    ok = len(parts) == 2 and all(parts) and not model.startswith((".", "~", "/"))
    return model if ok else None


def _teacher_rows(config: dict[str, Any]) -> list[tuple[str, str]]:
    teacher = (config.get("data") or {}).get("teacher") or {}
    rows = [("model", teacher.get("model") or config.get("teacher_model") or "not recorded")]
    rows.append(("preset", teacher.get("preset") or "n/a"))
    settings = (teacher.get("settings") or {}) | (teacher.get("overrides") or {})
    for key, value in sorted(settings.items()):
        if key not in ("model", "device", "dtype", "captioner") and isinstance(
            value, (int, float, str, bool)
        ):
            rows.append((key, _fmt(value)))
    return rows


def _eval_rows(ev: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for name, key in (
        ("student vs teacher", "to_teacher"),
        ("input vs teacher (copying)", "copy_to_teacher"),
    ):
        scores = ev.get(key) or {}
        if scores:
            rows.append({"name": name, **{m: _fmt(scores.get(m)) for m in ("psnr", "ssim", "lpips")}})
    return rows


def _oracle_rows(ev: dict[str, Any]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    oracle = ev.get("oracle") or {}
    keys = [k for k, v in (oracle.get("student") or {}).items() if isinstance(v, (int, float))][:6]
    return keys, [(who, [_fmt((oracle.get(who) or {}).get(k)) for k in keys]) for who in oracle]


def _bench_rows(bench: dict[str, Any]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    student = bench.get("student") or {}
    batches = sorted({b for r in student.values() for b in r}, key=int)
    rows = [(name, [_fmt((r.get(b) or {}).get("p50_ms")) for b in batches]) for name, r in student.items()]
    return batches, rows


def card_data(config: dict[str, Any]) -> Any:
    """The card's YAML front matter."""
    from huggingface_hub import ModelCardData

    edit = (config.get("data") or {}).get("edit") or {}
    tags = list(TAGS)
    if edit.get("source") and edit.get("target"):
        tags.append(f"{edit['source']}-to-{edit['target']}")
    base = hub_model_id(
        ((config.get("data") or {}).get("teacher") or {}).get("model") or config.get("teacher_model")
    )
    data = ModelCardData(license="mit", library_name="p2pz", pipeline_tag="image-to-image", tags=tags)
    if base:
        data.base_model = base
    return data


def render_card(
    config: dict[str, Any], folder: str | os.PathLike | None = None, repo_id: str | None = None
) -> Any:
    """The ``huggingface_hub.ModelCard`` of a package's ``config``; ``folder`` is looked at for the grid."""
    from huggingface_hub import ModelCard
    from jinja2 import Environment

    data = config.get("data") or {}
    edit = data.get("edit") or {}
    source, target = edit.get("source"), edit.get("target")
    edit_text = f"{source} → {target}" if source and target else "an edit (not recorded)"
    edits = [f"{e['source']}:{e['target']}" for e in (config.get("edits") or {}).values()]
    if edits:  # one student for many edits
        source, target = None, None
        edit_text = f"one student for {len(edits)} edits, " + ", ".join(e.replace(":", " → ") for e in edits)
    split = data.get("split") or {}
    held_out = [Path(u).name for u in split.get("val_shards") or []]
    ev = config.get("eval") or {}
    bench = config.get("bench") or {}
    batches, bench_rows = _bench_rows(bench)
    files = config.get("files") or {}
    body = (
        Environment(trim_blocks=False, autoescape=False)
        .from_string(TEMPLATE)
        .render(
            title=f"p2pz student: {source}-to-{target}" if source and target else "p2pz student",
            first_edit=edits[0] if edits else None,
            edit_text=edit_text,
            repo_hint=repo_id or "path/to/this/folder",
            resolution=config.get("resolution"),
            teacher_rows=_teacher_rows(config),
            num_pairs=_fmt(data.get("num_pairs")),
            num_shards=_fmt(data.get("num_shards")),
            digest=data.get("manifest_digest") or "n/a",
            held_out=", ".join(held_out) if held_out else "none recorded",
            steps=_fmt((config.get("training") or {}).get("step")),
            preset=(config.get("generator") or {}).get("preset"),
            eval=ev,
            eval_rows=_eval_rows(ev),
            oracle_keys=_oracle_rows(ev)[0],
            oracle_rows=_oracle_rows(ev)[1],
            grid=folder is not None and (Path(folder) / GRID).is_file(),
            bench=bench,
            bench_batches=batches,
            bench_rows=bench_rows,
            extra_files=[files[k] for k in ("pt2", "onnx") if k in files],
        )
    )
    return ModelCard(f"---\n{card_data(config).to_yaml()}\n---\n{body.lstrip()}")


def write_card(folder: str | os.PathLike, config: dict[str, Any], repo_id: str | None = None) -> Path:
    """``folder/README.md``: the card of ``config``."""
    from p2pz.student.package import CARD

    path = Path(folder) / CARD
    render_card(config, folder, repo_id).save(path)
    return path


def push_to_hub(
    folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None
) -> str:
    """Upload a package folder to the Hub repo ``repo_id`` (created when missing); the card's usage lines
    name the repo. Returns the commit's URL."""
    from huggingface_hub import HfApi

    from p2pz.student.package import read_config

    folder = Path(folder)
    write_card(folder, read_config(folder), repo_id=repo_id)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=folder, repo_type="model", commit_message="p2pz export --push-to-hub"
    )
    return str(getattr(commit, "commit_url", commit))
