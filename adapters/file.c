/*
 * file.c: the file export tracker, to a local directory or to S3.
 *
 * local: one JSON object per line appended to
 * <trace.file_export_dir>/traces-YYYY-MM-DD.jsonl (UTC day of the write),
 * written with one write() on an O_APPEND descriptor (so concurrent
 * workers never interleave partial lines) and fsync'd before the row
 * counts as delivered.  A write error is a recorded "io" failure.
 *
 * s3: one PUT per trade to <endpoint>/<bucket>/<prefix>YYYY/MM/DD/<id>.json
 * (path-style; the date is the UTC day the row was queued, so a re-send
 * overwrites the same key), signed with AWS Signature Version 4 by
 * libcurl.  The keys come from trace_secret() and are never logged.
 */
#include "postgres.h"

#include <fcntl.h>
#include <time.h>
#include <unistd.h>
#include <curl/curl.h>

#include "common/cryptohash.h"
#include "common/sha2.h"
#include "lib/stringinfo.h"
#include "portability/instr_time.h"
#include "utils/datetime.h"
#include "utils/guc.h"

#include "adapters/adapter.h"

static char *export_type = NULL;
static char *export_dir = NULL;
static char *s3_endpoint = NULL;
static char *s3_region = NULL;
static char *s3_bucket = NULL;
static char *s3_prefix = NULL;

static bool
check_file_export_type(char **newval, void **extra, GucSource source)
{
	if (strcmp(*newval, "local") == 0 || strcmp(*newval, "s3") == 0)
		return true;
	GUC_check_errdetail("trace.file_export_type must be \"local\" or \"s3\".");
	return false;
}

static bool
check_file_export_dir(char **newval, void **extra, GucSource source)
{
	return trace_check_absolute_path(newval, "trace.file_export_dir");
}

static bool
check_s3_endpoint(char **newval, void **extra, GucSource source)
{
	return trace_check_url(newval, "trace.s3_endpoint");
}

/*
 * The prefix is part of the request path: a "." or ".." segment would be
 * resolved away by libcurl, and the object written outside the bucket.
 */
static bool
check_s3_prefix(char **newval, void **extra, GucSource source)
{
	const char *p = *newval;

	if (p == NULL)
		return true;
	if (p[0] == '/')
	{
		GUC_check_errdetail("trace.s3_prefix must not start with \"/\".");
		return false;
	}
	while (*p)
	{
		size_t		seg = strcspn(p, "/");

		if ((seg == 1 && p[0] == '.') || (seg == 2 && p[0] == '.' && p[1] == '.'))
		{
			GUC_check_errdetail("trace.s3_prefix must not contain \".\" or \"..\" path segments.");
			return false;
		}
		p += seg;
		if (*p == '/')
			p++;
	}
	for (p = *newval; *p; p++)
	{
		if ((unsigned char) *p < ' ' || *p == 0x7f)
		{
			GUC_check_errdetail("trace.s3_prefix must not contain control characters.");
			return false;
		}
	}
	return true;
}

/*
 * The region ends up in libcurl's "aws:amz:<region>:s3" signer string, so
 * a ':' would change what is signed: letters, digits, '-' and '_' only.
 */
static bool
check_s3_region(char **newval, void **extra, GucSource source)
{
	const char *p = *newval;

	if (p == NULL || p[0] == '\0')
	{
		GUC_check_errdetail("trace.s3_region must not be empty.");
		return false;
	}
	for (; *p; p++)
	{
		if (!(isalnum((unsigned char) *p) || *p == '-' || *p == '_'))
		{
			GUC_check_errdetail("trace.s3_region must be a region name (letters, digits, '-', '_').");
			return false;
		}
	}
	return true;
}

/*
 * A bucket is one path segment: S3's naming rules (letters, digits, '.',
 * '-', '_'; starting and ending with a letter or digit), so that it can
 * be neither "..", nor contain '/', '?' or '#'.
 */
static bool
check_s3_bucket(char **newval, void **extra, GucSource source)
{
	const char *b = *newval;
	size_t		len;

	if (b == NULL || b[0] == '\0')
		return true;
	len = strlen(b);
	for (const char *p = b; *p; p++)
	{
		if (!(isalnum((unsigned char) *p) || *p == '.' || *p == '-' || *p == '_'))
		{
			GUC_check_errdetail("trace.s3_bucket must be a bucket name (letters, digits, '.', '-', '_').");
			return false;
		}
	}
	if (!isalnum((unsigned char) b[0]) || !isalnum((unsigned char) b[len - 1]))
	{
		GUC_check_errdetail("trace.s3_bucket must start and end with a letter or digit.");
		return false;
	}
	return true;
}

static void
file_define_gucs(void)
{
	DefineCustomStringVariable("trace.file_export_type",
							   gettext_noop("File export target: local or s3."),
							   NULL, &export_type, "local", PGC_SIGHUP, 0,
							   check_file_export_type, NULL, NULL);
	DefineCustomStringVariable("trace.file_export_dir",
							   gettext_noop("Directory of the local JSON Lines export."),
							   NULL, &export_dir, "", PGC_SIGHUP, 0,
							   check_file_export_dir, NULL, NULL);
	DefineCustomStringVariable("trace.s3_endpoint",
							   gettext_noop("S3-compatible endpoint (path-style)."),
							   NULL, &s3_endpoint, "https://s3.amazonaws.com", PGC_SIGHUP, 0,
							   check_s3_endpoint, NULL, NULL);
	DefineCustomStringVariable("trace.s3_region",
							   gettext_noop("S3 region used in the signature."),
							   NULL, &s3_region, "us-east-1", PGC_SIGHUP, 0,
							   check_s3_region, NULL, NULL);
	DefineCustomStringVariable("trace.s3_bucket",
							   gettext_noop("S3 bucket of the export."),
							   NULL, &s3_bucket, "", PGC_SIGHUP, 0,
							   check_s3_bucket, NULL, NULL);
	DefineCustomStringVariable("trace.s3_prefix",
							   gettext_noop("Key prefix of the S3 export."),
							   NULL, &s3_prefix, "traces/", PGC_SIGHUP, 0,
							   check_s3_prefix, NULL, NULL);
	trace_define_secret("s3_access_key_id", gettext_noop("S3 access key id."));
	trace_define_secret("s3_secret_access_key", gettext_noop("S3 secret access key."));
}

/* Append one line and fsync it; the new file's directory entry too. */
static void
append_line(const char *path, const char *dir, const char *payload, TraceItem *item)
{
	size_t		len = strlen(payload);
	char	   *line = palloc(len + 1);
	bool		created = false;
	int			fd;
	ssize_t		written;

	memcpy(line, payload, len);
	line[len] = '\n';

	fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_EXCL, 0640);
	if (fd >= 0)
		created = true;
	else if (errno == EEXIST)
		fd = open(path, O_WRONLY | O_APPEND, 0);
	if (fd < 0)
	{
		trace_outcome_fail(&item->out, TRACE_REASON_IO, "could not open \"%s\": %m", path);
		return;
	}
	written = write(fd, line, len + 1);
	if (written != (ssize_t) (len + 1))
	{
		if (written >= 0)
			errno = ENOSPC;
		trace_outcome_fail(&item->out, TRACE_REASON_IO, "could not write \"%s\": %m", path);
		close(fd);
		return;
	}
	if (fsync(fd) != 0)
	{
		trace_outcome_fail(&item->out, TRACE_REASON_IO, "could not fsync \"%s\": %m", path);
		close(fd);
		return;
	}
	close(fd);

	if (created)
	{
		int			dfd = open(dir, O_RDONLY);

		if (dfd >= 0)
		{
			(void) fsync(dfd);
			close(dfd);
		}
	}
	trace_outcome_delivered(&item->out, 0);
}

static TracePrep
export_local(TraceItem *item)
{
	const char *dir = export_dir;
	time_t		now = time(NULL);
	struct tm	tm;
	char	   *path;
	instr_time	start,
				elapsed;

	if (dir == NULL || dir[0] == '\0')
	{
		trace_outcome_fail(&item->out, TRACE_REASON_CONFIG,
						   "trace.file_export_dir is not set");
		return TRACE_PREP_DONE;
	}
	gmtime_r(&now, &tm);
	path = psprintf("%s/traces-%04d-%02d-%02d.jsonl", dir,
					tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday);

	INSTR_TIME_SET_CURRENT(start);
	append_line(path, dir, item->payload, item);
	INSTR_TIME_SET_CURRENT(elapsed);
	INSTR_TIME_SUBTRACT(elapsed, start);
	item->out.posted = true;
	item->out.seconds = INSTR_TIME_GET_DOUBLE(elapsed);
	return TRACE_PREP_DONE;
}

/* Lower-case hex SHA-256 of the body, for x-amz-content-sha256. */
static char *
sha256_hex(const char *data, size_t len)
{
	pg_cryptohash_ctx *ctx = pg_cryptohash_create(PG_SHA256);
	uint8		digest[PG_SHA256_DIGEST_LENGTH];
	char	   *hex = palloc(PG_SHA256_DIGEST_LENGTH * 2 + 1);

	if (ctx == NULL || pg_cryptohash_init(ctx) < 0 ||
		pg_cryptohash_update(ctx, (const uint8 *) data, len) < 0 ||
		pg_cryptohash_final(ctx, digest, sizeof(digest)) < 0)
	{
		pg_cryptohash_free(ctx);
		return NULL;
	}
	pg_cryptohash_free(ctx);
	for (int i = 0; i < PG_SHA256_DIGEST_LENGTH; i++)
		sprintf(hex + 2 * i, "%02x", digest[i]);
	return hex;
}

/* URI-encode an object key as SigV4 wants it: keep unreserved and '/'. */
static void
append_key_encoded(StringInfo buf, const char *key)
{
	for (const unsigned char *p = (const unsigned char *) key; *p; p++)
	{
		if (isalnum(*p) || *p == '-' || *p == '_' || *p == '.' || *p == '~' || *p == '/')
			appendStringInfoChar(buf, *p);
		else
			appendStringInfo(buf, "%%%02X", *p);
	}
}

static TracePrep
export_s3(TraceItem *item, TraceRequest *req)
{
	const char *key_id = trace_secret("s3_access_key_id");
	const char *secret = trace_secret("s3_secret_access_key");
	struct pg_tm tm;
	fsec_t		fsec;
	StringInfoData url;
	char	   *key;
	char	   *digest;
	size_t		endlen;

	if (!trace_target_url(s3_endpoint, "trace.s3_endpoint", item))
		return TRACE_PREP_DONE;
	if (s3_bucket == NULL || s3_bucket[0] == '\0')
	{
		trace_outcome_fail(&item->out, TRACE_REASON_CONFIG, "trace.s3_bucket is not set");
		return TRACE_PREP_DONE;
	}
	if (key_id[0] == '\0' || secret[0] == '\0')
	{
		trace_outcome_fail(&item->out, TRACE_REASON_CONFIG,
						   "trace.s3_access_key_id and trace.s3_secret_access_key must be set");
		return TRACE_PREP_DONE;
	}
	if (timestamp2tm(item->created_at, NULL, &tm, &fsec, NULL, NULL) != 0)
	{
		trace_outcome_fail(&item->out, TRACE_REASON_OTHER, "queue row has an invalid created_at");
		return TRACE_PREP_DONE;
	}

	key = psprintf("%s%04d/%02d/%02d/" INT64_FORMAT ".json", s3_prefix,
				   tm.tm_year, tm.tm_mon, tm.tm_mday, item->trade_id);
	initStringInfo(&url);
	endlen = strlen(s3_endpoint);
	while (endlen > 0 && s3_endpoint[endlen - 1] == '/')
		endlen--;
	appendBinaryStringInfo(&url, s3_endpoint, endlen);
	appendStringInfoChar(&url, '/');
	append_key_encoded(&url, s3_bucket);
	appendStringInfoChar(&url, '/');
	append_key_encoded(&url, key);

	req->url = url.data;
	req->method = "PUT";
	req->body = item->payload;
	req->body_len = strlen(item->payload);
	req->aws_sigv4 = psprintf("aws:amz:%s:s3", s3_region);
	req->userpwd = psprintf("%s:%s", key_id, secret);
	req->headers = trace_common_headers(item);
	digest = sha256_hex(req->body, req->body_len);
	if (digest == NULL ||
		!trace_add_header(&req->headers, "x-amz-content-sha256", digest, item,
						  "x-amz-content-sha256"))
	{
		if (digest == NULL)
			trace_outcome_fail(&item->out, TRACE_REASON_OTHER, "could not hash the payload");
		curl_slist_free_all(req->headers);
		req->headers = NULL;
		return TRACE_PREP_DONE;
	}
	return TRACE_PREP_SEND;
}

static TracePrep
file_prepare(TraceItem *item, TraceRequest *req)
{
	if (strcmp(export_type, "s3") == 0)
		return export_s3(item, req);
	return export_local(item);
}

/*
 * S3 explains a refusal in <Code>...</Code>: keep it in last_error.  A code
 * is CamelCase letters, so anything but printable ASCII in it is shown as
 * '?' (trace_outcome_append keeps the whole text valid besides).
 */
static void
file_explain(TraceItem *item, const char *body)
{
	const char *start = strstr(body, "<Code>");
	const char *end;
	char		code[65];
	int			len;

	if (start == NULL || (end = strstr(start, "</Code>")) == NULL)
		return;
	start += 6;
	len = end - start;
	if (len > 64)
		return;
	for (int i = 0; i < len; i++)
		code[i] = (start[i] >= 0x20 && start[i] < 0x7f) ? start[i] : '?';
	code[len] = '\0';
	trace_outcome_append(&item->out, " (%s)", code);
}

const TraceAdapter trace_file_adapter = {
	.name = "file",
	.define_gucs = file_define_gucs,
	.prepare = file_prepare,
	.explain = file_explain,
};
