/*
 * loadgen: a memcached text-protocol load generator for bench/run.py.
 *
 * One thread and one epoll loop drive N connections, each keeping D requests
 * in flight (pipelined: a connection refills its window once per read, so
 * requests go out in batches as a pipelining client sends them). Requests
 * are a get/set mix over a fixed key space; gets ask for K consecutive keys
 * ("get k1 ... kK"). The value of key i is derived from i, and sets write
 * exactly that value, so every reply can be checked: a set must answer
 * STORED; a get must return only keys it asked for, in order, flags 0, the
 * exact expected bytes, then END. A well-formed but wrong reply counts as an
 * error; a reply that cannot be parsed closes the connection and its
 * outstanding requests count as errors. Keys asked for but not returned
 * count as misses (the key space is populated first, so there should be
 * none).
 *
 * A run is: connect, warm up, measure, then stop sending and drain. Only
 * replies completed in the measure phase feed the throughput and the
 * latency histogram (queued-for-write to fully-parsed, log-linear buckets of
 * 1/64 octave: < 1.6% error). total_requests counts every reply of the run,
 * for the caller's CPU-per-request accounting around the whole process.
 *
 * --populate sets every key once (pipelined, checked) and exits.
 *
 * Output: one JSON object on stdout. Exit status 0, or 2 if the server could
 * not be reached (the JSON then holds "error").
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define KEY_PREFIX "bench:"
#define KEY_LEN 14 /* "bench:" and 8 digits */
#define MAX_LINE 1024
#define MAX_VALUE (1 << 20)
#define READ_CHUNK 65536
#define MAX_EVENTS 256

#define HIST_SUB_BITS 6
#define HIST_SUB (1u << HIST_SUB_BITS)
#define HIST_BUCKETS (HIST_SUB * 40)

struct config {
    const char *host;
    int port;
    int conns;
    int depth;
    int multiget;
    int value_size;
    unsigned keys;
    double get_ratio;
    double duration;
    double warmup;
    double drain_timeout;
    double connect_timeout;
    uint64_t seed;
    bool populate;
};

struct request {
    uint64_t start_ns;
    unsigned first_key; /* keys first_key .. first_key + nkeys - 1 (mod keys) */
    unsigned nkeys;     /* 0 for a set */
};

struct buffer {
    char *data;
    size_t len, off, cap;
};

struct conn {
    int fd;
    bool connected, closed, want_write;
    struct buffer in, out;
    struct request *window; /* ring of outstanding requests, oldest first */
    int head, inflight;
    /* progress through the oldest get's reply */
    unsigned reply_pos, reply_hits;
    bool reply_bad;
};

struct stats {
    uint64_t requests, errors, gets, sets, hits, misses;
    uint64_t hist[HIST_BUCKETS];
    uint64_t lat_sum_ns, lat_max_ns;
};

enum phase { CONNECTING, WARMUP, MEASURE, DRAIN, DONE };

struct run {
    struct config cfg;
    struct conn *conns;
    int epfd;
    enum phase phase;
    uint64_t measure_start, measure_end, drain_end;
    char *keys;   /* cfg.keys keys of KEY_LEN bytes */
    char *values; /* cfg.keys values of cfg.value_size bytes */
    uint64_t rng;
    unsigned next_populate;
    struct stats measured;
    uint64_t total_requests, total_errors, total_misses;
    uint64_t mismatches, error_lines, closed_conns, unanswered;
    uint64_t inflight;
};

/* What parsing the front of a connection's input found. */
enum parse_result { NEED_MORE, PROGRESS, REPLY_OK, REPLY_ERROR, DESYNC };

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("loadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static void fail_unreachable(const char *what)
{
    printf("{\"error\": \"%s: %s\"}\n", what, strerror(errno));
    exit(2);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t rng_next(uint64_t *s)
{
    /* xorshift64* */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545F4914F6CDD1DULL;
}

static double rng_unit(uint64_t *s)
{
    return (double)(rng_next(s) >> 11) / (double)(1ULL << 53);
}

/* ---- histogram ------------------------------------------------------- */

static unsigned hist_index(uint64_t v)
{
    if (v < 2 * HIST_SUB)
        return (unsigned)v;
    int shift = 63 - __builtin_clzll(v) - HIST_SUB_BITS;
    unsigned idx = (unsigned)(shift + 1) * HIST_SUB + (unsigned)(v >> shift) - HIST_SUB;
    return idx < HIST_BUCKETS ? idx : HIST_BUCKETS - 1;
}

static double hist_midpoint(unsigned idx)
{
    if (idx < 2 * HIST_SUB)
        return idx;
    unsigned shift = idx / HIST_SUB - 1;
    uint64_t low = (uint64_t)(idx % HIST_SUB + HIST_SUB) << shift;
    return (double)low + (double)((1ULL << shift) - 1) / 2.0;
}

static double hist_quantile_us(const struct stats *st, double q)
{
    uint64_t total = st->requests;
    if (total == 0)
        return 0.0;
    uint64_t rank = (uint64_t)ceil(q * (double)total);
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        seen += st->hist[i];
        if (seen >= rank)
            return hist_midpoint(i) / 1000.0;
    }
    return (double)st->lat_max_ns / 1000.0;
}

/* ---- key space --------------------------------------------------------- */

static const char *key_of(const struct run *r, unsigned i)
{
    return r->keys + (size_t)i * KEY_LEN;
}

static const char *value_of(const struct run *r, unsigned i)
{
    return r->values + (size_t)i * (size_t)r->cfg.value_size;
}

static void build_key_space(struct run *r)
{
    const struct config *c = &r->cfg;
    r->keys = malloc((size_t)c->keys * KEY_LEN + 1);
    r->values = malloc((size_t)c->keys * (size_t)c->value_size);
    if (!r->keys || !r->values)
        die("out of memory for the key space");
    for (unsigned i = 0; i < c->keys; i++) {
        char *k = r->keys + (size_t)i * KEY_LEN;
        snprintf(k, KEY_LEN + 1, KEY_PREFIX "%08u", i % 100000000u);
        /* The value starts with the key's number, so values never repeat
         * across keys, and the rest is a pattern shifted by the key. */
        char *v = r->values + (size_t)i * (size_t)c->value_size;
        char digits[16];
        int n = snprintf(digits, sizeof digits, "%08u:", i);
        for (int j = 0; j < c->value_size; j++)
            v[j] = j < n ? digits[j] : (char)('a' + (i + (unsigned)j) % 26);
    }
}

/* ---- buffers ------------------------------------------------------------- */

static void buffer_reserve(struct buffer *b, size_t extra)
{
    if (b->off > 0 && b->len + extra > b->cap) {
        memmove(b->data, b->data + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
    }
    if (b->len + extra <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra)
        cap *= 2;
    b->data = realloc(b->data, cap);
    if (!b->data)
        die("out of memory");
    b->cap = cap;
}

static void buffer_append(struct buffer *b, const void *p, size_t n)
{
    buffer_reserve(b, n);
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

/* ---- connections --------------------------------------------------------- */

static void watch(struct run *r, struct conn *c, bool want_write)
{
    struct epoll_event ev = {
        .events = EPOLLIN | (want_write ? EPOLLOUT : 0u),
        .data.ptr = c,
    };
    if (epoll_ctl(r->epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
    c->want_write = want_write;
}

static void open_conn(struct run *r, struct conn *c, const struct sockaddr_in *addr)
{
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0)
        die("socket: %s", strerror(errno));
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (const struct sockaddr *)addr, sizeof *addr) < 0 &&
        errno != EINPROGRESS)
        fail_unreachable("connect");
    c->window = calloc((size_t)r->cfg.depth, sizeof *c->window);
    if (!c->window)
        die("out of memory");
    struct epoll_event ev = { .events = EPOLLOUT, .data.ptr = c };
    if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
}

/* Close a connection whose stream can no longer be trusted. */
static void close_conn(struct run *r, struct conn *c)
{
    if (c->closed)
        return;
    r->total_errors += (uint64_t)c->inflight;
    if (r->phase == MEASURE)
        r->measured.errors += (uint64_t)c->inflight;
    r->inflight -= (uint64_t)c->inflight;
    c->inflight = 0;
    c->closed = true;
    r->closed_conns++;
    epoll_ctl(r->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
}

/* ---- requests ------------------------------------------------------------ */

static bool may_send(const struct run *r)
{
    if (r->cfg.populate)
        return r->next_populate < r->cfg.keys;
    return r->phase == WARMUP || r->phase == MEASURE;
}

static void queue_request(struct run *r, struct conn *c, uint64_t now)
{
    const struct config *cfg = &r->cfg;
    struct request *req = &c->window[(c->head + c->inflight) % cfg->depth];
    req->start_ns = now;
    bool is_get = !cfg->populate && rng_unit(&r->rng) < cfg->get_ratio;
    if (is_get) {
        req->first_key = (unsigned)(rng_next(&r->rng) % cfg->keys);
        req->nkeys = (unsigned)cfg->multiget;
        buffer_append(&c->out, "get", 3);
        for (unsigned i = 0; i < req->nkeys; i++) {
            buffer_append(&c->out, " ", 1);
            buffer_append(&c->out, key_of(r, (req->first_key + i) % cfg->keys), KEY_LEN);
        }
        buffer_append(&c->out, "\r\n", 2);
    } else {
        req->first_key = cfg->populate ? r->next_populate++
                                       : (unsigned)(rng_next(&r->rng) % cfg->keys);
        req->nkeys = 0;
        char line[64];
        int n = snprintf(line, sizeof line, "set %.*s 0 0 %d\r\n", KEY_LEN,
                         key_of(r, req->first_key), cfg->value_size);
        buffer_append(&c->out, line, (size_t)n);
        buffer_append(&c->out, value_of(r, req->first_key), (size_t)cfg->value_size);
        buffer_append(&c->out, "\r\n", 2);
    }
    c->inflight++;
    r->inflight++;
}

static void flush_conn(struct run *r, struct conn *c)
{
    struct buffer *b = &c->out;
    while (b->off < b->len) {
        ssize_t n = write(c->fd, b->data + b->off, b->len - b->off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                break;
            close_conn(r, c);
            return;
        }
        b->off += (size_t)n;
    }
    if (b->off == b->len)
        b->off = b->len = 0;
    bool pending = b->len > 0;
    if (pending != c->want_write)
        watch(r, c, pending);
}

static void fill_conn(struct run *r, struct conn *c, uint64_t now)
{
    if (c->closed || !c->connected)
        return;
    while (c->inflight < r->cfg.depth && may_send(r))
        queue_request(r, c, now);
    flush_conn(r, c);
}

static void complete(struct run *r, struct conn *c, bool ok, unsigned misses, uint64_t now)
{
    struct request *req = &c->window[c->head];
    c->head = (c->head + 1) % r->cfg.depth;
    c->inflight--;
    r->inflight--;
    c->reply_pos = c->reply_hits = 0;
    c->reply_bad = false;
    r->total_requests++;
    r->total_errors += !ok;
    r->total_misses += misses;
    if (r->phase != MEASURE)
        return;
    struct stats *st = &r->measured;
    uint64_t lat = now - req->start_ns;
    st->requests++;
    st->errors += !ok;
    st->misses += misses;
    if (req->nkeys) {
        st->gets++;
        st->hits += req->nkeys - misses;
    } else {
        st->sets++;
    }
    st->hist[hist_index(lat)]++;
    st->lat_sum_ns += lat;
    if (lat > st->lat_max_ns)
        st->lat_max_ns = lat;
}

/* ---- reply parsing --------------------------------------------------------- */

static bool line_is(const char *line, size_t len, const char *word)
{
    size_t n = strlen(word);
    return len == n && memcmp(line, word, n) == 0;
}

static bool line_starts(const char *line, size_t len, const char *prefix)
{
    size_t n = strlen(prefix);
    return len >= n && memcmp(line, prefix, n) == 0;
}

static bool is_error_line(const char *line, size_t len)
{
    return line_is(line, len, "ERROR") || line_starts(line, len, "CLIENT_ERROR ") ||
           line_starts(line, len, "SERVER_ERROR ");
}

/* Parse "VALUE <key> <flags> <bytes>[ <cas>]" (len excludes the CRLF). */
static bool parse_value_line(const char *line, size_t len, const char **key,
                             size_t *key_len, unsigned long *flags, long *bytes)
{
    char tmp[MAX_LINE + 1];
    if (len > MAX_LINE || !line_starts(line, len, "VALUE "))
        return false;
    memcpy(tmp, line, len);
    tmp[len] = '\0';
    char *k = tmp + 6;
    char *sp = strchr(k, ' ');
    if (!sp || sp == k)
        return false;
    *key = line + (k - tmp);
    *key_len = (size_t)(sp - k);
    char *end;
    errno = 0;
    *flags = strtoul(sp + 1, &end, 10);
    if (errno || end == sp + 1 || *end != ' ')
        return false;
    char *b = end + 1;
    *bytes = strtol(b, &end, 10);
    if (errno || end == b || (*end != '\0' && *end != ' ') || *bytes < 0 ||
        *bytes > MAX_VALUE)
        return false;
    return true;
}

/* The reply to the oldest set: one line. */
static enum parse_result parse_set(struct run *r, struct conn *c, const char *line,
                                   size_t len, size_t line_total)
{
    c->in.off += line_total;
    if (line_is(line, len, "STORED"))
        return REPLY_OK;
    if (is_error_line(line, len))
        r->error_lines++;
    else
        r->mismatches++;
    return REPLY_ERROR;
}

/* Consume one VALUE block of the oldest get, or the line that ends it. */
static enum parse_result parse_get(struct run *r, struct conn *c, const char *line,
                                   size_t len, size_t line_total)
{
    const struct config *cfg = &r->cfg;
    const struct request *req = &c->window[c->head];
    struct buffer *in = &c->in;
    if (line_is(line, len, "END")) {
        in->off += line_total;
        return c->reply_bad ? REPLY_ERROR : REPLY_OK;
    }
    if (is_error_line(line, len)) {
        r->error_lines++;
        in->off += line_total;
        return REPLY_ERROR;
    }
    const char *key;
    size_t key_len;
    unsigned long flags;
    long bytes;
    if (!parse_value_line(line, len, &key, &key_len, &flags, &bytes))
        return DESYNC;
    size_t block = line_total + (size_t)bytes + 2;
    if (in->len - in->off < block)
        return NEED_MORE;
    const char *data = line + line_total;
    if (data[bytes] != '\r' || data[bytes + 1] != '\n')
        return DESYNC;
    /* Hits come back in the order asked for; keys skipped over are misses. */
    unsigned pos = c->reply_pos;
    unsigned k = 0;
    for (; pos < req->nkeys; pos++) {
        k = (req->first_key + pos) % cfg->keys;
        if (key_len == KEY_LEN && memcmp(key, key_of(r, k), KEY_LEN) == 0)
            break;
    }
    if (pos == req->nkeys || flags != 0 || bytes != cfg->value_size ||
        memcmp(data, value_of(r, k), (size_t)bytes) != 0) {
        r->mismatches++;
        c->reply_bad = true;
    } else {
        c->reply_pos = pos + 1;
        c->reply_hits++;
    }
    in->off += block;
    return PROGRESS;
}

static void parse_replies(struct run *r, struct conn *c, uint64_t now)
{
    struct buffer *in = &c->in;
    while (in->off < in->len) {
        if (c->inflight == 0) {
            r->mismatches++; /* bytes nobody asked for */
            close_conn(r, c);
            return;
        }
        const char *line = in->data + in->off;
        size_t avail = in->len - in->off;
        const char *nl = memchr(line, '\n', avail);
        if (!nl) {
            if (avail <= MAX_LINE)
                break;
            close_conn(r, c);
            return;
        }
        if (nl == line || nl[-1] != '\r') {
            close_conn(r, c);
            return;
        }
        size_t len = (size_t)(nl - line) - 1;
        size_t line_total = len + 2;
        unsigned nkeys = c->window[c->head].nkeys;
        enum parse_result res = nkeys ? parse_get(r, c, line, len, line_total)
                                      : parse_set(r, c, line, len, line_total);
        if (res == NEED_MORE)
            break;
        if (res == DESYNC) {
            close_conn(r, c);
            return;
        }
        if (res == REPLY_OK || res == REPLY_ERROR) {
            bool ok = res == REPLY_OK;
            unsigned misses = ok && nkeys ? nkeys - c->reply_hits : 0;
            complete(r, c, ok, misses, now);
        }
    }
    if (in->off == in->len)
        in->off = in->len = 0;
}

static void read_conn(struct run *r, struct conn *c, uint64_t now)
{
    struct buffer *in = &c->in;
    buffer_reserve(in, READ_CHUNK);
    ssize_t n = read(c->fd, in->data + in->len, in->cap - in->len);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n <= 0) {
        close_conn(r, c);
        return;
    }
    in->len += (size_t)n;
    parse_replies(r, c, now);
}

/* ---- the run ------------------------------------------------------------- */

static uint64_t seconds_ns(double s)
{
    return (uint64_t)(s * 1e9);
}

static void start_load(struct run *r, uint64_t now)
{
    const struct config *cfg = &r->cfg;
    r->phase = cfg->populate || cfg->warmup <= 0 ? MEASURE : WARMUP;
    r->measure_start = now + (cfg->populate ? 0 : seconds_ns(cfg->warmup));
    r->measure_end = r->measure_start + seconds_ns(cfg->duration);
    r->drain_end = r->measure_end + seconds_ns(cfg->drain_timeout);
    if (r->phase == MEASURE)
        r->measure_start = now;
    for (int i = 0; i < cfg->conns; i++)
        fill_conn(r, &r->conns[i], now);
}

static void advance_phase(struct run *r, uint64_t now)
{
    if (r->closed_conns == (uint64_t)r->cfg.conns) {
        r->measure_end = now;
        r->phase = DONE;
        return;
    }
    if (r->cfg.populate) {
        if (r->inflight == 0 && !may_send(r)) {
            r->measure_end = now;
            r->phase = DONE;
        } else if (now >= r->measure_end) {
            r->unanswered = r->inflight;
            r->phase = DONE;
        }
        return;
    }
    if (r->phase == WARMUP && now >= r->measure_start) {
        r->measure_start = now;
        r->phase = MEASURE;
    }
    if (r->phase == MEASURE && now >= r->measure_end) {
        r->measure_end = now;
        r->phase = DRAIN;
    }
    if (r->phase == DRAIN && (r->inflight == 0 || now >= r->drain_end)) {
        r->unanswered = r->inflight;
        r->phase = DONE;
    }
}

static void on_connected(struct run *r, struct conn *c, int *connecting)
{
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err) {
        errno = err;
        fail_unreachable("connect");
    }
    c->connected = true;
    watch(r, c, false);
    (*connecting)--;
}

static void run_loop(struct run *r)
{
    const struct config *cfg = &r->cfg;
    struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons((uint16_t)cfg->port) };
    if (inet_pton(AF_INET, cfg->host, &addr.sin_addr) != 1)
        die("bad IPv4 address: %s", cfg->host);
    r->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (r->epfd < 0)
        die("epoll_create1: %s", strerror(errno));
    r->conns = calloc((size_t)cfg->conns, sizeof *r->conns);
    if (!r->conns)
        die("out of memory");
    for (int i = 0; i < cfg->conns; i++)
        open_conn(r, &r->conns[i], &addr);

    int connecting = cfg->conns;
    uint64_t connect_deadline = now_ns() + seconds_ns(cfg->connect_timeout);
    struct epoll_event events[MAX_EVENTS];
    r->phase = CONNECTING;
    while (r->phase != DONE) {
        int n = epoll_wait(r->epfd, events, MAX_EVENTS, 5);
        if (n < 0 && errno != EINTR)
            die("epoll_wait: %s", strerror(errno));
        uint64_t now = now_ns();
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c->closed)
                continue;
            if (!c->connected) {
                on_connected(r, c, &connecting);
                continue;
            }
            if (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                read_conn(r, c, now);
            fill_conn(r, c, now);
        }
        if (r->phase == CONNECTING) {
            if (connecting == 0) {
                start_load(r, now);
            } else if (now >= connect_deadline) {
                errno = ETIMEDOUT;
                fail_unreachable("connect");
            }
            continue;
        }
        advance_phase(r, now);
    }
    r->total_errors += r->unanswered;
}

static void print_json(const struct run *r)
{
    const struct config *c = &r->cfg;
    const struct stats *st = &r->measured;
    double secs = (double)(r->measure_end - r->measure_start) / 1e9;
    printf("{\"mode\": \"%s\", \"conns\": %d, \"depth\": %d, \"multiget\": %d, "
           "\"get_ratio\": %.3f, \"value_size\": %d, \"keys\": %u,\n",
           c->populate ? "populate" : "load", c->conns, c->depth, c->multiget,
           c->get_ratio, c->value_size, c->keys);
    printf(" \"duration_s\": %.4f, \"requests\": %llu, \"errors\": %llu, "
           "\"gets\": %llu, \"sets\": %llu, \"hits\": %llu, \"misses\": %llu,\n",
           secs, (unsigned long long)st->requests, (unsigned long long)st->errors,
           (unsigned long long)st->gets, (unsigned long long)st->sets,
           (unsigned long long)st->hits, (unsigned long long)st->misses);
    printf(" \"throughput\": %.1f,\n", secs > 0 ? (double)st->requests / secs : 0.0);
    printf(" \"latency_us\": {\"p50\": %.2f, \"p90\": %.2f, \"p99\": %.2f, "
           "\"p999\": %.2f, \"mean\": %.2f, \"max\": %.2f},\n",
           hist_quantile_us(st, 0.50), hist_quantile_us(st, 0.90),
           hist_quantile_us(st, 0.99), hist_quantile_us(st, 0.999),
           st->requests ? (double)st->lat_sum_ns / (double)st->requests / 1000.0 : 0.0,
           (double)st->lat_max_ns / 1000.0);
    printf(" \"total_requests\": %llu, \"total_errors\": %llu, \"total_misses\": %llu, "
           "\"mismatches\": %llu, \"error_lines\": %llu, \"closed_conns\": %llu, "
           "\"unanswered\": %llu}\n",
           (unsigned long long)r->total_requests, (unsigned long long)r->total_errors,
           (unsigned long long)r->total_misses, (unsigned long long)r->mismatches,
           (unsigned long long)r->error_lines, (unsigned long long)r->closed_conns,
           (unsigned long long)r->unanswered);
}

/* ---- options --------------------------------------------------------------- */

static void usage(FILE *out)
{
    fputs("usage: loadgen --port PORT [options]\n"
          "  --host ADDR          IPv4 address (127.0.0.1)\n"
          "  --port PORT          server port\n"
          "  --conns N            connections (50)\n"
          "  --depth D            requests in flight per connection (1)\n"
          "  --get-ratio R        fraction of requests that are gets (0.9)\n"
          "  --multiget K         keys per get (1)\n"
          "  --value-size BYTES   value size (100)\n"
          "  --keys N             key space size (10000)\n"
          "  --duration SECONDS   measured time (5); with --populate, the time limit\n"
          "  --warmup SECONDS     unmeasured time before it (1)\n"
          "  --drain-timeout S    wait for outstanding replies at the end (2)\n"
          "  --connect-timeout S  (5)\n"
          "  --seed N             random seed (1)\n"
          "  --populate           set every key once, then exit\n",
          out);
}

static double parse_double(const char *s, const char *name, double min)
{
    char *end;
    double v = strtod(s, &end);
    if (*s == '\0' || *end != '\0' || !(v >= min))
        die("bad --%s: %s", name, s);
    return v;
}

static struct config parse_args(int argc, char **argv)
{
    struct config c = {
        .host = "127.0.0.1", .conns = 50, .depth = 1, .multiget = 1,
        .value_size = 100, .keys = 10000, .get_ratio = 0.9, .duration = 5,
        .warmup = 1, .drain_timeout = 2, .connect_timeout = 5, .seed = 1,
    };
    static const struct option opts[] = {
        { "host", required_argument, NULL, 'H' },
        { "port", required_argument, NULL, 'p' },
        { "conns", required_argument, NULL, 'c' },
        { "depth", required_argument, NULL, 'd' },
        { "get-ratio", required_argument, NULL, 'g' },
        { "multiget", required_argument, NULL, 'k' },
        { "value-size", required_argument, NULL, 'v' },
        { "keys", required_argument, NULL, 'n' },
        { "duration", required_argument, NULL, 't' },
        { "warmup", required_argument, NULL, 'w' },
        { "drain-timeout", required_argument, NULL, 'D' },
        { "connect-timeout", required_argument, NULL, 'C' },
        { "seed", required_argument, NULL, 's' },
        { "populate", no_argument, NULL, 'P' },
        { "help", no_argument, NULL, 'h' },
        { 0 },
    };
    int opt;
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'H': c.host = optarg; break;
        case 'p': c.port = (int)parse_double(optarg, "port", 1); break;
        case 'c': c.conns = (int)parse_double(optarg, "conns", 1); break;
        case 'd': c.depth = (int)parse_double(optarg, "depth", 1); break;
        case 'g': c.get_ratio = parse_double(optarg, "get-ratio", 0); break;
        case 'k': c.multiget = (int)parse_double(optarg, "multiget", 1); break;
        case 'v': c.value_size = (int)parse_double(optarg, "value-size", 1); break;
        case 'n': c.keys = (unsigned)parse_double(optarg, "keys", 1); break;
        case 't': c.duration = parse_double(optarg, "duration", 0.01); break;
        case 'w': c.warmup = parse_double(optarg, "warmup", 0); break;
        case 'D': c.drain_timeout = parse_double(optarg, "drain-timeout", 0); break;
        case 'C': c.connect_timeout = parse_double(optarg, "connect-timeout", 0.01); break;
        case 's': c.seed = (uint64_t)parse_double(optarg, "seed", 1); break;
        case 'P': c.populate = true; break;
        case 'h': usage(stdout); exit(0);
        default: usage(stderr); exit(1);
        }
    }
    if (optind != argc || c.port == 0 || c.port > 65535) {
        usage(stderr);
        exit(1);
    }
    if (c.get_ratio > 1 || c.value_size > MAX_VALUE || c.keys > 100000000 ||
        (unsigned)c.multiget > c.keys || c.multiget * (KEY_LEN + 1) > MAX_LINE)
        die("option out of range");
    return c;
}

int main(int argc, char **argv)
{
    struct run r = { .cfg = parse_args(argc, argv) };
    r.rng = r.cfg.seed * 0x9E3779B97F4A7C15ULL | 1;
    build_key_space(&r);
    run_loop(&r);
    print_json(&r);
    return 0;
}
