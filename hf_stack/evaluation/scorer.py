"""Evaluator backend: lm-eval's HFLM with a faster log-likelihood engine (registered as lm-eval model "hf-stack").

What a request means is HFLM's: the same tokens (its `tok_encode` and `_encode_pair` rules, applied to all requests
in batched calls of the fast tokenizer), the same left truncation, the same rolling windows; metrics are lm-eval's.
How the numbers are computed changes, in four ways:

- Requests that share a context (the choices of a multiple-choice question, Winogrande's two fillings up to the
  blank) are packed into one row: the shared prefix once, then every branch, with a 4-D attention mask so each
  branch sees the prefix and itself only, and position ids that restart after the prefix. Sliding-window layers get
  the same mask narrowed to the window counted in each request's own positions (what transformers builds for an
  unpacked row); transformers takes a custom 4-D mask as it is, so the window must be in it. Rows of one request
  need no mask at all: right padding is invisible to a causal model, as in HFLM.
- The vocabulary projection runs only where a log-probability is read (the decoder, then the output embeddings on
  the gathered positions), in chunks, so no (batch x length x vocab) tensor exists; a one-time probe per model
  checks this equals `model(...).logits` and falls back to the full forward where it does not (logit soft-capping,
  scaled heads).
- Log-probabilities are `logit - logsumexp(logits)` in float32 whatever the model dtype (HFLM's default is the
  model's dtype), the greedy check an argmax over the same logits.
- All requests of a call are sorted by length and batched together, rolling windows across documents included
  (HFLM batches those in document order).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix
from tqdm.auto import tqdm

from ..checkpoints.models import is_sharded

# Positions whose logits are built at once: bounds the float32 (positions x vocab) block the head writes.
HEAD_CHUNK = 4096
# Requests are packed into one row only where sharing their prefix saves at least this fraction of their tokens.
MIN_SAVED = 0.1
# Config fields of a transform some models apply after the output embeddings (Gemma 2/3, Cohere, Granite).
POST_HEAD_CONFIG_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
# A row joins a batch only if padding it to the batch's width adds at most this fraction of that width.
MAX_PADDING = 0.25


@register_model("hf-stack")
class PrefixSharingLM(HFLM):
    """HFLM whose log-likelihoods compute each shared context once for all its continuations.

    Takes HFLM's arguments (`pretrained` may be a loaded model, with `tokenizer`); `batch_size` counts rows (a row
    is one request, or one shared context with all its continuations). `softmax_dtype` defaults to float32.

    For profiling, `stage_seconds` accumulates wall time per stage (tokenise, layout, forward, head, log-softmax)
    and `stage_tokens` the positions the decoder ran ("forward", padding included) and the head projected ("head").
    """

    def __init__(self, *args, softmax_dtype=torch.float32, **kwargs):
        super().__init__(*args, softmax_dtype=softmax_dtype, **kwargs)
        self.stage_seconds: dict[str, float] = defaultdict(float)
        self.stage_tokens: dict[str, int] = defaultdict(int)
        self._split_head: bool | None = None  # decided by the probe on first use
        self._encoded: dict[str, list[int]] = {}  # string -> token ids, under this LM's BOS setting

    # -- tokenising ---------------------------------------------------------------------------------------------

    def _encode_many(self, strings: list[str]) -> list[list[int]]:
        """`self.tok_encode(s)` of every string, through batched calls of a fast tokenizer (same special-token rule:
        the BOS setting, unless the string already starts with BOS). Remembered per LM: an `EvalCallback` scores
        the same requests at every call, and tokenises them once."""
        start = time.perf_counter()
        new = sorted({s for s in strings if s not in self._encoded})
        if not getattr(self.tokenizer, "is_fast", False):
            self._encoded.update((s, self.tok_encode(s)) for s in new)
        else:
            base = _add_special_kwargs(None, self.add_bos_token)
            bos = self.tokenizer.decode(self.prefix_token_id)
            by_kwargs: dict[tuple, list[str]] = defaultdict(list)
            for s in new:
                kwargs = {**base, "add_special_tokens": False} if has_bos_prefix(s, bos) else base
                by_kwargs[tuple(sorted(kwargs.items()))].append(s)
            for key, group in by_kwargs.items():
                self._encoded.update(zip(group, self.tokenizer(group, **dict(key))["input_ids"]))
        self.stage_seconds["tokenise"] += time.perf_counter() - start
        return [self._encoded[s] for s in strings]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        if self.backend != "causal" or getattr(self, "enable_thinking", False):
            return super().loglikelihood(requests, disable_tqdm)
        pairs = []  # None for an empty context, else HFLM's `_encode_pair` split
        for req in requests:
            context, continuation = req.args
            if context:
                # trailing spaces of the context move to the continuation (a context of spaces becomes "")
                n_spaces = len(context) - len(context.rstrip())
                if n_spaces:
                    context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
                pairs.append((context, continuation))
            else:
                pairs.append(None)
        unique = sorted({s for pair in pairs if pair for s in (pair[0], pair[0] + pair[1])})
        encoded = dict(zip(unique, self._encode_many(unique)))
        new_reqs = []
        for req, pair in zip(requests, pairs):
            if pair is not None:
                context, continuation = pair
                context_enc = encoded[context]
                continuation_enc = encoded[context + continuation][len(context_enc) :]
            else:  # an empty context: HFLM conditions on its prefix token
                cont = self.tok_encode(req.args[1], add_special_tokens=False)
                context_enc, continuation_enc = (
                    ([self.prefix_token_id], cont) if self.prefix_token_id != cont[0] else (cont[:1], cont[1:])
                )
            new_reqs.append((req.args, context_enc, continuation_enc))
        return self._loglikelihood_tokens(new_reqs, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        if self.backend != "causal" or self.world_size > 1:
            return super().loglikelihood_rolling(requests, disable_tqdm)
        windows, owners = [], []
        for k, tokens in enumerate(self._encode_many([req.args[0] for req in requests])):
            for window in lm_utils.get_rolling_token_windows(
                token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
            ):
                windows.append((None, *lm_utils.make_disjoint_window(window)))
                owners.append(k)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[k] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- scoring ------------------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if (
            self.backend != "causal"
            or getattr(self.model.config, "_attn_implementation", "sdpa") not in ("eager", "sdpa")
            or _attention_layout(self.model.config) is None
        ):
            # Custom 4-D masks need the eager or SDPA attention path, and layers whose attention a mask describes.
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        start = time.perf_counter()
        # Same truncation as HFLM: keep the last max_length + 1 tokens of context + continuation.
        ctxs: list[tuple[int, ...]] = []
        conts: list[list[int]] = []
        for _, ctx, cont in requests:
            assert len(ctx) > 0 and 0 < len(cont) <= self.max_length
            full = (ctx + cont)[-(self.max_length + 1) :]
            ctxs.append(tuple(full[: len(full) - len(cont)]))
            conts.append(cont)
        rows = []
        for prefix, members in _shared_prefix_groups(ctxs, conts):
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
        # Longest first (a memory error shows at once); rows of one request batch apart, as they need no mask.
        rows.sort(key=lambda r: (len(r[1]) > 1, -_row_length(r, ctxs, conts)))
        batch_size = int(override_bs or (self.batch_size if self.batch_size != "auto" else 16) or 1)
        batches, current = [], []
        for row in rows:
            # a new batch when this one is full, changes kind, or would pad this row by more than MAX_PADDING of
            # the batch's width (a short document's only window beside full-length ones): a forward pass less does
            # not pay for that much padding
            if current and (
                len(current) == batch_size
                or (len(current[0][1]) > 1) != (len(row[1]) > 1)
                or _row_length(row, ctxs, conts) < (1 - MAX_PADDING) * _row_length(current[0], ctxs, conts)
            ):
                batches.append(current)
                current = []
            current.append(row)
        if current:
            batches.append(current)
        self.stage_seconds["layout"] += time.perf_counter() - start
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="hf-stack log-likelihoods")
        for batch in batches:
            for i, answer in self._score_rows(batch, ctxs, conts):
                results[i] = answer
                req = requests[i][0]
                if req is not None:
                    self.cache_hook.add_partial("loglikelihood", req, answer)
            bar.update(sum(len(m) for _, m in batch))
        bar.close()
        return results

    def _probe_split_head(self) -> bool:
        """Whether decoder + output embeddings reproduce the model's logits, checked once: no transform after the
        head in the config (soft-capping, a logit scale), and the same logits, bit for bit, on a short input (the
        same kernels run either way; a tolerance would let a small soft-cap pass on small logits)."""
        config = self.model.config.get_text_config()
        if any(getattr(config, k, None) not in (None, 1, 1.0) for k in POST_HEAD_CONFIG_KEYS):
            return False
        if is_sharded(self.model):  # FSDP2 gathers weights in the hooks of the model's own forward: run all of it
            return False
        try:
            decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
            ids = torch.arange(1, 9, device=self.device)[None] % config.vocab_size
            with self._autocast():
                ref = self.model(input_ids=ids, use_cache=False).logits.float()
                ours = head(decoder(input_ids=ids, use_cache=False).last_hidden_state).float()
        except Exception:  # an exotic wrapper: the full forward is always right
            return False
        return ours.shape == ref.shape and bool(torch.equal(ours, ref))

    def _autocast(self):
        """HFLM's forward-pass context: autocast to `mixed_precision_dtype` when one is set."""
        return torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        )

    @torch.no_grad()
    def _score_rows(self, batch, ctxs, conts):
        start = time.perf_counter()
        # Lay out each row: the shared prefix, then per request its own rest of the context and its continuation
        # without the last token (nothing reads it).
        layouts, width = [], 0
        for prefix, members in batch:
            tokens, positions, owner = list(prefix), list(range(len(prefix))), [-1] * len(prefix)
            reads = []  # per member: row positions whose logits predict its continuation tokens
            for k, i in enumerate(members):
                tail = list(ctxs[i][len(prefix) :]) + conts[i][:-1]
                begin = len(tokens)
                tokens += tail
                positions += range(len(prefix), len(prefix) + len(tail))
                owner += [k] * len(tail)
                # a token at position p (in this request's own sequence) sits at row index p if p < len(prefix),
                # else begin + p - len(prefix)
                first = len(ctxs[i]) - 1
                reads.append(
                    [p if p < len(prefix) else begin + p - len(prefix) for p in range(first, first + len(conts[i]))]
                )
            layouts.append((members, tokens, positions, owner, reads))
            width = max(width, len(tokens))
        n = len(batch)
        ids = torch.zeros((n, width), dtype=torch.long)  # padding is never read; 0 is always a valid id
        pos = torch.arange(width).repeat(n, 1)
        packed = any(len(members) > 1 for members, *_ in layouts)
        for r, (_, tokens, positions, _, _) in enumerate(layouts):
            ids[r, : len(tokens)] = torch.tensor(tokens)
            if packed:
                pos[r, : len(tokens)] = torch.tensor(positions)
        mask = self._packed_mask(layouts, pos, width) if packed else None
        row_index, col_index, targets, spans = [], [], [], []
        for r, (members, _, _, _, reads) in enumerate(layouts):
            for i, where in zip(members, reads):
                spans.append((i, len(targets), len(where)))
                row_index += [r] * len(where)
                col_index += where
                targets += conts[i]
        self.stage_seconds["layout"] += time.perf_counter() - start

        start = time.perf_counter()
        if self._split_head is None:
            self._split_head = self._probe_split_head()
        self.stage_tokens["forward"] += n * width
        self.stage_tokens["head"] += len(targets) if self._split_head else n * width
        inputs = dict(input_ids=ids.to(self.device), attention_mask=mask, position_ids=pos.to(self.device),
                      use_cache=False)  # fmt: skip
        rows, cols = torch.tensor(row_index, device=self.device), torch.tensor(col_index, device=self.device)
        with self._autocast():
            if self._split_head:
                hidden = self.model.get_decoder()(**inputs).last_hidden_state[rows, cols]
                head = self.model.get_output_embeddings()
            else:
                hidden = self.model(**inputs).logits[rows, cols]
                head = None
        self.stage_seconds["forward"] += time.perf_counter() - start

        # Log-probabilities of the targets, a chunk of positions at a time: float32 logits of HEAD_CHUNK
        # positions at most, never the whole (positions x vocab) log-softmax.
        targets_t = torch.tensor(targets, device=self.device)
        logprob = torch.empty(len(targets), dtype=torch.float32, device=self.device)
        greedy = torch.empty(len(targets), dtype=torch.bool, device=self.device)
        for c0 in range(0, len(targets), HEAD_CHUNK):
            start = time.perf_counter()
            part = hidden[c0 : c0 + HEAD_CHUNK]
            with self._autocast():
                logits = head(part) if head is not None else part
            logits = logits.to(self.softmax_dtype or torch.float32)
            t = targets_t[c0 : c0 + HEAD_CHUNK]
            self.stage_seconds["head"] += time.perf_counter() - start
            start = time.perf_counter()
            logprob[c0 : c0 + HEAD_CHUNK] = logits.gather(1, t[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
            greedy[c0 : c0 + HEAD_CHUNK] = logits.argmax(dim=-1) == t
            self.stage_seconds["log-softmax"] += time.perf_counter() - start
        logprob, greedy = logprob.cpu(), greedy.cpu()
        for i, begin, length in spans:
            yield i, (float(logprob[begin : begin + length].sum()), bool(greedy[begin : begin + length].all()))

    def _packed_mask(self, layouts, pos: torch.Tensor, width: int):
        """The 4-D mask of a batch of packed rows (per attention kind when the model mixes them): boolean for SDPA,
        additive in the model's dtype for eager attention."""
        n = len(layouts)
        keep = torch.zeros((n, width, width), dtype=torch.bool)
        for r, (_, tokens, _, owner, _) in enumerate(layouts):
            L = len(tokens)
            own = torch.tensor(owner)
            # a request's tokens see the shared prefix and the earlier tokens of their own branch only
            keep[r, :L, :L] = torch.ones(L, L, dtype=torch.bool).tril_() & (
                (own[:, None] == own[None, :]) | (own[None, :] == -1)
            )
            keep[r, torch.arange(L, width), torch.arange(L, width)] = True  # padding sees itself: no empty rows
        kinds, window = _attention_layout(self.model.config)
        eager = getattr(self.model.config, "_attn_implementation", "sdpa") == "eager"
        dtype = self.model.dtype

        def prepared(allowed):
            if not eager:
                return allowed[:, None].to(self.device)
            blocked = torch.zeros((n, 1, width, width), dtype=dtype).masked_fill_(
                ~allowed[:, None], torch.finfo(dtype).min
            )
            return blocked.to(self.device)

        masks = {}
        if "full_attention" in kinds:
            masks["full_attention"] = prepared(keep)
        if "sliding_attention" in kinds:
            # transformers' sliding window: a query sees the last `window` positions of its own sequence, itself
            # included. Every key a query may see lies in its own sequence, so the position ids measure the distance.
            masks["sliding_attention"] = prepared(keep & ((pos[:, :, None] - pos[:, None, :]) < window))
        # one kind: a plain 4-D mask, used by every layer; mixed kinds: the per-kind mapping the model's forward takes
        return next(iter(masks.values())) if len(masks) == 1 else masks


def _row_length(row, ctxs, conts) -> int:
    prefix, members = row
    return len(prefix) + sum(len(ctxs[i]) - len(prefix) + len(conts[i]) - 1 for i in members)


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


def _shared_prefix_groups(
    ctxs: list[tuple[int, ...]], conts: list[list[int]]
) -> list[tuple[tuple[int, ...], list[int]]]:
    """Group requests whose contexts share a prefix: identical contexts (multiple-choice questions) and contexts
    that differ only after some shared start (Winogrande's two fillings of the blank). Sorting puts such contexts
    next to each other. A group is kept packed only when it saves at least MIN_SAVED of its tokens: a packed row
    costs a mask, an unpacked one nothing (rolling windows' one-token contexts stay single)."""
    order = sorted(range(len(ctxs)), key=lambda i: ctxs[i])
    groups: list[tuple[tuple[int, ...], list[int]]] = []
    longest = 0  # the longest context in the last group
    for i in order:
        ctx = ctxs[i]
        if groups:
            prefix, members = groups[-1]
            n = 0
            limit = min(len(prefix), len(ctx))
            while n < limit and prefix[n] == ctx[n]:
                n += 1
            # identical contexts, or a shared start at least half of every member's context: measured against the
            # longest, so a group never shrinks to a short common start that would then take in any context
            # beginning with it (an unrelated question sharing "Question: The", in a call mixing tasks)
            if n == len(prefix) == len(ctx) or (n and 2 * n >= max(longest, len(ctx))):
                groups[-1] = (prefix[:n], [*members, i])
                longest = max(longest, len(ctx))
                continue
        groups.append((ctx, [i]))
        longest = len(ctx)
    out = []
    for prefix, members in groups:
        unpacked = sum(len(ctxs[i]) + len(conts[i]) - 1 for i in members)
        if len(members) > 1 and (len(members) - 1) * len(prefix) < MIN_SAVED * unpacked:
            out += [(ctxs[i], [i]) for i in members]
        else:
            out.append((prefix, members))
    return out
