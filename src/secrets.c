/*
 * secrets.c: where the secret values come from, and keeping them out of
 * the server log.
 *
 * A secret (tracker token, signing secret, S3 keys) is read from
 * trace.secrets_file when that file names it, else from its GUC.  The file
 * must be a regular file owned by the server's OS user with no access for
 * group or others; anything looser is refused.  The emit_log_hook
 * installed here rewrites any log line that would show a secret: the
 * "parameter ... changed to ..." lines of a reload, and any line that
 * contains a known secret value.  Nothing here may ever log a value.
 */
#include "postgres.h"

#include <sys/stat.h>
#include <unistd.h>

#include "lib/stringinfo.h"
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

static SecretDef secrets[] = {
	{"myfxbook_webhook_token", "Bearer token of the myfxbook adapter."},
	{"webhook_auth_token", "Value of the webhook auth header."},
	{"webhook_signing_secret", "Standard Webhooks signing secret."},
	{"s3_access_key_id", "S3 access key id."},
	{"s3_secret_access_key", "S3 secret access key."},
};

#define NUM_SECRETS lengthof(secrets)
#define REDACTED "********"

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
		elog(ERROR, "trace_ext: unknown secret");
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

/* One assign hook per secret: PostgreSQL does not say which is assigned. */
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

static GucStringAssignHook const assign_hooks[NUM_SECRETS] = {
	assign_secret_0, assign_secret_1, assign_secret_2, assign_secret_3,
	assign_secret_4
};

void
trace_define_secret_gucs(void)
{
	for (int i = 0; i < NUM_SECRETS; i++)
	{
		char		name[64];

		snprintf(name, sizeof(name), "trace.%s", secrets[i].name);
		DefineCustomStringVariable(pstrdup(name), secrets[i].desc, NULL,
								   &secrets[i].masked, "", PGC_SIGHUP,
								   GUC_SUPERUSER_ONLY, check_secret,
								   assign_hooks[i], NULL);
	}
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
				(errmsg("trace_ext: refusing secrets file \"%s\": %s", path, why),
				 errhint("chown the file to the server's OS user and chmod it 0600.")));
		return;
	}

	f = fopen(path, "r");
	if (f == NULL)
	{
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("trace_ext: could not open secrets file \"%s\": %m", path)));
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
					(errmsg("trace_ext: secrets file \"%s\", line %d: expected \"name = value\"",
							path, lineno)));
			continue;
		}
		*eq = '\0';
		value = trim(eq + 1);
		name = trim(name);
		s = find_secret(name);
		if (s == NULL)
		{
			ereport(WARNING,
					(errmsg("trace_ext: secrets file \"%s\", line %d: \"%s\" is not a secret parameter of trace_ext",
							path, lineno, name)));
			continue;
		}
		if (s->from_file)
			free(s->from_file);
		s->from_file = strdup(value);
	}
	fclose(f);
}

/*
 * Replace every quoted segment ("..." or '...') except the parameter's own
 * name by ********: used on lines that name a secret parameter, such as
 * PostgreSQL's "parameter "x" changed to "y"" or a logged ALTER SYSTEM.
 */
static char *
redact_quoted(const char *msg, const char *param)
{
	StringInfoData out;
	const char *p = msg;

	initStringInfo(&out);
	while (*p)
	{
		const char *close;

		if ((*p != '"' && *p != '\'') || (close = strchr(p + 1, *p)) == NULL)
		{
			appendStringInfoChar(&out, *p++);
			continue;
		}
		if (close == p + 1 ||	/* an empty value says nothing */
			((size_t) (close - p - 1) == strlen(param) &&
			 strncmp(p + 1, param, close - p - 1) == 0))
			appendBinaryStringInfo(&out, p, close - p + 1);
		else
		{
			appendStringInfoChar(&out, *p);
			appendStringInfoString(&out, REDACTED);
			appendStringInfoChar(&out, *p);
		}
		p = close + 1;
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

static void
redact_log(ErrorData *edata)
{
	if (edata->message)
	{
		for (int i = 0; i < NUM_SECRETS; i++)
		{
			char		param[64];

			snprintf(param, sizeof(param), "trace.%s", secrets[i].name);
			if (strstr(edata->message, param) != NULL)
				edata->message = redact_quoted(edata->message, param);
		}
	}
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
