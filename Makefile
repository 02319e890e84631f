# trace_ext: PGXS build.  The version lives in trace_ext.control only; it is
# read from there and fed to the C code (User-Agent) and the test scripts.
#
# Works in the source directory and from a separate build directory
# (VPATH, as Debian's pg_buildext builds):
#   make -C build -f "$PWD/Makefile" VPATH="$PWD"
# Every path to a source file below goes through $(srcdir).
#
#   make COPT=-Werror          warnings are errors (what CI builds with)
#   make installcheck          pg_regress on a temporary instance (safe)
#   make installcheck TRACE_LIVE=1
#                              pg_regress on the server PGHOST/PGPORT point
#                              at, after checks (test/lib/live_preflight.sh)
#   make dist                  the PGXN release zip, from git (HEAD)

EXTENSION  = trace_ext
EXTVERSION = $(shell sed -n "s/^default_version *= *'\(.*\)'/\1/p" $(srcdir)/$(EXTENSION).control)

MODULE_big = trace_ext
OBJS = \
	trace_ext.o \
	src/guc.o \
	src/shmem.o \
	src/wake.o \
	src/secrets.o \
	src/consent.o \
	src/queue_insert.o \
	src/trigger.o \
	src/queue_check.o \
	src/queue.o \
	src/payload.o \
	src/outcome.o \
	src/health.o \
	src/lease.o \
	src/http.o \
	src/worker.o \
	src/metrics.o \
	$(patsubst $(srcdir)/%.c,%.o,$(sort $(wildcard $(srcdir)/adapters/*.c)))

DATA = $(notdir $(wildcard $(srcdir)/$(EXTENSION)--*.sql))

PG_CPPFLAGS = -I$(srcdir) -DTRACE_EXT_VERSION='"$(EXTVERSION)"'
SHLIB_LINK  = -lcurl

# Header dependencies: the compiler writes one .d file beside each object
# (-MMD), listing the headers it read; make reads them back, so a changed
# src/*.h or adapters/*.h rebuilds exactly the objects that include it.
PG_CFLAGS   = -MMD -MP
EXTRA_CLEAN = $(OBJS:.o=.d) tmp_check/

# pg_regress: the SQL surface.  By default against a temporary instance
# that pg_regress starts with test/regress.conf (it preloads the library):
# no running server is touched.  See README.md, "Tests".
REGRESS      = install gucs hostile_gucs attach trigger operator views privileges security upgrade
# make installcheck REGRESS_SKIP='t …' leaves those tests out of one run
# (debian/rules does so at build time: see there).
REGRESS     := $(filter-out $(REGRESS_SKIP),$(REGRESS))
REGRESS_OPTS = --load-extension=plpgsql
ifeq ($(TRACE_LIVE),)
REGRESS_OPTS += --temp-instance=./tmp_check --temp-config=$(srcdir)/test/regress.conf
else
REGRESS_PREP += live-preflight
endif

# The JIT bitcode is not needed for an extension whose work is I/O, and
# building it would need clang.
override with_llvm = no

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

-include $(OBJS:.o=.d)

# The version is compiled in: rebuild when the control file changes.
adapters/common.o: $(srcdir)/$(EXTENSION).control

# A separate build directory needs the object directories, and the
# fixture that sql/install.sql reads with \i (relative to the directory
# pg_regress runs in).
ifneq ($(abspath $(srcdir)),$(CURDIR))
$(shell mkdir -p src adapters)
installcheck: regress-fixtures
endif

.PHONY: regress-fixtures live-preflight
regress-fixtures:
	mkdir -p test
	ln -sfn "$(abspath $(srcdir))/test/fixtures" test/fixtures

live-preflight:
	"$(srcdir)/test/lib/live_preflight.sh" "$(srcdir)" "$(bindir)"

# pg_regress's temporary instance runs initdb and postgres, which refuse to
# run as root: as root, test/lib/regress_runner.sh runs pg_regress as the
# postgres OS user in a private copy of the test files, and brings the
# results back.  As any other user it runs pg_regress as PGXS would.
pg_regress_installcheck = \
    "$(srcdir)/test/lib/regress_runner.sh" "$(srcdir)" \
    $(top_builddir)/src/test/regress/pg_regress \
    --inputdir=$(srcdir) \
    --bindir='$(bindir)' \
    $(pg_regress_locale_flags) $(EXTRA_REGRESS_OPTS)

# The PGXN release: trace_ext-<version>.zip of HEAD (committed files only).
.PHONY: dist
dist:
	git -C "$(srcdir)" archive --format=zip --prefix=$(EXTENSION)-$(EXTVERSION)/ \
	    -o "$(abspath .)/$(EXTENSION)-$(EXTVERSION).zip" HEAD
	@echo "$(EXTENSION)-$(EXTVERSION).zip"

.PHONY: test demo
test:
	"$(srcdir)/test/run.sh"
demo:
	"$(srcdir)/test/demo.sh"

# trace_ctl, the monitoring client: a libpq program in trace_ctl/, with a
# PGXS makefile of its own (one makefile builds a PROGRAM or a MODULE_big,
# not both).  Built, installed, uninstalled and cleaned with the
# extension; from a separate build directory, in its trace_ctl/, with the
# sources' trace_ctl/ as VPATH.  PG_CONFIG goes along (made absolute when
# it is a relative path: the sub-make runs one directory down).
TRACE_CTL_PG_CONFIG = $(if $(findstring /,$(PG_CONFIG)),$(abspath $(PG_CONFIG)),$(PG_CONFIG))
TRACE_CTL_MAKE = $(MAKE) -C trace_ctl PG_CONFIG="$(TRACE_CTL_PG_CONFIG)"
ifneq ($(abspath $(srcdir)),$(CURDIR))
TRACE_CTL_MAKE += -f "$(abspath $(srcdir))/trace_ctl/Makefile" VPATH="$(abspath $(srcdir))/trace_ctl"
endif

all: trace-ctl
install: install-trace-ctl
uninstall: uninstall-trace-ctl
clean: clean-trace-ctl

.PHONY: trace-ctl install-trace-ctl uninstall-trace-ctl clean-trace-ctl
trace-ctl:
	@mkdir -p trace_ctl
	$(TRACE_CTL_MAKE)
install-trace-ctl: trace-ctl
	$(TRACE_CTL_MAKE) install
uninstall-trace-ctl:
	@mkdir -p trace_ctl
	$(TRACE_CTL_MAKE) uninstall
clean-trace-ctl:
	@mkdir -p trace_ctl
	$(TRACE_CTL_MAKE) clean
