"""`accelerate launch -m dylora_moe.train --config RECIPE.yaml [--key value ...]`"""
import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
