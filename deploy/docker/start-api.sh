#!/usr/bin/env bash
# The API container's command when the service uses an existing Ray cluster (compose, KubeRay, ray up).
#
# The API is no Ray node and no Ray driver: it talks to the cluster only over HTTP, through the
# head's dashboard (Jobs, State and Serve APIs; DG2PF_RAY_DASHBOARD_URL, default
# http://<host of DG2PF_RAY_ADDRESS>:8265), sending the Ray token (RAY_AUTH_TOKEN or ~/.ray/auth_token).
# DG2PF_RAY_ADDRESS is what tells the service to use that cluster: without it the service would start
# a Ray head of its own in this container. The cluster must use token auth, so this refuses any other
# RAY_AUTH_MODE.
set -euo pipefail
: "${DG2PF_RAY_ADDRESS:?set DG2PF_RAY_ADDRESS to the address of the Ray head, host:6379 (without it the service starts a Ray head of its own)}"
if [ "${RAY_AUTH_MODE:-}" != "token" ]; then
    echo "start-api.sh: RAY_AUTH_MODE must be 'token' (Ray clusters of this service always use token auth)" >&2
    exit 2
fi
exec python -m dg2pf_service "$@"
