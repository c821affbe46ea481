/*
 * Runs inside the QEMU guest as root, from the initramfs's /init, and
 * exercises set_ipv4root and new_s_context. Prints one line per check:
 * "ok NAME" or "not ok NAME: why", then "vxtest done". The host side
 * (kernel-patch/linux/test) parses the serial console.
 *
 * The guest's lo carries 10.0.2.15 (the vserver's address) and 10.0.2.16
 * (another address of the host) besides 127.0.0.1.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <dirent.h>

#define NR_SET_IPV4ROOT 600
#define NR_NEW_S_CONTEXT 601
#define VX_CTX_NEW 0xffffffffu
#define VXF_LOCK 1

static const char *ROOT = "10.0.2.15";
static const char *OTHER = "10.0.2.16";

static void report(int ok, const char *name, const char *fmt, ...)
{
	if (ok) {
		printf("ok %s\n", name);
	} else {
		va_list ap;
		printf("not ok %s: ", name);
		va_start(ap, fmt);
		vprintf(fmt, ap);
		va_end(ap);
		printf("\n");
	}
	fflush(stdout);
}

static long set_ipv4root(const char *ip)
{
	struct in_addr a = {0};
	if (ip)
		inet_pton(AF_INET, ip, &a);
	return syscall(NR_SET_IPV4ROOT, a.s_addr, 0);
}

static long new_s_context(unsigned int ctx, unsigned int flags)
{
	return syscall(NR_NEW_S_CONTEXT, ctx, flags);
}

/* The value of "key:" in /proc/PID/status ("self" for pid 0). */
static void status_field(int pid, const char *key, char *out, size_t n)
{
	char path[64], line[256];
	size_t klen = strlen(key);
	FILE *f;

	out[0] = 0;
	if (pid)
		snprintf(path, sizeof path, "/proc/%d/status", pid);
	else
		snprintf(path, sizeof path, "/proc/self/status");
	f = fopen(path, "r");
	if (!f)
		return;
	while (fgets(line, sizeof line, f)) {
		if (!strncmp(line, key, klen) && line[klen] == ':') {
			char *v = line + klen + 1;
			while (*v == '\t' || *v == ' ')
				v++;
			v[strcspn(v, "\n")] = 0;
			snprintf(out, n, "%s", v);
			break;
		}
	}
	fclose(f);
}

static struct sockaddr_in sin_of(const char *ip, int port)
{
	struct sockaddr_in s = {.sin_family = AF_INET, .sin_port = htons(port)};
	inet_pton(AF_INET, ip, &s.sin_addr);
	return s;
}

static const char *local_ip(int fd, char *buf)
{
	struct sockaddr_in s;
	socklen_t l = sizeof s;
	if (getsockname(fd, (struct sockaddr *)&s, &l))
		return "getsockname failed";
	return inet_ntop(AF_INET, &s.sin_addr, buf, 32);
}

/* Runs fn in a child; the child's exit status 0 means the checks in it passed. */
static int in_child(int (*fn)(void))
{
	int st;
	pid_t p = fork();
	if (p == 0)
		_exit(fn());
	waitpid(p, &st, 0);
	return WIFEXITED(st) ? WEXITSTATUS(st) : 99;
}

/* ---- ipv4root, as an unprivileged user ---------------------------------- */

static int tcp_listener_other; /* a server on OTHER, made before pinning */
static int udp_receiver_other;

static int ipv4root_checks(void)
{
	char buf[32], v[64];
	int fd, failed = 0;
	struct sockaddr_in s;

	if (setgid(65534) || setuid(65534)) {
		report(0, "unprivileged", "setuid: %s", strerror(errno));
		return 1;
	}
	long r = set_ipv4root(ROOT);
	report(r == 0, "set_ipv4root_unprivileged", "returned %ld errno %s", r, strerror(errno));
	failed |= r != 0;

	status_field(0, "ipv4root", v, sizeof v);
	report(!strcmp(v, ROOT), "status_shows_ipv4root", "ipv4root: %s", v);
	failed |= strcmp(v, ROOT) != 0;

	r = set_ipv4root(OTHER);
	report(r == -1 && errno == EPERM, "one_shot", "second address: %ld %s", r, strerror(errno));
	failed |= !(r == -1 && errno == EPERM);
	r = set_ipv4root(ROOT);
	report(r == 0, "same_address_again", "%ld %s", r, strerror(errno));
	failed |= r != 0;

	/* bind(0.0.0.0) lands on the ipv4root. */
	fd = socket(AF_INET, SOCK_STREAM, 0);
	s = sin_of("0.0.0.0", 0);
	r = bind(fd, (struct sockaddr *)&s, sizeof s);
	local_ip(fd, buf);
	report(r == 0 && !strcmp(buf, ROOT), "bind_any_becomes_ipv4root", "bind %ld, local %s", r, buf);
	failed |= !(r == 0 && !strcmp(buf, ROOT));
	close(fd);

	/* bind(another address) is refused; loopback is allowed. */
	fd = socket(AF_INET, SOCK_DGRAM, 0);
	s = sin_of(OTHER, 0);
	r = bind(fd, (struct sockaddr *)&s, sizeof s);
	report(r == -1 && errno == EPERM, "bind_other_refused", "bind %ld %s", r, strerror(errno));
	failed |= !(r == -1 && errno == EPERM);
	s = sin_of("127.0.0.1", 0);
	r = bind(fd, (struct sockaddr *)&s, sizeof s);
	report(r == 0, "bind_loopback_allowed", "bind %ld %s", r, strerror(errno));
	failed |= r != 0;
	close(fd);

	/* listen() without bind() listens on the ipv4root only. */
	fd = socket(AF_INET, SOCK_STREAM, 0);
	r = listen(fd, 4);
	local_ip(fd, buf);
	report(r == 0 && !strcmp(buf, ROOT), "listen_without_bind", "listen %ld, local %s", r, buf);
	failed |= !(r == 0 && !strcmp(buf, ROOT));
	close(fd);

	/* connect() from an unbound TCP socket uses the ipv4root as source. */
	{
		struct sockaddr_in srv;
		socklen_t l = sizeof srv;
		getsockname(tcp_listener_other, (struct sockaddr *)&srv, &l);
		fd = socket(AF_INET, SOCK_STREAM, 0);
		r = connect(fd, (struct sockaddr *)&srv, sizeof srv);
		local_ip(fd, buf);
		report(r == 0 && !strcmp(buf, ROOT), "tcp_connect_source", "connect %ld (%s), source %s",
		       r, strerror(errno), buf);
		failed |= !(r == 0 && !strcmp(buf, ROOT));
		close(fd);
	}

	/* sendto() from an unbound UDP socket: the receiver sees the ipv4root. */
	{
		struct sockaddr_in dst, from;
		socklen_t l = sizeof dst;
		char got[8];
		getsockname(udp_receiver_other, (struct sockaddr *)&dst, &l);
		fd = socket(AF_INET, SOCK_DGRAM, 0);
		r = sendto(fd, "hi", 2, 0, (struct sockaddr *)&dst, sizeof dst);
		l = sizeof from;
		ssize_t n = recvfrom(udp_receiver_other, got, sizeof got, 0, (struct sockaddr *)&from, &l);
		inet_ntop(AF_INET, &from.sin_addr, buf, sizeof buf);
		report(r == 2 && n == 2 && !strcmp(buf, ROOT), "udp_send_source", "sent %ld got %zd from %s",
		       r, n, buf);
		failed |= !(r == 2 && n == 2 && !strcmp(buf, ROOT));
		close(fd);
	}

	/* Children inherit it. */
	{
		int p[2];
		char cv[64] = "";
		if (pipe(p) == 0) {
			pid_t c = fork();
			if (c == 0) {
				status_field(0, "ipv4root", cv, sizeof cv);
				write(p[1], cv, strlen(cv) + 1);
				_exit(0);
			}
			read(p[0], cv, sizeof cv);
			waitpid(c, NULL, 0);
		}
		report(!strcmp(cv, ROOT), "inherited_by_children", "child ipv4root: %s", cv);
		failed |= strcmp(cv, ROOT) != 0;
	}

	/* An unprivileged task cannot make a context. */
	r = new_s_context(VX_CTX_NEW, 0);
	report(r == -1 && errno == EPERM, "new_s_context_needs_privilege", "%ld %s", r, strerror(errno));
	failed |= !(r == -1 && errno == EPERM);
	return failed;
}

/* ---- contexts ------------------------------------------------------------ */

static int count_pids(const char *procdir)
{
	DIR *d = opendir(procdir);
	struct dirent *e;
	int n = 0;
	if (!d)
		return -1;
	while ((e = readdir(d)))
		if (e->d_name[0] >= '0' && e->d_name[0] <= '9')
			n++;
	closedir(d);
	return n;
}

static int new_context_checks(void)
{
	char v[64];
	int failed = 0, st;
	long ctx = new_s_context(VX_CTX_NEW, 0);
	report(ctx >= 2, "new_context_number", "returned %ld (%s)", ctx, strerror(errno));
	if (ctx < 2)
		return 1;
	status_field(0, "s_context", v, sizeof v);
	report(atol(v) == ctx, "status_shows_s_context", "s_context: %s, want %ld", v, ctx);
	failed |= atol(v) != ctx;

	pid_t c = fork();
	if (c == 0) {
		/* Born in the context: pid 1 of its own PID namespace; sees
		 * only its context's processes; its hostname is its own. */
		int bad = 0;
		char cv[64];
		if (getpid() != 1) {
			report(0, "context_pid_namespace", "getpid() = %d", getpid());
			bad = 1;
		} else {
			report(1, "context_pid_namespace", "");
		}
		status_field(0, "s_context", cv, sizeof cv);
		report(atol(cv) == ctx, "context_inherited", "child s_context: %s", cv);
		bad |= atol(cv) != ctx;
		if (unshare(CLONE_NEWNS) == 0 && mount("none", "/", NULL, MS_REC | MS_PRIVATE, NULL) == 0 &&
		    mkdir("/ctxproc", 0755) == 0 && mount("proc", "/ctxproc", "proc", 0, NULL) == 0) {
			int n = count_pids("/ctxproc");
			report(n == 1, "context_sees_only_itself", "%d processes visible", n);
			bad |= n != 1;
		} else {
			report(0, "context_sees_only_itself", "mounting proc: %s", strerror(errno));
			bad = 1;
		}
		sethostname("inside", 6);
		_exit(bad);
	}
	waitpid(c, &st, 0);
	failed |= !(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	return failed;
}

static int lock_checks(void)
{
	long r = new_s_context(VX_CTX_NEW, VXF_LOCK);
	if (r < 2) {
		report(0, "lock", "new context with lock: %ld %s", r, strerror(errno));
		return 1;
	}
	r = new_s_context(VX_CTX_NEW, 0);
	report(r == -1 && errno == EPERM, "lock", "after lock: %ld %s", r, strerror(errno));
	return !(r == -1 && errno == EPERM);
}

static int spectator_checks(void)
{
	int failed = 0;
	long r = new_s_context(1, 0);
	report(r == 1, "spectator_enter", "%ld %s", r, strerror(errno));
	if (r != 1)
		return 1;
	int n = count_pids("/proc");
	report(n > 2, "spectator_sees_all", "%d processes visible", n);
	failed |= n <= 2;
	r = kill(1, 0);
	report(r == -1 && errno == EPERM, "spectator_signals_none", "kill(1, 0) = %ld %s", r, strerror(errno));
	failed |= !(r == -1 && errno == EPERM);
	return failed;
}

/* Context 0's root enters a context that has a process living in it. */
static int enter_checks(void)
{
	int p[2], failed = 0;
	long ctx = -1;
	pid_t owner;
	char hn[64] = "";

	if (pipe(p))
		return 1;
	owner = fork();
	if (owner == 0) {
		long c = new_s_context(VX_CTX_NEW, 0);
		pid_t member = fork();
		if (member == 0) {
			sethostname("ctxhost", 7);
			write(p[1], &c, sizeof c);
			pause();
			_exit(0);
		}
		waitpid(member, NULL, 0);
		_exit(0);
	}
	read(p[0], &ctx, sizeof ctx);
	pid_t c = fork();
	if (c == 0) {
		long r = new_s_context((unsigned int)ctx, 0);
		int bad = 0;
		report(r == ctx, "enter_existing", "new_s_context(%ld) = %ld %s", ctx, r, strerror(errno));
		bad |= r != ctx;
		gethostname(hn, sizeof hn);
		report(!strcmp(hn, "ctxhost"), "enter_shares_uts", "hostname %s", hn);
		bad |= strcmp(hn, "ctxhost") != 0;
		pid_t g = fork();
		if (g == 0)
			_exit(getpid() == 1 ? 1 : 0); /* pid 1 would be a new namespace */
		int st;
		waitpid(g, &st, 0);
		report(WIFEXITED(st) && WEXITSTATUS(st) == 0, "enter_joins_pid_namespace", "");
		bad |= !(WIFEXITED(st) && WEXITSTATUS(st) == 0);
		_exit(bad);
	}
	int st;
	waitpid(c, &st, 0);
	failed |= !(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	/* The owner's member sleeps in pause(): end the whole group. */
	kill(owner, SIGKILL);
	waitpid(owner, NULL, 0);
	return failed;
}

static int setup_servers(void)
{
	struct sockaddr_in s = sin_of(OTHER, 0);
	tcp_listener_other = socket(AF_INET, SOCK_STREAM, 0);
	if (bind(tcp_listener_other, (struct sockaddr *)&s, sizeof s) || listen(tcp_listener_other, 4))
		return -1;
	udp_receiver_other = socket(AF_INET, SOCK_DGRAM, 0);
	s = sin_of(OTHER, 0);
	if (bind(udp_receiver_other, (struct sockaddr *)&s, sizeof s))
		return -1;
	return 0;
}

/* `vxtest listen`: listen() on a never-bound IPv4 socket and print the
 * local address it got (run under `vsha ctx exec --ip` by the test). */
static int listen_unbound(void)
{
	char buf[32];
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0 || listen(fd, 1)) {
		printf("listen failed: %s\n", strerror(errno));
		return 1;
	}
	printf("listening on %s\n", local_ip(fd, buf));
	return 0;
}

int main(int argc, char **argv)
{
	char v[64], hn[64];
	int failed = 0;

	if (argc > 1 && !strcmp(argv[1], "listen"))
		return listen_unbound();
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("vxtest start\n");
	status_field(0, "__NR_set_ipv4root", v, sizeof v);
	report(atoi(v) == NR_SET_IPV4ROOT, "advertised_in_status", "__NR_set_ipv4root: '%s'", v);
	if (atoi(v) != NR_SET_IPV4ROOT || getppid() != 1) {
		/* Not the patched guest (it changes hostnames and spawns
		 * sleepers): stop here. */
		printf("vxtest done FAILED (not in the patched guest's init)\n");
		return 1;
	}
	status_field(0, "s_context", v, sizeof v);
	report(!strcmp(v, "0"), "host_is_context_0", "s_context: '%s'", v);
	if (setup_servers()) {
		report(0, "setup", "servers on %s: %s", OTHER, strerror(errno));
		failed = 1;
	}
	gethostname(hn, sizeof hn);
	failed |= in_child(ipv4root_checks);
	failed |= in_child(new_context_checks);
	gethostname(v, sizeof v);
	report(!strcmp(v, hn), "context_uts_isolated", "host hostname became %s", v);
	failed |= in_child(lock_checks);
	failed |= in_child(spectator_checks);
	failed |= in_child(enter_checks);
	printf("vxtest done %s\n", failed ? "FAILED" : "PASSED");
	return failed;
}
