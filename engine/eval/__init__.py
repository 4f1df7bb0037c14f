"""llm-eval's scoring: bits per byte on text, multiple-choice tasks, the report card."""

from .choice import evaluate_choices
from .text import evaluate_texts

__all__ = ["evaluate_choices", "evaluate_texts"]
