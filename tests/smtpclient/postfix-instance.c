/*
 * postfix-instance.c - a private Postfix for tests against the real
 * server; see postfix-instance.h
 *
 * Why a watchdog process and not an atexit() handler: an assertion
 * aborts the test program, and abort() runs no handler.  The watchdog
 * is forked before anything is started and learns the pids from files
 * (the master's own pid file, pids/NAME.pid for helpers), so it knows
 * every process however early the test dies.  It runs in a session of
 * its own: on a time-out meson kills the test's whole process group,
 * and a watchdog in that group would die with it, leaving the master
 * (which "postfix start" detaches) running.
 *
 * The log helpers read Postfix's maillog_file, which postlogd writes
 * a little after the event: they poll with a deadline.
 *
 * Why ports stay reserved through the start: "postfix start" takes
 * seconds on a loaded machine, and a port let go before it could be
 * taken meanwhile by any other process (a connect() of a parallel test
 * gets a free ephemeral port as its local one), so the master failed to
 * bind and the test died.  The reserving socket has SO_REUSEADDR and
 * never listens: Linux then lets a server that sets SO_REUSEADDR too
 * (Postfix's inet_listen() does, in the master and smtp-sink) bind and
 * listen beside it, while no automatic choice of port (connect(),
 * bind() to port 0) ever picks a port that has a bound socket.
 */
#include "postfix-instance.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <glib/gstdio.h>

#define WAIT_US (10 * G_USEC_PER_SEC)

struct PostfixInstance {
	char *dir; /* everything lives under it */
	char *conf, *queue, *pids, *maillog;
	GArray *smtpd_ports;  /* guint16: what start waits for */
	GHashTable *reserved; /* port -> bound socket fd + 1 */
	GArray *helpers;      /* GPid: reaped once the watchdog is done */
	pid_t watchdog;
	int watchdog_fd; /* write end; its closing wakes the watchdog */
};

/* ------------------------------------------------------------------ */
/* Processes and ports                                                  */
/* ------------------------------------------------------------------ */

/* Run @argv and wait; on failure, *@why (transfer full) says why. */
static gboolean
run(const char *const *argv, char **why)
{
	g_autofree char *out = NULL, *err = NULL;
	g_autoptr(GError) error = NULL;
	int status;

	if (g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_SEARCH_PATH, NULL,
	                 NULL, &out, &err, &status, &error) &&
	    g_spawn_check_wait_status(status, &error))
		return TRUE;
	*why = g_strdup_printf("%s: %s %s%s", argv[0], error->message,
	                       out ? out : "", err ? err : "");
	return FALSE;
}

void
postfix_instance_run(const char *const *argv)
{
	g_autofree char *why = NULL;

	if (!run(argv, &why))
		g_error("%s", why);
}

static void
postconf(PostfixInstance *pf, const char *opt, const char *arg)
{
	postfix_instance_run(
	    (const char *const[]){"postconf", "-c", pf->conf, opt, arg, NULL});
}

static gboolean
port_open(guint16 port)
{
	struct sockaddr_in sa = {.sin_family = AF_INET};
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	gboolean ok;

	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	sa.sin_port = htons(port);
	ok = connect(fd, (void *)&sa, sizeof(sa)) == 0;
	close(fd);
	return ok;
}

/*
 * Fail the test with @what and the end of Postfix's log: the watchdog
 * removes the directory, log included, as soon as this program ends.
 */
static G_NORETURN void
fail(const PostfixInstance *pf, const char *what)
{
	g_autofree char *log = postfix_instance_log(pf);
	gsize len = strlen(log);
	const char *tail = len > 8000 ? log + len - 8000 : log;

	g_error("%s\nthe end of %s:\n%s", what, pf->maillog, tail);
}

static void
wait_port(PostfixInstance *pf, guint16 port)
{
	gint64 deadline = g_get_monotonic_time() + WAIT_US;

	while (!port_open(port)) {
		if (g_get_monotonic_time() > deadline) {
			g_autofree char *what =
			    g_strdup_printf("nothing listens on port %u", port);

			fail(pf, what);
		}
		g_usleep(20 * 1000);
	}
}

/* Let go of a reserved port once its server listens on it. */
static void
release_port(PostfixInstance *pf, guint16 port)
{
	gpointer fd;

	if (g_hash_table_steal_extended(pf->reserved, GUINT_TO_POINTER(port),
	                                NULL, &fd))
		close(GPOINTER_TO_INT(fd) - 1);
}

guint16
postfix_instance_port(PostfixInstance *pf)
{
	struct sockaddr_in sa = {.sin_family = AF_INET};
	socklen_t len = sizeof(sa);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	int on = 1;
	guint16 port;

	g_assert_cmpint(fd, >=, 0);
	/* So the server can bind beside it (see the top of this file). */
	g_assert_cmpint(
	    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on)), ==, 0);
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	g_assert_cmpint(bind(fd, (void *)&sa, sizeof(sa)), ==, 0);
	g_assert_cmpint(getsockname(fd, (void *)&sa, &len), ==, 0);
	port = ntohs(sa.sin_port);
	g_hash_table_insert(pf->reserved, GUINT_TO_POINTER(port),
	                    GINT_TO_POINTER(fd + 1));
	return port;
}

static gboolean
pid_alive(pid_t pid)
{
	g_autofree char *path = g_strdup_printf("/proc/%d/stat", (int)pid);
	g_autofree char *stat = NULL;
	const char *paren;

	if (!g_file_get_contents(path, &stat, NULL, NULL))
		return FALSE;
	/* A zombie nobody reaps (no init in a container) is gone too. */
	paren = strrchr(stat, ')');
	return paren == NULL || paren[1] == '\0' || paren[2] != 'Z';
}

static pid_t
read_pid(const char *path)
{
	g_autofree char *text = NULL;

	if (!g_file_get_contents(path, &text, NULL, NULL))
		return 0;
	return atoi(g_strstrip(text));
}

/* SIGTERM, up to @tenths of 0.1 s to go, then SIGKILL. */
static void
stop_pid(pid_t pid, int tenths)
{
	if (pid <= 0)
		return;
	kill(pid, SIGTERM);
	for (int i = 0; i < tenths && pid_alive(pid); i++)
		g_usleep(100 * 1000);
	if (pid_alive(pid))
		kill(pid, SIGKILL);
}

/* ------------------------------------------------------------------ */
/* The watchdog                                                         */
/* ------------------------------------------------------------------ */

/* Waits for this process to end (EOF on the pipe), then stops the
 * master and the helpers by pid and removes the directory. */
static void
watchdog(PostfixInstance *pf, int fd)
{
	g_autofree char *master =
	    g_build_filename(pf->queue, "pid", "master.pid", NULL);
	GDir *dir;
	const char *name;
	char c;
	int null = open("/dev/null", O_RDWR);

	/* Out of the test's process group, which a time-out kills. */
	setsid();

	/* Hold no pipe of the test runner, or it waits for us. */
	dup2(null, 0);
	dup2(null, 1);
	dup2(null, 2);
	while (read(fd, &c, 1) != 0 && errno == EINTR)
		;

	stop_pid(read_pid(master), 150);
	dir = g_dir_open(pf->pids, 0, NULL);
	while (dir != NULL && (name = g_dir_read_name(dir)) != NULL) {
		g_autofree char *path = g_build_filename(pf->pids, name, NULL);

		stop_pid(read_pid(path), 30);
	}
	execlp("rm", "rm", "-rf", pf->dir, (char *)NULL);
	_exit(1);
}

static void
start_watchdog(PostfixInstance *pf)
{
	int fds[2];

	g_assert_cmpint(pipe2(fds, O_CLOEXEC), ==, 0);
	pf->watchdog = fork();
	g_assert_cmpint(pf->watchdog, >=, 0);
	if (pf->watchdog == 0) {
		close(fds[1]);
		watchdog(pf, fds[0]);
	}
	close(fds[0]);
	pf->watchdog_fd = fds[1];
}

/* ------------------------------------------------------------------ */
/* Set-up                                                               */
/* ------------------------------------------------------------------ */

/* main.cf for every test, master.cf from Debian's with no port 25. */
static void
configure(PostfixInstance *pf)
{
	g_autofree char *data = g_build_filename(pf->dir, "data", NULL);
	g_autofree char *main_cf = g_build_filename(pf->conf, "main.cf", NULL);
	g_autofree char *master_cf =
	    g_build_filename(pf->conf, "master.cf", NULL);
	g_autofree char *master = NULL;
	g_autofree char *set = g_strdup_printf(
	    "compatibility_level=3.6 queue_directory=%s data_directory=%s "
	    "maillog_file=%s maillog_file_prefixes=%s "
	    "myhostname=mta.postfix.test mydomain=postfix.test "
	    "myorigin=postfix.test "
	    "inet_interfaces=loopback-only inet_protocols=ipv4 "
	    "mynetworks=127.0.0.0/8 mydestination= alias_maps= "
	    "alias_database= local_recipient_maps= "
	    "default_transport=discard relay_transport=discard "
	    "smtp_dns_support_level=disabled biff=no "
	    "smtpd_tls_loglevel=1 smtpd_tls_security_level=none",
	    pf->queue, data, pf->maillog, pf->dir);
	g_auto(GStrv) settings = g_strsplit(set, " ", -1);
	g_autoptr(GError) error = NULL;

	g_assert_cmpint(g_mkdir(pf->conf, 0755), ==, 0);
	g_assert_cmpint(g_mkdir(pf->queue, 0755), ==, 0);
	g_assert_cmpint(g_mkdir(pf->pids, 0755), ==, 0);
	g_assert_cmpint(g_mkdir(data, 0755), ==, 0);

	/* Postfix's own user writes master.lock there. */
	postfix_instance_run(
	    (const char *const[]){"chown", "postfix", data, NULL});
	if (!g_file_get_contents("/usr/share/postfix/master.cf.dist", &master,
	                         NULL, &error) ||
	    !g_file_set_contents(master_cf, master, -1, &error) ||
	    !g_file_set_contents(main_cf, "", 0, &error))
		g_error("private Postfix: %s", error->message);
	for (guint i = 0; settings[i] != NULL; i++)
		postconf(pf, "-e", settings[i]);

	/* Never port 25: the default smtpd goes, ours come in later. */
	postconf(pf, "-MX", "smtp/inet");
}

PostfixInstance *
postfix_instance_new(const char **skip)
{
	g_autoptr(GError) error = NULL;
	g_autofree char *postfix = g_find_program_in_path("postfix");
	PostfixInstance *pf;

	if (postfix == NULL &&
	    !g_file_test("/usr/sbin/postfix", G_FILE_TEST_IS_EXECUTABLE)) {
		*skip = "postfix is not installed";
		return NULL;
	}
	if (geteuid() != 0) {
		*skip = "postfix start needs root";
		return NULL;
	}

	/* A directory Postfix's own user can walk into. */
	pf = g_new0(PostfixInstance, 1);
	pf->dir = g_dir_make_tmp("smtpclient-postfix-XXXXXX", &error);
	g_assert_no_error(error);
	g_assert_cmpint(chmod(pf->dir, 0755), ==, 0);
	pf->conf = g_build_filename(pf->dir, "conf", NULL);
	pf->queue = g_build_filename(pf->dir, "queue", NULL);
	pf->pids = g_build_filename(pf->dir, "pids", NULL);
	pf->maillog = g_build_filename(pf->dir, "maillog", NULL);
	pf->smtpd_ports = g_array_new(FALSE, FALSE, sizeof(guint16));
	pf->reserved = g_hash_table_new(NULL, NULL);
	pf->helpers = g_array_new(FALSE, FALSE, sizeof(GPid));
	pf->watchdog_fd = -1;

	/* The watchdog before anything it must stop exists. */
	start_watchdog(pf);
	configure(pf);
	return pf;
}

const char *
postfix_instance_dir(const PostfixInstance *pf)
{
	return pf->dir;
}

const char *
postfix_instance_conf(const PostfixInstance *pf)
{
	return pf->conf;
}

void
postfix_instance_set(PostfixInstance *pf, const char *setting)
{
	postconf(pf, "-e", setting);
}

void
postfix_instance_add_smtpd(PostfixInstance *pf, guint16 port,
                           const char *options)
{
	g_autofree char *line = g_strdup_printf(
	    "127.0.0.1:%u/inet=127.0.0.1:%u inet n - n - - smtpd"
	    " -o debug_peer_list=127.0.0.1 -o debug_peer_level=1 %s",
	    port, port, options ? options : "");

	postconf(pf, "-M", line);
	g_array_append_val(pf->smtpd_ports, port);
}

void
postfix_instance_spawn(PostfixInstance *pf, const char *name, guint16 port,
                       const char *const *argv)
{
	g_autofree char *log_name = g_strconcat(name, ".log", NULL);
	g_autofree char *log = g_build_filename(pf->dir, log_name, NULL);
	g_autofree char *pid_name = g_strconcat(name, ".pid", NULL);
	g_autofree char *pid_path = g_build_filename(pf->pids, pid_name, NULL);
	g_autofree char *pid_text = NULL;
	g_autoptr(GError) error = NULL;
	int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	GPid pid;

	g_assert_cmpint(fd, >=, 0);
	if (!g_spawn_async_with_fds(NULL, (char **)argv, NULL,
	                            G_SPAWN_SEARCH_PATH, NULL, NULL, &pid, -1,
	                            fd, fd, &error))
		g_error("%s: %s", argv[0], error->message);
	close(fd);
	g_array_append_val(pf->helpers, pid);

	/* The watchdog finds it there. */
	pid_text = g_strdup_printf("%d\n", (int)pid);
	g_assert_true(g_file_set_contents(pid_path, pid_text, -1, NULL));
	wait_port(pf, port);
	release_port(pf, port);
}

void
postfix_instance_start(PostfixInstance *pf)
{
	g_autofree char *master =
	    g_build_filename(pf->queue, "pid", "master.pid", NULL);
	g_autofree char *why = NULL;
	gint64 deadline;

	/* Step 1: no chroot (a private queue has no etc/). */
	postconf(pf, "-F", "*/*/chroot=n");

	/*
	 * Step 2: start, the smtpd ports still reserved (see the top of this
	 * file).  Postfix writes why it failed (a port in use, a bad
	 * setting) to its log, not to the terminal: show the log.
	 */
	if (!run(
	        (const char *const[]){"postfix", "-c", pf->conf, "start", NULL},
	        &why)) {
		g_autofree char *what =
		    g_strconcat("private Postfix did not start: ", why, NULL);

		fail(pf, what);
	}

	/* Step 3: the master's pid (for the watchdog), then every smtpd
	 * port listening, which frees its reservation. */
	deadline = g_get_monotonic_time() + WAIT_US;
	while (read_pid(master) <= 0) {
		if (g_get_monotonic_time() > deadline)
			fail(pf, "private Postfix wrote no pid file");
		g_usleep(20 * 1000);
	}
	for (guint i = 0; i < pf->smtpd_ports->len; i++) {
		guint16 port = g_array_index(pf->smtpd_ports, guint16, i);

		wait_port(pf, port);
		release_port(pf, port);
	}
}

void
postfix_instance_stop(PostfixInstance *pf)
{
	GHashTableIter iter;
	gpointer fd;

	if (pf == NULL)
		return;
	close(pf->watchdog_fd);
	waitpid(pf->watchdog, NULL, 0);

	/* Our children, stopped by the watchdog: no zombies left. */
	for (guint i = 0; i < pf->helpers->len; i++)
		waitpid(g_array_index(pf->helpers, GPid, i), NULL, 0);
	g_array_unref(pf->helpers);

	g_hash_table_iter_init(&iter, pf->reserved);
	while (g_hash_table_iter_next(&iter, NULL, &fd))
		close(GPOINTER_TO_INT(fd) - 1);
	g_hash_table_unref(pf->reserved);
	g_array_unref(pf->smtpd_ports);
	g_free(pf->dir);
	g_free(pf->conf);
	g_free(pf->queue);
	g_free(pf->pids);
	g_free(pf->maillog);
	g_free(pf);
}

/* ------------------------------------------------------------------ */
/* The log                                                              */
/* ------------------------------------------------------------------ */

char *
postfix_instance_log(const PostfixInstance *pf)
{
	char *text = NULL;

	if (!g_file_get_contents(pf->maillog, &text, NULL, NULL))
		return g_strdup("");
	return text;
}

gboolean
postfix_instance_wait_log(const PostfixInstance *pf, const char *needle)
{
	gint64 deadline = g_get_monotonic_time() + WAIT_US;

	for (;;) {
		g_autofree char *text = postfix_instance_log(pf);

		if (strstr(text, needle) != NULL)
			return TRUE;
		if (g_get_monotonic_time() > deadline)
			return FALSE;
		g_usleep(20 * 1000);
	}
}

/* One smtpd line: its pid and what follows "]: "; FALSE for others. */
static gboolean
smtpd_line(const char *line, int *pid, const char **rest)
{
	const char *p = strstr(line, "/smtpd[");
	char *end;

	if (p == NULL)
		return FALSE;
	*pid = (int)strtol(p + 7, &end, 10);
	if (strncmp(end, "]: ", 3) != 0)
		return FALSE;
	*rest = end + 3;
	return TRUE;
}

/* A command as debug_peer_level 1 logs it: "< client[addr]: CMD". */
static const char *
logged_command(const char *rest)
{
	const char *p;

	if (strncmp(rest, "< ", 2) != 0 || (p = strstr(rest, "]: ")) == NULL)
		return NULL;
	return p + 3;
}

static gboolean
names_helo(const char *cmd, const char *helo_name)
{
	return (g_ascii_strncasecmp(cmd, "EHLO ", 5) == 0 ||
	        g_ascii_strncasecmp(cmd, "HELO ", 5) == 0) &&
	       strcmp(cmd + 5, helo_name) == 0;
}

/* The ended sessions of @helo_name in @text; the last one's commands
 * and disconnect counts go to @cmds and @end. */
static guint
find_sessions(const char *text, const char *helo_name, GPtrArray **cmds,
              char **end)
{
	g_auto(GStrv) lines = g_strsplit(text, "\n", -1);
	g_autoptr(GHashTable) open = g_hash_table_new_full(
	    NULL, NULL, NULL, (GDestroyNotify)g_ptr_array_unref);
	guint found = 0;

	for (guint i = 0; lines[i] != NULL; i++) {
		const char *rest, *cmd;
		GPtrArray *session;
		int pid;

		if (!smtpd_line(lines[i], &pid, &rest))
			continue;
		if (g_str_has_prefix(rest, "connect from ")) {
			g_hash_table_insert(
			    open, GINT_TO_POINTER(pid),
			    g_ptr_array_new_with_free_func(g_free));
			continue;
		}
		session = g_hash_table_lookup(open, GINT_TO_POINTER(pid));
		if (session == NULL)
			continue;
		if ((cmd = logged_command(rest)) != NULL) {
			g_ptr_array_add(session, g_strdup(cmd));
			continue;
		}
		if (!g_str_has_prefix(rest, "disconnect from "))
			continue;

		/* The session ended: is it the one? */
		for (guint j = 0; j < session->len; j++) {
			if (!names_helo(session->pdata[j], helo_name))
				continue;
			found++;
			g_clear_pointer(cmds, g_ptr_array_unref);
			*cmds = g_ptr_array_ref(session);
			g_free(*end);
			cmd = strchr(rest + 16, ' ');
			*end = g_strdup(cmd ? cmd + 1 : "");
			break;
		}
		g_hash_table_remove(open, GINT_TO_POINTER(pid));
	}
	return found;
}

GPtrArray *
postfix_instance_session(const PostfixInstance *pf, const char *helo_name,
                         char **end)
{
	gint64 deadline = g_get_monotonic_time() + WAIT_US;
	GPtrArray *cmds = NULL;
	g_autofree char *counts = NULL;
	guint found;

	for (;;) {
		g_autofree char *text = postfix_instance_log(pf);

		found = find_sessions(text, helo_name, &cmds, &counts);
		if (found > 0 || g_get_monotonic_time() > deadline)
			break;
		g_usleep(20 * 1000);
	}
	if (found != 1) {
		g_autofree char *what = g_strdup_printf(
		    "%u sessions of EHLO %s ended", found, helo_name);

		fail(pf, what);
	}
	if (end != NULL)
		*end = g_steal_pointer(&counts);
	return cmds;
}
