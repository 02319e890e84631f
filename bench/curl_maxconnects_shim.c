/*
 * curl_maxconnects_shim.c: a diagnostic for the benchmarks, never for
 * production.  Preloaded into the server (LD_PRELOAD), it wraps libcurl's
 * curl_multi_init() and sets CURLMOPT_MAXCONNECTS on the new multi handle
 * to $BENCH_CURL_MAXCONNECTS, so that a benchmark can show what the size of
 * libcurl's connection cache does to a worker without changing trace_ext.
 *
 * Why: without CURLMOPT_MAXCONNECTS, libcurl keeps at most 4 x (the easy
 * handles currently added to the multi handle) idle connections, and
 * closes the oldest beyond that whenever a transfer ends.  The worker
 * removes each handle as soon as its transfer ends, so whenever the
 * requests in flight drop below a quarter of the open connections, kept
 * alive connections are closed, and the next claim has to open (and for
 * HTTPS, handshake) new ones.
 *
 * Built by benchlib.curl_maxconnects_env() with cc -shared -fPIC.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>

#include <curl/curl.h>

CURLM *
curl_multi_init(void)
{
	static CURLM *(*real_init) (void) = NULL;
	const char *value = getenv("BENCH_CURL_MAXCONNECTS");
	CURLM	   *multi;

	if (real_init == NULL)
		real_init = (CURLM *(*) (void)) dlsym(RTLD_NEXT, "curl_multi_init");
	if (real_init == NULL)
		return NULL;
	multi = real_init();
	if (multi != NULL && value != NULL && value[0] != '\0')
		curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, atol(value));
	return multi;
}
