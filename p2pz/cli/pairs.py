"""``p2pz generate`` (the teacher's pairs into shards) and ``p2pz shards inspect``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_generate(subparsers)
    _register_shards(subparsers)


def _generate(args: argparse.Namespace) -> int:
    from p2pz.data.pairs.generate import resolve_settings, run

    settings = resolve_settings(args)
    done = run(settings)
    print(
        f"task {done['task_index']}/{done['num_tasks']}: wrote {done['shards_written']} shards, "
        f"{done['samples_written']} pairs ({done['skipped']} skipped) to {settings.out}"
    )
    return 0


def _register_generate(subparsers: argparse._SubParsersAction) -> None:
    from p2pz.data.pairs.generate import add_arguments

    parser = subparsers.add_parser(
        "generate",
        help="make (input, edit) pairs with the teacher into WebDataset shards",
        description=(
            "Run the pix2pix-zero teacher over many inputs and store (input, edited) pairs as\n"
            "WebDataset shards pairs-000000.tar, ... in --out, with dataset.json and one manifest\n"
            "(JSON lines: shards, counts, skipped inputs and why, throughput) per task.\n\n"
            "Every setting can come from a YAML config (--config, keys = flag names) and be\n"
            "overridden by its flag. Safe to kill and re-run: finished shards are kept, unfinished\n"
            "ones redone, giving exactly the samples of an uninterrupted run. On a cluster, run one\n"
            "task per array index (--task-index/--num-tasks, default SLURM_ARRAY_TASK_ID/COUNT)."
        ),
        epilog=(
            "examples:\n"
            "  p2pz generate --model CompVis/stable-diffusion-v1-4 --edit cat:dog \\\n"
            "      --inputs photos/ --out pairs/\n"
            "  p2pz generate --config configs/generate-cat-dog.yaml --task-index 3 --num-tasks 16\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=_generate)


def _inspect(args: argparse.Namespace) -> int:
    from p2pz.data.pairs.inspect import SHEET_NAME, contact_sheet, format_summary, summarise
    from p2pz.utils.atomic import atomic_path

    summary = summarise(args.folder, sheet_pairs=args.pairs)
    pairs = summary.pop("_sheet")
    sheet_path = None
    if args.pairs > 0 and pairs:
        sheet_path = Path(args.sheet) if args.sheet else Path(args.folder) / SHEET_NAME
        with atomic_path(sheet_path, suffix=".png") as tmp:
            contact_sheet(pairs).save(tmp, format="PNG")
    summary["contact_sheet"] = str(sheet_path) if sheet_path else None
    if args.json:
        print(json.dumps(summary, indent=2, default=list))
    else:
        print(format_summary(summary))
        if sheet_path:
            print(f"  sheet       {sheet_path} ({len(pairs)} pairs)")
    return 0


def _register_shards(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "shards",
        help="look at generated datasets (see 'p2pz shards inspect')",
        description="Tools for the WebDataset shards that 'p2pz generate' writes.",
    )
    sub = parser.add_subparsers(dest="shards_command", metavar="ACTION", required=True)
    inspect = sub.add_parser(
        "inspect",
        help="summarise a dataset and draw a contact sheet of a few pairs",
        description="Count shards, pairs, edits and skipped inputs of a 'p2pz generate' output folder, show "
        "the teacher settings used, and save a contact sheet PNG (input | edit | reconstruction).",
    )
    inspect.add_argument("folder", metavar="DIR", help="the --out folder of 'p2pz generate'")
    inspect.add_argument(
        "--pairs", type=int, default=8, help="pairs on the contact sheet (0: none; default 8)"
    )
    inspect.add_argument(
        "--sheet", metavar="PNG", help="where to save the contact sheet (default DIR/contact-sheet.png)"
    )
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(func=_inspect)
