/*
 * test-common.h - the fixture the sendmail and pipelining tests share:
 * a fresh fake SMTP server per test (its script is the test's data)
 * and a client on 127.0.0.1 with short time limits
 *
 * Every helper asserts: a fake server that does not start is a broken
 * test, not an outcome under test.
 */
#ifndef TEST_COMMON_H
#define TEST_COMMON_H

#include "fakesmtp.h"
#include "smtp-private.h"

typedef struct {
	FakeSmtp *fake;
	guint16 port;
	SmtpClient *client;
} Fixture;

/* Every test's data starts like this: the fixture reads the script. */
typedef struct {
	const char *name;
	const char *script; /* for the fake server; NULL: plain */
} CaseHead;

/* The test's set-up and body, as g_test_add() takes them. */
typedef void (*FixtureFunc)(Fixture *f, gconstpointer data);

/*
 * fixture_start: start a fake server running @script (NULL: plain) on
 * 127.0.0.1 and make f->client for it, with the HELO name
 * "client.example" and the limits @t.  Fails the test if the server
 * does not start.  Undo with fixture_tear_down().
 */
void fixture_start(Fixture *f, const char *script, const SmtpTimeouts *t);

/* fixture_tear_down: free the client and stop the fake server. */
void fixture_tear_down(Fixture *f, gconstpointer data);

/* count_commands: how many commands the server got that start with
 * @prefix. */
guint count_commands(Fixture *f, const char *prefix);

/*
 * add_plain_case: add the test @prefix@path (@prefix ends in "/") with
 * a CaseHead for @script as its data.  The CaseHead is added to @cases,
 * which frees it with g_free() and must outlive g_test_run(); @path and
 * @script are not copied.
 */
void add_plain_case(GPtrArray *cases, const char *prefix, const char *path,
                    const char *script, FixtureFunc set_up, FixtureFunc func);

#endif /* TEST_COMMON_H */
