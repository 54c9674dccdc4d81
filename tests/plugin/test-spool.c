/*
 * test-spool.c - the spool's files: layout, format, durability rules,
 * damaged and foreign files, a full disk, hold and release, threads
 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <glib/gstdio.h>
#include <sched.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "spool.h"

#define BODY "Subject: t\r\nX-Archive-Id: x\r\n\r\nbody\r\n.dot\r\n"
/* The size and digest lines of a 4-octet copy "body". */
#define SEAL_BODY                                                              \
	"size: 4\nsha256: "                                                    \
	"230d8358dc8e8890b4c58deeb62912ee2f20357ae92a5cc861b98e68fe31acb5\n"

typedef struct {
	char *dir;   /* the test's own temporary directory */
	char *spool; /* dir/spool */
} Fixture;

static void
fixture_set_up(Fixture *f, gconstpointer data)
{
	g_autoptr(GError) error = NULL;

	(void)data;
	f->dir = g_dir_make_tmp("test-spool-XXXXXX", &error);
	g_assert_no_error(error);
	f->spool = g_build_filename(f->dir, "spool", NULL);
}

static void
rm_rf(const char *path)
{
	g_autofree char *cmd = NULL;

	g_assert_true(g_str_has_prefix(path, g_get_tmp_dir()));
	cmd = g_strdup_printf("rm -rf '%s'", path);
	g_assert_cmpint(system(cmd), ==, 0);
}

static void
fixture_tear_down(Fixture *f, gconstpointer data)
{
	(void)data;
	rm_rf(f->dir);
	g_free(f->spool);
	g_free(f->dir);
}

static AmSpool *
open_spool(Fixture *f, guint64 min_free)
{
	g_autoptr(GError) error = NULL;
	AmSpool *spool = am_spool_open(f->spool, min_free, &error);

	g_assert_no_error(error);
	g_assert_nonnull(spool);
	return spool;
}

/* An entry as the milter makes one; strings static, freed by nobody. */
static AmSpoolEntry
entry_for(const char *id, gint64 created)
{
	static const char *to[] = {"a@archive.example", "b@archive.example",
	                           NULL};
	AmSpoolEntry e = {
	    .id = (char *)id,
	    .queue_id = (char *)"3F2A81C0DE",
	    .rule = (char *)"all",
	    .relay = (char *)"archive",
	    .from = (char *)"",
	    .to = (char **)to,
	    .smtputf8 = TRUE,
	    .created = created,
	};

	return e;
}

static SmtpMessage *
message_of(const char *text)
{
	SmtpMessage *msg = smtp_message_new(SMTP_MESSAGE_BYTES);

	smtp_message_append_data(msg, text, strlen(text));
	return msg;
}

static void
put(AmSpool *spool, const AmSpoolEntry *e, AmSpoolState state, const char *text)
{
	g_autoptr(SmtpMessage) msg = message_of(text);
	g_autoptr(GError) error = NULL;

	g_assert_true(am_spool_put(spool, e, msg, state, &error));
	g_assert_no_error(error);
}

/* What @msg would send, as raw octets. */
static GBytes *
raw_of(SmtpMessage *msg)
{
	g_autoptr(GError) error = NULL;
	char path[] = "/tmp/test-spool-raw-XXXXXX";
	int fd = g_mkstemp(path);
	g_autofree char *data = NULL;
	gsize len;

	g_assert_cmpint(fd, >=, 0);
	g_assert_true(smtp_message_write_raw(msg, fd, &error));
	close(fd);
	g_assert_true(g_file_get_contents(path, &data, &len, NULL));
	unlink(path);
	return g_bytes_new(data, len);
}

/* Number of names in @sub of the spool. */
static guint
count_files(Fixture *f, const char *sub)
{
	g_autofree char *path = g_build_filename(f->spool, sub, NULL);
	g_autoptr(GDir) d = g_dir_open(path, 0, NULL);
	guint n = 0;

	g_assert_nonnull(d);
	while (g_dir_read_name(d) != NULL)
		n++;
	return n;
}

static void
write_file(Fixture *f, const char *sub, const char *name, const char *text)
{
	g_autofree char *path = g_build_filename(f->spool, sub, name, NULL);

	g_assert_true(g_file_set_contents(path, text, -1, NULL));
}

static char *
read_file(Fixture *f, const char *sub, const char *name)
{
	g_autofree char *path = g_build_filename(f->spool, sub, name, NULL);
	char *text = NULL;

	g_assert_true(g_file_get_contents(path, &text, NULL, NULL));
	return text;
}

static guint
mode_of(Fixture *f, const char *sub, const char *name)
{
	g_autofree char *path = g_build_filename(f->spool, sub, name, NULL);
	struct stat st;

	g_assert_cmpint(stat(path, &st), ==, 0);
	return st.st_mode & 07777;
}

/* ------------------------------------------------------------------ */

static void
test_open_layout(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f, 0);
	const char *subs[] = {"tmp", "queue", "hold", "state"};

	(void)data;
	g_assert_cmpstr(am_spool_get_dir(spool), ==, f->spool);
	g_assert_cmpuint(mode_of(f, "", ""), ==, 0700);
	for (guint i = 0; i < G_N_ELEMENTS(subs); i++)
		g_assert_cmpuint(mode_of(f, subs[i], ""), ==, 0700);
}

static void
test_open_refuses(Fixture *f, gconstpointer data)
{
	g_autoptr(GError) error = NULL;
	g_autofree char *file = g_build_filename(f->dir, "file", NULL);
	AmSpool *spool;

	(void)data;
	/* Open to others: copies of mail must not be readable. */
	g_assert_cmpint(mkdir(f->spool, 0755), ==, 0);
	g_assert_cmpint(chmod(f->spool, 0755), ==, 0);
	spool = am_spool_open(f->spool, 0, &error);
	g_assert_null(spool);
	g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_IO);
	g_assert_nonnull(strstr(error->message, f->spool));
	g_assert_nonnull(strstr(error->message, "0700"));
	g_clear_error(&error);

	/* A subdirectory open to others is refused too. */
	g_assert_cmpint(chmod(f->spool, 0700), ==, 0);
	spool = open_spool(f, 0);
	am_spool_close(spool);
	g_assert_cmpint(chmod(f->spool, 0700), ==, 0);
	{
		g_autofree char *q = g_build_filename(f->spool, "hold", NULL);

		g_assert_cmpint(chmod(q, 0750), ==, 0);
	}
	spool = am_spool_open(f->spool, 0, &error);
	g_assert_null(spool);
	g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_IO);
	g_assert_nonnull(strstr(error->message, "hold"));
	g_clear_error(&error);

	/* Not a directory. */
	g_assert_true(g_file_set_contents(file, "x", -1, NULL));
	spool = am_spool_open(file, 0, &error);
	g_assert_null(spool);
	g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_IO);
	g_assert_nonnull(strstr(error->message, "not a directory"));
}

static void
test_put_format(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f, 0);
	AmSpoolEntry e = entry_for("am1.aa", 1700000000);
	g_autofree char *text = NULL;
	g_autofree char *envelope = NULL;
	g_autofree char *digest =
	    g_compute_checksum_for_string(G_CHECKSUM_SHA256, BODY, -1);
	const char *body;

	(void)data;
	e.eightbit = TRUE;
	put(spool, &e, AM_SPOOL_QUEUED, BODY);
	g_assert_cmpuint(count_files(f, "queue"), ==, 1);
	g_assert_cmpuint(count_files(f, "tmp"), ==, 0);
	g_assert_cmpuint(count_files(f, "state"), ==, 0);
	g_assert_cmpuint(mode_of(f, "queue", "am1.aa"), ==, 0600);

	/* The envelope, line by line, then the copy's octets as given. */
	text = read_file(f, "queue", "am1.aa");
	envelope = g_strdup_printf("archive-milter-spool %d\n"
	                           "id: am1.aa\n"
	                           "queue_id: 3F2A81C0DE\n"
	                           "rule: all\n"
	                           "relay: archive\n"
	                           "from: \n"
	                           "to: a@archive.example\n"
	                           "to: b@archive.example\n"
	                           "flags: smtputf8 8bitmime\n"
	                           "created: 1700000000\n"
	                           "size: %zu\n"
	                           "sha256: %s\n\n",
	                           AM_SPOOL_VERSION, strlen(BODY), digest);
	g_assert_true(g_str_has_prefix(text, envelope));
	body = text + strlen(envelope);
	g_assert_cmpstr(body, ==, BODY);
}

static void
test_get_and_message(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f, 0);
	AmSpoolEntry e = entry_for("am1.bb", 1700000001);
	g_autoptr(AmSpoolEntry) got = NULL;
	g_autoptr(SmtpMessage) msg = NULL;
	g_autoptr(GBytes) raw = NULL;
	g_autoptr(GError) error = NULL;
	g_autoptr(GString) big = g_string_new("Subject: big\r\n\r\n");

	(void)data;
	/* Bigger than the envelope read, so the offset matters. */
	while (big->len < 300000)
		g_string_append(big, "0123456789abcdef\r\n");
	put(spool, &e, AM_SPOOL_QUEUED, big->str);

	got = am_spool_get(spool, "am1.bb", &error);
	g_assert_no_error(error);
	g_assert_cmpstr(got->id, ==, "am1.bb");
	g_assert_cmpstr(got->queue_id, ==, "3F2A81C0DE");
	g_assert_cmpstr(got->rule, ==, "all");
	g_assert_cmpstr(got->relay, ==, "archive");
	g_assert_cmpstr(got->from, ==, "");
	g_assert_cmpuint(g_strv_length(got->to), ==, 2);
	g_assert_cmpstr(got->to[1], ==, "b@archive.example");
	g_assert_true(got->smtputf8);
	g_assert_false(got->eightbit);
	g_assert_cmpint(got->created, ==, 1700000001);
	g_assert_cmpuint(got->attempts, ==, 0);
	g_assert_null(got->last_error);
	g_assert_cmpint(got->state, ==, AM_SPOOL_QUEUED);
	g_assert_cmpuint(got->size, ==, big->len);

	msg = am_spool_message(spool, got, &error);
	g_assert_no_error(error);
	g_assert_cmpuint(smtp_message_get_size(msg), ==, big->len);
	raw = raw_of(msg);
	g_assert_cmpmem(g_bytes_get_data(raw, NULL), g_bytes_get_size(raw),
	                big->str, big->len);

	/* The message reads from its own descriptor: the file may move
	 * or go while it is being sent. */
	g_assert_true(am_spool_remove(spool, "am1.bb", &error));
	g_clear_pointer(&raw, g_bytes_unref);
	raw = raw_of(msg);
	g_assert_cmpuint(g_bytes_get_size(raw), ==, big->len);
}

/* A value with a line end would forge a line of the envelope. */
static void
test_put_refuses_control(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f, 0);
	const char *bad_to[] = {"a@x\r\nrule: other", NULL};
	const char *fields[] = {"from", "to", "queue_id", "rule"};

	(void)data;
	for (guint i = 0; i < G_N_ELEMENTS(fields); i++) {
		AmSpoolEntry e = entry_for("am1.cc", 1);
		g_autoptr(SmtpMessage) msg = message_of(BODY);
		g_autoptr(GError) error = NULL;

		if (i == 0)
			e.from = (char *)"x@y\nto: evil@example";
		else if (i == 1)
			e.to = (char **)bad_to;
		else if (i == 2)
			e.queue_id = (char *)"Q\r";
		else
			e.rule = (char *)"r\001";
		e.last_error = (char *)"held at once";
		g_assert_false(
		    am_spool_put(spool, &e, msg, AM_SPOOL_QUEUED, &error));
		g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_FORMAT);
		g_assert_nonnull(strstr(error->message, fields[i]));
	}
	g_assert_cmpuint(count_files(f, "queue"), ==, 0);
	g_assert_cmpuint(count_files(f, "tmp"), ==, 0);
	g_assert_cmpuint(count_files(f, "state"), ==, 0);
}

static void
test_bad_ids(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f, 0);
	const char *ids[] = {"",    ".hidden", "../escape", "a/b",
	                     "a b", "a\nb",    "all/.."};

	(void)data;
	for (guint i = 0; i < G_N_ELEMENTS(ids); i++) {
		AmSpoolEntry e = entry_for(ids[i], 1);
		g_autoptr(SmtpMessage) msg = message_of(BODY);
		g_autoptr(GError) error = NULL;
		guint n = 7;

		g_assert_false(
		    am_spool_put(spool, &e, msg, AM_SPOOL_QUEUED, &error));
		g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_NOT_FOUND);
		g_clear_error(&error);
		g_assert_null(am_spool_get(spool, ids[i], &error));
		g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_NOT_FOUND);
		g_clear_error(&error);
		g_assert_false(am_spool_release(spool, ids[i], &n, &error));
		g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_NOT_FOUND);
		g_assert_cmpuint(n, ==, 0);
		g_clear_error(&error);
		g_assert_false(am_spool_remove(spool, ids[i], &error));
		g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_NOT_FOUND);
	}
	g_assert_cmpuint(count_files(f, "queue"), ==, 0);
	g_assert_cmpuint(count_files(f, "tmp"), ==, 0);
	g_assert_false(g_file_test(f->dir, G_FILE_TEST_EXISTS) &&
	               g_file_test("/tmp/escape", G_FILE_TEST_EXISTS));
}

static void
test_list_order_and_state(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f, 0);
	AmSpoolEntry a = entry_for("am1.a", 300);
	AmSpoolEntry b = entry_for("am1.b", 100);
	AmSpoolEntry c = entry_for("am1.c", 200);
	const char *left[] = {"b@archive.example", NULL};
	g_autoptr(GPtrArray) list = NULL;
	g_autoptr(GError) error = NULL;
	g_autoptr(AmSpoolEntry) got = NULL;
	AmSpoolEntry *first;

	(void)data;
	put(spool, &a, AM_SPOOL_QUEUED, BODY);
	put(spool, &b, AM_SPOOL_QUEUED, BODY);
	put(spool, &c, AM_SPOOL_HELD, BODY);

	list = am_spool_list(spool, AM_SPOOL_QUEUED, &error);
	g_assert_no_error(error);
	g_assert_cmpuint(list->len, ==, 2);
	first = list->pdata[0];
	g_assert_cmpstr(first->id, ==, "am1.b");
	g_assert_cmpstr(((AmSpoolEntry *)list->pdata[1])->id, ==, "am1.a");
	g_clear_pointer(&list, g_ptr_array_unref);
	list = am_spool_list(spool, AM_SPOOL_HELD, &error);
	g_assert_cmpuint(list->len, ==, 1);
	g_assert_cmpint(((AmSpoolEntry *)list->pdata[0])->state, ==,
	                AM_SPOOL_HELD);

	/* The retry state, with a partial success: one address left,
	 * and a reply that tried to start a line of its own. */
	a.attempts = 3;
	a.next_attempt = 5000;
	a.last_error = (char *)"451 4.3.0 later\r\nattempts: 0";
	a.to = (char **)left;
	g_assert_true(am_spool_update(spool, &a, &error));
	got = am_spool_get(spool, "am1.a", &error);
	g_assert_no_error(error);
	g_assert_cmpuint(got->attempts, ==, 3);
	g_assert_cmpint(got->next_attempt, ==, 5000);
	g_assert_cmpstr(got->last_error, ==, "451 4.3.0 later??attempts: 0");
	g_assert_cmpuint(g_strv_length(got->to), ==, 1);
	g_assert_cmpstr(got->to[0], ==, "b@archive.example");
	/* The envelope itself is never rewritten. */
	{
		g_autofree char *text = read_file(f, "queue", "am1.a");

		g_assert_nonnull(strstr(text, "to: a@archive.example\n"));
	}

	/* Confirmed: both files go. */
	g_assert_true(am_spool_remove(spool, "am1.a", &error));
	g_assert_cmpuint(count_files(f, "state"), ==, 0);
	g_clear_pointer(&got, am_spool_entry_free);
	got = am_spool_get(spool, "am1.a", &error);
	g_assert_null(got);
	g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_NOT_FOUND);
}

/* A damaged state file costs a retry, never the copy. */
static void
test_bad_state_ignored(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f, 0);
	AmSpoolEntry a = entry_for("am1.a", 300);
	g_autoptr(AmSpoolEntry) got = NULL;
	g_autoptr(GError) error = NULL;

	(void)data;
	put(spool, &a, AM_SPOOL_QUEUED, BODY);
	write_file(f, "state", "am1.a",
	           "archive-milter-state 1\nattempts: x\n");
	got = am_spool_get(spool, "am1.a", &error);
	g_assert_no_error(error);
	g_assert_cmpuint(got->attempts, ==, 0);
	g_assert_cmpuint(g_strv_length(got->to), ==, 2);
}

/* A state's recipients only narrow the envelope's (finding 6 of break3):
 * an address the envelope does not name is dropped, case does not
 * matter, the envelope's spelling is kept. */
static void
test_state_to_narrows(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f, 0);
	AmSpoolEntry a = entry_for("am1.a", 300);
	g_autoptr(AmSpoolEntry) got = NULL;
	g_autoptr(GError) error = NULL;

	(void)data;
	put(spool, &a, AM_SPOOL_QUEUED, BODY);
	write_file(f, "state", "am1.a",
	           "archive-milter-state 1\nattempts: 3\n"
	           "next_attempt: 9223372036854775807\n"
	           "to: evil@elsewhere.example\nto: B@Archive.Example\n"
	           "to: b@archive.example\n");
	got = am_spool_get(spool, "am1.a", &error);
	g_assert_no_error(error);
	g_assert_cmpuint(got->attempts, ==, 3);
	g_assert_cmpint(got->next_attempt, ==, G_MAXINT64);
	g_assert_cmpuint(g_strv_length(got->to), ==, 1);
	g_assert_cmpstr(got->to[0], ==, "b@archive.example");
}

/* A state naming none of the envelope's recipients is damaged: all of
 * it is ignored, the copy goes to the envelope's recipients. */
static void
test_state_to_foreign_ignored(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f, 0);
	AmSpoolEntry a = entry_for("am1.a", 300);
	g_autoptr(AmSpoolEntry) got = NULL;
	g_autoptr(GError) error = NULL;

	(void)data;
	put(spool, &a, AM_SPOOL_QUEUED, BODY);
	write_file(f, "state", "am1.a",
	           "archive-milter-state 1\nattempts: 1\nnext_attempt: 0\n"
	           "released: 0\nto: evil@elsewhere.example\n");
	got = am_spool_get(spool, "am1.a", &error);
	g_assert_no_error(error);
	g_assert_cmpuint(got->attempts, ==, 0);
	g_assert_cmpuint(g_strv_length(got->to), ==, 2);
	g_assert_cmpstr(got->to[0], ==, "a@archive.example");
	g_assert_cmpstr(got->to[1], ==, "b@archive.example");

	/* One past G_MAXINT64 is no number: the state is damaged too. */
	am_spool_entry_free(g_steal_pointer(&got));
	write_file(f, "state", "am1.a",
	           "archive-milter-state 1\nattempts: 2\n"
	           "next_attempt: 9223372036854775808\n");
	got = am_spool_get(spool, "am1.a", &error);
	g_assert_no_error(error);
	g_assert_cmpuint(got->attempts, ==, 0);
}

typedef struct {
	const char *name;
	const char *text;
	const char *why;
} BadFile;

static const BadFile bad_files[] = {
    {"future version",
     "archive-milter-spool 2\nid: am1.bad\nrule: r\nrelay: r\nfrom: \n"
     "to: a@b\ncreated: 1\nnew_key: x\n\nbody",
     "version"},
    {"not a spool file", "From: someone\n\nbody", "not a spool file"},
    {"no end of envelope",
     "archive-milter-spool 1\nid: am1.bad\nrule: r\nrelay: r\n", "no end"},
    {"missing key",
     "archive-milter-spool 1\nid: am1.bad\nrule: r\nfrom: \nto: a@b\n"
     "created: 1\n\nbody",
     "missing"},
    {"id of another file",
     "archive-milter-spool 1\nid: am1.other\nrule: r\nrelay: r\nfrom: \n"
     "to: a@b\ncreated: 1\n" SEAL_BODY "\nbody",
     "file name"},
    {"no size or digest",
     "archive-milter-spool 1\nid: am1.bad\nrule: r\nrelay: r\nfrom: \n"
     "to: a@b\ncreated: 1\n\nbody",
     "missing"},
    {"longer than its size",
     "archive-milter-spool 1\nid: am1.bad\nrule: r\nrelay: r\nfrom: \n"
     "to: a@b\ncreated: 1\n" SEAL_BODY "\nbody and more",
     "damaged"},
    {"bad digest",
     "archive-milter-spool 1\nid: am1.bad\nrule: r\nrelay: r\nfrom: \n"
     "to: a@b\ncreated: 1\nsize: 4\nsha256: 12\n\nbody",
     "sha256"},
    {"unknown key",
     "archive-milter-spool 1\nid: am1.bad\nrule: r\nrelay: r\nfrom: \n"
     "to: a@b\ncreated: 1\ncolour: red\n\nbody",
     "unknown key"},
    {"bad time",
     "archive-milter-spool 1\nid: am1.bad\nrule: r\nrelay: r\nfrom: \n"
     "to: a@b\ncreated: -5\n\nbody",
     "created"},
    {"time past 64 bits",
     "archive-milter-spool 1\nid: am1.bad\nrule: r\nrelay: r\nfrom: \n"
     "to: a@b\ncreated: 9223372036854775808\n\nbody",
     "created"},
    {"empty", "", "no end"},
};

/* Damaged or foreign files: listed as skipped, never deleted, never
 * released, and the good copies beside them still work. */
static void
test_bad_file(Fixture *f, gconstpointer data)
{
	const BadFile *bad = data;
	g_autoptr(AmSpool) spool = open_spool(f, 0);
	AmSpoolEntry good = entry_for("am1.good", 1);
	g_autoptr(GPtrArray) list = NULL;
	g_autoptr(GError) error = NULL;
	g_autofree char *after = NULL;
	guint n = 9;

	put(spool, &good, AM_SPOOL_QUEUED, BODY);
	write_file(f, "queue", "am1.bad", bad->text);
	write_file(f, "hold", "am1.bad", bad->text);

	list = am_spool_list(spool, AM_SPOOL_QUEUED, &error);
	g_assert_no_error(error);
	g_assert_cmpuint(list->len, ==, 1);
	g_assert_cmpstr(((AmSpoolEntry *)list->pdata[0])->id, ==, "am1.good");

	g_assert_null(am_spool_get(spool, "am1.bad", &error));
	g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_FORMAT);
	g_assert_nonnull(strstr(error->message, bad->why));
	g_clear_error(&error);

	/* Release of all moves nothing damaged, and says so by count. */
	g_assert_true(am_spool_release(spool, "all", &n, &error));
	g_assert_no_error(error);
	g_assert_cmpuint(n, ==, 0);
	g_assert_false(am_spool_release(spool, "am1.bad", &n, &error));
	g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_FORMAT);

	after = read_file(f, "queue", "am1.bad");
	g_assert_cmpstr(after, ==, bad->text);
	g_free(g_steal_pointer(&after));
	after = read_file(f, "hold", "am1.bad");
	g_assert_cmpstr(after, ==, bad->text);
}

static void
test_hold_release(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f, 0);
	AmSpoolEntry a = entry_for("am1.a", 100);
	AmSpoolEntry b = entry_for("am1.b", 200);
	AmSpoolEntry c = entry_for("am1.c", 300);
	g_autoptr(GError) error = NULL;
	g_autoptr(AmSpoolEntry) got = NULL;
	g_autoptr(GPtrArray) list = NULL;
	guint n = 0;
	gint64 now = g_get_real_time() / G_USEC_PER_SEC;

	(void)data;
	put(spool, &a, AM_SPOOL_QUEUED, BODY);
	put(spool, &b, AM_SPOOL_QUEUED, BODY);
	a.attempts = 4;
	a.next_attempt = now + 1000;
	g_assert_true(am_spool_update(spool, &a, &error));

	g_assert_true(am_spool_hold(spool, "am1.a", "550 5.1.1 no", &error));
	g_assert_true(am_spool_hold(spool, "am1.b", "too old", &error));
	g_assert_false(am_spool_hold(spool, "am1.b", "again", &error));
	g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_NOT_FOUND);
	g_clear_error(&error);
	g_assert_cmpuint(count_files(f, "hold"), ==, 2);
	g_assert_cmpuint(count_files(f, "queue"), ==, 0);
	got = am_spool_get(spool, "am1.a", &error);
	g_assert_cmpint(got->state, ==, AM_SPOOL_HELD);
	g_assert_cmpstr(got->last_error, ==, "550 5.1.1 no");
	g_assert_cmpuint(got->attempts, ==, 4);
	g_clear_pointer(&got, am_spool_entry_free);

	/* One: due at once, its age counted from now, the reason kept. */
	g_assert_true(am_spool_release(spool, "am1.a", &n, &error));
	g_assert_cmpuint(n, ==, 1);
	got = am_spool_get(spool, "am1.a", &error);
	g_assert_cmpint(got->state, ==, AM_SPOOL_QUEUED);
	g_assert_cmpuint(got->attempts, ==, 0);
	g_assert_cmpint(got->next_attempt, ==, 0);
	g_assert_cmpint(got->released, >=, now);
	g_assert_cmpstr(got->last_error, ==, "550 5.1.1 no");

	/* Unknown, and already released. */
	g_assert_false(am_spool_release(spool, "am1.zz", &n, &error));
	g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_NOT_FOUND);
	g_clear_error(&error);
	g_assert_false(am_spool_release(spool, "am1.a", &n, &error));
	g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_NOT_FOUND);
	g_clear_error(&error);

	/* All. */
	c.last_error = (char *)"held at once";
	put(spool, &c, AM_SPOOL_HELD, BODY);
	g_assert_true(am_spool_release(spool, "all", &n, &error));
	g_assert_no_error(error);
	g_assert_cmpuint(n, ==, 2);
	g_assert_cmpuint(count_files(f, "hold"), ==, 0);
	list = am_spool_list(spool, AM_SPOOL_QUEUED, &error);
	g_assert_cmpuint(list->len, ==, 3);
	g_assert_true(am_spool_release(spool, "all", &n, &error));
	g_assert_cmpuint(n, ==, 0);
}

static void
test_put_held_with_reason(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f, 0);
	AmSpoolEntry a = entry_for("am1.h", 100);
	g_autoptr(AmSpoolEntry) got = NULL;
	g_autoptr(GError) error = NULL;

	(void)data;
	a.last_error = (char *)"554 5.7.1 refused";
	a.attempts = 1;
	put(spool, &a, AM_SPOOL_HELD, BODY);
	got = am_spool_get(spool, "am1.h", &error);
	g_assert_no_error(error);
	g_assert_cmpint(got->state, ==, AM_SPOOL_HELD);
	g_assert_cmpstr(got->last_error, ==, "554 5.7.1 refused");
	g_assert_cmpuint(got->attempts, ==, 1);

	/* Withdrawn from hold/ too, with its state; twice is no error. */
	g_assert_true(am_spool_remove(spool, "am1.h", &error));
	g_assert_cmpuint(count_files(f, "hold"), ==, 0);
	g_assert_cmpuint(count_files(f, "state"), ==, 0);
	g_assert_true(am_spool_remove(spool, "am1.h", &error));
	g_assert_no_error(error);
}

static void
test_full_floor(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f, G_MAXUINT64 / 2);
	AmSpoolEntry a = entry_for("am1.f", 100);
	g_autoptr(SmtpMessage) msg = message_of(BODY);
	g_autoptr(GError) error = NULL;

	(void)data;
	g_assert_false(am_spool_put(spool, &a, msg, AM_SPOOL_QUEUED, &error));
	g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_FULL);
	g_assert_nonnull(strstr(error->message, "spool_min_free"));
	g_assert_cmpuint(count_files(f, "queue"), ==, 0);
	g_assert_cmpuint(count_files(f, "tmp"), ==, 0);
	g_assert_cmpuint(count_files(f, "state"), ==, 0);
}

static struct stat
stat_of(Fixture *f, const char *sub, const char *name)
{
	g_autofree char *path = g_build_filename(f->spool, sub, name, NULL);
	struct stat st;

	g_assert_cmpint(lstat(path, &st), ==, 0);
	return st;
}

static ino_t
inode_of(Fixture *f, const char *sub, const char *name)
{
	return stat_of(f, sub, name).st_ino;
}

/* What the spool code logs to stderr while @fn runs on @f. */
static char *
stderr_of(void (*fn)(Fixture *), Fixture *f)
{
	char path[] = "/tmp/test-spool-err-XXXXXX";
	int fd = g_mkstemp(path);
	int saved = dup(2);
	char *text = NULL;

	g_assert_cmpint(fd, >=, 0);
	g_assert_cmpint(saved, >=, 0);
	fflush(stderr);
	g_assert_cmpint(dup2(fd, 2), ==, 2);
	fn(f);
	fflush(stderr);
	g_assert_cmpint(dup2(saved, 2), ==, 2);
	close(saved);
	close(fd);
	g_assert_true(g_file_get_contents(path, &text, NULL, NULL));
	unlink(path);
	return text;
}

static void
reopen(Fixture *f)
{
	am_spool_close(open_spool(f, 0));
}

/*
 * A confirmed copy's file is kept in tmp/ and written again for the
 * next copy (no inode freed and allocated per copy): the new copy is
 * whole and only itself, however long the old one was; only a copy
 * sent is recycled (a withdrawn one may be read by a worker), only by
 * the daemon that owns the spool, never a file with a second link; the
 * daemon's next start removes what is left in tmp/, without a word.
 */
static void
test_recycle(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f, 0);
	g_autoptr(GString) big = g_string_new("Subject: big\r\n\r\n");
	g_autoptr(AmSpoolEntry) got = NULL;
	g_autoptr(SmtpMessage) msg = NULL;
	g_autoptr(SmtpMessage) want = message_of(BODY);
	g_autoptr(GError) error = NULL;
	g_autoptr(GBytes) a = NULL;
	g_autoptr(GBytes) b = NULL;
	g_autofree char *log = NULL;
	g_autofree char *q1 =
	    g_build_filename(f->spool, "queue", "am1.first", NULL);
	g_autofree char *keep = g_build_filename(f->dir, "kept", NULL);
	AmSpoolEntry e1 = entry_for("am1.first", 100);
	AmSpoolEntry e2 = entry_for("am1.second", 100);
	struct stat st;
	ino_t ino;

	(void)data;
	for (guint i = 0; i < 1900; i++)
		g_string_append(big, "a long line of the first copy\r\n");
	put(spool, &e1, AM_SPOOL_QUEUED, big->str);
	ino = inode_of(f, "queue", "am1.first");
	g_assert_true(am_spool_remove_sent(spool, "am1.first", TRUE, &error));
	g_assert_cmpuint(count_files(f, "queue"), ==, 0);
	g_assert_cmpuint(count_files(f, "tmp"), ==, 1);

	put(spool, &e2, AM_SPOOL_QUEUED, BODY);
	g_assert_cmpuint(count_files(f, "tmp"), ==, 0);
	g_assert_cmpuint(inode_of(f, "queue", "am1.second"), ==, ino);
	got = am_spool_get(spool, "am1.second", &error);
	g_assert_no_error(error);
	g_assert_cmpuint(got->size, ==, strlen(BODY));
	msg = am_spool_message(spool, got, &error);
	g_assert_no_error(error);
	a = raw_of(msg);
	b = raw_of(want);
	g_assert_true(g_bytes_equal(a, b));
	/* Written over and cut: nothing of the old copy after it. */
	g_assert_cmpint(stat_of(f, "queue", "am1.second").st_size, <,
	                (goffset)strlen(BODY) + 1000);
	g_clear_pointer(&msg, smtp_message_free);
	g_clear_pointer(&got, am_spool_entry_free);
	g_clear_pointer(&a, g_bytes_unref);

	/* A longer copy into a shorter recycled file: whole. */
	g_assert_true(am_spool_remove_sent(spool, "am1.second", TRUE, &error));
	put(spool, &e1, AM_SPOOL_QUEUED, big->str);
	g_assert_cmpuint(inode_of(f, "queue", "am1.first"), ==, ino);
	got = am_spool_get(spool, "am1.first", &error);
	g_assert_no_error(error);
	g_assert_cmpuint(got->size, ==, big->len);
	msg = am_spool_message(spool, got, &error);
	g_assert_no_error(error);
	a = raw_of(msg);
	g_clear_pointer(&msg, smtp_message_free);
	msg = message_of(big->str);
	g_clear_pointer(&b, g_bytes_unref);
	b = raw_of(msg);
	g_assert_true(g_bytes_equal(a, b));
	g_assert_true(am_spool_remove_sent(spool, "am1.first", TRUE, &error));
	put(spool, &e2, AM_SPOOL_QUEUED, BODY);

	/* Withdrawn (not sent): unlinked. */
	g_assert_true(am_spool_remove(spool, "am1.second", &error));
	g_assert_cmpuint(count_files(f, "queue"), ==, 0);
	g_assert_cmpuint(count_files(f, "tmp"), ==, 0);

	/* A second daemon on the same spool leaves tmp/ to the first. */
	put(spool, &e2, AM_SPOOL_QUEUED, BODY);
	{
		g_autoptr(AmSpool) other = open_spool(f, 0);

		g_assert_false(am_spool_is_exclusive(other));
		g_assert_true(
		    am_spool_remove_sent(other, "am1.second", TRUE, &error));
		g_assert_cmpuint(count_files(f, "queue"), ==, 0);
		g_assert_cmpuint(count_files(f, "tmp"), ==, 0);
	}

	/* A file with a second link is not overwritten later. */
	put(spool, &e1, AM_SPOOL_QUEUED, BODY);
	g_assert_cmpint(link(q1, keep), ==, 0);
	g_assert_true(am_spool_remove_sent(spool, "am1.first", TRUE, &error));
	g_assert_cmpuint(count_files(f, "tmp"), ==, 0);
	g_assert_cmpint(lstat(keep, &st), ==, 0);
	g_assert_cmpuint(st.st_nlink, ==, 1);

	/* Left in tmp/ at a stop: removed at the next start; a copy being
	 * written when the daemon died is news, a recycled file is not. */
	put(spool, &e1, AM_SPOOL_QUEUED, BODY);
	g_assert_true(am_spool_remove_sent(spool, "am1.first", TRUE, &error));
	g_assert_cmpuint(count_files(f, "tmp"), ==, 1);
	write_file(f, "tmp", "am1.torn", "archive-milter-spool 1\n");
	g_clear_pointer(&spool, am_spool_close);
	log = stderr_of(reopen, f);
	g_test_message("start's log: %s", log);
	g_assert_cmpuint(count_files(f, "tmp"), ==, 0);
	g_assert_nonnull(strstr(log, "am1.torn"));
	g_assert_null(strstr(log, ".recycled"));
}

/*
 * A reader of another process (--spool-list, --spool-retry) that has a
 * confirmed copy's file open while the daemon recycles it.  This
 * binary's own pread() (found before libc's by the spool code linked
 * into it) plays the daemon at the reader's first read of the file:
 * the copy is confirmed, its file renamed into tmp/ and written again
 * for another, shorter copy, and only then is the read done.
 */
static struct {
	AmSpool *daemon;    /* the spool's owner */
	const char *victim; /* the copy whose file the reader has open */
	const char *next;   /* written into its recycled file */
	ino_t ino;
	dev_t dev;
	guint skip; /* reads of the file to let through first */
	gboolean done;
} race;

static void
race_recycle(void)
{
	g_autoptr(GError) error = NULL;
	AmSpoolEntry next = entry_for(race.next, 200);

	g_assert_true(
	    am_spool_remove_sent(race.daemon, race.victim, TRUE, &error));
	g_assert_no_error(error);
	put(race.daemon, &next, AM_SPOOL_QUEUED, BODY);
}

ssize_t
pread(int fd, void *buf, size_t count, off_t offset)
{
	static ssize_t (*real)(int, void *, size_t, off_t);
	struct stat st;

	if (real == NULL)
		real = (ssize_t(*)(int, void *, size_t, off_t))dlsym(RTLD_NEXT,
		                                                     "pread64");
	if (race.daemon != NULL && !race.done && fstat(fd, &st) == 0 &&
	    st.st_ino == race.ino && st.st_dev == race.dev) {
		if (race.skip > 0) {
			race.skip--;
		} else {
			race.done = TRUE;
			race_recycle();
		}
	}
	return real(fd, buf, count, offset);
}

static void
race_arm(Fixture *f, AmSpool *daemon, guint skip)
{
	g_autofree char *path =
	    g_build_filename(f->spool, "queue", "am1.victim", NULL);
	struct stat st;

	g_assert_cmpint(lstat(path, &st), ==, 0);
	race.daemon = daemon;
	race.victim = "am1.victim";
	race.next = "am1.next";
	race.ino = st.st_ino;
	race.dev = st.st_dev;
	race.skip = skip;
	race.done = FALSE;
}

/* The new copy in the recycled file: the victim's inode, its own
 * length (no old octet after it), its digest checked, its octets. */
static void
check_next_copy(Fixture *f, AmSpool *spool, ino_t ino)
{
	g_autofree char *path =
	    g_build_filename(f->spool, "queue", "am1.next", NULL);
	g_autoptr(AmSpoolEntry) got = NULL;
	g_autoptr(SmtpMessage) msg = NULL;
	g_autoptr(SmtpMessage) want = message_of(BODY);
	g_autoptr(GBytes) a = NULL;
	g_autoptr(GBytes) b = NULL;
	g_autoptr(GError) error = NULL;
	g_autofree char *text = NULL;
	gsize len = 0;
	struct stat st;

	g_assert_cmpint(lstat(path, &st), ==, 0);
	g_assert_cmpuint(st.st_ino, ==, ino);
	got = am_spool_get(spool, "am1.next", &error);
	g_assert_no_error(error);
	g_assert_cmpuint(got->size, ==, strlen(BODY));
	g_assert_true(g_file_get_contents(path, &text, &len, NULL));
	g_assert_cmpuint(len, ==, (gsize)st.st_size);
	g_assert_true(g_str_has_suffix(text, BODY));
	msg = am_spool_message(spool, got, &error);
	g_assert_no_error(error);
	a = raw_of(msg);
	b = raw_of(want);
	g_assert_true(g_bytes_equal(a, b));
}

/* --spool-list's reading: the recycled copy is gone, not damaged. */
static void
test_recycle_reader_list(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) daemon = open_spool(f, 0);
	g_autoptr(AmSpool) reader = NULL;
	g_autoptr(GString) text = g_string_new("Subject: long\r\n\r\n");
	g_autoptr(GPtrArray) list = NULL;
	g_autoptr(AmSpoolEntry) got = NULL;
	g_autoptr(GError) error = NULL;
	AmSpoolEntry victim = entry_for("am1.victim", 100);
	guint damaged = 99;
	ino_t ino;

	(void)data;
	for (guint i = 0; i < 100; i++)
		g_string_append(text, "a line of the first, longer copy\r\n");
	put(daemon, &victim, AM_SPOOL_QUEUED, text->str);
	reader = am_spool_open_full(f->spool, 0, AM_SPOOL_OPEN_COMMAND, &error);
	g_assert_no_error(error);
	race_arm(f, daemon, 0);
	ino = race.ino;
	list = am_spool_list_full(reader, AM_SPOOL_QUEUED, &damaged, &error);
	race.daemon = NULL;
	g_assert_no_error(error);
	g_assert_true(race.done);
	g_assert_cmpuint(list->len, ==, 0);
	g_assert_cmpuint(damaged, ==, 0);
	got = am_spool_get(reader, "am1.victim", &error);
	g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_NOT_FOUND);
	g_assert_null(got);
	check_next_copy(f, reader, ino);
}

/* A reader that read the envelope and is hashing the copy when it is
 * recycled: gone, not "damaged: the copy's SHA-256 is ...". */
static void
test_recycle_reader_digest(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) daemon = open_spool(f, 0);
	g_autoptr(AmSpool) reader = NULL;
	g_autoptr(GString) text = g_string_new("Subject: long\r\n\r\n");
	g_autoptr(AmSpoolEntry) got = NULL;
	g_autoptr(SmtpMessage) msg = NULL;
	g_autoptr(GError) error = NULL;
	AmSpoolEntry victim = entry_for("am1.victim", 100);
	ino_t ino;

	(void)data;
	for (guint i = 0; i < 100; i++)
		g_string_append(text, "a line of the first, longer copy\r\n");
	put(daemon, &victim, AM_SPOOL_QUEUED, text->str);
	reader = am_spool_open_full(f->spool, 0, AM_SPOOL_OPEN_COMMAND, &error);
	g_assert_no_error(error);
	got = am_spool_get(reader, "am1.victim", &error);
	g_assert_no_error(error);
	/* Its envelope read again, then the daemon acts. */
	race_arm(f, daemon, 1);
	ino = race.ino;
	msg = am_spool_message(reader, got, &error);
	race.daemon = NULL;
	g_assert_true(race.done);
	g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_NOT_FOUND);
	g_assert_null(msg);
	check_next_copy(f, reader, ino);
}

/* In a child of its own, with a mount namespace of its own, so that
 * the small tmpfs never shows outside.  Exit 77: cannot mount. */
static int
enospc_child(void)
{
	g_autoptr(GError) error = NULL;
	g_autofree char *dir = g_dir_make_tmp("test-spool-full-XXXXXX", NULL);
	g_autofree char *spool_dir = g_build_filename(dir, "spool", NULL);
	g_autoptr(GString) big = g_string_new("Subject: big\r\n\r\n");
	AmSpoolEntry a = entry_for("am1.full", 100);
	g_autoptr(SmtpMessage) msg = NULL;
	g_autoptr(AmSpool) spool = NULL;
	const char *subs[] = {"tmp", "queue", "state"};

	if (unshare(CLONE_NEWNS) != 0 ||
	    mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0 ||
	    mount("tmpfs", dir, "tmpfs", 0, "size=256k,mode=0700") != 0) {
		g_printerr("cannot mount a small tmpfs: %s\n",
		           g_strerror(errno));
		rmdir(dir);
		return 77;
	}
	spool = am_spool_open(spool_dir, 0, &error);
	g_assert_no_error(error);
	while (big->len < 1024 * 1024)
		g_string_append(big, "0123456789abcdef0123456789abcdef\r\n");
	msg = message_of(big->str);
	g_assert_false(am_spool_put(spool, &a, msg, AM_SPOOL_QUEUED, &error));
	g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_FULL);
	g_clear_error(&error);
	for (guint i = 0; i < G_N_ELEMENTS(subs); i++) {
		g_autofree char *p = g_build_filename(spool_dir, subs[i], NULL);
		g_autoptr(GDir) d = g_dir_open(p, 0, NULL);

		g_assert_nonnull(d);
		g_assert_null(g_dir_read_name(d));
	}

	/* And the disk has room again for a small copy. */
	g_clear_pointer(&msg, smtp_message_free);
	msg = message_of(BODY);
	g_assert_true(am_spool_put(spool, &a, msg, AM_SPOOL_QUEUED, &error));
	g_clear_pointer(&spool, am_spool_close);
	umount(dir);
	rmdir(dir);
	return 0;
}

static void
test_enospc(void)
{
	pid_t pid;
	int status;

	if (geteuid() != 0) {
		g_test_skip("mounting a small tmpfs needs root");
		return;
	}
	pid = fork();
	g_assert_cmpint(pid, >=, 0);
	if (pid == 0)
		_exit(enospc_child());
	g_assert_cmpint(waitpid(pid, &status, 0), ==, pid);
	if (WIFEXITED(status) && WEXITSTATUS(status) == 77) {
		g_test_skip("cannot mount a small tmpfs (see stderr)");
		return;
	}
	g_assert_true(WIFEXITED(status));
	g_assert_cmpint(WEXITSTATUS(status), ==, 0);
}

/* Set the modification time of @sub/@name @age seconds back. */
static void
age_file(Fixture *f, const char *sub, const char *name, gint64 age)
{
	g_autofree char *path = g_build_filename(f->spool, sub, name, NULL);
	struct timespec ts[2] = {
	    {.tv_sec = g_get_real_time() / G_USEC_PER_SEC - age},
	    {.tv_sec = g_get_real_time() / G_USEC_PER_SEC - age},
	};

	g_assert_cmpint(utimensat(AT_FDCWD, path, ts, 0), ==, 0);
}

/* Leftovers of a crash go, but only for the daemon that owns the
 * spool: a --spool-list beside the daemon must not take its files. */
static void
test_leftovers(Fixture *f, gconstpointer data)
{
	AmSpool *first = open_spool(f, 0);
	AmSpool *second;

	(void)data;
	write_file(f, "tmp", "am1.half", "archive-milter-spool 1\nid: am1");
	write_file(f, "state", ".am1.x.AB12CD", "half");
	age_file(f, "state", ".am1.x.AB12CD", 3600);
	/* A --spool-retry's, being written: left alone. */
	write_file(f, "state", ".am1.y.AB12CD", "half");
	g_assert_true(am_spool_is_exclusive(first));
	second = open_spool(f, 0);
	g_assert_false(am_spool_is_exclusive(second));
	g_assert_cmpuint(count_files(f, "tmp"), ==, 1);
	am_spool_close(second);
	am_spool_close(first);
	first = open_spool(f, 0);
	g_assert_cmpuint(count_files(f, "tmp"), ==, 0);
	g_assert_cmpuint(count_files(f, "state"), ==, 1);
	am_spool_close(first);
}

/*
 * The state of a copy that is gone (a crash between the removal of a
 * copy and of its state, or an older put that wrote the state first)
 * is removed at the daemon's start; the state of a queued or held copy
 * stays.  A command removes nothing.
 */
static void
test_orphan_state(Fixture *f, gconstpointer data)
{
	AmSpool *spool = open_spool(f, 0);
	AmSpoolEntry q = entry_for("am1.q", 100);
	AmSpoolEntry h = entry_for("am1.h", 100);
	g_autoptr(GError) error = NULL;

	(void)data;
	q.attempts = 1;
	q.last_error = (char *)"451 later";
	h.last_error = (char *)"554 no";
	put(spool, &q, AM_SPOOL_QUEUED, BODY);
	put(spool, &h, AM_SPOOL_HELD, BODY);
	write_file(f, "state", "am1.gone",
	           "archive-milter-state 1\nattempts: 1\n");
	am_spool_close(spool);
	g_assert_cmpuint(count_files(f, "state"), ==, 3);

	spool = am_spool_open_full(f->spool, 0, AM_SPOOL_OPEN_COMMAND, &error);
	g_assert_no_error(error);
	g_assert_cmpuint(count_files(f, "state"), ==, 3);
	am_spool_close(spool);

	spool = open_spool(f, 0);
	g_assert_cmpuint(count_files(f, "state"), ==, 2);
	g_assert_false(g_file_test(f->spool, G_FILE_TEST_EXISTS) &&
	               count_files(f, "queue") != 1);
	am_spool_close(spool);
}

/*
 * A command (--spool-list, --spool-retry) neither takes the lock nor
 * deletes anything: a daemon starting while it runs owns the spool and
 * is not told of a second daemon.
 */
static void
test_command_open(Fixture *f, gconstpointer data)
{
	AmSpool *daemon = open_spool(f, 0);
	AmSpool *cmd;
	g_autoptr(GError) error = NULL;

	(void)data;
	am_spool_close(daemon);
	write_file(f, "tmp", "am1.half", "archive-milter-spool 1\nid: am1");
	cmd = am_spool_open_full(f->spool, 0, AM_SPOOL_OPEN_COMMAND, &error);
	g_assert_no_error(error);
	g_assert_nonnull(cmd);
	g_assert_false(am_spool_is_exclusive(cmd));
	g_assert_cmpuint(count_files(f, "tmp"), ==, 1);

	daemon = open_spool(f, 0);
	g_assert_true(am_spool_is_exclusive(daemon));
	g_assert_cmpuint(count_files(f, "tmp"), ==, 0);
	am_spool_close(daemon);
	am_spool_close(cmd);
}

/*
 * A spool directory owned by another user, mode 0700, is refused: that
 * user could rename queue/ and hold/ and put its own in their place.
 * The same for a subdirectory.  (Needs root to set up.)
 */
static void
test_open_foreign_owner(Fixture *f, gconstpointer data)
{
	g_autoptr(GError) error = NULL;
	g_autofree char *hold = g_build_filename(f->spool, "hold", NULL);
	AmSpool *spool;

	(void)data;
	if (geteuid() != 0) {
		g_test_skip("needs root to chown the spool directory");
		return;
	}
	g_assert_cmpint(mkdir(f->spool, 0700), ==, 0);
	g_assert_cmpint(chown(f->spool, 65534, 65534), ==, 0);
	spool = am_spool_open(f->spool, 0, &error);
	g_assert_null(spool);
	g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_IO);
	g_assert_nonnull(strstr(error->message, f->spool));
	g_assert_nonnull(strstr(error->message, "owned by uid 65534"));
	g_clear_error(&error);

	g_assert_cmpint(chown(f->spool, 0, 0), ==, 0);
	am_spool_close(open_spool(f, 0));
	g_assert_cmpint(chown(hold, 65534, 65534), ==, 0);
	spool = am_spool_open_full(f->spool, 0, AM_SPOOL_OPEN_COMMAND, &error);
	g_assert_null(spool);
	g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_IO);
	g_assert_nonnull(strstr(error->message, hold));
	g_assert_nonnull(strstr(error->message, "owned by uid"));
}

/*
 * A subdirectory (or the spool directory itself) that is a symbolic
 * link is refused, and nothing where it points is touched: tmp/ as a
 * link to another 0700 directory would have had every file there
 * removed as a leftover.
 */
static void
test_open_symlinks(Fixture *f, gconstpointer data)
{
	g_autoptr(GError) error = NULL;
	g_autofree char *victim = g_build_filename(f->dir, "victim", NULL);
	g_autofree char *precious = g_build_filename(victim, "precious", NULL);
	g_autofree char *tmp = g_build_filename(f->spool, "tmp", NULL);
	g_autofree char *link = g_build_filename(f->dir, "link", NULL);
	AmSpool *spool;

	(void)data;
	g_assert_cmpint(mkdir(f->spool, 0700), ==, 0);
	g_assert_cmpint(mkdir(victim, 0700), ==, 0);
	g_assert_true(g_file_set_contents(precious, "keep me", -1, NULL));
	g_assert_cmpint(symlink(victim, tmp), ==, 0);

	spool = am_spool_open(f->spool, 0, &error);
	g_assert_null(spool);
	g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_IO);
	g_assert_nonnull(strstr(error->message, tmp));
	g_assert_nonnull(strstr(error->message, "symbolic link"));
	g_assert_true(g_file_test(precious, G_FILE_TEST_EXISTS));
	g_clear_error(&error);

	/* The spool directory itself. */
	g_assert_cmpint(unlink(tmp), ==, 0);
	g_assert_cmpint(symlink(f->spool, link), ==, 0);
	spool = am_spool_open(link, 0, &error);
	g_assert_null(spool);
	g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_IO);
	g_assert_nonnull(strstr(error->message, "symbolic link"));
	g_clear_error(&error);
	{
		g_autofree char *slash = g_strconcat(link, "//", NULL);

		spool = am_spool_open(slash, 0, &error);
		g_assert_null(spool);
		g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_IO);
		g_assert_nonnull(strstr(error->message, "symbolic link"));
	}
}

/* A link in place of a copy or of its state is never followed. */
static void
test_file_symlinks(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f, 0);
	AmSpoolEntry a = entry_for("am1.a", 100);
	g_autofree char *outside = g_build_filename(f->dir, "outside", NULL);
	g_autofree char *qlink =
	    g_build_filename(f->spool, "queue", "am1.link", NULL);
	g_autofree char *slink =
	    g_build_filename(f->spool, "state", "am1.a", NULL);
	g_autofree char *copy = NULL;
	g_autoptr(AmSpoolEntry) got = NULL;
	g_autoptr(GError) error = NULL;

	(void)data;
	put(spool, &a, AM_SPOOL_QUEUED, BODY);
	copy = read_file(f, "queue", "am1.a");
	/* A good copy, renamed to its link's name, outside the spool. */
	g_assert_true(g_file_set_contents(
	    outside, "archive-milter-state 1\nattempts: 7\n", -1, NULL));
	g_assert_cmpint(symlink(outside, qlink), ==, 0);
	g_assert_cmpint(symlink(outside, slink), ==, 0);

	g_assert_null(am_spool_get(spool, "am1.link", &error));
	g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_FORMAT);
	g_assert_nonnull(strstr(error->message, "symbolic link"));
	g_clear_error(&error);
	got = am_spool_get(spool, "am1.a", &error);
	g_assert_no_error(error);
	g_assert_cmpuint(got->attempts, ==, 0);
}

/*
 * A copy cut short on disk (a torn file system, a careless copy) is
 * never read as the whole copy: its envelope records its length.
 */
static void
test_truncated_copy(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f, 0);
	AmSpoolEntry a = entry_for("am1.trunc", 100);
	g_autofree char *path =
	    g_build_filename(f->spool, "queue", "am1.trunc", NULL);
	g_autoptr(AmSpoolEntry) got = NULL;
	g_autoptr(GPtrArray) list = NULL;
	g_autoptr(GError) error = NULL;
	struct stat st;

	(void)data;
	put(spool, &a, AM_SPOOL_QUEUED, BODY);
	g_assert_cmpint(stat(path, &st), ==, 0);
	g_assert_cmpint(truncate(path, st.st_size - 10), ==, 0);

	got = am_spool_get(spool, "am1.trunc", &error);
	g_assert_null(got);
	g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_FORMAT);
	g_assert_nonnull(strstr(error->message, "damaged"));
	g_clear_error(&error);
	list = am_spool_list(spool, AM_SPOOL_QUEUED, &error);
	g_assert_cmpuint(list->len, ==, 0);
	g_assert_true(g_file_test(path, G_FILE_TEST_EXISTS));
}

/* A copy of the right length whose octets changed is refused when it
 * is opened for delivery: its SHA-256 differs. */
static void
test_changed_copy(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f, 0);
	AmSpoolEntry a = entry_for("am1.flip", 100);
	g_autofree char *path =
	    g_build_filename(f->spool, "queue", "am1.flip", NULL);
	g_autoptr(AmSpoolEntry) got = NULL;
	g_autoptr(SmtpMessage) msg = NULL;
	g_autoptr(GError) error = NULL;
	struct stat st;
	int fd;

	(void)data;
	put(spool, &a, AM_SPOOL_QUEUED, BODY);
	got = am_spool_get(spool, "am1.flip", &error);
	g_assert_no_error(error);
	g_assert_cmpuint(strlen(got->sha256), ==, 64);
	msg = am_spool_message(spool, got, &error);
	g_assert_no_error(error);
	g_clear_pointer(&msg, smtp_message_free);

	g_assert_cmpint(stat(path, &st), ==, 0);
	fd = open(path, O_WRONLY);
	g_assert_cmpint(pwrite(fd, "X", 1, st.st_size - 3), ==, 1);
	close(fd);
	msg = am_spool_message(spool, got, &error);
	g_assert_null(msg);
	g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_FORMAT);
	g_assert_nonnull(strstr(error->message, "SHA-256"));
}

/* A damaged version line is named, never printed raw: no escape
 * sequence from a file reaches a terminal or the log. */
static void
test_version_sanitized(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f, 0);
	g_autoptr(GError) error = NULL;

	(void)data;
	write_file(f, "queue", "am1.esc",
	           "archive-milter-spool 1\033[2J\r\nid: am1.esc\n\nbody");
	g_assert_null(am_spool_get(spool, "am1.esc", &error));
	g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_FORMAT);
	g_assert_nonnull(strstr(error->message, "version"));
	g_assert_null(strchr(error->message, '\033'));
	g_assert_null(strchr(error->message, '\r'));
}

typedef struct {
	AmSpool *spool;
	guint thread;
} PutJob;

#define THREADS    8
#define PER_THREAD 25

static gpointer
put_thread(gpointer data)
{
	PutJob *job = data;

	for (guint i = 0; i < PER_THREAD; i++) {
		g_autofree char *id =
		    g_strdup_printf("am1.t%u.%u", job->thread, i);
		g_autofree char *body =
		    g_strdup_printf("Subject: %s\r\n\r\n%s\r\n", id, id);
		AmSpoolEntry e = entry_for(id, 1000 + i);

		put(job->spool, &e, AM_SPOOL_QUEUED, body);
	}
	return NULL;
}

static void
test_threads(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f, 1);
	GThread *threads[THREADS];
	PutJob jobs[THREADS];
	g_autoptr(GPtrArray) list = NULL;
	g_autoptr(GError) error = NULL;

	(void)data;
	for (guint i = 0; i < THREADS; i++) {
		jobs[i] = (PutJob){spool, i};
		threads[i] = g_thread_new("put", put_thread, &jobs[i]);
	}
	for (guint i = 0; i < THREADS; i++)
		g_thread_join(threads[i]);
	list = am_spool_list(spool, AM_SPOOL_QUEUED, &error);
	g_assert_no_error(error);
	g_assert_cmpuint(list->len, ==, THREADS * PER_THREAD);
	g_assert_cmpuint(count_files(f, "tmp"), ==, 0);

	/* Each copy holds its own message. */
	for (guint i = 0; i < list->len; i++) {
		AmSpoolEntry *e = list->pdata[i];
		g_autoptr(SmtpMessage) msg = am_spool_message(spool, e, &error);
		g_autoptr(GBytes) raw = NULL;
		g_autofree char *want = NULL;

		g_assert_no_error(error);
		raw = raw_of(msg);
		want =
		    g_strdup_printf("Subject: %s\r\n\r\n%s\r\n", e->id, e->id);
		g_assert_cmpmem(g_bytes_get_data(raw, NULL),
		                g_bytes_get_size(raw), want, strlen(want));
	}
}

/* ------------------------------------------------------------------ */
/* Group commit of the directory fsync                                  */
/* ------------------------------------------------------------------ */

#define GC_THREADS    12
#define GC_PER_THREAD 10

typedef struct {
	Fixture *f;
	AmSpool *spool;
	GMutex lock;
	GHashTable *covered; /* names in queue/ before a finished fsync */
	guint fsyncs;        /* of queue/ */
	guint late;          /* puts that returned before their fsync */
} GroupCommit;

/* Instead of fsync(): note what queue/ holds as the fsync begins (what
 * it covers), fsync for real, slowly enough that puts pile up, then
 * mark those names covered. */
static int
covering_fsync(int fd, int sub, gpointer data)
{
	GroupCommit *gc = data;
	g_autofree char *path = g_build_filename(gc->f->spool, "queue", NULL);
	g_autoptr(GDir) d = g_dir_open(path, 0, NULL);
	g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func(g_free);
	const char *name;
	int rc;

	g_assert_cmpint(sub, ==, 1);
	g_assert_nonnull(d);
	while ((name = g_dir_read_name(d)) != NULL)
		g_ptr_array_add(names, g_strdup(name));
	g_usleep(20000);
	rc = fsync(fd);
	g_mutex_lock(&gc->lock);
	gc->fsyncs++;
	for (guint i = 0; i < names->len; i++)
		g_hash_table_add(gc->covered, g_strdup(names->pdata[i]));
	g_mutex_unlock(&gc->lock);
	return rc;
}

typedef struct {
	GroupCommit *gc;
	guint thread;
} GcJob;

static gpointer
gc_thread(gpointer data)
{
	GcJob *job = data;
	GroupCommit *gc = job->gc;

	for (guint i = 0; i < GC_PER_THREAD; i++) {
		g_autofree char *id =
		    g_strdup_printf("am1.g%u.%u", job->thread, i);
		g_autofree char *body =
		    g_strdup_printf("Subject: %s\r\n\r\n%s\r\n", id, id);
		AmSpoolEntry e = entry_for(id, 1000 + i);

		put(gc->spool, &e, AM_SPOOL_QUEUED, body);
		/* Returned: an fsync that began after the rename is
		 * done. */
		g_mutex_lock(&gc->lock);
		if (!g_hash_table_contains(gc->covered, id))
			gc->late++;
		g_mutex_unlock(&gc->lock);
	}
	return NULL;
}

static void
test_group_commit(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f, 1);
	g_autoptr(GPtrArray) list = NULL;
	g_autoptr(GError) error = NULL;
	GroupCommit gc = {0};
	GThread *threads[GC_THREADS];
	GcJob jobs[GC_THREADS];

	(void)data;
	gc.f = f;
	gc.spool = spool;
	g_mutex_init(&gc.lock);
	gc.covered =
	    g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
	am_spool_set_fsync_hook(spool, covering_fsync, &gc);
	for (guint i = 0; i < GC_THREADS; i++) {
		jobs[i] = (GcJob){&gc, i};
		threads[i] = g_thread_new("put", gc_thread, &jobs[i]);
	}
	for (guint i = 0; i < GC_THREADS; i++)
		g_thread_join(threads[i]);

	/* No put returned before an fsync that covers it... */
	g_assert_cmpuint(gc.late, ==, 0);
	/* ...and the puts shared them: 120 puts, each fsync 20 ms while
	 * 11 other threads rename. */
	g_test_message("%u fsyncs of queue/ for %u puts", gc.fsyncs,
	               GC_THREADS * GC_PER_THREAD);
	g_assert_cmpuint(gc.fsyncs, >=, 1);
	g_assert_cmpuint(gc.fsyncs, <, GC_THREADS * GC_PER_THREAD / 2);

	/* Every put that returned is in queue/, whole (digest checked). */
	list = am_spool_list(spool, AM_SPOOL_QUEUED, &error);
	g_assert_no_error(error);
	g_assert_cmpuint(list->len, ==, GC_THREADS * GC_PER_THREAD);
	g_assert_cmpuint(count_files(f, "tmp"), ==, 0);
	for (guint i = 0; i < list->len; i++) {
		g_autoptr(SmtpMessage) msg =
		    am_spool_message(spool, list->pdata[i], &error);

		g_assert_no_error(error);
		g_assert_nonnull(msg);
	}
	g_hash_table_destroy(gc.covered);
	g_mutex_clear(&gc.lock);
}

/* An fsync of queue/ that fails: the put that waited for it fails and
 * leaves nothing; the next one, covered by a new fsync, succeeds. */
static int
failing_fsync(int fd, int sub, gpointer data)
{
	guint *calls = data;

	(void)fd;
	(void)sub;
	if ((*calls)++ == 0) {
		errno = EIO;
		return -1;
	}
	return 0;
}

static void
test_group_commit_fails(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f, 1);
	g_autoptr(SmtpMessage) msg = message_of(BODY);
	g_autoptr(GError) error = NULL;
	AmSpoolEntry e = entry_for("am1.fsyncfail", 1000);
	AmSpoolEntry e2 = entry_for("am1.fsyncok", 1000);
	guint calls = 0;

	(void)data;
	am_spool_set_fsync_hook(spool, failing_fsync, &calls);
	g_assert_false(am_spool_put(spool, &e, msg, AM_SPOOL_QUEUED, &error));
	g_assert_error(error, AM_SPOOL_ERROR, AM_SPOOL_ERROR_IO);
	g_assert_cmpuint(count_files(f, "queue"), ==, 0);
	g_assert_cmpuint(count_files(f, "tmp"), ==, 0);
	put(spool, &e2, AM_SPOOL_QUEUED, BODY);
	g_assert_cmpuint(calls, ==, 2);
	g_assert_cmpuint(count_files(f, "queue"), ==, 1);
}

/*
 * The same fault made certain: this binary's own g_ascii_strtoll()
 * (found before GLib's by the spool code linked into it) converts right
 * and then leaves errno = EAGAIN, as GLib's did when threads met.  No
 * number in a spool or state file may be judged by errno.
 */
static gboolean strtoll_leaves_errno;

gint64
g_ascii_strtoll(const gchar *nptr, gchar **endptr, guint base)
{
	static gint64 (*real)(const gchar *, gchar **, guint);
	gint64 v;

	if (real == NULL)
		real = (gint64(*)(const gchar *, gchar **, guint))dlsym(
		    RTLD_NEXT, "g_ascii_strtoll");
	v = real(nptr, endptr, base);
	if (strtoll_leaves_errno)
		errno = EAGAIN;
	return v;
}

static void
test_numbers_not_judged_by_errno(Fixture *f, gconstpointer data)
{
	g_autoptr(AmSpool) spool = open_spool(f, 0);
	AmSpoolEntry a = entry_for("am1.a", 1796417950);
	g_autoptr(AmSpoolEntry) got = NULL;
	g_autoptr(GError) error = NULL;

	(void)data;
	put(spool, &a, AM_SPOOL_QUEUED, BODY);
	write_file(f, "state", "am1.a",
	           "archive-milter-state 1\nattempts: 4\n");
	strtoll_leaves_errno = TRUE;
	got = am_spool_get(spool, "am1.a", &error);
	strtoll_leaves_errno = FALSE;
	g_assert_no_error(error);
	g_assert_cmpint(got->created, ==, 1796417950);
	g_assert_cmpuint(got->attempts, ==, 4);
}

/*
 * The first spool reads of a process, from many threads at once (break3
 * finding 0): GLib 2.74's g_ascii_strtoll() fetches its locale through
 * g_once on the first call, and threads meeting there came back with
 * errno = EAGAIN, which parse_int64() took for a bad number: a sound
 * copy was "damaged: bad created time".  The race is once per process,
 * so this runs FIRST_READ_RUNS children (this binary with
 * --first-reads-child DIR), each with FIRST_READ_THREADS threads reading
 * the same copy at the same moment; any failed read fails the test.
 * Before the fix, about one child in 50 to 100 failed on 2 cores.
 */
#define FIRST_READ_THREADS 32
#define FIRST_READ_RUNS    200
#define FIRST_READ_ID      "am1.first-read"

static const char *self_exe;

typedef struct {
	AmSpool *spool;
	GMutex lock;
	GCond start;
	gboolean go;
	gint failures;
} FirstReads;

static gpointer
first_reader(gpointer data)
{
	FirstReads *fr = data;
	g_autoptr(GError) error = NULL;
	AmSpoolEntry *e;

	g_mutex_lock(&fr->lock);
	while (!fr->go)
		g_cond_wait(&fr->start, &fr->lock);
	g_mutex_unlock(&fr->lock);
	e = am_spool_get(fr->spool, FIRST_READ_ID, &error);
	if (e == NULL) {
		g_printerr("first read: %s\n", error->message);
		g_atomic_int_inc(&fr->failures);
	}
	am_spool_entry_free(e);
	return NULL;
}

static int
first_reads_child(const char *dir)
{
	g_autoptr(GError) error = NULL;
	GThread *t[FIRST_READ_THREADS];
	FirstReads fr = {0};

	fr.spool = am_spool_open_full(dir, 0, AM_SPOOL_OPEN_COMMAND, &error);
	if (fr.spool == NULL) {
		g_printerr("first read: %s\n", error->message);
		return 2;
	}
	for (guint i = 0; i < FIRST_READ_THREADS; i++)
		t[i] = g_thread_new("reader", first_reader, &fr);
	g_usleep(10000);
	g_mutex_lock(&fr.lock);
	fr.go = TRUE;
	g_cond_broadcast(&fr.start);
	g_mutex_unlock(&fr.lock);
	for (guint i = 0; i < FIRST_READ_THREADS; i++)
		g_thread_join(t[i]);
	am_spool_close(fr.spool);
	return fr.failures > 0 ? 1 : 0;
}

static void
test_first_reads_in_threads(Fixture *f, gconstpointer data)
{
	AmSpoolEntry a = entry_for(FIRST_READ_ID, 1796417950);
	AmSpool *spool = open_spool(f, 0);
	guint bad = 0;

	(void)data;
	put(spool, &a, AM_SPOOL_QUEUED, BODY);
	/* A state too: its numbers go through the same parser. */
	write_file(f, "state", FIRST_READ_ID,
	           "archive-milter-state 1\nattempts: 7\n"
	           "next_attempt: 1796417999\nreleased: 0\n");
	am_spool_close(spool);
	g_assert_nonnull(self_exe);
	for (guint run = 0; run < FIRST_READ_RUNS; run++) {
		const char *argv[] = {self_exe, "--first-reads-child", f->spool,
		                      NULL};
		g_autoptr(GError) error = NULL;
		int status = 0;

		g_assert_true(g_spawn_sync(NULL, (char **)argv, NULL,
		                           G_SPAWN_DEFAULT, NULL, NULL, NULL,
		                           NULL, &status, &error));
		g_assert_no_error(error);
		if (!g_spawn_check_wait_status(status, NULL))
			bad++;
	}
	g_test_message("%u of %u processes failed a first read", bad,
	               FIRST_READ_RUNS);
	g_assert_cmpuint(bad, ==, 0);
}

int
main(int argc, char **argv)
{
	if (argc == 3 && strcmp(argv[1], "--first-reads-child") == 0)
		return first_reads_child(argv[2]);
	self_exe = g_file_read_link("/proc/self/exe", NULL);
	g_test_init(&argc, &argv, NULL);
#define ADD(path, fn)                                                          \
	g_test_add(path, Fixture, NULL, fixture_set_up, fn, fixture_tear_down)
	ADD("/spool/open/layout", test_open_layout);
	ADD("/spool/open/refuses", test_open_refuses);
	ADD("/spool/open/leftovers", test_leftovers);
	ADD("/spool/open/orphan-state", test_orphan_state);
	ADD("/spool/open/command", test_command_open);
	ADD("/spool/open/foreign-owner", test_open_foreign_owner);
	ADD("/spool/open/symlinks", test_open_symlinks);
	ADD("/spool/get/file-symlinks", test_file_symlinks);
	ADD("/spool/get/truncated", test_truncated_copy);
	ADD("/spool/message/changed", test_changed_copy);
	ADD("/spool/bad-file/version-sanitized", test_version_sanitized);
	ADD("/spool/put/format", test_put_format);
	ADD("/spool/put/refuses-control", test_put_refuses_control);
	ADD("/spool/put/held-with-reason", test_put_held_with_reason);
	ADD("/spool/put/full-floor", test_full_floor);
	ADD("/spool/put/recycle", test_recycle);
	ADD("/spool/recycle/reader-list", test_recycle_reader_list);
	ADD("/spool/recycle/reader-digest", test_recycle_reader_digest);
	ADD("/spool/put/threads", test_threads);
	ADD("/spool/put/group-commit", test_group_commit);
	ADD("/spool/put/group-commit-fails", test_group_commit_fails);
	ADD("/spool/get/message", test_get_and_message);
	ADD("/spool/ids/bad", test_bad_ids);
	ADD("/spool/list/order-and-state", test_list_order_and_state);
	ADD("/spool/state/damaged-ignored", test_bad_state_ignored);
	ADD("/spool/state/to-narrows", test_state_to_narrows);
	ADD("/spool/state/to-foreign-ignored", test_state_to_foreign_ignored);
	ADD("/spool/hold-release", test_hold_release);
	ADD("/spool/get/first-reads-in-threads", test_first_reads_in_threads);
	ADD("/spool/get/numbers-not-errno", test_numbers_not_judged_by_errno);
#undef ADD
	for (guint i = 0; i < G_N_ELEMENTS(bad_files); i++) {
		g_autofree char *path =
		    g_strdup_printf("/spool/bad-file/%s", bad_files[i].name);

		g_test_add(path, Fixture, &bad_files[i], fixture_set_up,
		           test_bad_file, fixture_tear_down);
	}
	g_test_add_func("/spool/put/enospc", test_enospc);
	return g_test_run();
}
