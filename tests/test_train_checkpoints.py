"""Checkpoints are never lost: marker-last writes, auto-resume trusts only complete ones
and verifies what it resumes (falling back to the previous good one), a run never
overwrites or deletes what it did not write, keep_last holds across restarts, a resume
onto another base or expert shape is refused; kill -9, Ctrl-C and a full disk lose
nothing that was saved. The portable copy loads."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from conftest import small_tmpfs
from trainrun import ROOT, SMALL, command, env, explain, final_record, losses, records, run

from dylora_moe.checkpoint import (MARKER, complete_checkpoints, latest_checkpoint, resolve_resume, verified_latest,
                                   verify)

REFERENCE = SMALL + ["--max_steps", "8", "--save_every", "4", "--keep_last", "5"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One clean run (checkpoints 4 and 8, final/): the yardstick most tests copy and damage."""
    tmp = tmp_path_factory.mktemp("reference")
    done = run("single", REFERENCE + ["--output_dir", str(tmp / "run")], tmp)
    assert done.returncode == 0, explain(done)
    return tmp / "run"


def copy_run(reference, tmp_path, name="run"):
    return shutil.copytree(reference, tmp_path / name)


def error_line(done) -> str:
    """The last line of stderr, which must be the only `error:` line and no traceback."""
    assert "Traceback" not in done.stderr, explain(done)
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, explain(done)
    assert done.stderr.rstrip().splitlines()[-1] == lines[0]
    return lines[0]


def fingerprint(path):
    return {p.relative_to(path).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes()[:64])
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_auto_resume_skips_what_a_kill_9_left_behind(reference, tmp_path):
    out = copy_run(reference, tmp_path)
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
    out = tmp_path / "run"
    e = env(tmp_path)
    e.update(DYLORA_TEST_CHECKPOINT_DELAY_S="30", DYLORA_TEST_CHECKPOINT_DELAY_STEP="8")
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


def test_fresh_run_refuses_a_directory_that_holds_a_run(reference, tmp_path):
    out = copy_run(reference, tmp_path)
    prints = fingerprint(out)
    again = run("single", SMALL + ["--max_steps", "2", "--output_dir", str(out), "--resume_from_checkpoint", "none"],
                tmp_path)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "resume" in again.stderr
    assert fingerprint(out) == prints


def test_checkpoints_hold_only_experts_and_the_portable_copy_loads(reference):
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from dylora_moe import DyLoRAMoE

    out = reference
    with safe_open(str(out / "checkpoints" / "checkpoint-8" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.endswith(("lora_A", "lora_B")) or k.startswith("router.") for k in keys)
    portable = out / "checkpoints" / "checkpoint-8" / "portable"
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
    (tmp_path / "checkpoint-5").mkdir()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-5"), tmp_path)
    assert resolve_resume("auto", tmp_path / "nothing-here") is None


def damage(checkpoint, how: str) -> None:
    if how == "truncated weights":
        path = checkpoint / "model.safetensors"
        path.write_bytes(path.read_bytes()[:1000])
    elif how == "missing optimizer":
        (checkpoint / "optimizer.bin").unlink()
    elif how == "unreadable marker":
        (checkpoint / MARKER).write_text('{"step": 8, "files": ')
    elif how == "truncated rng state":
        path = checkpoint / "random_states_0.pkl"
        path.write_bytes(path.read_bytes()[:-100])
    elif how == "flipped byte":
        path = checkpoint / "portable" / "experts" / "experts.safetensors"
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))


DAMAGES = {
    "truncated weights": r"model\.safetensors is 1000 bytes, its marker says \d+ \(truncated\)",
    "missing optimizer": r"optimizer\.bin is missing",
    "unreadable marker": r"COMPLETE marker unreadable \(not valid JSON\)",
    "truncated rng state": r"random_states_0\.pkl is \d+ bytes, its marker says \d+ \(truncated\)",
    "flipped byte": r"portable/experts/experts\.safetensors does not match its sha256 \(corrupted\)",
}


@pytest.mark.parametrize("how", list(DAMAGES))
def test_auto_verifies_and_falls_back_naming_what_was_wrong(how, reference, tmp_path, caplog):
    import re

    ckpts = copy_run(reference, tmp_path) / "checkpoints"
    assert verify(ckpts / "checkpoint-8") is None
    damage(ckpts / "checkpoint-8", how)
    problem = verify(ckpts / "checkpoint-8")
    assert re.fullmatch(DAMAGES[how], str(problem)) and not problem.unsealed  # damaged, not an interrupted save
    assert verified_latest(ckpts) == ckpts / "checkpoint-4"
    assert re.search(rf"checkpoint-8 cannot be resumed: {DAMAGES[how]}", caplog.text)
    assert f"resuming from {ckpts / 'checkpoint-4'} instead" in caplog.text
    with pytest.raises(ValueError, match=rf"not a complete checkpoint \({DAMAGES[how]}\)"):
        resolve_resume(str(ckpts / "checkpoint-8"), ckpts)  # named explicitly: an error, never a fallback


def test_a_truncated_rng_state_falls_back_and_the_resume_stays_exact(reference, tmp_path):
    """Accelerate would resume without the RNG state (dropout masks change): the fallback
    to checkpoint-4 instead replays steps 5-8 bitwise as the clean run did."""
    out = copy_run(reference, tmp_path)
    shutil.rmtree(out / "final")
    damage(out / "checkpoints" / "checkpoint-8", "truncated rng state")
    again = run("single", REFERENCE + ["--output_dir", str(out), "--resume_from_checkpoint", "auto"], tmp_path)
    assert again.returncode == 0, explain(again)
    assert "checkpoint-8 cannot be resumed: random_states_0.pkl is" in again.stderr
    assert "checkpoint-4 instead" in again.stderr and "checkpoint-4 at step 4" in again.stderr
    assert losses(out) == losses(reference)  # every step, bitwise
    assert final_record(out)["weights_sha256_per_rank"] == final_record(reference)["weights_sha256_per_rank"]
    assert (out / "checkpoints" / "checkpoint-8" / "random_states_0.pkl").is_file()  # the damaged one is kept
    assert (out / "checkpoints" / "checkpoint-8-1" / MARKER).is_file()


def test_keep_last_is_honoured_across_restarts(reference, tmp_path):
    out = copy_run(reference, tmp_path)  # checkpoints 4 and 8 of one run
    again = run("single", SMALL + ["--max_steps", "12", "--save_every", "2", "--keep_last", "2", "--output_dir",
                                   str(out), "--resume_from_checkpoint", "auto"], tmp_path)
    assert again.returncode == 0, explain(again)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-12"]
    run_ids = {json.loads((p / MARKER).read_text())["run"] for p in (out / "checkpoints").iterdir()}
    assert run_ids == {json.loads((reference / "checkpoints" / "checkpoint-8" / MARKER).read_text())["run"]}


def test_a_resume_onto_another_base_or_expert_shape_is_refused(reference, tmp_path, capsys, fresh_accelerate):
    """Recorded in every marker: the base (name, config sha256) and the experts' shapes."""
    from transformers import AutoConfig, AutoTokenizer

    from dylora_moe.model.tiny import random_causal_lm
    from dylora_moe.train.cli import main as train_main

    marker = json.loads((reference / "checkpoints" / "checkpoint-8" / MARKER).read_text())
    assert marker["base"]["name"] == "tiny-random:gemma" and len(marker["base"]["config_sha256"]) == 64
    assert marker["experts"]["lora_r"] == 8 and marker["experts"]["num_experts"] == 4
    out = copy_run(reference, tmp_path)
    args = REFERENCE + ["--output_dir", str(out), "--max_steps", "10", "--resume_from_checkpoint", "auto"]
    # A llama of exactly the gemma's shape, as a local model folder with the run's tokenizer.
    gemma = AutoConfig.from_pretrained(reference / "base_model").to_dict()
    llama = AutoConfig.for_model("llama", **{k: gemma[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings")})
    random_causal_lm(llama).save_pretrained(tmp_path / "llama")
    AutoTokenizer.from_pretrained(reference / "tokenizer").save_pretrained(tmp_path / "llama")
    unlocked = lambda: {k: v for k, v in fingerprint(out).items() if k != ".lock"}
    before = unlocked()
    for extra, fragments in [
        (["--lora_r", "4"], ["moe.lora_r=4: the experts of ", "have lora_r=8; resume with --lora_r 8"]),
        (["--target_modules", "[q_proj, v_proj]"], [
            "moe.target_modules: this recipe puts experts on q_proj x2, v_proj x2, those of",
            "resume with --target_modules '[down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj]'"]),
        (["--tiny", "{hidden_size: 64, num_layers: 2, intermediate_size: 512}"], [
            "model.tiny={'hidden_size': 64, 'num_layers': 2, 'intermediate_size': 512}: ",
            "base_model holds a tiny base of another architecture or shape"]),
        (["--base_model", str(tmp_path / "llama"), "--tokenizer", "none", "--tiny", "{}"], [
            "its experts were trained on base 'tiny-random:gemma' (config sha256 ",
            f"this recipe loads '{tmp_path / 'llama'}'", "resume with the base it was trained on"]),
    ]:
        assert train_main(args + extra) == 2, extra
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in err, err
        assert all(f in errors[0] for f in fragments), errors[0]
    assert unlocked() == before  # no recipe-resume-*.yaml, metrics.jsonl as it was, checkpoints untouched


def wait_for(predicate, timeout=300.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_kill_9_mid_save_then_a_restart_from_scratch_matches_a_clean_run(reference, tmp_path):
    """The first save is held open (test seam) and the run killed -9 there: no complete
    checkpoint. Meanwhile a second run in the same dir is refused, naming the first. The
    restart from scratch gives the clean run's weights and losses, with the stale lock
    in place, and metrics.jsonl holds its steps once (the dead attempt's are kept aside)."""
    out = tmp_path / "run"
    e = env(tmp_path)
    e.update(DYLORA_TEST_CHECKPOINT_DELAY_S="60", DYLORA_TEST_CHECKPOINT_DELAY_STEP="4")
    first = subprocess.Popen(command("single", REFERENCE + ["--output_dir", str(out)]), cwd=ROOT, env=e,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_for(lambda: (out / "checkpoints" / "checkpoint-4.tmp" / "model.safetensors").exists())
        second = run("single", REFERENCE + ["--output_dir", str(out)], tmp_path)
        assert second.returncode == 2
        assert f"in use by another training run (pid {first.pid} on host " in error_line(second)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert (out / ".lock").read_text().startswith(f"pid {first.pid} ")  # left behind by the dead run
    restart = run("single", REFERENCE + ["--output_dir", str(out)], tmp_path)
    assert restart.returncode == 0, explain(restart)
    assert "moved to" in restart.stderr
    assert [r["step"] for r in records(out) if "loss" in r] == list(range(1, 9))
    assert losses(out) == losses(reference)
    assert final_record(out)["weights_sha256_per_rank"] == final_record(reference)["weights_sha256_per_rank"]
    abandoned = list(out.glob("metrics-abandoned-*.jsonl"))
    assert len(abandoned) == 1 and "\"step\": 4" in abandoned[0].read_text()


def test_ctrl_c_saves_at_the_step_boundary_and_a_second_one_stops_at_once(reference, tmp_path):
    from dylora_moe.train.preemption import EXIT_INTERRUPTED

    out = copy_run(reference, tmp_path)
    args = SMALL + ["--max_steps", "200", "--output_dir", str(out), "--resume_from_checkpoint", "auto"]
    proc = subprocess.Popen(command("single", args), cwd=ROOT, env=env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert wait_for(lambda: max((s for s in losses(out)), default=0) >= 10)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err and "Ctrl-C: saving a checkpoint at the end of this step" in err
    step = max(losses(out))
    assert f"SIGINT (Ctrl-C): saved at step {step}, exiting with 130" in err
    saved = out / "checkpoints" / f"checkpoint-{step}"
    assert verify(saved) is None and json.loads((saved / MARKER).read_text())["preempted"] is True

    e = env(tmp_path)
    e.update(DYLORA_TEST_CHECKPOINT_DELAY_S="120")  # the next save hangs: only a second Ctrl-C ends it early
    args[args.index("--max_steps") + 1] = "400"
    proc = subprocess.Popen(command("single", args), cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    assert wait_for(lambda: max(losses(out)) > step + 2)
    os.kill(proc.pid, signal.SIGINT)
    assert wait_for(lambda: any(p.name.endswith(".tmp") for p in (out / "checkpoints").iterdir()))
    pressed = time.time()
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert time.time() - pressed < 30 and proc.returncode == EXIT_INTERRUPTED, err
    assert err.rstrip().endswith("error: interrupted") and "Traceback" not in err
    assert verified_latest(out / "checkpoints") == saved  # the cut-short save is ignored


def test_disk_full_at_a_save_is_one_line_and_keeps_the_previous_checkpoint(reference, tmp_path):
    with small_tmpfs(tmp_path / "disk", "48m") as disk:
        out = copy_run(reference, disk)
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        with open(disk / "filler", "wb") as f:  # leave 512 KiB: enough for logs and plots, not a checkpoint
            f.truncate(0)
            f.write(b"\0" * (free - 512 * 1024))
        before = fingerprint(out / "checkpoints")
        done = run("single", REFERENCE + ["--max_steps", "10", "--output_dir", str(out),
                                          "--resume_from_checkpoint", "auto"], tmp_path)
        assert done.returncode == 2, explain(done)
        line = error_line(done)
        assert "No space left on device while saving checkpoint-10 (nothing of it kept; checkpoint-8 is intact)" in line
        assert "(the disk is full: free space" in line
        assert fingerprint(out / "checkpoints") == before
        assert verify(out / "checkpoints" / "checkpoint-8") is None
