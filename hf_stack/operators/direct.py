"""G_direct: depth = G_stack (every target layer copies a source layer); width = function-preserving neuron
splitting (Net2Net / bert2BERT, done as HyperCloning: whole heads and GQA groups copied, RMSNorm corrected).

Du et al., "Stacking Your Transformers", NeurIPS 2024, https://arxiv.org/abs/2405.15319
"""

from ..plans.width import split_axes
from .registry import Growth, Operator, copy_all, register_operator

DIRECT = register_operator(
    Operator(
        name="direct",
        paper="https://arxiv.org/abs/2405.15319",
        depth=Growth(
            "G↑direct (G_stack)", False, "target layer i copies source layer layer_map[i] (`stack` is its alias)"
        ),
        width=Growth(
            "G→direct (split)",
            True,
            "new hidden units, whole heads (with their GQA group) and FFN units copy old ones; readers of a copied "
            "unit are divided among the copies and RMSNorm is rescaled, so the logits are unchanged",
        ),
        layer_ops=copy_all,
        width_axes=split_axes,
    )
)
