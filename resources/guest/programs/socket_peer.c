/*
 * socket_peer: the guest's end of the vsock and network tests (tests/integration/linux_vsock.rs,
 * linux_net.rs), added to the guest with `samepage boot-test --include-binary`.
 *
 *   socket_peer serve PORT COUNT DELAY_US
 *       Listens on vsock port PORT and serves COUNT connections one after the other: reads
 *       each to its end (sleeping DELAY_US after every read of at most 4 KiB: a slow reader),
 *       answers "got <bytes> <fnv1a-64 hex>\n" and closes it. Prints "serve: listening" once
 *       listening and a line per connection.
 *   socket_peer connect PORT BYTES
 *       Connects to the host (CID 2) on PORT, sends BYTES bytes of a fixed pattern, shuts its
 *       sending side, prints the host's answer line. Exit 3 when the connection is refused.
 *   socket_peer tcp-serve PORT COUNT DELAY_US
 *   socket_peer tcp-connect IPV4 PORT BYTES
 *       The same over TCP/IPv4.
 *
 * The pattern's byte i is (i * 7 + 13 + (i >> 8) * 3 + (i >> 16)) & 0xff, the same the host test
 * sends (not periodic within a test's sizes: chunks delivered out of order change the hash).
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <linux/vm_sockets.h>

static unsigned char pattern(size_t i) {
    return (unsigned char)((i * 7 + 13 + (i >> 8) * 3 + (i >> 16)) & 0xff);
}

static uint64_t fnv(uint64_t h, const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static int serve(int tcp, unsigned port, int count, unsigned delay_us) {
    int s = socket(tcp ? AF_INET : AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm vm = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
    struct sockaddr_in in = { .sin_family = AF_INET, .sin_port = htons((unsigned short)port),
                              .sin_addr = { .s_addr = htonl(INADDR_ANY) } };
    struct sockaddr *addr = tcp ? (struct sockaddr *)&in : (struct sockaddr *)&vm;
    socklen_t len = tcp ? sizeof in : sizeof vm;
    if (s < 0 || bind(s, addr, len) < 0 || listen(s, 16) < 0) {
        printf("serve: cannot listen on %u: %s\n", port, strerror(errno));
        return 2;
    }
    printf("serve: listening on %u\n", port);
    fflush(stdout);
    for (int i = 0; i < count; i++) {
        int c = accept(s, NULL, NULL);
        if (c < 0) {
            printf("serve: accept: %s\n", strerror(errno));
            return 2;
        }
        unsigned char buf[4096];
        size_t total = 0;
        uint64_t h = 0xcbf29ce484222325ULL;
        const char *end = "eof";
        for (;;) {
            ssize_t n = read(c, buf, sizeof buf);
            if (n == 0)
                break;
            if (n < 0) {
                end = strerror(errno);
                break;
            }
            h = fnv(h, buf, (size_t)n);
            total += (size_t)n;
            if (delay_us)
                usleep(delay_us);
        }
        char line[64];
        int len = snprintf(line, sizeof line, "got %zu %016llx\n", total, (unsigned long long)h);
        ssize_t w = write(c, line, (size_t)len);
        printf("serve: connection %d: got %zu %016llx (%s), answer %s\n", i + 1, total,
               (unsigned long long)h, end, w == len ? "sent" : strerror(errno));
        fflush(stdout);
        close(c);
    }
    close(s);
    return 0;
}

static int connect_host(const char *ip, unsigned port, size_t bytes) {
    int s = socket(ip ? AF_INET : AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm vm = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = port };
    struct sockaddr_in in = { .sin_family = AF_INET, .sin_port = htons((unsigned short)port) };
    if (ip && inet_pton(AF_INET, ip, &in.sin_addr) != 1) {
        printf("connect: bad address %s\n", ip);
        return 64;
    }
    struct sockaddr *addr = ip ? (struct sockaddr *)&in : (struct sockaddr *)&vm;
    socklen_t len = ip ? sizeof in : sizeof vm;
    if (s < 0) {
        printf("connect: socket: %s\n", strerror(errno));
        return 2;
    }
    if (connect(s, addr, len) < 0) {
        printf("connect: port %u refused: %s\n", port, strerror(errno));
        return 3;
    }
    unsigned char buf[16384];
    size_t sent = 0;
    uint64_t h = 0xcbf29ce484222325ULL;
    while (sent < bytes) {
        size_t n = bytes - sent < sizeof buf ? bytes - sent : sizeof buf;
        for (size_t i = 0; i < n; i++)
            buf[i] = pattern(sent + i);
        ssize_t w = write(s, buf, n);
        if (w <= 0) {
            printf("connect: write after %zu bytes: %s\n", sent, strerror(errno));
            return 2;
        }
        h = fnv(h, buf, (size_t)w);
        sent += (size_t)w;
    }
    shutdown(s, SHUT_WR);
    char answer[128] = "";
    size_t got = 0;
    ssize_t n;
    while (got < sizeof answer - 1 && (n = read(s, answer + got, sizeof answer - 1 - got)) > 0)
        got += (size_t)n;
    answer[strcspn(answer, "\n")] = 0;
    printf("connect: sent %zu %016llx, host answered: %s\n", sent, (unsigned long long)h, answer);
    close(s);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int tcp = !strncmp(argv[argc > 1 ? 1 : 0], "tcp-", 4);
    const char *mode = tcp ? argv[1] + 4 : argv[argc > 1 ? 1 : 0];
    if (argc == 5 && !strcmp(mode, "serve"))
        return serve(tcp, (unsigned)strtoul(argv[2], NULL, 10), atoi(argv[3]), (unsigned)strtoul(argv[4], NULL, 10));
    if (!tcp && argc == 4 && !strcmp(mode, "connect"))
        return connect_host(NULL, (unsigned)strtoul(argv[2], NULL, 10), strtoull(argv[3], NULL, 10));
    if (tcp && argc == 5 && !strcmp(mode, "connect"))
        return connect_host(argv[2], (unsigned)strtoul(argv[3], NULL, 10), strtoull(argv[4], NULL, 10));
    fprintf(stderr, "usage: socket_peer [tcp-]serve PORT COUNT DELAY_US | connect PORT BYTES | tcp-connect IP PORT BYTES\n");
    return 64;
}
