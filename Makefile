# The one entry point for people and CI.
CARGO ?= cargo
# rustup installs into ~/.cargo/bin, which a fresh shell may not have on PATH yet.
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: build dist test lint verify deny audit fmt bench-raft bench-scheduler bench-membership bench-runtime bench-e2e bench-secrets bench-overlay bench-net fuzz fuzz-build demo demo-stop images compose-up compose-down compose-test clean

build:
	$(CARGO) build --workspace --bins

# The binaries users run, link-time optimised (target/dist; see Cargo.toml).
dist:
	$(CARGO) build --profile dist -p cloudless-coordinator -p cloudless-agent -p cloudless-cli -p cloudless-runtime --bins

# Builds the binaries first: the multi-process tests start the real cloudless-coordinator.
test:
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Before sending a change: formatting, clippy, the tests (those that need
# root or a missing tool report themselves skipped when not run as root), and
# cargo-deny's licence, ban and source checks (deny.toml).
verify: lint test deny

deny:
	@$(CARGO) deny --version >/dev/null 2>&1 || { echo "cargo-deny is not installed: cargo install cargo-deny --locked"; exit 1; }
	$(CARGO) deny check licenses bans sources

# Known vulnerabilities (RustSec); fetches the advisory database from GitHub.
audit:
	$(CARGO) deny check advisories

fmt:
	$(CARGO) fmt --all

# 3 coordinator processes, 1/16/64/256 concurrent gRPC writers, then 20 leader
# kills; first plaintext, then with mTLS on every connection.
bench-raft:
	$(CARGO) build --release --bins
	./target/release/bench-raft
	./target/release/bench-raft --tls

# 100 / 1,000 / 5,000 / 10,000 nodes, 100,000 replicas each, pinned to one core.
# Simulated agents over real mTLS against 3 coordinator processes; needs
# about 2 file descriptors per agent in this process and the leader. At the
# last count, heartbeat and admin write p99: quiet, with one hostile node
# flooding at its rate limits and as fast as it can, in interleaved rounds
# (--hostile-rounds, --hostile-seconds; 0 seconds skips).
bench-membership:
	$(CARGO) build --release --bins
	ulimit -n $$(ulimit -Hn) && ./target/release/bench-membership

# As root: start latency against `ctr run` (30 trials each), 50 concurrent
# starts, memory while supervising 20 containers, on a containerd of its own.
bench-runtime:
	$(CARGO) build --release -p cloudless-runtime --bin bench-runtime
	./target/release/bench-runtime

bench-scheduler:
	$(CARGO) build --release -p cloudless-scheduler --bin bench-scheduler
	taskset -c 0 ./target/release/bench-scheduler

# Local 3-coordinator cluster: write, read back, status.
bench-e2e:
	$(CARGO) build --release --bins
	$(CARGO) run --release -p cloudless-test --bin bench-e2e

# 3 coordinator processes with mTLS: GetSecret from 64 clients (many-use and
# strict tokens), then CreateSecret one at a time and from 16 clients.
bench-secrets:
	$(CARGO) build --release --bins
	./target/release/bench-secrets

# Needs root: bridges, namespaces and iptables rules of its own (removed after).
bench-net:
	$(CARGO) build --release -p cloudless-test --bin bench-net
	./target/release/bench-net

bench-overlay:
	$(CARGO) build --release --bins
	./target/release/bench-overlay

# Each cargo-fuzz target in fuzz/ for FUZZ_SECONDS (default 60). Needs
# `cargo install cargo-fuzz`; RUSTC_BOOTSTRAP lets the stable toolchain build
# the sanitizer flags. New inputs go to fuzz/corpus-work/ (not checked in),
# crashes to fuzz/artifacts/; `cargo test -p cloudless-fuzzing` replays the
# checked-in seeds in fuzz/corpus/. Our code denies `unsafe`, so the default
# is no sanitizer (faster); FUZZ_SANITIZER=address for the C of ring.
FUZZ_SECONDS ?= 60
FUZZ_SANITIZER ?= none
FUZZ_TARGETS ?= manifest overlay_frame token csr raft_entry
fuzz-build:
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz build -s $(FUZZ_SANITIZER) --debug-assertions

fuzz: fuzz-build
	@set -e; for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus-work/$$t; \
		echo "== fuzz $$t for $(FUZZ_SECONDS) s"; \
		(cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -s $(FUZZ_SANITIZER) --debug-assertions $$t \
			corpus-work/$$t corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -timeout=10 -rss_limit_mb=2048); \
	done

demo:
	scripts/dev-cluster.sh

demo-stop:
	scripts/dev-cluster.sh stop

# The compose dev cluster (deployments/compose/, docs/compose.md): images
# built offline from the release binaries; 3 coordinators, 3 agents (zones a,
# b, c), Prometheus, and Grafana where its image can be pulled.
images:
	scripts/images.sh

compose-up:
	scripts/compose-up.sh

compose-down:
	scripts/compose-down.sh

# Up, 3 agents Ready, a workload Running with logs, dashboards and alert
# rules against the live Prometheus, an agent stopped and its replicas
# replaced, down with nothing left.
compose-test:
	scripts/compose-test.sh

clean:
	$(CARGO) clean
