"""Spam filtering for inbound mail: a Bayesian token model in the KV store plus weighted rules.

    tokenizer.py  raw message -> headers, links, relays, tokens
    bayes.py      token counts in the KV store; Robinson f(w) + Fisher chi-squared combining
    bytemodel.py  online logistic regression over hashed byte 4-grams of the raw message's
                  start, its weights in the KV store (one more input of the combiner)
    rules.py      weighted local rules and SPF/DKIM/DMARC results
    combine.py    the learned combiner: logistic regression over the model's per-group
                  evidence and the rule hits, fitted by `mailmesh spam train`, stored with the model
    filter.py     SpamFilter: classify / train / headers (what the SMTP pipeline calls)
    feedback.py   EVENTS consumer: a user adding or removing SPAM trains the models

The model's store: `{data_dir}/ingest.db` (embedded SQLite) or FoundationDB when
`fdb_cluster_file` (MAILMESH_FDB_CLUSTER_FILE) is set; see spam_db_url. Every ingest replica
and `mailmesh spam train|eval` share it.
"""

from __future__ import annotations

from mailmesh_common.config import Settings
from svc_ingest.spam.filter import AuthSummary, SpamFilter, Verdict

__all__ = ["INGEST_DB_FILE", "AuthSummary", "SpamFilter", "Verdict", "spam_db_url"]

INGEST_DB_FILE = "ingest.db"


def spam_db_url(settings: Settings) -> str:
    """The KV database holding the spam model: FoundationDB when configured, else the
    embedded SQLite file {data_dir}/ingest.db."""
    if settings.fdb_cluster_file:
        return f"fdb:{settings.fdb_cluster_file}"
    return str(settings.data_dir / INGEST_DB_FILE)
