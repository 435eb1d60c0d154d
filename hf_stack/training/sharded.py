"""Stage 3, growth inside a sharded run: a model sharded with FSDP2 (`fully_shard`) grown in place of the run.

The full state is gathered on rank 0 (on its CPU), grown there with the same plan and tensors as the in-memory
path ([`~hf_stack.checkpoints.in_memory.grow_model`]), the grown model is built on the meta device on every rank,
sharded the run's way, and loaded by broadcast from rank 0. Only rank 0 holds the full state; the others hold their
shards plus, while a tensor is gathered or broadcast, that one tensor in full.
"""

from __future__ import annotations

from ..errors import HfStackError


def grow_sharded(model, stacked_config, shard):
    """Grow a causal LM sharded with FSDP2 inside a live distributed run (every rank calls it).

    Args:
        model: the sharded model (its parameters `DTensor`s), unwrapped.
        stacked_config: the growth settings ([`StackedConfig`]); the operators that copy, zero or initialise
            (`stack`, `zero`, `random`, width's `direct`), not `learn`, which trains the grown tensors.
        shard: applies the run's sharding to a model (e.g. `fully_shard` on each layer, then on the model); the
            grown model is sharded the same way.

    Returns:
        `(grown, plan)`: the grown model, sharded, on the small model's device and dtype, in the small model's
        train/eval mode, and the [`~hf_stack.plans.plan.GrowthPlan`] applied. Its optimizer is the caller's to
        build (the paper's recipe: a fresh one).

    Memory: rank 0 holds the small model's full state and the grown model's full tensors on its CPU (one full copy
    of each, at the parameters' dtype); every other rank its shards, plus the one tensor in transit while the state
    is gathered and broadcast tensor by tensor.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from ..checkpoints.in_memory import plan_for_model
    from ..checkpoints.models import build_model
    from ..checkpoints.tensors import grown_tensors
    from ..operators import get_operator
    from ..plans.plan import layout_of

    if get_operator(stacked_config.operator).needs_data:
        raise HfStackError(
            f"{stacked_config.operator!r} growth trains the grown tensors, which a sharded run does not do on one "
            "rank; grow with stack, zero, random or direct, or grow between two runs"
        )
    plan = plan_for_model(model, stacked_config)  # names and global shapes: the same plan on every rank
    full = full_state_dict(model)
    tensors, failure = {}, None  # other ranks: filled by the broadcast below
    if dist.get_rank() == 0:
        try:
            tensors, _ = grown_tensors(plan, full.__getitem__, stacked_config, None)
        except Exception as e:  # every rank stops with it, or the others would wait in the broadcast below
            failure = e
    status = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    dist.broadcast_object_list(status, src=0)
    if failure is not None:
        raise failure
    if status[0] is not None:
        raise HfStackError(f"growth failed on rank 0, which grows the full state: {status[0]}")
    del full
    param = next(model.parameters())
    with torch.device("meta"):
        grown = build_model(plan.target_config, param.dtype, init=False)
    shard(grown)
    grown.to_empty(device=param.device)
    # Buffers outside the state dict (RoPE's inv_freq) are left uninitialised by to_empty: the small model's, each
    # from the layer its layer copies (they depend on the config's head size and RoPE, which growth keeps).
    small_buffers, layout = dict(model.named_buffers()), layout_of(plan.target_config)
    with torch.no_grad():
        for name, buffer in grown.named_buffers():
            found = layout.layer_key(name)
            source = f"{layout.layers}{plan.layer_map[found[0]]}.{found[1]}" if found else name
            if source not in small_buffers or small_buffers[source].shape != buffer.shape:
                raise HfStackError(f"the grown model's buffer {name!r} has no counterpart {source!r} to copy")
            buffer.copy_(small_buffers[source])
    if tensors and grown.config.get_text_config().tie_word_embeddings:
        # the tied head is saved once, under the embeddings' name; the strict load wants it under its own too (the
        # meta model is not tied yet: `tie_weights` below)
        names = {module: name for name, module in grown.named_modules()}
        embed, head = (names[m] + ".weight" for m in (grown.get_input_embeddings(), grown.get_output_embeddings()))
        tensors.setdefault(head, tensors[embed])
    set_model_state_dict(
        grown, tensors, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    )
    grown.tie_weights()  # to_empty leaves a tied head apart from the embeddings
    grown.generation_config = model.generation_config
    return grown.train(model.training), plan


def full_state_dict(model) -> dict:
    """The full state of a model sharded with FSDP2, gathered on rank 0's CPU (empty on the other ranks); every rank
    calls it. Rank 0 then holds one full copy, at the parameters' dtype."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
