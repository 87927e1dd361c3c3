# Training image for Vertex AI (and any CUDA machine): CUDA devel base (DeepSpeed's CPU
# Adam is compiled at build time), torch, the project, and an exec-form ENTRYPOINT so
# SIGTERM reaches `accelerate launch` and, through it, every training process.
#   dylora_moe/vertex/build_and_push.sh REGION PROJECT REPO
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    # A100 (8.0) and H100/H200 (9.0)
    TORCH_CUDA_ARCH_LIST="8.0;9.0" \
    TORCH_EXTENSIONS_DIR=/opt/torch_extensions \
    HF_HOME=/opt/hf

RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common git ninja-build \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv \
 && pip install --upgrade pip setuptools wheel

# Versions pinned here must satisfy requirements.txt (tests/test_launch.py checks both).
RUN pip install torch==2.13.0
RUN pip install transformers==5.24.0 peft==0.21.2 accelerate==1.15.0 safetensors==0.8.0 pyyaml==6.0.4 \
        datasets==5.2.0 matplotlib==3.11.2 tqdm==4.70.1 google-cloud-secret-manager==2.32.0
# DeepSpeed with the CPU Adam op prebuilt (ZeRO-2 optimizer offload), other ops JIT.
RUN DS_BUILD_OPS=0 DS_BUILD_CPU_ADAM=1 pip install --no-build-isolation deepspeed==0.19.8

WORKDIR /app
COPY . /app
RUN pip install --no-deps -e /app

ENTRYPOINT ["python", "-m", "dylora_moe.vertex.entrypoint"]
CMD ["--config", "configs/codegemma-2b.yaml"]
