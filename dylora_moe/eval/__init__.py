"""Evaluation: sandboxed execution of model-written programs and pass@k."""
from .programs import Program, humaneval_program, mbpp_program
from .sandbox import Limits, Result, run_many, run_program

__all__ = ["Limits", "Result", "Program", "run_program", "run_many", "mbpp_program", "humaneval_program"]
