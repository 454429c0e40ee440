"""The checks svc_ingest runs on a message after DATA, one module each: sender authentication
(spf.py, dkim.py, dmarc.py, with psl.py for organizational domains) summed up in an RFC 8601
Authentication-Results header (authres.py), and content filtering (spam, virus).

Checks never raise for what the remote side got wrong; they return a result naming it. DNS goes
through mailmesh_common.dns.Resolver only."""
