"""The teacher's settings for the toy model, where they differ from the presets' SD-1.4 values.

From a sweep on the world (20-100 scenes, 20 and 50 DDIM steps, CFG 2-5, guidance step 0.1-300;
figures in the closing notes of the shapes-world issue and ``benchmarks/toy_ablation.py``):

- The guidance loss sums squared map differences over layers, heads, tokens and map sizes, so the
  scale of its gradient is the model's: about 3e-4 per latent element here, where the official step
  0.1 (tuned on SD-1.4) moves nothing. A step of 20 keeps shape edits in place (IoU 0.84, centre
  shift 0.6 px at 50 steps); colour edits trade success against structure around 10-20.
- CFG 5 with the caption as negative prompt amplifies the edit five times and regenerates colour
  edits from scratch (objects move ~25 px) whatever the guidance; CFG 3 keeps them in reach.
- Directions come from the world's own captions (``data.eval.ablation.world_direction``): the
  built-in sentence templates are mostly words the toy model never saw.

Same teacher code, same presets: these are the values to pass as ``xa_guidance`` and
``guidance_scale`` when the teacher is the toy model.
"""

TOY_XA_GUIDANCE = 20.0
TOY_GUIDANCE_SCALE = 3.0
