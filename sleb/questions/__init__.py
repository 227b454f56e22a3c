"""The answers a chat model still gets right: short questions (question_set.py), a score no copy of the
question and no look-alike number passes (scoring.py), and the lm-eval task that asks them (task.py)."""

from sleb.questions.question_set import items
from sleb.questions.scoring import digest, is_right

__all__ = ["digest", "is_right", "items"]
