"""m4ctl: the command line for users and administrators of m4d (see `m4ctl --help`)."""
