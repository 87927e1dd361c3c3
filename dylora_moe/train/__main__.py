"""`accelerate launch -m dylora_moe.train --config RECIPE.yaml [--key value ...]`"""
import sys

from .cli import exit_process, main

exit_process(main(sys.argv[1:]))
