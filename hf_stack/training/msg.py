"""Stage 3, MSG growth masks for the trainer: the new parts of a `random` growth ramped in from 0 to 1.

Masked Structural Growth (Yao et al., 2023, arXiv 2305.02869): with mask m, a new layer computes
m * layer(x) + (1 - m) * x, and new units' outputs (embedding columns, value and up rows, o_proj and down_proj
rows) are multiplied by m, with RMSNorm averaging over the H + m (H' - H) active units. At m = 0 the grown
model computes the source's function exactly; at m = 1 the masks are the identity and are removed. The masks
are forward hooks on transformers' own modules: no modeling code, and the weights saved are the plain ones.
"""

from __future__ import annotations

import torch
from transformers.trainer_callback import TrainerCallback

from ..errors import HfStackError
from ..operators import repeats

# Module -> the plan axis whose new units its output carries.
OUTPUT_AXES = {"self_attn.v_proj": "v_out", "self_attn.o_proj": "hidden_out", "mlp.up_proj": "up_out",
               "mlp.down_proj": "hidden_out"}  # fmt: skip
NORMS = ("input_layernorm", "post_attention_layernorm")


def check_maskable(plan) -> None:
    """Refuse a plan whose new parts these masks cannot ramp in: another operator than `random`, or width growth
    beyond a dense Llama-style layer (the hooks sit on its modules: `OUTPUT_AXES`, `NORMS`)."""
    if plan.operator != "random":
        raise HfStackError(f"growth masks ramp in the new parts of 'random' growth, not of {plan.operator!r}")
    if not plan.llama_width:
        raise HfStackError(
            f"MSG's width masks hook a dense Llama-style layer's modules; {plan.target_config.get('model_type')!r} "
            "grows its own way in width (norm offsets, post-norms, fused projections or experts): drop --mask-steps, "
            "or grow it in depth only"
        )


class GrowthMasks:
    """Hooks that mask the new layers and units of a grown model (plan of the `random` operator).

    Args:
        model: the grown transformers model (unwrapped).
        plan: the [`~hf_stack.plans.plan.GrowthPlan`] that grew it.

    Example:

    ```python
    >>> masks = GrowthMasks(grown, plan)  # doctest: +SKIP
    >>> masks.set(0.0)  # the source's function  # doctest: +SKIP
    >>> masks.remove()  # plain model again  # doctest: +SKIP
    ```
    """

    def __init__(self, model, plan):
        check_maskable(plan)
        self.value = 0.0
        self.handles = []
        inner = model.get_decoder()
        new_layers = repeats(plan.layer_map) if "depth" in plan.directions else set()
        for i in sorted(new_layers):
            self.handles.append(inner.layers[i].register_forward_hook(self._layer_hook, with_kwargs=True))
        if plan.width:
            H, Ht = plan.width["hidden_out"].source_size, plan.width["hidden_out"].target_size
            self.masks = {
                a: torch.tensor([float(j < 0) for j in plan.width[a].index]) for a in set(OUTPUT_AXES.values())
            }
            self._hook(inner.embed_tokens, "hidden_out")
            for layer in inner.layers:
                for path, axis in OUTPUT_AXES.items():
                    self._hook(layer.get_submodule(path), axis)
                for name in NORMS:
                    self.handles.append(getattr(layer, name).register_forward_hook(self._norm_hook(H, Ht)))
            self.handles.append(inner.norm.register_forward_hook(self._norm_hook(H, Ht)))

    def set(self, value: float) -> None:
        """Set the mask of every new part (0: absent, 1: fully in)."""
        self.value = float(min(max(value, 0.0), 1.0))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, module, axis: str) -> None:
        on_device: dict = {}  # the 0/1 new-unit vector, moved once per device and dtype (forward is a hot path)

        def hook(mod, args, output):
            if self.value == 1.0:
                return output
            key = (output.device, output.dtype)
            if key not in on_device:
                on_device[key] = self.masks[axis].to(output.device, output.dtype)
            return output * (1.0 + (self.value - 1.0) * on_device[key])

        self.handles.append(module.register_forward_hook(hook))

    def _layer_hook(self, module, args, kwargs, output):
        if self.value == 1.0:
            return output
        x = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        mixed = self.value * out + (1.0 - self.value) * x
        return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

    def _norm_hook(self, H: int, Ht: int):
        def hook(module, args, output):
            if self.value == 1.0:
                return output
            # The norm divided by the RMS over all H' units; the active units number H + m (H' - H).
            x = args[0].float()
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
            square = x.pow(2).sum(-1, keepdim=True)
            active = H + self.value * (Ht - H)
            factor = torch.sqrt((square / Ht + eps) / (square / active + eps))
            return (output.float() * factor).to(output.dtype)

        return hook


class MaskRamp(TrainerCallback):
    """Ramps MSG masks from 0 to 1 over `steps` optimizer steps after growth, then removes them.

    The value follows the optimizer step (`global_step` of the grown phase), so a resumed run continues the ramp
    where it stopped.
    """

    def __init__(self, steps: int):
        self.steps = steps
        self.masks: GrowthMasks | None = None

    def start(self, masks: GrowthMasks) -> None:
        self.masks = masks

    @property
    def value(self) -> float:
        """The current mask (1.0 once the masks are removed)."""
        return self.masks.value if self.masks is not None else 1.0

    def on_step_begin(self, args, state, control, **kwargs):
        if self.masks is None:
            return
        value = state.global_step / self.steps
        if value >= 1:
            self.masks.remove()  # fully in: the plain model from here on
            self.masks = None
        else:
            self.masks.set(value)
