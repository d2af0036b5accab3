"""Training objectives: what a batch of examples costs.

Every objective returns the *sum* of per-example losses times `scale`, where
`scale` = world_size / global_batch_size. Summed over ranks and averaged by
DistributedDataParallel, that is exactly the mean over the global batch, so one
process and N processes take the same step (up to float rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import EmbdeployError
from ..pooling import pool
from .align import Example, model_device

OBJECTIVES = ("distill", "mlm", "clm")
TEACHER_CACHE_BYTES = 512 * 1024**2  # teacher targets up to this size are computed once, up front
MLM_OTHER_RATE = 0.15  # share of other positions masked besides the new tokens
MLM_NEW_RATE = 0.5  # share of new-token occurrences masked (the rest teach the input row through context)


def collate(seqs: list[list[int]], pad_id: int, device=None):
    """Right-padded (input_ids, attention_mask), both B×L, on `device` (default: CPU)."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    if device is not None and torch.device(device).type != "cpu":
        ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    return ids, mask



def pad_id(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if t is not None:
            return int(t)
    return 0


def example_seed(seed: int, step: int, index: int) -> int:
    """A per-(step, example) seed: random choices do not depend on how a batch is sharded."""
    return (seed * 1_000_003 + step * 7_919 + index * 104_729) % (2**63 - 1)


class Objective:
    name = ""

    def __init__(self, ext, examples: list[Example], causal: bool, pad: int):
        self.ext, self.examples, self.causal, self.pad = ext, examples, causal, pad

    def module(self):
        """The nn.Module a step calls (and DDP wraps)."""
        return self.ext.model

    def parameters(self):
        return self.ext.extension_parameters()

    @property
    def device(self) -> torch.device:
        return model_device(self.ext.model)

    def setup(self):
        """One-time work before the first step (teacher targets)."""

    def loss(self, module, items: list[int], step: int, seed: int, scale: float):
        raise NotImplementedError


class Distill(Objective):
    """The extended model (student) against the original model on the original tokenization (teacher).

    Token level (pooled=False): each aligned component contributes one error, the
    student state at `layer` (mean over its student positions, a single position
    in practice) against the teacher's mean over the original pieces. In causal
    models the new token is compared with its *last* piece instead: that is the
    state which has read the whole word and from which the following text is
    predicted.

    pooled=True: the error is 1 - cos between the two pooled sentence embeddings
    (the model's own pooling). Token-level matching cannot make those equal: the
    teacher's mean pool weighs a word of n pieces n times, the student's once,
    and layer norms keep the student from making up for it at the word's own
    position; only the other positions can. So for sentence-embedding models the
    pooled output itself is the better target.
    """

    name = "distill"

    def __init__(self, ext, examples, causal, pad, layer=-1, pooled=False, loss="mse", pooling=None):
        super().__init__(ext, examples, causal, pad)
        self.layer, self.pooled, self.kind, self.pooling = layer, pooled, loss, pooling
        self.targets: dict[int, torch.Tensor] = {}
        self.pooled_targets: dict[int, torch.Tensor] = {}
        self.cached = False

    def module(self):
        # The backbone only: an LM head would compute V logits per position for nothing.
        return getattr(self.ext.model, "base_model", self.ext.model)

    def parameters(self):
        return list(self.ext.embed_tables.values())

    def _states(self, module, ids, mask):
        need_all = self.layer != -1
        out = module(input_ids=ids, attention_mask=mask, output_hidden_states=need_all)
        last = out.last_hidden_state
        states = last if not need_all else out.hidden_states[self.layer]
        return states, last

    def _teacher(self, items: list[int]) -> None:
        body = self.module()
        seqs = [self.examples[i].teacher_ids for i in items]
        ids, mask = collate(seqs, self.pad, self.device)
        with torch.no_grad():
            states, last = self._states(body, ids, mask)
            pooled = pool(last, mask, self.pooling) if self.pooled else None
        for b, i in enumerate(items):
            rows = []
            for c in self.examples[i].components:
                t = list(c.teacher)
                rows.append(states[b, t[-1]] if (self.causal and c.new) else states[b, t].mean(0))
            self.targets[i] = torch.stack(rows) if rows else states.new_zeros((0, states.shape[-1]))
            if pooled is not None:
                self.pooled_targets[i] = pooled[b]

    def setup(self):
        H = self.ext.H
        n = sum(len(e.components) for e in self.examples)
        if n * H * 4 > TEACHER_CACHE_BYTES:
            return  # computed per batch instead
        # A fixed batching (by length), so the cached targets are the same in every run and on resume.
        order = sorted(range(len(self.examples)), key=lambda i: (len(self.examples[i].teacher_ids), i))
        for k in range(0, len(order), 64):
            self._teacher(order[k : k + 64])
        self.cached = True

    def loss(self, module, items, step, seed, scale):
        if not self.cached:
            self.targets.clear()
            self.pooled_targets.clear()
            self._teacher(items)
        seqs = [self.examples[i].student_ids for i in items]
        ids, mask = collate(seqs, self.pad, self.device)
        states, last = self._states(module, ids, mask)
        if self.pooled:
            sp = pool(last, mask, self.pooling)
            tp = torch.stack([self.pooled_targets[i] for i in items]).to(sp.dtype)
            item_loss = 1 - F.cosine_similarity(sp, tp, dim=-1)
        else:
            item_loss = self._token_loss(states, items)
        return item_loss.sum() * scale, int(mask.sum())

    def _token_loss(self, states, items):
        """Per-example mean over aligned components of the state error (B,)."""
        B, L, H = states.shape
        pos, comp, weight, owner, per_item = [], [], [], [], []
        c_total = 0
        for b, i in enumerate(items):
            comps = self.examples[i].components
            per_item.append(max(len(comps), 1))
            for c in comps:
                for p in c.student:
                    pos.append(b * L + p)
                    comp.append(c_total)
                    weight.append(1.0 / len(c.student))
                owner.append(b)
                c_total += 1
        flat = states.reshape(B * L, H)
        dev = states.device
        w = torch.tensor(weight, dtype=states.dtype, device=dev).unsqueeze(-1)
        student = states.new_zeros((c_total, H)).index_add(
            0, torch.tensor(comp, device=dev), flat[torch.tensor(pos, device=dev)] * w)  # (C, H)
        target = torch.cat([self.targets[i] for i in items]).to(states.dtype)  # (C, H)
        if self.kind == "cos":
            err = 1 - F.cosine_similarity(student, target, dim=-1)
        else:
            err = (student - target).pow(2).mean(-1)
        total = states.new_zeros(B).index_add(0, torch.tensor(owner, device=dev), err)
        return total / torch.tensor(per_item, dtype=states.dtype, device=dev)


class MaskedLM(Objective):
    """Fill-mask: new-token occurrences (half of them) and 15% of other positions are masked and predicted over V+K ids."""

    name = "mlm"

    def __init__(self, ext, examples, causal, pad):
        super().__init__(ext, examples, causal, pad)
        problems = []
        if ext.head_mode == "none":
            problems.append("objective 'mlm' needs a fill-mask model with an LM head; this model has none (use objective 'distill')")
        if causal:
            problems.append("objective 'mlm' is for bidirectional fill-mask models; this model is causal (use 'clm' or 'distill')")
        if ext.tokenizer.mask_token_id is None:
            problems.append("objective 'mlm' needs a mask token; the tokenizer has none (use 'distill')")
        if problems:
            raise EmbdeployError("; ".join(problems))
        self.mask_id = int(ext.tokenizer.mask_token_id)
        self.special = set(ext.tokenizer.all_special_ids)

    def loss(self, module, items, step, seed, scale):
        V = self.ext.V
        seqs, labels = [], []
        for i in items:
            g = torch.Generator().manual_seed(example_seed(seed, step, i))
            ids = list(self.examples[i].student_ids)
            u = torch.rand(len(ids), generator=g).tolist()
            lab = [-100] * len(ids)
            new = [p for p, t in enumerate(ids) if t >= V]
            masked_new = [p for p in new if u[p] < MLM_NEW_RATE]
            if not masked_new and len(new) > 1:
                masked_new = new[:1]  # at least one new token predicted wherever another stays as context
            for p, t in enumerate(ids):
                if t >= V:
                    if p in masked_new:
                        lab[p], ids[p] = t, self.mask_id
                elif t not in self.special and u[p] < MLM_OTHER_RATE:
                    lab[p], ids[p] = t, self.mask_id
            seqs.append(ids)
            labels.append(lab)
        ids, mask = collate(seqs, self.pad, self.device)
        lab, _ = collate(labels, -100, self.device)
        logits = module(input_ids=ids, attention_mask=mask).logits
        return _per_item_ce(logits, lab, scale), int(mask.sum())


class CausalLM(Objective):
    """Next-token prediction over V+K ids on the extended tokenization."""

    name = "clm"

    def __init__(self, ext, examples, causal, pad):
        super().__init__(ext, examples, causal, pad)
        problems = []
        if ext.head_mode == "none":
            problems.append("objective 'clm' needs a causal LM with an LM head; this model has none (use objective 'distill')")
        if not causal:
            problems.append("objective 'clm' is for causal models; this model is bidirectional (use 'mlm' or 'distill')")
        if problems:
            raise EmbdeployError("; ".join(problems))

    def loss(self, module, items, step, seed, scale):
        seqs = [self.examples[i].student_ids for i in items]
        ids, mask = collate(seqs, self.pad, self.device)
        logits = module(input_ids=ids, attention_mask=mask).logits
        lab = ids.masked_fill(mask == 0, -100)
        return _per_item_ce(logits[:, :-1], lab[:, 1:], scale), int(mask.sum())


def _per_item_ce(logits, labels, scale):
    B, L, N = logits.shape
    ce = F.cross_entropy(logits.reshape(B * L, N).float(), labels.reshape(B * L), ignore_index=-100, reduction="none")
    ce = ce.reshape(B, L)
    n = (labels != -100).sum(1).clamp(min=1)
    return (ce.sum(1) / n).sum() * scale


def make_objective(name, ext, examples, causal, pad, layer=-1, pooled=False, loss="mse"):
    if name == "distill":
        return Distill(ext, examples, causal, pad, layer=layer, pooled=pooled, loss=loss, pooling=ext.base_info.pooling)
    if name == "mlm":
        return MaskedLM(ext, examples, causal, pad)
    if name == "clm":
        return CausalLM(ext, examples, causal, pad)
    raise EmbdeployError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
