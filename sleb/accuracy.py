"""Zero-shot accuracy with the released lm-eval: the pruned model instance goes to HFLM as it is."""

import functools
import logging
import os
import sys
from dataclasses import dataclass

from sleb import demo_tasks, hub, questions, results
from sleb.errors import UsageError, first_line
from sleb.questions import task as answers_task

OFFLINE = demo_tasks.TASKS + answers_task.TASKS  # written here, no hub needed
GENERATIVE = answers_task.TASKS  # answered by generation, through the chat template where the tokenizer has one


@dataclass(frozen=True)
class Tasks:
    """lm-eval tasks looked up once: their names and the task index that knows them."""

    names: tuple
    manager: object


def task_folder() -> str:
    """Where the offline tasks are written, by Python version (their items are deterministic for one)."""
    base = os.environ.get("SLEB_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sleb"))
    return os.path.join(base, f"lm_eval_tasks-py{sys.version_info.major}.{sys.version_info.minor}")


def task_manager(names: list):
    """lm-eval's task registry plus the offline tasks (alone when only those are asked for: indexing
    lm-eval's thousands of task files takes ~30 s, done once per process)."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its warnings would bury one-line errors
    folder = task_folder()
    os.makedirs(folder, exist_ok=True)
    demo_tasks.write_tasks(folder)
    answers_task.write_task(folder)
    return _indexed(folder, not all(name in OFFLINE for name in names))


@functools.lru_cache(maxsize=None)
def _indexed(include_path: str, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def check_tasks(names: list, manager) -> None:
    """Unknown names and data that cannot be loaded fail here, before the model loads."""
    from lm_eval.tasks import get_task_dict

    known = set(manager.all_tasks)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UsageError(f"unknown task {unknown[0]!r}; list the tasks with `lm-eval ls tasks` "
                         f"(offline tasks: {', '.join(OFFLINE)})")
    if any(name not in OFFLINE for name in names):
        hub.reach()
    try:
        get_task_dict(names, manager)
    except Exception as error:  # datasets raises many types when a hub data set is out of reach
        raise UsageError(f"task data unavailable ({first_line(error, 160)}); offline, use --tasks "
                         f"{','.join(OFFLINE)}") from None


def find_tasks(names: list) -> Tasks:
    """The tasks looked up and their data loaded (a UsageError for an unknown name or unreachable data)."""
    manager = task_manager(names)
    check_tasks(names, manager)
    return Tasks(tuple(names), manager)


def evaluate_zeroshot(model, tokenizer, tasks: Tasks, num_fewshot: int = 0, limit=None,
                      batch_size: int = 8, log_samples: bool = False, logits_cache: bool = True) -> dict:
    """{"tasks": {task: {acc, acc_stderr, acc_norm, acc_norm_stderr}}, "mean": {...}, "samples": ...}.

    `logits_cache` is lm-eval's own default (and how the paper's fork ran): choices sharing a context
    reuse one forward. bench/logits_cache.py measures it against one forward per choice."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, logits_cache=logits_cache)
    scored = [name for name in tasks.names if name not in GENERATIVE]
    generated = [name for name in tasks.names if name in GENERATIVE]
    found, samples, right, replies = {}, {}, {}, {}
    for names, chat in ((scored, False), (generated, bool(getattr(tokenizer, "chat_template", None)))):
        if not names:
            continue
        # generated answers go through the chat template where the tokenizer has one, as users ask
        output = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                         log_samples=log_samples or chat or names == generated,
                                         task_manager=tasks.manager, verbosity="ERROR", apply_chat_template=chat)
        found.update(output["results"])
        samples.update(output.get("samples") or {})
        for name in set(names) & set(GENERATIVE):  # which questions were right, for "answers kept", and the replies
            right[name] = sorted(int(item["doc"]["id"]) for item in output["samples"][name] if item["acc"])
            replies[name] = {int(item["doc"]["id"]): _reply(item) for item in output["samples"][name]}
    per_task = {}
    for name in tasks.names:
        metrics = found[name]
        per_task[name] = {key: metrics.get(f"{key},none") for key in ("acc", "acc_stderr", "acc_norm",
                                                                      "acc_norm_stderr")}
    mean = {}
    for key in ("acc", "acc_norm"):
        values = [entry[key] for entry in per_task.values() if entry[key] is not None]
        mean[key] = sum(values) / len(values) if values else None
    out = {"tasks": per_task, "mean": mean, "num_fewshot": num_fewshot, "limit": limit}
    if replies:  # the question set's digest: answers kept compares only results on the same set
        out.update(right=right, replies={name: dict(sorted(by_id.items())) for name, by_id in replies.items()},
                   question_set=questions.digest())
    if log_samples:
        out["samples"] = samples
    return out


def _reply(sample: dict) -> str:
    """The generated text lm-eval scored (after its filters)."""
    reply = sample["filtered_resps"]
    return reply[0] if isinstance(reply, list) else reply


def answers_kept(dense: dict, pruned: dict) -> dict:
    """{task: questions right for both over those right for the dense model} from two `evaluate_zeroshot`
    results: the answers a user still gets after pruning."""
    if dense.get("right") and pruned.get("right") and dense.get("question_set") != pruned.get("question_set"):
        raise ValueError(f"answers kept compares results on one question set; the dense model's is "
                         f"{dense.get('question_set')}, the other's {pruned.get('question_set')}")
    kept = {}
    for name, before in (dense.get("right") or {}).items():
        after = set((pruned.get("right") or {}).get(name, []))
        both = [i for i in before if i in after]
        kept[name] = {"dense_right": len(before), "kept": len(both),
                      "share": len(both) / len(before) if before else None,
                      "lost": [i for i in before if i not in after]}
    return kept


def zeroshot_table(zeroshot: dict) -> str:
    def fmt(value, stderr):
        return "-" if value is None else f"{100 * value:.2f} ± {100 * (stderr or 0):.2f}"

    rows = [[name, fmt(m["acc"], m["acc_stderr"]), fmt(m["acc_norm"], m["acc_norm_stderr"])]
            for name, m in zeroshot["tasks"].items()]
    mean = zeroshot["mean"]
    rows.append(["mean", "-" if mean["acc"] is None else f"{100 * mean['acc']:.2f}",
                 "-" if mean["acc_norm"] is None else f"{100 * mean['acc_norm']:.2f}"])
    return results.table(["task", "acc (%)", "acc_norm (%)"], rows)
