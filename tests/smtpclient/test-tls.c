/*
 * test-tls.c - STARTTLS and AUTH of libsmtpclient
 *
 * TLS runs against a real Postfix smtpd, the server users have: a
 * private instance in a temporary directory (own configuration, queue
 * and log, loopback only, ports chosen at run time, mail discarded),
 * one smtpd per certificate made by tests/tls/make-certs.sh (good,
 * expired, wrong host name, self-signed) and one without STARTTLS,
 * started by postfix-instance.c, whose watchdog stops Postfix by its
 * pid and removes the directory when this program ends, also when an
 * assertion aborts it.  Without Postfix (or root, which "postfix
 * start" needs) those cases skip.
 *
 * What needs a misbehaving server (response injection, refusals) and
 * the exact bytes of the PLAIN and LOGIN exchanges run against the
 * scripted fake server; AUTH against Postfix with Cyrus SASL is in
 * test-postfix.c.
 */
#include <string.h>

#include "fakesmtp.h"
#include "postfix-instance.h"
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
	PostfixInstance *pf; /* NULL: the Postfix cases skip */
	const char *skip;    /* why */
	char *certs;
	guint16 port[N_SERVICES];
} pf;

/* ------------------------------------------------------------------ */
/* The private Postfix                                                  */
/* ------------------------------------------------------------------ */

/* Certificates, one smtpd per service, start. */
static void
postfix_start(void)
{
	const char *script = g_getenv("MAKE_CERTS");

	pf.pf = postfix_instance_new(&pf.skip);
	if (pf.pf == NULL)
		return;
	g_assert_nonnull(script);
	pf.certs = g_build_filename(postfix_instance_dir(pf.pf), "certs", NULL);
	postfix_instance_run(
	    (const char *const[]){"sh", script, pf.certs, NULL});

	for (guint i = 0; i < N_SERVICES; i++) {
		g_autofree char *tls = NULL;

		if (service_cert[i] != NULL)
			tls =
			    g_strdup_printf("-o smtpd_tls_security_level=may"
			                    " -o smtpd_tls_cert_file=%s/%s.crt"
			                    " -o smtpd_tls_key_file=%s/%s.key",
			                    pf.certs, service_cert[i], pf.certs,
			                    service_cert[i]);
		pf.port[i] = postfix_instance_port(pf.pf);
		postfix_instance_add_smtpd(pf.pf, pf.port[i], tls);
	}
	postfix_instance_start(pf.pf);
}

/* Stop Postfix and wait for the watchdog's cleanup. */
static void
postfix_stop(void)
{
	postfix_instance_stop(pf.pf);
	g_free(pf.certs);
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
	if (pf.pf != NULL)
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

#define SENT_ONE "MAIL FROM:<" FROM "> SIZE=23|RCPT TO:<rcpt@example.com>|DATA"

/* RFC 3207 section 4.2: EHLO again under TLS, and only its answer
 * counts (Postfix offers STARTTLS in clear text only). */
static void
test_postfix_ehlo_again(void)
{
	g_autoptr(SmtpClient) client = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autoptr(GError) error = NULL;
	g_autoptr(GPtrArray) cmds = NULL;
	g_autofree char *joined = NULL, *end = NULL;

	if (!need_postfix())
		return;
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
	cmds = postfix_instance_session(pf.pf, "ehlo-again.example", &end);
	g_ptr_array_add(cmds, NULL);
	joined = g_strjoinv("|", (char **)cmds->pdata);
	g_assert_cmpstr(
	    joined, ==,
	    "EHLO ehlo-again.example|STARTTLS|EHLO ehlo-again.example|" SENT_ONE
	    "|" SENT_ONE "|QUIT");
	g_assert_cmpstr(
	    end, ==,
	    "ehlo=2 starttls=1 mail=2 rcpt=2 data=2 quit=1 commands=10");
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
