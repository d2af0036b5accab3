"""What an exported graph computes: inputs by model signature, outputs by task.

The same wrapper is exported to ONNX and used as the PyTorch reference in
validation, so both sides always compute the same outputs:

    feature-extraction  last_hidden_state (B, S, H) [+ sentence_embedding (B, H) when the base pools]
    fill-mask           logits (B, S, V)
    text-generation     logits (B, S, V), no KV cache
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..errors import EmbdeployError
from ..models import TASKS
from ..pooling import pool

ROLES = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
POOLING_MODES = ("mean", "cls")


def infer_task(model, declared: str | None = None) -> str:
    """The export task: `declared` when given, else from the model class (…ForCausalLM -> text-generation)."""
    if declared:
        if declared not in TASKS:
            raise EmbdeployError(f"unknown task {declared!r}; choose one of {', '.join(TASKS)}")
        return declared
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "text-generation"
    if name.endswith(("ForMaskedLM", "ForPreTraining")):
        return "fill-mask"
    if name.endswith("Model"):
        return "feature-extraction"
    raise EmbdeployError(
        f"cannot tell which outputs to export for a {name}; embdeploy exports base models (…Model), "
        "masked LMs (…ForMaskedLM) and causal LMs (…ForCausalLM). Load the base with one of those classes"
    )


def model_inputs(model) -> list[str]:
    """input_ids, attention_mask, and token_type_ids when the model really has token types.

    GPT-2's forward accepts token_type_ids but has no type table (no config.type_vocab_size),
    so the signature alone is not enough.
    """
    params = inspect.signature(model.forward).parameters
    missing = [r for r in ("input_ids", "attention_mask") if r not in params]
    if missing:
        raise EmbdeployError(
            f"{type(model).__name__}.forward takes no {' or '.join(missing)}; embdeploy exports text models "
            "called as model(input_ids=..., attention_mask=...)"
        )
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in params and (getattr(model.config, "type_vocab_size", 0) or 0) > 0:
        names.append("token_type_ids")
    return names


def check_pooling(pooling: dict | None) -> dict | None:
    if pooling is None:
        return None
    mode = pooling.get("mode")
    if mode not in POOLING_MODES:
        raise EmbdeployError(
            f"sentence pooling {mode!r} is not supported; embdeploy exports {' or '.join(POOLING_MODES)} pooling. "
            "Export without pooling (last_hidden_state only) and pool outside the graph"
        )
    return {"mode": mode, "normalize": bool(pooling.get("normalize", False))}


def output_names(task: str, pooling: dict | None) -> list[str]:
    if task == "feature-extraction":
        return ["last_hidden_state"] + (["sentence_embedding"] if pooling else [])
    return ["logits"]


class OutputWrapper(nn.Module):
    """model(**inputs) -> the task's outputs as a tuple (see the module docstring).

    `input_names` are the inputs the export takes (`model_inputs`), in forward's order.
    """

    def __init__(self, model, task: str, pooling: dict | None, input_names: list[str]):
        super().__init__()
        self.model = model
        self.task = task
        self.pooling = check_pooling(pooling) if task == "feature-extraction" else None
        self.input_names = list(input_names)
        self.output_names = output_names(task, self.pooling)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        # Named parameters, not *args: torch.export matches dynamic_shapes to the signature.
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        outputs = task_outputs(self.model, self.task, self.pooling, inputs)
        return tuple(outputs[n] for n in self.output_names)


def task_outputs(model, task: str, pooling: dict | None, inputs: dict, extras: bool = False) -> dict:
    """{output name: tensor} for `task`; with `extras`, also the model's other tensors (pooler_output, ...).

    The extras let validation match outputs of a base ONNX made by another exporter.
    """
    kwargs = dict(inputs)
    if task == "text-generation":
        kwargs["use_cache"] = False  # keyword: positional args would land on past_key_values
    out = model(**kwargs, return_dict=True)
    result = {}
    if extras:
        for name in ("last_hidden_state", "pooler_output", "logits"):
            value = getattr(out, name, None)
            if isinstance(value, torch.Tensor):
                result[name] = value
    if task != "feature-extraction":
        result["logits"] = out.logits
        return result
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        raise EmbdeployError(f"{type(model).__name__} returns no last_hidden_state; load the base as a …Model class")
    result["last_hidden_state"] = hidden
    if pooling is not None:
        result["sentence_embedding"] = pool(hidden, inputs["attention_mask"], pooling)
    return result
