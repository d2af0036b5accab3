"""`train`: learn the K×H extension rows with everything else frozen.

    ext = load_extension("clinical-ext")
    record = train(ext, read_texts("notes.txt"), eval_texts=read_texts("heldout.txt"))
    ext.save("clinical-ext", overwrite=True)

Only the extension tables are in the optimizer (AdamW, no weight decay); the
base table and head cannot be reached, and `ext.verify_base()` proves it at the
end. The model runs in eval mode: with the base frozen, dropout would only add
noise to the targets, and without it a run is a pure function of the seed.

Under torch.distributed (torchrun, any backend) the same function trains with
DistributedDataParallel: every step draws one global batch from the seed and
rank r takes its items r, r+W, r+2W, … .
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone

import torch

from .. import __version__
from ..errors import EmbdeployError, raise_all
from .align import build_examples, is_causal, model_device
from .checkpoint import latest_checkpoint, load_checkpoint, recorded_settings, save_checkpoint
from .config import DEFAULTS, STEPS_PER_TOKEN, TrainConfig, default_steps
from .objectives import make_objective, pad_id
from .texts import SYNTHETIC, harvest_contexts, read_texts, texts_digest

WARMUP_FRACTION = 0.05
# beta2 = 0.99 rather than 0.999: a row gets a gradient only in steps whose batch holds one of its
# contexts, and the shorter second-moment memory adapts faster to those sparse, shrinking gradients.
BETAS = (0.9, 0.99)


@dataclass
class TrainRecord:
    """What one `train` call did; appended (as JSON) to `ext.training_records` and so to extension.json."""

    objective: str
    steps: int
    lr: float
    batch_size: int
    layer: int
    pooled: bool
    loss_kind: str
    seed: int
    first_loss: float | None
    final_loss: float | None  # mean of the last min(10, steps) step losses
    data_sha256: str
    texts: int
    contexts: int
    tokens_without_context: list[str]
    time_s: float  # the whole call: data preparation, evaluations and steps
    loop_s: float  # the training steps alone
    tokens: int  # tokens the student read (all processes)
    tokens_per_s: float
    world_size: int = 1
    device: str = "cpu"
    resumed_from_step: int | None = None
    eval_before: dict | None = None
    eval_after: dict | None = None
    notes: list[str] = field(default_factory=list)
    started_at: str = ""
    embdeploy_version: str = __version__
    extension_fingerprint: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def _dist():
    """(rank, world size), (0, 1) outside torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment); (rank, world size).

    gloo on CPU, nccl where CUDA is available. Outside torchrun this does nothing and returns (0, 1).
    Call it before `train`; only rank 0 should save the extension afterwards.
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


class _Sampler:
    """Global batch for a step: a pure function of (seed, step), so resume and sharding are deterministic.

    Each epoch is a seeded permutation, sorted by length within pools of POOL
    batches, so a batch holds texts of similar length and pads little.
    """

    POOL = 4

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.n, self.bs, self.seed = lengths, len(lengths), batch_size, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            size = self.POOL * self.bs
            order = []
            for k in range(0, self.n, size):
                # stable sort: equal lengths keep their random order; then the pool's batches in random order
                pool = sorted(perm[k : k + size], key=lambda i: self.lengths[i])
                chunks = [pool[j : j + self.bs] for j in range(0, len(pool), self.bs)]
                for c in torch.randperm(len(chunks), generator=g).tolist():
                    order += chunks[c]
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # a batch may straddle two epochs
            self._perms[epoch] = order
        return self._perms[epoch]

    def batch(self, step: int) -> list[int]:
        out = []
        for p in range(step * self.bs, (step + 1) * self.bs):
            out.append(self._perm(p // self.n)[p % self.n])
        return out


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10% of `lr`."""
    warm = max(1, int(steps * WARMUP_FRACTION))
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _clip_rows(ext, max_norm: float) -> None:
    # A tied head scores new tokens with these rows: rows longer than any base row would
    # make the model prefer new tokens everywhere, so keep them inside the base's range.
    with torch.no_grad():
        for p in ext.embed_tables.values():
            norms = p.norm(dim=1, keepdim=True)
            p.mul_(torch.clamp(max_norm / norms.clamp(min=1e-12), max=1.0))


def _unsupported_forward(ext, e: Exception) -> EmbdeployError:
    # e.g. T5 needs decoder inputs: the model cannot run on input_ids + attention_mask alone.
    return EmbdeployError(
        f"{type(ext.model).__name__} cannot run on input_ids and attention_mask alone ({str(e).splitlines()[0]}); "
        "embdeploy train supports models whose forward needs only those (encoders, decoders, BartModel). "
        "Train the rows in your own loop with ext.extension_parameters() instead."
    )


def train(ext, texts, config: TrainConfig | None = None, *, eval_texts=None, progress: bool = True, console=None,
          **settings) -> TrainRecord:
    """Train the extension rows of `ext` in place; return (and append to ext.training_records) the record.

    texts           training texts: a list of strings, or a path for `read_texts`
    config          a TrainConfig (default: TrainConfig()); `settings` are its fields by keyword and
                    override it: train(ext, texts, steps=600, lr=5e-3)
    eval_texts      held-out texts (a list or a path): `evaluate` runs before and after, both kept in the record
    progress        show a progress bar on `console` (default: stderr)

    The model is moved to config.device for the run and back to where it was afterwards.
    """
    if config is None:
        config = TrainConfig(**settings)
    elif not isinstance(config, TrainConfig):
        raise TypeError(f"train() takes a TrainConfig as its third argument, got {type(config).__name__}; "
                        "pass settings by keyword (train(ext, texts, steps=...)) or as TrainConfig(...)")
    elif settings:
        config = replace(config, **settings)
    rank, world = _dist()
    device = resolve_device(config.device)
    notes = []
    if config.steps is None:
        notes.append(f"steps: {default_steps(config.objective, ext.K)} (the default for K={ext.K}: {STEPS_PER_TOKEN} "
                     f"per new token, at least {DEFAULTS[config.objective][0]}; pass --steps to choose)")
    config = config.resolved(ext, world)
    if not isinstance(texts, (list, tuple)):
        texts = read_texts(texts)
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise EmbdeployError("no training texts: pass a file with one text per line that uses the new tokens")
    if eval_texts is not None and not isinstance(eval_texts, (list, tuple)):
        eval_texts = read_texts(eval_texts)

    home = model_device(ext.model)
    ext.model.to(device)
    try:
        return _train(ext, texts, eval_texts, config, device=device, rank=rank, world=world,
                      show=progress and rank == 0, console=console or _console(), notes=notes)
    finally:
        ext.model.to(home)


def resolve_device(device=None) -> torch.device:
    """The training device: as given, or the GPU when torch sees one (cuda:LOCAL_RANK under torchrun)."""
    if device is None or device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise EmbdeployError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EmbdeployError(f"device {device!r} asked for, but this torch sees no CUDA GPU "
                             f"(torch {torch.__version__}); train with device cpu, or install a CUDA build of torch")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise EmbdeployError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if dev.type not in ("cpu", "cuda"):
        raise EmbdeployError(f"device {device!r} is not supported; use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _train(ext, texts, eval_texts, cfg: TrainConfig, *, device, rank, world, show, console, notes) -> TrainRecord:
    """The run itself, with `cfg` resolved (steps, lr and pooled set) and checked against `ext`."""
    torch.manual_seed(cfg.seed)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()

    try:
        causal = is_causal(ext.model)
    except (ValueError, TypeError) as e:
        raise _unsupported_forward(ext, e) from None
    contexts = harvest_contexts(ext, texts, max_per_token=cfg.max_contexts_per_token, seed=cfg.seed)
    examples = [e for e in build_examples(ext, contexts.texts, causal) if e.new_positions]
    # A token whose every context lost it to truncation gets synthetic ones too, and is reported.
    seen = {i for e in examples for p in e.new_positions for i in (e.student_ids[p],)}
    lost = [t for t in ext.tokens if ext.token_ids[t] not in seen]
    if lost:
        contexts.without_context += [t for t in lost if t not in contexts.without_context]
        extra = [s.format(t=t) for t in lost for s in SYNTHETIC]
        examples += [e for e in build_examples(ext, extra, causal) if e.new_positions]
    try:
        obj = make_objective(cfg.objective, ext, examples, causal, pad_id(ext.tokenizer), layer=cfg.layer, pooled=cfg.pooled,
                             loss=cfg.loss)
    except (ValueError, TypeError) as e:
        raise _unsupported_forward(ext, e) from None
    params = obj.parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=BETAS)
    data_sha = texts_digest(texts)
    # what the rows are learned from, beside the config: a resume must find the same
    data = {"data_sha256": data_sha, "tokens": ext.tokens, "base_fingerprint": ext.base_fingerprint}
    if notes and show:
        console.print(f"[dim]{notes[0]}[/]")
    if contexts.without_context:
        notes.append(
            f"{len(contexts.without_context)} token(s) have no context in the texts and trained on synthetic sentences: "
            + ", ".join(contexts.without_context[:20]) + (" …" if len(contexts.without_context) > 20 else "")
        )
        if show:
            console.print(f"[yellow]warning:[/] {notes[-1]}")

    start, history, elapsed_before, eval_before, resumed_from = 0, [], 0.0, None, None
    if cfg.resume:
        cp = latest_checkpoint(cfg.checkpoint_dir)
        if cp is None:
            raise EmbdeployError(f"no checkpoint in {cfg.checkpoint_dir}; run without --resume to start training")
        state = load_checkpoint(cp, ext, opt)
        was, was_data = recorded_settings(state, cp)
        then = {**was.learning_settings(), **was_data}
        mismatched = [f"{k}: checkpoint {then.get(k)!r}, now {v!r}"
                      for k, v in {**cfg.learning_settings(), **data}.items() if then.get(k) != v]
        raise_all(mismatched, f"checkpoint {cp} was written by a run with other settings; resume with the same ones or start fresh:")
        start, history = state["step"], state.get("losses", [])
        elapsed_before, eval_before, resumed_from = state.get("time_s", 0.0), state.get("eval_before"), start

    evaluator = None
    if eval_texts is not None and rank == 0:
        from .evaluate import Evaluator

        with _eval_mode(ext.model):
            evaluator = Evaluator(ext, list(eval_texts))
            if eval_before is None and start == 0:
                eval_before = evaluator.run().to_json()
            elif eval_before is None:
                notes.append(f"no evaluation before training: the run resumed at step {start} and had none stored")

    with _eval_mode(ext.model):
        obj.setup()
    module = obj.module()
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = _Sampler([len(e.student_ids) for e in examples], cfg.batch_size, cfg.seed)
    scale = world / cfg.batch_size
    clip = float(ext.base_table().norm(dim=1).max()) if ext.head_mode == "tied" else None
    tokens_seen, t_loop = 0, time.perf_counter()

    def checkpoint(step):
        if rank == 0:
            state = {"config": cfg.to_dict(), "data": data, "losses": history, "eval_before": eval_before,
                     "time_s": elapsed_before + time.perf_counter() - t0}
            save_checkpoint(cfg.checkpoint_dir, step, ext, opt, state)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()

    bar = _progress(console, show)
    try:
        with _eval_mode(ext.model), bar:
            task = bar.add_task("training", total=cfg.steps, completed=start, loss=float("nan"), tps=0.0)
            for step in range(start, cfg.steps):
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, cfg.steps, cfg.lr)
                items = sampler.batch(step)[rank::world]
                value, n_tok = obj.loss(module, items, step, cfg.seed, scale)
                value.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if clip is not None:
                    _clip_rows(ext, clip)
                stats = torch.tensor([float(value.detach()), float(n_tok)], dtype=torch.float64,
                                     device=device if world > 1 else None)
                if world > 1:
                    import torch.distributed as dist

                    dist.all_reduce(stats)
                stats = stats.cpu()
                history.append(float(stats[0]) / world)
                tokens_seen += int(stats[1])
                tps = tokens_seen / max(time.perf_counter() - t_loop, 1e-9)
                bar.update(task, advance=1, loss=history[-1], tps=tps)
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                    checkpoint(step + 1)
    except KeyboardInterrupt:
        if show:
            last = latest_checkpoint(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
            where = f"; the last checkpoint is {last} (continue with --resume)" if last else ""
            console.print(f"[yellow]interrupted[/]{where}")
        raise
    if cfg.checkpoint_dir and start < cfg.steps:
        checkpoint(cfg.steps)
    ext.verify_base()

    loop_time = time.perf_counter() - t_loop
    eval_after = None
    if evaluator is not None:
        eval_after = evaluator.run().to_json()
    tail = history[-min(10, len(history)):] if history else []
    record = TrainRecord(
        objective=cfg.objective, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, layer=cfg.layer, pooled=cfg.pooled, loss_kind=cfg.loss,
        seed=cfg.seed, first_loss=history[0] if history else None, final_loss=(sum(tail) / len(tail)) if tail else None,
        data_sha256=data_sha, texts=len(texts), contexts=len(examples),
        tokens_without_context=list(contexts.without_context),
        time_s=round(elapsed_before + time.perf_counter() - t0, 3),
        loop_s=round(loop_time, 3), tokens=tokens_seen,
        tokens_per_s=round(tokens_seen / loop_time, 1) if loop_time > 0 and tokens_seen else 0.0,
        world_size=world, device=str(device), resumed_from_step=resumed_from, eval_before=eval_before, eval_after=eval_after,
        notes=notes, started_at=started, extension_fingerprint=ext.extension_fingerprint(),
    )
    ext.training_records.append(record.to_json())
    return record


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _progress(console, show: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.5f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not show,
        transient=False,
    )
