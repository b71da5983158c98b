"""Evaluators: the toy world's stand-ins for the DreamBooth paper's metrics (see ``toy``)."""

from dreambooth_jax.evaluation.toy import (ToyEvaluator, class_fidelity, context_fidelity, div, evaluate,
                                           load_evaluator, pres, save_evaluator, subject_fidelity,
                                           subject_similarity, train_evaluator)

__all__ = ["ToyEvaluator", "class_fidelity", "context_fidelity", "div", "evaluate", "load_evaluator", "pres",
           "save_evaluator", "subject_fidelity", "subject_similarity", "train_evaluator"]
