"""The comparison report: plots.py (PNG), recommend.py (from measured numbers), render.py (Markdown + HTML)."""
