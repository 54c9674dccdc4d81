/*
 * io.c - one connection: connect, buffered reply reading, writing, all
 * with poll() deadlines
 *
 * Every wait goes through wait_fd() with an absolute deadline, so a
 * server that dribbles one byte at a time cannot stretch a reply past
 * its limit.  That deadline is the stage's limit or the connection's
 * hard deadline (smtp_client_set_deadline), whichever comes first: a
 * server that answers each command just inside the stage limit cannot
 * stretch a whole transaction past the caller's overall limit either.
 * Bytes move through an SmtpTransport: plain recv()/send() here; after
 * STARTTLS, tls.c swaps in an OpenSSL one through
 * smtp_conn_set_transport() without the callers changing.  send() uses
 * MSG_NOSIGNAL, so a peer that closes never raises SIGPIPE in the host
 * process.
 *
 * Known limits:
 * XXX: getaddrinfo() has no time limit of its own, and the hard
 * deadline of smtp_client_set_deadline() cannot cut it short either; a
 * stalled resolver holds the caller for the resolver's own timeouts
 * (resolv.conf).  A limit would need a resolver thread or c-ares.
 * Numeric addresses and names in /etc/hosts do not touch DNS.
 */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "smtp-private.h"

#define READ_BUF 8192

struct SmtpConn {
	int fd;
	const SmtpTransport *transport;
	gpointer transport_data; /* the TLS layer's state, or NULL */
	SmtpReplyParser *parser;
	gint64 hard_deadline; /* monotonic us; 0: none */
	gboolean drained;     /* the last read emptied the socket (or
	                       * none yet): see fill() */
	char buf[READ_BUF];   /* bytes received, not yet parsed */
	gsize start, end;     /* unparsed bytes are buf[start..end) */
};

/* ------------------------------------------------------------------ */
/* The plain transport                                                  */
/* ------------------------------------------------------------------ */

static ssize_t
plain_recv(SmtpConn *conn, void *buf, gsize len, short *want)
{
	*want = POLLIN;
	return recv(conn->fd, buf, len, 0);
}

static ssize_t
plain_send(SmtpConn *conn, const void *buf, gsize len, short *want)
{
	*want = POLLOUT;
	return send(conn->fd, buf, len, MSG_NOSIGNAL);
}

/* A non-blocking peek: poll() could say the same, but a peek also
 * tells a closed socket (quiet: the next read finds the close) from
 * one with data. */
static gboolean
plain_pending(SmtpConn *conn)
{
	char c;
	ssize_t n;

	do {
		n = recv(conn->fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
	} while (n < 0 && errno == EINTR);
	return n > 0;
}

static void
plain_close(SmtpConn *conn)
{
	(void)conn;
}

static const SmtpTransport plain_transport = {
    plain_recv,
    plain_send,
    plain_pending,
    plain_close,
};

/* ------------------------------------------------------------------ */
/* Waiting                                                              */
/* ------------------------------------------------------------------ */

/* The end of a wait: @timeout_ms from now, or @hard when that comes
 * first (*@is_hard then says so, for the error message). */
static gint64
deadline_after(guint timeout_ms, gint64 hard, gboolean *is_hard)
{
	gint64 soft = g_get_monotonic_time() + (gint64)timeout_ms * 1000;

	*is_hard = hard > 0 && hard <= soft;
	return *is_hard ? hard : soft;
}

gint64
smtp_conn_deadline(const SmtpConn *conn, guint timeout_ms, gboolean *is_hard)
{
	return deadline_after(timeout_ms, conn->hard_deadline, is_hard);
}

void
smtp_conn_set_deadline(SmtpConn *conn, gint64 deadline)
{
	conn->hard_deadline = deadline;
}

/* Whether @hard (0: none) has passed.  Checked before a stage's first
 * byte goes out: a write that needs no wait would otherwise start a
 * command whose reply can no longer be awaited. */
static gboolean
hard_passed(gint64 hard)
{
	return hard > 0 && g_get_monotonic_time() >= hard;
}

void
smtp_set_deadline_error(GError **error, const char *stage, const char *doing)
{
	smtp_set_error(error, SMTP_ERROR_TIMEOUT, stage, NULL,
	               "overall deadline ran out in %s %s", stage, doing);
}

/* Wait for @events on @fd until @deadline; FALSE when it passed.  A
 * poll() error other than EINTR counts as ready: the following I/O
 * call then reports the real error. */
static gboolean
wait_fd(int fd, short events, gint64 deadline)
{
	for (;;) {
		struct pollfd pfd = {.fd = fd, .events = events};
		gint64 left = deadline - g_get_monotonic_time();
		int ms, rc;

		if (left <= 0)
			return FALSE;
		ms = (int)MIN((left + 999) / 1000, G_MAXINT);
		rc = poll(&pfd, 1, ms);
		if (rc > 0 || (rc < 0 && errno != EINTR))
			return TRUE;
	}
}

/* ------------------------------------------------------------------ */
/* Connecting                                                           */
/* ------------------------------------------------------------------ */

static char *
format_peer(const char *host, const struct addrinfo *ai, guint16 port)
{
	char addr[NI_MAXHOST];

	if (getnameinfo(ai->ai_addr, ai->ai_addrlen, addr, sizeof(addr), NULL,
	                0, NI_NUMERICHOST) != 0)
		g_strlcpy(addr, "unknown", sizeof(addr));
	return g_strdup_printf("%s[%s]:%u", host, addr, port);
}

/* One attempt; returns the fd or -1 with *@why set (static string). */
static int
try_connect(const struct addrinfo *ai, guint timeout_ms, gint64 hard,
            const char **why, gboolean *hard_ran_out)
{
	gboolean is_hard;
	gint64 deadline = deadline_after(timeout_ms, hard, &is_hard);
	int fd, err = 0, one = 1;
	socklen_t err_len = sizeof(err);

	fd = socket(ai->ai_family,
	            ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
	            ai->ai_protocol);
	if (fd < 0) {
		*why = g_strerror(errno);
		return -1;
	}
	if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
		if (errno != EINPROGRESS) {
			err = errno;
		} else if (!wait_fd(fd, POLLOUT, deadline)) {
			*why = "connection timed out";
			*hard_ran_out = is_hard;
			close(fd);
			return -1;
		} else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err,
		                      &err_len) < 0) {
			err = errno;
		}
	}
	if (err != 0) {
		*why = g_strerror(err);
		close(fd);
		return -1;
	}

	/* Commands and data blocks go out whole; Nagle would only hold
	 * the last small piece back until the server's delayed ACK. */
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	return fd;
}

SmtpConn *
smtp_conn_open(const char *host, guint16 port, guint timeout_ms,
               gint64 hard_deadline, char **peer, GError **error)
{
	struct addrinfo hints = {0}, *res = NULL;
	char port_str[8];
	const char *why = "no address";
	gboolean hard_ran_out = FALSE;
	SmtpConn *conn;
	int rc, fd = -1;

	if (hard_passed(hard_deadline)) {
		smtp_set_deadline_error(error, "connect", "before connecting");
		return NULL;
	}

	/* Step 1: resolve; AI_ADDRCONFIG is left out on purpose, it
	 * hides ::1 and 127.0.0.1 on hosts with only loopback up. */
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_NUMERICSERV;
	g_snprintf(port_str, sizeof(port_str), "%u", port);
	rc = getaddrinfo(host, port_str, &hints, &res);
	if (rc != 0) {
		if (peer != NULL) {
			g_free(*peer);
			*peer = g_strdup_printf("%s[unknown]:%u", host, port);
		}
		smtp_set_error(error, SMTP_ERROR_CONNECT, "connect", NULL,
		               "cannot resolve %s: %s", host,
		               rc == EAI_SYSTEM ? g_strerror(errno)
		                                : gai_strerror(rc));
		return NULL;
	}

	/* Step 2: each address in the resolver's order. */
	for (struct addrinfo *ai = res; ai != NULL && fd < 0 && !hard_ran_out;
	     ai = ai->ai_next) {
		if (peer != NULL) {
			g_free(*peer);
			*peer = format_peer(host, ai, port);
		}
		fd = try_connect(ai, timeout_ms, hard_deadline, &why,
		                 &hard_ran_out);
	}
	freeaddrinfo(res);
	if (fd < 0 && hard_ran_out) {
		smtp_set_deadline_error(error, "connect", "while connecting");
		return NULL;
	}
	if (fd < 0) {
		smtp_set_error(error, SMTP_ERROR_CONNECT, "connect", NULL,
		               "cannot connect to %s: %s",
		               peer && *peer ? *peer : host, why);
		return NULL;
	}

	conn = g_new0(SmtpConn, 1);
	conn->fd = fd;
	conn->transport = &plain_transport;
	conn->parser = smtp_reply_parser_new();
	conn->hard_deadline = hard_deadline;
	conn->drained = TRUE; /* the greeting is not there yet */
	return conn;
}

void
smtp_conn_free(SmtpConn *conn)
{
	if (conn == NULL)
		return;
	conn->transport->close(conn);
	close(conn->fd);
	smtp_reply_parser_free(conn->parser);
	g_free(conn);
}

int
smtp_conn_get_fd(const SmtpConn *conn)
{
	return conn->fd;
}

gboolean
smtp_conn_has_pending(SmtpConn *conn)
{
	return conn->start < conn->end || conn->transport->pending(conn);
}

void
smtp_conn_set_transport(SmtpConn *conn, const SmtpTransport *transport,
                        gpointer data)
{
	conn->transport = transport;
	conn->transport_data = data;
}

gpointer
smtp_conn_get_transport_data(const SmtpConn *conn)
{
	return conn->transport_data;
}

gboolean
smtp_conn_is_plain(const SmtpConn *conn)
{
	return conn->transport == &plain_transport;
}

gboolean
smtp_conn_wait(SmtpConn *conn, short events, gint64 deadline)
{
	return wait_fd(conn->fd, events, deadline);
}

/* ------------------------------------------------------------------ */
/* Writing and reading                                                  */
/* ------------------------------------------------------------------ */

gboolean
smtp_conn_write(SmtpConn *conn, const void *data, gsize len, guint timeout_ms,
                const char *stage, GError **error)
{
	gboolean is_hard;
	gint64 deadline =
	    deadline_after(timeout_ms, conn->hard_deadline, &is_hard);
	const char *p = data;

	if (len > 0 && hard_passed(conn->hard_deadline)) {
		smtp_set_deadline_error(error, stage, "before sending");
		return FALSE;
	}
	while (len > 0) {
		short want = POLLOUT;
		ssize_t n = conn->transport->send(conn, p, len, &want);

		if (n > 0) {
			p += n;
			len -= n;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
			smtp_set_error(error, SMTP_ERROR_DISCONNECTED, stage,
			               NULL,
			               "connection lost while sending: %s",
			               g_strerror(errno));
			return FALSE;
		}
		if (!wait_fd(conn->fd, want, deadline)) {
			if (is_hard)
				smtp_set_deadline_error(error, stage,
				                        "while sending");
			else
				smtp_set_error(error, SMTP_ERROR_TIMEOUT, stage,
				               NULL,
				               "timed out sending after %u ms",
				               timeout_ms);
			return FALSE;
		}
	}
	return TRUE;
}

/*
 * Fill the empty buffer with what the server sent, within @deadline.
 *
 * A read that returned less than the buffer emptied the socket's queue
 * (TCP hands over all it holds, up to the length asked).  Since then we
 * parsed what it gave, and perhaps wrote (check_quiet() having made
 * sure nothing had come in before), so what we wait for now is most
 * likely still on its way.  On the plain transport the wait then comes
 * first: a recv() now would almost always say EAGAIN, a system call per
 * reply for nothing; when the bytes are there, poll() says so at once.
 * After a full buffer, more may be queued: read first.
 * The TLS transport reads first always, as OpenSSL may hold decrypted
 * bytes that poll() cannot see.
 */
static gboolean
fill(SmtpConn *conn, gint64 deadline, gboolean is_hard, guint timeout_ms,
     const char *stage, GError **error)
{
	short want = POLLIN;
	gboolean ready =
	    !(conn->drained && conn->transport == &plain_transport);

	for (;;) {
		ssize_t n;

		if (!ready && !wait_fd(conn->fd, want, deadline)) {
			if (is_hard)
				smtp_set_deadline_error(
				    error, stage, "waiting for the reply");
			else
				smtp_set_error(error, SMTP_ERROR_TIMEOUT, stage,
				               NULL, "no reply within %u ms",
				               timeout_ms);
			return FALSE;
		}
		n = conn->transport->recv(conn, conn->buf, sizeof(conn->buf),
		                          &want);
		if (n > 0) {
			conn->start = 0;
			conn->end = n;
			conn->drained = (gsize)n < sizeof(conn->buf);
			return TRUE;
		}
		if (n == 0) {
			smtp_set_error(error, SMTP_ERROR_DISCONNECTED, stage,
			               NULL, "connection closed by server");
			return FALSE;
		}
		/* Interrupted: read again at once; EAGAIN: wait first */
		ready = errno == EINTR;
		if (!ready && errno != EAGAIN && errno != EWOULDBLOCK) {
			smtp_set_error(error, SMTP_ERROR_DISCONNECTED, stage,
			               NULL, "connection lost: %s",
			               g_strerror(errno));
			return FALSE;
		}
	}
}

gboolean
smtp_conn_read_reply(SmtpConn *conn, guint timeout_ms, const char *stage,
                     SmtpReply *reply, GError **error)
{
	gboolean is_hard;
	gint64 deadline =
	    deadline_after(timeout_ms, conn->hard_deadline, &is_hard);

	for (;;) {
		SmtpParseStatus st;
		gsize used = 0;

		st = smtp_reply_parser_feed(
		    conn->parser, conn->buf + conn->start,
		    conn->end - conn->start, &used, error);
		conn->start += used;
		if (st == SMTP_PARSE_DONE) {
			smtp_reply_parser_take(conn->parser, reply);
			return TRUE;
		}
		if (st == SMTP_PARSE_ERROR) {
			if (error != NULL && *error != NULL)
				smtp_error_set_stage(*error, stage);
			return FALSE;
		}
		if (!fill(conn, deadline, is_hard, timeout_ms, stage, error))
			return FALSE;
	}
}
