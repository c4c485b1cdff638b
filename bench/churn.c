/* Blocking connect/close loop: the kernel-bound baseline the Python engines are
 * compared with. Usage: churn HOST PORT SECONDS [reset|fin] [MAX]. Prints
 * connections/s. "fin" (the default) leaves TIME_WAIT here; MAX stops early. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s HOST PORT SECONDS [reset]\n", argv[0]);
        return 2;
    }
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &addr.sin_addr);
    double seconds = atof(argv[3]), start = now(), end = start + seconds;
    int reset = argc > 4 && strcmp(argv[4], "reset") == 0;
    long max = argc > 5 ? atol(argv[5]) : 0;
    struct linger lin = {1, 0};
    long ok = 0, failed = 0;
    while (now() < end && (max == 0 || ok + failed < max)) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0) ok++; else failed++;
        if (reset) setsockopt(fd, SOL_SOCKET, SO_LINGER, &lin, sizeof lin);
        close(fd);
    }
    printf("{\"ok\": %ld, \"failed\": %ld, \"per_s\": %.1f}\n", ok, failed, ok / (now() - start));
    return 0;
}
