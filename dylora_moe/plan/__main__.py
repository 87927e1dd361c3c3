"""`python -m dylora_moe.plan --config RECIPE`"""
import sys

from .cli import main

sys.exit(main())
