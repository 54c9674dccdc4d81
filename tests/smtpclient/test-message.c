/*
 * test-message.c - the DATA encoder, the UTF-8 check and SmtpMessage
 *
 * Encoder cases give the input as segments and the exact wire bytes
 * expected, end marker included.  Each case is also run with its input
 * cut at every position, so state carried across block and segment
 * boundaries is tested everywhere, not only where a case happens to
 * cut.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

#include <glib/gstdio.h>

#include "smtp-private.h"

/* A byte string with its length, so cases can hold NUL. */
typedef struct {
	const char *data;
	gsize len;
} Bytes;

#define B(s)                                                                   \
	{                                                                      \
		(s), sizeof(s) - 1                                             \
	}
#define END                                                                    \
	{                                                                      \
		NULL, 0                                                        \
	}

typedef struct {
	const char *name;
	Bytes segments[4]; /* END-terminated */
	Bytes expected;
} EncodeCase;

static const EncodeCase encode_cases[] = {
    {"empty", {END}, B(".\r\n")},
    {"crlf", {B("a\r\nb\r\n"), END}, B("a\r\nb\r\n.\r\n")},
    {"lone-lf", {B("a\nb\n"), END}, B("a\r\nb\r\n.\r\n")},
    {"lone-cr", {B("a\rb\r"), END}, B("a\r\nb\r\n.\r\n")},
    {"cr-cr-lf", {B("a\r\r\nb"), END}, B("a\r\n\r\nb\r\n.\r\n")},
    {"lf-cr", {B("a\n\rb"), END}, B("a\r\n\r\nb\r\n.\r\n")},
    {"lf-lf", {B("\n\n"), END}, B("\r\n\r\n.\r\n")},
    {"no-final-newline", {B("abc"), END}, B("abc\r\n.\r\n")},
    {"cr-at-end", {B("abc\r"), END}, B("abc\r\n.\r\n")},
    {"only-cr", {B("\r"), END}, B("\r\n.\r\n")},
    {"dot-at-start", {B(".hidden\r\n"), END}, B("..hidden\r\n.\r\n")},
    {"only-dot", {B("."), END}, B("..\r\n.\r\n")},
    {"dot-line", {B("a\r\n.\r\nb\r\n"), END}, B("a\r\n..\r\nb\r\n.\r\n")},
    {"dot-dot", {B("..\r\n"), END}, B("...\r\n.\r\n")},
    {"dot-mid-line", {B("a.b\r\n. c\r\n"), END}, B("a.b\r\n.. c\r\n.\r\n")},
    {"dot-after-lone-lf", {B("a\n.\nb"), END}, B("a\r\n..\r\nb\r\n.\r\n")},
    {"dot-after-lone-cr", {B("a\r.\rb"), END}, B("a\r\n..\r\nb\r\n.\r\n")},
    /* The smuggling payload: "<LF>.<CR><LF>" must not end the data. */
    {"smuggle-lf-dot-crlf",
     {B("x\n.\r\nMAIL FROM:<evil@example>\r\n"), END},
     B("x\r\n..\r\nMAIL FROM:<evil@example>\r\n.\r\n")},
    {"smuggle-crlf-dot-lf",
     {B("x\r\n.\nRCPT TO:<y>\r\n"), END},
     B("x\r\n..\r\nRCPT TO:<y>\r\n.\r\n")},
    {"smuggle-cr-dot-cr", {B("x\r.\ry"), END}, B("x\r\n..\r\ny\r\n.\r\n")},
    {"nul", {B("a\0b\r\n\0"), END}, B("a\0b\r\n\0\r\n.\r\n")},
    {"nul-only", {B("\0"), END}, B("\0\r\n.\r\n")},
    {"8bit", {B("caf\xc3\xa9\n"), END}, B("caf\xc3\xa9\r\n.\r\n")},
    {"dot-segment-boundary",
     {B("a\r\n"), B(".b"), END},
     B("a\r\n..b\r\n.\r\n")},
    {"cr-lf-split", {B("a\r"), B("\nb"), END}, B("a\r\nb\r\n.\r\n")},
    {"cr-split-then-dot", {B("a\r"), B(".b"), END}, B("a\r\n..b\r\n.\r\n")},
    {"cr-split-then-cr",
     {B("a\r"), B("\r"), B("b"), END},
     B("a\r\n\r\nb\r\n.\r\n")},
    {"empty-segments", {B(""), B("a"), B(""), END}, B("a\r\n.\r\n")},
};

static int temp_file(const void *data, gsize len);

/* Encode @chunks into @out, and count them with a second encoder: the
 * count (what SIZE= announces) must be the octets before ".CRLF". */
static void
encode_chunks(const Bytes *chunks, guint n, GByteArray *out)
{
	SmtpEncoder enc, counter;
	guint start = out->len;
	guint64 counted = 0;

	smtp_encoder_init(&enc);
	smtp_encoder_init(&counter);
	for (guint i = 0; i < n; i++) {
		smtp_encoder_feed(&enc, (const guint8 *)chunks[i].data,
		                  chunks[i].len, out);
		counted += smtp_encoder_count(
		    &counter, (const guint8 *)chunks[i].data, chunks[i].len);
	}
	counted += smtp_encoder_finish_count(&counter);
	smtp_encoder_finish(&enc, out);
	g_assert_cmpuint(counted, ==, out->len - start - 3);
}

static void
assert_bytes(GByteArray *got, const Bytes *want)
{
	g_assert_cmpmem(got->data, got->len, want->data, want->len);
}

static void
test_encode_case(gconstpointer data)
{
	const EncodeCase *c = data;
	g_autoptr(GByteArray) whole = g_byte_array_new();
	g_autoptr(GByteArray) flat = g_byte_array_new();
	guint n = 0;

	/* As the case cuts it. */
	while (c->segments[n].data != NULL)
		n++;
	{
		g_autoptr(GByteArray) out = g_byte_array_new();

		encode_chunks(c->segments, n, out);
		assert_bytes(out, &c->expected);
	}

	/* As a message, half its segments files: the wire size. */
	{
		g_autoptr(SmtpMessage) msg =
		    smtp_message_new(SMTP_MESSAGE_BYTES);
		g_autoptr(GError) error = NULL;
		guint64 size = 0;

		for (guint i = 0; i < n; i++) {
			const Bytes *b = &c->segments[i];
			int fd;

			if (i % 2 == 0) {
				smtp_message_append_data(msg, b->data, b->len);
				continue;
			}
			fd = temp_file(b->data, b->len);
			g_assert_true(
			    smtp_message_append_fd(msg, fd, 0, -1, &error));
			close(fd);
		}
		g_assert_true(smtp_message_get_wire_size(msg, &size, &error));
		g_assert_no_error(error);
		g_assert_cmpuint(size, ==, c->expected.len - 3);
	}

	/* Cut at every position of the whole input. */
	for (guint i = 0; i < n; i++)
		g_byte_array_append(flat, (const guint8 *)c->segments[i].data,
		                    c->segments[i].len);
	for (guint cut = 0; cut <= flat->len; cut++) {
		Bytes two[2] = {
		    {(const char *)flat->data, cut},
		    {(const char *)flat->data + cut, flat->len - cut},
		};

		g_byte_array_set_size(whole, 0);
		encode_chunks(two, 2, whole);
		assert_bytes(whole, &c->expected);
	}

	/* And one byte at a time. */
	g_byte_array_set_size(whole, 0);
	{
		SmtpEncoder enc;

		smtp_encoder_init(&enc);
		for (guint i = 0; i < flat->len; i++)
			smtp_encoder_feed(&enc, flat->data + i, 1, whole);
		smtp_encoder_finish(&enc, whole);
		assert_bytes(whole, &c->expected);
	}
}

/* Whatever the input, the output has no lone CR or LF, and no line
 * that is a single "." before the end marker. */
static void
test_encode_random(void)
{
	GRand *rand = g_rand_new_with_seed(1869);

	for (guint round = 0; round < 500; round++) {
		g_autoptr(GByteArray) out = g_byte_array_new();
		static const char alphabet[] = "\r\n.a\0";
		guint8 in[40];
		gsize len = g_rand_int_range(rand, 0, sizeof(in));
		SmtpEncoder enc;

		for (gsize i = 0; i < len; i++)
			in[i] = alphabet[g_rand_int_range(rand, 0, 5)];
		smtp_encoder_init(&enc);
		smtp_encoder_feed(&enc, in, len, out);
		smtp_encoder_finish(&enc, out);

		g_assert_cmpuint(out->len, >=, 3);
		for (guint i = 0; i < out->len; i++) {
			if (out->data[i] == '\r')
				g_assert_cmpint(out->data[i + 1], ==, '\n');
			if (out->data[i] == '\n')
				g_assert_cmpint(out->data[i - 1], ==, '\r');
		}
		for (guint i = 0; i + 3 < out->len; i++) {
			gboolean start = i == 0 || out->data[i - 1] == '\n';

			g_assert_false(start && out->data[i] == '.' &&
			               out->data[i + 1] == '\r');
		}
		g_assert_cmpmem(out->data + out->len - 3, 3, ".\r\n", 3);
	}
	g_rand_free(rand);
}

/* ------------------------------------------------------------------ */
/* UTF-8                                                                */
/* ------------------------------------------------------------------ */

typedef struct {
	const char *name;
	Bytes input;
	gboolean valid;
	gboolean ascii;
} Utf8Case;

static const Utf8Case utf8_cases[] = {
    {"ascii", B("hello\r\n"), TRUE, TRUE},
    {"nul", B("a\0b"), TRUE, TRUE},
    {"two-byte", B("caf\xc3\xa9"), TRUE, FALSE},
    {"three-byte", B("\xe2\x82\xac"), TRUE, FALSE},
    {"four-byte", B("\xf0\x9f\x98\x80"), TRUE, FALSE},
    {"max", B("\xf4\x8f\xbf\xbf"), TRUE, FALSE},
    {"latin1", B("caf\xe9"), FALSE, FALSE},
    {"overlong-c0", B("\xc0\x80"), FALSE, FALSE},
    {"overlong-e0", B("\xe0\x80\x80"), FALSE, FALSE},
    {"overlong-f0", B("\xf0\x80\x80\x80"), FALSE, FALSE},
    {"surrogate", B("\xed\xa0\x80"), FALSE, FALSE},
    {"beyond-max", B("\xf4\x90\x80\x80"), FALSE, FALSE},
    {"f5", B("\xf5\x80\x80\x80"), FALSE, FALSE},
    {"lone-continuation", B("\x80"), FALSE, FALSE},
    {"truncated", B("ab\xe2\x82"), FALSE, FALSE},
    {"interrupted",
     B("\xe2\x82"
       "a"),
     FALSE, FALSE},
};

static void
test_utf8_case(gconstpointer data)
{
	const Utf8Case *c = data;

	/* Whole, and cut at every position. */
	for (gsize cut = 0; cut <= c->input.len; cut++) {
		SmtpUtf8Check check;

		smtp_utf8_check_init(&check);
		smtp_utf8_check_feed(&check, (const guint8 *)c->input.data,
		                     cut);
		smtp_utf8_check_feed(&check,
		                     (const guint8 *)c->input.data + cut,
		                     c->input.len - cut);
		g_assert_cmpint(smtp_utf8_check_finish(&check), ==, c->valid);
		g_assert_cmpint(check.ascii_only, ==, c->ascii);
	}
}

/* ------------------------------------------------------------------ */
/* SmtpMessage                                                          */
/* ------------------------------------------------------------------ */

static gboolean
collect(const guint8 *data, gsize len, gpointer user_data, GError **error)
{
	GByteArray *all = user_data;

	(void)error;
	g_assert_cmpuint(len, <=, SMTP_MESSAGE_BLOCK);
	g_assert_cmpuint(len, >, 0);
	g_byte_array_append(all, data, len);
	return TRUE;
}

/* A temporary file holding @len bytes of @data; returns its fd. */
static int
temp_file(const void *data, gsize len)
{
	g_autoptr(GError) error = NULL;
	g_autofree char *path = NULL;
	int fd;

	fd = g_file_open_tmp("smtpclient-test-XXXXXX", &path, &error);
	g_assert_no_error(error);
	g_unlink(path);
	g_assert_cmpint(write(fd, data, len), ==, (gssize)len);
	return fd;
}

static void
test_message_segments(void)
{
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	g_autoptr(GByteArray) all = g_byte_array_new();
	g_autoptr(GBytes) bytes = g_bytes_new_static("one|", 4);
	g_autoptr(GError) error = NULL;
	int fd = temp_file("0123456789", 10);

	smtp_message_append_bytes(msg, bytes);
	g_assert_true(smtp_message_append_fd(msg, fd, 2, 3, &error));
	smtp_message_append_data(msg, "|", 1);
	g_assert_true(smtp_message_append_fd(msg, fd, 7, -1, &error));
	g_assert_no_error(error);

	/* The fd was dup()ed: closing ours changes nothing. */
	close(fd);
	g_assert_cmpuint(smtp_message_get_size(msg), ==, 4 + 3 + 1 + 3);

	/* Twice: pread() moves no offset, a message can be re-sent. */
	for (guint round = 0; round < 2; round++) {
		g_byte_array_set_size(all, 0);
		g_assert_true(
		    smtp_message_foreach_block(msg, collect, all, &error));
		g_assert_no_error(error);
		g_assert_cmpmem(all->data, all->len, "one|234|789", 11);
	}
}

static void
test_message_big_file(void)
{
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	g_autoptr(GByteArray) all = g_byte_array_new();
	g_autoptr(GError) error = NULL;
	gsize len = 3 * SMTP_MESSAGE_BLOCK + 17;
	g_autofree guint8 *data = g_malloc(len);
	int fd;

	for (gsize i = 0; i < len; i++)
		data[i] = (guint8)(i * 7);
	fd = temp_file(data, len);
	g_assert_true(smtp_message_append_fd(msg, fd, 0, -1, &error));
	close(fd);
	g_assert_true(smtp_message_foreach_block(msg, collect, all, &error));
	g_assert_cmpmem(all->data, all->len, data, len);
}

static void
test_message_file_shrank(void)
{
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	g_autoptr(GByteArray) all = g_byte_array_new();
	g_autoptr(GError) error = NULL;
	int fd = temp_file("0123456789", 10);

	g_assert_true(smtp_message_append_fd(msg, fd, 0, -1, &error));
	g_assert_cmpint(ftruncate(fd, 4), ==, 0);
	close(fd);
	g_assert_false(smtp_message_foreach_block(msg, collect, all, &error));
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_INPUT);
}

/* A file appended "to its end" that grew since: refused before the
 * first block (fstat), so nothing of it is handed on. */
static void
test_message_file_grew(void)
{
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	g_autoptr(GByteArray) all = g_byte_array_new();
	g_autoptr(GError) error = NULL;
	int fd = temp_file("0123456789", 10);

	g_assert_true(smtp_message_append_fd(msg, fd, 0, -1, &error));
	g_assert_cmpint(pwrite(fd, "ab", 2, 10), ==, 2);
	close(fd);
	g_assert_false(smtp_message_foreach_block(msg, collect, all, &error));
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_INPUT);
	g_assert_cmpstr(smtp_error_get_stage(error), ==, "message");
	g_assert_nonnull(strstr(error->message, "grew"));
	g_assert_cmpuint(all->len, ==, 0);
}

/* Grows while it is walked: the fstat() before was right, so every
 * block is handed on, but the walk must fail after the last one (one
 * octet read past the end), so that no end marker follows. */
static gboolean
grow_on_first(const guint8 *data, gsize len, gpointer user_data, GError **error)
{
	int *fd = user_data;

	(void)data;
	(void)len;
	(void)error;
	if (*fd >= 0) {
		g_assert_cmpint(pwrite(*fd, "zz", 2, 3 * SMTP_MESSAGE_BLOCK),
		                ==, 2);
		close(*fd);
		*fd = -1;
	}
	return TRUE;
}

static void
test_message_file_grew_during_walk(void)
{
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	g_autoptr(GError) error = NULL;
	gsize len = 3 * SMTP_MESSAGE_BLOCK;
	g_autofree guint8 *data = g_malloc0(len);
	int fd = temp_file(data, len);

	g_assert_true(smtp_message_append_fd(msg, fd, 0, -1, &error));
	g_assert_false(
	    smtp_message_foreach_block(msg, grow_on_first, &fd, &error));
	g_assert_cmpint(fd, ==, -1);
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_INPUT);
	g_assert_nonnull(strstr(error->message, "grew"));
}

/* A fixed range (@len given) may be followed by more of the file. */
static void
test_message_fixed_range_file_grew(void)
{
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	g_autoptr(GByteArray) all = g_byte_array_new();
	g_autoptr(GError) error = NULL;
	int fd = temp_file("0123456789", 10);

	g_assert_true(smtp_message_append_fd(msg, fd, 0, 10, &error));
	g_assert_cmpint(pwrite(fd, "ab", 2, 10), ==, 2);
	close(fd);
	g_assert_true(smtp_message_foreach_block(msg, collect, all, &error));
	g_assert_cmpmem(all->data, all->len, "0123456789", 10);
}

static void
test_message_bad_fd(void)
{
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	g_autoptr(GError) error = NULL;

	g_assert_false(smtp_message_append_fd(msg, -1, 0, -1, &error));
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_INPUT);
	g_assert_cmpstr(smtp_error_get_stage(error), ==, "input");
}

/* Read back everything in @fd from its start. */
static GByteArray *
read_back(int fd)
{
	GByteArray *all = g_byte_array_new();
	guint8 buf[4096];
	ssize_t n;
	off_t off = 0;

	while ((n = pread(fd, buf, sizeof(buf), off)) > 0) {
		g_byte_array_append(all, buf, n);
		off += n;
	}
	g_assert_cmpint(n, ==, 0);
	return all;
}

/* Raw means raw: lone LF, lone CR, a leading dot and NUL pass as they
 * are, from memory and from file ranges with an offset, and the fd's
 * own offset moves by what was written. */
static void
test_write_raw_segments(void)
{
	static const char text[] = "x\n.\r\nMAIL\r";
	static const char expected[] = "pre:x\n.\r\nMAIL\r3456\0.89"
	                               "x\n.\r\nMAIL\r3456\0.89";
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_TEXT);
	g_autoptr(GError) error = NULL;
	g_autoptr(GByteArray) all = NULL;
	g_autofree char *path = NULL;
	int src = temp_file("0123456789", 10);
	int out;

	smtp_message_append_data(msg, text, sizeof(text) - 1);
	g_assert_true(smtp_message_append_fd(msg, src, 3, 4, &error));
	smtp_message_append_data(msg, "\0.", 2);
	g_assert_true(smtp_message_append_fd(msg, src, 8, -1, &error));
	g_assert_no_error(error);
	close(src);

	out = g_file_open_tmp("test-raw-XXXXXX", &path, &error);
	g_assert_no_error(error);
	g_unlink(path);
	g_assert_cmpint(write(out, "pre:", 4), ==, 4);
	for (guint round = 0; round < 2; round++) {
		g_assert_true(smtp_message_write_raw(msg, out, &error));
		g_assert_no_error(error);
	}
	all = read_back(out);
	g_assert_cmpmem(all->data, all->len, expected, sizeof(expected) - 1);
	g_assert_cmpint(lseek(out, 0, SEEK_CUR), ==, sizeof(expected) - 1);
	close(out);
}

/* The sum is of exactly the octets written, memory and file segments
 * alike, larger than one block: the same digest as reading them back. */
static void
test_write_raw_sum(void)
{
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	g_autoptr(GChecksum) sum = g_checksum_new(G_CHECKSUM_SHA256);
	g_autoptr(GError) error = NULL;
	g_autoptr(GByteArray) all = NULL;
	g_autofree char *big = g_malloc(200000);
	g_autofree char *path = NULL;
	g_autofree char *want = NULL;
	int src, out;

	for (guint i = 0; i < 200000; i++)
		big[i] = (char)(i * 7 + i / 251);
	src = temp_file(big, 200000);
	smtp_message_append_data(msg, "head\r\n\0", 7);
	g_assert_true(smtp_message_append_fd(msg, src, 5, -1, &error));
	g_assert_no_error(error);
	smtp_message_append_data(msg, "tail", 4);
	close(src);

	out = g_file_open_tmp("test-raw-XXXXXX", &path, &error);
	g_assert_no_error(error);
	g_unlink(path);
	g_assert_true(smtp_message_write_raw_sum(msg, out, sum, &error));
	g_assert_no_error(error);
	all = read_back(out);
	close(out);
	g_assert_cmpuint(all->len, ==, 7 + 200000 - 5 + 4);
	want =
	    g_compute_checksum_for_data(G_CHECKSUM_SHA256, all->data, all->len);
	g_assert_cmpstr(g_checksum_get_string(sum), ==, want);
}

static void
test_write_raw_empty(void)
{
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	g_autoptr(GError) error = NULL;

	/* Nothing to write: not even a bad fd is touched. */
	g_assert_true(smtp_message_write_raw(msg, -1, &error));
	g_assert_no_error(error);
}

/* A full disk is SMTP_ERROR_IO with ENOSPC findable, and survives
 * g_error_copy() (the spool maps it to "disk full"). */
static void
test_write_raw_enospc(void)
{
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	g_autoptr(GError) error = NULL;
	g_autoptr(GError) copy = NULL;
	int fd = open("/dev/full", O_WRONLY | O_CLOEXEC);

	if (fd < 0) {
		g_test_skip("no /dev/full");
		return;
	}
	smtp_message_append_data(msg, "hello\r\n", 7);
	g_assert_false(smtp_message_write_raw(msg, fd, &error));
	close(fd);
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_IO);
	g_assert_cmpint(smtp_error_get_errno(error), ==, ENOSPC);
	g_assert_cmpstr(smtp_error_get_stage(error), ==, "write");
	g_assert_nonnull(strstr(error->message, g_strerror(ENOSPC)));
	g_assert_true(smtp_error_is_temporary(error));
	copy = g_error_copy(error);
	g_assert_cmpint(smtp_error_get_errno(copy), ==, ENOSPC);
}

static void
test_write_raw_bad_fd(void)
{
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	g_autoptr(GError) error = NULL;

	smtp_message_append_data(msg, "x", 1);
	g_assert_false(smtp_message_write_raw(msg, -1, &error));
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_IO);
	g_assert_cmpint(smtp_error_get_errno(error), ==, EBADF);
}

/* A file segment that shrank after it was appended is INPUT, not IO:
 * the message is at fault, not the disk written to. */
static void
test_write_raw_shrank(void)
{
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	g_autoptr(GError) error = NULL;
	g_autofree char *path = NULL;
	int src = temp_file("0123456789", 10);
	int out;

	g_assert_true(smtp_message_append_fd(msg, src, 0, -1, &error));
	g_assert_cmpint(ftruncate(src, 4), ==, 0);
	close(src);
	out = g_file_open_tmp("test-raw-XXXXXX", &path, &error);
	g_assert_no_error(error);
	g_unlink(path);
	g_assert_false(smtp_message_write_raw(msg, out, &error));
	close(out);
	g_assert_error(error, SMTP_ERROR, SMTP_ERROR_INPUT);
	g_assert_cmpint(smtp_error_get_errno(error), ==, 0);
	g_assert_nonnull(strstr(error->message, "changed"));
}

/* Short writes and EINTR: a slow reader on a pipe while a timer
 * interrupts write() (no SA_RESTART) again and again. */
static volatile sig_atomic_t alarms;

static void
on_alarm(int sig)
{
	(void)sig;
	alarms++;
}

static gpointer
slow_reader(gpointer data)
{
	int fd = GPOINTER_TO_INT(data);
	GByteArray *all = g_byte_array_new();
	guint8 buf[3000];
	ssize_t n;

	while ((n = read(fd, buf, sizeof(buf))) != 0) {
		if (n < 0 && errno == EINTR)
			continue;
		g_assert_cmpint(n, >, 0);
		g_byte_array_append(all, buf, n);
		g_usleep(50);
	}
	return all;
}

static void
test_write_raw_interrupted(void)
{
	g_autoptr(SmtpMessage) msg = smtp_message_new(SMTP_MESSAGE_BYTES);
	g_autoptr(GError) error = NULL;
	g_autoptr(GByteArray) got = NULL;
	gsize len = 2 * SMTP_MESSAGE_BLOCK + 12345;
	g_autofree guint8 *data = g_malloc(len);
	struct sigaction sa = {.sa_handler = on_alarm}, old;
	struct itimerval tv = {{0, 200}, {0, 200}}, off = {{0, 0}, {0, 0}};
	GThread *reader;
	int p[2], src;

	for (gsize i = 0; i < len; i++)
		data[i] = (guint8)(i * 13 + (i >> 8));
	src = temp_file(data, len / 2);
	g_assert_true(smtp_message_append_fd(msg, src, 0, -1, &error));
	close(src);
	smtp_message_append_data(msg, data + len / 2, len - len / 2);

	g_assert_cmpint(pipe(p), ==, 0);
	reader = g_thread_new("reader", slow_reader, GINT_TO_POINTER(p[0]));
	sigemptyset(&sa.sa_mask);
	g_assert_cmpint(sigaction(SIGALRM, &sa, &old), ==, 0);
	setitimer(ITIMER_REAL, &tv, NULL);
	g_assert_true(smtp_message_write_raw(msg, p[1], &error));
	setitimer(ITIMER_REAL, &off, NULL);
	sigaction(SIGALRM, &old, NULL);
	g_assert_no_error(error);
	close(p[1]);
	got = g_thread_join(reader);
	close(p[0]);
	g_assert_cmpmem(got->data, got->len, data, len);
	g_assert_cmpint(alarms, >, 0);
}

typedef struct {
	const char *name;
	SmtpMessageKind kind;
	Bytes input;
	gboolean utf8_ok;
	gboolean accepted;
} TextCase;

static const TextCase text_cases[] = {
    {"ascii", SMTP_MESSAGE_TEXT, B("Subject: x\r\n\r\nhi\n"), FALSE, TRUE},
    {"utf8-not-allowed", SMTP_MESSAGE_TEXT, B("caf\xc3\xa9"), FALSE, FALSE},
    {"utf8-allowed", SMTP_MESSAGE_TEXT, B("caf\xc3\xa9"), TRUE, TRUE},
    {"latin1-text", SMTP_MESSAGE_TEXT, B("caf\xe9"), TRUE, FALSE},
    {"latin1-bytes", SMTP_MESSAGE_BYTES, B("caf\xe9"), FALSE, TRUE},
    {"nul-text", SMTP_MESSAGE_TEXT, B("a\0b"), FALSE, TRUE},
};

static void
test_text_case(gconstpointer data)
{
	const TextCase *c = data;
	g_autoptr(SmtpMessage) msg = smtp_message_new(c->kind);
	g_autoptr(GError) error = NULL;
	gboolean ok;

	smtp_message_append_data(msg, c->input.data, c->input.len);
	ok = smtp_message_check_text(msg, c->utf8_ok, &error);
	g_assert_cmpint(ok, ==, c->accepted);
	if (!ok) {
		g_assert_error(error, SMTP_ERROR, SMTP_ERROR_INPUT);
		g_assert_cmpstr(smtp_error_get_stage(error), ==, "input");
	}
}

int
main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);

	for (guint i = 0; i < G_N_ELEMENTS(encode_cases); i++) {
		g_autofree char *path = g_strdup_printf("/smtpclient/encode/%s",
		                                        encode_cases[i].name);

		g_test_add_data_func(path, &encode_cases[i], test_encode_case);
	}
	g_test_add_func("/smtpclient/encode/random", test_encode_random);
	for (guint i = 0; i < G_N_ELEMENTS(utf8_cases); i++) {
		g_autofree char *path =
		    g_strdup_printf("/smtpclient/utf8/%s", utf8_cases[i].name);

		g_test_add_data_func(path, &utf8_cases[i], test_utf8_case);
	}
	for (guint i = 0; i < G_N_ELEMENTS(text_cases); i++) {
		g_autofree char *path = g_strdup_printf(
		    "/smtpclient/message/text/%s", text_cases[i].name);

		g_test_add_data_func(path, &text_cases[i], test_text_case);
	}
	g_test_add_func("/smtpclient/message/segments", test_message_segments);
	g_test_add_func("/smtpclient/message/big-file", test_message_big_file);
	g_test_add_func("/smtpclient/message/file-shrank",
	                test_message_file_shrank);
	g_test_add_func("/message/file-grew", test_message_file_grew);
	g_test_add_func("/message/file-grew-during-walk",
	                test_message_file_grew_during_walk);
	g_test_add_func("/message/fixed-range-file-grew",
	                test_message_fixed_range_file_grew);
	g_test_add_func("/smtpclient/message/bad-fd", test_message_bad_fd);
	g_test_add_func("/smtpclient/write-raw/segments",
	                test_write_raw_segments);
	g_test_add_func("/smtpclient/write-raw/empty", test_write_raw_empty);
	g_test_add_func("/smtpclient/write-raw/sum", test_write_raw_sum);
	g_test_add_func("/smtpclient/write-raw/enospc", test_write_raw_enospc);
	g_test_add_func("/smtpclient/write-raw/bad-fd", test_write_raw_bad_fd);
	g_test_add_func("/smtpclient/write-raw/shrank", test_write_raw_shrank);
	g_test_add_func("/smtpclient/write-raw/interrupted",
	                test_write_raw_interrupted);
	return g_test_run();
}
