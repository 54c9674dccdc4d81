/*
 * test-log.c - the delivery and decision lines, as a table
 */
#include "log.h"

typedef struct {
	const char *name;
	AmLogDelivery in;
	const char *expect;
} LogCase;

static const LogCase cases[] = {
    {"sent",
     {"3F2A81C0DE", "journal@archive.example", "archive.example[192.0.2.7]:25",
      0.1234, "2.0.0", AM_STATUS_SENT, "250 2.0.0 queued as 12AB"},
     "3F2A81C0DE: archive=<journal@archive.example>, "
     "relay=archive.example[192.0.2.7]:25, delay=0.12, dsn=2.0.0, "
     "status=sent (250 2.0.0 queued as 12AB)"},
    {"deferred, no connection",
     {"3F2A81C0DE", "journal@archive.example", NULL, 1.5, "4.4.1",
      AM_STATUS_DEFERRED,
      "cannot connect to 127.0.0.1[127.0.0.1]:2527: Connection refused"},
     "3F2A81C0DE: archive=<journal@archive.example>, relay=none, "
     "delay=1.50, dsn=4.4.1, status=deferred (cannot connect to "
     "127.0.0.1[127.0.0.1]:2527: Connection refused)"},
    {"bounced",
     {"ABC", "j@a.example", "a.example[192.0.2.7]:25", 0, "5.7.1",
      AM_STATUS_BOUNCED, "554 5.7.1 no (in reply to end-of-data)"},
     "ABC: archive=<j@a.example>, relay=a.example[192.0.2.7]:25, "
     "delay=0.00, dsn=5.7.1, status=bounced (554 5.7.1 no (in reply to "
     "end-of-data))"},
    {"refused recipient",
     {"ABC", "gone@a.example", "a.example[192.0.2.7]:25", 0.02, "5.1.1",
      AM_STATUS_BOUNCED, "550 5.1.1 unknown (in reply to rcpt)"},
     "ABC: archive=<gone@a.example>, relay=a.example[192.0.2.7]:25, "
     "delay=0.02, dsn=5.1.1, status=bounced (550 5.1.1 unknown (in "
     "reply to rcpt))"},
    {"no queue id, null address, hostile text",
     {NULL, "", "r[1.2.3.4]:25", 0, "4.0.0", AM_STATUS_DEFERRED,
      "451 try\r\nQUEUE: status=sent"},
     "NOQUEUE: archive=<>, relay=r[1.2.3.4]:25, delay=0.00, dsn=4.0.0, "
     "status=deferred (451 try??QUEUE: status=sent)"},
};

static void
test_delivery_table(void)
{
	gsize i;

	for (i = 0; i < G_N_ELEMENTS(cases); i++) {
		g_autofree char *line = am_log_format_delivery(&cases[i].in);

		g_test_message("case: %s", cases[i].name);
		g_assert_cmpstr(line, ==, cases[i].expect);
	}
}

static void
test_decision(void)
{
	g_autofree char *line = am_log_format_decision(
	    "ABC", "tempfail", 1, 1, "archive copy failed: 451 x");

	g_assert_cmpstr(line, ==,
	                "ABC: action=tempfail, copies=1, "
	                "failed=1 (archive copy failed: 451 x)");
}

static void
test_sanitize_utf8_cut(void)
{
	/* "é" is two octets; a cut between them drops the half. */
	g_autofree char *a = am_log_sanitize("ab\xc3\xa9", 3);
	g_autofree char *b = am_log_sanitize("ab\xc3\xa9", 4);

	g_assert_cmpstr(a, ==, "ab");
	g_assert_cmpstr(b, ==, "ab\xc3\xa9");
}

int
main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);
	g_test_add_func("/plugin/log/delivery", test_delivery_table);
	g_test_add_func("/plugin/log/decision", test_decision);
	g_test_add_func("/plugin/log/sanitize-utf8", test_sanitize_utf8_cut);
	return g_test_run();
}
