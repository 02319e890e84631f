/*
 * http_load.c: the HTTP traffic of the deliveries, and nothing else, for
 * bench/steady_state.py --http-floor.  Never part of the extension.
 *
 * It POSTs a request shaped like a delivery (the same headers, a body of
 * the given size) to a loopback HTTP/1.1 server at a fixed rate, over a
 * fixed set of kept-alive connections, and prints how many requests were
 * answered.  It is as cheap an HTTP client as can be written: requests are
 * built once, sent with one write(), answers read with one read() and
 * parsed only as far as Content-Length; epoll, no library.  What it costs
 * the machine (its own CPU, the kernel's loopback TCP and the server's
 * work) is therefore a floor under what any worker sending one request per
 * delivery costs, whatever its HTTP client.
 *
 * Usage: http_load PORT PATH RATE SECONDS CONNECTIONS BODY_BYTES
 * Prints: "sent N answered N errors N seconds S"
 *
 * Built by bench/steady_state.py with cc -O2.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 4096
#define RESPONSE_BUF 8192

typedef struct Conn
{
	int			fd;
	int			busy;			/* a request is waiting for its answer */
	size_t		have;			/* bytes of the answer read so far */
	char		buf[RESPONSE_BUF];
} Conn;

static Conn conns[MAX_CONNS];
static char *request;
static size_t request_len;

static double
now_seconds(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The request, built once: the headers a delivery carries, and a body. */
static void
build_request(const char *path, int port, int body_bytes)
{
	char	   *body = malloc(body_bytes + 1);
	size_t		cap = body_bytes + 1024;

	memset(body, 'x', body_bytes);
	if (body_bytes >= 2)
	{
		body[0] = '{';
		body[body_bytes - 1] = '}';
	}
	body[body_bytes] = '\0';
	request = malloc(cap);
	request_len = snprintf(request, cap,
						   "POST %s HTTP/1.1\r\n"
						   "Host: 127.0.0.1:%d\r\n"
						   "Accept: */*\r\n"
						   "User-Agent: trace_ext/1.6\r\n"
						   "Content-Type: application/json\r\n"
						   "Idempotency-Key: 0123456789abcdef0123456789abcdef\r\n"
						   "Content-Length: %d\r\n"
						   "\r\n%s",
						   path, port, body_bytes, body);
	free(body);
}

static int
open_conn(int port)
{
	struct sockaddr_in addr;
	int			fd = socket(AF_INET, SOCK_STREAM, 0);
	int			one = 1;

	memset(&addr, 0, sizeof(addr));
	addr.sin_family = AF_INET;
	addr.sin_port = htons(port);
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd < 0 || connect(fd, (struct sockaddr *) &addr, sizeof(addr)) != 0)
	{
		perror("connect");
		exit(1);
	}
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	return fd;
}

/* Whether buf holds a whole answer: headers and Content-Length bytes. */
static int
answer_complete(Conn *c)
{
	char	   *end;
	char	   *cl;
	long		body = 0;

	c->buf[c->have] = '\0';
	end = strstr(c->buf, "\r\n\r\n");
	if (end == NULL)
		return 0;
	cl = strcasestr(c->buf, "\r\nContent-Length:");
	if (cl != NULL && cl < end)
		body = strtol(cl + 17, NULL, 10);
	return (size_t) (end + 4 - c->buf) + body <= c->have;
}

int
main(int argc, char **argv)
{
	int			port, nconns, ep, i;
	double		rate, seconds, start, elapsed;
	long		sent = 0, answered = 0, errors = 0;
	struct epoll_event events[MAX_CONNS];

	if (argc != 7)
	{
		fprintf(stderr, "usage: http_load PORT PATH RATE SECONDS CONNECTIONS BODY_BYTES\n");
		return 2;
	}
	port = atoi(argv[1]);
	rate = atof(argv[3]);
	seconds = atof(argv[4]);
	nconns = atoi(argv[5]);
	if (nconns < 1 || nconns > MAX_CONNS)
		nconns = 100;
	build_request(argv[2], port, atoi(argv[6]));

	ep = epoll_create1(0);
	for (i = 0; i < nconns; i++)
	{
		struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};

		conns[i].fd = open_conn(port);
		epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev);
	}

	start = now_seconds();
	while ((elapsed = now_seconds() - start) < seconds)
	{
		long		due = (long) (rate * elapsed) - sent;
		int			n;

		/* Send what the rate allows on idle connections. */
		for (i = 0; i < nconns && due > 0; i++)
		{
			if (conns[i].busy)
				continue;
			if (write(conns[i].fd, request, request_len) != (ssize_t) request_len)
			{
				errors++;
				continue;
			}
			conns[i].busy = 1;
			conns[i].have = 0;
			sent++;
			due--;
		}

		n = epoll_wait(ep, events, MAX_CONNS, 1);
		for (i = 0; i < n; i++)
		{
			Conn	   *c = &conns[events[i].data.u32];
			ssize_t		r = read(c->fd, c->buf + c->have, RESPONSE_BUF - 1 - c->have);

			if (r <= 0)
			{
				if (r < 0 && errno == EINTR)
					continue;
				fprintf(stderr, "http_load: connection closed by the server\n");
				return 1;
			}
			c->have += r;
			if (answer_complete(c))
			{
				c->busy = 0;
				answered++;
			}
		}
	}
	printf("sent %ld answered %ld errors %ld seconds %.3f\n",
		   sent, answered, errors, now_seconds() - start);
	return 0;
}
