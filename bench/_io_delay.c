/* A model of network storage for the load-e2e benchmark, loaded with LD_PRELOAD.
 *
 * Every read call on a file under CKCORE_IO_DELAY_PREFIX (read, pread,
 * readv, preadv and their 64-bit and v2 forms: what CPython's file objects,
 * os.pread and ckcore's preadv kernel all go through) first sleeps
 * CKCORE_IO_DELAY_US microseconds (or what ck_io_delay_set_us last set),
 * in the calling thread, outside any
 * lock of ours: a caller that released the GIL (CPython's file reads,
 * ckcore's kernel) lets other threads run meanwhile, as a network round
 * trip would. It models a per-request latency only; it does not model
 * bandwidth, queueing or a server's parallelism limits, and it is not a
 * measurement of any real file system.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static volatile long long delay_ns;

/* The benchmark turns the delay on and off around its loads (ctypes). */
void ck_io_delay_set_us(double us) { delay_ns = (long long)(us * 1000.0); }
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
    if (p && strlen(p) > 0 && strlen(p) < sizeof(prefix)) {
        strcpy(prefix, p);
        prefix_len = strlen(p);
    } else {
        prefix_len = sizeof(prefix); /* no prefix: never delay */
    }
}

static void ck_delay(int fd) {
    char link[64], target[4096];
    ssize_t n;
    struct timespec ts;
    if (delay_ns <= 0 || prefix_len >= sizeof(prefix))
        return;
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    n = readlink(link, target, sizeof(target) - 1);
    if (n < (ssize_t)prefix_len || memcmp(target, prefix, prefix_len) != 0)
        return;
    ts.tv_sec = delay_ns / 1000000000LL;
    ts.tv_nsec = delay_ns % 1000000000LL;
    while (nanosleep(&ts, &ts) != 0) {
    }
}

ssize_t read(int fd, void *b, size_t n) { ck_delay(fd); return real_read(fd, b, n); }
ssize_t pread(int fd, void *b, size_t n, off_t o) { ck_delay(fd); return real_pread(fd, b, n, o); }
ssize_t pread64(int fd, void *b, size_t n, off_t o) { ck_delay(fd); return real_pread64(fd, b, n, o); }
ssize_t readv(int fd, const struct iovec *v, int c) { ck_delay(fd); return real_readv(fd, v, c); }
ssize_t preadv(int fd, const struct iovec *v, int c, off_t o) {
    ck_delay(fd); return real_preadv(fd, v, c, o);
}
ssize_t preadv64(int fd, const struct iovec *v, int c, off_t o) {
    ck_delay(fd); return real_preadv64(fd, v, c, o);
}
ssize_t preadv2(int fd, const struct iovec *v, int c, off_t o, int f) {
    ck_delay(fd); return real_preadv2(fd, v, c, o, f);
}
ssize_t preadv64v2(int fd, const struct iovec *v, int c, off_t o, int f) {
    ck_delay(fd); return real_preadv64v2(fd, v, c, o, f);
}
