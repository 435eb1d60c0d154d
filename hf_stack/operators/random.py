"""G_random: new layers and units are randomly initialised like the target architecture's own init
(normal(0, initializer_range) weights, unit norms, zero biases); the source fills the old parts.

The paper uses it with MSG's masks (Yao et al., 2023, arXiv 2305.02869): new parts ramped in from 0 to 1
during training, which `StackingTrainingArguments(mask_steps=...)` applies; at growth time the written
checkpoint itself is not function preserving.
"""

from ..plans.width import random_new_axes
from .registry import Growth, Operator, register_operator, repeats


def _random_repeats(target_layer: int, layer_map: tuple[int, ...]) -> dict[str, str]:
    return {"*": "random"} if target_layer in repeats(layer_map) else {}


RANDOM = register_operator(
    Operator(
        name="random",
        paper="https://arxiv.org/abs/2305.02869",
        depth=Growth(
            "G↑random", False, "layers beyond the source's are randomly initialised (masked in with mask_steps)"
        ),
        width=Growth("G→random", False, "new units randomly initialised, old ones copied (masked in with mask_steps)"),
        layer_ops=_random_repeats,
        width_axes=random_new_axes,
    )
)
