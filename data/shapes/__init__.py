"""The shapes world: a small world where pix2pix-zero's edits can be scored on a CPU.

- ``world``: seeded 64×64 scenes (shapes of colours on plain, gradient or striped backgrounds),
  rendered with per-object masks and captioned in plain English;
- ``oracle``: reads each object's shape, colour, mask and centre, and the background, back from
  an image;
- ``tokenizer``: an offline CLIP tokenizer giving every caption word one token;
- ``captioner``: the oracle behind BLIP's interface, so editing stays prompt-free;
- ``train_toy``: trains the toy text-to-image model shipped in ``data/toy_model``;
- ``evaluate_toy``: checks a toy model's generations and plain word-swap edits with the oracle.
"""
