/*
 * secrets.c: where the secret values come from, and keeping them out of
 * the server log.
 *
 * A secret (tracker token, signing secret, S3 keys) is read from
 * trace.secrets_file when that file names it, else from its GUC.  The file
 * must be a regular file owned by the server's OS user with no access for
 * group or others; anything looser is refused.  The emit_log_hook
 * installed here rewrites any log line that would show a secret: the
 * "parameter ... changed to ..." lines of a reload, a logged statement
 * that names a secret parameter (however it is spelt or quoted), and any
 * line that contains a known secret value; and it hides the STATEMENT:
 * line of such a statement.  Nothing here may ever log a value, nor any
 * part of a line of the secrets file.
 */
#include "postgres.h"

#include <ctype.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lib/stringinfo.h"
#include "tcop/tcopprot.h"
#include "utils/elog.h"
#include "utils/guc.h"
#include "utils/memutils.h"

#include "src/trace_ext.h"

typedef struct SecretDef
{
	const char *name;			/* without the "trace." prefix */
	const char *desc;
	char	   *masked;			/* the GUC variable: "********" or "" */
	const char *value;			/* the real value (the GUC's extra) */
	char	   *from_file;		/* malloc'd value from the secrets file */
} SecretDef;

/* The secret parameters the adapters defined (trace_define_secret). */
#define MAX_SECRETS		16
static SecretDef secrets[MAX_SECRETS];
static int	nsecrets = 0;

#define NUM_SECRETS nsecrets
#define REDACTED "********"
#define STATEMENT_NOT_LOGGED "<a statement naming a secret parameter of trace_ext, not logged>"

static emit_log_hook_type prev_emit_log_hook = NULL;

static SecretDef *
find_secret(const char *name)
{
	if (strncmp(name, "trace.", 6) == 0)
		name += 6;
	for (int i = 0; i < NUM_SECRETS; i++)
		if (strcmp(secrets[i].name, name) == 0)
			return &secrets[i];
	return NULL;
}

/* The effective value of a secret: the file's, else the GUC's. */
const char *
trace_secret(const char *name)
{
	SecretDef  *s = find_secret(name);

	if (s == NULL)
		elog(ERROR, "unknown secret parameter");
	if (s->from_file != NULL)
		return s->from_file;
	return s->value ? s->value : "";
}

/*
 * A secret parameter's check hook: keep the real value aside (as the
 * setting's "extra", which PostgreSQL carries along with the value through
 * SET, RESET and reloads) and store "********" as the value itself, so that
 * no view shows it: not SHOW, not pg_settings.setting, not reset_val.
 * It never fails: PostgreSQL would print the rejected value.
 */
static bool
check_secret(char **newval, void **extra, GucSource source)
{
	const char *value = *newval ? *newval : "";
	char	   *real = strdup(value);

	if (real == NULL)
		return false;
	if (value[0] != '\0' && strcmp(value, REDACTED) != 0)
	{
		char	   *masked = strdup(REDACTED);

		if (masked == NULL)
		{
			free(real);
			return false;
		}
		free(*newval);
		*newval = masked;
	}
	*extra = real;
	return true;
}

/*
 * One assign hook per secret: PostgreSQL does not say which is assigned.
 * ASSIGN_SECRET(i) is the hook of secrets[i].
 */
#define ASSIGN_SECRET(i) \
static void \
assign_secret_##i(const char *newval, void *extra) \
{ \
	secrets[i].value = extra; \
}
ASSIGN_SECRET(0)
ASSIGN_SECRET(1)
ASSIGN_SECRET(2)
ASSIGN_SECRET(3)
ASSIGN_SECRET(4)
ASSIGN_SECRET(5)
ASSIGN_SECRET(6)
ASSIGN_SECRET(7)
ASSIGN_SECRET(8)
ASSIGN_SECRET(9)
ASSIGN_SECRET(10)
ASSIGN_SECRET(11)
ASSIGN_SECRET(12)
ASSIGN_SECRET(13)
ASSIGN_SECRET(14)
ASSIGN_SECRET(15)

static GucStringAssignHook const assign_hooks[MAX_SECRETS] = {
	assign_secret_0, assign_secret_1, assign_secret_2, assign_secret_3,
	assign_secret_4, assign_secret_5, assign_secret_6, assign_secret_7,
	assign_secret_8, assign_secret_9, assign_secret_10, assign_secret_11,
	assign_secret_12, assign_secret_13, assign_secret_14, assign_secret_15
};

/*
 * Define the secret parameter trace.<name> (an adapter's token or key):
 * superuser-only, shown as ******** when set, its value kept out of the
 * log, and settable from trace.secrets_file by its bare name.
 */
void
trace_define_secret(const char *name, const char *desc)
{
	SecretDef  *s;

	if (nsecrets == MAX_SECRETS)
		elog(ERROR, "too many secret parameters (raise MAX_SECRETS)");
	s = &secrets[nsecrets];
	s->name = name;
	s->desc = desc;
	DefineCustomStringVariable(psprintf("trace.%s", name), desc, NULL,
							   &s->masked, "", PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   check_secret, assign_hooks[nsecrets], NULL);
	nsecrets++;
}

/* "a, b and c": the names of the secret parameters, for messages. */
static char *
secret_names(void)
{
	StringInfoData buf;

	initStringInfo(&buf);
	for (int i = 0; i < nsecrets; i++)
	{
		if (i > 0)
			appendStringInfoString(&buf, i == nsecrets - 1 ? " and " : ", ");
		appendStringInfoString(&buf, secrets[i].name);
	}
	return buf.data;
}

static char *
trim(char *s)
{
	char	   *end;

	while (*s == ' ' || *s == '\t')
		s++;
	end = s + strlen(s);
	while (end > s && (end[-1] == ' ' || end[-1] == '\t' ||
					   end[-1] == '\n' || end[-1] == '\r'))
		*--end = '\0';
	if (end - s >= 2 && (s[0] == '"' || s[0] == '\'') && end[-1] == s[0])
	{
		end[-1] = '\0';
		s++;
	}
	return s;
}

static void
forget_file_values(void)
{
	for (int i = 0; i < NUM_SECRETS; i++)
	{
		if (secrets[i].from_file)
			free(secrets[i].from_file);
		secrets[i].from_file = NULL;
	}
}

/*
 * Is the file safe to read secrets from?  On refusal, *why says why
 * (never with any content of the file).
 */
bool
trace_secrets_file_safe(const char *path, const char **why)
{
	struct stat st;

	if (stat(path, &st) != 0)
	{
		*why = "it cannot be read";
		return false;
	}
	if (!S_ISREG(st.st_mode))
	{
		*why = "it is not a regular file";
		return false;
	}
	if (st.st_uid != geteuid())
	{
		*why = "it is not owned by the database server's OS user";
		return false;
	}
	if ((st.st_mode & (S_IRWXG | S_IRWXO)) != 0)
	{
		*why = "group or others have access to it (it must be mode 0600 or stricter)";
		return false;
	}
	return true;
}

/*
 * (Re)read trace.secrets_file.  Called by a worker at start and after each
 * reload, so that rotating the file takes effect on SIGHUP.
 */
void
trace_secrets_load(void)
{
	const char *path = trace_secrets_file;
	const char *why;
	FILE	   *f;
	char		line[4096];
	int			lineno = 0;

	forget_file_values();
	if (path == NULL || path[0] == '\0')
		return;

	if (!trace_secrets_file_safe(path, &why))
	{
		ereport(WARNING,
				(errmsg("refusing trace.secrets_file \"%s\": %s; its secrets are not used",
						path, why),
				 errhint("Make the file owned by the server's OS user, with mode 0600.")));
		return;
	}

	f = fopen(path, "r");
	if (f == NULL)
	{
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("could not open trace.secrets_file \"%s\": %m", path)));
		return;
	}
	while (fgets(line, sizeof(line), f) != NULL)
	{
		char	   *eq,
				   *name,
				   *value;
		SecretDef  *s;

		lineno++;
		name = trim(line);
		if (name[0] == '\0' || name[0] == '#')
			continue;
		eq = strchr(name, '=');
		if (eq == NULL)
		{
			ereport(WARNING,
					(errmsg("trace.secrets_file \"%s\", line %d: expected \"name = value\"",
							path, lineno)));
			continue;
		}
		*eq = '\0';
		value = trim(eq + 1);
		name = trim(name);
		s = find_secret(name);
		if (s == NULL)
		{
			/*
			 * The name is not shown: a line of the file may be a value (a
			 * base64 secret has '=' in it).
			 */
			ereport(WARNING,
					(errmsg("trace.secrets_file \"%s\", line %d: not the name of a secret parameter of trace_ext",
							path, lineno),
					 errhint("The names are %s.", secret_names())));
			continue;
		}
		if (s->from_file)
			free(s->from_file);
		s->from_file = strdup(value);
	}
	fclose(f);
}

/* Case-insensitive strstr (parameter names are case-insensitive in SQL). */
static const char *
find_ci(const char *hay, const char *needle)
{
	size_t		n = strlen(needle);

	for (; *hay; hay++)
		if (pg_strncasecmp(hay, needle, n) == 0)
			return hay;
	return NULL;
}

/*
 * Does a text name a secret parameter?  The bare name is enough: SQL may
 * spell it TRACE.Webhook_Auth_Token, "trace"."webhook_auth_token" or
 * trace . webhook_auth_token.
 */
static bool
names_secret(const char *text)
{
	if (text == NULL)
		return false;
	for (int i = 0; i < NUM_SECRETS; i++)
		if (find_ci(text, secrets[i].name) != NULL)
			return true;
	return false;
}

/* Is a quoted segment just the name of a secret parameter? */
static bool
is_secret_name(const char *p, size_t len)
{
	for (int i = 0; i < NUM_SECRETS; i++)
	{
		size_t		n = strlen(secrets[i].name);

		if ((len == n && pg_strncasecmp(p, secrets[i].name, n) == 0) ||
			(len == n + 6 && pg_strncasecmp(p, "trace.", 6) == 0 &&
			 pg_strncasecmp(p + 6, secrets[i].name, n) == 0))
			return true;
	}
	return false;
}

/*
 * Replace every quoted segment ("...", '...' or $tag$...$tag$) except a
 * secret parameter's own name by ********: used on lines that name a
 * secret parameter, such as PostgreSQL's "parameter "x" changed to "y"".
 */
static char *
redact_quoted(const char *msg)
{
	StringInfoData out;
	const char *p = msg;

	initStringInfo(&out);
	while (*p)
	{
		const char *open_end = p + 1;	/* first byte after the opening quote */
		size_t		qlen = 1;
		const char *close = NULL;

		if (*p == '"' || *p == '\'')
			close = strchr(p + 1, *p);
		else if (*p == '$')
		{
			const char *q = p + 1;

			while (*q && (isalnum((unsigned char) *q) || *q == '_'))
				q++;
			if (*q == '$')
			{
				char	   *tag = pnstrdup(p, q - p + 1);

				qlen = q - p + 1;
				open_end = q + 1;
				close = strstr(open_end, tag);
				pfree(tag);
			}
		}
		if (close == NULL)
		{
			appendStringInfoChar(&out, *p++);
			continue;
		}
		if (close == open_end ||	/* an empty value says nothing */
			is_secret_name(open_end, close - open_end))
			appendBinaryStringInfo(&out, p, close + qlen - p);
		else
		{
			appendBinaryStringInfo(&out, p, qlen);
			appendStringInfoString(&out, REDACTED);
			appendBinaryStringInfo(&out, p, qlen);
		}
		p = close + qlen;
	}
	return out.data;
}

/*
 * Log entries are recognised by what they are, not by their text, which
 * lc_messages may have translated ("Anweisung: ...", "оператор: ..."):
 * message_id is the untranslated format string PostgreSQL gave errmsg().
 */

/* Is this entry a logged statement (log_statement, log_min_duration_*)? */
static bool
is_statement_log(const ErrorData *edata)
{
	static const char *const kinds[] = {"statement: ", "duration: ", "execute ",
	"parse ", "bind "};
	const char *id = edata->message_id;

	if (id == NULL)
		return false;
	for (int k = 0; k < lengthof(kinds); k++)
		if (strncmp(id, kinds[k], strlen(kinds[k])) == 0)
			return true;
	return false;
}

/*
 * A logged statement that names a secret parameter: keep what comes
 * before the statement's text (in the server's language), drop the text,
 * whose value may be unquoted or spelt any way.
 */
static char *
redact_statement(const char *msg)
{
	const char *body = NULL;

	if (debug_query_string != NULL && debug_query_string[0] != '\0')
		body = strstr(msg, debug_query_string);
	if (body == NULL)
		return pstrdup(STATEMENT_NOT_LOGGED);
	return psprintf("%.*s%s", (int) (body - msg), msg, STATEMENT_NOT_LOGGED);
}

/* The qualified name of the first secret parameter a text names. */
static const char *
secret_named(const char *text)
{
	for (int i = 0; i < NUM_SECRETS; i++)
		if (find_ci(text, secrets[i].name) != NULL)
			return psprintf("trace.%s", secrets[i].name);
	return "trace.?";
}

/*
 * The conversions of a printf format, in order: their count, and the
 * index of the one holding the parameter's name (the %s right after
 * 'parameter "', else the first %s; -1 if none).
 */
/*
 * The conversion character of the printf conversion starting at p (a '%'
 * that is not "%%"), past its flags, width, precision and length; NULL if
 * the format ends first.
 */
static const char *
conversion_end(const char *p)
{
	for (p++; *p && strchr("-+ #0123456789.*hlLqjzt", *p) != NULL; p++)
		;
	return *p ? p : NULL;
}

static int
format_conversions(const char *fmt, int *name_at)
{
	int			n = 0;

	*name_at = -1;
	for (const char *p = fmt; *p; p++)
	{
		const char *end;

		if (*p != '%')
			continue;
		if (p[1] == '%')
		{
			p++;
			continue;
		}
		if ((end = conversion_end(p)) == NULL)
			break;
		if (*end == 's' && p - fmt >= 11 &&
			strncmp(p - 11, "parameter \"", 11) == 0)
			*name_at = n;
		else if (*end == 's' && *name_at < 0)
			*name_at = n;
		p = end;
		n++;
	}
	return n;
}

/*
 * Any other entry that names a secret parameter and may carry a value
 * ("parameter "%s" changed to "%s"", "invalid value for parameter "%s":
 * "%s"", ...): rebuilt from its untranslated format, the parameter's name
 * in place of its argument and ******** for every other one.  Translated
 * quotes (»...«, «...») cannot hide a value this way.  NULL when the
 * format has one argument at most, which is then the name ("parameter
 * "%s" cannot be changed now"): such a message holds no value and keeps
 * its language.
 */
static char *
rebuild_from_format(const char *fmt, const char *name)
{
	StringInfoData out;
	int			name_at;
	int			k = 0;

	if (format_conversions(fmt, &name_at) <= 1)
		return NULL;
	initStringInfo(&out);
	for (const char *p = fmt; *p; p++)
	{
		if (*p != '%')
		{
			appendStringInfoChar(&out, *p);
			continue;
		}
		if (p[1] == '%')
		{
			appendStringInfoChar(&out, '%');
			p++;
			continue;
		}
		if ((p = conversion_end(p)) == NULL)
			break;
		appendStringInfoString(&out, k++ == name_at ? name : REDACTED);
	}
	return out.data;
}

/* Replace every occurrence of a known secret value. */
static char *
redact_values(char *text)
{
	if (text == NULL)
		return NULL;
	for (int i = 0; i < NUM_SECRETS; i++)
	{
		const char *values[2] = {secrets[i].value, secrets[i].from_file};

		for (int v = 0; v < 2; v++)
		{
			const char *secret = values[v];
			size_t		len;
			char	   *hit;

			if (secret == NULL || (len = strlen(secret)) < 4)
				continue;
			while ((hit = strstr(text, secret)) != NULL)
			{
				StringInfoData out;

				initStringInfo(&out);
				appendBinaryStringInfo(&out, text, hit - text);
				appendStringInfoString(&out, REDACTED);
				appendStringInfoString(&out, hit + len);
				text = out.data;
			}
		}
	}
	return text;
}

/* Does a text contain the current value of a secret? */
static bool
holds_value(const char *text)
{
	if (text == NULL)
		return false;
	for (int i = 0; i < NUM_SECRETS; i++)
	{
		const char *values[2] = {secrets[i].value, secrets[i].from_file};

		for (int v = 0; v < 2; v++)
			if (values[v] != NULL && strlen(values[v]) >= 4 && strstr(text, values[v]) != NULL)
				return true;
	}
	return false;
}

static void
redact_log(ErrorData *edata)
{
	if (names_secret(edata->message))
	{
		if (is_statement_log(edata))
			edata->message = redact_statement(edata->message);
		else if (edata->message_id != NULL)
		{
			char	   *rebuilt = rebuild_from_format(edata->message_id,
													  secret_named(edata->message));

			if (rebuilt != NULL)
				edata->message = rebuilt;
		}
		else
			edata->message = redact_quoted(edata->message);
		/* "parameters: $1 = '...'" of a logged bind/execute */
		if (edata->detail_log)
			edata->detail_log = redact_quoted(edata->detail_log);
		if (edata->detail)
			edata->detail = redact_quoted(edata->detail);
	}
	if (names_secret(edata->context))
		edata->context = redact_quoted(edata->context);
	if (names_secret(edata->internalquery))
		edata->internalquery = redact_quoted(edata->internalquery);

	/*
	 * The STATEMENT: line is printed from the query string itself, which no
	 * hook can edit: leave it out for a statement that names a secret
	 * parameter or holds a secret's value.
	 */
	if (debug_query_string != NULL &&
		(names_secret(debug_query_string) || holds_value(debug_query_string)))
		edata->hide_stmt = true;

	edata->message = redact_values(edata->message);
	edata->detail = redact_values(edata->detail);
	edata->detail_log = redact_values(edata->detail_log);
	edata->context = redact_values(edata->context);
	edata->internalquery = redact_values(edata->internalquery);

	if (prev_emit_log_hook)
		prev_emit_log_hook(edata);
}

void
trace_install_log_redaction(void)
{
	prev_emit_log_hook = emit_log_hook;
	emit_log_hook = redact_log;
}
