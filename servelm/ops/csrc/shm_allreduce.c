/* Sum a float32 tensor over the tensor-parallel ranks of one machine through shared memory.
 *
 * gloo's all-reduce over loopback TCP takes about a millisecond however small the tensor,
 * and a decode step runs two per layer; through memory the ranks already share it takes
 * microseconds. The segment holds a header of per-rank counters and two buffers, each with
 * one slot per rank. Call `seq` (1, 2, ...) uses buffer seq % 2:
 *   1. wait until every rank has finished reading this buffer's previous use (seq - 2);
 *   2. copy this rank's values into its slot, then publish seq;
 *   3. wait until every rank has published seq;
 *   4. sum the slots in rank order (the same order on every rank, so every rank gets the
 *      same bits), then record that this rank is done reading.
 * Waits spin briefly, then yield the core (ranks may outnumber cores), and give up after
 * `timeout_s` so a dead peer cannot hang a step; the caller turns -1 into an error.
 */
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define LINE 8 /* counters one cache line apart: ranks do not false-share them */

typedef struct {
    _Atomic uint64_t published[64 * LINE];
    _Atomic uint64_t done[64 * LINE];
} header_t;

int64_t shm_allreduce_header_bytes(void) { return (int64_t)sizeof(header_t); }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Wait until counters[r * LINE] >= target for every rank; -1 - r on timeout. */
static int wait_all(_Atomic uint64_t *counters, int world, uint64_t target, double timeout_s) {
    double start = 0.0;
    for (int r = 0; r < world; r++) {
        uint64_t spins = 0;
        while (atomic_load_explicit(&counters[r * LINE], memory_order_acquire) < target) {
            if (++spins < 2048) continue;
            sched_yield();
            if ((spins & 255) == 0) {
                double t = now_s();
                if (start == 0.0) start = t;
                else if (t - start > timeout_s) return -1 - r;
            }
        }
    }
    return 0;
}

/* x [n] float32 (n * 4 <= slot_bytes) summed over `world` ranks in place. Returns 0, or
 * -1 - r when rank r did not arrive within timeout_s. */
int shm_allreduce_f32(char *base, int64_t slot_bytes, int rank, int world, uint64_t seq,
                      float *x, int64_t n, double timeout_s) {
    header_t *h = (header_t *)base;
    char *buffer = base + sizeof(header_t) + (seq & 1) * world * slot_bytes;
    int rc = seq > 2 ? wait_all(h->done, world, seq - 2, timeout_s) : 0;
    if (rc) return rc;
    memcpy(buffer + rank * slot_bytes, x, n * sizeof(float));
    atomic_store_explicit(&h->published[rank * LINE], seq, memory_order_release);
    if ((rc = wait_all(h->published, world, seq, timeout_s))) return rc;
    const float *first = (const float *)buffer;
    for (int64_t i = 0; i < n; i++) x[i] = first[i];
    for (int r = 1; r < world; r++) {
        const float *slot = (const float *)(buffer + r * slot_bytes);
        for (int64_t i = 0; i < n; i++) x[i] += slot[i];
    }
    atomic_store_explicit(&h->done[rank * LINE], seq, memory_order_release);
    return 0;
}

/* One rank's handle on the segment, shared with Python (distributed/shm_allreduce.py) and
 * the fused decoder (decoder.c), which both call shm_allreduce on it, so the call count
 * `seq` stays one sequence whoever calls. */
typedef struct {
    char *base;
    int64_t slot_bytes, rank, world;
    uint64_t seq;
    double timeout_s;
    uint64_t calls, bytes; /* since Python last read and reset them */
    double seconds;
} shm_ctx_t;

/* x [n] float32 summed over the ranks in place, in slot-sized chunks. */
int shm_allreduce(shm_ctx_t *c, float *x, int64_t n) {
    const int64_t per = c->slot_bytes / (int64_t)sizeof(float);
    const double start = now_s();
    for (int64_t s = 0; s < n; s += per) {
        int rc = shm_allreduce_f32(c->base, c->slot_bytes, (int)c->rank, (int)c->world, ++c->seq, x + s,
                                   n - s < per ? n - s : per, c->timeout_s);
        if (rc) return rc;
    }
    c->calls += 1;
    c->bytes += (uint64_t)n * sizeof(float);
    c->seconds += now_s() - start;
    return 0;
}
