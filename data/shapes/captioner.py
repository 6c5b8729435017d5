"""A captioner for the shapes world, used through the same interface as BLIP.

The teacher loads a captioner folder; when the folder holds ``captioner.json`` naming a class
(``{"class": "p2pz.data.shapes.captioner:ShapesCaptioner"}``), it imports that class and calls
``from_pretrained(folder)``. Instances turn a list of images into a list of captions, which the
oracle writes from what it reads: "a red circle on a white background".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

from p2pz.data.shapes import oracle
from p2pz.data.shapes.world import SHAPES, SIZE, TOY_SHAPES

CLASS_PATH = "p2pz.data.shapes.captioner:ShapesCaptioner"


class ShapesCaptioner:
    """Captions shapes-world images by reading them with the oracle.

    ``shapes`` limits the templates the oracle may choose from (the toy model only draws circles,
    squares and triangles, so its captioner never says "diamond").
    """

    def __init__(self, shapes: tuple[str, ...] = SHAPES):
        unknown = set(shapes) - set(SHAPES)
        if unknown:
            raise ValueError(f"unknown shapes {sorted(unknown)}; known: {', '.join(SHAPES)}")
        self.shapes = tuple(shapes)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> ShapesCaptioner:
        config = json.loads((Path(folder) / "captioner.json").read_text())
        return cls(shapes=tuple(config.get("shapes", SHAPES)))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"class": CLASS_PATH, "shapes": list(self.shapes)}
        (folder / "captioner.json").write_text(json.dumps(config, indent=1) + "\n")

    def __call__(self, images: list[Image.Image]) -> list[str]:
        captions = []
        for image in images:
            image = image.convert("RGB")
            if image.size != (SIZE, SIZE):
                image = image.resize((SIZE, SIZE), Image.Resampling.BOX)
            reading = oracle.read(image, shapes=self.shapes)
            # Name objects left to right, as a person describing the picture would.
            reading.objects.sort(key=lambda o: o.centre[0])
            captions.append(reading.caption)
        return captions


def write_captioner_folder(folder: str | os.PathLike, shapes: tuple[str, ...] = TOY_SHAPES) -> None:
    """The captioner folder shipped next to the toy model."""
    ShapesCaptioner(shapes).save_pretrained(folder)
