# imapproxy -- GNU make, no autotools.
#
#   make                 build broker/imapproxy-broker, session/imapproxy-session, ctl/imapproxyctl
#   make check           install test dependencies (as root), run every test, then
#                        the unit, fuzz-replay and integration tests again built
#                        with ASan+UBSan in build/san/ (CHECK_SAN=0: skip that)
#   make check-nspawn    only the test under real systemd in systemd-nspawn (root)
#   make install DESTDIR=... prefix=... unitdir=...
#   make SAN=1 ...       build with AddressSanitizer + UBSan (the session then uses glibc)
#   make MUSL=0          link the session against glibc (dynamic) even if musl-gcc is there
#   make fuzz            libFuzzer targets (clang)
#   make soak DURATION=N / make load   long soak, full-size load test (test_load.py)

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
catalogdir ?= $(prefix)/lib/systemd/catalog

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
# session/tls.c belongs to imapproxy-session-tls only (see below).
SESSION_SRC := $(filter-out session/tls.c,$(sort $(wildcard session/*.c)))
SESSION_OBJ := $(SESSION_SRC:.c=.o)
TLS_DIR     := build/tls
TLS_SESSION_OBJ := $(patsubst %.c,$(TLS_DIR)/%.o,$(SESSION_SRC) session/tls.c)

UNIT_TEST_SRC := $(sort $(wildcard tests/unit/test-*.c))
UNIT_TESTS    := $(UNIT_TEST_SRC:.c=)
FUZZ_SRC      := $(sort $(wildcard tests/fuzz/fuzz-*.c))
FUZZ_REPLAY   := $(patsubst tests/fuzz/fuzz-%.c,tests/fuzz/replay-%,$(FUZZ_SRC))
FUZZ_BIN      := $(patsubst tests/fuzz/fuzz-%.c,tests/fuzz/libfuzzer-%,$(FUZZ_SRC))

BINARIES := broker/imapproxy-broker session/imapproxy-session session/imapproxy-session-tls ctl/imapproxyctl
BENCH_BIN := bench/imapload bench/hello

# The session is exec'd once per client connection, so its start-up is paid on
# every connection: by default it is a static PIE linked against musl
# (musl-tools). glibc's dynamic loader costs ~0.55 ms per exec on a VM, mostly
# CPUID cache probing that static glibc runs too (bench/README.md, "Where the
# time goes"). The session's objects and the common ones it links are compiled
# by musl-gcc into build/musl/, apart from the glibc objects of the same
# sources. glibc instead: with SAN=1 (the sanitizers need glibc), with MUSL=0,
# or when musl-gcc is missing. The broker, tests and fuzz targets are glibc.
MUSL_CC   ?= musl-gcc
MUSL      ?= 1
MUSL_DIR  := build/musl
ifeq ($(SAN),1)
SESSION_LIBC := glibc
else ifeq ($(MUSL),0)
SESSION_LIBC := glibc
else ifneq ($(shell command -v $(MUSL_CC) 2>/dev/null),)
SESSION_LIBC := musl
else
SESSION_LIBC := glibc
SESSION_NOTE := $(MUSL_CC) not found (apt-get install musl-tools): session/imapproxy-session is linked against glibc, dynamically
endif
MUSL_COMMON_OBJ  := $(patsubst %.c,$(MUSL_DIR)/%.o,$(COMMON_SRC))
MUSL_SESSION_OBJ := $(patsubst %.c,$(MUSL_DIR)/%.o,$(SESSION_SRC))
# Static PIE: ASLR for the image too; it starts as fast as -static (within
# noise). musl-gcc's specs know no -static-pie and always link Scrt1.o, so the
# link is musl-gcc's own with Scrt1.o swapped for musl's self-relocating
# rcrt1.o. Plain -static when this musl has no rcrt1.o. MUSL_CRTDIR (musl's
# Scrt1.o directory, from the driver's -### output) is computed once, and
# only when the session is linked. With -static, gcc ignores LDFLAGS' -pie.
MUSL_CRTDIR = $(eval MUSL_CRTDIR := $(patsubst %/Scrt1.o,%,$(filter %/Scrt1.o,$(subst ",,$(shell \
                $(MUSL_CC) -\#\#\# -o /dev/null /dev/null 2>&1)))))$(MUSL_CRTDIR)
MUSL_RCRT1  = $(wildcard $(MUSL_CRTDIR)/rcrt1.o)
MUSL_PIE_START = -nostartfiles -Wl,-pie,--no-dynamic-linker,-z,text \
                 $(MUSL_RCRT1) $(MUSL_CRTDIR)/crti.o $(shell $(MUSL_CC) -print-file-name=crtbeginS.o)
MUSL_PIE_END   = $(shell $(MUSL_CC) -print-file-name=crtendS.o) $(MUSL_CRTDIR)/crtn.o

all: $(BINARIES)

common/libcommon.a: $(COMMON_OBJ)
	$(AR) rcs $@ $^

# The broker owns sd-event and GnuTLS.
$(BROKER_OBJ): override CFLAGS += $(BROKER_CFLAGS)
broker/imapproxy-broker: $(BROKER_OBJ) common/libcommon.a
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $(BROKER_OBJ) common/libcommon.a $(BROKER_LIBS)

# The session is exec'd once per client connection: it links libc only
# (design.md section 3: every shared library costs milliseconds at exec).
# build/session-libc names the libc it was linked with: switching relinks it.
ifeq ($(SESSION_LIBC),musl)
session/imapproxy-session: $(MUSL_SESSION_OBJ) $(MUSL_DIR)/common/libcommon.a build/session-libc
	$(MUSL_CC) $(CFLAGS) $(LDFLAGS) -static $(if $(MUSL_RCRT1),$(MUSL_PIE_START)) -o $@ \
		$(MUSL_SESSION_OBJ) $(MUSL_DIR)/common/libcommon.a $(if $(MUSL_RCRT1),$(MUSL_PIE_END))
else
session/imapproxy-session: $(SESSION_OBJ) common/libcommon.a build/session-libc
	$(if $(SESSION_NOTE),@echo '$(SESSION_NOTE)')
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $(SESSION_OBJ) common/libcommon.a
endif

# Client TLS: the same session sources compiled again with -DSESSION_TLS
# into build/tls/, plus session/tls.c, linked against glibc and GnuTLS (not
# libsystemd). The plaintext session execs it after a client's STARTTLS;
# the 993 launchers run it directly. Only TLS clients pay for loading GnuTLS.
TLS_SESSION_CFLAGS = $(shell $(PKG_CONFIG) --cflags gnutls)
TLS_SESSION_LIBS   = $(shell $(PKG_CONFIG) --libs gnutls)
$(TLS_DIR)/%.o: %.c
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) -DSESSION_TLS $(CFLAGS) $(TLS_SESSION_CFLAGS) -c -o $@ $<
session/imapproxy-session-tls: $(TLS_SESSION_OBJ) common/libcommon.a
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $(TLS_SESSION_OBJ) common/libcommon.a $(TLS_SESSION_LIBS)

# imapproxyctl: glibc, libc only (no GnuTLS, no libsystemd).
ctl/imapproxyctl: ctl/imapproxyctl.o common/libcommon.a
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ ctl/imapproxyctl.o common/libcommon.a

build/session-libc: FORCE
	@mkdir -p $(@D); echo '$(SESSION_LIBC) $(SAN)' | cmp -s - $@ || echo '$(SESSION_LIBC) $(SAN)' > $@

$(MUSL_DIR)/%.o: %.c
	@mkdir -p $(@D)
	$(MUSL_CC) $(CPPFLAGS) $(CFLAGS) -c -o $@ $<

$(MUSL_DIR)/common/libcommon.a: $(MUSL_COMMON_OBJ)
	$(AR) rcs $@ $^

tests/unit/test-%: tests/unit/test-%.c common/libcommon.a
	$(CC) $(CPPFLAGS) $(CFLAGS) $(BROKER_CFLAGS) $(LDFLAGS) -o $@ $< common/libcommon.a -lcriterion $(BROKER_LIBS)

# Fuzz targets replayed over their corpus by a plain main() in make check.
tests/fuzz/replay-%: tests/fuzz/fuzz-%.c tests/fuzz/replay-main.c common/libcommon.a
	$(CC) $(CPPFLAGS) $(FUZZ_CPPFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $< $(filter %.o,$^) tests/fuzz/replay-main.c common/libcommon.a

# fuzz-prelogin drives session/prelogin.c with its own client_write() and
# broker_checkout() (main.c and broker.c are not linked).
PRELOGIN_FUZZ_SRC := session/prelogin.c session/sasl.c session/caps.c session/trace.c
tests/fuzz/replay-prelogin: $(PRELOGIN_FUZZ_SRC:.c=.o)
tests/fuzz/replay-prelogin tests/fuzz/libfuzzer-prelogin: FUZZ_CPPFLAGS = -Isession
tests/fuzz/libfuzzer-prelogin: $(PRELOGIN_FUZZ_SRC)
tests/fuzz/libfuzzer-prelogin: FUZZ_SRC_EXTRA = $(PRELOGIN_FUZZ_SRC)

FUZZ_CC      ?= clang
FUZZ_FLAGS   := -g -O1 -fsanitize=fuzzer,address,undefined -std=gnu17 -D_GNU_SOURCE -Icommon
FUZZ_SECONDS ?= 60
tests/fuzz/libfuzzer-%: tests/fuzz/fuzz-%.c $(COMMON_SRC)
	$(FUZZ_CC) $(FUZZ_FLAGS) $(FUZZ_CPPFLAGS) -o $@ $< $(FUZZ_SRC_EXTRA) $(COMMON_SRC) $(FUZZ_LIBS)

# fuzz-base64 also checks common/base64.c against GnuTLS's decoder.
tests/fuzz/libfuzzer-base64: FUZZ_FLAGS += -DFUZZ_WITH_GNUTLS $(shell $(PKG_CONFIG) --cflags gnutls)
tests/fuzz/libfuzzer-base64: FUZZ_LIBS = $(shell $(PKG_CONFIG) --libs gnutls)

# make fuzz FUZZ_RUNS=10000000 runs each target for that many executions
# instead of FUZZ_SECONDS; FUZZ_TARGETS="prelogin ipc" picks targets. New
# corpus entries land in tests/fuzz/corpus/NAME/ (review before committing).
FUZZ_TARGETS ?= $(patsubst tests/fuzz/libfuzzer-%,%,$(FUZZ_BIN))
FUZZ_LIMIT    = $(if $(FUZZ_RUNS),-runs=$(FUZZ_RUNS),-max_total_time=$(FUZZ_SECONDS))
fuzz: $(patsubst %,tests/fuzz/libfuzzer-%,$(FUZZ_TARGETS))
	@for n in $(FUZZ_TARGETS); do \
		mkdir -p tests/fuzz/corpus/$$n; \
		echo "== $$n ($(FUZZ_LIMIT))"; \
		./tests/fuzz/libfuzzer-$$n $(FUZZ_LIMIT) -print_final_stats=1 -dict=tests/fuzz/$$n.dict \
			tests/fuzz/corpus/$$n 2>&1 | grep -E '^(#[0-9]+.*DONE|stat::|Done|==[0-9]+==ERROR)|SUMMARY' ; \
	done

# $(BENCH_BIN): tests/run-all ends with bench/run --smoke (issue 3).
tests-build: $(BINARIES) $(UNIT_TESTS) $(FUZZ_REPLAY) $(BENCH_BIN)

# make check's sanitizer pass (see san-tests-build below).
SAN_TREE  := build/san
CHECK_SAN ?= 1
CHECK_SAN_TREE := $(if $(filter 1,$(CHECK_SAN)),$(if $(filter 1,$(SAN)),0,1),0)

# Installs missing Debian packages first (a fresh machine cannot even build
# the tests without libsystemd-dev and Criterion), then builds, then runs.
check:
	./scripts/install-deps
	$(MAKE) tests-build
ifeq ($(CHECK_SAN_TREE),1)
	$(MAKE) san-tests-build
	SAN_TREE=$(SAN_TREE) ./tests/run-all
else
	./tests/run-all
endif

# The sanitizer pass of make check: the same unit tests, fuzz-corpus replays
# and integration tests, built with SAN=1 in a copy of the sources under
# build/san/ (scripts/sync-tree), whose objects never mix with the normal
# build's in-tree objects. tests/run-all runs build/san/tests/run-all when
# SAN_TREE is set. Not when this tree is itself a sanitizer build (SAN=1) or
# with CHECK_SAN=0.
san-tests-build:
	./scripts/sync-tree $(SAN_TREE)
	$(MAKE) -C $(SAN_TREE) SAN=1 $(BINARIES) $(UNIT_TESTS) $(FUZZ_REPLAY)

# Real systemd as PID 1 in systemd-nspawn: make install into a Debian 12
# tree, the shipped units and sysusers file, two logins through
# imapproxy-session.socket (tests/nspawn/check-nspawn; root; part of make check).
check-nspawn:
	./scripts/install-deps
	$(MAKE) $(BINARIES) bench/imapload
	./tests/nspawn/check-nspawn

install: all install-catalog
	install -Dm0755 broker/imapproxy-broker $(DESTDIR)$(sbindir)/imapproxy-broker
	install -Dm0755 session/imapproxy-session $(DESTDIR)$(libexecdir)/imapproxy-session
	install -Dm0755 session/imapproxy-session-tls $(DESTDIR)$(libexecdir)/imapproxy-session-tls
	install -Dm0755 ctl/imapproxyctl $(DESTDIR)$(sbindir)/imapproxyctl
	install -Dm0644 imapproxy.conf $(DESTDIR)$(sysconfdir)/imapproxy.conf
	install -d $(DESTDIR)$(sysconfdir)/imapproxy.conf.d
	install -d $(DESTDIR)$(unitdir)
	install -d $(DESTDIR)$(docdir)
	for u in units/*.service units/*.socket units/*.timer; do \
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
	sed -e 's|/usr/local/libexec|$(libexecdir)|g' -e 's|/etc/imapproxy.conf|$(sysconfdir)/imapproxy.conf|g' \
	    units/xinetd/imapproxy-tls > $(DESTDIR)$(docdir)/xinetd.imapproxy-tls

# journald message catalog (journalctl -x); the system's database is
# rebuilt by journalctl --update-catalog (Debian's systemd trigger does it).
install-catalog:
	install -Dm0644 doc/imapproxy.catalog $(DESTDIR)$(catalogdir)/imapproxy.catalog

# Benchmark (bench/README.md): the load generator, and the libc-only greeter
# that the session's exec-to-greeting latency is compared with, built twice:
# bench/hello as Debian builds a small C program (glibc, dynamic PIE: the
# target's "libc hello"), and bench/hello-musl linked like the musl session
# (musl-gcc, static PIE through the MUSL_* variables above; never with the
# sanitizers, which need glibc). Without musl-gcc, bench/hello-musl is not
# built and bench/run reports that comparison as n/a.
ifneq ($(shell command -v $(MUSL_CC) 2>/dev/null),)
BENCH_BIN += bench/hello-musl
endif
bench/imapload: bench/imapload.c
	$(CC) $(CPPFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $< -pthread
bench/hello: bench/hello.c
	$(CC) $(CPPFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $<
bench/hello-musl: bench/hello.c
	$(MUSL_CC) $(filter-out -fsanitize=% -fno-sanitize-recover=%,$(CPPFLAGS) $(CFLAGS) $(LDFLAGS)) \
		-static $(if $(MUSL_RCRT1),$(MUSL_PIE_START)) -o $@ $< $(if $(MUSL_RCRT1),$(MUSL_PIE_END))

# Longer runs of tests/integration/test_load.py than make check does:
#   make soak DURATION=3600   logins, expiries and kicks for an hour; the
#                             broker's VmRSS and fds must stay flat
#   make load                 10000 pooled backend connections, 1000 clients at once
DURATION ?= 600
soak: tests-build
	SOAK_SECONDS=$(DURATION) python3 -u tests/integration/run.py test_load.Soak
load: tests-build
	LOAD_POOLED=10000 LOAD_CLIENTS=1000 LOAD_HOLD=30 python3 -u tests/integration/run.py test_load.Load
.PHONY: soak load

bench:
	./scripts/install-deps
	$(MAKE) $(BINARIES) $(BENCH_BIN)
	./bench/run
.PHONY: bench

clean:
	rm -f $(BINARIES) common/libcommon.a */*.o */*.d tests/*/*.o tests/*/*.d \
	      $(UNIT_TESTS) $(FUZZ_REPLAY) $(FUZZ_BIN) $(BENCH_BIN) bench/hello-musl
	rm -rf build

FORCE:
.PHONY: all check check-nspawn tests-build san-tests-build install install-catalog clean fuzz FORCE
.SECONDARY:
-include $(wildcard */*.d tests/*/*.d $(MUSL_DIR)/*/*.d $(TLS_DIR)/*/*.d)
