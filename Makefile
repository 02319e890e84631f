# trace_ext: PGXS build.  The version lives in trace_ext.control only; it is
# read from there and fed to the C code (User-Agent) and the test scripts.

EXTENSION  = trace_ext
EXTVERSION = $(shell sed -n "s/^default_version *= *'\(.*\)'/\1/p" $(EXTENSION).control)

MODULE_big = trace_ext
OBJS = \
	trace_ext.o \
	src/guc.o \
	src/shmem.o \
	src/wake.o \
	src/secrets.o \
	src/trigger.o \
	src/queue_check.o \
	src/queue.o \
	src/payload.o \
	src/outcome.o \
	src/http.o \
	src/worker.o \
	src/metrics.o \
	$(patsubst %.c,%.o,$(sort $(wildcard adapters/*.c)))

DATA = $(wildcard $(EXTENSION)--*.sql)

PG_CPPFLAGS = -I$(srcdir) -DTRACE_EXT_VERSION='"$(EXTVERSION)"'
SHLIB_LINK  = -lcurl

# pg_regress: the SQL surface.  Run against a cluster that preloads the
# library (test/run.sh starts one); see README.md.
REGRESS      = install gucs hostile_gucs attach trigger operator views privileges security upgrade
REGRESS_OPTS = --inputdir=. --load-extension=plpgsql

# The JIT bitcode is not needed for an extension whose work is I/O, and
# building it would need clang.
override with_llvm = no

# The version is compiled in: rebuild when the control file changes.
adapters/common.o: $(EXTENSION).control

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

.PHONY: test demo
test:
	./test/run.sh
demo:
	./test/demo.sh
