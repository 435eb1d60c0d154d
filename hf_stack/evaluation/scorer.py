"""Evaluator backend: lm-eval's HFLM with a faster log-likelihood engine (registered as lm-eval model "hf-stack").

Tokenisation, truncation, rolling windows and metrics are HFLM's own (this class inherits them); only
`_loglikelihood_tokens` changes. Requests that share a context (the choices of a multiple-choice question) are
packed into one row: the context once, then every continuation, with a 4-D attention mask so each continuation
sees the context and its own tokens only, and position ids that restart after the context. Sliding-window layers
get their own mask, the same one narrowed to the window counted in each request's own positions (what transformers
builds for an unpacked row); transformers uses a custom 4-D mask as it is, so the window must be in it. Rows are
sorted by length and batched, and the log-softmax runs in float32 whatever the model dtype (HFLM's default is the
model's dtype; here the requests HFLM's own path scores get float32 too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm


@register_model("hf-stack")
class PrefixSharingLM(HFLM):
    """HFLM whose log-likelihoods compute each shared context once for all its continuations.

    Takes HFLM's arguments (`pretrained` may be a loaded model, with `tokenizer`); `batch_size` counts packed rows.
    `softmax_dtype` defaults to float32 (HFLM's default is the model's dtype).
    """

    def __init__(self, *args, softmax_dtype=torch.float32, **kwargs):
        super().__init__(*args, softmax_dtype=softmax_dtype, **kwargs)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if (
            self.backend != "causal"
            or getattr(self.model.config, "_attn_implementation", "sdpa") not in ("eager", "sdpa")
            or _attention_layout(self.model.config) is None
        ):
            # Custom 4-D masks need the eager or SDPA attention path, and layers whose attention a mask describes.
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        # Same truncation as HFLM: keep the last max_length + 1 tokens of context + continuation.
        ctxs: list[tuple[int, ...]] = []
        conts: list[list[int]] = []
        for _, ctx, cont in requests:
            assert len(ctx) > 0 and 0 < len(cont) <= self.max_length
            full = (ctx + cont)[-(self.max_length + 1) :]
            ctxs.append(tuple(full[: len(full) - len(cont)]))
            conts.append(cont)
        groups = _shared_prefix_groups(ctxs)
        # A request that shares no prefix has nothing to gain: HFLM's own batched path scores those.
        singles = [members[0] for _, members in groups if len(members) == 1]
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        if singles:
            answers = super()._loglikelihood_tokens([requests[i] for i in singles], disable_tqdm, override_bs)
            for i, answer in zip(singles, answers):
                results[i] = answer
        rows = []
        for prefix, members in groups:
            if len(members) == 1:
                continue
            # A row must fit the model: split a group whose branches together overflow it.
            chunk, length = [], len(prefix)
            for i in members:
                extra = len(ctxs[i]) - len(prefix) + len(conts[i]) - 1
                if chunk and length + extra > self.max_length:
                    rows.append((prefix, chunk))
                    chunk, length = [], len(prefix)
                chunk.append(i)
                length += extra
            rows.append((prefix, chunk))
        rows.sort(key=lambda r: -(len(r[0]) + sum(len(ctxs[i]) - len(r[0]) + len(conts[i]) - 1 for i in r[1])))
        batch_size = int(override_bs or (self.batch_size if self.batch_size != "auto" else 16) or 1)
        bar = tqdm(
            total=len(requests) - len(singles), disable=disable_tqdm or self.rank != 0, desc="hf-stack log-likelihoods"
        )
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            for i, answer in self._score_rows(batch, ctxs, conts):
                results[i] = answer
                req = requests[i][0]
                if req is not None:
                    self.cache_hook.add_partial("loglikelihood", req, answer)
            bar.update(sum(len(m) for _, m in batch))
        bar.close()
        return results

    @torch.no_grad()
    def _score_rows(self, batch, ctxs, conts):
        # Lay out each row: the shared prefix, then per request its own rest of the context and its continuation
        # without the last token (nothing reads it).
        layouts, width = [], 0
        for prefix, members in batch:
            tokens, positions, owner = list(prefix), list(range(len(prefix))), [-1] * len(prefix)
            reads = []  # per member: row positions whose logits predict its continuation tokens
            for k, i in enumerate(members):
                tail = list(ctxs[i][len(prefix) :]) + conts[i][:-1]
                start = len(tokens)
                tokens += tail
                positions += range(len(prefix), len(prefix) + len(tail))
                owner += [k] * len(tail)
                # a token at absolute position p (in this request's own sequence) sits at row index
                # p if p < len(prefix), else start + p - len(prefix)
                first = len(ctxs[i]) - 1
                reads.append(
                    [p if p < len(prefix) else start + p - len(prefix) for p in range(first, first + len(conts[i]))]
                )
            layouts.append((members, tokens, positions, owner, reads))
            width = max(width, len(tokens))
        n = len(batch)
        ids = torch.zeros((n, width), dtype=torch.long)  # padding is never read; 0 is always a valid id
        pos = torch.zeros((n, width), dtype=torch.long)
        keep = torch.zeros((n, width, width), dtype=torch.bool)
        for r, (_, tokens, positions, owner, _) in enumerate(layouts):
            L = len(tokens)
            ids[r, :L] = torch.tensor(tokens)
            pos[r, :L] = torch.tensor(positions)
            own = torch.tensor(owner)
            causal = torch.ones(L, L, dtype=torch.bool).tril()
            # a request's tokens see the shared prefix and the earlier tokens of their own branch only
            same = (own[:, None] == own[None, :]) | (own[None, :] == -1)
            keep[r, :L, :L] = causal & same
            keep[r, torch.arange(L, width), torch.arange(L, width)] = True  # padding sees itself: no empty rows
        kinds, window = _attention_layout(self.model.config)
        dtype = self.model.dtype

        def additive(allowed):
            blocked = torch.zeros((n, 1, width, width), dtype=dtype).masked_fill_(
                ~allowed[:, None], torch.finfo(dtype).min
            )
            return blocked.to(self.device)

        masks = {}
        if "full_attention" in kinds:
            masks["full_attention"] = additive(keep)
        if "sliding_attention" in kinds:
            # transformers' sliding window: a query sees the last `window` positions of its own sequence, itself
            # included. Every key a query may see lies in its own sequence, so the position ids measure the distance.
            near = (pos[:, :, None] - pos[:, None, :]) < window
            masks["sliding_attention"] = additive(keep & near)
        # one kind: a plain 4-D mask, used by every layer; mixed kinds: the per-kind mapping the model's forward takes
        mask = next(iter(masks.values())) if len(masks) == 1 else masks
        logits = self.model(
            input_ids=ids.to(self.device), attention_mask=mask, position_ids=pos.to(self.device)
        ).logits
        logprobs = F.log_softmax(logits.float(), dim=-1)
        for r, (members, _, _, _, reads) in enumerate(layouts):
            for i, where in zip(members, reads):
                cont = torch.tensor(conts[i], device=logprobs.device)
                lp = logprobs[r, torch.tensor(where, device=logprobs.device)]
                yield i, (float(lp.gather(1, cont[:, None]).sum()), bool((lp.argmax(-1) == cont).all()))


def _attention_layout(config) -> tuple[set[str], int | None] | None:
    """The attention kinds of the model's layers ("full_attention", "sliding_attention") and the window, or None
    when some layer is of another kind (chunked, linear, recurrent): a packed row's mask cannot describe it."""
    config = config.get_text_config()
    window = getattr(config, "sliding_window", None)
    # Models without `layer_types` (Mistral, Mixtral, Phi-3, ...) slide in every layer when `sliding_window` is set.
    kinds = set(getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"])
    if not kinds <= {"full_attention", "sliding_attention"} or ("sliding_attention" in kinds and not window):
        return None
    return kinds, window


def _shared_prefix_groups(ctxs: list[tuple[int, ...]], min_shared: int = 8) -> list[tuple[tuple[int, ...], list[int]]]:
    """Group requests whose contexts share a prefix: identical contexts (multiple-choice questions) and contexts
    that differ only near their end (Winogrande's two fillings of the blank). Sorting puts such contexts next to
    each other; a run joins while the common prefix stays at least `min_shared` tokens and half the shorter one."""
    order = sorted(range(len(ctxs)), key=lambda i: ctxs[i])
    groups: list[tuple[tuple[int, ...], list[int]]] = []
    for i in order:
        ctx = ctxs[i]
        if groups:
            prefix, members = groups[-1]
            n = 0
            limit = min(len(prefix), len(ctx))
            while n < limit and prefix[n] == ctx[n]:
                n += 1
            # the shared part must leave each context at least one token of its own, or be the whole context
            if n == len(prefix) == len(ctx) or (n >= min_shared and 2 * n >= min(len(prefix), len(ctx))):
                groups[-1] = (prefix[:n], [*members, i])
                continue
        groups.append((ctx, [i]))
    return groups
