# gradpool: one image for every role (coordinator, miner, validator); the compose file picks the command.
#
#   docker build -t gradpool .                                        (CPU)
#   docker build -t gradpool:cuda --build-arg TORCH_VARIANT=cu124 .   (NVIDIA GPUs: torch with CUDA 12.4)
#   docker run --rm gradpool --help
FROM python:3.11-slim

# Which build of torch: "cpu", or a CUDA one of the PyTorch index ("cu124", "cu126", ...). The CUDA
# builds carry their own CUDA libraries; the host needs only the NVIDIA driver and container toolkit.
ARG TORCH_VARIANT=cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in its own layer: it is most of the image and changes least often. `pip install .` below
# then finds the torch requirement already satisfied.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" torch

WORKDIR /app
COPY . /app
RUN pip install ".[s3,postgres]" \
    && rm -rf build ./*.egg-info \
    && useradd --create-home --uid 1000 --shell /usr/sbin/nologin gradpool \
    && mkdir -p /data /keys /state /certs \
    && chown gradpool:gradpool /data /keys /state /certs

# The volume mount points above belong to the unprivileged user, so a fresh named volume mounted there
# takes that ownership and the processes can write their state and keys.
USER gradpool
EXPOSE 8000

ENTRYPOINT ["gradpool"]
CMD ["--help"]
