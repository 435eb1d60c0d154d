"""Evaluator backend: lm-eval's HFLM with a faster log-likelihood engine (registered as lm-eval model "hf-stack").

Tokenisation, truncation, rolling windows and metrics are HFLM's own (this class inherits them); only
`_loglikelihood_tokens` changes. Requests that share a context (the choices of a multiple-choice question) are
packed into one row: the context once, then every continuation, with a 4-D attention mask so each continuation
sees the context and its own tokens only, and position ids that restart after the context. Rows are sorted by
length and batched, and the log-softmax runs in float32 whatever the model dtype.
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
    """

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if (
            self.backend != "causal"
            or getattr(self.model.config, "_attn_implementation", "sdpa") == "flash_attention_2"
        ):
            # Custom 4-D masks need the eager or SDPA attention path.
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        # Same truncation as HFLM: keep the last max_length + 1 tokens of context + continuation.
        groups: dict[tuple[int, ...], list[int]] = {}
        conts: list[list[int]] = []
        for i, (_, ctx, cont) in enumerate(requests):
            assert len(ctx) > 0 and 0 < len(cont) <= self.max_length
            full = (ctx + cont)[-(self.max_length + 1) :]
            conts.append(cont)
            groups.setdefault(tuple(full[: len(full) - len(cont)]), []).append(i)
        # A context with a single continuation has nothing to share: HFLM's own batched path scores those.
        singles = [i for members in groups.values() if len(members) == 1 for i in members]
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        if singles:
            for i, answer in zip(
                singles, super()._loglikelihood_tokens([requests[i] for i in singles], disable_tqdm, override_bs)
            ):
                results[i] = answer
        rows = []
        for ctx, members in groups.items():
            if len(members) == 1:
                continue
            # A row must fit the model: split a group whose continuations together overflow it.
            chunk, length = [], len(ctx)
            for i in members:
                extra = len(conts[i]) - 1
                if chunk and length + extra > self.max_length:
                    rows.append((ctx, chunk))
                    chunk, length = [], len(ctx)
                chunk.append(i)
                length += extra
            rows.append((ctx, chunk))
        rows.sort(key=lambda r: -(len(r[0]) + sum(len(conts[i]) - 1 for i in r[1])))
        batch_size = int(override_bs or (self.batch_size if self.batch_size != "auto" else 16) or 1)
        bar = tqdm(
            total=len(requests) - len(singles), disable=disable_tqdm or self.rank != 0, desc="hf-stack log-likelihoods"
        )
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            for i, answer in self._score_rows(batch, conts):
                results[i] = answer
                req = requests[i][0]
                if req is not None:
                    self.cache_hook.add_partial("loglikelihood", req, answer)
            bar.update(sum(len(m) for _, m in batch))
        bar.close()
        return results

    @torch.no_grad()
    def _score_rows(self, batch, conts):
        # Lay out each row: the context, then each continuation without its last token (nothing reads it).
        layouts, width = [], 0
        for ctx, members in batch:
            tokens, positions, owner = list(ctx), list(range(len(ctx))), [-1] * len(ctx)
            spans = []
            for k, i in enumerate(members):
                body = conts[i][:-1]
                spans.append((len(tokens), len(body)))
                tokens += body
                positions += range(len(ctx), len(ctx) + len(body))
                owner += [k] * len(body)
            layouts.append((ctx, members, tokens, positions, owner, spans))
            width = max(width, len(tokens))
        n = len(batch)
        ids = torch.zeros((n, width), dtype=torch.long)  # padding is never read; 0 is always a valid id
        pos = torch.zeros((n, width), dtype=torch.long)
        keep = torch.zeros((n, width, width), dtype=torch.bool)
        for r, (_, _, tokens, positions, owner, _) in enumerate(layouts):
            L = len(tokens)
            ids[r, :L] = torch.tensor(tokens)
            pos[r, :L] = torch.tensor(positions)
            own = torch.tensor(owner)
            causal = torch.ones(L, L, dtype=torch.bool).tril()
            # a continuation token sees the context and the earlier tokens of its own continuation only
            same = (own[:, None] == own[None, :]) | (own[None, :] == -1)
            keep[r, :L, :L] = causal & same
            keep[r, torch.arange(L, width), torch.arange(L, width)] = True  # padding sees itself: no empty rows
        dtype = self.model.dtype
        mask = torch.zeros((n, 1, width, width), dtype=dtype).masked_fill_(~keep[:, None], torch.finfo(dtype).min)
        logits = self.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), position_ids=pos.to(self.device)
        ).logits
        logprobs = F.log_softmax(logits.float(), dim=-1)
        for r, (ctx, members, _, _, _, spans) in enumerate(layouts):
            last_ctx = len(ctx) - 1
            for i, (start, length) in zip(members, spans):
                cont = torch.tensor(conts[i], device=logprobs.device)
                # the first continuation token is predicted by the last context position, the rest by their
                # predecessors inside this continuation's span
                where = torch.tensor([last_ctx, *range(start, start + length)], device=logprobs.device)
                lp = logprobs[r, where]
                yield i, (float(lp.gather(1, cont[:, None]).sum()), bool((lp.argmax(-1) == cont).all()))
