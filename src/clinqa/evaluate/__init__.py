"""Scoring, metrics, runs on disk and reports: the evaluation harness."""

from clinqa.evaluate.harness import evaluate, load_data
from clinqa.evaluate.runs import EvalConfig, Run
from clinqa.evaluate.sample import Sample

__all__ = ["EvalConfig", "Run", "Sample", "evaluate", "load_data"]
