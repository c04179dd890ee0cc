# Two commands do all the set-up on a fresh machine:
#   make serve   create .venv, train the default model if it is served and missing, serve on 127.0.0.1:$(PORT)
#   make test    install what the tests need and run them (CI runs exactly this)
# BENTOML_HOME is respected (BentoML's default store is ~/bentoml).

PYTHON ?= python3
VENV ?= .venv
PORT ?= 3000
HOST ?= 127.0.0.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test lint build train clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall only when a requirements file or pyproject.toml changes.
$(STAMP): $(VENV)/bin/python pyproject.toml $(wildcard requirements/*.txt)
	$(PY) -m pip install --quiet -e ".[train,test]"
	touch $(STAMP)

serve: $(STAMP)
	$(PY) -m training_export ensure-served
	$(VENV)/bin/bentoml serve service:ImageClassifier --host $(HOST) --port $(PORT)

# The browser test drives Debian's Chromium; install it once (CI runs as root on Debian).
BROWSER := /usr/bin/chromedriver
$(BROWSER):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver

# The container test (tests/bento/test_container.py) starts its own dockerd and builds its base
# image with mmdebstrap from Debian's mirror: install both once.
DOCKERD := /usr/sbin/dockerd
$(DOCKERD):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io mmdebstrap

# The monitoring test checks and unit-tests the alert rules with Debian's promtool.
PROMTOOL := /usr/bin/promtool
$(PROMTOOL):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus

# The scale-out test (tests/http/test_scale_out.py) runs a real redis-server and nginx in front
# of the replicas (prometheus comes with $(PROMTOOL) above).
REDIS_SERVER := /usr/bin/redis-server
NGINX := /usr/sbin/nginx
$(REDIS_SERVER) $(NGINX):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server nginx

# Tests run the README's curl line and pin CPUs with taskset (util-linux, always on Debian).
CURL := /usr/bin/curl
$(CURL):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends curl

# The overload test loads the server with h2load (compiled: it leaves the shared cores to the server).
H2LOAD := /usr/bin/h2load
$(H2LOAD):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nghttp2-client

test: $(STAMP) $(BROWSER) $(DOCKERD) $(PROMTOOL) $(REDIS_SERVER) $(NGINX) $(CURL) $(H2LOAD)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

train: $(STAMP)
	$(PY) -m training_export train

# The bento is labelled with the model version it pins and the commit it was built from.
build: $(STAMP)
	$(PY) -m training_export ensure-served
	$(VENV)/bin/bentoml build \
		--label model_version=$$($(PY) -c 'from image_classifier.serving.settings import Settings; print(Settings.from_env().model_tag.split(":")[1])') \
		--label git_commit=$$(git rev-parse HEAD)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
