"""G_learn (LiGO, Wang et al., 2023, arXiv 2303.00980): learned width and depth maps from the source weights.

Width maps B (target units x source units) per role: one for the hidden size (embedding, norms, every
projection's hidden side, lm_head), one each for query, key and value outputs, one for the attention output
read by `o_proj` (separate from the value map, so GQA works) and one for FFN units. Depth maps D (target layers x
source layers), one per parameter of a layer. Target layer l's parameter is sum_i D[l, i] * B_out P_i B_in^T.
Initialised so depth is stacking through the layer map and width is the identity on old units (new rows random,
as the paper's code); then trained with the LM loss while the source weights stay frozen, and materialised into
a plain checkpoint.

The maps' training loop lives with the other tensor builders, in `hf_stack.checkpoints.ligo`.
"""

from __future__ import annotations

from ..plans.width import random_new_axes
from .registry import Growth, Operator, copy_all, register_operator

LEARN = register_operator(
    Operator(
        name="learn",
        paper="https://arxiv.org/abs/2303.00980",
        depth=Growth("G↑learn", False, "LiGO depth maps (init: stacking) trained with the LM loss, source frozen"),
        width=Growth(
            "G→learn", False, "LiGO width maps (init: identity on old units) trained with the LM loss, source frozen"
        ),
        layer_ops=copy_all,
        width_axes=random_new_axes,  # shapes and old units for the plan; the learned maps give the values
        needs_data=True,
    )
)
