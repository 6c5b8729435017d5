"""``p2pz`` subcommands of the teacher's preparation stages: ``make-tiny`` and ``direction``.

Heavy imports (torch, diffusers, transformers) stay inside the command functions so that
``p2pz --help`` is fast.
"""

from __future__ import annotations

import argparse

from p2pz.cli.options import add_device, add_dtype, add_edit, add_progress, add_seed, add_source_target
from p2pz.utils.values import positive_int

_FMT = argparse.RawDescriptionHelpFormatter


def _make_tiny(args: argparse.Namespace) -> int:
    from pathlib import Path

    from p2pz.data.models.tiny import make_tiny
    from p2pz.utils.errors import UserError

    out = Path(args.out)
    # OUT is replaced: never a file, nor a folder that holds something other than a model
    if out.exists() and not out.is_dir():
        raise UserError(
            f"{out} is a file; give a new folder path for the model (it is replaced if it exists)"
        )
    if out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        raise UserError(
            f"{out} is a folder that holds no Stable Diffusion model (no model_index.json) and make-tiny "
            "would replace it; give a new folder path or an earlier make-tiny folder"
        )
    out = make_tiny(out, seed=args.seed, architecture=args.architecture)
    print(out)
    return 0


def _direction(args: argparse.Namespace) -> int:
    from pathlib import Path

    from p2pz.cli.options import source_target
    from p2pz.teacher.directions import compute_direction
    from p2pz.teacher.models import load_sd_components
    from p2pz.teacher.sentences import make_sentences, read_sentences
    from p2pz.utils.devices import resolve_device
    from p2pz.utils.errors import UserError

    if len(args.sentences) > 2:
        raise UserError("--sentences takes one source for both concepts or two (source's, target's)")
    source, target = source_target(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the direction file")
    banks = args.sentences * (2 // len(args.sentences))
    words = (source, target)
    if any(bank in ("template", "llm") for bank in banks):  # the words make the sentences
        from p2pz.data.shapes.edits import check_edit_vocabulary
        from p2pz.teacher.edits import Edit

        check_edit_vocabulary(Edit(source, target), args.model)
    from_files: dict[int, list[str]] = {}
    for i, bank in enumerate(banks):  # read sentence files before loading any model
        if bank in ("template", "llm"):
            continue
        if Path(bank).is_dir():
            raise UserError(
                f"sentence file '{bank}' is a folder; give a text file with one sentence per line"
            )
        if not Path(bank).exists():
            raise UserError(f"sentence file '{bank}' does not exist; use template, llm or a text file")
        from_files[i] = read_sentences(bank, words[i])  # empty, binary: one line naming the file
    device = resolve_device(args.device)
    sd = load_sd_components(args.model, device, args.dtype, components=("tokenizer", "text_encoder"))
    per_concept = []
    for i, (word, bank) in enumerate(zip(words, banks)):
        if i in from_files:
            per_concept.append(from_files[i])
            continue
        sentences = make_sentences(
            word, bank, args.num_sentences, args.seed, args.llm, device, progress=args.progress
        )
        per_concept.append(sentences)
    direction = compute_direction(
        sd.tokenizer,
        sd.text_encoder,
        per_concept[0],
        per_concept[1],
        source=source,
        target=target,
        batch_size=args.batch_size,
        progress=args.progress,
        model=str(args.model),
        metadata={
            "source_sentences": banks[0],
            "target_sentences": banks[1],
            "seed": args.seed,
            **({"llm": args.llm} if "llm" in banks else {}),
        },
    )
    path = direction.save(out / f"{direction.name}.safetensors")
    print(f"{path}  norm={direction.norm:.4g}  shape={list(direction.tensor.shape)}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "make-tiny",
        help="write a tiny random-weight Stable Diffusion folder (+ BLIP captioner) for tests and demos",
        description=(
            "Write a complete diffusers-format Stable Diffusion 1.x folder (model_index.json, unet, vae,\n"
            "text_encoder, tokenizer, scheduler) with tiny random weights drawn from --seed, plus a tiny\n"
            "BLIP captioner in OUT/captioner. Built offline in seconds; the same seed writes the same\n"
            "bytes. It draws noise, not pictures: use it to try the commands and to run the tests.\n"
            "--architecture sd14 writes the same layout at Stable Diffusion 1.4's real size (UNet 860 M\n"
            "parameters, CLIP ViT-L/14 text encoder, SD VAE, PNDM scheduler config, BLIP-base-size\n"
            "captioner) in fp16, about 2.6 GB: dry runs of the real path's shapes, dtypes and memory.\n\n"
            "example:\n"
            "  p2pz make-tiny models/tiny\n"
            "  p2pz make-tiny models/sd14-random --architecture sd14\n"
            "  p2pz direction --model models/tiny --edit cat:dog --out directions/"
        ),
        formatter_class=_FMT,
    )
    p.add_argument("out", metavar="OUT", help="folder to write (replaced if it exists)")
    add_seed(p, "the random weights")
    p.add_argument(
        "--architecture",
        choices=("tiny", "sd14"),
        default="tiny",
        help="tiny (a few channels, seconds) or sd14 (SD-1.4 + BLIP-base sizes, fp16; default: tiny)",
    )
    p.set_defaults(func=_make_tiny)

    from p2pz.teacher.models import DEFAULT_MODEL
    from p2pz.teacher.sentences import DEFAULT_LLM, DEFAULT_NUM_SENTENCES

    p = subparsers.add_parser(
        "direction",
        help="compute an edit direction (e.g. cat -> dog) from two sentence banks",
        description=(
            "Compute a pix2pix-zero edit direction: embed many sentences about each concept with the\n"
            "model's CLIP text encoder, average the per-token last hidden state (77 x D) per concept and\n"
            "take target - source. Writes OUT/SOURCE-TARGET.safetensors with metadata (model, text-\n"
            "encoder fingerprint, sentence counts) and prints its path and norm.\n\n"
            "sentence banks (--sentences, one value for both concepts or two: source's then target's):\n"
            "  template  built-in templates, offline, deterministic from --seed (default)\n"
            "  llm       sample with a FLAN-T5 model (--llm; needs its weights)\n"
            "  FILE      a text file with one sentence per line\n\n"
            "examples:\n"
            "  p2pz direction --model models/tiny --edit cat:dog --out directions/\n"
            "  p2pz direction --edit horse:zebra --sentences llm --out directions/\n"
            "  p2pz direction --edit cat:dog --sentences cats.txt dogs.txt --out directions/"
        ),
        formatter_class=_FMT,
    )
    add_edit(p, help="the edit, e.g. cat:dog (or --source cat --target dog)")
    add_source_target(p)
    p.add_argument("--out", required=True, metavar="DIR", help="folder for SOURCE-TARGET.safetensors")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="PATH_OR_ID",
        help=f"Stable Diffusion folder or Hugging Face id (default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--sentences",
        nargs="+",
        default=["template"],
        metavar="BANK",
        help="template, llm or FILE; one for both concepts or two (default: template)",
    )
    p.add_argument(
        "--num-sentences",
        type=positive_int,
        default=DEFAULT_NUM_SENTENCES,
        help=f"sentences per concept for template/llm banks (default: {DEFAULT_NUM_SENTENCES})",
    )
    add_seed(p, "the template draws / LLM sampling")
    p.add_argument(
        "--llm", default=DEFAULT_LLM, metavar="PATH_OR_ID", help=f"model for llm banks ({DEFAULT_LLM})"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=16, help="sentences per text-encoder batch (default: 16)"
    )
    add_device(p)
    add_dtype(p)
    add_progress(p)
    p.set_defaults(func=_direction)
