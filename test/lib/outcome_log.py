"""Every outcome the worker records, with the delay it scheduled, exactly.

The worker records an attempt's outcome in one UPDATE of trace.trace_queue
(src/queue.c, the record statement), setting due_at = now() + delay for a
retry: the delay is computed when the outcome is recorded, from that
transaction's now().  Nothing in the queue row keeps that time, and reading
the row from outside races the next claim (which overwrites due_at with
the end of a lease) and adds the reader's own lag.

So the tests watch the record from inside: an AFTER UPDATE row trigger on
the queue, created by the test in its own database, copies every recorded
outcome (a pending or sending row that becomes pending again with another
attempt count or due_at, abandoned or delivered; a claim writes no row)
into public.e2e_outcomes, with now() of the recording transaction.  due_at - recorded_at is then the delay the worker wrote, to
the microsecond, whatever the machine's load: the checks compare it with
the rule (min(base * 6^(n-1), cap) +- 10 %, Retry-After) without any
allowance for the test's own timing.

The trigger only reads NEW and writes its own table; it runs in the
worker's transaction (pinned to search_path pg_catalog, pg_temp), so
every name in it is qualified.
"""

from tap import wait_until

SETUP_SQL = """
CREATE TABLE public.e2e_outcomes (
    seq         bigserial PRIMARY KEY,
    queue_id    bigint NOT NULL,
    trade_id    bigint NOT NULL,
    adapter     text NOT NULL,
    attempts    integer NOT NULL,
    status      text NOT NULL,
    due_at      timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL,
    http        integer,
    last_error  text);

CREATE FUNCTION public.e2e_outcome_recorded() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
    IF OLD.status IN ('pending', 'sending')
       AND NEW.status IN ('pending', 'abandoned', 'delivered')
       AND (NEW.status, NEW.attempts, NEW.due_at)
           IS DISTINCT FROM (OLD.status, OLD.attempts, OLD.due_at) THEN
        INSERT INTO public.e2e_outcomes (queue_id, trade_id, adapter, attempts, status,
                                         due_at, recorded_at, http, last_error)
        VALUES (NEW.id, NEW.trade_id, NEW.adapter, NEW.attempts, NEW.status,
                NEW.due_at, pg_catalog.now(), NEW.last_http_status, NEW.last_error);
    END IF;
    RETURN NULL;
END
$f$;

CREATE TRIGGER e2e_outcome_recorded AFTER UPDATE ON trace.trace_queue
    FOR EACH ROW EXECUTE FUNCTION public.e2e_outcome_recorded();
"""


class OutcomeLog:
    """The outcomes recorded for a TraceEnv's queue (install() first)."""

    def __init__(self, env):
        self.env = env

    def install(self):
        self.env.sql(SETUP_SQL)
        return self

    def outcomes(self, trade_ids, adapter=None):
        """Recorded outcomes of these trades, oldest first, as dicts with
        'delay' = due_at - recorded_at in seconds (float), 'due_epoch' and
        'recorded_epoch'."""
        if isinstance(trade_ids, int):
            trade_ids = [trade_ids]
        return self.env.sqld(
            "SELECT queue_id, trade_id, adapter, attempts, status, http, last_error, "
            "       due_at, recorded_at, "
            "       extract(epoch FROM due_at - recorded_at)::float8 AS delay, "
            "       extract(epoch FROM due_at)::float8 AS due_epoch, "
            "       extract(epoch FROM recorded_at)::float8 AS recorded_epoch "
            "  FROM public.e2e_outcomes "
            " WHERE trade_id = ANY(%s) AND (%s::text IS NULL OR adapter = %s) "
            " ORDER BY seq", (list(trade_ids), adapter, adapter))

    def retries(self, trade_ids, adapter=None):
        """Only the outcomes that scheduled a retry (status pending)."""
        return [o for o in self.outcomes(trade_ids, adapter) if o["status"] == "pending"]

    def wait(self, trade_ids, pred, timeout, adapter=None):
        """Wait until pred(outcomes) holds; returns the outcomes last seen."""
        last = []

        def probe():
            nonlocal last
            last = self.outcomes(trade_ids, adapter)
            return pred(last)
        wait_until(probe, timeout, 0.05)
        return last


def backoff(n, base, cap):
    """The rule's nominal delay before retry n (no jitter): min(base*6^(n-1), cap)."""
    return min(base * 6 ** (n - 1), cap)


def in_band(delay, nominal, jitter=0.10, eps=2e-6):
    """delay within nominal +- jitter (eps: the microseconds of timestamptz)."""
    return nominal * (1 - jitter) - eps <= delay <= nominal * (1 + jitter) + eps
