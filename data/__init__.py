"""Everything between the teacher and the student, one subpackage per part:

- ``shapes``: the shapes world (scenes, oracle, captioner, tokenizer, its edits and directions, the
  toy model's teacher settings), where pix2pix-zero can be scored on a CPU;
- ``models``: building teacher models: random-weight SD 1.x folders (``p2pz make-tiny``) and the
  toy model trained on the shapes world (shipped in ``toy_model/``);
- ``pairs``: the teacher mass-producing (input, edited) pairs into WebDataset shards, the sample
  format, and the reader that feeds them to training;
- ``eval``: metrics that score edits (the world's oracle metrics, the paper's metrics, the ablation).
"""

from p2pz.utils import require_namespace

require_namespace(__name__, "p2pz.data")
