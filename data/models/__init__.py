"""Building teacher models without downloads: a random-weight SD 1.x + BLIP folder from configs
(``tiny``, ``p2pz make-tiny``), and the toy text-to-image model trained on the shapes world
(``train_toy``; its weights ship in ``data/toy_model``) with its oracle check (``evaluate_toy``)."""

from pathlib import Path

TOY_MODEL = Path(__file__).resolve().parents[1] / "toy_model"
"""The shipped toy model (``data/toy_model``): the default teacher of the demo, eval and ablation."""
