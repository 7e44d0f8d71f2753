#!/usr/bin/env bash
# Container health check for Triton: exit 0 when GET /v2/health/ready answers 200.
# Bash and its /dev/tcp only, because the official tritonserver image is not guaranteed to
# carry curl or wget. Usage: healthcheck.sh [PORT] (default 8000, Triton's HTTP port).
set -euo pipefail
port="${1:-8000}"
exec 3<>"/dev/tcp/127.0.0.1/${port}"
printf 'GET /v2/health/ready HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
read -r -t 3 _ status _ <&3
[[ "${status}" == "200" ]]
