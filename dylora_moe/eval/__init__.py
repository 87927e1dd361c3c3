"""Evaluation: sandboxed execution of model-written programs and pass@k."""
from .passk import mean_pass_at_k, pass_at_k
from .programs import mbpp_program
from .sandbox import Limits, Result, run_many, run_program

__all__ = ["Limits", "Result", "run_program", "run_many", "pass_at_k", "mean_pass_at_k", "mbpp_program"]
