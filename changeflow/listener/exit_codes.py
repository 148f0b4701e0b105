"""The listener's process exit codes: each says why it stopped, so a supervisor can react."""

EXIT_OK = 0  # stopped on request (SIGTERM/SIGINT) after finishing its batch
EXIT_CRASH = 1  # an unexpected exception (a bug): logged with its traceback, passwords masked
# bad flags or settings (argparse uses 2 as well), an unwritable health file, or MongoDB refusing the
# credentials of MONGODB_URI (AuthenticationFailed) or their rights (Unauthorized)
EXIT_USAGE = 2
EXIT_HISTORY_LOST = 3  # the checkpoint is older than the oplog: events were lost, a human decides
EXIT_FATAL = 4  # any other non-resumable MongoDB error (not a replica set, bad token, ...)
# a backfill stopped by SIGINT/SIGTERM before its end (128 + SIGINT, as shells report it): its
# position is saved, `changeflow backfill resume ID` goes on from there
EXIT_INTERRUPTED = 130
