#!/usr/bin/env bash
# A team's MLflow tracking server: runs and the model registry in PostgreSQL, artefacts in S3 (or any
# S3-compatible store such as MinIO), proxied by the server so that clients need no S3 credentials.
#
#   BACKEND_STORE_URI=postgresql://mlflow:secret@db-host/mlflow \
#   ARTIFACTS_DESTINATION=s3://team-bucket/mlflow \
#   MLFLOW_S3_ENDPOINT_URL=http://minio-host:9000 AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \
#   scripts/tracking_server.sh            # or: make tracking-server
#
# Then, on every machine: export MLFLOW_TRACKING_URI=http://<this host>:5000 (docs/team.md).
set -euo pipefail
: "${BACKEND_STORE_URI:?set BACKEND_STORE_URI, e.g. postgresql://mlflow:secret@db-host/mlflow}"
: "${ARTIFACTS_DESTINATION:?set ARTIFACTS_DESTINATION, e.g. s3://team-bucket/mlflow}"
HOST="${HOST:-0.0.0.0}"
PORT="${PORT:-5000}"
# MLflow's security middleware accepts only localhost Host headers unless told otherwise
ALLOWED_HOSTS="${ALLOWED_HOSTS:-*}"
BIN="$(dirname "$0")/../.venv/bin"
MLFLOW="$BIN/mlflow"
[ -x "$MLFLOW" ] || MLFLOW=mlflow
exec "$MLFLOW" server \
  --backend-store-uri "$BACKEND_STORE_URI" \
  --artifacts-destination "$ARTIFACTS_DESTINATION" \
  --host "$HOST" --port "$PORT" \
  --allowed-hosts "$ALLOWED_HOSTS" \
  --workers "${WORKERS:-2}"
