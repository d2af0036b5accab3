"""`TrainConfig`: every setting of one `train` call, validated once, and what a checkpoint records.

    config = TrainConfig(steps=600, checkpoint_dir="ckpt", checkpoint_every=100)
    train(ext, texts, config)                    # or train(ext, texts, steps=600, ...)

steps, lr and pooled may stay None: `resolved(ext)` chooses them for the extension at hand
(`default_steps`, `DEFAULTS`, the model's sentence-transformers pooling). A checkpoint stores the
resolved config as `dataclasses.asdict` JSON and `from_dict` reads it back.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace

from ..errors import EmbdeployError, raise_all
from .objectives import OBJECTIVES

# Defaults per objective: (steps, lr). The distillation defaults and what they reach on MiniLM are in
# perf/README.md ("Training cost and quality").
DEFAULTS = {"distill": (300, 1e-2), "mlm": (300, 5e-3), "clm": (300, 5e-3)}
# The default schedule scales with K: at least 3 steps per new token (batch 32: about 96 context visits
# per row); perf/README.md ("Training at K = 1,000 suggested tokens") has the steps-against-quality table.
STEPS_PER_TOKEN = 3
DEFAULT_BATCH = 32
MAX_CONTEXTS_PER_TOKEN = 64

# Where and how a run goes, not what it learns: a resumed run may change these.
_RUN = {"run": True}


def default_steps(objective: str, K: int) -> int:
    """Steps `train` runs when none are given: the objective's default, or STEPS_PER_TOKEN per new token if more."""
    return max(DEFAULTS.get(objective, (300, 1e-3))[0], STEPS_PER_TOKEN * K)


@dataclass(frozen=True)
class TrainConfig:
    """The settings of `train`; problems are collected and raised at once, as an EmbdeployError.

    objective       'distill' (any model), 'mlm' (fill-mask), 'clm' (causal LM)
    steps, lr       None: per objective (DEFAULTS), steps at least STEPS_PER_TOKEN per new token;
                    lr follows warm-up + cosine decay
    batch_size      global batch (split over processes under torch.distributed)
    layer           distill, token level: the hidden state to match (-1 = the last output)
    pooled          distill: match the pooled sentence embedding (1 - cos) instead of token states;
                    None = True where the model has sentence-transformers pooling (info.pooling)
    loss            distill: 'mse' or 'cos' (1 - cosine) per aligned position
    max_contexts_per_token  contexts kept per new token (a seeded reservoir over the texts)
    device          'auto' (the GPU when torch sees one; cuda:LOCAL_RANK under torch.distributed),
                    'cpu', 'cuda' or 'cuda:N'
    checkpoint_dir  where checkpoints go every `checkpoint_every` steps (and at the end)
    resume          continue from the newest checkpoint in checkpoint_dir
    """

    objective: str = "distill"
    steps: int | None = None
    lr: float | None = None
    batch_size: int = DEFAULT_BATCH
    layer: int = -1
    pooled: bool | None = None
    loss: str = "mse"
    seed: int = 0
    max_contexts_per_token: int = MAX_CONTEXTS_PER_TOKEN
    device: str = field(default="auto", metadata=_RUN)
    checkpoint_dir: str | None = field(default=None, metadata=_RUN)
    checkpoint_every: int = field(default=0, metadata=_RUN)
    resume: bool = field(default=False, metadata=_RUN)

    def __post_init__(self):
        # One spelling per value, so the asdict form is plain JSON and equal configs compare equal.
        if self.device is None or not isinstance(self.device, str):
            object.__setattr__(self, "device", "auto" if self.device is None else str(self.device))
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, str):
            object.__setattr__(self, "checkpoint_dir", os.fspath(self.checkpoint_dir))
        raise_all(self._problems(), "cannot train:")

    def _problems(self) -> list[str]:
        problems = []
        if self.objective not in OBJECTIVES:
            problems.append(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            problems.append(f"steps must be a positive integer, got {self.steps!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and 0 < self.lr < 10):
            problems.append(f"lr must be a positive number below 10, got {self.lr!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            problems.append(f"batch size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.layer, int):
            problems.append(f"layer must be an integer (-1 for the last hidden state), got {self.layer!r}")
        if self.pooled and self.objective != "distill":
            problems.append("pooled=True applies to objective 'distill' only")
        if self.pooled and self.layer != -1:
            problems.append(f"layer {self.layer} applies to token-level distillation; pooled=True matches the pooled "
                            "output (pass pooled=False)")
        if self.loss not in ("mse", "cos"):
            problems.append(f"loss must be 'mse' or 'cos', got {self.loss!r}")
        if not isinstance(self.seed, int):
            problems.append(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.max_contexts_per_token, int) or self.max_contexts_per_token < 1:
            problems.append(f"max_contexts_per_token must be a positive integer, got {self.max_contexts_per_token!r}")
        if not isinstance(self.checkpoint_every, int):
            problems.append(f"checkpoint_every must be an integer (0: only at the end), got {self.checkpoint_every!r}")
        else:
            if self.checkpoint_every and not self.checkpoint_dir:
                problems.append("checkpoint_every needs checkpoint_dir (CLI: --checkpoint-dir DIR)")
            if self.checkpoint_every < 0:
                problems.append(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.resume and not self.checkpoint_dir:
            problems.append("resume needs checkpoint_dir: the directory the interrupted run wrote its checkpoints to")
        return problems

    def resolved(self, ext, world: int = 1) -> TrainConfig:
        """This config with steps, lr and pooled chosen for `ext`; refuses what does not fit the extension.

        world: the number of processes, each of which needs at least one example per batch.
        """
        problems = []
        if not ext.tokens:
            problems.append("the extension has no new tokens; add a group (embdeploy extend) before training")
        if self.batch_size < world:
            problems.append(f"batch size {self.batch_size} is smaller than the {world} processes; each needs at least "
                            "one example")
        cfg = ext.model.config
        n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
        if n_layers is not None and self.layer != -1 and not -(n_layers + 1) <= self.layer <= n_layers:
            problems.append(f"layer {self.layer} does not exist: the model has hidden states 0..{n_layers} "
                            "(or -1 for the last)")
        raise_all(problems, "cannot train:")
        return replace(
            self,
            steps=default_steps(self.objective, ext.K) if self.steps is None else self.steps,
            lr=DEFAULTS[self.objective][1] if self.lr is None else self.lr,
            pooled=(self.objective == "distill" and bool(ext.base_info.pooling)) if self.pooled is None else self.pooled,
        )

    def learning_settings(self) -> dict:
        """The settings that decide the rows a run learns: a resume must keep every one of them."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("run")}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data, where: str = "the training settings",
                  fix: str = "remove them, or read them with the embdeploy version that wrote them") -> TrainConfig:
        """The config `asdict` wrote; refuses keys TrainConfig does not have rather than dropping them."""
        if not isinstance(data, dict):
            raise EmbdeployError(f"{where} must be a JSON object of training settings, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(k for k in data if k not in known)
        if unknown:
            raise EmbdeployError(f"{where} has unknown training setting(s) {', '.join(map(repr, unknown))} "
                                 f"(TrainConfig has {', '.join(known)}); {fix}")
        try:
            return cls(**data)
        except EmbdeployError as e:
            raise EmbdeployError(f"{where}: {e}") from None
