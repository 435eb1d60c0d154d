"""G_stack (depthwise G_direct): every target layer is an exact copy of the source layer the layer map names."""

from . import Operator, register_operator


def _copy_everything(target_layer: int, layer_map: tuple[int, ...]) -> dict[str, str]:
    return {}


STACK = register_operator(
    Operator(
        name="stack",
        direction="depth",
        function_preserving=False,
        paper="https://arxiv.org/abs/2405.15319",
        summary="G_stack: target layer i copies source layer layer_map[i] (Du et al., 2024)",
        layer_ops=_copy_everything,
    )
)
