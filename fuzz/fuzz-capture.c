/*
 * fuzz-capture.c - libFuzzer target for header capture (capture.c)
 *
 * A header value is the one place where the sender's bytes could end
 * a line of the copy, so the rebuilt bytes are checked, not only
 * survived.  The first input byte chooses SMFIP_HDR_LEADSPC (bit 0);
 * the rest is NAME NUL VALUE (no NUL: all of it is the value of
 * "Subject").  When am_capture_add_header() takes the header, the
 * capture must satisfy, or abort():
 *
 * 1. it is NAME ":" then the value, ending in CRLF CRLF (the header and
 *    the end of headers);
 * 2. no lone CR and no lone LF anywhere;
 * 3. every CRLF but the last two is followed by SP or HT, so the header
 *    is one header and the headers end where they should;
 * 4. with each CRLF written back as LF and the CRLF of the value's own
 *    folds as LF too, the value comes back (with the one space put back
 *    without LEADSPC);
 * 5. am_header_unfold() gives one line: no CR or LF.
 * When it refuses the header, the error is INPUT and nothing was
 * captured.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "capture.h"

#define CHECK(cond)                                                            \
	do {                                                                   \
		if (!(cond))                                                   \
			abort();                                               \
	} while (0)

/* The value as the capture should hold it: every fold's break as LF. */
static GString *
expected_value(const char *value, gboolean leading_space)
{
	GString *out = g_string_new(NULL);
	const char *v;

	if (!leading_space && *value != '\0')
		g_string_append_c(out, ' ');
	for (v = value; *v != '\0'; v++) {
		if (v[0] == '\r' && v[1] == '\n')
			continue; /* the LF that follows stands for both */
		g_string_append_c(out, *v);
	}
	return out;
}

static void
check_taken(AmCapture *cap, const char *name, const char *value,
            gboolean leading_space)
{
	g_autoptr(GError) error = NULL;
	g_autoptr(GBytes) all = am_capture_read_all(cap, &error);
	g_autoptr(GString) back = g_string_new(NULL);
	g_autoptr(GString) want = expected_value(value, leading_space);
	g_autofree char *line = NULL;
	gsize len, i, name_len = strlen(name);
	const char *data;

	CHECK(all != NULL);
	data = g_bytes_get_data(all, &len);

	/* 1: NAME ":" ... CRLF CRLF */
	CHECK(len >= name_len + 5);
	CHECK(memcmp(data, name, name_len) == 0 && data[name_len] == ':');
	CHECK(memcmp(data + len - 4, "\r\n\r\n", 4) == 0);

	/* 2, 3: line ends are CRLF; inside the header, each folds */
	for (i = 0; i < len; i++) {
		if (data[i] == '\r')
			CHECK(i + 1 < len && data[i + 1] == '\n');
		if (data[i] == '\n')
			CHECK(i > 0 && data[i - 1] == '\r');
		if (data[i] == '\n' && i + 1 < len - 2)
			CHECK(data[i + 1] == ' ' || data[i + 1] == '\t');
	}

	/* 4: the value comes back */
	for (i = name_len + 1; i < len - 4; i++)
		if (data[i] != '\r')
			g_string_append_c(back, data[i]);
	CHECK(g_string_equal(back, want));

	/* 5: unfolded, one line */
	line = am_header_unfold(am_capture_get_headers(cap)->pdata[0]);
	CHECK(strpbrk(line, "\r\n") == NULL);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	g_autoptr(AmCapture) cap = NULL;
	g_autoptr(GError) error = NULL;
	g_autofree char *text = NULL;
	const char *name, *value, *nul;
	gboolean leading_space;

	if (size < 1)
		return 0;
	leading_space = data[0] & 1;
	/* Not g_strndup(): it stops at the first NUL. */
	text = g_malloc(size);
	memcpy(text, data + 1, size - 1);
	text[size - 1] = '\0';
	nul = memchr(data + 1, '\0', size - 1);
	if (nul != NULL) {
		name = text;
		value = text + (nul - (const char *)(data + 1)) + 1;
	} else {
		name = "Subject";
		value = text;
	}

	cap = am_capture_new(1 << 20, NULL, leading_space);
	if (!am_capture_add_header(cap, name, value, &error)) {
		CHECK(g_error_matches(error, AM_CAPTURE_ERROR,
		                      AM_CAPTURE_ERROR_INPUT));
		CHECK(am_capture_get_size(cap) == 0);
		return 0;
	}
	CHECK(am_capture_end_headers(cap, &error));
	check_taken(cap, name, value, leading_space);
	return 0;
}
