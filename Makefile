# scopefs — build, test, demo, bench.
#
#   make            build build/scopefs (CUDA parts when nvcc is found; CUDA=0 to skip)
#   make test       install missing Debian packages, build, run every test
#   make demo       install missing Debian packages, build, make the demo
#                   dataset, mount it on demo/mnt
#   make undemo     unmount the demo
#   make bench      run the benchmarks (big data; minutes)
#   make fuzz       build the libFuzzer harnesses (tests/fuzz/) with clang into
#                   $(BUILD)/fuzz/; not part of all or test
#
# Layers (see docs/architecture.md): src/core (compute, no I/O),
# src/util (errors, logs, keys), src/io (datasets, TIFF layout, cache,
# engine, products), src/fuse (the FUSE server and main).

CC      ?= cc
BUILD   ?= build
PYTHON  ?= /usr/bin/python3
SAN     ?=

PKGS    := fuse3 libtiff-4 liblz4 libxxhash fftw3f libpng
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null) -lfftw3f_threads

CFLAGS  ?= -O2 -g
override CFLAGS += -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -Iinclude -pthread $(PKG_CFLAGS) $(SAN)
override LDFLAGS += -pthread $(SAN)
LDLIBS  += $(PKG_LIBS) -lm

# CUDA is optional: every build works without it.
NVCC    ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CUDA    ?= $(if $(NVCC),1,0)
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
CU_SRCS := $(if $(filter 1,$(CUDA)),$(wildcard src/core/*.cu))
ifeq ($(CUDA),1)
override CFLAGS += -DSF_HAVE_CUDA=1 -I$(CUDA_HOME)/include
LDLIBS  += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcufft -lcudart -lstdc++
NVFLAGS ?= -O2 -Iinclude -Xcompiler -Wall,-Wextra,-Werror,-fPIC -arch=sm_90 \
	   -gencode arch=compute_90,code=compute_90 -DSF_HAVE_CUDA=1
endif

CORE_SRCS := $(wildcard src/util/*.c src/core/*.c)
IO_SRCS   := $(wildcard src/io/*.c)
FUSE_SRCS := $(filter-out src/fuse/main.c,$(wildcard src/fuse/*.c))
CORE_OBJS := $(CORE_SRCS:%.c=$(BUILD)/%.o) $(CU_SRCS:%.cu=$(BUILD)/%.cu.o)
IO_OBJS   := $(IO_SRCS:%.c=$(BUILD)/%.o)
FUSE_OBJS := $(FUSE_SRCS:%.c=$(BUILD)/%.o)
UNIT_SRCS := $(wildcard tests/unit/test_*.c)
UNIT_BINS := $(UNIT_SRCS:tests/unit/%.c=$(BUILD)/tests/%)

.SECONDARY:
.PHONY: all deps test unit asan integration integration-asan demo undemo bench format lint clean fuzz fuzz-bins
all: $(BUILD)/scopefs

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/%.cu.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -c $< -o $@

$(BUILD)/libscopefs_core.a: $(CORE_OBJS)
	$(AR) rcs $@ $^
$(BUILD)/libscopefs_io.a: $(IO_OBJS) $(FUSE_OBJS)
	$(AR) rcs $@ $^

$(BUILD)/scopefs: $(BUILD)/src/fuse/main.o $(BUILD)/libscopefs_io.a $(BUILD)/libscopefs_core.a
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

$(BUILD)/tests/%: $(BUILD)/tests/unit/%.o $(BUILD)/libscopefs_io.a $(BUILD)/libscopefs_core.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

deps:
	@tools/install-deps

unit: $(UNIT_BINS)
	@tools/run-unit $(UNIT_BINS)

# The C tests again under AddressSanitizer and UndefinedBehaviorSanitizer.
asan:
	$(MAKE) BUILD=build-asan CUDA=0 CFLAGS="-O1 -g -fno-omit-frame-pointer" \
		SAN="-fsanitize=address,undefined -fno-sanitize-recover=all" unit

integration: all $(BUILD)/tests/test_tiff_layout
	SCOPEFS_LAYOUT_TOOL=$(BUILD)/tests/test_tiff_layout $(PYTHON) -m pytest -q tests/integration

# The integration tests again against a daemon (and layout tool) built with
# ASan/UBSan: a memory error or leak in any of them fails the run, with the
# reports printed.  SCOPEFS_SANITIZED skips the RSS bounds (shadow memory).
SAN_LOGS := $(CURDIR)/build-asan/san-logs
integration-asan:
	$(MAKE) BUILD=build-asan CUDA=0 CFLAGS="-O1 -g -fno-omit-frame-pointer" \
		SAN="-fsanitize=address,undefined -fno-sanitize-recover=all" \
		build-asan/scopefs build-asan/tests/test_tiff_layout
	rm -rf $(SAN_LOGS) && mkdir -p $(SAN_LOGS)
	ASAN_OPTIONS=log_path=$(SAN_LOGS)/asan UBSAN_OPTIONS=log_path=$(SAN_LOGS)/ubsan:print_stacktrace=1 \
		SCOPEFS_SANITIZED=1 SCOPEFS_BIN=$(CURDIR)/build-asan/scopefs \
		SCOPEFS_LAYOUT_TOOL=build-asan/tests/test_tiff_layout $(PYTHON) -m pytest -q tests/integration
	@if ls $(SAN_LOGS)/* >/dev/null 2>&1; then cat $(SAN_LOGS)/*; \
		echo "integration-asan: sanitizer reports above" >&2; exit 1; fi

# The README's test command: everything, from a clean clone.
test: deps
	$(MAKE) all
	$(MAKE) unit
	$(MAKE) asan
	$(MAKE) integration
	$(MAKE) integration-asan

demo: deps all
	@tools/demo start

undemo:
	@tools/demo stop

bench: deps all
	$(PYTHON) tests/bench/run.py
	$(PYTHON) tests/bench/warp.py
	$(PYTHON) tests/bench/warp_gpu.py
	$(PYTHON) tests/bench/deconv.py
	$(PYTHON) tests/bench/deconv_gpu.py
	$(PYTHON) tests/bench/register.py
	$(PYTHON) tests/bench/register_mem.py

# libFuzzer harnesses for the parsers of untrusted input (tests/fuzz/, how to
# run them: docs/architecture.md), under ASan/UBSan.  A separate build: the
# library is compiled again with clang's fuzzer instrumentation.
FUZZ_CC   ?= clang
FUZZ_BINS := $(patsubst tests/fuzz/%.c,$(BUILD)/%,$(wildcard tests/fuzz/fuzz_*.c))

fuzz:
	@if command -v $(FUZZ_CC) >/dev/null; then \
		$(MAKE) BUILD=$(BUILD)/fuzz CC=$(FUZZ_CC) CUDA=0 \
			CFLAGS="-O1 -g -fno-omit-frame-pointer" \
			SAN="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=all" \
			fuzz-bins; \
	else \
		echo "make fuzz: $(FUZZ_CC) not found; the fuzz harnesses need clang" >&2; \
	fi

fuzz-bins: $(FUZZ_BINS)

$(BUILD)/fuzz_%: $(BUILD)/tests/fuzz/fuzz_%.o $(BUILD)/libscopefs_io.a $(BUILD)/libscopefs_core.a
	$(CC) $(LDFLAGS) -fsanitize=fuzzer $^ $(LDLIBS) -o $@

format:
	clang-format -i $(wildcard src/*/*.c src/*/*.cu include/scopefs/*.h tests/unit/*.c tests/fuzz/*.[ch] tools/*.c)

lint:
	cppcheck --quiet --error-exitcode=1 --enable=warning,performance,portability \
		--inline-suppr -Iinclude -D_GNU_SOURCE src tools

clean:
	rm -rf build build-asan

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
