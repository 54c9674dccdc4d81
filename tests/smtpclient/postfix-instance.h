/*
 * postfix-instance.h - a private Postfix for tests against the real
 * server
 *
 * One instance lives in a temporary directory: its own main.cf and
 * master.cf (copied from Debian's master.cf.dist, chroot off, the port
 * 25 smtpd removed), queue, data directory and log file, loopback only,
 * smtpd services on ports picked free at run time.  /etc/postfix is
 * never read or written.  Helper processes (smtp-sink) can be started
 * beside it.
 *
 * A watchdog process is forked first: when the test program ends, by
 * postfix_instance_stop() or by an aborted assertion or a signal, the
 * watchdog sees its pipe close, stops the master and every helper by
 * pid and removes the directory.  So no Postfix outlives its test.
 *
 * Every function asserts: a Postfix that cannot be set up is a broken
 * test, not an outcome under test.  The log helpers need the smtpd
 * services to run with debug_peer_list=127.0.0.1 (they do by default),
 * since they find a session by the EHLO name it logs.
 */
#ifndef POSTFIX_INSTANCE_H
#define POSTFIX_INSTANCE_H

#include <glib.h>
#include <sys/types.h>

typedef struct PostfixInstance PostfixInstance;

/*
 * postfix_instance_new: a directory and a watchdog for a new instance,
 * not started yet; its main.cf holds what every test needs (queue,
 * log, loopback only, no local delivery, default_transport=discard).
 * Returns NULL and sets *@skip (static) when Postfix is not installed
 * or this process is not root ("postfix start" needs root).
 * (transfer full): end with postfix_instance_stop().
 */
PostfixInstance *postfix_instance_new(const char **skip);

/* The top directory (transfer none); test files may go there. */
const char *postfix_instance_dir(const PostfixInstance *pf);

/* The configuration directory, for "postconf -c" (transfer none). */
const char *postfix_instance_conf(const PostfixInstance *pf);

/* postfix_instance_run: run @argv (searched in PATH) and wait;
 * fails the test, with its output, unless it exits 0. */
void postfix_instance_run(const char *const *argv);

/* postfix_instance_set: one main.cf setting, "name=value". */
void postfix_instance_set(PostfixInstance *pf, const char *setting);

/*
 * postfix_instance_port: a free loopback port, kept reserved (bound)
 * until postfix_instance_start() or postfix_instance_spawn() uses it,
 * so successive calls never return the same port.
 */
guint16 postfix_instance_port(PostfixInstance *pf);

/*
 * postfix_instance_add_smtpd: a smtpd service on 127.0.0.1:@port with
 * @options ("-o name=value ...", may be NULL) after the debug logging
 * the log helpers need.  Before postfix_instance_start().
 */
void postfix_instance_add_smtpd(PostfixInstance *pf, guint16 port,
                                const char *options);

/*
 * postfix_instance_spawn: start @argv (searched in PATH) listening on
 * 127.0.0.1:@port (a reserved port, released just before), output to
 * the file @name.log in the directory; waits until the port accepts
 * connections.  The watchdog stops it by pid.
 */
void postfix_instance_spawn(PostfixInstance *pf, const char *name, guint16 port,
                            const char *const *argv);

/* postfix_instance_start: "postfix start"; waits for the master and
 * every smtpd port. */
void postfix_instance_start(PostfixInstance *pf);

/*
 * postfix_instance_stop: wake the watchdog and wait until it has
 * stopped every process and removed the directory; frees @pf.  NULL is
 * ignored.
 */
void postfix_instance_stop(PostfixInstance *pf);

/* The whole log so far (transfer full); "" when there is none yet. */
char *postfix_instance_log(const PostfixInstance *pf);

/*
 * postfix_instance_session: the commands Postfix read in the one
 * session whose client said EHLO (or HELO) @helo_name, in order, as
 * logged ("MAIL FROM:<a> SIZE=12"), and in *@end (when not NULL) the
 * command counts of its "disconnect from" line ("ehlo=1 mail=1 ...
 * commands=5").  Waits up to 10 s for the session to end.  Fails the
 * test when there is no such session, or more than one.
 * (transfer full): an array of char *.
 */
GPtrArray *postfix_instance_session(const PostfixInstance *pf,
                                    const char *helo_name, char **end);

/*
 * postfix_instance_wait_log: wait up to 10 s until the log holds
 * @needle; whether it does.
 */
gboolean postfix_instance_wait_log(const PostfixInstance *pf,
                                   const char *needle);

#endif /* POSTFIX_INSTANCE_H */
