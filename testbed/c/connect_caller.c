/* A client that calls connect() from a function of its own, through the system's libc.
 *
 *   connect_caller ADDR PORT [threaded] [hold]
 *
 * Connects once to ADDR:PORT (IPv4) from synspan_c_connect_caller, directly: the frame the
 * stack must show right under libc's connect. "threaded" makes the call from a second thread
 * (glibc's wrapper then keeps a frame of 0x18 bytes); "hold" keeps the process alive for a
 * second after the attempt, else it exits at once. Prints the outcome's errno. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* Which build this is (the test names each one): two builds with the same flags would
 * otherwise be the same bytes, with the same build id. */
#ifndef SYNSPAN_VARIANT
#define SYNSPAN_VARIANT "default"
#endif
__attribute__((used)) static const char variant[] = SYNSPAN_VARIANT;

static const char *addr;
static int port;

__attribute__((noinline)) int synspan_c_connect_caller(int fd) {
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    sin.sin_port = htons(port);
    inet_pton(AF_INET, addr, &sin.sin_addr);
    int ret = connect(fd, (struct sockaddr *)&sin, sizeof sin);
    /* Keeps the call from being a tail call: the caller's frame stays on the stack. */
    return ret < 0 ? errno : 0;
}

static void *attempt(void *unused) {
    (void)unused;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int err = synspan_c_connect_caller(fd);
    printf("%d\n", err);
    fflush(stdout);
    close(fd);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s ADDR PORT [threaded] [hold]\n", argv[0]);
        return 2;
    }
    addr = argv[1];
    port = atoi(argv[2]);
    int threaded = 0, hold = 0;
    for (int i = 3; i < argc; i++) {
        threaded |= strcmp(argv[i], "threaded") == 0;
        hold |= strcmp(argv[i], "hold") == 0;
    }
    if (threaded) {
        pthread_t thread;
        pthread_create(&thread, NULL, attempt, NULL);
        pthread_join(thread, NULL);
    } else {
        attempt(NULL);
    }
    if (hold)
        sleep(1);
    return 0;
}
