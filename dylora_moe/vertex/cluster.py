"""Vertex AI's CLUSTER_SPEC -> who this node is in a multi-node job.

    {"cluster": {"workerpool0": ["host:port"], "workerpool1": ["h1:p", "h2:p"], "workerpool2": [...]},
     "task": {"type": "workerpool1", "index": 0}}

Node rank: workerpool0 (the chief, one replica) is 0, workerpool1[i] is i + 1. The
master is workerpool0[0]. workerpool2 is a reduction server pool, not trainers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from ..errors import UserError


class ClusterSpecError(UserError):
    pass


@dataclass(frozen=True)
class Node:
    machine_rank: int
    num_machines: int
    master_host: str
    master_port: int


def parse_cluster_spec(text: Optional[str]) -> Optional[Node]:
    """None when there is no CLUSTER_SPEC (single node); a ClusterSpecError quoting the
    offending part when it is malformed."""
    if text is None or not text.strip():
        return None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ClusterSpecError(f"CLUSTER_SPEC is not valid JSON ({e.msg} at character {e.pos}): {_quote(text)}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("cluster"), dict):
        raise ClusterSpecError(f"CLUSTER_SPEC has no \"cluster\" mapping: {_quote(text)}")
    cluster, task = spec["cluster"], spec.get("task")
    chief = cluster.get("workerpool0")
    if not isinstance(chief, list) or len(chief) != 1:
        raise ClusterSpecError(f"CLUSTER_SPEC cluster.workerpool0 must list exactly one chief host, got "
                               f"{_quote(json.dumps(chief))}")
    workers = cluster.get("workerpool1", [])
    if not isinstance(workers, list):
        raise ClusterSpecError(f"CLUSTER_SPEC cluster.workerpool1 must be a list, got {_quote(json.dumps(workers))}")
    if not isinstance(task, dict) or not isinstance(task.get("index", 0), int):
        raise ClusterSpecError(f"CLUSTER_SPEC has no valid \"task\" (type, index): {_quote(json.dumps(task))}")
    kind, index = task.get("type"), task.get("index", 0)
    if kind == "workerpool0":
        rank = 0
    elif kind == "workerpool1":
        if not 0 <= index < len(workers):
            raise ClusterSpecError(f"CLUSTER_SPEC task index {index} is outside workerpool1 ({len(workers)} hosts)")
        rank = index + 1
    else:
        raise ClusterSpecError(f"CLUSTER_SPEC task type {kind!r} is not a training pool (expected workerpool0 or "
                               "workerpool1; workerpool2 is a reduction server)")
    host, port = _host_port(chief[0])
    return Node(machine_rank=rank, num_machines=1 + len(workers), master_host=host, master_port=port)


def _host_port(address) -> tuple[str, int]:
    if not isinstance(address, str) or ":" not in address:
        raise ClusterSpecError(f"CLUSTER_SPEC chief address {_quote(json.dumps(address))} is not host:port")
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise ClusterSpecError(f"CLUSTER_SPEC chief address {address!r} has no numeric port")
    return host, int(port)


def _quote(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
