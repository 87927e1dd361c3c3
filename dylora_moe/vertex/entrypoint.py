"""The container's entrypoint: `python -m dylora_moe.vertex.entrypoint --config RECIPE [--field value ...]`.

Reads CLUSTER_SPEC (absent = one node), counts local GPUs, maps gs:// paths to the
/gcs/ mount, fetches secrets named by reference, and *execs* `accelerate launch` with
machine rank, machine count, master address and the total process count, so SIGTERM from
Vertex reaches the launcher (and through it every training process) directly.

DYLORA_ACCELERATE_CONFIG names another accelerate config (zero3, zero3_offload, fsdp2: a
base sharded over the GPUs); on several nodes a DeepSpeed config is launched with
DeepSpeed's "standard" multi-node launcher, which needs no pdsh/ssh.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from ..errors import UserError, guarded

from .cluster import Node, parse_cluster_spec

ROOT = Path(__file__).resolve().parents[2]
SINGLE_NODE_CONFIG = ROOT / "accelerate_configs" / "zero2_offload.yaml"
MULTI_NODE_CONFIG = ROOT / "accelerate_configs" / "multi_node_zero2.yaml"
SECRETS_ENV = "DYLORA_SECRET_REFS"  # {"HF_TOKEN": "projects/P/secrets/S/versions/latest", ...}
CONFIG_ENV = "DYLORA_ACCELERATE_CONFIG"


def gcs_to_fuse(value: str) -> str:
    """gs://bucket/path -> /gcs/bucket/path (Vertex mounts Cloud Storage there)."""
    return "/gcs/" + value[len("gs://"):] if value.startswith("gs://") else value


def training_args(args: list[str], env: dict) -> list[str]:
    out = [gcs_to_fuse(a) for a in args]
    names = {a.split("=", 1)[0] for a in out if a.startswith("--")}
    # Vertex gives each job a checkpoint dir when it has base_output_dir: train there and
    # resume from whatever a preempted attempt left.
    if env.get("AIP_CHECKPOINT_DIR") and not names & {"--output_dir", "--train.output_dir"}:
        out += ["--output_dir", gcs_to_fuse(env["AIP_CHECKPOINT_DIR"])]
    if not names & {"--resume_from_checkpoint", "--train.resume_from_checkpoint"}:
        out += ["--resume_from_checkpoint", "auto"]
    return out


def launch_command(node: Optional[Node], gpus_per_node: int, args: list[str], env: dict,
                   accelerate: str = "accelerate") -> list[str]:
    per_node = max(gpus_per_node, 1)  # a CPU-only node runs one process (gloo)
    if node is None or node.num_machines == 1:
        cmd = [accelerate, "launch", "--config_file", str(env.get(CONFIG_ENV, SINGLE_NODE_CONFIG)),
               "--num_processes", str(per_node)]
        if node is not None:
            cmd += ["--main_process_port", str(node.master_port)]
    else:
        config = Path(env.get(CONFIG_ENV, MULTI_NODE_CONFIG))
        cmd = [accelerate, "launch", "--config_file", str(config),
               "--num_machines", str(node.num_machines), "--machine_rank", str(node.machine_rank),
               "--main_process_ip", node.master_host, "--main_process_port", str(node.master_port),
               "--num_processes", str(per_node * node.num_machines)]
        if is_deepspeed_config(config):  # the default launcher (pdsh) needs ssh, which Vertex containers lack
            cmd += ["--deepspeed_multinode_launcher", "standard"]
    return cmd + ["-m", "dylora_moe.train", *training_args(args, env)]


def is_deepspeed_config(path: Path) -> bool:
    """An accelerate config (yaml) that launches DeepSpeed."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text()).get("distributed_type") == "DEEPSPEED"
    except (OSError, AttributeError, yaml.YAMLError) as e:
        raise UserError(f"{CONFIG_ENV}={str(path)!r}: not a readable accelerate config ({type(e).__name__})") from None


def local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def resolve_secrets(env: dict, fetch: Optional[Callable[[str], str]] = None) -> dict:
    """Secret values never travel in the job spec: it names Secret Manager versions, and
    they are read here with the job's service account."""
    try:
        refs = json.loads(env.get(SECRETS_ENV) or "{}")
    except json.JSONDecodeError as e:
        raise UserError(f"{SECRETS_ENV}: not valid JSON ({e.msg}); expected {{\"NAME\": \"projects/P/secrets/S/versions/V\"}}") from None
    if not isinstance(refs, dict) or not all(isinstance(v, str) for v in refs.values()):
        raise UserError(f"{SECRETS_ENV}: expected a JSON object of NAME: Secret Manager version name")
    if not refs:
        return env
    if fetch is None:
        fetch = _secret_manager_fetch()
    resolved = dict(env)
    for name, ref in refs.items():
        resolved[name] = fetch(ref)
    resolved.pop(SECRETS_ENV, None)
    return resolved


def _secret_manager_fetch() -> Callable[[str], str]:
    try:
        from google.cloud import secretmanager
    except ImportError:
        raise UserError(f"{SECRETS_ENV} is set but google-cloud-secret-manager is not installed") from None
    client = secretmanager.SecretManagerServiceClient()
    return lambda ref: client.access_secret_version(name=ref).payload.data.decode("utf-8")


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ)
    node = parse_cluster_spec(env.get("CLUSTER_SPEC"))  # a bad spec: ClusterSpecError, one line (guarded)
    env = resolve_secrets(env)
    cmd = launch_command(node, local_gpus(), args, env)
    print("launch:", " ".join(cmd), flush=True)
    os.execvpe(cmd[0], cmd, env)  # replaces this process: signals go straight to the launcher
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(guarded(main, sys.argv[1:]))
