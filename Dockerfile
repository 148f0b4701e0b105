# One image for the listener, the workers, Flower, the realtime gateway, the console and the demo SMTP sink.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
# The library (installed below) ...
COPY changeflow ./changeflow
# ... and this deployment, run from /app (the working directory of every service's command):
# the demo app, its entry points (`python -m listener`, `celery -A worker`, `python -m realtime`)
# and the SMTP sink.
COPY tasks ./tasks
COPY listener ./listener
COPY worker ./worker
COPY realtime ./realtime
COPY harness/__init__.py harness/ports.py harness/smtp_sink.py ./harness/
# The services' needs only: changeflow and aiosmtpd for the demo SMTP sink, no test tools.
RUN pip install --no-cache-dir '.[smtp-sink]'
USER nobody
CMD ["python", "-m", "listener"]
