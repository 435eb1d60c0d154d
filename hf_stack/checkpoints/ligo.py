"""LiGO's training loop (operator `learn`): width and depth maps trained with the LM loss, then materialised.

The operator itself (its registration and plan rule) is `hf_stack.operators.learn`; this is the grown-tensor side,
run by [`~hf_stack.checkpoints.tensors.grown_tensors`] before the checkpoint is written.
"""

from __future__ import annotations

import math

from ..plans.timing import training_flops
from .models import build_model

# Width map of each axis; k_proj and v_proj outputs have a map each (LiGO's B_K, B_V). Its keys are
# `hf_stack.plans.width.LLAMA_AXES` (learn grows nothing else: `GrowthPlan.llama_width`).
MAP_OF_AXIS = {"hidden_out": "hidden", "hidden_in": "hidden", "norm": "hidden", "q_out": "q", "k_out": "k",
               "v_out": "v", "attn_in": "attn", "gate_out": "ffn", "up_out": "ffn", "ffn_in": "ffn",
               "embed_out": "hidden", "final_norm": "hidden"}  # fmt: skip


def learn_tensors(plan, read, blocks, *, steps: int, lr: float, batch_size: int, seed: int = 0, progress=None):
    """Train LiGO maps for `steps` steps on `blocks` and return the materialised target tensors.

    Args:
        plan: a [`~hf_stack.plans.plan.GrowthPlan`] of the `learn` operator.
        read: source tensor name -> tensor.
        blocks: LongTensor (n, block_size) of token ids.
        steps, lr, batch_size: the maps' AdamW training.
        seed: seeds the new rows of the width maps and the batch order.
        progress: show a progress bar (None: when stderr is a terminal).

    Returns:
        `(tensors, record)`: target name -> float32 CPU tensor, and the losses for `growth_config.json`.
    """
    import torch
    from torch.func import functional_call
    from tqdm.auto import tqdm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(seed)
    L, layer_map = plan.source_num_layers, plan.layer_map
    params: dict[str, torch.nn.Parameter] = {}

    def width_map(name: str, axis) -> torch.Tensor:
        if name not in params:
            m = torch.zeros(axis.target_size, axis.source_size)
            old = [k for k, j in enumerate(axis.index) if j >= 0]
            m[old, [axis.index[k] for k in old]] = 1.0
            new = [k for k, j in enumerate(axis.index) if j < 0]
            m[new] = torch.randn(len(new), axis.source_size, generator=gen) / math.sqrt(axis.target_size)
            params[name] = torch.nn.Parameter(m.to(device))
        return params[name]

    def widen(tensor: torch.Tensor, entry) -> torch.Tensor:
        # tensor: (..., d0[, d1]) with any leading layer dimension; contract each grown dim with its map.
        if not plan.width or not entry.axes:
            return tensor
        nd = len(entry.axes)
        for dim, axis_name in enumerate(entry.axes):
            if axis_name is None:
                continue
            B = width_map(MAP_OF_AXIS[axis_name], plan.width[axis_name])
            tensor = torch.movedim(torch.movedim(tensor, dim - nd, -1) @ B.T, -1, dim - nd)
        return tensor

    frozen, entries = {}, {}
    for entry in plan.tensors:
        suffix = entry.target.split(".", 3)[3] if entry.target.startswith("model.layers.") else None
        if suffix is None:
            frozen[entry.target] = read(entry.source).float().to(device)
        elif suffix not in frozen:
            frozen[suffix] = torch.stack([read(f"model.layers.{j}.{suffix}").float() for j in range(L)]).to(device)
            D = torch.zeros(plan.num_layers, L)
            D[range(plan.num_layers), list(layer_map)] = 1.0  # init: the layer map (stacking)
            params[f"depth.{suffix}"] = torch.nn.Parameter(D.to(device))
        entries[entry.target] = (entry, suffix)

    def generate() -> dict[str, torch.Tensor]:
        out, layer_cache = {}, {}
        for name, (entry, suffix) in entries.items():
            if suffix is None:
                out[name] = widen(frozen[name], entry)
                continue
            if suffix not in layer_cache:
                grown = widen(frozen[suffix], entry)  # (L, ...) source layers, widened
                layer_cache[suffix] = torch.einsum("ls,s...->l...", params[f"depth.{suffix}"], grown)
            out[name] = layer_cache[suffix][int(name.split(".")[2])]
        if plan.target_config.get("tie_word_embeddings"):
            out["lm_head.weight"] = out["model.embed_tokens.weight"]  # the head is not stored when tied
        return out

    model = build_model(plan.target_config, torch.float32, init=False).to(device).train()
    for p in model.parameters():
        p.requires_grad_(False)
    generate()  # creates every map before the optimiser sees them
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    order = torch.randperm(len(blocks), generator=gen)
    losses = []
    for step in tqdm(range(steps), desc="learn", disable=None if progress is None else not progress):
        idx = order[(torch.arange(batch_size) + step * batch_size) % len(blocks)]
        batch = blocks[idx].to(device)
        loss = functional_call(model, generate(), args=(), kwargs={"input_ids": batch, "labels": batch}).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        tensors = {k: v.detach().cpu().contiguous() for k, v in generate().items() if k in entries}
    # Each step runs the target model forward and backward on its tokens (the maps' gradients flow through every
    # generated weight): 6 N_target FLOPs a token, N counted from the plan (a tied head is not stored, so once).
    tokens = steps * batch_size * blocks.shape[1]
    n = sum(math.prod(e.shape) for e in plan.tensors)
    n_embed = sum(
        math.prod(e.shape) for e in plan.tensors if e.target in ("model.embed_tokens.weight", "lm_head.weight")
    )
    record = {"steps": steps, "lr": lr, "batch_size": batch_size, "block_size": blocks.shape[1],
              "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
              "tokens": tokens, "flops": training_flops(n, tokens),
              "non_embedding_flops": training_flops(n - n_embed, tokens)}  # fmt: skip
    return tensors, record
