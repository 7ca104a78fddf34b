#!/usr/bin/env bash
# The API container's command when the service uses an existing Ray cluster (compose, KubeRay, ray up).
#
# The service connects a Ray driver to DG2PF_RAY_ADDRESS (cluster resources, Ray Serve), and a Ray
# driver needs a raylet on its own machine: ray.init(address=...) looks for a local raylet process.
# So this container first joins the cluster as a node that offers no CPUs and no GPUs (nothing that
# asks for either is scheduled here), then runs the API. The raylet is started without the API's own
# secrets in its environment, so no Ray process can read them.
set -euo pipefail
: "${DG2PF_RAY_ADDRESS:?set DG2PF_RAY_ADDRESS to the GCS address of the Ray head, host:6379}"
if [ "${RAY_AUTH_MODE:-}" != "token" ]; then
    echo "start-api.sh: RAY_AUTH_MODE must be 'token' (Ray clusters of this service always use token auth)" >&2
    exit 2
fi
env -u DG2PF_API_TOKENS -u DG2PF_DATABASE_URL \
    ray start --address="$DG2PF_RAY_ADDRESS" --num-cpus=0 --num-gpus=0 \
    --object-store-memory=200000000 --disable-usage-stats
exec python -m dg2pf_service "$@"
