/*
 * untar: what CRIU runs as `tar --extract --gzip ... --directory DIR` to refill a
 * container's tmpfs mounts (/dev, /dev/shm, masked /proc dirs) during a restore.
 *
 * GNU tar spends ~4-6 ms per tmpfs here (its own exec, then a fork+exec of `gzip -d`);
 * a restore refills three of them. This reads the gzip stream in-process and handles
 * the entries such dumps hold: directories, regular files, symlinks, hard links,
 * character/block devices and fifos, with GNU long names. Anything else (sparse files,
 * pax headers, unsafe paths, unknown options) makes it hand the unread archive to the
 * real tar, so it is never less capable than GNU tar, only faster on the common case.
 *
 * Built by runtimed/criu_env.py at node start and put first on PATH for restores only.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <unistd.h>
#include <zlib.h>

#define REAL_TAR "/usr/bin/tar"
#define MAX_DIRS 4096

static char **g_argv;

/* Give up on the fast path: rewind the archive and let GNU tar do it all. Files already
 * written are simply written again. */
static void fallback(const char *why)
{
	if (getenv("RUNTIMED_UNTAR_DEBUG"))
		fprintf(stderr, "untar: falling back to %s: %s\n", REAL_TAR, why);
	if (lseek(0, 0, SEEK_SET) != 0) {
		fprintf(stderr, "untar: cannot rewind the archive for %s: %s\n", REAL_TAR, why);
		exit(2);
	}
	g_argv[0] = REAL_TAR;
	execv(REAL_TAR, g_argv);
	perror("untar: exec tar");
	exit(2);
}

static unsigned long long octal(const char *p, int n)
{
	unsigned long long v = 0;
	if ((unsigned char)p[0] & 0x80) /* GNU base-256: not in tmpfs dumps */
		fallback("base-256 number");
	for (int i = 0; i < n && p[i]; i++) {
		if (p[i] == ' ')
			continue;
		if (p[i] < '0' || p[i] > '7')
			break;
		v = v * 8 + (p[i] - '0');
	}
	return v;
}

static void read_exact(gzFile gz, void *buf, size_t n)
{
	size_t got = 0;
	while (got < n) {
		int r = gzread(gz, (char *)buf + got, (unsigned)(n - got));
		if (r <= 0)
			fallback("short read");
		got += r;
	}
}

/* Paths are relative to the target directory: no absolute paths, no "..". */
static int safe_path(const char *p)
{
	if (p[0] == '/')
		return 0;
	for (const char *s = p; *s;) {
		const char *e = strchr(s, '/');
		size_t len = e ? (size_t)(e - s) : strlen(s);
		if (len == 2 && s[0] == '.' && s[1] == '.')
			return 0;
		if (!e)
			break;
		s = e + 1;
	}
	return 1;
}

static char *read_long(gzFile gz, unsigned long long size)
{
	if (size > 65536)
		fallback("long name too long");
	char *s = calloc(1, (size + 511) / 512 * 512 + 1);
	if (!s)
		fallback("out of memory");
	read_exact(gz, s, (size + 511) / 512 * 512);
	s[size] = 0;
	return s;
}

struct dirmeta {
	char *path;
	mode_t mode;
	uid_t uid;
	gid_t gid;
	time_t mtime;
};

int main(int argc, char **argv)
{
	g_argv = argv;
	const char *dir = NULL;
	int extract = 0, gzip = 0;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--extract") || !strcmp(argv[i], "-x"))
			extract = 1;
		else if (!strcmp(argv[i], "--gzip") || !strcmp(argv[i], "-z"))
			gzip = 1;
		else if (!strcmp(argv[i], "--directory") && i + 1 < argc)
			dir = argv[++i];
		else if (strcmp(argv[i], "--no-unquote") && strcmp(argv[i], "--no-wildcards"))
			fallback("an option this extractor does not know");
	}
	if (!extract || !gzip || !dir)
		fallback("not a gzip extraction into a directory");
	if (chdir(dir) != 0) {
		fprintf(stderr, "untar: %s: %s\n", dir, strerror(errno));
		return 2;
	}
	int fd = dup(0);
	gzFile gz = gzdopen(fd, "rb");
	if (!gz)
		fallback("gzdopen");
	umask(0);

	static struct dirmeta dirs[MAX_DIRS];
	int ndirs = 0;
	char *longname = NULL, *longlink = NULL;
	char h[512], name[257], linkname[101];
	int zero_blocks = 0;

	for (;;) {
		read_exact(gz, h, 512);
		int all_zero = 1;
		for (int i = 0; i < 512; i++)
			if (h[i]) {
				all_zero = 0;
				break;
			}
		if (all_zero) {
			if (++zero_blocks == 2)
				break;
			continue;
		}
		zero_blocks = 0;
		unsigned long long sum = 0;
		for (int i = 0; i < 512; i++)
			sum += (i >= 148 && i < 156) ? ' ' : (unsigned char)h[i];
		if (sum != octal(h + 148, 8))
			fallback("bad header checksum");

		char type = h[156] ? h[156] : '0';
		unsigned long long size = octal(h + 124, 12);
		if (type == 'L') {
			free(longname);
			longname = read_long(gz, size);
			continue;
		}
		if (type == 'K') {
			free(longlink);
			longlink = read_long(gz, size);
			continue;
		}
		if (!longname && !memcmp(h + 257, "ustar", 5) && h[345] && memcmp(h + 257, "ustar  ", 7)) {
			snprintf(name, sizeof(name), "%.155s/%.100s", h + 345, h);
		} else if (!longname) {
			snprintf(name, sizeof(name), "%.100s", h);
		}
		const char *path = longname ? longname : name;
		snprintf(linkname, sizeof(linkname), "%.100s", h + 157);
		const char *target = longlink ? longlink : linkname;
		while (type == '1' && target[0] == '.' && target[1] == '/')
			target += 2;
		mode_t mode = octal(h + 100, 8) & 07777;
		uid_t uid = octal(h + 108, 8);
		gid_t gid = octal(h + 116, 8);
		time_t mtime = octal(h + 136, 12);

		/* "./x" -> "x"; "." or "./" is the target directory itself */
		while (path[0] == '.' && path[1] == '/')
			path += 2;
		int is_root = path[0] == 0 || !strcmp(path, ".");
		if (!is_root && !safe_path(path))
			fallback("unsafe path");

		switch (type) {
		case '5': /* directory: created now, mode/owner/mtime set at the end */
			if (!is_root && mkdir(path, 0700) != 0 && errno != EEXIST)
				fallback("mkdir");
			if (ndirs == MAX_DIRS)
				fallback("too many directories");
			dirs[ndirs++] = (struct dirmeta){strdup(is_root ? "." : path), mode, uid, gid, mtime};
			break;
		case '0':
		case '7': {
			unlink(path);
			int out = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0600);
			if (out < 0)
				fallback("create file");
			char buf[65536];
			unsigned long long left = size;
			while (left) {
				size_t n = left > sizeof(buf) ? sizeof(buf) : left;
				read_exact(gz, buf, n);
				if (write(out, buf, n) != (ssize_t)n)
					fallback("write");
				left -= n;
			}
			if (size % 512) {
				read_exact(gz, buf, 512 - size % 512);
			}
			if (fchown(out, uid, gid) || fchmod(out, mode))
				fallback("file owner/mode");
			struct timespec ts[2] = {{mtime, 0}, {mtime, 0}};
			futimens(out, ts);
			close(out);
			break;
		}
		case '1':
			if (!safe_path(target))
				fallback("unsafe link target");
			unlink(path);
			if (link(target, path) != 0)
				fallback("hard link");
			break;
		case '2': {
			unlink(path);
			if (symlink(target, path) != 0)
				fallback("symlink");
			if (lchown(path, uid, gid))
				fallback("symlink owner");
			struct timespec ts[2] = {{mtime, 0}, {mtime, 0}};
			utimensat(AT_FDCWD, path, ts, AT_SYMLINK_NOFOLLOW);
			break;
		}
		case '3':
		case '4':
		case '6': {
			mode_t kind = type == '3' ? S_IFCHR : type == '4' ? S_IFBLK : S_IFIFO;
			dev_t dev = makedev(octal(h + 329, 8), octal(h + 337, 8));
			unlink(path);
			if (mknod(path, kind | mode, dev) != 0)
				fallback("mknod");
			if (lchown(path, uid, gid) || chmod(path, mode))
				fallback("node owner/mode");
			struct timespec ts[2] = {{mtime, 0}, {mtime, 0}};
			utimensat(AT_FDCWD, path, ts, AT_SYMLINK_NOFOLLOW);
			break;
		}
		default:
			fallback("an entry type this extractor does not handle");
		}
		free(longname);
		free(longlink);
		longname = longlink = NULL;
	}
	/* deepest first, so setting a parent's mtime is not undone by its children */
	for (int i = ndirs - 1; i >= 0; i--) {
		struct dirmeta *d = &dirs[i];
		if (lchown(d->path, d->uid, d->gid) || chmod(d->path, d->mode))
			fallback("directory owner/mode");
		struct timespec ts[2] = {{d->mtime, 0}, {d->mtime, 0}};
		utimensat(AT_FDCWD, d->path, ts, AT_SYMLINK_NOFOLLOW);
	}
	gzclose(gz);
	return 0;
}
