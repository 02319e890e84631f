// slow_sink.js: a tracker far away, on loopback.  An HTTP/1.1 server that
// reads each request's body and answers 200 "ok" a fixed delay later, with
// keep-alive, and counts what it saw: requests, connections opened, who
// closed each connection (the client's FIN first, or an error), the most
// connections open at once, and per second the requests answered and the
// connections opened and closed.  Also a load generator, to measure what the sink
// itself can serve.  Only node's http module; binds 127.0.0.1 only.
//
//   node slow_sink.js serve --delay-ms 100 [--port 0] [--backlog 511]
//       prints {"port": P} once listening; on SIGTERM or SIGINT prints its
//       counters as one JSON line and exits.
//   node slow_sink.js load --url URL [--concurrency 1000] [--n 20000] [--body-bytes 700]
//       keep-alive client with `concurrency` requests in flight; prints
//       {"n", "seconds", "rps", "errors", "not_200"}.
//
// Used by bench/far_tracker.py; a benchmark helper, it asserts nothing.
'use strict';

const http = require('http');

function option(name, dflt) {
    const i = process.argv.indexOf('--' + name);
    return i > 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt;
}

function serve() {
    const delay = Number(option('delay-ms', '100'));
    const backlog = Number(option('backlog', '511'));   // node's default
    const t0 = Date.now();
    const second = () => Math.floor((Date.now() - t0) / 1000);
    const bump = (arr, i) => { while (arr.length <= i) arr.push(0); arr[i]++; };
    const stats = {
        t0_ms: t0, delay_ms: delay, backlog: backlog, requests: 0, connections: 0,
        open: 0, peak_open: 0, in_progress: 0, peak_in_progress: 0,
        closed_by_client: 0, closed_by_sink: 0, closed_with_error: 0,
        answered_per_second: [], opened_per_second: [], closed_per_second: [],
    };

    const server = http.createServer((req, res) => {
        stats.requests++;
        stats.in_progress++;
        stats.peak_in_progress = Math.max(stats.peak_in_progress, stats.in_progress);
        req.resume();
        req.on('end', () => setTimeout(() => {
            res.writeHead(200, {'Content-Type': 'text/plain', 'Content-Length': 3});
            res.end('ok\n');
            stats.in_progress--;
            bump(stats.answered_per_second, second());
        }, delay));
    });
    server.keepAliveTimeout = 120000;
    server.headersTimeout = 130000;
    server.requestTimeout = 0;
    server.maxRequestsPerSocket = 0;
    server.on('connection', (sock) => {
        let clientEnded = false;
        let failed = false;
        stats.connections++;
        stats.open++;
        stats.peak_open = Math.max(stats.peak_open, stats.open);
        bump(stats.opened_per_second, second());
        sock.on('end', () => { clientEnded = true; });
        sock.on('error', () => { failed = true; });
        sock.on('close', () => {
            stats.open--;
            bump(stats.closed_per_second, second());
            if (failed)
                stats.closed_with_error++;
            else if (clientEnded)
                stats.closed_by_client++;
            else
                stats.closed_by_sink++;
        });
    });
    const finish = () => {
        process.stdout.write(JSON.stringify(stats) + '\n', () => process.exit(0));
    };
    process.on('SIGTERM', finish);
    process.on('SIGINT', finish);
    server.listen({port: Number(option('port', '0')), host: '127.0.0.1', backlog: backlog},
        () => process.stdout.write(JSON.stringify({port: server.address().port}) + '\n'));
}

function load() {
    const url = new URL(option('url'));
    const concurrency = Number(option('concurrency', '1000'));
    const n = Number(option('n', '20000'));
    const body = Buffer.alloc(Number(option('body-bytes', '700')), 'x');
    const agent = new http.Agent({keepAlive: true, maxSockets: concurrency});
    let started = 0, done = 0, errors = 0, not200 = 0;
    const t0 = process.hrtime.bigint();

    const next = () => {
        if (started >= n)
            return;
        started++;
        const req = http.request({
            host: url.hostname, port: url.port, path: url.pathname, method: 'POST',
            agent: agent, headers: {'Content-Type': 'application/json',
                                    'Content-Length': body.length},
        }, (res) => {
            if (res.statusCode !== 200)
                not200++;
            res.resume();
            res.on('end', ended);
        });
        req.on('error', () => { errors++; ended(); });
        req.end(body);
    };
    const ended = () => {
        done++;
        if (done === n) {
            const s = Number(process.hrtime.bigint() - t0) / 1e9;
            process.stdout.write(JSON.stringify({n: n, seconds: s, rps: n / s, errors: errors,
                                                 not_200: not200}) + '\n',
                                 () => process.exit(0));
        } else
            next();
    };
    for (let i = 0; i < Math.min(concurrency, n); i++)
        next();
}

if (process.argv[2] === 'serve')
    serve();
else if (process.argv[2] === 'load')
    load();
else {
    process.stderr.write('usage: node slow_sink.js serve|load [options]\n');
    process.exit(2);
}
