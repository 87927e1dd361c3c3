"""Every script in examples/ runs offline on CPU and prints what its docstring claims.

Each runs as a user would run it (`python examples/NN_name.py`), in a fresh working
directory with the hub switched off; the checks read its output, not just its exit code.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))

# Per example: patterns its stdout must contain (re.search, multiline).
EXPECTED = {
    "01_forward_and_loss.py": [
        r"^loss \d+\.\d+ = lm_loss \d+\.\d+ \+ 0\.1 x balance_loss \d",
        r"^routing_weights shape: \(2, 1, 4\)$",
        r"^trainable parameters: \d+ \(experts \+ router\); frozen base parameters: \d+$",
        r"StackedLoRALinear\(\n\s+in=64, out=64, experts=4, r=8",
        r"^eval gates equal training gates: True$",
        r"^top_k gating, non-zero gates per row: \[1, 1\]$",
    ],
    "02_train_from_recipe.py": [
        r"^recipe sections: \['model', 'moe', 'data', 'train'\]$",
        r"^trained steps: 6$",
        r"^checkpoints: \['checkpoint-3', 'checkpoint-6'\]$",
        r"^final/: \['experts', 'peft_expert_0', 'peft_expert_1', 'peft_expert_2', 'peft_expert_3', "
        r"'recipe\.yaml', 'tokenizer'\]$",
        r"^logged \(step, loss\): \[\(3, \d+\.\d+\), \(6, \d+\.\d+\)\]$",
        r"^eval loss per source: \{'demo:numbers': \d+\.\d+, 'demo:strings': \d+\.\d+\}$",
    ],
    "03_route_and_generate.py": [
        r"^gates: \[.*\] -> expert \d$",
        r"^forced expert 2: \[(\d+, ){7}\d+\]$",
        r"^base, no experts: \[",
        r"^routed generation equals forced expert \d: True$",
    ],
    "04_export_to_peft.py": [
        r"^adapter files: \['adapter_config\.json', 'adapter_model\.safetensors'\]$",
        r"^PEFT config: r = 8 targets = \['k_proj', 'o_proj', 'q_proj', 'v_proj'\]$",
        r"^same function: True$",
    ],
    "05_grow_and_prune.py": [
        r"^added expert 4: 5 experts, mature \[True, True, True, True, False\]$",
        r"^max \|logits after - before\| = 0\.0e\+00$",
        r"^gate of the new expert: 0\.000$",
        r"^step 2: admission 0\.50, gate 0\.\d*[1-9]\d*, matured now \[\]$",
        r"^step 4: admission 1\.00, gate 0\.\d+, matured now \[4\]$",
        r"^pruned expert 0: 4 experts left$",
        r"^history: \[\('add', 4\), \('prune', 0\)\]$",
    ],
    "06_data_pipeline.py": [
        r"^demo:numbers \{'train': 36, 'validation': 4\}$",
        r"^train rows: \d+ sources: \['demo:numbers', 'demo:strings'\]$",
        r"^labelled tokens \d+ = answer tokens incl\. EOS \d+: True$",
        r"^packed: \{.*'segment_ids': \(\d, \d+\), 'position_ids'",
        r"^segments in row 0: \[0, 1",
    ],
    "07_sandbox.py": [
        r"^correct\s+passed=True\s+error=-",
        r"^wrong\s+passed=False error=assertion",
        r"^exits early\s+passed=False error=exit",
        r"^never ends\s+passed=False error=timeout",
        r"^pass@1 = 0\.250, pass@2 = 0\.500 \(n=4, c=1\)$",
    ],
    "08_memory_plan.py": [
        r"^  2\.51 B base parameters, 14\.75 M expert parameters$",
        r"^  2\.51 B base parameters, 29\.49 M expert parameters$",
        r"^  zero2_offload\s+peak\s+\d+\.\d+ GiB \(base",
        r"^  L4 24 GB, single_gpu\s+fits=True",
    ],
}


def test_every_example_has_expectations():
    assert sorted(p.name for p in EXAMPLES) == sorted(EXPECTED)


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_and_prints_what_it_claims(script, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TMPDIR=str(tmp_path), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"{script.name} exited {run.returncode}:\n{run.stdout}\n{run.stderr[-3000:]}"
    for pattern in EXPECTED[script.name]:
        assert re.search(pattern, run.stdout, re.MULTILINE), \
            f"{script.name}: no line matching {pattern!r} in:\n{run.stdout}"
