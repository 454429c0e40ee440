"""svc_mailbox: accounts, labels, messages, threads, flags, IMAP UIDs/MODSEQ, changelog."""
