# The imagegen image: every stage of the pipeline, with `imagegen` as the entrypoint
# (`imagegen processor`, `imagegen worker`, `imagegen gateway`, `imagegen webhooks`, ...).
#
#   docker build -t imagegen .                                  # CPU torch (the default)
#   docker build -t imagegen:cuda --build-arg TORCH_INDEX=cu128 .  # CUDA torch wheels
#
# TORCH_INDEX names the PyTorch wheel index (cpu, cu126, cu128, ...): the CUDA wheels carry
# their own CUDA runtime, so one base image serves both; a GPU node needs only its driver.
# Not built where this was written (no Docker engine there): hadolint checks it in `make lint`.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# torch first, from its own index, so that the package's install finds it satisfied.
RUN python -m venv /opt/imagegen \
    && /opt/imagegen/bin/pip install "torch==${TORCH_VERSION}" \
        --index-url "https://download.pytorch.org/whl/${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY schemas/ schemas/
COPY infra/ infra/
COPY producers/ producers/
COPY processors/ processors/
COPY consumers/ consumers/
COPY client/ client/
COPY gateway/ gateway/
COPY webhooks/ webhooks/
COPY imagegen/ imagegen/
RUN /opt/imagegen/bin/pip install ".[processor,worker,gateway,tracing]"

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/imagegen/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    IMAGEGEN_STATE_DIR=/var/lib/imagegen
COPY --from=build /opt/imagegen /opt/imagegen
# A fixed uid, so that a pod's securityContext can name it (runAsUser: 10001).
RUN useradd --system --uid 10001 --home-dir /var/lib/imagegen --create-home imagegen
USER 10001
WORKDIR /var/lib/imagegen
# The gateway's port and the metrics ports of the processor, worker and webhooks.
EXPOSE 8080 9464 9465 9466
ENTRYPOINT ["imagegen"]
CMD ["--help"]
