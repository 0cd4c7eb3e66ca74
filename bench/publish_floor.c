/* What the kernel alone needs to publish a tree of small files the way cm's
 * receiver does: for each file an unnamed O_TMPFILE file, its data, futimens,
 * then linkat under its name. The source is read first, untimed, so only the
 * destination side is measured. Directories are split between threads.
 *
 *   gcc -O2 -pthread bench/publish_floor.c -o /tmp/publish_floor
 *   /tmp/publish_floor SRC_DIR DST_DIR THREADS     (SRC_DIR: one level of subdirectories of files)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

struct file { char dir[256], name[256]; char *data; ssize_t size; struct timespec mtime; };
static struct file *files;
static size_t nfiles, cap;
static char **dirs;
static size_t ndirs;
static const char *dst;
static int nthreads;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void load(const char *src) {
    DIR *top = opendir(src);
    struct dirent *d;
    if (!top) { perror(src); exit(1); }
    while ((d = readdir(top))) {
        if (d->d_name[0] == '.') continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", src, d->d_name);
        DIR *sub = opendir(path);
        if (!sub) continue;
        dirs = realloc(dirs, (ndirs + 1) * sizeof *dirs);
        dirs[ndirs++] = strdup(d->d_name);
        struct dirent *e;
        while ((e = readdir(sub))) {
            if (e->d_name[0] == '.') continue;
            if (nfiles == cap) { cap = cap ? 2 * cap : 1024; files = realloc(files, cap * sizeof *files); }
            struct file *f = &files[nfiles++];
            snprintf(f->dir, sizeof f->dir, "%s", d->d_name);
            snprintf(f->name, sizeof f->name, "%s", e->d_name);
            int fd = openat(dirfd(sub), e->d_name, O_RDONLY);
            struct stat st;
            fstat(fd, &st);
            f->data = malloc(st.st_size + 1);
            f->size = read(fd, f->data, st.st_size);
            f->mtime = st.st_mtim;
            close(fd);
        }
        closedir(sub);
    }
    closedir(top);
}

static void *publish(void *arg) {
    long id = (long)arg;
    for (size_t d = id; d < ndirs; d += nthreads) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dst, dirs[d]);
        mkdir(path, 0755);
        int dfd = open(path, O_RDONLY | O_DIRECTORY);
        for (size_t i = 0; i < nfiles; i++) {
            struct file *f = &files[i];
            if (strcmp(f->dir, dirs[d])) continue;
            int fd = openat(dfd, ".", O_RDWR | O_TMPFILE | O_CLOEXEC, 0644);
            if (fd < 0 || write(fd, f->data, f->size) != f->size) { perror("write"); exit(1); }
            struct timespec ts[2] = {f->mtime, f->mtime};
            futimens(fd, ts);
            char proc[64];
            snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
            if (linkat(AT_FDCWD, proc, dfd, f->name, AT_SYMLINK_FOLLOW)) { perror("linkat"); exit(1); }
            close(fd);
        }
        close(dfd);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: %s SRC_DIR DST_DIR THREADS\n", argv[0]); return 2; }
    dst = argv[2];
    nthreads = atoi(argv[3]);
    if (nthreads < 1 || nthreads > 64) nthreads = 1;
    load(argv[1]);
    mkdir(dst, 0755);
    double t = now();
    pthread_t th[64];
    for (long i = 0; i < nthreads; i++) pthread_create(&th[i], NULL, publish, (void *)i);
    for (int i = 0; i < nthreads; i++) pthread_join(th[i], NULL);
    t = now() - t;
    printf("%zu files, %d thread(s): %.3f s, %.0f files/s\n", nfiles, nthreads, t, nfiles / t);
    return 0;
}
