# One image for all of ElasticMoE; the argument picks the part (ENTRYPOINT is `elasticmoe`):
#   serve        a whole instance in one container (the default CMD; OpenAI API on port 8000)
#   operator     the Kubernetes operator (the Helm chart runs this; it never imports torch)
#   coordinator  an instance's coordinator in a cluster (the operator's <name>-coordinator)
#   worker       the worker (HMM + executors) of one device (the operator's <name>-worker-<i>)
# CPU by default; each accelerator variant is one set of --build-arg away. It runs as uid 10001
# and works with a read-only root filesystem (the operator's pods mount /tmp and /dev/shm).
#
#   CPU (default): python:3.11-slim + the CPU build of torch
#     docker build -t elasticmoe:cpu .
#
#   NVIDIA CUDA: a CUDA runtime base + the torch build for that CUDA version + the `cuda` extra
#   (cuda-python). Bases without Python (nvidia/cuda) get the distribution's python3 (Ubuntu
#   24.04: 3.12).
#     docker build -t elasticmoe:cuda \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#       --build-arg EXTRAS=cuda .
#
#   Huawei Ascend: a CANN base image with Python >= 3.10 (the driver is mounted from the host
#   at run time) + the `ascend` extra (torch_npu of torch's release), on top of the CPU build
#   of torch. The CANN toolkit's environment (its set_env.sh) must be in the image's ENV.
#     docker build -t elasticmoe:ascend \
#       --build-arg BASE_IMAGE=<a CANN image, e.g. from ascendai/cann> \
#       --build-arg EXTRAS=ascend .
#   Neither accelerator image has been built or run by this project yet (no GPU or NPU here).
#
# Run: docker run -p 8000:8000 elasticmoe:cpu   (then http://127.0.0.1:8000/v1)
# Arguments after the image name replace CMD, e.g. `serve --host 0.0.0.0 --model /models/x`.

# Both stages use the same base: the venv built in the first refers to the base's python3.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
# NOTE: keep TORCH_SPEC equal to the torch pin in pyproject.toml (tests/test_dockerfile.py checks).
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The package's extras to install, comma-separated: "cuda" or "ascend" (pyproject.toml).
ARG EXTRAS=""
# Extra pip requirements installed with the package, e.g. "nvidia-ml-py".
ARG EXTRA_PIP=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN if ! python3 -m venv --help >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch alone first, from its own index: it is most of the image and changes least, so this
# layer stays cached while the source changes. `pip install .` below then finds the pin met.
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker/ worker/
COPY operator/ operator/
# EXTRA_PIP is unquoted on purpose: empty means nothing, several words mean several packages.
RUN pip install ".${EXTRAS:+[${EXTRAS}]}" ${EXTRA_PIP} \
    && elasticmoe --help >/dev/null

FROM ${BASE_IMAGE} AS runtime
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --gid 10001 elasticmoe \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/elasticmoe \
        --shell /usr/sbin/nologin elasticmoe \
    && mkdir -p /app \
    && chown 10001:10001 /app
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/elasticmoe \
    ELASTICMOE_CACHE_DIR=/home/elasticmoe/.cache/elasticmoe
WORKDIR /app
USER 10001:10001
# Write the embedded default model (a few MB) at build time, so the default CMD serves at once
# instead of generating it on every fresh container.
RUN python -c "from elasticmoe_worker import cli; print(cli.default_model_dir())"
EXPOSE 8000
# python, not curl: slim bases have no curl. Checks the default port; change it here if CMD does.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["elasticmoe"]
CMD ["serve", "--host", "0.0.0.0"]
