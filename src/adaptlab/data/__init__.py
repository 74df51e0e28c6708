"""Data: sources (where documents come from), corpus (splits, packing), instruct (chat template, masking)."""
