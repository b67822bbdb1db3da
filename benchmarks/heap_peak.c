/* The heap's bytes in use and their peak, for benchmarks/zero_step.py: loaded
   with LD_PRELOAD into each rank, it counts every malloc family call of every
   thread (tensors' storage, the collectives' buffers that gloo's threads
   allocate and free, Python's objects), by glibc's usable size of each block.

       heap_current()   bytes in use now
       heap_reset()     the peak becomes the bytes in use now
       heap_peak()      the most bytes in use at once since the reset

   The profiler cannot give this: it records memory only on the threads it
   profiles, and with profile_all_threads it records none. */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stdatomic.h>
#include <stddef.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void __libc_free(void *);

static _Atomic long current, peak;

static void *counted(void *block) {
    if (block) {
        long now = atomic_fetch_add(&current, (long)malloc_usable_size(block));
        now += (long)malloc_usable_size(block);
        long high = atomic_load(&peak);
        while (now > high && !atomic_compare_exchange_weak(&peak, &high, now)) {
        }
    }
    return block;
}

static void uncounted(void *block) {
    if (block) atomic_fetch_sub(&current, (long)malloc_usable_size(block));
}

void *malloc(size_t size) { return counted(__libc_malloc(size)); }
void *calloc(size_t count, size_t size) { return counted(__libc_calloc(count, size)); }
void *memalign(size_t alignment, size_t size) { return counted(__libc_memalign(alignment, size)); }
void *aligned_alloc(size_t alignment, size_t size) { return memalign(alignment, size); }

void free(void *block) {
    uncounted(block);
    __libc_free(block);
}

void *realloc(void *block, size_t size) {
    long before = block ? (long)malloc_usable_size(block) : 0;
    void *moved = __libc_realloc(block, size);
    if (moved || size == 0) {  /* (a failed realloc leaves the block as it was) */
        atomic_fetch_sub(&current, before);
        counted(moved);
    }
    return moved;
}

int posix_memalign(void **out, size_t alignment, size_t size) {
    void *block = memalign(alignment, size);
    if (!block) return ENOMEM;
    *out = block;
    return 0;
}

long heap_current(void) { return atomic_load(&current); }
long heap_peak(void) { return atomic_load(&peak); }
void heap_reset(void) { atomic_store(&peak, atomic_load(&current)); }
