"""`dylora-moe train` whose third training forward (on every rank) returns a NaN loss:
launched by tests/test_sharding.py, where an in-process monkeypatch cannot reach."""
import sys

from dylora_moe.model import DyLoRAMoE
from dylora_moe.train.cli import exit_process, main

original, calls = DyLoRAMoE.forward, {"n": 0}


def forward(self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    if self.training:
        calls["n"] += 1
        if calls["n"] == 3:
            out.lm_loss = out.lm_loss * float("nan")
    return out


DyLoRAMoE.forward = forward
# exit_process, as `python -m dylora_moe.train` ends: a plain sys.exit lets gloo's threads
# abort the interpreter's teardown now and then (train/cli.py)
exit_process(main(sys.argv[1:]))
