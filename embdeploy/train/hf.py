"""Using an extended model with `transformers.Trainer`.

The extended model trains in Trainer as it is: only the extension tables
require grad, so Trainer's optimizer holds exactly the K×H rows. One thing must
come from outside: the models' built-in losses reshape logits with
`config.vocab_size` (= V, the base vocabulary), while an extended head has V+K
outputs. Pass `compute_loss_func=lm_loss(causal)` and Trainer computes the loss
over all V+K outputs instead:

    trainer = Trainer(model=ext.model, args=args, train_dataset=data,
                      data_collator=DataCollatorForLanguageModeling(ext.tokenizer),
                      compute_loss_func=lm_loss(causal=False))
"""

from __future__ import annotations

import torch.nn.functional as F


def lm_loss(causal: bool):
    """A `compute_loss_func` for Trainer: cross-entropy over every output of the (extended) head.

    causal=True shifts labels by one (next-token prediction), as the causal models' own loss does.
    """

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        if causal:
            logits, labels = logits[:, :-1], labels[:, 1:]
        n = logits.shape[-1]
        total = F.cross_entropy(logits.reshape(-1, n).float(), labels.reshape(-1).to(logits.device), ignore_index=-100, reduction="sum")
        count = num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum().clamp(min=1)
        return total / count

    return loss
