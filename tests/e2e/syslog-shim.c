/*
 * syslog-shim.c - catch a test MTA's syslog() calls in a file
 *
 * The machines the tests run on have no syslog daemon, so what a private
 * Sendmail logs would be lost, and its log is what tells its queue ids
 * and its view of each milter reply.  This module, loaded with
 * LD_PRELOAD, replaces openlog(), syslog(), vsyslog(), their _FORTIFY_
 * SOURCE variants and closelog() with functions that append one line
 * per message ("TAG[PID]: TEXT") to the file named by
 * $SYSLOG_SHIM_FILE.
 *
 * Sendmail empties its environment early in main(), so the file name is
 * read in a constructor, before main() runs, and kept; every process
 * forked later (one per SMTP session, one per delivery) inherits it.
 * Each line is one write() to a file opened with O_APPEND, so lines of
 * concurrent processes do not interleave.
 *
 * Known limits: a line longer than LINE_MAX bytes is cut; %m is expanded
 * by vsnprintf (glibc does that), not by us.  Test use only: it is never
 * installed.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>

#define SHIM_LINE_MAX 4096

static char shim_path[1024];    /* where the lines go; "" before setup */
static char shim_tag[64] = "-"; /* openlog()'s ident */

__attribute__((constructor)) static void
shim_setup(void)
{
	const char *p = getenv("SYSLOG_SHIM_FILE");

	if (p != NULL && strlen(p) < sizeof(shim_path))
		strcpy(shim_path, p);
}

void
openlog(const char *ident, int option, int facility)
{
	(void)option;
	(void)facility;
	if (ident != NULL)
		snprintf(shim_tag, sizeof(shim_tag), "%s", ident);
}

void
closelog(void)
{
}

void
vsyslog(int priority, const char *format, va_list ap)
{
	char line[SHIM_LINE_MAX];
	int saved = errno;
	int n, fd;

	(void)priority;
	if (shim_path[0] == '\0')
		return;

	/* Step 1: one line, cut to fit, always ending in a newline. */
	n = snprintf(line, sizeof(line), "%s[%ld]: ", shim_tag, (long)getpid());
	if (n < 0 || (size_t)n >= sizeof(line))
		return;
	errno = saved; /* for %m */
	vsnprintf(line + n, sizeof(line) - (size_t)n - 1, format, ap);
	n = (int)strlen(line);
	line[n++] = '\n';

	/* Step 2: one write, so that processes do not interleave. */
	fd = open(shim_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
	if (fd >= 0) {
		if (write(fd, line, (size_t)n) < 0) {
			/* nowhere left to say so */
		}
		close(fd);
	}
	errno = saved;
}

void
syslog(int priority, const char *format, ...)
{
	va_list ap;

	va_start(ap, format);
	vsyslog(priority, format, ap);
	va_end(ap);
}

void
__syslog_chk(int priority, int flag, const char *format, ...)
{
	va_list ap;

	(void)flag;
	va_start(ap, format);
	vsyslog(priority, format, ap);
	va_end(ap);
}

void
__vsyslog_chk(int priority, int flag, const char *format, va_list ap)
{
	(void)flag;
	vsyslog(priority, format, ap);
}
