"""The train stage: learn the new rows with the base frozen, and measure how close the result stays.

    from embdeploy.train import TrainConfig, train, evaluate, read_texts
"""

from .config import TrainConfig
from .evaluate import Evaluator, QualityReport, evaluate
from .loop import TrainRecord, init_distributed, train
from .texts import Contexts, harvest_contexts, read_texts

__all__ = ["Contexts", "Evaluator", "QualityReport", "TrainConfig", "TrainRecord", "evaluate", "harvest_contexts", "init_distributed", "read_texts", "train"]


def demo_file(name: str):
    """Path of a file shipped in embdeploy/data (terms.txt, train.txt, heldout.txt)."""
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "data" / name
