# SeeBot with its model on an NVIDIA GPU. Build and run with compose.yaml (README: "In a container").
FROM nvidia/cuda:12.6.3-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# gcc and the Python headers: torch.compile (COMPILE) builds its Triton kernels' launchers with them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY inference ./inference
RUN python3 -m venv /opt/seebot && /opt/seebot/bin/pip install .

# The bot's own defaults under this user's home; each folder is a volume that outlives the container.
RUN useradd --create-home seebot \
    && mkdir -p /home/seebot/.cache/huggingface /home/seebot/.cache/seebot/torch-compile \
        /home/seebot/.local/share/seebot \
    && chown -R seebot:seebot /home/seebot
USER seebot
ENV PATH=/opt/seebot/bin:$PATH \
    HOME=/home/seebot \
    HF_HOME=/home/seebot/.cache/huggingface \
    METRICS_HOST=0.0.0.0 \
    METRICS_PORT=9100
VOLUME ["/home/seebot/.cache/huggingface", "/home/seebot/.cache/seebot/torch-compile", "/home/seebot/.local/share/seebot"]
EXPOSE 9100

# Healthy once the gateway is connected and the model is loaded (minutes at the first start).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15m --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % (os.environ.get('METRICS_PORT') or 9100), timeout=4)"]
CMD ["python3", "-m", "bot"]
