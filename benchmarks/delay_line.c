/* The network of benchmarks/ladder_overlap.py --link delay: every packet read
   from one TUN device is written to the other `delay` microseconds later.

       delay_line FD_A FD_B DELAY_US      (exits when its stdin closes)

   Written in C so that forwarding costs the cores the ranks compute on a few
   microseconds a packet, as a NIC would cost them nothing; real-time priority
   so that delivery does not wait for a compute thread to yield a core. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

struct packet {
    long long due;
    int out;
    ssize_t length;
    char *data;
};

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc != 4) return 2;
    int fd[2] = {atoi(argv[1]), atoi(argv[2])};
    long long delay = atoll(argv[3]) * 1000LL;
    struct sched_param priority = {.sched_priority = 50};
    sched_setscheduler(0, SCHED_FIFO, &priority);
    enum { SLOTS = 1 << 14 };
    static struct packet queue[SLOTS]; /* in order of arrival, so of due time */
    size_t head = 0, tail = 0;
    static char buffer[1 << 16];
    struct pollfd watch[3] = {{fd[0], POLLIN, 0}, {fd[1], POLLIN, 0}, {0, POLLIN, 0}};
    for (;;) {
        struct timespec wait = {0, 50000000}, *timeout = &wait;
        if (head != tail) {
            long long left = queue[head % SLOTS].due - now_ns();
            wait.tv_sec = left > 0 ? left / 1000000000LL : 0;
            wait.tv_nsec = left > 0 ? left % 1000000000LL : 0;
        }
        if (ppoll(watch, 3, timeout, NULL) < 0 && errno != EINTR) return 1;
        if (watch[2].revents) return 0; /* stdin closed: the benchmark is done */
        for (int i = 0; i < 2; i++) {
            if (!(watch[i].revents & POLLIN)) continue;
            ssize_t n;
            while (tail - head < SLOTS && (n = read(fd[i], buffer, sizeof buffer)) > 0) {
                struct packet *p = &queue[tail++ % SLOTS];
                p->due = now_ns() + delay;
                p->out = fd[1 - i];
                p->length = n;
                p->data = malloc(n);
                memcpy(p->data, buffer, n);
            }
        }
        for (long long t = now_ns(); head != tail && queue[head % SLOTS].due <= t; head++) {
            struct packet *p = &queue[head % SLOTS];
            (void)!write(p->out, p->data, p->length);
            free(p->data);
        }
    }
}
