/*
 * test-postfix.c - the sendmail() contract against a real Postfix smtpd
 *
 * The fake server shows what the library writes; this shows that what
 * it writes and reads holds with the server users have.  One private
 * Postfix (postfix-instance.c) runs several smtpd services, each set
 * up for one part of the contract:
 *
 *   MAIN      recipient and sender access maps that refuse with 450,
 *             550 and 553; SMTPUTF8 on; relays to an smtp-sink on
 *             loopback that writes every message to a file, so
 *             delivery is checked where it ends, recipient by
 *             recipient;
 *   EARLY     the same with smtpd_delay_reject=no, so a refused
 *             sender is refused at MAIL and not at each RCPT;
 *   NOUTF8    smtputf8_enable=no;
 *   SIZE      message_size_limit=SIZE_LIMIT;
 *   AUTH      STARTTLS (certificates of tests/tls/make-certs.sh), Cyrus
 *             SASL with a private sasldb, AUTH only under TLS, relaying
 *             only for authenticated clients;
 *   LOGIN     the same offering only the LOGIN mechanism;
 *   CLEARAUTH SASL without TLS;
 *   NOPIPE    MAIN without PIPELINING in its EHLO reply (Postfix
 *             3.7 does not complain when a client sends ahead anyway:
 *             that the library waits is shown by test-pipelining.c
 *             against the fake server; here, the same outcome);
 *   ERRLIMIT  MAIN with smtpd_hard_error_limit=1: after one refusal
 *             Postfix answers 421 and hangs up.
 *
 * Each test names itself with its own EHLO name, by which it finds
 * its session in Postfix's log (debug_peer_level 1 logs each command
 * read): so the commands are asserted as Postfix received them.
 *
 * Skipped without Postfix, or when not root ("postfix start").
 */
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <glib/gstdio.h>

#include "postfix-instance.h"
#include "smtp-private.h"

#define SIZE_LIMIT 4000
#define USER       "archive"
#define PASSWORD   "s3cret-Pa55"
#define REALM      "sasl.test"

typedef enum {
	SVC_MAIN,
	SVC_EARLY,
	SVC_NOUTF8,
	SVC_SIZE,
	SVC_AUTH,
	SVC_LOGIN,
	SVC_CLEARAUTH,
	SVC_NOPIPE,
	SVC_ERRLIMIT,
	N_SVC,
} Service;

/* What the AUTH services share: SASL on, and relaying only for
 * authenticated clients (mynetworks is empty there), so that a sent
 * message proves the authentication took. */
#define SASL_ON                                                                \
	" -o smtpd_sasl_auth_enable=yes -o mynetworks="                        \
	" -o smtpd_relay_restrictions=permit_sasl_authenticated,reject"

static struct {
	PostfixInstance *pf;
	const char *skip;
	char *certs;
	char *sink;
	guint16 port[N_SVC];
	guint16 sink_port;
} env;

/* ------------------------------------------------------------------ */
/* The private Postfix                                                  */
/* ------------------------------------------------------------------ */

static void
write_file(const char *dir, const char *name, const char *text)
{
	g_autofree char *path = g_build_filename(dir, name, NULL);
	g_autoptr(GError) error = NULL;

	g_file_set_contents(path, text, -1, &error);
	g_assert_no_error(error);
	g_assert_cmpint(chmod(path, 0644), ==, 0);
}

/* Access maps: texthash needs no postmap run. */
static void
write_maps(const char *conf)
{
	write_file(conf, "rcpt-access",
	           "busy@refuse.test 450 4.2.1 Mailbox busy, try later\n"
	           "gone@refuse.test 550 5.1.1 No such mailbox here\n");
	write_file(conf, "sender-access",
	           "banned@sender.test 553 5.7.1 Sender banned here\n");
}

/* Cyrus SASL for smtpd: smtpd.conf and a sasldb in @dir/sasl, owned
 * by Postfix's user (Berkeley DB wants to write beside the database).
 * It must be the configuration directory's "sasl": Debian's Postfix
 * (patch 07_sasl_config) looks for smtpd.conf only there and in
 * /usr/lib/sasl, whatever cyrus_sasl_config_path says (seen with
 * strace on Postfix 3.7.11); we set that too, to say what we mean. */
static char *
write_sasl(const char *dir)
{
	g_autofree char *sasl = g_build_filename(dir, "sasl", NULL);
	g_autofree char *db = g_build_filename(sasl, "sasldb2", NULL);
	g_autofree char *conf = g_strdup_printf("pwcheck_method: auxprop\n"
	                                        "auxprop_plugin: sasldb\n"
	                                        "sasldb_path: %s\n"
	                                        "mech_list: PLAIN LOGIN\n",
	                                        db);
	g_autofree char *cmd =
	    g_strdup_printf("echo '" PASSWORD
	                    "' | saslpasswd2 -f '%s' -c -p -u " REALM " " USER,
	                    db);

	g_assert_cmpint(g_mkdir(sasl, 0755), ==, 0);
	write_file(sasl, "smtpd.conf", conf);
	postfix_instance_run((const char *const[]){"sh", "-c", cmd, NULL});
	postfix_instance_run(
	    (const char *const[]){"chown", "-R", "postfix", sasl, NULL});
	return g_steal_pointer(&sasl);
}

static void
add_services(void)
{
	g_autofree char *tls = g_strdup_printf(
	    " -o smtpd_tls_security_level=may -o smtpd_tls_auth_only=yes"
	    " -o smtpd_tls_cert_file=%s/good.crt"
	    " -o smtpd_tls_key_file=%s/good.key",
	    env.certs, env.certs);
	g_autofree char *size =
	    g_strdup_printf("-o message_size_limit=%d", SIZE_LIMIT);
	g_autofree char *auth = g_strconcat(SASL_ON, tls, NULL);
	g_autofree char *login = g_strconcat(
	    SASL_ON, tls, " -o smtpd_sasl_mechanism_filter=login", NULL);
	const char *options[N_SVC] = {
	    [SVC_MAIN] = NULL,
	    [SVC_EARLY] = "-o smtpd_delay_reject=no",
	    [SVC_NOUTF8] = "-o smtputf8_enable=no",
	    [SVC_SIZE] = size,
	    [SVC_AUTH] = auth,
	    [SVC_LOGIN] = login,
	    [SVC_CLEARAUTH] = SASL_ON,
	    [SVC_NOPIPE] = "-o smtpd_discard_ehlo_keywords=pipelining",
	    [SVC_ERRLIMIT] = "-o smtpd_hard_error_limit=1",
	};

	for (guint i = 0; i < N_SVC; i++) {
		env.port[i] = postfix_instance_port(env.pf);
		postfix_instance_add_smtpd(env.pf, env.port[i], options[i]);
	}
}

/* smtp-sink as the next hop: one file per message under env.sink. */
static void
start_sink(void)
{
	g_autofree char *addr = NULL, *tmpl = NULL;

	env.sink = g_build_filename(postfix_instance_dir(env.pf), "sink", NULL);
	g_assert_cmpint(g_mkdir(env.sink, 0755), ==, 0);
	postfix_instance_run(
	    (const char *const[]){"chown", "postfix", env.sink, NULL});
	env.sink_port = postfix_instance_port(env.pf);
	addr = g_strdup_printf("127.0.0.1:%u", env.sink_port);
	tmpl = g_build_filename(env.sink, "msg.", NULL);
	postfix_instance_spawn(env.pf, "smtp-sink", env.sink_port,
	                       (const char *const[]){"smtp-sink", "-u",
	                                             "postfix", "-d", tmpl,
	                                             addr, "20", NULL});
}

static void
postfix_start(void)
{
	const char *script = g_getenv("MAKE_CERTS");
	g_autofree char *sasl = NULL, *relay = NULL, *sender = NULL;
	g_autofree char *rcpt = NULL, *sasl_path = NULL;
	const char *conf;

	env.pf = postfix_instance_new(&env.skip);
	if (env.pf == NULL)
		return;
	g_assert_nonnull(script);
	conf = postfix_instance_conf(env.pf);

	/* Step 1: certificates, maps, SASL, the next hop. */
	env.certs =
	    g_build_filename(postfix_instance_dir(env.pf), "certs", NULL);
	postfix_instance_run(
	    (const char *const[]){"sh", script, env.certs, NULL});
	write_maps(conf);
	sasl = write_sasl(conf);
	start_sink();

	/* Step 2: main.cf.  Mail for utf8.test is discarded: the sink
	 * does not offer SMTPUTF8, so relaying it there would bounce. */
	relay = g_strdup_printf("relayhost=[127.0.0.1]:%u", env.sink_port);
	sender =
	    g_strdup_printf("smtpd_sender_restrictions="
	                    "check_sender_access texthash:%s/sender-access",
	                    conf);
	rcpt = g_strdup_printf("smtpd_recipient_restrictions="
	                       "check_recipient_access texthash:%s/rcpt-access",
	                       conf);
	sasl_path = g_strdup_printf("cyrus_sasl_config_path=%s", sasl);
	{
		const char *const settings[] = {
		    "default_transport=smtp",
		    "relay_transport=smtp",
		    relay,
		    "transport_maps=inline:{utf8.test=discard:}",
		    sender,
		    rcpt,
		    sasl_path,
		    "smtpd_sasl_local_domain=" REALM,
		};

		for (guint i = 0; i < G_N_ELEMENTS(settings); i++)
			postfix_instance_set(env.pf, settings[i]);
	}

	/* Step 3: the smtpd services, and go. */
	add_services();
	postfix_instance_start(env.pf);
}

/* ------------------------------------------------------------------ */
/* Helpers                                                              */
/* ------------------------------------------------------------------ */

static gboolean
need_postfix(void)
{
	if (env.pf != NULL)
		return TRUE;
	g_test_skip(env.skip);
	return FALSE;
}

static SmtpClient *
new_client(Service svc, const char *helo)
{
	SmtpTimeouts t = {10000, 10000, 10000, 10000};
	SmtpClient *client = smtp_client_new("127.0.0.1", env.port[svc]);

	smtp_client_set_helo_name(client, helo);
	smtp_client_set_timeouts(client, &t);
	smtp_client_set_tls(client, SMTP_TLS_NONE, NULL);
	return client;
}

/* A message with @tag in its subject, to find it at the sink. */
static SmtpMessage *
new_message(SmtpMessageKind kind, const char *tag, const char *body)
{
	SmtpMessage *msg = smtp_message_new(kind);
	g_autofree char *text = g_strdup_printf(
	    "From: <sender@client.test>\r\nSubject: %s\r\n\r\n%s", tag, body);

	smtp_message_append_data(msg, text, strlen(text));
	return msg;
}

/* The commands of session @helo as Postfix read them, "|"-joined. */
static char *
session(const char *helo, char **end)
{
	g_autoptr(GPtrArray) cmds = postfix_instance_session(env.pf, helo, end);

	g_ptr_array_add(cmds, NULL);
	return g_strjoinv("|", (char **)cmds->pdata);
}

/* The same after the first EHLO, which must name @helo. */
static char *
session_after_ehlo(const char *helo, char **end)
{
	g_autofree char *cmds = session(helo, end);
	g_autofree char *ehlo = g_strdup_printf("EHLO %s|", helo);

	if (!g_str_has_prefix(cmds, ehlo))
		g_error("session \"%s\" does not start with %s", cmds, ehlo);
	return g_strdup(cmds + strlen(ehlo));
}

/* "MAIL FROM:<@from> SIZE=n" for @msg, whose lines all end in CRLF
 * and none starts with ".": its size as given is its size on the wire,
 * which SIZE= announces. */
static char *
mail_cmd(const char *from, SmtpMessage *msg)
{
	return g_strdup_printf("MAIL FROM:<%s> SIZE=%" G_GUINT64_FORMAT, from,
	                       smtp_message_get_size(msg));
}

static void
assert_reply(const SmtpReply *reply, int code, const char *enhanced,
             const char *text)
{
	g_assert_cmpint(reply->code, ==, code);
	g_assert_cmpstr(reply->enhanced, ==, enhanced);
	g_assert_cmpstr(reply->text, ==, text);
}

static void
assert_refusal(const GPtrArray *refused, guint i, const char *rcpt, int code,
               const char *enhanced, const char *text)
{
	const SmtpRefusal *r;

	g_assert_cmpuint(i, <, refused->len);
	r = refused->pdata[i];
	g_assert_cmpstr(r->recipient, ==, rcpt);
	assert_reply(&r->reply, code, enhanced, text);
}

/* The queue id from "Ok: queued as QID". */
static const char *
queue_id(const SmtpResult *res)
{
	const char *p = strstr(res->reply.text, "queued as ");

	g_assert_nonnull(p);
	return p + 10;
}

/*
 * The file the sink wrote for the message of @res, whose subject is
 * @tag; its "X-Rcpt-Args:" values, "|"-joined, in *@rcpts.  Postfix
 * logs "QID: removed" once every recipient was delivered, that is once
 * the sink answered the final dot, so by then the file is whole.
 */
static char *
sink_message(const SmtpResult *res, const char *tag, char **rcpts)
{
	g_autofree char *subject = g_strdup_printf("Subject: %s\n", tag);
	g_autofree char *removed =
	    g_strdup_printf("]: %s: removed", queue_id(res));
	GDir *dir;
	const char *name;

	if (!postfix_instance_wait_log(env.pf, removed))
		g_error("Postfix did not deliver %s", queue_id(res));
	dir = g_dir_open(env.sink, 0, NULL);
	g_assert_nonnull(dir);
	while ((name = g_dir_read_name(dir)) != NULL) {
		g_autofree char *path = g_build_filename(env.sink, name, NULL);
		char *text = NULL;
		g_auto(GStrv) lines = NULL;
		g_autoptr(GPtrArray) args = g_ptr_array_new();

		g_assert_true(g_file_get_contents(path, &text, NULL, NULL));
		if (strstr(text, subject) == NULL) {
			g_free(text);
			continue;
		}
		lines = g_strsplit(text, "\n", -1);
		for (guint i = 0; lines[i] != NULL; i++) {
			if (g_str_has_prefix(lines[i], "X-Rcpt-Args: "))
				g_ptr_array_add(args, lines[i] + 13);
		}
		g_ptr_array_add(args, NULL);
		*rcpts = g_strjoinv("|", (char **)args->pdata);
		g_dir_close(dir);
		return text;
	}
	g_error("no message \"%s\" reached the sink", tag);
}

static void
assert_error(const GError *error, SmtpErrorCode code, const char *stage,
             gboolean temporary)
{
	g_assert_error(error, SMTP_ERROR, (gint)code);
	g_test_message("error: %s", error->message);
	g_assert_cmpstr(smtp_error_get_stage(error), ==, stage);
	g_assert_cmpint(smtp_error_is_temporary(error), ==, temporary);
}

/* ------------------------------------------------------------------ */
/* Refused recipients and senders                                       */
/* ------------------------------------------------------------------ */

#define BUSY_TEXT                                                              \
	"<busy@refuse.test>: Recipient address rejected: "                     \
	"Mailbox busy, try later"
#define GONE_TEXT                                                              \
	"<gone@refuse.test>: Recipient address rejected: "                     \
	"No such mailbox here"

#define SENDER_TEXT                                                            \
	"<banned@sender.test>: Sender address rejected: "                      \
	"Sender banned here"
#define LINE70                                                                 \
	"abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz"                 \
	"abcdefghijklmnopqr"

/* The sink's copy is the message of @res: Postfix's Received: header
 * there names the queue id it answered with, after the protocol it
 * received the message by (RFC 3848: ESMTPSA is under TLS and
 * authenticated). */
static void
assert_same_queue_id(const char *dump, const SmtpResult *res, const char *proto)
{
	g_autofree char *id =
	    g_strdup_printf("with %s id %s", proto, queue_id(res));
	const char *p = strstr(dump, id);

	if (p == NULL || (p[strlen(id)] != ';' && p[strlen(id)] != '\n'))
		g_error("\"%s\" not in the copy:\n%s", id, dump);
}

/* 450 and 550 among accepted recipients: sent, the refusals returned
 * with Postfix's codes, and only the others delivered; the same with
 * and without PIPELINING. */
typedef struct {
	const char *path;
	Service service;
	const char *helo;
	gboolean pipelining;
} SomeRefusedCase;

static const SomeRefusedCase some_refused_cases[] = {
    {"/smtpclient/postfix/refused/some", SVC_MAIN, "some.refused.test", TRUE},
    {"/smtpclient/postfix/refused/some-no-pipelining", SVC_NOPIPE,
     "nopipe.refused.test", FALSE},
};

static void
test_refused_some(gconstpointer data)
{
	const SomeRefusedCase *c = data;
	static const char *const rcpts[] = {
	    "one@deliver.test", "busy@refuse.test", "two@deliver.test",
	    "gone@refuse.test", NULL};
	g_autoptr(SmtpClient) client = NULL;
	g_autoptr(SmtpMessage) msg = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autoptr(GError) error = NULL;
	g_autofree char *cmds = NULL, *end = NULL, *dump = NULL, *got = NULL;
	g_autofree char *mail = NULL, *want = NULL;

	if (!need_postfix())
		return;
	client = new_client(c->service, c->helo);
	msg = new_message(SMTP_MESSAGE_BYTES, c->path, "hello\r\n");
	g_assert_true(smtp_client_connect(client, &error));
	g_assert_no_error(error);
	g_assert_cmpint(smtp_client_has_extension(client, "PIPELINING", NULL),
	                ==, c->pipelining);

	/* Step 1: the result. */
	res = smtp_client_sendmail(client, "sender@client.test", rcpts, msg,
	                           NULL, NULL, &error);
	g_assert_no_error(error);
	g_assert_nonnull(res);
	g_assert_cmpint(res->reply.code, ==, 250);
	g_assert_cmpstr(res->reply.enhanced, ==, "2.0.0");
	g_assert_true(g_str_has_prefix(res->reply.text, "Ok: queued as "));
	g_assert_cmpuint(res->refused->len, ==, 2);
	assert_refusal(res->refused, 0, "busy@refuse.test", 450, "4.2.1",
	               BUSY_TEXT);
	assert_refusal(res->refused, 1, "gone@refuse.test", 550, "5.1.1",
	               GONE_TEXT);
	g_assert_cmpuint(res->dropped_options->len, ==, 0);
	smtp_client_quit(client);

	/* Step 2: what Postfix read. */
	mail = mail_cmd("sender@client.test", msg);
	want = g_strconcat(mail,
	                   "|RCPT TO:<one@deliver.test>|RCPT "
	                   "TO:<busy@refuse.test>|RCPT TO:<two@deliver.test>|"
	                   "RCPT TO:<gone@refuse.test>|DATA|QUIT",
	                   NULL);
	cmds = session_after_ehlo(c->helo, &end);
	g_assert_cmpstr(cmds, ==, want);
	g_assert_cmpstr(end, ==,
	                "ehlo=1 mail=1 rcpt=2/4 data=1 quit=1 commands=6/8");

	/* Step 3: delivered, to the accepted recipients only. */
	dump = sink_message(res, c->path, &got);
	g_assert_cmpstr(got, ==,
	                "<one@deliver.test> ORCPT=rfc822;one@deliver.test|"
	                "<two@deliver.test> ORCPT=rfc822;two@deliver.test");
	assert_same_queue_id(dump, res, "ESMTP");
}

/* Every recipient refused: RECIPIENTS_REFUSED with each refusal, in
 * order; temporary when any is 4xx.  RSET follows and the connection
 * carries the next message. */
typedef struct {
	const char *path;
	const char *helo;
	const char *const *rcpts;
	gboolean temporary;
} AllRefusedCase;

static const char *const busy_gone[] = {"busy@refuse.test", "gone@refuse.test",
                                        NULL};
static const char *const gone_only[] = {"gone@refuse.test", NULL};

static const AllRefusedCase all_refused_cases[] = {
    {"/smtpclient/postfix/refused/all-450-550", "all.refused.test", busy_gone,
     TRUE},
    {"/smtpclient/postfix/refused/all-550", "all550.refused.test", gone_only,
     FALSE},
};

static void
test_refused_all(gconstpointer data)
{
	const AllRefusedCase *c = data;
	static const char *const ok[] = {"one@deliver.test", NULL};
	g_autoptr(SmtpClient) client = NULL;
	g_autoptr(SmtpMessage) msg = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autoptr(GError) error = NULL;
	g_autofree char *cmds = NULL, *end = NULL, *want = NULL;
	g_autofree char *want_end = NULL;
	const GPtrArray *refused;
	GString *rcpt_lines = g_string_new(NULL);
	guint n;

	if (!need_postfix())
		return;
	client = new_client(SVC_MAIN, c->helo);
	msg = new_message(SMTP_MESSAGE_BYTES, c->path, "hello\r\n");

	/* Step 1: the error holds every refusal. */
	res = smtp_client_sendmail(client, "sender@client.test", c->rcpts, msg,
	                           NULL, NULL, &error);
	g_assert_null(res);
	assert_error(error, SMTP_ERROR_RECIPIENTS_REFUSED, "rcpt",
	             c->temporary);
	refused = smtp_error_get_refused(error);
	g_assert_nonnull(refused);
	g_assert_cmpuint(refused->len, ==, g_strv_length((char **)c->rcpts));
	for (guint i = 0; c->rcpts[i] != NULL; i++) {
		if (strcmp(c->rcpts[i], "busy@refuse.test") == 0)
			assert_refusal(refused, i, c->rcpts[i], 450, "4.2.1",
			               BUSY_TEXT);
		else
			assert_refusal(refused, i, c->rcpts[i], 550, "5.1.1",
			               GONE_TEXT);
		g_string_append_printf(rcpt_lines, "RCPT TO:<%s>|",
		                       c->rcpts[i]);
	}

	/* Step 2: the connection is clean and carries the next one. */
	g_assert_true(smtp_client_is_connected(client));
	g_clear_error(&error);
	res = smtp_client_sendmail(client, "sender@client.test", ok, msg, NULL,
	                           NULL, &error);
	g_assert_no_error(error);
	g_assert_cmpuint(res->refused->len, ==, 0);
	smtp_client_quit(client);

	/* Step 3: Postfix saw DATA refused (no valid recipient), RSET,
	 * then the second transaction. */
	cmds = session(c->helo, &end);
	want = g_strdup_printf(
	    "EHLO %s|MAIL FROM:<sender@client.test> SIZE=%" G_GUINT64_FORMAT
	    "|%sDATA|RSET|MAIL FROM:<sender@client.test> "
	    "SIZE=%" G_GUINT64_FORMAT "|RCPT TO:<one@deliver.test>|DATA|QUIT",
	    c->helo, smtp_message_get_size(msg), rcpt_lines->str,
	    smtp_message_get_size(msg));
	g_string_free(rcpt_lines, TRUE);
	g_assert_cmpstr(cmds, ==, want);

	/* DATA failed once ("503 5.5.1 Error: no valid recipients"). */
	n = g_strv_length((char **)c->rcpts);
	want_end = g_strdup_printf("ehlo=1 mail=2 rcpt=1/%u data=1/2 rset=1 "
	                           "quit=1 commands=7/%u",
	                           n + 1, n + 8);
	g_assert_cmpstr(end, ==, want_end);
}

/* A refused sender.  With Postfix's default smtpd_delay_reject=yes the
 * sender restrictions run at RCPT: every recipient is refused with the
 * sender's reason; with smtpd_delay_reject=no MAIL itself is refused. */
static void
test_sender_refused_at_mail(void)
{
	static const char *const rcpts[] = {"one@deliver.test", NULL};
	g_autoptr(SmtpClient) client = NULL;
	g_autoptr(SmtpMessage) msg = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autoptr(GError) error = NULL;
	g_autofree char *cmds = NULL, *end = NULL, *mail = NULL, *want = NULL;

	if (!need_postfix())
		return;
	client = new_client(SVC_EARLY, "early.sender.test");
	msg = new_message(SMTP_MESSAGE_BYTES, "sender-early", "hello\r\n");

	res = smtp_client_sendmail(client, "banned@sender.test", rcpts, msg,
	                           NULL, NULL, &error);
	g_assert_null(res);
	assert_error(error, SMTP_ERROR_SENDER_REFUSED, "mail", FALSE);
	assert_reply(smtp_error_get_reply(error), 553, "5.7.1", SENDER_TEXT);
	g_assert_true(smtp_client_is_connected(client));
	smtp_client_quit(client);

	/* The pipelined RCPT and DATA were answered 503, then RSET. */
	mail = mail_cmd("banned@sender.test", msg);
	want = g_strconcat(mail, "|RCPT TO:<one@deliver.test>|DATA|RSET|QUIT",
	                   NULL);
	cmds = session_after_ehlo("early.sender.test", &end);
	g_assert_cmpstr(cmds, ==, want);
	g_assert_cmpstr(end, ==,
	                "ehlo=1 mail=0/1 rcpt=0/1 data=0/1 rset=1 "
	                "quit=1 commands=3/6");
}

static void
test_sender_refused_at_rcpt(void)
{
	static const char *const rcpts[] = {"one@deliver.test",
	                                    "two@deliver.test", NULL};
	g_autoptr(SmtpClient) client = NULL;
	g_autoptr(SmtpMessage) msg = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autoptr(GError) error = NULL;
	g_autofree char *cmds = NULL, *end = NULL, *mail = NULL, *want = NULL;
	const GPtrArray *refused;

	if (!need_postfix())
		return;
	client = new_client(SVC_MAIN, "delayed.sender.test");
	msg = new_message(SMTP_MESSAGE_BYTES, "sender-delayed", "hello\r\n");

	res = smtp_client_sendmail(client, "banned@sender.test", rcpts, msg,
	                           NULL, NULL, &error);
	g_assert_null(res);
	assert_error(error, SMTP_ERROR_RECIPIENTS_REFUSED, "rcpt", FALSE);
	refused = smtp_error_get_refused(error);
	g_assert_cmpuint(refused->len, ==, 2);
	assert_refusal(refused, 0, "one@deliver.test", 553, "5.7.1",
	               SENDER_TEXT);
	assert_refusal(refused, 1, "two@deliver.test", 553, "5.7.1",
	               SENDER_TEXT);
	smtp_client_quit(client);

	mail = mail_cmd("banned@sender.test", msg);
	want = g_strconcat(mail,
	                   "|RCPT TO:<one@deliver.test>|RCPT "
	                   "TO:<two@deliver.test>|DATA|RSET|QUIT",
	                   NULL);
	cmds = session_after_ehlo("delayed.sender.test", &end);
	g_assert_cmpstr(cmds, ==, want);
	g_assert_cmpstr(end, ==,
	                "ehlo=1 mail=1 rcpt=0/2 data=0/1 rset=1 "
	                "quit=1 commands=4/7");
}

/* A 421 in the middle of the RCPTs: DISCONNECTED with Postfix's code
 * and text, naming the stage; the connection is closed, and the next
 * call connects again. */
static void
test_421_too_many_errors(void)
{
	static const char *const rcpts[] = {"gone@refuse.test",
	                                    "one@deliver.test", NULL};
	static const char *const ok[] = {"one@deliver.test", NULL};
	g_autoptr(SmtpClient) client = NULL;
	g_autoptr(SmtpMessage) msg = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autoptr(GError) error = NULL;
	g_autofree char *cmds = NULL, *end = NULL, *mail = NULL, *want = NULL;

	if (!need_postfix())
		return;
	client = new_client(SVC_ERRLIMIT, "errlimit.client.test");
	msg = new_message(SMTP_MESSAGE_BYTES, "errlimit", "hello\r\n");

	/* Step 1: the 550, then the 421. */
	res = smtp_client_sendmail(client, "sender@client.test", rcpts, msg,
	                           NULL, NULL, &error);
	g_assert_null(res);
	assert_error(error, SMTP_ERROR_DISCONNECTED, "rcpt", TRUE);
	assert_reply(smtp_error_get_reply(error), 421, "4.7.0",
	             "mta.postfix.test Error: too many errors");
	g_assert_false(smtp_client_is_connected(client));
	g_clear_error(&error);

	cmds = session_after_ehlo("errlimit.client.test", &end);
	mail = mail_cmd("sender@client.test", msg);
	want = g_strconcat(mail, "|RCPT TO:<gone@refuse.test>", NULL);
	g_assert_cmpstr(cmds, ==, want);
	/* Postfix read no further: the second RCPT, DATA and QUIT were
	 * never answered. */
	g_assert_cmpstr(end, ==, "ehlo=1 mail=1 rcpt=0/1 commands=2/3");

	/* Step 2: a new connection for the next message. */
	res = smtp_client_sendmail(client, "sender@client.test", ok, msg, NULL,
	                           NULL, &error);
	g_assert_no_error(error);
	g_assert_cmpint(res->reply.code, ==, 250);
	smtp_client_quit(client);
}

/* ------------------------------------------------------------------ */
/* SMTPUTF8 and 8BITMIME                                                */
/* ------------------------------------------------------------------ */

#define UTF8_FROM "j\xc3\xbcrgen@client.test"
#define UTF8_RCPT "d\xc3\xb6rte@utf8.test"

/* smtputf8_enable=yes: UTF-8 addresses go with SMTPUTF8, and Postfix
 * delivers to the UTF-8 recipient. */
static void
test_smtputf8_on(void)
{
	static const char *const rcpts[] = {UTF8_RCPT, NULL};
	static const char *const opts[] = {"SMTPUTF8", NULL};
	g_autoptr(SmtpClient) client = NULL;
	g_autoptr(SmtpMessage) msg = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autoptr(GError) error = NULL;
	g_autofree char *cmds = NULL, *end = NULL, *want = NULL;
	g_autofree char *delivered = NULL;

	if (!need_postfix())
		return;
	client = new_client(SVC_MAIN, "on.smtputf8.test");
	msg = new_message(SMTP_MESSAGE_TEXT, "smtputf8-on",
	                  "Gr\xc3\xbc\xc3\x9f"
	                  "e\r\n");

	res = smtp_client_sendmail(client, UTF8_FROM, rcpts, msg, opts, NULL,
	                           &error);
	g_assert_no_error(error);
	g_assert_cmpint(res->reply.code, ==, 250);
	g_assert_cmpuint(res->refused->len, ==, 0);
	g_assert_cmpuint(res->dropped_options->len, ==, 0);
	smtp_client_quit(client);

	cmds = session("on.smtputf8.test", &end);
	want = g_strdup_printf("EHLO on.smtputf8.test|MAIL FROM:<" UTF8_FROM
	                       "> SIZE=%" G_GUINT64_FORMAT " SMTPUTF8|"
	                       "RCPT TO:<" UTF8_RCPT ">|DATA|QUIT",
	                       smtp_message_get_size(msg));
	g_assert_cmpstr(cmds, ==, want);
	g_assert_cmpstr(end, ==,
	                "ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5");

	/* utf8.test goes to discard(8), which logs the delivery. */
	delivered = g_strdup_printf("]: %s: to=<" UTF8_RCPT ">, relay=none",
	                            queue_id(res));
	g_assert_true(postfix_instance_wait_log(env.pf, delivered));
}

/* smtputf8_enable=no: SMTPUTF8 is not offered, and asking for it is
 * NOT_SUPPORTED before MAIL; the connection stays open, untouched. */
static void
test_smtputf8_off(void)
{
	static const char *const rcpts[] = {UTF8_RCPT, NULL};
	static const char *const opts[] = {"SMTPUTF8", NULL};
	g_autoptr(SmtpClient) client = NULL;
	g_autoptr(SmtpMessage) msg = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autoptr(GError) error = NULL;
	g_autofree char *cmds = NULL, *end = NULL;

	if (!need_postfix())
		return;
	client = new_client(SVC_NOUTF8, "off.smtputf8.test");
	msg = new_message(SMTP_MESSAGE_BYTES, "smtputf8-off", "hello\r\n");

	g_assert_true(smtp_client_connect(client, &error));
	g_assert_no_error(error);
	g_assert_false(smtp_client_has_extension(client, "SMTPUTF8", NULL));
	g_assert_true(smtp_client_has_extension(client, "8BITMIME", NULL));

	/* Asked for: NOT_SUPPORTED. */
	res = smtp_client_sendmail(client, UTF8_FROM, rcpts, msg, opts, NULL,
	                           &error);
	g_assert_null(res);
	assert_error(error, SMTP_ERROR_NOT_SUPPORTED, "mail", FALSE);
	g_assert_true(smtp_client_is_connected(client));
	g_clear_error(&error);

	/* Not asked for: a UTF-8 address is bad input. */
	res = smtp_client_sendmail(client, "sender@client.test", rcpts, msg,
	                           NULL, NULL, &error);
	g_assert_null(res);
	assert_error(error, SMTP_ERROR_INPUT, "input", FALSE);
	g_assert_true(smtp_client_is_connected(client));
	smtp_client_quit(client);

	/* No transaction was begun: Postfix read EHLO and QUIT only. */
	cmds = session("off.smtputf8.test", &end);
	g_assert_cmpstr(cmds, ==, "EHLO off.smtputf8.test|QUIT");
	g_assert_cmpstr(end, ==, "ehlo=1 quit=1 commands=2");
}

/* BODY=8BITMIME is passed, and the 8-bit body arrives byte for byte. */
static void
test_8bitmime(void)
{
	static const char *const rcpts[] = {"one@deliver.test", NULL};
	static const char *const opts[] = {"BODY=8BITMIME", NULL};
	g_autoptr(SmtpClient) client = NULL;
	g_autoptr(SmtpMessage) msg = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autoptr(GError) error = NULL;
	g_autofree char *cmds = NULL, *end = NULL, *want = NULL;
	g_autofree char *dump = NULL, *got = NULL;

	if (!need_postfix())
		return;
	client = new_client(SVC_MAIN, "eight.bit.test");
	msg = new_message(SMTP_MESSAGE_TEXT, "eight-bit",
	                  "Gr\xc3\xbc\xc3\x9f"
	                  "e aus K\xc3\xb6ln\r\n");

	res = smtp_client_sendmail(client, "sender@client.test", rcpts, msg,
	                           opts, NULL, &error);
	g_assert_no_error(error);
	g_assert_cmpuint(res->dropped_options->len, ==, 0);
	smtp_client_quit(client);

	cmds = session("eight.bit.test", &end);
	want = g_strdup_printf("EHLO eight.bit.test|MAIL FROM:<sender@client"
	                       ".test> SIZE=%" G_GUINT64_FORMAT
	                       " BODY=8BITMIME|RCPT TO:<one@deliver.test>|"
	                       "DATA|QUIT",
	                       smtp_message_get_size(msg));
	g_assert_cmpstr(cmds, ==, want);

	/* Postfix passes the body type on, and the bytes are intact. */
	dump = sink_message(res, "eight-bit", &got);
	g_assert_cmpstr(got, ==,
	                "<one@deliver.test> ORCPT=rfc822;one@deliver.test");
	g_assert_nonnull(strstr(dump, "X-Mail-Args: <sender@client.test> "
	                              "BODY=8BITMIME"));
	g_assert_nonnull(strstr(dump, "\n\nGr\xc3\xbc\xc3\x9f"
	                              "e aus "
	                              "K\xc3\xb6ln\n"));
	assert_same_queue_id(dump, res, "ESMTP");
}

/* DSN options (RFC 3461) go out when DSN is offered, and Postfix
 * passes them on to the next hop. */
static void
test_dsn(void)
{
	static const char *const rcpts[] = {"one@deliver.test", NULL};
	static const char *const mail_opts[] = {"RET=HDRS", "ENVID=archive-1",
	                                        NULL};
	static const char *const rcpt_opts[] = {
	    "NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;orig@client.test", NULL};
	g_autoptr(SmtpClient) client = NULL;
	g_autoptr(SmtpMessage) msg = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autoptr(GError) error = NULL;
	g_autofree char *cmds = NULL, *end = NULL, *want = NULL, *mail = NULL;
	g_autofree char *dump = NULL, *got = NULL;

	if (!need_postfix())
		return;
	client = new_client(SVC_MAIN, "dsn.client.test");
	msg = new_message(SMTP_MESSAGE_BYTES, "dsn", "hello\r\n");

	res = smtp_client_sendmail(client, "sender@client.test", rcpts, msg,
	                           mail_opts, rcpt_opts, &error);
	g_assert_no_error(error);
	g_assert_cmpuint(res->dropped_options->len, ==, 0);
	smtp_client_quit(client);

	mail = mail_cmd("sender@client.test", msg);
	want = g_strdup_printf("%s RET=HDRS ENVID=archive-1|RCPT "
	                       "TO:<one@deliver.test> NOTIFY=FAILURE,DELAY "
	                       "ORCPT=rfc822;orig@client.test|DATA|QUIT",
	                       mail);
	cmds = session_after_ehlo("dsn.client.test", &end);
	g_assert_cmpstr(cmds, ==, want);

	dump = sink_message(res, "dsn", &got);
	g_assert_cmpstr(got, ==,
	                "<one@deliver.test> ORCPT=rfc822;orig@client.test "
	                "NOTIFY=FAILURE,DELAY");
	g_assert_nonnull(strstr(dump, "X-Mail-Args: <sender@client.test> "
	                              "ENVID=archive-1 RET=HDRS\n"));
	assert_same_queue_id(dump, res, "ESMTP");
}

/* ------------------------------------------------------------------ */
/* The size limit                                                       */
/* ------------------------------------------------------------------ */

/* A message of exactly @size octets (headers included), CRLF lines
 * of at most 72 octets. */
static SmtpMessage *
sized_message(const char *tag, gsize size)
{
	g_autofree char *head = g_strdup_printf(
	    "From: <sender@client.test>\r\nSubject: %s\r\n\r\n", tag);
	GString *text = g_string_new(head);
	SmtpMessage *msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	gsize left;

	g_assert_cmpuint(size, >=, text->len + 3);
	for (left = size - text->len; left > 74; left -= 72)
		g_string_append(text, LINE70 "\r\n");
	g_string_append_len(text, LINE70, left - 2);
	g_string_append(text, "\r\n");
	g_assert_cmpuint(text->len, ==, size);
	smtp_message_append_data(msg, text->str, text->len);
	g_string_free(text, TRUE);
	return msg;
}

static void
test_size(void)
{
	g_autoptr(SmtpClient) client = NULL;
	const char *param = NULL;
	g_autoptr(GError) error = NULL;

	if (!need_postfix())
		return;
	client = new_client(SVC_SIZE, "advertised.size.test");
	g_assert_true(smtp_client_connect(client, &error));
	g_assert_no_error(error);
	g_assert_true(smtp_client_has_extension(client, "SIZE", &param));
	g_assert_cmpstr(param, ==, G_STRINGIFY(SIZE_LIMIT));
}

/* Over the limit, under it, and just under it as SIZE= counts but
 * over it as Postfix counts at the final dot. */
typedef struct {
	const char *path;
	const char *helo;
	gsize size;
	gboolean sent;
	SmtpErrorCode code; /* when not sent */
	const char *stage;
	const char *commands; /* after "EHLO helo|"; "%s" is MAIL */
	const char *end;
} SizeCase;

static const SizeCase size_cases[] = {
    {"/smtpclient/postfix/size/over", "over.size.test", 2 * SIZE_LIMIT, FALSE,
     SMTP_ERROR_SENDER_REFUSED, "mail",
     "%s|RCPT TO:<one@deliver.test>|DATA|RSET|QUIT",
     "ehlo=1 mail=0/1 rcpt=0/1 data=0/1 rset=1 quit=1 commands=3/6"},
    {"/smtpclient/postfix/size/under", "under.size.test", SIZE_LIMIT / 2, TRUE,
     0, NULL, "%s|RCPT TO:<one@deliver.test>|DATA|QUIT",
     "ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5"},
    {"/smtpclient/postfix/size/at-limit", "at.size.test", SIZE_LIMIT, TRUE, 0,
     NULL, "%s|RCPT TO:<one@deliver.test>|DATA|QUIT",
     "ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5"},
};

static void
test_size_case(gconstpointer data)
{
	const SizeCase *c = data;
	static const char *const rcpts[] = {"one@deliver.test", NULL};
	g_autoptr(SmtpClient) client = NULL;
	g_autoptr(SmtpMessage) msg = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autoptr(GError) error = NULL;
	g_autofree char *cmds = NULL, *end = NULL, *want = NULL;
	g_autofree char *mail = NULL, *dump = NULL, *got = NULL;

	if (!need_postfix())
		return;
	client = new_client(SVC_SIZE, c->helo);
	msg = sized_message(c->path, c->size);
	g_assert_cmpuint(smtp_message_get_size(msg), ==, c->size);

	/* Step 1: the outcome. */
	res = smtp_client_sendmail(client, "sender@client.test", rcpts, msg,
	                           NULL, NULL, &error);
	if (c->sent) {
		g_assert_no_error(error);
		g_assert_cmpint(res->reply.code, ==, 250);
	} else {
		g_assert_null(res);
		assert_error(error, c->code, c->stage, FALSE);
		assert_reply(smtp_error_get_reply(error), 552, "5.3.4",
		             "Message size exceeds fixed limit");
		g_assert_true(smtp_client_is_connected(client));
	}
	smtp_client_quit(client);

	/* Step 2: what Postfix read. */
	cmds = session_after_ehlo(c->helo, &end);
	mail = mail_cmd("sender@client.test", msg);
	want = g_strdup_printf(c->commands, mail);
	g_assert_cmpstr(cmds, ==, want);
	g_assert_cmpstr(end, ==, c->end);

	/* Step 3: a message sent is delivered. */
	if (c->sent) {
		dump = sink_message(res, c->path, &got);
		assert_same_queue_id(dump, res, "ESMTP");
	}
}

/* ------------------------------------------------------------------ */
/* AUTH with Cyrus SASL                                                 */
/* ------------------------------------------------------------------ */

typedef struct {
	const char *path;
	Service service;
	const char *helo;
	SmtpTlsLevel level;
	const char *password; /* NULL: no AUTH */
	gboolean allow_plaintext;
	SmtpErrorCode code; /* with error_part */
	const char *stage;
	const char *error_part; /* NULL: must be sent */
	int reply_code;         /* the server's reply in the error */
	const char *commands;   /* "%s" is MAIL FROM */
	const char *end;
	const char *log;   /* a line Postfix logs, or NULL */
	const char *proto; /* in its Received: header, when sent */
} AuthCase;

#define SENT_CMDS "%s|RCPT TO:<one@deliver.test>|DATA|QUIT"
/* base64 of "\0archive\0" PASSWORD, as RFC 4616 has it. */
#define PLAIN_B64    "AGFyY2hpdmUAczNjcmV0LVBhNTU="
#define USER_B64     "YXJjaGl2ZQ=="
#define PASSWORD_B64 "czNjcmV0LVBhNTU="
#define WRONG_B64    "AGFyY2hpdmUAbm90LXRoZS1wYXNzd29yZA=="

static const AuthCase auth_cases[] = {
    {"/smtpclient/postfix/auth/plain-starttls", SVC_AUTH, "plain.auth.test",
     SMTP_TLS_VERIFY, PASSWORD, FALSE, 0, NULL, NULL, 0,
     "STARTTLS|EHLO plain.auth.test|AUTH PLAIN " PLAIN_B64 "|" SENT_CMDS,
     "ehlo=2 starttls=1 auth=1 mail=1 rcpt=1 data=1 quit=1 commands=8",
     "sasl_method=PLAIN, sasl_username=" USER "@" REALM, "ESMTPSA"},
    {"/smtpclient/postfix/auth/login-starttls", SVC_LOGIN, "login.auth.test",
     SMTP_TLS_VERIFY, PASSWORD, FALSE, 0, NULL, NULL, 0,
     "STARTTLS|EHLO login.auth.test|AUTH LOGIN|" USER_B64 "|" PASSWORD_B64
     "|" SENT_CMDS,
     "ehlo=2 starttls=1 auth=1 mail=1 rcpt=1 data=1 quit=1 commands=8",
     "sasl_method=LOGIN, sasl_username=" USER "@" REALM, "ESMTPSA"},
    {"/smtpclient/postfix/auth/wrong-password", SVC_AUTH, "wrong.auth.test",
     SMTP_TLS_VERIFY, "not-the-password", FALSE, SMTP_ERROR_AUTH, "auth",
     "AUTH PLAIN refused: 535 5.7.8 Error: authentication failed: "
     "authentication failure",
     535, "STARTTLS|EHLO wrong.auth.test|AUTH PLAIN " WRONG_B64 "|QUIT",
     "ehlo=2 starttls=1 auth=0/1 quit=1 commands=4/5",
     "SASL PLAIN authentication failed", NULL},
    {"/smtpclient/postfix/auth/none-relay-denied", SVC_AUTH, "none.auth.test",
     SMTP_TLS_VERIFY, NULL, FALSE, SMTP_ERROR_RECIPIENTS_REFUSED, "rcpt",
     "554 5.7.1 <one@deliver.test>: Recipient address rejected: Access "
     "denied",
     554,
     "STARTTLS|EHLO none.auth.test|%s|RCPT TO:<one@deliver.test>|DATA|"
     "RSET|QUIT",
     "ehlo=2 starttls=1 mail=1 rcpt=0/1 data=0/1 rset=1 quit=1 commands=6/8",
     NULL, NULL},
    {"/smtpclient/postfix/auth/plaintext-refused", SVC_CLEARAUTH,
     "clear.auth.test", SMTP_TLS_NONE, PASSWORD, FALSE, SMTP_ERROR_AUTH, "auth",
     "is not encrypted; not sending them", 0, "QUIT",
     "ehlo=1 quit=1 commands=2", NULL, NULL},
    {"/smtpclient/postfix/auth/plaintext-allowed", SVC_CLEARAUTH,
     "allowed.auth.test", SMTP_TLS_NONE, PASSWORD, TRUE, 0, NULL, NULL, 0,
     "AUTH PLAIN " PLAIN_B64 "|" SENT_CMDS,
     "ehlo=1 auth=1 mail=1 rcpt=1 data=1 quit=1 commands=6",
     "sasl_method=PLAIN, sasl_username=" USER "@" REALM, "ESMTPA"},
};

static void
test_auth_case(gconstpointer data)
{
	const AuthCase *c = data;
	static const char *const rcpts[] = {"one@deliver.test", NULL};
	g_autoptr(SmtpClient) client = NULL;
	g_autoptr(SmtpMessage) msg = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autoptr(GError) error = NULL;
	g_autofree char *ca = NULL, *cmds = NULL, *end = NULL;
	g_autofree char *mail = NULL, *want = NULL, *dump = NULL;
	g_autofree char *got = NULL;

	if (!need_postfix())
		return;

	/* Step 1: the client, by name for the certificate check. */
	client = smtp_client_new("localhost", env.port[c->service]);
	smtp_client_set_helo_name(client, c->helo);
	smtp_client_set_timeouts(client,
	                         &(SmtpTimeouts){10000, 10000, 10000, 10000});
	ca = g_build_filename(env.certs, "ca.crt", NULL);
	smtp_client_set_tls(client, c->level, ca);
	if (c->password != NULL)
		smtp_client_set_auth(client, USER, c->password,
		                     c->allow_plaintext);
	msg = new_message(SMTP_MESSAGE_BYTES, c->path, "hello\r\n");

	/* Step 2: the outcome. */
	res = smtp_client_sendmail(client, "sender@client.test", rcpts, msg,
	                           NULL, NULL, &error);
	if (c->error_part == NULL) {
		g_assert_no_error(error);
		g_assert_cmpint(res->reply.code, ==, 250);
		g_assert_cmpint(smtp_client_is_tls(client), ==,
		                c->level != SMTP_TLS_NONE);
	} else {
		g_assert_null(res);
		assert_error(error, c->code, c->stage, FALSE);
		if (strstr(error->message, c->error_part) == NULL)
			g_error("\"%s\" not in \"%s\"", c->error_part,
			        error->message);
		if (c->code != SMTP_ERROR_RECIPIENTS_REFUSED)
			g_assert_cmpint(smtp_error_get_reply(error)->code, ==,
			                c->reply_code);
		/* The password shows nowhere. */
		g_assert_null(strstr(error->message, PASSWORD));

		/* AUTH errors close; a refusal leaves it open, RSET. */
		g_assert_cmpint(smtp_client_is_connected(client), ==,
		                c->code != SMTP_ERROR_AUTH);
	}
	smtp_client_quit(client);

	/* Step 3: what Postfix read, and what it logged. */
	cmds = session_after_ehlo(c->helo, &end);
	mail = mail_cmd("sender@client.test", msg);
	want = g_strdup_printf(c->commands, mail);
	g_assert_cmpstr(cmds, ==, want);
	g_assert_cmpstr(end, ==, c->end);
	if (c->log != NULL)
		g_assert_true(postfix_instance_wait_log(env.pf, c->log));

	/* Step 4: a message sent is delivered. */
	if (c->error_part == NULL) {
		dump = sink_message(res, c->path, &got);
		assert_same_queue_id(dump, res, c->proto);
	}
}

/*
 * Bare LF line ends.  Postfix counts a message as RFC 1870 section 5
 * does, each line with its CRLF: this one is 3989 octets as given but
 * 4047 on the wire, over SIZE_LIMIT.  SIZE= must announce the wire
 * count, so that Postfix refuses at MAIL (552 5.3.4) before the
 * message is sent.  Announcing the count as given (as the library once
 * did) let MAIL pass and the whole message go out, refused only after
 * the final dot with another text, "552 5.3.4 Error: message file too
 * big", as DATA and not as SENDER_REFUSED.
 */
static void
test_size_lf(void)
{
	static const char *const rcpts[] = {"one@deliver.test", NULL};
	g_autoptr(SmtpClient) client = NULL;
	g_autoptr(SmtpMessage) msg = NULL;
	g_autoptr(SmtpResult) res = NULL;
	g_autoptr(GError) error = NULL;
	g_autofree char *cmds = NULL, *end = NULL, *want = NULL;
	GString *text = g_string_new("Subject: lf\n\n");
	gsize lines = 2, wire;

	if (!need_postfix())
		return;

	/* Step 1: lines of 70 octets and LF up to SIZE_LIMIT - 10. */
	for (; text->len + 71 <= SIZE_LIMIT - 10; lines++)
		g_string_append(text, LINE70 "\n");
	wire = text->len + lines;
	g_assert_cmpuint(text->len, ==, 3989);
	g_assert_cmpuint(wire, ==, 4047);
	client = new_client(SVC_SIZE, "lf.size.test");
	msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	smtp_message_append_data(msg, text->str, text->len);
	g_string_free(text, TRUE);

	/* Step 2: refused, and where. */
	res = smtp_client_sendmail(client, "sender@client.test", rcpts, msg,
	                           NULL, NULL, &error);
	g_assert_null(res);
	g_assert_true(smtp_client_is_connected(client));
	smtp_client_quit(client);
	cmds = session_after_ehlo("lf.size.test", &end);
	assert_error(error, SMTP_ERROR_SENDER_REFUSED, "mail", FALSE);
	assert_reply(smtp_error_get_reply(error), 552, "5.3.4",
	             "Message size exceeds fixed limit");
	want = g_strdup_printf("MAIL FROM:<sender@client.test> SIZE=%zu|RCPT "
	                       "TO:<one@deliver.test>|DATA|RSET|QUIT",
	                       wire);
	g_assert_cmpstr(cmds, ==, want);
	g_assert_cmpstr(end, ==,
	                "ehlo=1 mail=0/1 rcpt=0/1 data=0/1 rset=1 quit=1 "
	                "commands=3/6");
}

int
main(int argc, char **argv)
{
	int rc;

	g_test_init(&argc, &argv, NULL);
	for (gsize i = 0; i < G_N_ELEMENTS(some_refused_cases); i++)
		g_test_add_data_func(some_refused_cases[i].path,
		                     &some_refused_cases[i], test_refused_some);
	for (gsize i = 0; i < G_N_ELEMENTS(all_refused_cases); i++)
		g_test_add_data_func(all_refused_cases[i].path,
		                     &all_refused_cases[i], test_refused_all);
	g_test_add_func("/smtpclient/postfix/refused/421-too-many-errors",
	                test_421_too_many_errors);
	g_test_add_func("/smtpclient/postfix/refused/sender-at-mail",
	                test_sender_refused_at_mail);
	g_test_add_func("/smtpclient/postfix/refused/sender-at-rcpt",
	                test_sender_refused_at_rcpt);
	g_test_add_func("/smtpclient/postfix/smtputf8/on", test_smtputf8_on);
	g_test_add_func("/smtpclient/postfix/smtputf8/off", test_smtputf8_off);
	g_test_add_func("/smtpclient/postfix/8bitmime", test_8bitmime);
	g_test_add_func("/smtpclient/postfix/dsn", test_dsn);
	g_test_add_func("/smtpclient/postfix/size/advertised", test_size);
	for (gsize i = 0; i < G_N_ELEMENTS(size_cases); i++)
		g_test_add_data_func(size_cases[i].path, &size_cases[i],
		                     test_size_case);
	g_test_add_func("/smtpclient/postfix/size/lf", test_size_lf);
	for (gsize i = 0; i < G_N_ELEMENTS(auth_cases); i++)
		g_test_add_data_func(auth_cases[i].path, &auth_cases[i],
		                     test_auth_case);

	postfix_start();
	rc = g_test_run();
	postfix_instance_stop(env.pf);
	g_free(env.certs);
	g_free(env.sink);
	return rc;
}
