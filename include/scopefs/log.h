/* log.h — one line per event on stderr (the daemon's log under -f).
 *
 * The level is set once in main() before any thread starts and only read
 * afterwards, so it needs no lock. */
#ifndef SCOPEFS_LOG_H
#define SCOPEFS_LOG_H

enum sf_log_level { SF_LOG_ERROR = 0, SF_LOG_WARN, SF_LOG_INFO, SF_LOG_DEBUG };

void sf_log_set_level(int level);
/* Also write each record to fd (-1: stop).  main() uses it while it builds
 * the mount, before stderr becomes the log=FILE, so those lines (why a
 * stack or slide is left out) reach the file too.  Set like the level:
 * only while no other thread runs. */
void sf_log_copy_to(int fd);
void sf_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
