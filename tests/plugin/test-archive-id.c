/*
 * test-archive-id.c - own ids verify; forged, changed or foreign do not
 */
#include <fcntl.h>
#include <glib/gstdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "archive-id.h"

static const guint8 key_a[32] = "0123456789abcdef0123456789abcdef";
static const guint8 key_b[32] = "fedcba9876543210fedcba9876543210";

static void
test_own_verifies(void)
{
	g_autoptr(AmArchiveKey) key = am_archive_key_new(key_a, 32);
	g_autofree char *id = am_archive_id_new(key);
	g_autofree char *spaced = g_strdup_printf("  %s \t", id);

	g_assert_true(g_str_has_prefix(id, "am1."));
	g_assert_true(am_archive_id_verify(key, id));
	/* Header values arrive with their leading space. */
	g_assert_true(am_archive_id_verify(key, spaced));
}

static void
test_unique(void)
{
	g_autoptr(AmArchiveKey) key = am_archive_key_new(key_a, 32);
	g_autofree char *a = am_archive_id_new(key);
	g_autofree char *b = am_archive_id_new(key);

	g_assert_cmpstr(a, !=, b);
}

static void
test_other_key(void)
{
	g_autoptr(AmArchiveKey) ka = am_archive_key_new(key_a, 32);
	g_autoptr(AmArchiveKey) kb = am_archive_key_new(key_b, 32);
	g_autofree char *id = am_archive_id_new(ka);

	g_assert_false(am_archive_id_verify(kb, id));
}

/* Every single-character change, and a table of malformed values. */
static void
test_modified(void)
{
	g_autoptr(AmArchiveKey) key = am_archive_key_new(key_a, 32);
	g_autofree char *id = am_archive_id_new(key);
	static const char *const forged[] = {
	    "",
	    "am1.",
	    "am1.00000000000000000000000000000000."
	    "00000000000000000000000000000000",
	    "am2.00000000000000000000000000000000."
	    "00000000000000000000000000000000",
	    "garbage",
	    "am1.zz",
	};
	gsize i;

	for (i = 0; id[i] != '\0'; i++) {
		g_autofree char *copy = g_strdup(id);

		copy[i] = copy[i] == '0' ? '1' : '0';
		g_assert_false(am_archive_id_verify(key, copy));
	}
	for (i = 0; i < G_N_ELEMENTS(forged); i++)
		g_assert_false(am_archive_id_verify(key, forged[i]));
	{
		g_autofree char *longer = g_strconcat(id, "0", NULL);
		g_autofree char *upper = g_ascii_strup(id, -1);

		g_assert_false(am_archive_id_verify(key, longer));
		g_assert_false(am_archive_id_verify(key, upper));
		g_assert_false(am_archive_id_verify(key, NULL));
	}
}

static void
test_key_file(void)
{
	g_autofree char *dir = g_dir_make_tmp("am-key-XXXXXX", NULL);
	g_autofree char *path = g_build_filename(dir, "key", NULL);
	g_autoptr(GError) error = NULL;
	g_autoptr(AmArchiveKey) k1 = NULL;
	g_autoptr(AmArchiveKey) k2 = NULL;
	g_autofree char *id = NULL;
	struct stat st;

	/* Created 0600 with 32 octets when missing, then reused. */
	k1 = am_archive_key_load(path, &error);
	g_assert_no_error(error);
	g_assert_cmpint(g_stat(path, &st), ==, 0);
	g_assert_cmpint(st.st_mode & 0777, ==, 0600);
	g_assert_cmpint(st.st_size, ==, 32);
	k2 = am_archive_key_load(path, &error);
	g_assert_no_error(error);
	id = am_archive_id_new(k1);
	g_assert_true(am_archive_id_verify(k2, id));

	/* A key others can read is refused. */
	g_chmod(path, 0644);
	g_assert_null(am_archive_key_load(path, &error));
	g_assert_error(error, AM_ARCHIVE_KEY_ERROR, AM_ARCHIVE_KEY_ERROR_BAD);
	g_clear_error(&error);

	/* So is one too short to be a secret. */
	g_chmod(path, 0600);
	g_assert_true(g_file_set_contents(path, "short", -1, NULL));
	g_chmod(path, 0600);
	g_assert_null(am_archive_key_load(path, &error));
	g_assert_error(error, AM_ARCHIVE_KEY_ERROR, AM_ARCHIVE_KEY_ERROR_BAD);
	g_unlink(path);
	g_rmdir(dir);
}

/* The key's own directory is made (0700) when missing; a deeper
 * missing tree is an error naming the directory, never created. */
static void
test_key_dir(void)
{
	g_autofree char *top = g_dir_make_tmp("am-keydir-XXXXXX", NULL);
	g_autofree char *dir = g_build_filename(top, "lib", NULL);
	g_autofree char *path = g_build_filename(dir, "key", NULL);
	g_autofree char *deep = g_build_filename(top, "a", "b", "key", NULL);
	g_autofree char *deep_dir = g_build_filename(top, "a", NULL);
	g_autoptr(GError) error = NULL;
	g_autoptr(AmArchiveKey) key = NULL;
	struct stat st;

	key = am_archive_key_load(path, &error);
	g_assert_no_error(error);
	g_assert_nonnull(key);
	g_assert_cmpint(g_stat(dir, &st), ==, 0);
	g_assert_cmpint(st.st_mode & 0777, ==, 0700);

	g_assert_null(am_archive_key_load(deep, &error));
	g_assert_error(error, AM_ARCHIVE_KEY_ERROR, AM_ARCHIVE_KEY_ERROR_IO);
	g_assert_nonnull(strstr(error->message, "cannot create directory"));
	g_assert_false(g_file_test(deep_dir, G_FILE_TEST_EXISTS));

	g_unlink(path);
	g_rmdir(dir);
	g_rmdir(top);
}

/* A 0600 file of @len octets at @path, each octet @c. */
static void
write_key_file(const char *path, gsize len, char c)
{
	g_autofree char *data = g_strnfill(len, c);

	g_assert_true(g_file_set_contents(path, data, len, NULL));
	g_assert_cmpint(g_chmod(path, 0600), ==, 0);
}

/* 16..1024 octets are taken whole; one more is refused, naming both. */
static void
test_key_size_limits(void)
{
	static const struct {
		gsize len;
		gboolean ok;
	} cases[] = {
	    {AM_ARCHIVE_KEY_MIN - 1, FALSE},
	    {AM_ARCHIVE_KEY_MIN, TRUE},
	    {AM_ARCHIVE_KEY_MAX, TRUE},
	    {AM_ARCHIVE_KEY_MAX + 1, FALSE},
	    {65536, FALSE},
	};
	g_autofree char *dir = g_dir_make_tmp("am-keysize-XXXXXX", NULL);
	g_autofree char *path = g_build_filename(dir, "key", NULL);
	gsize i;

	g_assert_cmpint(AM_ARCHIVE_KEY_MAX, ==, 1024);
	for (i = 0; i < G_N_ELEMENTS(cases); i++) {
		g_autoptr(GError) error = NULL;
		g_autoptr(AmArchiveKey) key = NULL;
		g_autoptr(AmArchiveKey) same = NULL;
		g_autofree char *id = NULL;
		g_autofree char *data = g_strnfill(cases[i].len, 'k');

		write_key_file(path, cases[i].len, 'k');
		key = am_archive_key_load(path, &error);
		if (!cases[i].ok) {
			g_assert_null(key);
			g_assert_error(error, AM_ARCHIVE_KEY_ERROR,
			               AM_ARCHIVE_KEY_ERROR_BAD);
			g_assert_nonnull(strstr(error->message, path));
			g_assert_nonnull(strstr(
			    error->message,
			    cases[i].len < AM_ARCHIVE_KEY_MIN ? "16" : "1024"));
			continue;
		}

		/* The whole file is the key: the same octets verify. */
		g_assert_no_error(error);
		same = am_archive_key_new((const guint8 *)data, cases[i].len);
		id = am_archive_id_new(key);
		g_assert_true(am_archive_id_verify(same, id));
	}
	g_unlink(path);
	g_rmdir(dir);
}

static glong
max_rss_kb(void)
{
	struct rusage ru;

	g_assert_cmpint(getrusage(RUSAGE_SELF, &ru), ==, 0);
	return ru.ru_maxrss;
}

/*
 * A 300 MB file (sparse: no disk used) is refused at once, and never
 * read whole: the process's peak memory does not grow by its size.
 */
static void
test_key_huge_file(void)
{
	g_autofree char *dir = g_dir_make_tmp("am-keybig-XXXXXX", NULL);
	g_autofree char *path = g_build_filename(dir, "key", NULL);
	g_autoptr(GError) error = NULL;
	glong before;
	int fd;

	fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0600);
	g_assert_cmpint(fd, >=, 0);
	g_assert_cmpint(ftruncate(fd, 300 * 1024 * 1024), ==, 0);
	close(fd);

	before = max_rss_kb();
	g_assert_null(am_archive_key_load(path, &error));
	g_assert_error(error, AM_ARCHIVE_KEY_ERROR, AM_ARCHIVE_KEY_ERROR_BAD);
	g_assert_nonnull(strstr(error->message, path));
	g_assert_nonnull(strstr(error->message, "at most 1024 octets"));
	g_assert_cmpint(max_rss_kb() - before, <, 16 * 1024);
	g_unlink(path);
	g_rmdir(dir);
}

/* A path that is not a regular file (a directory, a device) is no key. */
static void
test_key_not_regular(void)
{
	g_autofree char *dir = g_dir_make_tmp("am-keyreg-XXXXXX", NULL);
	g_autofree char *sub = g_build_filename(dir, "key", NULL);
	g_autofree char *link = g_build_filename(dir, "zero", NULL);
	const char *paths[] = {sub, link};
	gsize i;

	g_assert_cmpint(g_mkdir(sub, 0700), ==, 0);
	g_assert_cmpint(symlink("/dev/zero", link), ==, 0);
	for (i = 0; i < G_N_ELEMENTS(paths); i++) {
		g_autoptr(GError) error = NULL;

		g_assert_null(am_archive_key_load(paths[i], &error));
		g_assert_error(error, AM_ARCHIVE_KEY_ERROR,
		               AM_ARCHIVE_KEY_ERROR_BAD);
		g_assert_nonnull(strstr(error->message, paths[i]));
	}
	g_unlink(link);
	g_rmdir(sub);
	g_rmdir(dir);
}

/*
 * Each cause has its own message, starting with the path, and --check
 * (am_archive_key_check) says exactly what the daemon's load says,
 * creating nothing.
 */
static void
test_key_causes(void)
{
	g_autofree char *dir = g_dir_make_tmp("am-keywhy-XXXXXX", NULL);
	g_autofree char *sub = g_build_filename(dir, "subdir", NULL);
	g_autofree char *zero = g_build_filename(dir, "zero", NULL);
	g_autofree char *open_mode = g_build_filename(dir, "open", NULL);
	g_autofree char *shortk = g_build_filename(dir, "short", NULL);
	g_autofree char *longk = g_build_filename(dir, "long", NULL);
	g_autofree char *under = g_build_filename(open_mode, "key", NULL);
	g_autofree char *good = g_build_filename(dir, "good", NULL);
	g_autofree char *missing = g_build_filename(dir, "missing", NULL);
	const struct {
		const char *path;
		int code;
		const char *why;
	} cases[] = {
	    {sub, AM_ARCHIVE_KEY_ERROR_BAD,
	     ": is a directory; the key must be a regular file"},
	    {zero, AM_ARCHIVE_KEY_ERROR_BAD,
	     ": is a character device; the key must be a regular file"},
	    {open_mode, AM_ARCHIVE_KEY_ERROR_BAD,
	     ": mode 0640 is open to group or others; the key must be "
	     "readable by its owner only (chmod 0600 "},
	    {shortk, AM_ARCHIVE_KEY_ERROR_BAD,
	     ": too short: a key needs at least 16 octets, the file has 5 "},
	    {longk, AM_ARCHIVE_KEY_ERROR_BAD,
	     ": too long: a key holds at most 1024 octets, the file has "
	     "2000 "},
	    {under, AM_ARCHIVE_KEY_ERROR_IO, ": cannot open: Not a directory"},
	};
	g_autoptr(GError) error = NULL;
	g_autofree char *before = NULL;
	g_autofree char *after = NULL;
	gsize i;

	g_assert_cmpint(g_mkdir(sub, 0700), ==, 0);
	g_assert_cmpint(symlink("/dev/zero", zero), ==, 0);
	write_key_file(open_mode, 32, 'o');
	g_assert_cmpint(g_chmod(open_mode, 0640), ==, 0);
	write_key_file(shortk, 5, 's');
	write_key_file(longk, 2000, 'l');
	write_key_file(good, 32, 'g');

	for (i = 0; i < G_N_ELEMENTS(cases); i++) {
		g_autoptr(GError) load_error = NULL;
		g_autoptr(GError) check_error = NULL;
		g_autofree char *want =
		    g_strconcat(cases[i].path, cases[i].why, NULL);

		g_assert_null(am_archive_key_load(cases[i].path, &load_error));
		g_assert_error(load_error, AM_ARCHIVE_KEY_ERROR, cases[i].code);
		g_test_message("%s", load_error->message);
		g_assert_false(
		    am_archive_key_check(cases[i].path, &check_error));
		g_assert_error(check_error, AM_ARCHIVE_KEY_ERROR,
		               cases[i].code);
		g_assert_true(g_str_has_prefix(check_error->message, want));
		/* The daemon tries to create what is missing first; it
		 * fails there, for the same reason. */
		if (cases[i].code == AM_ARCHIVE_KEY_ERROR_IO)
			g_assert_true(g_str_has_suffix(load_error->message,
			                               ": cannot create: Not a "
			                               "directory"));
		else
			g_assert_cmpstr(check_error->message, ==,
			                load_error->message);
	}

	/* A good file passes and stays as it was; a missing one is
	 * MISSING and is not created. */
	g_assert_true(g_file_get_contents(good, &before, NULL, NULL));
	g_assert_true(am_archive_key_check(good, &error));
	g_assert_no_error(error);
	g_assert_true(g_file_get_contents(good, &after, NULL, NULL));
	g_assert_cmpstr(before, ==, after);
	g_assert_false(am_archive_key_check(missing, &error));
	g_assert_error(error, AM_ARCHIVE_KEY_ERROR,
	               AM_ARCHIVE_KEY_ERROR_MISSING);
	g_assert_false(g_file_test(missing, G_FILE_TEST_EXISTS));

	g_rmdir(sub);
	g_unlink(zero);
	g_unlink(open_mode);
	g_unlink(shortk);
	g_unlink(longk);
	g_unlink(good);
	g_assert_cmpint(g_rmdir(dir), ==, 0);
}

int
main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);
	g_test_add_func("/plugin/archive-id/own", test_own_verifies);
	g_test_add_func("/plugin/archive-id/unique", test_unique);
	g_test_add_func("/plugin/archive-id/other-key", test_other_key);
	g_test_add_func("/plugin/archive-id/modified", test_modified);
	g_test_add_func("/plugin/archive-id/key-file", test_key_file);
	g_test_add_func("/plugin/archive-id/key-dir", test_key_dir);
	g_test_add_func("/plugin/archive-id/key-size", test_key_size_limits);
	g_test_add_func("/plugin/archive-id/key-huge", test_key_huge_file);
	g_test_add_func("/plugin/archive-id/key-not-regular",
	                test_key_not_regular);
	g_test_add_func("/plugin/archive-id/key-causes", test_key_causes);
	return g_test_run();
}
