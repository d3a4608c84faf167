# referral-service image: the gRPC server on port 50051 and the HTTP/JSON gateway on 8080.
FROM python:3.11-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY referral_service ./referral_service
COPY generated ./generated
# the stubs' own distribution (built from generated/), which the server depends on
COPY clients/python ./clients/python
COPY migrations ./migrations
RUN pip install . && useradd --system --uid 10001 referral && install -d -m 700 -o referral /data
USER referral
ENV REFERRAL_GRPC_HOST=0.0.0.0 REFERRAL_HTTP_HOST=0.0.0.0 REFERRAL_DATA_DIR=/data
EXPOSE 50051 8080
CMD ["referral-service", "serve", "--migrate"]
