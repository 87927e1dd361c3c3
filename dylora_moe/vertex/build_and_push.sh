#!/usr/bin/env bash
# Build the training image and push it to Artifact Registry:
#   dylora_moe/vertex/build_and_push.sh REGION PROJECT REPO [IMAGE] [TAG]
# or with the environment: REGION=... PROJECT=... REPO=... [IMAGE=dylora-moe] [TAG=git sha] dylora_moe/vertex/build_and_push.sh
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
REGION="${1:-${REGION:-}}"
PROJECT="${2:-${PROJECT:-}}"
REPO="${3:-${REPO:-}}"
IMAGE="${4:-${IMAGE:-dylora-moe}}"
TAG="${5:-${TAG:-$(git rev-parse --short HEAD 2>/dev/null || echo latest)}}"
usage() {
  echo "usage: $0 REGION PROJECT REPO [IMAGE] [TAG]   (or set REGION, PROJECT, REPO[, IMAGE, TAG])" >&2
  echo "missing: $1" >&2
  exit 2
}
[ -n "$REGION" ] || usage REGION
[ -n "$PROJECT" ] || usage PROJECT
[ -n "$REPO" ] || usage REPO
URI="${REGION}-docker.pkg.dev/${PROJECT}/${REPO}/${IMAGE}:${TAG}"
run() { if [ -n "${DRY_RUN:-}" ]; then echo "+ $*"; else "$@"; fi; }
cd "$(dirname "$0")/../.."
run gcloud auth configure-docker "${REGION}-docker.pkg.dev" --quiet
run docker build -t "$URI" .
run docker push "$URI"
echo "$URI"
