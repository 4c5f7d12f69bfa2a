/* A model of network storage for the load-e2e benchmark, loaded with LD_PRELOAD.
 *
 * Every read call on a file under CKCORE_IO_DELAY_PREFIX (read, pread,
 * readv, preadv and their 64-bit and v2 forms: what CPython's file objects,
 * os.pread and ckcore's preadv kernel all go through) first sleeps
 * CKCORE_IO_DELAY_US microseconds (or what ck_io_delay_set_us last set),
 * in the calling thread, outside any
 * lock of ours: a caller that released the GIL (CPython's file reads,
 * ckcore's kernel) lets other threads run meanwhile, as a network round
 * trip would.
 *
 * Optionally (shared-load benchmark) it also models one storage server's
 * bandwidth shared by every process that preloads it: with
 * CKCORE_IO_BW_FILE naming a file of at least 8 bytes (mapped shared: the
 * time the server is next free, CLOCK_MONOTONIC nanoseconds) and a rate set
 * with ck_io_bw_set_mbps (or CKCORE_IO_BW_MBPS), each read of n bytes on a
 * file under the prefix takes the next n / rate of the server's time, first
 * come first served across processes, and returns when its transfer ends.
 * Every read is charged, page cache or not: the model is of clients that
 * do not share a cache (processes on different hosts).
 *
 * Both are models, not measurements of any real file system: no server
 * parallelism, no network between the processes, no caching.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static volatile long long delay_ns;
static volatile double bw_bytes_per_ns;
static long long *server_free; /* shared between processes: ns when the server is free */

/* The benchmark turns the models on and off around its loads (ctypes). */
void ck_io_delay_set_us(double us) { delay_ns = (long long)(us * 1000.0); }
void ck_io_bw_set_mbps(double mbps) { bw_bytes_per_ns = mbps > 0 ? mbps * 1e6 / 1e9 : 0.0; }
static char prefix[4096];
static size_t prefix_len;

typedef ssize_t (*read_fn)(int, void *, size_t);
typedef ssize_t (*pread_fn)(int, void *, size_t, off_t);
typedef ssize_t (*readv_fn)(int, const struct iovec *, int);
typedef ssize_t (*preadv_fn)(int, const struct iovec *, int, off_t);
typedef ssize_t (*preadv2_fn)(int, const struct iovec *, int, off_t, int);

static read_fn real_read;
static pread_fn real_pread, real_pread64;
static readv_fn real_readv;
static preadv_fn real_preadv, real_preadv64;
static preadv2_fn real_preadv2, real_preadv64v2;

__attribute__((constructor)) static void ck_delay_init(void) {
    const char *us = getenv("CKCORE_IO_DELAY_US");
    const char *p = getenv("CKCORE_IO_DELAY_PREFIX");
    real_read = (read_fn)dlsym(RTLD_NEXT, "read");
    real_pread = (pread_fn)dlsym(RTLD_NEXT, "pread");
    real_pread64 = (pread_fn)dlsym(RTLD_NEXT, "pread64");
    real_readv = (readv_fn)dlsym(RTLD_NEXT, "readv");
    real_preadv = (preadv_fn)dlsym(RTLD_NEXT, "preadv");
    real_preadv64 = (preadv_fn)dlsym(RTLD_NEXT, "preadv64");
    real_preadv2 = (preadv2_fn)dlsym(RTLD_NEXT, "preadv2");
    real_preadv64v2 = (preadv2_fn)dlsym(RTLD_NEXT, "preadv64v2");
    delay_ns = us ? (long long)(atof(us) * 1000.0) : 0;
    {
        const char *bw = getenv("CKCORE_IO_BW_MBPS");
        const char *f = getenv("CKCORE_IO_BW_FILE");
        ck_io_bw_set_mbps(bw ? atof(bw) : 0.0);
        if (f && *f) {
            int fd = open(f, O_RDWR);
            if (fd >= 0) {
                void *m = mmap(NULL, sizeof(long long), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
                if (m != MAP_FAILED)
                    server_free = (long long *)m;
                close(fd);
            }
        }
    }
    if (p && strlen(p) > 0 && strlen(p) < sizeof(prefix)) {
        strcpy(prefix, p);
        prefix_len = strlen(p);
    } else {
        prefix_len = sizeof(prefix); /* no prefix: never delay */
    }
}

/* 1 when fd is a file under the prefix and a model is on; sleeps the latency. */
static int ck_delay(int fd) {
    char link[64], target[4096];
    ssize_t n;
    struct timespec ts;
    if ((delay_ns <= 0 && (bw_bytes_per_ns <= 0 || !server_free)) || prefix_len >= sizeof(prefix))
        return 0;
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    n = readlink(link, target, sizeof(target) - 1);
    if (n < (ssize_t)prefix_len || memcmp(target, prefix, prefix_len) != 0)
        return 0;
    if (delay_ns > 0) {
        ts.tv_sec = delay_ns / 1000000000LL;
        ts.tv_nsec = delay_ns % 1000000000LL;
        while (nanosleep(&ts, &ts) != 0) {
        }
    }
    return 1;
}

/* Takes the server's next got / rate nanoseconds and sleeps until they end. */
static ssize_t ck_transfer(int matched, ssize_t got) {
    struct timespec now, until;
    long long t, cur, start, end;
    double rate = bw_bytes_per_ns;
    if (!matched || got <= 0 || rate <= 0 || !server_free)
        return got;
    clock_gettime(CLOCK_MONOTONIC, &now);
    t = (long long)now.tv_sec * 1000000000LL + now.tv_nsec;
    cur = __atomic_load_n(server_free, __ATOMIC_SEQ_CST);
    do {
        start = cur > t ? cur : t;
        end = start + (long long)((double)got / rate);
    } while (!__atomic_compare_exchange_n(server_free, &cur, end, 0, __ATOMIC_SEQ_CST,
                                          __ATOMIC_SEQ_CST));
    until.tv_sec = end / 1000000000LL;
    until.tv_nsec = end % 1000000000LL;
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL) != 0) {
    }
    return got;
}

ssize_t read(int fd, void *b, size_t n) { int m = ck_delay(fd); return ck_transfer(m, real_read(fd, b, n)); }
ssize_t pread(int fd, void *b, size_t n, off_t o) {
    int m = ck_delay(fd); return ck_transfer(m, real_pread(fd, b, n, o));
}
ssize_t pread64(int fd, void *b, size_t n, off_t o) {
    int m = ck_delay(fd); return ck_transfer(m, real_pread64(fd, b, n, o));
}
ssize_t readv(int fd, const struct iovec *v, int c) {
    int m = ck_delay(fd); return ck_transfer(m, real_readv(fd, v, c));
}
ssize_t preadv(int fd, const struct iovec *v, int c, off_t o) {
    int m = ck_delay(fd); return ck_transfer(m, real_preadv(fd, v, c, o));
}
ssize_t preadv64(int fd, const struct iovec *v, int c, off_t o) {
    int m = ck_delay(fd); return ck_transfer(m, real_preadv64(fd, v, c, o));
}
ssize_t preadv2(int fd, const struct iovec *v, int c, off_t o, int f) {
    int m = ck_delay(fd); return ck_transfer(m, real_preadv2(fd, v, c, o, f));
}
ssize_t preadv64v2(int fd, const struct iovec *v, int c, off_t o, int f) {
    int m = ck_delay(fd); return ck_transfer(m, real_preadv64v2(fd, v, c, o, f));
}
