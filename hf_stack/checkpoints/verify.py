"""Stage 2, checking: a grown checkpoint loads with plain transformers and holds what the plan claims, checked
against the source rather than by building the tensors a second time.

- copies (bytes unchanged, or cast) equal the source tensor read from its file; zeroed tensors are zero;
- tensors a trained operator produced (`learn`) equal the ones it computed;
- width growth: every copied unit equals its source unit times the plan's scale (up to the zero-sum noise), and
  a growth the plan calls function preserving gives the source's logits on fixed inputs (what the split's divided
  readers and corrected norms, and zero growth's silent new units, promise);
- randomly initialised tensors are a seeded draw: checked for shape and finite values only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import HfStackError, error_reason
from ..plans.plan import layout_of
from .tensors import TORCH_DTYPES, TensorReader


def _fail(message: str):
    raise HfStackError(f"verification failed: {message}")


def _check_units(entry, got: torch.Tensor, src: torch.Tensor, plan) -> None:
    """Every copied unit of a widened tensor against its source unit: target unit k along an axis is source unit
    `index[k]` times `scale[k]` (new units, index -1, hold the operator's fill and are skipped). Along an axis with
    symmetry-breaking noise only the sum over a unit's copies is fixed (the noise sums to zero over them)."""
    work = torch.promote_types(src.dtype, torch.float32)
    want, block, noisy = src.to(work), got.to(work), []
    for dim, name in enumerate(entry.axes):
        if name is None:
            continue
        axis = plan.width[name]
        index = torch.tensor(axis.index)
        kept = torch.nonzero(index >= 0).flatten()
        shape = [1] * want.ndim
        shape[dim] = -1
        scale, off = torch.tensor(axis.scale, dtype=work)[kept].view(shape), axis.offset
        want = want.index_select(dim, index[kept]) * scale + off * (scale - 1)  # (off + w) * scale - off
        block = block.index_select(dim, kept)
        if axis.noise:
            noisy.append((dim, index[kept], axis.source_size))
    magnitude = block.abs()
    for dim, index, size in noisy:
        sums = [torch.zeros(*t.shape[:dim], size, *t.shape[dim + 1 :], dtype=work).index_add_(dim, index, t)
                for t in (want, block, magnitude)]  # fmt: skip
        want, block, magnitude = sums
    if noisy:
        # each copy was rounded to the output dtype on its own (by at most half a unit in the last place, eps / 2
        # of its magnitude) after float32 arithmetic: the sum over copies is exact up to those roundings, element
        # by element (a bound taken from the tensor's largest value would hide a 5% error in its small ones)
        if got.is_floating_point():
            info = torch.finfo(got.dtype)
            tolerance = (info.eps / 2 + 4 * torch.finfo(work).eps) * magnitude + info.tiny
        else:
            tolerance = torch.zeros_like(magnitude)
        ok = bool(((block - want).abs() <= tolerance).all())
    else:
        ok = torch.equal(block.to(got.dtype), want.to(got.dtype))
    if not ok:
        _fail(f"{entry.target}: its copied units differ from {entry.source} as the plan maps them")


def _stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _check_logits(model, source, dtype) -> None:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, trust_remote_code=False).eval()
    vocab = min(reference.config.vocab_size, model.config.vocab_size)
    ids = (torch.arange(2 * 24).view(2, 24) * 7919 + 13) % vocab  # fixed, spread over the vocabulary
    with torch.no_grad():
        want, got = reference(ids).logits.float(), model.eval()(ids).logits.float()
    # float32 sums in another order differ by rounding; 16-bit weights by their own precision
    tolerance = (1e-4 if dtype == torch.float32 else 3e-2) * max(1.0, float(want.abs().max()))
    worst = float((got - want).abs().max())
    if worst > tolerance:
        _fail(f"the plan is function preserving but the logits differ from the source's by {worst:.3g}")


def verify_checkpoint(folder: Path, plan, source, dtype: str | None = None, computed: dict | None = None) -> None:
    """Reload `folder` with `AutoModelForCausalLM` (no remote code) and check it against the source and the plan.

    Args:
        folder: the written checkpoint.
        plan: the [`~hf_stack.plans.plan.GrowthPlan`] applied.
        source: the [`~hf_stack.checkpoints.source.SourceCheckpoint`] grown.
        dtype: the output dtype name, if the weights were converted.
        computed: the tensors a trained operator produced (they are what must have been written).

    Raises:
        HfStackError: if the folder does not load, a tensor is missing or extra, or a check above fails.
    """
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype="auto", trust_remote_code=False, output_loading_info=True
        )
    except Exception as e:
        _fail(f"the grown checkpoint does not load: {error_reason(e)}")
    layout = layout_of(plan.target_config)
    tied = set(layout.heads) if model.config.tie_word_embeddings else set()
    # what the model's class found missing or left unused, after transformers' conversions (fused experts, ...)
    unfilled, unused = set(info["missing_keys"]) - tied, set(info["unexpected_keys"])
    if unfilled or unused:
        _fail(f"{type(model).__name__} found tensors missing {sorted(unfilled)[:3]}, unused {sorted(unused)[:3]}")
    loaded = model.state_dict()
    if tied and loaded[layout.head(loaded)].data_ptr() != loaded[layout.embed].data_ptr():
        _fail("embeddings should be tied but the head is a separate tensor")
    state = _stored_tensors(folder)  # as written: the loaded model may have cast or fused them
    expected = {t.target for t in plan.tensors}
    extra, missing = set(state) - expected, expected - set(state)
    if extra or missing:
        _fail(f"missing tensors {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    reader = TensorReader(source)
    torch_dtype = TORCH_DTYPES.get(dtype) if dtype else None
    for entry in plan.tensors:
        got = state[entry.target]
        if tuple(got.shape) != tuple(entry.shape):
            _fail(f"{entry.target} has shape {list(got.shape)}, the plan says {list(entry.shape)}")
        if computed is not None:
            want = computed[entry.target]
            if got.dtype != want.dtype or not torch.equal(got, want):
                _fail(f"{entry.target} differs from the tensor the {plan.operator!r} operator computed")
        elif entry.op == "zero":
            if bool(got.any()):
                _fail(f"{entry.target} should be zero")
        elif entry.op == "random":
            if got.is_floating_point() and not bool(torch.isfinite(got).all()):
                _fail(f"{entry.target} holds NaN or Inf")
        elif not entry.widened:
            src = reader(entry.source)
            want = src.to(torch_dtype) if torch_dtype is not None else src
            if got.dtype != want.dtype or not torch.equal(got, want):
                _fail(f"{entry.target} differs from {entry.source}")
        else:
            _check_units(entry, got, reader(entry.source), plan)
    if plan.function_preserving and computed is None:
        _check_logits(model, source, next(iter(loaded.values())).dtype)
