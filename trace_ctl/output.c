/*
 * output.c: the small formatting helpers of trace_ctl: JSON strings and
 * keys, aligned text tables for a terminal, and durations a person reads
 * at a glance ("41s", "1h02m").
 *
 * Nothing here talks to the server.  Text that comes from it (a tracker's
 * last error, a notification payload) may hold any character: JSON output
 * escapes it, and text output replaces control characters, so that one
 * record stays on one line.
 */
#include "postgres_fe.h"

#include "trace_ctl.h"

/* Append s as a JSON string (RFC 8259 escapes), or null for NULL. */
void
json_string(PQExpBuffer buf, const char *s)
{
	const unsigned char *p;

	if (s == NULL)
	{
		appendPQExpBufferStr(buf, "null");
		return;
	}
	appendPQExpBufferChar(buf, '"');
	for (p = (const unsigned char *) s; *p; p++)
	{
		switch (*p)
		{
			case '"':
				appendPQExpBufferStr(buf, "\\\"");
				break;
			case '\\':
				appendPQExpBufferStr(buf, "\\\\");
				break;
			case '\n':
				appendPQExpBufferStr(buf, "\\n");
				break;
			case '\r':
				appendPQExpBufferStr(buf, "\\r");
				break;
			case '\t':
				appendPQExpBufferStr(buf, "\\t");
				break;
			case '\b':
				appendPQExpBufferStr(buf, "\\b");
				break;
			case '\f':
				appendPQExpBufferStr(buf, "\\f");
				break;
			default:
				if (*p < 0x20 || *p == 0x7f)
					appendPQExpBuffer(buf, "\\u%04x", *p);
				else
					appendPQExpBufferChar(buf, (char) *p);
				break;
		}
	}
	appendPQExpBufferChar(buf, '"');
}

/* Append a key of an object, after a comma unless it is the first. */
void
json_key(PQExpBuffer buf, bool *first, const char *key)
{
	if (!*first)
		appendPQExpBufferChar(buf, ',');
	*first = false;
	json_string(buf, key);
	appendPQExpBufferChar(buf, ':');
}

/*
 * Append an integer the server sent as text, or null.  Anything but an
 * optionally signed run of digits (which a bigint column always is)
 * becomes null rather than invalid JSON.
 */
void
json_number_or_null(PQExpBuffer buf, const char *digits)
{
	const char *p = digits;

	if (p == NULL || *p == '\0')
	{
		appendPQExpBufferStr(buf, "null");
		return;
	}
	if (*p == '-')
		p++;
	if (*p == '\0' || strspn(p, "0123456789") != strlen(p))
	{
		appendPQExpBufferStr(buf, "null");
		return;
	}
	appendPQExpBufferStr(buf, digits);
}

/* "41s", "4m10s", "2h03m", "3d04h": two units at most. */
char *
format_duration(int64 seconds)
{
	if (seconds < 0)
		seconds = -seconds;
	if (seconds < 60)
		return psprintf("%ds", (int) seconds);
	if (seconds < 3600)
		return psprintf("%dm%02ds", (int) (seconds / 60), (int) (seconds % 60));
	if (seconds < 86400)
		return psprintf("%dh%02dm", (int) (seconds / 3600), (int) (seconds % 3600 / 60));
	return psprintf("%lldd%02dh", (long long) (seconds / 86400),
					(int) (seconds % 86400 / 3600));
}

/*
 * A moment given as seconds before now (the server's now(); negative: in
 * the future) as "41s ago" or "in 4m10s"; "" for NULL.
 */
char *
format_relative(const char *seconds_ago)
{
	long long	s;
	char	   *d;
	char	   *out;

	if (seconds_ago == NULL || seconds_ago[0] == '\0')
		return pg_strdup("");
	s = strtoll(seconds_ago, NULL, 10);
	d = format_duration(s);
	if (s >= 0)
		out = psprintf("%s ago", d);
	else
		out = psprintf("in %s", d);
	pg_free(d);
	return out;
}

/* A copy of s with control characters (newlines included) as spaces. */
char *
one_line(const char *s)
{
	char	   *out;
	unsigned char *p;

	out = pg_strdup(s ? s : "");
	for (p = (unsigned char *) out; *p; p++)
	{
		if (*p < 0x20 || *p == 0x7f)
			*p = ' ';
	}
	return out;
}

/* Display width of UTF-8 text: one column per character. */
static int
display_width(const char *s)
{
	int			w = 0;

	for (; *s; s++)
	{
		if ((*s & 0xC0) != 0x80)
			w++;
	}
	return w;
}

void
table_init(TextTable *t, int ncols, const char *const *headers,
		   const char *align)
{
	t->ncols = ncols;
	t->headers = headers;
	t->align = align;
	t->nrows = 0;
	t->maxrows = 0;
	t->cells = NULL;
}

/* Add a row: cells is ncols allocated strings, which the table now owns. */
void
table_add_row(TextTable *t, char **cells)
{
	int			i;

	if (t->nrows == t->maxrows)
	{
		t->maxrows = (t->maxrows == 0) ? 8 : t->maxrows * 2;
		t->cells = pg_realloc(t->cells, sizeof(char *) * t->maxrows * t->ncols);
	}
	for (i = 0; i < t->ncols; i++)
		t->cells[t->nrows * t->ncols + i] = cells[i];
	t->nrows++;
}

static void
print_cell(FILE *out, const char *s, int width, char align, bool last)
{
	int			pad = width - display_width(s);

	if (align == 'r')
		fprintf(out, "%*s%s", pad, "", s);
	else if (last)
		fputs(s, out);			/* no trailing blanks */
	else
		fprintf(out, "%s%*s", s, pad, "");
}

/* psql's aligned format: " a | b ", a rule of dashes under the header. */
void
table_print(const TextTable *t, FILE *out)
{
	int		   *width = pg_malloc0(sizeof(int) * t->ncols);
	int			r;
	int			c;

	for (c = 0; c < t->ncols; c++)
	{
		width[c] = display_width(t->headers[c]);
		for (r = 0; r < t->nrows; r++)
			width[c] = Max(width[c], display_width(t->cells[r * t->ncols + c]));
	}
	for (c = 0; c < t->ncols; c++)
	{
		int			pad = width[c] - display_width(t->headers[c]);

		/* headers centred, as psql does */
		fputs(c ? " | " : " ", out);
		fprintf(out, "%*s%s", pad / 2, "", t->headers[c]);
		if (c < t->ncols - 1)
			fprintf(out, "%*s", pad - pad / 2, "");
	}
	fputc('\n', out);
	for (c = 0; c < t->ncols; c++)
	{
		int			i;

		if (c)
			fputc('+', out);
		for (i = 0; i < width[c] + 2; i++)
			fputc('-', out);
	}
	fputc('\n', out);
	for (r = 0; r < t->nrows; r++)
	{
		for (c = 0; c < t->ncols; c++)
		{
			bool		last = (c == t->ncols - 1);

			fputs(c ? " | " : " ", out);
			print_cell(out, t->cells[r * t->ncols + c], width[c], t->align[c],
					   last && t->align[c] != 'r');
		}
		fputc('\n', out);
	}
	pg_free(width);
}

void
table_free(TextTable *t)
{
	int			i;

	for (i = 0; i < t->nrows * t->ncols; i++)
		pg_free(t->cells[i]);
	pg_free(t->cells);
	t->cells = NULL;
	t->nrows = t->maxrows = 0;
}
