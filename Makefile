# cc-oci-runtime: make demo (a container in a VM), make test (unit + functional tests).
PYTHON ?= python3
RUNTIME := $(CURDIR)/cc_oci_runtime.py
BUILD := $(CURDIR)/build
APT_PACKAGES := qemu-system-x86 linux-image-amd64 busybox-static runc podman conmon \
	docker.io containerd iproute2 util-linux bsdutils bsdextrautils netavark aardvark-dns \
	iptables containernetworking-plugins catatonit docker-compose cpio procps criu

.PHONY: deps demo test test-needs test-unit test-functional bench check clean

deps:  ## install what the runtime and the tests need (Debian/Ubuntu, as root)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@$(PYTHON) -c 'import pytest' 2>/dev/null || $(PYTHON) -m pip install -q pytest

$(BUILD)/demo/config.json: $(RUNTIME)
	rm -rf $(BUILD)/demo && mkdir -p $(BUILD)/demo/rootfs/bin $(BUILD)/demo/rootfs/etc
	cp /bin/busybox $(BUILD)/demo/rootfs/bin/busybox
	for c in $$(/bin/busybox --list); do [ $$c = busybox ] || ln -s busybox $(BUILD)/demo/rootfs/bin/$$c; done
	echo 'root:x:0:0:root:/root:/bin/sh' > $(BUILD)/demo/rootfs/etc/passwd
	$(PYTHON) $(RUNTIME) spec -b $(BUILD)/demo
	$(PYTHON) -c 'import json,sys; p=sys.argv[1]; c=json.load(open(p)); \
		c["process"]["terminal"]=False; \
		c["process"]["args"]=["sh","-c","echo \"Hello from a container in its own VM\"; echo \"guest kernel: $$(uname -r)\""]; \
		json.dump(c, open(p, "w"), indent=1)' $(BUILD)/demo/config.json

demo: deps $(BUILD)/demo/config.json  ## run a busybox container in a VM
	@echo "host kernel:  $$(uname -r)"
	$(PYTHON) $(RUNTIME) run -b $(BUILD)/demo demo-$$$$

test: deps test-needs test-unit test-functional test-functional-no-pool  ## everything CI runs

test-needs:  ## one line naming each program or path the tests use that this host lacks
	$(PYTHON) tests/functional/host_needs.py

test-unit:
	$(PYTHON) -m pytest -q tests/test_runtime.py

test-functional:
	$(PYTHON) -m pytest -q -x tests/functional

test-functional-no-pool:  ## the functional suite again with vm.pool 0 (a runtime copy beside its own vm.json)
	CC_OCI_TEST_POOL=0 $(PYTHON) -m pytest -q -x tests/functional --ignore=tests/functional/test_pool.py

DENSITY ?= 50
ENGINE_RUNS ?= 5
bench: deps  ## issue 8's figures (CLI, warm start, memory, density, engines + timeline), then network, pods, checkpoint/restore, the VM pool
	$(PYTHON) bench/bench.py --density $(DENSITY) --engines $(ENGINE_RUNS)
	$(PYTHON) bench/network.py
	$(PYTHON) bench/pods.py
	$(PYTHON) bench/checkpoint.py
	$(PYTHON) bench/pool.py --engines $(ENGINE_RUNS)

check:
	$(PYTHON) $(RUNTIME) check

clean:
	rm -rf $(BUILD)
