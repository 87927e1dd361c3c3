"""Scale-out without a cloud: CLUSTER_SPEC -> launch arguments, a real two-"node" run on
localhost, the Vertex job spec (dry run), the Dockerfile and the build script."""
import json
import os
import re
import subprocess
import sys

import pytest
from trainrun import ROOT, SMALL, env, final_record, free_port

from dylora_moe.vertex import cluster, entrypoint, submit


def spec(task_type, index=0, workers=1, chief="10.0.0.2:2222"):
    return json.dumps({"cluster": {"workerpool0": [chief], "workerpool1": [f"10.0.0.{3 + i}:2222" for i in range(workers)]},
                       "task": {"type": task_type, "index": index}, "environment": "cloud"})


def flags(cmd):
    return {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--") and not cmd[i + 1].startswith("--")}


@pytest.mark.parametrize("text,rank,machines", [
    (spec("workerpool0"), 0, 2),              # chief of 2
    (spec("workerpool1", 0), 1, 2),           # worker of 2
    (spec("workerpool1", 2, workers=3), 3, 4),  # last of 4 nodes
])
def test_multi_node_launch_arguments(text, rank, machines):
    node = cluster.parse_cluster_spec(text)
    cmd = entrypoint.launch_command(node, gpus_per_node=8, args=["--config", "configs/codegemma-2b.yaml"], env={})
    f = flags(cmd)
    assert cmd[:2] == ["accelerate", "launch"] and f["--config_file"].endswith("multi_node_zero2.yaml")
    assert (f["--machine_rank"], f["--num_machines"]) == (str(rank), str(machines))
    assert (f["--main_process_ip"], f["--main_process_port"]) == ("10.0.0.2", "2222")
    assert f["--num_processes"] == str(8 * machines)  # the total over all machines
    assert cmd[cmd.index("-m") + 1] == "dylora_moe.train" and f["--resume_from_checkpoint"] == "auto"


def test_single_node_without_or_with_a_one_node_spec():
    for node in (None, cluster.parse_cluster_spec(json.dumps({"cluster": {"workerpool0": ["h:2222"]},
                                                              "task": {"type": "workerpool0", "index": 0}}))):
        cmd = entrypoint.launch_command(node, gpus_per_node=4, args=[], env={})
        f = flags(cmd)
        assert f["--config_file"].endswith("zero2_offload.yaml") and f["--num_processes"] == "4"
        assert "--machine_rank" not in f
    assert flags(entrypoint.launch_command(None, gpus_per_node=0, args=[], env={}))["--num_processes"] == "1"


@pytest.mark.parametrize("text,message", [
    ('{"cluster": {"workerpool0": ["h:1"]', "not valid JSON"),
    (json.dumps({"cluster": {"workerpool1": ["w:1"]}, "task": {"type": "workerpool1", "index": 0}}),
     "workerpool0 must list exactly one chief"),
    (json.dumps({"cluster": {"workerpool0": ["h:1"], "workerpool1": ["w:1"]}, "task": {"type": "workerpool1", "index": 5}}),
     "index 5 is outside workerpool1"),
    (json.dumps({"cluster": {"workerpool0": ["h:1"]}, "task": {"type": "workerpool2", "index": 0}}), "reduction server"),
    (json.dumps({"cluster": {"workerpool0": ["nohostport"]}, "task": {"type": "workerpool0"}}), "not host:port"),
])
def test_malformed_cluster_spec_is_a_one_line_error(text, message):
    with pytest.raises(cluster.ClusterSpecError, match=message):
        cluster.parse_cluster_spec(text)
    done = subprocess.run([sys.executable, "-m", "dylora_moe.vertex.entrypoint", "--config", "x"], cwd=ROOT,
                          capture_output=True,
                          text=True, env={**os.environ, "CLUSTER_SPEC": text})
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message.split()[0] in done.stderr


def test_gcs_paths_checkpoint_dir_and_secrets():
    args = entrypoint.training_args(["--config", "c.yaml", "--data.sources", "gs://b/data.jsonl"],
                                    {"AIP_CHECKPOINT_DIR": "gs://bucket/job/checkpoints"})
    assert args[args.index("--data.sources") + 1] == "/gcs/b/data.jsonl"
    assert args[args.index("--output_dir") + 1] == "/gcs/bucket/job/checkpoints"
    explicit = entrypoint.training_args(["--output_dir", "gs://x/y", "--resume_from_checkpoint", "none"], {})
    assert explicit == ["--output_dir", "/gcs/x/y", "--resume_from_checkpoint", "none"]
    fetched = []
    resolved = entrypoint.resolve_secrets(
        {"DYLORA_SECRET_REFS": json.dumps({"HF_TOKEN": "projects/p/secrets/hf/versions/3"}), "A": "1"},
        fetch=lambda ref: fetched.append(ref) or "the-value")
    assert fetched == ["projects/p/secrets/hf/versions/3"]
    assert resolved == {"A": "1", "HF_TOKEN": "the-value"}


def two_nodes(tmp_path, train_args: list, extra_env: dict | None = None) -> list[str]:
    """Two entrypoint processes, one per "node", with CLUSTER_SPECs pointing at 127.0.0.1;
    both must exit 0. -> their outputs (chief first)."""
    base = {"cluster": {"workerpool0": [f"127.0.0.1:{free_port()}"], "workerpool1": ["127.0.0.1:1"]}}
    e = {**env(tmp_path), **(extra_env or {})}  # the venv's bin is first on PATH (conftest)
    args = [sys.executable, "-m", "dylora_moe.vertex.entrypoint", *SMALL, *train_args]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**e, "CLUSTER_SPEC": json.dumps({**base, "task": {"type": t, "index": 0}})})
             for t in ("workerpool0", "workerpool1")]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-4000:]
    return outputs


def test_two_nodes_on_localhost_train_together(tmp_path):
    """Two entrypoint processes, one per "node", CLUSTER_SPECs pointing at 127.0.0.1: they
    rendezvous (gloo), train the demo under multi-node ZeRO-2 and end with equal weights."""
    out = tmp_path / "run"
    outputs = two_nodes(tmp_path, ["--max_steps", "2", "--output_dir", str(out)])
    assert "--machine_rank 1" in outputs[1] and "--num_processes 2" in outputs[0]
    checksums = final_record(out)["weights_sha256_per_rank"]
    assert len(checksums) == 2 and len(set(checksums)) == 1


VERTEX_ARGS = ["--project", "my-proj", "--region", "us-central1", "--image", "us-central1-docker.pkg.dev/my-proj/r/dylora:1",
               "--base_output_dir", "gs://bucket/runs/a", "--machine", "a3-highgpu-8g", "--nodes", "3",
               "--service_account", "trainer@my-proj.iam.gserviceaccount.com", "--label", "team=ml",
               "--secret", "HF_TOKEN=projects/my-proj/secrets/hf-token/versions/latest",
               "--secret", "WANDB_API_KEY=projects/my-proj/secrets/wandb/versions/2", "--dry-run"]


def dry_run(capsys, args):
    from google.cloud.aiplatform_v1 import types

    assert submit.main(args) == 0
    text = capsys.readouterr().out
    return text, types.CustomJob.from_json(text)


def test_dry_run_job_spec(capsys, monkeypatch):
    from google.cloud.aiplatform_v1 import types

    monkeypatch.setenv("HF_TOKEN", "hf_live_secret_value")  # must never reach the spec
    monkeypatch.setenv("WANDB_API_KEY", "wandb_live_secret_value")
    text, job = dry_run(capsys, VERTEX_ARGS + ["--", "--num_experts", "6"])
    pools = job.job_spec.worker_pool_specs
    assert [p.replica_count for p in pools] == [1, 2]
    for pool in pools:
        assert pool.machine_spec.machine_type == "a3-highgpu-8g"
        assert pool.machine_spec.accelerator_type == types.AcceleratorType.NVIDIA_H100_80GB
        assert pool.machine_spec.accelerator_count == 8
        assert pool.container_spec.args == ["--config", "configs/codegemma-2b.yaml", "--num_experts", "6"]
        assert pool.disk_spec.boot_disk_size_gb == 200
    assert job.job_spec.scheduling.strategy == types.Scheduling.Strategy.SPOT
    assert job.job_spec.scheduling.restart_job_on_worker_restart is True
    assert job.job_spec.base_output_directory.output_uri_prefix == "gs://bucket/runs/a"
    assert job.job_spec.service_account == "trainer@my-proj.iam.gserviceaccount.com"
    assert dict(job.labels) == {"team": "ml"}
    refs = json.loads({e.name: e.value for e in pools[0].container_spec.env}["DYLORA_SECRET_REFS"])
    assert refs["HF_TOKEN"] == "projects/my-proj/secrets/hf-token/versions/latest"
    assert "live_secret_value" not in text


def test_dry_run_presets_and_on_demand(capsys):
    from google.cloud.aiplatform_v1 import types

    base = [a for a in VERTEX_ARGS if a not in ("a3-highgpu-8g",)]
    base[base.index("--machine") + 1:base.index("--machine") + 1] = ["a2-highgpu-1g"]
    _, job = dry_run(capsys, [a if a != "3" else "1" for a in base] + ["--no-spot"])
    assert len(job.job_spec.worker_pool_specs) == 1
    machine = job.job_spec.worker_pool_specs[0].machine_spec
    assert (machine.machine_type, machine.accelerator_count) == ("a2-highgpu-1g", 1)
    assert machine.accelerator_type == types.AcceleratorType.NVIDIA_TESLA_A100
    assert job.job_spec.scheduling.strategy == types.Scheduling.Strategy.ON_DEMAND


@pytest.mark.parametrize("extra,message", [
    (["--env", "HF_TOKEN=hf_abc"], "looks like a secret"),
    (["--secret", "HF_TOKEN=hf_abc"], "Secret Manager version name"),
    (["--nodes", "0"], "--nodes=0"),
])
def test_vertex_bad_arguments(extra, message, capsys):
    args = [a for a in VERTEX_ARGS if a != "--dry-run"] + extra + ["--dry-run"]
    with pytest.raises(SystemExit) as exit_info:
        submit.main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_dockerfile_pins_satisfy_requirements():
    from packaging.requirements import Requirement

    docker = (ROOT / "Dockerfile").read_text()
    pins = dict(re.findall(r"\b([A-Za-z0-9_.-]+)==([0-9][A-Za-z0-9.+-]*)", docker))
    pins = {k.lower().replace("_", "-"): v for k, v in pins.items()}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is in requirements.txt but not pinned in the Dockerfile"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {req.specifier}"
    assert re.search(r'^ENTRYPOINT \["python", "-m", "dylora_moe.vertex.entrypoint"\]', docker, re.M)  # exec form
    assert "DS_BUILD_CPU_ADAM=1" in docker and "8.0" in docker and "9.0" in docker


def test_build_and_push_script(tmp_path):
    script = ROOT / "dylora_moe" / "vertex" / "build_and_push.sh"
    missing = subprocess.run(["bash", str(script), "us-central1"], capture_output=True, text=True,
                             env={"PATH": os.environ["PATH"]})
    assert missing.returncode == 2 and "usage:" in missing.stderr and "missing: PROJECT" in missing.stderr
    done = subprocess.run(["bash", str(script), "us-central1", "proj", "repo", "img", "v1"], capture_output=True,
                          text=True, env={"PATH": os.environ["PATH"], "DRY_RUN": "1"})
    assert done.returncode == 0, done.stderr
    uri = "us-central1-docker.pkg.dev/proj/repo/img:v1"
    assert f"+ docker build -t {uri} ." in done.stdout and f"+ docker push {uri}" in done.stdout


# ---------------------------------------------------------------------------- a sharded base
@pytest.mark.parametrize("config,standard", [("zero3.yaml", True), ("zero3_offload.yaml", True), ("fsdp2.yaml", False)])
def test_the_entrypoint_launches_a_sharded_config(config, standard):
    path = str(ROOT / "accelerate_configs" / config)
    env = {"DYLORA_ACCELERATE_CONFIG": path}
    single = flags(entrypoint.launch_command(None, gpus_per_node=8, args=[], env=env))
    assert single["--config_file"] == path and single["--num_processes"] == "8"
    cmd = entrypoint.launch_command(cluster.parse_cluster_spec(spec("workerpool1", 1, workers=3)), gpus_per_node=8,
                                    args=["--config", "configs/codegemma-7b.yaml"], env=env)
    f = flags(cmd)
    assert f["--config_file"] == path and f["--num_processes"] == "32" and f["--machine_rank"] == "2"
    # DeepSpeed's default multi-node launcher (pdsh) needs ssh: the standard one does not
    assert f.get("--deepspeed_multinode_launcher") == ("standard" if standard else None)
    with pytest.raises(ValueError, match="DYLORA_ACCELERATE_CONFIG='/no/such.yaml': not a readable accelerate config"):
        entrypoint.launch_command(cluster.parse_cluster_spec(spec("workerpool0")), gpus_per_node=8, args=[],
                                  env={"DYLORA_ACCELERATE_CONFIG": "/no/such.yaml"})


def test_two_nodes_on_localhost_train_under_zero3(tmp_path):
    """The multi-node path with a sharded base: two entrypoints ("nodes") on 127.0.0.1,
    ZeRO-3 through the standard launcher; each holds half of the base."""
    out = tmp_path / "run"
    outputs = two_nodes(tmp_path, ["--max_steps", "2", "--output_dir", str(out)],
                        {"DYLORA_ACCELERATE_CONFIG": str(ROOT / "accelerate_configs" / "zero3.yaml")})
    assert "--deepspeed_multinode_launcher standard" in outputs[1]
    checksums = final_record(out)["weights_sha256_per_rank"]
    assert len(checksums) == 2 and len(set(checksums)) == 1
    sharding = next(json.loads(line)["sharding"] for line in (out / "metrics.jsonl").read_text().splitlines()
                    if '"sharding"' in line)
    assert sharding["backend"] == "zero3" and len(sharding["held_bytes_per_rank"]) == 2


def test_vertex_plans_and_passes_the_accelerate_config(capsys):
    from google.cloud.aiplatform_v1 import types

    base = ["--project", "p", "--region", "us-central1", "--image", "us-central1-docker.pkg.dev/p/r/i:1",
            "--base_output_dir", "gs://b/run", "--dry-run"]
    # CodeGemma-7B, its recipe's machine: replicated (the default zero2_offload) it does not fit, under zero3 it does
    seven = base + ["--machine", "a2-highgpu-8g", "--config", "configs/codegemma-7b.yaml"]
    assert submit.main(seven) == 0
    assert "memory plan" in capsys.readouterr().err
    assert submit.main(seven + ["--accelerate_config", "accelerate_configs/zero3.yaml"]) == 0
    captured = capsys.readouterr()
    assert "memory plan" not in captured.err
    job = types.CustomJob.from_json(captured.out)
    container = job.job_spec.worker_pool_specs[0].container_spec
    assert {e.name: e.value for e in container.env}["DYLORA_ACCELERATE_CONFIG"] == "accelerate_configs/zero3.yaml"
    # StarCoder2-15B at 4 bits on 2 x L4 under FSDP2
    qlora = base + ["--machine", "g2-standard-24", "--config", "configs/starcoder2-15b-qlora.yaml",
                    "--accelerate_config", "accelerate_configs/fsdp2.yaml"]
    assert submit.main(qlora) == 0
    captured = capsys.readouterr()
    machine = types.CustomJob.from_json(captured.out).job_spec.worker_pool_specs[0].machine_spec
    assert (machine.accelerator_type, machine.accelerator_count) == (types.AcceleratorType.NVIDIA_L4, 2)
    assert "memory plan" not in captured.err
    with pytest.raises(SystemExit) as exit_info:
        submit.main(seven + ["--accelerate_config", "accelerate_configs/zero4.yaml"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--accelerate_config='accelerate_configs/zero4.yaml'" in err
    assert "zero3.yaml" in err
