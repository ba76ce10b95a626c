"""Ingest triplet files into the warehouse (intermediate step of the split: see run.py)."""
from cut_core.ingest.run import *  # noqa: F401,F403
