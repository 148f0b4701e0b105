# One image for the listener, the workers, Flower and the demo SMTP sink.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY listener ./listener
COPY worker ./worker
COPY tasks ./tasks
COPY harness ./harness
COPY mongo_double ./mongo_double
# The services' needs only: changeflow and aiosmtpd for the demo SMTP sink, no test tools.
RUN pip install --no-cache-dir '.[smtp-sink]'
USER nobody
CMD ["python", "-m", "listener"]
