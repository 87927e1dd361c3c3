"""Checkpoints are never lost: marker-last writes, auto-resume trusts only complete ones,
a run never overwrites or deletes what it did not write; the portable copy loads."""
import shutil

from trainrun import ROOT, SMALL, explain, losses, run

from dylora_moe.train.checkpoint import MARKER, complete_checkpoints, latest_checkpoint, resolve_resume


def fingerprint(path):
    return {p.relative_to(path).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes()[:64])
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_auto_resume_skips_what_a_kill_9_left_behind(tmp_path):
    out = tmp_path / "run"
    args = SMALL + ["--max_steps", "8", "--save_every", "4", "--keep_last", "5"]
    done = run("single", args + ["--output_dir", str(out)], tmp_path)
    assert done.returncode == 0, explain(done)
    ckpts = out / "checkpoints"
    shutil.rmtree(out / "final")
    # What `kill -9` during a checkpoint write leaves: a .tmp folder with partial files,
    # or (on filesystems without atomic rename, e.g. a GCS mount) a folder without marker.
    partial = ckpts / "checkpoint-12.tmp"
    shutil.copytree(ckpts / "checkpoint-8", partial)
    (partial / MARKER).unlink()
    unmarked = ckpts / "checkpoint-16"
    shutil.copytree(ckpts / "checkpoint-8", unmarked)
    (unmarked / MARKER).unlink()
    (unmarked / "model.safetensors").write_bytes(b"truncated")
    assert latest_checkpoint(ckpts) == ckpts / "checkpoint-8"
    assert [p.name for _, p in complete_checkpoints(ckpts)] == ["checkpoint-4", "checkpoint-8"]

    again = run("single", SMALL + ["--max_steps", "10", "--save_every", "4", "--output_dir", str(out),
                                   "--resume_from_checkpoint", "auto"], tmp_path)
    assert again.returncode == 0, explain(again)
    assert "resumed from" in again.stderr and "checkpoint-8 at step 8" in again.stderr
    assert max(losses(out)) == 10


def test_real_kill_9_during_a_checkpoint_write(tmp_path):
    """SIGKILL the whole run while checkpoint-8 is being written (held open by a test-only
    delay): auto-resume ignores the half-written folder and continues from checkpoint-4."""
    import os
    import signal
    import subprocess
    import time

    from trainrun import command, env

    out = tmp_path / "run"
    e = env(tmp_path)
    e["DYLORA_TEST_CHECKPOINT_DELAY_S"] = "30"
    proc = subprocess.Popen(command("single", SMALL + ["--max_steps", "12", "--save_every", "4", "--output_dir", str(out)]),
                            cwd=ROOT, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = out / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts / "checkpoint-8.tmp").exists():
        time.sleep(0.1)
    assert (ckpts / "checkpoint-8.tmp").exists(), "never reached the second checkpoint write"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (ckpts / "checkpoint-4" / MARKER).is_file() and not (ckpts / "checkpoint-8").exists()
    assert latest_checkpoint(ckpts) == ckpts / "checkpoint-4"
    again = run("single", SMALL + ["--max_steps", "12", "--save_every", "4", "--output_dir", str(out),
                                   "--resume_from_checkpoint", "auto"], tmp_path)
    assert again.returncode == 0, explain(again)
    assert "checkpoint-4 at step 4" in again.stderr
    assert [p.name for _, p in complete_checkpoints(ckpts)][-1] == "checkpoint-12"


def test_resumed_run_never_overwrites_or_deletes_checkpoints_it_did_not_write(tmp_path):
    out = tmp_path / "run"
    args = SMALL + ["--max_steps", "12", "--save_every", "4", "--keep_last", "10", "--output_dir", str(out)]
    done = run("single", args, tmp_path)
    assert done.returncode == 0, explain(done)
    ckpts = out / "checkpoints"
    before = {p.name: fingerprint(p) for p in ckpts.iterdir()}
    final_before = fingerprint(out / "final")
    # resume from an older checkpoint: its saves at 8 and 12 must not replace the existing ones,
    # and keep_last=1 may only remove its own
    again = run("single", args[:-4] + ["--keep_last", "1", "--output_dir", str(out),
                                       "--resume_from_checkpoint", str(ckpts / "checkpoint-4")], tmp_path)
    assert again.returncode == 0, explain(again)
    after = {p.name: p for p in ckpts.iterdir()}
    for name, prints in before.items():
        assert fingerprint(after[name]) == prints, name
    assert fingerprint(out / "final") == final_before
    assert set(after) - set(before) == {"checkpoint-12-1"}  # its own 8-1 was rotated away


def test_fresh_run_refuses_a_directory_that_holds_a_run(tmp_path):
    out = tmp_path / "run"
    done = run("single", SMALL + ["--max_steps", "2", "--output_dir", str(out)], tmp_path)
    assert done.returncode == 0, explain(done)
    prints = fingerprint(out)
    again = run("single", SMALL + ["--max_steps", "2", "--output_dir", str(out), "--resume_from_checkpoint", "none"],
                tmp_path)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "resume" in again.stderr
    assert fingerprint(out) == prints


def test_checkpoints_hold_only_experts_and_the_portable_copy_loads(tmp_path):
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from dylora_moe import DyLoRAMoE

    out = tmp_path / "run"
    done = run("single", SMALL + ["--max_steps", "3", "--output_dir", str(out)], tmp_path)
    assert done.returncode == 0, explain(done)
    with safe_open(str(out / "checkpoints" / "checkpoint-3" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.endswith(("lora_A", "lora_B")) or k.startswith("router.") for k in keys)
    portable = out / "checkpoints" / "checkpoint-3" / "portable"
    assert (portable / "experts" / "experts.safetensors").is_file() and (portable / "recipe.yaml").is_file()

    moe = DyLoRAMoE.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"), out / "final" / "experts")
    moe.eval()
    ids = torch.randint(3, 200, (1, 12))
    with torch.no_grad(), moe.override_gates(torch.tensor([0.0, 1.0, 0.0, 0.0])):
        mine = moe(input_ids=ids).logits
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"),
                                     out / "final" / "peft_expert_1").eval()
    with torch.no_grad():
        theirs = peft(input_ids=ids).logits
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_resume_argument_must_name_a_complete_checkpoint(tmp_path):
    import pytest

    (tmp_path / "checkpoint-5").mkdir()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-5"), tmp_path)
    assert resolve_resume("auto", tmp_path / "nothing-here") is None
