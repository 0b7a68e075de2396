#!/usr/bin/env bash
# A team's MLflow tracking server: runs and the model registry in PostgreSQL, artefacts in S3 (or any
# S3-compatible store such as MinIO), proxied by the server so that clients need no S3 credentials.
# Behind MLflow's basic auth (`--app-name basic-auth`): every request needs a user and password.
#
#   BACKEND_STORE_URI=postgresql://mlflow:secret@db-host/mlflow \
#   ARTIFACTS_DESTINATION=s3://team-bucket/mlflow \
#   MLFLOW_S3_ENDPOINT_URL=http://minio-host:9000 AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \
#   MLFLOW_AUTH_ADMIN_PASSWORD=... \
#   scripts/tracking_server.sh            # or: make tracking-server
#
# Settings (environment):
#   HOST                 127.0.0.1 (this machine only); HOST=0.0.0.0 serves other machines and then needs
#   ALLOWED_HOSTS        the names clients reach the server by, comma-separated (mlflow.team.lan,10.0.0.5):
#                        MLflow answers only requests whose Host header is one of them (DNS rebinding);
#                        `*` is refused. A name without a port is allowed with PORT too; loopback always is.
#   PORT                 5000
#   MLFLOW_AUTH_ADMIN_PASSWORD   required (12 characters or more): the admin's password, used once, when
#                        the auth database has no admin yet. Changing it later changes nothing: use
#                        MLflow's update-password API (docs/team.md).
#   MLFLOW_AUTH_ADMIN_USERNAME   admin
#   DEFAULT_PERMISSION   READ: what a user may do where no one granted them anything (READ, USE, EDIT,
#                        MANAGE or NO_PERMISSIONS). Whoever creates an experiment or model manages it.
#   STATE_DIR            ~/.local/state/lmpipe/tracking-server: the auth config (mode 600) and database
#   AUTH_DATABASE_URI    sqlite:///$STATE_DIR/basic_auth.db: users and permissions (a database of their
#                        own, never the backend store's)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  signs the sign-up page's CSRF tokens; a new random one each start
#                        when unset (set one when several servers sit behind one address)
#   WORKERS              2
#
# Then, on every machine: MLFLOW_TRACKING_URI=http://<this host>:5000 with MLFLOW_TRACKING_USERNAME and
# MLFLOW_TRACKING_PASSWORD (docs/team.md).
set -euo pipefail
die() { echo "error: tracking_server.sh: $*" >&2; exit 2; }

[ -n "${BACKEND_STORE_URI:-}" ] || die "set BACKEND_STORE_URI, e.g. postgresql://mlflow:secret@db-host/mlflow"
[ -n "${ARTIFACTS_DESTINATION:-}" ] || die "set ARTIFACTS_DESTINATION, e.g. s3://team-bucket/mlflow"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-5000}"
ALLOWED_HOSTS="${ALLOWED_HOSTS:-}"

# Who may connect: loopback by default; other machines only under names the operator lists
case ",$ALLOWED_HOSTS," in
  *"*"*) die "ALLOWED_HOSTS=$ALLOWED_HOSTS: name the hosts clients use (e.g. mlflow.team.lan), not *" ;;
esac
case "$HOST" in
  127.0.0.1 | localhost | ::1) ;;
  *) [ -n "$ALLOWED_HOSTS" ] ||
    die "HOST=$HOST serves other machines: set ALLOWED_HOSTS to the names they reach it by, e.g. ALLOWED_HOSTS=mlflow.team.lan" ;;
esac
hosts=""
if [ -n "$ALLOWED_HOSTS" ]; then
  # the Host header carries the port: allow each name with and without it, and loopback on PORT
  IFS=, read -ra names <<<"$ALLOWED_HOSTS"
  for name in "${names[@]}" localhost 127.0.0.1; do
    name="${name// /}"
    [ -n "$name" ] || continue
    case "$name" in
      *:*) hosts="$hosts,$name" ;;
      *) hosts="$hosts,$name,$name:$PORT" ;;
    esac
  done
  hosts="${hosts#,}"
fi

# Basic auth: the admin's password from the environment, never a default
[ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ] ||
  die "set MLFLOW_AUTH_ADMIN_PASSWORD (12 characters or more): the admin's password, used when the auth database has no admin yet"
[ "${#MLFLOW_AUTH_ADMIN_PASSWORD}" -ge 12 ] ||
  die "MLFLOW_AUTH_ADMIN_PASSWORD has ${#MLFLOW_AUTH_ADMIN_PASSWORD} characters: MLflow wants 12 or more"
export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
DEFAULT_PERMISSION="${DEFAULT_PERMISSION:-READ}"
case "$DEFAULT_PERMISSION" in
  READ | USE | EDIT | MANAGE | NO_PERMISSIONS) ;;
  *) die "DEFAULT_PERMISSION=$DEFAULT_PERMISSION: one of READ, USE, EDIT, MANAGE, NO_PERMISSIONS" ;;
esac
STATE_DIR="${STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/lmpipe/tracking-server}"
AUTH_DATABASE_URI="${AUTH_DATABASE_URI:-sqlite:///$STATE_DIR/basic_auth.db}"
[ "$AUTH_DATABASE_URI" != "$BACKEND_STORE_URI" ] ||
  die "AUTH_DATABASE_URI is BACKEND_STORE_URI: give the users and permissions a database of their own"

umask 077  # the config names the auth database (and the admin's password, for older MLflow versions)
mkdir -p "$STATE_DIR"
export MLFLOW_AUTH_CONFIG_PATH="$STATE_DIR/basic_auth.ini"
ini() { printf '%s\n' "${1//%/%%}"; }  # configparser reads % as interpolation: %% is one %
{
  echo "[mlflow]"
  echo "default_permission = $DEFAULT_PERMISSION"
  ini "database_uri = $AUTH_DATABASE_URI"
  ini "admin_username = $MLFLOW_AUTH_ADMIN_USERNAME"
  ini "admin_password = $MLFLOW_AUTH_ADMIN_PASSWORD"
  echo "authorization_function = mlflow.server.auth:authenticate_request_basic_auth"
} >"$MLFLOW_AUTH_CONFIG_PATH"
chmod 600 "$MLFLOW_AUTH_CONFIG_PATH"
# the same key in every worker of this server (MLflow passes it on); it only guards the sign-up form
if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
  MLFLOW_FLASK_SERVER_SECRET_KEY="$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"
  export MLFLOW_FLASK_SERVER_SECRET_KEY
fi

BIN="$(dirname "$0")/../.venv/bin"
MLFLOW="$BIN/mlflow"
[ -x "$MLFLOW" ] || MLFLOW=mlflow
exec "$MLFLOW" server \
  --app-name basic-auth \
  --backend-store-uri "$BACKEND_STORE_URI" \
  --artifacts-destination "$ARTIFACTS_DESTINATION" \
  --host "$HOST" --port "$PORT" \
  ${hosts:+--allowed-hosts "$hosts"} \
  --workers "${WORKERS:-2}"
