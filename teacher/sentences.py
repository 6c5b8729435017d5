"""Sentence banks: many varied sentences that mention one concept ("cat"), to average its embedding.

pix2pix-zero builds its edit directions from ~1000 sentences per concept (README, Gradio app).
Three sources:

- ``template`` (offline default): built-in templates (subject, scene, action, style slots),
  sampled deterministically from a seed. The official app's "fixed-template" option warns that
  template directions can be entangled with the template words; ours use many more templates
  than its 10 backgrounds x 10 verbs to spread that out, and both concepts share the same draws.
- a text file, one sentence per line.
- ``llm``: FLAN-T5 through transformers (``google/flan-t5-xl``), with the official app's prompt
  and sampling settings, when its weights are available.

All sentences are cleaned the way the official app does: digits, '.', '-' and ')' removed
(never inside the concept word itself), lines under 10 characters dropped.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from p2pz.utils.errors import UserError

DEFAULT_LLM = "google/flan-t5-xl"
DEFAULT_NUM_SENTENCES = 1000  # the official app and the paper's reported bank size
MIN_CHARS = 10  # official app: shorter lines are dropped

# The official Gradio app's FLAN-T5 prompt and sampling settings.
LLM_PROMPT = (
    "Provide a caption for images containing a {word}. The captions should be in English and should be "
    "no longer than 150 characters. The caption must contain the word {word}. Caption:"
)
LLM_SAMPLING = dict(
    do_sample=True,
    temperature=0.95,
    num_return_sequences=16,
    max_length=128,
    min_length=15,
    eta_cutoff=1e-5,
)

# '{a}' is an article that agrees with the next word; '{w}' the concept; other slots are drawn
# from the lists below.
TEMPLATES = [
    "{a} {w}",
    "{a} photo of {a} {w}",
    "{a} photo of the {w}",
    "{a} close up photo of {a} {w}",
    "{a} blurry photo of {a} {w}",
    "{a} bright photo of {a} {w}",
    "{a} dark photo of {a} {w}",
    "{a} cropped photo of {a} {w}",
    "{a} good photo of {a} {w}",
    "{a} low resolution photo of {a} {w}",
    "{a} picture of {a} {w}",
    "{a} picture of {a} {adj} {w}",
    "{a} painting of {a} {w}",
    "{a} drawing of {a} {w}",
    "{a} sketch of {a} {w}",
    "{a} cartoon {w}",
    "{a} rendering of {a} {w}",
    "{a} {style} of {a} {w}",
    "{a} {style} of {a} {adj} {w}",
    "{a} {style} of {a} {w} {place}",
    "{a} {style} showing {a} {w} {action} {place}",
    "{a} {w} {place}",
    "{a} {adj} {w} {place}",
    "{a} {w} {action}",
    "{a} {adj} {w} {action}",
    "{a} {w} {action} {place}",
    "{a} {adj} {w} {action} {place}",
    "the {w} {place}",
    "the {w} is {action} {place}",
    "the {adj} {w} is {action}",
    "there is {a} {w} {place}",
    "there is {a} {adj} {w} {action} {place}",
    "here is {a} {w}",
    "this is {a} {w}",
    "this is {a} {adj} {w} {place}",
    "look at this {adj} {w}",
    "look at the {w} {action} {place}",
    "my {w} {action} {place}",
    "my {adj} {w}",
    "our {w} {place}",
    "someone's {w} {action}",
    "{a} {w} and its shadow {place}",
    "{a} {w} seen from above",
    "{a} {w} seen from the side",
    "{a} {w} seen from behind",
    "{a} {w} in the foreground, {place} behind it",
    "{a} {w} in front of a window",
    "{a} {w} next to a tree",
    "{a} {w} under a blue sky",
    "{a} {w} in the rain",
    "{a} {w} in the snow",
    "{a} {w} at night",
    "{a} {w} at sunset",
    "{a} {w} in the morning light",
    "{a} {w} on a sunny day",
    "{a} {w} on a cloudy day",
    "{a} {w} in soft light",
    "{a} {w} in the shade",
    "{a} {w} surrounded by flowers",
    "{a} {w} with a red background",
    "{a} {w} with a plain white background",
    "{a} {w} looking at the camera",
    "{a} {w} looking away",
    "{a} {w} facing left",
    "{a} {w} facing right",
    "{a} {w} in the center of the frame",
    "{a} {w} in the corner of the picture",
    "{a} small {w} in a big {room}",
    "{a} {w} in {a} {room}",
    "{a} {w} near the door of {a} {room}",
    "{a} {w} beside a chair",
    "{a} {w} on a wooden table",
    "{a} {w} on the grass",
    "{a} {w} on the sand",
    "{a} {w} by the water",
    "{a} {w} by the road",
    "{a} {w} in a garden",
    "{a} {w} in a park",
    "{a} {w} in a field",
    "{a} {w} in a forest",
    "{a} {w} in the city",
    "{a} {w} on a street",
    "{a} {w} on a beach",
    "{a} {w} in the mountains",
    "{a} {w} in a studio",
    "{a} {w} indoors",
    "{a} {w} outdoors",
    "{a} {w} all alone",
    "{a} {w} with friends",
    "{a} {w} with a person",
    "{a} {w} that is {action}",
    "{a} {w} which is very {adj}",
    "{a} very {adj} {w}",
    "one {w} {action}",
    "just {a} {w}",
    "{a} single {w} {place}",
    "{a} {w}, {style}",
    "{a} {w}, {adj} and {adj2}",
    "{a} {adj} and {adj2} {w}",
    "{a} {w} {action}, {style}",
    "{style} of {a} {w}",
    "portrait of {a} {w}",
    "portrait of {a} {adj} {w} {place}",
    "close up of {a} {w}",
    "close up of the face of {a} {w}",
    "detail of {a} {w}",
    "snapshot of {a} {w} {action}",
    "candid shot of {a} {w}",
    "wide shot of {a} {w} {place}",
    "{a} {w} photographed {place}",
    "{a} {w} captured {action}",
    "{a} family photo with {a} {w}",
    "{a} postcard with {a} {w}",
    "{a} poster of {a} {w}",
    "{a} magazine photo of {a} {w}",
    "{a} {w} in an old photograph",
    "{a} {w} in a children's book",
    "{a} {w} in a video game",
    "an image containing {a} {w}",
    "an image of {a} {w} {place}",
    "an illustration of {a} {w}",
    "an artwork showing {a} {w}",
    "an everyday scene with {a} {w}",
    "i took a picture of {a} {w}",
    "we saw {a} {w} {place}",
    "what a {adj} {w}",
]

ADJECTIVES = (
    "small big little large young old cute fluffy calm happy sleepy curious beautiful funny "
    "friendly lazy wet clean dirty colorful bright dark lonely proud tiny huge graceful strong"
).split()
ACTIONS = [
    "sitting", "standing", "lying down", "running", "walking", "jumping", "sleeping", "resting",
    "playing", "looking around", "waiting", "eating", "drinking water", "posing", "hiding",
    "turning around", "staring", "relaxing",
]  # fmt: skip
PLACES = [
    "on a couch", "on the floor", "on a bed", "in the grass", "on the beach", "in the snow",
    "in a garden", "in the kitchen", "in a living room", "on a street", "in a park", "by a lake",
    "in a field", "in a forest", "near a fence", "on a rug", "on a wooden floor", "in a doorway",
    "on a sidewalk", "under a tree", "next to a window", "in the sun", "in a backyard", "at home",
]  # fmt: skip
STYLES = [
    "photo", "photograph", "picture", "painting", "oil painting", "watercolor", "drawing",
    "pencil sketch", "illustration", "digital art", "black and white photo", "close up photo",
    "snapshot", "3d render", "film still",
]  # fmt: skip
ROOMS = ["room", "kitchen", "bedroom", "living room", "hallway", "office", "garage", "studio"]

_ARTICLE = "\x00A\x00"  # placeholder, fixed to 'a'/'an' after filling


def _fix_articles(text: str) -> str:
    def repl(m: re.Match) -> str:
        return ("an " if m.group(1)[:1].lower() in "aeiou" else "a ") + m.group(1)

    text = re.sub(re.escape(_ARTICLE) + r" (\S+)", repl, text)
    return text.replace(_ARTICLE, "a")


def clean_sentence(sentence: str, word: str = "") -> str:
    """The official app's cleaning: drop digits, '.', '-', ')'; keep ``word`` itself intact."""
    pieces = sentence.split(word) if word else [sentence]
    pieces = [re.sub(r"[\d.\-)]", "", p) for p in pieces]
    return re.sub(r"\s+", " ", word.join(pieces) if word else pieces[0]).strip()


def clean_sentences(sentences: list[str], word: str = "") -> list[str]:
    out = (clean_sentence(s, word) for s in sentences)
    return [s for s in out if len(s) >= MIN_CHARS]


def template_sentences(word: str, n: int = DEFAULT_NUM_SENTENCES, seed: int = 0) -> list[str]:
    """``n`` sentences from the built-in templates, each containing ``word``; same seed, same list.

    The draws depend only on ``seed`` and ``n``, not on ``word``: the source and target banks of
    one direction use the same contexts, so their difference is mostly the concept itself.
    """
    word = word.strip()
    if not word:
        raise UserError("the concept word is empty")
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        adj, adj2 = rng.sample(ADJECTIVES, 2)
        text = rng.choice(TEMPLATES).format(
            a=_ARTICLE, w=word, adj=adj, adj2=adj2, action=rng.choice(ACTIONS),
            place=rng.choice(PLACES), style=rng.choice(STYLES), room=rng.choice(ROOMS),
        )  # fmt: skip
        text = clean_sentence(_fix_articles(text), word)
        attempts += 1
        # Prefer new sentences; once the space looks exhausted, allow repeats to reach n.
        if text in seen and attempts < 20 * n:
            continue
        seen.add(text)
        out.append(text)
    return out


def read_sentences(path: str | os.PathLike, word: str = "") -> list[str]:
    """Sentences from a text file, one per line (blank lines skipped), cleaned."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sentence file '{path}' does not exist; give a text file with one sentence per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"sentence file '{path}' is not UTF-8 text") from err
    sentences = clean_sentences([line.strip() for line in lines if line.strip()], word)
    if not sentences:
        raise UserError(
            f"sentence file '{path}' has no usable sentences (each needs {MIN_CHARS}+ characters)"
        )
    return sentences


def llm_sentences(
    word: str,
    n: int = DEFAULT_NUM_SENTENCES,
    seed: int = 0,
    model: str | os.PathLike = DEFAULT_LLM,
    device: Any = "cpu",
    dtype: Any = None,
    max_rounds: int | None = None,
    progress: bool = True,
    **generate_overrides: Any,
) -> list[str]:
    """``n`` sentences sampled from a FLAN-T5-style seq2seq model with the official app's prompt.

    Sampling follows ``LLM_SAMPLING`` (the official app's settings); ``generate_overrides``
    replace single values (e.g. a shorter ``max_length`` for a quick run). Sentences that lack
    the word get ``", {word}"`` appended (the official app's rule for its GPT-3 generator), so
    every sentence mentions the concept. Same seed, same sentences.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from p2pz.teacher.models import from_pretrained_or_explain, parse_dtype, resolve_model

    source = resolve_model(model)
    dtype = parse_dtype(dtype)
    tokenizer = from_pretrained_or_explain(AutoTokenizer, source)
    lm = from_pretrained_or_explain(AutoModelForSeq2SeqLM, source, dtype=dtype).to(device).eval()
    inputs = tokenizer(LLM_PROMPT.format(word=word), return_tensors="pt").to(device)
    out: list[str] = []
    sampling = {**LLM_SAMPLING, **generate_overrides}
    max_rounds = max_rounds or 4 * (n // sampling["num_return_sequences"] + 1)
    with (
        seeded_on(device, seed),
        torch.no_grad(),
        tqdm(total=n, desc=f"sentences for '{word}'", leave=False, disable=not progress) as bar,
    ):
        for _ in range(max_rounds):
            ids = lm.generate(**inputs, **sampling)
            texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
            texts = [t if word in t else f"{t.strip()}, {word}" for t in texts]
            new = clean_sentences(texts, word)[: n - len(out)]
            out += new
            bar.update(len(new))
            if len(out) >= n:
                break
    if len(out) < n:
        raise UserError(f"the language model '{model}' gave only {len(out)} usable sentences for '{word}'")
    return out


@contextlib.contextmanager
def seeded_on(device: Any, seed: int) -> Iterator[None]:
    """Seed the CPU's generator and ``device``'s own one for this block, and restore both after.

    ``torch.manual_seed`` would reseed every CUDA device (or queue that for when CUDA starts) and leave
    them so; ``fork_rng`` over the one device in use leaves the caller's random streams as they were.
    """
    import torch

    device = torch.device(device)
    if device.type in ("cpu", "meta"):
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
        return
    module = torch.get_device_module(device.type)
    index = module.current_device() if device.index is None else device.index
    with torch.random.fork_rng(devices=[index], device_type=device.type), module.device(index):
        torch.random.default_generator.manual_seed(seed)
        module.manual_seed(seed)  # the current device's generator only, not manual_seed_all
        yield


def make_sentences(
    word: str,
    source: str | os.PathLike = "template",
    n: int = DEFAULT_NUM_SENTENCES,
    seed: int = 0,
    llm: str | os.PathLike = DEFAULT_LLM,
    device: Any = "cpu",
    progress: bool = True,
) -> list[str]:
    """A sentence bank for ``word`` from ``source``: 'template', 'llm', or a text-file path.

    ``n`` applies to generated banks; a file gives all of its sentences. ``progress``: the llm's bar.
    """
    if str(source) == "template":
        return template_sentences(word, n, seed)
    if str(source) == "llm":
        return llm_sentences(word, n, seed, llm, device, progress=progress)
    return read_sentences(source, word)
