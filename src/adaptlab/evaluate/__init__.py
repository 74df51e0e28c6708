"""Evaluation: learning and forgetting of a tuned model against its base.

perplexity.py (NLL per token, perplexity, bits per byte), drift.py (KL(base || tuned)),
choice.py (multiple choice, lm-eval's log-likelihood scoring), harness.py (lm-eval tasks),
stats.py (paired CIs), cache.py (base figures on disk), prompts.py (general prompts),
run.py (`evaluate()`, the entry the CLI and the comparison tool call; its docstring holds the
JSON schema).

    python -c "from adaptlab.evaluate import evaluate; help(evaluate)"
"""

from __future__ import annotations

from adaptlab.evaluate.run import evaluate

__all__ = ["evaluate"]
