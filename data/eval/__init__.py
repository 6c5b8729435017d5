"""Scoring edits: ``p2pz eval`` and the ablation of ``benchmarks/toy_ablation.py``.

- ``world_metrics``: edits of shapes-world scenes, scored against the scene's ground truth with
  the oracle: edit success, mask IoU, centre shift, PSNR outside the edited object;
- ``paper_metrics``: the paper's metrics for real images (CLIP-Acc, background LPIPS,
  Structure Dist), computed with transformers / lpips models loaded by id or path;
- ``ablation``: word swap vs edit directions vs directions with cross-attention guidance, the
  three rows of the paper's ablation, run with the teacher on world scenes;
- ``commands``: the ``p2pz eval`` subcommand.
"""
