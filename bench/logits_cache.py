"""lm-eval's logits_cache on vs off: per-choice log-likelihoods of the pruned demo model on the demo tasks.

    python -m bench.logits_cache [--removal_list 7,3,5] [--limit 200]

Prints one JSON line: items and choices compared per task, the largest absolute difference of a
choice's log-likelihood, and whether any item's prediction changed.
"""

import argparse
import json

from sleb import accuracy, blocks
from sleb.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--removal_list", default="7,3,5")
    parser.add_argument("--limit", type=int, default=200)
    args = parser.parse_args()
    model, tokenizer = load_model("demo", device="cpu")
    blocks.remove_blocks(model, [int(i) for i in args.removal_list.split(",")])
    names = ["demo_cloze", "demo_order"]
    tasks = accuracy.find_tasks(names)
    runs = {cache: accuracy.evaluate_zeroshot(model, tokenizer, tasks, limit=args.limit, log_samples=True,
                                              logits_cache=cache)["samples"] for cache in (True, False)}
    report = {"removal_list": args.removal_list, "limit": args.limit, "tasks": {}}
    for name in names:
        on, off = runs[True][name], runs[False][name]
        pairs = [(a[0][0], b[0][0]) for x, y in zip(on, off) for a, b in zip(x["resps"], y["resps"])]
        changed = sum(x["acc"] != y["acc"] for x, y in zip(on, off))
        report["tasks"][name] = {"items": len(on), "choices": len(pairs),
                                 "max_abs_loglik_diff": max(abs(a - b) for a, b in pairs),
                                 "predictions_changed": changed}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
