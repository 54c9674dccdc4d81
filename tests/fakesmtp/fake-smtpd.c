/*
 * fake-smtpd.c - the scripted fake SMTP server as a program
 *
 * For end-to-end tests and the shell: serves the script of fakesmtp.h
 * on loopback until SIGTERM or SIGINT, then stops and exits 0.  Once it
 * listens, it writes --pid-file, then --port-file, then prints the port
 * on stdout (one line): whoever sees the port, either way, finds the
 * files complete.
 *
 * Exit status: 0 after a signal, 1 when it cannot start, 2 on bad usage.
 *
 * Known limits: the port and pid files are left in place on exit; the
 * caller owns their directory.
 */
#include "fakesmtp.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static char *opt_listen = NULL;
static char *opt_script = NULL;
static char *opt_store = NULL;
static char *opt_port_file = NULL;
static char *opt_pid_file = NULL;
static int opt_port = 0;

static const GOptionEntry entries[] = {
    {"listen", 'l', 0, G_OPTION_ARG_STRING, &opt_listen,
     "Address to listen on (default 127.0.0.1)", "127.0.0.1|::1"},
    {"port", 'p', 0, G_OPTION_ARG_INT, &opt_port,
     "Port to listen on (default 0: chosen by the kernel)", "N"},
    {"script", 's', 0, G_OPTION_ARG_FILENAME, &opt_script,
     "Script of replies (see fakesmtp.h)", "FILE"},
    {"store", 'd', 0, G_OPTION_ARG_FILENAME, &opt_store,
     "Write each message as N.eml and N.env in DIR", "DIR"},
    {"port-file", 0, 0, G_OPTION_ARG_FILENAME, &opt_port_file,
     "Write the port to FILE once listening", "FILE"},
    {"pid-file", 0, 0, G_OPTION_ARG_FILENAME, &opt_pid_file,
     "Write the process id to FILE", "FILE"},
    G_OPTION_ENTRY_NULL,
};

static gboolean
parse_args(int *argc, char ***argv, GError **error)
{
	g_autoptr(GOptionContext) ctx = g_option_context_new(NULL);

	g_option_context_set_summary(ctx, "A scripted fake SMTP server for "
	                                  "tests.");
	g_option_context_add_main_entries(ctx, entries, NULL);
	if (!g_option_context_parse(ctx, argc, argv, error))
		return FALSE;
	if (*argc > 1) {
		g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_FAILED,
		            "unexpected argument \"%s\"", (*argv)[1]);
		return FALSE;
	}
	if (opt_port < 0 || opt_port > 65535) {
		g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
		            "--port %d is not a port", opt_port);
		return FALSE;
	}
	return TRUE;
}

/* Port and pid files are written whole, under a temporary name first,
 * so a script polling for them never reads a half line. */
static gboolean
write_number_file(const char *path, long n, GError **error)
{
	g_autofree char *text = g_strdup_printf("%ld\n", n);

	return g_file_set_contents_full(
	    path, text, -1, G_FILE_SET_CONTENTS_CONSISTENT, 0644, error);
}

static FakeSmtp *
start(sigset_t *signals, guint16 *port, GError **error)
{
	g_autofree char *script = NULL;
	g_autoptr(FakeSmtp) fake = NULL;

	if (opt_script != NULL &&
	    !g_file_get_contents(opt_script, &script, NULL, error))
		return NULL;
	fake = fake_smtp_new(script, error);
	if (fake == NULL)
		return NULL;

	/* Block the stop signals before any thread exists, so every
	 * thread inherits the mask and only sigwait() sees them. */
	sigemptyset(signals);
	sigaddset(signals, SIGTERM);
	sigaddset(signals, SIGINT);
	pthread_sigmask(SIG_BLOCK, signals, NULL);

	*port = fake_smtp_start_port(
	    fake, opt_listen != NULL ? opt_listen : "127.0.0.1",
	    (guint16)opt_port, opt_store, error);
	if (*port == 0)
		return NULL;
	return g_steal_pointer(&fake);
}

int
main(int argc, char **argv)
{
	g_autoptr(GError) error = NULL;
	g_autoptr(FakeSmtp) fake = NULL;
	sigset_t signals;
	guint16 port = 0;
	int sig = 0;

	if (!parse_args(&argc, &argv, &error)) {
		g_printerr("fake-smtpd: %s\n", error->message);
		return 2;
	}
	fake = start(&signals, &port, &error);
	if (fake == NULL) {
		g_printerr("fake-smtpd: %s\n", error->message);
		return 1;
	}

	/* Files first: whoever read the port on stdout finds them. */
	if (opt_pid_file != NULL &&
	    !write_number_file(opt_pid_file, (long)getpid(), &error))
		goto fail;
	if (opt_port_file != NULL &&
	    !write_number_file(opt_port_file, port, &error))
		goto fail;
	printf("%u\n", port);
	fflush(stdout);

	while (sigwait(&signals, &sig) != 0)
		;
	fake_smtp_stop(fake);
	return 0;

fail:
	g_printerr("fake-smtpd: %s\n", error->message);
	return 1;
}
