"""adaptlab: LoRA or full fine-tuning for my model, my data and my hardware?

Trains full fine-tuning and the LoRA family under matched budgets with one training loop,
measures learning, forgetting and cost, and writes a report with a recommendation.
"""

__version__ = "0.1.0"
