"""System glue: systemd (sd_notify, passed fds, journald, the fd store)."""
