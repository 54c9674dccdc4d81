/*
 * test-tls.c - STARTTLS and AUTH of libsmtpclient
 *
 * TLS runs against a real Postfix smtpd, the server users have: a
 * private instance in a temporary directory (own configuration, queue
 * and log, loopback only, ports chosen at run time, mail discarded),
 * one smtpd per certificate made by tests/tls/make-certs.sh (good,
 * expired, wrong host name, self-signed) and one without STARTTLS.  A
 * watchdog process stops Postfix by its pid and removes the directory
 * when this program ends, also when an assertion aborts it.  Without
 * Postfix (or root, which "postfix start" needs) those cases skip.
 *
 * What needs a misbehaving server (response injection, refusals) and
 * AUTH run against the scripted fake server: this Postfix has no SASL
 * back end configured, and the fake server shows the exact bytes of the
 * PLAIN and LOGIN exchanges.
 */
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

#include "fakesmtp.h"
#include "smtp-private.h"

#define FROM       "sender@example.org"
#define N_SERVICES 5

/* The smtpd services of the private Postfix, by certificate. */
typedef enum {
	SVC_GOOD,
	SVC_EXPIRED,
	SVC_WRONGHOST,
	SVC_SELFSIGNED,
	SVC_PLAIN, /* no STARTTLS */
} Service;

static const char *const service_cert[N_SERVICES] = {
    "good", "expired", "wronghost", "selfsigned", NULL,
};

static struct {
	gboolean up;
	const char *skip; /* why the Postfix cases skip */
	char *dir;        /* everything lives under it */
	char *conf, *certs, *maillog;
	guint16 port[N_SERVICES];
	pid_t master;
	pid_t watchdog;
	int watchdog_fd; /* write end; its closing wakes the watchdog */
} pf = {.watchdog_fd = -1};

/* ------------------------------------------------------------------ */
/* The private Postfix                                                  */
/* ------------------------------------------------------------------ */

static gboolean
run(const char *const *argv, GError **error)
{
	g_autofree char *out = NULL, *err = NULL;
	int status;

	if (!g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_SEARCH_PATH, NULL,
	                  NULL, &out, &err, &status, error))
		return FALSE;
	if (!g_spawn_check_wait_status(status, error)) {
		g_prefix_error(error, "%s: %s%s: ", argv[0], out, err);
		return FALSE;
	}
	return TRUE;
}

static gboolean
postconf(const char *opt, const char *arg, GError **error)
{
	const char *argv[] = {"postconf", "-c", pf.conf, opt, arg, NULL};

	return run(argv, error);
}

/* Free loopback ports, all held open at once so they differ. */
static void
free_ports(guint16 *ports, guint n)
{
	int fds[N_SERVICES];

	for (guint i = 0; i < n; i++) {
		struct sockaddr_in sa = {.sin_family = AF_INET};
		socklen_t len = sizeof(sa);

		sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		fds[i] = socket(AF_INET, SOCK_STREAM, 0);
		g_assert_cmpint(fds[i], >=, 0);
		g_assert_cmpint(bind(fds[i], (void *)&sa, sizeof(sa)), ==, 0);
		g_assert_cmpint(getsockname(fds[i], (void *)&sa, &len), ==, 0);
		ports[i] = ntohs(sa.sin_port);
	}
	for (guint i = 0; i < n; i++)
		close(fds[i]);
}

static gboolean
port_open(guint16 port)
{
	struct sockaddr_in sa = {.sin_family = AF_INET};
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	gboolean ok;

	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	sa.sin_port = htons(port);
	ok = connect(fd, (void *)&sa, sizeof(sa)) == 0;
	close(fd);
	return ok;
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

/* main.cf, and master.cf with one smtpd per service, no chroot. */
static gboolean
configure(GError **error)
{
	g_autofree char *queue = g_build_filename(pf.dir, "queue", NULL);
	g_autofree char *data = g_build_filename(pf.dir, "data", NULL);
	g_autofree char *master = NULL;
	g_autofree char *main_cf = g_build_filename(pf.conf, "main.cf", NULL);
	g_autofree char *master_cf =
	    g_build_filename(pf.conf, "master.cf", NULL);
	g_autofree char *set = g_strdup_printf(
	    "compatibility_level=3.6 queue_directory=%s data_directory=%s "
	    "maillog_file=%s maillog_file_prefixes=%s "
	    "myhostname=mta.tls.test mydomain=tls.test myorigin=tls.test "
	    "inet_interfaces=loopback-only inet_protocols=ipv4 "
	    "mynetworks=127.0.0.0/8 mydestination= alias_maps= "
	    "alias_database= local_recipient_maps= "
	    "default_transport=discard relay_transport=discard "
	    "smtp_dns_support_level=disabled biff=no "
	    "smtpd_tls_loglevel=1 smtpd_tls_security_level=none",
	    queue, data, pf.maillog, pf.dir);
	g_auto(GStrv) settings = g_strsplit(set, " ", -1);

	g_assert_cmpint(g_mkdir(pf.conf, 0755), ==, 0);
	g_assert_cmpint(g_mkdir(queue, 0755), ==, 0);
	g_assert_cmpint(g_mkdir(data, 0755), ==, 0);

	/* Postfix's own user writes master.lock there. */
	if (!run((const char *const[]){"chown", "postfix", data, NULL}, error))
		return FALSE;
	if (!g_file_get_contents("/usr/share/postfix/master.cf.dist", &master,
	                         NULL, error) ||
	    !g_file_set_contents(master_cf, master, -1, error) ||
	    !g_file_set_contents(main_cf, "", 0, error))
		return FALSE;
	for (guint i = 0; settings[i] != NULL; i++) {
		if (!postconf("-e", settings[i], error))
			return FALSE;
	}

	/* Never port 25: the default smtpd goes, ours come in. */
	if (!postconf("-MX", "smtp/inet", error))
		return FALSE;
	free_ports(pf.port, N_SERVICES);
	for (guint i = 0; i < N_SERVICES; i++) {
		g_autofree char *line = NULL, *tls = NULL;

		if (service_cert[i] != NULL)
			tls =
			    g_strdup_printf(" -o smtpd_tls_security_level=may"
			                    " -o smtpd_tls_cert_file=%s/%s.crt"
			                    " -o smtpd_tls_key_file=%s/%s.key",
			                    pf.certs, service_cert[i], pf.certs,
			                    service_cert[i]);
		line = g_strdup_printf(
		    "127.0.0.1:%u/inet=127.0.0.1:%u inet n - n - - smtpd"
		    " -o debug_peer_list=127.0.0.1 -o debug_peer_level=1%s",
		    pf.port[i], pf.port[i], tls ? tls : "");
		if (!postconf("-M", line, error))
			return FALSE;
	}
	return postconf("-F", "*/*/chroot=n", error);
}

static gboolean
read_master_pid(void)
{
	g_autofree char *path =
	    g_build_filename(pf.dir, "queue", "pid", "master.pid", NULL);
	g_autofree char *text = NULL;

	if (!g_file_get_contents(path, &text, NULL, NULL))
		return FALSE;
	pf.master = atoi(g_strstrip(text));
	return pf.master > 0;
}

/* The watchdog: waits for this process to end (EOF on the pipe), then
 * stops Postfix by pid and removes the directory. */
static void
watchdog(int fd)
{
	char c;
	int null = open("/dev/null", O_RDWR);

	/* Hold no pipe of the test runner, or it waits for us. */
	dup2(null, 0);
	dup2(null, 1);
	dup2(null, 2);
	while (read(fd, &c, 1) != 0 && errno == EINTR)
		;
	/* The pid from the file: the parent learnt it after the fork. */
	if (read_master_pid()) {
		kill(pf.master, SIGTERM);
		for (int i = 0; i < 150 && pid_alive(pf.master); i++)
			g_usleep(100 * 1000);
		if (pid_alive(pf.master))
			kill(pf.master, SIGKILL);
	}
	execlp("rm", "rm", "-rf", pf.dir, (char *)NULL);
	_exit(1);
}

static void
start_watchdog(void)
{
	int fds[2];

	g_assert_cmpint(pipe(fds), ==, 0);
	pf.watchdog = fork();
	g_assert_cmpint(pf.watchdog, >=, 0);
	if (pf.watchdog == 0) {
		close(fds[1]);
		watchdog(fds[0]);
	}
	close(fds[0]);
	pf.watchdog_fd = fds[1];
}

static void
postfix_start(void)
{
	const char *script = g_getenv("MAKE_CERTS");
	g_autoptr(GError) error = NULL;
	gint64 deadline;
	g_autofree char *postfix = g_find_program_in_path("postfix");

	if (postfix == NULL &&
	    !g_file_test("/usr/sbin/postfix", G_FILE_TEST_IS_EXECUTABLE)) {
		pf.skip = "postfix is not installed";
		return;
	}
	if (geteuid() != 0) {
		pf.skip = "postfix start needs root";
		return;
	}
	g_assert_nonnull(script);

	/* Step 1: a directory Postfix's own user can walk into. */
	pf.dir = g_dir_make_tmp("smtpclient-tls-XXXXXX", &error);
	g_assert_no_error(error);
	g_assert_cmpint(chmod(pf.dir, 0755), ==, 0);
	pf.conf = g_build_filename(pf.dir, "conf", NULL);
	pf.certs = g_build_filename(pf.dir, "certs", NULL);
	pf.maillog = g_build_filename(pf.dir, "maillog", NULL);
	start_watchdog();

	/* Step 2: certificates, configuration, start. */
	if (!run((const char *const[]){"sh", script, pf.certs, NULL}, &error) ||
	    !configure(&error) ||
	    !run((const char *const[]){"postfix", "-c", pf.conf, "start", NULL},
	         &error))
		g_error("private Postfix: %s", error->message);

	/* Step 3: wait for the master and every smtpd port. */
	deadline = g_get_monotonic_time() + 30 * G_USEC_PER_SEC;
	while (!read_master_pid() && g_get_monotonic_time() < deadline)
		g_usleep(50 * 1000);
	for (guint i = 0; i < N_SERVICES; i++) {
		while (!port_open(pf.port[i]) &&
		       g_get_monotonic_time() < deadline)
			g_usleep(50 * 1000);
	}
	if (pf.master <= 0 || !port_open(pf.port[N_SERVICES - 1]))
		g_error("private Postfix did not come up; see %s", pf.maillog);
	pf.up = TRUE;
}

/* Wake the watchdog and wait for its cleanup. */
static void
postfix_stop(void)
{
	if (pf.watchdog <= 0)
		return;
	close(pf.watchdog_fd);
	waitpid(pf.watchdog, NULL, 0);
}

/* ------------------------------------------------------------------ */
/* Helpers                                                              */
/* ------------------------------------------------------------------ */

static SmtpClient *
new_client(const char *host, guint16 port, SmtpTlsLevel level, gboolean with_ca)
{
	SmtpTimeouts t = {10000, 10000, 10000, 10000};
	g_autofree char *ca = NULL;
	SmtpClient *client = smtp_client_new(host, port);

	if (with_ca)
		ca = g_build_filename(pf.certs, "ca.crt", NULL);
	smtp_client_set_helo_name(client, "client.example");
	smtp_client_set_timeouts(client, &t);
	smtp_client_set_tls(client, level, ca);
	return client;
}

static SmtpResult *
send_one(SmtpClient *client, GError **error)
{
	static const char *const rcpts[] = {"rcpt@example.com", NULL};
	static const char body[] = "Subject: tls\r\n\r\nhello\r\n";
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);

	smtp_message_append_data(msg, body, strlen(body));
	return smtp_client_sendmail(client, FROM, rcpts, msg, NULL, NULL,
	                            error);
}

static gboolean
need_postfix(void)
{
	if (pf.up)
		return TRUE;
	g_test_skip(pf.skip);
	return FALSE;
}

static void
assert_error(const GError *error, SmtpErrorCode code, const char *stage,
             const char *part, gboolean temporary)
{
	g_assert_error(error, SMTP_ERROR, (gint)code);
	g_test_message("error: %s", error->message);
	g_assert_cmpstr(smtp_error_get_stage(error), ==, stage);
	if (part != NULL && strstr(error->message, part) == NULL)
		g_error("\"%s\" not in \"%s\"", part, error->message);
	g_assert_cmpint(smtp_error_is_temporary(error), ==, temporary);
}

/* ------------------------------------------------------------------ */
/* Against Postfix                                                      */
/* ------------------------------------------------------------------ */

typedef struct {
	const char *path;
	Service service;
	const char *host;
	SmtpTlsLevel level;
	gboolean with_ca;
	const char *error_part; /* NULL: the message must be sent */
	gboolean tls;           /* when sent: over TLS */
} PostfixCase;

static const PostfixCase postfix_cases[] = {
    {"/smtpclient/tls/verify/good-name", SVC_GOOD, "localhost", SMTP_TLS_VERIFY,
     TRUE, NULL, TRUE},
    {"/smtpclient/tls/verify/good-ip", SVC_GOOD, "127.0.0.1", SMTP_TLS_VERIFY,
     TRUE, NULL, TRUE},
    {"/smtpclient/tls/verify/expired", SVC_EXPIRED, "localhost",
     SMTP_TLS_VERIFY, TRUE, "certificate has expired", FALSE},
    {"/smtpclient/tls/verify/wrong-host", SVC_WRONGHOST, "localhost",
     SMTP_TLS_VERIFY, TRUE,
     "host name mismatch: certificate is for wrong.example, not localhost",
     FALSE},
    {"/smtpclient/tls/verify/wrong-ip", SVC_WRONGHOST, "127.0.0.1",
     SMTP_TLS_VERIFY, TRUE, "certificate is for wrong.example", FALSE},
    {"/smtpclient/tls/verify/self-signed", SVC_SELFSIGNED, "localhost",
     SMTP_TLS_VERIFY, TRUE,
     "certificate verify failed: self-signed certificate", FALSE},
    {"/smtpclient/tls/verify/not-in-system-store", SVC_GOOD, "localhost",
     SMTP_TLS_VERIFY, FALSE, "certificate verify failed", FALSE},
    {"/smtpclient/tls/verify/no-starttls", SVC_PLAIN, "localhost",
     SMTP_TLS_VERIFY, TRUE, "does not offer STARTTLS", FALSE},
    {"/smtpclient/tls/encrypt/self-signed", SVC_SELFSIGNED, "localhost",
     SMTP_TLS_ENCRYPT, FALSE, NULL, TRUE},
    {"/smtpclient/tls/encrypt/expired", SVC_EXPIRED, "127.0.0.1",
     SMTP_TLS_ENCRYPT, FALSE, NULL, TRUE},
    {"/smtpclient/tls/encrypt/no-starttls", SVC_PLAIN, "127.0.0.1",
     SMTP_TLS_ENCRYPT, FALSE, "does not offer STARTTLS", FALSE},
    {"/smtpclient/tls/may/wrong-host", SVC_WRONGHOST, "localhost", SMTP_TLS_MAY,
     FALSE, NULL, TRUE},
    {"/smtpclient/tls/may/no-starttls", SVC_PLAIN, "127.0.0.1", SMTP_TLS_MAY,
     FALSE, NULL, FALSE},
    {"/smtpclient/tls/none/offered", SVC_GOOD, "127.0.0.1", SMTP_TLS_NONE,
     FALSE, NULL, FALSE},
};

static void
test_postfix_case(gconstpointer data)
{
	const PostfixCase *c = data;
	g_autoptr(SmtpClient) client = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autoptr(GError) error = NULL;

	if (!need_postfix())
		return;
	client = new_client(c->host, pf.port[c->service], c->level, c->with_ca);
	res = send_one(client, &error);
	if (c->error_part != NULL) {
		g_assert_null(res);
		assert_error(error, SMTP_ERROR_TLS, "starttls", c->error_part,
		             FALSE);
		g_assert_false(smtp_client_is_connected(client));
		return;
	}
	g_assert_no_error(error);
	g_assert_nonnull(res);
	g_assert_cmpint(res->reply.code, ==, 250);
	g_assert_cmpint(smtp_client_is_tls(client), ==, c->tls);
}

/* How many lines of the Postfix log hold @needle. */
static guint
log_count(const char *needle)
{
	g_autofree char *text = NULL;
	guint n = 0;

	if (!g_file_get_contents(pf.maillog, &text, NULL, NULL))
		return 0;
	for (const char *p = text; (p = strstr(p, needle)) != NULL; p++)
		n++;
	return n;
}

/* RFC 3207 section 4.2: EHLO again under TLS, and only its answer
 * counts (Postfix offers STARTTLS in clear text only). */
static void
test_postfix_ehlo_again(void)
{
	const char *needle = "EHLO ehlo-again.example";
	g_autoptr(SmtpClient) client = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autoptr(GError) error = NULL;
	guint before;
	gint64 deadline;

	if (!need_postfix())
		return;
	before = log_count(needle);
	client =
	    new_client("localhost", pf.port[SVC_GOOD], SMTP_TLS_VERIFY, TRUE);
	smtp_client_set_helo_name(client, "ehlo-again.example");
	g_assert_true(smtp_client_connect(client, &error));
	g_assert_no_error(error);
	g_assert_true(smtp_client_is_tls(client));
	g_assert_false(smtp_client_has_extension(client, "STARTTLS", NULL));
	g_assert_true(smtp_client_has_extension(client, "PIPELINING", NULL));

	/* Two messages over the one TLS connection. */
	res = send_one(client, &error);
	g_assert_no_error(error);
	g_clear_pointer(&res, smtp_result_free);
	res = send_one(client, &error);
	g_assert_no_error(error);
	smtp_client_quit(client);

	/* Postfix logs each command it reads (debug_peer_list). */
	deadline = g_get_monotonic_time() + 5 * G_USEC_PER_SEC;
	while (log_count(needle) < before + 2 &&
	       g_get_monotonic_time() < deadline)
		g_usleep(50 * 1000);
	g_assert_cmpuint(log_count(needle), ==, before + 2);
}

/* Credentials with a server that offers no AUTH: refused before MAIL,
 * the connection closed. */
static void
test_postfix_auth_not_offered(void)
{
	g_autoptr(SmtpClient) client = NULL;
	g_autoptr(GError) error = NULL;

	if (!need_postfix())
		return;
	client =
	    new_client("localhost", pf.port[SVC_GOOD], SMTP_TLS_VERIFY, TRUE);
	smtp_client_set_auth(client, "user", "secret", FALSE);
	g_assert_null(send_one(client, &error));
	assert_error(error, SMTP_ERROR_AUTH, "auth", "does not offer AUTH",
	             FALSE);
	g_assert_null(strstr(error->message, "secret"));
	g_assert_false(smtp_client_is_connected(client));
}

/* ------------------------------------------------------------------ */
/* Against the fake server                                              */
/* ------------------------------------------------------------------ */

typedef struct {
	const char *path;
	const char *script;
	SmtpTlsLevel level;
	const char *user; /* NULL: no AUTH */
	gboolean allow_plaintext;
	gboolean connect_only; /* the fake cannot go on (LOGIN) */
	SmtpErrorCode code;    /* with error_part */
	const char *stage;
	const char *error_part; /* NULL: must succeed */
	gboolean temporary;
	const char *commands; /* all commands, "|"-joined; NULL: no check */
} FakeCase;

#define KW_TLS     "ehlo-keywords 8BITMIME STARTTLS\n"
#define KW_AUTH(m) "ehlo-keywords 8BITMIME \"" m "\"\n"
#define SENT       "MAIL FROM:<" FROM ">|RCPT TO:<rcpt@example.com>|DATA|QUIT"

static const FakeCase fake_cases[] = {
    /* STARTTLS */
    {"/smtpclient/tls/fake/injection",
     KW_TLS "on STARTTLS raw 220 go ahead\\r\\n250 injected\\r\\n",
     SMTP_TLS_ENCRYPT, NULL, FALSE, FALSE, SMTP_ERROR_TLS, "starttls",
     "response injection", FALSE, "EHLO client.example|STARTTLS"},
    {"/smtpclient/tls/fake/injection-may",
     KW_TLS "on STARTTLS raw 220 go ahead\\r\\n250 injected\\r\\n",
     SMTP_TLS_MAY, NULL, FALSE, FALSE, SMTP_ERROR_TLS, "starttls",
     "response injection", FALSE, "EHLO client.example|STARTTLS"},
    {"/smtpclient/tls/fake/handshake-fails-may",
     KW_TLS "on STARTTLS reply 220 go ahead\n", SMTP_TLS_MAY, NULL, FALSE,
     FALSE, SMTP_ERROR_TLS, "starttls", "TLS handshake failed", FALSE, NULL},
    {"/smtpclient/tls/fake/encrypt-not-offered", "", SMTP_TLS_ENCRYPT, NULL,
     FALSE, FALSE, SMTP_ERROR_TLS, "starttls",
     "does not offer STARTTLS, which TLS level encrypt requires", FALSE,
     "EHLO client.example|QUIT"},
    {"/smtpclient/tls/fake/may-not-offered", "ehlo-keywords 8BITMIME\n",
     SMTP_TLS_MAY, NULL, FALSE, FALSE, 0, NULL, NULL, FALSE,
     "EHLO client.example|" SENT},
    {"/smtpclient/tls/fake/starttls-454",
     KW_TLS "on STARTTLS reply 454 4.7.0 TLS not available\n", SMTP_TLS_VERIFY,
     NULL, FALSE, FALSE, SMTP_ERROR_TLS, "starttls",
     "454 4.7.0 TLS not available", TRUE, "EHLO client.example|STARTTLS|QUIT"},
    {"/smtpclient/tls/fake/starttls-554",
     KW_TLS "on STARTTLS reply 554 5.7.0 no\n", SMTP_TLS_ENCRYPT, NULL, FALSE,
     FALSE, SMTP_ERROR_TLS, "starttls", "STARTTLS refused", FALSE,
     "EHLO client.example|STARTTLS|QUIT"},
    {"/smtpclient/tls/fake/starttls-454-may",
     KW_TLS "on STARTTLS reply 454 4.7.0 TLS not available\n", SMTP_TLS_MAY,
     NULL, FALSE, FALSE, 0, NULL, NULL, FALSE,
     "EHLO client.example|STARTTLS|" SENT},

    /* AUTH */
    {"/smtpclient/auth/plain",
     KW_AUTH("AUTH LOGIN PLAIN") "on AUTH reply 235 2.7.0 ok\n", SMTP_TLS_NONE,
     "user", TRUE, FALSE, 0, NULL, NULL, FALSE,
     "EHLO client.example|AUTH PLAIN AHVzZXIAc2VjcmV0|" SENT},
    {"/smtpclient/auth/old-style",
     KW_AUTH("AUTH=LOGIN PLAIN") "on AUTH reply 235 2.7.0 ok\n", SMTP_TLS_NONE,
     "user", TRUE, FALSE, 0, NULL, NULL, FALSE,
     "EHLO client.example|AUTH PLAIN AHVzZXIAc2VjcmV0|" SENT},
    {"/smtpclient/auth/login",
     KW_AUTH("AUTH LOGIN") "on AUTH reply 334 VXNlcm5hbWU6\n"
                           "on OTHER /^dXNlcg==$/ reply 334 UGFzc3dvcmQ6\n"
                           "on OTHER /^c2VjcmV0$/ reply 235 2.7.0 ok\n",
     SMTP_TLS_NONE, "user", TRUE, TRUE, 0, NULL, NULL, FALSE,
     "EHLO client.example|AUTH LOGIN|dXNlcg==|c2VjcmV0"},
    {"/smtpclient/auth/535",
     KW_AUTH("AUTH PLAIN") "on AUTH reply 535 5.7.8 bad credentials\n",
     SMTP_TLS_NONE, "user", TRUE, FALSE, SMTP_ERROR_AUTH, "auth",
     "AUTH PLAIN refused: 535 5.7.8 bad credentials", FALSE,
     "EHLO client.example|AUTH PLAIN AHVzZXIAc2VjcmV0|QUIT"},
    {"/smtpclient/auth/454",
     KW_AUTH("AUTH PLAIN") "on AUTH reply 454 4.7.0 try later\n", SMTP_TLS_NONE,
     "user", TRUE, FALSE, SMTP_ERROR_AUTH, "auth", "454 4.7.0 try later", TRUE,
     "EHLO client.example|AUTH PLAIN AHVzZXIAc2VjcmV0|QUIT"},
    {"/smtpclient/auth/no-tls", KW_AUTH("AUTH PLAIN"), SMTP_TLS_NONE, "user",
     FALSE, FALSE, SMTP_ERROR_AUTH, "auth", "not encrypted", FALSE,
     "EHLO client.example|QUIT"},
    {"/smtpclient/auth/may-no-tls", KW_AUTH("AUTH PLAIN"), SMTP_TLS_MAY, "user",
     FALSE, FALSE, SMTP_ERROR_AUTH, "auth", "not encrypted", FALSE,
     "EHLO client.example|QUIT"},
    {"/smtpclient/auth/not-offered", "", SMTP_TLS_NONE, "user", TRUE, FALSE,
     SMTP_ERROR_AUTH, "auth", "does not offer AUTH", FALSE,
     "EHLO client.example|QUIT"},
    {"/smtpclient/auth/no-known-mechanism", KW_AUTH("AUTH CRAM-MD5"),
     SMTP_TLS_NONE, "user", TRUE, FALSE, SMTP_ERROR_AUTH, "auth",
     "offers no AUTH mechanism we support", FALSE, "EHLO client.example|QUIT"},
};

static char *
joined_commands(FakeSmtp *fake)
{
	g_autoptr(GPtrArray) cmds = fake_smtp_get_commands(fake);

	g_ptr_array_add(cmds, NULL);
	return g_strjoinv("|", (char **)cmds->pdata);
}

static void
test_fake_case(gconstpointer data)
{
	const FakeCase *c = data;
	g_autoptr(FakeSmtp) fake = NULL;
	g_autoptr(SmtpClient) client = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autoptr(GError) error = NULL;
	g_autofree char *cmds = NULL;
	gboolean ok;
	guint16 port;

	/* Step 1: server and client. */
	fake = fake_smtp_new(c->script, &error);
	g_assert_no_error(error);
	port = fake_smtp_start(fake, "127.0.0.1", NULL, &error);
	g_assert_no_error(error);
	client = new_client("127.0.0.1", port, c->level, FALSE);
	if (c->user != NULL)
		smtp_client_set_auth(client, c->user, "secret",
		                     c->allow_plaintext);

	/* Step 2: the outcome. */
	if (c->connect_only) {
		ok = smtp_client_connect(client, &error);
	} else {
		res = send_one(client, &error);
		ok = res != NULL;
	}
	if (c->error_part == NULL) {
		g_assert_no_error(error);
		g_assert_true(ok);
	} else {
		g_assert_false(ok);
		assert_error(error, c->code, c->stage, c->error_part,
		             c->temporary);
		g_assert_false(smtp_client_is_connected(client));
		/* The password shows nowhere, in clear or base64. */
		g_assert_null(strstr(error->message, "secret"));
		g_assert_null(strstr(error->message, "c2VjcmV0"));
		g_assert_null(strstr(error->message, "AHVzZXIAc2VjcmV0"));
	}

	/* Step 3: what went over the wire. */
	if (c->connect_only) {
		/* The server answered ahead (raw); wait for our lines. */
		gint64 deadline = g_get_monotonic_time() + G_USEC_PER_SEC;
		g_auto(GStrv) want = g_strsplit(c->commands, "|", -1);

		for (;;) {
			g_autoptr(GPtrArray) got = fake_smtp_get_commands(fake);

			if (got->len >= g_strv_length(want) ||
			    g_get_monotonic_time() > deadline)
				break;
			g_usleep(10 * 1000);
		}
	} else {
		smtp_client_quit(client);
	}
	fake_smtp_stop(fake);
	cmds = joined_commands(fake);
	if (c->commands != NULL)
		g_assert_cmpstr(cmds, ==, c->commands);
	if (c->error_part != NULL)
		g_assert_null(strstr(cmds, "MAIL"));
}

int
main(int argc, char **argv)
{
	int rc;

	g_test_init(&argc, &argv, NULL);
	for (gsize i = 0; i < G_N_ELEMENTS(fake_cases); i++)
		g_test_add_data_func(fake_cases[i].path, &fake_cases[i],
		                     test_fake_case);
	for (gsize i = 0; i < G_N_ELEMENTS(postfix_cases); i++)
		g_test_add_data_func(postfix_cases[i].path, &postfix_cases[i],
		                     test_postfix_case);
	g_test_add_func("/smtpclient/tls/postfix/ehlo-again",
	                test_postfix_ehlo_again);
	g_test_add_func("/smtpclient/tls/postfix/auth-not-offered",
	                test_postfix_auth_not_offered);

	postfix_start();
	rc = g_test_run();
	postfix_stop();
	return rc;
}
