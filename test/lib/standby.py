"""A streaming standby of a throwaway test cluster.

Standby(primary) is a Cluster whose data directory is a pg_basebackup -R
of the primary (run as the `postgres` OS user, over the primary's unix
socket), in its own directory under /tmp, on its own loopback port.  It
inherits the primary's postgresql.conf and postgresql.auto.conf (so the
same shared_preload_libraries and trace.* settings); its own settings
(port, socket directory, and whatever the test passes, e.g. tracker URLs
pointing at another sink) are appended to ITS postgresql.auto.conf, which
the server reads last, so that they win over anything copied from the
primary, ALTER SYSTEM settings included.

Like Cluster, it is torn down (immediate stop, directory removed) by
destroy(), at exit, or on SIGTERM, whatever state it is in, and it binds
nothing but 127.0.0.1.  It never touches the primary except to read it.
"""

import time

from cluster import Cluster, ClusterError


class Standby(Cluster):
    """
        sb = Standby(env.cluster, settings={"trace.webhook_endpoint": url})
        sb.init(); sb.start()
        sb.wait_streaming()
        ... sb.promote() ...
        sb.destroy()
    """

    def __init__(self, primary, settings=None, name="trace_e2e_standby", debug=None):
        if debug is None:
            debug = primary.debug
        super().__init__(settings=settings, preload=primary.preload, debug=debug,
                         name=name, server_env=primary.server_env)
        self.primary = primary

    def init(self):
        """pg_basebackup -R from the primary (fast checkpoint, WAL
        streamed), then this standby's own settings."""
        if not self.primary.running:
            raise ClusterError("the primary is not running")
        self.run_server_cmd(["pg_basebackup", "-D", self.datadir,
                             "-h", self.primary.sockdir, "-p", str(self.primary.port),
                             "-U", "postgres", "-R", "-X", "stream", "-c", "fast",
                             "--no-sync"], timeout=300)
        own = {
            "port": self.port,
            "unix_socket_directories": self.sockdir,
            "log_min_messages": "debug1" if self.debug else "info",
        }
        own.update(self.settings)
        self.set_conf(own, reload=False)
        return self

    def set_conf(self, settings, reload=True, conf_file="postgresql.auto.conf"):
        """Append settings to postgresql.auto.conf (read after
        postgresql.conf, the last occurrence wins): the base backup
        copied the primary's files, ALTER SYSTEM settings included, and
        this standby's own settings must override both."""
        super().set_conf(settings, reload=reload, conf_file=conf_file)

    def in_recovery(self):
        conn = self.connect()
        try:
            cur = conn.cursor()
            cur.execute("SELECT pg_is_in_recovery()")
            return cur.fetchone()[0]
        finally:
            conn.close()

    def wait_streaming(self, timeout=60):
        """Wait until the primary lists this standby as streaming."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            conn = self.primary.connect()
            try:
                cur = conn.cursor()
                cur.execute("SELECT count(*) FROM pg_stat_replication "
                            "WHERE state = 'streaming'")
                if cur.fetchone()[0] > 0:
                    return True
            finally:
                conn.close()
            time.sleep(0.1)
        return False

    def wait_replayed(self, lsn, timeout=60):
        """Wait until this standby has replayed WAL up to `lsn` (text)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            conn = self.connect()
            try:
                cur = conn.cursor()
                cur.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,))
                if cur.fetchone()[0]:
                    return True
            finally:
                conn.close()
            time.sleep(0.05)
        return False

    def promote(self, timeout=60):
        """SELECT pg_promote() (waits for the end of recovery); true if
        the standby is a primary now."""
        conn = self.connect()
        try:
            cur = conn.cursor()
            cur.execute("SELECT pg_promote(true, %s)", (int(timeout),))
            return cur.fetchone()[0]
        finally:
            conn.close()
