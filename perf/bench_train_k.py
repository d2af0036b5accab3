"""Training at the K users need: K = 1,000 suggested tokens on the packaged MiniLM.

    python perf/bench_train_k.py                   # the goal run: suggest -> extend -> default train -> eval
    python perf/bench_train_k.py --steps 600       # another schedule, for comparison
    python perf/bench_train_k.py --k 200 --json r.json

The corpus is generated here, deterministically: 1,100 compound words made of two common
English words ("bloodflow", "kidneystone", ...) that MiniLM's tokenizer cuts into two or
more pieces, each used in 6 training sentences (one template set) and 2 held-out sentences
(a disjoint template set), among ordinary words. `suggest` picks the K words worth adding
from the training corpus, `extend` adds them (subword-mean init), `train` runs with its
defaults (or --steps), and the held-out report compares every held-out sentence with the
new tokens against the same sentence in the original tokenization (pooled sentence
embedding cosine, mean and min). Goal (issue 12): mean >= 0.95 and min >= 0.80 in <= 15
minutes on 2 CPU cores. Writes perf/results/train-k1000-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "train-k"
sys.path.insert(0, str(HERE.parent))

HEADS = ("blood heart kidney liver lung bone brain skin nerve muscle water fire stone sand wind rain snow "
         "sun moon star light dark iron gold silver paper glass wood steel cloud storm river ocean field "
         "forest mountain road bridge house school market garden window door table chair book music voice "
         "data power signal battery engine motor wheel metal salt sugar milk bread honey grain seed root leaf").split()
TAILS = ("flow stone rate line work mark point field wall shift load path gate room side board craft ware "
         "shape space stream storm light fall proof keeper maker watch guard time scale base craft cell form "
         "test count level press wave band chain frame lock plate ring bank yard port belt wire track pool").split()
TRAIN_T = (
    "the report mentions {w} twice in the summary",
    "we measured {w} again after the first week",
    "a sudden change in {w} was seen by the team",
    "{w} is the main topic of this short note",
    "nobody expected the {w} to matter this much",
    "the new guide explains {w} in plain words",
)
HELD_T = (
    "during the review the {w} came up once more",
    "she wrote a careful paragraph about {w} yesterday",
)


def make_corpus(n_words: int = 1100, seed: int = 0):
    from embdeploy.suggest import load_suggest_tokenizer

    tok = load_suggest_tokenizer("minilm")
    rng = random.Random(seed)
    pairs = sorted({h + t for h in HEADS for t in TAILS if h != t})
    rng.shuffle(pairs)
    words = [w for w in pairs if len(tok(w, add_special_tokens=False)["input_ids"]) >= 2][:n_words]
    train = [t.format(w=w) for w in words for t in TRAIN_T]
    held = [t.format(w=w) for w in words for t in HELD_T]
    rng.shuffle(train)
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "train.txt").write_text("\n".join(train) + "\n")
    (WORK / "heldout.txt").write_text("\n".join(held) + "\n")
    return WORK / "train.txt", WORK / "heldout.txt", words


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=None, help="training steps [default: train's default for K]")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from embdeploy.extend.config import ExtensionConfig
    from embdeploy.extend.model import Extension
    from embdeploy.models import load_base
    from embdeploy.suggest import SuggestConfig, load_suggest_tokenizer, suggest
    from embdeploy.train import Evaluator, TrainConfig, read_texts, train

    train_file, held_file, _ = make_corpus()
    t0 = time.perf_counter()
    res = suggest([train_file], load_suggest_tokenizer("minilm"), SuggestConfig(top=args.k, min_count=3))
    t_suggest = time.perf_counter() - t0
    tokens = [c.word for c in res.candidates]
    model, tok, info = load_base("minilm")
    ext = Extension(model, tok, info)
    ext.add(ExtensionConfig(tokens=tokens))
    held = read_texts(held_file)
    t1 = time.perf_counter()
    rec = train(ext, read_texts(train_file), TrainConfig(steps=args.steps, lr=args.lr), progress=False)
    t_train = time.perf_counter() - t1
    t2 = time.perf_counter()
    after = Evaluator(ext, held).run()
    t_eval = time.perf_counter() - t2
    out = {
        "K": ext.K, "corpus_lines": res.corpus_texts, "heldout_lines": len(held),
        "suggest_s": round(t_suggest, 1), "suggested_share_saved": res.share_saved,
        "train": {"steps": rec.steps, "lr": rec.lr, "batch_size": rec.batch_size, "wall_s": round(t_train, 1),
                  "loop_s": round(rec.loop_s, 1), "s_per_step": rec.loop_s / rec.steps, "contexts": rec.contexts,
                  "tokens_without_context": len(rec.tokens_without_context), "first_loss": rec.first_loss,
                  "final_loss": rec.final_loss, "notes": rec.notes},
        "eval_s": round(t_eval, 1),
        "heldout": {"sentence_cos_mean": after.sentence_cos_mean, "sentence_cos_min": after.sentence_cos_min,
                    "token_cos_mean": after.token_cos_mean, "retrieval_accuracy": after.retrieval_accuracy,
                    "pairs": after.pairs, "tokens_not_covered": len(after.tokens_not_covered),
                    "worst": after.worst[:8]},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "total_s": round(time.perf_counter() - t0, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
