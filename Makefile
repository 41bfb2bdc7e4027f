# imapproxy -- GNU make, no autotools.
#
#   make                 build broker/imapproxy-broker and session/imapproxy-session
#   make check           install test dependencies (as root), run every test
#   make install DESTDIR=... prefix=... unitdir=...
#   make SAN=1 ...       build with AddressSanitizer + UBSan
#   make fuzz            libFuzzer targets (clang)

PKG_CONFIG ?= pkg-config
CC         ?= cc
prefix     ?= /usr/local
sbindir    ?= $(prefix)/sbin
bindir     ?= $(prefix)/bin
libexecdir ?= $(prefix)/libexec
sysconfdir ?= /etc
mandir     ?= $(prefix)/share/man
docdir     ?= $(prefix)/share/doc/imapproxy
unitdir    ?= $(prefix)/lib/systemd/system

WARNINGS := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes \
            -Wformat=2 -Wvla -Wno-unused-parameter
CFLAGS   ?= -O2 -g
HARDEN   := -D_FORTIFY_SOURCE=2 -fstack-protector-strong -fPIE
override CFLAGS   += -std=gnu17 $(WARNINGS) $(HARDEN)
override CPPFLAGS += -D_GNU_SOURCE -Icommon -DSYSCONFDIR='"$(sysconfdir)"' \
                     -DLIBEXECDIR='"$(libexecdir)"' -MMD -MP
override LDFLAGS  += -pie -Wl,-z,relro,-z,now

ifeq ($(SAN),1)
override CFLAGS  += -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
override LDFLAGS += -fsanitize=address,undefined
endif

BROKER_PKGS := libsystemd gnutls
BROKER_CFLAGS = $(shell $(PKG_CONFIG) --cflags $(BROKER_PKGS))
BROKER_LIBS   = $(shell $(PKG_CONFIG) --libs $(BROKER_PKGS))

COMMON_SRC  := $(sort $(wildcard common/*.c))
COMMON_OBJ  := $(COMMON_SRC:.c=.o)
BROKER_SRC  := $(sort $(wildcard broker/*.c))
BROKER_OBJ  := $(BROKER_SRC:.c=.o)
SESSION_SRC := $(sort $(wildcard session/*.c))
SESSION_OBJ := $(SESSION_SRC:.c=.o)

UNIT_TEST_SRC := $(sort $(wildcard tests/unit/test-*.c))
UNIT_TESTS    := $(UNIT_TEST_SRC:.c=)
FUZZ_SRC      := $(sort $(wildcard tests/fuzz/fuzz-*.c))
FUZZ_REPLAY   := $(patsubst tests/fuzz/fuzz-%.c,tests/fuzz/replay-%,$(FUZZ_SRC))
FUZZ_BIN      := $(patsubst tests/fuzz/fuzz-%.c,tests/fuzz/libfuzzer-%,$(FUZZ_SRC))

BINARIES := broker/imapproxy-broker session/imapproxy-session

all: $(BINARIES)

common/libcommon.a: $(COMMON_OBJ)
	$(AR) rcs $@ $^

# The broker owns sd-event and GnuTLS.
$(BROKER_OBJ): override CFLAGS += $(BROKER_CFLAGS)
broker/imapproxy-broker: $(BROKER_OBJ) common/libcommon.a
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $(BROKER_OBJ) common/libcommon.a $(BROKER_LIBS)

# The session is exec'd once per client connection: it links libc only
# (design.md section 3: every shared library costs milliseconds at exec).
session/imapproxy-session: $(SESSION_OBJ) common/libcommon.a
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $(SESSION_OBJ) common/libcommon.a

tests/unit/test-%: tests/unit/test-%.c common/libcommon.a
	$(CC) $(CPPFLAGS) $(CFLAGS) $(BROKER_CFLAGS) $(LDFLAGS) -o $@ $< common/libcommon.a -lcriterion $(BROKER_LIBS)

# Fuzz targets replayed over their corpus by a plain main() in make check.
tests/fuzz/replay-%: tests/fuzz/fuzz-%.c tests/fuzz/replay-main.c common/libcommon.a
	$(CC) $(CPPFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $< tests/fuzz/replay-main.c common/libcommon.a

FUZZ_CC      ?= clang
FUZZ_FLAGS   := -g -O1 -fsanitize=fuzzer,address,undefined -std=gnu17 -D_GNU_SOURCE -Icommon
FUZZ_SECONDS ?= 60
tests/fuzz/libfuzzer-%: tests/fuzz/fuzz-%.c $(COMMON_SRC)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $< $(COMMON_SRC)

fuzz: $(FUZZ_BIN)
	@for f in $(FUZZ_BIN); do \
		n=$${f##*/libfuzzer-}; mkdir -p tests/fuzz/corpus/$$n; \
		echo "== $$n ($(FUZZ_SECONDS)s)"; \
		./$$f -max_total_time=$(FUZZ_SECONDS) -dict=tests/fuzz/$$n.dict tests/fuzz/corpus/$$n 2>&1 | tail -n 3; \
	done

tests-build: $(BINARIES) $(UNIT_TESTS) $(FUZZ_REPLAY)

# Installs missing Debian packages first (a fresh machine cannot even build
# the tests without libsystemd-dev and Criterion), then builds, then runs.
check:
	./scripts/install-deps
	$(MAKE) tests-build
	./tests/run-all

install: all
	install -Dm0755 broker/imapproxy-broker $(DESTDIR)$(sbindir)/imapproxy-broker
	install -Dm0755 session/imapproxy-session $(DESTDIR)$(libexecdir)/imapproxy-session
	install -Dm0644 imapproxy.conf $(DESTDIR)$(sysconfdir)/imapproxy.conf
	install -d $(DESTDIR)$(unitdir)
	install -d $(DESTDIR)$(docdir)
	for u in units/*.service units/*.socket; do \
		[ -e "$$u" ] || continue; \
		sed -e 's|@sbindir@|$(sbindir)|g' -e 's|@libexecdir@|$(libexecdir)|g' \
		    -e 's|@sysconfdir@|$(sysconfdir)|g' "$$u" > $(DESTDIR)$(unitdir)/$${u##*/}; \
		chmod 0644 $(DESTDIR)$(unitdir)/$${u##*/}; \
	done
	for m in doc/*.[1-8]; do \
		[ -e "$$m" ] || continue; \
		install -Dm0644 "$$m" $(DESTDIR)$(mandir)/man$${m##*.}/$${m##*/}; \
	done
	install -Dm0644 doc/ipc-protocol.md $(DESTDIR)$(docdir)/ipc-protocol.md
	install -Dm0644 units/imapproxy.sysusers $(DESTDIR)$(prefix)/lib/sysusers.d/imapproxy.conf
	sed -e 's|/usr/local/libexec|$(libexecdir)|g' -e 's|/etc/imapproxy.conf|$(sysconfdir)/imapproxy.conf|g' \
	    units/xinetd/imapproxy > $(DESTDIR)$(docdir)/xinetd.imapproxy

# Benchmark (bench/README.md): load generator, and the libc-only greeter that
# session exec-to-greeting latency is compared with (linked like the session).
BENCH_BIN := bench/imapload bench/hello
bench/imapload: bench/imapload.c
	$(CC) $(CPPFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $< -pthread
bench/hello: bench/hello.c
	$(CC) $(CPPFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $<

bench:
	./scripts/install-deps
	$(MAKE) $(BINARIES) $(BENCH_BIN)
	./bench/run
.PHONY: bench

clean:
	rm -f $(BINARIES) common/libcommon.a */*.o */*.d tests/*/*.o tests/*/*.d \
	      $(UNIT_TESTS) $(FUZZ_REPLAY) $(FUZZ_BIN) $(BENCH_BIN)

.PHONY: all check tests-build install clean fuzz
.SECONDARY:
-include $(wildcard */*.d tests/*/*.d)
