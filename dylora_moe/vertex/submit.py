"""`dylora-moe submit vertex`: build (and submit) a Vertex AI CustomJob.

    dylora-moe submit vertex --project P --region us-central1 --image IMAGE_URI \\
        --machine a3-highgpu-8g --nodes 2 --base_output_dir gs://BUCKET/runs/x \\
        --secret HF_TOKEN=projects/P/secrets/hf-token/versions/latest \\
        --config configs/codegemma-2b.yaml -- --num_experts 6
    ... --dry-run    # print the job spec as JSON; no credentials, no network

Worker pool 0 is the chief (1 replica), pool 1 the other nodes. Spot VMs by default,
with restart_job_on_worker_restart so a preempted node restarts the whole job, which
resumes from the latest complete checkpoint in base_output_dir.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ..plan import GPUS, VERTEX_ACCELERATORS, fit_warning, strategy_named, strategy_of_config
from ..recipe import load_recipe

# preset -> (machine type, accelerator type, accelerators per node)
MACHINES = {
    "a3-highgpu-1g": ("a3-highgpu-1g", "NVIDIA_H100_80GB", 1),
    "a3-highgpu-2g": ("a3-highgpu-2g", "NVIDIA_H100_80GB", 2),
    "a3-highgpu-4g": ("a3-highgpu-4g", "NVIDIA_H100_80GB", 4),
    "a3-highgpu-8g": ("a3-highgpu-8g", "NVIDIA_H100_80GB", 8),
    "a2-highgpu-1g": ("a2-highgpu-1g", "NVIDIA_TESLA_A100", 1),
    "a2-highgpu-2g": ("a2-highgpu-2g", "NVIDIA_TESLA_A100", 2),
    "a2-highgpu-4g": ("a2-highgpu-4g", "NVIDIA_TESLA_A100", 4),
    "a2-highgpu-8g": ("a2-highgpu-8g", "NVIDIA_TESLA_A100", 8),
    "a2-ultragpu-1g": ("a2-ultragpu-1g", "NVIDIA_A100_80GB", 1),
    "a2-ultragpu-8g": ("a2-ultragpu-8g", "NVIDIA_A100_80GB", 8),
    "g2-standard-12": ("g2-standard-12", "NVIDIA_L4", 1),
    "g2-standard-24": ("g2-standard-24", "NVIDIA_L4", 2),
    "g2-standard-48": ("g2-standard-48", "NVIDIA_L4", 4),
    "g2-standard-96": ("g2-standard-96", "NVIDIA_L4", 8),
}
CONFIG_ENV = "DYLORA_ACCELERATE_CONFIG"  # read by dylora_moe/vertex/entrypoint.py inside the container
SECRET_LIKE = re.compile(r"(TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY|CREDENTIAL)", re.IGNORECASE)
SECRET_REF = re.compile(r"^projects/[^/]+/secrets/[^/]+/versions/[^/]+$")
SECRETS_ENV = "DYLORA_SECRET_REFS"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dylora-moe submit vertex", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", required=True)
    p.add_argument("--region", required=True)
    p.add_argument("--image", required=True, help="REGION-docker.pkg.dev/PROJECT/REPO/IMAGE:TAG")
    p.add_argument("--machine", default="a3-highgpu-1g", choices=sorted(MACHINES))
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--spot", action=argparse.BooleanOptionalAction, default=True,
                   help="spot VMs (default) or on-demand (--no-spot)")
    p.add_argument("--max_wait_hours", type=float, default=0, help="how long to wait for spot capacity (0 = Vertex default)")
    p.add_argument("--base_output_dir", required=True, help="gs://BUCKET/PATH: checkpoints land in AIP_CHECKPOINT_DIR")
    p.add_argument("--boot_disk_gb", type=int, default=200)
    p.add_argument("--service_account", help="runs the job; needs the bucket and the secrets it reads")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="non-secret environment")
    p.add_argument("--secret", action="append", default=[], metavar="NAME=projects/P/secrets/S/versions/V",
                   help="an env var read from Secret Manager inside the container (the value never enters the spec)")
    p.add_argument("--display_name", default="dylora-moe")
    p.add_argument("--config", default="configs/codegemma-2b.yaml", help="recipe path inside the image")
    p.add_argument("--accelerate_config", help="accelerate config inside the image, e.g. accelerate_configs/zero3.yaml "
                                               "(default: zero2_offload, multi_node_zero2 on several nodes)")
    p.add_argument("--dry-run", action="store_true", help="print the job spec as JSON, submit nothing")
    p.add_argument("overrides", nargs="*", help="recipe overrides after --, e.g. -- --num_experts 6")
    args = p.parse_args(argv)
    problems = check_args(args)
    if problems:
        p.error(problems)
    return args


def check_args(args) -> str | None:
    if args.nodes < 1:
        return f"--nodes={args.nodes}: expected >= 1"
    if not args.base_output_dir.startswith("gs://"):
        return f"--base_output_dir={args.base_output_dir!r}: expected a gs:// path"
    for item in args.label + args.env + args.secret:
        if "=" not in item:
            return f"{item!r}: expected KEY=VALUE"
    if args.accelerate_config is not None:
        from pathlib import Path

        path = Path(args.accelerate_config)
        if path.is_absolute() or not path.is_file() or path.suffix != ".yaml":
            shipped = ", ".join(sorted(p.name for p in Path("accelerate_configs").glob("*.yaml")))
            return (f"--accelerate_config={args.accelerate_config!r}: expected an accelerate config of this checkout, "
                    f"relative to it (the image holds the same files): accelerate_configs/ has {shipped or 'none'}")
    for item in args.env:
        if SECRET_LIKE.search(item.split("=", 1)[0]):
            return f"--env {item.split('=', 1)[0]}=...: looks like a secret; pass it with --secret NAME=projects/..."
    for item in args.secret:
        name, ref = item.split("=", 1)
        if not SECRET_REF.match(ref):
            return f"--secret {name}: expected a Secret Manager version name projects/P/secrets/S/versions/V"
    return None


def build_job(args):
    """The CustomJob proto; builds offline with no credentials."""
    from google.cloud.aiplatform_v1 import types

    machine_type, accelerator, per_node = MACHINES[args.machine]
    env = [types.EnvVar(name=k, value=v) for k, v in (e.split("=", 1) for e in args.env)]
    if args.accelerate_config:
        env.append(types.EnvVar(name=CONFIG_ENV, value=args.accelerate_config))
    refs = dict(s.split("=", 1) for s in args.secret)
    if refs:
        env.append(types.EnvVar(name=SECRETS_ENV, value=json.dumps(refs, sort_keys=True)))
    container = types.ContainerSpec(image_uri=args.image, args=["--config", args.config, *args.overrides], env=env)
    machine = types.MachineSpec(machine_type=machine_type, accelerator_type=accelerator, accelerator_count=per_node)
    disk = types.DiskSpec(boot_disk_type="pd-ssd", boot_disk_size_gb=args.boot_disk_gb)
    pools = [types.WorkerPoolSpec(machine_spec=machine, replica_count=1, container_spec=container, disk_spec=disk)]
    if args.nodes > 1:
        pools.append(types.WorkerPoolSpec(machine_spec=machine, replica_count=args.nodes - 1,
                                          container_spec=container, disk_spec=disk))
    scheduling = types.Scheduling(
        strategy=types.Scheduling.Strategy.SPOT if args.spot else types.Scheduling.Strategy.ON_DEMAND,
        restart_job_on_worker_restart=True)
    if args.max_wait_hours:
        scheduling.max_wait_duration = {"seconds": int(args.max_wait_hours * 3600)}
    spec = types.CustomJobSpec(worker_pool_specs=pools, scheduling=scheduling,
                               base_output_directory=types.GcsDestination(output_uri_prefix=args.base_output_dir))
    if args.service_account:
        spec.service_account = args.service_account
    labels = dict(item.split("=", 1) for item in args.label)
    return types.CustomJob(display_name=args.display_name, job_spec=spec, labels=labels)


def memory_warning(args) -> str | None:
    """The recipe's memory plan (`dylora-moe plan`) against the machine's GPU, under the
    accelerate config the entrypoint launches (ZeRO-2 with CPU offload unless
    --accelerate_config names another): a warning line, or None when it fits. Recipe and
    config are read from this checkout (the image holds the same files)."""
    _, accelerator, per_node = MACHINES[args.machine]
    gpu = VERTEX_ACCELERATORS.get(accelerator)
    if gpu is None:
        return None
    if not Path(args.config).is_file():
        return f"memory plan skipped: {args.config} is not in this checkout"
    try:
        cfg = load_recipe(args.config, args.overrides)
        processes = args.nodes * per_node
        strategy = (strategy_of_config(Path(args.accelerate_config), processes) if args.accelerate_config
                    else strategy_named("zero2_offload", processes=processes))
        return fit_warning(cfg, GPUS[gpu] * 2**20, f"{gpu} ({accelerator})", strategy)
    except (ValueError, FileNotFoundError) as e:
        return f"memory plan skipped: {e}"


def submit(job, project: str, region: str):
    from google.cloud import aiplatform_v1

    client = aiplatform_v1.JobServiceClient(client_options={"api_endpoint": f"{region}-aiplatform.googleapis.com"})
    return client.create_custom_job(parent=f"projects/{project}/locations/{region}", custom_job=job)


def main(argv=None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    from google.cloud.aiplatform_v1 import types

    job = build_job(args)
    warning = memory_warning(args)
    if warning:  # stderr: the dry run's stdout stays the job's JSON
        print(f"warning: {warning}", file=sys.stderr)
    if args.dry_run:
        print(types.CustomJob.to_json(job, use_integers_for_enums=False))
        return 0
    created = submit(job, args.project, args.region)
    print(f"submitted {created.name}\nfollow: gcloud ai custom-jobs stream-logs {created.name}")
    return 0


if __name__ == "__main__":
    from ..errors import guarded

    sys.exit(guarded(main, sys.argv[1:]))
