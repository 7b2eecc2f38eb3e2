"""Scores methods against the truth and writes reports: the evaluation protocol of evaluate.py (above models/)."""
from evaluation.followup import NOISE_FLOOR, evaluate_followup, visit_pairs
from evaluation.figures import draw_trajectories, trajectory_slices
from evaluation.metrics import above_background, correlation, frechet_distance, l1, mse, ssim
from evaluation.protocol import (AGE_PROTOCOL, FLOOR, REPEATS, Change, change_for, check_oracle, draw_pairs, evaluate,
                                 matched_reference, told)
from evaluation.report import report_markdown
from evaluation.truth import STRUCTURES, GroundTruth

__all__ = ["AGE_PROTOCOL", "FLOOR", "NOISE_FLOOR", "REPEATS", "STRUCTURES", "Change", "GroundTruth",
           "above_background", "change_for", "check_oracle", "correlation", "draw_pairs", "draw_trajectories",
           "evaluate", "evaluate_followup", "frechet_distance", "l1", "matched_reference", "mse", "report_markdown",
           "ssim", "told", "trajectory_slices", "visit_pairs"]
