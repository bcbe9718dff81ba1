"""The batch engine: scan, select, decode, preprocess, infer, label, write (see pipeline.py)."""
