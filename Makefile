# segapp: every set-up step a fresh Debian machine needs, then the command.
#   make serve   the whole stack (nginx -> uWSGI -> segapp) on http://127.0.0.1:8080 with the shipped model
#   make test    the whole test suite: integration tests through real uWSGI + nginx, the image under Docker, a browser
#   make train   retrain the shipped demonstration model (synthetic scenes) into segapp/models
#   make eval    measure the shipped model on the held-out synthetic test split
#   make image   the runtime container image (Dockerfile), segapp:<model version>; needs a running Docker daemon
#   make models  MediaPipe's selfie segmentation into segapp/models as model `person` (serve, test and image do it first)
#   make bench-peers  the same work served by Flask + gunicorn and FastAPI + uvicorn beside the stack (optional)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# root installs Debian packages directly; anyone else through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
EXTRAS ?= tensorflow,onnx,serve,bench,test
PYTEST_ARGS ?=
BENCH_ARGS ?=
PEERS_ARGS ?=
PEERS_VENV ?= build/peers-venv

.PHONY: venv nginx wrk chromium docker kubectl prometheus models image serve test train eval bench bench-peers lint clean

# The venv is rebuilt when the package's requirements or its compiled module (segapp/_upsampling.c) change.
$(BIN)/.installed-$(EXTRAS): setup.cfg pyproject.toml setup.py segapp/_upsampling.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	rm -f $(BIN)/.installed-*
	touch $@

venv: $(BIN)/.installed-$(EXTRAS)

# nginx from Debian's packages when it is missing. policy-rc.d stops the package from starting a system nginx on
# port 80: segapp runs its own, unprivileged, from nginx/nginx.conf.
nginx:
	@PATH="$$PATH:/usr/sbin:/sbin" command -v nginx >/dev/null || { \
	  echo "installing nginx from Debian's packages"; \
	  printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee /usr/sbin/policy-rc.d >/dev/null; $(SUDO) chmod +x /usr/sbin/policy-rc.d; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nginx >/dev/null; \
	  status=$$?; $(SUDO) rm -f /usr/sbin/policy-rc.d; exit $$status; }

wrk:
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq wrk >/dev/null; }

# The browser test (tests/integration/test_web.py) drives Debian's Chromium headless through Debian's chromedriver,
# the same version as the browser; nothing downloads a browser.
chromium:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "installing chromium and chromium-driver from Debian's packages"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; }

# Docker from Debian's packages (docker.io: the engine and its client) and debootstrap, which makes the image's base
# from Debian's packages where Docker Hub cannot be reached. policy-rc.d as for nginx: nothing starts at install; the
# container tests start a dockerd of their own when none runs.
docker:
	@PATH="$$PATH:/usr/sbin:/sbin" command -v dockerd >/dev/null && PATH="$$PATH:/usr/sbin:/sbin" command -v debootstrap >/dev/null || { \
	  echo "installing docker.io and debootstrap from Debian's packages"; \
	  printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee /usr/sbin/policy-rc.d >/dev/null; $(SUDO) chmod +x /usr/sbin/policy-rc.d; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq docker.io debootstrap >/dev/null; \
	  status=$$?; $(SUDO) rm -f /usr/sbin/policy-rc.d; exit $$status; }

# kubectl from Debian's packages (kubernetes-client 1.20), for `kubectl kustomize`: the tests render deploy/kubernetes
# with it, offline (no cluster). A kubectl already installed does as well (any since 1.14).
kubectl:
	@command -v kubectl >/dev/null || { \
	  echo "installing kubernetes-client (kubectl) from Debian's packages"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq kubernetes-client >/dev/null; }

# Prometheus and promtool from Debian's packages (prometheus) when promtool is missing: the tests check and unit-test
# deploy/prometheus with promtool and run a prometheus of their own against a stack. policy-rc.d as for nginx: the
# package would otherwise start a system prometheus on port 9090. Without its recommends (node-exporter, a daemon).
prometheus:
	@command -v promtool >/dev/null || { \
	  echo "installing prometheus (prometheus, promtool) from Debian's packages"; \
	  printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee /usr/sbin/policy-rc.d >/dev/null; $(SUDO) chmod +x /usr/sbin/policy-rc.d; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  status=$$?; $(SUDO) rm -f /usr/sbin/policy-rc.d; exit $$status; }

# MediaPipe's selfie segmentation network as model `person` (deploy/fetch-person-model): published inside an npm
# package, so npm fetches it, a pinned version checked by SHA-256, never committed. npm from Debian's packages when it is
# missing and the model is not there yet (apt's output hidden: the script's one line says what came of it). Where it
# cannot be fetched, the script says so in one line and the server starts without `person`.
models:
	@test -f segapp/models/person/1/model.tflite || command -v npm >/dev/null || { \
	  echo "installing npm from Debian's packages, to fetch the person model"; \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq npm; } >/dev/null 2>&1 || true; }
	@deploy/fetch-person-model

# The runtime image (Dockerfile), tagged segapp:<model version>; needs a running Docker daemon (docs/deploy.md).
image: venv docker models
	PATH="$$PATH:/usr/sbin:/sbin" VENV=$(VENV) deploy/build-image

# The whole stack in the foreground; uwsgi/serve prints the URL once /readyz answers. Ctrl-C stops every process.
serve: venv nginx models
	VENV=$(VENV) exec uwsgi/serve

test: venv nginx wrk chromium docker kubectl prometheus models
	$(BIN)/ruff check segapp tests bench
	PATH="$$PATH:/usr/sbin:/sbin" $(BIN)/python -m pytest $(PYTEST_ARGS)

train: venv
	$(BIN)/segapp-train --data synthetic --epochs 30 --out segapp/models

eval: venv
	$(BIN)/segapp-eval --model segapp/models/segapp-unet/1/model.tflite --against segapp/models/unet.tflite --data synthetic --count 500

# The load benchmark against the real stack; results in bench/results/, figures in docs/benchmarks.md.
bench: venv nginx wrk
	PATH="$$PATH:/usr/sbin:/sbin" $(BIN)/python -m bench.run $(BENCH_ARGS)

# The peers of the comparison (bench/peers.py) in a venv of their own under build/, never in .venv: Flask, gunicorn,
# FastAPI and uvicorn at the versions bench/peer_apps/requirements.txt pins, and segapp from this checkout with its
# serve extra, whose requirements the peers' workers need to run segapp's pipeline.
$(PEERS_VENV)/bin/.installed: bench/peer_apps/requirements.txt setup.cfg pyproject.toml setup.py segapp/_upsampling.c
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip setuptools wheel
	$(PEERS_VENV)/bin/python -m pip install --quiet -r bench/peer_apps/requirements.txt '.[serve]'
	touch $@

# The same work per request (segapp's pipeline, a PNG mask) served by Flask + gunicorn, FastAPI + uvicorn and the
# stack, one after another, then under slow clients; not part of `make test` (docs/benchmarks.md). About 6 minutes.
bench-peers: venv nginx wrk $(PEERS_VENV)/bin/.installed
	PATH="$$PATH:/usr/sbin:/sbin" $(BIN)/python -m bench.peers --peers-venv $(PEERS_VENV) $(PEERS_ARGS)

lint: venv
	$(BIN)/ruff check segapp tests bench

clean:
	rm -rf $(VENV) run .pytest_cache .ruff_cache build *.egg-info segapp/*.so
