/*
 * null-milter.c - a milter that asks for every event and changes nothing
 *
 *   null-milter SOCKET
 *
 * The benchmark's baseline (bench/milter/run.py, issue 4): what a milter
 * costs Postfix before it does any work of its own.  It asks for every
 * event a milter can see (connect, HELO, MAIL, each RCPT, each header,
 * end of headers, each body chunk, end of message, abort, close), never
 * asks the MTA to skip one or to send it without waiting for a reply,
 * and answers CONTINUE to each.  It negotiates what archive-milter
 * negotiates that changes the traffic (SMFIP_HDR_LEADSPC and the same
 * macro lists), so that the difference between the two is archive-
 * milter's own work, not a different conversation.
 *
 * SOCKET is in libmilter's notation (inet:PORT@127.0.0.1, unix:/PATH).
 * "null-milter: ready" goes to standard output once the socket listens.
 * On SIGTERM, SIGINT or SIGHUP libmilter's signal thread ends
 * smfi_main(); the count of each event is then printed as one line of
 * "name=N" pairs, so that the benchmark can check that every message
 * was seen, event by event.
 *
 * Known limits: none that matter for a baseline; it keeps no state per
 * connection, as a milter with nothing to do needs none.
 */
#include <libmilter/mfapi.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>

/* One counter per event, updated from every connection's thread. */
enum {
	EV_CONNECT,
	EV_HELO,
	EV_ENVFROM,
	EV_ENVRCPT,
	EV_HEADER,
	EV_EOH,
	EV_BODY,
	EV_EOM,
	EV_ABORT,
	EV_CLOSE,
	EV_COUNT
};

static const char *const event_names[EV_COUNT] = {
    "connect", "helo", "envfrom", "envrcpt", "header",
    "eoh",     "body", "eom",     "abort",   "close",
};

static unsigned long events[EV_COUNT];

static sfsistat
seen(int event)
{
	__atomic_add_fetch(&events[event], 1, __ATOMIC_RELAXED);
	return SMFIS_CONTINUE;
}

static sfsistat
cb_negotiate(SMFICTX *mctx, unsigned long f0, unsigned long f1,
             unsigned long f2, unsigned long f3, unsigned long *pf0,
             unsigned long *pf1, unsigned long *pf2, unsigned long *pf3)
{
	(void)f2;
	(void)f3;

	/* No SMFIP_NO* and no SMFIP_NR_* bits: every event, every reply
	 * awaited.  Leading spaces as archive-milter asks for them. */
	*pf0 = 0;
	*pf1 = f1 & SMFIP_HDR_LEADSPC;
	*pf2 = 0;
	*pf3 = 0;

	/* The macros archive-milter asks for, so both get the same bytes. */
	if (f0 & SMFIF_SETSYMLIST) {
		smfi_setsymlist(mctx, SMFIM_CONNECT,
		                (char *)"{client_addr} {client_name} j _");
		smfi_setsymlist(mctx, SMFIM_ENVFROM,
		                (char *)"i {auth_authen} {auth_type} "
		                        "{mail_addr}");
		smfi_setsymlist(mctx, SMFIM_ENVRCPT, (char *)"i {rcpt_addr}");
		smfi_setsymlist(mctx, SMFIM_EOH, (char *)"i");
		smfi_setsymlist(mctx, SMFIM_EOM, (char *)"i {msg_id}");
	}
	return SMFIS_CONTINUE;
}

static sfsistat
cb_connect(SMFICTX *mctx, char *host, _SOCK_ADDR *addr)
{
	(void)mctx;
	(void)host;
	(void)addr;
	return seen(EV_CONNECT);
}

static sfsistat
cb_helo(SMFICTX *mctx, char *name)
{
	(void)mctx;
	(void)name;
	return seen(EV_HELO);
}

static sfsistat
cb_envfrom(SMFICTX *mctx, char **argv)
{
	(void)mctx;
	(void)argv;
	return seen(EV_ENVFROM);
}

static sfsistat
cb_envrcpt(SMFICTX *mctx, char **argv)
{
	(void)mctx;
	(void)argv;
	return seen(EV_ENVRCPT);
}

static sfsistat
cb_header(SMFICTX *mctx, char *name, char *value)
{
	(void)mctx;
	(void)name;
	(void)value;
	return seen(EV_HEADER);
}

static sfsistat
cb_eoh(SMFICTX *mctx)
{
	(void)mctx;
	return seen(EV_EOH);
}

static sfsistat
cb_body(SMFICTX *mctx, unsigned char *chunk, size_t len)
{
	(void)mctx;
	(void)chunk;
	(void)len;
	return seen(EV_BODY);
}

static sfsistat
cb_eom(SMFICTX *mctx)
{
	(void)mctx;
	return seen(EV_EOM);
}

static sfsistat
cb_abort(SMFICTX *mctx)
{
	(void)mctx;
	return seen(EV_ABORT);
}

static sfsistat
cb_close(SMFICTX *mctx)
{
	(void)mctx;
	return seen(EV_CLOSE);
}

static void
print_counts(void)
{
	int i;

	for (i = 0; i < EV_COUNT; i++)
		printf("%s%s=%lu", i ? " " : "null-milter: events ",
		       event_names[i],
		       __atomic_load_n(&events[i], __ATOMIC_RELAXED));
	printf("\n");
	fflush(stdout);
}

int
main(int argc, char **argv)
{
	struct smfiDesc desc = {
	    .xxfi_name = (char *)"null-milter",
	    .xxfi_version = SMFI_VERSION,
	    .xxfi_flags = 0,
	    .xxfi_connect = cb_connect,
	    .xxfi_helo = cb_helo,
	    .xxfi_envfrom = cb_envfrom,
	    .xxfi_envrcpt = cb_envrcpt,
	    .xxfi_header = cb_header,
	    .xxfi_eoh = cb_eoh,
	    .xxfi_body = cb_body,
	    .xxfi_eom = cb_eom,
	    .xxfi_abort = cb_abort,
	    .xxfi_close = cb_close,
	    .xxfi_negotiate = cb_negotiate,
	};
	int rc;

	if (argc != 2 || argv[1][0] == '-') {
		fprintf(stderr, "usage: null-milter SOCKET\n"
		                "  SOCKET: inet:PORT@127.0.0.1 or "
		                "unix:/PATH\n");
		return EX_USAGE;
	}

	/* The MTA closing a connection mid-reply must not end us. */
	signal(SIGPIPE, SIG_IGN);

	/* Listen now, so that a bad socket ends the run before "ready". */
	if (smfi_register(desc) != MI_SUCCESS) {
		fprintf(stderr, "null-milter: smfi_register failed\n");
		return EX_SOFTWARE;
	}
	if (smfi_setconn(argv[1]) != MI_SUCCESS ||
	    smfi_opensocket(1) != MI_SUCCESS) {
		fprintf(stderr, "null-milter: cannot listen on %s\n", argv[1]);
		return EX_UNAVAILABLE;
	}
	printf("null-milter: ready: listening on %s\n", argv[1]);
	fflush(stdout);

	rc = smfi_main() == MI_SUCCESS ? EX_OK : EX_SOFTWARE;
	print_counts();
	return rc;
}
