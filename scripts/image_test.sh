#!/usr/bin/env bash
# `make image-test`: build the server image on a base made from Debian packages (no registry needed), run it with
# podman, wait for its health check, send it a real photo and check the JSON; print build time and image size.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-localhost/ferkit:test}
BASE_IMAGE=${BASE_IMAGE:-localhost/ferkit-base:bookworm}
PORT=${PORT:-18080}
PHOTO=${PHOTO:-$(ls ../shared/data/wild-dev/happy/*.jpg 2>/dev/null | head -1 || true)}
[ -n "$PHOTO" ] || PHOTO=src/ferkit/assets/astronaut.jpg
PODMAN="podman --runtime runc"
NAME=ferkit-image-test-$$

if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null; then
  echo "installing podman, runc and debootstrap from Debian" >&2
  apt-get install -y -qq podman runc debootstrap >/dev/null
fi
# podman's default ulimits cannot be applied inside this sandbox; an empty list leaves them as they are.
if [ ! -f /etc/containers/containers.conf ]; then
  mkdir -p /etc/containers
  printf '[containers]\ndefault_ulimits = []\n' > /etc/containers/containers.conf
fi

t0=$(date +%s)
PODMAN="$PODMAN" bash scripts/image_base.sh "$BASE_IMAGE"
t1=$(date +%s)
# pip inside the build trusts what pip here trusts (this machine reaches the package index through a TLS proxy)
PIP_CA=${PIP_CA:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
[ -n "$PIP_CA" ] || [ ! -f /etc/ssl/certs/ca-certificates.crt ] || PIP_CA=/etc/ssl/certs/ca-certificates.crt
make --no-print-directory image IMAGE="$IMAGE" BASE_IMAGE="$BASE_IMAGE" CONTAINER="$PODMAN" PIP_CA="$PIP_CA"
t2=$(date +%s)
size=$($PODMAN image inspect --format '{{.Size}}' "$IMAGE")

cleanup() { $PODMAN rm -f -t 10 "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT
# Without systemd (this sandbox) podman cannot schedule the periodic health check and says so; `podman healthcheck
# run` below runs the image's HEALTHCHECK command itself.
$PODMAN run -d --name "$NAME" -p "127.0.0.1:$PORT:8000" -e FERKIT_SERVE_WORKERS=1 "$IMAGE" >/dev/null
[ "$($PODMAN exec "$NAME" id -u)" != 0 ] || { echo "image-test: the server runs as root" >&2; exit 1; }
for _ in $(seq 1 90); do
  if $PODMAN healthcheck run "$NAME" >/dev/null 2>&1; then break; fi
  sleep 1
done
$PODMAN healthcheck run "$NAME" >/dev/null || { $PODMAN logs "$NAME" | tail -20; echo "image-test: not healthy" >&2; exit 1; }
t3=$(date +%s)
out=$(curl -sS --fail-with-body -F "file=@$PHOTO" "http://127.0.0.1:$PORT/v1/predict")
echo "$out" | python3 -c '
import json, sys
body = json.load(sys.stdin)
faces = body["faces"]
assert body["classes"] == ["happy", "sad", "neutral"], body
assert faces and faces[0]["label"] in body["classes"] and len(faces[0]["box"]) == 4, body
print("image-test: %d face(s), first %s %.3f" % (len(faces), faces[0]["label"], faces[0]["score"]))
'
if $PODMAN exec "$NAME" python3 -c "import torch" 2>/dev/null; then echo "image-test: torch in the image" >&2; exit 1; fi
echo "image-test: ok; base $((t1 - t0)) s, image build $((t2 - t1)) s, healthy after $((t3 - t2)) s;" \
     "image $IMAGE $((size / 1000000)) MB"
